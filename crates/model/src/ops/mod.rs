//! Fused ops of the decoder layer, each a candle custom op with its `cpu_fwd` and `cuda_fwd`
//! side by side and a backward of its own: candle's composed versions cost a dozen kernel
//! launches (and as many saved intermediates) where one pass over the data does.

pub mod attention_softmax;
pub mod rms_norm;
pub mod rope;
