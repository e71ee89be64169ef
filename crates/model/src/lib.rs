//! Gemma-2 / Gemma-3 text models for rupantor: config (both transformers dialects), a
//! differentiable candle forward pass, swappable linear layers for QLoRA, and an HF-directory
//! loader.

pub mod config;
pub mod gemma;
pub mod linear;
pub mod loader;

pub use config::{Arch, ConfigError, GemmaConfig, LayerConfig, ModelConfig};
pub use gemma::{Gemma, KvCache, LayerWeights};
pub use linear::{DenseBuilder, DenseLinear, Linear, LinearBuilder, LinearRole, LinearWeight};
pub use loader::{load_config, load_gemma, load_gemma_with, LoadError, SafetensorsStore};
