//! `rupantor bench train-step`: QLoRA train steps on the real model — forward, chunked loss,
//! backward, 8-bit AdamW — with tokens/s, the time split between the phases and peak RSS.
//!
//! The step is the trainer's (crates/train `Run::train_step`) for one micro-batch: LoRA in
//! training mode (dropout on), `forward_hidden`, the chunked LM loss over every position (labels
//! = ids), `backward`, the LoRA gradients copied to the host, [`AdamW8bit`] with bitsandbytes'
//! semantics, the new values written back. The token ids come from SplitMix64 exactly as
//! `scripts/bench/hf_train_step.py` draws them, so the PyTorch baseline (HF transformers + PEFT
//! + bitsandbytes, run by hand) trains on the same batch and its first loss can be compared.
//!
//! Peak RSS is `VmHWM` from `/proc/self/status`: once for the whole process (loading included)
//! and once for the steps alone (the high-water mark is reset through `/proc/self/clear_refs`
//! after loading, where the kernel allows it).

use std::time::Instant;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use clap::Args;
use rupantor_train::rng::SplitMix64;
use rupantor_train::{
    AdamW8bit, AdamWConfig, BaseFormat, LoraModel, LoraSpec, Optimizer, ParamRef, ParamSpec,
};

#[derive(Args, Debug)]
pub struct TrainStepBenchArgs {
    /// Model: HF directory, .gguf file, bnb-4bit directory, hub repo id, or
    /// `embedded:gemma3-270m` (the default; fetched by scripts/get-model.sh when missing).
    #[arg(long, value_name = "M")]
    pub model: Option<String>,
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
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
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

const GIB: f64 = (1u64 << 30) as f64;

pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / GIB
}

/// Seconds (or, for [`Bench::step`]'s second value, peak RSS bytes) per phase of a step.
#[derive(Debug, Default, Clone, Copy)]
struct Phases {
    forward: f64,
    loss: f64,
    backward: f64,
    optimizer: f64,
}

impl Phases {
    fn total(&self) -> f64 {
        self.forward + self.loss + self.backward + self.optimizer
    }

    fn add(&mut self, o: &Phases) {
        self.forward += o.forward;
        self.loss += o.loss;
        self.backward += o.backward;
        self.optimizer += o.optimizer;
    }

    fn max(&self, o: &Phases) -> Phases {
        Phases {
            forward: self.forward.max(o.forward),
            loss: self.loss.max(o.loss),
            backward: self.backward.max(o.backward),
            optimizer: self.optimizer.max(o.optimizer),
        }
    }

    fn scaled(&self, k: f64) -> Phases {
        Phases {
            forward: self.forward * k,
            loss: self.loss * k,
            backward: self.backward * k,
            optimizer: self.optimizer * k,
        }
    }
}

struct Bench {
    model: LoraModel,
    vars: Vec<Var>,
    params: Vec<Vec<f32>>,
    optimizer: AdamW8bit,
    ids: Tensor,
    labels: Tensor,
    loss_chunk: usize,
}

impl Bench {
    /// One train step; returns its loss (mean NLL per position), the phase times and the peak
    /// RSS within each phase (where the high-water mark can be reset; zeros otherwise).
    fn step(&mut self, tick: u64) -> Result<(f64, Phases, Phases)> {
        let mut p = Phases::default();
        let mut mem = Phases::default();
        let peak = |reset_after: bool| -> f64 {
            let v = peak_rss_bytes().unwrap_or(0) as f64;
            if reset_after {
                reset_peak_rss();
            }
            v
        };
        let m = self.model.model();
        self.model.set_training(true);
        self.model.set_dropout_clock(tick);
        reset_peak_rss();
        let t = Instant::now();
        let hidden = m.forward_hidden(&self.ids, 0, None, None)?;
        p.forward = t.elapsed().as_secs_f64();
        mem.forward = peak(true);
        let t = Instant::now();
        let loss = m.chunked_lm_loss(&hidden, &self.labels, self.loss_chunk)?;
        let value = f64::from(loss.sum.to_scalar::<f32>()?) / loss.tokens.max(1) as f64;
        p.loss = t.elapsed().as_secs_f64();
        mem.loss = peak(true);
        let t = Instant::now();
        let grads = loss.mean()?.backward()?;
        drop(loss);
        drop(hidden);
        p.backward = t.elapsed().as_secs_f64();
        mem.backward = peak(true);
        let t = Instant::now();
        let mut host = Vec::with_capacity(self.vars.len());
        for v in &self.vars {
            let g = match grads.get(v.as_tensor()) {
                Some(g) => g.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?,
                None => vec![0f32; v.elem_count()],
            };
            host.push(g);
        }
        drop(grads);
        let mut refs: Vec<ParamRef<'_>> = self
            .params
            .iter_mut()
            .zip(&host)
            .map(|(p, g)| ParamRef::new(p, g))
            .collect();
        self.optimizer.step(&mut refs)?;
        for (v, p) in self.vars.iter().zip(&self.params) {
            v.set(&Tensor::from_slice(p, v.dims(), v.device())?)?;
        }
        p.optimizer = t.elapsed().as_secs_f64();
        mem.optimizer = peak(false);
        self.model.set_training(false);
        ensure!(value.is_finite(), "loss is {value}");
        Ok((value, p, mem))
    }
}

