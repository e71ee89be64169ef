//! Verdict classes and how a finished run is classified.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Why a program passed or failed: the classes of design §6, in repair-prompt order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerdictClass {
    /// Every assert ran and the program exited 0.
    Pass,
    /// SyntaxError, IndentationError, TabError.
    Syntax,
    /// NameError (UnboundLocalError included) and AttributeError: a name that is not there.
    Name,
    /// TypeError.
    Type,
    /// IndexError, KeyError, ValueError (and their subclasses).
    IndexKeyValue,
    /// An assert was false.
    Assertion,
    /// Wall-time or CPU-time limit.
    Timeout,
    /// MemoryError, or killed for lack of memory under the address-space limit.
    Memory,
    /// Left before its asserts finished: `sys.exit`, `os._exit`, `SystemExit`, an exit
    /// code without the sentinel.
    Exit,
    /// Anything else (ZeroDivisionError, RecursionError, ImportError, a crash, ...).
    Other,
}

impl VerdictClass {
    pub const ALL: [VerdictClass; 10] = [
        VerdictClass::Pass,
        VerdictClass::Syntax,
        VerdictClass::Name,
        VerdictClass::Type,
        VerdictClass::IndexKeyValue,
        VerdictClass::Assertion,
        VerdictClass::Timeout,
        VerdictClass::Memory,
        VerdictClass::Exit,
        VerdictClass::Other,
    ];

    /// The serde name ("pass", "index_key_value", ...).
    pub fn as_str(self) -> &'static str {
        match self {
            VerdictClass::Pass => "pass",
            VerdictClass::Syntax => "syntax",
            VerdictClass::Name => "name",
            VerdictClass::Type => "type",
            VerdictClass::IndexKeyValue => "index_key_value",
            VerdictClass::Assertion => "assertion",
            VerdictClass::Timeout => "timeout",
            VerdictClass::Memory => "memory",
            VerdictClass::Exit => "exit",
            VerdictClass::Other => "other",
        }
    }

    /// Class of a Python exception, given the names of its type's MRO (most derived
    /// first); `None` when nothing in it is one we classify.
    pub fn from_exception_mro<'a>(mro: impl IntoIterator<Item = &'a str>) -> Option<VerdictClass> {
        for name in mro {
            let class = match name {
                "SyntaxError" | "IndentationError" | "TabError" => VerdictClass::Syntax,
                "NameError" | "UnboundLocalError" | "AttributeError" => VerdictClass::Name,
                "TypeError" => VerdictClass::Type,
                "IndexError" | "KeyError" | "ValueError" => VerdictClass::IndexKeyValue,
                "AssertionError" => VerdictClass::Assertion,
                "MemoryError" => VerdictClass::Memory,
                "SystemExit" => VerdictClass::Exit,
                _ => continue,
            };
            return Some(class);
        }
        None
    }
}

impl fmt::Display for VerdictClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of one program.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub passed: bool,
    pub class: VerdictClass,
    /// The last ~2 KB of the program's stderr (normally the Python traceback), plus a
    /// `[sandbox]` line when the sandbox stopped it; for repair prompts.
    pub trace: String,
    pub wall: Duration,
}

/// What the runner reported about a finished child, plus what came back on its pipes.
pub(crate) struct Finished<'a> {
    /// Raw wait status of the program's process.
    pub status: i32,
    /// Killed by the wall-time limit.
    pub wall_timeout: bool,
    /// CPU seconds it used.
    pub cpu: f64,
    /// The result descriptor's bytes.
    pub result: &'a [u8],
    /// The expected key.
    pub key: &'a [u8],
    /// Tail of stderr.
    pub stderr: &'a [u8],
}

pub(crate) const TRACE_BYTES: usize = 2048;

fn mentions_memory(stderr: &[u8]) -> bool {
    let s = String::from_utf8_lossy(stderr);
    s.contains("MemoryError") || s.contains("Cannot allocate memory") || s.contains("out of memory")
}

