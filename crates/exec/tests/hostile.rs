//! Hostile programs (issue 5 item 5): each must be contained, fail, leave the run going,
//! and change nothing outside the sandbox; positive controls must pass. Every case runs
//! with namespaces (skipped, with a message, where the machine refuses them) and in the
//! fallback; checks that only namespaces can make are skipped in the fallback with a
//! message.

use std::io::Read;
use std::net::TcpListener;
use std::path::Path;
use std::sync::Once;
use std::time::{Duration, Instant};

use rupantor_exec::{
    namespace_support, protections, run_many, run_program, Isolation, SandboxConfig, VerdictClass,
};

const SECRET_VAR: &str = "RUPANTOR_HOSTILE_TEST_SECRET";
const SECRET: &str = "s3cr3t-7b1f0c";

fn set_secret() {
    static ONCE: Once = Once::new();
    // the variable is in our environment, so a leak would show
    ONCE.call_once(|| std::env::set_var(SECRET_VAR, SECRET));
}

fn base_cfg(isolation: Isolation) -> SandboxConfig {
    SandboxConfig {
        wall_time: Duration::from_secs(2),
        cpu_time: Duration::from_secs(2),
        isolation,
        ..SandboxConfig::default()
    }
}

/// Configs to test under: the fallback always, namespaces where allowed.
fn modes() -> Vec<(&'static str, SandboxConfig)> {
    set_secret();
    let mut out = Vec::new();
    let fallback = base_cfg(Isolation::Fallback);
    match protections(&fallback) {
        p if p.usable => out.push(("fallback", fallback)),
        p => eprintln!("SKIP fallback variant: {}", p.why_not.unwrap_or_default()),
    }
    let cfg = base_cfg(Isolation::Namespaces);
    match (namespace_support(&cfg.python), protections(&cfg)) {
        (Ok(()), p) if p.usable => out.push(("namespaces", cfg)),
        (Ok(()), p) => eprintln!("SKIP namespace variant: {}", p.why_not.unwrap_or_default()),
        (Err(e), _) => eprintln!("SKIP namespace variant: user namespaces unavailable here: {e}"),
    }
    out
}

fn is_ns(mode: &str) -> bool {
    mode == "namespaces"
}

/// A marker no other process carries: our pid plus a per-call counter.
fn marker(tag: &str) -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "rupantor-hostile-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Python that starts a long-sleeping interpreter whose command line carries `marker`.
fn sleeper(marker: &str) -> String {
    format!("[sys.executable, '-c', 'import time; time.sleep(60)', '{marker}']")
}

