//! `rupantor generate`: a program for every problem of a split, with a base model (`--model`)
//! or a trained adapter (`--adapter DIR`).
//!
//! The generation itself is the pipeline's (`rupantor_pipeline::generate_programs`: design
//! §2's chat prompt, length-bucketed batches, code extraction), the one the training loop runs
//! for dev.
//!
//! `--adapter DIR` takes a folder `rupantor train` wrote (OUT, or one iteration's OUT/iterK):
//! the PEFT adapter in it, and the base model and settings from the run's `run.toml` (in DIR,
//! else its parent). Without a `run.toml` the base is the adapter's
//! `base_model_name_or_path`. `--config` and flags override the run's settings.
//!
//! Outputs, each written atomically:
//!
//! * `--out FILE`: the task's `submission.json` for a `.json` name, else predictions JSONL
//!   (`{"id", "response", "raw"?}`);
//! * default with `--adapter`: `DIR/{split}/submission.json` and `DIR/{split}/predictions.jsonl`;
//!   without: `out/generate/{split}.jsonl`.
//!
//! A split whose problems carry all their asserts (trial, dev) is also scored in the sandbox:
//! pass@1 and the verdict classes are printed and the verdicts written beside the output
//! (`verdicts.jsonl`, or `{stem}.verdicts.jsonl` for an `--out` file).
//!
//! The inference strategies of design §7 (`rupantor_pipeline::strategy`) are flags, each
//! ablatable, and keys of a `[strategies]` config table: `--fewshot K` (TF-IDF-retrieved
//! solved problems as earlier turns, from the run's `pool.jsonl` with `--adapter`, else the
//! trial split, or `--examples`), `--repair N` (re-prompt failing programs with their verdict,
//! trace and visible asserts), `--review`, `--translate` (glossary-guided, `--glossary`).
//! With any of them the visible-assert pass rate is printed beside the full one, and the
//! strategies' figures go to `strategies.json` (`{stem}.strategies.json` for an `--out` file).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use rupantor_data::Problem;
use rupantor_model::{Gemma, Tokenizer};
use rupantor_pipeline::pool::read_pool;
use rupantor_pipeline::{
    check_job, generate_with_strategies, verify_programs, write_outputs, write_predictions,
    write_verdicts, ExamplePool, GenSettings, Generated, Glossary, Strategies, StrategyJob,
    StrategyRun, VerifySettings,
};
use rupantor_train::adapter::AdapterConfig;
use rupantor_train::fsutil::write_atomic;
use rupantor_train::{BaseFormat, LoraModel};

