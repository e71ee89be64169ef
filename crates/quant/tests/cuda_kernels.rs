//! GPU tests of kernels/nf4.cu: bit-exact dequantization against the CPU codec (every output
//! type, tails, unaligned outputs, grids small enough that every thread loops), and the fused
//! GEMVs against an f64 CPU reference (every batch tile, lane-group size and grid of the tiled
//! kernels, the row kernel, unaligned x). Each test runs only when a CUDA device is present at
//! run time and otherwise prints why it skipped; `RUPANTOR_REQUIRE_GPU=1` turns a missing device
//! into a failure (use it in GPU sessions so a skip cannot pass silently).
//!
//! cargo test -p rupantor-quant --features cuda --test cuda_kernels -- --nocapture
//! cargo test -p rupantor-quant --features cuda --test cuda_kernels -- --ignored --nocapture  # GB/s
#![cfg(feature = "cuda")]

use half::bf16;
use rupantor_quant::cuda::{
    self, CudaError, GemvKernel, GemvPlan, Nf4Cuda, Nf4Device, OutDtype, GEMV_GROUP_LOG2,
    GEMV_TILES,
};
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

/// GPU dequantization of `t` to all three types, each compared bit for bit with the CPU codec;
/// `grid` forces the number of thread blocks.
fn check_dequant(k: &Nf4Cuda, t: &Nf4Tensor, d: &Nf4Device, grid: Option<u32>, what: &str) {
    let stream = k.stream().clone();
    let n = t.numel();
    let mut f = stream.alloc_zeros::<f32>(n).unwrap();
    let mut b = stream.alloc_zeros::<bf16>(n).unwrap();
    let mut h = stream.alloc_zeros::<half::f16>(n).unwrap();
    match grid {
        Some(g) => {
            k.dequantize_into_grid(d, &mut f.as_view_mut(), g).unwrap();
            k.dequantize_into_grid(d, &mut b.as_view_mut(), g).unwrap();
            k.dequantize_into_grid(d, &mut h.as_view_mut(), g).unwrap();
        }
        None => {
            k.dequantize_into(d, &mut f.as_view_mut()).unwrap();
            k.dequantize_into(d, &mut b.as_view_mut()).unwrap();
            k.dequantize_into(d, &mut h.as_view_mut()).unwrap();
        }
    }
    let gpu_f32 = stream.clone_dtoh(&f).unwrap();
    assert_eq!(
        first_mismatch(&bits_f32(&gpu_f32), &bits_f32(&t.dequantize())),
        None,
        "f32, {what}"
    );
    let g: Vec<u16> = stream
        .clone_dtoh(&b)
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect();
    let c: Vec<u16> = t.dequantize_bf16().iter().map(|v| v.to_bits()).collect();
    assert_eq!(first_mismatch(&g, &c), None, "bf16, {what}");
    let g: Vec<u16> = stream
        .clone_dtoh(&h)
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect();
    let c: Vec<u16> = t.dequantize_f16().iter().map(|v| v.to_bits()).collect();
    assert_eq!(first_mismatch(&g, &c), None, "f16, {what}");
}