/// Pids whose command line contains `marker`, polled until none is left or 5 s passed
/// (SIGKILLed processes take a moment to go).
fn survivors(marker: &str) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut found = Vec::new();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<u32>().ok())
                else {
                    continue;
                };
                let mut cmdline = Vec::new();
                if let Ok(mut f) = std::fs::File::open(entry.path().join("cmdline")) {
                    let _ = f.read_to_end(&mut cmdline);
                }
                if cmdline
                    .windows(marker.len())
                    .any(|w| w == marker.as_bytes())
                {
                    found.push(pid);
                }
            }
        }
        if found.is_empty() || Instant::now() >= deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn asserts(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn infinite_loop_times_out() {
    for (mode, cfg) in modes() {
        let v = run_program(&cfg, "while True:\n    pass\n", &asserts(&["assert True"]));
        assert!(!v.passed, "{mode}: {v:?}");
        assert_eq!(v.class, VerdictClass::Timeout, "{mode}: {v:?}");
        assert!(v.trace.contains("limit"), "{mode}: {v:?}");
    }
}

#[test]
fn busy_loop_ignoring_sigterm_times_out_and_is_gone() {
    for (mode, cfg) in modes() {
        let m = marker("sigterm");
        let program = format!(
            "import signal, subprocess, sys\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n\
             subprocess.Popen({})\nwhile True:\n    pass\n",
            sleeper(&m)
        );
        let v = run_program(&cfg, &program, &asserts(&["assert True"]));
        assert_eq!(v.class, VerdictClass::Timeout, "{mode}: {v:?}");
        assert_eq!(
            survivors(&m),
            Vec::<u32>::new(),
            "{mode}: processes outlived the run"
        );
    }
}

#[test]
fn cpu_limit_is_a_timeout() {
    for (mode, mut cfg) in modes() {
        cfg.cpu_time = Duration::from_secs(1);
        cfg.wall_time = Duration::from_secs(20);
        let v = run_program(
            &cfg,
            "x = 0\nwhile True:\n    x += 1\n",
            &asserts(&["assert x"]),
        );
        assert_eq!(v.class, VerdictClass::Timeout, "{mode}: {v:?}");
        assert!(v.trace.contains("CPU"), "{mode}: {v:?}");
    }
}

#[test]
fn sleeping_program_hits_the_wall_limit() {
    for (mode, cfg) in modes() {
        let v = run_program(
            &cfg,
            "import time\ntime.sleep(120)\n",
            &asserts(&["assert True"]),
        );
        assert_eq!(v.class, VerdictClass::Timeout, "{mode}: {v:?}");
        assert!(v.trace.contains("wall-time"), "{mode}: {v:?}");
    }
}

#[test]
fn bounded_fork_storm_is_capped_and_cleaned_up() {
    for (mode, mut cfg) in modes() {
        cfg.max_processes = 16;
        let m = marker("storm");
        // at most 150 processes even where no limit holds; each child becomes a sleeper
        let program = format!(
            "import os, sys\nfor i in range(150):\n    if os.fork() == 0:\n        \
             os.execv(sys.executable, {})\n",
            sleeper(&m)
        );
        let v = run_program(
            &cfg,
            &program,
            &asserts(&["assert False, 'storm finished'"]),
        );
        assert!(!v.passed, "{mode}: {v:?}");
        if protections(&cfg).process_limit {
            assert!(
                v.trace.contains("BlockingIOError") || v.trace.contains("Resource temporarily"),
                "{mode}: {v:?}"
            );
            assert_eq!(v.class, VerdictClass::Other, "{mode}: {v:?}");
        } else {
            eprintln!("SKIP {mode}: no process-count limit holds here (not root, no namespaces)");
        }
        assert_eq!(
            survivors(&m),
            Vec::<u32>::new(),
            "{mode}: storm processes outlived the run"
        );
    }
}

#[test]
fn children_outliving_the_parent_are_killed() {
    for (mode, cfg) in modes() {
        let m = marker("orphan");
        // a daemon: double fork + setsid, then the program leaves before its asserts
        let program = format!(
            "import os, sys, subprocess\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        \
             subprocess.Popen({s}, start_new_session=True)\n        os.execv(sys.executable, {s})\n    os._exit(0)\n\
             os.wait()\nimport time\ntime.sleep(0.3)\nos._exit(0)\n",
            s = sleeper(&m)
        );
        let v = run_program(&cfg, &program, &asserts(&["assert True"]));
        assert_eq!(v.class, VerdictClass::Exit, "{mode}: {v:?}");
        assert_eq!(
            survivors(&m),
            Vec::<u32>::new(),
            "{mode}: orphans outlived the run"
        );
    }
}

#[test]
fn six_gib_allocation_is_a_memory_failure() {
    for (mode, cfg) in modes() {
        for program in [
            "x = bytearray(6 * 2**30)\n",
            "x = [0] * (6 * 2**30 // 8)\n",
            "x = 'a' * (6 * 2**30)\n",
        ] {
            let v = run_program(&cfg, program, &asserts(&["assert len(x) > 0"]));
            assert_eq!(v.class, VerdictClass::Memory, "{mode} {program}: {v:?}");
            assert!(v.trace.contains("MemoryError"), "{mode}: {v:?}");
        }
    }
}

#[test]
fn two_hundred_mb_of_output_neither_blocks_nor_is_kept() {
    for (mode, mut cfg) in modes() {
        cfg.wall_time = Duration::from_secs(20);
        cfg.output_cap_bytes = 4096;
        let program = "import sys\nchunk = 'y' * (1 << 20)\nfor _ in range(200):\n    sys.stdout.write(chunk)\n\
                       for _ in range(20):\n    sys.stderr.write(chunk)\nsys.stderr.write('\\n')\n";
        let v = run_program(&cfg, program, &asserts(&["assert 1 == 2"]));
        assert_eq!(
            v.class,
            VerdictClass::Assertion,
            "{mode}: {}",
            &v.trace[..v.trace.len().min(300)]
        );
        assert!(
            v.trace.len() <= 2200,
            "{mode}: trace of {} bytes",
            v.trace.len()
        );
        assert!(v.trace.contains("assert 1 == 2"), "{mode}: {}", v.trace);
    }
}

#[test]
fn runaway_recursion_fails() {
    for (mode, cfg) in modes() {
        let v = run_program(
            &cfg,
            "def f(n):\n    return f(n + 1)\n",
            &asserts(&["assert f(0) == 1"]),
        );
        assert_eq!(v.class, VerdictClass::Other, "{mode}: {v:?}");
        assert!(v.trace.contains("RecursionError"), "{mode}: {v:?}");
        // with the interpreter's guard off, frames pile up until memory, the stack or the
        // time runs out: whichever comes first, it is contained and fails
        let program =
            "import sys\nsys.setrecursionlimit(10**9)\ndef f(n):\n    return f(n + 1) + 1\n";
        let v = run_program(&cfg, program, &asserts(&["assert f(0) == 1"]));
        assert!(!v.passed, "{mode}: {v:?}");
        assert!(
            matches!(
                v.class,
                VerdictClass::Other | VerdictClass::Memory | VerdictClass::Timeout
            ),
            "{mode}: {v:?}"
        );
    }
}

#[test]
fn exit_zero_tricks_before_the_asserts_fail() {
    let tricks = [
        "import sys\nsys.exit(0)\n",
        "import os\nos._exit(0)\n",
        "raise SystemExit\n",
        "raise SystemExit(0)\n",
        "import atexit, os\natexit.register(lambda: os._exit(0))\nraise SystemExit(3)\n",
        "import atexit, os\natexit.register(os._exit, 0)\nimport sys\nsys.exit(1)\n",
        "import threading, os, time\nthreading.Thread(target=lambda: os._exit(0)).start()\ntime.sleep(5)\n",
        "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
        // fake sentinels: printed, and written to every descriptor that might be the channel
        "print('PASS ' + '0' * 32)\nprint('0' * 32)\nimport os\nos._exit(0)\n",
        "import os\nfor fd in range(3, 1024):\n    try:\n        os.write(fd, b'0123456789abcdef0123456789abcdef')\n    except OSError:\n        pass\nos._exit(0)\n",
        // monkeypatching the obvious things the harness might rely on
        "import builtins, sys, os\nbuiltins.print = lambda *a, **k: None\nsys.stdout = None\n\
         builtins.AssertionError = type('X', (Exception,), {})\nos.write = lambda *a: 0\nos.read = lambda *a: b''\n",
        "import os\nfor fd in range(3, 1024):\n    try:\n        os.close(fd)\n    except OSError:\n        pass\n",
    ];
    for (mode, cfg) in modes() {
        for (i, trick) in tricks.iter().enumerate() {
            let v = run_program(&cfg, trick, &asserts(&["assert 1 == 2", "assert False"]));
            assert!(!v.passed, "{mode} trick {i}: {trick}\n{v:?}");
        }
        // the exits are classified as exits
        for trick in &tricks[..4] {
            let v = run_program(&cfg, trick, &asserts(&["assert 1 == 2"]));
            assert_eq!(v.class, VerdictClass::Exit, "{mode}: {trick}: {v:?}");
        }
        // and the patched-harness program still passes when its asserts are true: the
        // pass rule does not depend on what it patched
        let v = run_program(&cfg, tricks[10], &asserts(&["assert 1 == 1"]));
        assert!(v.passed, "{mode}: {v:?}");
    }
}

/// A directory outside the sandbox only its owner (this test) may write.
fn outside_dir() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("rupantor-outside-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(
        d.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    d
}

#[test]
fn writes_outside_the_sandbox_do_not_land() {
    for (mode, cfg) in modes() {
        let outside = outside_dir();
        let m = marker("write");
        let target = outside.path().join(&m);
        let tmp_target = Path::new("/tmp").join(&m);
        let program = format!(
            "import os\nwritten = []\nfor p in [os.path.join(os.environ['HOME'], '{m}'), '/tmp/{m}', '{}', '/{m}']:\n    \
             try:\n        open(p, 'w').write('pwned')\n        written.append(p)\n    except OSError:\n        pass\n",
            target.display()
        );
        let v = run_program(&cfg, &program, &asserts(&["assert written == [], written"]));
        assert!(!v.passed, "{mode}: {v:?}");
        assert_eq!(v.class, VerdictClass::Assertion, "{mode}: {v:?}");
        let p = protections(&cfg);
        if !p.namespaces && !p.unprivileged_id {
            eprintln!("SKIP {mode}: without namespaces, programs run as our own uid and can write what we can");
            let _ = std::fs::remove_file(&tmp_target);
            continue;
        }
        assert!(
            !target.exists(),
            "{mode}: wrote into {}",
            outside.path().display()
        );
        assert!(!Path::new("/").join(&m).exists(), "{mode}: wrote into /");
        if let Some(home) = std::env::var_os("HOME") {
            assert!(
                !Path::new(&home).join(&m).exists(),
                "{mode}: wrote into our HOME"
            );
        }
        if is_ns(mode) {
            assert!(!tmp_target.exists(), "{mode}: wrote into the host's /tmp");
            assert!(
                v.trace.contains(&format!("/tmp/{m}")),
                "{mode}: the private /tmp was not writable: {v:?}"
            );
        } else {
            eprintln!("SKIP {mode}: a world-writable /tmp stays writable without namespaces");
            let _ = std::fs::remove_file(&tmp_target);
        }
    }
}

#[test]
fn env_secrets_are_not_inherited() {
    for (mode, cfg) in modes() {
        assert_eq!(std::env::var(SECRET_VAR).as_deref(), Ok(SECRET));
        let program = format!(
            "import os\nfound = [k for k, v in os.environ.items() if '{SECRET}' in v]\n\
             for p in os.listdir('/proc'):\n    try:\n        \
             if '{SECRET}'.encode() in open('/proc/%s/environ' % p, 'rb').read():\n            found.append(p)\n    \
             except (OSError, ValueError):\n        pass\n"
        );
        let v = run_program(
            &cfg,
            &program,
            &asserts(&[
                "assert found",
                &format!("assert os.environ['{SECRET_VAR}']"),
            ]),
        );
        assert_eq!(v.class, VerdictClass::Assertion, "{mode}: {v:?}");
        // what is there is exactly the scrubbed set, HOME and TMPDIR the private directory
        let control = "import os\nkeys = sorted(os.environ)\n";
        let v = run_program(
            &cfg,
            control,
            &asserts(&[
                "assert keys == ['HOME', 'LANG', 'PATH', 'PYTHONDONTWRITEBYTECODE', 'PYTHONHASHSEED', 'TMPDIR'], keys",
                "assert os.environ['HOME'] == os.environ['TMPDIR'] == os.getcwd()",
                "assert os.environ['LANG'] == 'C.UTF-8' and os.environ['PYTHONHASHSEED'] == '0'",
                "assert hash('abc') == hash('abc')",
            ]),
        );
        assert!(v.passed, "{mode}: {v:?}");
    }
}

#[test]
fn no_socket_to_a_host_listener() {
    for (mode, cfg) in modes() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let program = format!(
            "import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.sendall(b'pwned')\n"
        );
        let v = run_program(&cfg, &program, &asserts(&["assert False"]));
        assert!(!v.passed, "{mode}: {v:?}");
        if is_ns(mode) {
            assert_eq!(v.class, VerdictClass::Other, "{mode}: {v:?}");
            assert!(
                v.trace.contains("OSError") || v.trace.contains("Error"),
                "{mode}: {v:?}"
            );
            assert!(
                listener.accept().is_err(),
                "{mode}: the sandbox reached the host's loopback"
            );
        } else {
            eprintln!("SKIP {mode}: no network isolation without namespaces");
        }
    }
}

