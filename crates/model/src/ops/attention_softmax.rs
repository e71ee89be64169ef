//! Attention probabilities as one op: `softmax_k(c * tanh(s * scale / c) + mask)` over the last
//! dim of the attention scores `s` (`s * scale + mask` without a softcap), computed in f32 and
//! rounded once to the scores' dtype.
//!
//! The composed version in gemma.rs (scale multiply, softcap's divide / tanh / multiply, a cast
//! to f32, the mask's broadcast add, then softmax's max / subtract / exp / sum / divide and a
//! cast back) is about thirteen kernels forward and twenty backward, each over a whole
//! `[batch, heads, q, k]` tensor: on a GPU the train step is launch-bound on them. Here the
//! forward is one pass per row and the backward another (`kernels/attention_softmax.cu` on a
//! GPU, the row functions below on the CPU). The backward works from the saved output `p` and
//! the input `s` (for the softcap's slope), so nothing else is kept for it.
//!
//! Arithmetic: each step is the f32 operation the composed path performs, in its order
//! (`(s * scale) * (1 / c)` as candle's affine divides, `tanh(..) * c`, `+ mask`,
//! `exp(x - max)`, `e / sum`). Only the row sums differ: the CPU adds them in f64 (one rounding
//! to f32), the GPU as a tree of f32 partial sums; and on a GPU the last bits of `tanhf` /
//! `expf`.
//!
//! Masking: masked keys carry `f32::MIN` (gemma.rs's `MASKED`), so a row whose keys are all
//! masked has equal logits and comes out uniform, `1 / k`, as HF's `finfo.min` mask does. A
//! `-inf` mask gives the same uniform row instead of the composed path's `NaN`.

use candle_core::backend::BackendStorage;
#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16};

/// Attention probabilities of `scores` (`[batch, heads, q, k]`, f32 / bf16 / f16, made
/// contiguous if it is not): softmax over `k` of `c * tanh(scores * scale / c) + mask` with
/// `softcap = Some(c)`, or of `scores * scale + mask` without, computed in f32 and returned in
/// the scores' dtype. `mask` is the additive f32 mask `[batch or 1, 1, q, k]` (0 or a very
/// negative value such as `f32::MIN`), shared by the heads and, when its first dim is 1, by the
/// batch. A row with every key masked (`f32::MIN` or `-inf`) is uniform. Differentiable in `scores` only: the mask is
/// a constant, and a tracked mask is an error rather than a gradient silently dropped.
pub fn attention_probs(
    scores: &Tensor,
    scale: f64,
    softcap: Option<f64>,
    mask: &Tensor,
) -> Result<Tensor> {
    let params = Params::new(scale, softcap)?;
    let &[b, _, q, k] = scores.dims() else {
        candle_core::bail!(
            "attention_probs: scores must be [batch, heads, q, k], got {:?}",
            scores.shape()
        );
    };
    if !matches!(scores.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        candle_core::bail!(
            "attention_probs: {:?} scores (supported: f32, bf16, f16)",
            scores.dtype()
        );
    }
    let mask_fits =
        matches!(*mask.dims(), [mb, 1, mq, mk] if (mb == 1 || mb == b) && (mq, mk) == (q, k));
    if !mask_fits || mask.dtype() != DType::F32 {
        candle_core::bail!(
            "attention_probs: the mask must be f32 [{b} or 1, 1, {q}, {k}] for scores {:?}, \
             got {:?} {:?}",
            scores.dims(),
            mask.dtype(),
            mask.dims()
        );
    }
    if mask.track_op() {
        candle_core::bail!(
            "attention_probs: the mask is tracked for gradients, but the op gives it none (it \
             is a constant); pass a detached mask"
        );
    }
    // An empty input has no rows to normalise (and no GPU buffer can be allocated for it).
    if scores.elem_count() == 0 {
        return Ok(scores.clone());
    }
    scores
        .contiguous()?
        .apply_op2(&mask.contiguous()?, AttentionProbs { params })
}

/// The constants of both directions, in f32 as the composed path's affine ops convert them.
#[derive(Debug, Clone, Copy)]
struct Params {
    scale: f32,
    /// The softcap `c`, 0 without one.
    cap: f32,
    /// `1 / c` rounded to f32 (what `x / c` multiplies by in candle), 0 without a softcap.
    inv_cap: f32,
}

impl Params {
    fn new(scale: f64, softcap: Option<f64>) -> Result<Self> {
        if !scale.is_finite() {
            candle_core::bail!("attention_probs: scale {scale} is not finite");
        }
        let (cap, inv_cap) = match softcap {
            Some(c) if c.is_finite() && c > 0.0 => (c as f32, (1.0 / c) as f32),
            Some(c) => candle_core::bail!("attention_probs: softcap {c} is not a positive number"),
            None => (0.0, 0.0),
        };
        Ok(Self {
            scale: scale as f32,
            cap,
            inv_cap,
        })
    }

