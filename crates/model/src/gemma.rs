//! Gemma-2 and Gemma-3 (text) decoder, one implementation driven by [`ModelConfig`].
//!
//! Every op here has a backward: candle's own (matmul, elementwise, index_select) or, for
//! RMSNorm, RoPE and the attention softmax, that of our fused ops ([`crate::ops`], CPU and CUDA
//! twins). candle-nn's fused `softmax_last_dim`, `rms_norm` and `rope` kernels have none and
//! would silently cut the gradient.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, Var};

use crate::config::{Arch, ModelConfig};
use crate::linear::Linear;
use crate::loss::{chunked_lm_loss, LmLoss};

/// Additive mask value. HF uses `finfo(float32).min` rather than -inf so that a fully masked row
/// (a left-padding query) softmaxes to a uniform row instead of NaN.
const MASKED: f32 = f32::MIN;

/// The weights of one decoder layer. Norm weights are the raw checkpoint values `w`
/// (the model applies `1 + w`).
#[derive(Debug)]
pub struct LayerWeights {
    pub q_proj: Box<dyn Linear>,
    pub k_proj: Box<dyn Linear>,
    pub v_proj: Box<dyn Linear>,
    pub o_proj: Box<dyn Linear>,
    pub gate_proj: Box<dyn Linear>,
    pub up_proj: Box<dyn Linear>,
    pub down_proj: Box<dyn Linear>,
    pub input_layernorm: Tensor,
    pub post_attention_layernorm: Tensor,
    pub pre_feedforward_layernorm: Tensor,
    pub post_feedforward_layernorm: Tensor,
    /// Gemma-3 only.
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
}

/// Keys and values of one layer, `[batch, kv_heads, capacity, head_dim]`, written in place.
/// Position `p` lives in slot `p % capacity`; only a sliding layer's buffer, whose capacity
/// stops at the window, ever wraps.
#[derive(Debug)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
}

impl LayerKv {
    fn capacity(&self) -> usize {
        self.k.dims().get(2).copied().unwrap_or(0)
    }

    fn batch(&self) -> usize {
        self.k.dims().first().copied().unwrap_or(0)
    }
}

/// Per-layer key/value cache for incremental decoding. Keys are stored after q/k-norm and RoPE.
///
/// Each layer owns a preallocated buffer written with in-place slice copies, so a decode step
/// copies only its own new keys/values (never the whole history, as concatenation would).
/// Global layers hold every position; sliding-window layers hold at most `window` positions in
/// a ring buffer, since no query can see further back. Buffers are allocated on the first
/// forward with [`KvCache::reserve`] positions (`Gemma::new_cache_with_capacity`); a cache
/// without a reservation, or one that outgrows it, doubles its buffers (amortised linear
/// copying). Not `Clone`: two handles would write into the same buffers. After a forward
/// call fails half-way, [`KvCache::clear`] it.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    len: usize,
    reserve: usize,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self::with_capacity(num_layers, 0)
    }

    /// A cache whose buffers are allocated for `max_len` positions on first use (sliding
    /// layers: `min(max_len, window)`).
    pub fn with_capacity(num_layers: usize, max_len: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
            len: 0,
            reserve: max_len,
        }
    }

    /// Number of positions already cached; the next forward must start here.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the buffers are allocated for up front.
    pub fn reserve(&self) -> usize {
        self.reserve
    }

    /// Rows of the batch the cache holds (0 before the first forward).
    pub fn batch_size(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .next()
            .map_or(0, LayerKv::batch)
    }

    /// Slots allocated per layer (sliding layers stop at their window).
    pub fn capacities(&self) -> Vec<usize> {
        self.layers
            .iter()
            .map(|l| l.as_ref().map_or(0, LayerKv::capacity))
            .collect()
    }

    /// Drops everything; buffers are reallocated on the next forward.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.len = 0;
    }

    /// Keeps only batch rows `rows` (in that order), e.g. to drop finished sequences from a
    /// batched generation. Copies each buffer once.
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        let b = self.batch_size();
        if let Some(&r) = rows.iter().find(|&&r| r >= b) {
            candle_core::bail!("select_rows: row {r} out of a batch of {b}");
        }
        if rows.is_empty() {
            self.clear();
            return Ok(());
        }
        let ids: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        for l in self.layers.iter_mut().flatten() {
            let idx = Tensor::from_vec(ids.clone(), ids.len(), l.k.device())?;
            l.k = l.k.index_select(&idx, 0)?;
            l.v = l.v.index_select(&idx, 0)?;
        }
        Ok(())
    }
}

/// How one forward call uses one kind of layer cache (global, or sliding with a window):
/// the buffer capacity after growth and the key columns attention reads.
#[derive(Debug, Clone, Copy, PartialEq)]
struct KvPlan {
    /// Positions cached before this call.
    start: usize,
    /// New positions in this call.
    new: usize,
    /// Buffer capacity for this call (grown if the buffer is smaller).
    cap: usize,
    /// Attend over `cat(buffer, new)` and write afterwards: a multi-token call whose queries
    /// need keys that writing into the ring would already have overwritten.
    concat: bool,
}

impl KvPlan {
    fn new(
        start: usize,
        new: usize,
        current: usize,
        reserve: usize,
        window: Option<usize>,
    ) -> Self {
        let end = start + new;
        let limit = window.unwrap_or(usize::MAX);
        let want = end.min(limit);
        let cap = if current >= want {
            current
        } else {
            want.max(reserve.max(2 * current).min(limit))
        };
        // Queries start..end see keys from start + 1 - window on.
        let needed = window.map_or(end, |w| end.min(new + w - 1));
        Self {
            start,
            new,
            cap,
            concat: needed > cap,
        }
    }

    /// Absolute position of every key column attention reads, in order.
    fn key_positions(&self) -> Vec<usize> {
        let end = self.start + self.new;
        if self.concat {
            let mut p = ring_positions(self.start, self.cap);
            p.extend(self.start..end);
            p
        } else {
            ring_positions(end, self.cap)
        }
    }
}

/// Positions held by a buffer of `cap` slots once positions `0..end` were written to slot
/// `p % cap`: slot `j` holds the newest such position.
fn ring_positions(end: usize, cap: usize) -> Vec<usize> {
    (0..end.min(cap))
        .map(|j| j + (end - 1 - j) / cap * cap)
        .collect()
}

