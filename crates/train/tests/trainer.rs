//! The training loop on the tiny Gemma-2 model with its tiny tokenizer: learning, early stopping
//! with the best adapter restored, exact resume after a simulated kill, NaN handling, and the
//! refusals that keep runs from mixing.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rupantor_data::Problem;
use rupantor_model::Tokenizer;
use rupantor_train::adapter::adapter_weights_bytes;
use rupantor_train::{
    read_metrics, train, train_with_hooks, BaseFormat, ChatEncoder, Diverged, LoraModel,
    OptimizerKind, StateDict, TrainConfig, TrainHooks, ADAPTER_WEIGHTS_FILE,
};

fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gemma_tiny/gemma2")
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_tokenizer_json(tiny().join("tokenizer.json")).unwrap()
}

/// `n` solved problems; `skew` makes responses of every fourth problem use other words, so
/// training on the rest can make their loss rise.
fn pool(n: u64) -> Vec<Problem> {
    (1..=n)
        .map(|i| Problem {
            id: i,
            instruction: format!("write a function that adds {i} to its input"),
            test_list: vec![format!("assert f(1) == {}", i + 1)],
            response: Some(format!("def f(x):\n    return x + {i}")),
        })
        .collect()
}

fn config() -> TrainConfig {
    TrainConfig {
        rank: 8,
        alpha: 16.0,
        dropout: 0.1,
        lr: 3e-3,
        warmup_ratio: 0.1,
        epochs: 4,
        micro_batch: 2,
        grad_accum: 4,
        eval_every: 3,
        max_len: 64,
        progress: false,
        ..TrainConfig::default()
    }
}

fn model(cfg: &TrainConfig) -> LoraModel {
    LoraModel::load(&tiny(), &Device::Cpu, cfg.lora_spec().unwrap()).unwrap()
}

fn adapter_bytes(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join(ADAPTER_WEIGHTS_FILE)).unwrap()
}

fn losses(dir: &Path, kind: &str, key: &str) -> Vec<(u64, f64)> {
    read_metrics(&dir.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|m| m.kind == kind)
        .map(|m| (m.step, m.values[key].as_f64().unwrap()))
        .collect()
}

#[test]
fn tokenized_pool_trains_only_on_responses() {
    let tok = tokenizer();
    let p = &pool(1)[0];
    let ex = tok.encode_train(&p.instruction, None, p.response.as_deref().unwrap());
    let masked: Vec<u32> = ex
        .ids
        .iter()
        .zip(&ex.loss_mask)
        .filter(|(_, &m)| m)
        .map(|(&t, _)| t)
        .collect();
    assert_eq!(masked.last().copied(), tok.eot_id());
    assert_eq!(
        tok.decode(&masked, false),
        "def f(x):\n    return x + 1<end_of_turn>"
    );
}

#[test]
fn loss_falls_and_the_run_leaves_its_files() {
    let cfg = config();
    let m = model(&cfg);
    let out = tempfile::tempdir().unwrap();
    let r = train(&m, &tokenizer(), &pool(24), &cfg, out.path()).unwrap();
    // 24 problems: 4 validation, 20 training = 10 micro-batches = 3 steps an epoch (4, 4, 2).
    assert_eq!((r.train_examples, r.val_examples), (20, 4));
    assert_eq!((r.steps_per_epoch, r.total_steps), (3, 12));
    assert!(r.truncated.is_empty());
    let train_loss = losses(out.path(), "train", "loss");
    assert_eq!(train_loss.len() as u64, r.steps);
    let val = losses(out.path(), "eval", "val_loss");
    assert!(!val.is_empty());
    let (first, best) = (val[0].1, r.best_val_loss.unwrap());
    assert!(best < 0.9 * first, "validation loss {first} -> best {best}");
    assert!(
        train_loss.last().unwrap().1 < 0.9 * train_loss[0].1,
        "{train_loss:?}"
    );
    // lr follows the schedule: warmup from 0, then decay.
    let lr = losses(out.path(), "train", "lr");
    assert_eq!(lr[0].1, 0.0);
    assert!(lr[2].1 > lr.last().unwrap().1);
    for f in [
        "adapter_config.json",
        ADAPTER_WEIGHTS_FILE,
        "loss.png",
        "metrics.jsonl",
    ] {
        assert!(out.path().join(f).is_file(), "{f}");
    }
    // The adapter on disk is the one left in the model.
    assert_eq!(
        adapter_bytes(out.path()),
        adapter_weights_bytes(m.adapters()).unwrap()
    );
    assert!(r.optimizer_state_bytes_per_param > 0.0);
}

