//! Fused matrix-vector products over block-quantized weights, for decoding: the weight is read
//! once in its packed form and never materialised in f32.
//!
//! * NF4 ([`nf4_gemv_f32`], [`nf4_matvecs_with`]): bitsandbytes' layout (two codes per byte,
//!   first element in the high nibble, one absmax per 64 elements of the flattened weight).
//! * Q8 ([`q8_matvecs_f32`]): signed 8-bit codes with one f32 scale per 32 elements, the
//!   geometry of GGUF's Q8_0, so a Q8_0 tensor (e.g. Gemma-3 270M's embedding, which doubles as
//!   the lm_head) is held at 8.5 bits per weight with no loss ([`Q8Weight::from_f32_exact`]).
//!
//! `y[i][r] = sum_c W[r][c] * x[i][c]` for up to a few input rows `x[i]` at once (a decode batch):
//! each block is decoded once into registers, scaled exactly as the dequantizer scales it
//! (`code * absmax` in f32), and multiplied into every input row. Only the summation order
//! differs from dequantize-then-GEMM. With AVX2 + FMA (detected at run time) a 64-element NF4
//! block is decoded by two 8-lane table permutes and a blend per 8 codes; elsewhere a portable
//! loop over a 256-entry table of code pairs does the same work. Rows are split over the rayon
//! pool in tasks of at least [`MIN_TASK_ELEMS`] weights.

use rayon::prelude::*;

use crate::nf4::{BLOCKSIZE, NF4_CODE};

/// Elements per Q8 block (as GGUF's Q8_0).
pub const Q8_BLOCK: usize = 32;
/// Input rows one pass over the weight serves; more rows are processed in groups of this.
pub const MAX_ROWS_PER_PASS: usize = 8;
/// Smallest number of weights handed to one parallel task.
pub const MIN_TASK_ELEMS: usize = 1 << 16;

/// `y = W x` for an NF4 weight `[rows, cols]` and one input vector (`x.len() == cols`,
/// `y.len() == rows`), `absmax` holding one scale per 64 elements of the flattened weight.
pub fn nf4_gemv_f32(
    packed: &[u8],
    absmax: &[f32],
    x: &[f32],
    y: &mut [f32],
    rows: usize,
    cols: usize,
) {
    nf4_matvecs_f32(packed, absmax, x, 1, y, rows, cols);
}

/// `y[i] = W x[i]` for `m` input rows: `x` is row-major `[m, cols]`, `y` row-major `[m, rows]`.
pub fn nf4_matvecs_f32(
    packed: &[u8],
    absmax: &[f32],
    x: &[f32],
    m: usize,
    y: &mut [f32],
    rows: usize,
    cols: usize,
) {
    let n = rows * cols;
    assert!(absmax.len() >= n.div_ceil(BLOCKSIZE), "absmax too short");
    nf4_matvecs_with(
        packed,
        &|b0: usize, out: &mut [f32]| out.copy_from_slice(&absmax[b0..b0 + out.len()]),
        x,
        m,
        y,
        rows,
        cols,
    );
}

/// [`nf4_matvecs_f32`] with the absmax values produced on demand: `absmax(b0, out)` fills
/// `out` with the scales of blocks `b0..b0 + out.len()` (double-quantized scales are decoded
/// per task this way, never for the whole weight at once).
pub fn nf4_matvecs_with(
    packed: &[u8],
    absmax: &(dyn Fn(usize, &mut [f32]) + Sync),
    x: &[f32],
    m: usize,
    y: &mut [f32],
    rows: usize,
    cols: usize,
) {
    let n = rows * cols;
    assert!(packed.len() >= n.div_ceil(2), "packed weight too short");
    assert_eq!(x.len(), m * cols, "x must be [m, cols]");
    assert_eq!(y.len(), m * rows, "y must be [m, rows]");
    if n == 0 || m == 0 {
        y.fill(0.0);
        return;
    }
    let rows_per_task = rows_per_task(rows, cols);
    // Each task computes y[.., r0..r1] into its own [m, r1 - r0] buffer; the buffers are
    // scattered into y's columns afterwards (cheap: m * rows values).
    let parts: Vec<(usize, Vec<f32>)> = (0..rows.div_ceil(rows_per_task))
        .into_par_iter()
        .map(|t| {
            let r0 = t * rows_per_task;
            let r1 = (r0 + rows_per_task).min(rows);
            let mut out = vec![0f32; m * (r1 - r0)];
            nf4_rows(packed, absmax, x, m, &mut out, r0, r1, cols);
            (r0, out)
        })
        .collect();
    scatter(parts, y, m, rows);
}

