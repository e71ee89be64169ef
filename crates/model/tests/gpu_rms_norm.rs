//! The fused RMSNorm (`rupantor_model::ops::rms_norm`) on a CUDA GPU against the same op on
//! the CPU, forward and backward, at Gemma's row lengths (64, a head's 256, the 2B's 2304 and
//! the 9B's 3584, plus an odd 777) and 1 to 1024 rows; both launch shapes of
//! `kernels/rms_norm.cu` (a warp per row with 8 rows a block, a 512-thread block per row) and
//! a last block with idle rows.
//!
//! f32 must match tightly: every step is the same round-to-nearest operation on both sides and
//! only the order of the row sums differs (a tree of f32 sums on the GPU, an f64 sum rounded
//! once on the CPU), which moves `inv` by an ulp or two. bf16 and f16 round that f32 result
//! once, so an element can differ by one unit of the half type.
//!
//! Without a GPU each test prints `SKIPPED <test>: <reason>` and passes; with
//! `RUPANTOR_REQUIRE_GPU=1` a missing GPU fails it.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor, Var, D};
use rupantor_model::ops::rms_norm::rms_norm;

use rupantor_model::device::gpu_for_test as gpu;

const EPS: f64 = 1e-6;
const HS: [usize; 5] = [64, 256, 777, 2304, 3584];
const ROWS: [usize; 5] = [1, 3, 9, 255, 1024];

