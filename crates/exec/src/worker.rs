//! One sandbox worker: a pre-started interpreter that runs programs one at a time, each
//! in its own forked, confined child (see `runner.py`), and the parent side of a run:
//! the job handshake, reading stdout/stderr/result concurrently with tails kept, the
//! safety deadline, and the verdict.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::spawn;
use crate::sys;
use crate::verdict::{classify, trace_tail, Finished, Verdict, VerdictClass};
use crate::SandboxConfig;

const RUNNER: &str = include_str!("runner.py");

/// How long a worker may take to start (interpreter start-up plus imports).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Extra time past the wall limit before the parent gives up on a worker.
const DEADLINE_SLACK: Duration = Duration::from_secs(5);
/// After the runner reported the end, how long stragglers may keep the pipes open.
const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// Bytes of the result descriptor kept (a key is 32).
const RESULT_CAP: usize = 4096;
/// Size of a job header and of an event record (`JOB` and `EVENT` in runner.py).
const JOB_BYTES: usize = 8;
const EVENT_BYTES: usize = 32;
/// Event kinds.
const READY: i32 = 1;
const STARTED: i32 = 2;
const DONE: i32 = 3;
/// Largest program sent while another runs: it must fit the control socket's buffer.
const QUEUE_BYTES: usize = 32 << 10;
const HEX: &[u8; 16] = b"0123456789abcdef";

/// Keeps the last `cap` bytes written, and counts them all.
pub(crate) struct Tail {
    cap: usize,
    buf: Vec<u8>,
    pub(crate) total: u64,
}

impl Tail {
    pub(crate) fn new(cap: usize) -> Self {
        Tail {
            cap,
            buf: Vec::new(),
            total: 0,
        }
    }

    pub(crate) fn push(&mut self, data: &[u8]) {
        self.total += data.len() as u64;
        if self.cap == 0 {
            return;
        }
        if data.len() >= self.cap {
            self.buf.clear();
            self.buf.extend_from_slice(&data[data.len() - self.cap..]);
            return;
        }
        self.buf.extend_from_slice(data);
        if self.buf.len() > 2 * self.cap {
            let cut = self.buf.len() - self.cap;
            self.buf.drain(..cut);
        }
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.buf[self.buf.len().saturating_sub(self.cap)..]
    }
}

pub(crate) struct Worker {
    child: Child,
    ctl: UnixStream,
    rbuf: Vec<u8>,
    namespaced: bool,
    /// The current program's process (group) id as the runner reported it; in our pid
    /// namespace only without namespaces.
    job_pid: Option<i32>,
    /// Parent of the per-program directories when there are no namespaces.
    base: Option<tempfile::TempDir>,
    /// Jobs sent and not finished, oldest (running or next to run) first.
    queue: VecDeque<Pending>,
    /// Since when the runner has been free for the oldest queued job.
    free_since: Instant,
    /// The limits the runner applies (fixed when it starts).
    limits: Limits,
}

/// The limits a worker's runner was started with.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Limits {
    wall: Duration,
    cpu: Duration,
    memory: u64,
    file_size: u64,
    processes: u32,
}

impl Limits {
    fn of(cfg: &SandboxConfig) -> Self {
        Limits {
            wall: cfg.wall_time,
            cpu: cfg.cpu_time,
            memory: cfg.memory_bytes,
            file_size: cfg.file_size_bytes,
            processes: cfg.max_processes,
        }
    }
}

/// A job sent to the runner: what its verdict needs.
struct Pending {
    key: [u8; 32],
    out_r: OwnedFd,
    err_r: OwnedFd,
    res_r: OwnedFd,
    sent: Instant,
}

/// A job's result, and whether the worker can take another.
pub(crate) struct Outcome {
    pub(crate) verdict: Verdict,
    pub(crate) worker_ok: bool,
    /// The runner was gone before it started the job: the job never ran and can be
    /// given to a fresh worker.
    pub(crate) not_started: bool,
}

/// One record from the runner (`EVENT` in runner.py).
struct Event {
    kind: i32,
    a: i32,
    b: i32,
    c: i32,
    x: f64,
    y: f64,
}

