//! Next-token cross-entropy over chunks of positions, differentiable w.r.t. the hidden states.
//!
//! Computing the loss chunk by chunk is not enough on its own: autograd keeps every chunk's
//! `[chunk, vocab]` logits (and softmax) alive until `backward()`, so the whole batch's logits
//! would exist after all. Instead each chunk's loss *and* its gradient w.r.t. the hidden rows
//! (`(softmax - onehot) * softcap' · W`, pushed through the frozen lm_head with
//! [`Linear::input_grad`]) are computed at once and the chunk's logits are dropped; a custom op
//! then carries the summed loss with that stored gradient into the graph. Peak memory is one
//! chunk of logits plus a `[batch, seq, hidden]` gradient.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, MetalStorage, Result, Shape,
    Storage, Tensor, D,
};

use crate::linear::Linear;

/// Label value that contributes nothing to the loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// Summed next-token loss and the number of positions it covers.
#[derive(Debug, Clone)]
pub struct LmLoss {
    /// Scalar f32: the sum of the per-position NLL; differentiable w.r.t. the hidden states.
    pub sum: Tensor,
    /// Positions with a label other than [`IGNORE_INDEX`].
    pub tokens: usize,
}

impl LmLoss {
    /// Mean NLL per counted position, as HF's `ForCausalLMLoss` with reduction "mean"; zero
    /// (rather than NaN) when every label is ignored, so an all-prompt micro-batch adds nothing.
    pub fn mean(&self) -> Result<Tensor> {
        &self.sum / self.tokens.max(1) as f64
    }
}

/// Mean-free next-token cross-entropy of `head` (then `cap * tanh(logits / cap)` when
/// `softcap` is set) over final hidden states.
///
/// * `hidden`: `[batch, seq, hidden]`, the model's final-normed output.
/// * `labels`: `[batch, seq]`, HF convention: the input ids with [`IGNORE_INDEX`] where no
///   loss is wanted; position `t` predicts `labels[t + 1]` (the shift happens here).
/// * `chunk`: positions per chunk; at most `[chunk, vocab]` logits exist at any time.
///
/// `head` must be frozen: only the hidden states receive a gradient.
pub fn chunked_lm_loss(
    head: &dyn Linear,
    softcap: Option<f64>,
    hidden: &Tensor,
    labels: &Tensor,
    chunk: usize,
) -> Result<LmLoss> {
    let (b, s, h) = hidden.dims3()?;
    if labels.dims() != [b, s] {
        candle_core::bail!(
            "labels must be [batch {b}, seq {s}] like the hidden states, got {:?}",
            labels.dims()
        );
    }
    if chunk == 0 {
        candle_core::bail!("chunk must hold at least one position");
    }
    if h != head.in_features() {
        candle_core::bail!(
            "hidden size {h} but the lm_head expects {}",
            head.in_features()
        );
    }
    if !head.trainable_vars().is_empty() {
        candle_core::bail!(
            "chunked_lm_loss gives gradients to the hidden states only; the lm_head must be frozen"
        );
    }
    let vocab = head.out_features();
    let dev = hidden.device();

    // Rows of the flattened [b * s, h] hidden states that predict a label, and those labels.
    let labels = labels.to_dtype(DType::I64)?.to_vec2::<i64>()?;
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (bi, row) in labels.iter().enumerate() {
        for t in 0..s.saturating_sub(1) {
            let y = row[t + 1];
            if y == IGNORE_INDEX {
                continue;
            }
            if y < 0 || y as usize >= vocab {
                candle_core::bail!("label {y} at [{bi}, {}] is outside the vocabulary", t + 1);
            }
            rows.push((bi * s + t) as u32);
            targets.push(y as u32);
        }
    }
    let tokens = rows.len();
    let need_grad = hidden.track_op();
    let flat = hidden.detach().reshape((b * s, h))?;

    let mut sum = 0f64;
    let mut grads = Vec::new();
    for (row_ids, target_ids) in rows.chunks(chunk).zip(targets.chunks(chunk)) {
        let m = row_ids.len();
        let row_ids = Tensor::from_slice(row_ids, m, dev)?;
        let x = flat.index_select(&row_ids, 0)?.to_dtype(DType::F32)?;
        let z = head.forward(&x)?.to_dtype(DType::F32)?;
        let (nll, dz) = xent_fused(&z, target_ids, softcap, need_grad)?;
        sum += nll;
        if let Some(dz) = dz {
            grads.push(head.input_grad(&dz)?.to_dtype(DType::F32)?);
        }
    }
    let value = Tensor::new(sum as f32, dev)?;
    if !need_grad {
        return Ok(LmLoss { sum: value, tokens });
    }
    let mut grad = Tensor::zeros((b * s, h), DType::F32, dev)?;
    if tokens > 0 {
        let rows = Tensor::from_vec(rows, tokens, dev)?;
        grad = grad.index_add(&rows, &Tensor::cat(&grads, 0)?, 0)?;
    }
    let grad = grad.reshape((b, s, h))?;
    let sum = hidden.apply_op1(PrecomputedLoss { value, grad })?;
    Ok(LmLoss { sum, tokens })
}

