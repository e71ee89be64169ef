//! Programs against their asserts in the sandbox (design §6), with a progress bar: step 4 of
//! the loop, and what `generate --split dev` scores with.

use std::path::Path;

use anyhow::{ensure, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rupantor_data::Problem;
use rupantor_exec::{protections, run_many, SandboxConfig, Score, Verdict};
use rupantor_train::fsutil::write_atomic;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Sandbox settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VerifySettings {
    /// Wall-time and CPU-time limit per program, seconds.
    pub timeout_s: f64,
    /// Address-space limit per program, MiB.
    pub memory_mb: u64,
    /// Parallel sandbox workers; 0: the cores available. Not part of any digest.
    pub workers: usize,
}

impl Default for VerifySettings {
    fn default() -> Self {
        VerifySettings {
            timeout_s: 10.0,
            memory_mb: 2048,
            workers: 0,
        }
    }
}

impl VerifySettings {
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.timeout_s > 0.0 && self.timeout_s.is_finite(),
            "the sandbox timeout must be > 0 s"
        );
        ensure!(self.memory_mb >= 16, "the sandbox memory limit is < 16 MiB");
        Ok(())
    }

    pub fn sandbox(&self) -> SandboxConfig {
        let limit = std::time::Duration::from_secs_f64(self.timeout_s);
        SandboxConfig {
            wall_time: limit,
            cpu_time: limit,
            memory_bytes: self.memory_mb << 20,
            ..SandboxConfig::default()
        }
    }

    pub fn workers(&self) -> usize {
        match self.workers {
            0 => rupantor_exec::default_workers(),
            n => n,
        }
    }

    /// Fails when the sandbox cannot run programs on this machine (then nothing could pass).
    pub fn ensure_usable(&self) -> Result<()> {
        let prot = protections(&self.sandbox());
        ensure!(
            prot.usable,
            "the sandbox cannot run here, so no program could be verified: {}",
            prot.why_not.unwrap_or_default()
        );
        Ok(())
    }
}

/// Verdicts in problem order, and pass@1.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    pub verdicts: Vec<Verdict>,
    pub score: Score,
}

/// Runs `programs[i]` against all of `problems[i]`'s asserts.
pub fn verify_programs(
    problems: &[Problem],
    programs: &[String],
    settings: &VerifySettings,
    progress: bool,
) -> Result<Verified> {
    settings.validate()?;
    ensure!(
        problems.len() == programs.len(),
        "{} problems but {} programs",
        problems.len(),
        programs.len()
    );
    let jobs: Vec<(String, Vec<String>)> = programs
        .iter()
        .zip(problems)
        .map(|(code, p)| (code.clone(), p.test_list.clone()))
        .collect();
    let bar = ProgressBar::with_draw_target(
        Some(jobs.len() as u64),
        rupantor_train::progress::draw_target(progress),
    );
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix("verify");
    let verdicts = run_many(&settings.sandbox(), &jobs, settings.workers(), |done| {
        bar.set_position(done as u64)
    });
    bar.finish_and_clear();
    let score = Score::new(problems.iter().zip(&verdicts).map(|(p, v)| (p.id, Some(v))));
    Ok(Verified { verdicts, score })
}

/// `verdicts.jsonl` as `rupantor eval --out` writes it: `{"id", "passed", "class", "trace"}`,
/// `ids[i]` the problem of `verdicts[i]`.
pub fn verdicts_jsonl(ids: &[u64], verdicts: &[Verdict]) -> Result<String> {
    ensure!(
        ids.len() == verdicts.len(),
        "{} ids but {} verdicts",
        ids.len(),
        verdicts.len()
    );
    let mut s = String::new();
    for (id, v) in ids.iter().zip(verdicts) {
        let row = json!({"id": id, "passed": v.passed, "class": v.class, "trace": v.trace});
        s.push_str(&serde_json::to_string(&row)?);
        s.push('\n');
    }
    Ok(s)
}

/// Writes [`verdicts_jsonl`] to `path` atomically.
pub fn write_verdicts(path: &Path, ids: &[u64], verdicts: &[Verdict]) -> Result<()> {
    write_atomic(path, verdicts_jsonl(ids, verdicts)?.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rupantor_exec::VerdictClass;

    fn problem(id: u64, tests: &[&str]) -> Problem {
        Problem {
            id,
            instruction: String::new(),
            test_list: tests.iter().map(|t| t.to_string()).collect(),
            response: None,
        }
    }

    #[test]
    fn every_assert_counts() {
        let problems = [
            problem(5, &["assert f(1) == 2", "assert f(2) == 3"]),
            problem(3, &["assert f(1) == 2", "assert f(2) == 4"]),
            problem(9, &["assert g() == 1"]),
        ];
        let programs = [
            "def f(x):\n    return x + 1",
            "def f(x):\n    return x + 1",
            "def g(",
        ]
        .map(String::from);
        let settings = VerifySettings {
            timeout_s: 5.0,
            workers: 2,
            ..VerifySettings::default()
        };
        let v = verify_programs(&problems, &programs, &settings, false).unwrap();
        let classes: Vec<VerdictClass> = v.verdicts.iter().map(|v| v.class).collect();
        assert_eq!(
            classes,
            [
                VerdictClass::Pass,
                VerdictClass::Assertion,
                VerdictClass::Syntax
            ]
        );
        assert_eq!((v.score.n, v.score.passed), (3, 1));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("verdicts.jsonl");
        let ids: Vec<u64> = problems.iter().map(|p| p.id).collect();
        write_verdicts(&path, &ids, &v.verdicts).unwrap();
        let rows: Vec<serde_json::Value> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(rows[0]["id"], 5);
        assert_eq!(rows[1]["class"], "assertion");
        assert_eq!(rows[2]["passed"], false);
        assert!(verify_programs(&problems, &programs[..1], &settings, false).is_err());
        let bad = VerifySettings {
            timeout_s: 0.0,
            ..settings
        };
        assert!(verify_programs(&problems, &programs, &bad, false).is_err());
    }
}
