//! Models named by a Hugging Face hub repo id (`org/name`): the standard cache first, then a
//! download into it.
//!
//! The cache is the one `huggingface_hub` (Python) and `hf-hub` (Rust) share:
//! `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else
//! `~/.cache/huggingface/hub`, laid out as `models--{org}--{name}/snapshots/{commit}/` (files
//! symlinked into `blobs/`) with `refs/main` naming the commit of the `main` branch.
//!
//! A snapshot is used when it is *complete*: `config.json`, the weights (`model.safetensors`,
//! or `model.safetensors.index.json` and every shard it names) and `tokenizer.json`, each a
//! readable file (a dangling blob link does not count); or, for a GGUF repo, exactly one
//! `.gguf` file. `refs/main`'s snapshot is tried first, then any other complete one (newest
//! first), so a cache filled by `huggingface-cli download --revision X` is found too.
//!
//! Otherwise the files are downloaded with the `hf-hub` crate (blocking `ureq` client, rustls)
//! from `$HF_ENDPOINT` (default `https://huggingface.co`) with the token from `$HF_TOKEN`, else
//! the file `$HF_TOKEN_PATH`, else `$HF_HOME/token` (where `huggingface-cli login` writes it).
//! `HF_HUB_OFFLINE=1` forbids the download. Whatever goes wrong (offline, no network, a gated
//! repo without a token, a repo that is not a Gemma checkpoint) ends in one error:
//! [`HubError::Download`], which names the repo, the reason and the fix (`--model PATH`).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::loader::{CONFIG_FILE, INDEX_FILE, SINGLE_FILE};

/// The tokenizer file a usable snapshot must hold.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Optional files fetched along with a checkpoint when the repo has them.
const OPTIONAL_FILES: [&str; 3] = [
    "generation_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("`{id}` is not a Hugging Face repo id (expected `org/name`)")]
    InvalidId { id: String },
    #[error(
        "cannot download {repo} from the Hugging Face hub ({reason}); download it elsewhere and \
         pass --model PATH (a model directory or .gguf file)"
    )]
    Download { repo: String, reason: String },
}

/// Where the hub lives and how to reach it; [`HubOptions::from_env`] reads the standard
/// variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubOptions {
    /// The hub cache (the folder holding `models--org--name`).
    pub cache_dir: PathBuf,
    pub endpoint: String,
    pub token: Option<String>,
    /// `HF_HUB_OFFLINE`: use the cache only.
    pub offline: bool,
    /// Show download progress bars.
    pub progress: bool,
}

impl HubOptions {
    /// From the process environment.
    pub fn from_env() -> Self {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// From any variable lookup (`var("HF_HOME")` ...); empty values count as unset.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let var = |k: &str| var(k).filter(|v| !v.trim().is_empty());
        let hf_home = var("HF_HOME").map(PathBuf::from).or_else(|| {
            var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .map(|c| c.join("huggingface"))
        });
        let cache_dir = var("HF_HUB_CACHE")
            .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .or_else(|| hf_home.as_ref().map(|h| h.join("hub")))
            .unwrap_or_else(|| PathBuf::from(".cache/huggingface/hub"));
        let token = var("HF_TOKEN")
            .or_else(|| var("HUGGING_FACE_HUB_TOKEN"))
            .or_else(|| {
                let path = var("HF_TOKEN_PATH")
                    .map(PathBuf::from)
                    .or_else(|| hf_home.as_ref().map(|h| h.join("token")))?;
                let t = std::fs::read_to_string(path).ok()?;
                let t = t.trim();
                (!t.is_empty()).then(|| t.to_string())
            })
            .map(|t| t.trim().to_string());
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "on" | "yes" | "true"
            )
        });
        Self {
            cache_dir,
            endpoint: var("HF_ENDPOINT")
                .map(|e| e.trim_end_matches('/').to_string())
                .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string()),
            token,
            offline,
            progress: true,
        }
    }
}

