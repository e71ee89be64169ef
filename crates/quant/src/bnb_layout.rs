//! The safetensors layout HF transformers saves for bitsandbytes 4-bit weights.
//!
//! A quantized `W` (e.g. `model.layers.0.self_attn.q_proj.weight`) becomes six tensors:
//! `W` (u8 `[ceil(n/2), 1]`), `W.absmax` (u8), `W.quant_map` (16 f32), `W.nested_absmax` (f32),
//! `W.nested_quant_map` (256 f32) and `W.quant_state.bitsandbytes__nf4`, the UTF-8 bytes of
//! `json.dumps` of the remaining fields. We write that JSON byte for byte as Python does so
//! checkpoints round-trip through `bitsandbytes` and `transformers` unchanged.

use crate::blockwise8::{self, MAP_SIZE};
use crate::nf4::{self, NestedAbsmax, Nf4Tensor, SourceDtype, NF4_CODE};
use safetensors::Dtype;
use std::fmt::Write as _;

/// Suffix of the tensor that carries the JSON quant state.
pub const QUANT_STATE_SUFFIX: &str = ".quant_state.bitsandbytes__nf4";
/// The companion tensors of a quantized weight, by suffix.
pub const COMPANION_SUFFIXES: [&str; 5] = [
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
    QUANT_STATE_SUFFIX,
];

/// An owned tensor in safetensors terms.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl RawTensor {
    pub fn u8(shape: Vec<usize>, data: Vec<u8>) -> Self {
        RawTensor {
            dtype: Dtype::U8,
            shape,
            data,
        }
    }

    pub fn f32(shape: Vec<usize>, values: &[f32]) -> Self {
        RawTensor {
            dtype: Dtype::F32,
            shape,
            data: bytemuck::cast_slice(values).to_vec(),
        }
    }
}

/// Errors reading a bitsandbytes-quantized weight.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("{weight}: missing companion tensor `{weight}{suffix}`")]
    Missing {
        weight: String,
        suffix: &'static str,
    },
    #[error("{weight}: `{tensor}` has dtype {found:?}, expected {expected:?}")]
    Dtype {
        weight: String,
        tensor: String,
        found: Dtype,
        expected: Dtype,
    },
    #[error("{weight}: quant state JSON is invalid: {reason}")]
    QuantState { weight: String, reason: String },
    #[error("{weight}: {reason}")]
    Inconsistent { weight: String, reason: String },
}

/// Fields of the packed quant-state JSON, in the order bitsandbytes writes them.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantStateJson {
    pub quant_type: String,
    pub blocksize: usize,
    pub dtype: SourceDtype,
    pub shape: Vec<usize>,
    pub nested_blocksize: usize,
    pub nested_dtype: String,
    pub nested_offset: f64,
}

impl QuantStateJson {
    /// `json.dumps` of bitsandbytes' non-tensor quant-state dict, byte for byte.
    pub fn to_json(&self) -> String {
        let shape = self
            .shape
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}], \"nested_blocksize\": {}, \"nested_dtype\": \"{}\", \"nested_offset\": {}}}",
            self.quant_type,
            self.blocksize,
            self.dtype.torch_name(),
            shape,
            self.nested_blocksize,
            self.nested_dtype,
            python_float_repr(self.nested_offset)
        )
    }

    pub fn parse(weight: &str, bytes: &[u8]) -> Result<Self, LayoutError> {
        let err = |reason: String| LayoutError::QuantState {
            weight: weight.to_string(),
            reason,
        };
        let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| err(e.to_string()))?;
        let field = |k: &str| {
            v.get(k)
                .ok_or_else(|| err(format!("field \"{k}\" is missing")))
        };
        let uint = |k: &str| {
            field(k)?
                .as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| err(format!("field \"{k}\": expected an integer")))
        };
        let string = |k: &str| {
            field(k)?
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| err(format!("field \"{k}\": expected a string")))
        };
        let dtype_name = string("dtype")?;
        let dtype = SourceDtype::from_torch_name(&dtype_name)
            .ok_or_else(|| err(format!("field \"dtype\": unsupported dtype {dtype_name:?}")))?;
        let shape = field("shape")?
            .as_array()
            .and_then(|a| {
                a.iter()
                    .map(|d| d.as_u64().map(|d| d as usize))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| err("field \"shape\": expected a list of integers".into()))?;
        let nested_offset = field("nested_offset")?
            .as_f64()
            .ok_or_else(|| err("field \"nested_offset\": expected a number".into()))?;
        Ok(QuantStateJson {
            quant_type: string("quant_type")?,
            blocksize: uint("blocksize")?,
            dtype,
            shape,
            nested_blocksize: uint("nested_blocksize")?,
            nested_dtype: string("nested_dtype")?,
            nested_offset,
        })
    }
}

