//! The self-improvement loop end to end on the tiny random Gemma-2 (fixtures/gemma_tiny) with
//! a trial pool, a dev set and a test set written by the tests: the real generator (junk, so
//! nothing folds), a stub generator whose programs are known to pass or fail (what folds,
//! provenance, dedup, the test split never read), a kill after an iteration's DONE and one in
//! the middle of training, and changed inputs under a finished iteration.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use anyhow::{anyhow, Result};
use candle_core::Device;
use rupantor_data::Problem;
use rupantor_model::{StopReason, Tokenizer};
use rupantor_pipeline::pool::read_pool;
use rupantor_pipeline::selfimprove::{DONE_FILE, PREDICTIONS_FILE, SUMMARY_FILE, VERDICTS_FILE};
use rupantor_pipeline::{
    run_loop, BaseModel, GenOutput, GenSettings, Generated, Generator, IterationReport, LoopConfig,
    LoopHooks, Paths, Source, Stage, VerifySettings, DEV_TRAIN_ID_OFFSET,
};
use rupantor_train::adapter::adapter_weights_bytes;
use rupantor_train::{LoraModel, TrainConfig, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE};

fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gemma_tiny/gemma2")
}

fn factory() -> BaseModel {
    BaseModel {
        path: tiny(),
        device: Device::Cpu,
        dtype: candle_core::DType::F32,
        tokenizer: Tokenizer::from_tokenizer_json(tiny().join("tokenizer.json")).unwrap(),
    }
}

fn problem(id: u64, instruction: &str, tests: &[&str], response: Option<&str>) -> Problem {
    Problem {
        id,
        instruction: instruction.into(),
        test_list: tests.iter().map(|t| t.to_string()).collect(),
        response: response.map(str::to_string),
    }
}

const DOUBLE: &str = "def double(x):\n    return 2 * x";

fn trial() -> Vec<Problem> {
    vec![
        problem(
            1,
            "inc(x): x + 1",
            &["assert inc(1) == 2"],
            Some("def inc(x):\n    return x + 1"),
        ),
        problem(2, "double(x): 2x", &["assert double(2) == 4"], Some(DOUBLE)),
        problem(
            3,
            "neg(x): -x",
            &["assert neg(1) == -1"],
            Some("def neg(x):\n    return -x"),
        ),
        problem(
            4,
            "is_even(x)",
            &["assert is_even(2)"],
            Some("def is_even(x):\n    return x % 2 == 0"),
        ),
        problem(
            5,
            "first(xs)",
            &["assert first([3]) == 3"],
            Some("def first(xs):\n    return xs[0]"),
        ),
        problem(
            6,
            "size(xs)",
            &["assert size([1]) == 1"],
            Some("def size(xs):\n    return len(xs)"),
        ),
    ]
}

/// Dev ids overlap the trial ids, as in the real splits.
fn dev() -> Vec<Problem> {
    vec![
        problem(
            1,
            "add(a, b)",
            &[
                "assert add(1, 2) == 3",
                "assert add(0, 0) == 0",
                "assert add(-1, 1) == 0",
            ],
            None,
        ),
        problem(
            2,
            "twice(x) as double",
            &[
                "assert double(3) == 6",
                "assert double(0) == 0",
                "assert double(-2) == -4",
            ],
            None,
        ),
        problem(
            3,
            "max_of(xs)",
            &[
                "assert max_of([5, 1]) == 5",
                "assert max_of([1, 7]) == 7",
                "assert max_of([2]) == 2",
            ],
            None,
        ),
        problem(
            4,
            "sum of a and b",
            &[
                "assert add(2, 2) == 4",
                "assert add(5, 5) == 10",
                "assert add(3, 4) == 7",
            ],
            None,
        ),
    ]
}

/// The test split: never to be read by the loop (same ids as dev, telltale instructions).
fn test_split() -> Vec<Problem> {
    vec![
        problem(1, "TEST-SPLIT add(a, b)", &["assert add(1, 1) == 2"], None),
        problem(
            2,
            "TEST-SPLIT max_of(xs)",
            &["assert max_of([1]) == 1"],
            None,
        ),
    ]
}

