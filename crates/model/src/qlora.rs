//! QLoRA linear layers: a frozen NF4 weight plus a trainable LoRA adapter (PEFT semantics).
//!
//! `y = x · dequant(W)^T + scale · B(A(dropout(x)))`, with `A: [r, in]` kaiming-uniform,
//! `B: [out, r]` zeros and `scale = alpha / r` (rsLoRA: `alpha / sqrt(r)`).
//!
//! The frozen product is a candle custom op rather than `matmul` on a dequantized tensor for two
//! reasons: candle's matmul backward builds a gradient for both operands (a full f32 copy of
//! every frozen weight per backward), and a dequantized 9B projection would sit in memory as f32.
//! The op dequantizes W tile by tile (blocks of output rows) into a scratch buffer, multiplies
//! each tile with `gemm`, and its backward returns only `dx = dy · dequant(W)`, tiled the same
//! way. Decode steps (a few input rows) skip the tiles: a fused kernel multiplies the packed
//! NF4 weight directly ([`rupantor_quant::gemv`]).
//!
//! On a GPU the same op keeps the packed NF4 arrays in device memory and its `cuda_fwd`
//! dequantizes the weight with our kernel (`kernels/nf4.cu`) into a scratch of the input's
//! dtype (bf16 in training), multiplies it with cuBLAS and drops it; the backward does the same
//! for `dx`. The tile there is the whole projection: the largest of a 9B (`14336 x 3584`) is
//! 98 MiB in bf16, and one large GEMM keeps cuBLAS at full speed. Decode steps (up to
//! [`FUSED_MAX_ROWS`] bf16 rows) take the fused NF4 GEMV kernel instead.
//!
//! The LoRA branch runs in f32 whatever the activations are (PEFT casts the input to the
//! adapter's dtype): A and B are f32 master weights, and only its output is cast back.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
#[cfg(feature = "cuda")]
use candle_core::{cuda_backend::CudaDevice, CudaStorage};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor, Var};
use rupantor_quant::blockwise8;
use rupantor_quant::nf4::{BLOCKSIZE, NESTED_BLOCKSIZE};
use rupantor_quant::{dequantize_nf4, Nf4Tensor};

use crate::linear::{
    DenseLinear, Linear, LinearBuilder, LinearRole, LinearWeight, QuantizedWeight,
};

/// Default number of weight elements dequantized per tile: 4 MiB of f32, small next to a 9B
/// projection (`14336 x 3584` = 196 MiB in f32) and large enough that each tile's GEMM runs
/// near full speed.
pub const DEFAULT_TILE_ELEMS: usize = 1 << 20;

/// Most input rows [`Nf4Weight::matmul_t`] sends through the fused NF4 kernel (decode steps of
/// a batch); beyond this, dequantized tiles and `gemm` are faster.
pub const FUSED_MAX_ROWS: usize = 16;

/// A frozen NF4 weight `[out, in]` with CPU kernels that never hold it whole in f32.
pub struct Nf4Weight {
    nf4: Nf4Tensor,
    out_features: usize,
    in_features: usize,
    /// bitsandbytes' signed dynamic map, which the 8-bit absmax codes index.
    absmax_map: [f32; blockwise8::MAP_SIZE],
}

impl fmt::Debug for Nf4Weight {
    // The derived form would print every packed byte.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Nf4Weight")
            .field("shape", &[self.out_features, self.in_features])
            .field("storage_bytes", &self.nf4.storage_bytes())
            .finish()
    }
}

impl Nf4Weight {
    /// Checks that `nf4` is a consistent `[out, in]` weight.
    pub fn new(nf4: Nf4Tensor) -> Result<Self> {
        let &[out_features, in_features] = nf4.shape.as_slice() else {
            candle_core::bail!("NF4 linear weight must be [out, in], got {:?}", nf4.shape);
        };
        if out_features == 0 || in_features == 0 {
            candle_core::bail!("NF4 linear weight has an empty shape {:?}", nf4.shape);
        }
        let n = out_features * in_features;
        let blocks = n.div_ceil(BLOCKSIZE);
        if nf4.packed.len() != n.div_ceil(2)
            || nf4.absmax.codes.len() != blocks
            || nf4.absmax.nested_absmax.len() != blocks.div_ceil(NESTED_BLOCKSIZE)
        {
            candle_core::bail!(
                "NF4 weight {:?}: {} packed bytes, {} absmax codes, {} nested scales do not fit",
                nf4.shape,
                nf4.packed.len(),
                nf4.absmax.codes.len(),
                nf4.absmax.nested_absmax.len()
            );
        }
        Ok(Self {
            nf4,
            out_features,
            in_features,
            absmax_map: blockwise8::dynamic_map(true),
        })
    }