use crate::model_arg::{self, ModelArgs, ModelSettings, Quant};
use crate::run_config::RunConfig;
use crate::train::{load_tokenizer, RUN_FILE};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A folder `rupantor train` wrote (OUT or OUT/iterK): generate with its LoRA adapter on
    /// the base model its run.toml names.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// A TOML preset (configs/*.toml); flags override its [model] and [generation] tables.
    /// With --adapter: the run's run.toml unless given.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Data folder (default: $RUPANTOR_DATA, then data/blp25).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Split: trial, dev, test, or a problems file (.jsonl/.json/.csv).
    #[arg(long, default_value = "dev")]
    pub split: String,
    /// Only the first N problems of the split.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Output: JSONL {"id","response","raw"?}, or the task's submission.json form when the
    /// name ends in .json [default: DIR/{split}/submission.json with --adapter, else
    /// out/generate/{split}.jsonl].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Tokens to generate per problem at most [default: 512].
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Sampling temperature; 0 is greedy [default: 0].
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Nucleus sampling mass [default: 1].
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Sampling seed [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Prompts per batch [default: 4].
    #[arg(long)]
    pub batch: Option<usize>,
    /// Put the problem's asserts into the prompt [default: on].
    #[arg(long, value_enum)]
    pub visible_tests: Option<OnOff>,
    /// With visible tests: only the first N asserts (the test split shows one) [default: all].
    #[arg(long, value_name = "N")]
    pub max_visible_tests: Option<usize>,
    /// Parallel sandbox workers when scoring (default: the cores available).
    #[arg(short = 'j', long = "jobs")]
    pub jobs: Option<usize>,
    /// Retrieve the K most similar solved problems (TF-IDF) as few-shot turns [default: 0].
    #[arg(long, value_name = "K")]
    pub fewshot: Option<usize>,
    /// Where few-shot examples come from: a split name or problems file with responses, or a
    /// pool.jsonl [default: the adapter run's pool.jsonl, else the trial split].
    #[arg(long, value_name = "SPLIT|FILE")]
    pub examples: Option<String>,
    /// Up to N repair rounds for programs failing their visible asserts [default: 0].
    #[arg(long, value_name = "N")]
    pub repair: Option<usize>,
    /// A reviewer pass over passing programs; a rewrite is kept only if it still passes.
    #[arg(long)]
    pub review: bool,
    /// Have the model translate each instruction to English (glossary-guided) and add the
    /// translation to the prompt.
    #[arg(long)]
    pub translate: bool,
    /// The glossary for --translate [default: the built-in copy of configs/glossary.toml].
    #[arg(long, value_name = "FILE")]
    pub glossary: Option<PathBuf>,
    /// Repair against all of a dev problem's asserts rather than only its first (for the
    /// loop's own use: the dev score then no longer judges on unseen asserts).
    #[arg(long)]
    pub repair_all_dev_asserts: bool,
}

/// Flags over the config's `[strategies]` table.
fn strategies(args: &GenerateArgs, cfg: &RunConfig) -> Result<Strategies> {
    let mut s = cfg.strategies.clone();
    if let Some(k) = args.fewshot {
        s.fewshot = k;
    }
    if let Some(n) = args.repair {
        s.repair = n;
    }
    s.review |= args.review;
    s.translate |= args.translate;
    s.repair_on_all_dev_asserts |= args.repair_all_dev_asserts;
    s.validate()?;
    Ok(s)
}

/// The few-shot pool: `--examples`, else the adapter run's `pool.jsonl`, else trial.
fn example_pool(
    args: &GenerateArgs,
    data_dir: &Path,
    run_file: Option<&Path>,
) -> Result<ExamplePool> {
    let pool_file = |p: &Path| p.file_name().is_some_and(|n| n == "pool.jsonl");
    let source = match (&args.examples, run_file) {
        (Some(e), _) => e.clone(),
        (None, Some(run)) if run.with_file_name("pool.jsonl").is_file() => {
            run.with_file_name("pool.jsonl").display().to_string()
        }
        (None, _) => "trial".to_string(),
    };
    let pool = if pool_file(Path::new(&source)) {
        ExamplePool::from_pool(&read_pool(Path::new(&source))?)
    } else {
        let problems = rupantor_data::load_split(data_dir, &source)
            .with_context(|| format!("few-shot examples {source:?}"))?;
        ExamplePool::from_problems(&split_name(&source), &problems)
    };
    if pool.is_empty() {
        bail!("few-shot examples {source:?}: no solved problems (none has a response)");
    }
    eprintln!(
        "generate: few-shot examples from {source} ({} solved problems)",
        pool.len()
    );
    Ok(pool)
}

/// Flags over the config's `[generation]` table (whose keys left out are the defaults).
fn gen_settings(args: &GenerateArgs, cfg: &RunConfig) -> Result<GenSettings> {
    let mut s = cfg.generation.clone();
    if let Some(v) = args.max_new_tokens {
        s.max_new_tokens = v;
    }
    if let Some(v) = args.temperature {
        s.temperature = v;
    }
    if let Some(v) = args.top_p {
        s.top_p = v;
    }
    if let Some(v) = args.seed {
        s.seed = v;
    }
    if let Some(v) = args.batch {
        s.batch = v;
    }
    if let Some(v) = args.visible_tests {
        s.visible_tests = v == OnOff::On;
    }
    if let Some(v) = args.max_visible_tests {
        s.max_visible_tests = Some(v);
    }
    s.progress = true;
    s.validate()?;
    Ok(s)
}

