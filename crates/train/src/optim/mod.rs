//! Paged AdamW optimizers over flat `f32` parameters.
//!
//! * [`AdamW`]: f32 moments, `torch.optim.AdamW` arithmetic (single-tensor CPU path).
//! * [`AdamW8bit`]: bitsandbytes 0.50 `AdamW8bit` as its CPU kernels step it: tensors with at
//!   least `min_8bit_size` (4096) elements keep block-wise 8-bit moments (blocksize 256, signed
//!   dynamic map for m, unsigned for v, re-quantized every step with bitsandbytes' CPU
//!   quantizer); smaller tensors keep f32 moments and bitsandbytes' 32-bit Adam arithmetic.
//!
//! Both apply decoupled weight decay as their references do: the parameter is multiplied by
//! `1 - lr * weight_decay` and then the Adam update is added to it, `p = p*(1 - lr*wd) + u`
//! (torch decays before updating the moments, bitsandbytes after; the moments never read the
//! parameter, so that order is immaterial; bitsandbytes skips the multiply when
//! `weight_decay == 0`). Bias correction, epsilon placement and step counting (the first step
//! is step 1) follow each reference exactly; see [`kernels`]. `AdamW8bit` has no percentile clipping and no `max_unorm` in bitsandbytes 0.50
//! (`Optimizer2State` fixes `gnorm_scale = 1` and `max_unorm = 0` for it), so neither exists
//! here.
//!
//! State lives in fixed-size pages ([`paged`]) updated one page at a time by a
//! [`paged::PageBackend`]; [`StateDict`] saves and restores it for resuming.

pub mod kernels;
pub mod paged;
mod state_dict;

#[cfg(test)]
mod exactness_tests;

pub use paged::{CpuBackend, PageBackend, StateFormat, DEFAULT_PAGE_BYTES};
pub use state_dict::{OptimKind, OptimMeta, ParamMeta, StateDict, StateTensor};

use anyhow::{bail, ensure, Result};
use kernels::{Bnb32Step, Bnb8Step, TorchStep};
use paged::{F32Rule, PageTable};
use serde::{Deserialize, Serialize};

/// AdamW hyperparameters. Defaults are `torch.optim.AdamW`'s and bitsandbytes'.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

impl AdamWConfig {
    /// The checks torch and bitsandbytes make at construction.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.lr >= 0.0, "invalid learning rate {}", self.lr);
        ensure!(self.eps >= 0.0, "invalid epsilon {}", self.eps);
        for (i, b) in [self.betas.0, self.betas.1].into_iter().enumerate() {
            ensure!(
                (0.0..1.0).contains(&b),
                "invalid beta parameter at index {i}: {b}"
            );
        }
        ensure!(
            self.weight_decay >= 0.0,
            "invalid weight_decay {}",
            self.weight_decay
        );
        Ok(())
    }
}

/// A trainable tensor as the optimizer knows it: a unique name and its element count.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ParamSpec {
    pub name: String,
    pub numel: usize,
}

impl ParamSpec {
    pub fn new(name: impl Into<String>, numel: usize) -> Self {
        ParamSpec {
            name: name.into(),
            numel,
        }
    }
}

/// One trainable tensor at step time: its flat data, updated in place, and its gradient.
#[derive(Debug)]
pub struct ParamRef<'a> {
    pub data: &'a mut [f32],
    pub grad: &'a [f32],
}

impl<'a> ParamRef<'a> {
    pub fn new(data: &'a mut [f32], grad: &'a [f32]) -> Self {
        ParamRef { data, grad }
    }
}

/// Layout options of the paged state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedOptions {
    /// Size of one state page in bytes (default 1 MiB). Results do not depend on it.
    pub page_bytes: usize,
    /// `AdamW8bit` keeps f32 state for tensors with fewer elements (bitsandbytes: 4096).
    /// Ignored by [`AdamW`].
    pub min_8bit_size: usize,
}

impl Default for PagedOptions {
    fn default() -> Self {
        PagedOptions {
            page_bytes: DEFAULT_PAGE_BYTES,
            min_8bit_size: 4096,
        }
    }
}

