//! The trainable model: a Gemma whose targeted projections carry LoRA adapters with a
//! dropout stream the trainer can position exactly.
//!
//! [`LoraLinear`] is PEFT's LoRA layer over any frozen [`Linear`] base: `y = base(x) +
//! scale · B(A(dropout(x)))`, `A: [r, in]`, `B: [out, r]`, `scale = alpha / r` (rsLoRA
//! `alpha / sqrt(r)`). The base is the frozen NF4 product of [`QLoraLinear::frozen`] (QLoRA, the
//! default) or a frozen f32 [`DenseLinear`]; either way its backward yields only `dx`, never a
//! weight gradient. Initialisation is [`LoraAdapter::init`]'s (PEFT: kaiming-uniform A, zero
//! B, per-layer seed from the run seed and the weight name), so a [`LoraBuilder`] starts from
//! the same adapter as the model crate's `QLoraBuilder` with the same seed.
//!
//! The adapter's terms are [`LoraAdapter`]'s (the same as in `QLoraLinear`); what differs is
//! the dropout stream. A resumed run must draw the same masks as an uninterrupted one, so
//! masks are not drawn from one stream that runs for the whole process but from a stream per
//! (layer, micro-batch): a shared [`DropoutClock`], set by the trainer to the global
//! micro-batch index before each forward, selects it. The training position alone then
//! determines every mask, and a checkpoint only has to record the position.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rupantor_model::linear::{DenseLinear, Linear, LinearBuilder, LinearRole, LinearWeight};
use rupantor_model::qlora::layer_seed;
pub use rupantor_model::DropoutClock;
use rupantor_model::{
    load_model, Gemma, InferenceBuilder, LoraAdapter, LoraConfig, NamedAdapter, QLoraLinear,
    QuantizedWeight,
};
use rupantor_quant::Nf4Tensor;
use serde::{Deserialize, Serialize};

use crate::rng::SplitMix64;

/// The seven projections PEFT calls `q_proj` ... `down_proj`, in model order.
pub const ALL_TARGETS: [LinearRole; 7] = [
    LinearRole::QProj,
    LinearRole::KProj,
    LinearRole::VProj,
    LinearRole::OProj,
    LinearRole::GateProj,
    LinearRole::UpProj,
    LinearRole::DownProj,
];

/// The role PEFT's module name `q_proj` ... `down_proj` stands for.
pub fn role_from_module(name: &str) -> Option<LinearRole> {
    ALL_TARGETS.into_iter().find(|r| r.module_name() == name)
}

/// How the frozen base weights are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BaseFormat {
    /// NF4 with double quantization, as bitsandbytes (QLoRA).
    #[default]
    Nf4,
    /// f32 as loaded (plain LoRA; exact comparisons, small models).
    Dense,
}

/// Which adapters to attach and how.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub lora: LoraConfig,
    pub targets: Vec<LinearRole>,
    /// Seeds the A initialisation and the dropout streams.
    pub seed: u64,
    pub base: BaseFormat,
    /// The model's activation dtype (f32 on the CPU; bf16 trains on a GPU). The adapters are
    /// f32 master weights either way.
    pub dtype: DType,
}

impl LoraSpec {
    /// The paper's setup (design §5): r 32, alpha 64, dropout 0.05, all seven projections.
    pub fn paper() -> Self {
        LoraSpec {
            lora: LoraConfig {
                rank: 32,
                alpha: 64.0,
                dropout: 0.05,
                rslora: false,
            },
            targets: ALL_TARGETS.to_vec(),
            seed: 0,
            base: BaseFormat::Nf4,
            dtype: DType::F32,
        }
    }
}

/// A LoRA adapter over a frozen base layer; see the module docs.
#[derive(Debug)]
pub struct LoraLinear {
    base: Box<dyn Linear>,
    lora: LoraAdapter,
    training: AtomicBool,
}

impl LoraLinear {
    /// `lora` (`A: [r, in]`, `B: [out, r]`) must fit `base`.
    pub fn new(base: Box<dyn Linear>, lora: LoraAdapter) -> candle_core::Result<Self> {
        let (_, a_in) = lora.a.dims2()?;
        let (b_out, _) = lora.b.dims2()?;
        if a_in != base.in_features() || b_out != base.out_features() {
            candle_core::bail!(
                "LoRA A {:?} / B {:?} do not fit a [{}, {}] layer",
                lora.a.dims(),
                lora.b.dims(),
                base.out_features(),
                base.in_features()
            );
        }
        Ok(Self {
            base,
            lora,
            training: AtomicBool::new(false),
        })
    }