    /// The scaled, capped score of `s`, before the mask.
    fn capped(&self, s: f32) -> f32 {
        let x = s * self.scale;
        if self.cap > 0.0 {
            (x * self.inv_cap).tanh() * self.cap
        } else {
            x
        }
    }

    /// `d` times the slope of [`Params::capped`] at `s`, `(1 - t^2) * scale` with
    /// `t = tanh(s * scale / c)`, in the kernel's order.
    fn chain(&self, s: f32, d: f32) -> f32 {
        let d = if self.cap > 0.0 {
            let t = (s * self.scale * self.inv_cap).tanh();
            d * (1.0 - t * t)
        } else {
            d
        };
        d * self.scale
    }
}

/// The forward op: scores (arg 1, contiguous) and mask (arg 2, f32, contiguous).
#[derive(Debug, Clone, Copy)]
struct AttentionProbs {
    params: Params,
}

/// The backward op: the scores' gradient from the scores `s` (arg 1), the output `p` (arg 2)
/// and its gradient `g` (arg 3), all contiguous, of one shape and dtype.
#[derive(Debug, Clone, Copy)]
struct AttentionProbsBackward {
    params: Params,
}

/// Where the forward finds a row's values: the scores `[batch, heads, q, k]` and the mask
/// `[batch or 1, 1, q, k]`, both contiguous from `s_start` / `mask_start`.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    heads: usize,
    queries: usize,
    keys: usize,
    rows: usize,
    /// Whether the mask has a row block per batch row (else one for all).
    mask_batched: bool,
    s_start: usize,
    mask_start: usize,
    mask_len: usize,
}

/// The start of a contiguous layout, or an error naming `what`.
fn contiguous_start(l: &Layout, what: &str) -> Result<usize> {
    match l.contiguous_offsets() {
        Some((start, _)) => Ok(start),
        None => Err(candle_core::Error::msg(format!(
            "attention_probs: the {what} must be contiguous"
        ))),
    }
}

impl Geometry {
    fn of(s: &Layout, mask: &Layout) -> Result<Self> {
        let &[b, heads, queries, keys] = s.dims() else {
            candle_core::bail!(
                "attention_probs: scores must be [batch, heads, q, k], got {:?}",
                s.shape()
            );
        };
        let mask_batched = match *mask.dims() {
            [1, 1, q, k] if (q, k) == (queries, keys) => false,
            [mb, 1, q, k] if (mb, q, k) == (b, queries, keys) => true,
            _ => candle_core::bail!(
                "attention_probs: mask {:?} is not [{b} or 1, 1, {queries}, {keys}]",
                mask.shape()
            ),
        };
        Ok(Self {
            heads,
            queries,
            keys,
            rows: b * heads * queries,
            mask_batched,
            s_start: contiguous_start(s, "scores")?,
            mask_start: contiguous_start(mask, "mask")?,
            mask_len: mask.shape().elem_count(),
        })
    }

    /// The offset of score row `row`'s mask row, relative to the mask's start.
    fn mask_offset(&self, row: usize) -> usize {
        let query = row % self.queries;
        let batch = row / (self.heads * self.queries);
        let mask_row = if self.mask_batched {
            batch * self.queries + query
        } else {
            query
        };
        mask_row * self.keys
    }
}

/// A storage element the op reads and writes, widened to f32 for the arithmetic.
trait Elem: Copy + Send + Sync {
    fn widen(self) -> f32;
    /// Round to nearest even, as the GPU's `__float2bfloat16_rn` / `__float2half_rn`.
    fn narrow(v: f32) -> Self;
}

impl Elem for f32 {
    fn widen(self) -> f32 {
        self
    }
    fn narrow(v: f32) -> Self {
        v
    }
}

