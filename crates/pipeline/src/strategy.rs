//! Inference strategies on the local model (design §7), each a switch, each ablatable:
//!
//! 1. **translate**: the model translates each Bangla instruction to English, with the
//!    glossary entries that occur in it listed ([`crate::glossary`]); the translation goes
//!    into the main prompt beside the Bangla (BanglaForge);
//! 2. **main generation**, with the `fewshot` nearest solved problems of a pool as earlier
//!    turns ([`crate::retrieval`], BanglaForge's RAG k=5);
//! 3. **repair**: the programs run against their *visible* asserts in the sandbox — the first
//!    assert of each problem (the one the test split gives; on dev the other two stay unseen,
//!    so a dev score still judges on asserts the repair never saw) unless
//!    `repair_on_all_dev_asserts`; each failing item is re-prompted with its code, verdict
//!    class, a hint for the class, the trace tail and those asserts, up to `repair` rounds,
//!    leaving at its first pass (NALA_MAINZ's debugger, BanglaForge's refinement);
//! 4. **review**: each program that passes its visible asserts goes to a reviewer prompt that
//!    may rewrite it for edge cases; a rewrite is kept only if it still passes them.
//!
//! The model sits behind [`TextGenerator`] (prompt ids in, texts out), so the control flow is
//! tested with a scripted stub ([`ScriptedGenerator`]) and runs for real through
//! [`ModelTexts`] ([`generate_texts`] on a Gemma). With every switch off, the main prompts are
//! exactly `generate_programs`' and so are the programs.
//!
//! A repaired program that still fails replaces the one before it (it is what the next
//! round's feedback is about); either way it fails the visible assert, which every full
//! score includes, so the choice cannot change a pass@1.

use std::fmt;
use std::time::Instant;

use anyhow::{bail, ensure, Result};
use rupantor_data::Problem;
use rupantor_exec::{Score, Verdict};
use rupantor_model::{Gemma, StopReason, Tokenizer};
use rupantor_train::LoraModel;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::generate::{generate_texts, GenOutput, GenSettings, Generated, GeneratedTexts};
use crate::glossary::Glossary;
use crate::pool::normalize_program;
use crate::prompts::{
    clean_translation, fewshot_history, main_user_content, repair_user_content,
    review_user_content, translation_user_content,
};
use crate::retrieval::{ExamplePool, Solved};
use crate::selfimprove::Generator;
use crate::verify::{verify_programs, VerifySettings};

/// New tokens a translation may take at most (less when `max_new_tokens` is smaller).
pub const TRANSLATE_MAX_NEW_TOKENS: usize = 256;

/// Which strategies run. All off by default: plain generation. A TOML `[strategies]` table
/// needs only the keys it changes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Strategies {
    /// Solved problems retrieved per problem as few-shot turns (0: none; BanglaForge: 5).
    pub fewshot: usize,
    /// Repair rounds at most (0: no repair; 5 saturates for BanglaForge).
    pub repair: usize,
    /// The reviewer pass over programs that pass their visible asserts.
    pub review: bool,
    /// Translate each instruction to English first and show it beside the Bangla.
    pub translate: bool,
    /// Repair and review run (and show) all of a problem's asserts, not only the first. For
    /// the loop's own dev generation; a dev figure made with it has seen its judges.
    pub repair_on_all_dev_asserts: bool,
}