    pub fn nf4(&self) -> &Nf4Tensor {
        &self.nf4
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Rows per tile for a budget of `tile_elems` elements: at least one, and a multiple of
    /// `64 / gcd(in, 64)` so that every tile starts on an NF4 block boundary.
    pub fn tile_rows(&self, tile_elems: usize) -> usize {
        let align = BLOCKSIZE / gcd(self.in_features, BLOCKSIZE);
        let rows = (tile_elems / self.in_features).max(1);
        rows.div_ceil(align) * align
    }

    /// Dequantizes rows `r0..r1` into `out` (`(r1 - r0) * in` long). `r0 * in` must be a
    /// multiple of the NF4 block size (tiles from [`Nf4Weight::tile_rows`] are).
    ///
    /// Bit-identical to the same rows of [`Nf4Tensor::dequantize`]: the absmax of each block is
    /// decoded as `map[code] * nested_scale + offset`, the same two f32 roundings bitsandbytes
    /// (and `NestedAbsmax::dequantize`) performs.
    pub fn dequantize_rows(&self, r0: usize, r1: usize, out: &mut [f32]) {
        let e0 = r0 * self.in_features;
        let e1 = r1 * self.in_features;
        assert!(e0 % BLOCKSIZE == 0, "tile start {r0} is not block-aligned");
        assert!(r1 <= self.out_features && out.len() == e1 - e0);
        let a = &self.nf4.absmax;
        let absmax: Vec<f32> = (e0 / BLOCKSIZE..e1.div_ceil(BLOCKSIZE))
            .map(|b| {
                self.absmax_map[a.codes[b] as usize] * a.nested_absmax[b / NESTED_BLOCKSIZE]
                    + a.offset
            })
            .collect();
        dequantize_nf4(&self.nf4.packed[e0 / 2..], &absmax, out);
    }

    /// `y = x · W^T` for row-major `x: [m, in]`, returning row-major `[m, out]`.
    ///
    /// Up to [`FUSED_MAX_ROWS`] input rows (decoding) go through the fused NF4 kernel, which
    /// reads the packed weight once and never writes it out in f32; more rows (prefill,
    /// training) dequantize tile by tile into a scratch buffer for `gemm`.
    pub fn matmul_t(&self, x: &[f32], m: usize, tile_rows: usize) -> Vec<f32> {
        let (out, inp) = (self.out_features, self.in_features);
        assert_eq!(x.len(), m * inp, "input length");
        if m == 0 {
            return Vec::new();
        }
        if m <= FUSED_MAX_ROWS {
            return self.matvecs_t(x, m);
        }
        let mut y = vec![0f32; m * out];
        let mut scratch = vec![0f32; tile_rows.min(out) * inp];
        let mut r0 = 0;
        while r0 < out {
            let r1 = (r0 + tile_rows).min(out);
            let rows = r1 - r0;
            let tile = &mut scratch[..rows * inp];
            self.dequantize_rows(r0, r1, tile);
            // y[:, r0..r1] = x · tile^T: lhs (m x in) row-major; rhs (in x rows) is the tile
            // read column-major; dst (m x rows) is a column slice of y with row stride `out`.
            // SAFETY: every pointer/stride pair addresses only elements inside `y`, `x` and
            // `tile`, whose lengths are checked above; the three buffers do not overlap.
            unsafe {
                gemm::gemm(
                    m,
                    rows,
                    inp,
                    y.as_mut_ptr().add(r0),
                    1,
                    out as isize,
                    false,
                    x.as_ptr(),
                    1,
                    inp as isize,
                    tile.as_ptr(),
                    inp as isize,
                    1,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism(),
                );
            }
            r0 = r1;
        }
        y
    }

    /// `y = x · W^T` through the fused NF4 kernel ([`rupantor_quant::nf4_matvecs_with`]), the
    /// absmax of each block decoded as [`Nf4Weight::dequantize_rows`] decodes it.
    pub fn matvecs_t(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (out, inp) = (self.out_features, self.in_features);
        assert_eq!(x.len(), m * inp, "input length");
        let a = &self.nf4.absmax;
        let absmax = |b0: usize, dst: &mut [f32]| {
            for (k, o) in dst.iter_mut().enumerate() {
                let b = b0 + k;
                *o = self.absmax_map[a.codes[b] as usize] * a.nested_absmax[b / NESTED_BLOCKSIZE]
                    + a.offset;
            }
        };
        let mut y = vec![0f32; m * out];
        rupantor_quant::nf4_matvecs_with(&self.nf4.packed, &absmax, x, m, &mut y, out, inp);
        y
    }

    /// `dx = dy · W` for row-major `dy: [m, out]`, returning row-major `[m, in]`; the tiles'
    /// contributions accumulate in place.
    pub fn matmul(&self, dy: &[f32], m: usize, tile_rows: usize) -> Vec<f32> {
        let (out, inp) = (self.out_features, self.in_features);
        assert_eq!(dy.len(), m * out, "gradient length");
        let mut dx = vec![0f32; m * inp];
        if m == 0 {
            return dx;
        }
        let mut scratch = vec![0f32; tile_rows.min(out) * inp];
        let mut r0 = 0;
        while r0 < out {
            let r1 = (r0 + tile_rows).min(out);
            let rows = r1 - r0;
            let tile = &mut scratch[..rows * inp];
            self.dequantize_rows(r0, r1, tile);
            // dx += dy[:, r0..r1] · tile: lhs (m x rows) is a column slice of dy; rhs
            // (rows x in) and dst (m x in) are row-major.
            // SAFETY: as in `matmul_t`; `dy.as_ptr().add(r0)` stays within `dy` because
            // `r0 < out` and `m >= 1`.
            unsafe {
                gemm::gemm(
                    m,
                    inp,
                    rows,
                    dx.as_mut_ptr(),
                    1,
                    inp as isize,
                    r0 > 0,
                    dy.as_ptr().add(r0),
                    1,
                    out as isize,
                    tile.as_ptr(),
                    1,
                    inp as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism(),
                );
            }
            r0 = r1;
        }
        dx
    }
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The same thread count candle's own CPU matmul uses (shared by every custom matmul op).
pub(crate) fn parallelism() -> gemm::Parallelism {
    let n = candle_core::utils::get_num_threads();
    if n > 1 {
        gemm::Parallelism::Rayon(n)
    } else {
        gemm::Parallelism::None
    }
}

/// A row-major f32 `[m, k]` view of a custom op's CPU input.
pub(crate) fn f32_rows<'a>(
    op: &str,
    s: &'a CpuStorage,
    l: &Layout,
    k: usize,
) -> Result<(&'a [f32], usize)> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        other => candle_core::bail!("{op}: needs f32 on the CPU, got {:?}", other.dtype()),
    };
    let (m, cols) = l.shape().dims2()?;
    if cols != k {
        candle_core::bail!("{op}: expected {k} columns, got shape {:?}", l.dims());
    }
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: input must be contiguous");
    };
    Ok((&data[start..end], m))
}

/// A frozen NF4 weight where the op's input lives: on the host with the CPU kernels, or in GPU
/// memory.
#[derive(Debug)]
enum FrozenNf4 {
    /// Boxed (both): the host weight carries its 1 KiB absmax map inline.
    Host(Box<Nf4Weight>),
    #[cfg(feature = "cuda")]
    Cuda(Box<GpuNf4>),
}

impl FrozenNf4 {
    fn on(nf4: Nf4Tensor, device: &Device) -> Result<Self> {
        let host = Nf4Weight::new(nf4)?;
        match device {
            Device::Cpu => Ok(Self::Host(Box::new(host))),
            #[cfg(feature = "cuda")]
            Device::Cuda(dev) => Ok(Self::Cuda(Box::new(GpuNf4::upload(host, dev)?))),
            other => candle_core::bail!("NF4 weights on {other:?} are not supported"),
        }
    }

    fn out_features(&self) -> usize {
        match self {
            Self::Host(w) => w.out_features,
            #[cfg(feature = "cuda")]
            Self::Cuda(w) => w.out_features,
        }
    }

    fn in_features(&self) -> usize {
        match self {
            Self::Host(w) => w.in_features,
            #[cfg(feature = "cuda")]
            Self::Cuda(w) => w.in_features,
        }
    }

    // `op` names the op in the device-mismatch error, which only a cuda build can hit.
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    fn host(&self, op: &str) -> Result<&Nf4Weight> {
        match self {
            Self::Host(w) => Ok(w),
            #[cfg(feature = "cuda")]
            Self::Cuda(_) => {
                candle_core::bail!("{op}: the input is on the CPU, the weight on a GPU")
            }
        }
    }

    #[cfg(feature = "cuda")]
    fn gpu(&self, op: &str) -> Result<&GpuNf4> {
        match self {
            Self::Cuda(w) => Ok(w),
            Self::Host(_) => {
                candle_core::bail!("{op}: the input is on a GPU, the weight on the host")
            }
        }
    }
}

/// An NF4 weight `[out, in]` in GPU memory with the launchers of its device.
#[cfg(feature = "cuda")]
struct GpuNf4 {
    kernels: Arc<rupantor_quant::cuda::Nf4Cuda>,
    w: rupantor_quant::cuda::Nf4Device,
    dev: CudaDevice,
    out_features: usize,
    in_features: usize,
}

#[cfg(feature = "cuda")]
impl fmt::Debug for GpuNf4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GpuNf4")
            .field("shape", &[self.out_features, self.in_features])
            .field("storage_bytes", &self.w.storage_bytes())
            .finish()
    }
}

#[cfg(feature = "cuda")]
impl GpuNf4 {
    fn upload(host: Nf4Weight, dev: &CudaDevice) -> Result<Self> {
        let kernels = crate::cuda::nf4_kernels(dev)?;
        let w = kernels.upload(&host.nf4).map_err(crate::cuda::err)?;
        Ok(Self {
            kernels,
            w,
            dev: dev.clone(),
            out_features: host.out_features,
            in_features: host.in_features,
        })
    }

    /// The whole weight dequantized to `dtype`, contiguous `[out, in]`: bit-identical to the
    /// CPU codec's values.
    fn dequantized(&self, op: &str, dtype: DType) -> Result<CudaStorage> {
        use crate::cuda::{err, storage};
        let k = &self.kernels;
        Ok(match dtype {
            DType::F32 => storage(k.dequantize_f32(&self.w).map_err(err)?, &self.dev),
            DType::BF16 => storage(k.dequantize_bf16(&self.w).map_err(err)?, &self.dev),
            DType::F16 => storage(k.dequantize_f16(&self.w).map_err(err)?, &self.dev),
            other => return Err(crate::cuda::unsupported(op, other, "f32, bf16, f16")),
        })
    }

