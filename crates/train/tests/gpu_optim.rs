//! GPU tests of kernels/adamw.cu through `Optimizer::step_tensors` on CUDA tensors: 8-bit AdamW
//! (bitsandbytes semantics) and f32 AdamW (torch) against the CPU optimizer on the same inputs.
//! States (8-bit codes, absmax, f32 moments) must be byte-identical and parameters bit-identical
//! over five steps, across several pages, with tensors under `min_8bit_size`, a partial last
//! block, zero blocks and weight decay on and off; a checkpoint written after GPU steps resumes
//! on the CPU and vice versa.
//!
//! Each test that needs a GPU prints `SKIPPED <test>: <reason>` and passes when there is none,
//! unless `RUPANTOR_REQUIRE_GPU=1`, which turns the skip into a failure.
//!
//! cargo test -p rupantor-train --features cuda --test gpu_optim -- --nocapture
//! cargo test -p rupantor-train --features cuda --test gpu_optim -- --ignored --nocapture  # timing
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor, Var};
use rupantor_quant::cuda;
use rupantor_train::optim::{
    AdamW, AdamW8bit, AdamWConfig, Optimizer, PagedOptions, ParamRef, ParamSpec, StateDict,
    StateFormat, StateTensor,
};

use rupantor_model::device::gpu_for_test as gpu;

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

    /// Gradients whose 256-element blocks vary in scale over many decades, with all-zero
    /// blocks (absmax 0), single spikes and subnormal products mixed in.
    fn gradient(&mut self, n: usize) -> Vec<f32> {
        let scales = [0.05f32, 1.0, 1e-30, 0.0, 3e3, 1e-6, 0.5, 1e-20];
        let mut g = vec![0f32; n];
        for (b, block) in g.chunks_mut(256).enumerate() {
            let s = scales[(self.next_u64() as usize + b) % scales.len()];
            for x in block.iter_mut() {
                *x = self.uniform() * s;
            }
            if b % 7 == 3 {
                block[block.len() / 2] = 50.0 * s;
            }
        }
        g
    }
}

/// LoRA-like 2-D shapes: a partial last block (5000), an exact 4096, a tensor spanning several
/// pages (70 000), and two under the 8-bit threshold (f32 state in the 8-bit optimizer).
const SHAPES: [(usize, usize); 6] = [
    (8, 625),
    (300, 1),
    (64, 64),
    (32, 2188),
    (4095, 1),
    (1, 257),
];

fn specs() -> Vec<ParamSpec> {
    SHAPES
        .iter()
        .enumerate()
        .map(|(i, &(r, c))| ParamSpec::new(format!("layers.{i}.lora_A.weight"), r * c))
        .collect()
}

/// 32 KiB pages: 63 block slots or 4096 f32 slots, so tensors span pages and share them.
fn options() -> PagedOptions {
    PagedOptions {
        page_bytes: 32 * 1024,
        ..PagedOptions::default()
    }
}