/// The `run.toml` of a trained folder: in it, or in its parent (an iteration folder).
fn run_file_of(adapter: &Path) -> Option<PathBuf> {
    [Some(adapter), adapter.parent()]
        .into_iter()
        .flatten()
        .map(|d| d.join(RUN_FILE))
        .find(|p| p.is_file())
}

/// The split's name for file names: `dev`, or a problems file's stem.
fn split_name(split: &str) -> String {
    Path::new(split)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "predictions".into())
}

/// Where the outputs go.
#[derive(Debug, Clone, PartialEq)]
struct OutputPlan {
    /// `--out`, or the default.
    main: PathBuf,
    /// Predictions JSONL beside a default `submission.json`.
    predictions: Option<PathBuf>,
    verdicts: PathBuf,
    /// The strategies' figures, when any strategy ran.
    strategies: PathBuf,
}

fn output_plan(out: Option<&Path>, adapter: Option<&Path>, split: &str) -> OutputPlan {
    let name = split_name(split);
    match (out, adapter) {
        (Some(path), _) => {
            let stem = path
                .file_stem()
                .map_or("predictions".into(), |s| s.to_string_lossy().into_owned());
            OutputPlan {
                main: path.to_path_buf(),
                predictions: None,
                verdicts: path.with_file_name(format!("{stem}.verdicts.jsonl")),
                strategies: path.with_file_name(format!("{stem}.strategies.json")),
            }
        }
        (None, Some(dir)) => {
            let dir = dir.join(&name);
            OutputPlan {
                main: dir.join("submission.json"),
                predictions: Some(dir.join("predictions.jsonl")),
                verdicts: dir.join("verdicts.jsonl"),
                strategies: dir.join("strategies.json"),
            }
        }
        (None, None) => {
            let main = PathBuf::from("out/generate").join(format!("{name}.jsonl"));
            OutputPlan {
                verdicts: main.with_file_name(format!("{name}.verdicts.jsonl")),
                strategies: main.with_file_name(format!("{name}.strategies.json")),
                main,
                predictions: None,
            }
        }
    }
}

/// The model generation runs on: a plain inference load, or the base with an adapter.
enum Loaded {
    Base(model_arg::LoadedModel),
    Adapted {
        model: LoraModel,
        tokenizer: Tokenizer,
    },
}

impl Loaded {
    fn gemma(&self) -> &Gemma {
        match self {
            Loaded::Base(m) => &m.model,
            Loaded::Adapted { model, .. } => model.model(),
        }
    }

    fn tokenizer(&self) -> &Tokenizer {
        match self {
            Loaded::Base(m) => &m.tokenizer,
            Loaded::Adapted { tokenizer, .. } => tokenizer,
        }
    }
}

