//! Sandboxed execution of untrusted Python programs against their asserts (design §6),
//! and the scoring helpers behind `rupantor eval`. See README.md for what holds where.
//!
//! Model output is untrusted code and the self-improvement loop trusts the verdicts, so:
//!
//! * Each program runs with its asserts appended, as one module, in its own `python3`
//!   process (forked from a pre-started interpreter that has run no untrusted code, see
//!   `runner.py`) in its own process group and a private, empty directory, with wall and
//!   CPU time, address-space, file-size and process-count limits, stdin on /dev/null,
//!   stdout/stderr read concurrently and capped (tails kept), and an environment of only
//!   `PATH`, `LANG=C.UTF-8`, `PYTHONDONTWRITEBYTECODE=1`, `PYTHONHASHSEED=0`, `HOME` and
//!   `TMPDIR` (both the private directory).
//! * Where user namespaces are allowed (checked once per process), each worker lives in
//!   new user, mount, network, IPC and pid namespaces: no network (only a down
//!   loopback), every mount read-only and nosuid but the worker's own tmpfs on /tmp and
//!   /dev/shm (emptied after every program), SysV IPC of its own (a worker whose program
//!   left an object there is replaced), a /proc that shows only the sandbox, no
//!   capabilities, and as root outside an unprivileged uid (nobody outside). When the
//!   worker's init dies the kernel kills all that is left in its pid namespace; between
//!   programs the runner kills every process the last one left.
//! * Nothing a program changes reaches the next one: a worker whose program signalled
//!   its runner or changed the runner's limits, priority or CPU set (it runs as the
//!   runner's uid), or left files the runner cannot remove, is replaced, and the jobs
//!   queued behind it go to a fresh one.
//! * Without namespaces it falls back, with one warning per process, to process groups:
//!   the group is SIGKILLed at the end and the runner, a child subreaper, sweeps every
//!   orphan the program left (double forks and `setsid` included); as root the program
//!   runs as uid 65534. There is no network or filesystem isolation then beyond file
//!   permissions. As root where uid 65534 does not exist, nothing runs at all.
//! * A program passes only if it exits 0 *and* a per-run random key, which the harness
//!   moves from one inherited descriptor to another only after the module's last
//!   statement (the last assert) ran, arrives exactly and as the only thing on that
//!   descriptor. Both descriptor numbers are random; the key is never in the program's
//!   source or memory before its asserts ran. So `sys.exit(0)`, `os._exit(0)`, atexit
//!   hooks or `raise SystemExit` before the asserts fail, and so does printing anything
//!   that looks like a sentinel or monkeypatching `print`, `sys.stdout` or builtins. A
//!   program written to hunt down both descriptors and forge the hand-over is not
//!   stopped; no in-process check can be proof against the code it runs.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

mod score;
mod spawn;
mod sys;
mod verdict;
mod worker;

pub use score::{extract_code, pair_predictions, read_predictions, Prediction, Score};
pub use verdict::{Verdict, VerdictClass};

use worker::Worker;

/// Which isolation to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Isolation {
    /// Namespaces where the OS allows them, else the fallback with one warning.
    #[default]
    Auto,
    /// Namespaces or nothing: every run fails with the reason where they are refused.
    Namespaces,
    /// Process groups only (for tests and for machines where the probe misleads).
    Fallback,
}

/// Limits and interpreter for the sandbox.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxConfig {
    /// Wall-clock limit per program (default 10 s).
    pub wall_time: Duration,
    /// CPU-time limit per process (RLIMIT_CPU, whole seconds, default 10 s).
    pub cpu_time: Duration,
    /// Address-space limit (RLIMIT_AS, default 2 GiB).
    pub memory_bytes: u64,
    /// Largest file a program may write (RLIMIT_FSIZE, default 64 MiB).
    pub file_size_bytes: u64,
    /// Processes (threads count too) a program may have at once (default 64).
    pub max_processes: u32,
    /// Bytes of stdout and of stderr kept, from the end (default 64 KiB).
    pub output_cap_bytes: usize,
    /// The interpreter (default: `python3` from PATH, resolved through shims).
    pub python: PathBuf,
    /// Default [`Isolation::Auto`].
    pub isolation: Isolation,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            wall_time: Duration::from_secs(10),
            cpu_time: Duration::from_secs(10),
            memory_bytes: 2 << 30,
            file_size_bytes: 64 << 20,
            max_processes: 64,
            output_cap_bytes: 64 << 10,
            python: default_python(),
            isolation: Isolation::Auto,
        }
    }
}

/// `python3` from PATH. A shim script (pyenv and the like) is resolved to the real
/// interpreter once, so a run does not pay for the shim and does not need its
/// environment.
pub fn default_python() -> PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(find_python).clone()
}