/// The last `TRACE_BYTES` of stderr as text (lossy), starting at a line when it can.
pub(crate) fn trace_tail(stderr: &[u8]) -> String {
    let start = stderr.len().saturating_sub(TRACE_BYTES);
    let mut tail = &stderr[start..];
    if start > 0 {
        if let Some(nl) = tail.iter().position(|&b| b == b'\n') {
            if nl + 1 < tail.len() {
                tail = &tail[nl + 1..];
            }
        }
    }
    String::from_utf8_lossy(tail).into_owned()
}

/// Decides pass/class. A pass needs exit status 0 *and* the result descriptor holding
/// exactly the key, which the harness writes only after the module's last statement.
pub(crate) fn classify(
    f: &Finished<'_>,
    cpu_limit: Duration,
    wall_limit: Duration,
) -> (bool, VerdictClass, Option<String>) {
    let exited = libc::WIFEXITED(f.status);
    let code = if exited {
        libc::WEXITSTATUS(f.status)
    } else {
        -1
    };
    let signal = if libc::WIFSIGNALED(f.status) {
        libc::WTERMSIG(f.status)
    } else {
        0
    };
    if f.wall_timeout {
        let note = format!(
            "[sandbox] killed: wall-time limit of {:.1} s exceeded",
            wall_limit.as_secs_f64()
        );
        return (false, VerdictClass::Timeout, Some(note));
    }
    if exited && code == 0 && f.result == f.key {
        return (true, VerdictClass::Pass, None);
    }
    // the harness's exception tag: "\0E:Type,Base,...,BaseException\n" (the last one wins)
    let tag = f.result.windows(3).rposition(|w| w == b"\0E:").map(|at| {
        let rest = &f.result[at + 3..];
        let end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
        String::from_utf8_lossy(&rest[..end]).into_owned()
    });
    if let Some(tag) = &tag {
        if let Some(class) = VerdictClass::from_exception_mro(tag.split(',')) {
            let note = (class == VerdictClass::Exit).then(|| {
                format!("[sandbox] SystemExit (status {code}) before its asserts finished")
            });
            return (false, class, note);
        }
        if !signal_is_crash(signal) {
            return (false, VerdictClass::Other, None);
        }
    }
    if signal != 0 {
        let cpu_out = f.cpu + 0.05 >= cpu_limit.as_secs_f64();
        if signal == libc::SIGXCPU || (signal == libc::SIGKILL && cpu_out) {
            let note = format!(
                "[sandbox] killed: CPU-time limit of {:.0} s exceeded",
                cpu_limit.as_secs_f64().ceil()
            );
            return (false, VerdictClass::Timeout, Some(note));
        }
        let note = format!("[sandbox] killed by signal {signal}");
        if signal_is_crash(signal) && mentions_memory(f.stderr)
            || signal == libc::SIGKILL && mentions_memory(f.stderr)
        {
            return (false, VerdictClass::Memory, Some(note));
        }
        return (false, VerdictClass::Other, Some(note));
    }
    if code == 121 {
        return (
            false,
            VerdictClass::Other,
            Some("[sandbox] setting up the sandbox failed".into()),
        );
    }
    if mentions_memory(f.stderr) {
        return (false, VerdictClass::Memory, None);
    }
    let note = if code == 0 {
        "[sandbox] exited 0 before its asserts finished (no sentinel)".to_string()
    } else {
        format!("[sandbox] exited with status {code} before its asserts finished")
    };
    (false, VerdictClass::Exit, Some(note))
}