/// Writes this call's keys/values (`[b, kv_heads, new, head_dim]`) into the layer's buffer,
/// growing it to `plan.cap`, and returns the keys/values attention reads, in the column order
/// of [`KvPlan::key_positions`].
fn update_layer_cache(
    slot: &mut Option<LayerKv>,
    k: Tensor,
    v: Tensor,
    plan: KvPlan,
) -> Result<(Tensor, Tensor)> {
    let (b, nkv, s, hd) = k.dims4()?;
    let (k, v) = (k.contiguous()?, v.contiguous()?);
    let old = slot.take();
    if let Some(o) = &old {
        if o.batch() != b {
            candle_core::bail!("kv cache holds a batch of {}, input has {b}", o.batch());
        }
        if o.capacity() > plan.cap {
            candle_core::bail!(
                "kv cache layer holds {} slots, more than the {} planned",
                o.capacity(),
                plan.cap
            );
        }
    }
    let buf = match old {
        Some(o) if o.capacity() == plan.cap => o,
        old => {
            let shape = (b, nkv, plan.cap, hd);
            let grown = LayerKv {
                k: Tensor::zeros(shape, k.dtype(), k.device())?,
                v: Tensor::zeros(shape, v.dtype(), v.device())?,
            };
            // Growth happens only before a buffer wraps, so slots keep their positions.
            if let Some(o) = old {
                grown.k.slice_set(&o.k, 2, 0)?;
                grown.v.slice_set(&o.v, 2, 0)?;
            }
            grown
        }
    };
    let (start, cap) = (plan.start, plan.cap);
    let end = start + s;
    let write = |buf: &LayerKv| -> Result<()> {
        let mut p = start.max(end.saturating_sub(cap));
        while p < end {
            let at = p % cap;
            let n = (end - p).min(cap - at);
            buf.k
                .slice_set(&k.narrow(2, p - start, n)?.contiguous()?, 2, at)?;
            buf.v
                .slice_set(&v.narrow(2, p - start, n)?.contiguous()?, 2, at)?;
            p += n;
        }
        Ok(())
    };
    let held = |buf: &LayerKv, end: usize| -> Result<(Tensor, Tensor)> {
        let n = end.min(cap);
        Ok((buf.k.narrow(2, 0, n)?, buf.v.narrow(2, 0, n)?))
    };
    let out = if plan.concat {
        let out = if start == 0 {
            (k.clone(), v.clone())
        } else {
            let (pk, pv) = held(&buf, start)?;
            (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?)
        };
        write(&buf)?;
        out
    } else {
        write(&buf)?;
        held(&buf, end)?
    };
    *slot = Some(buf);
    Ok(out)
}

/// Gemma RMSNorm: `x / rms(x) * (1 + w)`, in f32 whatever the activation dtype.
#[derive(Debug)]
struct RmsNorm {
    /// `1 + w` in f32, precomputed: the same f32 sum HF forms on every call.
    scale: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(weight: &Tensor, eps: f64) -> Result<Self> {
        Ok(Self {
            scale: (weight.to_dtype(DType::F32)? + 1.0)?,
            eps,
        })
    }

    /// One fused op ([`crate::ops::rms_norm`]), the composed formula
    /// `x_f32 * (1 / sqrt(mean(x_f32^2) + eps)) * (1 + w)` rounded once to x's dtype.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::rms_norm::rms_norm(x, &self.scale, self.eps)
    }
}

/// `c * tanh(x / c)`.
fn softcap(x: &Tensor, cap: Option<f64>) -> Result<Tensor> {
    match cap {
        Some(c) => (x / c)?.tanh()? * c,
        None => Ok(x.clone()),
    }
}

/// One RoPE frequency set (a base and a linear scaling factor), shared by all layers using it.
#[derive(Debug)]
struct Rope {
    base: f64,
    factor: f64,
    inv_freq: Vec<f32>,
}

impl Rope {
    fn new(base: f64, factor: f64, head_dim: usize) -> Self {
        // Same f32 arithmetic as HF's `1 / base ** (arange(0, dim, 2).float() / dim)`, then
        // `inv_freq /= factor` for linear scaling.
        let inv_freq = (0..head_dim / 2)
            .map(|i| {
                let e = (2 * i) as f32 / head_dim as f32;
                1.0f32 / (base as f32).powf(e) / factor as f32
            })
            .collect();
        Self {
            base,
            factor,
            inv_freq,
        }
    }

    /// cos/sin tables `[seq, head_dim]` (rotate-half layout: the half-table repeated twice) for
    /// positions `start..start + seq`, in f32.
    fn tables(
        &self,
        start: usize,
        seq: usize,
        dtype: DType,
        dev: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let (cos, sin) = self.values(start..start + seq);
        let cos = Tensor::from_vec(cos, (seq, 2 * half), dev)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (seq, 2 * half), dev)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }

    /// Per-row tables `[batch, 1, seq, head_dim]`: row `r`'s token at index `start + i` takes
    /// position `start + i - shift[r]` (0 for the padding before it).
    fn row_tables(
        &self,
        start: usize,
        seq: usize,
        shift: &[usize],
        dtype: DType,
        dev: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let positions = shift
            .iter()
            .flat_map(|&sh| (start..start + seq).map(move |p| p.saturating_sub(sh)));
        let (cos, sin) = self.values(positions);
        let shape = (shift.len(), 1, seq, 2 * self.inv_freq.len());
        Ok((
            Tensor::from_vec(cos, shape, dev)?.to_dtype(dtype)?,
            Tensor::from_vec(sin, shape, dev)?.to_dtype(dtype)?,
        ))
    }

    /// cos and sin rows (rotate-half layout) for each position, flattened.
    fn values(&self, positions: impl Iterator<Item = usize>) -> (Vec<f32>, Vec<f32>) {
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for p in positions {
            let angles: Vec<f32> = self.inv_freq.iter().map(|f| p as f32 * f).collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos()));
                sin.extend(angles.iter().map(|a| a.sin()));
            }
        }
        (cos, sin)
    }
}

#[derive(Debug)]
struct Attention {
    q_proj: Box<dyn Linear>,
    k_proj: Box<dyn Linear>,
    v_proj: Box<dyn Linear>,
    o_proj: Box<dyn Linear>,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    scale: f64,
    softcap: Option<f64>,
}

impl Attention {
    fn forward(
        &self,
        x: &Tensor,
        (cos, sin): &(Tensor, Tensor),
        mask: &Tensor,
        cache: Option<(&mut Option<LayerKv>, KvPlan)>,
    ) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        // The q/k norms act on each head's vector, so they run before the transpose, on
        // contiguous [b, s, heads, hd] tensors.
        let q = self.q_proj.forward(x)?.reshape((b, s, nh, hd))?;
        let q = match &self.q_norm {
            Some(n) => n.forward(&q)?,
            None => q,
        }
        .transpose(1, 2)?;
        let k = self.k_proj.forward(x)?.reshape((b, s, nkv, hd))?;
        let k = match &self.k_norm {
            Some(n) => n.forward(&k)?,
            None => k,
        }
        .transpose(1, 2)?;
        let v = self
            .v_proj
            .forward(x)?
            .reshape((b, s, nkv, hd))?
            .transpose(1, 2)?;
        let q = crate::ops::rope::rope(&q, cos, sin)?;
        let k = crate::ops::rope::rope(&k, cos, sin)?;
        // With a cache, k/v are views of its buffers (strided along the position axis), which
        // both the CPU gemm and cuBLAS take as they are: copying them would cost as much as
        // the concatenation the buffers avoid.
        let (k, v, cached) = match cache {
            Some((slot, plan)) => {
                let (k, v) = update_layer_cache(slot, k, v, plan)?;
                (k, v, true)
            }
            None => (k, v, false),
        };
        let kv_len = k.dim(2)?;
        // GQA without materialising repeated K/V: query head h uses kv head h / n_rep (HF's
        // repeat_kv), so grouping the n_rep query heads of each kv head along the row axis
        // turns attention into one batched matmul per kv head.
        let n_rep = nh / nkv;
        let q = q.contiguous()?.reshape((b, nkv, n_rep * s, hd))?;
        // K comes out of the rope op contiguous, so its transpose is a view both matmuls take
        // as it is; V is a transposed view of the projection unless the cache holds it.
        let (kt, v) = if cached {
            (k.t()?, v)
        } else {
            (k.t()?, v.contiguous()?)
        };
        let scores = q.matmul(&kt)?.reshape((b, nh, s, kv_len))?;
        // Scale, softcap, mask and softmax in one op, in f32 (MASKED is not finite in bf16).
        let probs = crate::ops::attention_softmax::attention_probs(
            &scores,
            self.scale,
            self.softcap,
            mask,
        )?;
        let out = probs.reshape((b, nkv, n_rep * s, kv_len))?.matmul(&v)?;
        let out = out
            .reshape((b, nh, s, hd))?
            .transpose(1, 2)?
            .reshape((b, s, nh * hd))?;
        self.o_proj.forward(&out)
    }
}

