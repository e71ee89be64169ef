# rupantor-exec sandbox runner: a pre-started interpreter ("zygote").
#
# Trusted code. It is started by rupantor-exec already confined (namespaces where the
# OS allows them, privileges dropped, environment scrubbed), imports the common
# standard modules once, then waits for jobs on a control socket. Each job is one
# untrusted program (program + asserts, one module) and runs in a child forked from
# here: own process group, the private /tmp (the worker's own tmpfs, emptied after each
# job) or a fresh directory, resource limits, every inherited descriptor closed but the
# four the job brought. The zygote never runs untrusted code, so every program starts
# from the same clean state; when a job ends, everything it left behind is killed (and
# its files removed) before the next one starts. The zygote is not dumpable, so a
# program cannot trace it or reach its descriptors through /proc.
#
# Protocol (control socket, SOCK_STREAM):
#   rust -> zygote: u32 LE length + JSON job, with 4 descriptors attached to the first
#                   byte (SCM_RIGHTS): stdout write end, stderr write end, key read end,
#                   result write end.
#   zygote -> rust: JSON lines: {"ev": "ready", ...}, {"ev": "started", "pid": N},
#                   {"ev": "done", "status": wait-status, "timeout": bool, "cpu": s}
#
# Pass rule: after the last assert ran, the harness reads the per-run key from the key
# descriptor (the parent wrote it there and closed its end) and writes it to the result
# descriptor, then exits 0 at once. The key is never in the program's source, globals or
# memory before its asserts have run; both descriptor numbers are random per run.

import builtins
import ctypes
import gc
import json
import linecache
import os
import resource
import select
import shutil
import signal
import socket
import struct
import sys
import time
import traceback

# Modules most programs import: importing them once here is what an in-process scorer
# gets for free, and every forked child shares their pages.
for _m in (
    "math", "re", "collections", "itertools", "functools", "heapq", "bisect", "string",
    "operator", "typing", "copy", "random", "datetime", "fractions", "decimal",
    "statistics", "array", "dataclasses", "enum", "io", "contextlib",
):
    try:
        __import__(_m)
    except Exception:
        pass
del _m

PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER = 1, 4, 36

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.restype = ctypes.c_int
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def _prctl(op, a=0, b=0, c=0, d=0):
    return _libc.prctl(op, a, b, c, d)


def _send(ctl, obj):
    ctl.sendall(json.dumps(obj).encode() + b"\n")


def _recv_exact(ctl, n):
    buf = b""
    while len(buf) < n:
        chunk = ctl.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def _recv_job(ctl):
    fds = []
    head = b""
    while len(head) < 4:
        data, got, _flags, _addr = socket.recv_fds(ctl, 4 - len(head), 4)
        fds.extend(got)
        if not data:
            raise EOFError
        head += data
    (length,) = struct.unpack("<I", head)
    job = json.loads(_recv_exact(ctl, length))
    return job, fds


