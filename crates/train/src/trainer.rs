//! The training loop: micro-batches with gradient accumulation, the chunked LM loss, global
//! norm clipping, cosine schedule with warmup, paged (8-bit) AdamW, evaluation on the held-out
//! slice with early stopping, metrics, curves, a progress bar, and checkpoints a killed run
//! resumes from bit for bit.
//!
//! One optimizer step takes `grad_accum` micro-batches of the epoch's shuffled batch order (the
//! last step of an epoch takes what is left). The step's loss is HF Trainer's: the summed
//! next-token NLL of all its micro-batches over the number of loss tokens in them, so a
//! micro-batch's weight is its token count. Gradients are accumulated per LoRA tensor, checked
//! for NaN/inf per micro-batch, clipped to the global norm, and handed to the optimizer with the
//! learning rate of the schedule.
//!
//! Where that happens depends on the model's device ([`StepPath`]): on the CPU, host copies of
//! every LoRA tensor are kept and the gradients are accumulated, clipped and stepped as host
//! slices; on a GPU everything stays on the device (gradients accumulated as device tensors,
//! one host synchronisation per micro-batch for the NaN/inf check and one per step for the
//! norm, the optimizer stepping the variables in place with its state paged through host
//! memory), and LoRA values come to the host only for checkpoints, the best-adapter snapshot
//! and the saved adapter. Both paths compute the same step; the checkpoints are the same files,
//! so a run checkpointed on one device resumes on the other.
//!
//! Everything that decides the numbers is part of a checkpoint: the adapter (exact f32), the
//! optimizer state ([`StateDict`]), the step, the epoch, the position in the epoch's batch order
//! and that order, the order generator's state, the dropout clock (global micro-batch count, see
//! [`crate::lora`]), and the early-stopping state with the best adapter so far. A resumed run
//! therefore ends with the same adapter bytes as one never interrupted.
//!
//! Files under `out_dir`:
//!
//! * `adapter_config.json`, `adapter_model.safetensors`: the final adapter (best on validation);
//! * `metrics.jsonl`: one JSON object per step (`"kind": "train"`) and per evaluation
//!   (`"kind": "eval"`), rewritten atomically after each;
//! * `loss.png`: train and validation curves, redrawn after each evaluation and at the end;
//! * `checkpoint/latest.json` naming `checkpoint/step-NNNNNNNN/` with `state.json`,
//!   `adapter_model.safetensors`, `adapter_config.json`, `optimizer.safetensors` and, once an
//!   evaluation happened, `best_adapter.safetensors`. Each file is written atomically and the
//!   pointer is switched only once the whole directory is on disk, so a kill at any moment
//!   leaves the previous checkpoint in force.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use indicatif::{ProgressBar, ProgressStyle};
use rupantor_data::Problem;
use rupantor_model::linear::LinearRole;
use rupantor_model::LoraConfig;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::adapter::{
    peft_key, save_adapter, AdapterConfig, AdapterWeights, Half, ADAPTER_WEIGHTS_FILE,
};
use crate::clip::{clip_coefficient, clip_grad_norm, global_grad_norm};
use crate::fsutil::{sync_dir, write_atomic};
use crate::lora::{role_from_module, BaseFormat, LoraModel, LoraSpec, ALL_TARGETS};
use crate::optim::{AdamW, AdamW8bit, AdamWConfig, Optimizer, ParamRef, ParamSpec, StateDict};
use crate::plot::plot_losses;
use crate::rng::SplitMix64;
use crate::schedule::CosineWithWarmup;
use crate::sft::{Batch, ChatEncoder, SftConfig, SftData, Truncation};

/// Which AdamW keeps the optimizer state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// bitsandbytes-style 8-bit state, paged (the paper's `paged_adamw_8bit`).
    #[default]
    Adamw8bit,
    /// f32 state, torch arithmetic.
    Adamw,
}

/// Everything a training run is configured by; every field has the paper's default (design
/// §5), so a TOML file needs only the keys it changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Recorded as `base_model_name_or_path` in the adapter config.
    pub model: Option<String>,
    // LoRA
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub rslora: bool,
    /// PEFT module names (`q_proj` ... `down_proj`).
    pub targets: Vec<String>,
    pub base_format: BaseFormat,
    // Optimisation
    pub optimizer: OptimizerKind,
    pub lr: f64,
    pub weight_decay: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    /// Warmup steps as a share of all steps (rounded up).
    pub warmup_ratio: f64,
    pub epochs: usize,
    /// Caps the run (and the schedule's length) at this many optimizer steps.
    pub max_steps: Option<u64>,
    pub micro_batch: usize,
    pub grad_accum: usize,
    /// Global gradient-norm clip (0 turns clipping off).
    pub clip: f32,
    /// Positions per logits chunk in the loss.
    pub loss_chunk: usize,
    /// Activation checkpointing: the forward pass keeps only each decoder layer's input and
    /// the backward pass runs each layer again (see `Gemma::loss_and_grads`). About a third
    /// more compute for a fraction of the activation memory; PEFT's k-bit preparation turns
    /// gradient checkpointing on by default too.
    pub recompute: bool,
    // Data
    pub max_len: usize,
    pub visible_tests: bool,
    pub val_fraction: f64,
    pub val_min: usize,
    // Control
    /// Evaluate every this many steps (and after the last).
    pub eval_every: u64,
    /// Stop after this many evaluations without a better validation loss.
    pub patience: usize,
    /// Checkpoint every this many steps (0: after every evaluation).
    pub checkpoint_every: u64,
    pub seed: u64,
    /// Continue from `out_dir/checkpoint` (the `--resume` flag).
    pub resume: bool,
    /// Draw the progress bar on stderr.
    pub progress: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: None,
            rank: 32,
            alpha: 64.0,
            dropout: 0.05,
            rslora: false,
            targets: ALL_TARGETS
                .iter()
                .map(|r| r.module_name().to_string())
                .collect(),
            base_format: BaseFormat::Nf4,
            optimizer: OptimizerKind::Adamw8bit,
            lr: 5e-5,
            weight_decay: 0.0,
            betas: (0.9, 0.999),
            eps: 1e-8,
            warmup_ratio: 0.03,
            epochs: 3,
            max_steps: None,
            micro_batch: 2,
            grad_accum: 4,
            clip: 1.0,
            loss_chunk: 256,
            recompute: true,
            max_len: 1024,
            visible_tests: false,
            val_fraction: 0.1,
            val_min: 4,
            eval_every: 10,
            patience: 3,
            checkpoint_every: 0,
            seed: 42,
            resume: false,
            progress: true,
        }
    }
}

