//! CUDA launchers (feature `cuda`) for the kernels in `kernels/*.cu`, which build.rs compiles to
//! PTX with nvcc and embeds ([`MODULES`]): NF4 dequantization (f32 / bf16 / f16, bit-exact with
//! the CPU codec) and the fused NF4 x bf16 GEMV used in decoding, here; the other modules are
//! launched by the crates that own their CPU twins, through [`load_module`].
//!
//! Kernels run on a stream the caller passes in ([`Nf4Cuda::on_stream`]): the model hands over
//! candle's stream, so our kernels read and write candle's buffers in order, without copies or
//! extra synchronisation. cudarc loads libcuda the first time it is used; nothing here links a
//! CUDA library.

use crate::blockwise8;
use crate::nf4::{Nf4Tensor, SourceDtype, BLOCKSIZE, NESTED_BLOCKSIZE};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, CudaViewMut,
    DeviceRepr, DriverError, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;
use half::{bf16, f16};
use std::sync::Arc;

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// Source of `kernels/nf4.cu` (its constants are checked against this crate's).
pub const NF4_SOURCE: &str = include_str!("../../../kernels/nf4.cu");

/// The `extern "C"` entry points of `kernels/nf4.cu`.
pub const NF4_ENTRY_POINTS: [&str; 8] = [
    "kDequantizeNF4_f32",
    "kDequantizeNF4_bf16",
    "kDequantizeNF4_f16",
    "kGemvNF4_bf16_t1",
    "kGemvNF4_bf16_t2",
    "kGemvNF4_bf16_t4",
    "kGemvNF4_bf16_t8",
    "kGemvNF4_bf16",
];

/// Threads per block of the dequantization kernels (`DQ_THREADS` in the source).
pub const DEQUANT_THREADS: u32 = 256;
/// 16-byte output chunks a dequantization thread loads before it expands the first
/// (`DQ_UNROLL`).
pub const DEQUANT_UNROLL: u32 = 8;
/// Threads per block of every GEMV kernel (`GEMV_THREADS`).
pub const GEMV_THREADS: u32 = 256;
/// Rows of W in one GEMV work unit (`GEMV_ROWS`): each x value a lane loads serves this many.
pub const GEMV_ROWS: usize = 4;
/// Batch tiles of the GEMV kernels (`kGemvNF4_bf16_t{1,2,4,8}`); the largest is
/// `GEMV_MAX_TILE`, also the batch tile of `kGemvNF4_bf16`.
pub const GEMV_TILES: [usize; 4] = [1, 2, 4, 8];
/// Lanes that work on one GEMV unit: 2^3 ..= 2^8 (a quarter warp up to the whole block).
pub const GEMV_GROUP_LOG2: std::ops::RangeInclusive<u32> = 3..=8;
/// Resident lanes per multiprocessor a GEMV launch aims to keep busy: enough 16-byte loads in
/// flight to cover DRAM latency at full bandwidth (about 32 KB per SM on an H100/H200).
const GEMV_TARGET_LANES_PER_SM: usize = 384;

/// Errors of device discovery, module loading and kernel launches.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error(
        "no NVIDIA driver: libcuda.so.1 is not on the loader path (install the driver, or add \
         the folder holding libcuda.so.1 to LD_LIBRARY_PATH)"
    )]
    NoDriver,
    #[error("the NVIDIA driver sees no CUDA device (check nvidia-smi and CUDA_VISIBLE_DEVICES)")]
    NoDevice,
    #[error("CUDA driver error while {what}: {source}")]
    Driver {
        what: &'static str,
        source: DriverError,
    },
    #[error("no kernel module {0:?} in this build (kernels/*.cu)")]
    NoModule(String),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = CudaError> = std::result::Result<T, E>;

/// Maps a driver error to [`CudaError::Driver`] naming what was being done.
pub fn driver(what: &'static str) -> impl FnOnce(DriverError) -> CudaError {
    move |source| CudaError::Driver { what, source }
}

/// The PTX of module `name` (a `kernels/*.cu` file stem).
pub fn module_ptx(name: &str) -> Result<&'static str> {
    MODULES
        .iter()
        .find(|(m, _)| *m == name)
        .map(|(_, ptx)| *ptx)
        .ok_or_else(|| CudaError::NoModule(name.to_string()))
}

/// Loads module `name` into the context of `stream` (the driver JIT-compiles the PTX for the
/// GPU at hand).
pub fn load_module(stream: &Arc<CudaStream>, name: &str) -> Result<Arc<CudaModule>> {
    let ptx = module_ptx(name)?;
    stream
        .context()
        .load_module(Ptx::from_src(ptx))
        .map_err(driver("loading a kernel module"))
}

/// Names of the `.entry` functions declared in PTX text.
pub fn ptx_entry_points(ptx: &str) -> Vec<String> {
    ptx.lines()
        .filter_map(|line| {
            let rest = &line[line.find(".entry ")? + ".entry ".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            (!name.is_empty()).then_some(name)
        })
        .collect()
}

/// Number of CUDA devices; `Err(NoDriver)` when libcuda is not installed.
pub fn cuda_device_count() -> Result<usize> {
    // SAFETY: only dlopens/dlcloses candidate names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(CudaError::NoDriver);
    }
    let n = CudaContext::device_count().map_err(driver("counting devices"))?;
    Ok(n.max(0) as usize)
}

/// Checks that device `ordinal` exists, with one-line errors for a missing driver or device.
pub fn check_device(ordinal: usize) -> Result<()> {
    match cuda_device_count()? {
        0 => Err(CudaError::NoDevice),
        n if ordinal >= n => Err(CudaError::Invalid(format!(
            "CUDA device {ordinal} requested, {n} present"
        ))),
        _ => Ok(()),
    }
}

/// Output element types of the dequantization kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutDtype {
    F32,
    Bf16,
    F16,
}

