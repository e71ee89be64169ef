//! Swappable linear layers.
//!
//! The model never names a concrete linear type: every projection is a `Box<dyn Linear>` built
//! by a [`LinearBuilder`] while the checkpoint streams in. Phase 1 has [`DenseLinear`]; the
//! QLoRA layer (frozen NF4 weight + LoRA A/B) plugs in through the same two traits, so the
//! loader can quantize each weight as soon as it is read and drop the f32 copy.

use candle_core::{Device, Result, Tensor, Var};

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
}

/// Turns loaded weights into linear layers.
pub trait LinearBuilder {
    fn build(&mut self, w: LinearWeight) -> Result<Box<dyn Linear>>;
}

impl<F: FnMut(LinearWeight) -> Result<Box<dyn Linear>>> LinearBuilder for F {
    fn build(&mut self, w: LinearWeight) -> Result<Box<dyn Linear>> {
        self(w)
    }
}

/// Builds frozen [`DenseLinear`]s on `device` (the unquantized path). Loaders hand weights over
/// on the host so a quantizing builder can work on them before anything reaches the GPU.
#[derive(Debug, Clone)]
pub struct DenseBuilder {
    pub device: Device,
}

impl DenseBuilder {
    pub fn new(device: &Device) -> Self {
        Self {
            device: device.clone(),
        }
    }
}

impl LinearBuilder for DenseBuilder {
    fn build(&mut self, w: LinearWeight) -> Result<Box<dyn Linear>> {
        Ok(Box::new(DenseLinear::new(
            w.weight.to_device(&self.device)?,
        )?))
    }
}

/// A plain dense weight, frozen (a constant tensor) or trainable (a [`Var`]).
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
        // weight broadcast to every batch entry.
        let rows: usize = lead.iter().product();
        let y = x.reshape((rows, in_dim))?.matmul(&self.weight.t()?)?;
        let mut out_dims = lead.to_vec();
        out_dims.push(self.out_features());
        y.reshape(out_dims)
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
}
