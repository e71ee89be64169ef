//! One sandbox worker: a pre-started interpreter that runs programs one at a time, each
//! in its own forked, confined child (see `runner.py`), and the parent side of a run:
//! the job handshake, reading stdout/stderr/result concurrently with tails kept, the
//! safety deadline, and the verdict.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

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
    privs: spawn::Privileges,
    /// The current program's process (group) id as the runner reported it; in our pid
    /// namespace only without namespaces.
    job_pid: Option<i32>,
    /// Parent of the per-program directories when there are no namespaces.
    _base: Option<tempfile::TempDir>,
}

/// A job's result, and whether the worker can take another.
pub(crate) struct Outcome {
    pub(crate) verdict: Verdict,
    pub(crate) worker_ok: bool,
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
        let home = match &base {
            Some(dir) => dir.path().to_string_lossy().into_owned(),
            None => "/tmp".to_string(),
        };
        let mut cmd = Command::new(&cfg.python);
        cmd.args(["-s", "-B", "-c", RUNNER])
            .arg(format!("ctl={theirs_fd}"))
            .arg(format!("mode={}", if namespaced { "ns" } else { "plain" }))
            .arg(format!("base={home}"))
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
            privs,
            job_pid: None,
            _base: base,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match worker.next_event(deadline)? {
                Some(ev) if ev["ev"] == "ready" => return Ok(worker),
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

    /// Parses one buffered event line, if a whole one is there.
    fn buffered_event(&mut self) -> io::Result<Option<Value>> {
        if let Some(nl) = self.rbuf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.rbuf.drain(..=nl).collect();
            let v = serde_json::from_slice(&line).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad runner message: {e}"),
                )
            })?;
            return Ok(Some(v));
        }
        Ok(None)
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
                _ => return Err(err),
            }
        }
    }

    /// Waits for the next event until `deadline`; `Ok(None)` on timeout, an error when
    /// the runner is gone.
    fn next_event(&mut self, deadline: Instant) -> io::Result<Option<Value>> {
        loop {
            if let Some(v) = self.buffered_event()? {
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
        match self.run_inner(cfg, src, start) {
            Ok(outcome) => outcome,
            Err(e) => Outcome {
                verdict: sandbox_failure(format!("sandbox worker failed: {e}"), start.elapsed()),
                worker_ok: false,
            },
        }
    }

    fn run_inner(&mut self, cfg: &SandboxConfig, src: &str, start: Instant) -> io::Result<Outcome> {
        let mut key_raw = [0u8; 16];
        sys::random_bytes(&mut key_raw);
        let key: String = key_raw.iter().map(|b| format!("{b:02x}")).collect();
        let (out_r, out_w) = sys::pipe()?;
        let (err_r, err_w) = sys::pipe()?;
        let (key_r, key_w) = sys::pipe()?;
        let (res_r, res_w) = sys::pipe()?;
        sys::write_all(key_w.as_raw_fd(), key.as_bytes())?;
        drop(key_w);
        let keyfd = 64 + (sys::random_u64() % 900) as i64;
        let resfd = loop {
            let fd = 64 + (sys::random_u64() % 900) as i64;
            if fd != keyfd {
                break fd;
            }
        };
        let job = serde_json::json!({
            "src": src,
            "keyfd": keyfd,
            "resfd": resfd,
            "wall": cfg.wall_time.as_secs_f64(),
            "cpu": cfg.cpu_time.as_secs_f64().ceil().max(1.0) as u64,
            "as": cfg.memory_bytes,
            "fsize": cfg.file_size_bytes,
            "nproc": self.nproc_limit(cfg),
        });
        let body = serde_json::to_vec(&job).map_err(io::Error::other)?;
        let mut msg = Vec::with_capacity(body.len() + 4);
        msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
        msg.extend_from_slice(&body);
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

        let mut out = Tail::new(cfg.output_cap_bytes);
        let mut err = Tail::new(cfg.output_cap_bytes.max(crate::verdict::TRACE_BYTES));
        let mut res = Tail::new(RESULT_CAP);
        let mut res_len = 0usize;
        let mut pipes: Vec<(Option<OwnedFd>, u8)> =
            vec![(Some(out_r), 0), (Some(err_r), 1), (Some(res_r), 2)];
        for (fd, _) in &pipes {
            sys::set_nonblocking(fd.as_ref().expect("open"))?;
        }
        let deadline = start + cfg.wall_time + DEADLINE_SLACK;
        let mut done: Option<(i32, bool, f64)> = None;
        let mut done_at: Option<Instant> = None;
        let mut worker_ok = true;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            while done.is_none() {
                match self.buffered_event()? {
                    Some(ev) if ev["ev"] == "done" => {
                        let status = ev["status"].as_i64().unwrap_or(-1) as i32;
                        let timeout = ev["timeout"].as_bool().unwrap_or(false);
                        let cpu = ev["cpu"].as_f64().unwrap_or(0.0);
                        done = Some((status, timeout, cpu));
                        done_at = Some(Instant::now());
                        self.job_pid = None;
                    }
                    Some(ev) if ev["ev"] == "started" => {
                        self.job_pid = ev["pid"].as_i64().map(|p| p as i32);
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
                    done = Some((libc::SIGKILL, true, 0.0));
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
                    if self.buffered_event()?.is_none() {
                        let wall = start.elapsed();
                        let mut v =
                            sandbox_failure("sandbox worker died during the run".into(), wall);
                        v.trace = format!("{}{}", trace_tail(err.bytes()), v.trace);
                        return Ok(Outcome {
                            verdict: v,
                            worker_ok,
                        });
                    }
                }
            }
        }
        let (status, wall_timeout, cpu) = done.expect("set before leaving the loop");
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
            key: key.as_bytes(),
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
            wall: start.elapsed(),
        };
        Ok(Outcome { verdict, worker_ok })
    }

    /// RLIMIT_NPROC for the program. The kernel counts it per (user namespace, uid)
    /// and never applies it to uid 0 outside. With namespaces and an id of its own, the
    /// count is the program's processes plus the runner's; keeping inside uid 0 it
    /// shares the count with init and the runner. Without namespaces, uid 65534 is
    /// shared machine-wide with the other workers (hence the slack); under our own id
    /// the count would include all of our processes, so no limit is set.
    fn nproc_limit(&self, cfg: &SandboxConfig) -> Option<u64> {
        let max = u64::from(cfg.max_processes.max(1));
        let own_id = matches!(self.privs, spawn::Privileges::ToId { .. });
        match (self.namespaced, own_id) {
            (true, true) => Some(max + 1),
            (true, false) => Some(max + 2),
            (false, true) => Some(max + 16),
            (false, false) => None,
        }
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
    }
}
