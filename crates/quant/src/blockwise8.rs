//! bitsandbytes' 8-bit blockwise dynamic quantization (`quantize_blockwise` /
//! `dequantize_blockwise`), the codec of 8-bit optimizer states and of the NF4 double-quant
//! absmax.
//!
//! Quantization reproduces bitsandbytes' CPU kernel (`quantize_cpu`) bit for bit, including
//! its table-based code search (see [`CodeLut`]). Matching it keeps our NF4 checkpoints and
//! optimizer states interchangeable with bitsandbytes'.

use crate::torch_compat::linspace_f32;
use rayon::prelude::*;

/// Number of entries in a dynamic map.
pub const MAP_SIZE: usize = 256;
/// Block size bitsandbytes uses for optimizer states and nested absmax.
pub const BLOCKSIZE: usize = 256;

/// `bitsandbytes.functional.create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)`.
///
/// The signed map (for Adam's first moment and the NF4 nested absmax) spans [-0.993, 1]; the
/// unsigned map (for the second moment) spans [0, 1]. Both are sorted ascending.
pub fn dynamic_map(signed: bool) -> [f32; MAP_SIZE] {
    // 10**(-6 + i) as Python evaluates it, then rounded to f32 by torch's scalar multiply.
    const DECADES: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    let mut data: Vec<f32> = Vec::with_capacity(MAP_SIZE);
    for (i, decade) in DECADES.iter().enumerate() {
        let fraction_items = if signed {
            (1 << i) + 1
        } else {
            (1 << (i + 1)) + 1
        };
        let bounds = linspace_f32(0.1, 1.0, fraction_items);
        let means: Vec<f32> = bounds.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        let scale = *decade as f32;
        data.extend(means.iter().map(|m| scale * m));
        if signed {
            data.extend(means.iter().map(|m| -scale * m));
        }
    }
    data.push(0.0);
    data.push(1.0);
    debug_assert_eq!(data.len(), MAP_SIZE);
    data.sort_by(f32::total_cmp);
    data.try_into().expect("dynamic map has 256 entries")
}

/// A tensor quantized blockwise to 8-bit codes of a 256-entry map.
#[derive(Debug, Clone, PartialEq)]
pub struct Blockwise8 {
    /// One code per element.
    pub codes: Vec<u8>,
    /// Absolute maximum of each block (the last block may be partial).
    pub absmax: Vec<f32>,
    pub blocksize: usize,
}

impl Blockwise8 {
    pub fn len(&self) -> usize {
        self.codes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.codes.is_empty()
    }

    /// `code[q] * absmax[block]`, as bitsandbytes' `dequantizeBlockwise8bitCpu`.
    pub fn dequantize_into(&self, map: &[f32; MAP_SIZE], out: &mut [f32]) {
        assert_eq!(out.len(), self.codes.len(), "output length");
        out.par_chunks_mut(self.blocksize)
            .zip(self.codes.par_chunks(self.blocksize))
            .zip(self.absmax.par_iter())
            .for_each(|((o, q), &scale)| {
                for (o, &q) in o.iter_mut().zip(q) {
                    *o = map[q as usize] * scale;
                }
            });
    }

    pub fn dequantize(&self, map: &[f32; MAP_SIZE]) -> Vec<f32> {
        let mut out = vec![0.0; self.codes.len()];
        self.dequantize_into(map, &mut out);
        out
    }
}

/// Quantize `x` blockwise against `map` exactly as bitsandbytes' CPU `quantize_blockwise`.
pub fn quantize(x: &[f32], map: &[f32; MAP_SIZE], blocksize: usize) -> Blockwise8 {
    assert!(blocksize > 0, "blocksize must be positive");
    let lut = CodeLut::new(map);
    let mut codes = vec![0u8; x.len()];
    let mut absmax = vec![0f32; x.len().div_ceil(blocksize)];
    quantize_into(x, &lut, blocksize, &mut codes, &mut absmax);
    Blockwise8 {
        codes,
        absmax,
        blocksize,
    }
}

