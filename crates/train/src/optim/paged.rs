//! Paged optimizer state.
//!
//! The state of all trainable tensors lives in fixed-size host pages. There are two page
//! kinds, each a struct of arrays a kernel can stream as is:
//!
//! * [`Page8`]: slots of one 256-element block each — first- and second-moment codes (1 byte
//!   per element each) and their two f32 absmax — for tensors with 8-bit state;
//! * [`PageF32`]: f32 first and second moments (8 bytes per element) for tensors with f32
//!   state.
//!
//! Tensors are packed in order, each 8-bit tensor starting on a block slot, and may span pages;
//! the piece of a tensor inside one page is an [`Extent`]. A step walks the pages one by one
//! and hands each page, with the parameter and gradient slices of its extents, to a
//! [`PageBackend`]. Only that page is "in flight": the CPU backend updates it where it lies;
//! a CUDA backend uploads it (codes + absmax, or f32 moments) into a device staging buffer,
//! launches the update on the matching parameter ranges and writes the page back, so device
//! memory holds [`PageBackend::resident_pages`] pages of state, never the whole state. Every
//! update is element-wise (8-bit: block-wise), so results do not depend on the page size.

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

/// A page of 8-bit state: `blocks()` slots of [`BLOCKSIZE`] elements.
#[derive(Debug, Clone, PartialEq)]
pub struct Page8 {
    /// First-moment codes (bitsandbytes' `state1`).
    pub codes1: Vec<u8>,
    /// Second-moment codes (`state2`).
    pub codes2: Vec<u8>,
    /// Per-block absmax of the first moment (`absmax1`).
    pub absmax1: Vec<f32>,
    /// Per-block absmax of the second moment (`absmax2`).
    pub absmax2: Vec<f32>,
}

impl Page8 {
    fn new(blocks: usize) -> Self {
        Page8 {
            codes1: vec![0; blocks * BLOCKSIZE],
            codes2: vec![0; blocks * BLOCKSIZE],
            absmax1: vec![0.0; blocks],
            absmax2: vec![0.0; blocks],
        }
    }

    pub fn blocks(&self) -> usize {
        self.absmax1.len()
    }

    pub fn bytes(&self) -> usize {
        self.blocks() * SLOT8_BYTES
    }
}

/// A page of f32 state.
#[derive(Debug, Clone, PartialEq)]
pub struct PageF32 {
    /// First moment (`exp_avg` / `state1`).
    pub m: Vec<f32>,
    /// Second moment (`exp_avg_sq` / `state2`).
    pub v: Vec<f32>,
}

impl PageF32 {
    fn new(elems: usize) -> Self {
        PageF32 {
            m: vec![0.0; elems],
            v: vec![0.0; elems],
        }
    }

    pub fn len(&self) -> usize {
        self.m.len()
    }

    pub fn is_empty(&self) -> bool {
        self.m.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.len() * SLOT_F32_BYTES
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
        for w in work.iter_mut() {
            debug_assert_eq!(w.slot % BLOCKSIZE, 0);
            let n = w.param.len();
            let b0 = w.slot / BLOCKSIZE;
            let nb = n.div_ceil(BLOCKSIZE);
            (
                w.param.par_chunks_mut(BLOCKSIZE),
                w.grad.par_chunks(BLOCKSIZE),
                page.codes1[w.slot..w.slot + n].par_chunks_mut(BLOCKSIZE),
                page.codes2[w.slot..w.slot + n].par_chunks_mut(BLOCKSIZE),
                page.absmax1[b0..b0 + nb].par_iter_mut(),
                page.absmax2[b0..b0 + nb].par_iter_mut(),
            )
                .into_par_iter()
                .with_min_len(8)
                .for_each(|(p, g, c1, c2, a1, a2)| {
                    kernels::bnb_adam8_block(k, codec, p, g, c1, c2, a1, a2)
                });
        }
    }

    fn step_page_f32(&mut self, page: &mut PageF32, work: &mut [ExtentWork<'_>], rule: &F32Rule) {
        for w in work.iter_mut() {
            let n = w.param.len();
            (
                w.param.par_chunks_mut(F32_TASK),
                w.grad.par_chunks(F32_TASK),
                page.m[w.slot..w.slot + n].par_chunks_mut(F32_TASK),
                page.v[w.slot..w.slot + n].par_chunks_mut(F32_TASK),
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

    /// A tensor's 8-bit state gathered from its pages: (codes1, codes2, absmax1, absmax2).
    pub fn read8(&self, tensor: usize) -> (Vec<u8>, Vec<u8>, Vec<f32>, Vec<f32>) {
        let mut out = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for e in self.extents(tensor) {
            let page = &self.pages8[e.page];
            let (b0, nb) = (e.slot / BLOCKSIZE, e.len.div_ceil(BLOCKSIZE));
            out.0
                .extend_from_slice(&page.codes1[e.slot..e.slot + e.len]);
            out.1
                .extend_from_slice(&page.codes2[e.slot..e.slot + e.len]);
            out.2.extend_from_slice(&page.absmax1[b0..b0 + nb]);
            out.3.extend_from_slice(&page.absmax2[b0..b0 + nb]);
        }
        out
    }

    /// Store a tensor's 8-bit state into its pages (inverse of [`Self::read8`]).
    pub fn write8(&mut self, tensor: usize, codes1: &[u8], codes2: &[u8], a1: &[f32], a2: &[f32]) {
        let extents = self.tensors[tensor].1.clone();
        for e in extents {
            let page = &mut self.pages8[e.page];
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
            out.0.extend_from_slice(&page.m[e.slot..e.slot + e.len]);
            out.1.extend_from_slice(&page.v[e.slot..e.slot + e.len]);
        }
        out
    }

    /// Store a tensor's f32 state into its pages (inverse of [`Self::read_f32`]).
    pub fn write_f32(&mut self, tensor: usize, m: &[f32], v: &[f32]) {
        let extents = self.tensors[tensor].1.clone();
        for e in extents {
            let page = &mut self.pages_f32[e.page];
            page.m[e.slot..e.slot + e.len].copy_from_slice(&m[e.offset..][..e.len]);
            page.v[e.slot..e.slot + e.len].copy_from_slice(&v[e.offset..][..e.len]);
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
