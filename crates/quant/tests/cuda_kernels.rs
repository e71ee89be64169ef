//! GPU tests of kernels/nf4.cu: bit-exact dequantization against the CPU codec, and the fused GEMV
//! against a CPU reference. Each test runs only when a CUDA device is present at run time and
//! otherwise prints why it skipped; `RUPANTOR_REQUIRE_GPU=1` turns a missing device into a
//! failure (use it in GPU sessions so a skip cannot pass silently).
//!
//! cargo test -p rupantor-quant --features cuda --test cuda_kernels -- --nocapture
//! cargo test -p rupantor-quant --features cuda --test cuda_kernels -- --ignored --nocapture  # GB/s
#![cfg(feature = "cuda")]

use half::bf16;
use rupantor_quant::cuda::{self, CudaError, Nf4Cuda, OutDtype};
use rupantor_quant::Nf4Tensor;

fn gpu(test: &str) -> Option<Nf4Cuda> {
    let required = std::env::var("RUPANTOR_REQUIRE_GPU").is_ok_and(|v| v == "1");
    match cuda::cuda_device_count() {
        Ok(n) if n > 0 => {
            Some(Nf4Cuda::new(0).unwrap_or_else(|e| panic!("{test}: a GPU is present but {e}")))
        }
        Ok(_) | Err(CudaError::NoDriver) if !required => {
            eprintln!("SKIPPED {test}: no CUDA device (set RUPANTOR_REQUIRE_GPU=1 to make this a failure)");
            None
        }
        Ok(_) => panic!("{test}: RUPANTOR_REQUIRE_GPU=1 but no CUDA device is visible"),
        Err(e) => panic!("{test}: {e}"),
    }
}

/// xorshift64*: reproducible inputs without a dependency.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// Roughly normal (sum of four uniforms), unit-ish variance.
    fn normal(&mut self) -> f32 {
        (self.uniform() + self.uniform() + self.uniform() + self.uniform()) * 0.866
    }
}

/// Weights whose 64-element blocks vary in scale from 1e-37 (subnormal products) to 1e6, with
/// all-zero blocks and single spikes mixed in.
fn varied_weights(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng(seed);
    let scales = [0.02f32, 1.0, 1e-37, 1e-20, 3e3, 1e6, 0.0, 0.5];
    let mut x = vec![0f32; n];
    for (b, block) in x.chunks_mut(64).enumerate() {
        let s = scales[(rng.next_u64() as usize + b) % scales.len()];
        for v in block.iter_mut() {
            *v = rng.normal() * s;
        }
        if b % 11 == 5 {
            block[block.len() / 2] = 40.0 * s;
        }
    }
    x
}

/// Sizes: below one word, odd, a partial last block, exactly a tile, across nested (256-block)
/// boundaries, and large enough for many thread blocks.
const SIZES: [usize; 12] = [
    1,
    3,
    7,
    63,
    64,
    65,
    1001,
    8192,
    8193,
    64 * 256 + 3,
    64 * 256 * 3 + 17,
    (1 << 20) + 5,
];

