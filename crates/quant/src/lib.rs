//! Quantization codecs of rupantor, bit-compatible with bitsandbytes: NF4 with double
//! quantization for frozen weights, 8-bit blockwise dynamic quantization for optimizer states,
//! the safetensors layout HF transformers uses for bitsandbytes 4-bit checkpoints, and (with
//! the `cuda` feature) run-time compiled CUDA kernels.

pub mod bench;
pub mod blockwise8;
pub mod bnb_layout;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod gemv;
pub mod nf4;
pub mod torch_compat;

pub use blockwise8::{dynamic_map, Blockwise8, CodeLut};
pub use gemv::{nf4_gemv_f32, nf4_matvecs_f32, nf4_matvecs_with, q8_matvecs_f32, Q8Weight};
pub use nf4::{dequantize_nf4, NestedAbsmax, Nf4Tensor, SourceDtype, NF4_CODE};
