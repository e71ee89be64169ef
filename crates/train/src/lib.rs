//! Training pieces of rupantor's QLoRA fine-tuning, framework-neutral over `f32` slices:
//!
//! * [`optim`]: paged AdamW — 32-bit with `torch.optim.AdamW` arithmetic, and 8-bit with
//!   bitsandbytes 0.50's `AdamW8bit` CPU semantics — with resumable [`optim::StateDict`]s.
//! * [`schedule`]: cosine decay with linear warmup (HF `get_cosine_schedule_with_warmup`).
//! * [`clip`]: gradient clipping by global norm (`torch.nn.utils.clip_grad_norm_`).

pub mod clip;
pub mod optim;
pub mod schedule;

pub use clip::{clip_grad_norm, global_grad_norm};
pub use optim::{
    AdamW, AdamW8bit, AdamWConfig, Optimizer, PagedOptions, ParamRef, ParamSpec, StateDict,
};
pub use schedule::CosineWithWarmup;