fn rows_per_task(rows: usize, cols: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    // Enough tasks to balance (4 per thread), none smaller than MIN_TASK_ELEMS.
    let by_balance = rows.div_ceil(4 * threads);
    let by_size = MIN_TASK_ELEMS.div_ceil(cols.max(1));
    by_balance.max(by_size).clamp(1, rows.max(1))
}

fn scatter(parts: Vec<(usize, Vec<f32>)>, y: &mut [f32], m: usize, rows: usize) {
    for (r0, out) in parts {
        let w = out.len() / m;
        for i in 0..m {
            y[i * rows + r0..i * rows + r0 + w].copy_from_slice(&out[i * w..(i + 1) * w]);
        }
    }
}

/// Rows `r0..r1` of the NF4 product into `out` (`[m, r1 - r0]`).
#[allow(clippy::too_many_arguments)]
fn nf4_rows(
    packed: &[u8],
    absmax: &(dyn Fn(usize, &mut [f32]) + Sync),
    x: &[f32],
    m: usize,
    out: &mut [f32],
    r0: usize,
    r1: usize,
    cols: usize,
) {
    let e0 = r0 * cols;
    let e1 = r1 * cols;
    let b0 = e0 / BLOCKSIZE;
    let mut scales = vec![0f32; e1.div_ceil(BLOCKSIZE) - b0];
    absmax(b0, &mut scales);
    let w = r1 - r0;
    if !cols.is_multiple_of(BLOCKSIZE) {
        // Blocks straddle rows (and, for odd cols, bytes): element by element.
        for r in r0..r1 {
            for i in 0..m {
                let xi = &x[i * cols..(i + 1) * cols];
                let mut acc = 0f32;
                for (c, &xv) in xi.iter().enumerate() {
                    let e = r * cols + c;
                    let byte = packed[e / 2];
                    let q = if e.is_multiple_of(2) {
                        byte >> 4
                    } else {
                        byte & 0x0f
                    };
                    acc += NF4_CODE[q as usize] * scales[e / BLOCKSIZE - b0] * xv;
                }
                out[i * w + (r - r0)] = acc;
            }
        }
        return;
    }
    let bytes = &packed[e0 / 2..e1 / 2];
    let mut i0 = 0;
    while i0 < m {
        let g = (m - i0).min(MAX_ROWS_PER_PASS);
        let xg = &x[i0 * cols..(i0 + g) * cols];
        let og = &mut out[i0 * w..(i0 + g) * w];
        nf4_rows_group(bytes, &scales, xg, g, og, w, cols);
        i0 += g;
    }
}

/// Up to [`MAX_ROWS_PER_PASS`] input rows against `w` whole-block weight rows.
fn nf4_rows_group(
    bytes: &[u8],
    scales: &[f32],
    x: &[f32],
    m: usize,
    out: &mut [f32],
    w: usize,
    cols: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: AVX2 and FMA are present (checked at run time); the kernel reads
        // `w * cols / 2` bytes, `w * cols / 64` scales, `m * cols` inputs and writes
        // `m * w` outputs, all within the slices (lengths asserted by the callers).
        unsafe { avx2::nf4_rows(bytes, scales, x, m, out, w, cols) };
        return;
    }
    portable_nf4_rows(bytes, scales, x, m, out, w, cols);
}

/// Both code values of every packed byte.
fn pair_table() -> [[f32; 2]; 256] {
    std::array::from_fn(|b| [NF4_CODE[b >> 4], NF4_CODE[b & 0x0f]])
}

fn portable_nf4_rows(
    bytes: &[u8],
    scales: &[f32],
    x: &[f32],
    m: usize,
    out: &mut [f32],
    w: usize,
    cols: usize,
) {
    let pairs = pair_table();
    let bpr = cols / BLOCKSIZE;
    let mut block = [0f32; BLOCKSIZE];
    let mut acc = [0f32; MAX_ROWS_PER_PASS];
    for r in 0..w {
        acc[..m].fill(0.0);
        for b in 0..bpr {
            let s = scales[r * bpr + b];
            let src = &bytes[(r * bpr + b) * BLOCKSIZE / 2..][..BLOCKSIZE / 2];
            for (o, &byte) in block.chunks_exact_mut(2).zip(src) {
                let [hi, lo] = pairs[byte as usize];
                o[0] = hi * s;
                o[1] = lo * s;
            }
            for (i, a) in acc[..m].iter_mut().enumerate() {
                let xb = &x[i * cols + b * BLOCKSIZE..][..BLOCKSIZE];
                *a += dot(&block, xb);
            }
        }
        for (i, a) in acc[..m].iter().enumerate() {
            out[i * w + r] = *a;
        }
    }
}

