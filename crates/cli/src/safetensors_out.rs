//! A safetensors writer that streams tensor data to disk as it arrives.
//!
//! The safetensors header (names, dtypes, shapes, offsets) comes before the data, but a
//! quantized tensor's size is only known once it is quantized. We append each tensor's bytes
//! to a scratch file next to the output, then write header + data to a temporary file and
//! rename it into place, so memory stays near one tensor and a crash never leaves a
//! half-written output behind.

use anyhow::{Context, Result};
use safetensors::Dtype;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub struct StreamingWriter {
    out: PathBuf,
    scratch_path: PathBuf,
    scratch: Option<BufWriter<File>>,
    entries: Vec<(String, Value)>,
    offset: u64,
    metadata: BTreeMap<String, String>,
}

fn dtype_name(d: Dtype) -> Result<&'static str> {
    Ok(match d {
        Dtype::BOOL => "BOOL",
        Dtype::U8 => "U8",
        Dtype::I8 => "I8",
        Dtype::I16 => "I16",
        Dtype::U16 => "U16",
        Dtype::F16 => "F16",
        Dtype::BF16 => "BF16",
        Dtype::I32 => "I32",
        Dtype::U32 => "U32",
        Dtype::F32 => "F32",
        Dtype::F64 => "F64",
        Dtype::I64 => "I64",
        Dtype::U64 => "U64",
        other => anyhow::bail!("dtype {other:?} cannot be written"),
    })
}

impl StreamingWriter {
    pub fn create(out: &Path) -> Result<Self> {
        let dir = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let name = out
            .file_name()
            .context("output path has no file name")?
            .to_string_lossy()
            .to_string();
        let scratch_path = dir.join(format!(".{name}.data.partial"));
        let scratch = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&scratch_path)
            .with_context(|| format!("creating {}", scratch_path.display()))?;
        Ok(StreamingWriter {
            out: out.to_path_buf(),
            scratch_path,
            scratch: Some(BufWriter::with_capacity(1 << 22, scratch)),
            entries: Vec::new(),
            offset: 0,
            metadata: BTreeMap::new(),
        })
    }

    pub fn set_metadata(&mut self, metadata: BTreeMap<String, String>) {
        self.metadata = metadata;
    }

    pub fn add(&mut self, name: &str, dtype: Dtype, shape: &[usize], data: &[u8]) -> Result<()> {
        let expected = shape.iter().product::<usize>() * dtype.bitsize() / 8;
        anyhow::ensure!(
            data.len() == expected,
            "{name}: {} bytes for shape {shape:?} {dtype:?}",
            data.len()
        );
        anyhow::ensure!(
            !self.entries.iter().any(|(n, _)| n == name),
            "tensor {name} written twice"
        );
        self.scratch
            .as_mut()
            .expect("writer is open")
            .write_all(data)
            .with_context(|| format!("writing {}", self.scratch_path.display()))?;
        let end = self.offset + data.len() as u64;
        self.entries.push((
            name.to_string(),
            json!({"dtype": dtype_name(dtype)?, "shape": shape, "data_offsets": [self.offset, end]}),
        ));
        self.offset = end;
        Ok(())
    }

    /// Write header + data to a temporary file and rename it over the output.
    pub fn finish(mut self) -> Result<()> {
        let out = self.out.clone();
        let entries = std::mem::take(&mut self.entries);
        let metadata = std::mem::take(&mut self.metadata);
        let scratch = self.scratch.take().expect("writer is open");
        let mut scratch = scratch
            .into_inner()
            .map_err(|e| e.into_error())
            .context("flushing tensor data")?;
        let mut header = Map::new();
        if !metadata.is_empty() {
            header.insert("__metadata__".into(), json!(metadata));
        }
        for (name, entry) in entries {
            header.insert(name, entry);
        }
        let mut header = serde_json::to_vec(&Value::Object(header))?;
        // The data section must start 8-byte aligned; safetensors pads the header with spaces.
        header.resize(header.len().next_multiple_of(8), b' ');
        let tmp = out.with_extension("safetensors.partial");
        let result = (|| -> Result<()> {
            let mut f = BufWriter::with_capacity(1 << 22, File::create(&tmp)?);
            f.write_all(&(header.len() as u64).to_le_bytes())?;
            f.write_all(&header)?;
            scratch.seek(SeekFrom::Start(0))?;
            std::io::copy(&mut scratch, &mut f)?;
            let f = f.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &out)?;
            Ok(())
        })()
        .with_context(|| format!("writing {}", out.display()));
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

impl Drop for StreamingWriter {
    fn drop(&mut self) {
        // The scratch data is never needed once the writer is gone, finished or not.
        let _ = std::fs::remove_file(&self.scratch_path);
    }
}