impl TrainConfig {
    pub fn target_roles(&self) -> Result<Vec<LinearRole>> {
        ensure!(!self.targets.is_empty(), "no LoRA target modules");
        self.targets
            .iter()
            .map(|t| {
                role_from_module(t).with_context(|| {
                    format!("target module {t:?} is none of q,k,v,o,gate,up,down_proj")
                })
            })
            .collect()
    }

    pub fn lora(&self) -> LoraConfig {
        LoraConfig {
            rank: self.rank,
            alpha: self.alpha,
            dropout: self.dropout,
            rslora: self.rslora,
        }
    }

    /// The adapters to build the model with.
    pub fn lora_spec(&self) -> Result<LoraSpec> {
        Ok(LoraSpec {
            lora: self.lora(),
            targets: self.target_roles()?,
            seed: self.seed,
            base: self.base_format,
            dtype: candle_core::DType::F32,
        })
    }

    pub fn sft(&self) -> SftConfig {
        SftConfig {
            max_len: self.max_len,
            visible_tests: self.visible_tests,
            val_fraction: self.val_fraction,
            val_min: self.val_min,
            micro_batch: self.micro_batch,
        }
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(self.rank >= 1, "rank must be at least 1");
        ensure!(
            (0.0..1.0).contains(&self.dropout),
            "dropout {} is not in [0, 1)",
            self.dropout
        );
        ensure!(self.micro_batch >= 1, "micro_batch must be at least 1");
        ensure!(self.grad_accum >= 1, "grad_accum must be at least 1");
        ensure!(self.epochs >= 1, "epochs must be at least 1");
        ensure!(self.max_steps != Some(0), "max_steps must be at least 1");
        ensure!(self.eval_every >= 1, "eval_every must be at least 1");
        ensure!(self.patience >= 1, "patience must be at least 1");
        ensure!(self.loss_chunk >= 1, "loss_chunk must be at least 1");
        ensure!(
            (0.0..1.0).contains(&self.warmup_ratio),
            "warmup_ratio {} is not in [0, 1)",
            self.warmup_ratio
        );
        ensure!(
            self.clip >= 0.0 && self.clip.is_finite(),
            "clip must be >= 0"
        );
        self.adamw().validate()?;
        self.target_roles().map(|_| ())
    }

    fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            lr: self.lr,
            betas: self.betas,
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
    }

    /// The settings a checkpoint must agree on to be resumed (everything that changes the
    /// numbers; not `max_steps`, `resume`, `progress`, the recorded model name or `recompute`,
    /// whose gradients are the plain path's).
    fn fingerprint(&self) -> serde_json::Value {
        let mut c = self.clone();
        c.max_steps = None;
        c.resume = false;
        c.progress = false;
        c.model = None;
        let mut v = serde_json::to_value(c).expect("config is plain data");
        v.as_object_mut()
            .expect("config is a struct")
            .remove("recompute");
        v
    }
}

/// A run stopped on a non-finite loss or gradient. The last checkpoint is left as it was.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "training diverged at step {step}, micro-batch {micro_batch} (problems {problems:?}): \
     {what} is {value}; the last good checkpoint is {checkpoint}"
)]
pub struct Diverged {
    pub step: u64,
    /// 1-based within the step; 0 when the whole step's gradient is meant.
    pub micro_batch: usize,
    pub problems: Vec<u64>,
    /// `"loss"` or `"gradient"`.
    pub what: &'static str,
    pub value: f64,
    pub checkpoint: String,
}

/// What a run did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainReport {
    /// Optimizer steps done in all (including those before a resume).
    pub steps: u64,
    /// Steps the schedule was planned for.
    pub total_steps: u64,
    pub steps_per_epoch: u64,
    pub resumed_from: Option<u64>,
    pub early_stopped: bool,
    pub best_val_loss: Option<f64>,
    pub best_step: Option<u64>,
    pub last_train_loss: Option<f64>,
    pub train_examples: usize,
    pub val_examples: usize,
    pub truncated: Vec<Truncation>,
    /// Real tokens processed by training steps in this process.
    pub tokens: usize,
    pub wall_s: f64,
    pub trainable_params: usize,
    pub optimizer_state_bytes_per_param: f64,
    pub out_dir: PathBuf,
}

/// Hooks around the loop (the CLI needs none; tests use them to interrupt or disturb a run).
#[derive(Default)]
pub struct TrainHooks<'a> {
    /// Called before optimizer step `step` (1-based) is taken; an error ends the run there,
    /// as a kill would.
    #[allow(clippy::type_complexity)]
    pub before_step: Option<Box<dyn FnMut(u64, &LoraModel) -> Result<()> + 'a>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct TrainState {
    format_version: u32,
    step: u64,
    epoch: usize,
    /// Next index into `order`.
    cursor: usize,
    order: Vec<usize>,
    order_rng: SplitMix64,
    /// Micro-batches run so far (the dropout clock).
    micro_batches: u64,
    best_val_loss: Option<f64>,
    best_step: Option<u64>,
    bad_evals: usize,
    early_stopped: bool,
    done: bool,
    total_steps: u64,
    n_batches: usize,
    config: serde_json::Value,
}

const STATE_VERSION: u32 = 1;
const CHECKPOINT_DIR: &str = "checkpoint";
const LATEST: &str = "latest.json";
const STATE_FILE: &str = "state.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const BEST_FILE: &str = "best_adapter.safetensors";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const LOSS_PLOT_FILE: &str = "loss.png";

/// Trains `model`'s adapters on `pool` (see the module docs) and leaves the best adapter in
/// `model` and in `out_dir`.
pub fn train(
    model: &LoraModel,
    encoder: &dyn ChatEncoder,
    pool: &[Problem],
    cfg: &TrainConfig,
    out_dir: &Path,
) -> Result<TrainReport> {
    train_with_hooks(model, encoder, pool, cfg, out_dir, TrainHooks::default())
}

/// [`train`] with [`TrainHooks`].
pub fn train_with_hooks(
    model: &LoraModel,
    encoder: &dyn ChatEncoder,
    pool: &[Problem],
    cfg: &TrainConfig,
    out_dir: &Path,
    hooks: TrainHooks<'_>,
) -> Result<TrainReport> {
    let path = StepPath::for_device(model.model().device());
    train_on_path(model, encoder, pool, cfg, out_dir, hooks, path)
}