pub fn run(a: TrainStepBenchArgs) -> Result<()> {
    let model_path =
        crate::model_arg::resolve_model(a.model.as_deref().unwrap_or(crate::model_arg::EMBEDDED))?;
    ensure!(
        a.batch >= 1 && a.seq >= 2,
        "need --batch >= 1 and --seq >= 2"
    );
    ensure!(a.steps >= 1, "need --steps >= 1");
    let dev = Device::Cpu;
    let spec = LoraSpec {
        seed: 0,
        base: BaseFormat::Nf4,
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
    let model = LoraModel::load(&model_path, &dev, spec)?;
    let load_s = t0.elapsed().as_secs_f64();
    let cfg = model.model().config().clone();
    let vars = model.vars();
    let trainable: usize = vars.iter().map(|v| v.elem_count()).sum();
    let specs: Vec<ParamSpec> = vars
        .iter()
        .enumerate()
        .map(|(i, v)| ParamSpec::new(format!("p{i}"), v.elem_count()))
        .collect();
    let optimizer = AdamW8bit::new(
        specs,
        AdamWConfig {
            lr: 5e-5,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
        },
    )?;
    let params = vars
        .iter()
        .map(|v| Ok(v.as_tensor().flatten_all()?.to_vec1::<f32>()?))
        .collect::<Result<Vec<_>>>()?;
    let bos = cfg.bos_token_id.unwrap_or(2);
    let ids = token_ids(a.batch, a.seq, cfg.vocab_size, bos, a.seed);
    let ids = Tensor::from_vec(ids, (a.batch, a.seq), &dev)?;
    let labels = ids.to_dtype(DType::I64)?;
    let load_peak = peak_rss_bytes();
    let rss_after_load = proc_status_bytes("VmRSS");
    let reset = reset_peak_rss();
    println!(
        "model {}: {} layers, hidden {}, vocab {}; NF4 base, LoRA r {} alpha {} on {} \
         projections: {trainable} trainable parameters; loaded in {load_s:.1} s; {} threads",
        model_path.display(),
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.vocab_size,
        a.rank,
        2 * a.rank,
        model.adapters().len(),
        candle_core::utils::get_num_threads(),
    );
    let mut bench = Bench {
        model,
        vars,
        params,
        optimizer,
        ids,
        labels,
        loss_chunk: a.loss_chunk,
    };
    let mut sum = Phases::default();
    let mut mem_peak = Phases::default();
    let mut losses = Vec::new();
    for step in 0..a.warmup + a.steps {
        let timed = step >= a.warmup;
        let (loss, p, mem) = bench.step(step as u64 + 1)?;
        losses.push(loss);
        mem_peak = mem_peak.max(&mem);
        if timed {
            sum.add(&p);
        }
        println!(
            "step {}{}: loss {loss:.4}, forward {:.2} s, loss {:.2} s, backward {:.2} s, \
             optimizer {:.3} s{}",
            step + 1,
            if timed { "" } else { " (warmup)" },
            p.forward,
            p.loss,
            p.backward,
            p.optimizer,
            if reset {
                format!(
                    "; peak RSS forward {:.2} GiB, loss {:.2} GiB, backward {:.2} GiB, \
                     optimizer {:.2} GiB",
                    mem.forward / GIB,
                    mem.loss / GIB,
                    mem.backward / GIB,
                    mem.optimizer / GIB
                )
            } else {
                String::new()
            }
        );
    }
    let per_step = sum.scaled(1.0 / a.steps as f64);
    let total = sum.total();
    let tokens = a.batch * a.seq * a.steps;
    let tps = tokens as f64 / total;
    let peak = (peak_rss_bytes().context("no VmHWM in /proc/self/status")? as f64)
        .max(mem_peak.forward)
        .max(mem_peak.loss)
        .max(mem_peak.backward)
        .max(mem_peak.optimizer) as u64;
    let process_peak = peak.max(load_peak.unwrap_or(0));
    let pct = |x: f64| 100.0 * x / per_step.total();
    println!(
        "rupantor QLoRA train step: {tps:.1} tokens/s ({} x {} tokens, {:.2} s/step over {} \
         steps: forward {:.0}%, loss (lm_head fwd+bwd) {:.0}%, backward {:.0}%, optimizer \
         {:.0}%); peak RSS {:.2} GiB (after load {:.2} GiB{}); optimizer state {:.3} bytes/param",
        a.batch,
        a.seq,
        per_step.total(),
        a.steps,
        pct(per_step.forward),
        pct(per_step.loss),
        pct(per_step.backward),
        pct(per_step.optimizer),
        gib(process_peak),
        gib(rss_after_load.unwrap_or(0)),
        if reset {
            format!(", during the steps {:.2} GiB", gib(peak))
        } else {
            String::new()
        },
        bench.optimizer.state_bytes_per_param(),
    );
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "impl": "rupantor",
                "batch": a.batch,
                "seq": a.seq,
                "rank": a.rank,
                "steps": a.steps,
                "tokens_per_s": tps,
                "s_per_step": per_step.total(),
                "phases_s_per_step": {
                    "forward": per_step.forward,
                    "loss": per_step.loss,
                    "backward": per_step.backward,
                    "optimizer": per_step.optimizer,
                },
                "peak_rss_bytes": process_peak,
                "rss_after_load_bytes": rss_after_load,
                "step_peak_rss_bytes": if reset { Some(peak) } else { None },
                "phase_peak_rss_bytes": if reset {
                    Some(serde_json::json!({
                        "forward": mem_peak.forward,
                        "loss": mem_peak.loss,
                        "backward": mem_peak.backward,
                        "optimizer": mem_peak.optimizer,
                    }))
                } else {
                    None
                },
                "trainable_params": trainable,
                "optimizer_state_bytes_per_param": bench.optimizer.state_bytes_per_param(),
                "losses": losses,
                "threads": candle_core::utils::get_num_threads(),
            })
        );
    }
    Ok(())
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
    fn peak_rss_is_read() {
        if cfg!(target_os = "linux") {
            assert!(peak_rss_bytes().unwrap() > 0);
        }
    }
}
