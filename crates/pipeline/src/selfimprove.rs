//! The self-improvement loop of design §1 (`rupantor train --iter N`), as a library.
//!
//! Iteration k (1-based), in `OUT/iter{k}/`:
//!
//! 1. `inputs.json` (the iteration's input digest) and `pool.jsonl` (the pool it trains on);
//! 2. a model built *fresh from the base* by the [`ModelFactory`] (new adapters, seeded as
//!    the config says) is trained on the pool: the trainer's adapter, `metrics.jsonl`,
//!    `loss.png` and `checkpoint/`;
//! 3. a program for every dev problem with that adapter ([`Generator`]; by default
//!    [`ModelGenerator`]: batched, greedy unless configured otherwise, or with
//!    `LoopConfig::strategies` set, a [`StrategyGenerator`] whose few-shot examples come
//!    from the iteration's pool) -> `dev_predictions.jsonl`;
//! 4. each program against *all* its dev asserts in the sandbox -> `verdicts.jsonl`
//!    (`{"id", "passed", "class", "trace"}`);
//! 5. the fold ([`Pool::fold`]): passing programs of dev problems not yet in the pool and
//!    with a program text not yet in it -> `folded.jsonl`;
//! 6. `summary.json`, then `DONE` (the input digest), written last.
//!
//! After each iteration `OUT/pool.jsonl` holds the grown pool and `OUT/report.md` the table
//! so far; at the end the last iteration's adapter is copied to `OUT/`.
//!
//! Only the trial split (the initial pool) and the dev split (generation, verification,
//! folding) are ever read: the test split cannot reach a pool.
//!
//! Every file is written atomically (temp file + rename). An iteration with a `DONE` whose
//! digest matches its inputs (config, base, pool, dev split) is not redone on `resume`; one
//! without `DONE` is redone, its training continuing from its checkpoint when there is one
//! (generation and verification are cheap next to training and run again). A `DONE` whose
//! digest does not match is an error: the run's inputs changed under it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device};
use rupantor_data::{load_split, Problem};
use rupantor_exec::{Score, VerdictClass};
use rupantor_model::Tokenizer;
use rupantor_train::fsutil::write_atomic;
use rupantor_train::trainer::{LOSS_PLOT_FILE, METRICS_FILE};
use rupantor_train::{
    train_with_hooks, LoraModel, LoraSpec, TrainConfig, TrainHooks, TrainReport,
    ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE,
};
use serde::{Deserialize, Serialize};

use crate::digest::digest_json;
use crate::generate::{
    check_context, generate_programs, write_predictions, GenOutput, GenSettings, Generated,
};
use crate::pool::{read_pool, write_pool, Pool, PoolEntry, Source};
use crate::report::render_report;
use crate::retrieval::ExamplePool;
use crate::strategy::{Strategies, StrategyGenerator};
pub use crate::verify::VerifySettings;
use crate::verify::{verify_programs, write_verdicts};

/// The split of the initial pool.
pub const TRAIN_SPLIT: &str = "trial";
/// The split generated for, verified and folded.
pub const DEV_SPLIT: &str = "dev";

pub const DONE_FILE: &str = "DONE";
pub const INPUTS_FILE: &str = "inputs.json";
pub const SUMMARY_FILE: &str = "summary.json";
pub const POOL_FILE: &str = "pool.jsonl";
pub const FOLDED_FILE: &str = "folded.jsonl";
pub const PREDICTIONS_FILE: &str = "dev_predictions.jsonl";
pub const VERDICTS_FILE: &str = "verdicts.jsonl";
pub const REPORT_FILE: &str = "report.md";
const CHECKPOINT_DIR: &str = "checkpoint";
/// Bumped when what goes into an iteration's digest changes meaning.
const DIGEST_FORMAT: u32 = 1;

/// Everything the loop is configured by.
#[derive(Debug, Clone, PartialEq)]
pub struct LoopConfig {
    /// N: iterations in all (>= 1).
    pub iterations: usize,
    /// Each iteration's training run. `resume` and `progress` are the loop's to set (from
    /// the fields below).
    pub train: TrainConfig,
    /// Dev generation. `progress` is the loop's to set.
    pub generation: GenSettings,
    /// Inference strategies for dev generation (all off: plain generation).
    pub strategies: Strategies,
    pub verify: VerifySettings,
    /// Continue the run in the output folder (`--resume`); without it a folder holding an
    /// earlier run is refused.
    pub resume: bool,
    /// Keep each finished iteration's `checkpoint/` (by default removed once `DONE` is
    /// written; a finished iteration never needs it again).
    pub keep_checkpoints: bool,
    /// Progress bars of training, generation and verification on stderr.
    pub progress: bool,
    /// The command line, for the report.
    pub command: String,
    /// The resolved config (what the CLI writes to `run.toml`), for the report.
    pub resolved_config: String,
}