fn bits_f32(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn first_mismatch<T: PartialEq + std::fmt::Debug>(gpu: &[T], cpu: &[T]) -> Option<String> {
    assert_eq!(gpu.len(), cpu.len());
    gpu.iter()
        .zip(cpu)
        .enumerate()
        .find(|(_, (g, c))| g != c)
        .map(|(i, (g, c))| {
            let count = gpu.iter().zip(cpu).filter(|(g, c)| g != c).count();
            format!("{count} mismatches, first at {i}: gpu {g:?} cpu {c:?}")
        })
}

#[test]
fn dequantize_is_bit_exact_with_the_cpu() {
    let Some(k) = gpu("dequantize_is_bit_exact_with_the_cpu") else {
        return;
    };
    let stream = k.stream().clone();
    for (case, &n) in SIZES.iter().enumerate() {
        let x = varied_weights(n, 0x9e37_79b9 + case as u64);
        let t = Nf4Tensor::quantize_f32(&x, &[n]);
        let d = k.upload(&t).unwrap();

        let gpu_f32 = stream.clone_dtoh(&k.dequantize_f32(&d).unwrap()).unwrap();
        let cpu_f32 = t.dequantize();
        assert_eq!(
            first_mismatch(&bits_f32(&gpu_f32), &bits_f32(&cpu_f32)),
            None,
            "f32, n={n}"
        );

        let gpu_bf16 = stream.clone_dtoh(&k.dequantize_bf16(&d).unwrap()).unwrap();
        let cpu_bf16 = t.dequantize_bf16();
        let (g, c): (Vec<u16>, Vec<u16>) = (
            gpu_bf16.iter().map(|v| v.to_bits()).collect(),
            cpu_bf16.iter().map(|v| v.to_bits()).collect(),
        );
        assert_eq!(first_mismatch(&g, &c), None, "bf16, n={n}");

        let gpu_f16 = stream.clone_dtoh(&k.dequantize_f16(&d).unwrap()).unwrap();
        let cpu_f16 = t.dequantize_f16();
        let (g, c): (Vec<u16>, Vec<u16>) = (
            gpu_f16.iter().map(|v| v.to_bits()).collect(),
            cpu_f16.iter().map(|v| v.to_bits()).collect(),
        );
        assert_eq!(first_mismatch(&g, &c), None, "f16, n={n}");
    }
}

#[test]
fn misaligned_output_takes_the_scalar_path_and_stays_exact() {
    let Some(k) = gpu("misaligned_output_takes_the_scalar_path_and_stays_exact") else {
        return;
    };
    let stream = k.stream().clone();
    let n = 64 * 40 + 9;
    let x = varied_weights(n, 7);
    let t = Nf4Tensor::quantize_bf16(
        &x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>(),
        &[n],
    );
    let d = k.upload(&t).unwrap();
    // Output starts one element into the allocation: 2-byte aligned, never 16-byte aligned.
    let mut buf = stream.alloc_zeros::<bf16>(n + 1).unwrap();
    k.dequantize_into(&d, &mut buf.slice_mut(1..)).unwrap();
    let got = stream.clone_dtoh(&buf).unwrap();
    assert_eq!(got[0].to_bits(), 0, "wrote before the output view");
    let g: Vec<u16> = got[1..].iter().map(|v| v.to_bits()).collect();
    let c: Vec<u16> = t.dequantize_bf16().iter().map(|v| v.to_bits()).collect();
    assert_eq!(first_mismatch(&g, &c), None);
}

#[test]
fn dequantize_rejects_a_wrong_output_length() {
    let Some(k) = gpu("dequantize_rejects_a_wrong_output_length") else {
        return;
    };
    let t = Nf4Tensor::quantize_f32(&varied_weights(100, 3), &[100]);
    let d = k.upload(&t).unwrap();
    let mut out = k.stream().alloc_zeros::<f32>(99).unwrap();
    assert!(matches!(
        k.dequantize_into(&d, &mut out.as_view_mut()),
        Err(CudaError::Invalid(_))
    ));
}

/// f64 reference of `y = x . W^T` from the CPU f32 dequantization, and `sum |x * w|` per output
/// (the scale of the f32 accumulation error).
fn gemv_reference(
    w: &[f32],
    x: &[bf16],
    batch: usize,
    out: usize,
    inp: usize,
) -> (Vec<f64>, Vec<f64>) {
    let mut y = vec![0f64; batch * out];
    let mut mag = vec![0f64; batch * out];
    for b in 0..batch {
        for o in 0..out {
            let (mut s, mut m) = (0f64, 0f64);
            for i in 0..inp {
                let p = f64::from(x[b * inp + i].to_f32()) * f64::from(w[o * inp + i]);
                s += p;
                m += p.abs();
            }
            y[b * out + o] = s;
            mag[b * out + o] = m;
        }
    }
    (y, mag)
}

/// Tolerance: the result is rounded once to bf16 (relative error <= 2^-8 including the f32 sum's
/// error feeding into it) and accumulated in f32 over `in` terms in a different order from the
/// reference (bounded well within 2^-15 * sum |x w| for in <= 4096).
#[test]
fn gemv_matches_a_cpu_reference_within_bf16_tolerance() {
    let Some(k) = gpu("gemv_matches_a_cpu_reference_within_bf16_tolerance") else {
        return;
    };
    let stream = k.stream().clone();
    // (out, in, batch): fast path (in % 8 == 0), element path (in % 8 != 0, rows start mid-byte
    // and mid-block), batch > 8 (two batch tiles), a row count that is not a multiple of 8.
    let cases = [
        (37, 256, 1),
        (300, 1024, 8),
        (64, 4096, 4),
        (33, 100, 3),
        (5, 13, 2),
        (17, 72, 9),
        (130, 2304, 12),
    ];
    for (case, &(out, inp, batch)) in cases.iter().enumerate() {
        let mut rng = Rng(1234 + case as u64);
        let w: Vec<f32> = (0..out * inp).map(|_| rng.normal() * 0.05).collect();
        let x: Vec<bf16> = (0..batch * inp)
            .map(|_| bf16::from_f32(rng.normal()))
            .collect();
        let t = Nf4Tensor::quantize_f32(&w, &[out, inp]);
        let d = k.upload(&t).unwrap();
        let xd = stream.clone_htod(&x).unwrap();
        let y = stream
            .clone_dtoh(&k.gemv_bf16(&d, &xd, batch).unwrap())
            .unwrap();
        let (want, mag) = gemv_reference(&t.dequantize(), &x, batch, out, inp);
        for (j, ((&g, &r), &m)) in y.iter().zip(&want).zip(&mag).enumerate() {
            let g = f64::from(g.to_f32());
            let tol = r.abs() * 2f64.powi(-8) + m * 2f64.powi(-15) + 1e-30;
            assert!(
                (g - r).abs() <= tol,
                "out={out} in={inp} batch={batch}: y[{}][{}] = {g}, reference {r} (tolerance {tol})",
                j / out,
                j % out
            );
        }
    }
}

#[test]
fn gemv_rejects_bad_shapes() {
    let Some(k) = gpu("gemv_rejects_bad_shapes") else {
        return;
    };
    let t = Nf4Tensor::quantize_f32(&varied_weights(64, 1), &[64]);
    let d = k.upload(&t).unwrap();
    let x = k.stream().alloc_zeros::<bf16>(64).unwrap();
    assert!(
        matches!(k.gemv_bf16(&d, &x, 1), Err(CudaError::Invalid(_))),
        "1-D weight accepted"
    );
    let t = Nf4Tensor::quantize_f32(&varied_weights(64, 1), &[8, 8]);
    let d = k.upload(&t).unwrap();
    assert!(
        matches!(k.gemv_bf16(&d, &x, 2), Err(CudaError::Invalid(_))),
        "x of the wrong length accepted"
    );
}

/// The GB/s figure for the README: dequantization vs a device-to-device copy of the same output
/// size, in the same run. Ignored by default (it takes seconds and prints a measurement).
#[test]
#[ignore = "measurement; run with --ignored --nocapture on a GPU"]
fn dequant_bandwidth_vs_device_copy() {
    let Some(k) = gpu("dequant_bandwidth_vs_device_copy") else {
        return;
    };
    let (rows, cols) = (8192usize, 8192usize);
    let mut rng = Rng(42);
    let w: Vec<f32> = (0..rows * cols).map(|_| rng.normal() * 0.02).collect();
    let t = Nf4Tensor::quantize_f32(&w, &[rows, cols]);
    let d = k.upload(&t).unwrap();
    eprintln!("device arch {}, tensor [{rows}, {cols}]", k.arch());
    for dtype in [OutDtype::F32, OutDtype::Bf16, OutDtype::F16] {
        let r = k.measure_dequant_bandwidth(&d, dtype, 5, 20).unwrap();
        eprintln!("{r}");
        assert_eq!(r.output_bytes, rows * cols * dtype.size());
        assert!(
            r.dequant_ms > 0.0 && r.copy_ms > 0.0 && r.ratio().is_finite(),
            "{r:?}"
        );
    }
    // The timed kernel produced the right numbers.
    let got = k
        .stream()
        .clone_dtoh(&k.dequantize_bf16(&d).unwrap())
        .unwrap();
    let (g, c): (Vec<u16>, Vec<u16>) = (
        got.iter().map(|v| v.to_bits()).collect(),
        t.dequantize_bf16().iter().map(|v| v.to_bits()).collect(),
    );
    assert_eq!(first_mismatch(&g, &c), None);
}