impl OutDtype {
    pub fn size(self) -> usize {
        match self {
            OutDtype::F32 => 4,
            OutDtype::Bf16 | OutDtype::F16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            OutDtype::F32 => "f32",
            OutDtype::Bf16 => "bf16",
            OutDtype::F16 => "f16",
        }
    }
}

impl From<SourceDtype> for OutDtype {
    fn from(d: SourceDtype) -> Self {
        match d {
            SourceDtype::F32 => OutDtype::F32,
            SourceDtype::Bf16 => OutDtype::Bf16,
            SourceDtype::F16 => OutDtype::F16,
        }
    }
}

/// Elements of one 16-byte output chunk of the dequantization kernels (`DqChunk::kElems`).
pub fn dequant_chunk_elems(d: OutDtype) -> usize {
    16 / d.size()
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
}

/// Element types a dequantization kernel writes.
pub trait Nf4Output: DeviceRepr + ValidAsZeroBits + Copy + sealed::Sealed {
    const DTYPE: OutDtype;
}
impl Nf4Output for f32 {
    const DTYPE: OutDtype = OutDtype::F32;
}
impl Nf4Output for bf16 {
    const DTYPE: OutDtype = OutDtype::Bf16;
}
impl Nf4Output for f16 {
    const DTYPE: OutDtype = OutDtype::F16;
}

/// An NF4 tensor resident on the GPU (the same arrays as [`Nf4Tensor`]).
pub struct Nf4Device {
    pub packed: CudaSlice<u8>,
    pub absmax_codes: CudaSlice<u8>,
    pub nested_absmax: CudaSlice<f32>,
    pub offset: f32,
    pub shape: Vec<usize>,
    pub dtype: SourceDtype,
    numel: usize,
}

impl Nf4Device {
    pub fn numel(&self) -> usize {
        self.numel
    }

    /// Device bytes the kernels read to expand the whole tensor.
    pub fn storage_bytes(&self) -> usize {
        self.packed.len() + self.absmax_codes.len() + 4 * self.nested_absmax.len()
    }
}

/// Which GEMV kernel a launch uses, and how it splits the work (see kernels/README.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemvKernel {
    /// `kGemvNF4_bf16_t{tile}`, for rows of a multiple of 32 elements: units of
    /// [`GEMV_ROWS`] rows, each owned by a group of `2^group_log2` lanes.
    Tiled { tile: usize, group_log2: u32 },
    /// `kGemvNF4_bf16`, any shape: one warp per row.
    Rows,
}

/// A GEMV launch: the kernel and its grid (blocks of [`GEMV_THREADS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemvPlan {
    pub kernel: GemvKernel,
    pub grid: u32,
}

impl GemvPlan {
    /// The launch for `y[batch, out] = x . W^T` with W `[out, in]` on a device with `sms`
    /// multiprocessors that each hold `blocks_per_sm` GEMV blocks at once.
    ///
    /// Rows of a multiple of 32 elements take the tiled kernel with the smallest batch tile
    /// that holds `batch` (8 beyond). Its lane-group size G is the one that best balances two
    /// losses: lanes idle in a row's last step (`in / 32` items over G lanes) and too few resident
    /// lanes to keep DRAM busy (units x G against `GEMV_TARGET_LANES_PER_SM` per SM); ties go to
    /// the smaller G, which reduces through fewer shuffles and no shared memory. The grid is the
    /// device's resident capacity (or one block per unit when there are fewer units), so each
    /// SM gets an equal share of the units in one wave.
    pub fn new(
        out_features: usize,
        in_features: usize,
        batch: usize,
        sms: u32,
        blocks_per_sm: u32,
    ) -> GemvPlan {
        let capacity = (sms.max(1) as usize) * (blocks_per_sm.max(1) as usize);
        if !Self::tiled_fits(out_features, in_features) {
            return GemvPlan {
                kernel: GemvKernel::Rows,
                grid: out_features.div_ceil(GEMV_THREADS as usize / 32).max(1) as u32,
            };
        }
        let tile = GEMV_TILES
            .into_iter()
            .find(|&t| t >= batch)
            .unwrap_or(GEMV_TILES[GEMV_TILES.len() - 1]);
        let items = in_features / 32;
        let units = out_features.div_ceil(GEMV_ROWS);
        let target = (sms.max(1) as usize * GEMV_TARGET_LANES_PER_SM) as f64;
        let mut best = (f64::NEG_INFINITY, *GEMV_GROUP_LOG2.start());
        for log2 in GEMV_GROUP_LOG2 {
            let g = 1usize << log2;
            let steps = items.div_ceil(g);
            let busy = items as f64 / (steps * g) as f64;
            let fill = ((units * g) as f64 / target).min(1.0);
            let score = busy * fill;
            if score > best.0 + 1e-9 {
                best = (score, log2);
            }
        }
        GemvPlan {
            kernel: GemvKernel::Tiled {
                tile,
                group_log2: best.1,
            },
            grid: units.min(capacity).max(1) as u32,
        }
    }

    /// Whether the tiled kernels take this shape: rows of whole 16-byte items, and element
    /// offsets inside a unit (4 rows) that fit their 32-bit arithmetic.
    pub fn tiled_fits(out_features: usize, in_features: usize) -> bool {
        in_features.is_multiple_of(32)
            && in_features > 0
            && (in_features as u64) * (GEMV_ROWS as u64) < 1 << 32
            && ((out_features as u64) * (in_features as u64)).div_ceil(BLOCKSIZE as u64) < 1 << 32
    }
}

