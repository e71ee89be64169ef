//! The fused rotary embedding (`rupantor_model::ops::rope`) on a CUDA GPU against the same op on
//! the CPU, forward and backward: head_dim 64, 128 and 256 (Gemma's), shared `[seq, head_dim]`
//! and per-row `[batch, 1, seq, head_dim]` tables, tables in f32 and in x's dtype, and x as the
//! transposed view that q and k are in gemma.rs (read through its strides on the GPU).
//!
//! The kernel does the CPU loop's f32 operations in the same order (no FMA: the module is built
//! with -fmad=false and spells out each rounding) and rounds to bf16 / f16 to nearest even like
//! `half`, so the two should agree bit for bit. The bounds asserted leave room for one rounding
//! step of the output dtype: f32 within 1e-6 relative, bf16 within 2^-7 relative (one bf16 ulp)
//! and f16 within 2^-10 relative. Each comparison prints how many elements differ at all.
//!
//! Without a GPU each test prints `SKIPPED <test>: <reason>` and passes; with
//! `RUPANTOR_REQUIRE_GPU=1` a missing GPU fails it.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Result, Tensor, Var};
use rupantor_model::ops::rope::rope;

use rupantor_model::device::gpu_for_test as gpu;

/// Deterministic values in about [-2, 2]; bf16-representable (exact in every dtype), so a
/// gradient built from them reaches both devices' ops unchanged.
fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let k = (i * 7919 + seed * 104_729) % 2003;
            half::bf16::from_f32((k as f32 - 1001.0) / 500.0).to_f32()
        })
        .collect()
}

/// Rotate-half tables as gemma.rs builds them (base 10000): `[seq, dim]` for positions
/// `7..7 + seq`, or (`per_row`) `[batch, 1, seq, dim]` with row r shifted left by `3r`.
fn tables(batch: usize, seq: usize, dim: usize, per_row: bool) -> Result<(Tensor, Tensor)> {
    let rows = if per_row { batch } else { 1 };
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for r in 0..rows {
        for p in (7..7 + seq).map(|p| p.saturating_sub(3 * r)) {
            let angles: Vec<f32> = (0..dim / 2)
                .map(|i| p as f32 / 10_000f32.powf((2 * i) as f32 / dim as f32))
                .collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos()));
                sin.extend(angles.iter().map(|a| a.sin()));
            }
        }
    }
    let dev = &Device::Cpu;
    if per_row {
        let shape = (batch, 1, seq, dim);
        Ok((
            Tensor::from_vec(cos, shape, dev)?,
            Tensor::from_vec(sin, shape, dev)?,
        ))
    } else {
        Ok((
            Tensor::from_vec(cos, (seq, dim), dev)?,
            Tensor::from_vec(sin, (seq, dim), dev)?,
        ))
    }
}

/// One case: x `[batch, heads, seq, dim]` in `dtype` (the transposed view of a `[batch, seq,
/// heads, dim]` tensor when `transposed`), tables in `table_dtype`.
#[derive(Debug, Clone, Copy)]
struct Case {
    dim: usize,
    dtype: DType,
    table_dtype: DType,
    per_row: bool,
    transposed: bool,
}

const SHAPE: (usize, usize, usize) = (2, 3, 33);

/// Every combination for head_dim 64 / 128 / 256.
fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    for dim in [64, 128, 256] {
        for (dtype, table_dtype) in [
            (DType::F32, DType::F32),
            (DType::BF16, DType::BF16),
            (DType::BF16, DType::F32),
            (DType::F16, DType::F16),
            (DType::F16, DType::F32),
        ] {
            for per_row in [false, true] {
                for transposed in [false, true] {
                    out.push(Case {
                        dim,
                        dtype,
                        table_dtype,
                        per_row,
                        transposed,
                    });
                }
            }
        }
    }
    out
}