fn write_split(dir: &Path, name: &str, problems: &[Problem]) {
    let text: String = problems
        .iter()
        .map(|p| serde_json::to_string(p).unwrap() + "\n")
        .collect();
    std::fs::write(dir.join(format!("{name}.jsonl")), text).unwrap();
}

struct Setup {
    _tmp: tempfile::TempDir,
    paths: Paths,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    write_split(&data, "trial", &trial());
    write_split(&data, "dev", &dev());
    write_split(&data, "test", &test_split());
    let paths = Paths {
        data_dir: data,
        out_dir: tmp.path().join("out/r4"),
    };
    Setup { _tmp: tmp, paths }
}

fn config() -> LoopConfig {
    LoopConfig {
        iterations: 2,
        train: TrainConfig {
            rank: 4,
            alpha: 8.0,
            dropout: 0.1,
            lr: 3e-3,
            warmup_ratio: 0.1,
            epochs: 2,
            max_steps: Some(3),
            micro_batch: 2,
            grad_accum: 1,
            eval_every: 1,
            checkpoint_every: 1,
            val_fraction: 0.2,
            val_min: 1,
            max_len: 192,
            progress: false,
            ..TrainConfig::default()
        },
        generation: GenSettings {
            max_new_tokens: 12,
            batch: 3,
            ..GenSettings::default()
        },
        verify: VerifySettings {
            timeout_s: 5.0,
            workers: 2,
            ..VerifySettings::default()
        },
        progress: false,
        command: "rupantor train --rank 4 --iter 2 --config configs/tiny.toml".into(),
        resolved_config: "[train]\nrank = 4\n".into(),
        ..LoopConfig::default()
    }
}

/// What a stub was asked for.
#[derive(Debug, Clone, PartialEq)]
struct Call {
    iteration: usize,
    ids: Vec<u64>,
    instructions: Vec<String>,
}

/// Programs chosen per iteration (dev order); checks it is handed the iteration's trained
/// adapter.
struct Stub {
    out_dir: PathBuf,
    calls: Rc<RefCell<Vec<Call>>>,
}

fn scripted(iteration: usize) -> Vec<&'static str> {
    match iteration {
        1 => vec![
            // passes: folded (fenced, with prose around it)
            "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.",
            // passes, but it is trial 2's reference: not folded
            "def double(x):   \n\n    return 2 * x\n",
            // passes the first assert only: not folded
            "def max_of(xs):\n    return xs[0]",
            // syntax error
            "def add(a, b) return a + b",
        ],
        _ => vec![
            // passes, but dev 1 was folded by iteration 1: not added twice
            "def add(a, b):\n    return b + a",
            "def double(x):\n    return 2 * x",
            // passes: folded
            "def max_of(xs):\n    return max(xs)",
            // passes with iteration 1's dev 1 program (blank lines aside): not folded
            "def add(a, b):\n\n    return a + b\n\n",
        ],
    }
}

impl Generator for Stub {
    fn generate(
        &mut self,
        iteration: usize,
        model: &LoraModel,
        _tok: &Tokenizer,
        problems: &[Problem],
        settings: &GenSettings,
    ) -> Result<Generated> {
        // The model handed over is the one just trained: its adapter is iterK's file.
        let on_disk = std::fs::read(
            self.out_dir
                .join(format!("iter{iteration}"))
                .join(ADAPTER_WEIGHTS_FILE),
        )?;
        assert_eq!(adapter_weights_bytes(model.adapters())?, on_disk);
        assert_eq!(model.spec().lora.rank, 4);
        assert!(!settings.progress);
        self.calls.borrow_mut().push(Call {
            iteration,
            ids: problems.iter().map(|p| p.id).collect(),
            instructions: problems.iter().map(|p| p.instruction.clone()).collect(),
        });
        let texts = scripted(iteration);
        let outputs = problems
            .iter()
            .zip(texts)
            .map(|(p, raw)| GenOutput {
                id: p.id,
                response: rupantor_exec::extract_code(raw),
                raw: raw.to_string(),
                tokens: 1,
                stop: StopReason::StopToken(1),
            })
            .collect();
        Ok(Generated {
            outputs,
            tokens: problems.len(),
            secs: 0.0,
            cut: 0,
        })
    }
}