/// Python's `repr(float)`: the shortest round-tripping digits, in fixed notation for decimal
/// exponents in [-4, 16) and scientific (`1e-05`, `1.5e+20`) otherwise.
pub fn python_float_repr(v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    if v == 0.0 {
        return if v.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    // Rust's `{:e}` prints the shortest round-tripping digits as d.ddddde±x.
    let sci = format!("{v:e}");
    let (mantissa, exp) = sci.split_once('e').expect("exponent");
    let exp: i32 = exp.parse().expect("exponent digits");
    let negative = mantissa.starts_with('-');
    let digits: String = mantissa.chars().filter(|c| c.is_ascii_digit()).collect();
    let mut out = String::new();
    if negative {
        out.push('-');
    }
    if (-4..16).contains(&exp) {
        if exp < 0 {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', (-exp - 1) as usize));
            out.push_str(&digits);
        } else {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                out.push_str(&digits);
                out.extend(std::iter::repeat_n('0', int_len - digits.len()));
                out.push_str(".0");
            } else {
                out.push_str(&digits[..int_len]);
                out.push('.');
                out.push_str(&digits[int_len..]);
            }
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let _ = write!(out, "e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    }
    out
}

/// The six tensors HF transformers saves for `weight_name`, in its order.
pub fn to_tensors(weight_name: &str, t: &Nf4Tensor) -> Vec<(String, RawTensor)> {
    let state = QuantStateJson {
        quant_type: "nf4".into(),
        blocksize: nf4::BLOCKSIZE,
        dtype: t.dtype,
        shape: t.shape.clone(),
        nested_blocksize: nf4::NESTED_BLOCKSIZE,
        nested_dtype: "float32".into(),
        nested_offset: t.absmax.offset as f64,
    };
    let json = state.to_json().into_bytes();
    vec![
        (
            weight_name.to_string(),
            RawTensor::u8(vec![t.packed.len(), 1], t.packed.clone()),
        ),
        (
            format!("{weight_name}.absmax"),
            RawTensor::u8(vec![t.absmax.codes.len()], t.absmax.codes.clone()),
        ),
        (
            format!("{weight_name}.quant_map"),
            RawTensor::f32(vec![16], &NF4_CODE),
        ),
        (
            format!("{weight_name}.nested_absmax"),
            RawTensor::f32(vec![t.absmax.nested_absmax.len()], &t.absmax.nested_absmax),
        ),
        (
            format!("{weight_name}.nested_quant_map"),
            RawTensor::f32(vec![MAP_SIZE], &blockwise8::dynamic_map(true)),
        ),
        (
            format!("{weight_name}{QUANT_STATE_SUFFIX}"),
            RawTensor::u8(vec![json.len()], json),
        ),
    ]
}

/// Whether `name` is one of the companion tensors of a quantized weight.
pub fn is_companion(name: &str) -> bool {
    COMPANION_SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// Rebuild an [`Nf4Tensor`] from the tensors of `weight_name`, fetched through `get`.
///
/// Only NF4 with blocksize 64 and double quantization against bitsandbytes' own maps is
/// accepted; anything else is an error naming the weight rather than a silent misread.
pub fn from_tensors(
    weight_name: &str,
    mut get: impl FnMut(&str) -> Option<RawTensor>,
) -> Result<Nf4Tensor, LayoutError> {
    let w = weight_name.to_string();
    let mut fetch = |suffix: &'static str, dtype: Dtype| -> Result<RawTensor, LayoutError> {
        let name = format!("{weight_name}{suffix}");
        let t = get(&name).ok_or(LayoutError::Missing {
            weight: w.clone(),
            suffix,
        })?;
        if t.dtype != dtype {
            return Err(LayoutError::Dtype {
                weight: w.clone(),
                tensor: name,
                found: t.dtype,
                expected: dtype,
            });
        }
        Ok(t)
    };
    let state_t = fetch(QUANT_STATE_SUFFIX, Dtype::U8)?;
    let state = QuantStateJson::parse(weight_name, &state_t.data)?;
    let bad = |reason: String| LayoutError::Inconsistent {
        weight: w.clone(),
        reason,
    };
    if state.quant_type != "nf4" {
        return Err(bad(format!(
            "quant_type {:?} is not supported (only nf4)",
            state.quant_type
        )));
    }
    if state.blocksize != nf4::BLOCKSIZE || state.nested_blocksize != nf4::NESTED_BLOCKSIZE {
        return Err(bad(format!(
            "blocksize {}/{} is not supported (expected {}/{})",
            state.blocksize,
            state.nested_blocksize,
            nf4::BLOCKSIZE,
            nf4::NESTED_BLOCKSIZE
        )));
    }
    let packed = fetch("", Dtype::U8)?;
    let absmax = fetch(".absmax", Dtype::U8)?;
    let nested_absmax = fetch(".nested_absmax", Dtype::F32)?;
    let quant_map = fetch(".quant_map", Dtype::F32)?;
    let nested_map = fetch(".nested_quant_map", Dtype::F32)?;
    let as_f32 = |t: &RawTensor| -> Vec<f32> { bytemuck::pod_collect_to_vec(&t.data) };
    if as_f32(&quant_map) != NF4_CODE {
        return Err(bad("quant_map differs from bitsandbytes' NF4 table".into()));
    }
    if as_f32(&nested_map) != blockwise8::dynamic_map(true) {
        return Err(bad(
            "nested_quant_map differs from bitsandbytes' signed dynamic map".into(),
        ));
    }
    let n: usize = state.shape.iter().product();
    let n_blocks = n.div_ceil(nf4::BLOCKSIZE);
    if packed.data.len() != n.div_ceil(2) {
        return Err(bad(format!(
            "{} packed bytes for shape {:?} (expected {})",
            packed.data.len(),
            state.shape,
            n.div_ceil(2)
        )));
    }
    if absmax.data.len() != n_blocks {
        return Err(bad(format!(
            "{} absmax codes, expected {n_blocks}",
            absmax.data.len()
        )));
    }
    let nested = as_f32(&nested_absmax);
    if nested.len() != n_blocks.div_ceil(nf4::NESTED_BLOCKSIZE) {
        return Err(bad(format!(
            "{} nested absmax values, expected {}",
            nested.len(),
            n_blocks.div_ceil(nf4::NESTED_BLOCKSIZE)
        )));
    }
    Ok(Nf4Tensor {
        packed: packed.data,
        absmax: NestedAbsmax {
            codes: absmax.data,
            nested_absmax: nested,
            offset: state.nested_offset as f32,
        },
        shape: state.shape,
        dtype: state.dtype,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_repr_matches_python() {
        for (v, s) in [
            (0.1, "0.1"),
            (1.0, "1.0"),
            (123.0, "123.0"),
            (1e-5, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (1234567890123456.0, "1234567890123456.0"),
            (-2.5e-3, "-0.0025"),
            (0.012345678918063641, "0.012345678918063641"),
            (6.666666856050077e-39, "6.666666856050077e-39"),
        ] {
            assert_eq!(python_float_repr(v), s);
        }
    }

    #[test]
    fn quant_state_round_trips() {
        let x: Vec<f32> = (0..300)
            .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let t = Nf4Tensor::quantize_f32(&x, &[3, 100]);
        let tensors = to_tensors("m.q_proj.weight", &t);
        let back = from_tensors("m.q_proj.weight", |n| {
            tensors.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone())
        })
        .unwrap();
        assert_eq!(back, t);
    }

    #[test]
    fn missing_companion_is_named() {
        let t = Nf4Tensor::quantize_f32(&[0.5; 64], &[64]);
        let tensors = to_tensors("w", &t);
        let err = from_tensors("w", |n| {
            if n == "w.nested_absmax" {
                None
            } else {
                tensors.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone())
            }
        })
        .unwrap_err();
        assert!(err.to_string().contains("w.nested_absmax"), "{err}");
    }
}