#[derive(Debug)]
struct Mlp {
    gate_proj: Box<dyn Linear>,
    up_proj: Box<dyn Linear>,
    down_proj: Box<dyn Linear>,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // candle's `gelu` is the tanh approximation (HF `gelu_pytorch_tanh`) and has a backward.
        let h = (self.gate_proj.forward(x)?.gelu()? * self.up_proj.forward(x)?)?;
        self.down_proj.forward(&h)
    }
}

#[derive(Debug)]
struct DecoderLayer {
    attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
    pre_feedforward_layernorm: RmsNorm,
    post_feedforward_layernorm: RmsNorm,
    rope: usize,
    sliding: bool,
}

impl DecoderLayer {
    fn forward(
        &self,
        x: &Tensor,
        rope: &(Tensor, Tensor),
        mask: &Tensor,
        cache: Option<(&mut Option<LayerKv>, KvPlan)>,
    ) -> Result<Tensor> {
        let h = self.input_layernorm.forward(x)?;
        let h = self.attn.forward(&h, rope, mask, cache)?;
        let x = (x + self.post_attention_layernorm.forward(&h)?)?;
        let h = self.pre_feedforward_layernorm.forward(&x)?;
        let h = self.mlp.forward(&h)?;
        x + self.post_feedforward_layernorm.forward(&h)?
    }

    fn replay_dropout(&self) {
        self.linears().iter().for_each(|l| l.replay_dropout());
    }

    fn linears(&self) -> [&dyn Linear; 7] {
        [
            self.attn.q_proj.as_ref(),
            self.attn.k_proj.as_ref(),
            self.attn.v_proj.as_ref(),
            self.attn.o_proj.as_ref(),
            self.mlp.gate_proj.as_ref(),
            self.mlp.up_proj.as_ref(),
            self.mlp.down_proj.as_ref(),
        ]
    }
}

/// A Gemma-2 or Gemma-3 text decoder.
#[derive(Debug)]
pub struct Gemma {
    cfg: ModelConfig,
    embed_tokens: Tensor,
    embed_scale: f64,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Box<dyn Linear>,
    ropes: Vec<Rope>,
}

fn check_shape(what: &str, t: &Tensor, expected: &[usize]) -> Result<()> {
    if t.dims() != expected {
        candle_core::bail!("{what}: expected shape {expected:?}, found {:?}", t.dims());
    }
    Ok(())
}

fn check_linear(what: &str, l: &dyn Linear, out_f: usize, in_f: usize) -> Result<()> {
    if (l.out_features(), l.in_features()) != (out_f, in_f) {
        candle_core::bail!(
            "{what}: expected [out {out_f}, in {in_f}], found [out {}, in {}]",
            l.out_features(),
            l.in_features()
        );
    }
    Ok(())
}