fn stub_hooks<'a>(out: &Path, calls: &Rc<RefCell<Vec<Call>>>) -> LoopHooks<'a> {
    LoopHooks {
        generator: Some(Box::new(Stub {
            out_dir: out.to_path_buf(),
            calls: calls.clone(),
        })),
        ..LoopHooks::default()
    }
}

fn jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn summary(out: &Path, k: usize) -> IterationReport {
    serde_json::from_slice(&std::fs::read(out.join(format!("iter{k}/{SUMMARY_FILE}"))).unwrap())
        .unwrap()
}

fn no_test_split_in(pool: &[rupantor_pipeline::PoolEntry]) {
    let dev_instructions: BTreeSet<String> = dev().into_iter().map(|p| p.instruction).collect();
    let trial_instructions: BTreeSet<String> = trial().into_iter().map(|p| p.instruction).collect();
    for e in pool {
        assert!(!e.instruction.contains("TEST-SPLIT"), "{e:?}");
        match e.source {
            Source::Trial => assert!(trial_instructions.contains(&e.instruction)),
            Source::Dev => assert!(dev_instructions.contains(&e.instruction)),
        }
    }
}

#[test]
fn real_generator_end_to_end_on_the_tiny_model() {
    let s = setup();
    let out = &s.paths.out_dir;
    let r = run_loop(&config(), &s.paths, &factory(), LoopHooks::default()).unwrap();
    assert_eq!(r.iterations.len(), 2);
    for (k, it) in r.iterations.iter().enumerate() {
        let k = k + 1;
        let dir = out.join(format!("iter{k}"));
        for f in [
            ADAPTER_CONFIG_FILE,
            ADAPTER_WEIGHTS_FILE,
            "metrics.jsonl",
            "loss.png",
            PREDICTIONS_FILE,
            VERDICTS_FILE,
            "pool.jsonl",
            "folded.jsonl",
            "inputs.json",
            SUMMARY_FILE,
            DONE_FILE,
        ] {
            assert!(dir.join(f).is_file(), "iter{k}/{f}");
        }
        assert!(
            !dir.join("checkpoint").exists(),
            "finished: checkpoint removed"
        );
        // Random weights write junk: every dev problem answered, none passing.
        let preds = jsonl(&dir.join(PREDICTIONS_FILE));
        let ids: Vec<u64> = preds.iter().map(|p| p["id"].as_u64().unwrap()).collect();
        assert_eq!(ids, [1, 2, 3, 4]);
        let verdicts = jsonl(&dir.join(VERDICTS_FILE));
        assert_eq!(verdicts.len(), 4);
        assert!(verdicts.iter().all(|v| v["passed"] == false));
        assert!(verdicts
            .iter()
            .all(|v| v["class"].as_str().unwrap() != "pass"));
        assert_eq!((it.dev.n, it.dev.passed, it.dev.pass_at_1), (4, 0, 0.0));
        assert_eq!(it.dev.by_class.values().sum::<usize>(), 4);
        assert!(it.fold.added.is_empty() && it.fold.passed == 0);
        assert_eq!((it.pool_size, it.pool_trial, it.pool_dev), (6, 6, 0));
        assert_eq!(it.train.steps, 3);
        assert!(it.train.best_val_loss.unwrap().is_finite());
        assert_eq!(it.train.train_examples + it.train.val_examples, 6);
        assert!(!it.reused);
        assert_eq!(&summary(out, k), it);
        if k == 1 {
            assert!(it.times.train_s > 0.0 && it.times.total_s >= it.times.train_s);
        } else {
            // Nothing was folded, so iteration 2 had iteration 1's inputs: carried over,
            // neither trained nor generated again.
            assert_eq!(it.carried_from, Some(1));
            assert_eq!(it.times.total_s, 0.0);
        }
    }
    // Iteration 2 holds iteration 1's adapter (the tests of the trainer show a fresh run on
    // the same pool trains these bytes again).
    let a1 = std::fs::read(out.join("iter1").join(ADAPTER_WEIGHTS_FILE)).unwrap();
    let a2 = std::fs::read(out.join("iter2").join(ADAPTER_WEIGHTS_FILE)).unwrap();
    assert_eq!(a1, a2);
    // The final adapter is iteration 2's.
    assert_eq!(std::fs::read(out.join(ADAPTER_WEIGHTS_FILE)).unwrap(), a2);
    assert_eq!(
        std::fs::read(out.join(ADAPTER_CONFIG_FILE)).unwrap(),
        std::fs::read(out.join("iter2").join(ADAPTER_CONFIG_FILE)).unwrap()
    );
    let pool = read_pool(&out.join("pool.jsonl")).unwrap();
    assert_eq!(pool.len(), 6);
    assert!(pool
        .iter()
        .all(|e| e.source == Source::Trial && e.iteration == 0));
    assert_eq!(r.pool, pool);
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("2 of 2 iteration(s) finished"), "{report}");
    assert!(report.contains("carries iteration 1's results"), "{report}");
    assert_eq!(
        report
            .matches("| 0.0000 (0/4) | +0 of 0 passing → 6 |")
            .count(),
        2,
        "{report}"
    );
    assert!(report.contains("rupantor train --rank 4 --iter 2 --config configs/tiny.toml"));
    assert!(report.contains("```toml\n[train]\nrank = 4\n```"));
    // No temporaries left behind by the atomic writes.
    for dir in [out.clone(), out.join("iter1"), out.join("iter2")] {
        for e in std::fs::read_dir(&dir).unwrap() {
            let name = e.unwrap().file_name().into_string().unwrap();
            assert!(!name.ends_with(".tmp"), "{}/{name}", dir.display());
        }
    }
    // A second run into the same folder needs --resume.
    let e = run_loop(&config(), &s.paths, &factory(), LoopHooks::default()).unwrap_err();
    assert!(e.to_string().contains("--resume"), "{e}");
}

