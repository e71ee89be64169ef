"""In-process `exec` scorer: the unsafe baseline of `rupantor bench sandbox`.

Scores programs the way a simple shared-task scorer does: each program and its asserts
are exec'd in a fresh globals dict inside this one interpreter, stdout discarded, any
exception a failure. No isolation, no limits: only for timing against the sandbox.

Usage: python3 inprocess_exec.py [JOBS.jsonl]   (standard input without a file)
JOBS.jsonl: one {"program": str, "asserts": [str]} a line. Prints one JSON line:
{"n", "passed", "seconds", "programs_per_s", "passed_flags"} (timing excludes start-up
and reading the file).
"""

import contextlib
import io
import json
import sys
import time


def main():
    if len(sys.argv) > 1:
        with open(sys.argv[1], encoding="utf-8") as f:
            text = f.read()
    else:
        text = sys.stdin.read()
    jobs = [json.loads(line) for line in text.splitlines() if line.strip()]
    flags = []
    sink = io.StringIO()
    start = time.perf_counter()
    for job in jobs:
        src = job["program"] + "\n\n" + "\n".join(job["asserts"]) + "\n"
        ok = True
        try:
            with contextlib.redirect_stdout(sink):
                exec(src, {})
        except BaseException:
            ok = False
        sink.seek(0)
        sink.truncate()
        flags.append(ok)
    seconds = time.perf_counter() - start
    print(json.dumps({
        "n": len(jobs),
        "passed": sum(flags),
        "seconds": seconds,
        "programs_per_s": len(jobs) / seconds if seconds > 0 else 0.0,
        "passed_flags": flags,
    }))


if __name__ == "__main__":
    main()
