//! Optimizer state for resuming: safetensors with the step and hyperparameters as JSON
//! metadata, written atomically.
//!
//! State is stored per tensor (never per page), so a checkpoint can be resumed with another
//! page size. Keys are `PARAM.state1` / `PARAM.state2` (u8 codes for 8-bit state, f32
//! moments otherwise) and `PARAM.absmax1` / `PARAM.absmax2` (f32, 8-bit state only); the
//! metadata key `rupantor.optimizer` holds an [`OptimMeta`] as JSON.

use crate::optim::{AdamWConfig, StateFormat};
use anyhow::{bail, Context, Result};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

/// Which optimizer wrote a state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimKind {
    /// 32-bit AdamW (torch arithmetic).
    Adamw,
    /// 8-bit AdamW (bitsandbytes semantics).
    Adamw8bit,
}

/// One parameter as recorded in a state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamMeta {
    pub name: String,
    pub numel: usize,
    pub format: StateFormat,
}

/// Everything but the tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimMeta {
    pub format_version: u32,
    pub kind: OptimKind,
    /// Steps taken (the next step is `step + 1`).
    pub step: u64,
    /// Hyperparameters, the learning rate of the last step included.
    pub config: AdamWConfig,
    /// The 8-bit threshold (8-bit optimizer only).
    pub min_8bit_size: Option<usize>,
    pub params: Vec<ParamMeta>,
}

impl OptimMeta {
    pub const FORMAT_VERSION: u32 = 1;
    /// The safetensors metadata key holding this struct as JSON.
    pub const METADATA_KEY: &'static str = "rupantor.optimizer";
}

/// One state tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum StateTensor {
    U8(Vec<u8>),
    F32(Vec<f32>),
}

impl StateTensor {
    fn view(&self) -> Result<TensorView<'_>> {
        Ok(match self {
            StateTensor::U8(v) => TensorView::new(Dtype::U8, vec![v.len()], v)?,
            StateTensor::F32(v) => {
                TensorView::new(Dtype::F32, vec![v.len()], bytemuck::cast_slice(v))?
            }
        })
    }
}

/// A whole optimizer state: metadata and named tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct StateDict {
    pub meta: OptimMeta,
    pub tensors: BTreeMap<String, StateTensor>,
}

impl StateDict {
    /// The safetensors encoding.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let views = self
            .tensors
            .iter()
            .map(|(k, t)| Ok((k.as_str(), t.view()?)))
            .collect::<Result<Vec<_>>>()?;
        let metadata = HashMap::from([
            (
                OptimMeta::METADATA_KEY.to_string(),
                serde_json::to_string(&self.meta)?,
            ),
            ("format".to_string(), "rupantor-optimizer".to_string()),
        ]);
        Ok(safetensors::serialize(views, Some(metadata))?)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let (_, header) = SafeTensors::read_metadata(bytes)?;
        let json = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(OptimMeta::METADATA_KEY))
            .with_context(|| format!("no {:?} metadata", OptimMeta::METADATA_KEY))?;
        let meta: OptimMeta = serde_json::from_str(json).context("optimizer metadata")?;
        let st = SafeTensors::deserialize(bytes)?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.iter() {
            let t = match view.dtype() {
                Dtype::U8 => StateTensor::U8(view.data().to_vec()),
                Dtype::F32 => StateTensor::F32(bytemuck::pod_collect_to_vec(view.data())),
                other => bail!("optimizer state tensor {name:?} has dtype {other:?}"),
            };
            tensors.insert(name.to_string(), t);
        }
        Ok(StateDict { meta, tensors })
    }

    /// Write to `path` atomically: a temporary file in the same directory, synced, then
    /// renamed over `path` (and the directory synced), so a crash leaves the old file or the
    /// new one, never a torn one.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = self.to_bytes()?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let mut tmp = tempfile::Builder::new()
            .prefix(".optimizer-")
            .suffix(".tmp")
            .tempfile_in(dir)
            .with_context(|| format!("temporary file in {}", dir.display()))?;
        tmp.write_all(&bytes)?;
        tmp.as_file().sync_all()?;
        tmp.persist(path)
            .with_context(|| format!("rename onto {}", path.display()))?;
        #[cfg(unix)]
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    }

    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
        Self::from_bytes(&bytes).with_context(|| format!("optimizer state {}", path.display()))
    }
}
