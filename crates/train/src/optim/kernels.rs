//! Per-element AdamW arithmetic, written to round exactly where the reference implementations
//! round.
//!
//! Both references are torch eager ops on f32 CPU tensors. What their kernels compute per
//! element (torch 2.x, checked against the fixtures and by probing each op on its own):
//!
//! * a Python float operand becomes an f32 scalar (`t.mul_(0.9)` multiplies by `0.9f32`);
//!   scalars Python derives first (`1 - beta1`, `-lr / c1`, ...) are computed in f64 and
//!   rounded once;
//! * `a.add_(b, alpha=s)` is `fma(b, s, a)`, `a.addcmul_(b, c, value=s)` is `fma(s*b, c, a)`,
//!   `a.lerp_(b, w)` (w < 0.5) is `fma(w, b - a, a)` — fused in the vectorised loop and in the
//!   scalar tail alike, so the result does not depend on an element's position;
//! * `a.addcdiv_(b, c, value=s)` is `a + (s*b)/c`; `t / s` is a true division;
//! * `t.sqrt()` is MKL's `vsSqrt` in high-accuracy mode, which is *not* correctly rounded:
//!   about one root in six is 1 ulp off (within 0.75 ulp of the exact root). Its algorithm is
//!   closed and follows MKL's CPU dispatch, so we take the IEEE root (`f32::sqrt`). The
//!   moments never pass through a root, so 8-bit codes, absmax and f32 moments stay
//!   bit-identical to the references; a parameter can differ by the rounding of its update.
//!   The kernels take the root as an argument so the tests can substitute torch's roots
//!   (recorded by the fixture script) and prove every other operation bit-exact.
//!
//! Each function here is element-wise, so processing a tensor in any split (pages, blocks,
//! threads) gives the same bits. Rust never fuses implicitly, so every FMA is an explicit
//! `mul_add`; on x86-64 the loops are compiled a second time with FMA enabled and picked at run
//! time, which changes speed only.

use crate::optim::AdamWConfig;
use rupantor_quant::blockwise8::{dynamic_map, CodeLut, BLOCKSIZE, MAP_SIZE};

/// `beta ** step` as Python evaluates `float ** int` (C `pow`).
fn pow_step(beta: f64, step: u64) -> f64 {
    beta.powf(step as f64)
}

/// `torch.optim.AdamW` (single-tensor path), one step's scalars. The fields are public for
/// backends that run the same arithmetic elsewhere (a device kernel).
#[derive(Debug, Clone, Copy)]
pub struct TorchStep {
    /// `1 - lr * weight_decay`, applied when `weight_decay != 0`.
    pub decay: Option<f32>,
    /// lerp weight `1 - beta1`.
    pub weight1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    /// `sqrt(1 - beta2 ** step)`.
    pub bias_correction2_sqrt: f32,
    pub eps: f32,
    /// `-(lr / (1 - beta1 ** step))`.
    pub neg_step_size: f32,
}

impl TorchStep {
    pub fn new(c: &AdamWConfig, step: u64) -> Self {
        let (beta1, beta2) = c.betas;
        let bias_correction1 = 1.0 - pow_step(beta1, step);
        let bias_correction2 = 1.0 - pow_step(beta2, step);
        let step_size = c.lr / bias_correction1;
        TorchStep {
            decay: (c.weight_decay != 0.0).then_some((1.0 - c.lr * c.weight_decay) as f32),
            weight1: (1.0 - beta1) as f32,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            bias_correction2_sqrt: bias_correction2.sqrt() as f32,
            eps: c.eps as f32,
            neg_step_size: (-step_size) as f32,
        }
    }

