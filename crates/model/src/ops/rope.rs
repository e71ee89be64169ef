//! Fused rotary position embedding: `x * cos + rotate_half(x) * sin` in one pass, forward and
//! backward.
//!
//! The composed form (`narrow` twice, `neg`, `cat`, two `broadcast_mul`, `add`) is six kernels
//! forward and more backward, twice per layer (q and k), each broadcast uploading its layout to
//! the GPU: on a 9B train step that launch-bound chain costs more than the arithmetic. Here one
//! custom op reads each pair `(x[i], x[i + d/2])` once, computes both outputs in f32 and rounds
//! once to x's dtype. It also reads x through its strides, so q and k (transposed views of the
//! projections' output) leave contiguous without a separate copy.
//!
//! Tables use the rotate-half layout that `gemma.rs` builds (`[seq, head_dim]`, or
//! `[batch, 1, seq, head_dim]` for left-padded batches; the second half of each row repeats the
//! first). The op reads both halves rather than assuming the repeat, so it is the composed
//! formula for any tables. They are constants: the backward returns a gradient for x only,
//! `dx = g * cos + rotate_half_t(g * sin)` with `rotate_half_t(v) = cat(v[d/2..], -v[..d/2])`.
//!
//! Arithmetic: each product and sum is one f32 operation in the composed formula's order
//! (never fused into an FMA), so in f32 the result is bit-identical to the composed path, and
//! the CPU and GPU (`kernels/rope.cu`) agree bit for bit in every dtype.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;

/// Rotary embedding of `x` (`[batch, heads, seq, head_dim]`, f32 / bf16 / f16, any strides)
/// with rotate-half tables `cos` and `sin` (`[seq, head_dim]` or `[1, 1, seq, head_dim]` shared
/// by all batch rows, or `[batch, 1, seq, head_dim]`; f32 or x's dtype, both the same; made
/// contiguous if they are not): `x * cos + rotate_half(x) * sin` with `rotate_half(x) =
/// cat(-x[.., d/2..], x[.., ..d/2])`, computed in f32 and rounded once to x's dtype. The result is contiguous. Differentiable in x; the tables get no gradient.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    last_dim_contiguous(x)?.apply_op3(
        &cos.contiguous()?,
        &sin.contiguous()?,
        Rope { backward: false },
    )
}

