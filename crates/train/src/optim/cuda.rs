//! The optimizer step on CUDA tensors (feature `cuda`), with the state paged as design §5 says.
//!
//! The state stays in the host pages of [`PageTable`]. For each page the pager copies the page
//! (one array: codes1 | codes2 | absmax1 | absmax2, or m | v) into one device staging buffer of
//! `page_bytes`, updates the parameter ranges of the page's extents in place with
//! kernels/adamw.cu (one launch per extent), and copies the page back. Everything runs on
//! candle's stream, in order with the kernels that produced the gradients and with the next
//! page's copies, so device memory holds one page of state at any time and a checkpoint reads
//! the same host pages whichever device stepped them.
//!
//! The kernels round exactly as the CPU kernels of [`super::kernels`] do, so pages and
//! parameters come out bit-identical to a CPU step on the same inputs.
//!
//! Transfers: the first step page-locks (pins) every page's allocation, so the copies are
//! direct DMA at the bus's speed and queue up without the host waiting page by page; the step
//! waits for the stream once at its end, before anything can read the pages. A page the driver
//! refuses to pin is copied through the driver's pageable path instead (slower, same result).

use super::kernels::{code_starts, Bnb32Step, Bnb8Step, TorchStep};
use super::paged::{Extent, F32Rule, Page8, PageF32, PageTable};
use anyhow::{Context, Result};
use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{CpuStorage, Device, InplaceOp2, Layout, Tensor, Var};
use rupantor_quant::blockwise8::{dynamic_map, BLOCKSIZE};
use std::cell::RefCell;
use std::ops::Range;
use std::sync::Arc;

/// Threads per block of every kernel in kernels/adamw.cu (`BLOCK`): one thread per element, one
/// thread block per 256-element quantization block.
const THREADS: u32 = BLOCKSIZE as u32;

/// The kernels of kernels/adamw.cu loaded on one device, with the quantization tables resident
/// and one page of staging memory.
///
/// It pins the page allocations of the one [`PageTable`] it steps and unpins them when dropped,
/// so it must be dropped before that table (`PagedAdamW` declares it first).
pub(crate) struct CudaPager {
    device: Device,
    stream: Arc<CudaStream>,
    adam8: CudaFunction,
    adam32_bnb: CudaFunction,
    adamw32_torch: CudaFunction,
    /// `[signed map | unsigned map]`, 2 x 256.
    maps: CudaSlice<f32>,
    /// `[code_starts(signed) | code_starts(unsigned)]`, 2 x 256.
    starts: CudaSlice<u32>,
    /// One page of state, in the page's own layout.
    staging: CudaSlice<u8>,
    /// Whether the table's pages went through [`Self::pin`] (the first step).
    pages_seen: bool,
    /// Addresses of the page allocations this pager pinned.
    pinned: Vec<usize>,
}

impl std::fmt::Debug for CudaPager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaPager")
            .field("device", &self.device)
            .field("staging_bytes", &self.staging.len())
            .field("pinned_pages", &self.pinned.len())
            .finish_non_exhaustive()
    }
}

impl Drop for CudaPager {
    fn drop(&mut self) {
        if self.pinned.is_empty() {
            return;
        }
        // Nothing may still be copying into or out of the pages.
        let _ = self.stream.synchronize();
        let _ = self.stream.context().bind_to_thread();
        for &addr in &self.pinned {
            // SAFETY: `addr` was registered by `pin` and is still allocated (the table outlives
            // the pager). An error (a context already torn down) leaves nothing to undo.
            let _ = unsafe { sys::cuMemHostUnregister(addr as *mut std::ffi::c_void) };
        }
    }
}

impl CudaPager {
    /// Loads the kernels on `dev`'s stream and allocates a staging buffer of `page_bytes`.
    pub(crate) fn new(dev: &CudaDevice, page_bytes: usize) -> Result<Self> {
        let stream = dev.cuda_stream();
        let module = rupantor_quant::cuda::load_module(&stream, "adamw")
            .context("loading the optimizer kernels (kernels/adamw.cu)")?;
        let function = |name: &str| {
            module
                .load_function(name)
                .with_context(|| format!("kernel {name} of kernels/adamw.cu"))
        };
        let (map1, map2) = (dynamic_map(true), dynamic_map(false));
        let maps = stream
            .clone_htod(&[map1, map2].concat())
            .context("uploading the 8-bit optimizer's maps")?;
        let starts = stream
            .clone_htod(&[code_starts(&map1), code_starts(&map2)].concat())
            .context("uploading the 8-bit optimizer's code tables")?;
        let staging = stream
            .alloc_zeros::<u8>(page_bytes)
            .context("allocating the optimizer's page staging buffer")?;
        Ok(CudaPager {
            device: Device::Cuda(dev.clone()),
            adam8: function("kAdamW8bitBlockwise")?,
            adam32_bnb: function("kAdam32Bnb")?,
            adamw32_torch: function("kAdamW32Torch")?,
            stream,
            maps,
            starts,
            staging,
            pages_seen: false,
            pinned: Vec::new(),
        })
    }

