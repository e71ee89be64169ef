//! NF4 (4-bit NormalFloat) with double quantization, byte-exact with bitsandbytes 0.50's
//! `quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)`.
//!
//! Layout, as bitsandbytes stores it: two codes per byte with the first element in the high
//! nibble; one absmax per 64 elements, itself stored as `absmax - offset` quantized to 8-bit
//! codes of the signed dynamic map in blocks of 256, where `offset = mean(absmax)`.

use crate::blockwise8::{self, Blockwise8};
use crate::torch_compat::mean_f32;
use half::{bf16, f16};
use rayon::prelude::*;

/// NF4 code values, index 0 = -1.0, index 7 = 0.0, index 15 = 1.0 (bitsandbytes' table).
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// Elements per absmax block.
pub const BLOCKSIZE: usize = 64;
/// Absmax values per nested (double-quant) block.
pub const NESTED_BLOCKSIZE: usize = blockwise8::BLOCKSIZE;

/// The element type the weight had before quantization; dequantization returns to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceDtype {
    F32,
    Bf16,
    F16,
}

impl SourceDtype {
    /// The name HF transformers writes in a bitsandbytes quant state (`"float32"`, ...).
    pub fn torch_name(self) -> &'static str {
        match self {
            SourceDtype::F32 => "float32",
            SourceDtype::Bf16 => "bfloat16",
            SourceDtype::F16 => "float16",
        }
    }

    pub fn from_torch_name(name: &str) -> Option<Self> {
        match name.trim_start_matches("torch.") {
            "float32" => Some(SourceDtype::F32),
            "bfloat16" => Some(SourceDtype::Bf16),
            "float16" => Some(SourceDtype::F16),
            _ => None,
        }
    }
}

/// Decision boundaries between neighbouring NF4 codes, in f32 as bitsandbytes computes them.
fn midpoints() -> [f32; 15] {
    std::array::from_fn(|i| (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0)
}

/// The NF4 code of a value already scaled into [-1, 1]: the number of midpoints strictly below
/// it, i.e. `torch.bucketize(x, midpoints)`. Ties go to the lower code.
#[inline(always)]
fn nf4_code(x: f32, mids: &[f32; 15]) -> u8 {
    // A branch-free count compiles to compares and adds the vectoriser handles well.
    mids.iter().map(|&m| (x > m) as u8).sum()
}

/// Double-quantized absmax: 8-bit codes, one f32 scale per 256 codes, and the mean offset.
#[derive(Debug, Clone, PartialEq)]
pub struct NestedAbsmax {
    /// 8-bit codes of `absmax - offset` against [`blockwise8::dynamic_map`]`(true)`.
    pub codes: Vec<u8>,
    /// Absmax of each block of 256 shifted absmax values.
    pub nested_absmax: Vec<f32>,
    /// Mean of the raw absmax values.
    pub offset: f32,
}

impl NestedAbsmax {
    /// Quantize raw per-block absmax values as `quantize_4bit(compress_statistics=True)` does.
    pub fn quantize(absmax: &[f32]) -> Self {
        let offset = mean_f32(absmax);
        let shifted: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
        let q = blockwise8::quantize(&shifted, &blockwise8::dynamic_map(true), NESTED_BLOCKSIZE);
        NestedAbsmax {
            codes: q.codes,
            nested_absmax: q.absmax,
            offset,
        }
    }

    /// Recover the per-block absmax: `code[q] * nested[b / 256]`, then `+ offset` (two roundings,
    /// as bitsandbytes' `dequantize_blockwise` followed by `absmax += offset`).
    pub fn dequantize(&self) -> Vec<f32> {
        let map = blockwise8::dynamic_map(true);
        let mut out = Blockwise8 {
            codes: self.codes.clone(),
            absmax: self.nested_absmax.clone(),
            blocksize: NESTED_BLOCKSIZE,
        }
        .dequantize(&map);
        for a in &mut out {
            *a += self.offset;
        }
        out
    }
}

/// A weight in bitsandbytes' NF4 form.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Tensor {
    /// `ceil(numel / 2)` bytes, first element of each pair in the high nibble.
    pub packed: Vec<u8>,
    pub absmax: NestedAbsmax,
    pub shape: Vec<usize>,
    pub dtype: SourceDtype,
}