#[test]
fn only_verified_new_programs_fold_with_provenance() {
    let s = setup();
    let out = &s.paths.out_dir;
    let calls = Rc::new(RefCell::new(Vec::new()));
    let r = run_loop(&config(), &s.paths, &factory(), stub_hooks(out, &calls)).unwrap();

    // The generator saw the dev split, every problem, once per iteration; never the test split.
    let calls = calls.borrow();
    assert_eq!(calls.len(), 2);
    for (k, c) in calls.iter().enumerate() {
        assert_eq!(c.iteration, k + 1);
        assert_eq!(c.ids, [1, 2, 3, 4]);
        assert!(c.instructions.iter().all(|i| !i.contains("TEST-SPLIT")));
    }

    let (i1, i2) = (&r.iterations[0], &r.iterations[1]);
    // Iteration 1: dev 1 and dev 2 pass; dev 2 is trial 2's program.
    assert_eq!((i1.dev.passed, i1.dev.n), (2, 4));
    assert_eq!(i1.dev.by_class["pass"], 2);
    assert_eq!(i1.dev.by_class["assertion"], 1);
    assert_eq!(i1.dev.by_class["syntax"], 1);
    assert_eq!(i1.fold.added, [1]);
    assert_eq!(i1.fold.duplicate_program, [2]);
    assert!(i1.fold.already_in_pool.is_empty());
    assert_eq!((i1.pool_size, i1.fold.pool_after), (6, 7));
    // Iteration 2 trained on the grown pool.
    assert_eq!((i2.pool_size, i2.pool_trial, i2.pool_dev), (7, 6, 1));
    assert_eq!(i2.train.train_examples + i2.train.val_examples, 7);
    assert_eq!((i2.dev.passed, i2.dev.pass_at_1), (4, 1.0));
    assert_eq!(i2.fold.added, [3]);
    assert_eq!(i2.fold.already_in_pool, [1]);
    assert_eq!(i2.fold.duplicate_program, [2, 4]);
    assert_eq!(i2.fold.pool_after, 8);

    let pool = read_pool(&out.join("pool.jsonl")).unwrap();
    assert_eq!(pool, r.pool);
    let devs: Vec<(u64, usize, u64, &str)> = pool
        .iter()
        .filter(|e| e.source == Source::Dev)
        .map(|e| (e.id, e.iteration, e.train_id, e.response.as_str()))
        .collect();
    assert_eq!(
        devs,
        [
            (
                1,
                1,
                DEV_TRAIN_ID_OFFSET + 1,
                "def add(a, b):\n    return a + b"
            ),
            (
                3,
                2,
                DEV_TRAIN_ID_OFFSET + 3,
                "def max_of(xs):\n    return max(xs)"
            ),
        ]
    );
    assert_eq!(pool.iter().filter(|e| e.source == Source::Trial).count(), 6);
    let dev1 = pool
        .iter()
        .find(|e| e.source == Source::Dev && e.id == 1)
        .unwrap();
    assert_eq!(dev1.test_list, dev()[0].test_list, "all dev asserts kept");
    assert_eq!(dev1.instruction, "add(a, b)");
    no_test_split_in(&pool);

    // Per-iteration files: what each trained on and what each folded.
    assert_eq!(read_pool(&out.join("iter1/pool.jsonl")).unwrap().len(), 6);
    assert_eq!(read_pool(&out.join("iter2/pool.jsonl")).unwrap().len(), 7);
    let f2 = read_pool(&out.join("iter2/folded.jsonl")).unwrap();
    assert_eq!(f2.iter().map(|e| e.id).collect::<Vec<_>>(), [3]);
    let v1 = jsonl(&out.join("iter1").join(VERDICTS_FILE));
    let classes: Vec<&str> = v1.iter().map(|v| v["class"].as_str().unwrap()).collect();
    assert_eq!(classes, ["pass", "pass", "assertion", "syntax"]);
    assert!(v1[2]["trace"].as_str().unwrap().contains("AssertionError"));
    // The predictions file keeps the raw text where extraction changed it.
    let p1 = jsonl(&out.join("iter1").join(PREDICTIONS_FILE));
    assert_eq!(p1[0]["response"], "def add(a, b):\n    return a + b");
    assert!(p1[0]["raw"].as_str().unwrap().starts_with("Here you go"));

    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        report.contains("| 0.5000 (2/4) | +1 of 2 passing → 7 |"),
        "{report}"
    );
    assert!(
        // One of the 4 dev problems was folded after iteration 1: 3 of 3 unseen pass.
        report.contains("| 1.0000 (4/4); unseen 1.0000 (3/3) | +1 of 4 passing → 8 |"),
        "{report}"
    );
    assert!(
        report.contains("| 1 | 2 | 1 | 0 | 0 | 0 | 1 | 0 | 0 | 0 | 0 |"),
        "{report}"
    );
    assert!(
        report.contains("| 2 | 4 | 0 | 0 | 0 | 0 | 0 | 0 | 0 | 0 | 0 |"),
        "{report}"
    );
    assert!(report.contains("Iteration 2: passing but not folded: already in the pool (dev 1); duplicate programs (dev 2, 4)."), "{report}");
    assert!(
        report.contains("Final pool: 8 problems (6 trial + 2 dev)"),
        "{report}"
    );
}

