//! A program for every problem: design §2's chat prompt (the instruction, and by default the
//! problem's asserts under "Your code should pass these tests:"), batched generation with the
//! KV cache, code extraction, and the two files it ends up in.
//!
//! Problems are generated in batches of similar prompt length (longest first, so the slowest
//! batch shows in the bar's estimate early). Greedy output does not depend on the batching;
//! with `temperature > 0` a problem samples from stream (seed, position in its batch), so it
//! does. Every special token stops a row ([`stop_ids`]), and so do the model config's eos ids.
//! The batched loop itself is [`generate_texts`], on any prompt ids, so the strategies of
//! `crate::strategy` (few-shot, repair, review, translation prompts) share it.
//!
//! Files, both written atomically (temp file + rename):
//!
//! * predictions JSONL: `{"id", "response", "raw"?}` per problem in input order (`response`
//!   the extracted program, `raw` the model's text when it differs) — what `rupantor eval`
//!   and the loop's `dev_predictions.jsonl` read;
//! * the task's `submission.json`: `[{"id": 1, "response": "```python\n...\n```"}, ...]`,
//!   every id in input order, each program fenced (`extract_code` gives it back unchanged).

use std::collections::HashSet;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rupantor_data::Problem;
use rupantor_exec::extract_code;
use rupantor_model::{generate_until, Gemma, GenStats, GenerateConfig, StopReason, Tokenizer};
use rupantor_train::fsutil::write_atomic;
use serde::{Deserialize, Serialize};

/// How programs are generated. Every field has a default, so a TOML `[generation]` table
/// needs only the keys it changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenSettings {
    /// Tokens per problem at most.
    pub max_new_tokens: usize,
    /// 0 is greedy.
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    /// Prompts per batch.
    pub batch: usize,
    /// Put the problem's asserts into the prompt (design §2: on for dev and test).
    pub visible_tests: bool,
    /// With `visible_tests`, only the first this many asserts (the test split shows one; dev
    /// has three). `None`: all of them.
    pub max_visible_tests: Option<usize>,
    /// Prefill in forward calls of at most this many positions (0: whole prompts).
    pub prefill_chunk: usize,
    /// Draw the progress bar on stderr (not part of any digest).
    pub progress: bool,
}

impl Default for GenSettings {
    fn default() -> Self {
        GenSettings {
            max_new_tokens: 512,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            batch: 4,
            visible_tests: true,
            max_visible_tests: None,
            prefill_chunk: 512,
            progress: true,
        }
    }
}

impl GenSettings {
    pub fn validate(&self) -> Result<()> {
        ensure!(self.batch >= 1, "generation batch must be at least 1");
        ensure!(
            self.max_new_tokens >= 1,
            "max_new_tokens must be at least 1"
        );
        ensure!(
            self.temperature >= 0.0 && self.temperature.is_finite(),
            "temperature must be finite and >= 0, got {}",
            self.temperature
        );
        ensure!(
            (0.0..=1.0).contains(&self.top_p),
            "top_p must be in [0, 1], got {}",
            self.top_p
        );
        Ok(())
    }

    /// The asserts a problem's prompt shows, if any.
    pub fn visible<'a>(&self, p: &'a Problem) -> Option<&'a [String]> {
        self.visible_tests_of(&p.test_list)
    }

    /// The part of `tests` a prompt shows, if any (what [`Self::visible`] gives a problem).
    pub fn visible_tests_of<'a>(&self, tests: &'a [String]) -> Option<&'a [String]> {
        if !self.visible_tests {
            return None;
        }
        let n = self
            .max_visible_tests
            .map_or(tests.len(), |m| m.min(tests.len()));
        Some(&tests[..n])
    }

    /// A one-line description for logs ("greedy" or the sampling settings).
    pub fn describe(&self) -> String {
        let mode = if self.temperature == 0.0 {
            "greedy".to_string()
        } else {
            format!(
                "temperature {} top-p {} seed {}",
                self.temperature, self.top_p, self.seed
            )
        };
        let tests = match (self.visible_tests, self.max_visible_tests) {
            (false, _) => "no asserts in the prompt".to_string(),
            (true, None) => "asserts in the prompt".to_string(),
            (true, Some(n)) => format!("first {n} assert(s) in the prompt"),
        };
        format!(
            "{mode}, batch {}, max {} new tokens, {tests}",
            self.batch, self.max_new_tokens
        )
    }
}

