//! Swappable linear layers.
//!
//! The model never names a concrete linear type: every projection is a `Box<dyn Linear>` built
//! by a [`LinearBuilder`] while the checkpoint streams in. Phase 1 has [`DenseLinear`]; the
//! QLoRA layer (frozen NF4 weight + LoRA A/B) plugs in through the same two traits, so the
//! loader can quantize each weight as soon as it is read and drop the f32 copy.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, DType, Device, Layout, MetalStorage, Result, Shape, Tensor,
    Var,
};
use rupantor_quant::Nf4Tensor;

/// What a linear weight is for; lets a builder pick LoRA targets (q,k,v,o,gate,up,down) and
/// treat the lm_head specially (frozen, chunked).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinearRole {
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
    LmHead,
}

impl LinearRole {
    /// The PEFT `target_modules` name.
    pub fn module_name(self) -> &'static str {
        match self {
            LinearRole::QProj => "q_proj",
            LinearRole::KProj => "k_proj",
            LinearRole::VProj => "v_proj",
            LinearRole::OProj => "o_proj",
            LinearRole::GateProj => "gate_proj",
            LinearRole::UpProj => "up_proj",
            LinearRole::DownProj => "down_proj",
            LinearRole::LmHead => "lm_head",
        }
    }
}

/// One weight handed to a [`LinearBuilder`]: `weight` is `[out_features, in_features]`, f32,
/// as stored by PyTorch's `nn.Linear`.
#[derive(Debug)]
pub struct LinearWeight {
    /// Checkpoint tensor name (for the tied lm_head: the embedding's name).
    pub name: String,
    pub role: LinearRole,
    /// Decoder layer index; `None` for the lm_head.
    pub layer: Option<usize>,
    pub weight: Tensor,
}

/// A linear map `y = x W^T` over the last dimension of `x`.
pub trait Linear: std::fmt::Debug + Send + Sync {
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    fn in_features(&self) -> usize;
    fn out_features(&self) -> usize;
    /// Variables an optimizer should update; frozen layers have none.
    fn trainable_vars(&self) -> Vec<Var> {
        Vec::new()
    }
    /// `dx = dy · W_eff` for `dy` of shape `[.., out_features]`, outside any autograd graph and
    /// without building a gradient for any parameter. Losses that compute their gradient
    /// eagerly chunk by chunk (the chunked LM loss) push it through the lm_head with this.
    fn input_grad(&self, dy: &Tensor) -> Result<Tensor>;
    /// Switches train-mode behaviour (LoRA dropout); layers without any ignore it.
    fn set_training(&self, _training: bool) {}
    /// Makes the next train-mode forward passes draw the dropout masks of the current clock
    /// tick from the start again (see [`crate::LoraAdapter::replay_dropout`]); layers without
    /// dropout ignore it.
    fn replay_dropout(&self) {}
}

/// A weight that arrives already in NF4 (a bitsandbytes 4-bit checkpoint); `weight.shape` is
/// `[out_features, in_features]`.
#[derive(Debug)]
pub struct QuantizedWeight {
    pub name: String,
    pub role: LinearRole,
    pub layer: Option<usize>,
    pub weight: Nf4Tensor,
}

/// Turns loaded weights into linear layers.
pub trait LinearBuilder {
    fn build(&mut self, w: LinearWeight) -> Result<Box<dyn Linear>>;

    /// The activation dtype of the model being built: the loader casts the embedding (and with
    /// it a tied lm_head) to it, and the forward pass computes in it (norms, softmax and loss
    /// stay f32). f32 on the CPU; bf16 is what a GPU trains in.
    fn dtype(&self) -> DType {
        DType::F32
    }

    /// Pre-quantized weights. By default they are dequantized to f32 (on the host) and go
    /// through [`LinearBuilder::build`], so every builder accepts quantized checkpoints; a QLoRA
    /// builder keeps the NF4 data as it is.
    fn build_quantized(&mut self, w: QuantizedWeight) -> Result<Box<dyn Linear>> {
        let weight = Tensor::from_vec(w.weight.dequantize(), w.weight.shape, &Device::Cpu)?;
        self.build(LinearWeight {
            name: w.name,
            role: w.role,
            layer: w.layer,
            weight,
        })
    }
}

impl<F: FnMut(LinearWeight) -> Result<Box<dyn Linear>>> LinearBuilder for F {
    fn build(&mut self, w: LinearWeight) -> Result<Box<dyn Linear>> {
        self(w)
    }
}

/// Builds frozen [`DenseLinear`]s on `device` in `dtype` (the unquantized path). Loaders hand
/// weights over on the host so a quantizing builder can work on them before anything reaches
/// the GPU (the tied lm_head excepted: it arrives as the embedding already on the device).
#[derive(Debug, Clone)]
pub struct DenseBuilder {
    pub device: Device,
    pub dtype: DType,
}