fn find_python() -> PathBuf {
    let fallback = PathBuf::from("python3");
    let Some(path) = std::env::var_os("PATH") else {
        return fallback;
    };
    let Some(found) = std::env::split_paths(&path)
        .map(|d| d.join("python3"))
        .find(|p| p.is_file())
    else {
        return fallback;
    };
    let is_script = std::fs::read(&found)
        .map(|b| b.starts_with(b"#!"))
        .unwrap_or(false);
    if !is_script {
        return found;
    }
    let real = Command::new(&found)
        .args(["-c", "import sys; print(sys.executable)"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .filter(|p| p.is_absolute() && p.is_file());
    real.unwrap_or(found)
}

/// The module a program runs as: the program, then its asserts, one per line.
pub fn module_source(program: &str, asserts: &[String]) -> String {
    let mut src = String::with_capacity(
        program.len() + asserts.iter().map(|a| a.len() + 1).sum::<usize>() + 2,
    );
    src.push_str(program);
    if !src.ends_with('\n') {
        src.push('\n');
    }
    src.push('\n');
    for a in asserts {
        src.push_str(a);
        src.push('\n');
    }
    src
}

static NS_PROBE: OnceLock<Result<(), String>> = OnceLock::new();

/// Whether this process may create the user, mount, network, IPC and pid namespaces the
/// sandbox uses (probed once, by starting `python -c ''` inside them).
pub fn namespace_support(python: &Path) -> Result<(), String> {
    NS_PROBE.get_or_init(|| probe_namespaces(python)).clone()
}

fn probe_namespaces(python: &Path) -> Result<(), String> {
    let mut cmd = Command::new(python);
    cmd.args(["-S", "-c", ""])
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .current_dir("/");
    let mut child =
        spawn::spawn_namespaced(&mut cmd, -1, 1 << 20, worker::privileges(true, python))
            .map_err(|e| e.to_string())?;
    match child.wait() {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("a probe inside the namespaces ended with {s}")),
        Err(e) => Err(e.to_string()),
    }
}

/// Decides the isolation for `cfg`: `Ok(true)` namespaces, `Ok(false)` the fallback.
fn resolve_isolation(cfg: &SandboxConfig) -> Result<bool, String> {
    static WARN: Once = Once::new();
    if sys::euid() == 0 && !spawn::id_mapped(spawn::SANDBOX_OUTER_ID) {
        // programs would run as root: with namespaces root-owned devices stay writable
        // to them, without, they could signal or overwrite anything root owns
        return Err(format!(
            "refusing to run untrusted programs: we are root and uid/gid {} (nobody), which they \
             would run as, is not mapped in this user namespace; run as an ordinary user",
            spawn::SANDBOX_OUTER_ID
        ));
    }
    match cfg.isolation {
        Isolation::Fallback => Ok(false),
        Isolation::Namespaces => namespace_support(&cfg.python)
            .map(|()| true)
            .map_err(|e| format!("namespaces were required but are not available: {e}")),
        Isolation::Auto => match namespace_support(&cfg.python) {
            Ok(()) => Ok(true),
            Err(why) => {
                WARN.call_once(|| {
                    eprintln!(
                        "warning: rupantor-exec: user namespaces are not available ({why}); programs run \
                         with resource limits, process-group kill and an orphan sweep only: no network \
                         isolation, no read-only filesystem, no private /tmp{}",
                        if sys::euid() == 0 {
                            ""
                        } else {
                            ", and as our own uid (they can signal and write what we can)"
                        }
                    );
                });
                Ok(false)
            }
        },
    }
}

/// Which protections hold for `cfg` on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Protections {
    /// Programs can run at all (false: every run fails with `why_not`).
    pub usable: bool,
    /// New user, mount, network, IPC and pid namespaces per worker.
    pub namespaces: bool,
    /// Why not, when not.
    pub why_not: Option<String>,
    /// Programs run as an unprivileged id rather than ours (we are root outside).
    pub unprivileged_id: bool,
    /// The kernel's process-count limit applies to programs.
    pub process_limit: bool,
}

/// Reports the protections `run_program` / `run_many` will apply for `cfg`.
pub fn protections(cfg: &SandboxConfig) -> Protections {
    let ns = match resolve_isolation(cfg) {
        Ok(ns) => ns,
        Err(e) => {
            return Protections {
                usable: false,
                namespaces: false,
                why_not: Some(e),
                unprivileged_id: false,
                process_limit: false,
            }
        }
    };
    let own_id = matches!(
        worker::privileges(ns, &cfg.python),
        spawn::Privileges::ToId { .. }
    );
    let why_not = match (ns, cfg.isolation) {
        (true, _) => None,
        (false, Isolation::Fallback) => Some("fallback requested".to_string()),
        (false, _) => namespace_support(&cfg.python).err(),
    };
    Protections {
        usable: true,
        namespaces: ns,
        why_not,
        unprivileged_id: own_id,
        process_limit: ns || own_id,
    }
}

fn failed(msg: String, wall: Duration) -> Verdict {
    Verdict {
        passed: false,
        class: VerdictClass::Other,
        trace: format!("[sandbox] {msg}"),
        wall,
    }
}