/// Where the state is and how much of it is in flight.
#[derive(Debug, Clone, PartialEq)]
pub struct PagingReport {
    pub backend: &'static str,
    pub page_bytes: usize,
    pub pages_8bit: usize,
    pub pages_f32: usize,
    /// Pages held on the compute device at once.
    pub resident_pages: usize,
    /// Bytes of state the tensors use (page slack excluded).
    pub state_bytes: usize,
    /// Bytes of all pages.
    pub allocated_bytes: usize,
}

/// What a trainer needs from an optimizer, whichever precision its state has.
pub trait Optimizer {
    /// One update of every parameter, in the order of the specs given at construction.
    fn step(&mut self, params: &mut [ParamRef<'_>]) -> Result<()>;
    /// Updates taken so far.
    fn steps(&self) -> u64;
    fn config(&self) -> &AdamWConfig;
    fn lr(&self) -> f64 {
        self.config().lr
    }
    /// Set the learning rate of the next steps (the schedule calls this before each step).
    fn set_lr(&mut self, lr: f64);
    fn params(&self) -> &[ParamSpec];
    /// State bytes per trainable parameter: 8 for f32 state; `2 + 8/256` for 8-bit state
    /// (plus the partial last block of each tensor); page slack excluded.
    fn state_bytes_per_param(&self) -> f64;
    fn paging(&self) -> PagingReport;
    /// A copy of the whole state, for checkpoints.
    fn state_dict(&self) -> StateDict;
    /// Restore state saved by [`Self::state_dict`] from an optimizer of the same kind over the
    /// same parameters: moments, step count and hyperparameters.
    fn load_state_dict(&mut self, state: &StateDict) -> Result<()>;
}

/// The paged machinery both optimizers share.
struct PagedAdamW {
    kind: OptimKind,
    config: AdamWConfig,
    min_8bit_size: usize,
    step: u64,
    params: Vec<ParamSpec>,
    table: PageTable,
    backend: Box<dyn PageBackend>,
}

impl std::fmt::Debug for PagedAdamW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagedAdamW")
            .field("kind", &self.kind)
            .field("config", &self.config)
            .field("step", &self.step)
            .field("params", &self.params.len())
            .field("backend", &self.backend.name())
            .finish_non_exhaustive()
    }
}

impl PagedAdamW {
    fn new(
        kind: OptimKind,
        params: Vec<ParamSpec>,
        config: AdamWConfig,
        options: PagedOptions,
    ) -> Result<Self> {
        config.validate()?;
        let mut seen = std::collections::HashSet::new();
        for p in &params {
            ensure!(
                seen.insert(&p.name),
                "duplicate parameter name {:?}",
                p.name
            );
        }
        let min_8bit_size = match kind {
            OptimKind::Adamw => usize::MAX,
            OptimKind::Adamw8bit => options.min_8bit_size,
        };
        let layout: Vec<(usize, StateFormat)> = params
            .iter()
            .map(|p| (p.numel, format_of(kind, p.numel, min_8bit_size)))
            .collect();
        let table = PageTable::new(&layout, options.page_bytes)?;
        Ok(PagedAdamW {
            kind,
            config,
            min_8bit_size,
            step: 0,
            params,
            table,
            backend: Box::new(CpuBackend::new()),
        })
    }