#[test]
fn reading_stdin_gets_end_of_file() {
    for (mode, cfg) in modes() {
        let v = run_program(&cfg, "x = input()\n", &asserts(&["assert x"]));
        assert_eq!(v.class, VerdictClass::Other, "{mode}: {v:?}");
        assert!(v.trace.contains("EOFError"), "{mode}: {v:?}");
        let v = run_program(
            &cfg,
            "import sys\ndata = sys.stdin.read()\n",
            &asserts(&["assert data == ''"]),
        );
        assert!(v.passed, "{mode}: {v:?}");
    }
}

#[test]
fn killing_the_parent_fails_and_the_run_goes_on() {
    for (mode, cfg) in modes() {
        let mut jobs = vec![
            ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nimport time\ntime.sleep(3)\n".to_string(), vec!["assert True".to_string()]),
            ("def f():\n    return 1\n".to_string(), vec!["assert f() == 1".to_string()]),
        ];
        if is_ns(mode) {
            // everything it may signal: only the sandbox itself
            jobs.push((
                "import os, signal\nos.kill(-1, signal.SIGKILL)\n".to_string(),
                vec!["assert True".into()],
            ));
            // the namespace's init ignores it (or refuses it): the program lives on to
            // fail its assert, and the worker is unharmed
            jobs.push((
                "import os, signal\ntry:\n    os.kill(1, signal.SIGKILL)\nexcept OSError:\n    pass\n"
                    .to_string(),
                vec!["assert False, 'still here'".into()],
            ));
            jobs.push((
                "def g():\n    return 2\n".to_string(),
                vec!["assert g() == 2".to_string()],
            ));
        }
        let verdicts = run_many(&cfg, &jobs, 1, |_| {});
        assert!(!verdicts[0].passed, "{mode}: {:?}", verdicts[0]);
        assert!(verdicts[1].passed, "{mode}: {:?}", verdicts[1]);
        if is_ns(mode) {
            assert!(!verdicts[2].passed, "{mode}: {:?}", verdicts[2]);
            assert_eq!(
                verdicts[3].class,
                VerdictClass::Assertion,
                "{mode}: {:?}",
                verdicts[3]
            );
            assert!(verdicts[4].passed, "{mode}: {:?}", verdicts[4]);
        }
    }
}