impl Default for LoopConfig {
    fn default() -> Self {
        LoopConfig {
            iterations: 2,
            train: TrainConfig::default(),
            generation: GenSettings::default(),
            strategies: Strategies::default(),
            verify: VerifySettings::default(),
            resume: false,
            keep_checkpoints: false,
            progress: true,
            command: String::new(),
            resolved_config: String::new(),
        }
    }
}

impl LoopConfig {
    pub fn validate(&self) -> Result<()> {
        ensure!(self.iterations >= 1, "--iter must be at least 1");
        self.train.validate()?;
        self.generation.validate()?;
        self.strategies.validate()?;
        self.verify.validate()
    }
}

/// Where the loop reads and writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    /// Holds trial and dev (`trial.jsonl`, `dev.jsonl`, or the task's JSON/CSV).
    pub data_dir: PathBuf,
    /// OUT (`out/r32`).
    pub out_dir: PathBuf,
}

/// Builds models fresh from the base, so each iteration starts from the same point; the CLI
/// passes its resolved model here (see [`BaseModel`], [`FnFactory`]).
pub trait ModelFactory {
    /// The base with new adapters per `spec` (a fresh load, or anything equivalent).
    fn fresh(&self, spec: LoraSpec) -> Result<LoraModel>;
    /// The tokenizer belonging to the base.
    fn tokenizer(&self) -> &Tokenizer;
    /// What the base is (path or repo id): part of each iteration's digest and the report.
    fn base_id(&self) -> String;
}

/// A base loaded from a local path (HF directory or GGUF file) for each iteration.
pub struct BaseModel {
    pub path: PathBuf,
    pub device: Device,
    /// The activation dtype every model of the run is built in.
    pub dtype: DType,
    pub tokenizer: Tokenizer,
}

impl ModelFactory for BaseModel {
    fn fresh(&self, spec: LoraSpec) -> Result<LoraModel> {
        let spec = LoraSpec {
            dtype: self.dtype,
            ..spec
        };
        LoraModel::load(&self.path, &self.device, spec)
    }

    fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    fn base_id(&self) -> String {
        self.path.display().to_string()
    }
}

/// A factory from a closure (the CLI's model resolver, for instance).
pub struct FnFactory<F> {
    pub base_id: String,
    pub tokenizer: Tokenizer,
    pub build: F,
}

impl<F: Fn(LoraSpec) -> Result<LoraModel>> ModelFactory for FnFactory<F> {
    fn fresh(&self, spec: LoraSpec) -> Result<LoraModel> {
        (self.build)(spec)
    }

    fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    fn base_id(&self) -> String {
        self.base_id.clone()
    }
}

/// Step 3: a program for each dev problem with the iteration's trained model. The outputs
/// must be one per problem, in the problems' order.
pub trait Generator {
    fn generate(
        &mut self,
        iteration: usize,
        model: &LoraModel,
        tokenizer: &Tokenizer,
        problems: &[Problem],
        settings: &GenSettings,
    ) -> Result<Generated>;
}

/// The real step 3: [`generate_programs`] with the trained model.
#[derive(Debug, Clone, Copy, Default)]
pub struct ModelGenerator;

impl Generator for ModelGenerator {
    fn generate(
        &mut self,
        _iteration: usize,
        model: &LoraModel,
        tokenizer: &Tokenizer,
        problems: &[Problem],
        settings: &GenSettings,
    ) -> Result<Generated> {
        model.set_training(false);
        generate_programs(model.model(), tokenizer, problems, settings)
    }
}

/// A stage of an iteration, as hooks see it (called after the stage finished).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    Load,
    Train,
    Generate,
    Verify,
    Fold,
    /// `DONE` is written.
    Done,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Load => "load",
            Stage::Train => "train",
            Stage::Generate => "generate",
            Stage::Verify => "verify",
            Stage::Fold => "fold",
            Stage::Done => "done",
        })
    }
}