impl Elem for bf16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }
    fn narrow(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

impl Elem for f16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }
    fn narrow(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// One forward row: `out = softmax(capped(s) + mask)`, with `x` (the row's length) as f32
/// scratch for the logits and then their exponentials.
fn probs_row<T: Elem>(s: &[T], mask: &[f32], p: &Params, x: &mut [f32], out: &mut [T]) {
    let mut max = f32::NEG_INFINITY;
    for ((x, &s), &m) in x.iter_mut().zip(s).zip(mask) {
        *x = p.capped(s.widen()) + m;
        max = max.max(*x);
    }
    if max == f32::NEG_INFINITY {
        // Every key is masked with -inf (or NaN): uniform like an f32::MIN-masked row, where
        // exp(x - max) would be NaN; a NaN logit stays NaN.
        let uniform = 1.0 / out.len() as f32;
        for (o, &x) in out.iter_mut().zip(x.iter()) {
            *o = T::narrow(if x.is_nan() { x } else { uniform });
        }
        return;
    }
    // The sum in f64 (rounded once to f32) keeps its error at one rounding whatever the row's
    // length, where a running f32 sum drifts near 1e-6 relative by k = 512: the composed path's
    // vectorised sum and the GPU's tree both stay well inside that.
    let mut sum = 0f64;
    for x in x.iter_mut() {
        *x = (*x - max).exp();
        sum += f64::from(*x);
    }
    let sum = sum as f32;
    for (o, &e) in out.iter_mut().zip(x.iter()) {
        *o = T::narrow(e / sum);
    }
}

/// One backward row: `ds = chain(s, p * (g - sum(g * p)))`, the sum of f32 products in f64
/// as in [`probs_row`].
fn grad_row<T: Elem>(s: &[T], p: &[T], g: &[T], params: &Params, out: &mut [T]) {
    let dot = g
        .iter()
        .zip(p)
        .fold(0f64, |acc, (&g, &p)| acc + f64::from(g.widen() * p.widen())) as f32;
    for (((o, &s), &p), &g) in out.iter_mut().zip(s).zip(p).zip(g) {
        let d = p.widen() * (g.widen() - dot);
        *o = T::narrow(params.chain(s.widen(), d));
    }
}

/// Fewest elements worth a thread of their own: below this, spawning costs more than the rows
/// (a few nanoseconds per element), e.g. on decode steps.
const MIN_ELEMS_PER_THREAD: usize = 1 << 15;

/// Runs `work(first_row, out_rows)` over `rows` rows of `keys` outputs, in runs of rows on
/// candle's CPU threads.
fn over_rows<T: Elem>(rows: usize, keys: usize, work: impl Fn(usize, &mut [T]) + Sync) -> Vec<T> {
    let mut y = vec![T::narrow(0.0); rows * keys];
    let threads = candle_core::utils::get_num_threads()
        .min(y.len() / MIN_ELEMS_PER_THREAD)
        .max(1);
    if threads == 1 {
        work(0, &mut y);
    } else {
        let rows_per = rows.div_ceil(threads);
        std::thread::scope(|scope| {
            for (i, chunk) in y.chunks_mut(rows_per * keys).enumerate() {
                let work = &work;
                scope.spawn(move || work(i * rows_per, chunk));
            }
        });
    }
    y
}

/// The forward on the CPU: `s` and `mask` are whole storages, addressed through `g`.
fn probs_cpu<T: Elem>(g: &Geometry, s: &[T], mask: &[f32], params: &Params) -> Vec<T> {
    let k = g.keys;
    let s = &s[g.s_start..g.s_start + g.rows * k];
    let mask = &mask[g.mask_start..g.mask_start + g.mask_len];
    over_rows(g.rows, k, |first_row, out: &mut [T]| {
        let mut scratch = vec![0f32; k];
        for (i, out) in out.chunks_exact_mut(k).enumerate() {
            let row = first_row + i;
            let m = g.mask_offset(row);
            probs_row(
                &s[row * k..(row + 1) * k],
                &mask[m..m + k],
                params,
                &mut scratch,
                out,
            );
        }
    })
}

/// The backward on the CPU over `rows` rows of `keys` values; `s`, `p` and `g` start at their
/// row 0.
fn grad_cpu<T: Elem>(
    rows: usize,
    keys: usize,
    s: &[T],
    p: &[T],
    g: &[T],
    params: &Params,
) -> Vec<T> {
    over_rows(rows, keys, |first_row, out: &mut [T]| {
        for (i, out) in out.chunks_exact_mut(keys).enumerate() {
            let r = (first_row + i) * keys..(first_row + i + 1) * keys;
            grad_row(&s[r.clone()], &p[r.clone()], &g[r], params, out);
        }
    })
}

/// The error for a scores dtype the op has no kernel for.
fn dtype_error(what: &str, dtype: DType) -> candle_core::Error {
    candle_core::Error::msg(format!(
        "attention_probs: {dtype:?} {what} (supported: f32, bf16, f16)"
    ))
}

/// Threads per row on the GPU: about four keys each, a whole number of warps, at most 1024
/// (the kernels' launch bound); longer rows loop.
#[cfg(feature = "cuda")]
fn block_threads(keys: usize) -> u32 {
    keys.div_ceil(4).next_multiple_of(32).clamp(32, 1024) as u32
}

/// Longest row whose logits the forward kernel keeps in shared memory between its passes (32
/// KiB a block); longer rows recompute them from global memory.
#[cfg(feature = "cuda")]
const MAX_CACHED_KEYS: usize = 8192;

/// Rows (and keys) as the kernels' 32-bit arguments.
#[cfg(feature = "cuda")]
fn as_u32(v: usize, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| {
        candle_core::Error::msg(format!(
            "attention_probs: {what} {v} past the kernel's 32-bit range"
        ))
    })
}

/// One block per row (a grid-stride loop past the grid's limit).
#[cfg(feature = "cuda")]
fn launch_config(
    rows: u32,
    keys: usize,
    shared_mem_bytes: u32,
) -> candle_core::cuda_backend::cudarc::driver::LaunchConfig {
    candle_core::cuda_backend::cudarc::driver::LaunchConfig {
        grid_dim: (rows.min(i32::MAX as u32), 1, 1),
        block_dim: (block_threads(keys), 1, 1),
        shared_mem_bytes,
    }
}

