//! The lm_head for inference on the NF4 path: the tied `[vocab, hidden]` embedding matrix held
//! as 8-bit blocks when that is lossless.
//!
//! Decoding reads the whole lm_head once per step; for Gemma-3 270M that is 671 MB in f32,
//! more than everything else together (the NF4 projections are ~55 MB), so it sets the decode
//! speed. When every value of the weight is exactly `q * scale` with int8 `q` and one scale
//! per 32 values — true of any tensor stored as GGUF Q8_0, such as the 270M file's
//! `token_embd.weight` — [`InferenceBuilder`] keeps it as a [`Q8Weight`] (8.5 bits per value,
//! bit-identical dequantized values) and multiplies it with the fused Q8 kernel. Anything else
//! (bf16/f32 checkpoints) stays the dense f32 layer QLoRA uses; nothing is rounded.
//!
//! The frozen product is a candle custom op: forward through the fused kernel for up to
//! [`FUSED_MAX_ROWS`] input rows, dequantized tiles + `gemm` beyond; backward gives only
//! `dx = dy · W` (tiles + `gemm`).
//!
//! The Q8 form is a CPU decode-speed measure and exists on the host only: the test reads the
//! host f32 values, so on a GPU (where the loader hands the builder the embedding already on
//! the device) the head stays the dense layer over the bf16 embedding, which is what
//! transformers runs and what cuBLAS reads at 2 bytes per weight. Its ops have no `cuda_fwd`
//! for that reason; candle's default names the op if one is ever reached.

use std::sync::Arc;

use crate::linear::{Linear, LinearBuilder, LinearRole, LinearWeight, QuantizedWeight};
use crate::qlora::{f32_rows, parallelism, FUSED_MAX_ROWS};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};
use rupantor_quant::{q8_matvecs_f32, Q8Weight};

/// Weight elements dequantized per tile on the `gemm` path.
const TILE_ELEMS: usize = 1 << 20;

/// A frozen `[out, in]` Q8 linear layer.
#[derive(Debug, Clone)]
pub struct Q8Linear {
    w: Arc<Q8Weight>,
}

impl Q8Linear {
    pub fn new(w: Q8Weight) -> Self {
        Self { w: Arc::new(w) }
    }
}