/// Hooks into the loop (the CLI needs none). An error from a hook ends the run there, as a
/// kill would.
#[derive(Default)]
pub struct LoopHooks<'a> {
    /// Replaces [`ModelGenerator`] (tests: programs that are known to pass or fail).
    pub generator: Option<Box<dyn Generator + 'a>>,
    /// After each stage of each iteration that runs (not for iterations finished earlier).
    #[allow(clippy::type_complexity)]
    pub after_stage: Option<Box<dyn FnMut(usize, Stage) -> Result<()> + 'a>>,
    /// Before optimizer step `step` of iteration `iteration`'s training.
    #[allow(clippy::type_complexity)]
    pub before_train_step: Option<Box<dyn FnMut(usize, u64) -> Result<()> + 'a>>,
}

/// The training run of an iteration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSummary {
    pub steps: u64,
    pub total_steps: u64,
    pub steps_per_epoch: u64,
    /// The step its training continued from after an interruption.
    pub resumed_from: Option<u64>,
    pub early_stopped: bool,
    pub best_val_loss: Option<f64>,
    pub best_step: Option<u64>,
    pub last_train_loss: Option<f64>,
    pub train_examples: usize,
    pub val_examples: usize,
    /// Problems cut to `max_len`.
    pub truncated: usize,
    /// Tokens trained on in the process that finished it.
    pub tokens: usize,
}

impl From<&TrainReport> for TrainSummary {
    fn from(r: &TrainReport) -> Self {
        TrainSummary {
            steps: r.steps,
            total_steps: r.total_steps,
            steps_per_epoch: r.steps_per_epoch,
            resumed_from: r.resumed_from,
            early_stopped: r.early_stopped,
            best_val_loss: r.best_val_loss,
            best_step: r.best_step,
            last_train_loss: r.last_train_loss,
            train_examples: r.train_examples,
            val_examples: r.val_examples,
            truncated: r.truncated.len(),
            tokens: r.tokens,
        }
    }
}

/// Dev generation and verification of an iteration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DevSummary {
    pub n: usize,
    pub passed: usize,
    pub pass_at_1: f64,
    /// Verdict class name -> count (classes with none left out).
    pub by_class: BTreeMap<String, usize>,
    /// Tokens generated.
    pub tokens: usize,
    /// Programs cut at `max_new_tokens`.
    pub cut: usize,
}

/// The fold of an iteration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FoldSummary {
    /// Dev programs that passed all their asserts.
    pub passed: usize,
    /// Dev ids folded.
    pub added: Vec<u64>,
    /// Passed, but folded by an earlier iteration.
    pub already_in_pool: Vec<u64>,
    /// Passed, but the same program text is in the pool.
    pub duplicate_program: Vec<u64>,
    /// Pool size after the fold.
    pub pool_after: usize,
}

/// Wall time per stage, seconds.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct StageTimes {
    pub load_s: f64,
    pub train_s: f64,
    pub generate_s: f64,
    pub verify_s: f64,
    pub fold_s: f64,
    pub total_s: f64,
}

/// One iteration (`OUT/iter{k}/summary.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IterationReport {
    pub iteration: usize,
    pub digest: String,
    /// The pool it trained on.
    pub pool_size: usize,
    pub pool_trial: usize,
    pub pool_dev: usize,
    pub train: TrainSummary,
    pub dev: DevSummary,
    pub fold: FoldSummary,
    pub times: StageTimes,
    /// Finished by an earlier run and taken from its `summary.json` (not stored).
    #[serde(skip)]
    pub reused: bool,
    /// The earlier iteration whose results this one carries: nothing was folded after it, so
    /// this iteration's inputs were the same and it would have trained and generated the
    /// same bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carried_from: Option<usize>,
}

/// What a loop run did.
#[derive(Debug, Clone, PartialEq)]
pub struct LoopReport {
    pub iterations: Vec<IterationReport>,
    /// The final pool.
    pub pool: Vec<PoolEntry>,
    /// OUT, which holds the final adapter.
    pub out_dir: PathBuf,
    pub report: PathBuf,
    pub wall_s: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Marker {
    iteration: usize,
    digest: String,
}

/// The inputs that decide an iteration's outcome.
#[derive(Serialize)]
struct DigestInputs<'a> {
    format: u32,
    iteration: usize,
    base: String,
    train: serde_json::Value,
    generation: GenSettings,
    /// Left out when plain, so plain runs keep the digests they had before strategies.
    #[serde(skip_serializing_if = "Strategies::is_plain")]
    strategies: Strategies,
    timeout_s: f64,
    memory_mb: u64,
    pool: &'a [PoolEntry],
    dev: &'a [Problem],
}

