//! Paged optimizer state.
//!
//! The state of all trainable tensors lives in fixed-size host pages. There are two page
//! kinds, each one contiguous struct of arrays a kernel can stream as is:
//!
//! * [`Page8`]: slots of one 256-element block each — first- and second-moment codes (1 byte
//!   per element each) and their two f32 absmax — for tensors with 8-bit state;
//! * [`PageF32`]: f32 first and second moments (8 bytes per element) for tensors with f32
//!   state.
//!
//! Tensors are packed in order, each 8-bit tensor starting on a block slot, and may span pages;
//! the piece of a tensor inside one page is an [`Extent`]. A step walks the pages one by one
//! and hands each page, with the parameter and gradient slices of its extents, to a
//! [`PageBackend`]. Only that page is "in flight": the CPU backend updates it where it lies.
//! Parameters held on a GPU are stepped by `optim::cuda` instead, which copies each page as one
//! array into a device staging buffer, launches the update on the matching parameter ranges
//! and copies the page back, so device memory holds one page of state, never the whole state
//! (each page is its own 4096-aligned allocation, which that backend pins for direct
//! transfers). Every update is element-wise (8-bit: block-wise), so results do not depend on
//! the page size.

use crate::optim::kernels::{self, Bnb32Step, Bnb8Step, Codec8, TorchStep};
use rayon::prelude::*;
use rupantor_quant::blockwise8::BLOCKSIZE;
use serde::{Deserialize, Serialize};

/// Default page size: 1 MiB.
pub const DEFAULT_PAGE_BYTES: usize = 1 << 20;
/// Bytes of one 8-bit block slot: two code bytes per element and two f32 absmax.
pub const SLOT8_BYTES: usize = 2 * BLOCKSIZE + 2 * 4;
/// Bytes of one f32 element slot: first and second moment.
pub const SLOT_F32_BYTES: usize = 2 * 4;

/// How one tensor's optimizer state is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateFormat {
    /// Block-wise 8-bit codes (signed map for m, unsigned for v) with f32 absmax per 256.
    Blockwise8,
    /// f32 moments.
    F32,
}

impl StateFormat {
    /// State bytes of a tensor of `numel` elements in this format (page slack excluded).
    pub fn state_bytes(self, numel: usize) -> usize {
        match self {
            StateFormat::Blockwise8 => 2 * numel + 2 * 4 * numel.div_ceil(BLOCKSIZE),
            StateFormat::F32 => SLOT_F32_BYTES * numel,
        }
    }
}

/// Bytes of one unit of page memory: the host page size of common systems.
const PAGE_ALIGN: usize = 4096;

/// One 4096-byte, 4096-aligned unit of page memory.
#[derive(Clone, Copy, PartialEq)]
#[repr(C, align(4096))]
struct Unit([u8; PAGE_ALIGN]);

// SAFETY: `Unit` is 4096 bytes of plain bytes with no padding (size = alignment = 4096), so
// every bit pattern is valid and all zeros is a valid value.
unsafe impl bytemuck::Zeroable for Unit {}
// SAFETY: as above; `Unit` is `Copy` and has no interior references.
unsafe impl bytemuck::Pod for Unit {}

/// The host memory of one page: zeroed, 4096-byte aligned and a whole number of 4096-byte
/// units, so a device backend can page-lock (pin) exactly this allocation for direct transfers
/// without touching any other (see `optim::cuda`). Its layout is the one a device stages.
#[derive(Clone, PartialEq)]
struct PageMemory {
    units: Vec<Unit>,
    /// Bytes in use (the rest of the last unit is slack).
    len: usize,
}

impl PageMemory {
    fn zeroed(len: usize) -> Self {
        PageMemory {
            units: bytemuck::zeroed_vec(len.div_ceil(PAGE_ALIGN)),
            len,
        }
    }

    fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.units)[..self.len]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut(&mut self.units)[..self.len]
    }

    fn allocation_mut(&mut self) -> &mut [u8] {
        bytemuck::cast_slice_mut(&mut self.units)
    }
}

impl std::fmt::Debug for PageMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PageMemory({} bytes)", self.len)
    }
}

