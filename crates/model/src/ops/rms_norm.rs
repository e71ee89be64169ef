//! Gemma's RMSNorm as one op: `y = x * (1 / sqrt(mean(x^2) + eps)) * scale` in f32, rounded
//! once to the input's dtype, where `scale = 1 + w` is precomputed in f32.
//!
//! The composed version (`to_dtype`, `sqr`, `mean_keepdim`, `+ eps`, `sqrt`, `recip`, two
//! broadcast multiplies, `to_dtype`) is about ten kernels forward and fifteen backward, and runs
//! four times per decoder layer; on a GPU that makes the train step launch-bound. Here the
//! forward is one pass per row and the backward another (`kernels/rms_norm.cu` on a GPU, the
//! row functions below on the CPU), recomputing the row's `inv` instead of saving it.
//!
//! The gradient goes to `x` only: the norm weights are frozen under QLoRA, so `scale` must not
//! be tracked (see [`rms_norm`]).

use candle_core::backend::BackendStorage;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use half::{bf16, f16};

/// Gemma's RMSNorm of `x` (`[.., h]`, f32, bf16 or f16; any leading dims, any layout) with the
/// f32 `[h]` `scale` (`1 + w`), in x's dtype:
/// `x_f32 * (1 / sqrt(mean(x_f32^2) + eps)) * scale` rounded once, the same formula as the
/// composed candle ops. Differentiable w.r.t. `x` only; a tracked `scale` is an error rather
/// than a gradient silently dropped.
pub fn rms_norm(x: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    let h = x.dim(D::Minus1)?;
    if !matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        candle_core::bail!(
            "rms_norm: {:?} input (supported: f32, bf16, f16)",
            x.dtype()
        );
    }
    if scale.dims() != [h] || scale.dtype() != DType::F32 {
        candle_core::bail!(
            "rms_norm: the scale must be f32 [{h}] for an input of shape {:?}, got {:?} {:?}",
            x.dims(),
            scale.dtype(),
            scale.dims()
        );
    }
    if scale.track_op() {
        candle_core::bail!(
            "rms_norm: the scale is tracked for gradients, but the op gives it none (the norm \
             weights are frozen); pass a detached scale"
        );
    }
    // An empty input has nothing to normalise (and no GPU buffer can be allocated for it).
    if x.elem_count() == 0 {
        return Ok(x.clone());
    }
    x.contiguous()?
        .apply_op2(&scale.contiguous()?, RmsNorm { eps })
}

/// The forward op: `x` (arg 1) and `scale` (arg 2), both contiguous.
struct RmsNorm {
    eps: f64,
}

/// The backward op: `dx` from the upstream gradient `g` (arg 1, in x's dtype), `x` (arg 2) and
/// `scale` (arg 3), all contiguous.
struct RmsNormGrad {
    eps: f64,
}

/// The f32 constants of a row of `h` elements, rounded as candle rounds them in the composed
/// formula (`mean_keepdim` multiplies the sum by `1 / h`, `+ eps` adds `eps`, both as f32).
#[derive(Clone, Copy)]
struct Consts {
    inv_n: f32,
    eps: f32,
}

impl Consts {
    fn new(h: usize, eps: f64) -> Self {
        Self {
            inv_n: (1.0 / h as f64) as f32,
            eps: eps as f32,
        }
    }

    /// `1 / sqrt(sum_sq / h + eps)`, each step rounded to f32 like the composed ops.
    fn inv_rms(self, sum_sq: f32) -> f32 {
        1.0 / (sum_sq * self.inv_n + self.eps).sqrt()
    }
}

/// `(start, end)` of a contiguous operand in its storage.
type Span = (usize, usize);

/// Checks that every tensor operand (`[.., h]`, all of one shape) and the `[h]` scale are
/// contiguous; returns `h` and the `(start, end)` offsets of the operands and of the scale.
fn operands<const N: usize>(
    op: &str,
    tensors: [&Layout; N],
    scale: &Layout,
) -> Result<(usize, [Span; N], Span)> {
    let shape = tensors[0].shape();
    let h = shape.dims().last().copied().unwrap_or(0);
    if h == 0 || scale.dims() != [h] {
        candle_core::bail!(
            "{op}: a scale of shape {:?} for operands of shape {shape:?}",
            scale.dims()
        );
    }
    let contiguous = |l: &Layout| l.contiguous_offsets().ok_or_else(|| not_contiguous(op));
    let mut offsets = [(0, 0); N];
    for (o, l) in offsets.iter_mut().zip(tensors) {
        if l.shape() != shape {
            candle_core::bail!("{op}: operand shapes {shape:?} and {:?} differ", l.shape());
        }
        *o = contiguous(l)?;
    }
    Ok((h, offsets, contiguous(scale)?))
}