/// The summed NLL of `targets` under `z` (`[m, vocab]` f32 logits, before the softcap) and,
/// with `grad`, its gradient w.r.t. `z`: one fused pass per row where `z` lives (the CPU
/// kernel below, or its GPU twin in `kernels/xent.cu`).
fn xent_fused(
    z: &Tensor,
    targets: &[u32],
    softcap: Option<f64>,
    grad: bool,
) -> Result<(f64, Option<Tensor>)> {
    match z.device() {
        Device::Cpu => xent_fused_cpu(z, targets, softcap, grad),
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => xent_fused_cuda(z, targets, softcap, grad),
        _ => xent_composed(z, targets, softcap, grad),
    }
}

/// The same NLL and gradient through candle's ops: about seven `[m, vocab]` temporaries. The
/// reference the fused kernels are tested against.
fn xent_composed(
    z: &Tensor,
    targets: &[u32],
    softcap: Option<f64>,
    grad: bool,
) -> Result<(f64, Option<Tensor>)> {
    let (m, vocab) = z.dims2()?;
    let dev = z.device();
    let (logits, tanh) = match softcap {
        Some(c) => {
            let t = (z / c)?.tanh()?;
            ((&t * c)?, Some(t))
        }
        None => (z.clone(), None),
    };
    let max = logits.max_keepdim(D::Minus1)?;
    let exp = logits.broadcast_sub(&max)?.exp()?;
    let sum_exp = exp.sum_keepdim(D::Minus1)?;
    let lse = (sum_exp.log()? + &max)?;
    let vocab_ids = Tensor::arange(0u32, vocab as u32, dev)?.unsqueeze(0)?;
    let target_ids = Tensor::from_slice(targets, (m, 1), dev)?;
    let onehot = target_ids.broadcast_eq(&vocab_ids)?.to_dtype(DType::F32)?;
    let target_logit = (&logits * &onehot)?.sum_keepdim(D::Minus1)?;
    let nll = (lse - target_logit)?
        .to_dtype(DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?;
    if !grad {
        return Ok((nll, None));
    }
    // d nll / d logits = softmax - onehot; through the softcap, times 1 - tanh^2.
    let mut dz = (exp.broadcast_div(&sum_exp)? - onehot)?;
    if let Some(t) = tanh {
        dz = (dz * (1.0 - t.sqr()?)?)?;
    }
    Ok((nll, Some(dz)))
}

/// [`xent_composed`] as one pass per row on the host: the gradient is written into the one
/// output buffer, so a chunk costs one `[m, vocab]` buffer besides `z` instead of seven
/// (at 256 positions and Gemma's 262,144-word vocabulary each is 256 MiB), and the rows are
/// split across candle's threads.
fn xent_fused_cpu(
    z: &Tensor,
    targets: &[u32],
    softcap: Option<f64>,
    grad: bool,
) -> Result<(f64, Option<Tensor>)> {
    let (m, vocab) = z.dims2()?;
    let z = z.contiguous()?;
    let (storage, layout) = z.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
        candle_core::bail!("fused cross-entropy needs f32 logits on the CPU");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("fused cross-entropy needs contiguous logits");
    };
    let z = &data[start..end];
    // Each thread takes a run of rows; a row's gradient (or, without `grad`, its scratch)
    // is written over its capped logits in `out`.
    let mut out = vec![0f32; m * vocab];
    let threads = candle_core::utils::get_num_threads().max(1);
    let rows_per = m.div_ceil(threads).max(1);
    let nll: f64 = std::thread::scope(|scope| {
        let handles: Vec<_> = out
            .chunks_mut(rows_per * vocab)
            .zip(z.chunks(rows_per * vocab))
            .zip(targets.chunks(rows_per))
            .map(|((out, z), targets)| {
                scope.spawn(move || {
                    out.chunks_mut(vocab)
                        .zip(z.chunks(vocab))
                        .zip(targets)
                        .map(|((dz, zr), &t)| xent_row(zr, t as usize, softcap, grad, dz))
                        .sum::<f64>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("xent worker"))
            .sum()
    });
    let dz = if grad {
        Some(Tensor::from_vec(out, (m, vocab), &Device::Cpu)?)
    } else {
        None
    };
    Ok((nll, dz))
}

/// [`xent_fused_cpu`] on the GPU (`kXentRows_f32`): one thread block per row, the per-row
/// NLL in f64 summed on the host, the gradient written into one `[m, vocab]` buffer.
#[cfg(feature = "cuda")]
fn xent_fused_cuda(
    z: &Tensor,
    targets: &[u32],
    softcap: Option<f64>,
    grad: bool,
) -> Result<(f64, Option<Tensor>)> {
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    let (m, vocab) = z.dims2()?;
    if m == 0 {
        return Ok((0.0, grad.then(|| z.zeros_like()).transpose()?));
    }
    let vocab_i32 =
        i32::try_from(vocab).map_err(|_| candle_core::Error::msg("vocabulary past i32"))?;
    let z = z.to_dtype(DType::F32)?.contiguous()?;
    let (storage, layout) = z.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        candle_core::bail!("fused cross-entropy: the logits are not on a GPU");
    };
    let dev = cs.device().clone();
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("fused cross-entropy needs contiguous logits");
    };
    let zs = cs.as_cuda_slice::<f32>()?.slice(start..end);
    let stream = dev.cuda_stream();
    let targets_d = stream.clone_htod(targets).map_err(crate::cuda::err)?;
    let mut nll = dev.alloc_zeros::<f64>(m)?;
    // Without `grad` the kernel never touches dz; a one-element buffer stands in for it.
    let mut dz = dev.alloc_zeros::<f32>(if grad { m * vocab } else { 1 })?;
    let cap = softcap.unwrap_or(0.0) as f32;
    let grad_flag = i32::from(grad);
    let f = crate::cuda::kernel(&dev, "xent", "kXentRows_f32")?;
    let mut launch = stream.launch_builder(&f);
    launch
        .arg(&zs)
        .arg(&targets_d)
        .arg(&mut dz)
        .arg(&mut nll)
        .arg(&vocab_i32)
        .arg(&cap)
        .arg(&grad_flag);
    let cfg = LaunchConfig {
        grid_dim: (m as u32, 1, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: arguments match kXentRows_f32 (const float*, const unsigned*, float*, double*,
    // int, float, int); z holds m * vocab values, targets and nll m, dz m * vocab when grad.
    unsafe { launch.launch(cfg) }.map_err(crate::cuda::err)?;
    let total: f64 = stream
        .clone_dtoh(&nll)
        .map_err(crate::cuda::err)?
        .iter()
        .sum();
    let dz = if grad {
        let s = crate::cuda::storage(dz, &dev);
        Some(Tensor::from_storage(
            Storage::Cuda(s),
            (m, vocab),
            candle_core::op::BackpropOp::none(),
            false,
        ))
    } else {
        None
    };
    Ok((total, dz))
}

/// One row of [`xent_fused_cpu`]: returns the row's NLL; `dz` (the row's length) ends as the
/// gradient when `grad`, and is scratch otherwise.
fn xent_row(z: &[f32], target: usize, softcap: Option<f64>, grad: bool, dz: &mut [f32]) -> f64 {
    // The capped logits, `c * tanh(z / c)`.
    match softcap {
        Some(c) => {
            let c = c as f32;
            for (l, &x) in dz.iter_mut().zip(z) {
                *l = c * (x / c).tanh();
            }
        }
        None => dz.copy_from_slice(z),
    }
    let max = dz.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let sum_exp: f64 = dz.iter().map(|&l| f64::from((l - max).exp())).sum();
    let lse = sum_exp.ln() as f32 + max;
    let nll = f64::from(lse - dz[target]);
    if grad {
        for (j, l) in dz.iter_mut().enumerate() {
            let mut g = (*l - lse).exp() - if j == target { 1.0 } else { 0.0 };
            if let Some(c) = softcap {
                let t = *l / c as f32;
                g *= 1.0 - t * t;
            }
            *l = g;
        }
    }
    nll
}

/// A scalar whose value and gradient w.r.t. its input were computed beforehand.
struct PrecomputedLoss {
    value: Tensor,
    /// d value / d input, shaped like the input.
    grad: Tensor,
}

impl PrecomputedLoss {
    fn value_storage<S: BackendStorage>(
        &self,
        pick: impl Fn(&Storage) -> Option<&S>,
    ) -> Result<(S, Shape)> {
        let (storage, layout) = self.value.storage_and_layout();
        let Some(s) = pick(&storage) else {
            candle_core::bail!("precomputed loss: value lives on another device than its input");
        };
        Ok((s.try_clone(layout)?, Shape::from(())))
    }
}

impl CustomOp1 for PrecomputedLoss {
    fn name(&self) -> &'static str {
        "precomputed-loss"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.value_storage(|s| match s {
            Storage::Cpu(s) => Some(s),
            _ => None,
        })
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.value_storage(|s| match s {
            Storage::Cuda(s) => Some(s),
            _ => None,
        })
    }

    fn metal_fwd(&self, _: &MetalStorage, _: &Layout) -> Result<(MetalStorage, Shape)> {
        self.value_storage(|s| match s {
            Storage::Metal(s) => Some(s),
            _ => None,
        })
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            self.grad
                .broadcast_mul(&grad_res.to_dtype(DType::F32)?)?
                .to_dtype(arg.dtype())?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::DenseLinear;
    use candle_core::Var;

    fn filled(shape: &[usize], seed: u64, scale: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let data: Vec<f32> = (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
            })
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// The whole `[b * s, vocab]` logits at once through candle's own ops.
    fn full_loss(
        head: &Tensor,
        softcap: Option<f64>,
        hidden: &Tensor,
        labels: &[Vec<i64>],
    ) -> Tensor {
        let (b, s, h) = hidden.dims3().unwrap();
        let mut rows = vec![];
        let mut targets = vec![];
        for (bi, row) in labels.iter().enumerate() {
            for t in 0..s - 1 {
                if row[t + 1] != IGNORE_INDEX {
                    rows.push((bi * s + t) as u32);
                    targets.push(row[t + 1] as u32);
                }
            }
        }
        let x = hidden
            .reshape((b * s, h))
            .unwrap()
            .index_select(&Tensor::new(rows, &Device::Cpu).unwrap(), 0)
            .unwrap();
        let mut logits = x.matmul(&head.t().unwrap()).unwrap();
        if let Some(c) = softcap {
            logits = ((logits / c).unwrap().tanh().unwrap() * c).unwrap();
        }
        let targets = Tensor::new(targets, &Device::Cpu).unwrap();
        candle_nn::loss::cross_entropy(&logits, &targets).unwrap()
    }

    #[test]
    fn chunks_give_the_full_loss_and_its_gradient() -> Result<()> {
        let (b, s, h, vocab) = (2, 7, 12, 33);
        let w = filled(&[vocab, h], 1, 1.0);
        let head = DenseLinear::new(w.clone())?;
        let labels: Vec<Vec<i64>> = vec![
            vec![5, IGNORE_INDEX, IGNORE_INDEX, 7, 0, 32, 9],
            vec![1, 2, 3, 4, IGNORE_INDEX, 6, 30],
        ];
        let labels_t = Tensor::new(labels.clone(), &Device::Cpu)?;
        // Two ignored targets in row 0 (positions 1, 2), one in row 1; the last position of
        // each row has nothing to predict: 6 + 6 - 3 = 9 counted.
        for softcap in [Some(3.0), None] {
            let hidden = Var::from_tensor(&filled(&[b, s, h], 2, 2.0))?;
            let want = full_loss(&w, softcap, hidden.as_tensor(), &labels);
            let want_grad = want.backward()?;
            let want_grad = want_grad.get(hidden.as_tensor()).unwrap();
            for chunk in [1, 4, 9, 100] {
                let loss = chunked_lm_loss(&head, softcap, hidden.as_tensor(), &labels_t, chunk)?;
                assert_eq!(loss.tokens, 9);
                let mean = loss.mean()?;
                let d = (mean.to_scalar::<f32>()? - want.to_scalar::<f32>()?).abs();
                assert!(
                    d < 1e-5,
                    "softcap {softcap:?}, chunk {chunk}: loss off by {d}"
                );
                let grads = mean.backward()?;
                let g = grads.get(hidden.as_tensor()).expect("hidden gradient");
                let dg = max_abs_diff(g, want_grad);
                assert!(
                    dg < 1e-6,
                    "softcap {softcap:?}, chunk {chunk}: grad off by {dg}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn the_fused_cpu_kernel_equals_candles_ops() -> Result<()> {
        // 5 rows over 2 threads (an uneven split), logits up to +-40 so the softcap bites.
        let (m, vocab) = (5, 1000);
        let z = filled(&[m, vocab], 9, 40.0);
        let targets = [0u32, 999, 17, 500, 17];
        for softcap in [None, Some(30.0)] {
            let (want, want_dz) = xent_composed(&z, &targets, softcap, true)?;
            let (got, got_dz) = xent_fused_cpu(&z, &targets, softcap, true)?;
            assert!(
                (got - want).abs() < 1e-4 * want.abs(),
                "{softcap:?}: {got} vs {want}"
            );
            let d = max_abs_diff(&got_dz.unwrap(), &want_dz.unwrap());
            assert!(d < 1e-6, "{softcap:?}: gradient off by {d}");
            let (no_grad, dz) = xent_fused_cpu(&z, &targets, softcap, false)?;
            assert_eq!((no_grad, dz.is_none()), (got, true));
        }
        Ok(())
    }

    #[test]
    fn no_graph_without_a_tracked_input_and_zero_for_no_labels() -> Result<()> {
        let head = DenseLinear::new(filled(&[10, 4], 3, 1.0))?;
        let hidden = filled(&[1, 3, 4], 4, 1.0);
        let labels = Tensor::new(&[[1i64, 2, 3]], &Device::Cpu)?;
        let loss = chunked_lm_loss(&head, None, &hidden, &labels, 2)?;
        assert!(!loss.sum.track_op());
        assert_eq!(loss.tokens, 2);
        let none = Tensor::new(&[[IGNORE_INDEX; 3]], &Device::Cpu)?;
        let empty = chunked_lm_loss(&head, None, &hidden, &none, 2)?;
        assert_eq!(empty.tokens, 0);
        assert_eq!(empty.mean()?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }

    #[test]
    fn bad_inputs_are_errors() -> Result<()> {
        let head = DenseLinear::new(filled(&[10, 4], 3, 1.0))?;
        let hidden = filled(&[1, 3, 4], 4, 1.0);
        let out_of_vocab = Tensor::new(&[[1i64, 10, 3]], &Device::Cpu)?;
        let e = chunked_lm_loss(&head, None, &hidden, &out_of_vocab, 2).unwrap_err();
        assert!(e.to_string().contains("label 10"), "{e}");
        let short = Tensor::new(&[[1i64, 2]], &Device::Cpu)?;
        assert!(chunked_lm_loss(&head, None, &hidden, &short, 2).is_err());
        let trainable = DenseLinear::trainable(Var::from_tensor(&filled(&[10, 4], 3, 1.0))?)?;
        let labels = Tensor::new(&[[1i64, 2, 3]], &Device::Cpu)?;
        let e = chunked_lm_loss(&trainable, None, &hidden, &labels, 2).unwrap_err();
        assert!(e.to_string().contains("frozen"), "{e}");
        Ok(())
    }
}
