//! The training pool of the self-improvement loop, with provenance.
//!
//! The pool starts as the trial split (with its reference programs) and grows by the dev
//! programs the loop verified. Rules of the fold (design §1 step 5):
//!
//! * only a program whose verdict passed — every one of the dev problem's asserts ran — is
//!   folded;
//! * a dev problem is in the pool at most once: one folded in an earlier iteration keeps its
//!   first program;
//! * a program whose normalized text ([`normalize_program`]) is already in the pool (a trial
//!   reference or an earlier fold, this iteration's included) is not added again;
//! * only trial and dev problems can be in a pool: [`Source`] has no other value, and the
//!   loop only ever loads those two splits.
//!
//! Trial and dev ids overlap (both count from 1), and the trainer needs one id per problem,
//! so each entry has a `train_id`: the trial id itself, or [`DEV_TRAIN_ID_OFFSET`] + the dev
//! id. Iteration 1 therefore trains on exactly what `rupantor train` trains on (same ids, same
//! validation slice).
//!
//! `pool.jsonl` rows: `{"id", "instruction", "test_list", "response", "source": "trial" |
//! "dev", "iteration" (0: the initial pool), "train_id"}`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use rupantor_data::Problem;
use rupantor_exec::Verdict;
use rupantor_train::fsutil::write_atomic;
use serde::{Deserialize, Serialize};

/// Training ids of dev problems are this plus the dev id.
pub const DEV_TRAIN_ID_OFFSET: u64 = 1_000_000;

/// Where a pool entry comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The trial split's reference program.
    Trial,
    /// A generated program that passed all its dev asserts.
    Dev,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Trial => "trial",
            Source::Dev => "dev",
        }
    }
}

/// One pool row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolEntry {
    /// The problem's id in its split.
    pub id: u64,
    pub instruction: String,
    pub test_list: Vec<String>,
    pub response: String,
    pub source: Source,
    /// 0 for the initial pool, k for a program folded by iteration k.
    pub iteration: usize,
    /// The id the trainer sees (unique over the pool).
    pub train_id: u64,
}

impl PoolEntry {
    /// The problem as the trainer takes it (id = `train_id`).
    pub fn problem(&self) -> Problem {
        Problem {
            id: self.train_id,
            instruction: self.instruction.clone(),
            test_list: self.test_list.clone(),
            response: Some(self.response.clone()),
        }
    }
}

/// A program's text for duplicate detection: line endings unified, trailing whitespace and
/// blank lines dropped.
pub fn normalize_program(code: &str) -> String {
    code.lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

/// What one fold did.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FoldOutcome {
    /// Entries added, in dev order.
    pub added: Vec<PoolEntry>,
    /// Dev programs that passed all their asserts.
    pub passed: usize,
    /// Passed, but the dev problem was folded by an earlier iteration (dev ids).
    pub already_in_pool: Vec<u64>,
    /// Passed, but the same program is in the pool: (dev id, source and id of the entry
    /// that has it).
    pub duplicate_program: Vec<(u64, Source, u64)>,
}

/// The pool; see the module docs.
#[derive(Debug, Clone, Default)]
pub struct Pool {
    entries: Vec<PoolEntry>,
    keys: HashMap<(Source, u64), usize>,
    programs: HashMap<String, (Source, u64)>,
}

impl Pool {
    /// The trial problems with their reference programs (iteration 0).
    pub fn initial(trial: &[Problem]) -> Result<Pool> {
        ensure!(
            !trial.is_empty(),
            "the trial split is empty: nothing to train on"
        );
        let mut pool = Pool::default();
        for p in trial {
            let response = match p.response.as_deref() {
                Some(r) if !r.trim().is_empty() => r.to_string(),
                _ => bail!(
                    "trial problem {} has no reference response; the initial pool holds solved \
                     problems only",
                    p.id
                ),
            };
            ensure!(
                p.id < DEV_TRAIN_ID_OFFSET,
                "trial id {} is not below {DEV_TRAIN_ID_OFFSET}, where dev training ids start",
                p.id
            );
            pool.push(PoolEntry {
                id: p.id,
                instruction: p.instruction.clone(),
                test_list: p.test_list.clone(),
                response,
                source: Source::Trial,
                iteration: 0,
                train_id: p.id,
            })?;
        }
        Ok(pool)
    }

    fn push(&mut self, e: PoolEntry) -> Result<()> {
        let key = (e.source, e.id);
        ensure!(
            !self.keys.contains_key(&key),
            "{} problem {} is in the pool twice",
            e.source.as_str(),
            e.id
        );
        self.keys.insert(key, self.entries.len());
        self.programs
            .entry(normalize_program(&e.response))
            .or_insert(key);
        self.entries.push(e);
        Ok(())
    }