fn not_contiguous(op: &str) -> candle_core::Error {
    candle_core::Error::msg(format!("{op}: operands must be contiguous"))
}

/// The element types the CPU rows read and write, widened to f32 exactly.
trait Elem: Copy + Send + Sync {
    fn to_f32(self) -> f32;
    /// Round-to-nearest-even, as candle's `to_dtype`.
    fn from_f32(v: f32) -> Self;
}

impl Elem for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Elem for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

impl Elem for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// `sum(x^2)` of a row: the squares rounded to f32 as `sqr` rounds them, summed in f64 and
/// rounded once, so the result is as close to the exact sum as an f32 can be (candle's own
/// f32 sum is within a few ulps of it; the GPU's tree of f32 sums likewise).
fn sum_sq<T: Elem>(x: &[T]) -> f32 {
    x.iter()
        .map(|&v| {
            let v = v.to_f32();
            f64::from(v * v)
        })
        .sum::<f64>() as f32
}

/// One row of the forward (`kRmsNormFwd_*` on the GPU).
fn fwd_row<T: Elem>(x: &[T], scale: &[f32], c: Consts, y: &mut [T]) {
    let inv = c.inv_rms(sum_sq(x));
    for ((y, &x), &s) in y.iter_mut().zip(x).zip(scale) {
        *y = T::from_f32(x.to_f32() * inv * s);
    }
}

/// One row of the backward (`kRmsNormBwd_*` on the GPU):
/// `dx = inv * (g*s - xhat * mean(g*s*xhat))`, `xhat = x * inv`.
fn bwd_row<T: Elem>(g: &[T], x: &[T], scale: &[f32], c: Consts, dx: &mut [T]) {
    let inv = c.inv_rms(sum_sq(x));
    let dot: f64 = g
        .iter()
        .zip(x)
        .zip(scale)
        .map(|((&g, &x), &s)| f64::from(g.to_f32() * s * (x.to_f32() * inv)))
        .sum();
    let m = dot as f32 * c.inv_n;
    for (((dx, &g), &x), &s) in dx.iter_mut().zip(g).zip(x).zip(scale) {
        let xhat = x.to_f32() * inv;
        *dx = T::from_f32(inv * (g.to_f32() * s - xhat * m));
    }
}

/// Elements below which a CPU call stays on the calling thread: spawning costs more than a
/// few decode-step rows take to normalise.
const MIN_ELEMS_PER_THREAD: usize = 1 << 15;

/// `f(row, out_row)` for every `h`-element row of `out`, runs of rows split across candle's
/// CPU threads.
fn for_each_row<T: Send>(out: &mut [T], h: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let rows = out.len() / h;
    let threads = candle_core::utils::get_num_threads()
        .min(out.len().div_ceil(MIN_ELEMS_PER_THREAD))
        .max(1);
    if threads == 1 {
        out.chunks_mut(h).enumerate().for_each(|(r, o)| f(r, o));
        return;
    }
    let per = rows.div_ceil(threads);
    let f = &f;
    std::thread::scope(|scope| {
        for (t, run) in out.chunks_mut(per * h).enumerate() {
            scope.spawn(move || {
                for (i, o) in run.chunks_mut(h).enumerate() {
                    f(t * per + i, o);
                }
            });
        }
    });
}

fn fwd_cpu<T: Elem>(x: &[T], scale: &[f32], h: usize, c: Consts) -> Vec<T> {
    let mut y = vec![T::from_f32(0.0); x.len()];
    for_each_row(&mut y, h, |r, y| {
        fwd_row(&x[r * h..(r + 1) * h], scale, c, y)
    });
    y
}

fn bwd_cpu<T: Elem>(g: &[T], x: &[T], scale: &[f32], h: usize, c: Consts) -> Vec<T> {
    let mut dx = vec![T::from_f32(0.0); x.len()];
    for_each_row(&mut dx, h, |r, dx| {
        let row = r * h..(r + 1) * h;
        bwd_row(&g[row.clone()], &x[row], scale, c, dx)
    });
    dx
}