impl Gemma {
    /// Assembles a model from weights; every shape is checked against `cfg`.
    /// `embed_tokens` is `[vocab, hidden]`; `lm_head` maps hidden -> vocab (for tied
    /// checkpoints, a linear over the same embedding matrix).
    pub fn new(
        cfg: ModelConfig,
        embed_tokens: Tensor,
        layers: Vec<LayerWeights>,
        final_norm: Tensor,
        lm_head: Box<dyn Linear>,
    ) -> Result<Self> {
        let (hidden, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        check_shape("embed_tokens", &embed_tokens, &[cfg.vocab_size, hidden])?;
        check_shape("norm", &final_norm, &[hidden])?;
        check_linear("lm_head", lm_head.as_ref(), cfg.vocab_size, hidden)?;
        if layers.len() != cfg.num_hidden_layers {
            candle_core::bail!(
                "config has {} layers, got weights for {}",
                cfg.num_hidden_layers,
                layers.len()
            );
        }

        let mut ropes: Vec<Rope> = Vec::new();
        let mut built = Vec::with_capacity(layers.len());
        for (i, (w, lc)) in layers.into_iter().zip(&cfg.layers).enumerate() {
            let p = |n: &str| format!("layer {i} {n}");
            check_linear(&p("q_proj"), w.q_proj.as_ref(), nh * hd, hidden)?;
            check_linear(&p("k_proj"), w.k_proj.as_ref(), nkv * hd, hidden)?;
            check_linear(&p("v_proj"), w.v_proj.as_ref(), nkv * hd, hidden)?;
            check_linear(&p("o_proj"), w.o_proj.as_ref(), hidden, nh * hd)?;
            let inter = cfg.intermediate_size;
            check_linear(&p("gate_proj"), w.gate_proj.as_ref(), inter, hidden)?;
            check_linear(&p("up_proj"), w.up_proj.as_ref(), inter, hidden)?;
            check_linear(&p("down_proj"), w.down_proj.as_ref(), hidden, inter)?;
            for (n, t) in [
                ("input_layernorm", &w.input_layernorm),
                ("post_attention_layernorm", &w.post_attention_layernorm),
                ("pre_feedforward_layernorm", &w.pre_feedforward_layernorm),
                ("post_feedforward_layernorm", &w.post_feedforward_layernorm),
            ] {
                check_shape(&p(n), t, &[hidden])?;
            }
            let qk_norm = |n: &str, t: Option<Tensor>| -> Result<Option<RmsNorm>> {
                match (cfg.qk_norm, t) {
                    (true, Some(t)) => {
                        check_shape(&p(n), &t, &[hd])?;
                        Ok(Some(RmsNorm::new(&t, cfg.rms_norm_eps)?))
                    }
                    (true, None) => candle_core::bail!("{}: required by Gemma-3", p(n)),
                    (false, Some(_)) => candle_core::bail!("{}: Gemma-2 has no q/k norms", p(n)),
                    (false, None) => Ok(None),
                }
            };
            let q_norm = qk_norm("q_norm", w.q_norm)?;
            let k_norm = qk_norm("k_norm", w.k_norm)?;

            let rope = match ropes
                .iter()
                .position(|r| r.base == lc.rope_base && r.factor == lc.rope_linear_factor)
            {
                Some(idx) => idx,
                None => {
                    ropes.push(Rope::new(lc.rope_base, lc.rope_linear_factor, hd));
                    ropes.len() - 1
                }
            };
            let eps = cfg.rms_norm_eps;
            built.push(DecoderLayer {
                attn: Attention {
                    q_proj: w.q_proj,
                    k_proj: w.k_proj,
                    v_proj: w.v_proj,
                    o_proj: w.o_proj,
                    q_norm,
                    k_norm,
                    num_heads: nh,
                    num_kv_heads: nkv,
                    head_dim: hd,
                    scale: cfg.query_pre_attn_scalar.powf(-0.5),
                    // HF's Gemma-3 attention never passes a softcap to its kernels.
                    softcap: match cfg.arch {
                        Arch::Gemma2 => cfg.attn_logit_softcapping,
                        Arch::Gemma3 => None,
                    },
                },
                mlp: Mlp {
                    gate_proj: w.gate_proj,
                    up_proj: w.up_proj,
                    down_proj: w.down_proj,
                },
                input_layernorm: RmsNorm::new(&w.input_layernorm, eps)?,
                post_attention_layernorm: RmsNorm::new(&w.post_attention_layernorm, eps)?,
                pre_feedforward_layernorm: RmsNorm::new(&w.pre_feedforward_layernorm, eps)?,
                post_feedforward_layernorm: RmsNorm::new(&w.post_feedforward_layernorm, eps)?,
                rope,
                sliding: lc.is_sliding,
            });
        }
        Ok(Self {
            // HF builds sqrt(hidden) as a tensor and casts it to the embedding dtype; candle's
            // scalar multiply rounds the f64 to the tensor dtype the same way.
            embed_scale: (hidden as f64).sqrt(),
            norm: RmsNorm::new(&final_norm, cfg.rms_norm_eps)?,
            cfg,
            embed_tokens,
            layers: built,
            lm_head,
            ropes,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    /// The `[vocab, hidden]` input embedding (frozen).
    pub fn embed_tokens(&self) -> &Tensor {
        &self.embed_tokens
    }

    pub fn lm_head(&self) -> &dyn Linear {
        self.lm_head.as_ref()
    }

    /// An empty cache for this model that grows as needed.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    /// An empty cache whose buffers are allocated once for `max_len` positions (prompt plus new
    /// tokens); sliding layers take at most their window.
    pub fn new_cache_with_capacity(&self, max_len: usize) -> KvCache {
        KvCache::with_capacity(self.layers.len(), max_len)
    }

    /// Every trainable variable of every linear layer (including the lm_head).
    pub fn trainable_vars(&self) -> Vec<Var> {
        self.layers
            .iter()
            .flat_map(|l| l.linears())
            .chain(std::iter::once(self.lm_head.as_ref()))
            .flat_map(|l| l.trainable_vars())
            .collect()
    }

    /// Train mode on or off for every linear layer (LoRA dropout).
    pub fn set_training(&self, training: bool) {
        self.layers
            .iter()
            .flat_map(|l| l.linears())
            .chain(std::iter::once(self.lm_head.as_ref()))
            .for_each(|l| l.set_training(training));
    }

    /// Next-token loss over final hidden states (from [`Gemma::forward_hidden`]) with HF-style
    /// `labels` (`-100` = ignore; the shift happens inside), computing logits for at most
    /// `chunk` positions at a time; see [`crate::loss::chunked_lm_loss`].
    pub fn chunked_lm_loss(
        &self,
        hidden: &Tensor,
        labels: &Tensor,
        chunk: usize,
    ) -> Result<LmLoss> {
        chunked_lm_loss(
            self.lm_head.as_ref(),
            self.cfg.final_logit_softcapping,
            hidden,
            labels,
            chunk,
        )
    }

    /// The summed next-token loss of a training batch and the gradients of `scale` times that
    /// sum w.r.t. every trainable variable. `input_ids` is `[batch, seq]` from position 0 with
    /// no cache and no attention mask (a right-padded batch hides its padding in `labels`);
    /// `labels` and `chunk` as [`Gemma::chunked_lm_loss`].
    ///
    /// With `recompute` (activation checkpointing) the forward pass keeps only each layer's
    /// input. The backward pass then walks the layers from the last: it runs the layer's
    /// forward again from its kept input, with the dropout masks of the first pass replayed
    /// ([`Linear::replay_dropout`]), and back-propagates the gradient of the layer's output
    /// through it, `d/dx sum(layer(x) * g)`. So one layer's autograd graph exists at a time
    /// instead of all of them, for one extra forward pass; the gradients are those of the
    /// plain path.
    pub fn loss_and_grads(
        &self,
        input_ids: &Tensor,
        labels: &Tensor,
        chunk: usize,
        scale: f64,
        recompute: bool,
    ) -> Result<LossGrads> {
        if !recompute {
            let hidden = self.forward_hidden(input_ids, 0, None, None)?;
            let loss = self.chunked_lm_loss(&hidden, labels, chunk)?;
            let mut all = (&loss.sum * scale)?.backward()?;
            return LossGrads::new(&loss, take_grads(&self.trainable_vars(), &mut all));
        }
        let inputs = self.layer_inputs(input_ids, 0, 0, None, None, None)?;
        // Forward: each layer's graph is dropped as soon as its output is detached.
        let mut layer_inputs = Vec::with_capacity(self.layers.len());
        let mut x = inputs.embedded.clone();
        for layer in &self.layers {
            layer.replay_dropout();
            let y = inputs.forward(layer, &x, None)?.detach();
            layer_inputs.push(std::mem::replace(&mut x, y));
        }
        let top = Var::from_tensor(&x)?;
        let loss = self.chunked_lm_loss(&self.norm.forward(top.as_tensor())?, labels, chunk)?;
        let mut grads = GradStore::default();
        let mut grad_out = (&loss.sum * scale)?.backward()?.remove(top.as_tensor());
        for (i, layer) in self.layers.iter().enumerate().rev() {
            // No position reached the loss (every label ignored): no gradient anywhere.
            let Some(g) = grad_out.take() else { break };
            let kept = layer_inputs.pop().expect("one kept input per layer");
            // The embeddings are frozen: the first layer needs no input gradient.
            let input = if i == 0 {
                kept
            } else {
                Var::from_tensor(&kept)?.into_inner()
            };
            layer.replay_dropout();
            let y = inputs.forward(layer, &input, None)?;
            let mut local = (y * g)?.sum_all()?.backward()?;
            if i > 0 {
                grad_out = local.remove(&input);
            }
            let vars: Vec<Var> = layer
                .linears()
                .iter()
                .flat_map(|l| l.trainable_vars())
                .collect();
            grads.extend(take_grads(&vars, &mut local))?;
        }
        LossGrads::new(&loss, grads)
    }

    /// Logits `[batch, seq, vocab]` for every position.
    ///
    /// * `input_ids`: `[batch, seq]`, u32 (or any index dtype candle accepts).
    /// * `start_pos`: absolute position of the first token (RoPE and masks); with a cache it must
    ///   equal `cache.len()`.
    /// * `cache`: appended to with this call's keys/values.
    /// * `attention_mask`: `[batch, cache.len() + seq]`, non-zero = real token, zero = padding
    ///   (left padding for batched prompts).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        start_pos: usize,
        cache: Option<&mut KvCache>,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let hidden = self.forward_hidden(input_ids, start_pos, cache, attention_mask)?;
        self.logits(&hidden)
    }

    /// lm_head + final softcap over final-normed hidden states `[.., hidden]`; split from
    /// [`Gemma::forward_hidden`] so a loss can run over chunks of positions.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        softcap(
            &self.lm_head.forward(hidden)?,
            self.cfg.final_logit_softcapping,
        )
    }

    /// Final-normed hidden states `[batch, seq, hidden]`; arguments as [`Gemma::forward`].
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        start_pos: usize,
        cache: Option<&mut KvCache>,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.forward_impl(input_ids, start_pos, None, cache, attention_mask)
    }