/// `y = x · W^T` for row-major `x: [m, in]`.
fn forward_rows(w: &Q8Weight, x: &[f32], m: usize) -> Vec<f32> {
    let mut y = vec![0f32; m * w.rows];
    if m <= FUSED_MAX_ROWS {
        q8_matvecs_f32(w, x, m, &mut y);
        return y;
    }
    let tile_rows = (TILE_ELEMS / w.cols).max(1);
    let mut tile = vec![0f32; tile_rows.min(w.rows) * w.cols];
    let mut r0 = 0;
    while r0 < w.rows {
        let r1 = (r0 + tile_rows).min(w.rows);
        let t = &mut tile[..(r1 - r0) * w.cols];
        w.dequantize_rows(r0, r1, t);
        // y[:, r0..r1] = x · t^T (t read column-major as [in, r1 - r0]).
        // SAFETY: every pointer/stride pair addresses elements inside `y` ([m, rows]), `x`
        // ([m, cols]) and `t` ([r1 - r0, cols]); the buffers do not overlap.
        unsafe {
            gemm::gemm(
                m,
                r1 - r0,
                w.cols,
                y.as_mut_ptr().add(r0),
                1,
                w.rows as isize,
                false,
                x.as_ptr(),
                1,
                w.cols as isize,
                t.as_ptr(),
                w.cols as isize,
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

/// `dx = dy · W` for row-major `dy: [m, out]`.
fn grad_rows(w: &Q8Weight, dy: &[f32], m: usize) -> Vec<f32> {
    let mut dx = vec![0f32; m * w.cols];
    let tile_rows = (TILE_ELEMS / w.cols).max(1);
    let mut tile = vec![0f32; tile_rows.min(w.rows) * w.cols];
    let mut r0 = 0;
    while r0 < w.rows {
        let r1 = (r0 + tile_rows).min(w.rows);
        let t = &mut tile[..(r1 - r0) * w.cols];
        w.dequantize_rows(r0, r1, t);
        // dx += dy[:, r0..r1] · t.
        // SAFETY: as in `forward_rows`; `dy.as_ptr().add(r0)` stays inside `dy` as r0 < rows.
        unsafe {
            gemm::gemm(
                m,
                w.cols,
                r1 - r0,
                dx.as_mut_ptr(),
                1,
                w.cols as isize,
                r0 > 0,
                dy.as_ptr().add(r0),
                1,
                w.rows as isize,
                t.as_ptr(),
                1,
                w.cols as isize,
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

struct Q8Matmul(Arc<Q8Weight>);

impl CustomOp1 for Q8Matmul {
    fn name(&self) -> &'static str {
        "q8-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, m) = f32_rows(self.name(), s, l, self.0.cols)?;
        let y = forward_rows(&self.0, x, m);
        Ok((CpuStorage::F32(y), Shape::from((m, self.0.rows))))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            dy.contiguous()?
                .apply_op1_no_bwd(&Q8MatmulGrad(self.0.clone()))?,
        ))
    }
}

struct Q8MatmulGrad(Arc<Q8Weight>);

impl CustomOp1 for Q8MatmulGrad {
    fn name(&self) -> &'static str {
        "q8-matmul-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (dy, m) = f32_rows(self.name(), s, l, self.0.rows)?;
        let dx = grad_rows(&self.0, dy, m);
        Ok((CpuStorage::F32(dx), Shape::from((m, self.0.cols))))
    }
}

impl Linear for Q8Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let Some((&in_dim, lead)) = dims.split_last() else {
            candle_core::bail!("linear input must have at least one dimension");
        };
        if in_dim != self.w.cols {
            candle_core::bail!(
                "linear expects {} input features, got {dims:?}",
                self.w.cols
            );
        }
        let rows: usize = lead.iter().product();
        let y = x
            .reshape((rows, in_dim))?
            .contiguous()?
            .apply_op1(Q8Matmul(self.w.clone()))?;
        let mut out = lead.to_vec();
        out.push(self.w.rows);
        y.reshape(out)
    }

    fn in_features(&self) -> usize {
        self.w.cols
    }

    fn out_features(&self) -> usize {
        self.w.rows
    }

    fn input_grad(&self, dy: &Tensor) -> Result<Tensor> {
        let dims = dy.dims();
        let Some((&out_dim, lead)) = dims.split_last() else {
            candle_core::bail!("input_grad needs at least one dimension");
        };
        let rows: usize = lead.iter().product();
        let dx = dy
            .detach()
            .reshape((rows, out_dim))?
            .contiguous()?
            .apply_op1_no_bwd(&Q8MatmulGrad(self.w.clone()))?;
        let mut out = lead.to_vec();
        out.push(self.w.cols);
        dx.reshape(out)
    }
}

/// What became of the lm_head while loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LmHeadForm {
    /// Held as exact 8-bit blocks.
    Q8,
    /// Left to the inner builder (f32).
    Dense,
}

/// Wraps a builder: every weight goes to `inner` except, when `try_q8` is set, an lm_head whose
/// values are exactly Q8 (see the module docs), which becomes a [`Q8Linear`].
pub struct InferenceBuilder<'a> {
    pub inner: &'a mut dyn LinearBuilder,
    pub try_q8: bool,
    /// Set once the lm_head has been built.
    pub lm_head: Option<LmHeadForm>,
}

impl<'a> InferenceBuilder<'a> {
    pub fn new(inner: &'a mut dyn LinearBuilder, try_q8: bool) -> Self {
        Self {
            inner,
            try_q8,
            lm_head: None,
        }
    }
}

/// Exact Q8 blocks of a host f32 `[rows, cols]` tensor, read in place (no copy).
fn exact_q8(t: &Tensor) -> Result<Option<Q8Weight>> {
    let (rows, cols) = t.dims2()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
        return Ok(None);
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Ok(None);
    };
    Ok(Q8Weight::from_f32_exact(&data[start..end], rows, cols))
}