fn cpu_scale<'a>(op: &str, s: &'a CpuStorage, (start, end): Span) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => Ok(&v[start..end]),
        other => candle_core::bail!("{op}: the scale must be f32, got {:?}", other.dtype()),
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        scale: &CpuStorage,
        ls: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (h, [(a, b)], so) = operands(self.name(), [lx], ls)?;
        let scale = cpu_scale(self.name(), scale, so)?;
        let c = Consts::new(h, self.eps);
        let y = match x {
            CpuStorage::F32(v) => CpuStorage::F32(fwd_cpu(&v[a..b], scale, h, c)),
            CpuStorage::BF16(v) => CpuStorage::BF16(fwd_cpu(&v[a..b], scale, h, c)),
            CpuStorage::F16(v) => CpuStorage::F16(fwd_cpu(&v[a..b], scale, h, c)),
            other => candle_core::bail!("rms-norm: {:?} input", other.dtype()),
        };
        Ok((y, lx.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        scale: &CudaStorage,
        ls: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (h, offsets, so) = operands(self.name(), [lx], ls)?;
        let c = Consts::new(h, self.eps);
        let y = gpu::launch("kRmsNormFwd", [x], offsets, (scale, so), h, c)?;
        Ok((y, lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        scale: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.to_dtype(x.dtype())?.contiguous()?;
        let dx = g.apply_op3_no_bwd(x, scale, &RmsNormGrad { eps: self.eps })?;
        Ok((Some(dx), None))
    }
}

impl CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "rms-norm-grad"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        lg: &Layout,
        x: &CpuStorage,
        lx: &Layout,
        scale: &CpuStorage,
        ls: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (h, [(ga, gb), (xa, xb)], so) = operands(self.name(), [lg, lx], ls)?;
        let scale = cpu_scale(self.name(), scale, so)?;
        let c = Consts::new(h, self.eps);
        let dx = match (g, x) {
            (CpuStorage::F32(g), CpuStorage::F32(x)) => {
                CpuStorage::F32(bwd_cpu(&g[ga..gb], &x[xa..xb], scale, h, c))
            }
            (CpuStorage::BF16(g), CpuStorage::BF16(x)) => {
                CpuStorage::BF16(bwd_cpu(&g[ga..gb], &x[xa..xb], scale, h, c))
            }
            (CpuStorage::F16(g), CpuStorage::F16(x)) => {
                CpuStorage::F16(bwd_cpu(&g[ga..gb], &x[xa..xb], scale, h, c))
            }
            (g, x) => candle_core::bail!(
                "rms-norm-grad: a {:?} gradient for a {:?} input",
                g.dtype(),
                x.dtype()
            ),
        };
        Ok((dx, lx.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &CudaStorage,
        lg: &Layout,
        x: &CudaStorage,
        lx: &Layout,
        scale: &CudaStorage,
        ls: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        if g.dtype() != x.dtype() {
            candle_core::bail!(
                "rms-norm-grad: a {:?} gradient for a {:?} input",
                g.dtype(),
                x.dtype()
            );
        }
        let (h, offsets, so) = operands(self.name(), [lg, lx], ls)?;
        let c = Consts::new(h, self.eps);
        let dx = gpu::launch("kRmsNormBwd", [g, x], offsets, (scale, so), h, c)?;
        Ok((dx, lx.shape().clone()))
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::{Consts, Span};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, CudaStorage};
    use candle_core::{DType, Result};
    use half::{bf16, f16};

    /// Threads per block the launcher aims for when a row needs fewer.
    const BLOCK_THREADS: u32 = 256;

    /// `(gridDim.x, (G, R))` for `rows` rows of `h` elements (see `kernels/rms_norm.cu`): a
    /// group of `G` threads per row, about 8 elements per thread (a warp at least, a whole
    /// 1024-thread block at most), and `R` rows per block so that short rows still fill
    /// [`BLOCK_THREADS`]-thread blocks.
    pub(super) fn geometry(rows: usize, h: usize) -> (u32, (u32, u32)) {
        let g = h.div_ceil(8).next_power_of_two().clamp(32, 1024) as u32;
        let r = (BLOCK_THREADS / g).max(1);
        (rows.div_ceil(r as usize) as u32, (g, r))
    }

    /// Launches `<stem>_<dtype>` on the operands' stream with the operands (slices of
    /// `tensors` at `offsets`, all of one dtype, rows of `h`), the f32 scale, a fresh output of
    /// the operands' size and dtype, and `(rows, h, inv_n, eps)`.
    pub(super) fn launch<const N: usize>(
        stem: &str,
        tensors: [&CudaStorage; N],
        offsets: [Span; N],
        scale: (&CudaStorage, Span),
        h: usize,
        c: Consts,
    ) -> Result<CudaStorage> {
        match tensors[0].dtype() {
            DType::F32 => typed::<f32, N>(stem, "f32", tensors, offsets, scale, h, c),
            DType::BF16 => typed::<bf16, N>(stem, "bf16", tensors, offsets, scale, h, c),
            DType::F16 => typed::<f16, N>(stem, "f16", tensors, offsets, scale, h, c),
            other => Err(crate::cuda::unsupported(stem, other, "f32, bf16, f16")),
        }
    }

    fn typed<T: CudaDType + DeviceRepr, const N: usize>(
        stem: &str,
        suffix: &str,
        tensors: [&CudaStorage; N],
        offsets: [Span; N],
        (scale, (sa, sb)): (&CudaStorage, Span),
        h: usize,
        c: Consts,
    ) -> Result<CudaStorage> {
        use crate::cuda::err;
        let dev = tensors[0].device().clone();
        let name = format!("{stem}_{suffix}");
        let len = offsets[0].1 - offsets[0].0;
        let rows = len / h;
        let too_big = || err(format!("{name}: {rows} rows of {h} exceed i32"));
        let rows_i32 = i32::try_from(rows).map_err(|_| too_big())?;
        let h_i32 = i32::try_from(h).map_err(|_| too_big())?;
        let views = tensors
            .iter()
            .zip(offsets)
            .map(|(t, (a, b))| Ok(t.as_cuda_slice::<T>()?.slice(a..b)))
            .collect::<Result<Vec<_>>>()?;
        let scale = scale.as_cuda_slice::<f32>()?.slice(sa..sb);
        // SAFETY: the kernel writes every element of every row before anything reads `out`.
        let mut out = unsafe { dev.alloc::<T>(len)? };
        let f = crate::cuda::kernel(&dev, "rms_norm", &name)?;
        let stream = dev.cuda_stream();
        let mut launch = stream.launch_builder(&f);
        for v in &views {
            launch.arg(v);
        }
        launch
            .arg(&scale)
            .arg(&mut out)
            .arg(&rows_i32)
            .arg(&h_i32)
            .arg(&c.inv_n)
            .arg(&c.eps);
        let (grid, (g, r)) = geometry(rows, h);
        let cfg = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (g, r, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match kRmsNorm{Fwd,Bwd}_<T> ((const T*) x N, const float*, T*,
        // int, int, float, float); every operand and `out` hold rows * h elements of T, the
        // scale h floats; the geometry covers every row with G * R <= 1024 threads.
        unsafe { launch.launch(cfg) }.map_err(err)?;
        Ok(crate::cuda::storage(out, &dev))
    }

    #[cfg(test)]
    mod tests {
        use super::geometry;

        #[test]
        fn geometry_covers_every_row_with_legal_blocks() {
            for h in [1, 31, 64, 256, 257, 1000, 2304, 3584, 5376, 8192, 100_000] {
                for rows in [1, 7, 8, 9, 1023, 1024, 65_537] {
                    let (grid, (g, r)) = geometry(rows, h);
                    assert!(g % 32 == 0 && (32..=1024).contains(&g), "h {h}: G {g}");
                    assert!(g * r <= 1024 && r >= 1, "h {h}: G {g} R {r}");
                    assert!(grid as usize * r as usize >= rows, "h {h} rows {rows}");
                    assert!((grid as usize - 1) * (r as usize) < rows, "an idle block");
                }
            }
            // A warp per head row (8 rows a block), a 512-thread block per Gemma hidden row.
            assert_eq!(geometry(64, 256), (8, (32, 8)));
            assert_eq!(geometry(3, 2304), (3, (512, 1)));
            assert_eq!(geometry(3, 3584), (3, (512, 1)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The composed formula of `gemma.rs` (`RmsNorm::forward`), the reference.
    fn composed(x: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
        let xf = x.to_dtype(DType::F32)?;
        let inv_rms = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?
            .sqrt()?
            .recip()?;
        xf.broadcast_mul(&inv_rms)?
            .broadcast_mul(scale)?
            .to_dtype(x.dtype())
    }

    /// Reproducible values in `[-scale, scale)` plus `shift` (xorshift).
    fn filled(shape: &[usize], seed: u64, scale: f32, shift: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let data: Vec<f32> = (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale + shift
            })
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    fn scale_of(h: usize, seed: u64) -> Tensor {
        // 1 + w with Gemma-like weights around zero.
        (filled(&[h], seed, 0.5, 0.0) + 1.0).unwrap()
    }

    /// max |a - b| / (|b| + floor), both in f32.
    fn max_rel(a: &Tensor, b: &Tensor, floor: f32) -> f32 {
        let a: Vec<f32> = a
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f32> = b
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(&b)
            .map(|(a, b)| (a - b).abs() / (b.abs() + floor))
            .fold(0.0, f32::max)
    }

    #[test]
    fn f32_matches_the_composed_formula() -> Result<()> {
        // Gemma's hidden sizes and head size, 1..37 rows (37 * 2304 spreads over threads), an
        // offset so rows are not zero-mean, and a row of tiny values where eps dominates.
        for (h, rows) in [(64, 5), (256, 37), (2304, 37), (3584, 3)] {
            let x = filled(&[rows, h], h as u64, 3.0, 0.7);
            let scale = scale_of(h, 7);
            for eps in [1e-6, 1e-5] {
                let want = composed(&x, &scale, eps)?;
                let got = rms_norm(&x, &scale, eps)?;
                assert_eq!(got.dims(), want.dims());
                assert_eq!(got.dtype(), DType::F32);
                let d = max_rel(&got, &want, 1e-6);
                assert!(d < 1e-6, "h {h} rows {rows} eps {eps}: {d}");
            }
        }
        let tiny = filled(&[2, 64], 3, 1e-4, 0.0);
        let scale = scale_of(64, 2);
        let d = max_rel(
            &rms_norm(&tiny, &scale, 1e-6)?,
            &composed(&tiny, &scale, 1e-6)?,
            1e-6,
        );
        assert!(d < 1e-6, "tiny: {d}");
        Ok(())
    }

    #[test]
    fn half_inputs_round_once_like_the_composed_formula() -> Result<()> {
        let (rows, h) = (9, 2304);
        let scale = scale_of(h, 5);
        for dtype in [DType::BF16, DType::F16] {
            let x = filled(&[rows, h], 11, 4.0, 0.0).to_dtype(dtype)?;
            let want = composed(&x, &scale, 1e-6)?;
            let got = rms_norm(&x, &scale, 1e-6)?;
            assert_eq!(got.dtype(), dtype);
            // Both round an f32 value once; the f32 values differ by an ulp or so, which can
            // flip the rounding of a few elements by one unit of the half type (at most 2^-7
            // of the value for bf16, 2^-10 for f16).
            let ulp = if dtype == DType::BF16 {
                2f32.powi(-7)
            } else {
                2f32.powi(-10)
            };
            let d = max_rel(&got, &want, 1e-3);
            assert!(d <= ulp, "{dtype:?}: {d}");
            let mismatched = (got.to_dtype(DType::F32)? - want.to_dtype(DType::F32)?)?
                .ne(0f32)?
                .to_dtype(DType::F32)?
                .sum_all()?
                .to_scalar::<f32>()?;
            assert!(
                mismatched <= 0.01 * (rows * h) as f32,
                "{dtype:?}: {mismatched} differ"
            );
        }
        Ok(())
    }

    #[test]
    fn leading_dims_and_strided_inputs() -> Result<()> {
        let h = 256;
        let scale = scale_of(h, 3);
        let x = filled(&[2, 3, 4, h], 21, 2.0, -0.3);
        let got = rms_norm(&x, &scale, 1e-6)?;
        assert_eq!(got.dims(), &[2, 3, 4, h]);
        let d = max_rel(&got, &composed(&x, &scale, 1e-6)?, 1e-6);
        assert!(d < 1e-6, "4-d: {d}");
        // A transposed view (the last dim strided) and a narrowed one (an offset into the
        // storage) normalise their logical rows.
        let t = filled(&[h, 6], 22, 2.0, 0.1).t()?;
        assert!(!t.is_contiguous());
        let d = max_rel(
            &rms_norm(&t, &scale, 1e-6)?,
            &composed(&t, &scale, 1e-6)?,
            1e-6,
        );
        assert!(d < 1e-6, "transposed: {d}");
        let n = filled(&[5, 2 * h], 23, 2.0, 0.0).narrow(1, h, h)?;
        let d = max_rel(
            &rms_norm(&n, &scale, 1e-6)?,
            &composed(&n, &scale, 1e-6)?,
            1e-6,
        );
        assert!(d < 1e-6, "narrowed: {d}");
        Ok(())
    }

    /// d(sum(y * w)) / dx through the op and through candle's autograd of the composed ops.
    fn grads(x: &Tensor, scale: &Tensor, w: &Tensor, fused: bool) -> Result<Tensor> {
        let v = Var::from_tensor(x)?;
        let y = if fused {
            rms_norm(v.as_tensor(), scale, 1e-6)?
        } else {
            composed(v.as_tensor(), scale, 1e-6)?
        };
        let loss = (y.to_dtype(DType::F32)? * w)?.sum_all()?;
        Ok(loss
            .backward()?
            .get(v.as_tensor())
            .expect("x gradient")
            .clone())
    }

    #[test]
    fn f32_gradient_matches_candles_autograd() -> Result<()> {
        for (h, rows) in [(64, 3), (256, 17), (2304, 37)] {
            let x = filled(&[rows, h], 31 + h as u64, 2.0, 0.4);
            let scale = scale_of(h, 8);
            let w = filled(&[rows, h], 32, 1.0, 0.0);
            let want = grads(&x, &scale, &w, false)?;
            let got = grads(&x, &scale, &w, true)?;
            assert_eq!(got.dims(), x.dims());
            // Relative to the row's gradient scale: the cancellation in `g*s - xhat*m` makes
            // elementwise relative error meaningless where dx is near zero.
            let floor = want.abs()?.max_keepdim(1)?.mean_all()?.to_scalar::<f32>()?;
            let d = max_rel(&got, &want, floor);
            assert!(d < 1e-6, "h {h}: {d}");
        }
        Ok(())
    }

    #[test]
    fn bf16_gradient_matches_candles_autograd_and_scale_gets_none() -> Result<()> {
        let (rows, h) = (6, 2304);
        let x = filled(&[2, rows / 2, h], 41, 3.0, 0.0).to_dtype(DType::BF16)?;
        let scale = scale_of(h, 9);
        let w = filled(&[2, rows / 2, h], 42, 1.0, 0.0);
        let want = grads(&x, &scale, &w, false)?;
        let got = grads(&x, &scale, &w, true)?;
        assert_eq!(got.dtype(), DType::BF16);
        // Both compute in f32 from the same bf16 values and round once; an ulp of difference
        // before the rounding can move an element by one bf16 unit (2^-7 of it at most).
        let floor = want
            .to_dtype(DType::F32)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?
            * 1e-2;
        let d = max_rel(&got, &want, floor);
        assert!(d <= 2f32.powi(-7), "bf16 gradient: {d}");
        Ok(())
    }

    #[test]
    fn only_x_is_tracked_and_bad_inputs_are_errors() -> Result<()> {
        let h = 64;
        let scale = scale_of(h, 1);
        let x = filled(&[2, h], 2, 1.0, 0.0);
        assert!(!rms_norm(&x, &scale, 1e-6)?.track_op());
        let v = Var::from_tensor(&x)?;
        assert!(rms_norm(v.as_tensor(), &scale, 1e-6)?.track_op());

        let tracked = Var::from_tensor(&scale)?;
        let e = rms_norm(&x, tracked.as_tensor(), 1e-6).unwrap_err();
        assert!(e.to_string().contains("frozen"), "{e}");
        let e = rms_norm(&x, &scale_of(h + 1, 1), 1e-6).unwrap_err();
        assert!(e.to_string().contains("[64]"), "{e}");
        let e = rms_norm(&x, &scale.to_dtype(DType::BF16)?, 1e-6).unwrap_err();
        assert!(e.to_string().contains("f32"), "{e}");
        let e = rms_norm(&x.to_dtype(DType::F64)?, &scale, 1e-6).unwrap_err();
        assert!(e.to_string().contains("F64"), "{e}");

        let empty = Tensor::zeros((0, h), DType::BF16, &Device::Cpu)?;
        let y = rms_norm(&empty, &scale, 1e-6)?;
        assert_eq!((y.dims(), y.dtype()), (&[0, h][..], DType::BF16));
        Ok(())
    }
}