    /// `param.mul_(decay)`, `m.lerp_(g, 1-beta1)`, `v.mul_(beta2).addcmul_(g, g, 1-beta2)`,
    /// `param.addcdiv_(m, v.sqrt() / bc2_sqrt + eps, value=-step_size)`.
    #[inline(always)]
    pub(crate) fn apply(
        &self,
        p: &mut [f32],
        g: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        sqrt: impl Fn(f32) -> f32,
    ) {
        let w = self.weight1;
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            let pi = match self.decay {
                Some(d) => *p * d,
                None => *p,
            };
            // at::lerp: self + w*(end - self) for |w| < 0.5, else end - (end - self)*(1 - w).
            let mi = if w.abs() < 0.5 {
                w.mul_add(g - *m, *m)
            } else {
                (w - 1.0).mul_add(g - *m, g)
            };
            let vi = (self.one_minus_beta2 * g).mul_add(g, *v * self.beta2);
            let denom = sqrt(vi) / self.bias_correction2_sqrt + self.eps;
            *p = pi + (self.neg_step_size * mi) / denom;
            *m = mi;
            *v = vi;
        }
    }
}

/// bitsandbytes' `_optimizer_update_32bit_cpu` for `adam` (the f32-state path that
/// `AdamW8bit` uses for tensors under `min_8bit_size`), one step's scalars.
#[derive(Debug, Clone, Copy)]
pub struct Bnb32Step {
    pub beta1: f32,
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    /// `1 - lr * weight_decay`, applied when `weight_decay > 0`.
    pub decay: Option<f32>,
    /// `eps * sqrt(1 - beta2 ** step)`.
    pub eps_c2: f32,
    /// `-lr * sqrt(1 - beta2 ** step) / (1 - beta1 ** step)`.
    pub step_size: f32,
}

impl Bnb32Step {
    pub fn new(c: &AdamWConfig, step: u64) -> Self {
        let (beta1, beta2) = c.betas;
        let correction1 = 1.0 - pow_step(beta1, step);
        let correction2 = (1.0 - pow_step(beta2, step)).sqrt();
        Bnb32Step {
            beta1: beta1 as f32,
            one_minus_beta1: (1.0 - beta1) as f32,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            decay: (c.weight_decay > 0.0).then_some((1.0 - c.lr * c.weight_decay) as f32),
            eps_c2: (c.eps * correction2) as f32,
            step_size: (-c.lr * correction2 / correction1) as f32,
        }
    }

    /// `m.mul_(b1).add_(g, alpha=1-b1)`, `v.mul_(b2).addcmul_(g, g, value=1-b2)`,
    /// `p.mul_(decay)`, `p.add_(m / (v.sqrt() + eps*c2), alpha=step_size)`.
    #[inline(always)]
    pub(crate) fn apply(
        &self,
        p: &mut [f32],
        g: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        sqrt: impl Fn(f32) -> f32,
    ) {
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            let mi = g.mul_add(self.one_minus_beta1, *m * self.beta1);
            let vi = (self.one_minus_beta2 * g).mul_add(g, *v * self.beta2);
            let pi = match self.decay {
                Some(d) => *p * d,
                None => *p,
            };
            let update = mi / (sqrt(vi) + self.eps_c2);
            *p = update.mul_add(self.step_size, pi);
            *m = mi;
            *v = vi;
        }
    }
}

/// The two dynamic maps of 8-bit Adam and their quantization tables.
#[derive(Debug, Clone)]
pub struct Codec8 {
    /// Signed map, first moment (`state1`, bitsandbytes' `dynamic`).
    pub map1: [f32; MAP_SIZE],
    /// Unsigned map, second moment (`state2`, `udynamic`).
    pub map2: [f32; MAP_SIZE],
    pub lut1: CodeLut,
    pub lut2: CodeLut,
}

impl Codec8 {
    pub fn new() -> Self {
        let map1 = dynamic_map(true);
        let map2 = dynamic_map(false);
        Codec8 {
            lut1: CodeLut::new(&map1),
            lut2: CodeLut::new(&map2),
            map1,
            map2,
        }
    }
}

impl Default for Codec8 {
    fn default() -> Self {
        Self::new()
    }
}

/// Grid points of bitsandbytes' CPU code search (see [`CodeLut`]).
const GRID: usize = 1 << 16;