/// Launches `kAttnProbs_<T>` on the scores' device (on its stream, after whatever candle
/// queued there).
#[cfg(feature = "cuda")]
fn probs_cuda<T>(
    g: &Geometry,
    s: &CudaStorage,
    mask: &CudaStorage,
    params: &Params,
) -> Result<CudaStorage>
where
    T: candle_core::cuda_backend::CudaDType
        + candle_core::WithDType
        + candle_core::cuda_backend::cudarc::driver::DeviceRepr,
{
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    let dev = s.device().clone();
    let n = g.rows * g.keys;
    let rows = as_u32(g.rows, "row count")?;
    let keys = as_u32(g.keys, "key count")?;
    let queries = as_u32(g.queries, "query count")?;
    let heads = as_u32(g.heads, "head count")?;
    let mask_batched = u32::from(g.mask_batched);
    let cached = g.keys <= MAX_CACHED_KEYS;
    let cache_flag = u32::from(cached);
    let shared = if cached { keys * 4 } else { 0 };
    let ss = s.as_cuda_slice::<T>()?.slice(g.s_start..g.s_start + n);
    let ms = mask
        .as_cuda_slice::<f32>()?
        .slice(g.mask_start..g.mask_start + g.mask_len);
    // SAFETY: the kernel writes all n outputs (every key of every row).
    let mut y = unsafe { dev.alloc::<T>(n)? };
    let f = crate::cuda::kernel(
        &dev,
        "attention_softmax",
        &format!("kAttnProbs_{}", T::DTYPE.as_str()),
    )?;
    let stream = dev.cuda_stream();
    let mut launch = stream.launch_builder(&f);
    launch
        .arg(&ss)
        .arg(&ms)
        .arg(&mut y)
        .arg(&rows)
        .arg(&keys)
        .arg(&queries)
        .arg(&heads)
        .arg(&mask_batched)
        .arg(&params.scale)
        .arg(&params.cap)
        .arg(&params.inv_cap)
        .arg(&cache_flag);
    // SAFETY: arguments match kAttnProbs_<T> (const T*, const float*, T*, unsigned x5, float
    // x3, unsigned); the scores and output hold rows * keys values, and every mask row the
    // kernel forms (batch and query below the dims) lies in the mask's view; the dynamic shared
    // memory holds `keys` floats whenever `cached` is set.
    unsafe { launch.launch(launch_config(rows, g.keys, shared)) }.map_err(crate::cuda::err)?;
    Ok(crate::cuda::storage(y, &dev))
}

/// Launches `kAttnProbsBwd_<T>` on the scores' device: `rows` rows of `keys` values of `s`,
/// `p` and `g`, each from its start.
#[cfg(feature = "cuda")]
fn grad_cuda<T>(
    rows: usize,
    keys: usize,
    s: (&CudaStorage, usize),
    p: (&CudaStorage, usize),
    g: (&CudaStorage, usize),
    params: &Params,
) -> Result<CudaStorage>
where
    T: candle_core::cuda_backend::CudaDType
        + candle_core::WithDType
        + candle_core::cuda_backend::cudarc::driver::DeviceRepr,
{
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    let dev = s.0.device().clone();
    let n = rows * keys;
    let rows_u32 = as_u32(rows, "row count")?;
    let keys_u32 = as_u32(keys, "key count")?;
    let (ss, ps, gs) = (
        s.0.as_cuda_slice::<T>()?.slice(s.1..s.1 + n),
        p.0.as_cuda_slice::<T>()?.slice(p.1..p.1 + n),
        g.0.as_cuda_slice::<T>()?.slice(g.1..g.1 + n),
    );
    // SAFETY: the kernel writes all n outputs.
    let mut y = unsafe { dev.alloc::<T>(n)? };
    let f = crate::cuda::kernel(
        &dev,
        "attention_softmax",
        &format!("kAttnProbsBwd_{}", T::DTYPE.as_str()),
    )?;
    let stream = dev.cuda_stream();
    let mut launch = stream.launch_builder(&f);
    launch
        .arg(&ss)
        .arg(&ps)
        .arg(&gs)
        .arg(&mut y)
        .arg(&rows_u32)
        .arg(&keys_u32)
        .arg(&params.scale)
        .arg(&params.cap)
        .arg(&params.inv_cap);
    // SAFETY: arguments match kAttnProbsBwd_<T> (const T* x3, T*, unsigned x2, float x3); all
    // four buffers hold rows * keys values.
    unsafe { launch.launch(launch_config(rows_u32, keys, 0)) }.map_err(crate::cuda::err)?;
    Ok(crate::cuda::storage(y, &dev))
}