/// `t` itself when its last dim is contiguous (the op reads the other dims through their
/// strides), else a contiguous copy.
fn last_dim_contiguous(t: &Tensor) -> Result<Tensor> {
    if t.rank() != 4 {
        candle_core::bail!(
            "rope: x must be [batch, heads, seq, head_dim], got {:?}",
            t.shape()
        );
    }
    if t.stride()[3] == 1 {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

/// The op: the rotation (`backward == false`) or its transpose, which maps the output gradient
/// to x's. Inputs: x (last dim contiguous), cos, sin (contiguous).
#[derive(Debug, Clone, Copy)]
struct Rope {
    backward: bool,
}

/// Where the op finds a row's values: x `[batch, heads, seq, dim]` through its strides, the
/// tables contiguous with `table_rows_per_batch` rows per batch row (0: one table for all).
#[derive(Debug, Clone, Copy)]
struct Geometry {
    batch: usize,
    heads: usize,
    seq: usize,
    dim: usize,
    x_start: usize,
    /// x's strides over batch, heads and seq, in elements.
    x_strides: [usize; 3],
    table_rows_per_batch: usize,
    table_len: usize,
    cos_start: usize,
    sin_start: usize,
}

impl Geometry {
    fn of(x: &Layout, cos: &Layout, sin: &Layout) -> Result<Self> {
        let &[batch, heads, seq, dim] = x.dims() else {
            candle_core::bail!(
                "rope: x must be [batch, heads, seq, head_dim], got {:?}",
                x.shape()
            );
        };
        if dim % 2 != 0 {
            candle_core::bail!(
                "rope: head_dim {dim} is odd (rotate-half pairs element i with i + head_dim / 2)"
            );
        }
        let stride = x.stride();
        if stride[3] != 1 {
            candle_core::bail!("rope: x's last dim must be contiguous, strides {stride:?}");
        }
        if cos.dims() != sin.dims() {
            candle_core::bail!(
                "rope: cos {:?} and sin {:?} differ in shape",
                cos.shape(),
                sin.shape()
            );
        }
        let table_rows_per_batch = match *cos.dims() {
            [s, d] if (s, d) == (seq, dim) => 0,
            [1, 1, s, d] if (s, d) == (seq, dim) => 0,
            [b, 1, s, d] if (b, s, d) == (batch, seq, dim) => seq,
            _ => candle_core::bail!(
                "rope: tables {:?} are neither [seq, head_dim] nor [batch, 1, seq, head_dim] \
                 for x {:?}",
                cos.shape(),
                x.shape()
            ),
        };
        let start = |l: &Layout, name: &str| match l.contiguous_offsets() {
            Some((start, _)) => Ok(start),
            None => Err(candle_core::Error::msg(format!(
                "rope: the {name} table must be contiguous"
            ))),
        };
        Ok(Self {
            batch,
            heads,
            seq,
            dim,
            x_start: x.start_offset(),
            x_strides: [stride[0], stride[1], stride[2]],
            table_rows_per_batch,
            table_len: cos.shape().elem_count(),
            cos_start: start(cos, "cos")?,
            sin_start: start(sin, "sin")?,
        })
    }

    /// Rows of the output, `batch * heads * seq`, each `dim` values.
    fn rows(&self) -> usize {
        self.batch * self.heads * self.seq
    }

    /// The offsets of output row `row`'s x values (in x's storage) and of its table row
    /// (relative to the table's start).
    fn offsets(&self, row: usize) -> (usize, usize) {
        let pos = row % self.seq;
        let bh = row / self.seq;
        let (head, b) = (bh % self.heads, bh / self.heads);
        let [sb, sh, ss] = self.x_strides;
        let x = self.x_start + b * sb + head * sh + pos * ss;
        let table = (b * self.table_rows_per_batch + pos) * self.dim;
        (x, table)
    }
}

/// The error for dtypes the op has no kernel for.
fn dtype_error(x: DType, cos: DType, sin: DType) -> candle_core::Error {
    candle_core::Error::msg(format!(
        "rope: {x:?} input with {cos:?} cos and {sin:?} sin tables (supported: f32, bf16 or \
         f16 input; both tables f32 or the input's dtype)"
    ))
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

impl Elem for half::bf16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }
    fn narrow(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
}

impl Elem for half::f16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }
    fn narrow(v: f32) -> Self {
        half::f16::from_f32(v)
    }
}

/// One row: `y = x * cos + rotate_half(x) * sin` or, `backward`, `y = x * cos +
/// rotate_half_t(x * sin)`, in the composed formula's f32 operations (see kernels/rope.cu).
fn rotate_row<X: Elem, T: Elem>(x: &[X], cos: &[T], sin: &[T], y: &mut [X], backward: bool) {
    let half = y.len() / 2;
    let (y1, y2) = y.split_at_mut(half);
    for (i, (y1, y2)) in y1.iter_mut().zip(y2).enumerate() {
        let j = i + half;
        let (a1, a2) = (x[i].widen(), x[j].widen());
        let (c1, c2) = (cos[i].widen(), cos[j].widen());
        let (s1, s2) = (sin[i].widen(), sin[j].widen());
        let (v1, v2) = if backward {
            (a1 * c1 + a2 * s2, a2 * c2 - a1 * s1)
        } else {
            (a1 * c1 - a2 * s1, a2 * c2 + a1 * s2)
        };
        *y1 = X::narrow(v1);
        *y2 = X::narrow(v2);
    }
}