    /// Whether this pager runs on `device` (tensors of another GPU need a pager of their own).
    pub(crate) fn is_on(&self, device: &Device) -> bool {
        self.device.same_device(device)
    }

    /// Pages of state held on the device at once: the one staging buffer.
    pub(crate) fn resident_pages(&self) -> usize {
        1
    }

    /// Page-locks one page allocation (4096-aligned, whole 4096-byte units, shared with no other
    /// allocation). A refusal (no pinnable memory left) is no error: that page's copies take the
    /// driver's pageable path.
    fn pin(&mut self, allocation: &mut [u8]) -> Result<()> {
        self.stream
            .context()
            .bind_to_thread()
            .context("binding the CUDA context")?;
        // SAFETY: the range is one live allocation of the table's page, which does not move or
        // free while this pager exists (see the type's docs); Drop unregisters it.
        let pinned = unsafe {
            sys::cuMemHostRegister_v2(allocation.as_mut_ptr().cast(), allocation.len(), 0)
        };
        if pinned.result().is_ok() {
            self.pinned.push(allocation.as_mut_ptr() as usize);
        }
        Ok(())
    }

    /// One step of every page of `table`: 8-bit pages with `k8`, f32 pages with `rule`, for the
    /// parameters `params` (contiguous f32 tensors on this pager's device, in the optimizer's
    /// order). Returns once the device is done, also on error, so the host pages are whole when
    /// anything reads them next.
    pub(crate) fn step(
        &mut self,
        table: &mut PageTable,
        params: &[(Var, Tensor)],
        k8: &Bnb8Step,
        rule: &F32Rule,
    ) -> Result<()> {
        let stepped = self.step_pages(table, params, k8, rule);
        let synced = self
            .stream
            .synchronize()
            .context("waiting for the optimizer step on the GPU");
        stepped.and(synced)
    }

    fn step_pages(
        &mut self,
        table: &mut PageTable,
        params: &[(Var, Tensor)],
        k8: &Bnb8Step,
        rule: &F32Rule,
    ) -> Result<()> {
        let pin = !self.pages_seen;
        self.pages_seen = true;
        let (pages8, pages_f32) = table.pages_mut();
        for (page, extents) in pages8 {
            if pin {
                self.pin(page.allocation_mut())?;
            }
            self.step_page8(page, extents, params, k8)?;
        }
        for (page, extents) in pages_f32 {
            if pin {
                self.pin(page.allocation_mut())?;
            }
            self.step_page_f32(page, extents, params, rule)?;
        }
        Ok(())
    }

    /// Queues the copy of a page into the staging buffer.
    fn upload(&mut self, page: &[u8]) -> Result<()> {
        self.stream
            .memcpy_htod(page, &mut self.staging.slice_mut(..page.len()))
            .context("copying an optimizer page to the GPU")
    }

    /// Queues the copy of the staging buffer back into its page. From pinned memory the copy
    /// completes later, in stream order: the page is not touched again before [`Self::step`]
    /// synchronises.
    fn download(&self, page: &mut [u8]) -> Result<()> {
        let n = page.len();
        self.stream
            .memcpy_dtoh(&self.staging.slice(..n), page)
            .context("copying an optimizer page back from the GPU")
    }

    /// One 8-bit AdamW step of the extents whose state is `page`.
    fn step_page8(
        &mut self,
        page: &mut Page8,
        extents: &[Extent],
        params: &[(Var, Tensor)],
        k: &Bnb8Step,
    ) -> Result<()> {
        self.upload(page.as_bytes())?;
        for e in extents {
            let op = ExtentUpdate {
                kernel: Kernel::Adam8 {
                    k,
                    maps: &self.maps,
                    starts: &self.starts,
                    page_blocks: page.blocks() as u64,
                },
                function: &self.adam8,
                stream: &self.stream,
                staging: RefCell::new(&mut self.staging),
                extent: *e,
            };
            apply(&op, params, e)?;
        }
        self.download(page.as_bytes_mut())
    }

