//! `rupantor train --device cuda` end to end on the tiny Gemma-2 fixture: a process killed
//! with SIGKILL mid-run and resumed with `--resume` ends with the uninterrupted run's adapter
//! bytes. (The trainer's own GPU tests, crates/train/tests/gpu_train.rs, compare GPU and CPU
//! runs and move checkpoints between the devices.)
//!
//! Without a GPU every test prints `SKIPPED <test>: <reason>` and passes; with
//! `RUPANTOR_REQUIRE_GPU=1` a missing GPU fails it. A GPU bundle runs this binary away from
//! the source tree: `RUPANTOR_BIN` then names the rupantor binary and `RUPANTOR_FIXTURES` the
//! fixtures folder.
#![cfg(feature = "cuda")]

mod common;

use common::*;
use rupantor_model::device::gpu_for_test;

#[test]
fn gpu_kill_9_then_resume_ends_with_the_uninterrupted_adapter() {
    if gpu_for_test("gpu_kill_9_then_resume_ends_with_the_uninterrupted_adapter").is_some() {
        kill_9_then_resume(&["--device", "cuda"]);
    }
}
