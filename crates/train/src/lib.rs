//! QLoRA fine-tuning for rupantor:
//!
//! * [`lora`]: the trainable model — LoRA layers over frozen NF4 (or f32) bases, with dropout
//!   masks keyed to the training position so a resumed run is bit-identical.
//! * [`adapter`]: adapters in Hugging Face PEFT's format, written and read.
//! * [`sft`]: problems -> chat-format ids and labels, validation slice, length buckets.
//! * [`trainer`]: the loop — accumulation, clipping, schedule, paged AdamW, evaluation with
//!   early stopping, metrics, `loss.png`, progress bar, atomic checkpoints and exact resume.
//! * [`optim`]: paged AdamW — 32-bit with `torch.optim.AdamW` arithmetic, and 8-bit with
//!   bitsandbytes 0.50's `AdamW8bit` CPU semantics — with resumable [`optim::StateDict`]s.
//! * [`schedule`]: cosine decay with linear warmup (HF `get_cosine_schedule_with_warmup`).
//! * [`clip`]: gradient clipping by global norm (`torch.nn.utils.clip_grad_norm_`).
//! * [`progress`]: where progress bars draw (a plain line per minute when stderr is a file).

pub mod adapter;
pub mod clip;
pub mod fsutil;
pub mod lora;
pub mod optim;
pub mod plot;
pub mod progress;
pub mod rng;
pub mod schedule;
pub mod sft;
pub mod trainer;

pub use adapter::{
    load_adapter_weights, read_adapter, save_adapter, AdapterConfig, AdapterWeights,
    ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE,
};
pub use clip::{clip_coefficient, clip_grad_norm, global_grad_norm};
pub use lora::{BaseFormat, DropoutClock, LoraBuilder, LoraLinear, LoraModel, LoraSpec};
pub use optim::{
    AdamW, AdamW8bit, AdamWConfig, Optimizer, PagedOptions, ParamRef, ParamSpec, StateDict,
};
pub use schedule::CosineWithWarmup;
pub use sft::{Batch, ChatEncoder, SftConfig, SftData, SftExample, Truncation};
pub use trainer::{
    read_metrics, train, train_with_hooks, Diverged, Metric, OptimizerKind, TrainConfig,
    TrainHooks, TrainReport,
};
