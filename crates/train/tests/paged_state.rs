//! Paged state: bytes per parameter, page layout, checkpoint save → load → continue.

use rupantor_train::optim::{
    AdamW, AdamW8bit, AdamWConfig, OptimKind, Optimizer, PagedOptions, ParamRef, ParamSpec,
    StateDict, StateFormat,
};

/// xorshift64*: deterministic pseudo-random gradients without a dependency.
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

fn specs(sizes: &[usize]) -> Vec<ParamSpec> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| ParamSpec::new(format!("layers.{i}.lora_A.weight"), n))
        .collect()
}

fn run(opt: &mut dyn Optimizer, params: &mut [Vec<f32>], rng: &mut Rng, steps: usize) {
    for _ in 0..steps {
        let grads: Vec<Vec<f32>> = params.iter().map(|p| rng.fill(p.len(), 0.05)).collect();
        // A learning rate varying with the step, as a schedule sets it.
        opt.set_lr(1e-3 / (1.0 + opt.steps() as f64));
        let mut refs: Vec<ParamRef> = params
            .iter_mut()
            .zip(&grads)
            .map(|(p, g)| ParamRef::new(p, g))
            .collect();
        opt.step(&mut refs).unwrap();
    }
}

const SIZES: [usize; 5] = [5000, 300, 4096, 70_000, 4095];

/// The first (tensor, element) where two parameter sets differ in any bit.
fn first_difference(a: &[Vec<f32>], b: &[Vec<f32>]) -> Option<(usize, usize)> {
    a.iter().zip(b).enumerate().find_map(|(t, (x, y))| {
        x.iter()
            .zip(y)
            .position(|(p, q)| p.to_bits() != q.to_bits())
            .map(|i| (t, i))
    })
}

fn resume_is_bit_exact(make: &dyn Fn(usize) -> Box<dyn Optimizer>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optimizer.safetensors");
    let init: Vec<Vec<f32>> = {
        let mut rng = Rng(7);
        SIZES.iter().map(|&n| rng.fill(n, 0.02)).collect()
    };

    // Uninterrupted: 7 steps.
    let mut a = make(1 << 20);
    let mut pa = init.clone();
    let mut rng_a = Rng(99);
    run(&mut *a, &mut pa, &mut rng_a, 7);

    // Interrupted after 3: save, drop, restore into a fresh optimizer with another page
    // size, continue for 4.
    let mut b = make(1 << 20);
    let mut pb = init.clone();
    let mut rng_b = Rng(99);
    run(&mut *b, &mut pb, &mut rng_b, 3);
    b.state_dict().save(&path).unwrap();
    drop(b);
    let mut c = make(4096);
    let loaded = StateDict::load(&path).unwrap();
    assert_eq!(loaded.meta.step, 3);
    c.load_state_dict(&loaded).unwrap();
    assert_eq!(c.steps(), 3);
    run(&mut *c, &mut pb, &mut rng_b, 4);

    assert_eq!(first_difference(&pa, &pb), None, "parameters");
    assert_ne!(pa, init, "the steps moved the parameters");
    assert_eq!(a.steps(), c.steps());
    assert_eq!(a.state_dict(), c.state_dict(), "optimizer state");
    // The atomic write leaves nothing but the file.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["optimizer.safetensors"]);
}

#[test]
fn adamw8bit_resume_equals_uninterrupted() {
    resume_is_bit_exact(&|page_bytes| {
        let options = PagedOptions {
            page_bytes,
            ..PagedOptions::default()
        };
        Box::new(AdamW8bit::with_options(specs(&SIZES), AdamWConfig::default(), options).unwrap())
    });
}

#[test]
fn adamw_resume_equals_uninterrupted() {
    resume_is_bit_exact(&|page_bytes| {
        let options = PagedOptions {
            page_bytes,
            ..PagedOptions::default()
        };
        Box::new(AdamW::with_options(specs(&SIZES), AdamWConfig::default(), options).unwrap())
    });
}

