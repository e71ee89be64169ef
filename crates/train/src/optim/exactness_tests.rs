//! With torch's own square roots substituted (the only op of the references we do not
//! reproduce; see [`super::kernels`]), the kernels equal bitsandbytes' `AdamW8bit` and
//! `torch.optim.AdamW` bit for bit: parameters, 8-bit codes, absmax and f32 moments, over five
//! steps of `fixtures/optim/adamw.safetensors`.

use super::kernels::{Bnb32Step, Bnb8Step, Codec8, TorchStep};
use super::AdamWConfig;
use rupantor_quant::blockwise8::BLOCKSIZE;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::PathBuf;

const NAMES: [&str; 3] = ["big", "exact", "small"];

fn tensor<T: bytemuck::Pod>(st: &SafeTensors, name: &str, dtype: Dtype) -> Vec<T> {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(t.dtype(), dtype, "{name}");
    bytemuck::pod_collect_to_vec(t.data())
}

fn assert_bits(got: &[f32], want: &[f32], what: &str) {
    let bad: Vec<usize> = (0..got.len())
        .filter(|&i| got[i].to_bits() != want[i].to_bits())
        .collect();
    assert!(
        bad.is_empty(),
        "{what}: {} differ, first at {:?}",
        bad.len(),
        bad.first()
    );
}

struct TorchSqrt(HashMap<u32, u32>);

impl TorchSqrt {
    fn sqrt(&self, x: f32) -> f32 {
        match self.0.get(&x.to_bits()) {
            Some(&y) => f32::from_bits(y),
            None => x.sqrt(),
        }
    }
}

#[test]
fn kernels_are_bit_exact_given_torch_square_roots() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/optim/adamw.safetensors");
    let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&data).unwrap();
    let xs: Vec<i32> = tensor(&st, "sqrt.x", Dtype::I32);
    let ys: Vec<i32> = tensor(&st, "sqrt.torch", Dtype::I32);
    let table = TorchSqrt(
        xs.iter()
            .zip(&ys)
            .map(|(&x, &y)| (x as u32, y as u32))
            .collect(),
    );
    assert!(
        table.0.len() > 1000,
        "the table records torch's off-by-one roots"
    );
    let sqrt = |x: f32| table.sqrt(x);

    let lrs: Vec<f64> = tensor(&st, "lr", Dtype::F64);
    let codec = Codec8::new();
    let mut bnb_p: Vec<Vec<f32>> = NAMES
        .iter()
        .map(|n| tensor(&st, &format!("init.{n}"), Dtype::F32))
        .collect();
    let mut torch_p = bnb_p.clone();
    let n: Vec<usize> = bnb_p.iter().map(Vec::len).collect();
    // bitsandbytes: 8-bit state for the two large tensors, f32 for the small one.
    type State8 = (Vec<u8>, Vec<u8>, Vec<f32>, Vec<f32>);
    let mut codes: Vec<State8> = n
        .iter()
        .map(|&n| {
            (
                vec![0; n],
                vec![0; n],
                vec![0.0; n.div_ceil(BLOCKSIZE)],
                vec![0.0; n.div_ceil(BLOCKSIZE)],
            )
        })
        .collect();
    let mut bnb_mv = (vec![0f32; n[2]], vec![0f32; n[2]]);
    let mut torch_mv: Vec<(Vec<f32>, Vec<f32>)> =
        n.iter().map(|&n| (vec![0.0; n], vec![0.0; n])).collect();

    for (t, &lr) in lrs.iter().enumerate() {
        let cfg = AdamWConfig {
            lr,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.01,
        };
        let step = t as u64 + 1;
        let (k8, k32, kt) = (
            Bnb8Step::new(&cfg, step),
            Bnb32Step::new(&cfg, step),
            TorchStep::new(&cfg, step),
        );
        for (i, name) in NAMES.iter().enumerate() {
            let g: Vec<f32> = tensor(&st, &format!("grad.{t}.{name}"), Dtype::F32);
            let at = format!("step {t} {name}");
            if i < 2 {
                let (c1, c2, a1, a2) = &mut codes[i];
                for (b, (p, g)) in bnb_p[i]
                    .chunks_mut(BLOCKSIZE)
                    .zip(g.chunks(BLOCKSIZE))
                    .enumerate()
                {
                    let r = b * BLOCKSIZE..b * BLOCKSIZE + p.len();
                    k8.apply_block(
                        &codec,
                        p,
                        g,
                        &mut c1[r.clone()],
                        &mut c2[r],
                        &mut a1[b],
                        &mut a2[b],
                        sqrt,
                    );
                }
                assert_eq!(
                    c1,
                    &tensor::<u8>(&st, &format!("bnb.{t}.{name}.state1"), Dtype::U8),
                    "{at} state1"
                );
                assert_eq!(
                    c2,
                    &tensor::<u8>(&st, &format!("bnb.{t}.{name}.state2"), Dtype::U8),
                    "{at} state2"
                );
                assert_bits(
                    a1,
                    &tensor(&st, &format!("bnb.{t}.{name}.absmax1"), Dtype::F32),
                    &format!("{at} absmax1"),
                );
                assert_bits(
                    a2,
                    &tensor(&st, &format!("bnb.{t}.{name}.absmax2"), Dtype::F32),
                    &format!("{at} absmax2"),
                );
            } else {
                k32.apply(&mut bnb_p[i], &g, &mut bnb_mv.0, &mut bnb_mv.1, sqrt);
                assert_bits(
                    &bnb_mv.0,
                    &tensor(&st, &format!("bnb.{t}.{name}.state1"), Dtype::F32),
                    &format!("{at} state1"),
                );
                assert_bits(
                    &bnb_mv.1,
                    &tensor(&st, &format!("bnb.{t}.{name}.state2"), Dtype::F32),
                    &format!("{at} state2"),
                );
            }
            assert_bits(
                &bnb_p[i],
                &tensor(&st, &format!("bnb.{t}.{name}.param"), Dtype::F32),
                &format!("bnb {at} param"),
            );

            let (m, v) = &mut torch_mv[i];
            kt.apply(&mut torch_p[i], &g, m, v, sqrt);
            assert_bits(
                &torch_p[i],
                &tensor(&st, &format!("torch.{t}.{name}.param"), Dtype::F32),
                &format!("torch {at} param"),
            );
        }
    }
}