    /// [`Gemma::forward_hidden`] for a left-padded batch with per-row positions: row `r` has
    /// `left_pad[r]` padding tokens first, and its token at cache index `i` is rotated as
    /// position `i - left_pad[r]` (padding slots as 0), which is what HF's `generate` feeds
    /// (`cumsum(attention_mask) - 1`). A padded row then sees exactly the RoPE angles it would
    /// alone. Masks, the sliding window included, keep counting cache indices as HF's do; the
    /// padding itself must be masked out by `attention_mask`.
    pub fn forward_hidden_padded(
        &self,
        input_ids: &Tensor,
        start_pos: usize,
        left_pad: &[usize],
        cache: Option<&mut KvCache>,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let b = input_ids.dim(0)?;
        if left_pad.len() != b {
            candle_core::bail!("left_pad has {} rows, input_ids {b}", left_pad.len());
        }
        self.forward_impl(input_ids, start_pos, Some(left_pad), cache, attention_mask)
    }

    fn forward_impl(
        &self,
        input_ids: &Tensor,
        start_pos: usize,
        left_pad: Option<&[usize]>,
        mut cache: Option<&mut KvCache>,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        if s == 0 {
            candle_core::bail!("forward needs at least one token");
        }
        let window = self.cfg.sliding_window;
        let (past, plans) = match cache.as_deref() {
            Some(c) => {
                if c.layers.len() != self.layers.len() {
                    candle_core::bail!(
                        "kv cache has {} layers, model {}",
                        c.layers.len(),
                        self.layers.len()
                    );
                }
                if c.len != start_pos {
                    candle_core::bail!("start_pos {start_pos} but the cache holds {}", c.len);
                }
                if c.len > 0 && c.batch_size() != b {
                    candle_core::bail!(
                        "kv cache holds a batch of {}, input_ids has {b}",
                        c.batch_size()
                    );
                }
                // Every layer of a kind has seen the same calls, so the first one's capacity
                // stands for all of them (update_layer_cache checks the rest).
                let plan = |sliding: bool| {
                    let current = self
                        .layers
                        .iter()
                        .zip(&c.layers)
                        .find(|(l, _)| l.sliding == sliding)
                        .and_then(|(_, kv)| kv.as_ref())
                        .map_or(0, LayerKv::capacity);
                    KvPlan::new(c.len, s, current, c.reserve, sliding.then_some(window))
                };
                (c.len, Some((plan(false), plan(true))))
            }
            None => (0, None),
        };
        let inputs = self.layer_inputs(
            input_ids,
            start_pos,
            past,
            plans.as_ref(),
            left_pad,
            attention_mask,
        )?;
        let mut x = inputs.embedded.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = match (cache.as_mut(), &plans) {
                (Some(c), Some((full, sliding))) => Some((
                    &mut c.layers[i],
                    if layer.sliding { *sliding } else { *full },
                )),
                _ => None,
            };
            x = inputs.forward(layer, &x, slot)?;
        }
        if let Some(c) = cache {
            c.len = past + input_ids.dim(1)?;
        }
        self.norm.forward(&x)
    }

    /// The scaled embeddings of `input_ids`, the two attention masks and the RoPE tables of one
    /// call; `past` cached positions precede it, read back as `plans` say (none without a
    /// cache).
    fn layer_inputs(
        &self,
        input_ids: &Tensor,
        start_pos: usize,
        past: usize,
        plans: Option<&(KvPlan, KvPlan)>,
        left_pad: Option<&[usize]>,
        attention_mask: Option<&Tensor>,
    ) -> Result<LayerInputs> {
        let (b, s) = input_ids.dims2()?;
        let kv_len = past + s;
        let keep = match attention_mask {
            Some(m) => {
                if m.dims() != [b, kv_len] {
                    candle_core::bail!(
                        "attention_mask must be [batch {b}, cached + new {kv_len}], got {:?}",
                        m.dims()
                    );
                }
                Some(m.to_dtype(DType::F32)?.to_vec2::<f32>()?)
            }
            None => None,
        };
        let dev = self.device();
        let dtype = self.embed_tokens.dtype();
        // Key columns: without a cache, this call's tokens; with one, what each kind of layer
        // reads back from it.
        let key_offset = start_pos - past;
        let (full_keys, sliding_keys) = match plans {
            Some((full, sliding)) => (full.key_positions(), sliding.key_positions()),
            None => {
                let keys: Vec<usize> = (key_offset..key_offset + kv_len).collect();
                (keys.clone(), keys)
            }
        };
        let mask_for = |keys: &[usize], window: Option<usize>| {
            build_mask(
                b,
                s,
                start_pos,
                keys,
                key_offset,
                window,
                keep.as_deref(),
                dev,
            )
        };
        let full_mask = mask_for(&full_keys, None)?;
        let sliding_mask = mask_for(&sliding_keys, Some(self.cfg.sliding_window))?;
        let tables = self
            .ropes
            .iter()
            .map(|r| match left_pad {
                // One shared table when every row has the same shift.
                Some(pad) if pad.iter().any(|&p| p != pad[0]) => {
                    r.row_tables(start_pos, s, pad, dtype, dev)
                }
                Some(pad) => r.tables(start_pos.saturating_sub(pad[0]), s, dtype, dev),
                None => r.tables(start_pos, s, dtype, dev),
            })
            .collect::<Result<Vec<_>>>()?;

        let ids = input_ids.flatten_all()?;
        let embedded =
            (self
                .embed_tokens
                .index_select(&ids, 0)?
                .reshape((b, s, self.cfg.hidden_size))?
                * self.embed_scale)?;
        Ok(LayerInputs {
            embedded,
            full_mask,
            sliding_mask,
            tables,
        })
    }
}