/// Per-block absmax and packed codes, before double quantization.
fn quantize_blocks(x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let mids = midpoints();
    let n = x.len();
    let full = n - n % BLOCKSIZE;
    let mut packed = vec![0u8; n.div_ceil(2)];
    let mut absmax = vec![0f32; n.div_ceil(BLOCKSIZE)];
    // Full blocks: bitsandbytes multiplies by the reciprocal of the clamped absmax but stores
    // the unclamped absmax (so an all-zero block keeps absmax 0).
    packed[..full / 2]
        .par_chunks_mut(BLOCKSIZE / 2)
        .zip(x[..full].par_chunks(BLOCKSIZE))
        .zip(absmax.par_iter_mut())
        .for_each(|((out, block), am)| {
            let m = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            *am = m;
            let inv = 1.0 / m.max(1e-38);
            for (o, pair) in out.iter_mut().zip(block.chunks_exact(2)) {
                let hi = nf4_code((pair[0] * inv).clamp(-1.0, 1.0), &mids);
                let lo = nf4_code((pair[1] * inv).clamp(-1.0, 1.0), &mids);
                *o = (hi << 4) | lo;
            }
        });
    // The partial last block divides by its clamped absmax, and stores the clamped value.
    if full < n {
        let tail = &x[full..];
        let m = tail.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-38);
        absmax[full / BLOCKSIZE] = m;
        // An odd count is padded with a zero, whose code is 7.
        let zero_code = nf4_code(0.0, &mids);
        for (k, pair) in tail.chunks(2).enumerate() {
            let hi = nf4_code((pair[0] / m).clamp(-1.0, 1.0), &mids);
            let lo = pair
                .get(1)
                .map_or(zero_code, |v| nf4_code((v / m).clamp(-1.0, 1.0), &mids));
            packed[full / 2 + k] = (hi << 4) | lo;
        }
    }
    (packed, absmax)
}

impl Nf4Tensor {
    /// Quantize f32 values (already converted from `dtype`, which dequantization returns to).
    pub fn quantize(x: &[f32], shape: &[usize], dtype: SourceDtype) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            x.len(),
            "shape {shape:?} does not match {} elements",
            x.len()
        );
        let (packed, absmax) = quantize_blocks(x);
        Nf4Tensor {
            packed,
            absmax: NestedAbsmax::quantize(&absmax),
            shape: shape.to_vec(),
            dtype,
        }
    }

    pub fn quantize_f32(x: &[f32], shape: &[usize]) -> Self {
        Self::quantize(x, shape, SourceDtype::F32)
    }

    pub fn quantize_bf16(x: &[bf16], shape: &[usize]) -> Self {
        let f: Vec<f32> = x.par_iter().map(|v| v.to_f32()).collect();
        Self::quantize(&f, shape, SourceDtype::Bf16)
    }

    pub fn quantize_f16(x: &[f16], shape: &[usize]) -> Self {
        let f: Vec<f32> = x.par_iter().map(|v| v.to_f32()).collect();
        Self::quantize(&f, shape, SourceDtype::F16)
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes held: packed codes, absmax codes and nested scales (what the GPU would hold).
    pub fn storage_bytes(&self) -> usize {
        self.packed.len() + self.absmax.codes.len() + 4 * self.absmax.nested_absmax.len() + 4
    }

    /// Dequantize to f32 into `out` (`numel` long). Parallel over 64-element blocks.
    pub fn dequantize_into(&self, out: &mut [f32]) {
        assert_eq!(out.len(), self.numel(), "output length");
        let absmax = self.absmax.dequantize();
        dequantize_nf4(&self.packed, &absmax, out);
    }

    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.numel()];
        self.dequantize_into(&mut out);
        out
    }

    /// Dequantize to bf16 (round to nearest even, as bitsandbytes' `float_to_bf16`).
    pub fn dequantize_bf16(&self) -> Vec<bf16> {
        self.dequantize()
            .par_iter()
            .map(|&v| bf16::from_f32(v))
            .collect()
    }

    pub fn dequantize_f16(&self) -> Vec<f16> {
        self.dequantize()
            .par_iter()
            .map(|&v| f16::from_f32(v))
            .collect()
    }
}