fn stages(
    log: &Rc<RefCell<Vec<(usize, Stage)>>>,
    kill_at: Option<(usize, Stage)>,
) -> impl FnMut(usize, Stage) -> Result<()> + 'static {
    let log = log.clone();
    move |k, stage| {
        log.borrow_mut().push((k, stage));
        if Some((k, stage)) == kill_at {
            return Err(anyhow!("killed after iteration {k}'s {stage}"));
        }
        Ok(())
    }
}

#[test]
fn a_finished_iteration_is_not_redone_after_a_crash() {
    let s = setup();
    let out = &s.paths.out_dir;
    let calls = Rc::new(RefCell::new(Vec::new()));
    let log = Rc::new(RefCell::new(Vec::new()));
    let hooks = LoopHooks {
        after_stage: Some(Box::new(stages(&log, Some((1, Stage::Done))))),
        ..stub_hooks(out, &calls)
    };
    let e = run_loop(&config(), &s.paths, &factory(), hooks).unwrap_err();
    assert!(
        format!("{e:#}").contains("killed after iteration 1's done"),
        "{e:#}"
    );
    let done1 = out.join("iter1").join(DONE_FILE);
    assert!(done1.is_file());
    assert!(!out.join("iter2").exists());
    let done_bytes = std::fs::read(&done1).unwrap();
    let stamp = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
    let (done_time, adapter_time) = (
        stamp(&done1),
        stamp(&out.join("iter1").join(ADAPTER_WEIGHTS_FILE)),
    );
    let summary1 = summary(out, 1);

    // Without --resume the folder is refused.
    let e = run_loop(&config(), &s.paths, &factory(), LoopHooks::default()).unwrap_err();
    assert!(e.to_string().contains("--resume"), "{e}");

    log.borrow_mut().clear();
    calls.borrow_mut().clear();
    let resume = LoopConfig {
        resume: true,
        ..config()
    };
    let hooks = LoopHooks {
        after_stage: Some(Box::new(stages(&log, None))),
        ..stub_hooks(out, &calls)
    };
    let r = run_loop(&resume, &s.paths, &factory(), hooks).unwrap();
    // Iteration 1 was not redone: no stage of it ran, its files are untouched.
    assert!(
        log.borrow().iter().all(|(k, _)| *k == 2),
        "{:?}",
        log.borrow()
    );
    assert_eq!(
        *log.borrow(),
        [
            Stage::Load,
            Stage::Train,
            Stage::Generate,
            Stage::Verify,
            Stage::Fold,
            Stage::Done
        ]
        .map(|st| (2, st))
    );
    assert_eq!(
        calls
            .borrow()
            .iter()
            .map(|c| c.iteration)
            .collect::<Vec<_>>(),
        [2]
    );
    assert_eq!(std::fs::read(&done1).unwrap(), done_bytes);
    assert_eq!(stamp(&done1), done_time);
    assert_eq!(
        stamp(&out.join("iter1").join(ADAPTER_WEIGHTS_FILE)),
        adapter_time
    );
    assert!(r.iterations[0].reused && !r.iterations[1].reused);
    assert_eq!(
        IterationReport {
            reused: false,
            ..r.iterations[0].clone()
        },
        summary1
    );
    // Iteration 2 trained on iteration 1's fold, replayed from its folded.jsonl.
    assert_eq!(r.iterations[1].pool_size, 7);
    assert_eq!(r.iterations[1].fold.pool_after, 8);
    assert_eq!(r.pool.len(), 8);
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("| 1* |"), "{report}");

    // The same run again: both iterations kept, nothing runs.
    log.borrow_mut().clear();
    let hooks = LoopHooks {
        after_stage: Some(Box::new(stages(&log, None))),
        ..stub_hooks(out, &calls)
    };
    let again = run_loop(&resume, &s.paths, &factory(), hooks).unwrap();
    assert!(log.borrow().is_empty());
    assert!(again.iterations.iter().all(|i| i.reused));
    assert_eq!(again.pool, r.pool);

    // Changed inputs under a finished iteration are an error, not a silent reuse.
    let changed = LoopConfig {
        train: TrainConfig {
            lr: 1e-3,
            ..resume.train.clone()
        },
        ..resume.clone()
    };
    let e = run_loop(&changed, &s.paths, &factory(), LoopHooks::default()).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("iter1") && msg.contains("other inputs"),
        "{msg}"
    );
}