    /// One f32-state AdamW step of the extents whose state is `page`.
    fn step_page_f32(
        &mut self,
        page: &mut PageF32,
        extents: &[Extent],
        params: &[(Var, Tensor)],
        rule: &F32Rule,
    ) -> Result<()> {
        self.upload(page.as_bytes())?;
        let function = match rule {
            F32Rule::Torch(_) => &self.adamw32_torch,
            F32Rule::Bnb(_) => &self.adam32_bnb,
        };
        for e in extents {
            let op = ExtentUpdate {
                kernel: Kernel::F32 {
                    rule,
                    page_elems: page.len() as u64,
                },
                function,
                stream: &self.stream,
                staging: RefCell::new(&mut self.staging),
                extent: *e,
            };
            apply(&op, params, e)?;
        }
        self.download(page.as_bytes_mut())
    }
}

/// Runs `op` on the parameter of extent `e` in place, its gradient as the second operand.
fn apply(op: &ExtentUpdate<'_>, params: &[(Var, Tensor)], e: &Extent) -> Result<()> {
    let (var, grad) = &params[e.param];
    var.inplace_op2(grad, op).with_context(|| {
        format!(
            "optimizer step of parameter {} (elements {}..{})",
            e.param,
            e.offset,
            e.offset + e.len
        )
    })
}

/// Which kernel an extent runs, with its page geometry and step scalars.
enum Kernel<'a> {
    Adam8 {
        k: &'a Bnb8Step,
        maps: &'a CudaSlice<f32>,
        starts: &'a CudaSlice<u32>,
        page_blocks: u64,
    },
    F32 {
        rule: &'a F32Rule,
        page_elems: u64,
    },
}

/// The update of one extent as candle in-place op on the parameter (the first operand), reading
/// its gradient (the second) and the staged page.
struct ExtentUpdate<'a> {
    kernel: Kernel<'a>,
    function: &'a CudaFunction,
    stream: &'a Arc<CudaStream>,
    /// Written by the kernel; a `RefCell` because candle hands the op over by shared reference.
    staging: RefCell<&'a mut CudaSlice<u8>>,
    extent: Extent,
}

impl ExtentUpdate<'_> {
    /// The elements of the extent within a contiguous operand's storage.
    fn range(&self, l: &Layout, what: &str) -> candle_core::Result<Range<usize>> {
        let e = &self.extent;
        let (start, end) = l.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg(format!("the optimizer needs a contiguous {what}"))
        })?;
        if e.offset + e.len > end - start {
            candle_core::bail!(
                "{what} has {} elements, the optimizer's extent ends at {}",
                end - start,
                e.offset + e.len
            );
        }
        Ok(start + e.offset..start + e.offset + e.len)
    }
}

impl InplaceOp2 for ExtentUpdate<'_> {
    fn name(&self) -> &'static str {
        "paged-adamw"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<()> {
        // `PagedAdamW::step_tensors` sends CPU tensors through the host path instead.
        candle_core::bail!("the paged AdamW kernels of kernels/adamw.cu update CUDA tensors only")
    }

    fn cuda_fwd(
        &self,
        p: &mut CudaStorage,
        pl: &Layout,
        g: &CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        let (pr, gr) = (self.range(pl, "parameter")?, self.range(gl, "gradient")?);
        let mut p = p.as_cuda_slice_mut::<f32>()?.slice_mut(pr);
        let g = g.as_cuda_slice::<f32>()?.slice(gr);
        let mut staging = self.staging.borrow_mut();
        let e = &self.extent;
        let (slot, n) = (e.slot as u64, e.len as u64);
        let blocks = u32::try_from(e.len.div_ceil(BLOCKSIZE))
            .map_err(|_| candle_core::Error::Msg(format!("extent of {n} elements")))?;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let operands = Operands {
            stream: self.stream,
            function: self.function,
            cfg,
            p: &mut p,
            g: &g,
            page: &mut staging,
            slot,
            n,
        };
        match &self.kernel {
            Kernel::Adam8 {
                k,
                maps,
                starts,
                page_blocks,
            } => operands.adam8(k, maps, starts, *page_blocks),
            Kernel::F32 {
                rule: F32Rule::Bnb(k),
                page_elems,
            } => operands.bnb32(k, *page_elems),
            Kernel::F32 {
                rule: F32Rule::Torch(k),
                page_elems,
            } => operands.torch32(k, *page_elems),
        }
    }
}