/// Fewest elements worth a thread of their own: below this, spawning costs more than the
/// rotation (about a nanosecond per element), e.g. on decode steps.
const MIN_ELEMS_PER_THREAD: usize = 1 << 15;

/// The op on the CPU: `x`, `cos` and `sin` are whole storages, addressed through `g`; runs of
/// output rows go to threads.
fn rope_cpu<X: Elem, T: Elem>(
    g: &Geometry,
    x: &[X],
    cos: &[T],
    sin: &[T],
    backward: bool,
) -> Vec<X> {
    let d = g.dim;
    let rows = g.rows();
    let mut y = vec![X::narrow(0.0); rows * d];
    if y.is_empty() {
        return y;
    }
    let cos = &cos[g.cos_start..g.cos_start + g.table_len];
    let sin = &sin[g.sin_start..g.sin_start + g.table_len];
    let work = |first_row: usize, out: &mut [X]| {
        for (k, yr) in out.chunks_exact_mut(d).enumerate() {
            let (xo, to) = g.offsets(first_row + k);
            rotate_row(
                &x[xo..xo + d],
                &cos[to..to + d],
                &sin[to..to + d],
                yr,
                backward,
            );
        }
    };
    let threads = candle_core::utils::get_num_threads()
        .min(y.len() / MIN_ELEMS_PER_THREAD)
        .max(1);
    if threads == 1 {
        work(0, &mut y);
    } else {
        let rows_per = rows.div_ceil(threads);
        std::thread::scope(|scope| {
            for (k, chunk) in y.chunks_mut(rows_per * d).enumerate() {
                let work = &work;
                scope.spawn(move || work(k * rows_per, chunk));
            }
        });
    }
    y
}

/// The kernel of kernels/rope.cu for x's dtype `x`, the tables' `table` and the direction.
#[cfg(feature = "cuda")]
fn kernel_name(x: DType, table: DType, backward: bool) -> String {
    let dir = if backward { "Bwd" } else { "" };
    format!("kRope{dir}_{}_{}", x.as_str(), table.as_str())
}