impl Strategies {
    /// Few-shot and repair above this are refused (prompts and time would explode).
    pub const MAX_FEWSHOT: usize = 32;
    pub const MAX_REPAIR: usize = 20;

    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.fewshot <= Self::MAX_FEWSHOT,
            "fewshot {} is above {}",
            self.fewshot,
            Self::MAX_FEWSHOT
        );
        ensure!(
            self.repair <= Self::MAX_REPAIR,
            "repair {} is above {} rounds",
            self.repair,
            Self::MAX_REPAIR
        );
        Ok(())
    }

    /// Every switch off.
    pub fn is_plain(&self) -> bool {
        self.fewshot == 0 && self.repair == 0 && !self.review && !self.translate
    }

    /// Repair or review run programs in the sandbox.
    pub fn needs_sandbox(&self) -> bool {
        self.repair > 0 || self.review
    }

    /// The asserts repair and review run and show: the first one, or all of them with
    /// `repair_on_all_dev_asserts`.
    pub fn visible_asserts<'a>(&self, p: &'a Problem) -> &'a [String] {
        if self.repair_on_all_dev_asserts {
            &p.test_list
        } else {
            &p.test_list[..p.test_list.len().min(1)]
        }
    }

    /// One line for logs and tables: "plain", "fewshot 5 + repair 3 + review + translate".
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.translate {
            parts.push("translate".to_string());
        }
        if self.fewshot > 0 {
            parts.push(format!("fewshot {}", self.fewshot));
        }
        if self.repair > 0 {
            parts.push(format!("repair {}", self.repair));
        }
        if self.review {
            parts.push("review".to_string());
        }
        let mut s = if parts.is_empty() {
            "plain".to_string()
        } else {
            parts.join(" + ")
        };
        if self.repair_on_all_dev_asserts && self.needs_sandbox() {
            s.push_str(" (all asserts visible)");
        }
        s
    }
}

/// Which generation a prompt batch is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GenStage {
    Translate,
    Main,
    /// Repair round k (1-based).
    Repair(usize),
    Review,
}

impl fmt::Display for GenStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GenStage::Translate => f.write_str("translate"),
            GenStage::Main => f.write_str("generate"),
            GenStage::Repair(k) => write!(f, "repair {k}"),
            GenStage::Review => f.write_str("review"),
        }
    }
}

/// The model as the strategies see it: prompt ids in, one text per prompt out.
pub trait TextGenerator {
    fn tokenizer(&self) -> &Tokenizer;
    /// Positions the model holds (prompt + new tokens); `None`: not checked.
    fn context_len(&self) -> Option<usize>;
    /// One output per prompt, in prompt order, with at most `settings.max_new_tokens` new
    /// tokens each. Never called with no prompts.
    fn generate(
        &mut self,
        stage: GenStage,
        prompts: &[Vec<u32>],
        settings: &GenSettings,
    ) -> Result<GeneratedTexts>;
}

/// The real model: [`generate_texts`] on a Gemma (the base, or a `LoraModel`'s `model()`
/// with training off).
pub struct ModelTexts<'a> {
    pub model: &'a Gemma,
    pub tokenizer: &'a Tokenizer,
}

impl TextGenerator for ModelTexts<'_> {
    fn tokenizer(&self) -> &Tokenizer {
        self.tokenizer
    }

    fn context_len(&self) -> Option<usize> {
        Some(self.model.config().max_position_embeddings)
    }

    fn generate(
        &mut self,
        stage: GenStage,
        prompts: &[Vec<u32>],
        settings: &GenSettings,
    ) -> Result<GeneratedTexts> {
        generate_texts(
            self.model,
            self.tokenizer,
            prompts,
            settings,
            &stage.to_string(),
        )
    }
}

/// A stub model for tests of control flow: each prompt is decoded to its text (special
/// tokens kept) and `script(stage, prompt_text)` gives the reply. Every call is recorded.
pub struct ScriptedGenerator<F> {
    pub tokenizer: Tokenizer,
    pub script: F,
    /// `(stage, prompt texts)` per call, in order.
    pub calls: Vec<(GenStage, Vec<String>)>,
    /// Reported as the context length.
    pub context_len: Option<usize>,
}

impl<F: FnMut(GenStage, &str) -> String> ScriptedGenerator<F> {
    pub fn new(tokenizer: Tokenizer, script: F) -> Self {
        ScriptedGenerator {
            tokenizer,
            script,
            calls: Vec::new(),
            context_len: None,
        }
    }

    /// The prompt texts of every call of `stage`, in order.
    pub fn prompts_of(&self, stage: GenStage) -> Vec<&String> {
        self.calls
            .iter()
            .filter(|(s, _)| *s == stage)
            .flat_map(|(_, p)| p)
            .collect()
    }
}

