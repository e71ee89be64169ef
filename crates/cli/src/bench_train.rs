//! `rupantor bench train-step`: QLoRA train steps on the real model — forward, chunked loss,
//! backward, 8-bit AdamW — with tokens/s, the time split between the phases and peak memory
//! (RSS on the CPU, GPU memory with `--device cuda`), with and without activation recompute.
//!
//! The step is the trainer's (crates/train `Run::train_step`) for one micro-batch: LoRA in
//! training mode (dropout on), `Gemma::loss_and_grads` (forward, the chunked LM loss over every
//! position with labels = ids, backward; with `--recompute on` each layer's forward runs again
//! in the backward pass), then [`AdamW8bit`] with bitsandbytes' semantics through
//! `Optimizer::step_tensors`, which updates the variables in place where they live (on a GPU
//! with kernels/adamw.cu, its state paged through host memory). The token ids come from
//! SplitMix64 exactly as `scripts/bench/hf_train_step.py` (CPU) and `scripts/bench/hf_gpu.py`
//! (GPU) draw them, so the PyTorch baselines train on the same batch and their first loss can
//! be compared.
//!
//! Peak RSS is `VmHWM` from `/proc/self/status`: once for the whole process (loading included)
//! and once for the steps alone (the high-water mark is reset through `/proc/self/clear_refs`
//! after loading, where the kernel allows it). On a GPU the peak is the memory pool's
//! high-water mark of GPU memory in use ([`rupantor_model::device::peak_memory`]), reset the
//! same way, and the host RSS is reported beside it.
//!
//! `--model random:<preset>` ([`rupantor_model::random`]) trains on a preset's shape with seeded
//! random NF4 weights, so the 9B-shaped step needs nothing downloaded.

use std::time::Instant;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use clap::{Args, ValueEnum};
use rupantor_model::device::{peak_memory, reset_peak_memory};
use rupantor_train::rng::SplitMix64;
use rupantor_train::{
    AdamW8bit, AdamWConfig, BaseFormat, LoraModel, LoraSpec, Optimizer, ParamSpec,
};

use crate::model_arg::{self, ModelArgs, ModelSettings, Quant};

#[derive(Args, Debug)]
pub struct TrainStepBenchArgs {
    /// The model (also `random:<preset>`: gemma2-9b, gemma2-2b or gemma3-270m with seeded
    /// random weights), device, base format and dtype.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Sequences per step.
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    /// LoRA rank (alpha = 2 x rank, dropout 0.05, all seven projections).
    #[arg(long, default_value_t = 32)]
    pub rank: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Positions per logits chunk in the loss (the trainer's default).
    #[arg(long, default_value_t = 256)]
    pub loss_chunk: usize,
    /// Seed of the token ids (the baseline script's default).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Activation recompute (the trainer's `recompute`): off, on, or both, each then in a
    /// child process of its own, with the ratio of on to off.
    #[arg(long, value_enum, default_value_t = RecomputeArg::Both)]
    pub recompute: RecomputeArg,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecomputeArg {
    Off,
    On,
    Both,
}

/// `1000 + next() % (vocab - 1000)` for every position after a leading `<bos>`, row by row:
/// what `hf_train_step.py`'s `token_ids` draws.
pub fn token_ids(batch: usize, seq: usize, vocab: usize, bos: u32, seed: u64) -> Vec<u32> {
    assert!(vocab > 1000 && seq >= 2);
    let mut rng = SplitMix64::new(seed);
    let mut ids = Vec::with_capacity(batch * seq);
    for _ in 0..batch {
        ids.push(bos);
        for _ in 1..seq {
            ids.push(1000 + (rng.next_u64() % (vocab as u64 - 1000)) as u32);
        }
    }
    ids
}

/// A `kB` field of `/proc/self/status` in bytes.
fn proc_status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        let kb: u64 = rest.split_whitespace().next()?.parse().ok()?;
        Some(kb * 1024)
    })
}

/// Peak resident set size of this process so far (`VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    proc_status_bytes("VmHWM")
}

/// Resets `VmHWM` to the current RSS (`echo 5 > /proc/self/clear_refs`); false where the
/// kernel does not allow it.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The peak that matters on the device: host RSS on the CPU, GPU memory on a GPU.
enum PeakMeter {
    /// `VmHWM`; `resettable` false where the kernel refuses `clear_refs` (then the figures
    /// read zero and the process-wide high-water mark is reported at the end).
    Rss {
        resettable: bool,
    },
    Gpu(Device),
}

impl PeakMeter {
    fn new(dev: &Device) -> Self {
        if dev.is_cpu() {
            PeakMeter::Rss {
                resettable: reset_peak_rss(),
            }
        } else {
            PeakMeter::Gpu(dev.clone())
        }
    }