fn config(weight_decay: f64) -> AdamWConfig {
    AdamWConfig {
        lr: 2e-3,
        weight_decay,
        ..AdamWConfig::default()
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Adamw8bit,
    Adamw,
}

fn optimizer(kind: Kind, weight_decay: f64) -> Box<dyn Optimizer> {
    match kind {
        Kind::Adamw8bit => {
            Box::new(AdamW8bit::with_options(specs(), config(weight_decay), options()).unwrap())
        }
        Kind::Adamw => {
            Box::new(AdamW::with_options(specs(), config(weight_decay), options()).unwrap())
        }
    }
}

/// The same parameters on the host (stepped by `Optimizer::step`) and as variables on the GPU
/// (stepped by `Optimizer::step_tensors`).
struct Twin {
    host: Vec<Vec<f32>>,
    vars: Vec<Var>,
}

impl Twin {
    fn new(dev: &Device, seed: u64) -> Self {
        let mut rng = Rng(seed);
        let host: Vec<Vec<f32>> = SHAPES
            .iter()
            .map(|&(r, c)| (0..r * c).map(|_| rng.uniform() * 0.1).collect())
            .collect();
        let vars = host
            .iter()
            .zip(SHAPES)
            .map(|(p, s)| Var::from_slice(p, s, dev).unwrap())
            .collect();
        Twin { host, vars }
    }

    fn device_values(&self) -> Vec<Vec<f32>> {
        self.vars
            .iter()
            .map(|v| v.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect()
    }
}

/// One step of `cpu` on the host copies and of `gpu` on the device variables, same gradients
/// and learning rate.
fn step_both(
    cpu: &mut dyn Optimizer,
    gpu: &mut dyn Optimizer,
    twin: &mut Twin,
    grads: &[Vec<f32>],
    lr: f64,
) {
    cpu.set_lr(lr);
    gpu.set_lr(lr);
    let mut refs: Vec<ParamRef> = twin
        .host
        .iter_mut()
        .zip(grads)
        .map(|(p, g)| ParamRef::new(p, g))
        .collect();
    cpu.step(&mut refs).unwrap();
    let pairs: Vec<(Var, Tensor)> = twin
        .vars
        .iter()
        .zip(grads)
        .map(|(v, g)| {
            let t = Tensor::from_slice(g, v.shape(), v.device()).unwrap();
            (v.clone(), t)
        })
        .collect();
    gpu.step_tensors(&pairs).unwrap();
}

fn same_bits(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits()
}

/// Every parameter bit-identical.
fn assert_params(twin: &Twin, what: &str) {
    for (i, (want, got)) in twin.host.iter().zip(twin.device_values()).enumerate() {
        let bad: Vec<usize> = (0..want.len())
            .filter(|&j| !same_bits(want[j], got[j]))
            .collect();
        assert!(
            bad.is_empty(),
            "{what}: parameter {i}: {} of {} differ, first at {} (cpu {:e}, gpu {:e})",
            bad.len(),
            want.len(),
            bad[0],
            want[bad[0]],
            got[bad[0]]
        );
    }
}

/// Every state tensor byte-identical (f32 compared by bits, so -0 and 0 differ too).
fn assert_states(cpu: &StateDict, gpu: &StateDict, what: &str) {
    assert_eq!(cpu.meta, gpu.meta, "{what}: metadata");
    assert_eq!(
        cpu.tensors.keys().collect::<Vec<_>>(),
        gpu.tensors.keys().collect::<Vec<_>>(),
        "{what}: state tensors"
    );
    for (key, want) in &cpu.tensors {
        let differ = match (want, &gpu.tensors[key]) {
            (StateTensor::U8(a), StateTensor::U8(b)) => {
                a.iter().zip(b).filter(|(x, y)| x != y).count()
            }
            (StateTensor::F32(a), StateTensor::F32(b)) => a
                .iter()
                .zip(b)
                .filter(|(x, y)| !same_bits(**x, **y))
                .count(),
            _ => panic!("{what}: {key} has another type on the GPU"),
        };
        assert_eq!(differ, 0, "{what}: {key}: {differ} elements differ");
    }
}

fn exact_over_five_steps(kind: Kind, test: &str) {
    let Some(dev) = gpu(test) else { return };
    for weight_decay in [0.0, 0.1] {
        let what = format!("{kind:?}, weight decay {weight_decay}");
        let mut cpu = optimizer(kind, weight_decay);
        let mut gpu = optimizer(kind, weight_decay);
        let mut twin = Twin::new(&dev, 5);
        let mut rng = Rng(77);
        for step in 1..=5u64 {
            let grads: Vec<Vec<f32>> = twin.host.iter().map(|p| rng.gradient(p.len())).collect();
            // A learning rate varying with the step, as the schedule sets it.
            step_both(&mut *cpu, &mut *gpu, &mut twin, &grads, 2e-3 / step as f64);
            assert_params(&twin, &format!("{what}, step {step}"));
            assert_states(
                &cpu.state_dict(),
                &gpu.state_dict(),
                &format!("{what}, step {step}"),
            );
        }
        let report = gpu.paging();
        assert_eq!(
            (report.backend, report.resident_pages),
            ("cuda", 1),
            "{report:?}"
        );
        assert!(report.pages_8bit + report.pages_f32 >= 4, "{report:?}");
        if let Kind::Adamw8bit = kind {
            assert!(report.pages_8bit > 1 && report.pages_f32 >= 1, "{report:?}");
        }
    }
}

#[test]
fn adamw8bit_on_the_gpu_is_byte_identical_to_the_cpu() {
    let opt = AdamW8bit::with_options(specs(), config(0.0), options()).unwrap();
    let formats = opt.formats();
    assert!(formats.contains(&StateFormat::Blockwise8) && formats.contains(&StateFormat::F32));
    exact_over_five_steps(
        Kind::Adamw8bit,
        "adamw8bit_on_the_gpu_is_byte_identical_to_the_cpu",
    );
}

#[test]
fn adamw_on_the_gpu_is_bit_identical_to_the_cpu() {
    exact_over_five_steps(Kind::Adamw, "adamw_on_the_gpu_is_bit_identical_to_the_cpu");
}

/// NaN and infinite gradients go through the quantizer's edge cases (NaN codes, infinite
/// absmax); states stay byte-identical, parameters identical up to NaN payloads.
#[test]
fn non_finite_gradients_give_the_cpus_states() {
    let test = "non_finite_gradients_give_the_cpus_states";
    let Some(dev) = gpu(test) else { return };
    let mut cpu = optimizer(Kind::Adamw8bit, 0.0);
    let mut gpu = optimizer(Kind::Adamw8bit, 0.0);
    let mut twin = Twin::new(&dev, 9);
    let mut rng = Rng(3);
    for step in 1..=2u64 {
        let mut grads: Vec<Vec<f32>> = twin.host.iter().map(|p| rng.gradient(p.len())).collect();
        grads[0][10] = f32::NAN;
        grads[0][600] = f32::INFINITY;
        grads[2][4000] = f32::NEG_INFINITY;
        grads[1][5] = f32::NAN;
        step_both(&mut *cpu, &mut *gpu, &mut twin, &grads, 1e-3);
        for (i, (want, got)) in twin.host.iter().zip(twin.device_values()).enumerate() {
            for (j, (a, b)) in want.iter().zip(&got).enumerate() {
                assert!(
                    same_bits(*a, *b) || (a.is_nan() && b.is_nan()),
                    "step {step}: parameter {i}[{j}]: cpu {a:e}, gpu {b:e}"
                );
            }
        }
        let (c, g) = (cpu.state_dict(), gpu.state_dict());
        for (key, want) in &c.tensors {
            match (want, &g.tensors[key]) {
                (StateTensor::U8(a), StateTensor::U8(b)) => assert_eq!(a, b, "{key}"),
                (StateTensor::F32(a), StateTensor::F32(b)) => {
                    for (x, y) in a.iter().zip(b) {
                        assert!(
                            same_bits(*x, *y) || (x.is_nan() && y.is_nan()),
                            "{key}: {x:e} vs {y:e}"
                        );
                    }
                }
                _ => panic!("{key}: type"),
            }
        }
    }
}

/// Three steps on one device, the state saved, loaded into a fresh optimizer (another page
/// size) and two more steps on the other device: the same as five steps on the CPU.
#[test]
fn a_checkpoint_resumes_across_devices() {
    let test = "a_checkpoint_resumes_across_devices";
    let Some(dev) = gpu(test) else { return };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optimizer.safetensors");
    for kind in [Kind::Adamw8bit, Kind::Adamw] {
        let mut rng = Rng(21);
        let init = Twin::new(&Device::Cpu, 13).host;
        let grads: Vec<Vec<Vec<f32>>> = (0..5)
            .map(|_| init.iter().map(|p| rng.gradient(p.len())).collect())
            .collect();
        // Reference: five steps on the host.
        let mut reference = optimizer(kind, 0.1);
        let mut want = init.clone();
        for g in &grads {
            let mut refs: Vec<ParamRef> = want
                .iter_mut()
                .zip(g)
                .map(|(p, g)| ParamRef::new(p, g))
                .collect();
            reference.step(&mut refs).unwrap();
        }
        for (first, then) in [(dev.clone(), Device::Cpu), (Device::Cpu, dev.clone())] {
            let what = format!("{kind:?}: {first:?} then {then:?}");
            let vars = |d: &Device, values: &[Vec<f32>]| -> Vec<Var> {
                values
                    .iter()
                    .zip(SHAPES)
                    .map(|(p, s)| Var::from_slice(p, s, d).unwrap())
                    .collect()
            };
            let step = |opt: &mut dyn Optimizer, vars: &[Var], g: &[Vec<f32>]| {
                let pairs: Vec<(Var, Tensor)> = vars
                    .iter()
                    .zip(g)
                    .map(|(v, g)| {
                        let t = Tensor::from_slice(g, v.shape(), v.device()).unwrap();
                        (v.clone(), t)
                    })
                    .collect();
                opt.step_tensors(&pairs).unwrap();
            };
            let mut a = optimizer(kind, 0.1);
            let va = vars(&first, &init);
            for g in &grads[..3] {
                step(&mut *a, &va, g);
            }
            a.state_dict().save(&path).unwrap();
            let values: Vec<Vec<f32>> = va
                .iter()
                .map(|v| v.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                .collect();
            drop(a);
            let mut b: Box<dyn Optimizer> = match kind {
                Kind::Adamw8bit => Box::new(
                    AdamW8bit::with_options(specs(), config(0.1), PagedOptions::default()).unwrap(),
                ),
                Kind::Adamw => Box::new(
                    AdamW::with_options(specs(), config(0.1), PagedOptions::default()).unwrap(),
                ),
            };
            b.load_state_dict(&StateDict::load(&path).unwrap()).unwrap();
            let vb = vars(&then, &values);
            for g in &grads[3..] {
                step(&mut *b, &vb, g);
            }
            assert_eq!(b.steps(), 5);
            assert_states(&reference.state_dict(), &b.state_dict(), &what);
            for (i, (w, v)) in want.iter().zip(&vb).enumerate() {
                let got = v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert!(
                    w.iter().zip(&got).all(|(x, y)| same_bits(*x, *y)),
                    "{what}: parameter {i} differs"
                );
            }
        }
    }
}

/// Variables on the GPU with gradients on the CPU are refused before anything changes.
#[test]
fn mixed_devices_are_refused() {
    let test = "mixed_devices_are_refused";
    let Some(dev) = gpu(test) else { return };
    let mut opt = optimizer(Kind::Adamw8bit, 0.0);
    let twin = Twin::new(&dev, 1);
    let pairs: Vec<(Var, Tensor)> = twin
        .vars
        .iter()
        .map(|v| {
            let g = Tensor::zeros(v.shape(), DType::F32, &Device::Cpu).unwrap();
            (v.clone(), g)
        })
        .collect();
    let e = opt.step_tensors(&pairs).unwrap_err();
    assert!(e.to_string().contains("one device"), "{e}");
    assert_eq!(opt.steps(), 0);
}

/// The kernels were compiled for exactness: IEEE division and square root only, and no FMA
/// beyond the ten the CPU kernels fuse (checked without a GPU).
#[test]
fn adamw_ptx_rounds_as_the_cpu_does() {
    let ptx = cuda::module_ptx("adamw").unwrap();
    for entry in ["kAdamW8bitBlockwise", "kAdam32Bnb", "kAdamW32Torch"] {
        assert!(
            cuda::ptx_entry_points(ptx).iter().any(|e| e == entry),
            "{entry} missing"
        );
    }
    for approx in [
        "sqrt.approx",
        "div.approx",
        "div.full",
        "rcp.approx",
        "ex2",
        ".ftz",
    ] {
        assert!(!ptx.contains(approx), "adamw PTX contains {approx}");
    }
    assert!(ptx.contains("sqrt.rn.f32") && ptx.contains("div.rn.f32"));
    // 8-bit: m, v and the two code searches; bnb 32-bit: m, v, p; torch: the two lerp forms, v.
    assert_eq!(ptx.matches("fma.rn.f32").count(), 10);
}

/// A step of the 9B shape's LoRA (r 32 on q, k, v, o, gate, up, down of 42 layers: 108 M
/// parameters, 8-bit state paged through 1 MiB host pages), timed against the same step on the
/// CPU. Not an assertion: run with `--ignored --nocapture`.
#[test]
#[ignore]
fn bench_9b_lora_step() {
    let test = "bench_9b_lora_step";
    let Some(dev) = gpu(test) else { return };
    let (h, q, kv, mlp, r) = (3584, 16 * 256, 8 * 256, 14336, 32);
    let proj = [
        (h, q),
        (h, kv),
        (h, kv),
        (q, h),
        (h, mlp),
        (h, mlp),
        (mlp, h),
    ];
    let mut shapes = Vec::new();
    for _ in 0..42 {
        for &(fan_in, fan_out) in &proj {
            shapes.push((r, fan_in));
            shapes.push((fan_out, r));
        }
    }
    let specs: Vec<ParamSpec> = shapes
        .iter()
        .enumerate()
        .map(|(i, (a, b))| ParamSpec::new(format!("p{i}"), a * b))
        .collect();
    let n: usize = specs.iter().map(|s| s.numel).sum();
    let pairs: Vec<(Var, Tensor)> = shapes
        .iter()
        .map(|&s| {
            let v = Var::from_tensor(&Tensor::randn(0f32, 0.02, s, &dev).unwrap()).unwrap();
            let g = Tensor::randn(0f32, 1e-3, s, &dev).unwrap();
            (v, g)
        })
        .collect();
    let mut opt = AdamW8bit::new(specs.clone(), AdamWConfig::default()).unwrap();
    opt.step_tensors(&pairs).unwrap(); // loads the kernels, allocates the staging page
    let rounds = 5;
    let t = std::time::Instant::now();
    for _ in 0..rounds {
        opt.step_tensors(&pairs).unwrap();
    }
    let gpu_ms = t.elapsed().as_secs_f64() * 1e3 / rounds as f64;
    let report = opt.paging();
    let host_pairs: Vec<(Var, Tensor)> = pairs
        .iter()
        .map(|(v, g)| {
            let v = Var::from_tensor(&v.to_device(&Device::Cpu).unwrap()).unwrap();
            (v, g.to_device(&Device::Cpu).unwrap())
        })
        .collect();
    let mut cpu = AdamW8bit::new(specs, AdamWConfig::default()).unwrap();
    let t = std::time::Instant::now();
    cpu.step_tensors(&host_pairs).unwrap();
    let cpu_ms = t.elapsed().as_secs_f64() * 1e3;
    println!(
        "{test}: {n} parameters, {} pages of {} B: GPU {gpu_ms:.1} ms/step ({:.2} GB/s of state \
         up and down), CPU {cpu_ms:.0} ms/step",
        report.pages_8bit,
        report.page_bytes,
        2.0 * report.state_bytes as f64 / (gpu_ms * 1e-3) / 1e9
    );
}