/// The four arrays of an 8-bit page, borrowed for an update.
#[derive(Debug)]
pub struct Page8Parts<'a> {
    pub codes1: &'a mut [u8],
    pub codes2: &'a mut [u8],
    pub absmax1: &'a mut [f32],
    pub absmax2: &'a mut [f32],
}

/// A page of 8-bit state: `blocks()` slots of [`BLOCKSIZE`] elements, stored as one array
/// `codes1 | codes2 | absmax1 | absmax2`:
///
/// * `codes1`, `codes2`: first- and second-moment codes (bitsandbytes' `state1`, `state2`), one
///   byte per element;
/// * `absmax1`, `absmax2`: the f32 absmax of each block of either moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Page8 {
    blocks: usize,
    memory: PageMemory,
}

impl Page8 {
    fn new(blocks: usize) -> Self {
        Page8 {
            blocks,
            memory: PageMemory::zeroed(blocks * SLOT8_BYTES),
        }
    }

    pub fn blocks(&self) -> usize {
        self.blocks
    }

    pub fn bytes(&self) -> usize {
        self.blocks() * SLOT8_BYTES
    }

    /// Byte offsets of `codes2`, `absmax1` and `absmax2` in [`Self::as_bytes`].
    pub fn offsets(&self) -> [usize; 3] {
        let cap = self.blocks * BLOCKSIZE;
        [cap, 2 * cap, 2 * cap + 4 * self.blocks]
    }

    pub fn codes1(&self) -> &[u8] {
        &self.memory.bytes()[..self.offsets()[0]]
    }

    pub fn codes2(&self) -> &[u8] {
        let [c2, a1, _] = self.offsets();
        &self.memory.bytes()[c2..a1]
    }

    pub fn absmax1(&self) -> &[f32] {
        let [_, a1, a2] = self.offsets();
        bytemuck::cast_slice(&self.memory.bytes()[a1..a2])
    }

    pub fn absmax2(&self) -> &[f32] {
        let [_, _, a2] = self.offsets();
        bytemuck::cast_slice(&self.memory.bytes()[a2..])
    }

    /// All four arrays, mutably.
    pub fn parts_mut(&mut self) -> Page8Parts<'_> {
        let [c2, a1, a2] = self.offsets();
        let (codes, absmax) = self.memory.bytes_mut().split_at_mut(a1);
        let (codes1, codes2) = codes.split_at_mut(c2);
        let (absmax1, absmax2) = absmax.split_at_mut(a2 - a1);
        Page8Parts {
            codes1,
            codes2,
            absmax1: bytemuck::cast_slice_mut(absmax1),
            absmax2: bytemuck::cast_slice_mut(absmax2),
        }
    }

    /// The whole page as bytes, in its layout (what a device backend copies).
    pub fn as_bytes(&self) -> &[u8] {
        self.memory.bytes()
    }

    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        self.memory.bytes_mut()
    }

    /// The page's whole allocation: 4096-aligned, whole 4096-byte units, shared with nothing
    /// else (what a device backend may pin).
    pub fn allocation_mut(&mut self) -> &mut [u8] {
        self.memory.allocation_mut()
    }
}

/// A page of f32 state, stored as one array `m | v`: first moment (`exp_avg` / `state1`) and
/// second moment (`exp_avg_sq` / `state2`) of each element slot.
#[derive(Debug, Clone, PartialEq)]
pub struct PageF32 {
    elems: usize,
    memory: PageMemory,
}

impl PageF32 {
    fn new(elems: usize) -> Self {
        PageF32 {
            elems,
            memory: PageMemory::zeroed(elems * SLOT_F32_BYTES),
        }
    }

    pub fn len(&self) -> usize {
        self.elems
    }

    pub fn is_empty(&self) -> bool {
        self.elems == 0
    }

    pub fn bytes(&self) -> usize {
        self.len() * SLOT_F32_BYTES
    }

    pub fn m(&self) -> &[f32] {
        &bytemuck::cast_slice(self.memory.bytes())[..self.elems]
    }

    pub fn v(&self) -> &[f32] {
        &bytemuck::cast_slice(self.memory.bytes())[self.elems..]
    }

    /// Both moments, mutably: `(m, v)`.
    pub fn parts_mut(&mut self) -> (&mut [f32], &mut [f32]) {
        let elems = self.elems;
        bytemuck::cast_slice_mut::<u8, f32>(self.memory.bytes_mut()).split_at_mut(elems)
    }