def _proc_children(me, everyone):
    """Pids to sweep: our children (we are a subreaper, so every orphan of the job is
    one), or inside our own pid namespace every process but init and us."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        if pid == me or pid == 1:
            continue
        if everyone:
            out.append(pid)
            continue
        try:
            with open("/proc/%d/stat" % pid, "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 1 and int(fields[1]) == me:
            out.append(pid)
    return out


def _reap():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _sweep(pgid, everyone):
    me = os.getpid()
    for attempt in range(2000):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
        _reap()
        left = _proc_children(me, everyone)
        if everyone:
            # zombies awaiting init's reaping hold nothing; ignore them
            alive = []
            for pid in left:
                try:
                    with open("/proc/%d/stat" % pid, "rb") as f:
                        st = f.read()
                    if st[st.rfind(b")") + 2:st.rfind(b")") + 3] != b"Z":
                        alive.append(pid)
                except OSError:
                    pass
            left = alive
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.0005 if attempt < 100 else 0.005)


def _empty(path):
    """Removes everything in `path` (a private tmpfs; no job process is left)."""
    try:
        entries = os.listdir(path)
    except OSError:
        return
    for name in entries:
        full = os.path.join(path, name)
        try:
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full, onerror=_force_remove)
            else:
                os.unlink(full)
        except OSError:
            pass


def _force_remove(func, path, _exc):
    # a directory the program made unwritable: we are root in the sandbox, but make sure
    try:
        os.chmod(os.path.dirname(path), 0o700)
        func(path)
    except OSError:
        pass


def _place_fds(fds, keyfd, resfd):
    # move the four received descriptors out of the way, then onto their numbers
    high = [os.dup(fd) if fd in (1, 2, keyfd, resfd) else fd for fd in fds]
    for a, b in zip(high, fds):
        if a != b:
            os.close(b)
    out, err, keyr, resw = high
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.dup2(keyr, keyfd, inheritable=False)
    os.dup2(resw, resfd, inheritable=False)
    keep = sorted({0, 1, 2, keyfd, resfd})
    lo = 0
    for fd in keep:
        if fd > lo:
            os.closerange(lo, fd)
        lo = fd + 1
    os.closerange(lo, resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def _tag(write, resfd, exc, compiling=False):
    try:
        names = ",".join(c.__name__ for c in type(exc).__mro__)
        if compiling and not isinstance(exc, SyntaxError):
            # e.g. ValueError for a NUL byte in the source: still a syntax problem
            names = "SyntaxError," + names
        write(resfd, b"\0E:" + names.encode("ascii", "replace") + b"\n")
    except BaseException:
        pass


def _flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass


def _format_exc(exc):
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != "solution.py":
        tb = tb.tb_next
    if tb is None:
        lines = traceback.format_exception_only(type(exc), exc)
    else:
        lines = ["Traceback (most recent call last):\n"]
        lines += traceback.format_tb(tb)
        lines += traceback.format_exception_only(type(exc), exc)
    return "".join(lines)


def _harness(src, keyfd, resfd):
    """Runs program + asserts as one module; only if the last statement finished does
    the key travel from the key descriptor to the result descriptor."""
    read, write, exit_ = os.read, os.write, os._exit
    linecache.cache["solution.py"] = (len(src), None, src.splitlines(True), "solution.py")
    g = {"__name__": "__main__", "__builtins__": builtins, "__doc__": None}
    try:
        code = compile(src, "solution.py", "exec", dont_inherit=True)
    except BaseException as e:
        _tag(write, resfd, e, compiling=True)
        try:
            write(2, _format_exc(e).encode("utf-8", "replace"))
        except BaseException:
            pass
        exit_(1)
    del src
    try:
        exec(code, g)
    except SystemExit as e:
        _tag(write, resfd, e)
        status = e.code
        if status is None:
            status = 0
        elif not isinstance(status, int):
            try:
                sys.stderr.write(str(status) + "\n")
            except BaseException:
                pass
            status = 1
        _flush()
        exit_(status & 0xFF)
    except BaseException as e:
        _tag(write, resfd, e)
        _flush()
        try:
            text = _format_exc(e)
        except BaseException:
            text = type(e).__name__ + "\n"
        try:
            write(2, text.encode("utf-8", "replace"))
        except BaseException:
            pass
        exit_(1)
    _flush()
    key = read(keyfd, 256)
    write(resfd, key)
    exit_(0)


def _child(job, fds, opts, n):
    os.setpgid(0, 0)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if opts["mode"] == "ns":
        # /tmp and /dev/shm are this worker's own tmpfs, emptied after every job
        workdir = "/tmp"
    else:
        workdir = os.path.join(opts["base"], "job%d" % n)
        os.mkdir(workdir, 0o700)
    os.chdir(workdir)
    os.environ["HOME"] = workdir
    os.environ["TMPDIR"] = workdir
    _place_fds(fds, job["keyfd"], job["resfd"])
    cpu = max(1, int(job["cpu"]))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (job["as"], job["as"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (job["fsize"], job["fsize"]))
    if job["nproc"] is not None:  # None: no limit that could work here
        resource.setrlimit(resource.RLIMIT_NPROC, (job["nproc"], job["nproc"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # the runner is not dumpable (nothing may trace it or open its /proc files); the
    # program is, as a normal process would be
    _prctl(PR_SET_DUMPABLE, 1)
    sys.argv[:] = ["solution.py"]
    sys.path.insert(0, workdir)
    _harness(job["src"], job["keyfd"], job["resfd"])


def _run(ctl, job, fds, opts, n):
    gc.freeze()  # the child must not touch (and so copy) the runner's pages to collect them
    pid = os.fork()
    if pid == 0:
        try:
            ctl.detach()
            _child(job, fds, opts, n)
        except BaseException:
            try:
                os.write(2, ("sandbox setup failed:\n" + traceback.format_exc()).encode())
            except BaseException:
                pass
        os._exit(121)
    for fd in fds:
        os.close(fd)
    try:
        os.setpgid(pid, pid)
    except OSError:
        pass
    if opts["mode"] != "ns":
        # the parent can kill this group itself should we fail to
        _send(ctl, {"ev": "started", "pid": pid})
    timed_out = False
    pidfd = os.pidfd_open(pid)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        if not poller.poll(max(1, int(job["wall"] * 1000))):
            timed_out = True
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                os.kill(pid, signal.SIGKILL)
    finally:
        os.close(pidfd)
    _, status, usage = os.wait4(pid, 0)
    done = {"ev": "done", "status": status, "timeout": timed_out,
            "cpu": usage.ru_utime + usage.ru_stime}
    if opts["mode"] == "ns":
        # the verdict can be made while we clean up: the next job waits for us anyway,
        # and should the worker be dropped now, its pid namespace takes everything along
        _send(ctl, done)
        _sweep(pid, True)
        for scratch in ("/tmp", "/dev/shm"):
            _empty(scratch)
    else:
        # without namespaces only this sweep catches escapees: finish it first
        _sweep(pid, False)
        shutil.rmtree(os.path.join(opts["base"], "job%d" % n), ignore_errors=True)
        _send(ctl, done)


def main():
    opts = {}
    for arg in sys.argv[1:]:
        k, _, v = arg.partition("=")
        opts[k] = v
    sys.path[:] = [p for p in sys.path if p not in ("", ".")]
    _prctl(PR_SET_DUMPABLE, 0)
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    os.chdir("/")
    ctl = socket.socket(fileno=int(opts["ctl"]))
    _send(ctl, {"ev": "ready", "pid": os.getpid(), "uid": os.geteuid()})
    n = 0
    while True:
        try:
            job, fds = _recv_job(ctl)
        except (EOFError, ConnectionError):
            break
        n += 1
        _run(ctl, job, fds, opts, n)


main()