/// What every launch of kernels/adamw.cu takes first: the extent's parameter and gradient
/// ranges, the staged page, the extent's first slot in it and its length.
struct Operands<'a, 'v> {
    stream: &'a Arc<CudaStream>,
    function: &'a CudaFunction,
    cfg: LaunchConfig,
    p: &'a mut CudaViewMut<'v, f32>,
    g: &'a CudaView<'v, f32>,
    page: &'a mut CudaSlice<u8>,
    slot: u64,
    n: u64,
}

impl Operands<'_, '_> {
    fn adam8(
        self,
        k: &Bnb8Step,
        maps: &CudaSlice<f32>,
        starts: &CudaSlice<u32>,
        page_blocks: u64,
    ) -> candle_core::Result<()> {
        let (has_decay, decay) = decay_args(k.decay);
        let mut launch = self.stream.launch_builder(self.function);
        launch
            .arg(self.p)
            .arg(self.g)
            .arg(self.page)
            .arg(&page_blocks)
            .arg(&self.slot)
            .arg(&self.n)
            .arg(maps)
            .arg(starts)
            .arg(&k.beta1)
            .arg(&k.one_minus_beta1)
            .arg(&k.beta2)
            .arg(&k.one_minus_beta2)
            .arg(&k.correction2)
            .arg(&k.eps)
            .arg(&has_decay)
            .arg(&decay)
            .arg(&k.neg_lr_over_c1);
        // SAFETY: the arguments match kAdamW8bitBlockwise (f32*, f32*, u8*, u64, u64, u64,
        // f32*, u32*, 6 x f32, i32, 2 x f32). p and g hold the extent's n elements (checked in
        // `range`); the staging buffer holds a whole page of page_blocks slots, and the
        // extent's slots lie inside it (page table).
        unsafe { launch.launch(self.cfg) }.w()?;
        Ok(())
    }

    fn bnb32(self, k: &Bnb32Step, page_elems: u64) -> candle_core::Result<()> {
        let (has_decay, decay) = decay_args(k.decay);
        let mut launch = self.stream.launch_builder(self.function);
        launch
            .arg(self.p)
            .arg(self.g)
            .arg(self.page)
            .arg(&page_elems)
            .arg(&self.slot)
            .arg(&self.n)
            .arg(&k.beta1)
            .arg(&k.one_minus_beta1)
            .arg(&k.beta2)
            .arg(&k.one_minus_beta2)
            .arg(&has_decay)
            .arg(&decay)
            .arg(&k.eps_c2)
            .arg(&k.step_size);
        // SAFETY: the arguments match kAdam32Bnb (f32*, f32*, f32*, u64, u64, u64, 4 x f32,
        // i32, 3 x f32); p and g hold the extent's n elements, the staging buffer a whole page
        // of m and v with page_elems slots each, and the extent's slots lie inside it.
        unsafe { launch.launch(self.cfg) }.w()?;
        Ok(())
    }

    fn torch32(self, k: &TorchStep, page_elems: u64) -> candle_core::Result<()> {
        let (has_decay, decay) = decay_args(k.decay);
        // at::lerp's two forms, chosen and rounded on the host as TorchStep::apply does.
        let from_end = k.weight1.abs() >= 0.5;
        let weight = if from_end { k.weight1 - 1.0 } else { k.weight1 };
        let from_end = i32::from(from_end);
        let mut launch = self.stream.launch_builder(self.function);
        launch
            .arg(self.p)
            .arg(self.g)
            .arg(self.page)
            .arg(&page_elems)
            .arg(&self.slot)
            .arg(&self.n)
            .arg(&has_decay)
            .arg(&decay)
            .arg(&from_end)
            .arg(&weight)
            .arg(&k.beta2)
            .arg(&k.one_minus_beta2)
            .arg(&k.bias_correction2_sqrt)
            .arg(&k.eps)
            .arg(&k.neg_step_size);
        // SAFETY: the arguments match kAdamW32Torch (f32*, f32*, f32*, u64, u64, u64, i32,
        // f32, i32, 6 x f32); p and g hold the extent's n elements, the staging buffer a whole
        // page of m and v with page_elems slots each, and the extent's slots lie inside it.
        unsafe { launch.launch(self.cfg) }.w()?;
        Ok(())
    }
}

/// `has_decay` and `decay` as the kernels take them (the multiply is skipped without decay,
/// as on the CPU).
fn decay_args(decay: Option<f32>) -> (i32, f32) {
    (i32::from(decay.is_some()), decay.unwrap_or(1.0))
}