/// The CPU NF4 kernel: `NF4_CODE[q] * absmax[block]` over 64-element blocks.
///
/// Each byte expands through a 256-entry table of code pairs, so the inner loop is one load,
/// two multiplies and one 8-byte store per byte. Blocks are split into per-thread chunks
/// large enough that scheduling cost stays below the memory traffic.
pub fn dequantize_nf4(packed: &[u8], absmax: &[f32], out: &mut [f32]) {
    let n = out.len();
    assert!(
        packed.len() * 2 >= n,
        "{} packed bytes cannot hold {n} values",
        packed.len()
    );
    assert!(
        absmax.len() * BLOCKSIZE >= n,
        "{} absmax values cannot cover {n} values",
        absmax.len()
    );
    let pairs = pair_table();
    const BLOCKS_PER_TASK: usize = 256;
    out.par_chunks_mut(BLOCKSIZE * BLOCKS_PER_TASK)
        .enumerate()
        .for_each(|(task, chunk)| {
            let first_block = task * BLOCKS_PER_TASK;
            for (b, block) in chunk.chunks_mut(BLOCKSIZE).enumerate() {
                let block_idx = first_block + b;
                let scale = absmax[block_idx];
                let bytes = &packed[block_idx * BLOCKSIZE / 2..];
                dequantize_block(bytes, scale, block, &pairs);
            }
        });
}

#[inline(always)]
fn dequantize_block(bytes: &[u8], scale: f32, block: &mut [f32], pairs: &[[f32; 2]; 256]) {
    if block.len() == BLOCKSIZE {
        let block: &mut [f32; BLOCKSIZE] = block.try_into().unwrap();
        let bytes: &[u8; BLOCKSIZE / 2] = bytes[..BLOCKSIZE / 2].try_into().unwrap();
        for (o, &b) in block.chunks_exact_mut(2).zip(bytes.iter()) {
            let [hi, lo] = pairs[b as usize];
            o[0] = hi * scale;
            o[1] = lo * scale;
        }
    } else {
        for (i, o) in block.iter_mut().enumerate() {
            let b = bytes[i / 2];
            let q = if i % 2 == 0 { b >> 4 } else { b & 0x0f };
            *o = NF4_CODE[q as usize] * scale;
        }
    }
}

/// Both code values of every packed byte: `table[b] = [code[b >> 4], code[b & 15]]`.
fn pair_table() -> [[f32; 2]; 256] {
    std::array::from_fn(|b| [NF4_CODE[b >> 4], NF4_CODE[b & 0x0f]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_sorted_with_zero_at_seven() {
        assert!(NF4_CODE.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(NF4_CODE[7], 0.0);
        let mids = midpoints();
        for (i, &c) in NF4_CODE.iter().enumerate() {
            assert_eq!(nf4_code(c, &mids) as usize, i);
        }
        // A value exactly on a midpoint goes to the lower code.
        assert_eq!(nf4_code(mids[3], &mids), 3);
    }

    #[test]
    fn high_nibble_holds_the_first_element() {
        let mut x = vec![0f32; 64];
        x[0] = -1.0; // code 0
        x[1] = 1.0; // code 15
        let t = Nf4Tensor::quantize_f32(&x, &[64]);
        assert_eq!(t.packed[0], 0x0f);
        assert_eq!(t.packed[1], 0x77);
    }
}
