//! Every verdict class, end to end through the sandbox, with the trace a repair prompt
//! would get.

use std::time::Duration;

use rupantor_exec::{protections, run_many, SandboxConfig, VerdictClass};

#[test]
fn each_failure_lands_in_its_class() {
    let cfg = SandboxConfig {
        wall_time: Duration::from_secs(2),
        cpu_time: Duration::from_secs(2),
        ..SandboxConfig::default()
    };
    let p = protections(&cfg);
    if !p.usable {
        eprintln!("SKIP: {}", p.why_not.unwrap_or_default());
        return;
    }
    use VerdictClass::*;
    let cases: Vec<(&str, &str, VerdictClass, &str)> = vec![
        ("def f(x):\n    return x\n", "assert f(1) == 1", Pass, ""),
        (
            "def f(x)\n    return x\n",
            "assert f(1) == 1",
            Syntax,
            "SyntaxError",
        ),
        (
            "def f(x):\nreturn x\n",
            "assert f(1) == 1",
            Syntax,
            "IndentationError",
        ),
        ("x = 1\0\n", "assert x", Syntax, "null"),
        (
            "def f(x):\n    return x\n",
            "assert g(1) == 1",
            Name,
            "NameError: name 'g'",
        ),
        (
            "def f():\n    y += 1\n    return y\n",
            "assert f()",
            Name,
            "UnboundLocalError",
        ),
        (
            "def f():\n    return [].push(1)\n",
            "assert f()",
            Name,
            "AttributeError",
        ),
        (
            "def f(x):\n    return x + '1'\n",
            "assert f(1)",
            Type,
            "TypeError",
        ),
        (
            "def f(x):\n    return x[5]\n",
            "assert f([1])",
            IndexKeyValue,
            "IndexError",
        ),
        (
            "def f(d):\n    return d['k']\n",
            "assert f({})",
            IndexKeyValue,
            "KeyError",
        ),
        (
            "def f(s):\n    return int(s)\n",
            "assert f('x')",
            IndexKeyValue,
            "ValueError",
        ),
        (
            "class E(KeyError):\n    pass\ndef f():\n    raise E('e')\n",
            "assert f()",
            IndexKeyValue,
            "E: 'e'",
        ),
        (
            "def f(x):\n    return x\n",
            "assert f(1) == 2",
            Assertion,
            "assert f(1) == 2",
        ),
        (
            "def f(x):\n    return 1 / x\n",
            "assert f(0)",
            Other,
            "ZeroDivisionError",
        ),
        (
            "import no_such_module_rupantor\n",
            "assert True",
            Other,
            "ModuleNotFoundError",
        ),
        (
            "x = bytearray(6 * 2**30)\n",
            "assert x",
            Memory,
            "MemoryError",
        ),
        (
            "import time\ntime.sleep(30)\n",
            "assert True",
            Timeout,
            "wall-time",
        ),
        (
            "import sys\nsys.exit(0)\n",
            "assert True",
            Exit,
            "SystemExit",
        ),
        ("import sys\nsys.exit('bye')\n", "assert True", Exit, "bye"),
    ];
    let jobs: Vec<(String, Vec<String>)> = cases
        .iter()
        .map(|(p, a, _, _)| (p.to_string(), vec![a.to_string()]))
        .collect();
    let verdicts = run_many(&cfg, &jobs, 2, |_| {});
    for ((program, _, class, needle), v) in cases.iter().zip(&verdicts) {
        assert_eq!(v.class, *class, "{program:?}: {v:?}");
        assert_eq!(v.passed, *class == Pass, "{program:?}: {v:?}");
        assert!(
            v.trace.contains(needle),
            "{program:?}: trace lacks {needle:?}: {v:?}"
        );
    }
    // tracebacks point into the module with its source lines, not into the harness
    let v = &verdicts[12];
    assert!(v.trace.contains("File \"solution.py\", line 4"), "{v:?}");
    assert!(!v.trace.contains("<string>"), "{v:?}");
}