/// Re-quantize `x` into existing storage (optimizer steps reuse their buffers).
pub fn quantize_into(
    x: &[f32],
    lut: &CodeLut,
    blocksize: usize,
    codes: &mut [u8],
    absmax: &mut [f32],
) {
    assert_eq!(x.len(), codes.len(), "codes length");
    assert_eq!(absmax.len(), x.len().div_ceil(blocksize), "absmax length");
    codes
        .par_chunks_mut(blocksize)
        .zip(x.par_chunks(blocksize))
        .zip(absmax.par_iter_mut())
        .for_each(|((q, block), a)| *a = lut.quantize_block(block, q));
}

/// Entries of bitsandbytes' quantization table: a uniform grid over [-1, 1].
const LUT_SIZE: usize = 1 << 16;

/// bitsandbytes 0.50's CPU code search: values scaled into [-1, 1] are rounded to a uniform
/// grid of 65536 points, and a table gives each grid point the code whose midpoint interval
/// holds it. This is what bitsandbytes' `build_quantize_lut` / `quantize_cpu_impl` compute; it
/// can differ from the exactly nearest code within half a grid step of a midpoint, and we
/// keep that behaviour so states and checkpoints stay byte-identical.
#[derive(Clone)]
pub struct CodeLut {
    table: Box<[u8; LUT_SIZE]>,
}

impl std::fmt::Debug for CodeLut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CodeLut").finish_non_exhaustive()
    }
}

impl CodeLut {
    pub fn new(map: &[f32; MAP_SIZE]) -> Self {
        let mids: Vec<f32> = map.windows(2).map(|w| (w[0] + w[1]) * 0.5).collect();
        let mut table = Box::new([0u8; LUT_SIZE]);
        let mut code = 0usize;
        for (c, entry) in table.iter_mut().enumerate() {
            let v = (c as f32 + c as f32) / 65535.0 - 1.0;
            while code < MAP_SIZE - 1 && v > mids[code] {
                code += 1;
            }
            *entry = code as u8;
        }
        CodeLut { table }
    }

    /// The code of a value already multiplied by its block's reciprocal absmax.
    #[inline(always)]
    pub fn code_of(&self, scaled: f32) -> u8 {
        let v = scaled.clamp(-1.0, 1.0);
        // NaN falls through the clamp and the conversion to grid index 0, as in bitsandbytes.
        let grid = 65535f32.mul_add((v + 1.0) * 0.5, 0.5);
        let idx = if grid.is_nan() {
            0
        } else {
            (grid as i32 as u32 & 0xffff) as usize
        };
        self.table[idx]
    }

    /// Quantize one block into `out` and return its absmax. An all-zero block gets code 0
    /// everywhere and absmax 0.
    pub fn quantize_block(&self, block: &[f32], out: &mut [u8]) -> f32 {
        let absmax = block
            .iter()
            .fold(
                f32::NEG_INFINITY,
                |m, v| if m < v.abs() { v.abs() } else { m },
            )
            .max(0.0);
        if absmax == 0.0 {
            out.fill(0);
            return absmax;
        }
        let inv = 1.0 / absmax;
        for (o, &v) in out.iter_mut().zip(block) {
            *o = self.code_of(v * inv);
        }
        absmax
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_are_sorted_and_bounded() {
        let s = dynamic_map(true);
        let u = dynamic_map(false);
        assert!(s.windows(2).all(|w| w[0] < w[1]));
        assert!(u.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(s[255], 1.0);
        assert_eq!(u[0], 0.0);
        assert_eq!(u[255], 1.0);
        assert!(s[0] > -1.0 && s[0] < -0.99);
    }

    #[test]
    fn table_picks_a_neighbouring_code() {
        let map = dynamic_map(true);
        let lut = CodeLut::new(&map);
        for i in 0..=20000 {
            let z = -1.0 + i as f32 * 1e-4;
            let q = lut.code_of(z) as usize;
            // Within half a grid step (1/65535) of the interval around the chosen code.
            let lo = if q == 0 {
                -1.0
            } else {
                (map[q - 1] + map[q]) * 0.5
            };
            let hi = if q == 255 {
                1.0
            } else {
                (map[q] + map[q + 1]) * 0.5
            };
            let slack = 1.0 / 65535.0;
            assert!(
                z >= lo - slack && z <= hi + slack,
                "z={z} got code {q} ({lo}..{hi})"
            );
        }
        assert_eq!(lut.code_of(f32::NAN), 0);
        assert_eq!(lut.code_of(1.0), 255);
    }
}