/// Launches the op's kernel on x's device (on its stream, after whatever candle queued there).
#[cfg(feature = "cuda")]
fn rope_cuda<X, T>(
    g: &Geometry,
    x: &CudaStorage,
    cos: &CudaStorage,
    sin: &CudaStorage,
    backward: bool,
) -> Result<CudaStorage>
where
    X: candle_core::cuda_backend::CudaDType
        + candle_core::WithDType
        + candle_core::cuda_backend::cudarc::driver::DeviceRepr,
    T: candle_core::cuda_backend::CudaDType + candle_core::WithDType,
{
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    let dev = x.device().clone();
    let n = g.rows() * g.dim;
    // SAFETY: the kernel writes all n outputs (every pair of every row).
    let mut y = unsafe { dev.alloc::<X>(n)? };
    if n == 0 {
        return Ok(crate::cuda::storage(y, &dev));
    }
    let as_u32 = |v: usize, what: &str| {
        u32::try_from(v).map_err(|_| {
            candle_core::Error::msg(format!("rope: {what} {v} past the kernel's 32-bit range"))
        })
    };
    let rows = as_u32(g.rows(), "row count")?;
    let half = as_u32(g.dim / 2, "half head_dim")?;
    let seq = as_u32(g.seq, "seq")?;
    let heads = as_u32(g.heads, "heads")?;
    let table_rows = as_u32(g.table_rows_per_batch, "table rows")?;
    let [sb, sh, ss] = g.x_strides.map(|s| s as u64);
    let xs = x.as_cuda_slice::<X>()?.slice(g.x_start..);
    let cs = cos
        .as_cuda_slice::<T>()?
        .slice(g.cos_start..g.cos_start + g.table_len);
    let ss_ = sin
        .as_cuda_slice::<T>()?
        .slice(g.sin_start..g.sin_start + g.table_len);
    let f = crate::cuda::kernel(&dev, "rope", &kernel_name(X::DTYPE, T::DTYPE, backward))?;
    // Lanes over a row's pairs (a warp at least, so loads coalesce), the rest of the 256
    // threads over rows: head_dim 64 / 128 / 256 gives 8 / 4 / 2 rows per block.
    let bx = half.next_multiple_of(32).min(256);
    let by = 256 / bx;
    let cfg = LaunchConfig {
        grid_dim: (rows.div_ceil(by).min(65_535), 1, 1),
        block_dim: (bx, by, 1),
        shared_mem_bytes: 0,
    };
    let stream = dev.cuda_stream();
    let mut launch = stream.launch_builder(&f);
    launch
        .arg(&xs)
        .arg(&cs)
        .arg(&ss_)
        .arg(&mut y)
        .arg(&rows)
        .arg(&half)
        .arg(&seq)
        .arg(&heads)
        .arg(&sb)
        .arg(&sh)
        .arg(&ss)
        .arg(&table_rows);
    // SAFETY: arguments match kRope{,Bwd}_<x>_<table> (const X*, const T*, const T*, X*,
    // unsigned x4, u64 x3, unsigned); every x offset the kernel forms (batch, head, position
    // below the dims, through the layout's strides, plus a pair index below head_dim) lies in
    // the view, the table offsets below table_len, the output offsets below n.
    unsafe { launch.launch(cfg) }.map_err(crate::cuda::err)?;
    Ok(crate::cuda::storage(y, &dev))
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        if self.backward {
            "rope-backward"
        } else {
            "rope"
        }
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        cos: &CpuStorage,
        lc: &Layout,
        sin: &CpuStorage,
        ls: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use half::{bf16, f16};
        use CpuStorage as S;
        let g = Geometry::of(lx, lc, ls)?;
        let b = self.backward;
        let y = match (x, cos, sin) {
            (S::F32(x), S::F32(c), S::F32(s)) => S::F32(rope_cpu::<f32, f32>(&g, x, c, s, b)),
            (S::BF16(x), S::BF16(c), S::BF16(s)) => S::BF16(rope_cpu::<bf16, bf16>(&g, x, c, s, b)),
            (S::BF16(x), S::F32(c), S::F32(s)) => S::BF16(rope_cpu::<bf16, f32>(&g, x, c, s, b)),
            (S::F16(x), S::F16(c), S::F16(s)) => S::F16(rope_cpu::<f16, f16>(&g, x, c, s, b)),
            (S::F16(x), S::F32(c), S::F32(s)) => S::F16(rope_cpu::<f16, f32>(&g, x, c, s, b)),
            _ => return Err(dtype_error(x.dtype(), cos.dtype(), sin.dtype())),
        };
        Ok((y, lx.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        cos: &CudaStorage,
        lc: &Layout,
        sin: &CudaStorage,
        ls: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        use half::{bf16, f16};
        use DType::{BF16, F16, F32};
        let g = Geometry::of(lx, lc, ls)?;
        let b = self.backward;
        let y = match (x.dtype(), cos.dtype(), sin.dtype()) {
            (F32, F32, F32) => rope_cuda::<f32, f32>(&g, x, cos, sin, b)?,
            (BF16, BF16, BF16) => rope_cuda::<bf16, bf16>(&g, x, cos, sin, b)?,
            (BF16, F32, F32) => rope_cuda::<bf16, f32>(&g, x, cos, sin, b)?,
            (F16, F16, F16) => rope_cuda::<f16, f16>(&g, x, cos, sin, b)?,
            (F16, F32, F32) => rope_cuda::<f16, f32>(&g, x, cos, sin, b)?,
            (xd, cd, sd) => return Err(dtype_error(xd, cd, sd)),
        };
        Ok((y, lx.shape().clone()))
    }

    /// The transpose of this op's map, applied to `grad`: the rotation's for the forward op
    /// (and the rotation itself for its backward, were that ever differentiated).
    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let transpose = Rope {
            backward: !self.backward,
        };
        let dx = last_dim_contiguous(grad)?.apply_op3_no_bwd(cos, sin, &transpose)?;
        Ok((Some(dx), None, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    /// gemma.rs's composed `apply_rope`, the reference.
    fn composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let half = x.dim(D::Minus1)? / 2;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
    }

    /// Rotate-half cos/sin rows for `positions` as gemma.rs's `Rope::values` builds them
    /// (base 10000, so angles span several turns and the sines both signs).
    fn table_values(positions: &[usize], dim: usize) -> (Vec<f32>, Vec<f32>) {
        let half = dim / 2;
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for &p in positions {
            let angles: Vec<f32> = (0..half)
                .map(|i| p as f32 / 10_000f32.powf((2 * i) as f32 / dim as f32))
                .collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos()));
                sin.extend(angles.iter().map(|a| a.sin()));
            }
        }
        (cos, sin)
    }

    /// f32 tables: `[seq, dim]` for positions `3..3 + seq`, or per row `[batch, 1, seq, dim]`
    /// with row r shifted left by `2r` (the left padding's positions clamp to 0).
    fn tables(batch: usize, seq: usize, dim: usize, per_row: bool) -> (Tensor, Tensor) {
        let dev = &Device::Cpu;
        if per_row {
            let positions: Vec<usize> = (0..batch)
                .flat_map(|r| (3..3 + seq).map(move |p| p.saturating_sub(5 * r)))
                .collect();
            let (c, s) = table_values(&positions, dim);
            let shape = (batch, 1, seq, dim);
            (
                Tensor::from_vec(c, shape, dev).unwrap(),
                Tensor::from_vec(s, shape, dev).unwrap(),
            )
        } else {
            let positions: Vec<usize> = (3..3 + seq).collect();
            let (c, s) = table_values(&positions, dim);
            (
                Tensor::from_vec(c, (seq, dim), dev).unwrap(),
                Tensor::from_vec(s, (seq, dim), dev).unwrap(),
            )
        }
    }

    /// Deterministic values in about [-2, 2] with varied magnitudes and signs.
    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let k = (i * 7919 + seed * 104_729) % 2003;
                (k as f32 - 1001.0) / 500.0
            })
            .collect()
    }

    /// `[b, h, s, d]` input in `dtype`: contiguous, or (`transposed`) the view of a
    /// `[b, s, h, d]` tensor that q and k are in gemma.rs.
    fn input(
        shape: (usize, usize, usize, usize),
        dtype: DType,
        transposed: bool,
        seed: usize,
    ) -> Tensor {
        let (b, h, s, d) = shape;
        let v = values(b * h * s * d, seed);
        // Cast before transposing: a cast makes its output contiguous.
        let x = if transposed {
            let t = Tensor::from_vec(v, (b, s, h, d), &Device::Cpu).unwrap();
            t.to_dtype(dtype).unwrap().transpose(1, 2).unwrap()
        } else {
            let t = Tensor::from_vec(v, (b, h, s, d), &Device::Cpu).unwrap();
            t.to_dtype(dtype).unwrap()
        };
        // (Swapping heads and seq moves nothing when either is 1.)
        assert_eq!(x.is_contiguous(), !transposed || h == 1 || s == 1);
        x
    }

    fn flat(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// `|got - want| <= rel * |want|` elementwise (the f32 paths agree bit for bit; the bound
    /// is what the brief asks of them).
    fn assert_rel(got: &[f32], want: &[f32], rel: f32, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= rel * w.abs(),
                "{what}: element {i}: {g} vs {w}"
            );
        }
    }

    /// Shapes with odd sizes everywhere, head_dim 2 (one pair) to 256, a decode step (seq 1),
    /// and one large enough to split over threads.
    const SHAPES: [(usize, usize, usize, usize); 6] = [
        (1, 1, 1, 2),
        (2, 3, 5, 8),
        (3, 2, 1, 64),
        (2, 4, 7, 128),
        (1, 2, 3, 256),
        (2, 8, 40, 128),
    ];

    #[test]
    fn f32_matches_the_composed_formula() -> Result<()> {
        for shape in SHAPES {
            let (b, _, s, d) = shape;
            for per_row in [false, true] {
                for transposed in [false, true] {
                    let x = input(shape, DType::F32, transposed, 1);
                    let (cos, sin) = tables(b, s, d, per_row);
                    let got = rope(&x, &cos, &sin)?;
                    assert!(got.is_contiguous());
                    assert_eq!(got.dims(), x.dims());
                    let what = format!("{shape:?} per_row={per_row} transposed={transposed}");
                    assert_rel(&flat(&got), &flat(&composed(&x, &cos, &sin)?), 1e-6, &what);
                }
            }
        }
        Ok(())
    }

    #[test]
    fn a_view_with_a_strided_last_dim_is_copied_first() -> Result<()> {
        // [b, h, d, s] transposed to [b, h, s, d]: the last dim has stride s.
        let (b, h, s, d) = (2, 3, 4, 8);
        let x = Tensor::from_vec(values(b * h * s * d, 2), (b, h, d, s), &Device::Cpu)?
            .transpose(2, 3)?;
        assert_ne!(x.stride()[3], 1);
        let (cos, sin) = tables(b, s, d, true);
        let want = composed(&x, &cos, &sin)?;
        assert_rel(&flat(&rope(&x, &cos, &sin)?), &flat(&want), 1e-6, "strided");
        Ok(())
    }

    /// The composed formula in f32 on the widened inputs, rounded once to `dtype`: what the
    /// fused op computes, bit for bit.
    fn rounded_once(x: &Tensor, cos: &Tensor, sin: &Tensor, dtype: DType) -> Vec<f32> {
        let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        flat(
            &composed(&f(x), &f(cos), &f(sin))
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
    }

    /// `|v| |cos| + |swap_halves(v)| |sin|`: the magnitudes of the two terms of each output,
    /// forward or (the tables repeating their first half) backward.
    fn term_magnitudes(v: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Vec<f32>> {
        let f = |t: &Tensor| t.to_dtype(DType::F32)?.abs();
        let v = f(v)?;
        let half = v.dim(D::Minus1)? / 2;
        let swapped = Tensor::cat(
            &[
                &v.narrow(D::Minus1, half, half)?,
                &v.narrow(D::Minus1, 0, half)?,
            ],
            D::Minus1,
        )?;
        let terms = (v.broadcast_mul(&f(cos)?)? + swapped.broadcast_mul(&f(sin)?)?)?;
        Ok(flat(&terms))
    }

    /// The largest relative rounding error of `dtype` (2^-8 for bf16, 2^-11 for f16).
    fn unit_roundoff(dtype: DType) -> f32 {
        match dtype {
            DType::BF16 => 2f32.powi(-8),
            DType::F16 => 2f32.powi(-11),
            other => panic!("no unit roundoff for {other:?}"),
        }
    }

    #[test]
    fn half_inputs_round_once_from_f32() -> Result<()> {
        for dtype in [DType::BF16, DType::F16] {
            for shape in SHAPES {
                let (b, _, s, d) = shape;
                for (per_row, table_dtype) in [(false, DType::F32), (true, dtype)] {
                    let x = input(shape, dtype, true, 3);
                    let (cos, sin) = tables(b, s, d, per_row);
                    let (cos, sin) = (cos.to_dtype(table_dtype)?, sin.to_dtype(table_dtype)?);
                    let got = rope(&x, &cos, &sin)?;
                    assert_eq!(got.dtype(), dtype);
                    let what = format!("{dtype:?} {shape:?} {table_dtype:?} tables");
                    assert_eq!(
                        flat(&got),
                        rounded_once(&x, &cos, &sin, dtype),
                        "{what}: not the f32 result rounded once"
                    );
                    // The composed path in the half dtype rounds the tables, the two products
                    // and the sum: within 4 unit roundoffs u of the terms' magnitudes, which
                    // bounds the fused op's single rounding too.
                    let terms = term_magnitudes(&x, &cos, &sin)?;
                    let want = flat(&composed(&x, &cos.to_dtype(dtype)?, &sin.to_dtype(dtype)?)?);
                    for (i, ((g, w), t)) in flat(&got).iter().zip(&want).zip(&terms).enumerate() {
                        assert!(
                            (g - w).abs() <= 4.0 * unit_roundoff(dtype) * t,
                            "{what}: element {i}: {g} vs composed {w} (terms {t})"
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// `sum(w * y)` for fixed weights, so the gradient reaching the op is `w` (through a
    /// transpose when `strided_grad`, so it arrives as a strided view). The weights are bf16
    /// values, exact in every dtype, so the same gradient reaches the op whatever y's dtype.
    fn grad_of(
        f: impl Fn(&Tensor) -> Result<Tensor>,
        x: &Tensor,
        strided_grad: bool,
    ) -> Result<Tensor> {
        let var = Var::from_tensor(x)?;
        let y = f(var.as_tensor())?;
        let y = if strided_grad { y.transpose(1, 2)? } else { y };
        let w = Tensor::from_vec(values(y.elem_count(), 9), y.dims(), &Device::Cpu)?
            .to_dtype(DType::BF16)?
            .to_dtype(DType::F32)?;
        let loss = (y.to_dtype(DType::F32)? * w)?.sum_all()?;
        let grads = loss.backward()?;
        Ok(grads
            .get(var.as_tensor())
            .expect("x has a gradient")
            .clone())
    }

    #[test]
    fn f32_gradients_match_autograd_of_the_composed_formula() -> Result<()> {
        for shape in SHAPES {
            let (b, _, s, d) = shape;
            for per_row in [false, true] {
                for strided_grad in [false, true] {
                    let x = input(shape, DType::F32, false, 4);
                    let (cos, sin) = tables(b, s, d, per_row);
                    let got = grad_of(|x| rope(x, &cos, &sin), &x, strided_grad)?;
                    let want = grad_of(|x| composed(x, &cos, &sin), &x, strided_grad)?;
                    let what = format!("{shape:?} per_row={per_row} strided={strided_grad}");
                    assert_rel(&flat(&got), &flat(&want), 1e-6, &what);
                }
            }
        }
        Ok(())
    }

    #[test]
    fn half_gradients_round_once_and_stay_near_the_composed_ones() -> Result<()> {
        for dtype in [DType::BF16, DType::F16] {
            for shape in SHAPES {
                for strided_grad in [false, true] {
                    let (b, h, s, d) = shape;
                    let x = input(shape, dtype, false, 5);
                    let (cos, sin) = tables(b, s, d, true);
                    let (cos, sin) = (cos.to_dtype(dtype)?, sin.to_dtype(dtype)?);
                    let got = flat(&grad_of(|x| rope(x, &cos, &sin), &x, strided_grad)?);
                    // The same gradient reaches the op in f32: the transpose map on it in f32,
                    // rounded once.
                    let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
                    let want_once =
                        grad_of(|x| composed(x, &f(&cos), &f(&sin)), &f(&x), strided_grad)?;
                    let what = format!("{dtype:?} {shape:?} strided={strided_grad}");
                    assert_eq!(
                        got,
                        flat(&want_once.to_dtype(dtype)?),
                        "{what}: not the f32 gradient rounded once"
                    );
                    // Against candle's composed autograd in dtype (two products and a sum,
                    // each rounded): within 4 unit roundoffs of the terms' magnitudes.
                    let want = flat(&grad_of(|x| composed(x, &cos, &sin), &x, strided_grad)?);
                    let n = x.elem_count();
                    let g = if strided_grad {
                        Tensor::from_vec(values(n, 9), (b, s, h, d), &Device::Cpu)?
                            .transpose(1, 2)?
                    } else {
                        Tensor::from_vec(values(n, 9), (b, h, s, d), &Device::Cpu)?
                    };
                    let terms = term_magnitudes(&g, &cos, &sin)?;
                    for (i, ((a, w), t)) in got.iter().zip(&want).zip(&terms).enumerate() {
                        assert!(
                            (a - w).abs() <= 4.0 * unit_roundoff(dtype) * t,
                            "{what}: element {i}: {a} vs composed {w} (terms {t})"
                        );
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn bad_inputs_are_clear_errors() {
        let dev = &Device::Cpu;
        let x = Tensor::zeros((1, 2, 3, 8), DType::BF16, dev).unwrap();
        let (cos, sin) = tables(1, 3, 8, false);
        let msg = |r: Result<Tensor>| r.unwrap_err().to_string();

        let e = msg(rope(&x.flatten_to(1).unwrap(), &cos, &sin));
        assert!(e.contains("[batch, heads, seq, head_dim]"), "{e}");
        let odd = Tensor::zeros((1, 2, 3, 7), DType::F32, dev).unwrap();
        let (c7, s7) = (cos.narrow(1, 0, 7).unwrap(), sin.narrow(1, 0, 7).unwrap());
        let e = msg(rope(&odd, &c7, &s7));
        assert!(e.contains("head_dim 7 is odd"), "{e}");
        let e = msg(rope(&x, &cos.narrow(0, 0, 2).unwrap(), &sin));
        assert!(e.contains("differ in shape"), "{e}");
        let (c2, s2) = tables(1, 2, 8, false);
        let e = msg(rope(&x, &c2, &s2));
        assert!(e.contains("neither [seq, head_dim]"), "{e}");
        let (cb, sb) = tables(2, 3, 8, true);
        let e = msg(rope(&x, &cb, &sb));
        assert!(e.contains("neither [seq, head_dim]"), "{e}");
        let f16 = |t: &Tensor| t.to_dtype(DType::F16).unwrap();
        let e = msg(rope(&x, &f16(&cos), &f16(&sin)));
        assert!(e.contains("BF16 input with F16 cos"), "{e}");
        let e = msg(rope(&x, &cos, &f16(&sin)));
        assert!(e.contains("F32 cos and F16 sin"), "{e}");
        let e = msg(rope(&x.to_dtype(DType::F64).unwrap(), &cos, &sin));
        assert!(e.contains("F64 input"), "{e}");
    }

    #[test]
    fn shared_tables_may_be_given_with_a_batch_of_one() -> Result<()> {
        let shape = (3, 2, 4, 16);
        let x = input(shape, DType::F32, true, 6);
        let (cos, sin) = tables(1, 4, 16, false);
        let (c4, s4) = (cos.reshape((1, 1, 4, 16))?, sin.reshape((1, 1, 4, 16))?);
        assert_eq!(flat(&rope(&x, &c4, &s4)?), flat(&rope(&x, &cos, &sin)?));
        Ok(())
    }

    /// Every kernel `cuda_fwd` can ask for is an entry of the compiled module, and the module
    /// has no FMA (the bit-identity with the CPU loop above depends on it).
    #[cfg(feature = "cuda")]
    #[test]
    fn every_launched_kernel_is_an_fma_free_entry_of_the_module() {
        let ptx = rupantor_quant::cuda::module_ptx("rope").unwrap();
        let entries = rupantor_quant::cuda::ptx_entry_points(ptx);
        use DType::{BF16, F16, F32};
        for (x, t) in [
            (F32, F32),
            (BF16, BF16),
            (BF16, F32),
            (F16, F16),
            (F16, F32),
        ] {
            for backward in [false, true] {
                let name = kernel_name(x, t, backward);
                assert!(entries.contains(&name), "{name} not in {entries:?}");
            }
        }
        assert_eq!(entries.len(), 10, "{entries:?}");
        assert!(!ptx.contains("fma."), "kernels/rope.cu compiled to an FMA");
    }
}