/// The NF4 kernels loaded on one device, with the nested (double-quant) map resident; every
/// launch goes to one stream.
pub struct Nf4Cuda {
    stream: Arc<CudaStream>,
    dequant: [CudaFunction; 3],
    /// Thread blocks of each dequantization kernel the device holds at once.
    dequant_capacity: [u32; 3],
    gemv_tiled: [CudaFunction; 4],
    /// Blocks per multiprocessor of each tiled GEMV kernel.
    gemv_blocks_per_sm: [u32; 4],
    gemv_rows: CudaFunction,
    sms: u32,
    nested_map: CudaSlice<f32>,
}

fn dtype_index(d: OutDtype) -> usize {
    match d {
        OutDtype::F32 => 0,
        OutDtype::Bf16 => 1,
        OutDtype::F16 => 2,
    }
}

fn tile_index(tile: usize) -> Option<usize> {
    GEMV_TILES.iter().position(|&t| t == tile)
}

impl Nf4Cuda {
    /// Opens device `ordinal` in a context of its own and loads the kernels there.
    pub fn new(ordinal: usize) -> Result<Self> {
        check_device(ordinal)?;
        let ctx = CudaContext::new(ordinal).map_err(driver("creating a context"))?;
        Self::on_stream(ctx.default_stream())
    }

