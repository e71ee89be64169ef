//! `OUT/report.md`: per iteration the pool size, best validation loss, dev pass@1, the
//! verdict classes and the wall time of each stage; then the command and the resolved config.

use std::fmt::Write;

use rupantor_exec::VerdictClass;

use crate::pool::{PoolEntry, Source};
use crate::selfimprove::{IterationReport, LoopConfig, Paths};

fn opt_loss(r: &IterationReport) -> String {
    match (r.train.best_val_loss, r.train.best_step) {
        (Some(l), Some(s)) => format!("{l:.4} (step {s})"),
        _ => "-".into(),
    }
}

/// "dev 1, 2, 3".
fn ids(ids: &[u64]) -> String {
    let list: Vec<String> = ids.iter().map(u64::to_string).collect();
    format!("dev {}", list.join(", "))
}

fn steps(r: &IterationReport) -> String {
    let mut s = format!("{}/{}", r.train.steps, r.train.total_steps);
    if r.train.early_stopped {
        s.push_str(" early stop");
    }
    if let Some(from) = r.train.resumed_from {
        let _ = write!(s, ", resumed at {from}");
    }
    s
}

/// The report's text. `wall_s` is the whole run's time once it finished (`None` while it is
/// still going: the report is rewritten after every iteration).
/// Once dev programs are in the pool, the pass rate on the dev problems the adapter was not
/// trained on: `; unseen 0.0076 (3/395)`. Empty while the pool holds no dev problem.
fn unseen_pass(r: &IterationReport) -> String {
    if r.pool_dev == 0 {
        return String::new();
    }
    let n = r.dev.n.saturating_sub(r.pool_dev);
    let passed = r.dev.passed.saturating_sub(r.fold.already_in_pool.len());
    format!(
        "; unseen {:.4} ({passed}/{n})",
        passed as f64 / n.max(1) as f64
    )
}