#[test]
fn non_utf8_output_is_kept_lossily() {
    for (mode, cfg) in modes() {
        let program = "import sys\nsys.stdout.buffer.write(b'\\xff\\xfe\\x00 out')\nsys.stderr.buffer.write(b'bad \\xc3\\x28 bytes\\n')\nsys.stderr.flush()\n";
        let v = run_program(
            &cfg,
            program,
            &asserts(&["assert False, 'caf\\xe9 \\u09ac'"]),
        );
        assert_eq!(v.class, VerdictClass::Assertion, "{mode}: {v:?}");
        assert!(v.trace.contains("bad \u{fffd}( bytes"), "{mode}: {v:?}");
        assert!(v.trace.contains("café ব"), "{mode}: {v:?}");
    }
}

#[test]
fn namespace_only_protections() {
    let cfg = base_cfg(Isolation::Namespaces);
    if let Err(e) = namespace_support(&cfg.python) {
        eprintln!("SKIP: user namespaces unavailable here: {e}");
        return;
    }
    if let Some(why) = Some(protections(&cfg))
        .filter(|p| !p.usable)
        .and_then(|p| p.why_not)
    {
        eprintln!("SKIP: {why}");
        return;
    }
    let root_outside = outer_euid() == 0;
    let program = "import os\npids = [p for p in os.listdir('/proc') if p.isdigit()]\n\
                   def writable(p):\n    try:\n        open(p, 'a').close()\n        return True\n    except OSError:\n        return False\n";
    let mut checks = vec![
        // only init, the runner and this program are visible
        "assert len(pids) <= 4, pids",
        "assert not writable('/etc/hostname-rupantor-test')",
        "assert not writable('/usr/rupantor-test')",
        "assert writable('/tmp/ok') and writable('/dev/shm/ok')",
        "import socket; assert socket.gethostname()",
    ];
    if root_outside {
        checks.push("assert os.getuid() == 1 and os.getgid() == 1 and os.getgroups() == []");
    }
    let v = run_program(&cfg, program, &asserts(&checks));
    assert!(v.passed, "{v:?}");
    let p = protections(&cfg);
    assert!(p.namespaces && p.process_limit, "{p:?}");
    // the private /tmp is fresh for every program of a worker
    let jobs = vec![
        (
            "open('/tmp/left', 'w').write('x')\n".to_string(),
            vec!["assert False".to_string()],
        ),
        (
            "import os\n".to_string(),
            vec!["assert os.listdir('/tmp') == [], os.listdir('/tmp')".to_string()],
        ),
    ];
    let v = run_many(&cfg, &jobs, 1, |_| {});
    assert!(v[1].passed, "{:?}", v[1]);
}

