//! `Optimizer::step_tensors` on CPU tensors: the same bits as `Optimizer::step` on host slices
//! (parameters and the whole state), and its argument checks.

use candle_core::{DType, Device, Tensor, Var};
use rupantor_train::optim::{
    AdamW, AdamW8bit, AdamWConfig, Optimizer, PagedOptions, ParamRef, ParamSpec,
};

/// xorshift64*: deterministic pseudo-random values without a dependency.
struct Rng(u64);

impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let bits = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40; // 24 bits
        bits as f32 / (1u64 << 23) as f32 - 1.0 // [-1, 1)
    }

    fn fill(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next_f32() * scale).collect()
    }
}

/// 8-bit tensors with a partial last block and across pages, an exact 4096, and tensors under
/// the 8-bit threshold (f32 state), as 2-D shapes like LoRA's.
const SHAPES: [(usize, usize); 5] = [(8, 1000), (300, 1), (64, 64), (16, 4375), (4095, 1)];

fn specs() -> Vec<ParamSpec> {
    SHAPES
        .iter()
        .enumerate()
        .map(|(i, &(r, c))| ParamSpec::new(format!("p{i}"), r * c))
        .collect()
}

fn config(weight_decay: f64) -> AdamWConfig {
    AdamWConfig {
        lr: 2e-3,
        weight_decay,
        ..AdamWConfig::default()
    }
}

/// Small pages (21 blocks or 4096 f32 slots), so tensors span several pages.
fn options() -> PagedOptions {
    PagedOptions {
        page_bytes: 32 * 1024,
        ..PagedOptions::default()
    }
}

/// Two fresh optimizers of one kind: one stepped on host slices, one on tensors.
struct Pair {
    what: &'static str,
    host: Box<dyn Optimizer>,
    tensors: Box<dyn Optimizer>,
}

fn optimizers(weight_decay: f64) -> Vec<Pair> {
    let make8 = || {
        Box::new(AdamW8bit::with_options(specs(), config(weight_decay), options()).unwrap())
            as Box<dyn Optimizer>
    };
    let make32 = || {
        Box::new(AdamW::with_options(specs(), config(weight_decay), options()).unwrap())
            as Box<dyn Optimizer>
    };
    vec![
        Pair {
            what: "8-bit",
            host: make8(),
            tensors: make8(),
        },
        Pair {
            what: "f32",
            host: make32(),
            tensors: make32(),
        },
    ]
}

#[test]
fn step_tensors_on_the_cpu_is_the_host_step_bit_for_bit() {
    for weight_decay in [0.0, 0.1] {
        for Pair {
            what,
            mut host,
            mut tensors,
        } in optimizers(weight_decay)
        {
            let mut rng = Rng(11);
            let mut params: Vec<Vec<f32>> =
                SHAPES.iter().map(|&(r, c)| rng.fill(r * c, 0.1)).collect();
            let vars: Vec<Var> = params
                .iter()
                .zip(SHAPES)
                .map(|(p, (r, c))| Var::from_slice(p, (r, c), &Device::Cpu).unwrap())
                .collect();
            for step in 0..5 {
                let grads: Vec<Vec<f32>> = params.iter().map(|p| rng.fill(p.len(), 0.05)).collect();
                let lr = 1e-3 / (1.0 + step as f64);
                host.set_lr(lr);
                tensors.set_lr(lr);
                let mut refs: Vec<ParamRef> = params
                    .iter_mut()
                    .zip(&grads)
                    .map(|(p, g)| ParamRef::new(p, g))
                    .collect();
                host.step(&mut refs).unwrap();
                let pairs: Vec<(Var, Tensor)> = vars
                    .iter()
                    .zip(&grads)
                    .map(|(v, g)| {
                        (
                            v.clone(),
                            Tensor::from_slice(g, v.shape(), &Device::Cpu).unwrap(),
                        )
                    })
                    .collect();
                tensors.step_tensors(&pairs).unwrap();
            }
            for (i, (p, v)) in params.iter().zip(&vars).enumerate() {
                let got = v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let same = p.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "{what}, weight decay {weight_decay}: tensor {i} differs"
                );
            }
            assert_eq!(tensors.steps(), 5);
            assert!(
                host.state_dict() == tensors.state_dict(),
                "{what}, weight decay {weight_decay}: states differ"
            );
            let report = tensors.paging();
            assert_eq!((report.backend, report.resident_pages), ("cpu", 1));
            assert!(report.pages_8bit + report.pages_f32 > 2, "{report:?}");
        }
    }
}

#[test]
fn step_tensors_checks_its_arguments_before_stepping() {
    let mut opt = AdamW8bit::with_options(specs(), config(0.0), options()).unwrap();
    let vars: Vec<Var> = SHAPES
        .iter()
        .map(|&(r, c)| Var::zeros((r, c), DType::F32, &Device::Cpu).unwrap())
        .collect();
    let pairs = |grad_of: &dyn Fn(&Var) -> Tensor| -> Vec<(Var, Tensor)> {
        vars.iter().map(|v| (v.clone(), grad_of(v))).collect()
    };
    let ones = |v: &Var| Tensor::ones(v.shape(), DType::F32, &Device::Cpu).unwrap();

    let e = opt.step_tensors(&pairs(&ones)[1..]).unwrap_err();
    assert!(
        e.to_string().contains("4 parameters, the optimizer has 5"),
        "{e}"
    );
    let e = opt
        .step_tensors(&pairs(&|v: &Var| {
            ones(v)
                .flatten_all()
                .unwrap()
                .narrow(0, 1, v.elem_count() - 1)
                .unwrap()
        }))
        .unwrap_err();
    assert!(
        e.to_string().contains("\"p0\": expected 8000 elements"),
        "{e}"
    );
    let e = opt
        .step_tensors(&pairs(&|v: &Var| ones(v).to_dtype(DType::BF16).unwrap()))
        .unwrap_err();
    assert!(e.to_string().contains("f32 tensors"), "{e}");
    assert_eq!(opt.steps(), 0, "nothing was stepped");

    // A gradient of another shape with the same element count is taken flat, as `step` takes
    // slices.
    opt.step_tensors(&pairs(&|v: &Var| ones(v).flatten_all().unwrap()))
        .unwrap();
    assert_eq!(opt.steps(), 1);
    let first = vars[0].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(
        first.iter().all(|&x| x < 0.0),
        "a positive gradient lowers every parameter"
    );
}
