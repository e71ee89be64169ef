//! Gemma-2 / Gemma-3 text models for rupantor: config (both transformers dialects), a
//! differentiable candle forward pass, swappable linear layers for QLoRA, and an HF-directory
//! loader.

pub mod config;
pub mod gemma;
pub mod linear;
pub mod loader;
pub mod loss;
pub mod qlora;

pub use config::{
    Arch, ConfigError, GemmaConfig, LayerConfig, ModelConfig, Quantization, QuantizationConfig,
};
pub use gemma::{Gemma, KvCache, LayerWeights};
pub use linear::{
    DenseBuilder, DenseLinear, FrozenMatmulGrad, Linear, LinearBuilder, LinearRole, LinearWeight,
    QuantizedWeight,
};
pub use loader::{load_config, load_gemma, load_gemma_with, LoadError, SafetensorsStore};
pub use loss::{chunked_lm_loss, LmLoss, IGNORE_INDEX};
pub use qlora::{LoraAdapter, LoraConfig, NamedAdapter, Nf4Weight, QLoraBuilder, QLoraLinear};