fn outer_euid() -> u32 {
    // /proc/self/status: "Uid:\treal\teffective\t..."
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(2).unwrap().parse().unwrap()
}

#[test]
fn positive_controls_pass() {
    let controls: Vec<(&str, Vec<&str>)> = vec![
        ("def add(a, b):\n    return a + b\n", vec!["assert add(1, 2) == 3", "assert add('a', 'b') == 'ab'"]),
        // a class the program defines and the asserts use
        (
            "class Pair(object):\n    def __init__(self, a, b):\n        self.a = a\n        self.b = b\n\
             def max_chain_length(arr, n):\n    arr = sorted(arr, key=lambda p: p.b)\n    best, end = 0, float('-inf')\n    \
             for p in arr:\n        if p.a > end:\n            best += 1\n            end = p.b\n    return best\n",
            vec!["assert max_chain_length([Pair(5, 24), Pair(15, 25), Pair(27, 40), Pair(50, 60)], 4) == 3"],
        ),
        // asserts that need the program's printing
        (
            "import io, contextlib\ndef show(n):\n    for i in range(n):\n        print('*' * (i + 1))\n\
             def captured(n):\n    buf = io.StringIO()\n    with contextlib.redirect_stdout(buf):\n        show(n)\n    return buf.getvalue()\n",
            vec!["assert captured(3) == '*\\n**\\n***\\n'", "assert show(2) is None"],
        ),
        // a lot of ordinary printing does not get in the way
        ("def f():\n    for i in range(20000):\n        print(i)\n    return True\n", vec!["assert f()"]),
        // imports, threads, files in HOME/TMPDIR, a subprocess
        (
            "import math, re, collections, heapq, itertools, functools, os, tempfile, subprocess, sys\n\
             from concurrent.futures import ThreadPoolExecutor\n\
             def squares(n):\n    with ThreadPoolExecutor(4) as ex:\n        return list(ex.map(lambda x: x * x, range(n)))\n\
             def roundtrip(s):\n    p = os.path.join(tempfile.gettempdir(), 'f.txt')\n    open(p, 'w').write(s)\n    return open(p).read()\n\
             def child():\n    return subprocess.run([sys.executable, '-c', 'print(6 * 7)'], capture_output=True, text=True).stdout.strip()\n",
            vec!["assert squares(5) == [0, 1, 4, 9, 16]", "assert roundtrip('hi') == 'hi'", "assert child() == '42'"],
        ),
        // a main guard runs, as when the file is run as a script
        ("def f():\n    return 1\nif __name__ == '__main__':\n    RAN = True\n", vec!["assert RAN and f() == 1"]),
    ];
    for (mode, cfg) in modes() {
        let jobs: Vec<(String, Vec<String>)> = controls
            .iter()
            .map(|(p, a)| (p.to_string(), asserts(a)))
            .collect();
        let verdicts = run_many(&cfg, &jobs, 2, |_| {});
        for (v, (p, _)) in verdicts.iter().zip(&controls) {
            assert!(v.passed, "{mode}: control failed:\n{p}\n{v:?}");
            assert_eq!(v.class, VerdictClass::Pass);
        }
    }
}

