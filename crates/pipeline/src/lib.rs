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

pub mod digest;
pub mod generate;
pub mod pool;
pub mod report;
pub mod selfimprove;
pub mod verify;

pub use generate::{
    check_context, fence_python, generate_programs, generate_submission, predictions_jsonl,
    submission_json, write_outputs, write_predictions, write_submission, GenOutput, GenSettings,
    Generated,
};
pub use pool::{normalize_program, FoldOutcome, Pool, PoolEntry, Source, DEV_TRAIN_ID_OFFSET};
pub use selfimprove::{
    run_loop, BaseModel, FnFactory, Generator, IterationReport, LoopConfig, LoopHooks, LoopReport,
    ModelFactory, ModelGenerator, Paths, Stage, StageTimes, TrainSummary, DEV_SPLIT, TRAIN_SPLIT,
};
pub use verify::{verdicts_jsonl, verify_programs, write_verdicts, Verified, VerifySettings};