/// [`train_with_hooks`] on a given [`StepPath`] (the tests run the device path on the CPU).
fn train_on_path(
    model: &LoraModel,
    encoder: &dyn ChatEncoder,
    pool: &[Problem],
    cfg: &TrainConfig,
    out_dir: &Path,
    hooks: TrainHooks<'_>,
    path: StepPath,
) -> Result<TrainReport> {
    cfg.validate()?;
    let want = cfg.lora_spec()?;
    let have = model.spec();
    ensure!(
        have.lora == want.lora && have.targets == want.targets && have.base == want.base,
        "the model's adapters ({:?}, targets {:?}, base {:?}) are not the config's ({:?}, \
         targets {:?}, base {:?})",
        have.lora,
        have.targets,
        have.base,
        want.lora,
        want.targets,
        want.base
    );
    std::fs::create_dir_all(out_dir).with_context(|| format!("create {}", out_dir.display()))?;
    let mut run = Run::new(model, encoder, pool, cfg, out_dir, path)?;
    run.start()?;
    run.main_loop(hooks)
}

/// Where a step accumulates, checks and clips gradients and runs the optimizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StepPath {
    /// Host copies of every LoRA tensor, gradients summed on the host per micro-batch (the CPU
    /// path, where tensors live on the host anyway).
    Host,
    /// Gradients, norm, clipping and the optimizer update as tensors on the model's device.
    Device,
}

impl StepPath {
    fn for_device(device: &Device) -> Self {
        if device.is_cpu() {
            StepPath::Host
        } else {
            StepPath::Device
        }
    }
}

/// One metrics record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    pub kind: String,
    pub step: u64,
    #[serde(flatten)]
    pub values: serde_json::Map<String, serde_json::Value>,
}

struct Run<'a> {
    model: &'a LoraModel,
    cfg: &'a TrainConfig,
    out: PathBuf,
    data: SftData,
    batches: Vec<Batch>,
    val_batches: Vec<Batch>,
    vars: Vec<Var>,
    names: Vec<String>,
    /// Host copies of the trainable tensors, what the optimizer updates on [`StepPath::Host`];
    /// `None` on [`StepPath::Device`], where the optimizer updates `vars` in place.
    params: Option<Vec<Vec<f32>>>,
    /// Host values of the best adapter so far.
    best: Option<Vec<Vec<f32>>>,
    optimizer: Box<dyn Optimizer>,
    schedule: CosineWithWarmup,
    steps_per_epoch: u64,
    state: TrainState,
    metrics: Vec<Metric>,
    resumed_from: Option<u64>,
    tokens: usize,
    started: Instant,
    last_train_loss: Option<f64>,
    adapter_config: AdapterConfig,
}

fn var_values(v: &Var) -> Result<Vec<f32>> {
    Ok(v.as_tensor()
        .flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()?)
}

/// A gradient's finite elements subtract to exactly 0 and a NaN or infinity to NaN, so this sum
/// of all of them is 0 exactly when every element is finite (a scalar on the gradient's device).
#[allow(clippy::eq_op)] // x - x is the probe: 0 for finite x, NaN for NaN and infinities
fn non_finite_probe(g: &Tensor) -> Result<Tensor> {
    Ok((g - g)?.sum_all()?)
}

fn set_var(v: &Var, values: &[f32]) -> Result<()> {
    let t = Tensor::from_slice(values, v.dims(), v.device())?.to_dtype(v.dtype())?;
    v.set(&t)?;
    Ok(())
}

/// One step's gradients, summed over its micro-batches, per trainable tensor.
enum StepGrads {
    /// [`StepPath::Host`]: host sums, zero where no loss token reached a tensor.
    Host(Vec<Vec<f32>>),
    /// [`StepPath::Device`]: f32 tensors on the model's device, `None` until a micro-batch's
    /// loss reaches the tensor.
    Device(Vec<Option<Tensor>>),
}

impl StepGrads {
    /// Adds one micro-batch's gradients of `vars`. When one of them holds a NaN or an infinity,
    /// returns the first such value (in variable order, then element order) instead, and the
    /// sums are not to be used.
    fn add(&mut self, vars: &[Var], grads: &GradStore) -> Result<Option<f32>> {
        match self {
            StepGrads::Host(acc) => {
                for (acc, v) in acc.iter_mut().zip(vars) {
                    let Some(t) = grads.get(v.as_tensor()) else {
                        continue; // no loss token reached this adapter
                    };
                    let vals = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                    if let Some(bad) = vals.iter().find(|x| !x.is_finite()) {
                        return Ok(Some(*bad));
                    }
                    for (a, x) in acc.iter_mut().zip(vals) {
                        *a += x;
                    }
                }
            }
            StepGrads::Device(acc) => {
                let mut got = Vec::new();
                let mut probes = Vec::new();
                for (i, v) in vars.iter().enumerate() {
                    let Some(t) = grads.get(v.as_tensor()) else {
                        continue; // no loss token reached this adapter
                    };
                    let t = t.to_dtype(DType::F32)?;
                    probes.push(non_finite_probe(&t)?);
                    got.push((i, t));
                }
                if probes.is_empty() {
                    return Ok(None);
                }
                // One synchronisation per micro-batch; the gradients come to the host only to
                // name the bad value.
                let probe = Tensor::stack(&probes, 0)?.sum_all()?.to_scalar::<f32>()?;
                if probe != 0.0 {
                    for (_, t) in &got {
                        let vals = t.flatten_all()?.to_vec1::<f32>()?;
                        if let Some(bad) = vals.iter().find(|x| !x.is_finite()) {
                            return Ok(Some(*bad));
                        }
                    }
                    return Ok(Some(probe));
                }
                for (i, t) in got {
                    acc[i] = Some(match acc[i].take() {
                        None => t,
                        Some(a) => (a + t)?,
                    });
                }
            }
        }
        Ok(None)
    }

    /// The global L2 norm of the sums, which are then clipped to `max_norm` as
    /// [`clip_grad_norm`] clips (`max_norm` 0: no clipping). A non-finite norm leaves them as
    /// they are and is returned for the caller to stop on.
    fn clip(&mut self, max_norm: f32) -> Result<f32> {
        match self {
            StepGrads::Host(grads) => {
                let mut views: Vec<&mut [f32]> =
                    grads.iter_mut().map(|g| g.as_mut_slice()).collect();
                Ok(if max_norm > 0.0 {
                    clip_grad_norm(&mut views, max_norm)
                } else {
                    let v: Vec<&[f32]> = views.iter().map(|g| &**g).collect();
                    global_grad_norm(&v)
                })
            }
            StepGrads::Device(grads) => {
                // Squares summed in f64 as on the host (in the device's order), one
                // synchronisation for the total.
                let squares = grads
                    .iter()
                    .flatten()
                    .map(|g| Ok(g.to_dtype(DType::F64)?.sqr()?.sum_all()?))
                    .collect::<Result<Vec<_>>>()?;
                let total = if squares.is_empty() {
                    0.0
                } else {
                    Tensor::stack(&squares, 0)?
                        .sum_all()?
                        .to_scalar::<f64>()?
                        .sqrt() as f32
                };
                if max_norm > 0.0 && total.is_finite() {
                    let coef = clip_coefficient(total, max_norm);
                    // A coefficient of 1 leaves every gradient as it is.
                    if coef < 1.0 {
                        for g in grads.iter_mut().flatten() {
                            *g = (&*g * f64::from(coef))?;
                        }
                    }
                }
                Ok(total)
            }
        }
    }
}