pub fn render_report(
    cfg: &LoopConfig,
    paths: &Paths,
    base: &str,
    iterations: &[IterationReport],
    pool: &[PoolEntry],
    wall_s: Option<f64>,
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# rupantor self-improvement run\n");
    let _ = writeln!(
        s,
        "{} of {} iteration(s){}. Base model: `{base}`. Data: `{}` (trial and dev only; the \
         test split is never read). Output: `{}`.\n",
        iterations.len(),
        cfg.iterations,
        match wall_s {
            Some(w) => format!(" finished, {w:.1} s in this process"),
            None => ", still running".into(),
        },
        paths.data_dir.display(),
        paths.out_dir.display(),
    );
    let _ = writeln!(s, "## Iterations\n");
    let _ = writeln!(
        s,
        "| iter | pool (trial + dev) | steps | best val loss | dev pass@1 | folded | load s | \
         train s | generate s | verify s | total s |"
    );
    let _ = writeln!(s, "|---:|---|---|---:|---|---|---:|---:|---:|---:|---:|");
    for r in iterations {
        let _ = writeln!(
            s,
            "| {}{} | {} ({} + {}) | {} | {} | {:.4} ({}/{}){} | +{} of {} passing → {} | {:.1} | \
             {:.1} | {:.1} | {:.1} | {:.1} |",
            r.iteration,
            match (r.reused, r.carried_from) {
                (true, _) => "*",
                (false, Some(_)) => "=",
                (false, None) => "",
            },
            r.pool_size,
            r.pool_trial,
            r.pool_dev,
            steps(r),
            opt_loss(r),
            r.dev.pass_at_1,
            r.dev.passed,
            r.dev.n,
            unseen_pass(r),
            r.fold.added.len(),
            r.fold.passed,
            r.fold.pool_after,
            r.times.load_s,
            r.times.train_s,
            r.times.generate_s,
            r.times.verify_s,
            r.times.total_s,
        );
    }
    let _ = writeln!(s, "\n## Verdict classes of the dev programs\n");
    let _ = write!(s, "| iter |");
    for c in VerdictClass::ALL {
        let _ = write!(s, " {} |", c.as_str());
    }
    let _ = write!(s, "\n|---:|");
    for _ in VerdictClass::ALL {
        let _ = write!(s, "---:|");
    }
    s.push('\n');
    for r in iterations {
        let _ = write!(s, "| {} |", r.iteration);
        for c in VerdictClass::ALL {
            let _ = write!(
                s,
                " {} |",
                r.dev.by_class.get(c.as_str()).copied().unwrap_or(0)
            );
        }
        s.push('\n');
    }
    let _ = writeln!(s, "\n## Notes\n");
    let _ = writeln!(
        s,
        "- Each iteration trains a fresh adapter from the base on the pool it starts with \
         (`iterK/pool.jsonl`); `folded` counts the dev programs that passed all their asserts \
         and were new to the pool (neither the problem nor the same program text already in \
         it)."
    );
    let _ = writeln!(
        s,
        "- From iteration 2 on, dev pass@1 is measured on a split whose verified programs are \
         in the training pool, so it overstates what the test split will see; `unseen` counts \
         only the dev problems outside the pool the iteration trained on."
    );
    for r in iterations {
        let mut skipped = Vec::new();
        if !r.fold.already_in_pool.is_empty() {
            skipped.push(format!(
                "already in the pool ({})",
                ids(&r.fold.already_in_pool)
            ));
        }
        if !r.fold.duplicate_program.is_empty() {
            skipped.push(format!(
                "duplicate programs ({})",
                ids(&r.fold.duplicate_program)
            ));
        }
        if !skipped.is_empty() {
            let _ = writeln!(
                s,
                "- Iteration {}: passing but not folded: {}.",
                r.iteration,
                skipped.join("; ")
            );
        }
        if r.dev.cut > 0 {
            let _ = writeln!(
                s,
                "- Iteration {}: {} dev program(s) cut at max_new_tokens.",
                r.iteration, r.dev.cut
            );
        }
        if r.train.truncated > 0 {
            let _ = writeln!(
                s,
                "- Iteration {}: {} pool problem(s) cut to max_len.",
                r.iteration, r.train.truncated
            );
        }
    }
    for r in iterations {
        if let Some(from) = r.carried_from {
            let _ = writeln!(
                s,
                "- Iteration {} (=) carries iteration {from}'s results: nothing was folded in \
                 between, so its pool, and with deterministic training and generation its \
                 adapter and programs, would have been the same.",
                r.iteration
            );
        }
    }
    if iterations.iter().any(|r| r.reused) {
        let _ = writeln!(
            s,
            "- Iterations marked * were finished by an earlier run and kept (their `DONE` \
             digest matched); their times are that run's."
        );
    }
    let dev_n = pool.iter().filter(|e| e.source == Source::Dev).count();
    let _ = writeln!(
        s,
        "- Final pool: {} problems ({} trial + {dev_n} dev), `pool.jsonl`.",
        pool.len(),
        pool.len() - dev_n
    );
    let _ = writeln!(s, "\n## Command\n\n```\n{}\n```\n", cfg.command.trim_end());
    let _ = writeln!(
        s,
        "## Resolved config\n\n```toml\n{}\n```",
        cfg.resolved_config.trim_end()
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selfimprove::{DevSummary, FoldSummary, StageTimes, TrainSummary};
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    fn iteration(k: usize, passed: usize, reused: bool) -> IterationReport {
        IterationReport {
            iteration: k,
            digest: "d".into(),
            pool_size: 10 + k,
            pool_trial: 10,
            pool_dev: k,
            train: TrainSummary {
                steps: 5,
                total_steps: 6,
                steps_per_epoch: 2,
                resumed_from: (k == 2).then_some(3),
                early_stopped: true,
                best_val_loss: Some(0.123_456),
                best_step: Some(4),
                last_train_loss: Some(0.2),
                train_examples: 9,
                val_examples: 1,
                truncated: 0,
                tokens: 100,
            },
            dev: DevSummary {
                n: 4,
                passed,
                pass_at_1: passed as f64 / 4.0,
                by_class: BTreeMap::from([
                    ("pass".to_string(), passed),
                    ("syntax".to_string(), 4 - passed),
                ]),
                tokens: 40,
                cut: 1,
            },
            fold: FoldSummary {
                passed,
                added: vec![1],
                already_in_pool: if k == 2 { vec![7] } else { vec![] },
                duplicate_program: vec![3],
                pool_after: 11 + k,
            },
            times: StageTimes {
                load_s: 0.5,
                train_s: 12.34,
                generate_s: 3.0,
                verify_s: 1.0,
                fold_s: 0.0,
                total_s: 16.76,
            },
            reused,
            carried_from: None,
        }
    }

    #[test]
    fn report_has_the_table_classes_command_and_config() {
        let cfg = LoopConfig {
            iterations: 2,
            command: "rupantor train --rank 8 --iter 2".into(),
            resolved_config: "[train]\nrank = 8\n".into(),
            ..LoopConfig::default()
        };
        let paths = Paths {
            data_dir: PathBuf::from("data/blp25"),
            out_dir: PathBuf::from("out/r8"),
        };
        let text = render_report(
            &cfg,
            &paths,
            "/m/gemma.gguf",
            &[iteration(1, 1, true), iteration(2, 3, false)],
            &[],
            Some(20.0),
        );
        assert!(text.contains("| 1* | 11 (10 + 1) | 5/6 early stop | 0.1235 (step 4) | 0.2500 (1/4); unseen 0.3333 (1/3) | +1 of 1 passing → 12 | 0.5 | 12.3 | 3.0 | 1.0 | 16.8 |"), "{text}");
        // Iteration 2 trained on 2 dev problems, one of which passes again: 2 of the other 2.
        assert!(
            text.contains("| 0.7500 (3/4); unseen 1.0000 (2/2) |"),
            "{text}"
        );
        assert!(text.contains("5/6 early stop, resumed at 3"), "{text}");
        assert!(
            text.contains("| 2 | 3 | 1 | 0 | 0 | 0 | 0 | 0 | 0 | 0 | 0 |"),
            "{text}"
        );
        assert!(text.contains("```\nrupantor train --rank 8 --iter 2\n```"));
        assert!(text.contains("```toml\n[train]\nrank = 8\n```"));
        assert!(
            text.contains("passing but not folded: duplicate programs (dev 3)."),
            "{text}"
        );
        assert!(text.contains("marked * were finished by an earlier run"));
        assert!(text.contains("finished, 20.0 s"));
    }
}