/// What [`Gemma::loss_and_grads`] returns.
#[derive(Debug)]
pub struct LossGrads {
    /// The summed next-token loss (not scaled).
    pub loss_sum: f64,
    /// Positions the loss covers.
    pub tokens: usize,
    /// The gradients of the trainable variables, and nothing else (a variable no loss
    /// position reached has none).
    pub grads: GradStore,
}

impl LossGrads {
    fn new(loss: &LmLoss, grads: GradStore) -> Result<Self> {
        Ok(Self {
            loss_sum: f64::from(loss.sum.to_scalar::<f32>()?),
            tokens: loss.tokens,
            grads,
        })
    }
}

/// The gradients of `vars` taken out of `all` (which also holds every intermediate's).
fn take_grads(vars: &[Var], all: &mut GradStore) -> GradStore {
    let mut kept = GradStore::default();
    for v in vars {
        if let Some(g) = all.remove(v.as_tensor()) {
            kept.insert(v.as_tensor(), g);
        }
    }
    kept
}

/// What every decoder layer of one forward call reads besides its input.
struct LayerInputs {
    /// `[batch, seq, hidden]`, the first layer's input.
    embedded: Tensor,
    full_mask: Tensor,
    sliding_mask: Tensor,
    /// (cos, sin) per RoPE kind (global, local).
    tables: Vec<(Tensor, Tensor)>,
}

impl LayerInputs {
    fn forward(
        &self,
        layer: &DecoderLayer,
        x: &Tensor,
        cache: Option<(&mut Option<LayerKv>, KvPlan)>,
    ) -> Result<Tensor> {
        let mask = if layer.sliding {
            &self.sliding_mask
        } else {
            &self.full_mask
        };
        layer.forward(x, &self.tables[layer.rope], mask, cache)
    }
}