impl<F: FnMut(GenStage, &str) -> String> TextGenerator for ScriptedGenerator<F> {
    fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    fn context_len(&self) -> Option<usize> {
        self.context_len
    }

    fn generate(
        &mut self,
        stage: GenStage,
        prompts: &[Vec<u32>],
        _settings: &GenSettings,
    ) -> Result<GeneratedTexts> {
        let texts: Vec<String> = prompts
            .iter()
            .map(|ids| self.tokenizer.decode(ids, false))
            .collect();
        let mut outputs = Vec::new();
        let mut tokens = 0;
        for t in &texts {
            let text = (self.script)(stage, t);
            let n = self.tokenizer.encode(&text, false).len();
            tokens += n + 1;
            outputs.push(crate::generate::TextOutput {
                text,
                tokens: n,
                stop: StopReason::StopToken(self.tokenizer.eot_id().unwrap_or(0)),
            });
        }
        self.calls.push((stage, texts));
        Ok(GeneratedTexts {
            outputs,
            tokens,
            secs: 0.0,
            cut: 0,
        })
    }
}

/// What one [`run_strategies`] call works on.
#[derive(Clone, Copy)]
pub struct StrategyJob<'a> {
    /// The problems' split (`dev`, `test`, ...): with the id, what keeps a problem out of its
    /// own few-shot examples when the pool holds that split.
    pub split: &'a str,
    pub problems: &'a [Problem],
    pub strategies: &'a Strategies,
    /// Sampling, batch, token budget and the main prompt's visible asserts.
    pub generation: &'a GenSettings,
    pub sandbox: &'a VerifySettings,
    /// The solved problems few-shot examples come from (needed when `fewshot > 0`).
    pub examples: Option<&'a ExamplePool>,
    /// For `translate`; `None`: the shipped glossary.
    pub glossary: Option<&'a Glossary>,
    /// Run the visible asserts on the final programs even when no strategy needs the sandbox,
    /// so the visible-assert pass rate can be reported beside the full one.
    pub score_visible: bool,
}

/// Which stage produced an item's final program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Produced {
    Main,
    Repair,
    Review,
}

/// What the reviewer did to an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReviewOutcome {
    /// It returned the same program (compared normalized).
    Unchanged,
    /// It rewrote the program and the rewrite passes the visible asserts: kept.
    Kept,
    /// It rewrote the program and the rewrite fails them: the program before stays.
    Rejected,
}

/// One problem's result.
#[derive(Debug, Clone, PartialEq)]
pub struct StrategyItem {
    /// The final program (`response`) and the text of the generation that produced it.
    pub output: GenOutput,
    pub produced_by: Produced,
    /// Repair rounds this item went through (0: it never entered repair).
    pub repair_rounds: usize,
    /// The final program on the visible asserts (`None` when nothing ran the sandbox).
    pub visible: Option<Verdict>,
    /// The English translation in its prompt.
    pub translation: Option<String>,
    /// `(split, id)` of its few-shot examples, nearest first.
    pub examples: Vec<(String, u64)>,
    pub review: Option<ReviewOutcome>,
}

/// Generation in one stage, summed over its calls.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StageStats {
    pub prompts: usize,
    pub tokens: usize,
    pub secs: f64,
    /// Outputs cut at `max_new_tokens`.
    pub cut: usize,
}

impl StageStats {
    fn add(&mut self, t: &GeneratedTexts) {
        self.prompts += t.outputs.len();
        self.tokens += t.tokens;
        self.secs += t.secs;
        self.cut += t.cut;
    }