    fn reset(&self) {
        match self {
            PeakMeter::Rss { .. } => {
                reset_peak_rss();
            }
            PeakMeter::Gpu(dev) => reset_peak_memory(dev),
        }
    }

    /// The peak since the last reset (zero where it cannot be read).
    fn peak(&self) -> u64 {
        match self {
            PeakMeter::Rss { resettable: true } => peak_rss_bytes().unwrap_or(0),
            PeakMeter::Rss { resettable: false } => 0,
            PeakMeter::Gpu(dev) => peak_memory(dev).unwrap_or(0),
        }
    }

    fn what(&self) -> &'static str {
        match self {
            PeakMeter::Rss { .. } => "peak RSS",
            PeakMeter::Gpu(_) => "peak GPU memory",
        }
    }
}

pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

struct Bench {
    model: LoraModel,
    vars: Vec<Var>,
    optimizer: AdamW8bit,
    ids: Tensor,
    labels: Tensor,
    loss_chunk: usize,
    meter: PeakMeter,
}

/// One step's figures.
struct Step {
    /// Mean NLL per position.
    loss: f64,
    /// Seconds in `loss_and_grads` (forward, loss, backward) and in the optimizer.
    grads_s: f64,
    optimizer_s: f64,
    /// Peak memory within each of the two (see [`PeakMeter::peak`]).
    grads_peak: u64,
    optimizer_peak: u64,
}

impl Bench {
    fn step(&mut self, tick: u64, recompute: bool) -> Result<Step> {
        self.model.set_training(true);
        self.model.set_dropout_clock(tick);
        self.meter.reset();
        let t = Instant::now();
        let lg = self.model.model().loss_and_grads(
            &self.ids,
            &self.labels,
            self.loss_chunk,
            1.0 / self.ids.elem_count() as f64,
            recompute,
        )?;
        let loss = lg.loss_sum / lg.tokens.max(1) as f64;
        let mut pairs = Vec::with_capacity(self.vars.len());
        for v in &self.vars {
            let g = match lg.grads.get(v.as_tensor()) {
                Some(g) => g.to_dtype(DType::F32)?,
                None => v.zeros_like()?,
            };
            pairs.push((v.clone(), g));
        }
        drop(lg);
        // Kernels are queued on a GPU: wait for them, so each time is its phase's own.
        let device = self.ids.device().clone();
        device.synchronize()?;
        let grads_s = t.elapsed().as_secs_f64();
        let grads_peak = self.meter.peak();
        self.meter.reset();
        let t = Instant::now();
        // The trainer's step: in place on the device the variables live on.
        self.optimizer.step_tensors(&pairs)?;
        drop(pairs);
        device.synchronize()?;
        let optimizer_s = t.elapsed().as_secs_f64();
        self.model.set_training(false);
        ensure!(loss.is_finite(), "loss is {loss}");
        Ok(Step {
            loss,
            grads_s,
            optimizer_s,
            grads_peak,
            optimizer_peak: self.meter.peak(),
        })
    }
}

pub fn run(a: TrainStepBenchArgs) -> Result<()> {
    match a.recompute {
        RecomputeArg::Off => run_mode(&a, false).map(drop),
        RecomputeArg::On => run_mode(&a, true).map(drop),
        RecomputeArg::Both => run_both(&a),
    }
}