/// One problem's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenOutput {
    pub id: u64,
    /// The program (`extract_code` of `raw`).
    pub response: String,
    /// The model's text (special tokens dropped).
    pub raw: String,
    /// Sampled tokens, the stop id not counted.
    pub tokens: usize,
    pub stop: StopReason,
}

impl GenOutput {
    /// The output of problem `id` from the model's text: its program is [`program_of`].
    pub fn from_text(id: u64, t: TextOutput) -> GenOutput {
        GenOutput {
            id,
            response: program_of(&t.text),
            raw: t.text,
            tokens: t.tokens,
            stop: t.stop,
        }
    }
}

/// Byte offset of the line where `text` starts its program over: a top-level `def NAME` or
/// `class NAME` of a name already defined at top level. Small models that miss their
/// `<end_of_turn>` write the solution again and again (and Python would keep the *last*,
/// usually cut-off, copy).
pub fn program_restart(text: &str) -> Option<usize> {
    let mut seen = HashSet::new();
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        let start = at;
        at += line.len();
        let rest = line
            .strip_prefix("async def ")
            .or_else(|| line.strip_prefix("def "))
            .or_else(|| line.strip_prefix("class "));
        let Some(rest) = rest else { continue };
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() && !seen.insert(name) {
            return Some(start);
        }
    }
    None
}

/// The program in a model's text: `extract_code`, cut where it starts over
/// ([`program_restart`]).
pub fn program_of(text: &str) -> String {
    let code = extract_code(text);
    match program_restart(&code) {
        Some(at) => code[..at].trim_end().to_string(),
        None => code,
    }
}

/// What [`generate_programs`] produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// One per problem, in input order.
    pub outputs: Vec<GenOutput>,
    /// Tokens sampled over all problems (stop ids included).
    pub tokens: usize,
    pub secs: f64,
    /// Problems cut at `max_new_tokens`.
    pub cut: usize,
}

impl Generated {
    pub fn tokens_per_sec(&self) -> f64 {
        self.tokens as f64 / self.secs.max(1e-9)
    }
}

/// The model's text for one prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextOutput {
    /// The decoded tokens, special tokens dropped.
    pub text: String,
    /// Sampled tokens, the stop id not counted.
    pub tokens: usize,
    pub stop: StopReason,
}

/// What [`generate_texts`] produced.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedTexts {
    /// One per prompt, in prompt order.
    pub outputs: Vec<TextOutput>,
    /// Tokens sampled over all prompts (stop ids included).
    pub tokens: usize,
    pub secs: f64,
    /// Prompts cut at `max_new_tokens`.
    pub cut: usize,
}

/// The chat prompt ids of every problem.
pub fn prompts(tok: &Tokenizer, problems: &[Problem], s: &GenSettings) -> Vec<Vec<u32>> {
    problems
        .iter()
        .map(|p| tok.encode_chat(&p.instruction, s.visible(p)))
        .collect()
}

/// Fails when prompt `i` plus `max_new_tokens` does not fit `max_pos`; `name(i)` names the
/// prompt in the error ("problem 7").
fn check_fits_named(
    ids: &[Vec<u32>],
    name: impl Fn(usize) -> String,
    s: &GenSettings,
    max_pos: usize,
) -> Result<()> {
    if let Some((i, p)) = ids
        .iter()
        .enumerate()
        .find(|(_, p)| p.len() + s.max_new_tokens > max_pos)
    {
        bail!(
            "{}: prompt of {} tokens + max_new_tokens {} exceeds the model's context of \
             {max_pos}",
            name(i),
            p.len(),
            s.max_new_tokens
        );
    }
    Ok(())
}

fn check_fits(
    ids: &[Vec<u32>],
    problems: &[Problem],
    s: &GenSettings,
    max_pos: usize,
) -> Result<()> {
    check_fits_named(ids, |i| format!("problem {}", problems[i].id), s, max_pos)
}

/// Fails when some problem's prompt plus `max_new_tokens` does not fit `model`'s context
/// (what [`generate_programs`] checks first; the loop checks it before training).
pub fn check_context(
    model: &Gemma,
    tok: &Tokenizer,
    problems: &[Problem],
    s: &GenSettings,
) -> Result<()> {
    check_fits(
        &prompts(tok, problems, s),
        problems,
        s,
        model.config().max_position_embeddings,
    )
}