    /// Loads the kernels into the context of `stream`, on which every launch will run (pass
    /// candle's stream to work on candle's buffers), and reads the device's multiprocessor count
    /// and each kernel's occupancy once, for the launch geometry.
    pub fn on_stream(stream: Arc<CudaStream>) -> Result<Self> {
        use cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT;
        let module = load_module(&stream, "nf4")?;
        let load = |name: &str| {
            module
                .load_function(name)
                .map_err(driver("looking up a kernel"))
        };
        let sms = stream
            .context()
            .attribute(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(driver("reading the multiprocessor count"))?
            .max(1) as u32;
        let occupancy = |f: &CudaFunction, threads: u32| {
            f.occupancy_max_active_blocks_per_multiprocessor(threads, 0, None)
                .map(|b| b.max(1))
                .map_err(driver("reading a kernel's occupancy"))
        };
        let dequant = [
            load("kDequantizeNF4_f32")?,
            load("kDequantizeNF4_bf16")?,
            load("kDequantizeNF4_f16")?,
        ];
        let mut dequant_capacity = [0u32; 3];
        for (cap, f) in dequant_capacity.iter_mut().zip(&dequant) {
            *cap = sms * occupancy(f, DEQUANT_THREADS)?;
        }
        let gemv_tiled = [
            load("kGemvNF4_bf16_t1")?,
            load("kGemvNF4_bf16_t2")?,
            load("kGemvNF4_bf16_t4")?,
            load("kGemvNF4_bf16_t8")?,
        ];
        let mut gemv_blocks_per_sm = [0u32; 4];
        for (bps, f) in gemv_blocks_per_sm.iter_mut().zip(&gemv_tiled) {
            *bps = occupancy(f, GEMV_THREADS)?;
        }
        let nested_map = stream
            .clone_htod(&blockwise8::dynamic_map(true))
            .map_err(driver("uploading the nested map"))?;
        Ok(Nf4Cuda {
            dequant,
            dequant_capacity,
            gemv_tiled,
            gemv_blocks_per_sm,
            gemv_rows: load("kGemvNF4_bf16")?,
            sms,
            stream,
            nested_map,
        })
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        self.stream.context()
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Multiprocessors of the device.
    pub fn multiprocessors(&self) -> u32 {
        self.sms
    }

    /// Copy an NF4 tensor to the device.
    pub fn upload(&self, t: &Nf4Tensor) -> Result<Nf4Device> {
        let n = t.numel();
        if n == 0 {
            return Err(CudaError::Invalid(
                "cannot upload an empty NF4 tensor".into(),
            ));
        }
        let blocks = n.div_ceil(BLOCKSIZE);
        let expect = [
            ("packed bytes", t.packed.len(), n.div_ceil(2)),
            ("absmax codes", t.absmax.codes.len(), blocks),
            (
                "nested absmax",
                t.absmax.nested_absmax.len(),
                blocks.div_ceil(NESTED_BLOCKSIZE),
            ),
        ];
        for (what, got, want) in expect {
            if got != want {
                return Err(CudaError::Invalid(format!(
                    "NF4 tensor {:?}: {got} {what}, expected {want}",
                    t.shape
                )));
            }
        }
        let up = "uploading an NF4 tensor";
        // Each array is an allocation of its own, so `packed` is 256-byte aligned: the kernels
        // rely on that for their 16-byte loads.
        Ok(Nf4Device {
            packed: self.stream.clone_htod(&t.packed).map_err(driver(up))?,
            absmax_codes: self
                .stream
                .clone_htod(&t.absmax.codes)
                .map_err(driver(up))?,
            nested_absmax: self
                .stream
                .clone_htod(&t.absmax.nested_absmax)
                .map_err(driver(up))?,
            offset: t.absmax.offset,
            shape: t.shape.clone(),
            dtype: t.dtype,
            numel: n,
        })
    }

    /// Launch geometry of the dequantization kernels for `n` elements of `dtype`: enough
    /// blocks for every thread to load [`DEQUANT_UNROLL`] 16-byte chunks, at most `max_blocks`
    /// (the device's resident capacity; the kernels loop over the rest).
    pub fn dequant_launch_config(n: usize, dtype: OutDtype, max_blocks: u32) -> LaunchConfig {
        let chunks = n / dequant_chunk_elems(dtype);
        let per_block = (DEQUANT_THREADS * DEQUANT_UNROLL) as usize;
        let blocks = chunks
            .div_ceil(per_block)
            .clamp(1, max_blocks.max(1) as usize);
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (DEQUANT_THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Dequantize into `out` (exactly `numel` elements; any alignment, 16-byte aligned is fastest).
    pub fn dequantize_into<T: Nf4Output>(
        &self,
        w: &Nf4Device,
        out: &mut CudaViewMut<'_, T>,
    ) -> Result<()> {
        let cap = self.dequant_capacity[dtype_index(T::DTYPE)];
        let cfg = Self::dequant_launch_config(w.numel, T::DTYPE, cap);
        self.dequantize_into_grid(w, out, cfg.grid_dim.0)
    }

    /// [`Self::dequantize_into`] with a grid of `blocks` thread blocks, whatever the size: with
    /// few blocks every thread loops many times (tests exercise that path this way).
    pub fn dequantize_into_grid<T: Nf4Output>(
        &self,
        w: &Nf4Device,
        out: &mut CudaViewMut<'_, T>,
        blocks: u32,
    ) -> Result<()> {
        if out.len() != w.numel {
            return Err(CudaError::Invalid(format!(
                "output holds {} elements, tensor has {}",
                out.len(),
                w.numel
            )));
        }
        if blocks == 0 {
            return Err(CudaError::Invalid(
                "a launch needs at least one block".into(),
            ));
        }
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (DEQUANT_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let n = w.numel as u64;
        let mut launch = self
            .stream
            .launch_builder(&self.dequant[dtype_index(T::DTYPE)]);
        launch
            .arg(&w.packed)
            .arg(&w.absmax_codes)
            .arg(&w.nested_absmax)
            .arg(&self.nested_map)
            .arg(&w.offset)
            .arg(out)
            .arg(&n);
        // SAFETY: the argument list matches kDequantizeNF4_* (u8*, u8*, f32*, f32*, f32, T*, u64);
        // the arrays were length-checked in `upload` and above, and the grid-stride loop keeps
        // every access below n for any grid.
        unsafe { launch.launch(cfg) }.map_err(driver("launching kDequantizeNF4"))?;
        Ok(())
    }

    fn dequantize<T: Nf4Output>(&self, w: &Nf4Device) -> Result<CudaSlice<T>> {
        // SAFETY: the kernel writes every element before anything reads the slice.
        let mut out =
            unsafe { self.stream.alloc::<T>(w.numel) }.map_err(driver("allocating the output"))?;
        self.dequantize_into(w, &mut out.as_view_mut())?;
        Ok(out)
    }

    /// NF4 -> f32, bit-identical to [`Nf4Tensor::dequantize`].
    pub fn dequantize_f32(&self, w: &Nf4Device) -> Result<CudaSlice<f32>> {
        self.dequantize(w)
    }

    /// NF4 -> bf16 (round to nearest even), bit-identical to [`Nf4Tensor::dequantize_bf16`].
    pub fn dequantize_bf16(&self, w: &Nf4Device) -> Result<CudaSlice<bf16>> {
        self.dequantize(w)
    }

    /// NF4 -> f16 (round to nearest even), bit-identical to [`Nf4Tensor::dequantize_f16`].
    pub fn dequantize_f16(&self, w: &Nf4Device) -> Result<CudaSlice<f16>> {
        self.dequantize(w)
    }

    /// `[out, in]` of a 2-D weight.
    fn gemv_dims(w: &Nf4Device) -> Result<(usize, usize)> {
        match w.shape[..] {
            [o, i] if o > 0 && i > 0 && o <= i32::MAX as usize && i <= i32::MAX as usize => {
                Ok((o, i))
            }
            _ => Err(CudaError::Invalid(format!(
                "GEMV needs a 2-D [out, in] weight within i32, got {:?}",
                w.shape
            ))),
        }
    }

    /// The launch [`Self::gemv_bf16_into`] uses for W `[out, in]` at `batch` on this device.
    pub fn gemv_plan(&self, out_features: usize, in_features: usize, batch: usize) -> GemvPlan {
        let tile = GEMV_TILES
            .into_iter()
            .find(|&t| t >= batch)
            .unwrap_or(GEMV_TILES[GEMV_TILES.len() - 1]);
        let bps = self.gemv_blocks_per_sm[tile_index(tile).unwrap_or(0)];
        GemvPlan::new(out_features, in_features, batch, self.sms, bps)
    }

    /// `y[batch, out] = x[batch, in] . W^T` into `y`, with W `[out, in]` in NF4 (see kernels/README.md).
    pub fn gemv_bf16_into(
        &self,
        w: &Nf4Device,
        x: &CudaView<'_, bf16>,
        batch: usize,
        y: &mut CudaViewMut<'_, bf16>,
    ) -> Result<()> {
        let (out_features, in_features) = Self::gemv_dims(w)?;
        let plan = self.gemv_plan(out_features, in_features, batch);
        self.gemv_bf16_into_planned(w, x, batch, y, &plan)
    }

    /// [`Self::gemv_bf16_into`] with an explicit launch (tests run every lane-group size and
    /// grid this way). A tiled plan needs a shape [`GemvPlan::tiled_fits`] accepts; any batch
    /// works with any tile.
    pub fn gemv_bf16_into_planned(
        &self,
        w: &Nf4Device,
        x: &CudaView<'_, bf16>,
        batch: usize,
        y: &mut CudaViewMut<'_, bf16>,
        plan: &GemvPlan,
    ) -> Result<()> {
        let (out_features, in_features) = Self::gemv_dims(w)?;
        if batch == 0 || batch > i32::MAX as usize {
            return Err(CudaError::Invalid(format!("batch {batch} out of range")));
        }
        if x.len() != batch * in_features || y.len() != batch * out_features {
            return Err(CudaError::Invalid(format!(
                "GEMV shapes: x has {} elements (want {batch}x{in_features}), y has {} (want {batch}x{out_features})",
                x.len(),
                y.len()
            )));
        }
        if plan.grid == 0 {
            return Err(CudaError::Invalid(
                "a launch needs at least one block".into(),
            ));
        }
        let (function, group_log2) = match plan.kernel {
            GemvKernel::Rows => (&self.gemv_rows, None),
            GemvKernel::Tiled { tile, group_log2 } => {
                let Some(t) = tile_index(tile) else {
                    return Err(CudaError::Invalid(format!(
                        "GEMV batch tile {tile} is not one of {GEMV_TILES:?}"
                    )));
                };
                if !GEMV_GROUP_LOG2.contains(&group_log2) {
                    return Err(CudaError::Invalid(format!(
                        "GEMV lane group 2^{group_log2} outside 2^{}..=2^{}",
                        GEMV_GROUP_LOG2.start(),
                        GEMV_GROUP_LOG2.end()
                    )));
                }
                if !GemvPlan::tiled_fits(out_features, in_features) {
                    return Err(CudaError::Invalid(format!(
                        "the tiled GEMV needs rows of a multiple of 32 elements, got [{out_features}, {in_features}]"
                    )));
                }
                (&self.gemv_tiled[t], Some(group_log2 as i32))
            }
        };
        let cfg = LaunchConfig {
            grid_dim: (plan.grid, 1, 1),
            block_dim: (GEMV_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (b, i, o) = (batch as i32, in_features as i32, out_features as i32);
        let mut launch = self.stream.launch_builder(function);
        launch
            .arg(&w.packed)
            .arg(&w.absmax_codes)
            .arg(&w.nested_absmax)
            .arg(&self.nested_map)
            .arg(&w.offset)
            .arg(x)
            .arg(y)
            .arg(&b)
            .arg(&i)
            .arg(&o);
        if let Some(g) = &group_log2 {
            launch.arg(g);
        }
        // SAFETY: arguments match kGemvNF4_bf16 (u8*, u8*, f32*, f32*, f32, bf16*, bf16*, int,
        // int, int) and, with the trailing int g_log2, kGemvNF4_bf16_t*; x, y and W were
        // size-checked above and the tiled kernels' shape limits in `tiled_fits`. Both loop over
        // whatever the grid does not cover, so any grid size stays in bounds.
        unsafe { launch.launch(cfg) }.map_err(driver("launching an NF4 GEMV"))?;
        Ok(())
    }

    /// `y[batch, out] = x[batch, in] . W^T`, allocating `y`.
    pub fn gemv_bf16(
        &self,
        w: &Nf4Device,
        x: &CudaSlice<bf16>,
        batch: usize,
    ) -> Result<CudaSlice<bf16>> {
        let (out_features, _) = Self::gemv_dims(w)?;
        // SAFETY: the kernel writes all batch * out elements.
        let mut y = unsafe { self.stream.alloc::<bf16>(batch * out_features) }
            .map_err(driver("allocating y"))?;
        self.gemv_bf16_into(w, &x.as_view(), batch, &mut y.as_view_mut())?;
        Ok(y)
    }

    /// Time dequantization of `w` to `dtype` against a device-to-device copy of the same output
    /// size, in the same run, with CUDA events: `rounds` rounds of `iters` back-to-back launches
    /// (and copies) each, after a warm-up; the fastest round of each counts.
    pub fn measure_dequant_bandwidth(
        &self,
        w: &Nf4Device,
        dtype: OutDtype,
        rounds: usize,
        iters: usize,
    ) -> Result<BandwidthReport> {
        match dtype {
            OutDtype::F32 => self.measure::<f32>(w, rounds, iters),
            OutDtype::Bf16 => self.measure::<bf16>(w, rounds, iters),
            OutDtype::F16 => self.measure::<f16>(w, rounds, iters),
        }
    }

    fn measure<T: Nf4Output>(
        &self,
        w: &Nf4Device,
        rounds: usize,
        iters: usize,
    ) -> Result<BandwidthReport> {
        let out_bytes = w.numel * T::DTYPE.size();
        let mut out = self
            .stream
            .alloc_zeros::<T>(w.numel)
            .map_err(driver("allocating the output"))?;
        let src = self
            .stream
            .alloc_zeros::<u8>(out_bytes)
            .map_err(driver("allocating the copy source"))?;
        let mut dst = self
            .stream
            .alloc_zeros::<u8>(out_bytes)
            .map_err(driver("allocating the copy target"))?;
        let dequant_ms = self.best_ms_per_call(rounds, iters, |_| {
            self.dequantize_into(w, &mut out.as_view_mut())
        })?;
        let copy_ms = self.best_ms_per_call(rounds, iters, |_| {
            self.stream
                .memcpy_dtod(&src, &mut dst)
                .map_err(driver("copying"))
        })?;
        Ok(BandwidthReport::new(
            T::DTYPE,
            w.numel,
            w.storage_bytes(),
            iters,
            dequant_ms,
            copy_ms,
        ))
    }

    /// Milliseconds per call of `f(i)`, `i` in `0..iters`: the fastest of `rounds` rounds of
    /// back-to-back calls between two CUDA events on the stream, after one untimed round.
    pub fn best_ms_per_call(
        &self,
        rounds: usize,
        iters: usize,
        mut f: impl FnMut(usize) -> Result<()>,
    ) -> Result<f64> {
        use cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
        if rounds == 0 || iters == 0 {
            return Err(CudaError::Invalid(
                "rounds and iters must be positive".into(),
            ));
        }
        let timing = "timing with events";
        for i in 0..iters {
            f(i)?;
        }
        let mut best = f64::INFINITY;
        for _ in 0..rounds {
            let start = self
                .stream
                .record_event(Some(CU_EVENT_DEFAULT))
                .map_err(driver(timing))?;
            for i in 0..iters {
                f(i)?;
            }
            let end = self
                .stream
                .record_event(Some(CU_EVENT_DEFAULT))
                .map_err(driver(timing))?;
            let ms = f64::from(start.elapsed_ms(&end).map_err(driver(timing))?);
            best = best.min(ms / iters as f64);
        }
        Ok(best)
    }

    /// A second copy of `w` in device memory.
    pub fn duplicate(&self, w: &Nf4Device) -> Result<Nf4Device> {
        let what = "copying an NF4 tensor";
        Ok(Nf4Device {
            packed: self.stream.clone_dtod(&w.packed).map_err(driver(what))?,
            absmax_codes: self
                .stream
                .clone_dtod(&w.absmax_codes)
                .map_err(driver(what))?,
            nested_absmax: self
                .stream
                .clone_dtod(&w.nested_absmax)
                .map_err(driver(what))?,
            offset: w.offset,
            shape: w.shape.clone(),
            dtype: w.dtype,
            numel: w.numel,
        })
    }

    /// Times the fused GEMV on `w` `[out, in]` at `batch` (the launch [`Self::gemv_bf16_into`]
    /// picks) against a device-to-device copy of as many bytes as the weight holds.
    pub fn measure_gemv(
        &self,
        w: &Nf4Device,
        batch: usize,
        rounds: usize,
        iters: usize,
    ) -> Result<GemvReport> {
        let (out_features, in_features) = Self::gemv_dims(w)?;
        let plan = self.gemv_plan(out_features, in_features, batch);
        self.measure_gemv_planned(w, batch, &plan, rounds, iters)
    }

    /// [`Self::measure_gemv`] with an explicit launch. Consecutive calls cycle through copies
    /// of the weight (and the copy through as many source and target buffers) that together
    /// hold three times the device's L2 cache, so both read DRAM, as decoding does, where every
    /// weight is read once per token. `iters` is rounded up to a multiple of the copies; each
    /// time is the fastest of `rounds` rounds ([`Self::best_ms_per_call`]).
    pub fn measure_gemv_planned(
        &self,
        w: &Nf4Device,
        batch: usize,
        plan: &GemvPlan,
        rounds: usize,
        iters: usize,
    ) -> Result<GemvReport> {
        use cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE;
        let (out_features, in_features) = Self::gemv_dims(w)?;
        if batch == 0 || batch > i32::MAX as usize {
            return Err(CudaError::Invalid(format!("batch {batch} out of range")));
        }
        let l2 = self
            .context()
            .attribute(CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
            .map_err(driver("reading the L2 size"))?
            .max(0) as usize;
        let bytes = w.storage_bytes();
        let copies = (3 * l2).div_ceil(bytes).clamp(1, 64);
        let extra = (1..copies)
            .map(|_| self.duplicate(w))
            .collect::<Result<Vec<_>>>()?;
        let weights: Vec<&Nf4Device> = std::iter::once(w).chain(extra.iter()).collect();
        // x: a fixed pattern of ordinary values (never zeros, which could run faster).
        let x_host: Vec<bf16> = (0..batch * in_features)
            .map(|i| bf16::from_f32(((i * 7919) % 201) as f32 / 100.0 - 1.0 + 1.0 / 512.0))
            .collect();
        let x = self
            .stream
            .clone_htod(&x_host)
            .map_err(driver("uploading x"))?;
        let mut y = self
            .stream
            .alloc_zeros::<bf16>(batch * out_features)
            .map_err(driver("allocating y"))?;
        let calls = iters.max(1).div_ceil(copies) * copies;
        let gemv_ms = self.best_ms_per_call(rounds, calls, |i| {
            self.gemv_bf16_into_planned(
                weights[i % copies],
                &x.as_view(),
                batch,
                &mut y.as_view_mut(),
                plan,
            )
        })?;
        let src = self
            .stream
            .alloc_zeros::<u8>(copies * bytes)
            .map_err(driver("allocating the copy source"))?;
        let mut dst = self
            .stream
            .alloc_zeros::<u8>(copies * bytes)
            .map_err(driver("allocating the copy target"))?;
        let copy_ms = self.best_ms_per_call(rounds, calls, |i| {
            let at = (i % copies) * bytes;
            self.stream
                .memcpy_dtod(
                    &src.slice(at..at + bytes),
                    &mut dst.slice_mut(at..at + bytes),
                )
                .map_err(driver("copying"))
        })?;
        Ok(GemvReport {
            out_features,
            in_features,
            batch,
            plan: *plan,
            weight_bytes: bytes,
            copies,
            iters: calls,
            gemv_ms,
            copy_ms,
        })
    }
}

/// The fused GEMV's time next to a device-to-device copy of as many bytes as its weight.
#[derive(Debug, Clone, PartialEq)]
pub struct GemvReport {
    pub out_features: usize,
    pub in_features: usize,
    pub batch: usize,
    pub plan: GemvPlan,
    /// Bytes of the NF4 weight a call reads (packed codes, absmax codes, nested scales); also
    /// the size of each copy.
    pub weight_bytes: usize,
    /// Weight copies cycled through (see [`Nf4Cuda::measure_gemv_planned`]).
    pub copies: usize,
    /// Calls per timed round.
    pub iters: usize,
    /// Milliseconds per GEMV (best round).
    pub gemv_ms: f64,
    /// Milliseconds per copy (best round).
    pub copy_ms: f64,
}

impl GemvReport {
    /// Weight bytes read per second by the GEMV, in GB/s (1e9 bytes).
    pub fn gemv_gbps(&self) -> f64 {
        self.weight_bytes as f64 / (self.gemv_ms * 1e-3) / 1e9
    }

    /// DRAM traffic of the copy (bytes read + written), in GB/s.
    pub fn copy_traffic_gbps(&self) -> f64 {
        2.0 * self.weight_bytes as f64 / (self.copy_ms * 1e-3) / 1e9
    }

    /// The GEMV's rate on its weight bytes over the copy's traffic (1.0 = the GEMV streams its
    /// weight as fast as a copy moves bytes).
    pub fn ratio(&self) -> f64 {
        self.gemv_gbps() / self.copy_traffic_gbps()
    }
}

impl std::fmt::Display for GemvReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NF4 GEMV [{}, {}] batch {}: {:.1} us, {:.0} GB/s of weight ({} bytes); d2d copy {:.0} GB/s \
             traffic; ratio {:.2} ({:?}, grid {}, {} weight copies)",
            self.out_features,
            self.in_features,
            self.batch,
            self.gemv_ms * 1e3,
            self.gemv_gbps(),
            self.weight_bytes,
            self.copy_traffic_gbps(),
            self.ratio(),
            self.plan.kernel,
            self.plan.grid,
            self.copies
        )
    }
}

/// Dequantization throughput next to a device-to-device copy of the same output size.
#[derive(Debug, Clone, PartialEq)]
pub struct BandwidthReport {
    pub dtype: OutDtype,
    pub numel: usize,
    /// Bytes dequantization writes (`numel * size_of(dtype)`), also the size of the copy.
    pub output_bytes: usize,
    /// Bytes dequantization reads (packed codes, absmax codes, nested scales).
    pub input_bytes: usize,
    pub iters: usize,
    /// Milliseconds per dequantization (best round).
    pub dequant_ms: f64,
    /// Milliseconds per copy (best round).
    pub copy_ms: f64,
}

impl BandwidthReport {
    pub fn new(
        dtype: OutDtype,
        numel: usize,
        input_bytes: usize,
        iters: usize,
        dequant_ms: f64,
        copy_ms: f64,
    ) -> Self {
        BandwidthReport {
            dtype,
            numel,
            output_bytes: numel * dtype.size(),
            input_bytes,
            iters,
            dequant_ms,
            copy_ms,
        }
    }

    /// Output bytes written per second by dequantization, in GB/s (1e9 bytes).
    pub fn dequant_gbps(&self) -> f64 {
        self.output_bytes as f64 / (self.dequant_ms * 1e-3) / 1e9
    }

    /// Output bytes written per second by the copy, in GB/s.
    pub fn copy_gbps(&self) -> f64 {
        self.output_bytes as f64 / (self.copy_ms * 1e-3) / 1e9
    }

    /// DRAM traffic of dequantization (reads + writes), in GB/s.
    pub fn dequant_traffic_gbps(&self) -> f64 {
        (self.output_bytes + self.input_bytes) as f64 / (self.dequant_ms * 1e-3) / 1e9
    }

    /// DRAM traffic of the copy (reads + writes), in GB/s.
    pub fn copy_traffic_gbps(&self) -> f64 {
        2.0 * self.output_bytes as f64 / (self.copy_ms * 1e-3) / 1e9
    }

    /// Dequantization output rate over copy output rate (1.0 = as fast as a copy).
    pub fn ratio(&self) -> f64 {
        self.copy_ms / self.dequant_ms
    }
}

impl std::fmt::Display for BandwidthReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NF4->{} {} elements: dequant {:.1} GB/s out ({:.1} GB/s traffic, {:.3} ms), d2d copy {:.1} GB/s out \
             ({:.1} GB/s traffic, {:.3} ms), ratio {:.2}",
            self.dtype.name(),
            self.numel,
            self.dequant_gbps(),
            self.dequant_traffic_gbps(),
            self.dequant_ms,
            self.copy_gbps(),
            self.copy_traffic_gbps(),
            self.copy_ms,
            self.ratio()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nf4::NF4_CODE;

    /// The NF4 table literal in kernels/nf4.cu, parsed as f32 the way C parses `...f` literals.
    fn source_table() -> Vec<f32> {
        let start = NF4_SOURCE
            .find("kNf4Code[16] = {")
            .expect("kNf4Code table in nf4.cu");
        let body = &NF4_SOURCE[start..];
        let body = &body[body.find('{').unwrap() + 1..body.find("};").unwrap()];
        body.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.trim_end_matches('f')
                    .parse::<f32>()
                    .unwrap_or_else(|e| panic!("literal {s:?}: {e}"))
            })
            .collect()
    }

    #[test]
    fn kernel_table_matches_the_cpu_codes_bit_for_bit() {
        let table = source_table();
        assert_eq!(table.len(), 16);
        for (i, (k, c)) in table.iter().zip(NF4_CODE.iter()).enumerate() {
            assert_eq!(k.to_bits(), c.to_bits(), "code {i}: kernel {k} vs CPU {c}");
        }
    }

    /// The value of `#define NAME value` in nf4.cu.
    fn source_define(name: &str) -> u64 {
        let prefix = format!("#define {name} ");
        let line = NF4_SOURCE
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("{prefix} missing from nf4.cu"));
        line[prefix.len()..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap_or_else(|e| panic!("{line:?}: {e}"))
    }

    #[test]
    fn kernel_constants_match_the_source() {
        for (define, value) in [
            ("DQ_THREADS", u64::from(DEQUANT_THREADS)),
            ("DQ_UNROLL", u64::from(DEQUANT_UNROLL)),
            ("GEMV_THREADS", u64::from(GEMV_THREADS)),
            ("GEMV_ROWS", GEMV_ROWS as u64),
            ("GEMV_MAX_TILE", *GEMV_TILES.last().unwrap() as u64),
            ("NF4_BLOCK", BLOCKSIZE as u64),
            ("NESTED_BLOCK", NESTED_BLOCKSIZE as u64),
        ] {
            assert_eq!(source_define(define), value, "{define}");
        }
        for name in NF4_ENTRY_POINTS {
            assert!(
                NF4_SOURCE.contains(&format!("{name}(")),
                "{name} missing from nf4.cu"
            );
        }
        for tile in GEMV_TILES {
            assert!(
                NF4_SOURCE.contains(&format!("kGemvNF4_bf16_t{tile}(")),
                "no kernel for batch tile {tile}"
            );
        }
        // The chunk sizes of DqChunk: one 16-byte store.
        for (ty, dtype) in [
            ("float", OutDtype::F32),
            ("__nv_bfloat16", OutDtype::Bf16),
            ("__half", OutDtype::F16),
        ] {
            let decl = format!(
                "struct DqChunk<{ty}> {{ static constexpr int kElems = {}; }};",
                dequant_chunk_elems(dtype)
            );
            assert!(NF4_SOURCE.contains(&decl), "{decl}");
        }
    }

    #[test]
    fn dequant_launch_covers_every_chunk_within_the_capacity() {
        let per_block = (DEQUANT_THREADS * DEQUANT_UNROLL) as usize;
        for dtype in [OutDtype::F32, OutDtype::Bf16, OutDtype::F16] {
            for n in [
                1usize,
                2,
                7,
                8,
                9,
                8191,
                8192,
                8193,
                64 * 256 * 3 + 17,
                1 << 26,
            ] {
                let cfg = Nf4Cuda::dequant_launch_config(n, dtype, 1000);
                let chunks = n / dequant_chunk_elems(dtype);
                let blocks = cfg.grid_dim.0 as usize;
                assert_eq!(cfg.block_dim.0, DEQUANT_THREADS);
                assert!(blocks >= 1, "n={n}");
                if blocks < 1000 {
                    // Below the capacity: just enough blocks for one pass.
                    assert!(blocks * per_block >= chunks, "n={n} {dtype:?}");
                    assert!(blocks == 1 || (blocks - 1) * per_block < chunks, "n={n}");
                }
            }
            // Past the capacity the grid stays at it and the kernel loops.
            let cfg = Nf4Cuda::dequant_launch_config(1 << 30, dtype, 792);
            assert_eq!(cfg.grid_dim.0, 792);
        }
    }

    fn tiled(plan: GemvPlan) -> (usize, u32) {
        match plan.kernel {
            GemvKernel::Tiled { tile, group_log2 } => (tile, group_log2),
            GemvKernel::Rows => panic!("expected the tiled kernel, got {plan:?}"),
        }
    }

    #[test]
    fn gemv_plans_for_the_gemma_shapes_on_an_h200() {
        // 132 SMs, 2 blocks of the tiled kernels each (34 KB shared memory, <= 128 registers).
        let plan = |o, i, b| GemvPlan::new(o, i, b, 132, 2);
        // [14336, 3584] (gate/up): 112 items a row = 7 steps of 16 lanes, and 3584 units fill
        // the GPU; one wave of 264 blocks.
        let p = plan(14336, 3584, 1);
        assert_eq!(tiled(p), (1, 4));
        assert_eq!(p.grid, 264);
        // [3584, 14336] (down): 448 items, 896 units: 64 lanes (two warps) a unit.
        assert_eq!(tiled(plan(3584, 14336, 1)), (1, 6));
        // [4096, 3584] (q): 1024 units of 16 lanes would leave the GPU half idle.
        assert_eq!(tiled(plan(4096, 3584, 1)).1, 6);
        // Batch tiles: the smallest that holds the batch, 8 beyond.
        for (batch, tile) in [
            (1, 1),
            (2, 2),
            (3, 4),
            (4, 4),
            (5, 8),
            (8, 8),
            (9, 8),
            (16, 8),
        ] {
            assert_eq!(tiled(plan(14336, 3584, batch)).0, tile, "batch {batch}");
        }
        // Few units: one block each.
        assert_eq!(plan(8, 64, 1).grid, 2);
    }

    #[test]
    fn gemv_plans_fall_back_to_the_row_kernel() {
        for (o, i) in [(33, 100), (5, 13), (17, 72), (8, 48)] {
            let p = GemvPlan::new(o, i, 3, 132, 2);
            assert_eq!(p.kernel, GemvKernel::Rows, "[{o}, {i}]");
            assert_eq!(p.grid as usize, o.div_ceil(8));
        }
        assert!(GemvPlan::tiled_fits(3, 32));
        assert!(!GemvPlan::tiled_fits(3, 1 << 30));
    }

    #[test]
    fn gemv_plans_are_legal_for_every_shape() {
        for o in [1usize, 3, 4, 5, 64, 1000, 14336] {
            for i in [32usize, 96, 2048, 3584, 14336] {
                for sms in [1u32, 80, 132] {
                    let p = GemvPlan::new(o, i, 1, sms, 3);
                    let (_, g) = tiled(p);
                    assert!(GEMV_GROUP_LOG2.contains(&g));
                    assert!(p.grid >= 1 && p.grid as usize <= o.div_ceil(GEMV_ROWS));
                    assert!(p.grid <= sms * 3);
                }
            }
        }
    }

    #[test]
    fn entry_points_are_read_from_ptx() {
        let ptx = ".visible .entry kA(\n\t.param .u64 p\n)\n.visible .entry k_B2(\n";
        assert_eq!(
            ptx_entry_points(ptx),
            vec!["kA".to_string(), "k_B2".to_string()]
        );
    }

    #[test]
    fn bandwidth_report_arithmetic() {
        // 1e6 f32 = 4 MB out in 0.01 ms -> 400 GB/s; the copy takes 0.008 ms -> 500 GB/s.
        let r = BandwidthReport::new(OutDtype::F32, 1_000_000, 500_000, 10, 0.01, 0.008);
        assert!((r.dequant_gbps() - 400.0).abs() < 1e-9);
        assert!((r.copy_gbps() - 500.0).abs() < 1e-9);
        assert!((r.ratio() - 0.8).abs() < 1e-12);
        assert!((r.copy_traffic_gbps() - 1000.0).abs() < 1e-9);
        assert!((r.dequant_traffic_gbps() - 450.0).abs() < 1e-9);
        assert!(r.to_string().contains("ratio 0.80"));
    }
}