    pub fn tokens_per_sec(&self) -> f64 {
        self.tokens as f64 / self.secs.max(1e-9)
    }
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StrategyStats {
    pub translate: StageStats,
    pub main: StageStats,
    pub repair: StageStats,
    pub review: StageStats,
    /// Programs run against visible asserts, and the seconds it took.
    pub sandbox_runs: usize,
    pub sandbox_secs: f64,
    /// Items with a translation in their prompt.
    pub translated: usize,
    /// Few-shot examples over all prompts.
    pub fewshot_examples: usize,
    /// Few-shot examples dropped so a prompt fits the context.
    pub fewshot_dropped: usize,
    /// Translation, repair or review prompts left out because they do not fit the context.
    pub too_long: usize,
    /// Repair rounds that ran.
    pub repair_rounds: usize,
    /// Items that failed their visible asserts after the main generation (entered repair).
    pub entered_repair: usize,
    /// Of those, the ones a repair made pass.
    pub repaired: usize,
    pub reviewed: usize,
    pub review_unchanged: usize,
    pub review_kept: usize,
    pub review_rejected: usize,
    /// Visible-assert score of the main generation's programs.
    pub visible_before: Option<Score>,
    /// Visible-assert score of the final programs.
    pub visible: Option<Score>,
    /// The whole run.
    pub secs: f64,
}

impl StrategyStats {
    /// Tokens generated over all stages.
    pub fn tokens(&self) -> usize {
        self.translate.tokens + self.main.tokens + self.repair.tokens + self.review.tokens
    }

    /// Every figure as one JSON object (scores as `Score::to_json`).
    pub fn to_json(&self) -> Value {
        let stage = |s: &StageStats| serde_json::to_value(s).expect("plain struct");
        json!({
            "translate": stage(&self.translate),
            "main": stage(&self.main),
            "repair": stage(&self.repair),
            "review": stage(&self.review),
            "sandbox_runs": self.sandbox_runs,
            "sandbox_secs": self.sandbox_secs,
            "translated": self.translated,
            "fewshot_examples": self.fewshot_examples,
            "fewshot_dropped": self.fewshot_dropped,
            "too_long": self.too_long,
            "repair_rounds": self.repair_rounds,
            "entered_repair": self.entered_repair,
            "repaired": self.repaired,
            "reviewed": self.reviewed,
            "review_unchanged": self.review_unchanged,
            "review_kept": self.review_kept,
            "review_rejected": self.review_rejected,
            "visible_before": self.visible_before.as_ref().map(Score::to_json),
            "visible": self.visible.as_ref().map(Score::to_json),
            "tokens": self.tokens(),
            "secs": self.secs,
        })
    }
}

/// What [`run_strategies`] returns.
#[derive(Debug, Clone, PartialEq)]
pub struct StrategyRun {
    /// One per problem, in input order.
    pub items: Vec<StrategyItem>,
    pub stats: StrategyStats,
}

impl StrategyRun {
    /// The final outputs, for `write_outputs` / predictions files.
    pub fn outputs(&self) -> Vec<GenOutput> {
        self.items.iter().map(|i| i.output.clone()).collect()
    }

    /// As `generate_programs` reports it (tokens and seconds over every stage), for the
    /// loop's `Generator`.
    pub fn generated(&self) -> Generated {
        Generated {
            outputs: self.outputs(),
            tokens: self.stats.tokens(),
            secs: self.stats.secs,
            cut: self
                .items
                .iter()
                .filter(|i| i.output.stop == StopReason::MaxTokens)
                .count(),
        }
    }