    pub fn entries(&self) -> &[PoolEntry] {
        &self.entries
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries from `source`.
    pub fn count(&self, source: Source) -> usize {
        self.entries.iter().filter(|e| e.source == source).count()
    }

    pub fn contains(&self, source: Source, id: u64) -> bool {
        self.keys.contains_key(&(source, id))
    }

    /// The pool as the trainer takes it (ids are the training ids).
    pub fn training_problems(&self) -> Vec<Problem> {
        self.entries.iter().map(PoolEntry::problem).collect()
    }

    /// Folds the verified programs of iteration `iteration` (see the module docs).
    /// `programs[i]` and `verdicts[i]` belong to `dev[i]`.
    pub fn fold(
        &mut self,
        iteration: usize,
        dev: &[Problem],
        programs: &[String],
        verdicts: &[Verdict],
    ) -> Result<FoldOutcome> {
        ensure!(iteration >= 1, "iterations count from 1");
        ensure!(
            dev.len() == programs.len() && dev.len() == verdicts.len(),
            "{} dev problems, {} programs, {} verdicts",
            dev.len(),
            programs.len(),
            verdicts.len()
        );
        let mut out = FoldOutcome::default();
        for ((p, program), v) in dev.iter().zip(programs).zip(verdicts) {
            if !v.passed {
                continue;
            }
            out.passed += 1;
            if self.contains(Source::Dev, p.id) {
                out.already_in_pool.push(p.id);
                continue;
            }
            if let Some(&(source, id)) = self.programs.get(&normalize_program(program)) {
                out.duplicate_program.push((p.id, source, id));
                continue;
            }
            let e = dev_entry(p, program, iteration)?;
            self.push(e.clone())?;
            out.added.push(e);
        }
        Ok(out)
    }

    /// Re-adds what an earlier run of iteration `iteration` folded (from its
    /// `folded.jsonl`), checking that every row obeys the fold's rules against this pool.
    pub fn replay(&mut self, iteration: usize, rows: &[PoolEntry]) -> Result<()> {
        for e in rows {
            ensure!(
                e.source == Source::Dev && e.iteration == iteration,
                "a row for {} problem {} (iteration {}) among iteration {iteration}'s folds",
                e.source.as_str(),
                e.id,
                e.iteration
            );
            ensure!(
                e.train_id == DEV_TRAIN_ID_OFFSET + e.id,
                "dev problem {}: training id {}",
                e.id,
                e.train_id
            );
            if let Some(&(source, id)) = self.programs.get(&normalize_program(&e.response)) {
                bail!(
                    "dev problem {}'s program is already in the pool ({} problem {id})",
                    e.id,
                    source.as_str()
                );
            }
            self.push(e.clone())?;
        }
        Ok(())
    }
}

fn dev_entry(p: &Problem, program: &str, iteration: usize) -> Result<PoolEntry> {
    let train_id = DEV_TRAIN_ID_OFFSET
        .checked_add(p.id)
        .with_context(|| format!("dev id {} is too large", p.id))?;
    Ok(PoolEntry {
        id: p.id,
        instruction: p.instruction.clone(),
        test_list: p.test_list.clone(),
        response: program.to_string(),
        source: Source::Dev,
        iteration,
        train_id,
    })
}

/// Pool rows as JSONL.
pub fn pool_jsonl(rows: &[PoolEntry]) -> Result<String> {
    let mut s = String::new();
    for r in rows {
        s.push_str(&serde_json::to_string(r)?);
        s.push('\n');
    }
    Ok(s)
}

/// Writes pool rows to `path` atomically.
pub fn write_pool(path: &Path, rows: &[PoolEntry]) -> Result<()> {
    write_atomic(path, pool_jsonl(rows)?.as_bytes())
}

/// Reads pool rows; errors name the file and line.
pub fn read_pool(path: &Path) -> Result<Vec<PoolEntry>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{}:{}", path.display(), i + 1))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rupantor_exec::VerdictClass;
    use std::time::Duration;

    fn problem(id: u64, response: Option<&str>) -> Problem {
        Problem {
            id,
            instruction: format!("problem {id}"),
            test_list: vec![format!("assert f({id})")],
            response: response.map(str::to_string),
        }
    }

    fn verdict(passed: bool) -> Verdict {
        Verdict {
            passed,
            class: if passed {
                VerdictClass::Pass
            } else {
                VerdictClass::Assertion
            },
            trace: String::new(),
            wall: Duration::ZERO,
        }
    }

    #[test]
    fn normalization_ignores_layout_noise_only() {
        assert_eq!(
            normalize_program("def f():  \r\n\n    return 1\n\n"),
            "def f():\n    return 1"
        );
        assert_ne!(
            normalize_program("def f():\n    return 1"),
            normalize_program("def f():\n  return 1")
        );
    }

    #[test]
    fn initial_pool_needs_solved_trial_problems() {
        let pool = Pool::initial(&[problem(1, Some("a = 1")), problem(2, Some("b = 2"))]).unwrap();
        assert_eq!((pool.len(), pool.count(Source::Trial)), (2, 2));
        assert_eq!(pool.training_problems()[1].id, 2);
        let e = Pool::initial(&[problem(1, Some("a")), problem(7, None)]).unwrap_err();
        assert!(e.to_string().contains("trial problem 7"), "{e}");
        assert!(Pool::initial(&[]).is_err());
        assert!(Pool::initial(&[problem(1, Some("a")), problem(1, Some("b"))]).is_err());
    }