fn load_adapted(settings: &ModelSettings, adapter: &Path) -> Result<Loaded> {
    let path = model_arg::resolve_model(&settings.model)?;
    let tokenizer = load_tokenizer(&path)?;
    let dtype = settings.dtype.on(settings.device)?;
    let device = model_arg::device(settings.device)?;
    let base = match settings.quant {
        Quant::Nf4 => BaseFormat::Nf4,
        Quant::None => BaseFormat::Dense,
    };
    let t0 = std::time::Instant::now();
    let model = LoraModel::load_with_adapter(&path, adapter, &device, dtype, base)
        .with_context(|| format!("--adapter {}", adapter.display()))?;
    model.set_training(false);
    eprintln!(
        "generate: {} with the adapter in {} (r {}), loaded in {:.1}s",
        path.display(),
        adapter.display(),
        model.spec().lora.rank,
        t0.elapsed().as_secs_f64()
    );
    Ok(Loaded::Adapted { model, tokenizer })
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let config_path = match (&args.config, &args.adapter) {
        (Some(c), _) => Some(c.clone()),
        (None, Some(dir)) => {
            if !dir.is_dir() {
                bail!("--adapter {}: no such folder", dir.display());
            }
            run_file_of(dir)
        }
        (None, None) => None,
    };
    let cfg = RunConfig::load(config_path.as_deref())?;
    let mut settings = cfg.model_settings(&args.model);
    if let (Some(dir), None, None) = (&args.adapter, &config_path, &args.model.model) {
        // No run.toml: the base the adapter records.
        let adapter_cfg = AdapterConfig::load(dir)?;
        settings.model = adapter_cfg.base_model.with_context(|| {
            format!(
                "--adapter {}: no {RUN_FILE} here or in the parent folder, and \
                 adapter_config.json names no base_model_name_or_path; pass --model",
                dir.display()
            )
        })?;
    }
    let gen = gen_settings(&args, &cfg)?;
    let strategies = strategies(&args, &cfg)?;
    let data_dir = rupantor_data::data_dir(args.data.as_deref());
    let mut problems = rupantor_data::load_split(&data_dir, &args.split)
        .with_context(|| format!("loading split {:?}", args.split))?;
    if let Some(n) = args.limit {
        problems.truncate(n);
    }
    let plan = output_plan(args.out.as_deref(), args.adapter.as_deref(), &args.split);
    let verify = VerifySettings {
        workers: args.jobs.unwrap_or(cfg.sandbox.workers),
        ..cfg.sandbox.clone()
    };
    let run_file = args.adapter.as_deref().and_then(run_file_of);
    let examples = match strategies.fewshot {
        0 => None,
        _ => Some(example_pool(&args, &data_dir, run_file.as_deref())?),
    };
    let glossary = args.glossary.as_deref().map(Glossary::load).transpose()?;
    let split = split_name(&args.split);
    let job = StrategyJob {
        split: &split,
        problems: &problems,
        strategies: &strategies,
        generation: &gen,
        sandbox: &verify,
        examples: examples.as_ref(),
        glossary: glossary.as_ref(),
        // A scored split also reports the pass rate on the asserts the prompt showed.
        score_visible: scores(&args.split),
    };
    // Before the model load: a missing pool or an unusable sandbox fails fast.
    check_job(&job)?;

    let loaded = match &args.adapter {
        Some(dir) => load_adapted(&settings, dir)?,
        None => {
            let m = model_arg::load(&settings)?;
            eprintln!(
                "generate: {} ({}) loaded in {:.1}s",
                m.path.display(),
                m.form(settings.quant),
                m.load_secs
            );
            Loaded::Base(m)
        }
    };
    eprintln!(
        "generate: {} problems from {}; {}; strategies: {}",
        problems.len(),
        args.split,
        gen.describe(),
        strategies.describe()
    );
    // With every strategy off this is plain `generate_programs`.
    let run = generate_with_strategies(loaded.gemma(), loaded.tokenizer(), &job)?;
    let generated = run.generated();
    write_all(&plan, &generated)?;
    report(&generated);
    if !strategies.is_plain() || job.score_visible {
        report_strategies(&run, &plan.strategies)?;
    }
    if scores(&args.split) {
        score(&problems, &generated, &verify, &plan.verdicts)?;
    }
    Ok(())
}