    /// Pass rate on the visible asserts (when they ran).
    pub fn visible_score(&self) -> Option<&Score> {
        self.stats.visible.as_ref()
    }
}

fn stage(
    gen: &mut dyn TextGenerator,
    which: GenStage,
    prompts: &[Vec<u32>],
    settings: &GenSettings,
    stats: &mut StageStats,
) -> Result<GeneratedTexts> {
    if prompts.is_empty() {
        return Ok(GeneratedTexts {
            outputs: Vec::new(),
            tokens: 0,
            secs: 0.0,
            cut: 0,
        });
    }
    let out = gen.generate(which, prompts, settings)?;
    ensure!(
        out.outputs.len() == prompts.len(),
        "{which}: the generator gave {} outputs for {} prompts",
        out.outputs.len(),
        prompts.len()
    );
    stats.add(&out);
    Ok(out)
}

/// Runs `programs[k]` against the visible asserts of `problems[idx[k]]`.
fn run_visible(
    job: &StrategyJob<'_>,
    idx: &[usize],
    programs: &[String],
    stats: &mut StrategyStats,
) -> Result<Vec<Verdict>> {
    if idx.is_empty() {
        return Ok(Vec::new());
    }
    let t = Instant::now();
    let probs: Vec<Problem> = idx
        .iter()
        .map(|&i| {
            let p = &job.problems[i];
            Problem {
                id: p.id,
                instruction: String::new(),
                test_list: job.strategies.visible_asserts(p).to_vec(),
                response: None,
            }
        })
        .collect();
    let v = verify_programs(&probs, programs, job.sandbox, job.generation.progress)?;
    stats.sandbox_runs += idx.len();
    stats.sandbox_secs += t.elapsed().as_secs_f64();
    Ok(v.verdicts)
}

fn visible_score(items: &[StrategyItem]) -> Score {
    Score::new(items.iter().map(|i| (i.output.id, i.visible.as_ref())))
}

/// Runs the strategies of `job` for its problems (see the module docs): translate →
/// main generation (with few-shot turns) → repair rounds → review. Fails before generating
/// when a switch lacks what it needs (a pool for few-shot, a usable sandbox for repair,
/// review or `score_visible`), and when a main prompt does not fit the context even without
/// its few-shot examples (those are dropped, farthest first, until it fits).
pub fn run_strategies(gen: &mut dyn TextGenerator, job: &StrategyJob<'_>) -> Result<StrategyRun> {
    let st = job.strategies;
    let s = job.generation;
    check_job(job)?;
    let pool = job.examples.filter(|_| st.fewshot > 0);
    let shipped;
    let glossary = match (st.translate, job.glossary) {
        (false, _) => None,
        (true, Some(g)) => Some(g),
        (true, None) => {
            shipped = Glossary::embedded();
            Some(&shipped)
        }
    };
    let check_visible = st.needs_sandbox() || job.score_visible;
    let t_all = Instant::now();
    let mut stats = StrategyStats::default();
    let problems = job.problems;
    let n = problems.len();
    let ctx = gen.context_len();
    let fits = |len: usize, max_new: usize| ctx.is_none_or(|c| len + max_new <= c);

    // 1. translation
    let mut translations: Vec<Option<String>> = vec![None; n];
    if let Some(g) = glossary {
        let ts = GenSettings {
            max_new_tokens: s.max_new_tokens.min(TRANSLATE_MAX_NEW_TOKENS),
            ..s.clone()
        };
        let (mut idx, mut prompts) = (Vec::new(), Vec::new());
        let tok = gen.tokenizer();
        for (i, p) in problems.iter().enumerate() {
            let content = translation_user_content(&p.instruction, &g.matches(&p.instruction));
            let ids = tok.encode_chat_turns::<&str>(&[], &content);
            if fits(ids.len(), ts.max_new_tokens) {
                idx.push(i);
                prompts.push(ids);
            } else {
                stats.too_long += 1;
            }
        }
        let out = stage(
            gen,
            GenStage::Translate,
            &prompts,
            &ts,
            &mut stats.translate,
        )?;
        for (i, o) in idx.into_iter().zip(out.outputs) {
            translations[i] = clean_translation(&o.text);
        }
        stats.translated = translations.iter().filter(|t| t.is_some()).count();
    }

    // 2. main generation, with few-shot turns
    let mut prompts = Vec::with_capacity(n);
    let mut examples: Vec<Vec<(String, u64)>> = Vec::with_capacity(n);
    {
        let tok = gen.tokenizer();
        for (i, p) in problems.iter().enumerate() {
            let content =
                main_user_content(&p.instruction, s.visible(p), translations[i].as_deref());
            let mut shots: Vec<&Solved> = pool.map_or_else(Vec::new, |pool| {
                pool.nearest(job.split, p, st.fewshot)
                    .into_iter()
                    .map(|(e, _)| e)
                    .collect()
            });
            let ids = loop {
                let ids = tok.encode_chat_turns(&fewshot_history(&shots, s), &content);
                if fits(ids.len(), s.max_new_tokens) || shots.is_empty() {
                    break ids;
                }
                shots.pop();
                stats.fewshot_dropped += 1;
            };
            if !fits(ids.len(), s.max_new_tokens) {
                bail!(
                    "problem {}: prompt of {} tokens + max_new_tokens {} exceeds the model's \
                     context of {}",
                    p.id,
                    ids.len(),
                    s.max_new_tokens,
                    ctx.unwrap_or_default()
                );
            }
            stats.fewshot_examples += shots.len();
            examples.push(shots.iter().map(|e| (e.split.clone(), e.id)).collect());
            prompts.push(ids);
        }
    }
    let out = stage(gen, GenStage::Main, &prompts, s, &mut stats.main)?;
    let mut items: Vec<StrategyItem> = problems
        .iter()
        .zip(out.outputs)
        .zip(examples)
        .zip(translations)
        .map(|(((p, o), examples), translation)| StrategyItem {
            output: GenOutput::from_text(p.id, o),
            produced_by: Produced::Main,
            repair_rounds: 0,
            visible: None,
            translation,
            examples,
            review: None,
        })
        .collect();

    // 3. visible asserts, repair rounds
    if check_visible {
        let all: Vec<usize> = (0..n).collect();
        let programs: Vec<String> = items.iter().map(|i| i.output.response.clone()).collect();
        for (item, v) in items
            .iter_mut()
            .zip(run_visible(job, &all, &programs, &mut stats)?)
        {
            item.visible = Some(v);
        }
        stats.visible_before = Some(visible_score(&items));
    }
    let passed = |i: &StrategyItem| i.visible.as_ref().is_some_and(|v| v.passed);
    let mut repairable = vec![true; n];
    stats.entered_repair = if st.repair > 0 {
        items.iter().filter(|i| !passed(i)).count()
    } else {
        0
    };
    for round in 1..=st.repair {
        let (mut idx, mut prompts) = (Vec::new(), Vec::new());
        {
            let tok = gen.tokenizer();
            for (i, item) in items.iter().enumerate() {
                if passed(item) || !repairable[i] {
                    continue;
                }
                let p = &problems[i];
                let verdict = item.visible.as_ref().expect("the visible asserts ran");
                let content = repair_user_content(
                    &p.instruction,
                    item.translation.as_deref(),
                    &item.output.response,
                    verdict,
                    st.visible_asserts(p),
                );
                let ids = tok.encode_chat_turns::<&str>(&[], &content);
                if fits(ids.len(), s.max_new_tokens) {
                    idx.push(i);
                    prompts.push(ids);
                } else {
                    repairable[i] = false;
                    stats.too_long += 1;
                }
            }
        }
        if idx.is_empty() {
            break;
        }
        let out = stage(gen, GenStage::Repair(round), &prompts, s, &mut stats.repair)?;
        stats.repair_rounds = round;
        let new: Vec<GenOutput> = idx
            .iter()
            .zip(out.outputs)
            .map(|(&i, o)| GenOutput::from_text(problems[i].id, o))
            .collect();
        let programs: Vec<String> = new.iter().map(|o| o.response.clone()).collect();
        let verdicts = run_visible(job, &idx, &programs, &mut stats)?;
        for ((&i, o), v) in idx.iter().zip(new).zip(verdicts) {
            let item = &mut items[i];
            stats.repaired += usize::from(v.passed);
            item.output = o;
            item.produced_by = Produced::Repair;
            item.repair_rounds = round;
            item.visible = Some(v);
        }
    }

    // 4. review of passing programs
    if st.review {
        let (mut idx, mut prompts) = (Vec::new(), Vec::new());
        {
            let tok = gen.tokenizer();
            for (i, item) in items.iter().enumerate() {
                if !passed(item) {
                    continue;
                }
                let p = &problems[i];
                let content = review_user_content(
                    &p.instruction,
                    item.translation.as_deref(),
                    &item.output.response,
                    st.visible_asserts(p),
                );
                let ids = tok.encode_chat_turns::<&str>(&[], &content);
                if fits(ids.len(), s.max_new_tokens) {
                    idx.push(i);
                    prompts.push(ids);
                } else {
                    stats.too_long += 1;
                }
            }
        }
        stats.reviewed = idx.len();
        let out = stage(gen, GenStage::Review, &prompts, s, &mut stats.review)?;
        let (mut changed, mut rewrites) = (Vec::new(), Vec::new());
        for (&i, o) in idx.iter().zip(out.outputs) {
            let o = GenOutput::from_text(problems[i].id, o);
            if normalize_program(&o.response) == normalize_program(&items[i].output.response) {
                items[i].review = Some(ReviewOutcome::Unchanged);
                stats.review_unchanged += 1;
            } else {
                changed.push(i);
                rewrites.push(o);
            }
        }
        let programs: Vec<String> = rewrites.iter().map(|o| o.response.clone()).collect();
        let verdicts = run_visible(job, &changed, &programs, &mut stats)?;
        for ((&i, o), v) in changed.iter().zip(rewrites).zip(verdicts) {
            let item = &mut items[i];
            if v.passed {
                item.output = o;
                item.produced_by = Produced::Review;
                item.visible = Some(v);
                item.review = Some(ReviewOutcome::Kept);
                stats.review_kept += 1;
            } else {
                item.review = Some(ReviewOutcome::Rejected);
                stats.review_rejected += 1;
            }
        }
    }

    if check_visible {
        stats.visible = Some(visible_score(&items));
    }
    stats.secs = t_all.elapsed().as_secs_f64();
    Ok(StrategyRun { items, stats })
}

/// [`run_strategies`] on a Gemma ([`ModelTexts`]).
pub fn generate_with_strategies(
    model: &Gemma,
    tokenizer: &Tokenizer,
    job: &StrategyJob<'_>,
) -> Result<StrategyRun> {
    run_strategies(&mut ModelTexts { model, tokenizer }, job)
}

/// The loop's dev generation with strategies: a [`Generator`] that runs [`run_strategies`]
/// with an iteration's trained model. `run_loop` builds one per iteration with few-shot
/// examples from that iteration's pool ([`ExamplePool::from_pool`]); a dev problem folded
/// into the pool is still never its own example.
pub struct StrategyGenerator {
    pub strategies: Strategies,
    /// The problems' split (`dev` in the loop).
    pub split: String,
    pub sandbox: VerifySettings,
    pub examples: Option<ExamplePool>,
    pub glossary: Option<Glossary>,
    /// Each iteration's run (items and stats), in order, for reports.
    pub runs: Vec<(usize, StrategyRun)>,
}

impl Generator for StrategyGenerator {
    fn generate(
        &mut self,
        iteration: usize,
        model: &LoraModel,
        tokenizer: &Tokenizer,
        problems: &[Problem],
        settings: &GenSettings,
    ) -> Result<Generated> {
        model.set_training(false);
        let job = StrategyJob {
            split: &self.split,
            problems,
            strategies: &self.strategies,
            generation: settings,
            sandbox: &self.sandbox,
            examples: self.examples.as_ref(),
            glossary: self.glossary.as_ref(),
            score_visible: false,
        };
        let run = generate_with_strategies(model.model(), tokenizer, &job)?;
        let generated = run.generated();
        self.runs.push((iteration, run));
        Ok(generated)
    }
}

/// What [`run_strategies`] checks before generating anything (settings, a pool for
/// few-shot, a usable sandbox for repair, review or `score_visible`), for callers that want
/// to fail before loading a model.
pub fn check_job(job: &StrategyJob<'_>) -> Result<()> {
    job.strategies.validate()?;
    job.generation.validate()?;
    if job.strategies.fewshot > 0 && job.examples.is_none() {
        bail!("few-shot examples need a pool of solved problems");
    }
    if job.strategies.needs_sandbox() || job.score_visible {
        job.sandbox.validate()?;
        job.sandbox.ensure_usable()?;
    }
    Ok(())
}