/// A pool whose validation problems answer in other words than the training ones, so the
/// validation loss turns up once the training answers are learnt.
fn diverging_pool() -> Vec<Problem> {
    let mut p = pool(24);
    for q in &mut p {
        q.response = Some(if q.id % 6 == 0 {
            format!("lambda value: value * {}", q.id)
        } else {
            "def f(x):\n    return x".into()
        });
    }
    p
}

#[test]
fn early_stopping_restores_the_best_adapter() {
    let cfg = TrainConfig {
        lr: 2e-2,
        epochs: 20,
        eval_every: 1,
        patience: 3,
        val_fraction: 0.1,
        ..config()
    };
    let m = model(&cfg);
    let out = tempfile::tempdir().unwrap();
    let seen: RefCell<HashMap<u64, Vec<u8>>> = RefCell::new(HashMap::new());
    let hooks = TrainHooks {
        before_step: Some(Box::new(|step, m: &LoraModel| {
            seen.borrow_mut()
                .insert(step - 1, adapter_weights_bytes(m.adapters())?);
            Ok(())
        })),
    };
    let r = train_with_hooks(&m, &tokenizer(), &diverging_pool(), &cfg, out.path(), hooks).unwrap();
    assert!(r.early_stopped, "{r:?}");
    let best = r.best_step.unwrap();
    assert_eq!(
        r.steps,
        best + 3,
        "stopped after 3 evaluations without improvement"
    );
    let val = losses(out.path(), "eval", "val_loss");
    let min = val.iter().map(|v| v.1).fold(f64::INFINITY, f64::min);
    assert_eq!(val.iter().find(|v| v.1 == min).unwrap().0, best);
    assert!(val.last().unwrap().1 > min);
    // The saved adapter is the one after step `best`, not the last one.
    let seen = seen.borrow();
    assert_eq!(adapter_bytes(out.path()), seen[&best]);
    assert_ne!(adapter_bytes(out.path()), seen[&(r.steps - 1)]);
}

fn resume_config() -> TrainConfig {
    TrainConfig {
        // r 64: A is [64, 64] (4096 elements) and keeps 8-bit optimizer state, the
        // k/v B [32, 64] f32 state: both formats go through the checkpoint.
        rank: 64,
        alpha: 32.0,
        dropout: 0.2,
        optimizer: OptimizerKind::Adamw8bit,
        lr: 1e-3,
        epochs: 3,
        eval_every: 3,
        checkpoint_every: 2,
        ..config()
    }
}

#[test]
fn resume_after_a_kill_ends_with_the_same_adapter() {
    let cfg = resume_config();
    let whole = tempfile::tempdir().unwrap();
    let m = model(&cfg);
    let r = train(&m, &tokenizer(), &pool(24), &cfg, whole.path()).unwrap();
    assert_eq!(r.steps, 9);
    assert!(r.optimizer_state_bytes_per_param < 8.0, "some 8-bit state");

    let cut = tempfile::tempdir().unwrap();
    // Killed when step 6 is about to start: the checkpoint of step 4 is the last one, and
    // metrics of step 5 were written after it.
    let m = model(&cfg);
    let hooks = TrainHooks {
        before_step: Some(Box::new(|step, _: &LoraModel| {
            anyhow::ensure!(step != 6, "killed");
            Ok(())
        })),
    };
    let e = train_with_hooks(&m, &tokenizer(), &pool(24), &cfg, cut.path(), hooks).unwrap_err();
    assert_eq!(e.to_string(), "killed");
    drop(m);
    let latest = std::fs::read_to_string(cut.path().join("checkpoint/latest.json")).unwrap();
    assert!(latest.contains("step-00000004"), "{latest}");
    assert_eq!(losses(cut.path(), "train", "loss").len(), 5);

    // A new process: a fresh model (its own random init), resumed from the checkpoint.
    let resumed = TrainConfig {
        resume: true,
        ..cfg.clone()
    };
    let m = model(&resumed);
    let r2 = train(&m, &tokenizer(), &pool(24), &resumed, cut.path()).unwrap();
    assert_eq!(r2.resumed_from, Some(4));
    assert_eq!(r2.steps, 9);
    assert_eq!(r2.best_val_loss, r.best_val_loss);
    assert!(
        adapter_bytes(cut.path()) == adapter_bytes(whole.path()),
        "resumed adapter differs from the uninterrupted one"
    );
    // The metrics are those of one run: steps 1..9 once each, with the same losses.
    assert_eq!(
        losses(cut.path(), "train", "loss"),
        losses(whole.path(), "train", "loss")
    );
    assert_eq!(
        losses(cut.path(), "eval", "val_loss"),
        losses(whole.path(), "eval", "val_loss")
    );
    // (Compared as states: the safetensors metadata map has no fixed key order.)
    let opt = |d: &Path| {
        StateDict::load(d.join("checkpoint/step-00000009/optimizer.safetensors")).unwrap()
    };
    assert!(
        opt(cut.path()) == opt(whole.path()),
        "optimizer states differ"
    );
    // Resuming a finished run changes nothing.
    let m = model(&resumed);
    let r3 = train(&m, &tokenizer(), &pool(24), &resumed, cut.path()).unwrap();
    assert_eq!(r3.steps, 9);
    assert!(adapter_bytes(cut.path()) == adapter_bytes(whole.path()));
}