/// What the strategies did, and the visible-assert pass rate before and after them (repair
/// can fit the visible assert and still fail the unseen ones: compare with the full score).
fn report_strategies(r: &StrategyRun, path: &Path) -> Result<()> {
    let st = &r.stats;
    let rate = |s: Option<&rupantor_exec::Score>| {
        s.map_or("-".to_string(), |s| {
            format!("{:.4} ({}/{})", s.pass_at_1(), s.passed, s.n)
        })
    };
    println!(
        "visible asserts pass@1: {} before repair/review, {} after",
        rate(st.visible_before.as_ref()),
        rate(st.visible.as_ref())
    );
    println!(
        "strategies: {} translated, {} few-shot examples ({} dropped to fit), {} entered \
         repair, {} repaired in {} rounds, review kept {} / rejected {} / unchanged {}, {} \
         prompts too long; {} sandbox runs",
        st.translated,
        st.fewshot_examples,
        st.fewshot_dropped,
        st.entered_repair,
        st.repaired,
        st.repair_rounds,
        st.review_kept,
        st.review_rejected,
        st.review_unchanged,
        st.too_long,
        st.sandbox_runs
    );
    let mut text = serde_json::to_string_pretty(&st.to_json())?;
    text.push('\n');
    write_atomic(path, text.as_bytes())?;
    println!("wrote {}", path.display());
    Ok(())
}

/// Named splits whose problems hold every assert they are judged on.
fn scores(split: &str) -> bool {
    matches!(split, "dev" | "trial")
}

fn write_all(plan: &OutputPlan, g: &Generated) -> Result<()> {
    write_outputs(&plan.main, &g.outputs)?;
    println!(
        "wrote {} ({} problems)",
        plan.main.display(),
        g.outputs.len()
    );
    if let Some(p) = &plan.predictions {
        write_predictions(p, &g.outputs)?;
        println!("wrote {}", p.display());
    }
    Ok(())
}

fn report(g: &Generated) {
    eprintln!(
        "generate: {} tokens in {:.1}s ({:.1} tokens/s){}",
        g.tokens,
        g.secs,
        g.tokens_per_sec(),
        if g.cut > 0 {
            format!(", {} cut at max_new_tokens", g.cut)
        } else {
            String::new()
        }
    );
}

fn score(
    problems: &[Problem],
    g: &Generated,
    verify: &VerifySettings,
    verdicts_path: &Path,
) -> Result<()> {
    verify.ensure_usable()?;
    let programs: Vec<String> = g.outputs.iter().map(|o| o.response.clone()).collect();
    let v = verify_programs(problems, &programs, verify, true)?;
    let ids: Vec<u64> = problems.iter().map(|p| p.id).collect();
    write_verdicts(verdicts_path, &ids, &v.verdicts)?;
    println!("wrote {}", verdicts_path.display());
    crate::eval::print_score(&mut std::io::stdout().lock(), &v.score)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_follow_the_adapter_folder_or_the_split() {
        let p = output_plan(None, Some(Path::new("out/r32")), "test");
        assert_eq!(p.main, PathBuf::from("out/r32/test/submission.json"));
        assert_eq!(
            p.predictions,
            Some(PathBuf::from("out/r32/test/predictions.jsonl"))
        );
        assert_eq!(p.verdicts, PathBuf::from("out/r32/test/verdicts.jsonl"));
        let p = output_plan(None, None, "/tmp/mine.jsonl");
        assert_eq!(p.main, PathBuf::from("out/generate/mine.jsonl"));
        assert_eq!(
            p.verdicts,
            PathBuf::from("out/generate/mine.verdicts.jsonl")
        );
        let p = output_plan(Some(Path::new("x/sub.json")), Some(Path::new("o")), "dev");
        assert_eq!(p.main, PathBuf::from("x/sub.json"));
        assert_eq!(p.predictions, None);
        assert_eq!(p.verdicts, PathBuf::from("x/sub.verdicts.jsonl"));
    }

    #[test]
    fn run_file_is_found_in_the_folder_or_its_parent() {
        let dir = tempfile::tempdir().unwrap();
        let iter = dir.path().join("iter1");
        std::fs::create_dir_all(&iter).unwrap();
        assert_eq!(run_file_of(&iter), None);
        std::fs::write(dir.path().join(RUN_FILE), "").unwrap();
        assert_eq!(run_file_of(&iter), Some(dir.path().join(RUN_FILE)));
        std::fs::write(iter.join(RUN_FILE), "").unwrap();
        assert_eq!(run_file_of(&iter), Some(iter.join(RUN_FILE)));
    }
}
