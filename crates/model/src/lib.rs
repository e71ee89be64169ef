//! Gemma-2 / Gemma-3 text models for rupantor: config (both transformers dialects), a
//! differentiable candle forward pass, swappable linear layers for QLoRA, and loaders for HF
//! directories and GGUF files.

pub mod config;
#[cfg(feature = "cuda")]
mod cuda;
pub mod device;
pub mod gemma;
pub mod generate;
pub mod gguf;
pub mod hub;
pub mod linear;
pub mod lm_head;
pub mod loader;
pub mod loss;
pub mod ops;
pub mod qlora;
pub mod random;
pub mod tokenizer;

pub use config::{
    Arch, ConfigError, GemmaConfig, LayerConfig, ModelConfig, Quantization, QuantizationConfig,
};
pub use gemma::{Gemma, KvCache, LayerWeights, LossGrads};
pub use generate::{generate, generate_until, GenStats, GenerateConfig, Generation, StopReason};
pub use gguf::{GgmlType, GgufError, GgufFile, GgufGemma, GgufTensorInfo, GgufValue};
pub use linear::{
    DenseBuilder, DenseLinear, FrozenMatmulGrad, Linear, LinearBuilder, LinearRole, LinearWeight,
    QuantizedWeight,
};
pub use lm_head::{InferenceBuilder, LmHeadForm, Q8Linear};
pub use loader::{
    build_gemma, load_config, load_gemma, load_gemma_gguf, load_gemma_gguf_dense, load_gemma_with,
    load_model, LoadError, SafetensorsStore, TensorSource,
};
pub use loss::{chunked_lm_loss, LmLoss, IGNORE_INDEX};
pub use qlora::{
    DropoutClock, LoraAdapter, LoraConfig, NamedAdapter, Nf4Weight, QLoraBuilder, QLoraLinear,
};
pub use tokenizer::{
    chat_prompt, chat_prompt_turns, chat_user_content, ChatExample, GgufVocab, TokenKind,
    Tokenizer, TokenizerError,
};