    /// `y = x · W^T` for a contiguous `x: [m, in]`.
    fn matmul_t(&self, op: &str, x: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let (m, k) = l.shape().dims2()?;
        let n = self.out_features;
        if k != self.in_features || !l.is_contiguous() {
            candle_core::bail!(
                "{op}: expected a contiguous [rows, {}] input, got {l:?}",
                self.in_features
            );
        }
        if x.dtype() == DType::BF16 && m <= FUSED_MAX_ROWS {
            let xs = x.as_cuda_slice::<half::bf16>()?;
            let o = l.start_offset();
            // SAFETY: the kernel writes all m * n outputs before anything reads them.
            let mut y = unsafe { self.dev.alloc::<half::bf16>(m * n)? };
            self.kernels
                .gemv_bf16_into(&self.w, &xs.slice(o..o + m * k), m, &mut y.slice_mut(..))
                .map_err(crate::cuda::err)?;
            return Ok((crate::cuda::storage(y, &self.dev), Shape::from((m, n))));
        }
        let w = self.dequantized(op, x.dtype())?;
        // W^T as a [in, out] view of the row-major [out, in] scratch: cuBLAS reads it transposed.
        let wt = Layout::new(Shape::from((k, n)), vec![1, k], 0);
        Ok((x.matmul(&w, (1, m, n, k), l, &wt)?, Shape::from((m, n))))
    }

    /// `dx = dy · W` for a contiguous `dy: [m, out]`.
    fn matmul(&self, op: &str, dy: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let (m, k) = l.shape().dims2()?;
        let n = self.in_features;
        if k != self.out_features || !l.is_contiguous() {
            candle_core::bail!(
                "{op}: expected a contiguous [rows, {}] gradient, got {l:?}",
                self.out_features
            );
        }
        let w = self.dequantized(op, dy.dtype())?;
        let wl = Layout::contiguous((k, n));
        Ok((dy.matmul(&w, (1, m, n, k), l, &wl)?, Shape::from((m, n))))
    }
}

/// `y = x · dequant(W)^T`; backward gives `dx` only.
struct Nf4Matmul {
    w: Arc<FrozenNf4>,
    tile_rows: usize,
}

impl CustomOp1 for Nf4Matmul {
    fn name(&self) -> &'static str {
        "nf4-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let w = self.w.host(self.name())?;
        let (x, m) = f32_rows(self.name(), s, l, w.in_features)?;
        let y = w.matmul_t(x, m, self.tile_rows);
        Ok((CpuStorage::F32(y), Shape::from((m, w.out_features))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        self.w.gpu(self.name())?.matmul_t(self.name(), s, l)
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let grad = Nf4MatmulGrad {
            w: self.w.clone(),
            tile_rows: self.tile_rows,
        };
        // No gradient for W exists anywhere: the weight is not a tensor in the graph.
        Ok(Some(dy.contiguous()?.apply_op1_no_bwd(&grad)?))
    }
}

/// `dx = dy · dequant(W)`.
struct Nf4MatmulGrad {
    w: Arc<FrozenNf4>,
    tile_rows: usize,
}

impl CustomOp1 for Nf4MatmulGrad {
    fn name(&self) -> &'static str {
        "nf4-matmul-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let w = self.w.host(self.name())?;
        let (dy, m) = f32_rows(self.name(), s, l, w.out_features)?;
        let dx = w.matmul(dy, m, self.tile_rows);
        Ok((CpuStorage::F32(dx), Shape::from((m, w.in_features))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        self.w.gpu(self.name())?.matmul(self.name(), s, l)
    }
}

/// Rank, scaling and dropout of a LoRA adapter (PEFT's `LoraConfig` fields).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// Dropout probability on the adapter's input, applied in train mode only.
    pub dropout: f32,
    /// rsLoRA scaling `alpha / sqrt(r)` instead of `alpha / r`.
    pub rslora: bool,
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }
}