impl<'a> Run<'a> {
    fn new(
        model: &'a LoraModel,
        encoder: &dyn ChatEncoder,
        pool: &[Problem],
        cfg: &'a TrainConfig,
        out_dir: &Path,
        path: StepPath,
    ) -> Result<Self> {
        let data = SftData::build(pool, encoder, &cfg.sft(), cfg.seed)?;
        let batches = data.train_batches(cfg.micro_batch);
        let val_batches = data.val_batches(cfg.micro_batch);
        let steps_per_epoch = batches.len().div_ceil(cfg.grad_accum) as u64;
        let planned = steps_per_epoch * cfg.epochs as u64;
        let total_steps = cfg.max_steps.map_or(planned, |m| m.min(planned));
        let warmup = (cfg.warmup_ratio * total_steps as f64).ceil() as u64;
        let mut vars = Vec::new();
        let mut names = Vec::new();
        for a in model.adapters() {
            let layer = a
                .layer
                .with_context(|| format!("adapter {} has no layer", a.name))?;
            for (half, v) in [(Half::A, &a.a), (Half::B, &a.b)] {
                names.push(peft_key(layer, a.role, half));
                vars.push(v.clone());
            }
        }
        let specs: Vec<ParamSpec> = names
            .iter()
            .zip(&vars)
            .map(|(n, v)| ParamSpec::new(n.clone(), v.elem_count()))
            .collect();
        let optimizer: Box<dyn Optimizer> = match cfg.optimizer {
            OptimizerKind::Adamw8bit => Box::new(AdamW8bit::new(specs, cfg.adamw())?),
            OptimizerKind::Adamw => Box::new(AdamW::new(specs, cfg.adamw())?),
        };
        let params = match path {
            StepPath::Host => Some(vars.iter().map(var_values).collect::<Result<Vec<_>>>()?),
            StepPath::Device => None,
        };
        let mut order_rng = SplitMix64::new(cfg.seed ^ 0x0DE5_0DE5_0DE5_0DE5);
        let mut order: Vec<usize> = (0..batches.len()).collect();
        order_rng.shuffle(&mut order);
        let state = TrainState {
            format_version: STATE_VERSION,
            step: 0,
            epoch: 0,
            cursor: 0,
            order,
            order_rng,
            micro_batches: 0,
            best_val_loss: None,
            best_step: None,
            bad_evals: 0,
            early_stopped: false,
            done: false,
            total_steps,
            n_batches: batches.len(),
            config: cfg.fingerprint(),
        };
        let spec = model.spec();
        let adapter_config =
            AdapterConfig::from_lora(&spec.lora, &spec.targets, cfg.model.as_deref());
        Ok(Run {
            model,
            cfg,
            out: out_dir.to_path_buf(),
            data,
            batches,
            val_batches,
            vars,
            names,
            params,
            best: None,
            optimizer,
            schedule: CosineWithWarmup::new(cfg.lr, warmup, total_steps),
            steps_per_epoch,
            state,
            metrics: Vec::new(),
            resumed_from: None,
            tokens: 0,
            started: Instant::now(),
            last_train_loss: None,
            adapter_config,
        })
    }

    fn ckpt_root(&self) -> PathBuf {
        self.out.join(CHECKPOINT_DIR)
    }

