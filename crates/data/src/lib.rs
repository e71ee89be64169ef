//! BLP-2025 Task 2 problems (Bangla instruction -> Python function): loaders for the
//! JSONL files rupantor works from and for the shared task's own JSON and CSV releases,
//! split resolution, and target-signature extraction.
//!
//! Loading is strict on purpose: a malformed row, a duplicate id or an empty test list
//! stops the load with an error naming the file, line/row/element and field, because a
//! silently dropped problem skews every pass@1 figure computed on the split.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod error;
mod load;
mod pylit;
mod signature;

pub use error::{DataError, Location, FETCH_HINT};
pub use signature::{extract_signature, Signature};

/// One problem: a Bangla instruction, the asserts that judge an answer, and for the trial
/// split a reference answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    pub id: u64,
    pub instruction: String,
    pub test_list: Vec<String>,
    /// Reference program (trial split only); `None` when absent, null or empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<String>,
}

/// The split names `resolve_split` maps to files in the data folder.
pub const SPLITS: [&str; 3] = ["trial", "dev", "test"];

/// Extensions tried for a named split, in order of preference.
const SPLIT_EXTENSIONS: [&str; 3] = ["jsonl", "json", "csv"];

/// Reads problems from a `.jsonl` (one object a line), `.json` (a list of objects) or
/// `.csv` (the task's release; `test_list` is a Python list literal) file.
///
/// Fields: `id` (integer; an integer-valued string in CSV), `instruction` (string),
/// `test_list` (non-empty list of strings), optional `response`. Other fields are ignored.
/// Blank JSONL lines are skipped; everything else that is off is an error.
pub fn load_problems(path: &Path) -> Result<Vec<Problem>, DataError> {
    load::load(path)
}

/// The data folder: `--data DIR` if given, else `$RUPANTOR_DATA`, else `data/blp25`
/// (where `scripts/fetch-data.sh` puts the splits).
pub fn data_dir(explicit: Option<&Path>) -> PathBuf {
    if let Some(dir) = explicit {
        return dir.to_path_buf();
    }
    match std::env::var_os("RUPANTOR_DATA") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from("data/blp25"),
    }
}

/// Maps a split name (`trial`, `dev`, `test`) to `DIR/{split}.jsonl` (or `.json`/`.csv`
/// when that is what exists); anything else is taken as a file path, so commands accept
/// either. A missing file is an error that says how to get the data.
pub fn resolve_split(data_dir: &Path, split: &str) -> Result<PathBuf, DataError> {
    if SPLITS.contains(&split) {
        let candidates: Vec<PathBuf> = SPLIT_EXTENSIONS
            .iter()
            .map(|ext| data_dir.join(format!("{split}.{ext}")))
            .collect();
        if let Some(found) = candidates.iter().find(|p| p.is_file()) {
            return Ok(found.clone());
        }
        return Err(DataError::NotFound {
            path: candidates[0].clone(),
            what: format!(
                "split \"{split}\": none of {split}.jsonl, {split}.json, {split}.csv in {}",
                data_dir.display()
            ),
        });
    }
    let path = PathBuf::from(split);
    if path.is_file() {
        Ok(path)
    } else {
        Err(DataError::NotFound {
            path,
            what: format!("not a split name ({}) and no such file", SPLITS.join(", ")),
        })
    }
}

/// `resolve_split` then `load_problems`.
pub fn load_split(data_dir: &Path, split: &str) -> Result<Vec<Problem>, DataError> {
    load_problems(&resolve_split(data_dir, split)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_dir_precedence() {
        // Only this test touches RUPANTOR_DATA in this test binary.
        let explicit = Path::new("/somewhere/else");
        assert_eq!(data_dir(Some(explicit)), explicit);
        std::env::set_var("RUPANTOR_DATA", "/from/env");
        assert_eq!(data_dir(None), PathBuf::from("/from/env"));
        assert_eq!(data_dir(Some(explicit)), explicit);
        std::env::set_var("RUPANTOR_DATA", "");
        assert_eq!(data_dir(None), PathBuf::from("data/blp25"));
        std::env::remove_var("RUPANTOR_DATA");
        assert_eq!(data_dir(None), PathBuf::from("data/blp25"));
    }

    #[test]
    fn problem_serde_round_trip_skips_absent_response() {
        let p = Problem {
            id: 3,
            instruction: "লিখুন".into(),
            test_list: vec!["assert f() == 1".into()],
            response: None,
        };
        let s = serde_json::to_string(&p).unwrap();
        assert!(!s.contains("response"), "{s}");
        assert_eq!(serde_json::from_str::<Problem>(&s).unwrap(), p);
    }
}