/// Eight independent partial sums, so the compiler can vectorise.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut s = [0f32; 8];
    for (ca, cb) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for k in 0..8 {
            s[k] += ca[k] * cb[k];
        }
    }
    let mut t: f32 = s.iter().sum();
    let tail = a.len() / 8 * 8;
    for (va, vb) in a[tail..].iter().zip(&b[tail..]) {
        t += va * vb;
    }
    t
}

/// A weight `[rows, cols]` in 8-bit blocks of [`Q8_BLOCK`]: `w = qs[e] * scales[e / 32]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Q8Weight {
    pub qs: Vec<i8>,
    pub scales: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

impl Q8Weight {
    /// Absmax quantization per block (`scale = amax / 127`, `q = round(w / scale)`), kept only
    /// if it reproduces every value of `w` bit for bit; `None` otherwise. A tensor that was
    /// stored as Q8_0 and dequantized to f32 always comes back exactly (each block's largest
    /// code is ±127, so the scale is recovered exactly, and `q * scale` is exact in f32).
    pub fn from_f32_exact(w: &[f32], rows: usize, cols: usize) -> Option<Self> {
        assert_eq!(w.len(), rows * cols, "weight must be [rows, cols]");
        let nb = w.len().div_ceil(Q8_BLOCK);
        let mut qs = vec![0i8; w.len()];
        let mut scales = vec![0f32; nb];
        let ok = qs
            .par_chunks_mut(Q8_BLOCK * 1024)
            .zip(scales.par_chunks_mut(1024))
            .zip(w.par_chunks(Q8_BLOCK * 1024))
            .all(|((q, s), src)| {
                for ((qb, sb), xb) in q
                    .chunks_mut(Q8_BLOCK)
                    .zip(s.iter_mut())
                    .zip(src.chunks(Q8_BLOCK))
                {
                    if !xb.iter().all(|v| v.is_finite()) {
                        return false;
                    }
                    let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
                    let d = amax / 127.0;
                    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                    for (qv, &xv) in qb.iter_mut().zip(xb) {
                        // Round half away from zero (|xv * id| <= 127, so the cast is exact);
                        // `f32::round` would be a libm call on baseline x86-64.
                        let v = xv * id;
                        let q = (v + 0.5f32.copysign(v)) as i32 as f32;
                        *qv = q as i8;
                        if (q * d).to_bits() != xv.to_bits() && !(q * d == 0.0 && xv == 0.0) {
                            return false;
                        }
                    }
                    *sb = d;
                }
                true
            });
        ok.then_some(Self {
            qs,
            scales,
            rows,
            cols,
        })
    }

    /// Rows `r0..r1` in f32 into `out` (`(r1 - r0) * cols` long).
    pub fn dequantize_rows(&self, r0: usize, r1: usize, out: &mut [f32]) {
        let e0 = r0 * self.cols;
        let e1 = r1 * self.cols;
        assert_eq!(out.len(), e1 - e0);
        for (k, o) in out.iter_mut().enumerate() {
            let e = e0 + k;
            *o = self.qs[e] as f32 * self.scales[e / Q8_BLOCK];
        }
    }

    pub fn storage_bytes(&self) -> usize {
        self.qs.len() + 4 * self.scales.len()
    }
}

/// `y[i] = W x[i]` for a [`Q8Weight`] and `m` input rows (`x`: `[m, cols]`, `y`: `[m, rows]`).
pub fn q8_matvecs_f32(w: &Q8Weight, x: &[f32], m: usize, y: &mut [f32]) {
    let (rows, cols) = (w.rows, w.cols);
    assert_eq!(x.len(), m * cols, "x must be [m, cols]");
    assert_eq!(y.len(), m * rows, "y must be [m, rows]");
    if rows * cols == 0 || m == 0 {
        y.fill(0.0);
        return;
    }
    let rows_per_task = rows_per_task(rows, cols);
    let parts: Vec<(usize, Vec<f32>)> = (0..rows.div_ceil(rows_per_task))
        .into_par_iter()
        .map(|t| {
            let r0 = t * rows_per_task;
            let r1 = (r0 + rows_per_task).min(rows);
            let mut out = vec![0f32; m * (r1 - r0)];
            q8_rows(w, x, m, &mut out, r0, r1);
            (r0, out)
        })
        .collect();
    scatter(parts, y, m, rows);
}

