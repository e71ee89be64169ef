//! Hub repo ids: a complete snapshot in a fake HF cache is used as it is (and loads); a miss
//! while offline, or with the endpoint on a closed local port, is the one clear error. No test
//! here touches the internet.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};

use candle_core::Device;
use rupantor_model::hub::{cached_model, repo_folder, resolve_repo, HubError, HubOptions};
use rupantor_model::{load_model, DenseBuilder};

const REPO: &str = "tiny-org/gemma3-tiny";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn options(cache: &Path) -> HubOptions {
    HubOptions {
        cache_dir: cache.to_path_buf(),
        endpoint: closed_port_endpoint(),
        token: None,
        offline: false,
        progress: false,
    }
}

/// `http://127.0.0.1:PORT` where nothing listens: the port was bound, then released.
fn closed_port_endpoint() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("http://127.0.0.1:{port}")
}

/// Lays the tiny Gemma-3 fixture out as the hub cache does: blobs, a snapshot of symlinks,
/// refs/main. Returns the snapshot folder.
fn fake_snapshot(cache: &Path, files: &[&str]) -> PathBuf {
    let folder = repo_folder(cache, REPO);
    let snap = folder.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(folder.join("blobs")).unwrap();
    std::fs::create_dir_all(folder.join("refs")).unwrap();
    std::fs::write(folder.join("refs/main"), COMMIT).unwrap();
    for (i, f) in files.iter().enumerate() {
        let blob = folder.join("blobs").join(format!("blob{i}"));
        std::fs::copy(common::fixture("gemma3").join(f), &blob).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/blob{i}"), snap.join(f)).unwrap();
    }
    snap
}

#[test]
fn a_complete_cached_snapshot_is_used_and_loads() {
    let cache = tempfile::tempdir().unwrap();
    let snap = fake_snapshot(
        cache.path(),
        &["config.json", "model.safetensors", "tokenizer.json"],
    );
    // Offline and with a dead endpoint: the cache alone must do.
    let mut opts = options(cache.path());
    opts.offline = true;
    let path = resolve_repo(REPO, &opts).unwrap();
    assert_eq!(path, snap);
    let model = load_model(&path, &Device::Cpu, &mut DenseBuilder::new(&Device::Cpu)).unwrap();
    assert_eq!(model.config().vocab_size, 256);
}

#[test]
fn a_snapshot_with_a_dangling_blob_is_not_complete() {
    let cache = tempfile::tempdir().unwrap();
    let snap = fake_snapshot(
        cache.path(),
        &["config.json", "model.safetensors", "tokenizer.json"],
    );
    let weights = std::fs::read_link(snap.join("model.safetensors")).unwrap();
    std::fs::remove_file(snap.join(&weights)).unwrap();
    let why = cached_model(cache.path(), REPO).unwrap_err();
    assert!(why.contains("model.safetensors"), "{why}");
}

#[test]
fn offline_miss_is_one_clear_error() {
    let cache = tempfile::tempdir().unwrap();
    // Incomplete: no tokenizer.json.
    fake_snapshot(cache.path(), &["config.json", "model.safetensors"]);
    let mut opts = options(cache.path());
    opts.offline = true;
    let err = resolve_repo(REPO, &opts).unwrap_err();
    assert!(matches!(err, HubError::Download { .. }));
    let msg = err.to_string();
    assert!(
        msg.starts_with("cannot download tiny-org/gemma3-tiny from the Hugging Face hub (")
            && msg.ends_with(
                "); download it elsewhere and pass --model PATH (a model directory or .gguf file)"
            ),
        "{msg}"
    );
    assert!(
        msg.contains("HF_HUB_OFFLINE") && msg.contains("tokenizer.json"),
        "{msg}"
    );
}

#[test]
fn unreachable_endpoint_is_the_same_error() {
    let cache = tempfile::tempdir().unwrap();
    let err = resolve_repo("google/gemma-2-9b-it", &options(cache.path())).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with("cannot download google/gemma-2-9b-it from the Hugging Face hub (")
            && msg.contains("127.0.0.1")
            && msg.ends_with("pass --model PATH (a model directory or .gguf file)"),
        "{msg}"
    );
    // Nothing half-written is left that would later pass for a snapshot.
    assert!(cached_model(cache.path(), "google/gemma-2-9b-it").is_err());
}

#[test]
fn not_a_repo_id_is_refused() {
    let cache = tempfile::tempdir().unwrap();
    let err = resolve_repo("./relative/path", &options(cache.path())).unwrap_err();
    assert!(matches!(err, HubError::InvalidId { .. }), "{err}");
}