    fn step(&mut self, params: &mut [ParamRef<'_>]) -> Result<()> {
        ensure!(
            params.len() == self.params.len(),
            "step got {} parameters, the optimizer has {}",
            params.len(),
            self.params.len()
        );
        for (p, spec) in params.iter().zip(&self.params) {
            ensure!(
                p.data.len() == spec.numel && p.grad.len() == spec.numel,
                "parameter {:?}: expected {} elements, got data {} and grad {}",
                spec.name,
                spec.numel,
                p.data.len(),
                p.grad.len()
            );
        }
        // bitsandbytes and torch both count the step before using it: the first is step 1.
        self.step += 1;
        let k8 = Bnb8Step::new(&self.config, self.step);
        let rule = match self.kind {
            OptimKind::Adamw => F32Rule::Torch(TorchStep::new(&self.config, self.step)),
            OptimKind::Adamw8bit => F32Rule::Bnb(Bnb32Step::new(&self.config, self.step)),
        };
        self.table.step(&mut *self.backend, params, &k8, &rule);
        Ok(())
    }

    fn state_bytes(&self) -> usize {
        self.params
            .iter()
            .enumerate()
            .map(|(i, p)| self.table.format(i).state_bytes(p.numel))
            .sum()
    }

    fn state_bytes_per_param(&self) -> f64 {
        let numel: usize = self.params.iter().map(|p| p.numel).sum();
        if numel == 0 {
            return 0.0;
        }
        self.state_bytes() as f64 / numel as f64
    }

    fn paging(&self) -> PagingReport {
        PagingReport {
            backend: self.backend.name(),
            page_bytes: self.table.page_bytes(),
            pages_8bit: self.table.pages8().len(),
            pages_f32: self.table.pages_f32().len(),
            resident_pages: self.backend.resident_pages(),
            state_bytes: self.state_bytes(),
            allocated_bytes: self.table.allocated_bytes(),
        }
    }

    fn meta(&self) -> OptimMeta {
        OptimMeta {
            format_version: OptimMeta::FORMAT_VERSION,
            kind: self.kind,
            step: self.step,
            config: self.config,
            min_8bit_size: (self.kind == OptimKind::Adamw8bit).then_some(self.min_8bit_size),
            params: self
                .params
                .iter()
                .enumerate()
                .map(|(i, p)| ParamMeta {
                    name: p.name.clone(),
                    numel: p.numel,
                    format: self.table.format(i),
                })
                .collect(),
        }
    }

    fn state_dict(&self) -> StateDict {
        let mut tensors = std::collections::BTreeMap::new();
        for (i, p) in self.params.iter().enumerate() {
            match self.table.format(i) {
                StateFormat::Blockwise8 => {
                    let (c1, c2, a1, a2) = self.table.read8(i);
                    tensors.insert(state_key(&p.name, "state1"), StateTensor::U8(c1));
                    tensors.insert(state_key(&p.name, "state2"), StateTensor::U8(c2));
                    tensors.insert(state_key(&p.name, "absmax1"), StateTensor::F32(a1));
                    tensors.insert(state_key(&p.name, "absmax2"), StateTensor::F32(a2));
                }
                StateFormat::F32 => {
                    let (m, v) = self.table.read_f32(i);
                    tensors.insert(state_key(&p.name, "state1"), StateTensor::F32(m));
                    tensors.insert(state_key(&p.name, "state2"), StateTensor::F32(v));
                }
            }
        }
        StateDict {
            meta: self.meta(),
            tensors,
        }
    }

    fn load_state_dict(&mut self, state: &StateDict) -> Result<()> {
        let meta = &state.meta;
        let ours = self.meta();
        ensure!(
            meta.format_version == OptimMeta::FORMAT_VERSION,
            "optimizer state format {} (expected {})",
            meta.format_version,
            OptimMeta::FORMAT_VERSION
        );
        ensure!(
            meta.kind == self.kind,
            "optimizer state is {:?}, this optimizer is {:?}",
            meta.kind,
            self.kind
        );
        ensure!(
            meta.params.len() == ours.params.len(),
            "optimizer state has {} parameters, this optimizer {}",
            meta.params.len(),
            ours.params.len()
        );
        for (theirs, ours) in meta.params.iter().zip(&ours.params) {
            if theirs != ours {
                bail!("optimizer state parameter {theirs:?} does not match {ours:?}");
            }
        }
        meta.config.validate()?;
        // Check every tensor before touching any page.
        for (i, p) in self.params.iter().enumerate() {
            let blocks = p.numel.div_ceil(rupantor_quant::blockwise8::BLOCKSIZE);
            let expected: &[(&str, usize, bool)] = match self.table.format(i) {
                StateFormat::Blockwise8 => &[
                    ("state1", p.numel, true),
                    ("state2", p.numel, true),
                    ("absmax1", blocks, false),
                    ("absmax2", blocks, false),
                ],
                StateFormat::F32 => &[("state1", p.numel, false), ("state2", p.numel, false)],
            };
            for &(suffix, len, is_u8) in expected {
                let key = state_key(&p.name, suffix);
                match state.tensors.get(&key) {
                    Some(StateTensor::U8(v)) if is_u8 && v.len() == len => {}
                    Some(StateTensor::F32(v)) if !is_u8 && v.len() == len => {}
                    Some(_) => bail!("optimizer state tensor {key:?} has the wrong type or size"),
                    None => bail!("optimizer state lacks {key:?}"),
                }
            }
        }
        let u8s = |key: String| match &state.tensors[&key] {
            StateTensor::U8(v) => v.as_slice(),
            StateTensor::F32(_) => unreachable!("checked above"),
        };
        let f32s = |key: String| match &state.tensors[&key] {
            StateTensor::F32(v) => v.as_slice(),
            StateTensor::U8(_) => unreachable!("checked above"),
        };
        for (i, p) in self.params.iter().enumerate() {
            match self.table.format(i) {
                StateFormat::Blockwise8 => self.table.write8(
                    i,
                    u8s(state_key(&p.name, "state1")),
                    u8s(state_key(&p.name, "state2")),
                    f32s(state_key(&p.name, "absmax1")),
                    f32s(state_key(&p.name, "absmax2")),
                ),
                StateFormat::F32 => self.table.write_f32(
                    i,
                    f32s(state_key(&p.name, "state1")),
                    f32s(state_key(&p.name, "state2")),
                ),
            }
        }
        self.step = meta.step;
        self.config = meta.config;
        Ok(())
    }
}

fn format_of(kind: OptimKind, numel: usize, min_8bit_size: usize) -> StateFormat {
    match kind {
        OptimKind::Adamw8bit if numel >= min_8bit_size => StateFormat::Blockwise8,
        _ => StateFormat::F32,
    }
}

/// Name of a state tensor in a [`StateDict`]: `PARAM.state1` (m), `PARAM.state2` (v),
/// `PARAM.absmax1`, `PARAM.absmax2` — bitsandbytes' state keys.
pub fn state_key(param: &str, what: &str) -> String {
    format!("{param}.{what}")
}

macro_rules! optimizer_type {
    ($(#[$doc:meta])* $name:ident, $kind:expr) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub struct $name(PagedAdamW);

        impl $name {
            /// With default paging (1 MiB pages, 8-bit threshold 4096) on the CPU backend.
            pub fn new(params: Vec<ParamSpec>, config: AdamWConfig) -> Result<Self> {
                Self::with_options(params, config, PagedOptions::default())
            }

            pub fn with_options(
                params: Vec<ParamSpec>,
                config: AdamWConfig,
                options: PagedOptions,
            ) -> Result<Self> {
                PagedAdamW::new($kind, params, config, options).map($name)
            }

            /// Run page updates on another compute device.
            pub fn with_backend(mut self, backend: Box<dyn PageBackend>) -> Self {
                self.0.backend = backend;
                self
            }

            /// The state format of each parameter, in order.
            pub fn formats(&self) -> Vec<StateFormat> {
                (0..self.0.params.len()).map(|i| self.0.table.format(i)).collect()
            }
        }

        impl Optimizer for $name {
            fn step(&mut self, params: &mut [ParamRef<'_>]) -> Result<()> {
                self.0.step(params)
            }
            fn steps(&self) -> u64 {
                self.0.step
            }
            fn config(&self) -> &AdamWConfig {
                &self.0.config
            }
            fn set_lr(&mut self, lr: f64) {
                self.0.config.lr = lr;
            }
            fn params(&self) -> &[ParamSpec] {
                &self.0.params
            }
            fn state_bytes_per_param(&self) -> f64 {
                self.0.state_bytes_per_param()
            }
            fn paging(&self) -> PagingReport {
                self.0.paging()
            }
            fn state_dict(&self) -> StateDict {
                self.0.state_dict()
            }
            fn load_state_dict(&mut self, state: &StateDict) -> Result<()> {
                self.0.load_state_dict(state)
            }
        }
    };
}

optimizer_type!(
    /// AdamW with f32 moments and `torch.optim.AdamW`'s arithmetic (8 state bytes per
    /// parameter).
    AdamW,
    OptimKind::Adamw
);

optimizer_type!(
    /// AdamW with bitsandbytes 0.50 `AdamW8bit` semantics: 8-bit block-wise moments for
    /// tensors of at least `min_8bit_size` elements (`2 + 8/256` state bytes per parameter),
    /// f32 moments below it.
    AdamW8bit,
    OptimKind::Adamw8bit
);