impl DenseBuilder {
    /// f32 weights on `device`.
    pub fn new(device: &Device) -> Self {
        Self::with_dtype(device, DType::F32)
    }

    pub fn with_dtype(device: &Device, dtype: DType) -> Self {
        Self {
            device: device.clone(),
            dtype,
        }
    }
}

impl LinearBuilder for DenseBuilder {
    fn build(&mut self, w: LinearWeight) -> Result<Box<dyn Linear>> {
        Ok(Box::new(DenseLinear::new(
            w.weight.to_device(&self.device)?.to_dtype(self.dtype)?,
        )?))
    }

    fn dtype(&self) -> DType {
        self.dtype
    }
}

/// A plain dense weight, frozen (a constant tensor) or trainable (a [`Var`]).
///
/// The frozen form never builds a weight gradient: candle's matmul backward computes the
/// gradient of both operands whether or not they are variables (for a tied 256k-vocabulary
/// lm_head that is a `[vocab, hidden]` f32 tensor per backward), so its product runs outside
/// the graph and a [`FrozenMatmulGrad`] op supplies only `dx = dy · W` (at the cost of one
/// copy of the output, and only when the input is part of a graph).
#[derive(Debug, Clone)]
pub struct DenseLinear {
    weight: Tensor,
    var: Option<Var>,
}

impl DenseLinear {
    pub fn new(weight: Tensor) -> Result<Self> {
        check_rank2(&weight)?;
        Ok(Self { weight, var: None })
    }

    /// A dense layer whose weight receives gradients.
    pub fn trainable(var: Var) -> Result<Self> {
        check_rank2(var.as_tensor())?;
        Ok(Self {
            weight: var.as_tensor().clone(),
            var: Some(var),
        })
    }

    /// `[out_features, in_features]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

fn check_rank2(w: &Tensor) -> Result<()> {
    if w.rank() != 2 {
        candle_core::bail!("linear weight must be [out, in], got shape {:?}", w.dims());
    }
    Ok(())
}

impl Linear for DenseLinear {
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
        // One 2-D GEMM over all leading positions: candle's batched matmul would need the
        // weight broadcast to every batch entry. The product runs in the weight's dtype and
        // the result comes back in the input's (an f32 loss chunk through a bf16 lm_head).
        let rows: usize = lead.iter().product();
        let x2 = x.reshape((rows, in_dim))?.to_dtype(self.weight.dtype())?;
        let y = if self.var.is_some() || !x2.track_op() {
            // Trainable: candle's backward gives both gradients, which is what we want.
            // Untracked input: no backward will ever run through this product.
            x2.matmul(&self.weight.t()?)?
        } else {
            let y = x2.detach().matmul(&self.weight.t()?)?;
            x2.apply_op2_arc(
                &y,
                Arc::new(Box::new(FrozenMatmulGrad {
                    weight: self.weight.clone(),
                })),
            )?
        };
        let mut out_dims = lead.to_vec();
        out_dims.push(self.out_features());
        y.reshape(out_dims)?.to_dtype(x.dtype())
    }

    fn input_grad(&self, dy: &Tensor) -> Result<Tensor> {
        dense_input_grad(&self.weight, dy)
    }

    fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    fn trainable_vars(&self) -> Vec<Var> {
        self.var.iter().cloned().collect()
    }
}

/// `dy · W` over the leading dimensions of `dy`, detached from any graph, computed in W's
/// dtype and returned in `dy`'s.
pub(crate) fn dense_input_grad(weight: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let dims = dy.dims();
    let Some((&out_dim, lead)) = dims.split_last() else {
        candle_core::bail!("input_grad needs at least one dimension");
    };
    let rows: usize = lead.iter().product();
    let dx = dy
        .detach()
        .reshape((rows, out_dim))?
        .to_dtype(weight.dtype())?
        .matmul(&weight.detach())?;
    let mut in_dims = lead.to_vec();
    in_dims.push(weight.dim(1)?);
    dx.reshape(in_dims)?.to_dtype(dy.dtype())
}

/// Attaches the input gradient of a frozen product `y = x W^T` to a `y` computed outside the
/// graph: the forward passes `y` through (a copy, on any device), the backward returns
/// `dx = dy · W` for `x` and nothing for `y`, so no tensor of W's shape is ever built.
pub struct FrozenMatmulGrad {
    /// `[out, in]`.
    pub weight: Tensor,
}

impl FrozenMatmulGrad {
    fn pass_through<S: BackendStorage>(y: &S, l: &Layout) -> Result<(S, Shape)> {
        Ok((y.try_clone(l)?, l.shape().clone()))
    }
}