impl Case {
    /// x and the tables on the CPU.
    fn inputs(&self) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, h, s) = SHAPE;
        let d = self.dim;
        let v = values(b * h * s * d, d);
        // Cast before transposing: a cast makes its output contiguous.
        let x = if self.transposed {
            Tensor::from_vec(v, (b, s, h, d), &Device::Cpu)?
                .to_dtype(self.dtype)?
                .transpose(1, 2)?
        } else {
            Tensor::from_vec(v, (b, h, s, d), &Device::Cpu)?.to_dtype(self.dtype)?
        };
        let (cos, sin) = tables(b, s, d, self.per_row)?;
        Ok((
            x,
            cos.to_dtype(self.table_dtype)?,
            sin.to_dtype(self.table_dtype)?,
        ))
    }

    /// The relative bound of the stated tolerance (module docs).
    fn tolerance(&self) -> f32 {
        match self.dtype {
            DType::F32 => 1e-6,
            DType::BF16 => 2f32.powi(-7),
            _ => 2f32.powi(-10),
        }
    }
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Asserts `|gpu - cpu| <= rel * |cpu|` elementwise and prints how many differ.
fn compare(gpu: &Tensor, cpu: &Tensor, rel: f32, what: &str) {
    assert_eq!(gpu.dims(), cpu.dims(), "{what}: shapes");
    assert_eq!(gpu.dtype(), cpu.dtype(), "{what}: dtypes");
    let (g, c) = (flat(gpu), flat(cpu));
    let mut differ = 0;
    for (i, (a, b)) in g.iter().zip(&c).enumerate() {
        assert!(
            (a - b).abs() <= rel * b.abs(),
            "{what}: element {i}: gpu {a} vs cpu {b}"
        );
        differ += usize::from(a != b);
    }
    eprintln!("{what}: {differ} of {} elements differ", c.len());
}

#[test]
fn forward_matches_the_cpu() -> Result<()> {
    let Some(dev) = gpu("forward_matches_the_cpu") else {
        return Ok(());
    };
    for case in cases() {
        let (x, cos, sin) = case.inputs()?;
        let cpu = rope(&x, &cos, &sin)?;
        let gpu = rope(
            &x.to_device(&dev)?,
            &cos.to_device(&dev)?,
            &sin.to_device(&dev)?,
        )?;
        assert_eq!(x.is_contiguous(), !case.transposed, "{case:?}: x's layout");
        assert!(gpu.is_contiguous(), "{case:?}: output not contiguous");
        compare(&gpu, &cpu, case.tolerance(), &format!("forward {case:?}"));
    }
    Ok(())
}

/// The gradient of `sum(w * y)` with respect to x, on x's device; with `strided_grad` y is
/// transposed first, so the gradient reaches the op as a strided view.
fn grad(x: &Tensor, cos: &Tensor, sin: &Tensor, strided_grad: bool) -> Result<Tensor> {
    let var = Var::from_tensor(x)?;
    let y = rope(var.as_tensor(), cos, sin)?;
    let y = if strided_grad { y.transpose(1, 2)? } else { y };
    let w = Tensor::from_vec(values(y.elem_count(), 11), y.dims(), x.device())?;
    let loss = (y.to_dtype(DType::F32)? * w)?.sum_all()?;
    let grads = loss.backward()?;
    Ok(grads
        .get(var.as_tensor())
        .expect("x has a gradient")
        .clone())
}

#[test]
fn backward_matches_the_cpu() -> Result<()> {
    let Some(dev) = gpu("backward_matches_the_cpu") else {
        return Ok(());
    };
    for case in cases() {
        let (x, cos, sin) = case.inputs()?;
        // x itself contiguous: the Var is the tensor autograd differentiates, and whether it
        // is a view changes nothing in the backward; the gradient's own strides do.
        let x = x.contiguous()?;
        let strided_grad = case.transposed;
        let cpu = grad(&x, &cos, &sin, strided_grad)?;
        let gpu = grad(
            &x.to_device(&dev)?,
            &cos.to_device(&dev)?,
            &sin.to_device(&dev)?,
            strided_grad,
        )?;
        compare(&gpu, &cpu, case.tolerance(), &format!("backward {case:?}"));
    }
    Ok(())
}