    #[test]
    fn fold_takes_only_new_passing_programs() {
        let mut pool = Pool::initial(&[problem(1, Some("x = 1"))]).unwrap();
        let dev: Vec<Problem> = (1..=5).map(|i| problem(i, None)).collect();
        let programs: Vec<String> = [
            "def f(x):\n    return 1",   // passes: added (dev 1 shares trial 1's id)
            "def f(x):\n    return 2",   // fails
            "x = 1\n",                   // passes, same text as trial 1
            "def f(x):\n    return 1  ", // passes, same as dev 1 once normalized
            "def f(x):\n    return 5",   // passes: added
        ]
        .map(String::from)
        .to_vec();
        let verdicts = [true, false, true, true, true].map(verdict);
        let out = pool.fold(1, &dev, &programs, &verdicts).unwrap();
        assert_eq!(out.passed, 4);
        let added: Vec<(u64, u64, usize)> = out
            .added
            .iter()
            .map(|e| (e.id, e.train_id, e.iteration))
            .collect();
        assert_eq!(
            added,
            [
                (1, DEV_TRAIN_ID_OFFSET + 1, 1),
                (5, DEV_TRAIN_ID_OFFSET + 5, 1)
            ]
        );
        assert_eq!(
            out.duplicate_program,
            [(3, Source::Trial, 1), (4, Source::Dev, 1)]
        );
        assert!(out.already_in_pool.is_empty());
        assert_eq!((pool.count(Source::Trial), pool.count(Source::Dev)), (1, 2));
        // The trainer sees unique ids although trial 1 and dev 1 are both in.
        let ids: Vec<u64> = pool.training_problems().iter().map(|p| p.id).collect();
        assert_eq!(ids, [1, DEV_TRAIN_ID_OFFSET + 1, DEV_TRAIN_ID_OFFSET + 5]);

        // Iteration 2: dev 1 again (another program) is not added twice.
        let programs2: Vec<String> = [
            "def f(x):\n    return 11",
            "def f(x):\n    return 2",
            "y = 3",
            "y = 3",
            "def f(x):\n    return 5",
        ]
        .map(String::from)
        .to_vec();
        let verdicts2 = [true, true, true, true, false].map(verdict);
        let out2 = pool.fold(2, &dev, &programs2, &verdicts2).unwrap();
        assert_eq!(out2.already_in_pool, [1]);
        assert_eq!(
            out2.added.iter().map(|e| e.id).collect::<Vec<_>>(),
            [2, 3],
            "dev 4's program is dev 3's of the same iteration"
        );
        assert_eq!(out2.duplicate_program, [(4, Source::Dev, 3)]);
        assert_eq!(pool.entries()[1].response, "def f(x):\n    return 1");
        assert!(pool.fold(0, &dev, &programs2, &verdicts2).is_err());
        assert!(pool.fold(3, &dev, &programs2[..2], &verdicts2).is_err());
    }

    #[test]
    fn replay_rebuilds_the_same_pool_and_rejects_rows_that_break_the_rules() {
        let trial = [problem(1, Some("x = 1"))];
        let dev: Vec<Problem> = (1..=2).map(|i| problem(i, None)).collect();
        let mut a = Pool::initial(&trial).unwrap();
        let programs = vec!["y = 1".to_string(), "y = 2".to_string()];
        let out = a
            .fold(1, &dev, &programs, &[verdict(true), verdict(true)])
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("folded.jsonl");
        write_pool(&path, &out.added).unwrap();
        let rows = read_pool(&path).unwrap();
        assert_eq!(rows, out.added);
        let mut b = Pool::initial(&trial).unwrap();
        b.replay(1, &rows).unwrap();
        assert_eq!(a.entries(), b.entries());
        // Replaying twice would hold a dev problem twice; a trial row is never a fold.
        assert!(b.replay(1, &rows).is_err());
        let mut c = Pool::initial(&trial).unwrap();
        assert!(c.replay(2, &rows).is_err(), "wrong iteration");
        let mut forged = rows[0].clone();
        forged.source = Source::Trial;
        assert!(c.replay(1, &[forged]).is_err());
        let mut dup = rows[0].clone();
        dup.response = "x = 1".into();
        assert!(c.replay(1, &[dup]).is_err(), "program already in the pool");
        // Unknown fields (a third source, say) do not parse.
        std::fs::write(
            &path,
            "{\"id\":1,\"instruction\":\"i\",\"test_list\":[],\"response\":\"r\",\"source\":\"test\",\"iteration\":1,\"train_id\":1}\n",
        )
        .unwrap();
        let e = format!("{:#}", read_pool(&path).unwrap_err());
        assert!(e.contains("folded.jsonl:1"), "{e}");
    }
}
