//! Byte-for-byte comparison with outputs of bitsandbytes 0.50 itself
//! (made by `scripts/fixtures/nf4.py`, committed under `fixtures/quant/`).

use half::bf16;
use rupantor_quant::blockwise8::{self, dynamic_map};
use rupantor_quant::bnb_layout::{self, RawTensor};
use rupantor_quant::{Nf4Tensor, SourceDtype};
use safetensors::{Dtype, SafeTensors};
use std::path::PathBuf;

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/quant")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn cases(st: &SafeTensors) -> Vec<String> {
    let mut names: Vec<String> = st
        .names()
        .iter()
        .filter_map(|n| n.strip_suffix(".input").map(str::to_string))
        .collect();
    names.sort();
    names
}

fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), Dtype::F32, "{name}");
    bytemuck::pod_collect_to_vec(t.data())
}

fn bytes(st: &SafeTensors, name: &str) -> Vec<u8> {
    st.tensor(name).unwrap().data().to_vec()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn dynamic_maps_equal_bitsandbytes() {
    let data = fixture("blockwise8.safetensors");
    let st = SafeTensors::deserialize(&data).unwrap();
    for case in cases(&st) {
        let signed = !case.starts_with("unsigned");
        assert_eq!(
            bits(&f32s(&st, &format!("{case}.map"))),
            bits(&dynamic_map(signed)),
            "{case}"
        );
    }
}

#[test]
fn blockwise8_is_byte_exact() {
    let data = fixture("blockwise8.safetensors");
    let st = SafeTensors::deserialize(&data).unwrap();
    let names = cases(&st);
    assert!(names.len() >= 6, "fixture has {} cases", names.len());
    for case in names {
        let x = f32s(&st, &format!("{case}.input"));
        let map = dynamic_map(!case.starts_with("unsigned"));
        let q = blockwise8::quantize(&x, &map, 256);
        let want_codes = bytes(&st, &format!("{case}.codes"));
        let mismatches: Vec<usize> = (0..x.len())
            .filter(|&i| q.codes[i] != want_codes[i])
            .collect();
        assert!(
            mismatches.is_empty(),
            "{case}: {} codes differ, first at {:?}",
            mismatches.len(),
            mismatches
                .first()
                .map(|&i| (i, x[i], q.codes[i], want_codes[i]))
        );
        assert_eq!(
            bits(&q.absmax),
            bits(&f32s(&st, &format!("{case}.absmax"))),
            "{case} absmax"
        );
        assert_eq!(
            bits(&q.dequantize(&map)),
            bits(&f32s(&st, &format!("{case}.dequantized"))),
            "{case} dequant"
        );
    }
}

fn nf4_input(st: &SafeTensors, key: &str) -> (Vec<f32>, Vec<usize>, SourceDtype) {
    let t = st.tensor(&format!("{key}.input")).unwrap();
    let shape = t.shape().to_vec();
    match t.dtype() {
        Dtype::F32 => (
            bytemuck::pod_collect_to_vec(t.data()),
            shape,
            SourceDtype::F32,
        ),
        Dtype::BF16 => {
            let v: Vec<bf16> = bytemuck::pod_collect_to_vec(t.data());
            (
                v.iter().map(|b| b.to_f32()).collect(),
                shape,
                SourceDtype::Bf16,
            )
        }
        d => panic!("{key}: unexpected dtype {d:?}"),
    }
}

#[test]
fn nf4_double_quant_is_byte_exact() {
    let data = fixture("nf4.safetensors");
    let st = SafeTensors::deserialize(&data).unwrap();
    let names = cases(&st);
    assert!(names.len() >= 20, "fixture has {} cases", names.len());
    for key in names {
        let (x, shape, dtype) = nf4_input(&st, &key);
        let t = Nf4Tensor::quantize(&x, &shape, dtype);
        assert_eq!(
            t.packed,
            bytes(&st, &format!("{key}.packed")),
            "{key} packed"
        );
        assert_eq!(
            t.absmax.offset.to_bits(),
            f32s(&st, &format!("{key}.offset"))[0].to_bits(),
            "{key} offset"
        );
        assert_eq!(
            t.absmax.codes,
            bytes(&st, &format!("{key}.absmax")),
            "{key} absmax codes"
        );
        assert_eq!(
            bits(&t.absmax.nested_absmax),
            bits(&f32s(&st, &format!("{key}.nested_absmax"))),
            "{key} nested"
        );
        assert_eq!(
            bits(&f32s(&st, &format!("{key}.quant_map"))),
            bits(&rupantor_quant::NF4_CODE),
            "{key} quant_map"
        );
        assert_eq!(
            bits(&f32s(&st, &format!("{key}.nested_quant_map"))),
            bits(&dynamic_map(true)),
            "{key} nested map"
        );

        // Dequantization returns to the input dtype, as bitsandbytes does.
        let deq = st.tensor(&format!("{key}.dequantized")).unwrap();
        match dtype {
            SourceDtype::F32 => assert_eq!(
                bits(&t.dequantize()),
                bits(&bytemuck::pod_collect_to_vec(deq.data())),
                "{key} deq"
            ),
            SourceDtype::Bf16 => {
                let want: Vec<u16> = bytemuck::pod_collect_to_vec(deq.data());
                let got: Vec<u16> = t.dequantize_bf16().iter().map(|b| b.to_bits()).collect();
                assert_eq!(got, want, "{key} deq bf16");
            }
            SourceDtype::F16 => unreachable!(),
        }

        // The serialized layout, JSON quant state included, is what bitsandbytes writes.
        let tensors = bnb_layout::to_tensors("w", &t);
        let state = &tensors
            .iter()
            .find(|(n, _)| n.ends_with(bnb_layout::QUANT_STATE_SUFFIX))
            .unwrap()
            .1;
        assert_eq!(
            String::from_utf8_lossy(&state.data),
            String::from_utf8_lossy(&bytes(&st, &format!("{key}.quant_state"))),
            "{key} quant state JSON"
        );
        let packed = &tensors[0].1;
        assert_eq!(
            packed.shape,
            st.tensor(&format!("{key}.packed")).unwrap().shape(),
            "{key} packed shape"
        );
        let back = bnb_layout::from_tensors("w", |n| -> Option<RawTensor> {
            tensors.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone())
        })
        .unwrap();
        assert_eq!(back, t, "{key} round trip");
    }
}