impl LinearBuilder for InferenceBuilder<'_> {
    fn dtype(&self) -> candle_core::DType {
        self.inner.dtype()
    }

    fn build(&mut self, w: LinearWeight) -> Result<Box<dyn Linear>> {
        if w.role == LinearRole::LmHead {
            if !self.try_q8 {
                self.lm_head = Some(LmHeadForm::Dense);
                return self.inner.build(w);
            }
            if let Some(q) = exact_q8(&w.weight)? {
                self.lm_head = Some(LmHeadForm::Q8);
                return Ok(Box::new(Q8Linear::new(q)));
            }
            self.lm_head = Some(LmHeadForm::Dense);
        }
        self.inner.build(w)
    }

    fn build_quantized(&mut self, w: QuantizedWeight) -> Result<Box<dyn Linear>> {
        self.inner.build_quantized(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::DenseBuilder;
    use candle_core::{Device, Var};

    /// A `[rows, cols]` tensor of Q8_0-representable values (block maxima +-127).
    fn q8_values(rows: usize, cols: usize) -> Vec<f32> {
        (0..rows * cols)
            .map(|e| {
                let q = if e % 32 == 0 {
                    127
                } else {
                    ((e * 37) % 255) as i32 - 127
                };
                let d = half::f16::from_f32(0.001 * (1 + e / 32 % 7) as f32).to_f32();
                q as f32 * d
            })
            .collect()
    }

    #[test]
    fn q8_lm_head_matches_the_dense_layer_forward_and_backward() -> Result<()> {
        let (vocab, hidden) = (300, 64);
        let w = Tensor::from_vec(q8_values(vocab, hidden), (vocab, hidden), &Device::Cpu)?;
        let mut dense = DenseBuilder::new(&Device::Cpu);
        let mut b = InferenceBuilder::new(&mut dense, true);
        let q8 = b.build(LinearWeight {
            name: "model.embed_tokens.weight".into(),
            role: LinearRole::LmHead,
            layer: None,
            weight: w.clone(),
        })?;
        assert_eq!(b.lm_head, Some(LmHeadForm::Q8));
        let reference = DenseBuilder::new(&Device::Cpu).build(LinearWeight {
            name: "w".into(),
            role: LinearRole::LmHead,
            layer: None,
            weight: w,
        })?;
        // Decode-sized and prefill-sized inputs (fused kernel, then tiles + gemm).
        for rows in [1, 3, FUSED_MAX_ROWS + 5] {
            let x: Vec<f32> = (0..rows * hidden)
                .map(|i| ((i * 7919) % 113) as f32 / 56.0 - 1.0)
                .collect();
            let x = Var::from_tensor(&Tensor::from_vec(x, (1, rows, hidden), &Device::Cpu)?)?;
            let got = q8.forward(x.as_tensor())?;
            let want = reference.forward(x.as_tensor())?;
            let diff = (&got - &want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-4, "rows {rows}: {diff}");
            // Backward through the op, and input_grad, give dy · W.
            let grads = got.sum_all()?.backward()?;
            let dx = grads.get(x.as_tensor()).expect("dx");
            let dy = Tensor::ones((1, rows, vocab), candle_core::DType::F32, &Device::Cpu)?;
            let want_dx = reference.input_grad(&dy)?;
            for g in [dx.clone(), q8.input_grad(&dy)?] {
                let d = (&g - &want_dx)?
                    .abs()?
                    .flatten_all()?
                    .max(0)?
                    .to_scalar::<f32>()?;
                assert!(d < 1e-3, "rows {rows}: dx {d}");
            }
        }
        Ok(())
    }

    #[test]
    fn inexact_weights_stay_dense() -> Result<()> {
        let w = Tensor::from_vec(
            (0..64).map(|i| (i as f32).sin()).collect::<Vec<_>>(),
            (2, 32),
            &Device::Cpu,
        )?;
        let mut dense = DenseBuilder::new(&Device::Cpu);
        let mut b = InferenceBuilder::new(&mut dense, true);
        b.build(LinearWeight {
            name: "lm".into(),
            role: LinearRole::LmHead,
            layer: None,
            weight: w,
        })?;
        assert_eq!(b.lm_head, Some(LmHeadForm::Dense));
        Ok(())
    }
}