impl CustomOp2 for AttentionProbs {
    fn name(&self) -> &'static str {
        "attention-probs"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        ls: &Layout,
        mask: &CpuStorage,
        lm: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::of(ls, lm)?;
        let CpuStorage::F32(mask) = mask else {
            return Err(dtype_error("mask (it must be f32)", mask.dtype()));
        };
        let p = &self.params;
        let y = match s {
            CpuStorage::F32(s) => CpuStorage::F32(probs_cpu(&g, s, mask, p)),
            CpuStorage::BF16(s) => CpuStorage::BF16(probs_cpu(&g, s, mask, p)),
            CpuStorage::F16(s) => CpuStorage::F16(probs_cpu(&g, s, mask, p)),
            other => return Err(dtype_error("scores", other.dtype())),
        };
        Ok((y, ls.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &CudaStorage,
        ls: &Layout,
        mask: &CudaStorage,
        lm: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let g = Geometry::of(ls, lm)?;
        if mask.dtype() != DType::F32 {
            return Err(dtype_error("mask (it must be f32)", mask.dtype()));
        }
        let p = &self.params;
        let y = match s.dtype() {
            DType::F32 => probs_cuda::<f32>(&g, s, mask, p)?,
            DType::BF16 => probs_cuda::<bf16>(&g, s, mask, p)?,
            DType::F16 => probs_cuda::<f16>(&g, s, mask, p)?,
            other => return Err(dtype_error("scores", other)),
        };
        Ok((y, ls.shape().clone()))
    }

    fn bwd(
        &self,
        s: &Tensor,
        _mask: &Tensor,
        p: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let back = AttentionProbsBackward {
            params: self.params,
        };
        let ds = s.apply_op3_no_bwd(&p.contiguous()?, &g.contiguous()?, &back)?;
        Ok((Some(ds), None))
    }
}

/// The shape `[rows, keys]` of the backward's three inputs and their starts, checked to agree.
fn backward_geometry(ls: &Layout, lp: &Layout, lg: &Layout) -> Result<(usize, usize, [usize; 3])> {
    if ls.dims() != lp.dims() || ls.dims() != lg.dims() {
        candle_core::bail!(
            "attention_probs backward: scores {:?}, probabilities {:?} and gradient {:?} differ \
             in shape",
            ls.shape(),
            lp.shape(),
            lg.shape()
        );
    }
    let keys = *ls
        .dims()
        .last()
        .ok_or_else(|| candle_core::Error::msg("attention_probs backward: scalar input"))?;
    let rows = ls.shape().elem_count() / keys.max(1);
    Ok((
        rows,
        keys,
        [
            contiguous_start(ls, "scores")?,
            contiguous_start(lp, "probabilities")?,
            contiguous_start(lg, "gradient")?,
        ],
    ))
}

impl CustomOp3 for AttentionProbsBackward {
    fn name(&self) -> &'static str {
        "attention-probs-backward"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        ls: &Layout,
        p: &CpuStorage,
        lp: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use CpuStorage as S;
        let (rows, keys, [s0, p0, g0]) = backward_geometry(ls, lp, lg)?;
        let prm = &self.params;
        let y = match (s, p, g) {
            (S::F32(s), S::F32(p), S::F32(g)) => {
                S::F32(grad_cpu(rows, keys, &s[s0..], &p[p0..], &g[g0..], prm))
            }
            (S::BF16(s), S::BF16(p), S::BF16(g)) => {
                S::BF16(grad_cpu(rows, keys, &s[s0..], &p[p0..], &g[g0..], prm))
            }
            (S::F16(s), S::F16(p), S::F16(g)) => {
                S::F16(grad_cpu(rows, keys, &s[s0..], &p[p0..], &g[g0..], prm))
            }
            _ => candle_core::bail!(
                "attention_probs backward: scores {:?}, probabilities {:?} and gradient {:?} \
                 (supported: all three f32, bf16 or f16)",
                s.dtype(),
                p.dtype(),
                g.dtype()
            ),
        };
        Ok((y, ls.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &CudaStorage,
        ls: &Layout,
        p: &CudaStorage,
        lp: &Layout,
        g: &CudaStorage,
        lg: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (rows, keys, [s0, p0, g0]) = backward_geometry(ls, lp, lg)?;
        if p.dtype() != s.dtype() || g.dtype() != s.dtype() {
            candle_core::bail!(
                "attention_probs backward: scores {:?}, probabilities {:?} and gradient {:?} \
                 (supported: all three f32, bf16 or f16)",
                s.dtype(),
                p.dtype(),
                g.dtype()
            );
        }
        let prm = &self.params;
        let args = ((s, s0), (p, p0), (g, g0));
        let y = match s.dtype() {
            DType::F32 => grad_cuda::<f32>(rows, keys, args.0, args.1, args.2, prm)?,
            DType::BF16 => grad_cuda::<bf16>(rows, keys, args.0, args.1, args.2, prm)?,
            DType::F16 => grad_cuda::<f16>(rows, keys, args.0, args.1, args.2, prm)?,
            other => return Err(dtype_error("scores", other)),
        };
        Ok((y, ls.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    const MASKED: f32 = f32::MIN;

    /// gemma.rs's `softmax_last_dim`, the reference.
    fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
        let xf = x.to_dtype(DType::F32)?;
        let max = xf.max_keepdim(D::Minus1)?.detach();
        let e = xf.broadcast_sub(&max)?.exp()?;
        let sum = e.sum_keepdim(D::Minus1)?;
        e.broadcast_div(&sum)?.to_dtype(x.dtype())
    }

    /// gemma.rs's `softcap`.
    fn softcap(x: &Tensor, cap: Option<f64>) -> Result<Tensor> {
        match cap {
            Some(c) => (x / c)?.tanh()? * c,
            None => Ok(x.clone()),
        }
    }

    /// The composed path of gemma.rs's `Attention::forward`, from the scores to the
    /// probabilities.
    fn composed(scores: &Tensor, scale: f64, cap: Option<f64>, mask: &Tensor) -> Result<Tensor> {
        let s = softcap(&(scores * scale)?, cap)?;
        softmax_last_dim(&s.to_dtype(DType::F32)?.broadcast_add(mask)?)?.to_dtype(scores.dtype())
    }

    /// Deterministic values in about [-2, 2] with varied magnitudes and signs; bf16-exact, so
    /// every dtype sees the same scores.
    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let k = (i * 7919 + seed * 104_729) % 2003;
                bf16::from_f32((k as f32 - 1001.0) / 500.0).to_f32()
            })
            .collect()
    }

