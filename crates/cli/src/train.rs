//! `rupantor train`: one QLoRA training run on the trial split (design §5), or with
//! `--iter N` the self-improvement loop of design §1 (`rupantor_pipeline::run_loop`: per
//! iteration a fresh adapter on the pool, dev generation, sandbox verification, fold).
//!
//! The settings come from three layers, each overriding the one before:
//!
//! 1. `rupantor_train::TrainConfig`'s defaults (the paper's: r 32, alpha 64, dropout 0.05,
//!    all seven projections, lr 5e-5 cosine, 2 x 4 accumulation, paged 8-bit AdamW, patience
//!    3);
//! 2. `--config FILE`: its `[model]` table (the model, device, quant, dtype, as every command
//!    reads it) and its `[train]` table, whose keys are `TrainConfig`'s fields
//!    (`rank = 32`, `lr = 5e-5`, `betas = [0.9, 0.999]`, `optimizer = "adamw8bit"`, ...);
//!    the loop also reads `[generation]` (dev generation), `[sandbox]` and `[loop]
//!    iterations`; with `--resume` and no `--config`, the run's own `OUT/run.toml`;
//! 3. the flags (`--model`, `--rank`, `--iter`, `--max-steps`, `--resume`, `--device`,
//!    `--quant`, ...).
//!
//! Two things have one home only, so they cannot disagree: the model is `[model] model` /
//! `--model`, and the frozen base format is `[model] quant` / `--quant` (nf4: QLoRA; none:
//! plain LoRA over f32); `[train]` may not set `model`, `base_format` or `resume`.
//!
//! Before training, the resolved settings are written atomically to `OUT/run.toml`, a file
//! `--config` (and `generate --adapter OUT`) reads back: `[model] model` holds the local path the model argument resolved
//! to, so `generate --adapter OUT` finds the base. The adapter, `metrics.jsonl`, `loss.png` and
//! the checkpoints are the trainer's (crates/train `trainer`). The summary printed at the end
//! gives the steps, the best validation loss, whether early stopping fired, the wall time and
//! the peak RSS (`VmHWM`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use rupantor_model::hub::TOKENIZER_FILE;
use rupantor_model::{GgufFile, Tokenizer};
use rupantor_pipeline::{
    run_loop, BaseModel, GenSettings, LoopConfig, LoopHooks, Paths, Strategies, VerifySettings,
};
use rupantor_train::fsutil::write_atomic;
use rupantor_train::{BaseFormat, LoraModel, LoraSpec, TrainConfig, TrainReport};
use serde::Serialize;

use crate::bench_train::{gib, peak_rss_bytes};
use crate::model_arg::{self, DType, DeviceKind, ModelArgs, ModelSettings, Quant, EMBEDDED};
use crate::run_config::RunConfig;

/// The resolved config a run writes into its output folder.
pub const RUN_FILE: &str = "run.toml";
/// The trainer's checkpoint pointer (crates/train `trainer` module docs).
const LATEST_CHECKPOINT: &str = "checkpoint/latest.json";
/// The pool of iteration 1 (design §1: the trial problems).
const TRAIN_SPLIT: &str = "trial";
/// `[train]` keys that live elsewhere.
const FORBIDDEN_KEYS: [(&str, &str); 3] = [
    ("model", "set the model in [model] model (or --model)"),
    (
        "base_format",
        "set the base format with [model] quant = \"nf4\" | \"none\" (or --quant)",
    ),
    ("resume", "resuming is the --resume flag"),
];

#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A TOML preset (configs/*.toml): its [model] and [train] tables; flags override them.
    /// With --resume and no --config: OUT/run.toml.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Data folder holding trial.jsonl (default: $RUPANTOR_DATA, then data/blp25).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// LoRA rank (the paper compares 8, 16 and 32) [default: 32].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub rank: Option<u32>,
    /// Run the self-improvement loop for N iterations (train, generate dev, verify, fold);
    /// without it (and without [loop] iterations), one training run on the trial split.
    #[arg(long = "iter", value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub iterations: Option<u64>,
    /// Stop after N optimizer steps (the cosine schedule is planned for N).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_steps: Option<u64>,
    /// Output folder [default: out/r{rank}].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue the run in OUT from its latest checkpoint.
    #[arg(long)]
    pub resume: bool,
}

/// Everything a run is set up with.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedRun {
    pub settings: ModelSettings,
    pub train: TrainConfig,
    pub out: PathBuf,
    /// Loop iterations; `None`: one training run.
    pub iterations: Option<usize>,
    /// The loop's dev generation.
    pub generation: GenSettings,
    /// Inference strategies of the loop's dev generation.
    pub strategies: Strategies,
    pub sandbox: VerifySettings,
}