#[test]
fn interrupted_training_resumes_from_its_checkpoint() {
    // Uninterrupted reference run.
    let reference = setup();
    let calls = Rc::new(RefCell::new(Vec::new()));
    run_loop(
        &config(),
        &reference.paths,
        &factory(),
        stub_hooks(&reference.paths.out_dir, &calls),
    )
    .unwrap();

    // Killed before step 3 of iteration 2's training (checkpoints after every step).
    let s = setup();
    let out = &s.paths.out_dir;
    let hooks = LoopHooks {
        before_train_step: Some(Box::new(|k, step| {
            if (k, step) == (2, 3) {
                return Err(anyhow!("killed in training"));
            }
            Ok(())
        })),
        ..stub_hooks(out, &calls)
    };
    let e = run_loop(&config(), &s.paths, &factory(), hooks).unwrap_err();
    assert!(format!("{e:#}").contains("killed in training"), "{e:#}");
    assert!(out.join("iter2/checkpoint/latest.json").is_file());
    assert!(!out.join("iter2").join(DONE_FILE).exists());

    // Without --resume the folder is refused; with it, training continues at step 2.
    assert!(run_loop(&config(), &s.paths, &factory(), LoopHooks::default()).is_err());
    let resume = LoopConfig {
        resume: true,
        ..config()
    };
    let r = run_loop(&resume, &s.paths, &factory(), stub_hooks(out, &calls)).unwrap();
    assert!(r.iterations[0].reused);
    assert_eq!(r.iterations[1].train.resumed_from, Some(2));
    assert_eq!(r.iterations[1].train.steps, 3);
    assert!(!out.join("iter2/checkpoint").exists());
    // And ends where the uninterrupted run ended.
    for f in [ADAPTER_WEIGHTS_FILE, "pool.jsonl"] {
        assert_eq!(
            std::fs::read(out.join(f)).unwrap(),
            std::fs::read(reference.paths.out_dir.join(f)).unwrap(),
            "{f}"
        );
    }
    for f in [PREDICTIONS_FILE, VERDICTS_FILE, "metrics.jsonl"] {
        let strip = |p: &Path| -> Vec<serde_json::Value> {
            jsonl(p)
                .into_iter()
                .map(|mut v| {
                    // Timings differ between runs.
                    if let Some(o) = v.as_object_mut() {
                        for k in ["elapsed_s", "tokens_per_s", "trace"] {
                            o.remove(k);
                        }
                    }
                    v
                })
                .collect()
        };
        assert_eq!(
            strip(&out.join("iter2").join(f)),
            strip(&reference.paths.out_dir.join("iter2").join(f)),
            "{f}"
        );
    }
}

