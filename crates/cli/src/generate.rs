//! `rupantor generate`: a program for every problem of a split.
//!
//! Prompts are design §2's chat format (`Tokenizer::encode_chat`): the instruction, and by
//! default the problem's visible asserts under "Your code should pass these tests:". Problems
//! are generated in batches of similar prompt length (less left padding), with a progress bar
//! counting problems and showing decode tokens/s. Each output goes through `extract_code`.
//!
//! The output is written once, atomically (temp file + rename), in the split's order:
//! JSONL `{"id", "response", "raw"?}` (`response` the extracted program, `raw` the model's text
//! when it differs), or, for a `.json` path, the task's `submission.json`:
//! `[{"id", "response"}]` with each response fenced as ```` ```python ... ``` ````.
//!
//! Sampling draws from one stream per prompt of a batch (`--seed`, position in the batch), so
//! with `--temperature > 0` the output of a problem depends on the batch it lands in; greedy
//! output does not depend on batching.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use rupantor_data::Problem;
use rupantor_exec::extract_code;
use rupantor_model::{generate, GenStats, GenerateConfig, StopReason};

use crate::model_arg::{self, ModelArgs};
use crate::run_config::RunConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A TOML preset (configs/*.toml); flags override its [model] and [generation] tables.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Data folder (default: $RUPANTOR_DATA, then data/blp25).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Split: trial, dev, test, or a problems file (.jsonl/.json/.csv).
    #[arg(long, default_value = "dev")]
    pub split: String,
    /// Only the first N problems of the split.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Output: JSONL {"id","response","raw"?}, or the task's submission.json form when the
    /// name ends in .json [default: out/generate/{split}.jsonl].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Tokens to generate per problem at most [default: 512].
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Sampling temperature; 0 is greedy [default: 0].
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Nucleus sampling mass [default: 1].
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Sampling seed [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Prompts per batch [default: 4].
    #[arg(long)]
    pub batch: Option<usize>,
    /// Put the problem's visible asserts into the prompt [default: on].
    #[arg(long, value_enum)]
    pub visible_tests: Option<OnOff>,
}

/// The generation settings after flags, config and defaults.
#[derive(Debug, Clone, PartialEq)]
struct Settings {
    max_new_tokens: usize,
    temperature: f64,
    top_p: f64,
    seed: u64,
    batch: usize,
    visible_tests: bool,
}

impl Settings {
    fn resolve(args: &GenerateArgs, cfg: &RunConfig) -> Result<Self> {
        let g = &cfg.generation;
        let s = Self {
            max_new_tokens: args.max_new_tokens.or(g.max_new_tokens).unwrap_or(512),
            temperature: args.temperature.or(g.temperature).unwrap_or(0.0),
            top_p: args.top_p.or(g.top_p).unwrap_or(1.0),
            seed: args.seed.or(g.seed).unwrap_or(0),
            batch: args.batch.or(g.batch).unwrap_or(4),
            visible_tests: args
                .visible_tests
                .map(|v| v == OnOff::On)
                .or(g.visible_tests)
                .unwrap_or(true),
        };
        if s.batch == 0 {
            bail!("--batch must be at least 1");
        }
        if s.max_new_tokens == 0 {
            bail!("--max-new-tokens must be at least 1");
        }
        Ok(s)
    }
}

/// One problem's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub id: u64,
    pub response: String,
    pub raw: String,
}

/// The default output path: `out/generate/{split}.jsonl` (a file split by its stem).
fn default_out(split: &str) -> PathBuf {
    let name = Path::new(split)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "predictions".into());
    PathBuf::from("out/generate").join(format!("{name}.jsonl"))
}

/// Batches of problem indices with similar prompt lengths (longest first, so the slowest
/// batch shows up early in the bar's estimate).
fn batches(lens: &[usize], batch: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by(|&a, &b| lens[b].cmp(&lens[a]).then(a.cmp(&b)));
    order.chunks(batch).map(<[usize]>::to_vec).collect()
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let cfg = RunConfig::load(args.config.as_deref())?;
    let model_settings = cfg.model_settings(&args.model);
    let s = Settings::resolve(&args, &cfg)?;
    let data_dir = rupantor_data::data_dir(args.data.as_deref());
    let mut problems = rupantor_data::load_split(&data_dir, &args.split)
        .with_context(|| format!("loading split {:?}", args.split))?;
    if let Some(n) = args.limit {
        problems.truncate(n);
    }
    let out_path = args.out.clone().unwrap_or_else(|| default_out(&args.split));

    let loaded = model_arg::load(&model_settings)?;
    eprintln!(
        "generate: {} ({}) loaded in {:.1}s; {} problems from {}, batch {}, {}",
        loaded.path.display(),
        loaded.form(model_settings.quant),
        loaded.load_secs,
        problems.len(),
        args.split,
        s.batch,
        if s.temperature == 0.0 {
            "greedy".to_string()
        } else {
            format!(
                "temperature {} top-p {} seed {}",
                s.temperature, s.top_p, s.seed
            )
        }
    );
    let outputs = generate_all(&loaded, &problems, &s)?;
    write_outputs(&out_path, &outputs)?;
    let truncated = outputs.iter().filter(|o| o.raw.is_empty()).count();
    println!(
        "wrote {} ({} problems{})",
        out_path.display(),
        outputs.len(),
        if truncated > 0 {
            format!(", {truncated} empty")
        } else {
            String::new()
        }
    );
    Ok(())
}

fn generate_all(
    loaded: &model_arg::LoadedModel,
    problems: &[Problem],
    s: &Settings,
) -> Result<Vec<Output>> {
    let tok = &loaded.tokenizer;
    let model = &loaded.model;
    let prompts: Vec<Vec<u32>> = problems
        .iter()
        .map(|p| {
            tok.encode_chat(
                &p.instruction,
                s.visible_tests.then_some(p.test_list.as_slice()),
            )
        })
        .collect();
    let max_pos = model.config().max_position_embeddings;
    if let Some((i, p)) = prompts
        .iter()
        .enumerate()
        .find(|(_, p)| p.len() + s.max_new_tokens > max_pos)
    {
        bail!(
            "problem {}: prompt of {} tokens + --max-new-tokens {} exceeds the model's context \
             of {max_pos}",
            problems[i].id,
            p.len(),
            s.max_new_tokens
        );
    }
    let mut stop_ids: Vec<u32> = tok.eot_id().into_iter().collect();
    stop_ids.extend(tok.eos_id());
    let gen_cfg = GenerateConfig {
        max_new_tokens: s.max_new_tokens,
        temperature: s.temperature,
        top_p: s.top_p,
        seed: s.seed,
        stop_ids,
        prefill_chunk: 512,
    }
    .with_eos_of(model.config());

    let bar = ProgressBar::new(problems.len() as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} problems {msg} elapsed {elapsed} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix("generate");
    let t0 = Instant::now();
    let mut done_tokens = 0usize;
    let mut raw: Vec<Option<(String, StopReason)>> = vec![None; problems.len()];
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    for group in batches(&lens, s.batch) {
        let batch_prompts: Vec<Vec<u32>> = group.iter().map(|&i| prompts[i].clone()).collect();
        let gens = generate(model, &batch_prompts, &gen_cfg, |st: GenStats| {
            let total = done_tokens + st.generated_tokens;
            let secs = t0.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format!(
                "{:.1} tok/s (batch {:.1} tok/s decode, {} rows live)",
                total as f64 / secs,
                st.decode_tokens_per_sec(),
                st.active
            ));
        })
        .context("generation failed")?;
        for (&i, g) in group.iter().zip(gens) {
            done_tokens += g.tokens.len() + usize::from(g.stop_reason != StopReason::MaxTokens);
            raw[i] = Some((tok.decode(&g.tokens, true), g.stop_reason));
        }
        bar.inc(group.len() as u64);
    }
    bar.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    let stopped_at_limit = raw
        .iter()
        .flatten()
        .filter(|(_, r)| *r == StopReason::MaxTokens)
        .count();
    eprintln!(
        "generate: {} problems, {done_tokens} tokens in {secs:.1}s ({:.1} tokens/s){}",
        problems.len(),
        done_tokens as f64 / secs.max(1e-9),
        if stopped_at_limit > 0 {
            format!(", {stopped_at_limit} cut at --max-new-tokens")
        } else {
            String::new()
        }
    );
    Ok(problems
        .iter()
        .zip(raw)
        .map(|(p, r)| {
            let (text, _) = r.expect("every problem is in one batch");
            Output {
                id: p.id,
                response: extract_code(&text),
                raw: text,
            }
        })
        .collect())
}

/// The file's bytes: JSONL rows, or the submission.json list for a `.json` path.
fn render(path: &Path, outputs: &[Output]) -> String {
    let submission = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    if submission {
        let rows: Vec<serde_json::Value> = outputs
            .iter()
            .map(|o| {
                serde_json::json!({
                    "id": o.id,
                    "response": format!("```python\n{}\n```", o.response.trim_end()),
                })
            })
            .collect();
        let mut s = serde_json::to_string_pretty(&rows).expect("JSON values serialize");
        s.push('\n');
        return s;
    }
    let mut s = String::new();
    for o in outputs {
        let mut row = serde_json::json!({"id": o.id, "response": o.response});
        if o.raw != o.response {
            row["raw"] = serde_json::Value::String(o.raw.clone());
        }
        s.push_str(&row.to_string());
        s.push('\n');
    }
    s
}

/// Writes atomically: a temporary file in the same folder, synced, then renamed.
fn write_outputs(path: &Path, outputs: &[Output]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path
        .file_name()
        .with_context(|| format!("{}: not a file name", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let text = render(path, outputs);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", path.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_group_by_length_and_cover_every_problem() {
        let lens = [5, 9, 1, 9, 3, 7, 2];
        let b = batches(&lens, 3);
        assert_eq!(b, [vec![1, 3, 5], vec![0, 4, 6], vec![2]]);
        let mut all: Vec<usize> = b.concat();
        all.sort();
        assert_eq!(all, (0..lens.len()).collect::<Vec<_>>());
    }

    #[test]
    fn jsonl_and_submission_forms() {
        let outs = [
            Output {
                id: 3,
                response: "def f():\n    return 1".into(),
                raw: "```python\ndef f():\n    return 1\n```".into(),
            },
            Output {
                id: 1,
                response: "x = 2".into(),
                raw: "x = 2".into(),
            },
        ];
        let jsonl = render(Path::new("p.jsonl"), &outs);
        let rows: Vec<serde_json::Value> = jsonl
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(rows[0]["id"], 3);
        assert_eq!(rows[0]["raw"], outs[0].raw);
        assert!(rows[1].get("raw").is_none());
        let sub: serde_json::Value =
            serde_json::from_str(&render(Path::new("submission.json"), &outs)).unwrap();
        assert_eq!(
            sub,
            serde_json::json!([
                {"id": 3, "response": "```python\ndef f():\n    return 1\n```"},
                {"id": 1, "response": "```python\nx = 2\n```"},
            ])
        );
        // What eval reads back is the program itself.
        assert_eq!(
            extract_code(sub[0]["response"].as_str().unwrap()),
            outs[0].response
        );
    }

    #[test]
    fn default_output_follows_the_split() {
        assert_eq!(default_out("dev"), PathBuf::from("out/generate/dev.jsonl"));
        assert_eq!(
            default_out("/tmp/mine.jsonl"),
            PathBuf::from("out/generate/mine.jsonl")
        );
    }
}
