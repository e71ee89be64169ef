//! `rupantor eval`: runs predictions against a split's asserts in the sandbox and
//! reports pass@1 with the failure classes.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use rupantor_exec::{
    extract_code, pair_predictions, protections, read_predictions, Score, Verdict, VerdictClass,
};
use rupantor_pipeline::{verify_programs, VerifySettings};

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Predictions: the task's submission.json (`[{"id", "response"}]`) or JSONL, one
    /// `{"id", "response"}` a line. Fenced responses (```python ... ```) are unwrapped.
    #[arg(long)]
    pub predictions: PathBuf,
    /// Split: trial, dev, test, or a problems file (.jsonl/.json/.csv).
    #[arg(long, default_value = "dev")]
    pub split: String,
    /// Data folder (default: $RUPANTOR_DATA, then data/blp25).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Write DIR/verdicts.jsonl: {"id", "passed", "class", "trace"} per predicted problem.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Make the last stdout line one JSON object {"n", "passed", "pass@1", "by_class"}.
    #[arg(long)]
    pub json: bool,
    /// Parallel sandbox workers (default: the cores available).
    #[arg(short = 'j', long = "jobs")]
    pub jobs: Option<usize>,
    /// Wall-time and CPU-time limit per program, in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,
}

pub fn run(args: EvalArgs) -> Result<()> {
    let data_dir = rupantor_data::data_dir(args.data.as_deref());
    let problems = rupantor_data::load_split(&data_dir, &args.split)
        .with_context(|| format!("loading split {:?}", args.split))?;
    let predictions = read_predictions(&args.predictions)?;
    let ids: Vec<u64> = problems.iter().map(|p| p.id).collect();
    let (paired, unknown) = pair_predictions(&ids, predictions);
    if !unknown.is_empty() {
        eprintln!(
            "warning: {} prediction(s) for ids not in the split, ignored: {}",
            unknown.len(),
            list_ids(&unknown)
        );
    }

    let settings = VerifySettings {
        timeout_s: args.timeout.max(0.1),
        workers: args.jobs.unwrap_or(0),
        ..VerifySettings::default()
    };
    settings.ensure_usable()?;
    let prot = protections(&settings.sandbox());
    let workers = settings.workers();
    let mut job_ids = Vec::new();
    let mut job_problems = Vec::new();
    let mut programs = Vec::new();
    for ((id, response), problem) in paired.iter().zip(&problems) {
        if let Some(response) = response {
            job_ids.push(*id);
            job_problems.push(problem.clone());
            programs.push(extract_code(response));
        }
    }
    let verdicts = verify_programs(&job_problems, &programs, &settings, true)?.verdicts;

    let by_id: std::collections::HashMap<u64, &Verdict> =
        job_ids.iter().copied().zip(&verdicts).collect();
    let score = Score::new(ids.iter().map(|id| (*id, by_id.get(id).copied())));

    if let Some(dir) = &args.out {
        let path = dir.join("verdicts.jsonl");
        rupantor_pipeline::write_verdicts(&path, &job_ids, &verdicts)?;
        eprintln!("wrote {}", path.display());
    }

    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{} on {} ({} problems, {} workers, sandbox: {})",
        args.predictions.display(),
        args.split,
        score.n,
        workers,
        if prot.namespaces {
            "namespaces"
        } else {
            "fallback without namespaces"
        }
    )?;
    print_score(&mut out, &score)?;
    if args.json {
        writeln!(out, "{}", score.to_json())?;
    }
    Ok(())
}

/// pass@1, then a row per verdict class that occurred (and the missing predictions).
pub fn print_score(out: &mut impl Write, score: &Score) -> Result<()> {
    writeln!(
        out,
        "pass@1: {:.4} ({}/{})",
        score.pass_at_1(),
        score.passed,
        score.n
    )?;
    writeln!(out, "{:<16} {:>6} {:>7}", "class", "count", "share")?;
    for class in VerdictClass::ALL {
        let count = score.by_class.get(&class).copied().unwrap_or(0);
        if count > 0 {
            writeln!(
                out,
                "{:<16} {:>6} {:>6.1}%",
                class.as_str(),
                count,
                share(count, score.n)
            )?;
        }
    }
    if !score.missing.is_empty() {
        writeln!(
            out,
            "{:<16} {:>6} {:>6.1}%",
            "missing",
            score.missing.len(),
            share(score.missing.len(), score.n)
        )?;
        writeln!(
            out,
            "missing predictions (counted as failures): {}",
            list_ids(&score.missing)
        )?;
    }
    Ok(())
}

fn share(count: usize, n: usize) -> f64 {
    if n == 0 {
        0.0
    } else {
        100.0 * count as f64 / n as f64
    }
}

fn list_ids(ids: &[u64]) -> String {
    ids.iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