fn q8_rows(w: &Q8Weight, x: &[f32], m: usize, out: &mut [f32], r0: usize, r1: usize) {
    let cols = w.cols;
    let width = r1 - r0;
    if !cols.is_multiple_of(Q8_BLOCK) {
        let mut row = vec![0f32; cols];
        for r in r0..r1 {
            w.dequantize_rows(r, r + 1, &mut row);
            for i in 0..m {
                out[i * width + (r - r0)] = dot(&row, &x[i * cols..(i + 1) * cols]);
            }
        }
        return;
    }
    let qs = &w.qs[r0 * cols..r1 * cols];
    let scales = &w.scales[r0 * cols / Q8_BLOCK..r1 * cols / Q8_BLOCK];
    let mut i0 = 0;
    while i0 < m {
        let g = (m - i0).min(MAX_ROWS_PER_PASS);
        let xg = &x[i0 * cols..(i0 + g) * cols];
        let og = &mut out[i0 * width..(i0 + g) * width];
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            // SAFETY: AVX2 and FMA are present; all reads and writes stay within the slices
            // sized above (`width * cols` codes, `width * cols / 32` scales, `g * cols` inputs,
            // `g * width` outputs).
            unsafe { avx2::q8_rows(qs, scales, xg, g, og, width, cols) };
            i0 += g;
            continue;
        }
        let mut block = [0f32; Q8_BLOCK];
        let bpr = cols / Q8_BLOCK;
        for r in 0..width {
            let mut acc = [0f32; MAX_ROWS_PER_PASS];
            for b in 0..bpr {
                let s = scales[r * bpr + b];
                for (o, &q) in block.iter_mut().zip(&qs[(r * bpr + b) * Q8_BLOCK..]) {
                    *o = q as f32 * s;
                }
                for (i, a) in acc[..g].iter_mut().enumerate() {
                    *a += dot(&block, &xg[i * cols + b * Q8_BLOCK..][..Q8_BLOCK]);
                }
            }
            for (i, a) in acc[..g].iter().enumerate() {
                og[i * width + r] = *a;
            }
        }
        i0 += g;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{BLOCKSIZE, MAX_ROWS_PER_PASS, NF4_CODE, Q8_BLOCK};

    pub fn available() -> bool {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        _mm_cvtss_f32(s)
    }

    /// Byte `j` of every NF4 code value, as a `pshufb` table (the same 16 bytes in both lanes).
    fn code_byte_tables() -> [[u8; 32]; 4] {
        std::array::from_fn(|j| {
            std::array::from_fn(|k| (NF4_CODE[k % 16].to_bits() >> (8 * j)) as u8)
        })
    }

    /// The natural element index (within a 64-element block) of each position [`nf4_block`]
    /// decodes it to: vector `v` (0..4 high nibbles, 4..8 low nibbles), lane `t`.
    pub(super) fn block_order() -> [usize; BLOCKSIZE] {
        std::array::from_fn(|p| {
            let (v, t) = (p / 8, p % 8);
            let q = v % 4;
            let byte = if t < 4 {
                4 * q + t
            } else {
                16 + 4 * q + (t - 4)
            };
            2 * byte + usize::from(v >= 4)
        })
    }

    /// Half of a 64-element block (32 bytes at `p`) as four vectors of scaled weights: the
    /// high nibbles (`LOW = false`: block positions 0..32 of [`block_order`]) or the low ones
    /// (positions 32..64). Each code is looked up as the four bytes of its f32 value with
    /// `pshufb` (32 lookups per instruction) and the bytes are interleaved back into floats:
    /// exactly the values the dequantizer produces (`code * scale`).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn nf4_half<const LOW: bool>(
        p: *const u8,
        scale: __m256,
        t: &[__m256i; 4],
    ) -> [__m256; 4] {
        let raw = _mm256_loadu_si256(p as *const __m256i);
        let mask = _mm256_set1_epi8(0x0f);
        let idx = if LOW {
            _mm256_and_si256(raw, mask)
        } else {
            _mm256_and_si256(_mm256_srli_epi16::<4>(raw), mask)
        };
        let p0 = _mm256_shuffle_epi8(t[0], idx);
        let p1 = _mm256_shuffle_epi8(t[1], idx);
        let p2 = _mm256_shuffle_epi8(t[2], idx);
        let p3 = _mm256_shuffle_epi8(t[3], idx);
        let a_lo = _mm256_unpacklo_epi8(p0, p1);
        let a_hi = _mm256_unpackhi_epi8(p0, p1);
        let b_lo = _mm256_unpacklo_epi8(p2, p3);
        let b_hi = _mm256_unpackhi_epi8(p2, p3);
        let f = |v: __m256i| _mm256_mul_ps(_mm256_castsi256_ps(v), scale);
        [
            f(_mm256_unpacklo_epi16(a_lo, b_lo)),
            f(_mm256_unpackhi_epi16(a_lo, b_lo)),
            f(_mm256_unpacklo_epi16(a_hi, b_hi)),
            f(_mm256_unpackhi_epi16(a_hi, b_hi)),
        ]
    }

    /// `acc[i] += sum_k w[k] * x[i][k]` over four vectors; `x` rows are `stride` apart.
    /// One accumulator per input row, two for a single row (to break the FMA chain).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn fma_rows<const M: usize>(
        acc: &mut [[__m256; 2]; M],
        w: &[__m256; 4],
        x: *const f32,
        stride: usize,
    ) {
        for (i, a) in acc.iter_mut().enumerate() {
            let xb = x.add(i * stride);
            for (k, v) in w.iter().enumerate() {
                let j = if M == 1 { k & 1 } else { 0 };
                a[j] = _mm256_fmadd_ps(*v, _mm256_loadu_ps(xb.add(8 * k)), a[j]);
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn nf4_rows(
        bytes: &[u8],
        scales: &[f32],
        x: &[f32],
        m: usize,
        out: &mut [f32],
        w: usize,
        cols: usize,
    ) {
        debug_assert!((1..=MAX_ROWS_PER_PASS).contains(&m) && cols.is_multiple_of(BLOCKSIZE));
        debug_assert!(bytes.len() >= w * cols / 2 && scales.len() >= w * cols / BLOCKSIZE);
        debug_assert!(x.len() >= m * cols && out.len() >= m * w);
        match m {
            1 => nf4_rows_m::<1>(bytes, scales, x, out, w, cols),
            2 => nf4_rows_m::<2>(bytes, scales, x, out, w, cols),
            3 => nf4_rows_m::<3>(bytes, scales, x, out, w, cols),
            4 => nf4_rows_m::<4>(bytes, scales, x, out, w, cols),
            5 => nf4_rows_m::<5>(bytes, scales, x, out, w, cols),
            6 => nf4_rows_m::<6>(bytes, scales, x, out, w, cols),
            7 => nf4_rows_m::<7>(bytes, scales, x, out, w, cols),
            _ => nf4_rows_m::<8>(bytes, scales, x, out, w, cols),
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn nf4_rows_m<const M: usize>(
        bytes: &[u8],
        scales: &[f32],
        x: &[f32],
        out: &mut [f32],
        w: usize,
        cols: usize,
    ) {
        let tables = code_byte_tables();
        let t: [__m256i; 4] =
            std::array::from_fn(|j| _mm256_loadu_si256(tables[j].as_ptr() as *const __m256i));
        // The inputs in the order the blocks decode to, so the products pair up.
        let order = block_order();
        let xperm: Vec<f32> = x[..M * cols]
            .chunks_exact(BLOCKSIZE)
            .flat_map(|xb| order.iter().map(move |&e| xb[e]))
            .collect();
        let bpr = cols / BLOCKSIZE;
        let bp = bytes.as_ptr();
        let xp = xperm.as_ptr();
        for r in 0..w {
            // Two accumulators per input row break the FMA dependency chain.
            let mut acc = [[_mm256_setzero_ps(); 2]; M];
            for b in 0..bpr {
                let blk = r * bpr + b;
                let p = bp.add(blk * BLOCKSIZE / 2);
                let s = _mm256_set1_ps(scales[blk]);
                let xb = xp.add(b * BLOCKSIZE);
                fma_rows::<M>(&mut acc, &nf4_half::<false>(p, s, &t), xb, cols);
                fma_rows::<M>(&mut acc, &nf4_half::<true>(p, s, &t), xb.add(32), cols);
            }
            for (i, a) in acc.iter().enumerate() {
                out[i * w + r] = hsum(_mm256_add_ps(a[0], a[1]));
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn q8_rows(
        qs: &[i8],
        scales: &[f32],
        x: &[f32],
        m: usize,
        out: &mut [f32],
        w: usize,
        cols: usize,
    ) {
        debug_assert!((1..=MAX_ROWS_PER_PASS).contains(&m) && cols.is_multiple_of(Q8_BLOCK));
        debug_assert!(qs.len() >= w * cols && scales.len() >= w * cols / Q8_BLOCK);
        debug_assert!(x.len() >= m * cols && out.len() >= m * w);
        match m {
            1 => q8_rows_m::<1>(qs, scales, x, out, w, cols),
            2 => q8_rows_m::<2>(qs, scales, x, out, w, cols),
            3 => q8_rows_m::<3>(qs, scales, x, out, w, cols),
            4 => q8_rows_m::<4>(qs, scales, x, out, w, cols),
            5 => q8_rows_m::<5>(qs, scales, x, out, w, cols),
            6 => q8_rows_m::<6>(qs, scales, x, out, w, cols),
            7 => q8_rows_m::<7>(qs, scales, x, out, w, cols),
            _ => q8_rows_m::<8>(qs, scales, x, out, w, cols),
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn q8_rows_m<const M: usize>(
        qs: &[i8],
        scales: &[f32],
        x: &[f32],
        out: &mut [f32],
        w: usize,
        cols: usize,
    ) {
        let bpr = cols / Q8_BLOCK;
        let qp = qs.as_ptr();
        let xp = x.as_ptr();
        for r in 0..w {
            let mut acc = [[_mm256_setzero_ps(); 2]; M];
            for b in 0..bpr {
                let blk = r * bpr + b;
                let s = _mm256_set1_ps(scales[blk]);
                let q = qp.add(blk * Q8_BLOCK);
                let mut wv = [_mm256_setzero_ps(); 4];
                for (k, v) in wv.iter_mut().enumerate() {
                    let q8 = _mm_loadl_epi64(q.add(8 * k) as *const __m128i);
                    *v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8)), s);
                }
                fma_rows::<M>(&mut acc, &wv, xp.add(b * Q8_BLOCK), cols);
            }
            for (i, a) in acc.iter().enumerate() {
                out[i * w + r] = hsum(_mm256_add_ps(a[0], a[1]));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nf4::{dequantize_nf4, Nf4Tensor};

    /// A deterministic pseudo-random vector in [-1, 1).
    fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Reference: dequantize the whole weight, then plain f64 dot products.
    fn reference(w: &[f32], x: &[f32], m: usize, rows: usize, cols: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * rows];
        for i in 0..m {
            for r in 0..rows {
                y[i * rows + r] = (0..cols)
                    .map(|c| w[r * cols + c] as f64 * x[i * cols + c] as f64)
                    .sum::<f64>() as f32;
            }
        }
        y
    }

    fn assert_close(got: &[f32], want: &[f32], what: &str) {
        let scale = want.iter().fold(1e-3f32, |a, v| a.max(v.abs()));
        for (k, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= 2e-6 * scale * 8.0,
                "{what}[{k}]: {g} vs {w}"
            );
        }
    }

    #[test]
    fn nf4_matches_dequantize_then_matmul() {
        // Whole-block rows (the fast path), rows straddling blocks, odd widths, 1..=11 inputs
        // (more than one pass over the weight).
        for (rows, cols) in [(48, 128), (37, 640), (5, 96), (3, 33), (300, 64)] {
            let w = noise(rows * cols, (rows * 31 + cols) as u64);
            let t = Nf4Tensor::quantize_f32(&w, &[rows, cols]);
            let absmax = t.absmax.dequantize();
            let mut deq = vec![0f32; rows * cols];
            dequantize_nf4(&t.packed, &absmax, &mut deq);
            for m in [1, 2, 3, 8, 11] {
                let x = noise(m * cols, m as u64 + 7);
                let want = reference(&deq, &x, m, rows, cols);
                let mut y = vec![f32::NAN; m * rows];
                nf4_matvecs_f32(&t.packed, &absmax, &x, m, &mut y, rows, cols);
                assert_close(&y, &want, &format!("nf4 {rows}x{cols} m={m}"));
                if m == 1 {
                    let mut y1 = vec![0f32; rows];
                    nf4_gemv_f32(&t.packed, &absmax, &x, &mut y1, rows, cols);
                    assert_eq!(y1, y);
                }
                // The portable kernel agrees with whichever one ran.
                if cols.is_multiple_of(BLOCKSIZE) {
                    for g0 in (0..m).step_by(MAX_ROWS_PER_PASS) {
                        let g = (m - g0).min(MAX_ROWS_PER_PASS);
                        let mut out = vec![0f32; g * rows];
                        let scales = &absmax[..rows * cols / BLOCKSIZE];
                        let xg = &x[g0 * cols..(g0 + g) * cols];
                        portable_nf4_rows(&t.packed, scales, xg, g, &mut out, rows, cols);
                        assert_close(&out, &want[g0 * rows..(g0 + g) * rows], "portable");
                    }
                }
            }
        }
    }

    #[test]
    fn q8_round_trips_q8_0_values_exactly_and_multiplies() {
        let (rows, cols) = (70, 96);
        // Q8_0-style values: f16 scale times an int8 whose block maximum is +-127.
        let raw = noise(rows * cols, 3);
        let mut w = vec![0f32; rows * cols];
        for (wb, rb) in w.chunks_mut(Q8_BLOCK).zip(raw.chunks(Q8_BLOCK)) {
            let amax = rb.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = half::f16::from_f32(amax / 127.0 * 0.37).to_f32();
            for (o, v) in wb.iter_mut().zip(rb) {
                *o = (v / amax * 127.0).round() * d;
            }
        }
        w[5 * Q8_BLOCK..6 * Q8_BLOCK].fill(0.0); // an all-zero block
        let q = Q8Weight::from_f32_exact(&w, rows, cols).expect("exact");
        let mut back = vec![0f32; rows * cols];
        q.dequantize_rows(0, rows, &mut back);
        assert_eq!(back, w);
        for m in [1, 4, 9] {
            let x = noise(m * cols, 11 + m as u64);
            let mut y = vec![0f32; m * rows];
            q8_matvecs_f32(&q, &x, m, &mut y);
            assert_close(&y, &reference(&w, &x, m, rows, cols), "q8");
        }
        // Arbitrary floats are not Q8 values: refused rather than rounded.
        assert!(Q8Weight::from_f32_exact(&raw, rows, cols).is_none());
        assert!(Q8Weight::from_f32_exact(&[f32::NAN; 32], 1, 32).is_none());
    }
}

#[cfg(test)]
mod speed {
    use super::*;
    use crate::nf4::Nf4Tensor;
    use std::time::Instant;

    /// Timing only: `cargo test --release -p rupantor-quant gemv_speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn gemv_speed() {
        let (rows, cols) = (2048, 640);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let t = Nf4Tensor::quantize_f32(&w, &[rows, cols]);
        let absmax = t.absmax.dequantize();
        let x: Vec<f32> = (0..8 * cols).map(|i| (i % 13) as f32 / 13.0).collect();
        for m in [1, 8] {
            let mut y = vec![0f32; m * rows];
            let n = 400;
            let t0 = Instant::now();
            for _ in 0..n {
                nf4_matvecs_f32(&t.packed, &absmax, &x[..m * cols], m, &mut y, rows, cols);
            }
            let s = t0.elapsed().as_secs_f64() / n as f64;
            println!(
                "nf4 {rows}x{cols} m={m}: {:.1} us, {:.2} Gweights/s, {:.2} GB/s packed",
                s * 1e6,
                (rows * cols) as f64 / s / 1e9,
                (rows * cols / 2) as f64 / s / 1e9
            );
        }
        let (rows, cols) = (262144 / 4, 640);
        let q = Q8Weight {
            qs: vec![3; rows * cols],
            scales: vec![0.5; rows * cols / 32],
            rows,
            cols,
        };
        for m in [1, 8] {
            let mut y = vec![0f32; m * rows];
            let n = 20;
            let t0 = Instant::now();
            for _ in 0..n {
                q8_matvecs_f32(&q, &x[..m * cols], m, &mut y);
            }
            let s = t0.elapsed().as_secs_f64() / n as f64;
            println!(
                "q8 {rows}x{cols} m={m}: {:.1} us, {:.2} GB/s",
                s * 1e6,
                q.storage_bytes() as f64 / s / 1e9
            );
        }
    }
}