/// Stop ids: every special token of the vocabulary (`<end_of_turn>` first, then `<eos>`,
/// `<start_of_turn>`, the `<unusedN>` and image tokens, ...); the model config's eos ids are
/// added by [`GenerateConfig::with_eos_of`].
///
/// Any special token ends a reply, not only `<end_of_turn>`: none belongs in a program, and
/// they decode to nothing, so whatever the model writes after one would be glued to the
/// program. The 270M adapter of the real run closes about one reply in ten with
/// `<unused1337>model` (the next turn's header, with an unused token where
/// `<start_of_turn>` belongs) and then writes its function again; stopping at the unused token
/// keeps the program it finished.
pub fn stop_ids(tok: &Tokenizer) -> Vec<u32> {
    let mut ids: Vec<u32> = tok.eot_id().into_iter().collect();
    ids.extend(
        (0..tok.vocab_size() as u32).filter(|&id| tok.is_special(id) && Some(id) != tok.eot_id()),
    );
    ids
}

/// Batches of problem indices with similar prompt lengths, longest first; ties in input
/// order.
pub fn length_batches(lens: &[usize], batch: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by(|&a, &b| lens[b].cmp(&lens[a]).then(a.cmp(&b)));
    order.chunks(batch.max(1)).map(<[usize]>::to_vec).collect()
}

/// Generates a program for every problem (see the module docs). Fails before generating
/// anything when a prompt plus `max_new_tokens` does not fit the model's context.
pub fn generate_programs(
    model: &Gemma,
    tok: &Tokenizer,
    problems: &[Problem],
    s: &GenSettings,
) -> Result<Generated> {
    s.validate()?;
    let ids = prompts(tok, problems, s);
    check_fits(&ids, problems, s, model.config().max_position_embeddings)?;
    let texts = generate_texts(model, tok, &ids, s, "generate")?;
    let outputs: Vec<GenOutput> = problems
        .iter()
        .zip(texts.outputs)
        .map(|(p, t)| GenOutput::from_text(p.id, t))
        .collect();
    Ok(Generated {
        outputs,
        tokens: texts.tokens,
        secs: texts.secs,
        cut: texts.cut,
    })
}

/// The model's text for every prompt (ids as [`Tokenizer::encode_chat`] or
/// [`Tokenizer::encode_chat_turns`] make them): the batched loop behind
/// [`generate_programs`] and the strategies' stages. Prompts are batched by length (see the
/// module docs); `label` prefixes the progress bar. Fails before generating anything when a
/// prompt plus `max_new_tokens` does not fit the model's context.
pub fn generate_texts(
    model: &Gemma,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    s: &GenSettings,
    label: &str,
) -> Result<GeneratedTexts> {
    s.validate()?;
    check_fits_named(
        prompts,
        |i| format!("prompt {i}"),
        s,
        model.config().max_position_embeddings,
    )?;
    let gen_cfg = GenerateConfig {
        max_new_tokens: s.max_new_tokens,
        temperature: s.temperature,
        top_p: s.top_p,
        seed: s.seed,
        stop_ids: stop_ids(tok),
        prefill_chunk: s.prefill_chunk,
    }
    .with_eos_of(model.config());

    let bar = ProgressBar::with_draw_target(
        Some(prompts.len() as u64),
        rupantor_train::progress::draw_target(s.progress),
    );
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} problems {msg} elapsed {elapsed} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(label.to_string());
    let t0 = Instant::now();
    let mut tokens = 0usize;
    let mut outs: Vec<Option<TextOutput>> = vec![None; prompts.len()];
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    for group in length_batches(&lens, s.batch) {
        let batch: Vec<Vec<u32>> = group.iter().map(|&i| prompts[i].clone()).collect();
        let progress = |st: GenStats| {
            let secs = t0.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format!(
                "{:.1} tok/s (batch {:.1} tok/s decode, {} rows live)",
                (tokens + st.generated_tokens) as f64 / secs,
                st.decode_tokens_per_sec(),
                st.active
            ));
        };
        // A row whose program starts over is done: the rest of its budget would only repeat.
        let restarted = |_: usize, ids: &[u32]| {
            ids.last()
                .is_some_and(|&t| tok.decode(&[t], false).contains('\n'))
                && program_restart(&tok.decode(ids, true)).is_some()
        };
        let gens = generate_until(model, &batch, &gen_cfg, progress, restarted)
            .context("generation failed")?;
        for (&i, g) in group.iter().zip(gens) {
            let stop_token = matches!(g.stop_reason, StopReason::StopToken(_));
            tokens += g.tokens.len() + usize::from(stop_token);
            outs[i] = Some(TextOutput {
                text: tok.decode(&g.tokens, true),
                tokens: g.tokens.len(),
                stop: g.stop_reason,
            });
        }
        bar.inc(group.len() as u64);
    }
    bar.finish_and_clear();
    let outputs: Vec<TextOutput> = outs
        .into_iter()
        .map(|o| o.expect("every prompt is in one batch"))
        .collect();
    let cut = outputs
        .iter()
        .filter(|o| o.stop == StopReason::MaxTokens)
        .count();
    Ok(GeneratedTexts {
        outputs,
        tokens,
        secs: t0.elapsed().as_secs_f64(),
        cut,
    })
}