/// The code table of [`CodeLut`] in the form a device kernel searches: `starts[q]` is the first
/// of the 65536 grid points whose code is at least `q` (`GRID` when none is), so the code of
/// grid point `c` is the largest `q` with `starts[q] <= c`. Built by the same walk as
/// `CodeLut::new` (grid values `2c/65535 - 1` against the midpoints of neighbouring map
/// entries), so `kernels/adamw.cu` picks exactly the code `CodeLut::code_of` picks, ties and
/// all.
pub fn code_starts(map: &[f32; MAP_SIZE]) -> [u32; MAP_SIZE] {
    let mids: Vec<f32> = map.windows(2).map(|w| (w[0] + w[1]) * 0.5).collect();
    let mut starts = [GRID as u32; MAP_SIZE];
    starts[0] = 0;
    let mut code = 0usize;
    for c in 0..GRID {
        let v = (c as f32 + c as f32) / 65535.0 - 1.0;
        while code < MAP_SIZE - 1 && v > mids[code] {
            code += 1;
            starts[code] = c as u32;
        }
    }
    starts
}

/// bitsandbytes' `_optimizer_update_8bit_blockwise_cpu` for `adam`, one step's scalars.
#[derive(Debug, Clone, Copy)]
pub struct Bnb8Step {
    pub beta1: f32,
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    /// `sqrt(1 - beta2 ** step)`.
    pub correction2: f32,
    pub eps: f32,
    /// `1 - lr * weight_decay`, applied when `weight_decay > 0`.
    pub decay: Option<f32>,
    /// `-lr / (1 - beta1 ** step)`.
    pub neg_lr_over_c1: f32,
}

impl Bnb8Step {
    pub fn new(c: &AdamWConfig, step: u64) -> Self {
        let (beta1, beta2) = c.betas;
        let correction1 = 1.0 - pow_step(beta1, step);
        let correction2 = (1.0 - pow_step(beta2, step)).sqrt();
        Bnb8Step {
            beta1: beta1 as f32,
            one_minus_beta1: (1.0 - beta1) as f32,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            correction2: correction2 as f32,
            eps: c.eps as f32,
            decay: (c.weight_decay > 0.0).then_some((1.0 - c.lr * c.weight_decay) as f32),
            neg_lr_over_c1: (-c.lr / correction1) as f32,
        }
    }

    /// One 256-element block (the last of a tensor may be shorter): dequantize both states
    /// (`code[q] * absmax`), `m.mul_(b1).add_(g, alpha=1-b1)`,
    /// `v.mul_(b2).addcmul_(g, g, value=1-b2)`, `denom = v.sqrt() / c2 + eps`,
    /// `p.mul_(decay)`, `p.addcdiv_(m, denom, value=-lr/c1)`, then re-quantize both states
    /// with bitsandbytes' CPU `quantize_blockwise` (our [`CodeLut`]).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub(crate) fn apply_block(
        &self,
        codec: &Codec8,
        p: &mut [f32],
        g: &[f32],
        codes1: &mut [u8],
        codes2: &mut [u8],
        absmax1: &mut f32,
        absmax2: &mut f32,
        sqrt: impl Fn(f32) -> f32,
    ) {
        let n = p.len();
        debug_assert!(n <= BLOCKSIZE && g.len() == n && codes1.len() == n && codes2.len() == n);
        let mut m = [0f32; BLOCKSIZE];
        let mut v = [0f32; BLOCKSIZE];
        let (a1, a2) = (*absmax1, *absmax2);
        for i in 0..n {
            let gi = g[i];
            let m_old = codec.map1[codes1[i] as usize] * a1;
            let v_old = codec.map2[codes2[i] as usize] * a2;
            let mi = gi.mul_add(self.one_minus_beta1, m_old * self.beta1);
            let vi = (self.one_minus_beta2 * gi).mul_add(gi, v_old * self.beta2);
            let denom = sqrt(vi) / self.correction2 + self.eps;
            let pi = match self.decay {
                Some(d) => p[i] * d,
                None => p[i],
            };
            p[i] = pi + (self.neg_lr_over_c1 * mi) / denom;
            m[i] = mi;
            v[i] = vi;
        }
        *absmax1 = codec.lut1.quantize_block(&m[..n], codes1);
        *absmax2 = codec.lut2.quantize_block(&v[..n], codes2);
    }
}

