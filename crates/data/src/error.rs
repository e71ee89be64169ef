//! Loader errors. Every one names the file and, where there is one, the line, row or
//! element and the field, so a bad row in a 500-problem file can be fixed without a debugger.

use std::fmt;
use std::path::{Path, PathBuf};

/// Where in a file a problem was found. Each format counts in its own natural unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// 1-based line of a JSONL file (or of a JSON file, for syntax errors).
    Line(usize),
    /// 1-based data row of a CSV file; the header is not counted.
    Row(usize),
    /// The header line of a CSV file.
    Header,
    /// 0-based index into the top-level list of a JSON file.
    Element(usize),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Line(n) => write!(f, "line {n}"),
            Location::Row(n) => write!(f, "row {n}"),
            Location::Header => write!(f, "header"),
            Location::Element(i) => write!(f, "element [{i}]"),
        }
    }
}

/// `path:17` for lines (as compilers print them), `path: row 3` / `path: element [2]` else.
struct At<'a>(&'a Path, &'a Location);

impl fmt::Display for At<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.1 {
            Location::Line(n) => write!(f, "{}:{n}", self.0.display()),
            other => write!(f, "{}: {other}", self.0.display()),
        }
    }
}

fn found_suffix(found: &Option<String>) -> String {
    match found {
        Some(s) => format!(", found {s}"),
        None => String::new(),
    }
}

/// What the fix for a missing data file is; shared by every "not found" message.
pub const FETCH_HINT: &str =
    "run scripts/fetch-data.sh, pass --data DIR, or set RUPANTOR_DATA to a folder holding trial/dev/test .jsonl files";

/// A problem file that cannot be loaded as it is. Nothing is skipped silently: the first
/// bad row stops the load.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// The file (or a split's file) does not exist.
    #[error("{}: not found ({what}); {FETCH_HINT}", .path.display())]
    NotFound { path: PathBuf, what: String },

    /// The file exists but could not be read.
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The extension is not one the loader knows.
    #[error("{}: unknown file type; expected a .jsonl, .json or .csv file", .path.display())]
    UnknownFormat { path: PathBuf },

    /// Bytes that are not UTF-8. `offset` counts bytes from the start of the file.
    #[error("{}:{line}: invalid UTF-8 at byte offset {offset} (byte {column} of the line)", .path.display())]
    NotUtf8 {
        path: PathBuf,
        line: usize,
        column: usize,
        offset: usize,
    },

    /// A line/row/file that is not the expected shape (not JSON, not an object, bad CSV).
    #[error("{}: {message}", At(.path, .at))]
    Syntax {
        path: PathBuf,
        at: Location,
        message: String,
    },

    /// A field that is missing or has the wrong type or value.
    #[error("{}: field \"{field}\": expected {expected}{}", At(.path, .at), found_suffix(.found))]
    Field {
        path: PathBuf,
        at: Location,
        field: String,
        expected: String,
        found: Option<String>,
    },

    /// Two problems with the same id; both places are named.
    #[error("{}: duplicate id {id} (first at {first})", At(.path, .second))]
    DuplicateId {
        path: PathBuf,
        id: u64,
        first: Location,
        second: Location,
    },

    /// A well-formed file with no problems in it, which is never what a run wants.
    #[error("{}: contains no problems", .path.display())]
    Empty { path: PathBuf },
}

impl DataError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            DataError::NotFound { path, .. }
            | DataError::Io { path, .. }
            | DataError::UnknownFormat { path }
            | DataError::NotUtf8 { path, .. }
            | DataError::Syntax { path, .. }
            | DataError::Field { path, .. }
            | DataError::DuplicateId { path, .. }
            | DataError::Empty { path } => path,
        }
    }

    /// The line, row or element the error is about, when it is about one.
    pub fn location(&self) -> Option<Location> {
        match self {
            DataError::NotUtf8 { line, .. } => Some(Location::Line(*line)),
            DataError::Syntax { at, .. } | DataError::Field { at, .. } => Some(*at),
            DataError::DuplicateId { second, .. } => Some(*second),
            _ => None,
        }
    }
}