    pub fn a(&self) -> &Var {
        &self.lora.a
    }

    pub fn b(&self) -> &Var {
        &self.lora.b
    }

    pub fn scale(&self) -> f64 {
        self.lora.scale
    }
}

impl Linear for LoraLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.base.forward(x)?;
        let dims = x.dims();
        let Some((&in_dim, lead)) = dims.split_last() else {
            candle_core::bail!("linear input must have at least one dimension");
        };
        let rows: usize = lead.iter().product();
        let x2 = x.reshape((rows, in_dim))?;
        let z = self
            .lora
            .forward(&x2, self.training.load(Ordering::Relaxed))?;
        let mut out_dims = lead.to_vec();
        out_dims.push(self.out_features());
        y + z.reshape(out_dims)?
    }

    fn in_features(&self) -> usize {
        self.base.in_features()
    }

    fn out_features(&self) -> usize {
        self.base.out_features()
    }

    fn trainable_vars(&self) -> Vec<Var> {
        vec![self.lora.a.clone(), self.lora.b.clone()]
    }

    /// `dy · (W + scale · B A)` (the eval-mode map's derivative).
    fn input_grad(&self, dy: &Tensor) -> candle_core::Result<Tensor> {
        let dx = self.base.input_grad(dy)?;
        let dims = dy.dims();
        let Some((&out_dim, lead)) = dims.split_last() else {
            candle_core::bail!("input_grad needs at least one dimension");
        };
        let rows: usize = lead.iter().product();
        let z = self
            .lora
            .input_grad(&dy.detach().reshape((rows, out_dim))?)?;
        let shape = dx.shape().clone();
        dx + z.reshape(shape)?
    }

    fn set_training(&self, training: bool) {
        self.training.store(training, Ordering::Relaxed);
        self.base.set_training(training);
    }

    fn replay_dropout(&self) {
        self.lora.replay_dropout();
        self.base.replay_dropout();
    }
}

/// Builds the trainable model while the checkpoint streams in: each projection becomes a
/// frozen base (NF4 or f32, per [`LoraSpec::base`]); targeted ones get a [`LoraLinear`]. The
/// lm_head stays a frozen f32 dense layer.
#[derive(Debug)]
pub struct LoraBuilder {
    pub spec: LoraSpec,
    pub device: Device,
    clock: DropoutClock,
    adapters: Vec<NamedAdapter>,
}

impl LoraBuilder {
    pub fn new(spec: LoraSpec, device: &Device) -> Self {
        Self {
            spec,
            device: device.clone(),
            clock: DropoutClock::default(),
            adapters: Vec::new(),
        }
    }

    pub fn adapters(&self) -> &[NamedAdapter] {
        &self.adapters
    }

    fn wrap(
        &mut self,
        name: String,
        role: LinearRole,
        layer: Option<usize>,
        base: Box<dyn Linear>,
    ) -> candle_core::Result<Box<dyn Linear>> {
        if !self.spec.targets.contains(&role) {
            return Ok(base);
        }
        let seed = layer_seed(self.spec.seed, &name);
        let init = LoraAdapter::init(
            &self.spec.lora,
            base.in_features(),
            base.out_features(),
            seed,
            &self.device,
        )?;
        self.adapters.push(NamedAdapter {
            name,
            role,
            layer,
            a: init.a.clone(),
            b: init.b.clone(),
        });
        // The dropout streams get their own seed, apart from the initialisation draws.
        let dropout_seed = SplitMix64::new(seed ^ 0x5DEE_CE66_D1CE_4E5B).next_u64();
        let lora = init.with_dropout_clock(self.clock.clone(), dropout_seed);
        Ok(Box::new(LoraLinear::new(base, lora)?))
    }
}

impl LinearBuilder for LoraBuilder {
    fn build(&mut self, w: LinearWeight) -> candle_core::Result<Box<dyn Linear>> {
        if w.role == LinearRole::LmHead {
            return Ok(Box::new(DenseLinear::new(
                w.weight
                    .to_device(&self.device)?
                    .to_dtype(self.spec.dtype)?,
            )?));
        }
        let base: Box<dyn Linear> = match self.spec.base {
            BaseFormat::Dense => Box::new(DenseLinear::new(
                w.weight
                    .to_device(&self.device)?
                    .to_dtype(self.spec.dtype)?,
            )?),
            BaseFormat::Nf4 => {
                let shape = w.weight.dims().to_vec();
                let data = w
                    .weight
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                Box::new(QLoraLinear::frozen(
                    Nf4Tensor::quantize_f32(&data, &shape),
                    &self.device,
                )?)
            }
        };
        self.wrap(w.name, w.role, w.layer, base)
    }