/// Runs `program` followed by `asserts` (one module) in a fresh sandbox.
pub fn run_program(cfg: &SandboxConfig, program: &str, asserts: &[String]) -> Verdict {
    let start = Instant::now();
    let ns = match resolve_isolation(cfg) {
        Ok(ns) => ns,
        Err(e) => return failed(e, start.elapsed()),
    };
    match Worker::spawn(cfg, ns) {
        Ok(mut w) => {
            let mut v = w.run(cfg, &module_source(program, asserts)).verdict;
            v.wall = start.elapsed();
            v
        }
        Err(e) => failed(
            format!("cannot start {}: {e}", cfg.python.display()),
            start.elapsed(),
        ),
    }
}

/// Runs every `(program, asserts)` job over `workers` parallel sandbox workers (at least
/// one, at most one per job); verdicts come back in job order. `progress` is called once
/// per finished job with the number finished so far.
pub fn run_many(
    cfg: &SandboxConfig,
    jobs: &[(String, Vec<String>)],
    workers: usize,
    progress: impl Fn(usize) + Sync,
) -> Vec<Verdict> {
    if jobs.is_empty() {
        return Vec::new();
    }
    let ns = match resolve_isolation(cfg) {
        Ok(ns) => ns,
        Err(e) => {
            return jobs
                .iter()
                .enumerate()
                .map(|(i, _)| {
                    progress(i + 1);
                    failed(e.clone(), Duration::ZERO)
                })
                .collect();
        }
    };
    let workers = workers.clamp(1, jobs.len());
    let next = AtomicUsize::new(0);
    let finished = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<Verdict>>> = jobs.iter().map(|_| Mutex::new(None)).collect();
    let record = |i: usize, v: Verdict| {
        *results[i].lock().expect("result slot") = Some(v);
        progress(finished.fetch_add(1, Ordering::Relaxed) + 1);
    };
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                let mut worker: Option<Worker> = None;
                // jobs sent to `worker`, oldest first, and jobs to (re)send before new ones
                let mut in_flight: VecDeque<usize> = VecDeque::new();
                let mut again: VecDeque<usize> = VecDeque::new();
                let mut tries: Vec<(usize, u32)> = Vec::new();
                loop {
                    // keep the worker busy: the next job waits in its queue while one runs,
                    // so it never waits for us between programs
                    while in_flight.len() < 2 {
                        let i = match again.pop_front() {
                            Some(i) => i,
                            None => {
                                let i = next.fetch_add(1, Ordering::Relaxed);
                                if i >= jobs.len() {
                                    break;
                                }
                                i
                            }
                        };
                        let (program, asserts) = &jobs[i];
                        if worker.is_none() {
                            let start = Instant::now();
                            match Worker::spawn(cfg, ns) {
                                Ok(w) => worker = Some(w),
                                Err(e) => {
                                    record(
                                        i,
                                        failed(
                                            format!("cannot start {}: {e}", cfg.python.display()),
                                            start.elapsed(),
                                        ),
                                    );
                                    continue;
                                }
                            }
                        }
                        let w = worker.as_mut().expect("worker started above");
                        debug_assert_eq!(w.namespaced(), ns);
                        debug_assert_eq!(w.in_flight(), in_flight.len());
                        let src = module_source(program, asserts);
                        if !w.can_take(src.len()) {
                            again.push_front(i);
                            break;
                        }
                        if let Err(e) = w.submit(cfg, &src) {
                            // the runner is gone: what was sent comes back unstarted
                            if in_flight.is_empty() {
                                worker = None;
                                if retry(&mut tries, i) {
                                    again.push_front(i);
                                } else {
                                    record(
                                        i,
                                        failed(
                                            format!("sandbox worker failed: {e}"),
                                            Duration::ZERO,
                                        ),
                                    );
                                }
                            } else {
                                again.push_front(i);
                            }
                            break;
                        }
                        in_flight.push_back(i);
                    }
                    let Some(i) = in_flight.pop_front() else {
                        if again.is_empty() {
                            break;
                        }
                        continue;
                    };
                    let w = worker.as_mut().expect("jobs in flight have a worker");
                    let outcome = w.finish(cfg);
                    if !outcome.worker_ok {
                        // the jobs queued behind this one never started
                        worker = None;
                        while let Some(j) = in_flight.pop_back() {
                            again.push_front(j);
                        }
                    }
                    if outcome.not_started && retry(&mut tries, i) {
                        again.push_front(i);
                        continue;
                    }
                    record(i, outcome.verdict);
                }
            });
        }
    });
    results
        .into_iter()
        .map(|m| m.into_inner().expect("result slot").expect("every job ran"))
        .collect()
}

/// Whether job `i`, which never started because its worker went away, may be sent
/// again (a few times; a worker that dies before every job is not to be waited on).
fn retry(tries: &mut Vec<(usize, u32)>, i: usize) -> bool {
    match tries.iter_mut().find(|(j, _)| *j == i) {
        Some((_, n)) => {
            *n += 1;
            *n <= 3
        }
        None => {
            tries.push((i, 1));
            true
        }
    }
}

/// Default worker count: the cores this process may use.
pub fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