fn iteration_digest(
    cfg: &LoopConfig,
    base: String,
    iteration: usize,
    pool: &Pool,
    dev: &[Problem],
) -> Result<String> {
    let train = serde_json::to_value(TrainConfig {
        resume: false,
        progress: false,
        ..cfg.train.clone()
    })?;
    Ok(digest_json(&DigestInputs {
        format: DIGEST_FORMAT,
        iteration,
        base,
        train,
        generation: GenSettings {
            progress: false,
            ..cfg.generation.clone()
        },
        strategies: cfg.strategies.clone(),
        timeout_s: cfg.verify.timeout_s,
        memory_mb: cfg.verify.memory_mb,
        pool: pool.entries(),
        dev,
    })?)
}

fn iter_dir(out: &Path, k: usize) -> PathBuf {
    out.join(format!("iter{k}"))
}

fn read_marker(path: &Path) -> Result<Option<Marker>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(
            serde_json::from_slice(&b).with_context(|| format!("{}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// Without `resume`, OUT must not hold an earlier loop run (its `run.toml` alone is fine:
/// the CLI writes it before the loop starts).
fn check_fresh(out: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(out) else {
        return Ok(());
    };
    for entry in entries {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let is_iter = name
            .strip_prefix("iter")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if is_iter || name == POOL_FILE || name == REPORT_FILE {
            bail!(
                "{} holds an earlier loop run ({name}); pass --resume to continue it or choose \
                 another output folder",
                out.display()
            );
        }
    }
    Ok(())
}

fn remove_checkpoint(dir: &Path) -> Result<()> {
    let ckpt = dir.join(CHECKPOINT_DIR);
    if ckpt.exists() {
        std::fs::remove_dir_all(&ckpt).with_context(|| format!("remove {}", ckpt.display()))?;
    }
    Ok(())
}

/// The generator must answer every dev problem once, in order, and nothing else.
fn check_outputs(dev: &[Problem], outputs: &[GenOutput]) -> Result<()> {
    ensure!(
        outputs.len() == dev.len(),
        "the generator returned {} programs for {} dev problems",
        outputs.len(),
        dev.len()
    );
    for (i, (p, o)) in dev.iter().zip(outputs).enumerate() {
        ensure!(
            p.id == o.id,
            "the generator's output {} is for problem {}, not dev problem {}",
            i + 1,
            o.id,
            p.id
        );
    }
    Ok(())
}

fn class_counts(score: &Score) -> BTreeMap<String, usize> {
    score
        .by_class
        .iter()
        .map(|(c, n)| (c.as_str().to_string(), *n))
        .collect()
}

fn describe_classes(by_class: &BTreeMap<String, usize>) -> String {
    VerdictClass::ALL
        .iter()
        .filter_map(|c| {
            by_class
                .get(c.as_str())
                .map(|n| format!("{} {n}", c.as_str()))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs the loop; see the module docs.
pub fn run_loop(
    cfg: &LoopConfig,
    paths: &Paths,
    models: &dyn ModelFactory,
    mut hooks: LoopHooks<'_>,
) -> Result<LoopReport> {
    let started = Instant::now();
    cfg.validate()?;
    let out = &paths.out_dir;
    let trial = load_split(&paths.data_dir, TRAIN_SPLIT)
        .with_context(|| format!("loading the {TRAIN_SPLIT} split (the initial pool)"))?;
    let dev = load_split(&paths.data_dir, DEV_SPLIT)
        .with_context(|| format!("loading the {DEV_SPLIT} split"))?;
    ensure!(!dev.is_empty(), "the dev split is empty");
    cfg.verify.ensure_usable()?;
    if !cfg.resume {
        check_fresh(out)?;
    }
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    let mut pool = Pool::initial(&trial)?;
    let base = models.base_id();
    eprintln!(
        "loop: {} iteration(s) on {base}; pool: {} trial problems; dev: {} problems; out {}{}",
        cfg.iterations,
        pool.len(),
        dev.len(),
        out.display(),
        if cfg.resume { " (resume)" } else { "" }
    );
    let mut custom_generator = hooks.generator.take();
    let mut reports: Vec<IterationReport> = Vec::new();
    for k in 1..=cfg.iterations {
        let dir = iter_dir(out, k);
        let digest = iteration_digest(cfg, base.clone(), k, &pool, &dev)?;
        if let Some(done) = read_marker(&dir.join(DONE_FILE))? {
            ensure!(
                done.digest == digest && done.iteration == k,
                "{} finished with other inputs (digest {}, now {digest}): the config, the base \
                 model, the pool or the dev split changed since; choose another output folder, \
                 or delete {} and the iterations after it to redo them",
                dir.display(),
                done.digest,
                dir.display()
            );
            let text = std::fs::read(dir.join(SUMMARY_FILE))
                .with_context(|| format!("read {}", dir.join(SUMMARY_FILE).display()))?;
            let mut r: IterationReport = serde_json::from_slice(&text)
                .with_context(|| format!("{}", dir.join(SUMMARY_FILE).display()))?;
            pool.replay(k, &read_pool(&dir.join(FOLDED_FILE))?)
                .with_context(|| format!("{}", dir.join(FOLDED_FILE).display()))?;
            ensure!(
                pool.len() == r.fold.pool_after,
                "{}: the pool holds {} problems after replaying its folds, its summary says {}",
                dir.display(),
                pool.len(),
                r.fold.pool_after
            );
            if !cfg.keep_checkpoints {
                remove_checkpoint(&dir)?;
            }
            r.reused = true;
            eprintln!(
                "loop [iter {k}/{}] finished by an earlier run ({}): kept; pool {}",
                cfg.iterations,
                dir.display(),
                pool.len()
            );
            reports.push(r);
            continue;
        }
        // The default generators are functions of the model, the problems and the settings,
        // and training is deterministic: after an iteration that folded nothing, the next
        // one would repeat it byte for byte.
        let stalled = reports
            .last()
            .filter(|r| custom_generator.is_none() && r.fold.added.is_empty());
        if let Some(prev) = stalled {
            let r = carry_over(prev, k, &dir, &digest, &pool)?;
            eprintln!(
                "loop [iter {k}/{}] iteration {} folded nothing, so this one has its inputs: \
                 its results are carried over ({})",
                cfg.iterations,
                prev.iteration,
                dir.display()
            );
            reports.push(r);
            let text = render_report(cfg, paths, &base, &reports, pool.entries(), None);
            write_atomic(&out.join(REPORT_FILE), text.as_bytes())?;
            continue;
        }
        let mut default_generator = default_generator(cfg, &pool);
        let generator = match custom_generator.as_mut() {
            Some(g) => g.as_mut(),
            None => default_generator.as_mut(),
        };
        let r = run_iteration(
            cfg,
            models,
            generator,
            &mut hooks,
            Iteration {
                k,
                dir: &dir,
                digest: &digest,
                dev: &dev,
            },
            &mut pool,
        )?;
        reports.push(r);
        write_pool(&out.join(POOL_FILE), pool.entries())?;
        let text = render_report(cfg, paths, &base, &reports, pool.entries(), None);
        write_atomic(&out.join(REPORT_FILE), text.as_bytes())?;
    }

    // The final adapter: the last iteration's.
    let last = iter_dir(out, cfg.iterations);
    for name in [ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE] {
        let bytes =
            std::fs::read(last.join(name)).with_context(|| format!("read {}", last.display()))?;
        write_atomic(&out.join(name), &bytes)?;
    }
    write_pool(&out.join(POOL_FILE), pool.entries())?;
    let wall_s = started.elapsed().as_secs_f64();
    let report = out.join(REPORT_FILE);
    let text = render_report(cfg, paths, &base, &reports, pool.entries(), Some(wall_s));
    write_atomic(&report, text.as_bytes())?;
    let last_r = reports.last().expect("at least one iteration");
    eprintln!(
        "loop: done in {wall_s:.1}s; dev pass@1 per iteration: {}; pool {}; adapter {}; report {}",
        reports
            .iter()
            .map(|r| format!("{:.4}", r.dev.pass_at_1))
            .collect::<Vec<_>>()
            .join(" -> "),
        last_r.fold.pool_after,
        out.display(),
        report.display()
    );
    Ok(LoopReport {
        iterations: reports,
        pool: pool.entries().to_vec(),
        out_dir: out.clone(),
        report,
        wall_s,
    })
}

/// Iteration `k` as a copy of `prev` (see `run_loop`): its adapter, metrics, plot,
/// predictions and verdicts, an empty fold, then `summary.json` and `DONE`.
fn carry_over(
    prev: &IterationReport,
    k: usize,
    dir: &Path,
    digest: &str,
    pool: &Pool,
) -> Result<IterationReport> {
    let from = iter_dir(dir.parent().unwrap_or(Path::new(".")), prev.iteration);
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let marker = Marker {
        iteration: k,
        digest: digest.to_string(),
    };
    write_json(&dir.join(INPUTS_FILE), &marker)?;
    write_pool(&dir.join(POOL_FILE), pool.entries())?;
    for name in [
        ADAPTER_WEIGHTS_FILE,
        ADAPTER_CONFIG_FILE,
        METRICS_FILE,
        LOSS_PLOT_FILE,
        PREDICTIONS_FILE,
        VERDICTS_FILE,
    ] {
        let src = from.join(name);
        let bytes = std::fs::read(&src).with_context(|| format!("read {}", src.display()))?;
        write_atomic(&dir.join(name), &bytes)?;
    }
    write_pool(&dir.join(FOLDED_FILE), &[])?;
    let report = IterationReport {
        iteration: k,
        digest: digest.to_string(),
        times: StageTimes::default(),
        reused: false,
        carried_from: Some(prev.carried_from.unwrap_or(prev.iteration)),
        ..prev.clone()
    };
    write_json(&dir.join(SUMMARY_FILE), &report)?;
    write_json(&dir.join(DONE_FILE), &marker)?;
    Ok(report)
}

/// Plain generation, or the configured strategies with few-shot examples from `pool`.
fn default_generator(cfg: &LoopConfig, pool: &Pool) -> Box<dyn Generator> {
    if cfg.strategies.is_plain() {
        return Box::new(ModelGenerator);
    }
    Box::new(StrategyGenerator {
        strategies: cfg.strategies.clone(),
        split: DEV_SPLIT.to_string(),
        sandbox: cfg.verify.clone(),
        examples: (cfg.strategies.fewshot > 0).then(|| ExamplePool::from_pool(pool.entries())),
        glossary: None,
        runs: Vec::new(),
    })
}

/// What one iteration works on.
struct Iteration<'a> {
    k: usize,
    dir: &'a Path,
    digest: &'a str,
    dev: &'a [Problem],
}

fn after(hooks: &mut LoopHooks<'_>, k: usize, stage: Stage) -> Result<()> {
    match hooks.after_stage.as_mut() {
        Some(f) => f(k, stage).with_context(|| format!("iteration {k}, after {stage}")),
        None => Ok(()),
    }
}

fn run_iteration(
    cfg: &LoopConfig,
    models: &dyn ModelFactory,
    generator: &mut dyn Generator,
    hooks: &mut LoopHooks<'_>,
    it: Iteration<'_>,
    pool: &mut Pool,
) -> Result<IterationReport> {
    let Iteration {
        k,
        dir,
        digest,
        dev,
    } = it;
    let tag = format!("loop [iter {k}/{}]", cfg.iterations);
    let t_iter = Instant::now();
    let mut times = StageTimes::default();
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;

    // 1. Inputs. A checkpoint is only resumed by the inputs that made it.
    let has_checkpoint = dir.join(CHECKPOINT_DIR).join("latest.json").is_file();
    if let Some(prev) = read_marker(&dir.join(INPUTS_FILE))? {
        ensure!(
            prev.digest == digest || !has_checkpoint,
            "{}: its training checkpoint was made from other inputs (digest {}, now {digest}); \
             delete {} to start this iteration over",
            dir.display(),
            prev.digest,
            dir.join(CHECKPOINT_DIR).display()
        );
    }
    ensure!(
        !has_checkpoint || cfg.resume,
        "{} holds a training checkpoint; pass --resume to continue it",
        dir.display()
    );
    write_json(
        &dir.join(INPUTS_FILE),
        &Marker {
            iteration: k,
            digest: digest.to_string(),
        },
    )?;
    write_pool(&dir.join(POOL_FILE), pool.entries())?;
    let (pool_trial, pool_dev) = (pool.count(Source::Trial), pool.count(Source::Dev));

    // 2. A fresh adapter from the base, trained on the pool.
    let spec = cfg.train.lora_spec()?;
    eprintln!(
        "{tag} load: base {} with fresh adapters (r {}, alpha {})",
        models.base_id(),
        spec.lora.rank,
        spec.lora.alpha
    );
    let t = Instant::now();
    let model = models.fresh(spec)?;
    times.load_s = t.elapsed().as_secs_f64();
    // Fail now rather than after a long training run.
    check_context(model.model(), models.tokenizer(), dev, &cfg.generation)?;
    after(hooks, k, Stage::Load)?;

    let tcfg = TrainConfig {
        resume: has_checkpoint,
        progress: cfg.progress,
        ..cfg.train.clone()
    };
    eprintln!(
        "{tag} train: {} problems ({pool_trial} trial + {pool_dev} dev){} -> {}",
        pool.len(),
        if has_checkpoint {
            ", continuing from the checkpoint"
        } else {
            ""
        },
        dir.display()
    );
    let t = Instant::now();
    let train_hooks = TrainHooks {
        before_step: hooks.before_train_step.as_mut().map(|f| {
            Box::new(move |step: u64, _: &LoraModel| f(k, step))
                as Box<dyn FnMut(u64, &LoraModel) -> Result<()> + '_>
        }),
    };
    let problems = pool.training_problems();
    let tr = train_with_hooks(
        &model,
        models.tokenizer(),
        &problems,
        &tcfg,
        dir,
        train_hooks,
    )
    .with_context(|| format!("iteration {k}: training"))?;
    times.train_s = t.elapsed().as_secs_f64();
    eprintln!(
        "{tag} train: {} of {} steps{}{}, best val loss {}, {:.1}s",
        tr.steps,
        tr.total_steps,
        tr.resumed_from
            .map_or(String::new(), |s| format!(" (resumed at step {s})")),
        if tr.early_stopped {
            ", early stopped"
        } else {
            ""
        },
        match (tr.best_val_loss, tr.best_step) {
            (Some(l), Some(s)) => format!("{l:.4} at step {s}"),
            _ => "-".into(),
        },
        times.train_s
    );
    after(hooks, k, Stage::Train)?;

    // 3. A program for each dev problem.
    let settings = GenSettings {
        progress: cfg.progress,
        ..cfg.generation.clone()
    };
    eprintln!(
        "{tag} generate: {} dev problems, {}",
        dev.len(),
        settings.describe()
    );
    let t = Instant::now();
    let generated = generator
        .generate(k, &model, models.tokenizer(), dev, &settings)
        .with_context(|| format!("iteration {k}: generating for dev"))?;
    check_outputs(dev, &generated.outputs)?;
    drop(model);
    write_predictions(&dir.join(PREDICTIONS_FILE), &generated.outputs)?;
    times.generate_s = t.elapsed().as_secs_f64();
    eprintln!(
        "{tag} generate: {} tokens in {:.1}s ({:.1} tokens/s){}",
        generated.tokens,
        times.generate_s,
        generated.tokens_per_sec(),
        if generated.cut > 0 {
            format!(", {} cut at max_new_tokens", generated.cut)
        } else {
            String::new()
        }
    );
    after(hooks, k, Stage::Generate)?;

    // 4. Every program against all its dev asserts.
    let workers = cfg.verify.workers();
    eprintln!(
        "{tag} verify: {} programs, {workers} sandbox workers, {}s limit",
        dev.len(),
        cfg.verify.timeout_s
    );
    let t = Instant::now();
    let programs: Vec<String> = generated
        .outputs
        .iter()
        .map(|o| o.response.clone())
        .collect();
    let verified = verify_programs(dev, &programs, &cfg.verify, cfg.progress)?;
    let dev_ids: Vec<u64> = dev.iter().map(|p| p.id).collect();
    write_verdicts(&dir.join(VERDICTS_FILE), &dev_ids, &verified.verdicts)?;
    let score = &verified.score;
    times.verify_s = t.elapsed().as_secs_f64();
    let by_class = class_counts(score);
    eprintln!(
        "{tag} verify: pass@1 {:.4} ({}/{}); {}; {:.1}s",
        score.pass_at_1(),
        score.passed,
        score.n,
        describe_classes(&by_class),
        times.verify_s
    );
    after(hooks, k, Stage::Verify)?;

    // 5. Fold the verified programs.
    let t = Instant::now();
    let fold = pool.fold(k, dev, &programs, &verified.verdicts)?;
    write_pool(&dir.join(FOLDED_FILE), &fold.added)?;
    times.fold_s = t.elapsed().as_secs_f64();
    eprintln!(
        "{tag} fold: +{} of {} passing ({} already in the pool, {} duplicate programs); pool {}",
        fold.added.len(),
        fold.passed,
        fold.already_in_pool.len(),
        fold.duplicate_program.len(),
        pool.len()
    );
    after(hooks, k, Stage::Fold)?;

    // 6. Summary, then DONE.
    times.total_s = t_iter.elapsed().as_secs_f64();
    let report = IterationReport {
        iteration: k,
        digest: digest.to_string(),
        pool_size: pool_trial + pool_dev,
        pool_trial,
        pool_dev,
        train: TrainSummary::from(&tr),
        dev: DevSummary {
            n: score.n,
            passed: score.passed,
            pass_at_1: score.pass_at_1(),
            by_class,
            tokens: generated.tokens,
            cut: generated.cut,
        },
        fold: FoldSummary {
            passed: fold.passed,
            added: fold.added.iter().map(|e| e.id).collect(),
            already_in_pool: fold.already_in_pool.clone(),
            duplicate_program: fold.duplicate_program.iter().map(|d| d.0).collect(),
            pool_after: pool.len(),
        },
        times,
        reused: false,
        carried_from: None,
    };
    write_json(&dir.join(SUMMARY_FILE), &report)?;
    write_json(
        &dir.join(DONE_FILE),
        &Marker {
            iteration: k,
            digest: digest.to_string(),
        },
    )?;
    if !cfg.keep_checkpoints {
        remove_checkpoint(dir)?;
    }
    eprintln!("{tag} done in {:.1}s", times.total_s);
    after(hooks, k, Stage::Done)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rupantor_exec::Verdict;
    use std::time::Duration;

    #[test]
    fn fresh_check_refuses_earlier_runs_only() {
        let dir = tempfile::tempdir().unwrap();
        check_fresh(&dir.path().join("missing")).unwrap();
        std::fs::write(dir.path().join("run.toml"), "").unwrap();
        std::fs::create_dir(dir.path().join("iterations-notes")).unwrap();
        check_fresh(dir.path()).unwrap();
        std::fs::create_dir(dir.path().join("iter1")).unwrap();
        let e = check_fresh(dir.path()).unwrap_err().to_string();
        assert!(e.contains("--resume") && e.contains("iter1"), "{e}");
    }

    #[test]
    fn digest_covers_what_changes_results_and_nothing_else() {
        let trial = vec![Problem {
            id: 1,
            instruction: "i".into(),
            test_list: vec!["assert True".into()],
            response: Some("x = 1".into()),
        }];
        let dev = vec![Problem {
            response: None,
            ..trial[0].clone()
        }];
        let pool = Pool::initial(&trial).unwrap();
        let cfg = LoopConfig::default();
        let d = |c: &LoopConfig, k: usize, base: &str, pool: &Pool, dev: &[Problem]| {
            iteration_digest(c, base.into(), k, pool, dev).unwrap()
        };
        let base = d(&cfg, 1, "m", &pool, &dev);
        // Run controls do not count.
        let controls = LoopConfig {
            resume: true,
            progress: false,
            keep_checkpoints: true,
            iterations: 7,
            command: "x".into(),
            resolved_config: "y".into(),
            verify: VerifySettings {
                workers: 3,
                ..VerifySettings::default()
            },
            train: TrainConfig {
                resume: true,
                progress: false,
                ..TrainConfig::default()
            },
            generation: GenSettings {
                progress: false,
                ..GenSettings::default()
            },
            strategies: Strategies::default(),
        };
        assert_eq!(d(&controls, 1, "m", &pool, &dev), base);
        // Everything that changes the outcome does.
        let lr = LoopConfig {
            train: TrainConfig {
                lr: 1e-3,
                ..TrainConfig::default()
            },
            ..cfg.clone()
        };
        let gen = LoopConfig {
            generation: GenSettings {
                max_new_tokens: 9,
                ..GenSettings::default()
            },
            ..cfg.clone()
        };
        let timeout = LoopConfig {
            verify: VerifySettings {
                timeout_s: 3.0,
                ..VerifySettings::default()
            },
            ..cfg.clone()
        };
        let repair = LoopConfig {
            strategies: Strategies {
                repair: 2,
                ..Strategies::default()
            },
            ..cfg.clone()
        };
        let mut dev2 = dev.clone();
        dev2[0].test_list.push("assert 1".into());
        let mut pool2 = pool.clone();
        pool2
            .fold(
                1,
                &dev,
                &["y = 2".to_string()],
                &[Verdict {
                    passed: true,
                    class: VerdictClass::Pass,
                    trace: String::new(),
                    wall: Duration::ZERO,
                }],
            )
            .unwrap();
        for other in [
            d(&repair, 1, "m", &pool, &dev),
            d(&lr, 1, "m", &pool, &dev),
            d(&gen, 1, "m", &pool, &dev),
            d(&timeout, 1, "m", &pool, &dev),
            d(&cfg, 2, "m", &pool, &dev),
            d(&cfg, 1, "other", &pool, &dev),
            d(&cfg, 1, "m", &pool2, &dev),
            d(&cfg, 1, "m", &pool, &dev2),
        ] {
            assert_ne!(other, base);
        }
    }
}