    fn dtype(&self) -> DType {
        self.spec.dtype
    }

    fn build_quantized(&mut self, w: QuantizedWeight) -> candle_core::Result<Box<dyn Linear>> {
        match self.spec.base {
            BaseFormat::Nf4 => {
                let base = Box::new(QLoraLinear::frozen(w.weight, &self.device)?);
                self.wrap(w.name, w.role, w.layer, base)
            }
            BaseFormat::Dense => {
                let weight = Tensor::from_vec(w.weight.dequantize(), w.weight.shape, &Device::Cpu)?;
                self.build(LinearWeight {
                    name: w.name,
                    role: w.role,
                    layer: w.layer,
                    weight,
                })
            }
        }
    }
}

/// A Gemma with LoRA adapters, ready to train or to run with a loaded adapter.
#[derive(Debug)]
pub struct LoraModel {
    model: Gemma,
    adapters: Vec<NamedAdapter>,
    spec: LoraSpec,
    clock: DropoutClock,
}

impl LoraModel {
    /// Loads `path` (HF directory or GGUF file) with adapters per `spec`.
    pub fn load(path: &Path, device: &Device, spec: LoraSpec) -> Result<Self> {
        Self::build(spec, device, |b| {
            load_model(path, device, b).with_context(|| format!("load {}", path.display()))
        })
    }

    /// Builds the model with `load`, which must send every linear weight through the builder.
    pub fn build(
        spec: LoraSpec,
        device: &Device,
        load: impl FnOnce(&mut LoraBuilder) -> Result<Gemma>,
    ) -> Result<Self> {
        anyhow::ensure!(
            !spec.targets.is_empty(),
            "LoRA needs at least one target module"
        );
        anyhow::ensure!(
            !spec.targets.contains(&LinearRole::LmHead),
            "the lm_head is frozen; LoRA targets are q,k,v,o,gate,up,down_proj"
        );
        let mut builder = LoraBuilder::new(spec, device);
        let model = load(&mut builder)?;
        anyhow::ensure!(
            !builder.adapters.is_empty(),
            "no LoRA adapter was attached (no weight had a targeted role)"
        );
        Ok(Self {
            model,
            adapters: builder.adapters,
            spec: builder.spec,
            clock: builder.clock,
        })
    }

    /// Loads `model_path` with its base weights held as `base` (NF4 for a QLoRA adapter) and
    /// the PEFT adapter in `adapter_dir` applied (its rank, alpha, rsLoRA and targets from
    /// `adapter_config.json`): what `generate --adapter` runs. A frozen lm_head whose values
    /// are exact 8-bit blocks (the 270M GGUF's tied Q8_0 embedding) is held in that form on
    /// the CPU, as the inference loader does: the same values, a quarter of the bytes read per
    /// decoded token. Callers that generate switch training off.
    pub fn load_with_adapter(
        model_path: &Path,
        adapter_dir: &Path,
        device: &Device,
        dtype: DType,
        base: BaseFormat,
    ) -> Result<Self> {
        let cfg = crate::adapter::AdapterConfig::load(adapter_dir)?;
        let spec = LoraSpec {
            lora: cfg.lora(),
            targets: cfg.targets.clone(),
            seed: 0,
            base,
            dtype,
        };
        let m = Self::build(spec, device, |b| {
            let mut head = InferenceBuilder::new(b, device.is_cpu());
            load_model(model_path, device, &mut head)
                .with_context(|| format!("load {}", model_path.display()))
        })?;
        crate::adapter::load_adapter_weights(adapter_dir, m.adapters())?;
        Ok(m)
    }

    pub fn model(&self) -> &Gemma {
        &self.model
    }

    pub fn spec(&self) -> &LoraSpec {
        &self.spec
    }

    /// Every adapter in load order (layer by layer, q, k, v, o, gate, up, down).
    pub fn adapters(&self) -> &[NamedAdapter] {
        &self.adapters
    }

