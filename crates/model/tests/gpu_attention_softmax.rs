//! The fused attention probabilities (`rupantor_model::ops::attention_softmax`) on a CUDA GPU
//! against the same op on the CPU, forward and backward (through candle's autograd, so the
//! backward op's launch is covered too): keys per row 1, 7 (one warp), 512 (the 9B train
//! step), 4100 (past Gemma-2's 4096 window: 1024 threads, each looping) and 9000 (past the
//! kernel's shared-memory cache of 8192 logits, so every pass recomputes them); with and without
//! a softcap; a causal mask shared by the batch, a per-row mask with left padding and a fully
//! masked query row, and that per-row mask with -inf instead of f32::MIN (the kernel's uniform
//! branch).
//!
//! The kernels do the CPU's f32 operations in its order (no FMA), so the differences are the
//! last bits of `tanhf` / `expf` (2 ulp each) and the order of the row sums (the CPU's is f64).
//! With logits up to about 8, that is a few 1e-6 relative in f32; the bounds asserted:
//!
//! * probabilities: f32 within 2e-5 relative; bf16 within 2^-7 relative (one ulp: two roundings
//!   of values that close land on the same or adjacent bf16 values); f16 within 2^-10 relative
//!   plus 2^-24 (its subnormal spacing, reached by the smallest probabilities); masked keys 0 and
//!   fully masked rows 1 / k on both;
//! * the scores' gradient `ds = p * (g - sum(g * p)) * (1 - t^2) * scale`: per element within
//!   `rel * (|ds| + scale * p * max|g|)`, the second term bounding what the probabilities' own
//!   differences (and the cancellation in `g - sum(g * p)`) carry into it: rel 4e-5 in f32,
//!   2^-6 in bf16 (p one ulp apart, then one rounding of ds), 2^-9 in f16 plus 2^-20.
//!
//! Each comparison prints its largest relative difference and how many elements differ at all.
//! Without a GPU each test prints `SKIPPED <test>: <reason>` and passes; with
//! `RUPANTOR_REQUIRE_GPU=1` a missing GPU fails it.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Result, Tensor, Var};
use rupantor_model::ops::attention_softmax::attention_probs;

use rupantor_model::device::gpu_for_test as gpu;

/// gemma.rs's `MASKED`.
const MASKED: f32 = f32::MIN;

/// Logits up to about 8 in magnitude; the cap of 5 bends them well into tanh's curve.
const SCALE: f64 = 4.0;

/// `[batch, heads, q]` of every case; the keys vary.
const ROWS: (usize, usize, usize) = (2, 2, 6);

const KEYS: [usize; 5] = [1, 7, 512, 4100, 9000];

/// Deterministic values in about [-2, 2]; bf16-exact (so exact in every dtype), so both devices'
/// ops, and every dtype, see the same scores and upstream gradients.
fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let k = (i * 7919 + seed * 104_729) % 2003;
            half::bf16::from_f32((k as f32 - 1001.0) / 500.0).to_f32()
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum MaskKind {
    /// Causal `[1, 1, q, k]`, shared by the batch.
    Shared,
    /// Causal `[b, 1, q, k]`; batch row r > 0 masks its first `3r` keys (left padding) and
    /// every key of its first query.
    PerRow,
    /// `PerRow` with -inf where gemma.rs puts f32::MIN.
    PerRowInf,
}

/// The mask for `keys` keys, the queries at the last q positions (all at key 0 when k < q).
fn mask(keys: usize, kind: MaskKind) -> Result<Tensor> {
    let (b, _, q) = ROWS;
    let (rows, masked) = match kind {
        MaskKind::Shared => (1, MASKED),
        MaskKind::PerRow => (b, MASKED),
        MaskKind::PerRowInf => (b, f32::NEG_INFINITY),
    };
    let mut m = Vec::with_capacity(rows * q * keys);
    for r in 0..rows {
        for i in 0..q {
            let pos = (keys + i).saturating_sub(q);
            for j in 0..keys {
                let hidden = j > pos || (r > 0 && (j < 3 * r || i == 0));
                m.push(if hidden { masked } else { 0.0 });
            }
        }
    }
    Tensor::from_vec(m, (rows, 1, q, keys), &Device::Cpu)
}