/// How a worker's interpreter gives up privileges. As root it becomes
/// [`spawn::SANDBOX_OUTER_ID`] (uid 1 inside the user namespace with namespaces),
/// keeping only the right to read where the interpreter is out of that id's reach;
/// `resolve_isolation` refuses to run at all as root where that id does not exist. Not
/// root, it keeps our id and, inside the user namespace, loses every capability.
pub(crate) fn privileges(namespaced: bool, python: &std::path::Path) -> spawn::Privileges {
    if sys::euid() == 0 {
        let keep_read = !spawn::reachable_by_others(python);
        let id = if namespaced {
            1
        } else {
            spawn::SANDBOX_OUTER_ID
        };
        spawn::Privileges::ToId {
            uid: id,
            gid: id,
            keep_read,
        }
    } else if namespaced {
        spawn::Privileges::AllCaps
    } else {
        spawn::Privileges::Nothing
    }
}

/// RLIMIT_NPROC for the program. The kernel counts it per (user namespace, uid) and
/// never applies it to uid 0 outside. With namespaces and an id of its own, the count is
/// the program's processes plus the runner's; keeping inside uid 0 it shares the count
/// with init and the runner. Without namespaces, uid 65534 is shared machine-wide with
/// the other workers (hence the slack); under our own id the count would include all of
/// our processes, so no limit is set.
fn nproc_limit(cfg: &SandboxConfig, namespaced: bool, privs: spawn::Privileges) -> Option<u64> {
    let max = u64::from(cfg.max_processes.max(1));
    let own_id = matches!(privs, spawn::Privileges::ToId { .. });
    match (namespaced, own_id) {
        (true, true) => Some(max + 1),
        (true, false) => Some(max + 2),
        (false, true) => Some(max + 16),
        (false, false) => None,
    }
}

/// Size of the private /tmp (and /dev/shm) of a namespaced worker.
fn scratch_bytes(cfg: &SandboxConfig) -> u64 {
    cfg.file_size_bytes
        .saturating_mul(4)
        .clamp(16 << 20, 1 << 30)
}

fn sandbox_failure(msg: String, wall: Duration) -> Verdict {
    Verdict {
        passed: false,
        class: VerdictClass::Other,
        trace: format!("[sandbox] {msg}"),
        wall,
    }
}