#[test]
fn run_many_keeps_order_reports_progress_and_survives_hostiles() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    for (mode, cfg) in modes() {
        let mut jobs = Vec::new();
        for i in 0..12 {
            let program = match i % 4 {
                0 => format!("def f():\n    return {i}\n"),
                1 => "import os\nos._exit(0)\n".to_string(),
                2 => "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n".to_string(),
                _ => "x = bytearray(6 * 2**30)\n".to_string(),
            };
            jobs.push((program, vec![format!("assert f() == {i}")]));
        }
        let calls = AtomicUsize::new(0);
        let max_seen = AtomicUsize::new(0);
        let verdicts = run_many(&cfg, &jobs, 3, |n| {
            calls.fetch_add(1, Ordering::Relaxed);
            max_seen.fetch_max(n, Ordering::Relaxed);
        });
        assert_eq!(verdicts.len(), jobs.len());
        assert_eq!(calls.load(Ordering::Relaxed), jobs.len());
        assert_eq!(max_seen.load(Ordering::Relaxed), jobs.len());
        for (i, v) in verdicts.iter().enumerate() {
            assert_eq!(v.passed, i % 4 == 0, "{mode}: job {i}: {v:?}");
        }
        assert_eq!(verdicts[1].class, VerdictClass::Exit, "{mode}");
        assert_eq!(verdicts[3].class, VerdictClass::Memory, "{mode}");
    }
}