#[test]
fn state_dict_records_step_and_hyperparameters() {
    let cfg = AdamWConfig {
        lr: 5e-5,
        betas: (0.9, 0.995),
        eps: 1e-7,
        weight_decay: 0.1,
    };
    let mut opt = AdamW8bit::new(specs(&SIZES), cfg).unwrap();
    let mut params: Vec<Vec<f32>> = SIZES.iter().map(|&n| vec![0.01; n]).collect();
    run(&mut opt, &mut params, &mut Rng(3), 2);
    let sd = opt.state_dict();
    let bytes = sd.to_bytes().unwrap();
    let back = StateDict::from_bytes(&bytes).unwrap();
    assert_eq!(back, sd);
    assert_eq!(back.meta.kind, OptimKind::Adamw8bit);
    assert_eq!(back.meta.step, 2);
    assert_eq!(back.meta.config.betas, (0.9, 0.995));
    assert_eq!(
        back.meta.config.lr,
        opt.lr(),
        "the last learning rate, bit for bit"
    );
    assert_eq!(back.meta.min_8bit_size, Some(4096));
    let formats: Vec<StateFormat> = back.meta.params.iter().map(|p| p.format).collect();
    use StateFormat::{Blockwise8 as B8, F32};
    assert_eq!(formats, [B8, F32, B8, B8, F32]);

    // The JSON metadata is readable by anything that reads safetensors.
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let json = &header.metadata().as_ref().unwrap()["rupantor.optimizer"];
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(v["step"], 2);
    assert_eq!(v["kind"], "adamw8bit");
    assert_eq!(v["config"]["weight_decay"], 0.1);
}

#[test]
fn load_rejects_a_state_of_other_parameters_or_kind() {
    let mut opt8 = AdamW8bit::new(specs(&SIZES), AdamWConfig::default()).unwrap();
    let sd = opt8.state_dict();
    let mut other = AdamW8bit::new(specs(&[5000, 300]), AdamWConfig::default()).unwrap();
    assert!(other.load_state_dict(&sd).is_err());
    let mut renamed = specs(&SIZES);
    renamed[0].name = "other".into();
    assert!(AdamW8bit::new(renamed, AdamWConfig::default())
        .unwrap()
        .load_state_dict(&sd)
        .is_err());
    let mut opt32 = AdamW::new(specs(&SIZES), AdamWConfig::default()).unwrap();
    assert!(opt32.load_state_dict(&sd).is_err());
    let mut truncated = sd.clone();
    truncated.tensors.remove("layers.0.lora_A.weight.absmax2");
    assert!(opt8.load_state_dict(&truncated).is_err());
    // A failed load leaves the optimizer as it was.
    assert_eq!(opt8.state_dict(), sd);
    assert!(StateDict::from_bytes(b"not safetensors").is_err());
}

#[test]
fn step_checks_its_arguments() {
    let mut opt = AdamW8bit::new(specs(&[5000, 300]), AdamWConfig::default()).unwrap();
    let mut p = [vec![0.0; 5000], vec![0.0; 299]];
    let g = [vec![0.0; 5000], vec![0.0; 300]];
    let (p0, p1) = p.split_at_mut(1);
    let mut refs = [
        ParamRef::new(&mut p0[0], &g[0]),
        ParamRef::new(&mut p1[0], &g[1]),
    ];
    assert!(opt.step(&mut refs).is_err());
    assert!(opt.step(&mut refs[..1]).is_err());
    assert_eq!(opt.steps(), 0, "a rejected step is not counted");
    let dup = vec![ParamSpec::new("a", 1), ParamSpec::new("a", 2)];
    assert!(AdamW8bit::new(dup, AdamWConfig::default()).is_err());
    let bad = AdamWConfig {
        betas: (0.9, 1.0),
        ..AdamWConfig::default()
    };
    assert!(AdamW::new(specs(&[10]), bad).is_err());
}