#[test]
fn dequantize_with_few_blocks_loops_and_stays_exact() {
    let Some(k) = gpu("dequantize_with_few_blocks_loops_and_stays_exact") else {
        return;
    };
    // With 1 or 3 blocks of 256 threads every thread makes several passes of 8 chunks, the
    // last one partial, and the odd sizes leave a tail of 1..7 elements after the last chunk.
    for (case, n) in [64 * 1000 + 13, (1 << 20) + 5, 4096 * 7 + 3]
        .into_iter()
        .enumerate()
    {
        let t = Nf4Tensor::quantize_f32(&varied_weights(n, 77 + case as u64), &[n]);
        let d = k.upload(&t).unwrap();
        for grid in [1, 3] {
            check_dequant(&k, &t, &d, Some(grid), &format!("n={n}, {grid} blocks"));
        }
        check_dequant(&k, &t, &d, None, &format!("n={n}, default grid"));
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
    // Outputs that start 1 or 3 elements into their allocation: never 16-byte aligned.
    for skip in [1usize, 3] {
        let mut buf = stream.alloc_zeros::<bf16>(n + skip).unwrap();
        k.dequantize_into(&d, &mut buf.slice_mut(skip..)).unwrap();
        let got = stream.clone_dtoh(&buf).unwrap();
        assert!(
            got[..skip].iter().all(|v| v.to_bits() == 0),
            "wrote before the output view"
        );
        let g: Vec<u16> = got[skip..].iter().map(|v| v.to_bits()).collect();
        let c: Vec<u16> = t.dequantize_bf16().iter().map(|v| v.to_bits()).collect();
        assert_eq!(first_mismatch(&g, &c), None, "bf16, skip {skip}");

        let mut buf = stream.alloc_zeros::<f32>(n + skip).unwrap();
        k.dequantize_into_grid(&d, &mut buf.slice_mut(skip..), 2)
            .unwrap();
        let got = stream.clone_dtoh(&buf).unwrap();
        assert!(got[..skip].iter().all(|v| v.to_bits() == 0));
        assert_eq!(
            first_mismatch(&bits_f32(&got[skip..]), &bits_f32(&t.dequantize())),
            None,
            "f32, skip {skip}"
        );
    }
}

#[test]
fn dequantize_rejects_a_wrong_output_length_or_an_empty_grid() {
    let Some(k) = gpu("dequantize_rejects_a_wrong_output_length_or_an_empty_grid") else {
        return;
    };
    let t = Nf4Tensor::quantize_f32(&varied_weights(100, 3), &[100]);
    let d = k.upload(&t).unwrap();
    let mut out = k.stream().alloc_zeros::<f32>(99).unwrap();
    assert!(matches!(
        k.dequantize_into(&d, &mut out.as_view_mut()),
        Err(CudaError::Invalid(_))
    ));
    let mut out = k.stream().alloc_zeros::<f32>(100).unwrap();
    assert!(matches!(
        k.dequantize_into_grid(&d, &mut out.as_view_mut(), 0),
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

/// A GEMV problem with its CPU reference.
struct GemvCase {
    out: usize,
    inp: usize,
    batch: usize,
    t: Nf4Tensor,
    x: Vec<bf16>,
    want: Vec<f64>,
    mag: Vec<f64>,
}

impl GemvCase {
    fn new(out: usize, inp: usize, batch: usize, seed: u64) -> Self {
        let mut rng = Rng(seed);
        let w: Vec<f32> = (0..out * inp).map(|_| rng.normal() * 0.05).collect();
        let x: Vec<bf16> = (0..batch * inp)
            .map(|_| bf16::from_f32(rng.normal()))
            .collect();
        let t = Nf4Tensor::quantize_f32(&w, &[out, inp]);
        let (want, mag) = gemv_reference(&t.dequantize(), &x, batch, out, inp);
        GemvCase {
            out,
            inp,
            batch,
            t,
            x,
            want,
            mag,
        }
    }

    /// Tolerance: one bf16 rounding of the result (relative 2^-8, which also absorbs the f32
    /// sum's error feeding into it) plus the f32 accumulation, whose worst case for these
    /// kernels (at most 32 + steps + 8 + 2 roundings on any path) stays below 2^-15 sum |x w|.
    fn check(&self, y: &[bf16], what: &str) {
        assert_eq!(y.len(), self.batch * self.out);
        for (j, ((&g, &r), &m)) in y.iter().zip(&self.want).zip(&self.mag).enumerate() {
            let g = f64::from(g.to_f32());
            let tol = r.abs() * 2f64.powi(-8) + m * 2f64.powi(-15) + 1e-30;
            assert!(
                (g - r).abs() <= tol,
                "[{}, {}] batch {} ({what}): y[{}][{}] = {g}, reference {r} (tolerance {tol})",
                self.out,
                self.inp,
                self.batch,
                j / self.out,
                j % self.out
            );
        }
    }
}

/// Runs `plan` (or the default launch) on `case` with x starting `skip` elements into its
/// buffer, and checks y.
fn run_gemv(k: &Nf4Cuda, case: &GemvCase, d: &Nf4Device, plan: Option<&GemvPlan>, skip: usize) {
    let stream = k.stream();
    let mut xbuf = vec![bf16::from_f32(7.0); skip];
    xbuf.extend_from_slice(&case.x);
    let xd = stream.clone_htod(&xbuf).unwrap();
    let xs = xd.slice(skip..);
    let mut y = stream.alloc_zeros::<bf16>(case.batch * case.out).unwrap();
    match plan {
        Some(p) => k
            .gemv_bf16_into_planned(d, &xs, case.batch, &mut y.as_view_mut(), p)
            .unwrap(),
        None => k
            .gemv_bf16_into(d, &xs, case.batch, &mut y.as_view_mut())
            .unwrap(),
    }
    let got = stream.clone_dtoh(&y).unwrap();
    case.check(&got, &format!("{plan:?}, x offset {skip}"));
}

#[test]
fn gemv_matches_a_cpu_reference_within_bf16_tolerance() {
    let Some(k) = gpu("gemv_matches_a_cpu_reference_within_bf16_tolerance") else {
        return;
    };
    // (out, in, batch) with the launch the device picks: tiled shapes (in % 32 == 0), among them
    // rows of an odd number of 32-element items, whose odd rows start in the middle of an
    // absmax block, at every batch 1..=16 across the shapes; row-kernel shapes (in % 32 != 0:
    // rows start mid-byte and mid-block); out not a multiple of the 4-row unit.
    let cases = [
        (37, 256, 1),
        (300, 1024, 8),
        (64, 4096, 4),
        (130, 2304, 12),
        (131, 96, 2),
        (50, 160, 3),
        (7, 32, 5),
        (200, 640, 6),
        (96, 512, 7),
        (45, 1056, 9),
        (18, 384, 10),
        (70, 224, 11),
        (23, 800, 13),
        (61, 288, 14),
        (29, 1024, 15),
        (130, 576, 16),
        (33, 100, 3),
        (5, 13, 2),
        (17, 72, 9),
        (40, 200, 16),
    ];
    for (case, &(out, inp, batch)) in cases.iter().enumerate() {
        let c = GemvCase::new(out, inp, batch, 1234 + case as u64);
        let d = k.upload(&c.t).unwrap();
        run_gemv(&k, &c, &d, None, 0);
    }
}

#[test]
fn gemv_every_lane_group_tile_and_grid_matches() {
    let Some(k) = gpu("gemv_every_lane_group_tile_and_grid_matches") else {
        return;
    };
    // Rows of 1, 3, 8, 112 and 128 items of 32 elements: groups wider than a row (idle lanes),
    // narrower (several steps, odd last step), and two to eight warps a unit (the shared-memory
    // sum); grids of 1 and 2 blocks make every group loop over many units.
    for (out, inp) in [(5, 32), (131, 96), (30, 256), (9, 3584), (66, 4096)] {
        for batch in [1, 2, 3, 4, 5, 8, 9, 16] {
            let c = GemvCase::new(out, inp, batch, (out * 31 + inp + batch) as u64);
            let d = k.upload(&c.t).unwrap();
            let auto = k.gemv_plan(out, inp, batch);
            let GemvKernel::Tiled { tile, .. } = auto.kernel else {
                panic!("[{out}, {inp}] should take the tiled kernel, got {auto:?}");
            };
            // Every tile at least as large as the batch, and the smaller ones (batch tiles
            // looped over).
            for t in GEMV_TILES {
                if t != tile && batch > 3 && t < 4 {
                    continue; // tiles 1 and 2 looped 3+ times add nothing the others miss
                }
                for group_log2 in GEMV_GROUP_LOG2 {
                    for grid in [1, 2, auto.grid] {
                        let plan = GemvPlan {
                            kernel: GemvKernel::Tiled {
                                tile: t,
                                group_log2,
                            },
                            grid,
                        };
                        run_gemv(&k, &c, &d, Some(&plan), 0);
                    }
                }
            }
            // The row kernel takes any shape, with any grid.
            for grid in [1, 3] {
                let plan = GemvPlan {
                    kernel: GemvKernel::Rows,
                    grid,
                };
                run_gemv(&k, &c, &d, Some(&plan), 0);
            }
        }
    }
}

#[test]
fn gemv_with_an_unaligned_x_stays_within_tolerance() {
    let Some(k) = gpu("gemv_with_an_unaligned_x_stays_within_tolerance") else {
        return;
    };
    // x starting 1 or 3 elements into its buffer: the tiled kernels' 2-byte load path, and the
    // row kernel.
    for (out, inp, batch) in [(37, 256, 1), (19, 3584, 2), (40, 512, 5), (33, 100, 3)] {
        let c = GemvCase::new(out, inp, batch, 99 + inp as u64);
        let d = k.upload(&c.t).unwrap();
        for skip in [1, 3] {
            run_gemv(&k, &c, &d, None, skip);
        }
    }
}

#[test]
fn gemv_rejects_bad_shapes_and_plans() {
    let Some(k) = gpu("gemv_rejects_bad_shapes_and_plans") else {
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
    // [8, 8]: rows of 8 elements cannot take the tiled kernel, and no launch has 0 blocks.
    let mut y = k.stream().alloc_zeros::<bf16>(8).unwrap();
    let xs = x.slice(0..8);
    let tiled = GemvKernel::Tiled {
        tile: 1,
        group_log2: 4,
    };
    for (kernel, grid) in [(tiled, 1), (tiled, 0), (GemvKernel::Rows, 0)] {
        let plan = GemvPlan { kernel, grid };
        assert!(
            matches!(
                k.gemv_bf16_into_planned(&d, &xs, 1, &mut y.as_view_mut(), &plan),
                Err(CudaError::Invalid(_))
            ),
            "{plan:?} accepted for [8, 8]"
        );
    }
    // Tiles and lane groups must be ones the module has.
    let t = Nf4Tensor::quantize_f32(&varied_weights(256, 1), &[4, 64]);
    let d = k.upload(&t).unwrap();
    let xs = k.stream().alloc_zeros::<bf16>(64).unwrap();
    let mut y = k.stream().alloc_zeros::<bf16>(4).unwrap();
    for (tile, group_log2) in [(3, 4), (1, 2), (1, 9)] {
        let plan = GemvPlan {
            kernel: GemvKernel::Tiled { tile, group_log2 },
            grid: 1,
        };
        assert!(
            matches!(
                k.gemv_bf16_into_planned(&d, &xs.as_view(), 1, &mut y.as_view_mut(), &plan),
                Err(CudaError::Invalid(_))
            ),
            "tile {tile}, group 2^{group_log2} accepted"
        );
    }
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
    eprintln!(
        "{} ({} SMs), tensor [{rows}, {cols}]",
        k.context().name().unwrap_or_default(),
        k.multiprocessors()
    );
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

/// Dequantization at several grid sizes (the default is the device's resident capacity), as
/// output GB/s and DRAM traffic against a copy. Ignored by default (a measurement).
#[test]
#[ignore = "measurement; run with --ignored --nocapture on a GPU"]
fn dequant_grid_sweep() {
    let Some(k) = gpu("dequant_grid_sweep") else {
        return;
    };
    let (rows, cols) = (3584usize, 14336usize);
    let mut rng = Rng(5);
    let w: Vec<f32> = (0..rows * cols).map(|_| rng.normal() * 0.02).collect();
    let t = Nf4Tensor::quantize_f32(&w, &[rows, cols]);
    let d = k.upload(&t).unwrap();
    let n = rows * cols;
    for dtype in [OutDtype::F32, OutDtype::Bf16] {
        let r = k.measure_dequant_bandwidth(&d, dtype, 5, 20).unwrap();
        eprintln!("{r}");
        let default = r.dequant_ms;
        let one_pass = n.div_ceil(cuda::dequant_chunk_elems(dtype) * 256 * 8) as u32;
        let sms = k.multiprocessors();
        for grid in [sms, 2 * sms, 4 * sms, 8 * sms, one_pass] {
            let ms = match dtype {
                OutDtype::F32 => {
                    let mut out = k.stream().alloc_zeros::<f32>(n).unwrap();
                    k.best_ms_per_call(5, 20, |_| {
                        k.dequantize_into_grid(&d, &mut out.as_view_mut(), grid)
                    })
                }
                _ => {
                    let mut out = k.stream().alloc_zeros::<bf16>(n).unwrap();
                    k.best_ms_per_call(5, 20, |_| {
                        k.dequantize_into_grid(&d, &mut out.as_view_mut(), grid)
                    })
                }
            }
            .unwrap();
            eprintln!(
                "  {} grid {grid:5}: {:.1} us, ratio {:.3}",
                dtype.name(),
                ms * 1e3,
                r.copy_ms / ms
            );
        }
        assert!(default > 0.0);
    }
}

/// The fused GEMV on the Gemma-2-9B MLP and attention shapes at batch 1..16 against a copy of
/// its weight bytes, then every lane-group size at batch 1 and 8. Ignored by default (a
/// measurement).
#[test]
#[ignore = "measurement; run with --ignored --nocapture on a GPU"]
fn gemv_bandwidth_vs_device_copy() {
    let Some(k) = gpu("gemv_bandwidth_vs_device_copy") else {
        return;
    };
    eprintln!(
        "{} ({} SMs)",
        k.context().name().unwrap_or_default(),
        k.multiprocessors()
    );
    let mut rng = Rng(11);
    let w: Vec<f32> = (0..3584 * 14336).map(|_| rng.normal() * 0.02).collect();
    for (out, inp) in [(14336usize, 3584usize), (3584, 14336), (4096, 3584)] {
        let t = Nf4Tensor::quantize_f32(&w[..out * inp], &[out, inp]);
        let d = k.upload(&t).unwrap();
        for batch in [1, 2, 4, 8, 16] {
            let r = k.measure_gemv(&d, batch, 5, 30).unwrap();
            eprintln!("{r}");
            assert!(r.gemv_ms > 0.0 && r.ratio().is_finite(), "{r:?}");
        }
        for batch in [1, 8] {
            let auto = k.gemv_plan(out, inp, batch);
            let GemvKernel::Tiled { tile, .. } = auto.kernel else {
                panic!("{auto:?}");
            };
            for group_log2 in GEMV_GROUP_LOG2 {
                let plan = GemvPlan {
                    kernel: GemvKernel::Tiled { tile, group_log2 },
                    grid: auto.grid,
                };
                let r = k.measure_gemv_planned(&d, batch, &plan, 3, 30).unwrap();
                eprintln!(
                    "  [{out}, {inp}] batch {batch} G=2^{group_log2} grid {}: {:.1} us, ratio {:.2}",
                    plan.grid,
                    r.gemv_ms * 1e3,
                    r.ratio()
                );
            }
        }
    }
}