fn signal_is_crash(signal: i32) -> bool {
    matches!(
        signal,
        libc::SIGSEGV | libc::SIGABRT | libc::SIGBUS | libc::SIGILL | libc::SIGFPE
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exited(code: i32) -> i32 {
        code << 8
    }

    fn fin<'a>(status: i32, result: &'a [u8], stderr: &'a [u8]) -> Finished<'a> {
        Finished {
            status,
            wall_timeout: false,
            cpu: 0.0,
            result,
            key: b"k3y",
            stderr,
        }
    }

    fn class_of(f: &Finished<'_>) -> VerdictClass {
        classify(f, Duration::from_secs(10), Duration::from_secs(10)).1
    }

    #[test]
    fn pass_needs_exact_key_and_status_zero() {
        assert_eq!(class_of(&fin(exited(0), b"k3y", b"")), VerdictClass::Pass);
        assert_eq!(
            class_of(&fin(exited(0), b"k3yk3y", b"")),
            VerdictClass::Exit
        );
        assert_eq!(class_of(&fin(exited(0), b"xk3y", b"")), VerdictClass::Exit);
        assert_eq!(class_of(&fin(exited(0), b"", b"")), VerdictClass::Exit);
        assert_eq!(class_of(&fin(exited(1), b"k3y", b"")), VerdictClass::Exit);
    }

    #[test]
    fn exception_tags_map_to_classes() {
        let cases: [(&[u8], VerdictClass); 9] = [
            (
                b"\0E:IndentationError,SyntaxError,Exception,BaseException\n",
                VerdictClass::Syntax,
            ),
            (
                b"\0E:UnboundLocalError,NameError,Exception,BaseException\n",
                VerdictClass::Name,
            ),
            (
                b"\0E:TypeError,Exception,BaseException\n",
                VerdictClass::Type,
            ),
            (
                b"\0E:MyErr,KeyError,LookupError,Exception,BaseException\n",
                VerdictClass::IndexKeyValue,
            ),
            (
                b"\0E:AssertionError,Exception,BaseException\n",
                VerdictClass::Assertion,
            ),
            (
                b"\0E:MemoryError,Exception,BaseException\n",
                VerdictClass::Memory,
            ),
            (b"\0E:SystemExit,BaseException\n", VerdictClass::Exit),
            (
                b"\0E:ZeroDivisionError,ArithmeticError,Exception,BaseException\n",
                VerdictClass::Other,
            ),
            (
                b"junk\0E:AssertionError,Exception,BaseException\n",
                VerdictClass::Assertion,
            ),
        ];
        for (result, want) in cases {
            assert_eq!(
                class_of(&fin(exited(1), result, b"")),
                want,
                "{}",
                String::from_utf8_lossy(result)
            );
        }
    }

    #[test]
    fn signals_and_limits() {
        let mut f = fin(libc::SIGXCPU, b"", b"");
        assert_eq!(class_of(&f), VerdictClass::Timeout);
        f.status = libc::SIGKILL;
        f.cpu = 10.0;
        assert_eq!(class_of(&f), VerdictClass::Timeout);
        f.cpu = 0.1;
        assert_eq!(class_of(&f), VerdictClass::Other);
        let f = fin(libc::SIGSEGV, b"", b"Fatal Python error: MemoryError");
        assert_eq!(class_of(&f), VerdictClass::Memory);
        let f = fin(libc::SIGSEGV, b"", b"");
        assert_eq!(class_of(&f), VerdictClass::Other);
        let mut f = fin(exited(0), b"k3y", b"");
        f.wall_timeout = true;
        assert_eq!(class_of(&f), VerdictClass::Timeout);
    }

    #[test]
    fn serde_names() {
        let names: Vec<String> = VerdictClass::ALL
            .iter()
            .map(|c| {
                serde_json::to_string(c)
                    .unwrap()
                    .trim_matches('"')
                    .to_string()
            })
            .collect();
        assert_eq!(
            names,
            [
                "pass",
                "syntax",
                "name",
                "type",
                "index_key_value",
                "assertion",
                "timeout",
                "memory",
                "exit",
                "other"
            ]
        );
        for c in VerdictClass::ALL {
            assert_eq!(c.as_str(), c.to_string());
            let back: VerdictClass = serde_json::from_str(&format!("\"{c}\"")).unwrap();
            assert_eq!(back, c);
        }
    }

    #[test]
    fn trace_tail_keeps_the_end_from_a_line_start() {
        let mut s = Vec::new();
        for i in 0..500 {
            s.extend_from_slice(format!("line {i}\n").as_bytes());
        }
        let t = trace_tail(&s);
        assert!(t.len() <= TRACE_BYTES);
        assert!(t.starts_with("line "));
        assert!(t.ends_with("line 499\n"));
        assert_eq!(trace_tail(b"short\xff\n"), "short\u{fffd}\n");
    }
}