#[test]
fn state_bytes_per_param() {
    // 8-bit: one code byte per moment and one f32 absmax per moment per 256 elements.
    let opt = AdamW8bit::new(specs(&[256 * 64]), AdamWConfig::default()).unwrap();
    assert_eq!(opt.state_bytes_per_param(), 2.0 + 8.0 / 256.0);
    // A partial last block still has its absmax pair; under 4096 elements the state is f32.
    let opt = AdamW8bit::new(specs(&[5000]), AdamWConfig::default()).unwrap();
    assert_eq!(
        opt.state_bytes_per_param(),
        (2.0 * 5000.0 + 8.0 * 20.0) / 5000.0
    );
    let opt = AdamW8bit::new(specs(&[300]), AdamWConfig::default()).unwrap();
    assert_eq!(opt.state_bytes_per_param(), 8.0);
    let opt = AdamW8bit::new(specs(&[5000, 4096, 300]), AdamWConfig::default()).unwrap();
    let expected = (10_000.0 + 160.0 + 8192.0 + 128.0 + 2400.0) / 9396.0;
    assert_eq!(opt.state_bytes_per_param(), expected);
    let opt = AdamW::new(specs(&[5000, 4096, 300]), AdamWConfig::default()).unwrap();
    assert_eq!(opt.state_bytes_per_param(), 8.0);
}

/// LoRA r = 32 on all seven projections of Gemma-3-270M (hidden 640, 4 query heads and 1 KV
/// head of 256, MLP 2048, 18 layers): every A and B has at least 4096 elements and a whole
/// number of blocks, so the state is exactly 2 + 8/256 bytes per parameter.
#[test]
fn gemma3_270m_lora_state() {
    fn lora(r: usize) -> Vec<ParamSpec> {
        let (h, q, kv, mlp) = (640, 4 * 256, 256, 2048);
        let proj = [
            ("q_proj", h, q),
            ("k_proj", h, kv),
            ("v_proj", h, kv),
            ("o_proj", q, h),
            ("gate_proj", h, mlp),
            ("up_proj", h, mlp),
            ("down_proj", mlp, h),
        ];
        let mut specs = Vec::new();
        for layer in 0..18 {
            for (name, fan_in, fan_out) in proj {
                let base = format!("base_model.model.model.layers.{layer}.{name}");
                specs.push(ParamSpec::new(format!("{base}.lora_A.weight"), r * fan_in));
                specs.push(ParamSpec::new(format!("{base}.lora_B.weight"), fan_out * r));
            }
        }
        specs
    }
    let opt = AdamW8bit::new(lora(32), AdamWConfig::default()).unwrap();
    let n: usize = opt.params().iter().map(|p| p.numel).sum();
    assert_eq!(
        n,
        18 * 32 * (640 * 5 + 1024 * 2 + 256 * 2 + 2048 * 3 + 640 * 2)
    );
    assert_eq!(opt.state_bytes_per_param(), 2.03125);
    let report = opt.paging();
    assert_eq!(report.state_bytes, n * 2 + n / 256 * 8);
    assert_eq!(report.resident_pages, 1);
    assert_eq!(report.page_bytes, 1 << 20);
    assert_eq!(report.pages_f32, 0);
    // 2016 block slots of 520 B per 1 MiB page; every tensor is whole blocks, so the pages are
    // full but for the last.
    assert_eq!(report.pages_8bit, (n / 256).div_ceil(2016));
    assert!(report.allocated_bytes < report.state_bytes + (1 << 20));
    // r = 8: k_proj and v_proj B (256 x 8 = 2048 elements) fall under 4096 and keep f32 state.
    let opt = AdamW8bit::new(lora(8), AdamWConfig::default()).unwrap();
    let f32_tensors = opt
        .formats()
        .iter()
        .filter(|&&f| f == StateFormat::F32)
        .count();
    assert_eq!(f32_tensors, 18 * 2);
    let bpp = opt.state_bytes_per_param();
    assert!(bpp > 2.03125 && bpp < 2.5, "{bpp}");
}