/// Both modes, each in a child process of its own: freed memory stays in the allocator's
/// arenas, so a mode run after another in one process would inherit its resident set.
fn run_both(a: &TrainStepBenchArgs) -> Result<()> {
    let exe = std::env::current_exe().context("locate the rupantor binary")?;
    let mut results = Vec::new();
    for mode in ["off", "on"] {
        let mut cmd = std::process::Command::new(&exe);
        cmd.args(["bench", "train-step", "--recompute", mode, "--json"]);
        cmd.args(model_flags(&a.model));
        for (flag, v) in [
            ("--batch", a.batch.to_string()),
            ("--seq", a.seq.to_string()),
            ("--rank", a.rank.to_string()),
            ("--steps", a.steps.to_string()),
            ("--warmup", a.warmup.to_string()),
            ("--loss-chunk", a.loss_chunk.to_string()),
            ("--seed", a.seed.to_string()),
        ] {
            cmd.args([flag, &v]);
        }
        let out = cmd
            .stderr(std::process::Stdio::inherit())
            .output()
            .with_context(|| format!("run {}", exe.display()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let (lines, json) = text.trim_end().rsplit_once('\n').unwrap_or(("", &text));
        println!("{lines}");
        ensure!(
            out.status.success(),
            "bench train-step --recompute {mode} failed ({})",
            out.status
        );
        let v: serde_json::Value = serde_json::from_str(json.trim())
            .with_context(|| format!("--recompute {mode} printed no JSON summary"))?;
        results.push(v);
    }
    let ratio = |k: &str| {
        results[1][k].as_f64().unwrap_or(0.0) / results[0][k].as_f64().unwrap_or(f64::NAN)
    };
    let (peak_key, what) = if results[0]["peak_gpu_bytes"].is_null() {
        ("peak_rss_bytes", "peak RSS")
    } else {
        ("peak_gpu_bytes", "peak GPU memory")
    };
    println!(
        "recompute on vs off: {:.2}x tokens/s, {:.2}x {what}",
        ratio("tokens_per_s"),
        ratio(peak_key)
    );
    if a.json {
        println!(
            "{}",
            serde_json::json!({ "impl": "rupantor", "modes": results })
        );
    }
    Ok(())
}

fn device_name(dev: &Device) -> &'static str {
    if dev.is_cpu() {
        "cpu"
    } else {
        "cuda"
    }
}

/// The flags of `model` that are set, to pass on to a child process.
fn model_flags(model: &ModelArgs) -> Vec<String> {
    fn name(v: impl ValueEnum) -> String {
        v.to_possible_value()
            .map(|p| p.get_name().to_string())
            .unwrap_or_default()
    }
    let mut flags = Vec::new();
    let mut push = |flag: &str, v: Option<String>| {
        if let Some(v) = v {
            flags.extend([flag.to_string(), v]);
        }
    };
    push("--model", model.model.clone());
    push("--device", model.device.map(name));
    push("--quant", model.quant.map(name));
    push("--dtype", model.dtype.map(name));
    flags
}

/// The model with LoRA on every projection, on `dev` (a `random:<preset>` too: the loader
/// builds it from its name). Returns the model and its name for messages.
fn load_model(
    settings: &ModelSettings,
    dev: &Device,
    spec: LoraSpec,
) -> Result<(LoraModel, String)> {
    let path = model_arg::resolve_model(&settings.model)?;
    let model = LoraModel::load(&path, dev, spec)?;
    Ok((model, path.display().to_string()))
}

/// One mode in this process; prints its lines (and, with `--json`, a JSON summary last) and
/// returns the summary.
fn run_mode(a: &TrainStepBenchArgs, recompute: bool) -> Result<serde_json::Value> {
    ensure!(
        a.batch >= 1 && a.seq >= 2,
        "need --batch >= 1 and --seq >= 2"
    );
    ensure!(a.steps >= 1, "need --steps >= 1");
    let settings = crate::run_config::RunConfig::default().model_settings(&a.model);
    let dtype = settings.dtype.on(settings.device)?;
    let dev = model_arg::device(settings.device)?;
    let spec = LoraSpec {
        seed: 0,
        base: match settings.quant {
            Quant::Nf4 => BaseFormat::Nf4,
            Quant::None => BaseFormat::Dense,
        },
        dtype,
        ..LoraSpec::paper()
    };
    let spec = LoraSpec {
        lora: rupantor_model::LoraConfig {
            rank: a.rank,
            alpha: 2.0 * a.rank as f64,
            ..spec.lora
        },
        ..spec
    };
    let t0 = Instant::now();
    let (model, name) = load_model(&settings, &dev, spec)?;
    let load_s = t0.elapsed().as_secs_f64();
    let cfg = model.model().config().clone();
    let vars = model.vars();
    let trainable: usize = vars.iter().map(|v| v.elem_count()).sum();
    let bos = cfg.bos_token_id.unwrap_or(2);
    let ids = token_ids(a.batch, a.seq, cfg.vocab_size, bos, a.seed);
    let ids = Tensor::from_vec(ids, (a.batch, a.seq), &dev)?;
    let labels = ids.to_dtype(DType::I64)?;
    let load_peak = peak_rss_bytes().unwrap_or(0);
    let rss_after_load = proc_status_bytes("VmRSS").unwrap_or(0);
    let gpu_after_load = rupantor_model::device::memory_in_use(&dev);
    println!(
        "model {name} on {}: {} layers, hidden {}, vocab {}; {} base, {} compute, LoRA \
         r {} alpha {} on {} projections: {trainable} trainable parameters; loaded in \
         {load_s:.1} s (peak RSS {:.2} GiB, {:.2} GiB after{}); {} threads",
        device_name(&dev),
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.vocab_size,
        format!("{:?}", model.spec().base).to_lowercase(),
        format!("{dtype:?}").to_lowercase(),
        a.rank,
        2 * a.rank,
        model.adapters().len(),
        gib(load_peak),
        gib(rss_after_load),
        gpu_after_load.map_or(String::new(), |b| format!(
            ", {:.2} GiB of GPU memory",
            gib(b)
        )),
        candle_core::utils::get_num_threads(),
    );
    let meter = PeakMeter::new(&dev);
    let resettable = !matches!(meter, PeakMeter::Rss { resettable: false });
    if !resettable {
        println!("(this kernel does not reset VmHWM: the peak RSS includes loading)");
    }
    let mut bench = Bench {
        vars: vars.clone(),
        optimizer: new_optimizer(&vars)?,
        model,
        ids,
        labels,
        loss_chunk: a.loss_chunk,
        meter,
    };
    let mode = if recompute {
        "recompute on"
    } else {
        "recompute off"
    };
    let (mut grads_s, mut optimizer_s, mut peak) = (0f64, 0f64, 0u64);
    let mut losses = Vec::new();
    for step in 0..a.warmup + a.steps {
        let timed = step >= a.warmup;
        let s = bench.step(step as u64 + 1, recompute)?;
        losses.push(s.loss);
        peak = peak.max(s.grads_peak).max(s.optimizer_peak);
        if timed {
            grads_s += s.grads_s;
            optimizer_s += s.optimizer_s;
        }
        println!(
            "{mode}, step {}{}: loss {:.4}, forward+loss+backward {:.3} s, optimizer {:.3} s, \
             {} {:.2} GiB",
            step + 1,
            if timed { "" } else { " (warmup)" },
            s.loss,
            s.grads_s,
            s.optimizer_s,
            bench.meter.what(),
            gib(s.grads_peak.max(s.optimizer_peak)),
        );
    }
    // Where VmHWM cannot be reset, the process's high-water mark is all there is.
    let peak = peak.max(peak_rss_bytes().unwrap_or(0) * u64::from(!resettable));
    let on_gpu = matches!(bench.meter, PeakMeter::Gpu(_));
    let total = grads_s + optimizer_s;
    let tokens = (a.batch * a.seq * a.steps) as f64;
    let tps = tokens / total;
    println!(
        "rupantor QLoRA train step, {mode}: {tps:.1} tokens/s ({} x {} tokens, {:.3} s/step \
         over {} steps, optimizer {:.1}%; forward+loss+backward alone {:.1} tokens/s); {} \
         {:.2} GiB; optimizer state {:.3} bytes/param",
        a.batch,
        a.seq,
        total / a.steps as f64,
        a.steps,
        100.0 * optimizer_s / total,
        tokens / grads_s,
        bench.meter.what(),
        gib(peak),
        bench.optimizer.state_bytes_per_param(),
    );
    let summary = serde_json::json!({
        "impl": "rupantor",
        "model": name,
        "device": device_name(&dev),
        "dtype": format!("{dtype:?}").to_lowercase(),
        "recompute": recompute,
        "batch": a.batch,
        "seq": a.seq,
        "rank": a.rank,
        "steps": a.steps,
        "loss_chunk": a.loss_chunk,
        "tokens_per_s": tps,
        "grads_tokens_per_s": tokens / grads_s,
        "s_per_step": total / a.steps as f64,
        "optimizer_s_per_step": optimizer_s / a.steps as f64,
        "peak_rss_bytes": if on_gpu { peak_rss_bytes().unwrap_or(0) } else { peak },
        "peak_gpu_bytes": on_gpu.then_some(peak),
        "load_peak_rss_bytes": load_peak,
        "rss_after_load_bytes": rss_after_load,
        "trainable_params": trainable,
        "optimizer_state_bytes_per_param": bench.optimizer.state_bytes_per_param(),
        "losses": losses,
        "threads": candle_core::utils::get_num_threads(),
    });
    if a.json {
        println!("{summary}");
    }
    Ok(summary)
}

fn new_optimizer(vars: &[Var]) -> Result<AdamW8bit> {
    let specs: Vec<ParamSpec> = vars
        .iter()
        .enumerate()
        .map(|(i, v)| ParamSpec::new(format!("p{i}"), v.elem_count()))
        .collect();
    AdamW8bit::new(
        specs,
        AdamWConfig {
            lr: 5e-5,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_ids_match_the_python_baseline() {
        // hf_train_step.py: token_ids(2, 4, 262144, 2, 42).tolist()
        assert_eq!(
            token_ids(2, 4, 262_144, 2, 42),
            [2, 188_885, 12_467, 127_162, 2, 235_900, 180_602, 116_278]
        );
    }

    #[test]
    fn children_get_the_model_flags_that_were_set() {
        use crate::model_arg::{DType as Dt, DeviceKind};
        let args = ModelArgs {
            model: Some("random:gemma2-9b".into()),
            device: Some(DeviceKind::Cuda),
            dtype: Some(Dt::Bf16),
            ..ModelArgs::default()
        };
        assert_eq!(
            model_flags(&args),
            [
                "--model",
                "random:gemma2-9b",
                "--device",
                "cuda",
                "--dtype",
                "bf16"
            ]
        );
        assert!(model_flags(&ModelArgs::default()).is_empty());
    }

    #[test]
    fn peak_rss_is_read() {
        if cfg!(target_os = "linux") {
            assert!(peak_rss_bytes().unwrap() > 0);
        }
    }
}