/// `(id, program)` for every problem in input order: what `submission.json` holds (see
/// [`write_submission`], which fences each program).
pub fn generate_submission(
    model: &Gemma,
    tok: &Tokenizer,
    problems: &[Problem],
    s: &GenSettings,
) -> Result<Vec<(u64, String)>> {
    Ok(generate_programs(model, tok, problems, s)?
        .outputs
        .into_iter()
        .map(|o| (o.id, o.response))
        .collect())
}

/// A program as the task's submissions carry it: a ```python fence around it.
pub fn fence_python(code: &str) -> String {
    format!("```python\n{}\n```", code.trim_end())
}

fn unique_ids<'a>(ids: impl IntoIterator<Item = &'a u64>) -> Result<()> {
    let mut seen = HashSet::new();
    for id in ids {
        ensure!(seen.insert(*id), "id {id} appears twice");
    }
    Ok(())
}

/// The task's `submission.json` text: `[{"id", "response"}]` in the given order, each
/// response the fenced program. Duplicate ids are an error.
pub fn submission_json(rows: &[(u64, String)]) -> Result<String> {
    unique_ids(rows.iter().map(|(id, _)| id))?;
    let list: Vec<serde_json::Value> = rows
        .iter()
        .map(|(id, code)| serde_json::json!({"id": id, "response": fence_python(code)}))
        .collect();
    let mut s = serde_json::to_string_pretty(&list)?;
    s.push('\n');
    Ok(s)
}

/// Writes [`submission_json`] to `path` atomically.
pub fn write_submission(path: &Path, rows: &[(u64, String)]) -> Result<()> {
    let text = submission_json(rows).with_context(|| format!("{}", path.display()))?;
    write_atomic(path, text.as_bytes())
}

/// Predictions JSONL: `{"id", "response", "raw"?}` per output, `raw` only where it differs.
pub fn predictions_jsonl(outputs: &[GenOutput]) -> Result<String> {
    unique_ids(outputs.iter().map(|o| &o.id))?;
    let mut s = String::new();
    for o in outputs {
        let mut row = serde_json::json!({"id": o.id, "response": o.response});
        if o.raw != o.response {
            row["raw"] = serde_json::Value::String(o.raw.clone());
        }
        s.push_str(&row.to_string());
        s.push('\n');
    }
    Ok(s)
}

/// Writes [`predictions_jsonl`] to `path` atomically.
pub fn write_predictions(path: &Path, outputs: &[GenOutput]) -> Result<()> {
    let text = predictions_jsonl(outputs).with_context(|| format!("{}", path.display()))?;
    write_atomic(path, text.as_bytes())
}

