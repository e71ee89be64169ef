//! Converts a problem file in any form the loader reads (.jsonl, .json, .csv) to the JSONL
//! rupantor works from, validating it on the way. Used by scripts/fetch-data.sh.
//!
//! usage: to_jsonl IN OUT.jsonl [--drop-response]
//!
//! `--drop-response` discards a `response` column, for releases whose dev split carries a
//! model's answers rather than references.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use rupantor_data::load_problems;

fn main() -> Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let drop_response = match args.iter().position(|a| a == "--drop-response") {
        Some(i) => {
            args.remove(i);
            true
        }
        None => false,
    };
    let [input, output] = args.as_slice() else {
        bail!("usage: to_jsonl IN OUT.jsonl [--drop-response]");
    };
    let (input, output) = (PathBuf::from(input), PathBuf::from(output));
    let mut problems = load_problems(&input)?;
    if drop_response {
        for p in &mut problems {
            p.response = None;
        }
    }
    let tmp = output.with_extension("jsonl.tmp");
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?,
    );
    for p in &problems {
        serde_json::to_writer(&mut out, p)?;
        out.write_all(b"\n")?;
    }
    out.into_inner()?.sync_all()?;
    std::fs::rename(&tmp, &output)
        .with_context(|| format!("moving {} to {}", tmp.display(), output.display()))?;
    eprintln!(
        "{} -> {}: {} problems",
        input.display(),
        output.display(),
        problems.len()
    );
    Ok(())
}