impl CustomOp2 for FrozenMatmulGrad {
    fn name(&self) -> &'static str {
        "frozen-matmul-grad"
    }

    fn cpu_fwd(
        &self,
        _x: &CpuStorage,
        _xl: &Layout,
        y: &CpuStorage,
        yl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Self::pass_through(y, yl)
    }

    fn cuda_fwd(
        &self,
        _x: &CudaStorage,
        _xl: &Layout,
        y: &CudaStorage,
        yl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        Self::pass_through(y, yl)
    }

    fn metal_fwd(
        &self,
        _x: &MetalStorage,
        _xl: &Layout,
        y: &MetalStorage,
        yl: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        Self::pass_through(y, yl)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(dense_input_grad(&self.weight, grad)?), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_matches_manual_product_over_leading_dims() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[1f32, 2., 3.], [0., -1., 0.5]], &dev)?;
        let lin = DenseLinear::new(w)?;
        let x = Tensor::new(&[[[1f32, 1., 1.], [2., 0., -2.]]], &dev)?;
        let y = lin.forward(&x)?;
        assert_eq!(y.dims(), &[1, 2, 2]);
        assert_eq!(
            y.to_vec3::<f32>()?,
            vec![vec![vec![6., -0.5], vec![-4., -1.]]]
        );
        assert!(lin.trainable_vars().is_empty());
        Ok(())
    }

    #[test]
    fn dense_rejects_wrong_width() -> Result<()> {
        let dev = Device::Cpu;
        let lin = DenseLinear::new(Tensor::zeros((2, 3), candle_core::DType::F32, &dev)?)?;
        let err = lin
            .forward(&Tensor::zeros((4, 5), candle_core::DType::F32, &dev)?)
            .unwrap_err();
        assert!(err.to_string().contains("3 input features"), "{err}");
        Ok(())
    }

    #[test]
    fn trainable_dense_gets_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let var = Var::new(&[[1f32, 2.], [3., 4.]], &dev)?;
        let lin = DenseLinear::trainable(var.clone())?;
        let x = Tensor::new(&[[1f32, -1.]], &dev)?;
        let loss = lin.forward(&x)?.sum_all()?;
        let grads = loss.backward()?;
        let g = grads.get(var.as_tensor()).expect("gradient for the weight");
        // d(sum(x W^T))/dW[o][i] = x[i] for every output row.
        assert_eq!(g.to_vec2::<f32>()?, vec![vec![1., -1.], vec![1., -1.]]);
        assert_eq!(lin.trainable_vars().len(), 1);
        Ok(())
    }

    /// Every tensor in a gradient store, by shape.
    fn grad_shapes(grads: &candle_core::backprop::GradStore) -> Vec<Vec<usize>> {
        grads
            .get_ids()
            .map(|id| grads.get_id(*id).unwrap().dims().to_vec())
            .collect()
    }

    #[test]
    fn frozen_dense_gives_dx_and_never_a_weight_gradient() -> Result<()> {
        let dev = Device::Cpu;
        // [out 3, in 5]: distinct from every other shape in the graph.
        let w = Tensor::new(
            &[
                [0.5f32, -1., 2., 0.25, 1.5],
                [1., 0., -0.5, 3., -2.],
                [-1.5, 0.75, 1., -0.25, 0.5],
            ],
            &dev,
        )?;
        let x = Var::new(&[[1f32, 2., -1., 0.5, 3.], [0., -2., 1., 1., -1.]], &dev)?;
        let upstream = Tensor::new(&[[1f32, -2., 0.5], [3., 1., -1.]], &dev)?;

        // Reference: candle's own matmul, which also builds a W-shaped gradient.
        let plain = x.as_tensor().matmul(&w.t()?)?;
        let plain_grads = (plain.clone() * &upstream)?.sum_all()?.backward()?;
        assert!(grad_shapes(&plain_grads).contains(&vec![5, 3]));

        let lin = DenseLinear::new(w.clone())?;
        let y = lin.forward(x.as_tensor())?;
        assert_eq!(y.to_vec2::<f32>()?, plain.to_vec2::<f32>()?);
        let grads = (y * &upstream)?.sum_all()?.backward()?;
        let dx = grads.get(x.as_tensor()).expect("dx");
        let want = plain_grads.get(x.as_tensor()).unwrap();
        assert_eq!(dx.to_vec2::<f32>()?, want.to_vec2::<f32>()?);
        for shape in grad_shapes(&grads) {
            assert!(
                shape != [3, 5] && shape != [5, 3],
                "a weight-shaped gradient {shape:?} was built"
            );
        }
        // input_grad is the same product outside the graph.
        let ig = lin.input_grad(&upstream)?;
        assert_eq!(ig.to_vec2::<f32>()?, want.to_vec2::<f32>()?);
        Ok(())
    }
}
