//! Round-trip error bounds that must hold for any input, not just the fixtures.

use proptest::prelude::*;
use rupantor_quant::blockwise8::{self, dynamic_map};
use rupantor_quant::nf4::{self, Nf4Tensor, NF4_CODE};

/// Largest distance from a value in [-1, 1] to its NF4 code: half the widest code gap.
fn nf4_half_gap() -> f32 {
    NF4_CODE.windows(2).map(|w| w[1] - w[0]).fold(0.0, f32::max) / 2.0
}

/// Largest half gap of a dynamic map, plus half a step of bitsandbytes' 65536-point grid.
fn map_half_gap(map: &[f32; 256]) -> f32 {
    map.windows(2).map(|w| w[1] - w[0]).fold(0.0, f32::max) / 2.0 + 1.0 / 65535.0
}

fn values() -> impl Strategy<Value = (Vec<f32>, f32)> {
    (1usize..3000, -30i32..30).prop_flat_map(|(n, exp)| {
        let scale = 2f32.powi(exp);
        (prop::collection::vec(-1.0f32..1.0, n), Just(scale))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn nf4_round_trip_error_is_bounded((x, scale) in values()) {
        let x: Vec<f32> = x.iter().map(|v| v * scale).collect();
        let t = Nf4Tensor::quantize_f32(&x, &[x.len()]);
        prop_assert_eq!(t.packed.len(), x.len().div_ceil(2));
        let y = t.dequantize();
        let nested_gap = map_half_gap(&dynamic_map(true));
        for (b, (xb, yb)) in x.chunks(nf4::BLOCKSIZE).zip(y.chunks(nf4::BLOCKSIZE)).enumerate() {
            let absmax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let nested = t.absmax.nested_absmax[b / nf4::NESTED_BLOCKSIZE];
            // Code error on the true scale, plus the error of the double-quantized scale.
            let bound = nf4_half_gap() * absmax + nested * nested_gap * 1.01 + absmax * 1e-6 + 1e-38;
            for (a, c) in xb.iter().zip(yb) {
                prop_assert!((a - c).abs() <= bound, "block {}: {} -> {} (bound {})", b, a, c, bound);
            }
        }
    }

    #[test]
    fn blockwise8_round_trip_error_is_bounded((x, scale) in values(), signed in any::<bool>()) {
        let x: Vec<f32> = x.iter().map(|v| if signed { v * scale } else { v.abs() * scale }).collect();
        let map = dynamic_map(signed);
        let q = blockwise8::quantize(&x, &map, 256);
        let y = q.dequantize(&map);
        let gap = map_half_gap(&map);
        for (b, (xb, yb)) in x.chunks(256).zip(y.chunks(256)).enumerate() {
            let bound = q.absmax[b] * gap * 1.01;
            for (a, c) in xb.iter().zip(yb) {
                prop_assert!((a - c).abs() <= bound, "{} -> {} (bound {})", a, c, bound);
            }
        }
    }

    #[test]
    fn quantization_is_deterministic_and_bf16_agrees_with_f32(x in prop::collection::vec(-4.0f32..4.0, 1..700)) {
        let bf: Vec<half::bf16> = x.iter().map(|&v| half::bf16::from_f32(v)).collect();
        let widened: Vec<f32> = bf.iter().map(|v| v.to_f32()).collect();
        let a = Nf4Tensor::quantize_bf16(&bf, &[bf.len()]);
        let b = Nf4Tensor::quantize_f32(&widened, &[bf.len()]);
        prop_assert_eq!(&a.packed, &b.packed);
        prop_assert_eq!(&a.absmax, &b.absmax);
    }
}