/// Additive attention mask `[batch or 1, 1, seq, keys.len()]`: 0 where query `i` (absolute
/// index `start_pos + i`) may see key column `j` (absolute index `keys[j]`), [`MASKED`]
/// elsewhere. `keep[r]` is the attention mask indexed from `key_offset`. The window counts
/// absolute indices (padding included), as HF's mask does.
#[allow(clippy::too_many_arguments)]
fn build_mask(
    b: usize,
    s: usize,
    start_pos: usize,
    keys: &[usize],
    key_offset: usize,
    window: Option<usize>,
    keep: Option<&[Vec<f32>]>,
    dev: &Device,
) -> Result<Tensor> {
    let rows = if keep.is_some() { b } else { 1 };
    let kv_len = keys.len();
    let mut m = Vec::with_capacity(rows * s * kv_len);
    for r in 0..rows {
        for i in 0..s {
            let qp = start_pos + i;
            for &kp in keys {
                let visible = kp <= qp
                    && window.is_none_or(|w| qp - kp < w)
                    && keep.is_none_or(|k| k[r][kp - key_offset] != 0.0);
                m.push(if visible { 0.0 } else { MASKED });
            }
        }
    }
    Tensor::from_vec(m, (rows, 1, s, kv_len), dev)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use crate::linear::{DenseLinear, Linear};

    fn tiny_config(layer_types: &str, arch: &str) -> ModelConfig {
        ModelConfig::from_json_str(&format!(
            r#"{{"model_type": "{arch}", "vocab_size": 50, "hidden_size": 16,
                "intermediate_size": 32, "num_hidden_layers": {n}, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": 8, "query_pre_attn_scalar": 12,
                "sliding_window": 3, "layer_types": {layer_types}}}"#,
            n = layer_types.matches("attention").count()
        ))
        .unwrap()
    }

    /// Deterministic pseudo-random weights (no RNG crate needed).
    fn filled(shape: &[usize], seed: u64, scale: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let data: Vec<f32> = (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
            })
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    fn random_model(cfg: ModelConfig) -> Gemma {
        let (h, hd, nh, nkv, inter) = (
            cfg.hidden_size,
            cfg.head_dim,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.intermediate_size,
        );
        let mut seed = 0;
        let mut next = |shape: &[usize], scale: f32| {
            seed += 1;
            filled(shape, seed, scale)
        };
        let mut lin = |o: usize, i: usize| -> Box<dyn Linear> {
            Box::new(DenseLinear::new(next(&[o, i], 0.3)).unwrap())
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| LayerWeights {
                q_proj: lin(nh * hd, h),
                k_proj: lin(nkv * hd, h),
                v_proj: lin(nkv * hd, h),
                o_proj: lin(h, nh * hd),
                gate_proj: lin(inter, h),
                up_proj: lin(inter, h),
                down_proj: lin(h, inter),
                input_layernorm: filled(&[h], 100, 0.5),
                post_attention_layernorm: filled(&[h], 101, 0.5),
                pre_feedforward_layernorm: filled(&[h], 102, 0.5),
                post_feedforward_layernorm: filled(&[h], 103, 0.5),
                q_norm: cfg.qk_norm.then(|| filled(&[hd], 104, 0.5)),
                k_norm: cfg.qk_norm.then(|| filled(&[hd], 105, 0.5)),
            })
            .collect();
        let embed = filled(&[cfg.vocab_size, h], 7, 1.0);
        let head = Box::new(DenseLinear::new(embed.clone()).unwrap());
        Gemma::new(cfg, embed, layers, filled(&[h], 8, 0.5), head).unwrap()
    }

    fn ids(rows: &[&[u32]]) -> Tensor {
        Tensor::new(
            rows.iter().map(|r| r.to_vec()).collect::<Vec<_>>(),
            &Device::Cpu,
        )
        .unwrap()
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

    #[test]
    fn rms_norm_matches_formula() -> Result<()> {
        let x = Tensor::new(&[[3f32, 4.]], &Device::Cpu)?;
        let n = RmsNorm::new(&Tensor::new(&[0f32, 1.], &Device::Cpu)?, 0.0)?;
        // rms = sqrt(12.5); scale = (1, 2)
        let y = n.forward(&x)?.to_vec2::<f32>()?;
        let r = 12.5f32.sqrt();
        assert!((y[0][0] - 3.0 / r).abs() < 1e-6 && (y[0][1] - 8.0 / r).abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn rope_rotates_pairs_half_apart() -> Result<()> {
        let rope = Rope::new(10_000.0, 1.0, 4);
        let (cos, sin) = rope.tables(1, 1, DType::F32, &Device::Cpu)?;
        let x = Tensor::new(&[1f32, 2., 3., 4.], &Device::Cpu)?.reshape((1, 1, 1, 4))?;
        let y = crate::ops::rope::rope(&x, &cos, &sin)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        // Pairs (x0, x2) and (x1, x3) rotate by angles 1 and 1/100 at position 1.
        let (a0, a1) = (1f32, 0.01f32);
        let want = [
            1.0 * a0.cos() - 3.0 * a0.sin(),
            2.0 * a1.cos() - 4.0 * a1.sin(),
            3.0 * a0.cos() + 1.0 * a0.sin(),
            4.0 * a1.cos() + 2.0 * a1.sin(),
        ];
        for (g, w) in y.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{y:?} vs {want:?}");
        }
        Ok(())
    }

    #[test]
    fn linear_rope_scaling_divides_positions() -> Result<()> {
        let plain = Rope::new(10_000.0, 1.0, 8);
        let scaled = Rope::new(10_000.0, 4.0, 8);
        let (c1, s1) = plain.tables(2, 1, DType::F32, &Device::Cpu)?;
        let (c2, s2) = scaled.tables(8, 1, DType::F32, &Device::Cpu)?;
        assert!(max_abs_diff(&c1, &c2) < 1e-6 && max_abs_diff(&s1, &s2) < 1e-6);
        Ok(())
    }

    #[test]
    fn kv_cache_decoding_matches_full_forward() -> Result<()> {
        for arch in ["gemma2", "gemma3_text"] {
            let m = random_model(tiny_config(
                r#"["sliding_attention", "full_attention"]"#,
                arch,
            ));
            let toks: &[u32] = &[3, 9, 27, 4, 1, 44, 10, 2];
            let full = m.forward(&ids(&[toks]), 0, None, None)?;
            let mut cache = m.new_cache();
            let prefill = m.forward(&ids(&[&toks[..5]]), 0, Some(&mut cache), None)?;
            let mut parts = vec![prefill];
            for (i, &t) in toks[5..].iter().enumerate() {
                parts.push(m.forward(&ids(&[&[t]]), 5 + i, Some(&mut cache), None)?);
            }
            assert_eq!(cache.len(), toks.len());
            let inc = Tensor::cat(&parts, 1)?;
            let d = max_abs_diff(&full, &inc);
            assert!(d < 1e-4, "{arch}: cached decoding differs by {d}");
        }
        Ok(())
    }

    /// Logits of `toks` fed through a cache in calls of `chunks` tokens.
    fn cached_logits(m: &Gemma, cache: &mut KvCache, toks: &[u32], chunks: &[usize]) -> Tensor {
        let mut parts = Vec::new();
        let mut at = 0;
        for &n in chunks {
            let x = ids(&[&toks[at..at + n]]);
            parts.push(m.forward(&x, at, Some(cache), None).unwrap());
            at += n;
        }
        assert_eq!(at, toks.len());
        Tensor::cat(&parts, 1).unwrap()
    }

    #[test]
    fn ring_buffer_cache_matches_full_forward_for_any_chunking() -> Result<()> {
        // Window 3, 13 tokens: the sliding layer's ring wraps four times; multi-token calls
        // past the window take the concatenating path.
        let toks: &[u32] = &[3, 9, 27, 4, 1, 44, 10, 2, 31, 17, 8, 49, 6];
        let schedules: [&[usize]; 5] = [
            &[1; 13],
            &[5, 1, 1, 1, 1, 1, 1, 1, 1],
            &[2, 2, 2, 2, 2, 2, 1],
            &[13],
            &[4, 1, 5, 3],
        ];
        for arch in ["gemma2", "gemma3_text"] {
            let m = random_model(tiny_config(
                r#"["sliding_attention", "full_attention", "sliding_attention"]"#,
                arch,
            ));
            let full = m.forward(&ids(&[toks]), 0, None, None)?;
            for chunks in schedules {
                // No reservation (doubling), one too small (outgrown), one exact.
                for reserve in [0, 4, toks.len()] {
                    let mut cache = m.new_cache_with_capacity(reserve);
                    let inc = cached_logits(&m, &mut cache, toks, chunks);
                    let d = max_abs_diff(&full, &inc);
                    assert!(
                        d < 1e-4,
                        "{arch} {chunks:?} reserve {reserve}: differs by {d}"
                    );
                    assert_eq!(cache.len(), toks.len());
                    let caps = cache.capacities();
                    // Sliding layers never hold more than the window.
                    assert_eq!((caps[0], caps[2]), (3, 3), "{chunks:?} {reserve}");
                    assert!(caps[1] >= toks.len());
                    if reserve == toks.len() {
                        assert_eq!(caps[1], toks.len(), "exact reservation must not grow");
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn kv_plan_reads_the_right_positions() {
        // Global layer: everything, in order, no matter the capacity.
        let p = KvPlan::new(5, 2, 8, 0, None);
        assert_eq!((p.cap, p.concat), (8, false));
        assert_eq!(p.key_positions(), (0..7).collect::<Vec<_>>());
        let p = KvPlan::new(8, 1, 8, 0, None);
        assert_eq!(p.cap, 16);
        // Sliding, window 4, decoding position 9 into a full ring: slot j holds the newest
        // position congruent to j.
        let p = KvPlan::new(9, 1, 4, 0, Some(4));
        assert_eq!((p.cap, p.concat), (4, false));
        assert_eq!(p.key_positions(), vec![8, 9, 6, 7]);
        // Three new tokens at 9..12 need keys from 6 on: six positions, more than the ring.
        let p = KvPlan::new(9, 3, 4, 0, Some(4));
        assert!(p.concat);
        assert_eq!(p.key_positions(), vec![8, 5, 6, 7, 9, 10, 11]);
        // A prefill shorter than the window grows the buffer only as far as needed.
        let p = KvPlan::new(0, 2, 0, 0, Some(4));
        assert_eq!((p.cap, p.concat), (2, false));
        let p = KvPlan::new(0, 2, 0, 100, Some(4));
        assert_eq!((p.cap, p.concat), (4, false));
        // A long prefill attends over its own keys only, then keeps the last window.
        let p = KvPlan::new(0, 9, 0, 0, Some(4));
        assert_eq!((p.cap, p.concat), (4, true));
        assert_eq!(p.key_positions(), (0..9).collect::<Vec<_>>());
    }

    #[test]
    fn padded_rows_with_their_own_positions_match_the_unpadded_row() -> Result<()> {
        let m = random_model(tiny_config(
            r#"["sliding_attention", "full_attention"]"#,
            "gemma3_text",
        ));
        let real: &[u32] = &[5, 6, 7, 8, 9];
        let alone = m.forward(&ids(&[real]), 0, None, None)?;
        let batch = ids(&[&[0, 0, 5, 6, 7, 8, 9], &[1, 2, 3, 4, 5, 6, 7]]);
        let mask = Tensor::new(&[[0u32, 0, 1, 1, 1, 1, 1], [1; 7]], &Device::Cpu)?;
        let h = m.forward_hidden_padded(&batch, 0, &[2, 0], None, Some(&mask))?;
        let padded = m.logits(&h)?;
        let row = padded.narrow(0, 0, 1)?.narrow(1, 2, 5)?;
        let d = max_abs_diff(&alone, &row);
        assert!(d < 1e-5, "per-row positions differ by {d}");
        // The unpadded row is unaffected by its neighbour.
        let other = m.forward(&ids(&[&[1, 2, 3, 4, 5, 6, 7]]), 0, None, None)?;
        assert!(max_abs_diff(&other, &padded.narrow(0, 1, 1)?) < 1e-5);
        // Equal shifts take the shared table: the same as shifting start_pos.
        let h2 = m.forward_hidden_padded(&ids(&[real]), 0, &[0], None, None)?;
        assert_eq!(max_abs_diff(&m.logits(&h2)?, &alone), 0.0);
        Ok(())
    }

    #[test]
    fn padded_batch_decodes_through_the_cache_and_drops_rows() -> Result<()> {
        let m = random_model(tiny_config(
            r#"["sliding_attention", "full_attention"]"#,
            "gemma2",
        ));
        // Row 0: 3 padding + 4 real; row 1: 7 real. Then 6 single steps each (the ring of
        // window 3 wraps), dropping row 0 after step 3.
        let a: &[u32] = &[11, 12, 13, 14, 15, 16, 17, 18, 19, 20];
        let b: &[u32] = &[1, 2, 3, 4, 5, 6, 7, 21, 22, 23, 24, 25, 26];
        let alone_a = m.forward(&ids(&[a]), 0, None, None)?;
        let alone_b = m.forward(&ids(&[b]), 0, None, None)?;
        let mut cache = m.new_cache_with_capacity(13);
        let prompt = ids(&[&[0, 0, 0, 11, 12, 13, 14], &b[..7]]);
        let mut keep = vec![vec![0u32, 0, 0, 1, 1, 1, 1], vec![1u32; 7]];
        let mut pad = vec![3, 0];
        let mask = Tensor::new(keep.clone(), &Device::Cpu)?;
        let h = m.forward_hidden_padded(&prompt, 0, &pad, Some(&mut cache), Some(&mask))?;
        let l = m.logits(&h)?;
        assert!(
            max_abs_diff(
                &l.get(0)?.narrow(0, 3, 4)?,
                &alone_a.get(0)?.narrow(0, 0, 4)?
            ) < 1e-4
        );
        assert!(max_abs_diff(&l.get(1)?, &alone_b.get(0)?.narrow(0, 0, 7)?) < 1e-4);
        let mut rows = vec![0usize, 1];
        for step in 0..6 {
            if step == 3 {
                cache.select_rows(&[1])?;
                assert_eq!(cache.batch_size(), 1);
                rows = vec![1];
                keep.remove(0);
                pad.remove(0);
            }
            let pos = 7 + step;
            let next: Vec<Vec<u32>> = rows
                .iter()
                .map(|&r| vec![if r == 0 { a[4 + step] } else { b[7 + step] }])
                .collect();
            keep.iter_mut().for_each(|k| k.push(1));
            let mask = Tensor::new(keep.clone(), &Device::Cpu)?;
            let x = Tensor::new(next, &Device::Cpu)?;
            let h = m.forward_hidden_padded(&x, pos, &pad, Some(&mut cache), Some(&mask))?;
            let l = m.logits(&h)?;
            for (i, &r) in rows.iter().enumerate() {
                let want = if r == 0 {
                    alone_a.get(0)?.narrow(0, 4 + step, 1)?
                } else {
                    alone_b.get(0)?.narrow(0, 7 + step, 1)?
                };
                let d = max_abs_diff(&l.get(i)?, &want);
                assert!(d < 1e-4, "row {r} step {step}: {d}");
            }
        }
        // Wrong batch sizes and rows are errors, not panics.
        let x = ids(&[&[1], &[2]]);
        assert!(m.forward(&x, 13, Some(&mut cache), None).is_err());
        assert!(cache.select_rows(&[1]).is_err());
        Ok(())
    }

    #[test]
    fn kv_cache_rejects_wrong_start() -> Result<()> {
        let m = random_model(tiny_config(r#"["full_attention"]"#, "gemma2"));
        let mut cache = m.new_cache();
        m.forward(&ids(&[&[1, 2]]), 0, Some(&mut cache), None)?;
        let e = m
            .forward(&ids(&[&[3]]), 5, Some(&mut cache), None)
            .unwrap_err();
        assert!(e.to_string().contains("cache holds 2"), "{e}");
        Ok(())
    }

    #[test]
    fn left_padding_is_invisible_to_real_tokens() -> Result<()> {
        let m = random_model(tiny_config(
            r#"["sliding_attention", "full_attention"]"#,
            "gemma3_text",
        ));
        let real: &[u32] = &[5, 6, 7, 8, 9];
        let alone = m.forward(&ids(&[real]), 0, None, None)?;
        let batch = ids(&[&[0, 0, 5, 6, 7, 8, 9], &[1, 2, 3, 4, 5, 6, 7]]);
        let mask = Tensor::new(&[[0u32, 0, 1, 1, 1, 1, 1], [1; 7]], &Device::Cpu)?;
        let padded = m.forward(&batch, 0, None, Some(&mask))?;
        let row = padded.narrow(0, 0, 1)?.narrow(1, 2, 5)?;
        // RoPE is relative, so shifting every real token by two positions changes nothing
        // beyond rounding.
        let d = max_abs_diff(&alone, &row);
        assert!(d < 1e-4, "padding leaked: {d}");
        assert!(padded
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .all(|v| v.is_finite()));
        Ok(())
    }

    #[test]
    fn sliding_window_hides_old_tokens_only_on_sliding_layers() -> Result<()> {
        // One layer, window 3: position 5 sees positions 3..=5 only.
        let a: &[u32] = &[1, 2, 3, 4, 5, 6];
        let b: &[u32] = &[40, 2, 3, 4, 5, 6];
        let sliding = random_model(tiny_config(r#"["sliding_attention"]"#, "gemma2"));
        let la = sliding
            .forward(&ids(&[a]), 0, None, None)?
            .narrow(1, 5, 1)?;
        let lb = sliding
            .forward(&ids(&[b]), 0, None, None)?
            .narrow(1, 5, 1)?;
        assert_eq!(max_abs_diff(&la, &lb), 0.0);
        let global = random_model(tiny_config(r#"["full_attention"]"#, "gemma2"));
        let la = global.forward(&ids(&[a]), 0, None, None)?.narrow(1, 5, 1)?;
        let lb = global.forward(&ids(&[b]), 0, None, None)?.narrow(1, 5, 1)?;
        assert!(max_abs_diff(&la, &lb) > 1e-4);
        Ok(())
    }

    #[test]
    fn final_softcap_bounds_logits() -> Result<()> {
        let m = random_model(tiny_config(r#"["full_attention"]"#, "gemma2"));
        let cap = m.config().final_logit_softcapping.unwrap() as f32;
        let logits = m.forward(&ids(&[&[1, 2, 3]]), 0, None, None)?;
        let v = logits.flatten_all()?.to_vec1::<f32>()?;
        assert!(v.iter().all(|x| x.abs() <= cap));
        Ok(())
    }

    #[test]
    fn new_rejects_misshapen_weights() {
        let cfg = tiny_config(r#"["full_attention"]"#, "gemma2");
        let embed = filled(&[cfg.vocab_size, 8], 1, 1.0);
        let head = Box::new(DenseLinear::new(embed.clone()).unwrap());
        let e = Gemma::new(cfg, embed, vec![], filled(&[16], 2, 1.0), head).unwrap_err();
        assert!(e.to_string().contains("embed_tokens"), "{e}");
    }
}