/// The probabilities and the scores' gradient for the loss `sum(p * w)` on `dev` (so the
/// upstream gradient is exactly `w` on both devices), both brought back to the CPU.
fn probs_and_grad(
    dev: &Device,
    keys: usize,
    dtype: DType,
    cap: Option<f64>,
    kind: MaskKind,
) -> Result<(Tensor, Tensor)> {
    let (b, h, q) = ROWS;
    let shape = (b, h, q, keys);
    let n = b * h * q * keys;
    let on = |v: Vec<f32>| -> Result<Tensor> {
        Tensor::from_vec(v, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)
    };
    let s = Var::from_tensor(&on(values(n, keys))?)?;
    let p = attention_probs(&s, SCALE, cap, &mask(keys, kind)?.to_device(dev)?)?;
    let w = on(values(n, keys + 1))?;
    let grads = (&p * &w)?.sum_all()?.backward()?;
    let ds = grads
        .get(&s)
        .ok_or_else(|| candle_core::Error::msg("no gradient for the scores"))?;
    Ok((p.to_device(&Device::Cpu)?, ds.to_device(&Device::Cpu)?))
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Asserts `|gpu - cpu| <= tol(i)` elementwise and prints the largest relative difference.
fn compare(what: &str, gpu: &[f32], cpu: &[f32], tol: impl Fn(usize) -> f32) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths");
    let mut differ = 0;
    let mut worst = 0f32;
    for (i, (&g, &c)) in gpu.iter().zip(cpu).enumerate() {
        assert!(
            g.is_finite() && c.is_finite(),
            "{what}: element {i}: {g} vs {c}"
        );
        let d = (g - c).abs();
        assert!(
            d <= tol(i),
            "{what}: element {i}: gpu {g} vs cpu {c} (|d| = {d:e}, bound {:e})",
            tol(i)
        );
        if d > 0.0 {
            differ += 1;
            worst = worst.max(d / c.abs().max(f32::MIN_POSITIVE));
        }
    }
    eprintln!(
        "{what}: {differ}/{} differ, largest relative {worst:e}",
        gpu.len()
    );
}

/// `rel` and `abs` of the probabilities' bound, and of the gradient's (see the module doc).
struct Bounds {
    p_rel: f32,
    p_abs: f32,
    ds_rel: f32,
    ds_abs: f32,
}

fn check_dtype(test: &str, dtype: DType, b: Bounds) {
    let Some(dev) = gpu(test) else { return };
    for keys in KEYS {
        for cap in [None, Some(5.0)] {
            for kind in [MaskKind::Shared, MaskKind::PerRow, MaskKind::PerRowInf] {
                let what = format!("{dtype:?} k {keys} cap {cap:?} {kind:?}");
                let (p_gpu, ds_gpu) = probs_and_grad(&dev, keys, dtype, cap, kind).unwrap();
                let (p_cpu, ds_cpu) = probs_and_grad(&Device::Cpu, keys, dtype, cap, kind).unwrap();
                assert_eq!(p_gpu.dtype(), dtype, "{what}");
                assert_eq!(ds_gpu.dtype(), dtype, "{what}");
                let (pg, pc) = (flat(&p_gpu), flat(&p_cpu));
                compare(&format!("{what}: probabilities"), &pg, &pc, |i| {
                    b.p_rel * pc[i].abs() + b.p_abs
                });
                // The mask's zeros and the uniform rows are exact on both.
                let m = flat(&mask(keys, kind).unwrap());
                let (bs, h, q) = ROWS;
                for row in 0..bs * h * q {
                    let mrow = match kind {
                        MaskKind::Shared => row % q,
                        _ => (row / (h * q)) * q + row % q,
                    };
                    let mr = &m[mrow * keys..(mrow + 1) * keys];
                    let pr = &pg[row * keys..(row + 1) * keys];
                    if mr.iter().all(|&v| v < -1e30) {
                        assert!(
                            pr.iter().zip(&pc[row * keys..]).all(|(g, c)| g == c),
                            "{what}: fully masked row {row} differs"
                        );
                    } else {
                        assert!(
                            mr.iter().zip(pr).all(|(&m, &p)| m == 0.0 || p == 0.0),
                            "{what}: row {row} gives weight to a masked key"
                        );
                    }
                }
                // The upstream gradient is w (see `probs_and_grad`).
                let gmax = values(pc.len(), keys + 1)
                    .into_iter()
                    .fold(0f32, |a, v| a.max(v.abs()));
                let dc = flat(&ds_cpu);
                compare(&format!("{what}: gradient"), &flat(&ds_gpu), &dc, |i| {
                    b.ds_rel * (dc[i].abs() + SCALE as f32 * pc[i] * gmax) + b.ds_abs
                });
            }
        }
    }
}

#[test]
fn f32_forward_and_backward_match_the_cpu() {
    check_dtype(
        "f32_forward_and_backward_match_the_cpu",
        DType::F32,
        Bounds {
            p_rel: 2e-5,
            p_abs: 0.0,
            ds_rel: 4e-5,
            ds_abs: 0.0,
        },
    );
}

#[test]
fn bf16_forward_and_backward_match_the_cpu() {
    check_dtype(
        "bf16_forward_and_backward_match_the_cpu",
        DType::BF16,
        Bounds {
            p_rel: 2f32.powi(-7),
            p_abs: 0.0,
            ds_rel: 2f32.powi(-6),
            ds_abs: 0.0,
        },
    );
}

#[test]
fn f16_forward_and_backward_match_the_cpu() {
    check_dtype(
        "f16_forward_and_backward_match_the_cpu",
        DType::F16,
        Bounds {
            p_rel: 2f32.powi(-10),
            p_abs: 2f32.powi(-24),
            ds_rel: 2f32.powi(-9),
            ds_abs: 2f32.powi(-20),
        },
    );
}