    /// Fresh start, or resume from the latest checkpoint.
    fn start(&mut self) -> Result<()> {
        for line in self.data.truncation_report(self.cfg.max_len) {
            eprintln!("warning: {line}");
        }
        let latest = self.ckpt_root().join(LATEST);
        if !self.cfg.resume {
            // A fresh run owns the directory: stale checkpoints and metrics would mix runs.
            if latest.exists() {
                bail!(
                    "{} holds a checkpoint of an earlier run; pass --resume to continue it or \
                     choose another output directory",
                    self.out.display()
                );
            }
            self.write_metrics()?;
            return Ok(());
        }
        if !latest.exists() {
            bail!(
                "--resume: no checkpoint in {} (expected {})",
                self.out.display(),
                latest.display()
            );
        }
        let pointer: serde_json::Value = serde_json::from_slice(&std::fs::read(&latest)?)
            .with_context(|| format!("{}", latest.display()))?;
        let name = pointer["dir"]
            .as_str()
            .with_context(|| format!("{}: no \"dir\"", latest.display()))?;
        let dir = self.ckpt_root().join(name);
        let state: TrainState = serde_json::from_slice(
            &std::fs::read(dir.join(STATE_FILE))
                .with_context(|| format!("read {}", dir.join(STATE_FILE).display()))?,
        )
        .with_context(|| format!("{}", dir.join(STATE_FILE).display()))?;
        ensure!(
            state.format_version == STATE_VERSION,
            "checkpoint format {} (expected {STATE_VERSION})",
            state.format_version
        );
        if state.config != self.state.config {
            let (a, b) = (&state.config, &self.state.config);
            let differ: Vec<String> = b
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, v)| a.get(k.as_str()) != Some(v))
                .map(|(k, v)| {
                    format!(
                        "{k} (checkpoint {}, now {v})",
                        a.get(k.as_str()).unwrap_or(&json!(null))
                    )
                })
                .collect();
            bail!(
                "cannot resume {}: the run's settings changed: {}",
                dir.display(),
                differ.join(", ")
            );
        }
        ensure!(
            state.total_steps == self.state.total_steps,
            "cannot resume: the checkpoint's run was planned for {} steps, this one for {} \
             (--max-steps or the epochs changed)",
            state.total_steps,
            self.state.total_steps
        );
        ensure!(
            state.n_batches == self.batches.len(),
            "cannot resume: the pool gives {} micro-batches, the checkpoint {}",
            self.batches.len(),
            state.n_batches
        );
        let weights = AdapterWeights::read(&dir.join(ADAPTER_WEIGHTS_FILE))?;
        weights.apply(self.model.adapters())?;
        if let Some(params) = &mut self.params {
            *params = self.vars.iter().map(var_values).collect::<Result<_>>()?;
        }
        self.optimizer
            .load_state_dict(&StateDict::load(dir.join(OPTIMIZER_FILE))?)?;
        ensure!(
            self.optimizer.steps() == state.step,
            "checkpoint optimizer has {} steps, state {}",
            self.optimizer.steps(),
            state.step
        );
        if state.best_val_loss.is_some() {
            let best = AdapterWeights::read(&dir.join(BEST_FILE))?;
            let mut b = Vec::new();
            for (name, v) in self.names.iter().zip(&self.vars) {
                let (shape, values) = best
                    .tensors
                    .get(name)
                    .with_context(|| format!("{}: no {name}", best.path.display()))?;
                ensure!(
                    shape.as_slice() == v.dims(),
                    "{}: {name} shape",
                    best.path.display()
                );
                b.push(values.clone());
            }
            self.best = Some(b);
        }
        // Metrics written after the checkpoint belong to the lost future: drop them.
        self.metrics = read_metrics(&self.out.join(METRICS_FILE))?
            .into_iter()
            .filter(|m| m.step <= state.step)
            .collect();
        self.last_train_loss = self
            .metrics
            .iter()
            .rev()
            .find(|m| m.kind == "train")
            .and_then(|m| m.values.get("loss").and_then(|v| v.as_f64()));
        self.resumed_from = Some(state.step);
        self.state = state;
        self.write_metrics()?;
        eprintln!("resuming from step {} ({})", self.state.step, dir.display());
        Ok(())
    }

    fn progress_bar(&self) -> ProgressBar {
        let pb = ProgressBar::with_draw_target(
            Some(self.state.total_steps),
            crate::progress::draw_target(self.cfg.progress),
        );
        pb.set_style(
            ProgressStyle::with_template("{spinner} step {pos}/{len} [{bar:30}] {msg} ETA {eta}")
                .expect("static template")
                .progress_chars("=> "),
        );
        pb.set_position(self.state.step);
        pb.reset_eta();
        pb
    }

    fn main_loop(mut self, mut hooks: TrainHooks<'_>) -> Result<TrainReport> {
        let pb = self.progress_bar();
        let eval_every = self.cfg.eval_every;
        let ckpt_every = match self.cfg.checkpoint_every {
            0 => eval_every,
            n => n,
        };
        while !self.state.done && self.state.step < self.state.total_steps {
            let step = self.state.step + 1;
            if let Some(f) = hooks.before_step.as_mut() {
                f(step, self.model)?;
            }
            let t0 = Instant::now();
            let (loss, grad_norm, tokens) = self.train_step(step)?;
            self.tokens += tokens;
            let secs = t0.elapsed().as_secs_f64();
            let lr = self.schedule.lr_at(step - 1);
            self.last_train_loss = Some(loss);
            self.push_metric(
                "train",
                step,
                json!({
                    "epoch": self.state.epoch,
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens": tokens,
                    "tokens_per_s": tokens as f64 / secs.max(1e-9),
                    "elapsed_s": self.started.elapsed().as_secs_f64(),
                }),
            )?;
            pb.set_message(format!(
                "loss {loss:.4} lr {lr:.2e} {:.0} tok/s",
                tokens as f64 / secs.max(1e-9)
            ));
            pb.set_position(step);
            let last = step == self.state.total_steps;
            if step % eval_every == 0 || last {
                self.evaluate(step)?;
                if self.state.bad_evals >= self.cfg.patience {
                    self.state.early_stopped = true;
                    self.state.done = true;
                }
            }
            if last {
                self.state.done = true;
            }
            if self.state.done || step % ckpt_every == 0 {
                self.checkpoint()?;
            }
        }
        pb.finish_and_clear();
        self.finish()
    }

    /// Micro-batches of the next step: `grad_accum` of them from the epoch's order, fewer at
    /// the end of an epoch; an exhausted order starts the next epoch with a new shuffle.
    fn step_batches(&mut self) -> Vec<usize> {
        if self.state.cursor == self.state.order.len() {
            self.state.epoch += 1;
            self.state.cursor = 0;
            let mut order: Vec<usize> = (0..self.batches.len()).collect();
            self.state.order_rng.shuffle(&mut order);
            self.state.order = order;
        }
        let start = self.state.cursor;
        let end = (start + self.cfg.grad_accum).min(self.state.order.len());
        self.state.cursor = end;
        self.state.order[start..end].to_vec()
    }

    fn checkpoint_name(&self) -> String {
        std::fs::read(self.ckpt_root().join(LATEST))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| {
                v["dir"]
                    .as_str()
                    .map(|s| self.ckpt_root().join(s).display().to_string())
            })
            .unwrap_or_else(|| "none (no checkpoint was written yet)".into())
    }

    fn diverged(
        &self,
        step: u64,
        micro: usize,
        problems: &[u64],
        what: &'static str,
        value: f64,
    ) -> anyhow::Error {
        anyhow::Error::new(Diverged {
            step,
            micro_batch: micro,
            problems: problems.to_vec(),
            what,
            value,
            checkpoint: self.checkpoint_name(),
        })
    }

    /// One optimizer step; returns (loss, grad norm before clipping, real tokens).
    fn train_step(&mut self, step: u64) -> Result<(f64, f64, usize)> {
        let picks = self.step_batches();
        let total_loss_tokens: usize = picks.iter().map(|&i| self.batches[i].loss_tokens).sum();
        let denom = total_loss_tokens.max(1) as f64;
        let mut grads = match &self.params {
            Some(params) => StepGrads::Host(params.iter().map(|p| vec![0f32; p.len()]).collect()),
            None => StepGrads::Device(vec![None; self.vars.len()]),
        };
        let mut loss_sum = 0f64;
        let mut tokens = 0;
        self.model.set_training(true);
        for (k, &bi) in picks.iter().enumerate() {
            self.state.micro_batches += 1;
            self.model.set_dropout_clock(self.state.micro_batches);
            let batch = &self.batches[bi];
            tokens += batch.tokens;
            let dev = self.model.model().device();
            let (ids, labels) = batch.tensors(dev)?;
            let lg = self.model.model().loss_and_grads(
                &ids,
                &labels,
                self.cfg.loss_chunk,
                1.0 / denom,
                self.cfg.recompute,
            )?;
            if !lg.loss_sum.is_finite() {
                self.model.set_training(false);
                return Err(self.diverged(step, k + 1, &batch.problems, "loss", lg.loss_sum));
            }
            loss_sum += lg.loss_sum;
            if let Some(bad) = grads.add(&self.vars, &lg.grads)? {
                self.model.set_training(false);
                return Err(self.diverged(
                    step,
                    k + 1,
                    &batch.problems,
                    "gradient",
                    f64::from(bad),
                ));
            }
        }
        self.model.set_training(false);
        let norm = grads.clip(self.cfg.clip)?;
        if !norm.is_finite() {
            let problems: Vec<u64> = picks
                .iter()
                .flat_map(|&i| self.batches[i].problems.clone())
                .collect();
            return Err(self.diverged(step, 0, &problems, "gradient norm", f64::from(norm)));
        }
        self.optimizer.set_lr(self.schedule.lr_at(step - 1));
        match grads {
            StepGrads::Host(grads) => {
                let params = self
                    .params
                    .as_mut()
                    .expect("the host path keeps host copies");
                let mut refs: Vec<ParamRef<'_>> = params
                    .iter_mut()
                    .zip(&grads)
                    .map(|(p, g)| ParamRef::new(p, g))
                    .collect();
                self.optimizer.step(&mut refs)?;
                for (v, p) in self.vars.iter().zip(params.iter()) {
                    set_var(v, p)?;
                }
            }
            StepGrads::Device(grads) => {
                let pairs = self
                    .vars
                    .iter()
                    .zip(grads)
                    .map(|(v, g)| {
                        let g = match g {
                            Some(g) => g,
                            // No loss token reached this adapter in the whole step.
                            None => Tensor::zeros(v.shape(), DType::F32, v.device())?,
                        };
                        Ok((v.clone(), g))
                    })
                    .collect::<Result<Vec<_>>>()?;
                self.optimizer.step_tensors(&pairs)?;
            }
        }
        self.state.step = step;
        Ok((loss_sum / denom, f64::from(norm), tokens))
    }

    /// Host values of the trainable tensors now.
    fn snapshot(&self) -> Result<Vec<Vec<f32>>> {
        match &self.params {
            Some(params) => Ok(params.clone()),
            None => self.vars.iter().map(var_values).collect(),
        }
    }

    /// Validation loss (mean NLL over all validation loss tokens), early-stopping bookkeeping,
    /// metrics and the plot.
    fn evaluate(&mut self, step: u64) -> Result<()> {
        self.model.set_training(false);
        let mut sum = 0f64;
        let mut count = 0usize;
        for batch in &self.val_batches {
            let (ids, labels) = batch.tensors(self.model.model().device())?;
            let hidden = self.model.model().forward_hidden(&ids, 0, None, None)?;
            // Detached: the loss computes no gradient for an evaluation.
            let loss = self.model.model().chunked_lm_loss(
                &hidden.detach(),
                &labels,
                self.cfg.loss_chunk,
            )?;
            sum += f64::from(loss.sum.to_scalar::<f32>()?);
            count += loss.tokens;
        }
        let val = sum / count.max(1) as f64;
        if !val.is_finite() {
            return Err(self.diverged(step, 0, &[], "validation loss", val));
        }
        let improved = self.state.best_val_loss.is_none_or(|b| val < b);
        if improved {
            self.state.best_val_loss = Some(val);
            self.state.best_step = Some(step);
            self.state.bad_evals = 0;
            self.best = Some(self.snapshot()?);
        } else {
            self.state.bad_evals += 1;
        }
        self.push_metric(
            "eval",
            step,
            json!({
                "val_loss": val,
                "val_tokens": count,
                "best_val_loss": self.state.best_val_loss,
                "best_step": self.state.best_step,
                "bad_evals": self.state.bad_evals,
            }),
        )?;
        self.plot()
    }

    fn plot(&self) -> Result<()> {
        let pick = |kind: &str, key: &str| -> Vec<(u64, f64)> {
            self.metrics
                .iter()
                .filter(|m| m.kind == kind)
                .filter_map(|m| {
                    m.values
                        .get(key)
                        .and_then(|v| v.as_f64())
                        .map(|v| (m.step, v))
                })
                .collect()
        };
        plot_losses(
            &self.out.join(LOSS_PLOT_FILE),
            &pick("train", "loss"),
            &pick("eval", "val_loss"),
        )?;
        Ok(())
    }

    fn push_metric(&mut self, kind: &str, step: u64, values: serde_json::Value) -> Result<()> {
        let serde_json::Value::Object(values) = values else {
            unreachable!("metrics are objects")
        };
        self.metrics.push(Metric {
            kind: kind.to_string(),
            step,
            values,
        });
        self.write_metrics()
    }

    fn write_metrics(&self) -> Result<()> {
        let mut text = String::new();
        for m in &self.metrics {
            text.push_str(&serde_json::to_string(m)?);
            text.push('\n');
        }
        write_atomic(&self.out.join(METRICS_FILE), text.as_bytes())
    }

    /// Writes `checkpoint/step-N/` completely, then switches `latest.json` to it and removes
    /// older checkpoint directories.
    fn checkpoint(&self) -> Result<()> {
        let root = self.ckpt_root();
        let name = format!("step-{:08}", self.state.step);
        let dir = root.join(&name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        save_adapter(&dir, &self.adapter_config, self.model.adapters())?;
        self.optimizer.state_dict().save(dir.join(OPTIMIZER_FILE))?;
        if let Some(best) = &self.best {
            write_atomic(&dir.join(BEST_FILE), &self.best_bytes(best)?)?;
        }
        write_atomic(
            &dir.join(STATE_FILE),
            serde_json::to_string_pretty(&self.state)?.as_bytes(),
        )?;
        sync_dir(&root)?;
        write_atomic(
            &root.join(LATEST),
            serde_json::to_string(&json!({ "dir": name, "step": self.state.step }))?.as_bytes(),
        )?;
        for entry in std::fs::read_dir(&root)? {
            let entry = entry?;
            let n = entry.file_name().to_string_lossy().into_owned();
            if n.starts_with("step-") && n != name && entry.path().is_dir() {
                std::fs::remove_dir_all(entry.path())?;
            }
        }
        Ok(())
    }

    /// The best adapter in PEFT's layout, from host values.
    fn best_bytes(&self, best: &[Vec<f32>]) -> Result<Vec<u8>> {
        let shapes: Vec<Vec<usize>> = self.vars.iter().map(|v| v.dims().to_vec()).collect();
        let views = self
            .names
            .iter()
            .zip(best)
            .zip(&shapes)
            .map(|((n, v), s)| {
                Ok((
                    n.as_str(),
                    safetensors::tensor::TensorView::new(
                        safetensors::Dtype::F32,
                        s.clone(),
                        bytemuck::cast_slice(v),
                    )?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(safetensors::serialize(views, None)?)
    }

    /// Restores the best adapter, writes it to `out_dir` with the final plot.
    fn finish(self) -> Result<TrainReport> {
        if let Some(best) = &self.best {
            for (v, p) in self.vars.iter().zip(best) {
                set_var(v, p)?;
            }
        }
        save_adapter(&self.out, &self.adapter_config, self.model.adapters())?;
        self.plot()?;
        Ok(TrainReport {
            steps: self.state.step,
            total_steps: self.state.total_steps,
            steps_per_epoch: self.steps_per_epoch,
            resumed_from: self.resumed_from,
            early_stopped: self.state.early_stopped,
            best_val_loss: self.state.best_val_loss,
            best_step: self.state.best_step,
            last_train_loss: self.last_train_loss,
            train_examples: self.data.train.len(),
            val_examples: self.data.val.len(),
            truncated: self.data.truncated.clone(),
            tokens: self.tokens,
            wall_s: self.started.elapsed().as_secs_f64(),
            trainable_params: self.vars.iter().map(|v| v.elem_count()).sum(),
            optimizer_state_bytes_per_param: self.optimizer.state_bytes_per_param(),
            out_dir: self.out.clone(),
        })
    }
}

/// Reads `metrics.jsonl`, skipping a torn last line (a kill mid-write cannot leave one, since
/// the file is replaced atomically, but a file from elsewhere might).
pub fn read_metrics(path: &Path) -> Result<Vec<Metric>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<Metric>(l).ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_are_the_papers_and_toml_friendly() {
        let c = TrainConfig::default();
        assert_eq!((c.rank, c.alpha, c.dropout), (32, 64.0, 0.05));
        assert_eq!((c.micro_batch, c.grad_accum, c.clip), (2, 4, 1.0));
        assert_eq!((c.lr, c.patience), (5e-5, 3));
        assert_eq!(c.optimizer, OptimizerKind::Adamw8bit);
        assert_eq!(c.target_roles().unwrap(), ALL_TARGETS.to_vec());
        c.validate().unwrap();
        let bad = TrainConfig {
            targets: vec!["lm_head".into()],
            ..TrainConfig::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("lm_head"));
    }

    /// The device path ([`StepPath::Device`]) run on the CPU against the host path: the same
    /// training, checkpoints that resume across the paths, early stopping with the best adapter
    /// restored. (On a GPU the device path is the only one; this checks its logic without one.)
    mod device_path {
        use super::*;
        use crate::adapter::AdapterWeights;
        use rupantor_model::Tokenizer;

        fn tiny() -> PathBuf {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gemma_tiny/gemma2")
        }

        fn tokenizer() -> Tokenizer {
            Tokenizer::from_tokenizer_json(tiny().join("tokenizer.json")).unwrap()
        }

        fn pool(diverging: bool) -> Vec<Problem> {
            (1..=24u64)
                .map(|i| Problem {
                    id: i,
                    instruction: format!("write a function that adds {i} to its input"),
                    test_list: vec![format!("assert f(1) == {}", i + 1)],
                    response: Some(match (diverging, i % 6) {
                        (true, 0) => format!("lambda value: value * {i}"),
                        (true, _) => "def f(x):\n    return x".into(),
                        (false, _) => format!("def f(x):\n    return x + {i}"),
                    }),
                })
                .collect()
        }

        /// r 64 on the tiny model: A [64, 64] keeps 8-bit state, the k/v B [32, 64] f32 state;
        /// a clip low enough to act.
        fn config() -> TrainConfig {
            TrainConfig {
                rank: 64,
                alpha: 32.0,
                dropout: 0.2,
                lr: 1e-3,
                warmup_ratio: 0.1,
                epochs: 2,
                micro_batch: 2,
                grad_accum: 4,
                clip: 0.05,
                eval_every: 2,
                checkpoint_every: 2,
                max_len: 64,
                progress: false,
                ..TrainConfig::default()
            }
        }

        fn run(
            cfg: &TrainConfig,
            out: &Path,
            diverging: bool,
            path: StepPath,
            hooks: TrainHooks<'_>,
        ) -> Result<TrainReport> {
            let m = LoraModel::load(&tiny(), &Device::Cpu, cfg.lora_spec()?)?;
            train_on_path(&m, &tokenizer(), &pool(diverging), cfg, out, hooks, path)
        }

        fn adapter(dir: &Path) -> AdapterWeights {
            AdapterWeights::read(&dir.join(ADAPTER_WEIGHTS_FILE)).unwrap()
        }

        /// The paths differ only in how the f64 sum of squares of the norm is ordered (and the
        /// sign of zero gradients), so their adapters agree to f32 rounding.
        fn assert_close(a: &AdapterWeights, b: &AdapterWeights, what: &str) {
            assert_eq!(a.tensors.len(), b.tensors.len());
            let mut worst = 0f32;
            for (name, (shape, x)) in &a.tensors {
                let (shape_b, y) = &b.tensors[name];
                assert_eq!(shape, shape_b, "{what}: {name}");
                for (p, q) in x.iter().zip(y) {
                    worst = worst.max((p - q).abs() / p.abs().max(1e-3));
                }
            }
            assert!(
                worst <= 1e-5,
                "{what}: adapters differ by {worst:e} (relative)"
            );
        }

        fn train_losses(dir: &Path) -> Vec<f64> {
            read_metrics(&dir.join(METRICS_FILE))
                .unwrap()
                .iter()
                .filter(|m| m.kind == "train")
                .map(|m| m.values["loss"].as_f64().unwrap())
                .collect()
        }

        #[test]
        fn trains_as_the_host_path_and_resumes_across_paths() {
            let cfg = config();
            let host = tempfile::tempdir().unwrap();
            let device = tempfile::tempdir().unwrap();
            let rh = run(
                &cfg,
                host.path(),
                false,
                StepPath::Host,
                TrainHooks::default(),
            )
            .unwrap();
            let rd = run(
                &cfg,
                device.path(),
                false,
                StepPath::Device,
                TrainHooks::default(),
            )
            .unwrap();
            assert_eq!((rd.steps, rd.total_steps), (rh.steps, rh.total_steps));
            assert_eq!(rd.trainable_params, rh.trainable_params);
            assert!(rd.best_step.is_some());
            assert_close(&adapter(host.path()), &adapter(device.path()), "whole runs");
            let (lh, ld) = (train_losses(host.path()), train_losses(device.path()));
            assert_eq!(lh.len(), ld.len());
            for (a, b) in lh.iter().zip(&ld) {
                assert!(
                    (a - b).abs() <= 1e-5 * a.abs(),
                    "train losses {lh:?} vs {ld:?}"
                );
            }

            // Killed before step 4 on one path, resumed from the step-2 checkpoint on the other.
            for (first, then) in [
                (StepPath::Device, StepPath::Host),
                (StepPath::Host, StepPath::Device),
            ] {
                let cut = tempfile::tempdir().unwrap();
                let hooks = TrainHooks {
                    before_step: Some(Box::new(|step, _: &LoraModel| {
                        ensure!(step != 4, "killed");
                        Ok(())
                    })),
                };
                let e = run(&cfg, cut.path(), false, first, hooks).unwrap_err();
                assert_eq!(e.to_string(), "killed");
                let resumed = TrainConfig {
                    resume: true,
                    ..cfg.clone()
                };
                let r = run(&resumed, cut.path(), false, then, TrainHooks::default()).unwrap();
                assert_eq!((r.resumed_from, r.steps), (Some(2), rh.steps));
                assert_close(
                    &adapter(host.path()),
                    &adapter(cut.path()),
                    &format!("{first:?} checkpoint resumed on {then:?}"),
                );
            }
        }

        #[test]
        fn early_stopping_restores_the_best_adapter_as_the_host_path_does() {
            let cfg = TrainConfig {
                lr: 2e-2,
                epochs: 20,
                eval_every: 1,
                patience: 3,
                clip: 1.0,
                ..config()
            };
            let host = tempfile::tempdir().unwrap();
            let device = tempfile::tempdir().unwrap();
            let rh = run(
                &cfg,
                host.path(),
                true,
                StepPath::Host,
                TrainHooks::default(),
            )
            .unwrap();
            let rd = run(
                &cfg,
                device.path(),
                true,
                StepPath::Device,
                TrainHooks::default(),
            )
            .unwrap();
            assert!(rh.early_stopped && rd.early_stopped, "{rh:?}");
            assert_eq!((rd.best_step, rd.steps), (rh.best_step, rh.steps));
            assert_close(
                &adapter(host.path()),
                &adapter(device.path()),
                "best adapters",
            );
        }

        fn vars() -> Vec<Var> {
            [(2, 3), (4, 1), (3, 3)]
                .into_iter()
                .map(|s| Var::zeros(s, DType::F32, &Device::Cpu).unwrap())
                .collect()
        }

        fn store(vars: &[Var], values: &[Option<Vec<f32>>]) -> GradStore {
            let mut g = GradStore::default();
            for (v, x) in vars.iter().zip(values) {
                if let Some(x) = x {
                    g.insert(v, Tensor::from_slice(x, v.shape(), &Device::Cpu).unwrap());
                }
            }
            g
        }

        fn device_sums(g: &StepGrads) -> Vec<Option<Vec<f32>>> {
            let StepGrads::Device(acc) = g else {
                unreachable!("device sums")
            };
            acc.iter()
                .map(|t| {
                    t.as_ref()
                        .map(|t| t.flatten_all().unwrap().to_vec1().unwrap())
                })
                .collect()
        }

        #[test]
        fn gradients_sum_check_and_clip_as_on_the_host() {
            let vars = vars();
            let mut host =
                StepGrads::Host(vars.iter().map(|v| vec![0.0; v.elem_count()]).collect());
            let mut device = StepGrads::Device(vec![None; vars.len()]);
            let micro = [
                vec![
                    Some(vec![1.0, -2.0, 0.5, 0.0, 3.0, -1.0]),
                    None,
                    Some(vec![0.25; 9]),
                ],
                vec![Some(vec![0.5; 6]), None, Some(vec![-1.0; 9])],
            ];
            for m in &micro {
                let g = store(&vars, m);
                assert_eq!(host.add(&vars, &g).unwrap(), None);
                assert_eq!(device.add(&vars, &g).unwrap(), None);
            }
            let sums = device_sums(&device);
            let StepGrads::Host(h) = &host else {
                unreachable!("host sums")
            };
            assert_eq!(sums[0].as_deref(), Some(&h[0][..]));
            assert_eq!(sums[1], None, "no micro-batch reached the second tensor");
            assert_eq!(h[1], vec![0.0; 4]);
            assert_eq!(sums[2].as_deref(), Some(&h[2][..]));

            let (nh, nd) = (host.clip(1.0).unwrap(), device.clip(1.0).unwrap());
            assert_eq!(nh, nd);
            assert!(nh > 1.0, "{nh}");
            let StepGrads::Host(h) = &host else {
                unreachable!("host sums")
            };
            let sums = device_sums(&device);
            for (a, b) in h[0]
                .iter()
                .chain(&h[2])
                .zip(sums[0].iter().chain(&sums[2]).flatten())
            {
                assert_eq!(a.to_bits(), b.to_bits(), "clipped {a} vs {b}");
            }
            // Below the threshold nothing changes.
            assert_eq!(device.clip(100.0).unwrap(), host.clip(100.0).unwrap());
            assert_eq!(device_sums(&device), sums);
        }

        #[test]
        fn a_non_finite_gradient_is_named_as_on_the_host() {
            let vars = vars();
            let bad = [
                Some(vec![0.5; 6]),
                Some(vec![1.0, f32::NEG_INFINITY, f32::NAN, 2.0]),
                Some(vec![f32::NAN; 9]),
            ];
            let g = store(&vars, &bad);
            let mut host =
                StepGrads::Host(vars.iter().map(|v| vec![0.0; v.elem_count()]).collect());
            let mut device = StepGrads::Device(vec![None; vars.len()]);
            assert_eq!(host.add(&vars, &g).unwrap(), Some(f32::NEG_INFINITY));
            assert_eq!(device.add(&vars, &g).unwrap(), Some(f32::NEG_INFINITY));
            // A huge but finite gradient is no divergence, and its square, which overflows
            // f32, does not overflow the f64 sum of the norm.
            let g = store(&vars, &[Some(vec![1e20; 6]), None, None]);
            let mut device = StepGrads::Device(vec![None; vars.len()]);
            assert_eq!(device.add(&vars, &g).unwrap(), None);
            let norm = device.clip(1.0).unwrap();
            assert_eq!(norm, (6f64.sqrt() * 1e20) as f32);
        }
    }

    #[test]
    fn fingerprint_ignores_run_controls() {
        let a = TrainConfig::default();
        let b = TrainConfig {
            max_steps: Some(3),
            resume: true,
            progress: false,
            model: Some("x".into()),
            ..a.clone()
        };
        assert_eq!(a.fingerprint(), b.fingerprint());
        let c = TrainConfig {
            lr: 1e-4,
            ..a.clone()
        };
        assert_ne!(a.fingerprint(), c.fingerprint());
    }
}