    /// The whole page as bytes, in its layout (what a device backend copies).
    pub fn as_bytes(&self) -> &[u8] {
        self.memory.bytes()
    }

    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        self.memory.bytes_mut()
    }

    /// The page's whole allocation: 4096-aligned, whole 4096-byte units, shared with nothing
    /// else (what a device backend may pin).
    pub fn allocation_mut(&mut self) -> &mut [u8] {
        self.memory.allocation_mut()
    }
}

/// The part of one tensor stored in one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Index of the tensor in the optimizer's parameter list.
    pub param: usize,
    /// First element of the tensor in this extent.
    pub offset: usize,
    /// Elements in this extent.
    pub len: usize,
    /// Page index within its kind.
    pub page: usize,
    /// First element slot in the page (a multiple of [`BLOCKSIZE`] in 8-bit pages).
    pub slot: usize,
}

/// One extent's parameter and gradient ranges, handed to a backend with its page.
#[derive(Debug)]
pub struct ExtentWork<'a> {
    /// First element slot in the page.
    pub slot: usize,
    pub param: &'a mut [f32],
    pub grad: &'a [f32],
}

/// The f32-state update rule of a page.
#[derive(Debug, Clone, Copy)]
pub enum F32Rule {
    /// `torch.optim.AdamW` (the 32-bit optimizer).
    Torch(TorchStep),
    /// bitsandbytes' 32-bit Adam (small tensors of the 8-bit optimizer).
    Bnb(Bnb32Step),
}