/// `[train]` of a config onto the defaults.
pub fn train_table(table: Option<&toml::Table>) -> Result<TrainConfig> {
    let Some(table) = table else {
        return Ok(TrainConfig::default());
    };
    for (key, why) in FORBIDDEN_KEYS {
        if table.contains_key(key) {
            bail!("[train] {key}: {why}");
        }
    }
    let cfg: TrainConfig = table
        .clone()
        .try_into()
        .context("[train] (keys are rupantor_train::TrainConfig's fields)")?;
    Ok(cfg)
}

/// Defaults, then the config file, then the flags (see the module docs).
pub fn resolve(args: &TrainArgs, file: &RunConfig) -> Result<ResolvedRun> {
    let settings = file.model_settings(&args.model);
    let mut train = train_table(file.train.as_ref())?;
    if let Some(r) = args.rank {
        train.rank = r as usize;
    }
    if let Some(n) = args.max_steps {
        train.max_steps = Some(n);
    }
    train.resume = args.resume;
    train.base_format = match settings.quant {
        Quant::Nf4 => BaseFormat::Nf4,
        Quant::None => BaseFormat::Dense,
    };
    train.validate()?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("out/r{}", train.rank)));
    let iterations = args
        .iterations
        .map(|n| n as usize)
        .or(file.self_improve.iterations);
    if let Some(n) = iterations {
        ensure!(n >= 1, "[loop] iterations must be at least 1");
    }
    let generation = GenSettings {
        progress: true,
        ..file.generation.clone()
    };
    generation.validate().context("[generation]")?;
    file.sandbox.validate().context("[sandbox]")?;
    Ok(ResolvedRun {
        settings,
        train,
        out,
        iterations,
        generation,
        strategies: file.strategies.clone(),
        sandbox: file.sandbox.clone(),
    })
}

fn device_name(d: DeviceKind) -> &'static str {
    match d {
        DeviceKind::Cpu => "cpu",
        DeviceKind::Cuda => "cuda",
    }
}

fn quant_name(q: Quant) -> &'static str {
    match q {
        Quant::Nf4 => "nf4",
        Quant::None => "none",
    }
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::Bf16 => "bf16",
    }
}

#[derive(Serialize)]
struct RunFileModel<'a> {
    model: String,
    device: &'a str,
    quant: &'a str,
    dtype: &'a str,
}

#[derive(Serialize)]
struct RunFileLoop {
    iterations: usize,
}

#[derive(Serialize)]
struct RunFileHead<'a> {
    model: RunFileModel<'a>,
    generation: GenSettings,
    #[serde(skip_serializing_if = "Strategies::is_plain")]
    strategies: Strategies,
    sandbox: &'a VerifySettings,
    #[serde(rename = "loop", skip_serializing_if = "Option::is_none")]
    self_improve: Option<RunFileLoop>,
}