/// `rupantor generate --out PATH`: `submission.json` form for a `.json` path, predictions
/// JSONL otherwise.
pub fn write_outputs(path: &Path, outputs: &[GenOutput]) -> Result<()> {
    let submission = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    if submission {
        let rows: Vec<(u64, String)> = outputs.iter().map(|o| (o.id, o.response.clone())).collect();
        write_submission(path, &rows)
    } else {
        write_predictions(path, outputs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_program_that_starts_over_is_cut_where_it_does() {
        let once = "def f(x):\n    return x + 1";
        let again = format!("{once}\ndef f(x):\n    return x +");
        assert_eq!(program_restart(once), None);
        assert_eq!(program_restart(&again), Some(once.len() + 1));
        assert_eq!(program_of(&again), once);
        // Helpers, nested and methods of the same name are not a restart.
        let helpers = "def g(y):\n    def f(z):\n        return z\n    return f(y)\n\
                       class A:\n    def f(self):\n        return 1\ndef f(x):\n    return g(x)";
        assert_eq!(program_restart(helpers), None);
        assert_eq!(program_of(helpers), helpers);
        // Inside a fence, and classes too.
        let fenced = "```python\nclass P:\n    pass\n\nclass P:\n    x = 1\n```";
        assert_eq!(program_of(fenced), "class P:\n    pass");
    }
    use rupantor_exec::read_predictions;

    fn out(id: u64, response: &str, raw: &str) -> GenOutput {
        GenOutput {
            id,
            response: response.into(),
            raw: raw.into(),
            tokens: 3,
            stop: StopReason::StopToken(1),
        }
    }

    #[test]
    fn batches_group_by_length_and_cover_every_problem() {
        let lens = [5, 9, 1, 9, 3, 7, 2];
        let b = length_batches(&lens, 3);
        assert_eq!(b, [vec![1, 3, 5], vec![0, 4, 6], vec![2]]);
        let mut all: Vec<usize> = b.concat();
        all.sort();
        assert_eq!(all, (0..lens.len()).collect::<Vec<_>>());
        assert!(length_batches(&[], 4).is_empty());
    }

    #[test]
    fn submission_keeps_input_order_and_round_trips_through_eval() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/submission.json");
        let rows = vec![
            (3, "def f():\n    return 1\n\n".to_string()),
            (1, "x = 2".to_string()),
            (2, String::new()),
        ];
        write_submission(&path, &rows).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(
            v,
            serde_json::json!([
                {"id": 3, "response": "```python\ndef f():\n    return 1\n```"},
                {"id": 1, "response": "```python\nx = 2\n```"},
                {"id": 2, "response": "```python\n\n```"},
            ])
        );
        // What eval reads back is each program, in the same order.
        let back = read_predictions(&path).unwrap();
        let got: Vec<(u64, String)> = back
            .into_iter()
            .map(|p| (p.id, extract_code(&p.response)))
            .collect();
        assert_eq!(
            got,
            vec![
                (3, "def f():\n    return 1".to_string()),
                (1, "x = 2".to_string()),
                (2, String::new()),
            ]
        );
        // Only the file itself is left in the folder (the temporary was renamed).
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["submission.json"]);
    }

    #[test]
    fn duplicate_ids_are_refused() {
        let e = submission_json(&[(1, "a".into()), (1, "b".into())]).unwrap_err();
        assert!(e.to_string().contains("id 1 appears twice"), "{e}");
        assert!(predictions_jsonl(&[out(4, "a", "a"), out(4, "b", "b")]).is_err());
    }

    #[test]
    fn jsonl_and_submission_forms_by_extension() {
        let dir = tempfile::tempdir().unwrap();
        let outs = [
            out(
                3,
                "def f():\n    return 1",
                "```python\ndef f():\n    return 1\n```",
            ),
            out(1, "x = 2", "x = 2"),
        ];
        let jsonl = dir.path().join("p.jsonl");
        write_outputs(&jsonl, &outs).unwrap();
        let rows: Vec<serde_json::Value> = std::fs::read_to_string(&jsonl)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0]["id"], 3);
        assert_eq!(rows[0]["raw"], outs[0].raw);
        assert!(rows[1].get("raw").is_none());
        let sub = dir.path().join("submission.JSON");
        write_outputs(&sub, &outs).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&sub).unwrap()).unwrap();
        assert_eq!(v[0]["response"], "```python\ndef f():\n    return 1\n```");
    }

    #[test]
    fn visible_asserts_follow_the_settings() {
        let p = Problem {
            id: 1,
            instruction: "i".into(),
            test_list: vec!["assert a".into(), "assert b".into(), "assert c".into()],
            response: None,
        };
        let mut s = GenSettings::default();
        assert_eq!(s.visible(&p).unwrap().len(), 3);
        s.max_visible_tests = Some(1);
        assert_eq!(s.visible(&p).unwrap(), ["assert a".to_string()]);
        s.max_visible_tests = Some(9);
        assert_eq!(s.visible(&p).unwrap().len(), 3);
        s.visible_tests = false;
        assert!(s.visible(&p).is_none());
        assert!(GenSettings {
            batch: 0,
            ..GenSettings::default()
        }
        .validate()
        .is_err());
    }
}
