//! Helpers shared by the integration tests: fixture paths and checkpoint rewriting.

#![allow(dead_code)] // each test binary uses a different subset

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use tempfile::TempDir;

/// The repository's `fixtures/`, or `$RUPANTOR_FIXTURES` (a GPU bundle runs its test binaries
/// away from the source tree they were built in).
pub fn fixtures_root() -> PathBuf {
    std::env::var_os("RUPANTOR_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures"))
}

pub fn fixture(name: &str) -> PathBuf {
    fixtures_root().join("gemma_tiny").join(name)
}

/// The HF reference outputs written by scripts/fixtures/gemma_tiny.py.
pub fn reference(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("reference.safetensors"), &Device::Cpu)
        .expect("reference.safetensors")
}

/// All tensors of a fixture checkpoint, in their stored dtype.
pub fn weights(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("model.safetensors"), &Device::Cpu)
        .expect("model.safetensors")
}

/// A temp model directory holding `config` as config.json and the fixture's weights.
pub fn model_dir(name: &str, config_file: &str) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture(name).join(config_file),
        dir.path().join("config.json"),
    )
    .unwrap();
    std::fs::copy(
        fixture(name).join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    dir
}

pub fn write_json(path: &Path, v: &serde_json::Value) {
    std::fs::write(path, serde_json::to_string_pretty(v).unwrap()).unwrap();
}

pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

pub fn save(tensors: &HashMap<String, Tensor>, path: &Path) {
    candle_core::safetensors::save(tensors, path).unwrap();
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
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

pub fn max_abs(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
