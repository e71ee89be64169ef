//! `rupantor bench sandbox`: sandboxed programs per second over the trial reference
//! answers, beside an unsafe in-process `exec` scorer (scripts/bench/inprocess_exec.py)
//! run on the same programs in the same invocation, and the ratio.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use rupantor_exec::{protections, run_many, run_program, SandboxConfig};

/// The baseline scorer, embedded so the command works from any directory.
const INPROCESS_SCRIPT: &str = include_str!("../../../scripts/bench/inprocess_exec.py");

#[derive(Args, Debug)]
pub struct BenchSandboxArgs {
    /// Data folder (default: $RUPANTOR_DATA, then data/blp25).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Split whose reference answers are the programs (needs `response`).
    #[arg(long, default_value = "trial")]
    pub split: String,
    /// Repeat the programs until there are at least this many.
    #[arg(long, default_value_t = 400)]
    pub min_programs: usize,
    /// Sandbox workers (default: the cores available).
    #[arg(short = 'j', long = "jobs")]
    pub jobs: Option<usize>,
    /// Also time this many programs with a fresh sandbox worker each (no pool); 0 skips.
    #[arg(long, default_value_t = 20)]
    pub fresh: usize,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: BenchSandboxArgs) -> Result<()> {
    let data_dir = rupantor_data::data_dir(args.data.as_deref());
    let problems = rupantor_data::load_split(&data_dir, &args.split)
        .with_context(|| format!("loading split {:?}", args.split))?;
    let base: Vec<(String, Vec<String>)> = problems
        .iter()
        .filter_map(|p| {
            p.response
                .as_ref()
                .map(|r| (r.clone(), p.test_list.clone()))
        })
        .collect();
    if base.is_empty() {
        bail!(
            "split {:?} has no reference answers (`response`) to run",
            args.split
        );
    }
    let repeats = args.min_programs.max(1).div_ceil(base.len());
    let jobs: Vec<(String, Vec<String>)> = base
        .iter()
        .cycle()
        .take(base.len() * repeats)
        .cloned()
        .collect();
    let cfg = SandboxConfig::default();
    let workers = args
        .jobs
        .unwrap_or_else(rupantor_exec::default_workers)
        .max(1);
    let prot = protections(&cfg);

    // the unsafe baseline: one interpreter, exec per program, jobs on its stdin
    let mut input = String::new();
    for (program, asserts) in &jobs {
        input.push_str(&serde_json::json!({"program": program, "asserts": asserts}).to_string());
        input.push('\n');
    }
    let mut child = Command::new(&cfg.python)
        .args(["-c", INPROCESS_SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| {
            format!(
                "running the in-process scorer with {}",
                cfg.python.display()
            )
        })?;
    // it reads all its input before it writes anything
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(input.as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!("the in-process scorer failed: {}", output.status);
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let baseline: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .context("reading the in-process scorer's result")?;
    let inproc_rate = baseline["programs_per_s"].as_f64().unwrap_or(0.0);
    let inproc_passed = baseline["passed"].as_u64().unwrap_or(0) as usize;

    // the sandbox pool, worker start-up included
    let start = Instant::now();
    let verdicts = run_many(&cfg, &jobs, workers, |_| {});
    let pool_secs = start.elapsed().as_secs_f64();
    let pool_rate = jobs.len() as f64 / pool_secs;
    let pool_passed = verdicts.iter().filter(|v| v.passed).count();
    let flags = baseline["passed_flags"].as_array();
    let disagree = flags.map_or(0, |fl| {
        fl.iter()
            .zip(&verdicts)
            .filter(|(a, v)| a.as_bool() != Some(v.passed))
            .count()
    });

    // context: a fresh sandbox (interpreter start-up and namespaces) per program
    let fresh_n = args.fresh.min(jobs.len());
    let fresh_rate = if fresh_n > 0 {
        let start = Instant::now();
        for (program, asserts) in &jobs[..fresh_n] {
            run_program(&cfg, program, asserts);
        }
        Some(fresh_n as f64 / start.elapsed().as_secs_f64())
    } else {
        None
    };

    let ratio = if inproc_rate > 0.0 {
        pool_rate / inproc_rate
    } else {
        0.0
    };
    println!(
        "sandbox bench: {} programs ({} {} references x{}), {} workers, {} cores, namespaces: {}",
        jobs.len(),
        base.len(),
        args.split,
        repeats,
        workers,
        rupantor_exec::default_workers(),
        if prot.namespaces {
            "yes"
        } else {
            "no (fallback)"
        }
    );
    println!(
        "in-process exec (unsafe):      {inproc_rate:9.1} programs/s  ({inproc_passed} passed)"
    );
    println!("sandbox pool (isolated):       {pool_rate:9.1} programs/s  ({pool_passed} passed, {pool_secs:.2} s)");
    println!("ratio sandbox / in-process:    {ratio:9.3}x");
    if let Some(rate) = fresh_rate {
        println!(
            "fresh sandbox per program:     {rate:9.1} programs/s  ({fresh_n} programs, no pool)"
        );
    }
    if disagree > 0 {
        println!("note: {disagree} program(s) passed in one scorer and failed in the other");
    }
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "programs": jobs.len(),
                "workers": workers,
                "namespaces": prot.namespaces,
                "inprocess_programs_per_s": inproc_rate,
                "sandbox_programs_per_s": pool_rate,
                "ratio": ratio,
                "fresh_programs_per_s": fresh_rate,
                "disagreements": disagree,
            })
        );
    }
    Ok(())
}