    /// Scale and softcap of the tests: logits up to about 8 in magnitude, so the softmax is far
    /// from uniform and the cap of 5 bends them well into tanh's curve.
    const SCALE: f64 = 4.0;
    const CAPS: [Option<f64>; 2] = [None, Some(5.0)];

    /// `[batch, heads, q, k]` shapes: small, one large enough (and with a row count no
    /// thread count divides evenly) to be split over threads, and rows as long as Gemma-2's
    /// sliding window.
    const SHAPES: [Shape4; 4] = [(2, 3, 5, 7), (1, 2, 3, 1), (2, 2, 41, 520), (2, 1, 3, 4100)];

    fn scores(shape: Shape4, seed: usize) -> Tensor {
        let (b, h, q, k) = shape;
        Tensor::from_vec(values(b * h * q * k, seed), shape, &Device::Cpu).unwrap()
    }

    /// A causal mask with the queries at the last q of k positions: `[1, 1, q, k]` shared by
    /// the batch, or (`per_row`) `[b, 1, q, k]` with row r's first `3r` keys masked as left
    /// padding, which masks every key of its first queries.
    fn mask(shape: Shape4, per_row: bool) -> Tensor {
        let (b, _, q, k) = shape;
        let rows = if per_row { b } else { 1 };
        let mut m = Vec::with_capacity(rows * q * k);
        for r in 0..rows {
            for i in 0..q {
                let pos = (k + i).saturating_sub(q);
                for j in 0..k {
                    let padded = per_row && j < 3 * r;
                    m.push(if j <= pos && !padded { 0.0 } else { MASKED });
                }
            }
        }
        Tensor::from_vec(m, (rows, 1, q, k), &Device::Cpu).unwrap()
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// Asserts `|got - want| <= rel * |want| + abs` elementwise.
    fn assert_close(got: &Tensor, want: &Tensor, rel: f32, abs: f32, what: &str) {
        assert_eq!(got.dims(), want.dims(), "{what}: shapes");
        let (g, w) = (flat(got), flat(want));
        for (i, (g, w)) in g.iter().zip(&w).enumerate() {
            let d = (g - w).abs();
            assert!(
                d <= rel * w.abs() + abs,
                "{what}: element {i}: {g} vs {w} (|d| = {d:e})"
            );
        }
    }

    /// `[batch, heads, q, k]`.
    type Shape4 = (usize, usize, usize, usize);

    /// Every case: shape, softcap, whether the mask is per batch row.
    fn cases() -> Vec<(Shape4, Option<f64>, bool)> {
        let mut out = Vec::new();
        for shape in SHAPES {
            for cap in CAPS {
                for per_row in [false, true] {
                    out.push((shape, cap, per_row));
                }
            }
        }
        out
    }

    #[test]
    fn f32_matches_the_composed_path() {
        for (i, (shape, cap, per_row)) in cases().into_iter().enumerate() {
            let s = scores(shape, i);
            let m = mask(shape, per_row);
            let got = attention_probs(&s, SCALE, cap, &m).unwrap();
            let want = composed(&s, SCALE, cap, &m).unwrap();
            let what = format!("{shape:?} cap {cap:?} per_row {per_row}");
            assert_eq!(got.dtype(), DType::F32);
            assert_close(&got, &want, 1e-6, 0.0, &what);
            // Each unmasked row sums to 1; masked keys of live rows get exactly 0.
            let sums = flat(&got.sum_keepdim(D::Minus1).unwrap());
            assert!(
                sums.iter().all(|s| (s - 1.0).abs() < 1e-5),
                "{what}: {sums:?}"
            );
        }
    }

    #[test]
    fn half_inputs_are_the_f32_result_rounded_once() {
        for (i, (shape, cap, per_row)) in cases().into_iter().enumerate() {
            let s = scores(shape, i);
            let m = mask(shape, per_row);
            let exact = composed(&s, SCALE, cap, &m).unwrap();
            let f32_op = attention_probs(&s, SCALE, cap, &m).unwrap();
            // Half an ulp relative: 2^-8 for bf16's 8 significant bits, 2^-11 for f16's 11.
            for (dtype, half_ulp) in [(DType::BF16, 2f32.powi(-8)), (DType::F16, 2f32.powi(-11))] {
                let what = format!("{dtype:?} {shape:?} cap {cap:?} per_row {per_row}");
                // The scores are exact in both dtypes, so the op sees the f32 test's values.
                let got = attention_probs(&s.to_dtype(dtype).unwrap(), SCALE, cap, &m).unwrap();
                assert_eq!(got.dtype(), dtype, "{what}");
                assert_eq!(
                    flat(&got),
                    flat(&f32_op.to_dtype(dtype).unwrap()),
                    "{what}: not the f32 op's result rounded to nearest"
                );
                // Hence within half an ulp of the composed f32 path (plus its 1e-6), and
                // f16's subnormal spacing for the smallest probabilities.
                assert_close(&got, &exact, half_ulp + 1e-6, 2f32.powi(-25), &what);
            }
        }
    }

    /// Row-major `[b, h, q, k]` indices of the rows of `m` (`mask`'s layout) with every key
    /// masked.
    fn masked_rows(m: &Tensor, shape: Shape4) -> Vec<usize> {
        let (b, h, q, k) = shape;
        let vals = flat(m);
        let mb = m.dim(0).unwrap();
        (0..b * h * q)
            .filter(|row| {
                let mrow = if mb == 1 { 0 } else { row / (h * q) } * q + row % q;
                vals[mrow * k..(mrow + 1) * k].iter().all(|&v| v < -1e30)
            })
            .collect()
    }

    #[test]
    fn fully_masked_rows_are_uniform_and_finite() {
        let shape = (2, 3, 5, 7);
        for cap in CAPS {
            let m = mask(shape, true);
            let dead = masked_rows(&m, shape);
            // Batch row 1 masks keys 0..3, so its first query sees nothing.
            assert!(!dead.is_empty());
            // The same mask with -inf where gemma.rs puts f32::MIN: the composed path's exp
            // gives NaN there, the op the same uniform rows.
            let m_inf = m
                .ge(0f32)
                .unwrap()
                .where_cond(
                    &m,
                    &Tensor::full(f32::NEG_INFINITY, m.shape(), &Device::Cpu).unwrap(),
                )
                .unwrap();
            for (mask, name) in [(&m, "f32::MIN"), (&m_inf, "-inf")] {
                for dtype in [DType::F32, DType::BF16] {
                    let s = scores(shape, 3).to_dtype(dtype).unwrap();
                    let p = flat(&attention_probs(&s, SCALE, cap, mask).unwrap());
                    let what = format!("{name} mask, {dtype:?}, cap {cap:?}");
                    assert!(p.iter().all(|v| v.is_finite()), "{what}: {p:?}");
                    let uniform = flat(
                        &Tensor::new(&[1f32 / 7.0], &Device::Cpu)
                            .unwrap()
                            .to_dtype(dtype)
                            .unwrap(),
                    )[0];
                    for &row in &dead {
                        assert!(
                            p[row * 7..(row + 1) * 7].iter().all(|&v| v == uniform),
                            "{what}: row {row} {:?}",
                            &p[row * 7..(row + 1) * 7]
                        );
                    }
                }
            }
            // With f32::MIN the composed path agrees (the HF convention).
            let s = scores(shape, 3);
            let c = flat(&composed(&s, SCALE, cap, &m).unwrap());
            assert!(dead.iter().all(|&r| c[r * 7] == 1.0 / 7.0));
        }
    }

    #[test]
    fn a_nan_score_is_not_hidden_by_a_masked_row() {
        let mut v = vec![0f32; 4];
        v[2] = f32::NAN;
        let s = Tensor::from_vec(v, (1, 1, 1, 4), &Device::Cpu).unwrap();
        for fill in [MASKED, f32::NEG_INFINITY, 0.0] {
            let m = Tensor::full(fill, (1, 1, 1, 4), &Device::Cpu).unwrap();
            let p = flat(&attention_probs(&s, 1.0, None, &m).unwrap());
            assert!(p[2].is_nan(), "mask {fill}: {p:?}");
        }
    }

    /// `sum(p * w)` for fixed weights `w`, so each probability gets its own upstream gradient.
    fn loss(p: &Tensor, seed: usize) -> Tensor {
        let w = Tensor::from_vec(values(p.elem_count(), seed), p.shape(), &Device::Cpu)
            .unwrap()
            .to_dtype(p.dtype())
            .unwrap();
        (p * w).unwrap().sum_all().unwrap()
    }

    #[test]
    fn gradient_matches_autograd_of_the_composed_path() {
        for (i, (shape, cap, per_row)) in cases().into_iter().enumerate() {
            let m = mask(shape, per_row);
            let var = Var::from_tensor(&scores(shape, i)).unwrap();
            let grads = loss(&attention_probs(&var, SCALE, cap, &m).unwrap(), 100 + i)
                .backward()
                .unwrap();
            let got = grads.get(&var).unwrap();
            let grads = loss(&composed(&var, SCALE, cap, &m).unwrap(), 100 + i)
                .backward()
                .unwrap();
            let want = grads.get(&var).unwrap();
            // p * (g - sum(g * p)) cancels where g is near the row's mean, so elements are
            // compared relative to the gradient's scale as well as to themselves.
            let max = flat(want).iter().fold(0f32, |a, v| a.max(v.abs()));
            let what = format!("{shape:?} cap {cap:?} per_row {per_row}");
            // A one-key softmax is constant: its gradient is exactly zero.
            assert_eq!(max > 0.0, shape.3 > 1, "{what}: gradient scale {max}");
            assert_close(got, want, 1e-5, 1e-6 * max, &what);
        }
    }

    #[test]
    fn half_gradient_is_the_f32_gradient_rounded_once() {
        let shape = (2, 3, 5, 7);
        for (i, cap) in CAPS.into_iter().enumerate() {
            let m = mask(shape, true);
            for dtype in [DType::BF16, DType::F16] {
                let var = Var::from_tensor(&scores(shape, i).to_dtype(dtype).unwrap()).unwrap();
                let p = attention_probs(&var, SCALE, cap, &m).unwrap();
                let grads = loss(&p, 7).backward().unwrap();
                let got = grads.get(&var).unwrap();
                assert_eq!(got.dtype(), dtype);
                // The backward op in f32 on the same (half-exact) s, p and g.
                let up = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
                let g = Tensor::from_vec(values(p.elem_count(), 7), shape, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let back = AttentionProbsBackward {
                    params: Params::new(SCALE, cap).unwrap(),
                };
                let want = up(var.as_tensor())
                    .apply_op3_no_bwd(&up(&p), &up(&g), &back)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                assert_eq!(flat(got), flat(&want), "{dtype:?} cap {cap:?}");
            }
        }
    }

    #[test]
    fn strided_scores_match_contiguous_ones() {
        let shape = (2, 3, 5, 7);
        let s = scores(shape, 1);
        let m = mask(shape, false);
        let strided = s
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        assert!(!strided.is_contiguous());
        for cap in CAPS {
            assert_eq!(
                flat(&attention_probs(&strided, SCALE, cap, &m).unwrap()),
                flat(&attention_probs(&s, SCALE, cap, &m).unwrap())
            );
        }
    }

    #[test]
    fn empty_scores_give_an_empty_result() {
        let s = Tensor::zeros((2, 3, 4, 0), DType::F32, &Device::Cpu).unwrap();
        let m = Tensor::zeros((1, 1, 4, 0), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            attention_probs(&s, 1.0, None, &m).unwrap().dims(),
            [2, 3, 4, 0]
        );
    }

    #[test]
    fn bad_inputs_are_clear_errors() {
        let dev = &Device::Cpu;
        let shape = (2, 3, 5, 7);
        let s = scores(shape, 0);
        let m = mask(shape, false);
        let err = |r: Result<Tensor>| r.unwrap_err().to_string();
        let e = err(attention_probs(&s.flatten(0, 1).unwrap(), 1.0, None, &m));
        assert!(e.contains("[batch, heads, q, k]"), "{e}");
        let e = err(attention_probs(
            &s,
            1.0,
            None,
            &m.to_dtype(DType::BF16).unwrap(),
        ));
        assert!(e.contains("mask must be f32"), "{e}");
        let e = err(attention_probs(
            &s,
            1.0,
            None,
            &Tensor::zeros((3, 1, 5, 7), DType::F32, dev).unwrap(),
        ));
        assert!(e.contains("[2 or 1, 1, 5, 7]"), "{e}");
        let e = err(attention_probs(
            &s,
            1.0,
            None,
            &Tensor::zeros((1, 5, 7), DType::F32, dev).unwrap(),
        ));
        assert!(e.contains("mask must be f32"), "{e}");
        for c in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let e = err(attention_probs(&s, 1.0, Some(c), &m));
            assert!(e.contains("softcap"), "{c}: {e}");
        }
        let e = err(attention_probs(&s, f64::INFINITY, None, &m));
        assert!(e.contains("scale"), "{e}");
        let e = err(attention_probs(
            &s.to_dtype(DType::U32).unwrap(),
            1.0,
            None,
            &m,
        ));
        assert!(e.contains("U32"), "{e}");
        let tracked = Var::from_tensor(&m).unwrap();
        let e = err(attention_probs(&s, 1.0, None, &tracked));
        assert!(e.contains("detached mask"), "{e}");
    }
}