#[test]
fn nan_stops_the_run_naming_step_and_batch_and_keeps_the_checkpoint() {
    let cfg = TrainConfig {
        checkpoint_every: 2,
        ..config()
    };
    let m = model(&cfg);
    let out = tempfile::tempdir().unwrap();
    let hooks = TrainHooks {
        before_step: Some(Box::new(|step, m: &LoraModel| {
            if step == 4 {
                let b = &m.adapters()[3].b;
                b.set(
                    &(Tensor::ones(b.dims(), candle_core::DType::F32, &Device::Cpu)? * f64::NAN)?,
                )?;
            }
            Ok(())
        })),
    };
    let e = train_with_hooks(&m, &tokenizer(), &pool(24), &cfg, out.path(), hooks).unwrap_err();
    let d = e
        .downcast_ref::<Diverged>()
        .unwrap_or_else(|| panic!("{e:#}"));
    assert_eq!((d.step, d.micro_batch, d.what), (4, 1, "loss"));
    assert_eq!(d.problems.len(), 2);
    assert!(d.checkpoint.ends_with("step-00000002"), "{}", d.checkpoint);
    let msg = e.to_string();
    assert!(
        msg.contains("step 4") && msg.contains("micro-batch 1"),
        "{msg}"
    );
    // The last good checkpoint is intact and finite.
    let w = rupantor_train::AdapterWeights::read(
        &out.path()
            .join("checkpoint/step-00000002")
            .join(ADAPTER_WEIGHTS_FILE),
    )
    .unwrap();
    assert!(w
        .tensors
        .values()
        .all(|(_, v)| v.iter().all(|x| x.is_finite())));
    assert_eq!(losses(out.path(), "train", "loss").len(), 3);
}

#[test]
fn runs_do_not_mix() {
    let cfg = TrainConfig {
        max_steps: Some(2),
        eval_every: 2,
        ..config()
    };
    let out = tempfile::tempdir().unwrap();
    train(&model(&cfg), &tokenizer(), &pool(24), &cfg, out.path()).unwrap();
    // A fresh run into a directory with a checkpoint.
    let e = train(&model(&cfg), &tokenizer(), &pool(24), &cfg, out.path()).unwrap_err();
    assert!(e.to_string().contains("--resume"), "{e}");
    // Resuming with other settings.
    let other = TrainConfig {
        resume: true,
        lr: 1e-4,
        ..cfg.clone()
    };
    let e = train(&model(&other), &tokenizer(), &pool(24), &other, out.path()).unwrap_err();
    assert!(e.to_string().contains("lr"), "{e}");
    // Resuming where nothing was saved.
    let empty = tempfile::tempdir().unwrap();
    let r = TrainConfig {
        resume: true,
        ..cfg.clone()
    };
    let e = train(&model(&r), &tokenizer(), &pool(24), &r, empty.path()).unwrap_err();
    assert!(e.to_string().contains("no checkpoint"), "{e}");
    // A model built for other adapters.
    let wide = TrainConfig {
        rank: 4,
        ..cfg.clone()
    };
    let e = train(&model(&wide), &tokenizer(), &pool(24), &cfg, empty.path()).unwrap_err();
    assert!(e.to_string().contains("not the config's"), "{e}");
}

#[test]
fn config_reads_from_partial_toml() {
    let cfg: TrainConfig = toml::from_str(
        r#"
        rank = 16
        lr = 1e-4
        optimizer = "adamw"
        base_format = "dense"
        targets = ["q_proj", "v_proj"]
        betas = [0.9, 0.95]
        "#,
    )
    .unwrap();
    assert_eq!(cfg.rank, 16);
    assert_eq!(cfg.optimizer, OptimizerKind::Adamw);
    assert_eq!(cfg.base_format, BaseFormat::Dense);
    assert_eq!(cfg.betas, (0.9, 0.95));
    assert_eq!(cfg.alpha, 64.0, "unset keys keep the defaults");
    let back: TrainConfig = toml::from_str(&toml::to_string(&cfg).unwrap()).unwrap();
    assert_eq!(back, cfg);
    assert!(
        toml::from_str::<TrainConfig>("rnak = 4").is_err(),
        "typos are errors"
    );
}
