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
//! [`paged::PageBackend`]; [`StateDict`] saves and restores it for resuming. Parameters held as
//! CUDA tensors are stepped on the GPU by kernels/adamw.cu (feature `cuda`), page by page with
//! the state still in host pages, and bit-identical to the host step (see
//! [`Optimizer::step_tensors`]).

#[cfg(feature = "cuda")]
mod cuda;
pub mod kernels;
pub mod paged;
mod state_dict;

#[cfg(test)]
mod exactness_tests;

pub use paged::{CpuBackend, PageBackend, StateFormat, DEFAULT_PAGE_BYTES};
pub use state_dict::{OptimKind, OptimMeta, ParamMeta, StateDict, StateTensor};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
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
    /// The engine of the last step: the page backend's name (`"cpu"`), or `"cuda"` when CUDA
    /// tensors were stepped on the GPU.
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
    /// One update of every parameter held as a variable, with its gradient, in the order of
    /// the specs: f32 tensors with the spec's element count, all on one device. The update is
    /// [`Self::step`]'s, bit for bit, on any device: CPU tensors go through the host step;
    /// CUDA tensors (feature `cuda`) are updated in place on the GPU by kernels/adamw.cu while
    /// the state stays in host pages, one page on the device at a time. The arguments are
    /// checked before anything changes; a device fault part-way through a step leaves the
    /// state partly updated, so a run that hits one resumes from its last checkpoint.
    fn step_tensors(&mut self, params: &[(Var, Tensor)]) -> Result<()>;
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
    /// The kernels and staging page of the GPU that CUDA tensors were last stepped on. Declared
    /// before `table` so it is dropped first: it pins the table's pages and unpins them on drop.
    #[cfg(feature = "cuda")]
    cuda: Option<cuda::CudaPager>,
    table: PageTable,
    backend: Box<dyn PageBackend>,
    /// Whether the last step ran on `cuda` (what [`PagingReport`] describes).
    #[cfg(feature = "cuda")]
    on_device: bool,
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
            #[cfg(feature = "cuda")]
            cuda: None,
            table,
            backend: Box::new(CpuBackend::new()),
            #[cfg(feature = "cuda")]
            on_device: false,
        })
    }

    /// The scalars of the next step (`self.step` already counts it): the 8-bit rule and the
    /// f32-state rule of this optimizer's kind.
    fn step_scalars(&self) -> (Bnb8Step, F32Rule) {
        let k8 = Bnb8Step::new(&self.config, self.step);
        let rule = match self.kind {
            OptimKind::Adamw => F32Rule::Torch(TorchStep::new(&self.config, self.step)),
            OptimKind::Adamw8bit => F32Rule::Bnb(Bnb32Step::new(&self.config, self.step)),
        };
        (k8, rule)
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
        let (k8, rule) = self.step_scalars();
        self.table.step(&mut *self.backend, params, &k8, &rule);
        #[cfg(feature = "cuda")]
        {
            self.on_device = false;
        }
        Ok(())
    }

    fn step_tensors(&mut self, params: &[(Var, Tensor)]) -> Result<()> {
        ensure!(
            params.len() == self.params.len(),
            "step got {} parameters, the optimizer has {}",
            params.len(),
            self.params.len()
        );
        let device = params
            .first()
            .map_or(Device::Cpu, |(v, _)| v.device().clone());
        for ((var, grad), spec) in params.iter().zip(&self.params) {
            ensure!(
                var.elem_count() == spec.numel && grad.elem_count() == spec.numel,
                "parameter {:?}: expected {} elements, got a variable of shape {:?} and a \
                 gradient of shape {:?}",
                spec.name,
                spec.numel,
                var.dims(),
                grad.dims()
            );
            ensure!(
                var.dtype() == DType::F32 && grad.dtype() == DType::F32,
                "parameter {:?}: the optimizer steps f32 tensors, got a {:?} variable and a \
                 {:?} gradient",
                spec.name,
                var.dtype(),
                grad.dtype()
            );
            ensure!(
                var.device().same_device(&device) && grad.device().same_device(&device),
                "parameter {:?}: every variable and gradient must be on one device ({:?}), got \
                 {:?} and {:?}",
                spec.name,
                device,
                var.device(),
                grad.device()
            );
        }
        match &device {
            Device::Cpu => self.step_host_tensors(params),
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => self.step_cuda(d, params),
            other => bail!(
                "the optimizer steps tensors on the CPU{}, not on {other:?}",
                if cfg!(feature = "cuda") {
                    " or a CUDA device"
                } else {
                    " (this build has no CUDA: rebuild with --features cuda)"
                }
            ),
        }
    }

    /// CPU tensors: their values through [`Self::step`], then back into the variables.
    fn step_host_tensors(&mut self, params: &[(Var, Tensor)]) -> Result<()> {
        let host = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
        let mut data = params
            .iter()
            .map(|(v, _)| host(v.as_tensor()))
            .collect::<Result<Vec<_>>>()?;
        let grads = params
            .iter()
            .map(|(_, g)| host(g))
            .collect::<Result<Vec<_>>>()?;
        {
            let mut refs: Vec<ParamRef<'_>> = data
                .iter_mut()
                .zip(&grads)
                .map(|(p, g)| ParamRef::new(p, g))
                .collect();
            self.step(&mut refs)?;
        }
        for ((var, _), (values, spec)) in params.iter().zip(data.into_iter().zip(&self.params)) {
            var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu)?)
                .with_context(|| format!("writing the stepped {:?}", spec.name))?;
        }
        Ok(())
    }

    /// CUDA tensors: page by page through the device pager (see [`cuda`]).
    #[cfg(feature = "cuda")]
    fn step_cuda(
        &mut self,
        dev: &candle_core::cuda_backend::CudaDevice,
        params: &[(Var, Tensor)],
    ) -> Result<()> {
        let device = Device::Cuda(dev.clone());
        if !self.cuda.as_ref().is_some_and(|p| p.is_on(&device)) {
            self.cuda = Some(cuda::CudaPager::new(dev, self.table.page_bytes())?);
        }
        // The kernels read gradients as flat arrays.
        let params = params
            .iter()
            .map(|(v, g)| Ok((v.clone(), g.contiguous()?)))
            .collect::<Result<Vec<_>>>()?;
        self.step += 1;
        let (k8, rule) = self.step_scalars();
        let pager = self.cuda.as_mut().expect("created above");
        pager.step(&mut self.table, &params, &k8, &rule)?;
        self.on_device = true;
        Ok(())
    }

    /// Name and resident pages of the engine that ran the last step.
    fn engine(&self) -> (&'static str, usize) {
        #[cfg(feature = "cuda")]
        if let Some(p) = self.cuda.as_ref().filter(|_| self.on_device) {
            return ("cuda", p.resident_pages());
        }
        (self.backend.name(), self.backend.resident_pages())
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
        let (backend, resident_pages) = self.engine();
        PagingReport {
            backend,
            page_bytes: self.table.page_bytes(),
            pages_8bit: self.table.pages8().len(),
            pages_f32: self.table.pages_f32().len(),
            resident_pages,
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
            fn step_tensors(&mut self, params: &[(Var, Tensor)]) -> Result<()> {
                self.0.step_tensors(params)
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
