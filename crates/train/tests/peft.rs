//! Adapters and gradients against HF transformers + PEFT 0.21.2 on the tiny Gemma-2 / Gemma-3
//! models (fixtures from `scripts/fixtures/peft_adapter.py`, whose docstring says how to
//! regenerate them).
//!
//! PyTorch's base model there is the tiny model with every projection replaced by its
//! bitsandbytes NF4 round trip (blocksize 64, double quant), bit for bit the weight our NF4
//! base multiplies with, so both stacks compute the same f32 function and differ only in
//! summation order. Bounds: logits within 1e-4 absolute (|logits| reach 15 and 32), loss
//! within 1e-5 relative, every LoRA gradient within 1e-4 relative to its largest entry.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rupantor_model::linear::LinearRole;
use rupantor_model::{load_gemma_with, QLoraBuilder};
use rupantor_train::adapter::{parse_peft_key, peft_key, Half};
use rupantor_train::lora::ALL_TARGETS;
use rupantor_train::{
    load_adapter_weights, read_adapter, save_adapter, AdapterConfig, BaseFormat, LoraModel,
    LoraSpec, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE,
};

const MODELS: [&str; 2] = ["gemma2", "gemma3"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tiny(name: &str) -> PathBuf {
    root().join("fixtures/gemma_tiny").join(name)
}

fn peft_dir(name: &str) -> PathBuf {
    root().join("fixtures/peft").join(name)
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    max_abs(&(a - b).unwrap())
}

/// The LoRA setup the fixtures use: r 4, alpha 8, no dropout, all seven projections, NF4 base.
fn spec(base: BaseFormat) -> LoraSpec {
    let cfg = AdapterConfig::load(&peft_dir("gemma2").join("peft_written")).unwrap();
    LoraSpec {
        lora: cfg.lora(),
        targets: cfg.targets,
        seed: 0,
        base,
        dtype: DType::F32,
    }
}

fn ids_of(expected: &HashMap<String, Tensor>) -> Tensor {
    expected["input_ids"].to_dtype(DType::U32).unwrap()
}

/// The PEFT fixture of `name`: its expected tensors, input ids and labels.
fn fixture_batch(name: &str) -> (HashMap<String, Tensor>, Tensor, Tensor) {
    let expected = load(&peft_dir(name).join("expected.safetensors"));
    let ids = ids_of(&expected);
    let labels = expected["labels"].to_dtype(DType::I64).unwrap();
    (expected, ids, labels)
}

/// The tiny model with `spec`'s adapters set to the PEFT-written adapter's weights.
fn peft_trained(name: &str, spec: LoraSpec) -> LoraModel {
    let m = LoraModel::load(&tiny(name), &Device::Cpu, spec).unwrap();
    load_adapter_weights(&peft_dir(name).join("peft_written"), m.adapters()).unwrap();
    m
}

#[test]
fn peft_written_config_reads_as_its_lora_settings() {
    for name in MODELS {
        let cfg = AdapterConfig::load(&peft_dir(name).join("peft_written")).unwrap();
        assert_eq!(
            (cfg.rank, cfg.alpha, cfg.dropout, cfg.rslora),
            (4, 8.0, 0.0, false)
        );
        assert_eq!(cfg.targets, ALL_TARGETS.to_vec());
        assert_eq!(
            cfg.base_model.as_deref(),
            Some(format!("fixtures/gemma_tiny/{name}").as_str())
        );
        // Our writer reproduces PEFT's adapter_config.json byte for byte.
        let text = std::fs::read_to_string(
            peft_dir(name)
                .join("peft_written")
                .join(ADAPTER_CONFIG_FILE),
        );
        assert_eq!(cfg.to_json(), text.unwrap(), "{name}");
    }
}

#[test]
fn a_peft_written_adapter_gives_peft_logits() {
    for name in MODELS {
        let expected = load(&peft_dir(name).join("expected.safetensors"));
        let ids = ids_of(&expected);
        let want = &expected["logits"];

        // Our training model.
        let m = LoraModel::load(&tiny(name), &Device::Cpu, spec(BaseFormat::Nf4)).unwrap();
        let before = m.model().forward(&ids, 0, None, None).unwrap();
        let cfg = load_adapter_weights(&peft_dir(name).join("peft_written"), m.adapters()).unwrap();
        assert_eq!(cfg.rank, 4);
        let got = m.model().forward(&ids, 0, None, None).unwrap();
        let d = max_abs_diff(&got, want);
        assert!(d <= 1e-4, "{name}: logits differ from PEFT's by {d}");
        // The adapter matters: without it the logits are far off.
        let off = max_abs_diff(&before, want);
        assert!(
            off > 0.5,
            "{name}: the adapter changes the logits by only {off}"
        );

        // The model crate's QLoraBuilder (what `generate --adapter` builds) with the same file.
        let mut b = QLoraBuilder::new(&Device::Cpu);
        b.rank = cfg.rank;
        b.alpha = cfg.alpha;
        b.dropout = cfg.dropout;
        b.rslora = cfg.rslora;
        b.targets = cfg.targets.clone();
        let q = load_gemma_with(&tiny(name), &Device::Cpu, &mut b).unwrap();
        load_adapter_weights(&peft_dir(name).join("peft_written"), b.adapters()).unwrap();
        let d = max_abs_diff(&q.forward(&ids, 0, None, None).unwrap(), want);
        assert!(
            d <= 1e-4,
            "{name}: QLoraBuilder logits differ from PEFT's by {d}"
        );
        eprintln!(
            "{name}: PEFT-written adapter, logits within {d:.2e} (|logits| {:.1})",
            max_abs(want)
        );
    }
}

#[test]
fn lora_gradients_equal_peft_and_no_frozen_weight_gets_one() {
    for name in MODELS {
        let (expected, ids, labels) = fixture_batch(name);
        let m = peft_trained(name, spec(BaseFormat::Nf4));
        m.set_training(true); // dropout 0: train mode is the same function

        let hidden = m.model().forward_hidden(&ids, 0, None, None).unwrap();
        let loss = m.model().chunked_lm_loss(&hidden, &labels, 7).unwrap();
        // 2 x 23 predicted positions, minus 2 x 7 prompt labels (positions 1..8) and 4 tail.
        assert_eq!(loss.tokens, 2 * 23 - 2 * 7 - 4);
        let mean = loss.mean().unwrap();
        let want_loss = expected["loss"].to_vec1::<f32>().unwrap()[0];
        let got_loss = mean.to_scalar::<f32>().unwrap();
        let rel = ((got_loss - want_loss) / want_loss).abs();
        assert!(rel < 1e-5, "{name}: loss {got_loss} vs PEFT {want_loss}");
        let grads = mean.backward().unwrap();

        // Every LoRA variable has a gradient, and no tensor in the store is shaped like a
        // frozen weight (NF4 projections, embedding / tied lm_head, norms): those never enter
        // the graph as tracked tensors, and their products backpropagate only `dx`. (candle's
        // store also keeps the activation-shaped gradients its matmul / broadcast backward
        // computes for untracked operands, e.g. the broadcast RoPE tables and norm scales:
        // [batch, .., seq, ..] shapes, listed in the failure message if one ever matches.)
        let vars = m.vars();
        assert_eq!(vars.len(), 2 * 7 * m.model().config().num_hidden_layers);
        for v in &vars {
            assert!(
                grads.get(v.as_tensor()).is_some(),
                "{name}: a LoRA var lacks its gradient"
            );
        }
        assert!(grads.get(m.model().embed_tokens()).is_none());
        let c = m.model().config();
        let (h, hd, inter) = (c.hidden_size, c.head_dim, c.intermediate_size);
        let (q, kv) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
        let mut frozen: Vec<Vec<usize>> = vec![vec![c.vocab_size, h], vec![h], vec![hd]];
        for (o, i) in [(q, h), (kv, h), (h, q), (inter, h), (h, inter)] {
            frozen.push(vec![o, i]);
            frozen.push(vec![i, o]);
        }
        let var_ids: HashSet<_> = vars.iter().map(|v| v.id()).collect();
        let others: Vec<Vec<usize>> = grads
            .get_ids()
            .filter(|id| !var_ids.contains(id))
            .map(|id| grads.get_id(*id).unwrap().dims().to_vec())
            .collect();
        for shape in &others {
            assert!(
                !frozen.contains(shape),
                "{name}: a frozen-weight-shaped gradient {shape:?} exists (all non-LoRA: {others:?})"
            );
        }

        let compare = |what: &str, grads: &candle_core::backprop::GradStore| {
            let mut worst = 0f32;
            let mut seen = 0;
            for a in m.adapters() {
                for (half, var) in [(Half::A, &a.a), (Half::B, &a.b)] {
                    let key = peft_key(a.layer.unwrap(), a.role, half);
                    let want = &expected[&format!("grad.{key}")];
                    let got = grads.get(var.as_tensor()).unwrap();
                    let rel = max_abs_diff(got, want) / max_abs(want);
                    assert!(
                        rel < 1e-4,
                        "{name} {what}: d {key} differs by {rel:.2e} (relative)"
                    );
                    worst = worst.max(rel);
                    seen += 1;
                }
            }
            let fixture_grads = expected.keys().filter(|k| k.starts_with("grad.")).count();
            assert_eq!(seen, fixture_grads, "{name}: every PEFT gradient compared");
            eprintln!("{name} {what}: {seen} LoRA gradients within {worst:.2e} relative of PEFT's");
        };
        compare("autograd", &grads);
        // The trainer's entry point, plain and with per-layer activation recompute.
        for recompute in [false, true] {
            let lg = m
                .model()
                .loss_and_grads(&ids, &labels, 7, 1.0 / loss.tokens as f64, recompute)
                .unwrap();
            assert_eq!(lg.tokens, loss.tokens);
            let rel = ((lg.loss_sum / lg.tokens as f64) as f32 - want_loss).abs() / want_loss;
            assert!(
                rel < 1e-5,
                "{name} recompute {recompute}: loss off by {rel:.2e}"
            );
            assert_eq!(
                lg.grads.get_ids().count(),
                vars.len(),
                "only LoRA gradients kept"
            );
            compare(&format!("loss_and_grads(recompute {recompute})"), &lg.grads);
        }
    }
}

/// Activation recompute replays the dropout masks: with dropout on, its gradients are the
/// plain path's (the same ops in the same order; only candle's accumulation order inside the
/// backward may differ), and a second micro-batch (the next clock tick) draws other masks.
#[test]
fn recompute_replays_dropout_and_matches_the_plain_gradients() {
    for name in MODELS {
        let (_, ids, labels) = fixture_batch(name);
        let mut s = spec(BaseFormat::Nf4);
        s.lora.dropout = 0.3;
        let m = peft_trained(name, s);
        m.set_training(true);
        let run = |tick: u64, recompute: bool| {
            m.set_dropout_clock(tick);
            m.model()
                .loss_and_grads(&ids, &labels, 5, 0.01, recompute)
                .unwrap()
        };
        let plain = run(1, false);
        let again = run(1, true);
        let other = run(2, true);
        assert_eq!(
            plain.loss_sum, again.loss_sum,
            "{name}: same masks, same loss"
        );
        assert_ne!(
            plain.loss_sum, other.loss_sum,
            "{name}: a new tick draws new masks"
        );
        let mut worst = 0f32;
        for v in m.vars() {
            let (p, r) = (
                plain.grads.get(v.as_tensor()).unwrap(),
                again.grads.get(v.as_tensor()).unwrap(),
            );
            let rel = max_abs_diff(p, r) / max_abs(p).max(f32::MIN_POSITIVE);
            worst = worst.max(rel);
        }
        assert!(
            worst < 1e-5,
            "{name}: recompute gradients differ by {worst:.2e}"
        );

        // No loss position: zero loss, every gradient zero (or absent), and no error.
        let ignored = labels.ones_like().unwrap().affine(0.0, -100.0).unwrap();
        let none = m
            .model()
            .loss_and_grads(&ids, &ignored, 5, 1.0, true)
            .unwrap();
        assert_eq!((none.tokens, none.loss_sum), (0, 0.0));
        for id in none.grads.get_ids() {
            assert_eq!(max_abs(none.grads.get_id(*id).unwrap()), 0.0, "{name}");
        }
    }
}

/// The A/B values of the adapter we write for PEFT to load (the script's `formula_value`).
fn formula(layer: usize, module: usize, half: Half, i: usize, j: usize) -> f32 {
    let (off, amp) = match half {
        Half::A => (0.0, 0.12),
        Half::B => (0.5, 0.08),
    };
    let x = 0.37 * layer as f64 + 0.11 * module as f64 + 0.013 * i as f64 + 0.007 * j as f64 + off;
    (amp * (17.0 * x + 0.3 * i as f64 - 0.2 * j as f64).sin()) as f32
}

#[test]
fn peft_loads_our_adapter_and_gives_our_logits() {
    let bless = std::env::var_os("RUPANTOR_BLESS").is_some();
    for name in MODELS {
        let m = LoraModel::load(&tiny(name), &Device::Cpu, spec(BaseFormat::Nf4)).unwrap();
        for a in m.adapters() {
            let module = ALL_TARGETS.iter().position(|&r| r == a.role).unwrap();
            for (half, var) in [(Half::A, &a.a), (Half::B, &a.b)] {
                let (r, c) = var.dims2().unwrap();
                let v: Vec<f32> = (0..r * c)
                    .map(|k| formula(a.layer.unwrap(), module, half, k / c, k % c))
                    .collect();
                var.set(&Tensor::from_vec(v, (r, c), &Device::Cpu).unwrap())
                    .unwrap();
            }
        }
        let cfg = AdapterConfig::from_lora(
            &m.spec().lora,
            &m.spec().targets,
            Some(&format!("fixtures/gemma_tiny/{name}")),
        );
        let tmp = tempfile::tempdir().unwrap();
        save_adapter(tmp.path(), &cfg, m.adapters()).unwrap();
        let committed = peft_dir(name).join("ours");
        if bless {
            save_adapter(&committed, &cfg, m.adapters()).unwrap();
        }
        // The committed files PEFT was given are exactly what our writer produces.
        for f in [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE] {
            let fresh = std::fs::read(tmp.path().join(f)).unwrap();
            let old = std::fs::read(committed.join(f)).unwrap_or_else(|e| {
                panic!("{name}/ours/{f}: {e} (RUPANTOR_BLESS=1 writes it; see the script)")
            });
            assert!(
                fresh == old,
                "{name}: our {f} changed since PEFT checked it"
            );
        }
        // Every key is PEFT's and both halves of every adapter are there.
        let (_, w) = read_adapter(&committed).unwrap();
        assert_eq!(w.tensors.len(), m.adapters().len() * 2);
        assert!(w.tensors.keys().all(|k| parse_peft_key(k).is_some()));
        let q0 = &w.tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"];
        assert_eq!(q0.0, vec![4, 64]);
        let d0 = &w.tensors["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"];
        assert_eq!(d0.0, vec![64, 4]);

        let ours_logits = peft_dir(name).join("ours_logits.safetensors");
        if bless && !ours_logits.exists() {
            eprintln!(
                "{name}: run the script's check mode to make {}",
                ours_logits.display()
            );
            continue;
        }
        let want = &load(&ours_logits)["logits"];
        let expected = load(&peft_dir(name).join("expected.safetensors"));
        let got = m
            .model()
            .forward(&ids_of(&expected), 0, None, None)
            .unwrap();
        let d = max_abs_diff(&got, want);
        assert!(d <= 1e-4, "{name}: PEFT with our adapter differs by {d}");
        eprintln!("{name}: PEFT with our adapter, logits within {d:.2e}");
    }
}

#[test]
fn loading_into_another_rank_or_target_set_fails_clearly() {
    let dir = peft_dir("gemma2").join("peft_written");
    let mut s = spec(BaseFormat::Dense);
    s.lora.rank = 8;
    let m = LoraModel::load(&tiny("gemma2"), &Device::Cpu, s).unwrap();
    let e = load_adapter_weights(&dir, m.adapters())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(ADAPTER_WEIGHTS_FILE) && e.contains("expected [8, 64]"),
        "{e}"
    );
    let mut s = spec(BaseFormat::Dense);
    s.targets = vec![LinearRole::QProj, LinearRole::VProj];
    let m = LoraModel::load(&tiny("gemma2"), &Device::Cpu, s).unwrap();
    let e = load_adapter_weights(&dir, m.adapters())
        .unwrap_err()
        .to_string();
    assert!(e.contains("no adapter on"), "{e}");
}
