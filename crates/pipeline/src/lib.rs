//! The pipeline on top of the model, trainer and sandbox crates:
//!
//! * [`generate`]: a program for every problem — batched, length-bucketed generation with the
//!   design §2 chat prompt, code extraction, the JSONL predictions file and the task's
//!   `submission.json`. One implementation for `rupantor generate` and the loop.
//! * [`pool`]: the training pool with provenance (trial or dev, the iteration that folded
//!   it), the fold rule (only programs passing all their dev asserts; no problem twice; no
//!   program text twice) and the training ids that keep trial and dev ids apart.
//! * [`selfimprove`]: the loop of design §1 (`rupantor train --iter N`): per iteration a
//!   fresh adapter from the base on the pool, dev generation, sandbox verification, fold;
//!   every file atomic, finished iterations kept across a crash, interrupted training resumed
//!   from its checkpoint; `report.md`.
//! * [`verify`]: programs against all their asserts in the sandbox, pass@1, `verdicts.jsonl`.
//! * [`strategy`]: the inference strategies of design §7 on the local model — few-shot
//!   turns retrieved by [`retrieval`] (TF-IDF over Bangla and code tokens), repair from
//!   sandbox feedback on the visible asserts, a reviewer pass, and a glossary-guided
//!   ([`glossary`]) translation beside the Bangla; their prompts are in [`prompts`]. Each is
//!   a switch of [`Strategies`] so each can be ablated; all off is plain generation.

pub mod digest;
pub mod generate;
pub mod glossary;
pub mod pool;
pub mod prompts;
pub mod report;
pub mod retrieval;
pub mod selfimprove;
pub mod strategy;
pub mod verify;

pub use generate::{
    check_context, fence_python, generate_programs, generate_submission, generate_texts,
    predictions_jsonl, submission_json, write_outputs, write_predictions, write_submission,
    GenOutput, GenSettings, Generated, GeneratedTexts, TextOutput,
};
pub use glossary::{Glossary, GlossaryEntry, DEFAULT_GLOSSARY_PATH};
pub use pool::{normalize_program, FoldOutcome, Pool, PoolEntry, Source, DEV_TRAIN_ID_OFFSET};
pub use retrieval::{ExamplePool, Solved, TfIdfIndex};
pub use selfimprove::{
    run_loop, BaseModel, FnFactory, Generator, IterationReport, LoopConfig, LoopHooks, LoopReport,
    ModelFactory, ModelGenerator, Paths, Stage, StageTimes, TrainSummary, DEV_SPLIT, TRAIN_SPLIT,
};
pub use strategy::{
    check_job, generate_with_strategies, run_strategies, GenStage, ModelTexts, Produced,
    ReviewOutcome, ScriptedGenerator, StageStats, Strategies, StrategyGenerator, StrategyItem,
    StrategyJob, StrategyRun, StrategyStats, TextGenerator,
};
pub use verify::{verdicts_jsonl, verify_programs, write_verdicts, Verified, VerifySettings};