#[test]
fn nothing_a_program_leaves_or_changes_reaches_the_next_one() {
    // our own niceness and descriptor limit: what every worker starts with
    // SAFETY: plain libc queries about this process.
    let (nice, nofile) = unsafe {
        *libc::__errno_location() = 0;
        let nice = libc::getpriority(libc::PRIO_PROCESS, 0);
        let mut lim: libc::rlimit = std::mem::zeroed();
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        (nice, (lim.rlim_cur, lim.rlim_max))
    };
    for (mode, cfg) in modes() {
        let outside = outside_dir();
        let canary = outside.path().join("canary");
        std::fs::write(&canary, "alive").unwrap();
        let left = marker("left");
        let ipc_key = 0x5e00_0000 | (std::process::id() & 0xffff);
        // each on its own, then a program that looks for it: files everywhere it may
        // write, some hard to remove, a link out of the sandbox; SysV and POSIX IPC
        // objects; and, at the zygote (our parent), a lower priority, lower limits, a
        // signal
        let files = format!(
            "import os\n\
             for d in {{os.getcwd(), os.environ['HOME'], os.environ['TMPDIR'], '/tmp', '/dev/shm'}}:\n    \
             try:\n        open(os.path.join(d, '{left}'), 'w').write('x')\n    except OSError:\n        pass\n\
             os.makedirs('locked/inner')\nopen('locked/inner/f', 'w').write('x')\nos.chmod('locked/inner', 0)\nos.chmod('locked', 0o500)\n\
             p = 'deep'\nfor i in range(200):\n    p = os.path.join(p, 'd')\nos.makedirs(p)\n\
             os.symlink('{out}', 'link')\nos.mkfifo('fifo')\n",
            out = outside.path().display()
        );
        let ipc = format!(
            "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nassert libc.shmget({ipc_key}, 4096, 0o1666) >= 0\n\
             libc.mq_open.restype = ctypes.c_int\n\
             assert libc.mq_open(b'/{left}', os.O_CREAT | os.O_RDWR, 0o600, None) == -1, 'a POSIX message queue'\n"
        );
        let at_parent = |act: &str| {
            format!("import os, resource, signal\nppid = os.getppid()\ntry:\n    {act}\nexcept OSError:\n    pass\n")
        };
        let spoilers = [
            files,
            ipc,
            at_parent("os.setpriority(os.PRIO_PROCESS, ppid, 15)"),
            at_parent("resource.prlimit(ppid, resource.RLIMIT_NOFILE, (16, 16))"),
            at_parent("resource.prlimit(ppid, resource.RLIMIT_AS, (1 << 28, 1 << 28))"),
            at_parent("os.kill(ppid, signal.SIGUSR1)"),
        ];
        let checker = "import os, resource\n\
             here = sorted(os.listdir('.'))\nshm = sorted(os.listdir('/dev/shm')) if os.path.isdir('/dev/shm') else []\n\
             nice = os.getpriority(os.PRIO_PROCESS, 0)\nnofile = resource.getrlimit(resource.RLIMIT_NOFILE)\n\
             ipc = open('/proc/sysvipc/shm').read().splitlines()[1:]\n";
        let mut checks = vec![
            "assert here == [], here".to_string(),
            format!("assert nice == {nice}, nice"),
            format!("assert nofile == {nofile:?}, nofile"),
        ];
        if is_ns(mode) {
            checks.push("assert shm == [], shm".to_string());
            checks.push("assert ipc == [], ipc".to_string());
        }
        let mut jobs = Vec::new();
        for spoiler in &spoilers {
            jobs.push((spoiler.clone(), asserts(&["assert True"])));
            jobs.push((checker.to_string(), checks.clone()));
        }
        let v = run_many(&cfg, &jobs, 1, |_| {});
        for (pair, spoiler) in v.chunks(2).zip(&spoilers) {
            assert!(pair[0].passed, "{mode}: {spoiler}\n{:?}", pair[0]);
            assert!(
                pair[1].passed,
                "{mode}: the next program saw what this one did:\n{spoiler}\n{:?}",
                pair[1]
            );
        }
        assert_eq!(
            std::fs::read_to_string(&canary).ok().as_deref(),
            Some("alive"),
            "{mode}: cleaning up followed a link out of the sandbox"
        );
        let host_ipc = std::fs::read_to_string("/proc/sysvipc/shm").unwrap_or_default();
        let ours = host_ipc
            .lines()
            .any(|l| l.split_whitespace().next() == Some(&ipc_key.to_string()));
        // without namespaces the host's /tmp, /dev/shm and IPC objects were writable
        for dir in ["/tmp", "/dev/shm"] {
            let _ = std::fs::remove_file(Path::new(dir).join(&left));
        }
        // SAFETY: plain libc calls on a segment only this test names.
        unsafe {
            let id = libc::shmget(ipc_key as libc::key_t, 0, 0);
            if id >= 0 {
                libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut());
            }
        }
        if is_ns(mode) {
            assert!(!ours, "{mode}: a SysV segment outlived the sandbox");
        } else {
            eprintln!("SKIP {mode}: without namespaces SysV IPC objects are the host's");
        }
    }
}