/// Whether `s` has the shape of a hub repo id: `org/name`, each part made of ASCII letters,
/// digits, `-`, `_` and `.`, neither part starting with `.` or `-` nor holding `..` (so no
/// relative path such as `./x` or `../x` is mistaken for one).
pub fn is_repo_id(s: &str) -> bool {
    let Some((org, name)) = s.split_once('/') else {
        return false;
    };
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && !p.starts_with(['.', '-'])
            && !p.contains("..")
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    };
    part_ok(org) && part_ok(name)
}

/// `models--org--name` inside the cache.
pub fn repo_folder(cache_dir: &Path, repo_id: &str) -> PathBuf {
    cache_dir.join(format!("models--{}", repo_id.replace('/', "--")))
}

/// What a complete snapshot holds: a model directory, or the one `.gguf` file of a GGUF repo.
/// `Err` says what is missing.
pub fn complete_model(snapshot: &Path) -> Result<PathBuf, String> {
    let config = snapshot.join(CONFIG_FILE);
    if !config.is_file() {
        let ggufs = gguf_files(snapshot);
        return match ggufs.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(format!("no {CONFIG_FILE} (and no .gguf file)")),
            many => Err(format!(
                "no {CONFIG_FILE} and {} .gguf files ({}); pick one",
                many.len(),
                many.iter()
                    .filter_map(|p| p.file_name())
                    .map(|n| n.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        };
    }
    if !snapshot.join(TOKENIZER_FILE).is_file() {
        return Err(format!("no {TOKENIZER_FILE}"));
    }
    if snapshot.join(SINGLE_FILE).is_file() {
        return Ok(snapshot.to_path_buf());
    }
    let index = snapshot.join(INDEX_FILE);
    if !index.is_file() {
        return Err(format!("no {SINGLE_FILE} or {INDEX_FILE}"));
    }
    for shard in index_shards(&index)? {
        if !snapshot.join(&shard).is_file() {
            return Err(format!("shard {shard} named by {INDEX_FILE} is missing"));
        }
    }
    Ok(snapshot.to_path_buf())
}

/// The distinct files of a safetensors index's `weight_map`, sorted.
fn index_shards(index: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(index).map_err(|e| format!("{INDEX_FILE}: {e}"))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{INDEX_FILE}: {e}"))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| format!("{INDEX_FILE}: no weight_map object"))?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|f| f.as_str().map(str::to_string))
        .collect();
    files.sort();
    files.dedup();
    for f in &files {
        // A shard name is a plain file name: nothing may point outside the snapshot.
        if f.is_empty() || f.contains('/') || f.contains('\\') || f.starts_with('.') {
            return Err(format!("{INDEX_FILE}: bad shard name {f:?}"));
        }
    }
    Ok(files)
}

fn gguf_files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
                && p.is_file()
        })
        .collect();
    out.sort();
    out
}

/// A complete snapshot of `repo_id` in the cache: `refs/main`'s first, then the newest other
/// complete one. `Err` holds why none qualifies (for the error message).
pub fn cached_model(cache_dir: &Path, repo_id: &str) -> Result<PathBuf, String> {
    let folder = repo_folder(cache_dir, repo_id);
    let snapshots = folder.join("snapshots");
    if !snapshots.is_dir() {
        return Err(format!("{} is not in the cache", folder.display()));
    }
    let main = std::fs::read_to_string(folder.join("refs/main"))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && !s.contains(['/', '\\']) && s != "." && s != "..");
    let mut why = Vec::new();
    if let Some(commit) = &main {
        let snap = snapshots.join(commit);
        match complete_model(&snap) {
            Ok(m) => return Ok(m),
            Err(e) => why.push(format!("snapshot {commit} (refs/main): {e}")),
        }
    }
    let mut others: Vec<(SystemTime, PathBuf)> = std::fs::read_dir(&snapshots)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| main.as_deref() != Some(&*e.file_name().to_string_lossy()))
        .filter(|e| e.path().is_dir())
        .map(|e| {
            let t = e
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            (t, e.path())
        })
        .collect();
    others.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    for (_, snap) in others {
        match complete_model(&snap) {
            Ok(m) => return Ok(m),
            Err(e) => why.push(format!(
                "snapshot {}: {e}",
                snap.file_name().unwrap_or_default().to_string_lossy()
            )),
        }
    }
    if why.is_empty() {
        why.push(format!("no snapshot in {}", snapshots.display()));
    }
    Err(why.join("; "))
}