impl Worker {
    /// Starts a worker; `namespaced` selects the isolation (decided by the caller).
    pub(crate) fn spawn(cfg: &SandboxConfig, namespaced: bool) -> io::Result<Worker> {
        let (ours, theirs) = UnixStream::pair()?;
        let theirs_fd = theirs.as_raw_fd();
        let privs = privileges(namespaced, &cfg.python);
        let base = if namespaced {
            None
        } else {
            let dir = tempfile::Builder::new()
                .prefix("rupantor-sandbox-")
                .tempdir()?;
            if let spawn::Privileges::ToId { uid, gid, .. } = privs {
                std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))?;
            }
            Some(dir)
        };
        // the runner sets HOME/TMPDIR to each job's directory (/tmp with namespaces)
        let home = match &base {
            Some(dir) => dir.path().to_string_lossy().into_owned(),
            None => "/tmp".to_string(),
        };
        let nproc =
            nproc_limit(cfg, namespaced, privs).map_or(-1, |n| n.min(i64::MAX as u64) as i64);
        let mut cmd = Command::new(&cfg.python);
        cmd.args(["-S", "-s", "-B", "-c", RUNNER])
            .arg(format!("ctl={theirs_fd}"))
            .arg(format!("mode={}", if namespaced { "ns" } else { "plain" }))
            .arg(format!("base={home}"))
            .arg(format!(
                "cpu={}",
                cfg.cpu_time.as_secs_f64().ceil().clamp(1.0, 1e9) as u64
            ))
            .arg(format!("as={}", cfg.memory_bytes))
            .arg(format!("fsize={}", cfg.file_size_bytes))
            .arg(format!("nproc={nproc}"))
            .arg(format!(
                "wall_us={}",
                cfg.wall_time.as_micros().min(u64::MAX as u128)
            ))
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()),
            )
            .env("LANG", "C.UTF-8")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("PYTHONHASHSEED", "0")
            .env("HOME", &home)
            .env("TMPDIR", &home)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .current_dir("/")
            .process_group(0);
        let child = if namespaced {
            spawn::spawn_namespaced(&mut cmd, theirs_fd, scratch_bytes(cfg), privs)?
        } else {
            // SAFETY: plain_child makes only raw system calls.
            unsafe {
                cmd.pre_exec(move || spawn::plain_child(theirs_fd, privs));
            }
            cmd.spawn()?
        };
        drop(theirs);
        let mut worker = Worker {
            child,
            ctl: ours,
            rbuf: Vec::new(),
            namespaced,
            job_pid: None,
            base,
            queue: VecDeque::new(),
            free_since: Instant::now(),
            limits: Limits::of(cfg),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match worker.next_event(deadline)? {
                Some(ev) if ev.kind == READY => {
                    worker.free_since = Instant::now();
                    return Ok(worker);
                }
                Some(_) => continue,
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "sandbox worker did not start in time",
                    ));
                }
            }
        }
    }

    pub(crate) fn namespaced(&self) -> bool {
        self.namespaced
    }

    /// Jobs sent and not yet finished.
    pub(crate) fn in_flight(&self) -> usize {
        self.queue.len()
    }

    /// Whether a job of `src_len` bytes may be sent now. One job may wait behind the
    /// running one, if small: it sits in the control socket's buffer until the runner
    /// takes it, and a send that blocked there would stop us reading the running
    /// program's output.
    pub(crate) fn can_take(&self, src_len: usize) -> bool {
        match self.queue.len() {
            0 => true,
            1 => src_len <= QUEUE_BYTES,
            _ => false,
        }
    }

    /// Parses one buffered event, if a whole one is there.
    fn buffered_event(&mut self) -> Option<Event> {
        if self.rbuf.len() < EVENT_BYTES {
            return None;
        }
        let rec: Vec<u8> = self.rbuf.drain(..EVENT_BYTES).collect();
        let i32_at = |at: usize| i32::from_le_bytes(rec[at..at + 4].try_into().expect("4 bytes"));
        let f64_at = |at: usize| f64::from_le_bytes(rec[at..at + 8].try_into().expect("8 bytes"));
        Some(Event {
            kind: i32_at(0),
            a: i32_at(4),
            b: i32_at(8),
            c: i32_at(12),
            x: f64_at(16),
            y: f64_at(24),
        })
    }

    /// Reads what the control socket has; `Ok(false)` when the runner is gone.
    fn fill(&mut self) -> io::Result<bool> {
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: valid buffer; MSG_DONTWAIT keeps the socket itself blocking for sends.
            let n = unsafe {
                libc::recv(
                    self.ctl.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                self.rbuf.extend_from_slice(&buf[..n as usize]);
                continue;
            }
            if n == 0 {
                return Ok(false);
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(true),
                // the runner left with a queued job unread: what it sent came first
                io::ErrorKind::ConnectionReset => return Ok(false),
                _ => return Err(err),
            }
        }
    }

    /// Waits for the next event until `deadline`; `Ok(None)` on timeout, an error when
    /// the runner is gone.
    fn next_event(&mut self, deadline: Instant) -> io::Result<Option<Event>> {
        loop {
            if let Some(v) = self.buffered_event() {
                return Ok(Some(v));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let mut pfd = [libc::pollfd {
                fd: self.ctl.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            sys::poll(&mut pfd, left.as_millis().min(i32::MAX as u128) as i32)?;
            if pfd[0].revents != 0 && !self.fill()? {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "sandbox worker exited",
                ));
            }
        }
    }

    /// Runs one module (program + asserts) and judges it.
    pub(crate) fn run(&mut self, cfg: &SandboxConfig, src: &str) -> Outcome {
        let start = Instant::now();
        if let Err(e) = self.submit(cfg, src) {
            return Outcome {
                verdict: sandbox_failure(format!("sandbox worker failed: {e}"), start.elapsed()),
                worker_ok: false,
                not_started: true,
            };
        }
        self.finish(cfg)
    }

    /// Sends one module (program + asserts) to the runner; it runs after the jobs sent
    /// before it. [`Worker::finish`] judges the oldest.
    pub(crate) fn submit(&mut self, cfg: &SandboxConfig, src: &str) -> io::Result<()> {
        let mut key_raw = [0u8; 16];
        sys::random_bytes(&mut key_raw);
        let mut key = [0u8; 32];
        for (i, b) in key_raw.iter().enumerate() {
            key[2 * i] = HEX[usize::from(b >> 4)];
            key[2 * i + 1] = HEX[usize::from(b & 15)];
        }
        let (out_r, out_w) = sys::pipe()?;
        let (err_r, err_w) = sys::pipe()?;
        let (key_r, key_w) = sys::pipe()?;
        let (res_r, res_w) = sys::pipe()?;
        sys::write_all(key_w.as_raw_fd(), &key)?;
        drop(key_w);
        let keyfd = 64 + (sys::random_u64() % 900) as u16;
        let resfd = loop {
            let fd = 64 + (sys::random_u64() % 900) as u16;
            if fd != keyfd {
                break fd;
            }
        };
        debug_assert_eq!(
            self.limits,
            Limits::of(cfg),
            "a worker runs with the limits it started with"
        );
        let src_len = u32::try_from(src.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "program too long"))?;
        let mut msg = Vec::with_capacity(JOB_BYTES + src.len());
        msg.extend_from_slice(&src_len.to_le_bytes());
        msg.extend_from_slice(&keyfd.to_le_bytes());
        msg.extend_from_slice(&resfd.to_le_bytes());
        debug_assert_eq!(msg.len(), JOB_BYTES);
        msg.extend_from_slice(src.as_bytes());
        sys::send_with_fds(
            self.ctl.as_raw_fd(),
            &msg,
            &[
                out_w.as_raw_fd(),
                err_w.as_raw_fd(),
                key_r.as_raw_fd(),
                res_w.as_raw_fd(),
            ],
        )?;
        drop((out_w, err_w, key_r, res_w));
        for fd in [&out_r, &err_r, &res_r] {
            sys::set_nonblocking(fd)?;
        }
        let now = Instant::now();
        if self.queue.is_empty() {
            self.free_since = now;
        }
        self.queue.push_back(Pending {
            key,
            out_r,
            err_r,
            res_r,
            sent: now,
        });
        Ok(())
    }

    /// Waits for the oldest job sent and judges it.
    pub(crate) fn finish(&mut self, cfg: &SandboxConfig) -> Outcome {
        let Some(job) = self.queue.pop_front() else {
            return Outcome {
                verdict: sandbox_failure("no job to finish".into(), Duration::ZERO),
                worker_ok: true,
                not_started: true,
            };
        };
        let start = job.sent.max(self.free_since);
        let outcome = match self.finish_inner(cfg, job, start) {
            Ok(outcome) => outcome,
            Err(e) => Outcome {
                verdict: sandbox_failure(format!("sandbox worker failed: {e}"), start.elapsed()),
                worker_ok: false,
                not_started: false,
            },
        };
        self.free_since = Instant::now();
        outcome
    }

    fn finish_inner(
        &mut self,
        cfg: &SandboxConfig,
        job: Pending,
        start: Instant,
    ) -> io::Result<Outcome> {
        let Pending {
            key,
            out_r,
            err_r,
            res_r,
            ..
        } = job;
        let mut out = Tail::new(cfg.output_cap_bytes);
        let mut err = Tail::new(cfg.output_cap_bytes.max(crate::verdict::TRACE_BYTES));
        let mut res = Tail::new(RESULT_CAP);
        let mut res_len = 0usize;
        let mut pipes: Vec<(Option<OwnedFd>, u8)> =
            vec![(Some(out_r), 0), (Some(err_r), 1), (Some(res_r), 2)];
        // until the runner says it started the job, it may still be cleaning up after
        // the one before
        let mut deadline = start + cfg.wall_time + 2 * DEADLINE_SLACK;
        let mut started = false;
        let mut done: Option<(i32, bool, f64, f64)> = None;
        let mut done_at: Option<Instant> = None;
        let mut worker_ok = true;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            while done.is_none() {
                match self.buffered_event() {
                    Some(ev) if ev.kind == DONE => {
                        done = Some((ev.a, ev.b != 0, ev.x, ev.y));
                        done_at = Some(Instant::now());
                        if ev.c != 0 {
                            // the runner retires after this job (see runner.py)
                            worker_ok = false;
                        }
                        self.job_pid = None;
                    }
                    Some(ev) if ev.kind == STARTED => {
                        started = true;
                        deadline = Instant::now() + cfg.wall_time + DEADLINE_SLACK;
                        self.job_pid = Some(ev.a);
                    }
                    Some(_) => continue,
                    None => break,
                }
            }
            let open = pipes.iter().any(|(fd, _)| fd.is_some());
            if done.is_some() && !open {
                break;
            }
            let now = Instant::now();
            let limit = match done_at {
                Some(t) => t + DRAIN_GRACE,
                None => deadline,
            };
            if now >= limit {
                if done.is_none() {
                    // the runner did not enforce the wall limit: give up on this worker
                    worker_ok = false;
                    done = Some((
                        libc::SIGKILL,
                        true,
                        0.0,
                        now.duration_since(start).as_secs_f64(),
                    ));
                }
                break;
            }
            let mut pfds: Vec<libc::pollfd> = Vec::with_capacity(4);
            let mut which: Vec<usize> = Vec::with_capacity(4);
            for (i, (fd, _)) in pipes.iter().enumerate() {
                if let Some(fd) = fd {
                    pfds.push(libc::pollfd {
                        fd: fd.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    });
                    which.push(i);
                }
            }
            let ctl_slot = if done.is_none() {
                pfds.push(libc::pollfd {
                    fd: self.ctl.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
                Some(pfds.len() - 1)
            } else {
                None
            };
            let wait = limit
                .saturating_duration_since(now)
                .as_millis()
                .clamp(1, 1000) as i32;
            sys::poll(&mut pfds, wait)?;
            for (slot, &i) in which.iter().enumerate() {
                if pfds[slot].revents == 0 {
                    continue;
                }
                let (fd, kind) = &mut pipes[i];
                let raw: RawFd = fd.as_ref().expect("open").as_raw_fd();
                // drain what is there now, bounded so one pipe cannot starve the others
                for _ in 0..16 {
                    match sys::read_some(raw, &mut buf)? {
                        None => {
                            *fd = None;
                            break;
                        }
                        Some(0) => break,
                        Some(n) => match kind {
                            0 => out.push(&buf[..n]),
                            1 => err.push(&buf[..n]),
                            _ => {
                                res_len += n;
                                if res_len <= RESULT_CAP {
                                    res.push(&buf[..n]);
                                }
                            }
                        },
                    }
                }
            }
            if let Some(slot) = ctl_slot {
                if pfds[slot].revents != 0 && !self.fill()? {
                    // runner died (a program cannot normally reach it; treat as a failure)
                    worker_ok = false;
                    if self.rbuf.len() < EVENT_BYTES {
                        let wall = start.elapsed();
                        let mut v =
                            sandbox_failure("sandbox worker died during the run".into(), wall);
                        v.trace = format!("{}{}", trace_tail(err.bytes()), v.trace);
                        return Ok(Outcome {
                            verdict: v,
                            worker_ok,
                            not_started: !started,
                        });
                    }
                }
            }
        }
        let (status, wall_timeout, cpu, wall) = done.expect("set before leaving the loop");
        // more than RESULT_CAP bytes on the result descriptor can never be just the key
        let result: &[u8] = if res_len > RESULT_CAP {
            b"\x01overflow"
        } else {
            res.bytes()
        };
        let finished = Finished {
            status,
            wall_timeout,
            cpu,
            result,
            key: &key,
            stderr: err.bytes(),
        };
        let (passed, class, note) = classify(&finished, cfg.cpu_time, cfg.wall_time);
        let mut trace = trace_tail(err.bytes());
        if let Some(note) = note {
            if !trace.is_empty() && !trace.ends_with('\n') {
                trace.push('\n');
            }
            trace.push_str(&note);
        }
        let verdict = Verdict {
            passed,
            class,
            trace,
            wall: Duration::from_secs_f64(wall.max(0.0)),
        };
        Ok(Outcome {
            verdict,
            worker_ok,
            not_started: false,
        })
    }

    /// Process group of the worker (P, or the runner without namespaces).
    fn pgid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // closing the socket ends the runner's loop; the group kill makes sure. With
        // namespaces, P's death takes A (parent-death signal) and with it the namespace.
        let _ = self.ctl.shutdown(std::net::Shutdown::Both);
        if let (false, Some(pid)) = (self.namespaced, self.job_pid) {
            sys::kill_group(pid);
        }
        sys::kill_group(self.pgid());
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(base) = self.base.take() {
            // what the runner could not remove (it retires then), e.g. directories a
            // program made unreadable: open them up first
            let path = base.path().to_path_buf();
            if base.close().is_err() {
                open_up(&path);
                let _ = std::fs::remove_dir_all(&path);
            }
        }
    }
}

/// Gives us full access to every directory under `top`, following no symlinks.
fn open_up(top: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut stack = vec![top.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(entry.path());
                }
            }
        }
    }
}