/// A generator that answers problems it was not asked about (a test-split id, say) is
/// stopped before anything is verified or folded.
#[test]
fn generator_output_must_match_the_dev_split() {
    struct Rogue;
    impl Generator for Rogue {
        fn generate(
            &mut self,
            _: usize,
            _: &LoraModel,
            _: &Tokenizer,
            problems: &[Problem],
            _: &GenSettings,
        ) -> Result<Generated> {
            let mut outputs: Vec<GenOutput> = problems
                .iter()
                .map(|p| GenOutput {
                    id: p.id,
                    response: "x = 1".into(),
                    raw: "x = 1".into(),
                    tokens: 1,
                    stop: StopReason::MaxTokens,
                })
                .collect();
            outputs[3].id = 99;
            Ok(Generated {
                outputs,
                tokens: 4,
                secs: 0.0,
                cut: 4,
            })
        }
    }
    let s = setup();
    let cfg = LoopConfig {
        iterations: 1,
        ..config()
    };
    let hooks = LoopHooks {
        generator: Some(Box::new(Rogue)),
        ..LoopHooks::default()
    };
    let e = run_loop(&cfg, &s.paths, &factory(), hooks).unwrap_err();
    assert!(
        e.to_string().contains("for problem 99, not dev problem 4"),
        "{e}"
    );
    let iter1 = s.paths.out_dir.join("iter1");
    assert!(!iter1.join(VERDICTS_FILE).exists());
    assert!(!iter1.join(DONE_FILE).exists());
}

/// Dev prompts that cannot fit the model's context stop the run right after the model is
/// loaded, not after a long training run.
#[test]
fn prompts_that_cannot_fit_fail_before_training() {
    let s = setup();
    let cfg = LoopConfig {
        generation: GenSettings {
            max_new_tokens: 600,
            ..config().generation
        },
        ..config()
    };
    let e = run_loop(&cfg, &s.paths, &factory(), LoopHooks::default()).unwrap_err();
    assert!(
        e.to_string().contains("exceeds the model's context of 512"),
        "{e}"
    );
    let iter1 = s.paths.out_dir.join("iter1");
    assert!(!iter1.join("metrics.jsonl").exists());
    assert!(!iter1.join(ADAPTER_WEIGHTS_FILE).exists());
}