/// Reproducible values in `[-scale, scale)` plus `shift` on the CPU (xorshift).
fn filled(shape: &[usize], seed: u64, scale: f32, shift: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let data: Vec<f32> = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale + shift
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// `1 + w` with Gemma-like norm weights around zero.
fn scale_of(h: usize) -> Tensor {
    (filled(&[h], h as u64 + 3, 0.5, 0.0) + 1.0).unwrap()
}

fn to_f32_vec(t: &Tensor) -> Vec<f32> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The largest `|got - want| / (|want| + floor)` and how many elements differ at all.
fn compare(got: &Tensor, want: &Tensor, floor: f32) -> (f32, usize) {
    assert_eq!(got.dims(), want.dims());
    assert_eq!(got.dtype(), want.dtype());
    let (g, w) = (to_f32_vec(got), to_f32_vec(want));
    let rel = g
        .iter()
        .zip(&w)
        .map(|(g, w)| (g - w).abs() / (w.abs() + floor))
        .fold(0.0, f32::max);
    let differ = g.iter().zip(&w).filter(|(g, w)| g != w).count();
    (rel, differ)
}

/// The relative bound for one unit of rounding in `dtype` (a half type's ulp is at most 2^-7
/// or 2^-10 of the value), or `f32_tol` for f32.
fn tolerance(dtype: DType, f32_tol: f32) -> f32 {
    match dtype {
        DType::BF16 => 2f32.powi(-7),
        DType::F16 => 2f32.powi(-10),
        _ => f32_tol,
    }
}

/// `dx` of `sum(rms_norm(x) * w)` with `x` on `dev`, back on the CPU.
fn grad_on(dev: &Device, x: &Tensor, scale: &Tensor, w: &Tensor) -> (Tensor, Tensor) {
    let x = Var::from_tensor(&x.to_device(dev).unwrap()).unwrap();
    let y = rms_norm(x.as_tensor(), &scale.to_device(dev).unwrap(), EPS).unwrap();
    let loss = (y.to_dtype(DType::F32).unwrap() * w.to_device(dev).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let dx = grads.get(x.as_tensor()).expect("x gradient");
    (
        y.to_device(&Device::Cpu).unwrap(),
        dx.to_device(&Device::Cpu).unwrap(),
    )
}

#[test]
fn forward_matches_the_cpu() {
    let Some(dev) = gpu("forward_matches_the_cpu") else {
        return;
    };
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for h in HS {
            let scale = scale_of(h);
            let scale_d = scale.to_device(&dev).unwrap();
            for rows in ROWS {
                let x = filled(&[rows, h], (rows * h) as u64, 3.0, 0.2)
                    .to_dtype(dtype)
                    .unwrap();
                let want = rms_norm(&x, &scale, EPS).unwrap();
                let got = rms_norm(&x.to_device(&dev).unwrap(), &scale_d, EPS).unwrap();
                let (rel, differ) = compare(&got, &want, 1e-6);
                let tol = tolerance(dtype, 2e-6);
                assert!(
                    rel <= tol,
                    "{dtype:?} h {h} rows {rows}: relative error {rel} > {tol}"
                );
                // A half type rounds nearly identical f32 values: only a rare element may land
                // on the other side of a rounding boundary.
                if dtype != DType::F32 {
                    assert!(
                        differ * 100 <= rows * h,
                        "{dtype:?} h {h} rows {rows}: {differ} elements differ"
                    );
                }
            }
        }
    }
}

#[test]
fn backward_matches_the_cpu() {
    let Some(dev) = gpu("backward_matches_the_cpu") else {
        return;
    };
    for dtype in [DType::F32, DType::BF16] {
        for h in HS {
            let scale = scale_of(h);
            for rows in ROWS {
                let x = filled(&[rows, h], (rows + h) as u64, 2.0, 0.4)
                    .to_dtype(dtype)
                    .unwrap();
                let w = filled(&[rows, h], (rows * 7 + h) as u64, 1.0, 0.0);
                let (y_cpu, want) = grad_on(&Device::Cpu, &x, &scale, &w);
                let (y_gpu, got) = grad_on(&dev, &x, &scale, &w);
                assert_eq!(got.dtype(), dtype);
                let (rel, _) = compare(&y_gpu, &y_cpu, 1e-6);
                assert!(rel <= tolerance(dtype, 2e-6), "{dtype:?} h {h}: y {rel}");
                // dx = inv * (g*s - xhat*m) cancels where it is near zero, so the error is
                // measured against the gradient's scale (1% of its largest element) as well as
                // the element.
                let floor = to_f32_vec(&want.abs().unwrap().max_keepdim(D::Minus1).unwrap())
                    .into_iter()
                    .fold(0.0, f32::max)
                    * 1e-2;
                let (rel, _) = compare(&got, &want, floor);
                let tol = tolerance(dtype, 1e-5);
                assert!(
                    rel <= tol,
                    "{dtype:?} h {h} rows {rows}: gradient relative error {rel} > {tol}"
                );
            }
        }
    }
}

#[test]
fn leading_dims_strided_input_and_determinism() {
    let Some(dev) = gpu("leading_dims_strided_input_and_determinism") else {
        return;
    };
    let h = 256;
    let scale = scale_of(h);
    let scale_d = scale.to_device(&dev).unwrap();
    // [batch, seq, heads, head_dim] as the q/k norms see it, and a transposed view.
    let x = filled(&[2, 5, 8, h], 77, 2.0, 0.0)
        .to_dtype(DType::BF16)
        .unwrap();
    let x_d = x.to_device(&dev).unwrap();
    let got = rms_norm(&x_d, &scale_d, EPS).unwrap();
    let (rel, _) = compare(&got, &rms_norm(&x, &scale, EPS).unwrap(), 1e-6);
    assert!(rel <= 2f32.powi(-7), "4-d bf16: {rel}");
    let again = rms_norm(&x_d, &scale_d, EPS).unwrap();
    assert_eq!(to_f32_vec(&got), to_f32_vec(&again), "two runs differ");

    let t = filled(&[h, 40], 78, 2.0, 0.1).t().unwrap();
    let t_d = t.to_device(&dev).unwrap();
    assert!(!t_d.is_contiguous());
    let (rel, _) = compare(
        &rms_norm(&t_d, &scale_d, EPS).unwrap(),
        &rms_norm(&t, &scale, EPS).unwrap(),
        1e-6,
    );
    assert!(rel <= 2e-6, "transposed f32: {rel}");
}