/// Runs the update of one page and its extents on some compute device.
pub trait PageBackend: Send {
    /// Apply one 8-bit AdamW step to `work`, whose state is in `page`.
    fn step_page8(&mut self, page: &mut Page8, work: &mut [ExtentWork<'_>], k: &Bnb8Step);
    /// Apply one f32-state AdamW step to `work`, whose state is in `page`.
    fn step_page_f32(&mut self, page: &mut PageF32, work: &mut [ExtentWork<'_>], rule: &F32Rule);
    /// Pages of state held on the compute device at once.
    fn resident_pages(&self) -> usize {
        1
    }
    fn name(&self) -> &'static str;
}

/// The host itself is the compute device: pages are updated in place, blocks in parallel.
#[derive(Debug, Default)]
pub struct CpuBackend {
    codec: Codec8,
}

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend {
            codec: Codec8::new(),
        }
    }
}

/// f32 elements per parallel task.
const F32_TASK: usize = 4096;

impl PageBackend for CpuBackend {
    fn step_page8(&mut self, page: &mut Page8, work: &mut [ExtentWork<'_>], k: &Bnb8Step) {
        let codec = &self.codec;
        let parts = page.parts_mut();
        for w in work.iter_mut() {
            debug_assert_eq!(w.slot % BLOCKSIZE, 0);
            let n = w.param.len();
            let b0 = w.slot / BLOCKSIZE;
            let nb = n.div_ceil(BLOCKSIZE);
            (
                w.param.par_chunks_mut(BLOCKSIZE),
                w.grad.par_chunks(BLOCKSIZE),
                parts.codes1[w.slot..w.slot + n].par_chunks_mut(BLOCKSIZE),
                parts.codes2[w.slot..w.slot + n].par_chunks_mut(BLOCKSIZE),
                parts.absmax1[b0..b0 + nb].par_iter_mut(),
                parts.absmax2[b0..b0 + nb].par_iter_mut(),
            )
                .into_par_iter()
                .with_min_len(8)
                .for_each(|(p, g, c1, c2, a1, a2)| {
                    kernels::bnb_adam8_block(k, codec, p, g, c1, c2, a1, a2)
                });
        }
    }

    fn step_page_f32(&mut self, page: &mut PageF32, work: &mut [ExtentWork<'_>], rule: &F32Rule) {
        let (m, v) = page.parts_mut();
        for w in work.iter_mut() {
            let n = w.param.len();
            (
                w.param.par_chunks_mut(F32_TASK),
                w.grad.par_chunks(F32_TASK),
                m[w.slot..w.slot + n].par_chunks_mut(F32_TASK),
                v[w.slot..w.slot + n].par_chunks_mut(F32_TASK),
            )
                .into_par_iter()
                .for_each(|(p, g, m, v)| match rule {
                    F32Rule::Torch(k) => kernels::torch_adamw(k, p, g, m, v),
                    F32Rule::Bnb(k) => kernels::bnb_adam32(k, p, g, m, v),
                });
        }
    }

    fn name(&self) -> &'static str {
        "cpu"
    }
}

/// Where each tensor's state lives.
#[derive(Debug, Clone)]
pub struct PageTable {
    page_bytes: usize,
    pages8: Vec<Page8>,
    pages_f32: Vec<PageF32>,
    /// Extents of each 8-bit page, in parameter order.
    extents8: Vec<Vec<Extent>>,
    /// Extents of each f32 page, in parameter order.
    extents_f32: Vec<Vec<Extent>>,
    /// Format and extents of each tensor, in element order.
    tensors: Vec<(StateFormat, Vec<Extent>)>,
}

/// Fills pages of one kind with tensors in order.
struct Packer {
    /// Slots (blocks for 8-bit, elements for f32) per page.
    capacity: usize,
    granule: usize,
    pages: usize,
    /// Next free slot in the last page.
    cursor: usize,
}

impl Packer {
    fn new(capacity: usize, granule: usize) -> Self {
        Packer {
            capacity,
            granule,
            pages: 0,
            cursor: capacity,
        }
    }

    /// Place `numel` elements of tensor `param`; returns its extents.
    fn place(&mut self, param: usize, numel: usize) -> Vec<Extent> {
        let mut extents = Vec::new();
        let mut offset = 0;
        while offset < numel {
            if self.cursor == self.capacity {
                self.pages += 1;
                self.cursor = 0;
            }
            let slots = (self.capacity - self.cursor).min((numel - offset).div_ceil(self.granule));
            let len = (slots * self.granule).min(numel - offset);
            extents.push(Extent {
                param,
                offset,
                len,
                page: self.pages - 1,
                slot: self.cursor * self.granule,
            });
            offset += len;
            self.cursor += slots;
        }
        extents
    }
}

impl PageTable {
    /// Lay out tensors of the given `(numel, format)` in pages of at most `page_bytes`.
    pub fn new(tensors: &[(usize, StateFormat)], page_bytes: usize) -> anyhow::Result<Self> {
        let blocks_per_page = page_bytes / SLOT8_BYTES;
        let elems_per_page = page_bytes / SLOT_F32_BYTES;
        anyhow::ensure!(
            blocks_per_page > 0,
            "page size {page_bytes} B holds no 8-bit block ({SLOT8_BYTES} B)"
        );
        let mut p8 = Packer::new(blocks_per_page, BLOCKSIZE);
        let mut pf = Packer::new(elems_per_page, 1);
        let mut table = PageTable {
            page_bytes,
            pages8: Vec::new(),
            pages_f32: Vec::new(),
            extents8: Vec::new(),
            extents_f32: Vec::new(),
            tensors: Vec::with_capacity(tensors.len()),
        };
        for (i, &(numel, format)) in tensors.iter().enumerate() {
            let (packer, by_page) = match format {
                StateFormat::Blockwise8 => (&mut p8, &mut table.extents8),
                StateFormat::F32 => (&mut pf, &mut table.extents_f32),
            };
            let extents = packer.place(i, numel);
            for e in &extents {
                if by_page.len() <= e.page {
                    by_page.resize_with(e.page + 1, Vec::new);
                }
                by_page[e.page].push(*e);
            }
            table.tensors.push((format, extents));
        }
        table.pages8 = (0..p8.pages).map(|_| Page8::new(blocks_per_page)).collect();
        table.pages_f32 = (0..pf.pages)
            .map(|_| PageF32::new(elems_per_page))
            .collect();
        Ok(table)
    }

    pub fn page_bytes(&self) -> usize {
        self.page_bytes
    }

    pub fn pages8(&self) -> &[Page8] {
        &self.pages8
    }

    pub fn pages_f32(&self) -> &[PageF32] {
        &self.pages_f32
    }

    pub fn format(&self, tensor: usize) -> StateFormat {
        self.tensors[tensor].0
    }

    pub fn extents(&self, tensor: usize) -> &[Extent] {
        &self.tensors[tensor].1
    }

    /// Bytes of all pages, slack included.
    pub fn allocated_bytes(&self) -> usize {
        self.pages8.iter().map(Page8::bytes).sum::<usize>()
            + self.pages_f32.iter().map(PageF32::bytes).sum::<usize>()
    }

    /// Run one step page by page: every 8-bit page, then every f32 page.
    pub fn step(
        &mut self,
        backend: &mut dyn PageBackend,
        params: &mut [crate::optim::ParamRef<'_>],
        k8: &Bnb8Step,
        rule: &F32Rule,
    ) {
        for (page, extents) in self.pages8.iter_mut().zip(&self.extents8) {
            let mut work = gather(extents, params);
            backend.step_page8(page, &mut work, k8);
        }
        for (page, extents) in self.pages_f32.iter_mut().zip(&self.extents_f32) {
            let mut work = gather(extents, params);
            backend.step_page_f32(page, &mut work, rule);
        }
    }

    /// Every 8-bit page with its extents, then every f32 page with its extents, in the order
    /// [`Self::step`] visits them: for a step whose parameters are not host slices (device
    /// tensors, see `optim::cuda`).
    #[allow(clippy::type_complexity)]
    pub fn pages_mut(
        &mut self,
    ) -> (
        impl Iterator<Item = (&mut Page8, &[Extent])> + '_,
        impl Iterator<Item = (&mut PageF32, &[Extent])> + '_,
    ) {
        (
            self.pages8
                .iter_mut()
                .zip(self.extents8.iter().map(Vec::as_slice)),
            self.pages_f32
                .iter_mut()
                .zip(self.extents_f32.iter().map(Vec::as_slice)),
        )
    }

    /// A tensor's 8-bit state gathered from its pages: (codes1, codes2, absmax1, absmax2).
    pub fn read8(&self, tensor: usize) -> (Vec<u8>, Vec<u8>, Vec<f32>, Vec<f32>) {
        let mut out = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for e in self.extents(tensor) {
            let page = &self.pages8[e.page];
            let (b0, nb) = (e.slot / BLOCKSIZE, e.len.div_ceil(BLOCKSIZE));
            out.0
                .extend_from_slice(&page.codes1()[e.slot..e.slot + e.len]);
            out.1
                .extend_from_slice(&page.codes2()[e.slot..e.slot + e.len]);
            out.2.extend_from_slice(&page.absmax1()[b0..b0 + nb]);
            out.3.extend_from_slice(&page.absmax2()[b0..b0 + nb]);
        }
        out
    }

    /// Store a tensor's 8-bit state into its pages (inverse of [`Self::read8`]).
    pub fn write8(&mut self, tensor: usize, codes1: &[u8], codes2: &[u8], a1: &[f32], a2: &[f32]) {
        let extents = self.tensors[tensor].1.clone();
        for e in extents {
            let page = self.pages8[e.page].parts_mut();
            let (b0, nb) = (e.slot / BLOCKSIZE, e.len.div_ceil(BLOCKSIZE));
            let tb = e.offset / BLOCKSIZE;
            page.codes1[e.slot..e.slot + e.len].copy_from_slice(&codes1[e.offset..][..e.len]);
            page.codes2[e.slot..e.slot + e.len].copy_from_slice(&codes2[e.offset..][..e.len]);
            page.absmax1[b0..b0 + nb].copy_from_slice(&a1[tb..tb + nb]);
            page.absmax2[b0..b0 + nb].copy_from_slice(&a2[tb..tb + nb]);
        }
    }

    /// A tensor's f32 state gathered from its pages: (m, v).
    pub fn read_f32(&self, tensor: usize) -> (Vec<f32>, Vec<f32>) {
        let mut out = (Vec::new(), Vec::new());
        for e in self.extents(tensor) {
            let page = &self.pages_f32[e.page];
            out.0.extend_from_slice(&page.m()[e.slot..e.slot + e.len]);
            out.1.extend_from_slice(&page.v()[e.slot..e.slot + e.len]);
        }
        out
    }

    /// Store a tensor's f32 state into its pages (inverse of [`Self::read_f32`]).
    pub fn write_f32(&mut self, tensor: usize, m: &[f32], v: &[f32]) {
        let extents = self.tensors[tensor].1.clone();
        for e in extents {
            let (pm, pv) = self.pages_f32[e.page].parts_mut();
            pm[e.slot..e.slot + e.len].copy_from_slice(&m[e.offset..][..e.len]);
            pv[e.slot..e.slot + e.len].copy_from_slice(&v[e.offset..][..e.len]);
        }
    }
}

/// Borrow the parameter and gradient ranges of a page's extents (in increasing parameter
/// order, at most one per parameter).
fn gather<'p>(
    extents: &[Extent],
    params: &'p mut [crate::optim::ParamRef<'_>],
) -> Vec<ExtentWork<'p>> {
    let mut work = Vec::with_capacity(extents.len());
    let mut rest = params;
    let mut base = 0;
    for e in extents {
        let tail = std::mem::take(&mut rest);
        let (head, tail) = tail[e.param - base..]
            .split_first_mut()
            .expect("extent of a known parameter");
        rest = tail;
        base = e.param + 1;
        work.push(ExtentWork {
            slot: e.slot,
            param: &mut head.data[e.offset..e.offset + e.len],
            grad: &head.grad[e.offset..e.offset + e.len],
        });
    }
    work
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_are_packed_across_pages() {
        // A 2000 B page holds 3 block slots (1560 B) or 250 f32 element slots.
        let specs = [
            (1000, StateFormat::Blockwise8), // 4 blocks: pages 0 (3) and 1 (1)
            (300, StateFormat::F32),         // 250 + 50
            (256, StateFormat::Blockwise8),  // page 1, slot 1
            (10, StateFormat::F32),          // page 1 of f32
            (513, StateFormat::Blockwise8),  // 3 blocks: page 1 slot 2, page 2 (2)
        ];
        let t = PageTable::new(&specs, 2000).unwrap();
        assert_eq!(t.pages8().len(), 3);
        assert_eq!(t.pages_f32().len(), 2);
        assert_eq!(t.pages8()[0].blocks(), 3);
        assert_eq!(
            t.extents(0),
            &[
                Extent {
                    param: 0,
                    offset: 0,
                    len: 768,
                    page: 0,
                    slot: 0
                },
                Extent {
                    param: 0,
                    offset: 768,
                    len: 232,
                    page: 1,
                    slot: 0
                },
            ]
        );
        assert_eq!(
            t.extents(2),
            &[Extent {
                param: 2,
                offset: 0,
                len: 256,
                page: 1,
                slot: 256
            }]
        );
        assert_eq!(
            t.extents(4),
            &[
                Extent {
                    param: 4,
                    offset: 0,
                    len: 256,
                    page: 1,
                    slot: 512
                },
                Extent {
                    param: 4,
                    offset: 256,
                    len: 257,
                    page: 2,
                    slot: 0
                },
            ]
        );
        assert_eq!(
            t.extents(1),
            &[
                Extent {
                    param: 1,
                    offset: 0,
                    len: 250,
                    page: 0,
                    slot: 0
                },
                Extent {
                    param: 1,
                    offset: 250,
                    len: 50,
                    page: 1,
                    slot: 0
                },
            ]
        );
        assert_eq!(
            t.extents(3),
            &[Extent {
                param: 3,
                offset: 0,
                len: 10,
                page: 1,
                slot: 50
            }]
        );
        assert!(PageTable::new(&specs, 100).is_err());
    }

    #[test]
    fn read_write_round_trip() {
        let specs = [(1000, StateFormat::Blockwise8), (300, StateFormat::F32)];
        let mut t = PageTable::new(&specs, 2000).unwrap();
        let c1: Vec<u8> = (0..1000).map(|i| (i % 251) as u8).collect();
        let c2: Vec<u8> = (0..1000).map(|i| (i % 13) as u8).collect();
        let a1 = vec![1.0, 2.0, 3.0, 4.0];
        let a2 = vec![5.0, 6.0, 7.0, 8.0];
        t.write8(0, &c1, &c2, &a1, &a2);
        assert_eq!(t.read8(0), (c1, c2, a1, a2));
        let m: Vec<f32> = (0..300).map(|i| i as f32).collect();
        let v: Vec<f32> = (0..300).map(|i| -(i as f32)).collect();
        t.write_f32(1, &m, &v);
        assert_eq!(t.read_f32(1), (m, v));
    }
}