    /// The trainable variables, `A` then `B` of each adapter in order.
    pub fn vars(&self) -> Vec<Var> {
        self.adapters
            .iter()
            .flat_map(|a| [a.a.clone(), a.b.clone()])
            .collect()
    }

    /// Selects the dropout masks of the next forward passes (see the module docs).
    pub fn set_dropout_clock(&self, tick: u64) {
        self.clock.set(tick);
    }

    pub fn set_training(&self, training: bool) {
        self.model.set_training(training);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(data: Vec<f32>, shape: &[usize]) -> Tensor {
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut r = SplitMix64::new(seed);
        (0..n)
            .map(|_| 2.0 * ((r.next_u64() >> 40) as f32 / (1u64 << 24) as f32) - 1.0)
            .collect()
    }

    /// A rank-2 adapter (scale 2) with masks from `clock`'s stream for `seed`.
    fn adapter(a: Var, b: Var, dropout: f32, seed: u64, clock: &DropoutClock) -> LoraAdapter {
        LoraAdapter::from_vars(a, b, 2.0, dropout, 0)
            .unwrap()
            .with_dropout_clock(clock.clone(), seed)
    }

    fn layer(dropout: f32, clock: &DropoutClock) -> LoraLinear {
        let w = t(values(6 * 8, 1), &[6, 8]);
        let a = Var::from_tensor(&t(values(2 * 8, 2), &[2, 8])).unwrap();
        let b = Var::from_tensor(&t(values(6 * 2, 3), &[6, 2])).unwrap();
        LoraLinear::new(
            Box::new(DenseLinear::new(w).unwrap()),
            adapter(a, b, dropout, 9, clock),
        )
        .unwrap()
    }

    #[test]
    fn forward_and_input_grad_are_base_plus_scaled_low_rank() -> candle_core::Result<()> {
        let clock = DropoutClock::default();
        let l = layer(0.0, &clock);
        let x = Var::from_tensor(&t(values(3 * 8, 4), &[1, 3, 8]))?;
        let y = l.forward(x.as_tensor())?;
        let w = l.base.forward(x.as_tensor())?;
        let x2 = x.as_tensor().reshape((3, 8))?;
        let want = (w.reshape((3, 6))? + (x2.matmul(&l.a().t()?)?.matmul(&l.b().t()?)? * 2.0)?)?;
        let d = (y.reshape((3, 6))? - &want)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d < 1e-6, "forward off by {d}");
        let dy = t(values(3 * 6, 5), &[1, 3, 6]);
        let grads = (&y * &dy)?.sum_all()?.backward()?;
        let dx = grads.get(x.as_tensor()).unwrap();
        let ig = l.input_grad(&dy)?;
        let d = (dx - ig)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-6, "input_grad off by {d}");
        Ok(())
    }

    #[test]
    fn dropout_masks_follow_the_clock_not_the_call_history() -> candle_core::Result<()> {
        let clock = DropoutClock::default();
        let l = layer(0.5, &clock);
        l.set_training(true);
        let x = Tensor::ones((40, 8), DType::F32, &Device::Cpu)?;
        let at = |tick: u64| -> candle_core::Result<Vec<f32>> {
            clock.set(tick);
            l.lora.dropout(&x)?.flatten_all()?.to_vec1::<f32>()
        };
        let m3 = at(3)?;
        assert!(m3.iter().all(|&v| v == 0.0 || v == 2.0));
        let dropped = m3.iter().filter(|&&v| v == 0.0).count() as f64 / m3.len() as f64;
        assert!((dropped - 0.5).abs() < 0.1, "dropped {dropped}");
        let m4 = at(4)?;
        assert_ne!(m3, m4);
        // Coming back to tick 3 (as a resumed run does) gives tick 3's mask again.
        assert_eq!(at(3)?, m3);
        // A second layer with another seed draws other masks at the same tick.
        let other = adapter(l.a().clone(), l.b().clone(), 0.5, 10, &clock);
        clock.set(3);
        assert_ne!(other.dropout(&x)?.flatten_all()?.to_vec1::<f32>()?, m3);
        // Eval mode: no dropout at all.
        l.set_training(false);
        let y1 = l.forward(&x)?;
        clock.set(9);
        let y2 = l.forward(&x)?;
        assert_eq!(y1.to_vec2::<f32>()?, y2.to_vec2::<f32>()?);
        Ok(())
    }
}