/// SplitMix64: a tiny seedable generator, so adapter initialisation and dropout masks are
/// reproducible from the run's seed without depending on an RNG crate's stream stability.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        let z = Self::draw_at(self.0, 1);
        self.0 = self.0.wrapping_add(Self::GAMMA);
        z
    }

    /// Uniform in [0, 1) with 24 random bits (every value exactly representable in f32).
    fn next_f32(&mut self) -> f32 {
        Self::f32_of(self.next_u64())
    }

    const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

    /// The output `next_u64` gives `k` calls after the state was `state` (k >= 1): the state
    /// only ever advances by a constant, so any draw can be computed on its own.
    fn draw_at(state: u64, k: u64) -> u64 {
        let mut z = state.wrapping_add(k.wrapping_mul(Self::GAMMA));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn f32_of(z: u64) -> f32 {
        (z >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Advances past `n` draws at once; returns the state before them.
    fn skip(&mut self, n: u64) -> u64 {
        let before = self.0;
        self.0 = before.wrapping_add(n.wrapping_mul(Self::GAMMA));
        before
    }
}

/// FNV-1a, to derive a per-layer seed from the tensor name.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A layer's seed: the run seed mixed with its checkpoint name, so every layer draws a
/// different but reproducible stream.
pub fn layer_seed(seed: u64, name: &str) -> u64 {
    SplitMix64(seed ^ fnv1a(name)).next_u64()
}

/// A training position shared by the layers of a model (clones share it). An adapter given
/// one through [`LoraAdapter::with_dropout_clock`] draws its dropout masks from a stream per
/// (layer, tick): the position alone then determines every mask, so a resumed run draws the
/// same masks as an uninterrupted one.
#[derive(Debug, Clone, Default)]
pub struct DropoutClock(Arc<AtomicU64>);

impl DropoutClock {
    pub fn set(&self, tick: u64) {
        self.0.store(tick, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Where an adapter's dropout masks come from: a stream per tick of a [`DropoutClock`], derived
/// from `seed` and the tick and started at the first mask drawn in that tick.
#[derive(Debug)]
struct DropoutStream {
    clock: DropoutClock,
    seed: u64,
    /// The tick `rng` was started for; `None` starts it again at the next mask.
    tick: Option<u64>,
    rng: SplitMix64,
}

impl DropoutStream {
    fn new(clock: DropoutClock, seed: u64) -> Self {
        Self {
            clock,
            seed,
            tick: None,
            rng: SplitMix64(0),
        }
    }

    /// The generator for the next mask (started again when the clock has moved).
    fn rng(&mut self) -> &mut SplitMix64 {
        let now = self.clock.get();
        if self.tick != Some(now) {
            let mut mix = SplitMix64(self.seed ^ now.wrapping_mul(0xD6E8_FEB8_6659_FD93));
            self.rng = SplitMix64(mix.next_u64());
            self.tick = Some(now);
        }
        &mut self.rng
    }
}

/// The trainable half of a QLoRA layer.
#[derive(Debug)]
pub struct LoraAdapter {
    /// `[r, in]`.
    pub a: Var,
    /// `[out, r]`.
    pub b: Var,
    pub scale: f64,
    pub dropout: f32,
    stream: Mutex<DropoutStream>,
}

impl LoraAdapter {
    /// PEFT's initialisation: `A ~ U(-1/sqrt(in), 1/sqrt(in))` (what
    /// `kaiming_uniform_(a=sqrt(5))` gives: gain `sqrt(2 / (1 + 5))`, bound
    /// `gain * sqrt(3 / fan_in)`), `B = 0`, so a fresh adapter changes nothing.
    pub fn init(
        cfg: &LoraConfig,
        in_features: usize,
        out_features: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        if cfg.rank == 0 {
            candle_core::bail!("LoRA rank must be at least 1");
        }
        if !(0.0..1.0).contains(&cfg.dropout) {
            candle_core::bail!("LoRA dropout must be in [0, 1), got {}", cfg.dropout);
        }
        let bound = 1.0 / (in_features as f32).sqrt();
        let mut rng = SplitMix64(seed);
        let a: Vec<f32> = (0..cfg.rank * in_features)
            .map(|_| (2.0 * rng.next_f32() - 1.0) * bound)
            .collect();
        let a = Var::from_tensor(&Tensor::from_vec(a, (cfg.rank, in_features), device)?)?;
        let b = Var::zeros((out_features, cfg.rank), DType::F32, device)?;
        // A separate stream for dropout, so masks do not repeat the initialisation draws.
        let dropout_seed = SplitMix64(seed ^ 0xD1B5_4A32_D192_ED03).next_u64();
        Self::from_vars(a, b, cfg.scale(), cfg.dropout, dropout_seed)
    }

    /// An adapter from existing weights (a saved adapter, or a test's choice).
    pub fn from_vars(a: Var, b: Var, scale: f64, dropout: f32, seed: u64) -> Result<Self> {
        let (r, _) = a.dims2()?;
        let (_, rb) = b.dims2()?;
        if r != rb {
            candle_core::bail!("LoRA A is {:?} but B is {:?}", a.dims(), b.dims());
        }
        if !(0.0..1.0).contains(&dropout) {
            candle_core::bail!("LoRA dropout must be in [0, 1), got {dropout}");
        }
        Ok(Self {
            a,
            b,
            scale,
            dropout,
            // An own clock that nobody moves: one stream for the adapter's lifetime.
            stream: Mutex::new(DropoutStream::new(DropoutClock::default(), seed)),
        })
    }

    /// Draws the dropout masks from a stream per tick of `clock` (see [`DropoutClock`]),
    /// seeded by `seed` and the tick, instead of one stream for the adapter's lifetime.
    pub fn with_dropout_clock(mut self, clock: DropoutClock, seed: u64) -> Self {
        self.stream = Mutex::new(DropoutStream::new(clock, seed));
        self
    }

    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }

    /// Starts this tick's mask stream again, so the next forward passes draw the masks the
    /// previous ones drew since the tick was set: a forward recomputed for the backward pass
    /// (activation checkpointing) must see the masks the first one saw.
    pub fn replay_dropout(&self) {
        self.stream.lock().expect("dropout stream poisoned").tick = None;
    }

    /// Inverted dropout on `x` (PEFT's `nn.Dropout`): zero with probability p, scale the rest
    /// by `1 / (1 - p)`. The mask takes the next `x.elem_count()` draws of this layer's stream;
    /// the op computes them where `x` lives (see [`LoraDropout`]). The result is in the
    /// adapter's dtype (f32), the cast of `x` done in the same pass.
    pub fn dropout(&self, x: &Tensor) -> Result<Tensor> {
        let p = self.dropout;
        let state = {
            let mut stream = self.stream.lock().expect("dropout stream poisoned");
            stream.rng().skip(x.elem_count() as u64)
        };
        x.contiguous()?.apply_op1(LoraDropout {
            state,
            p,
            keep: 1.0 / (1.0 - p),
            out: self.a.dtype(),
        })
    }

    /// The adapter's term of the layer output, `scale · B(A(dropout(x)))` for `x: [rows, in]`;
    /// dropout only when `training`. Computed in the adapter's dtype (f32 master weights) and
    /// returned in `x`'s.
    ///
    /// Out of training the product is not tracked for autograd: a generation run keeps
    /// nothing of a step once its logits are read, where a tracked graph (A and B are
    /// variables) kept every decode step's activations alive until the batch ended (about
    /// 70 MB per step at batch 8 on the 270M model, 23 GiB into a test-split run).
    pub fn forward(&self, x: &Tensor, training: bool) -> Result<Tensor> {
        let (a, b) = if training {
            (self.a.as_tensor().clone(), self.b.as_tensor().clone())
        } else {
            (self.a.as_tensor().detach(), self.b.as_tensor().detach())
        };
        let h = if training && self.dropout > 0.0 {
            self.dropout(x)?
        } else {
            x.to_dtype(a.dtype())?
        };
        // The scale multiplies the rank-r intermediate, not the [rows, out] result.
        let z = (h.matmul(&a.t()?)? * self.scale)?.matmul(&b.t()?)?;
        z.to_dtype(x.dtype())
    }

    /// The adapter's term of the input gradient, `scale · dy B A` for `dy: [rows, out]`
    /// (detached: the derivative of the eval-mode map), in `dy`'s dtype.
    pub fn input_grad(&self, dy: &Tensor) -> Result<Tensor> {
        let b = self.b.as_tensor().detach();
        let z = (dy.to_dtype(b.dtype())?.matmul(&b)? * self.scale)?
            .matmul(&self.a.as_tensor().detach())?;
        z.to_dtype(dy.dtype())
    }
}

/// Inverted dropout with the mask of a [`SplitMix64`] stream positioned at `state`: element
/// `i` of the (contiguous) input is kept, times `keep`, unless draw `i + 1` of the stream
/// (`next_f32` after `i` draws) is below `p`; the product is formed in f32 and stored in `out`
/// (the adapter's f32 from bf16 activations: the cast and the mask are one pass). SplitMix64's
/// draw `k` is a function of `state + k * gamma` alone, so the CPU and the GPU compute the same
/// mask, element by element, as the sequential stream would; the backward multiplies the
/// gradient by the same mask and returns it in the input's dtype.
#[derive(Debug, Clone, Copy)]
struct LoraDropout {
    state: u64,
    p: f32,
    keep: f32,
    out: DType,
}

impl LoraDropout {
    fn factor(&self, i: usize) -> f32 {
        let u = SplitMix64::f32_of(SplitMix64::draw_at(self.state, i as u64 + 1));
        if u < self.p {
            0.0
        } else {
            self.keep
        }
    }

    fn masked<T: candle_core::WithDType>(&self, x: &[T]) -> Vec<f32> {
        x.iter()
            .enumerate()
            .map(|(i, v)| v.to_f64() as f32 * self.factor(i))
            .collect()
    }
}

impl CustomOp1 for LoraDropout {
    fn name(&self) -> &'static str {
        "lora-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("lora-dropout: the input must be contiguous");
        };
        let y = match s {
            CpuStorage::F32(v) => self.masked(&v[start..end]),
            CpuStorage::BF16(v) => self.masked(&v[start..end]),
            CpuStorage::F16(v) => self.masked(&v[start..end]),
            other => candle_core::bail!("lora-dropout: {:?} input", other.dtype()),
        };
        let y = match self.out {
            DType::F32 => CpuStorage::F32(y),
            DType::BF16 => CpuStorage::BF16(y.into_iter().map(half::bf16::from_f32).collect()),
            DType::F16 => CpuStorage::F16(y.into_iter().map(half::f16::from_f32).collect()),
            other => candle_core::bail!("lora-dropout: {other:?} output"),
        };
        Ok((y, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use half::{bf16, f16};
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("lora-dropout: the input must be contiguous");
        };
        let dev = s.device().clone();
        let n = (end - start) as u64;
        let name = match (s.dtype(), self.out) {
            (DType::F32, DType::F32) => "kLoraDropout_f32_f32",
            (DType::BF16, DType::F32) => "kLoraDropout_bf16_f32",
            (DType::F16, DType::F32) => "kLoraDropout_f16_f32",
            (DType::F32, DType::BF16) => "kLoraDropout_f32_bf16",
            (DType::F32, DType::F16) => "kLoraDropout_f32_f16",
            (i, o) => candle_core::bail!("lora-dropout: {i:?} -> {o:?} on the GPU"),
        };
        let f = crate::cuda::kernel(&dev, "lora", name)?;
        let stream = dev.cuda_stream();
        let mut launch = stream.launch_builder(&f);
        let x_f32;
        let x_bf16;
        let x_f16;
        match s.dtype() {
            DType::F32 => {
                x_f32 = s.as_cuda_slice::<f32>()?.slice(start..end);
                launch.arg(&x_f32);
            }
            DType::BF16 => {
                x_bf16 = s.as_cuda_slice::<bf16>()?.slice(start..end);
                launch.arg(&x_bf16);
            }
            _ => {
                x_f16 = s.as_cuda_slice::<f16>()?.slice(start..end);
                launch.arg(&x_f16);
            }
        }
        let cfg = LaunchConfig {
            grid_dim: ((n.div_ceil(256)).clamp(1, 65_535) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let len = end - start;
        // SAFETY (each launch): arguments match kLoraDropout_<in>_<out> (const IN*, OUT*, u64,
        // u64, float, float); the kernel strides over exactly n elements of both buffers and
        // writes every output element.
        let y = match self.out {
            DType::F32 => {
                let mut y = unsafe { dev.alloc::<f32>(len)? };
                launch
                    .arg(&mut y)
                    .arg(&n)
                    .arg(&self.state)
                    .arg(&self.p)
                    .arg(&self.keep);
                unsafe { launch.launch(cfg) }.map_err(crate::cuda::err)?;
                crate::cuda::storage(y, &dev)
            }
            DType::BF16 => {
                let mut y = unsafe { dev.alloc::<bf16>(len)? };
                launch
                    .arg(&mut y)
                    .arg(&n)
                    .arg(&self.state)
                    .arg(&self.p)
                    .arg(&self.keep);
                unsafe { launch.launch(cfg) }.map_err(crate::cuda::err)?;
                crate::cuda::storage(y, &dev)
            }
            _ => {
                let mut y = unsafe { dev.alloc::<f16>(len)? };
                launch
                    .arg(&mut y)
                    .arg(&n)
                    .arg(&self.state)
                    .arg(&self.p)
                    .arg(&self.keep);
                unsafe { launch.launch(cfg) }.map_err(crate::cuda::err)?;
                crate::cuda::storage(y, &dev)
            }
        };
        Ok((y, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let mask = LoraDropout {
            out: x.dtype(),
            ..*self
        };
        Ok(Some(dy.contiguous()?.apply_op1_no_bwd(&mask)?))
    }
}

/// Frozen NF4 weight, optionally with a LoRA adapter.
#[derive(Debug)]
pub struct QLoraLinear {
    weight: Arc<FrozenNf4>,
    tile_rows: usize,
    lora: Option<LoraAdapter>,
    training: AtomicBool,
}

impl QLoraLinear {
    /// A frozen NF4 layer without an adapter (the non-targeted projections), its packed arrays
    /// on `device`.
    pub fn frozen(nf4: Nf4Tensor, device: &Device) -> Result<Self> {
        Self::with_adapter(nf4, None, device)
    }

    /// A frozen NF4 layer with a freshly initialised adapter, both on `device`.
    pub fn new(nf4: Nf4Tensor, cfg: &LoraConfig, seed: u64, device: &Device) -> Result<Self> {
        let (out_f, in_f) = match nf4.shape.as_slice() {
            &[o, i] => (o, i),
            s => candle_core::bail!("NF4 linear weight must be [out, in], got {s:?}"),
        };
        let lora = LoraAdapter::init(cfg, in_f, out_f, seed, device)?;
        Self::with_adapter(nf4, Some(lora), device)
    }

    /// The weight's packed arrays go to `device` (the adapter's variables must be there too).
    pub fn with_adapter(
        nf4: Nf4Tensor,
        lora: Option<LoraAdapter>,
        device: &Device,
    ) -> Result<Self> {
        let host = Nf4Weight::new(nf4)?;
        let tile_rows = host.tile_rows(DEFAULT_TILE_ELEMS);
        let weight = FrozenNf4::on(host.nf4, device)?;
        if let Some(l) = &lora {
            let (r, a_in) = l.a.dims2()?;
            let (b_out, _) = l.b.dims2()?;
            if a_in != weight.in_features() || b_out != weight.out_features() {
                candle_core::bail!(
                    "LoRA A {:?} / B {:?} do not fit a [{}, {}] weight (rank {r})",
                    l.a.dims(),
                    l.b.dims(),
                    weight.out_features(),
                    weight.in_features()
                );
            }
            if !l.a.device().same_device(device) {
                candle_core::bail!(
                    "the LoRA adapter is on {:?}, the weight on {device:?}",
                    l.a.device()
                );
            }
        }
        Ok(Self {
            weight: Arc::new(weight),
            tile_rows,
            lora,
            training: AtomicBool::new(false),
        })
    }

    /// Changes the CPU dequantization tile budget (elements of W per tile); on a GPU the tile
    /// is the whole weight.
    pub fn set_tile_elems(&mut self, tile_elems: usize) {
        match &*self.weight {
            FrozenNf4::Host(w) => self.tile_rows = w.tile_rows(tile_elems),
            #[cfg(feature = "cuda")]
            FrozenNf4::Cuda(_) => {}
        }
    }

    pub fn tile_rows(&self) -> usize {
        self.tile_rows
    }

    /// The weight with its CPU kernels; `None` when it lives on a GPU.
    pub fn host_weight(&self) -> Option<&Nf4Weight> {
        match &*self.weight {
            FrozenNf4::Host(w) => Some(w),
            #[cfg(feature = "cuda")]
            FrozenNf4::Cuda(_) => None,
        }
    }

    pub fn adapter(&self) -> Option<&LoraAdapter> {
        self.lora.as_ref()
    }

    pub fn is_training(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }

    /// The frozen product alone, `x · dequant(W)^T` for `x: [rows, in]`.
    fn frozen_forward(&self, x2: &Tensor) -> Result<Tensor> {
        x2.apply_op1(Nf4Matmul {
            w: self.weight.clone(),
            tile_rows: self.tile_rows,
        })
    }
}

impl Linear for QLoraLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let Some((&in_dim, lead)) = dims.split_last() else {
            candle_core::bail!("linear input must have at least one dimension");
        };
        if in_dim != self.in_features() {
            candle_core::bail!(
                "linear expects {} input features, got shape {dims:?}",
                self.in_features()
            );
        }
        let rows: usize = lead.iter().product();
        let x2 = x.reshape((rows, in_dim))?.contiguous()?;
        let mut y = self.frozen_forward(&x2)?;
        if let Some(l) = &self.lora {
            y = (y + l.forward(&x2, self.is_training())?)?;
        }
        let mut out_dims = lead.to_vec();
        out_dims.push(self.out_features());
        y.reshape(out_dims)
    }

    fn in_features(&self) -> usize {
        self.weight.in_features()
    }

    fn out_features(&self) -> usize {
        self.weight.out_features()
    }

    fn trainable_vars(&self) -> Vec<Var> {
        self.lora
            .iter()
            .flat_map(|l| [l.a.clone(), l.b.clone()])
            .collect()
    }

    /// `dy · (dequant(W) + scale · B A)`, dropout not applied (it is the derivative of the
    /// eval-mode map).
    fn input_grad(&self, dy: &Tensor) -> Result<Tensor> {
        let dims = dy.dims();
        let Some((&out_dim, lead)) = dims.split_last() else {
            candle_core::bail!("input_grad needs at least one dimension");
        };
        let rows: usize = lead.iter().product();
        let dy2 = dy.detach().reshape((rows, out_dim))?.contiguous()?;
        let mut dx = dy2.apply_op1_no_bwd(&Nf4MatmulGrad {
            w: self.weight.clone(),
            tile_rows: self.tile_rows,
        })?;
        if let Some(l) = &self.lora {
            dx = (dx + l.input_grad(&dy2)?)?;
        }
        let mut in_dims = lead.to_vec();
        in_dims.push(self.in_features());
        dx.reshape(in_dims)
    }

    fn set_training(&self, training: bool) {
        self.training.store(training, Ordering::Relaxed);
    }

    fn replay_dropout(&self) {
        if let Some(l) = &self.lora {
            l.replay_dropout();
        }
    }
}

/// One adapter a [`QLoraBuilder`] created, by checkpoint weight name (for saving in PEFT's
/// layout: `model.layers.0.self_attn.q_proj.weight` -> `...q_proj.lora_A.weight`).
#[derive(Debug, Clone)]
pub struct NamedAdapter {
    pub name: String,
    pub role: LinearRole,
    pub layer: Option<usize>,
    pub a: Var,
    pub b: Var,
}

/// Quantizes each projection to NF4 as the checkpoint streams in (the f32 copy is dropped
/// right after) and attaches LoRA adapters to the `targets`. The lm_head stays a frozen dense
/// layer in the activation dtype: for tied checkpoints it is the embedding itself.
#[derive(Debug, Clone)]
pub struct QLoraBuilder {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub rslora: bool,
    pub targets: Vec<LinearRole>,
    pub seed: u64,
    /// Where the NF4 weights, the adapters and the lm_head live.
    pub device: Device,
    /// The model's activation dtype ([`LinearBuilder::dtype`]); the adapters stay f32.
    pub dtype: DType,
    adapters: Vec<NamedAdapter>,
}

impl QLoraBuilder {
    /// The paper's setup (design §5): r 32, alpha 64, dropout 0.05, all seven projections.
    pub fn new(device: &Device) -> Self {
        Self {
            rank: 32,
            alpha: 64.0,
            dropout: 0.05,
            rslora: false,
            targets: vec![
                LinearRole::QProj,
                LinearRole::KProj,
                LinearRole::VProj,
                LinearRole::OProj,
                LinearRole::GateProj,
                LinearRole::UpProj,
                LinearRole::DownProj,
            ],
            seed: 0,
            device: device.clone(),
            dtype: DType::F32,
            adapters: Vec::new(),
        }
    }

    pub fn lora_config(&self) -> LoraConfig {
        LoraConfig {
            rank: self.rank,
            alpha: self.alpha,
            dropout: self.dropout,
            rslora: self.rslora,
        }
    }

    /// The adapters built so far, in load order.
    pub fn adapters(&self) -> &[NamedAdapter] {
        &self.adapters
    }

    fn wrap(
        &mut self,
        name: String,
        role: LinearRole,
        layer: Option<usize>,
        nf4: Nf4Tensor,
    ) -> Result<Box<dyn Linear>> {
        if !self.targets.contains(&role) {
            return Ok(Box::new(QLoraLinear::frozen(nf4, &self.device)?));
        }
        let seed = layer_seed(self.seed, &name);
        let lin = QLoraLinear::new(nf4, &self.lora_config(), seed, &self.device)?;
        let l = lin.adapter().expect("just attached");
        self.adapters.push(NamedAdapter {
            name,
            role,
            layer,
            a: l.a.clone(),
            b: l.b.clone(),
        });
        Ok(Box::new(lin))
    }
}

impl LinearBuilder for QLoraBuilder {
    fn build(&mut self, w: LinearWeight) -> Result<Box<dyn Linear>> {
        if w.role == LinearRole::LmHead {
            return Ok(Box::new(DenseLinear::new(
                w.weight.to_device(&self.device)?.to_dtype(self.dtype)?,
            )?));
        }
        let shape = w.weight.dims().to_vec();
        let nf4 = {
            let data = w
                .weight
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            Nf4Tensor::quantize_f32(&data, &shape)
        };
        drop(w.weight);
        self.wrap(w.name, w.role, w.layer, nf4)
    }

    /// Pre-quantized weights go in as they are: no dequantize / re-quantize round trip.
    fn build_quantized(&mut self, w: QuantizedWeight) -> Result<Box<dyn Linear>> {
        self.wrap(w.name, w.role, w.layer, w.weight)
    }

    fn dtype(&self) -> DType {
        self.dtype
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values with a spread of magnitudes per block.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix64(seed);
        (0..n)
            .map(|i| (2.0 * rng.next_f32() - 1.0) * (1.0 + (i % 7) as f32))
            .collect()
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
    }

    #[test]
    fn tiles_align_to_blocks_and_dequantize_like_the_whole_tensor() {
        // in = 40: gcd(40, 64) = 8, so tiles are multiples of 8 rows (8 * 40 = 320 = 5 blocks);
        // 37 rows leave a partial last block (1480 = 23 * 64 + 8).
        let (out, inp) = (37, 40);
        let nf4 = Nf4Tensor::quantize_f32(&values(out * inp, 1), &[out, inp]);
        let full = nf4.dequantize();
        let w = Nf4Weight::new(nf4).unwrap();
        for budget in [1, 100, 321, 10_000] {
            let rows = w.tile_rows(budget);
            assert_eq!(rows % 8, 0, "budget {budget}: {rows} rows");
            let mut r0 = 0;
            while r0 < out {
                let r1 = (r0 + rows).min(out);
                let mut tile = vec![0f32; (r1 - r0) * inp];
                w.dequantize_rows(r0, r1, &mut tile);
                assert_eq!(tile, full[r0 * inp..r1 * inp], "rows {r0}..{r1}");
                r0 = r1;
            }
        }
    }

    #[test]
    fn tiled_products_match_dense_products() {
        // m = 5 takes the fused kernel forward, m past FUSED_MAX_ROWS the tiles; in = 40 and
        // in = 128 (rows made of whole NF4 blocks) take both of the fused kernel's paths.
        for (out, inp, m) in [(37, 40, 5), (37, 40, FUSED_MAX_ROWS + 3), (21, 128, 3)] {
            tiled_products_match_dense_products_at(out, inp, m);
        }
    }

    fn tiled_products_match_dense_products_at(out: usize, inp: usize, m: usize) {
        let nf4 = Nf4Tensor::quantize_f32(&values(out * inp, 2), &[out, inp]);
        let dense = nf4.dequantize();
        let w = Nf4Weight::new(nf4).unwrap();
        let x = values(m * inp, 3);
        let dy = values(m * out, 4);
        let mut want_y = vec![0f32; m * out];
        let mut want_dx = vec![0f32; m * inp];
        for i in 0..m {
            for o in 0..out {
                let mut acc = 0f64;
                for k in 0..inp {
                    acc += x[i * inp + k] as f64 * dense[o * inp + k] as f64;
                    want_dx[i * inp + k] += dy[i * out + o] * dense[o * inp + k];
                }
                want_y[i * out + o] = acc as f32;
            }
        }
        // One tile, several tiles, and one row-group per tile.
        for rows in [w.tile_rows(usize::MAX / 2), w.tile_rows(300), 8] {
            let y = w.matmul_t(&x, m, rows);
            let dx = w.matmul(&dy, m, rows);
            assert!(max_abs_diff(&y, &want_y) < 1e-4, "y, {rows} rows per tile");
            assert!(
                max_abs_diff(&dx, &want_dx) < 1e-4,
                "dx, {rows} rows per tile"
            );
        }
    }

    #[test]
    fn kaiming_uniform_bound_and_zero_b() -> Result<()> {
        let cfg = LoraConfig {
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            rslora: false,
        };
        let l = LoraAdapter::init(&cfg, 100, 6, 7, &Device::Cpu)?;
        let a = l.a.flatten_all()?.to_vec1::<f32>()?;
        let bound = 0.1f32;
        assert!(a.iter().all(|v| v.abs() <= bound));
        // 400 uniform draws: the extremes come close to the bound and both signs appear.
        let max = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(max > 0.9 * bound, "max |A| {max}");
        assert!(a.iter().any(|&v| v < 0.0) && a.iter().any(|&v| v > 0.0));
        assert!(l
            .b
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .all(|&v| v == 0.0));
        assert_eq!(l.scale, 2.0);
        let rs = LoraConfig {
            rslora: true,
            ..cfg
        };
        assert_eq!(rs.scale(), 4.0);
        // Same seed, same A; another seed, another A.
        let again = LoraAdapter::init(&cfg, 100, 6, 7, &Device::Cpu)?;
        assert_eq!(again.a.flatten_all()?.to_vec1::<f32>()?, a);
        let other = LoraAdapter::init(&cfg, 100, 6, 8, &Device::Cpu)?;
        assert_ne!(other.a.flatten_all()?.to_vec1::<f32>()?, a);
        Ok(())
    }

    #[test]
    fn any_draw_of_the_stream_can_be_computed_on_its_own() {
        // What lets the GPU draw dropout masks element by element: draw k of a stream is a
        // function of its starting state and k, and skipping n draws lands where n calls do.
        let mut seq = SplitMix64(0xDEAD_BEEF);
        let start = seq.0;
        let drawn: Vec<u64> = (0..1000).map(|_| seq.next_u64()).collect();
        for (k, &z) in drawn.iter().enumerate() {
            assert_eq!(SplitMix64::draw_at(start, k as u64 + 1), z, "draw {k}");
        }
        let mut skipped = SplitMix64(0xDEAD_BEEF);
        assert_eq!(skipped.skip(1000), start);
        assert_eq!(skipped.0, seq.0);
        assert_eq!(skipped.next_u64(), seq.next_u64());
    }

    #[test]
    fn the_dropout_op_masks_as_the_sequential_stream_did() -> Result<()> {
        // The mask the op applies is the one the stream gives drawn in order, element by
        // element: draws below p drop, the rest scale by 1 / (1 - p); the backward applies
        // the same mask to the gradient.
        let cfg = LoraConfig {
            rank: 2,
            alpha: 2.0,
            dropout: 0.25,
            rslora: false,
        };
        let l = LoraAdapter::init(&cfg, 30, 3, 5, &Device::Cpu)?;
        let x = Var::new(values(7 * 30, 9).as_slice(), &Device::Cpu)?;
        let mut want_rng = l.stream.lock().unwrap().rng().clone();
        let y = l.dropout(&x.as_tensor().reshape((7, 30))?)?;
        let keep = 1.0 / (1.0 - 0.25f32);
        let mask: Vec<f32> = (0..7 * 30)
            .map(|_| {
                if want_rng.next_f32() < 0.25 {
                    0.0
                } else {
                    keep
                }
            })
            .collect();
        let got: Vec<f32> = y.flatten_all()?.to_vec1()?;
        let xs: Vec<f32> = x.as_tensor().to_vec1()?;
        for i in 0..xs.len() {
            assert_eq!(got[i].to_bits(), (xs[i] * mask[i]).to_bits(), "element {i}");
        }
        let g = y.sum_all()?.backward()?;
        let dx: Vec<f32> = g.get(x.as_tensor()).unwrap().to_vec1()?;
        assert_eq!(dx, mask);
        Ok(())
    }

    #[test]
    fn the_dropout_op_casts_bf16_activations_to_the_adapters_f32() -> Result<()> {
        // The cast and the mask are one pass: bf16 in, f32 out (the bf16 value times the f32
        // factor); the gradient goes back in bf16.
        let cfg = LoraConfig {
            rank: 2,
            alpha: 2.0,
            dropout: 0.25,
            rslora: false,
        };
        let l = LoraAdapter::init(&cfg, 30, 3, 5, &Device::Cpu)?;
        let x32 = Tensor::from_vec(values(7 * 30, 9), (7, 30), &Device::Cpu)?;
        let x = Var::from_tensor(&x32.to_dtype(DType::BF16)?)?;
        let mut rng = l.stream.lock().unwrap().rng().clone();
        let y = l.dropout(x.as_tensor())?;
        assert_eq!(y.dtype(), DType::F32);
        let xs: Vec<f32> = x
            .as_tensor()
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let got: Vec<f32> = y.flatten_all()?.to_vec1()?;
        let keep = 1.0 / (1.0 - 0.25f32);
        let mask: Vec<f32> = (0..xs.len())
            .map(|_| if rng.next_f32() < 0.25 { 0.0 } else { keep })
            .collect();
        for i in 0..xs.len() {
            assert_eq!(got[i].to_bits(), (xs[i] * mask[i]).to_bits(), "element {i}");
        }
        let g = y.sum_all()?.backward()?;
        let dx = g.get(x.as_tensor()).unwrap();
        assert_eq!(dx.dtype(), DType::BF16);
        let dx: Vec<f32> = dx.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let want: Vec<f32> = mask
            .iter()
            .map(|&m| half::bf16::from_f32(m).to_f32())
            .collect();
        assert_eq!(dx, want);
        Ok(())
    }

    #[test]
    fn dropout_is_inverted_and_seeded() -> Result<()> {
        let cfg = LoraConfig {
            rank: 2,
            alpha: 2.0,
            dropout: 0.25,
            rslora: false,
        };
        let x = Tensor::ones((50, 40), DType::F32, &Device::Cpu)?;
        let draw = |seed| -> Result<Vec<f32>> {
            let l = LoraAdapter::init(&cfg, 40, 3, seed, &Device::Cpu)?;
            l.dropout(&x)?.flatten_all()?.to_vec1::<f32>()
        };
        let d = draw(11)?;
        let keep = 1.0 / 0.75;
        assert!(d.iter().all(|&v| v == 0.0 || v == keep));
        let dropped = d.iter().filter(|&&v| v == 0.0).count() as f64 / d.len() as f64;
        assert!((dropped - 0.25).abs() < 0.04, "dropped fraction {dropped}");
        assert_eq!(draw(11)?, d);
        assert_ne!(draw(12)?, d);
        Ok(())
    }

    fn tensor_max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn max_abs(a: &Tensor) -> f32 {
        a.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn t(data: Vec<f32>, shape: &[usize]) -> Tensor {
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    /// A layer `[out 37, in 40]` with rank-3 adapter whose B is non-zero (a trained state),
    /// tiled in 8-row tiles so the kernels cross several tile and block boundaries.
    fn trained_layer() -> (QLoraLinear, Tensor) {
        let (out, inp, r) = (37, 40, 3);
        let nf4 = Nf4Tensor::quantize_f32(&values(out * inp, 5), &[out, inp]);
        let dense = t(nf4.dequantize(), &[out, inp]);
        let a = Var::from_tensor(&(t(values(r * inp, 6), &[r, inp]) * 0.1).unwrap()).unwrap();
        let b = Var::from_tensor(&(t(values(out * r, 7), &[out, r]) * 0.1).unwrap()).unwrap();
        let lora = LoraAdapter::from_vars(a, b, 0.5, 0.0, 0).unwrap();
        let mut lin = QLoraLinear::with_adapter(nf4, Some(lora), &Device::Cpu).unwrap();
        lin.set_tile_elems(1);
        assert_eq!(lin.tile_rows(), 8);
        // Train mode (dropout 0: the same map), where the adapter's product is differentiable.
        lin.set_training(true);
        (lin, dense)
    }

    #[test]
    fn forward_and_input_gradient_match_the_dense_dequantized_layer() -> Result<()> {
        let (lin, dense) = trained_layer();
        let l = lin.adapter().unwrap();
        let x = Var::from_tensor(&t(values(2 * 3 * 40, 8), &[2, 3, 40]))?;
        let upstream = t(values(2 * 3 * 37, 9), &[2, 3, 37]);

        let y = lin.forward(x.as_tensor())?;
        assert_eq!(y.dims(), &[2, 3, 37]);
        let grads = (&y * &upstream)?.sum_all()?.backward()?;

        // The same map with candle's dense ops on the dequantized weight.
        let x2 = x.as_tensor().reshape((6, 40))?;
        let want_y = (x2.matmul(&dense.t()?)?
            + (x2.matmul(&l.a.t()?)?.matmul(&l.b.t()?)? * l.scale)?)?
            .reshape((2, 3, 37))?;
        let want_grads = (&want_y * &upstream)?.sum_all()?.backward()?;
        // Only the f32 summation order differs (tiles, gemm blocking): relative 1e-6.
        let rel = |a: &Tensor, b: &Tensor| tensor_max_diff(a, b) / max_abs(b);
        let dy = rel(&y, &want_y);
        assert!(dy < 1e-6, "forward differs by {dy} (relative)");
        for (what, v) in [
            ("x", x.as_tensor()),
            ("A", l.a.as_tensor()),
            ("B", l.b.as_tensor()),
        ] {
            let d = rel(grads.get(v).unwrap(), want_grads.get(v).unwrap());
            assert!(d < 1e-6, "d{what} differs by {d} (relative)");
        }
        // input_grad (used by the chunked loss) is the same dx outside the graph.
        let ig = lin.input_grad(&upstream)?;
        let d = rel(&ig, want_grads.get(x.as_tensor()).unwrap());
        assert!(d < 1e-6, "input_grad differs by {d} (relative)");
        Ok(())
    }

    #[test]
    fn only_the_adapter_is_trainable_and_no_weight_gradient_is_built() -> Result<()> {
        let (lin, _) = trained_layer();
        let vars = lin.trainable_vars();
        assert_eq!(vars.len(), 2);
        assert_eq!(vars[0].dims(), &[3, 40]);
        assert_eq!(vars[1].dims(), &[37, 3]);
        let x = Var::from_tensor(&t(values(4 * 40, 10), &[4, 40]))?;
        let grads = lin.forward(x.as_tensor())?.sqr()?.sum_all()?.backward()?;
        let shapes: Vec<Vec<usize>> = grads
            .get_ids()
            .map(|id| grads.get_id(*id).unwrap().dims().to_vec())
            .collect();
        for shape in &shapes {
            assert!(
                shape != &[37, 40] && shape != &[40, 37],
                "a frozen-weight-shaped gradient {shape:?} was built"
            );
        }
        // The gradients that must exist do.
        for v in vars.iter().chain([&x]) {
            assert!(grads.get(v.as_tensor()).is_some());
        }
        assert!(QLoraLinear::frozen(
            Nf4Tensor::quantize_f32(&values(64, 1), &[8, 8]),
            &Device::Cpu
        )?
        .trainable_vars()
        .is_empty());
        Ok(())
    }

    /// A `[16, 32]` layer with a rank-2 adapter whose B is all ones (so the adapter path
    /// shows in the output), and a `[4, 32]` input.
    fn small_layer(dropout: f32) -> Result<(QLoraLinear, Tensor)> {
        let cfg = LoraConfig {
            rank: 2,
            alpha: 4.0,
            dropout,
            rslora: false,
        };
        let nf4 = Nf4Tensor::quantize_f32(&values(16 * 32, 12), &[16, 32]);
        let lin = QLoraLinear::new(nf4, &cfg, 3, &Device::Cpu)?;
        let l = lin.adapter().unwrap();
        l.b.set(&Tensor::ones((16, 2), DType::F32, &Device::Cpu)?)?;
        Ok((lin, t(values(4 * 32, 13), &[4, 32])))
    }

    #[test]
    fn only_train_mode_builds_an_autograd_graph() -> Result<()> {
        let (lin, x) = small_layer(0.0)?;
        // A generation step's output must not hold on to its inputs (see LoraAdapter::forward).
        let eval = lin.forward(&x)?;
        assert!(!eval.track_op());
        lin.set_training(true);
        let train = lin.forward(&x)?;
        assert!(train.track_op());
        assert_eq!(tensor_max_diff(&train, &eval), 0.0);
        Ok(())
    }

    #[test]
    fn dropout_acts_in_train_mode_only() -> Result<()> {
        let (lin, x) = small_layer(0.5)?;
        let eval1 = lin.forward(&x)?;
        let eval2 = lin.forward(&x)?;
        assert_eq!(tensor_max_diff(&eval1, &eval2), 0.0);
        lin.set_training(true);
        let train1 = lin.forward(&x)?;
        let train2 = lin.forward(&x)?;
        assert!(tensor_max_diff(&train1, &eval1) > 1e-3);
        // Each call draws a fresh mask.
        assert!(tensor_max_diff(&train1, &train2) > 1e-3);
        lin.set_training(false);
        assert_eq!(tensor_max_diff(&lin.forward(&x)?, &eval1), 0.0);
        Ok(())
    }

    #[test]
    fn builder_quantizes_targets_with_adapters_and_freezes_the_rest() -> Result<()> {
        let dev = Device::Cpu;
        let mut builder = QLoraBuilder::new(&dev);
        builder.rank = 4;
        builder.alpha = 8.0;
        builder.targets = vec![LinearRole::QProj];
        builder.seed = 42;
        let w = t(values(24 * 64, 14), &[24, 64]);
        let mk = |name: &str, role| LinearWeight {
            name: name.into(),
            role,
            layer: if role == LinearRole::LmHead {
                None
            } else {
                Some(0)
            },
            weight: w.clone(),
        };
        let q = builder.build(mk(
            "model.layers.0.self_attn.q_proj.weight",
            LinearRole::QProj,
        ))?;
        let k = builder.build(mk(
            "model.layers.0.self_attn.k_proj.weight",
            LinearRole::KProj,
        ))?;
        let head = builder.build(mk("model.embed_tokens.weight", LinearRole::LmHead))?;
        assert_eq!(q.trainable_vars().len(), 2);
        assert!(k.trainable_vars().is_empty() && head.trainable_vars().is_empty());
        assert_eq!(builder.adapters().len(), 1);
        assert_eq!(
            builder.adapters()[0].name,
            "model.layers.0.self_attn.q_proj.weight"
        );
        assert_eq!(builder.adapters()[0].a.dims(), &[4, 64]);
        // B = 0: the adapted layer equals the frozen one; both are the NF4 approximation.
        let x = t(values(3 * 64, 15), &[3, 64]);
        let (yq, yk) = (q.forward(&x)?, k.forward(&x)?);
        assert_eq!(tensor_max_diff(&yq, &yk), 0.0);
        let exact = x.matmul(&w.t()?)?;
        let norm = |t: &Tensor| t.sqr().unwrap().sum_all().unwrap().sqrt().unwrap();
        let err = (norm(&(&yq - &exact)?) / norm(&exact))?.to_scalar::<f32>()?;
        // 4-bit weights: a few percent of relative error, never zero.
        assert!(err > 0.0 && err < 0.15, "NF4 relative error {err}");
        // The lm_head is the f32 weight itself.
        assert_eq!(tensor_max_diff(&head.forward(&x)?, &exact), 0.0);
        // Same seed and name, same adapter.
        let mut again = builder.clone();
        again.build(mk(
            "model.layers.0.self_attn.q_proj.weight",
            LinearRole::QProj,
        ))?;
        let (a1, a2) = (&builder.adapters()[0].a, &again.adapters()[1].a);
        assert_eq!(tensor_max_diff(a1, a2), 0.0);
        Ok(())
    }
}