/// `[train]` in `TrainConfig`'s field order, without the keys `--config` may not set; f32
/// fields written by their shortest decimal (`0.05`, not the f64 `0.05000000074505806`).
fn train_toml(cfg: &TrainConfig) -> Result<String> {
    let text = toml::to_string(&TrainConfig {
        model: None,
        ..cfg.clone()
    })?;
    let mut out = String::from("[train]\n");
    for line in text.lines() {
        let key = line.split(" = ").next().unwrap_or("");
        if FORBIDDEN_KEYS.iter().any(|(k, _)| *k == key) {
            continue;
        }
        match key {
            "dropout" => out.push_str(&format!("dropout = {:?}\n", cfg.dropout)),
            "clip" => out.push_str(&format!("clip = {:?}\n", cfg.clip)),
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    Ok(out)
}

/// `OUT/run.toml`: `[model]` with the resolved local model path and `[train]` with every
/// training setting (the keys `--config` may not set are left out), after a comment header
/// with the command line, the model argument as given and the pool.
pub fn run_file_text(
    run: &ResolvedRun,
    model_path: &Path,
    data_file: &Path,
    problems: usize,
) -> Result<String> {
    let head = toml::to_string(&RunFileHead {
        model: RunFileModel {
            model: model_path.display().to_string(),
            device: device_name(run.settings.device),
            quant: quant_name(run.settings.quant),
            dtype: dtype_name(run.settings.dtype),
        },
        generation: run.generation.clone(),
        strategies: run.strategies.clone(),
        sandbox: &run.sandbox,
        self_improve: run.iterations.map(|iterations| RunFileLoop { iterations }),
    })?;
    let command: Vec<String> = std::env::args().collect();
    Ok(format!(
        "# The resolved settings of a `rupantor train` run; `--config` reads this file back.\n\
         # command: {}\n\
         # model argument: {}\n\
         # recorded as base_model_name_or_path: {}\n\
         # pool: {} ({problems} problems)\n\n{head}\n{}",
        command.join(" "),
        run.settings.model,
        run.train.model.as_deref().unwrap_or("-"),
        data_file.display(),
        train_toml(&run.train)?,
    ))
}

/// The tokenizer that belongs to the model: `tokenizer.json` of an HF directory, or the
/// vocabulary inside a GGUF file.
pub fn load_tokenizer(model_path: &Path) -> Result<Tokenizer> {
    if let Some(random) = rupantor_model::loader::random_model(model_path) {
        return Ok(random?.tokenizer()?);
    }
    if model_path.is_dir() {
        let p = model_path.join(TOKENIZER_FILE);
        ensure!(
            p.is_file(),
            "{}: no {TOKENIZER_FILE} next to the checkpoint",
            model_path.display()
        );
        return Ok(Tokenizer::from_tokenizer_json(&p)?);
    }
    let file = GgufFile::open(model_path)?;
    Tokenizer::from_gguf_vocab(model_arg::gguf_vocab(&file)?)
        .with_context(|| format!("{}: tokenizer", model_path.display()))
}

/// `p` made absolute; a `random:` model name stays as it is.
fn absolute(p: &Path) -> PathBuf {
    if rupantor_model::loader::random_model(p).is_some() {
        return p.to_path_buf();
    }
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The name a PEFT adapter records for its base: the repo id for a hub model, else the
/// absolute local path.
fn base_model_name(arg: &str, resolved: &Path) -> String {
    if arg != EMBEDDED && !Path::new(arg).exists() && rupantor_model::hub::is_repo_id(arg) {
        arg.to_string()
    } else {
        absolute(resolved).display().to_string()
    }
}

pub fn run(args: TrainArgs) -> Result<()> {
    let t0 = Instant::now();
    let config_path = match (&args.config, args.resume) {
        (Some(c), _) => Some(c.clone()),
        (None, true) => {
            // --resume alone: the run's own settings, if it wrote them (the output folder
            // from --out, else the default one of --rank or the default rank).
            let dir = args.out.clone().unwrap_or_else(|| {
                let rank = args
                    .rank
                    .map_or(TrainConfig::default().rank, |r| r as usize);
                PathBuf::from(format!("out/r{rank}"))
            });
            Some(dir.join(RUN_FILE)).filter(|p| p.is_file())
        }
        (None, false) => None,
    };
    let file = RunConfig::load(config_path.as_deref())?;
    let mut run = resolve(&args, &file)?;
    let dtype = run.settings.dtype.on(run.settings.device)?;
    let model_path = absolute(&model_arg::resolve_model(&run.settings.model)?);
    run.train.model = Some(base_model_name(&run.settings.model, &model_path));

    let data_dir = rupantor_data::data_dir(args.data.as_deref());
    let data_file = rupantor_data::resolve_split(&data_dir, TRAIN_SPLIT)?;
    let pool = rupantor_data::load_problems(&data_file)?;
    ensure!(!pool.is_empty(), "{}: no problems", data_file.display());

    std::fs::create_dir_all(&run.out).with_context(|| format!("create {}", run.out.display()))?;
    let run_file = run.out.join(RUN_FILE);
    // The trainer refuses this too, but only after run.toml would have been replaced.
    let latest = run.out.join(LATEST_CHECKPOINT);
    if !run.train.resume && latest.exists() {
        bail!(
            "{} holds a checkpoint of an earlier run ({}); pass --resume to continue it or \
             choose another output directory",
            run.out.display(),
            latest.display()
        );
    }
    if run.train.resume {
        if let Ok(prev) = RunConfig::from_file(&run_file) {
            let prev_model = prev.model.model.unwrap_or_default();
            ensure!(
                Path::new(&prev_model) == model_path,
                "--resume: {} was trained from {prev_model}, not {}",
                run.out.display(),
                model_path.display()
            );
        }
    }
    let text = run_file_text(&run, &model_path, &absolute(&data_file), pool.len())?;
    write_atomic(&run_file, text.as_bytes())?;
    if let Some(iterations) = run.iterations {
        return self_improve(&run, iterations, &model_path, &data_dir, text);
    }

    eprintln!(
        "train: {} ({} base), LoRA r {} alpha {} on {}; {} problems from {}; out {}",
        model_path.display(),
        quant_name(run.settings.quant),
        run.train.rank,
        run.train.alpha,
        run.train.targets.join(","),
        pool.len(),
        data_file.display(),
        run.out.display()
    );
    let tokenizer = load_tokenizer(&model_path)?;
    let device = model_arg::device(run.settings.device)?;
    let t_load = Instant::now();
    let spec = LoraSpec {
        dtype,
        ..run.train.lora_spec()?
    };
    let model = LoraModel::load(&model_path, &device, spec)?;
    let load_s = t_load.elapsed().as_secs_f64();
    let report = rupantor_train::train(&model, &tokenizer, &pool, &run.train, &run.out)?;
    print_summary(&report, load_s, t0.elapsed().as_secs_f64());
    Ok(())
}

/// `train --iter N`: the loop in OUT (its report in `OUT/report.md`).
fn self_improve(
    run: &ResolvedRun,
    iterations: usize,
    model_path: &Path,
    data_dir: &Path,
    resolved_config: String,
) -> Result<()> {
    let cfg = LoopConfig {
        iterations,
        train: run.train.clone(),
        generation: run.generation.clone(),
        strategies: run.strategies.clone(),
        verify: run.sandbox.clone(),
        resume: run.train.resume,
        keep_checkpoints: false,
        progress: true,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        resolved_config,
    };
    let base = BaseModel {
        path: model_path.to_path_buf(),
        device: model_arg::device(run.settings.device)?,
        dtype: run.settings.dtype.on(run.settings.device)?,
        tokenizer: load_tokenizer(model_path)?,
    };
    let paths = Paths {
        data_dir: data_dir.to_path_buf(),
        out_dir: run.out.clone(),
    };
    let report = run_loop(&cfg, &paths, &base, LoopHooks::default())?;
    for r in &report.iterations {
        println!(
            "iteration {}: pool {} ({} trial + {} dev), best val loss {}, dev pass@1 {:.4} \
             ({}/{}), folded {}{}",
            r.iteration,
            r.pool_size,
            r.pool_trial,
            r.pool_dev,
            r.train
                .best_val_loss
                .map_or("-".to_string(), |l| format!("{l:.4}")),
            r.dev.pass_at_1,
            r.dev.passed,
            r.dev.n,
            r.fold.added.len(),
            if r.reused { " (finished earlier)" } else { "" }
        );
    }
    println!(
        "wall time: {:.1} s; peak RSS: {}",
        report.wall_s,
        peak_rss_bytes().map_or("unknown".into(), |b| format!("{:.2} GiB", gib(b)))
    );
    println!(
        "adapter: {}; report: {}",
        report.out_dir.display(),
        report.report.display()
    );
    Ok(())
}

fn print_summary(r: &TrainReport, load_s: f64, wall_s: f64) {
    let best = match (r.best_val_loss, r.best_step) {
        (Some(l), Some(s)) => format!("{l:.4} at step {s}"),
        _ => "none (no evaluation ran)".into(),
    };
    let resumed = r
        .resumed_from
        .map_or(String::new(), |s| format!(" (resumed from step {s})"));
    println!(
        "steps: {}/{}{resumed}, {} per epoch; early stopped: {}",
        r.steps,
        r.total_steps,
        r.steps_per_epoch,
        if r.early_stopped { "yes" } else { "no" }
    );
    println!(
        "best validation loss: {best}; last train loss: {}",
        r.last_train_loss
            .map_or("-".to_string(), |l| format!("{l:.4}"))
    );
    println!(
        "examples: {} train, {} validation; {} truncated; {} trainable parameters, optimizer \
         state {:.3} bytes/param",
        r.train_examples,
        r.val_examples,
        r.truncated.len(),
        r.trainable_params,
        r.optimizer_state_bytes_per_param
    );
    println!(
        "wall time: {wall_s:.1} s (model load {load_s:.1} s, training {:.1} s, {:.1} tokens/s); \
         peak RSS: {}",
        r.wall_s,
        r.tokens as f64 / r.wall_s.max(1e-9),
        peak_rss_bytes().map_or("unknown".into(), |b| format!("{:.2} GiB", gib(b)))
    );
    println!("adapter: {}", r.out_dir.display());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(flags: &[&str]) -> TrainArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            a: TrainArgs,
        }
        let mut v = vec!["train"];
        v.extend_from_slice(flags);
        Cli::parse_from(v).a
    }

    #[test]
    fn flags_override_the_train_table_which_overrides_defaults() {
        let file = RunConfig::from_toml(
            "[model]\nmodel = \"m.gguf\"\n[train]\nrank = 16\nlr = 1e-4\nmax_steps = 7\n\
             betas = [0.9, 0.95]\noptimizer = \"adamw\"\n",
        )
        .unwrap();
        let r = resolve(&args(&[]), &file).unwrap();
        assert_eq!(r.train.rank, 16);
        assert_eq!(r.train.lr, 1e-4);
        assert_eq!(r.train.betas, (0.9, 0.95));
        assert_eq!(r.train.max_steps, Some(7));
        assert_eq!(
            r.train.alpha, 64.0,
            "untouched keys keep the paper's defaults"
        );
        assert_eq!(r.out, PathBuf::from("out/r16"));
        assert_eq!(r.settings.model, "m.gguf");

        let r = resolve(
            &args(&[
                "--rank",
                "8",
                "--max-steps",
                "3",
                "--model",
                "x",
                "--quant",
                "none",
            ]),
            &file,
        )
        .unwrap();
        assert_eq!((r.train.rank, r.train.max_steps), (8, Some(3)));
        assert_eq!(r.train.base_format, BaseFormat::Dense);
        assert_eq!(r.settings.model, "x");
        assert_eq!(r.out, PathBuf::from("out/r8"));

        let r = resolve(&args(&["--resume", "--out", "o"]), &RunConfig::default()).unwrap();
        assert!(r.train.resume);
        assert_eq!(
            r.train,
            TrainConfig {
                resume: true,
                ..TrainConfig::default()
            }
        );
        assert_eq!(
            (r.out, r.settings.model.as_str()),
            (PathBuf::from("o"), EMBEDDED)
        );
    }

    #[test]
    fn bad_train_tables_are_errors() {
        for (text, want) in [
            ("[train]\nrnak = 8\n", "rnak"),
            ("[train]\nmodel = \"x\"\n", "[model] model"),
            ("[train]\nbase_format = \"dense\"\n", "quant"),
            ("[train]\nresume = true\n", "--resume"),
            ("[train]\noptimizer = \"sgd\"\n", "sgd"),
        ] {
            let file = RunConfig::from_toml(text).unwrap();
            let e = format!("{:#}", resolve(&args(&[]), &file).unwrap_err());
            assert!(e.contains(want), "{text}: {e}");
        }
        let file = RunConfig::from_toml("[train]\ndropout = 1.5\n").unwrap();
        assert!(resolve(&args(&[]), &file).is_err());
    }

    #[test]
    fn run_file_reads_back_as_the_same_settings() {
        let file = RunConfig::from_toml("[train]\nrank = 8\nmax_steps = 5\nlr = 3e-3\n").unwrap();
        let mut run = resolve(&args(&["--resume", "--quant", "none"]), &file).unwrap();
        run.train.model = Some("/models/m".into());
        let text =
            run_file_text(&run, Path::new("/models/m"), Path::new("/d/trial.jsonl"), 9).unwrap();
        assert!(text.starts_with("# The resolved settings"), "{text}");
        let back = RunConfig::from_toml(&text).unwrap();
        assert_eq!(back.model.model.as_deref(), Some("/models/m"));
        let again = resolve(&args(&["--resume"]), &back).unwrap();
        assert_eq!(again.settings.quant, Quant::None);
        assert_eq!(
            again.train,
            TrainConfig {
                model: None,
                ..run.train.clone()
            }
        );
    }

    #[test]
    fn shipped_presets_have_valid_train_tables() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        for name in ["gemma3-270m-cpu.toml", "gemma2-9b-it.toml"] {
            let file = RunConfig::from_file(&dir.join(name)).unwrap();
            assert!(file.train.is_some(), "{name} has no [train] table");
            let r = resolve(&args(&[]), &file).unwrap();
            assert_eq!(r.train.base_format, BaseFormat::Nf4, "{name}");
        }
        let nine = RunConfig::from_file(&dir.join("gemma2-9b-it.toml")).unwrap();
        let paper = resolve(&args(&[]), &nine).unwrap().train;
        assert_eq!((paper.rank, paper.alpha, paper.dropout), (32, 64.0, 0.05));
        assert_eq!(
            (paper.micro_batch, paper.grad_accum, paper.patience),
            (2, 4, 3)
        );
        assert_eq!(paper.lr, 5e-5);
        assert_eq!(paper.targets.len(), 7);
    }
}