/// Compiles `$body` a second time with FMA enabled and picks it when the CPU has FMA. Without
/// hardware FMA, `mul_add` still rounds once (through libm), so results are the same bits.
macro_rules! fma_dispatch {
    ($name:ident, $fast:ident, ($($arg:ident : $ty:ty),*), $body:expr) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "fma")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $fast($($arg: $ty),*) {
            $body
        }

        #[allow(clippy::too_many_arguments)]
        pub fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports FMA, the only feature $fast is compiled for.
                    unsafe { $fast($($arg),*) };
                    return;
                }
            }
            $body
        }
    };
}

fma_dispatch!(
    torch_adamw,
    torch_adamw_fma,
    (k: &TorchStep, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]),
    k.apply(p, g, m, v, f32::sqrt)
);

fma_dispatch!(
    bnb_adam32,
    bnb_adam32_fma,
    (k: &Bnb32Step, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]),
    k.apply(p, g, m, v, f32::sqrt)
);

fma_dispatch!(
    bnb_adam8_block,
    bnb_adam8_block_fma,
    (
        k: &Bnb8Step,
        codec: &Codec8,
        p: &mut [f32],
        g: &[f32],
        codes1: &mut [u8],
        codes2: &mut [u8],
        absmax1: &mut f32,
        absmax2: &mut f32
    ),
    k.apply_block(codec, p, g, codes1, codes2, absmax1, absmax2, f32::sqrt)
);

#[cfg(test)]
mod tests {
    use super::*;

    /// The grid point `CodeLut::code_of` (and `code_of` in kernels/adamw.cu) rounds a value
    /// already scaled by its block's reciprocal absmax to.
    fn grid_of(scaled: f32) -> u32 {
        if scaled.is_nan() {
            return 0;
        }
        let v = scaled.clamp(-1.0, 1.0);
        65535f32.mul_add((v + 1.0) * 0.5, 0.5) as i32 as u32 & 0xffff
    }

    /// `code_of` in kernels/adamw.cu: the largest code whose start is at or below the grid point,
    /// by the same binary search.
    fn device_code(starts: &[u32; MAP_SIZE], scaled: f32) -> u8 {
        let grid = grid_of(scaled);
        let mut q = 0;
        let mut step = MAP_SIZE / 2;
        while step > 0 {
            if starts[q + step] <= grid {
                q += step;
            }
            step /= 2;
        }
        q as u8
    }

    #[test]
    fn device_code_search_picks_the_cpu_quantizers_code_at_every_grid_point() {
        for signed in [true, false] {
            let map = dynamic_map(signed);
            let lut = CodeLut::new(&map);
            let starts = code_starts(&map);
            assert_eq!(starts[0], 0);
            assert!(starts.windows(2).all(|w| w[0] <= w[1]), "starts ascend");
            let mut seen = vec![false; GRID];
            let mut check = |x: f32| {
                seen[grid_of(x) as usize] = true;
                assert_eq!(
                    device_code(&starts, x),
                    lut.code_of(x),
                    "signed map {signed}: x = {x:e} (grid {})",
                    grid_of(x)
                );
            };
            for c in 0..GRID {
                let x = (c as f32 + c as f32) / 65535.0 - 1.0;
                let (mut below, mut above) = (x, x);
                check(x);
                for _ in 0..4 {
                    below = below.next_down();
                    above = above.next_up();
                    check(below);
                    check(above);
                }
            }
            for x in [
                f32::NAN,
                f32::INFINITY,
                f32::NEG_INFINITY,
                -1.5,
                2.0,
                0.0,
                -0.0,
                1e-40,
                -1e-40,
            ] {
                check(x);
            }
            assert!(seen.iter().all(|&s| s), "every grid point was reached");
        }
    }
}