/// The local path of `repo_id`: a complete cached snapshot, else a fresh download into the
/// cache. The result is a model directory or a `.gguf` file, ready for
/// [`crate::load_model`].
pub fn resolve_repo(repo_id: &str, opts: &HubOptions) -> Result<PathBuf, HubError> {
    if !is_repo_id(repo_id) {
        return Err(HubError::InvalidId {
            id: repo_id.to_string(),
        });
    }
    let cache_miss = match cached_model(&opts.cache_dir, repo_id) {
        Ok(path) => return Ok(path),
        Err(why) => why,
    };
    let fail = |reason: String| HubError::Download {
        repo: repo_id.to_string(),
        reason,
    };
    if opts.offline {
        return Err(fail(format!(
            "HF_HUB_OFFLINE is set and the cache has no complete copy: {cache_miss}"
        )));
    }
    download(repo_id, opts).map_err(fail)
}

/// Downloads what [`complete_model`] needs into the cache; `Err` is the reason.
fn download(repo_id: &str, opts: &HubOptions) -> Result<PathBuf, String> {
    use hf_hub::api::sync::ApiBuilder;

    let api = ApiBuilder::from_cache(hf_hub::Cache::new(opts.cache_dir.clone()))
        .with_endpoint(opts.endpoint.clone())
        .with_token(opts.token.clone())
        .with_progress(opts.progress)
        .build()
        .map_err(|e| e.to_string())?;
    let repo = api.model(repo_id.to_string());
    let info = repo.info().map_err(|e| {
        let msg = e.to_string();
        if (msg.contains("401") || msg.contains("403")) && opts.token.is_none() {
            format!("{msg}; gated or private repos need a token in HF_TOKEN")
        } else {
            msg
        }
    })?;
    let files: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let has = |f: &str| files.contains(&f);
    let get = |f: &str| repo.get(f).map_err(|e| format!("downloading {f}: {e}"));

    if !has(CONFIG_FILE) {
        let ggufs: Vec<&str> = files
            .iter()
            .copied()
            .filter(|f| f.to_ascii_lowercase().ends_with(".gguf"))
            .collect();
        return match ggufs.as_slice() {
            [one] => get(one),
            [] => Err(format!(
                "the repo has no {CONFIG_FILE} and no .gguf file: not a model rupantor loads"
            )),
            many => Err(format!(
                "the repo holds {} .gguf files ({}) and no {CONFIG_FILE}; pick one",
                many.len(),
                many.join(", ")
            )),
        };
    }
    if !has(TOKENIZER_FILE) {
        return Err(format!("the repo has no {TOKENIZER_FILE}"));
    }
    let config = get(CONFIG_FILE)?;
    get(TOKENIZER_FILE)?;
    for f in OPTIONAL_FILES.iter().filter(|f| has(f)) {
        get(f)?;
    }
    if has(SINGLE_FILE) {
        get(SINGLE_FILE)?;
    } else if has(INDEX_FILE) {
        let index = get(INDEX_FILE)?;
        for shard in index_shards(&index)? {
            get(&shard)?;
        }
    } else {
        return Err(format!("the repo has no {SINGLE_FILE} or {INDEX_FILE}"));
    }
    let snapshot = config
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| "downloaded config.json has no parent folder".to_string())?;
    complete_model(&snapshot).map_err(|e| format!("after the download, {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn repo_ids_and_paths_are_told_apart() {
        for ok in [
            "google/gemma-2-9b-it",
            "unsloth/gemma-2-9b-it-bnb-4bit",
            "a_b/c.d",
        ] {
            assert!(is_repo_id(ok), "{ok}");
        }
        for bad in [
            "gemma",
            "./model",
            "../x",
            "/abs/path",
            "a/b/c",
            "org/",
            "/name",
            "org/na me",
            "org/..",
            "org/.hidden",
            "out/model.gguf/",
        ] {
            assert!(!is_repo_id(bad), "{bad}");
        }
    }

    #[test]
    fn environment_is_read_like_huggingface_hub() {
        let env = |pairs: &[(&str, &str)]| {
            let m: HashMap<String, String> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            HubOptions::from_vars(move |k| m.get(k).cloned())
        };
        let o = env(&[("HOME", "/home/u")]);
        assert_eq!(o.cache_dir, PathBuf::from("/home/u/.cache/huggingface/hub"));
        assert_eq!(o.endpoint, DEFAULT_ENDPOINT);
        assert!(!o.offline && o.token.is_none());
        let o = env(&[("HOME", "/home/u"), ("XDG_CACHE_HOME", "/xdg")]);
        assert_eq!(o.cache_dir, PathBuf::from("/xdg/huggingface/hub"));
        let o = env(&[("HOME", "/home/u"), ("HF_HOME", "/hf")]);
        assert_eq!(o.cache_dir, PathBuf::from("/hf/hub"));
        let o = env(&[
            ("HF_HOME", "/hf"),
            ("HF_HUB_CACHE", "/cache"),
            ("HF_HUB_OFFLINE", "1"),
            ("HF_TOKEN", " hf_abc \n"),
            ("HF_ENDPOINT", "http://127.0.0.1:1/"),
        ]);
        assert_eq!(o.cache_dir, PathBuf::from("/cache"));
        assert!(o.offline);
        assert_eq!(o.token.as_deref(), Some("hf_abc"));
        assert_eq!(o.endpoint, "http://127.0.0.1:1");
        assert!(!env(&[("HF_HUB_OFFLINE", "0")]).offline);

        let home = tempfile::tempdir().unwrap();
        std::fs::write(home.path().join("token"), "hf_from_file\n").unwrap();
        let o = env(&[("HF_HOME", home.path().to_str().unwrap())]);
        assert_eq!(o.token.as_deref(), Some("hf_from_file"));
    }

    #[test]
    fn incomplete_snapshots_say_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let s = dir.path();
        assert!(complete_model(s).unwrap_err().contains("no config.json"));
        std::fs::write(s.join("config.json"), "{}").unwrap();
        assert!(complete_model(s).unwrap_err().contains("tokenizer.json"));
        std::fs::write(s.join("tokenizer.json"), "{}").unwrap();
        assert!(complete_model(s).unwrap_err().contains("model.safetensors"));
        std::fs::write(
            s.join(INDEX_FILE),
            r#"{"weight_map": {"a": "model-00001-of-00002.safetensors",
                               "b": "model-00002-of-00002.safetensors"}}"#,
        )
        .unwrap();
        std::fs::write(s.join("model-00001-of-00002.safetensors"), "x").unwrap();
        let e = complete_model(s).unwrap_err();
        assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");
        std::fs::write(s.join("model-00002-of-00002.safetensors"), "x").unwrap();
        assert_eq!(complete_model(s).unwrap(), s);

        let g = tempfile::tempdir().unwrap();
        std::fs::write(g.path().join("a.gguf"), "x").unwrap();
        assert_eq!(complete_model(g.path()).unwrap(), g.path().join("a.gguf"));
        std::fs::write(g.path().join("b.gguf"), "x").unwrap();
        assert!(complete_model(g.path()).unwrap_err().contains("pick one"));
    }
}
