//! Starting a sandbox worker: the pre-started interpreter (`runner.py`) that forks one
//! child per program.
//!
//! With namespaces the process tree is
//!
//! ```text
//! rupantor ─ P (outer pid; new user+mount+net+ipc ns; waits)
//!              └ A (pid 1 of a new pid ns: mounts /proc, reaps, and when it exits the
//!                   kernel kills everything left in the namespace)
//!                   └ B = python3 runner.py (the zygote) ─ one child per program
//! ```
//!
//! P, A and B are forks inside the `pre_exec` hook of one `Command`, so only raw system
//! calls on memory prepared beforehand run there. The id maps of the new user namespace
//! are written from this process by a helper thread while P waits for them.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use crate::sys::{self, cvt};

/// The uid/gid programs run as when we are root: `nobody`. With namespaces it is
/// uid/gid 1 inside the sandbox's user namespace. Either way the kernel's process-count
/// limit applies (it never does to uid 0), root-owned files and devices are not the
/// program's, and it cannot signal or trace our processes.
pub(crate) const SANDBOX_OUTER_ID: u32 = 65534;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const AT_RECURSIVE: libc::c_uint = 0x8000;

/// Everything the forked processes need, prepared before `fork`.
pub(crate) struct NsPlan {
    privs: Privileges,
    ready_w: RawFd,
    go_r: RawFd,
    a2p_r: RawFd,
    a2p_w: RawFd,
    keep_fd: RawFd,
    root: CString,
    proc_dir: CString,
    proc_fs: CString,
    tmpfs: CString,
    tmpfs_opts: CString,
    tmp_dir: CString,
    shm_dir: CString,
    /// Options of the private /tmp and /dev/shm.
    scratch_opts: CString,
    /// Mount points with their current flags, for kernels without `mount_setattr`.
    remounts: Vec<(CString, libc::c_ulong)>,
}

/// Pipes that live on our side of a namespaced spawn; dropped once `spawn` returns.
pub(crate) struct NsPipes {
    ready_r: OwnedFd,
    ready_w: OwnedFd,
    go_r: OwnedFd,
    go_w: OwnedFd,
    a2p_r: OwnedFd,
    a2p_w: OwnedFd,
}

impl NsPipes {
    pub(crate) fn new() -> io::Result<Self> {
        let (ready_r, ready_w) = sys::pipe()?;
        let (go_r, go_w) = sys::pipe()?;
        let (a2p_r, a2p_w) = sys::pipe()?;
        Ok(NsPipes {
            ready_r,
            ready_w,
            go_r,
            go_w,
            a2p_r,
            a2p_w,
        })
    }
}

fn cstr(s: &str) -> CString {
    CString::new(s).expect("no NUL in constant")
}

impl NsPlan {
    pub(crate) fn new(
        pipes: &NsPipes,
        keep_fd: RawFd,
        scratch_bytes: u64,
        privs: Privileges,
    ) -> Self {
        NsPlan {
            privs,
            ready_w: pipes.ready_w.as_raw_fd(),
            go_r: pipes.go_r.as_raw_fd(),
            a2p_r: pipes.a2p_r.as_raw_fd(),
            a2p_w: pipes.a2p_w.as_raw_fd(),
            keep_fd,
            root: cstr("/"),
            proc_dir: cstr("/proc"),
            proc_fs: cstr("proc"),
            tmpfs: cstr("tmpfs"),
            tmpfs_opts: cstr("size=4k,mode=555"),
            tmp_dir: cstr("/tmp"),
            shm_dir: cstr("/dev/shm"),
            scratch_opts: CString::new(format!("size={scratch_bytes},mode=1777")).expect("no NUL"),
            remounts: mount_points(),
        }
    }
}

/// Mount points of this process (from /proc/self/mountinfo) with the flags a read-only
/// bind remount must keep; used only where `mount_setattr` is missing (Linux < 5.12).
fn mount_points() -> Vec<(CString, libc::c_ulong)> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        if fields.len() < 6 {
            continue;
        }
        let path = unescape_mountinfo(fields[4]);
        let mut flags: libc::c_ulong = 0;
        for opt in fields[5].split(',') {
            flags |= match opt {
                "nodev" => libc::MS_NODEV,
                "noexec" => libc::MS_NOEXEC,
                "nosuid" => libc::MS_NOSUID,
                "noatime" => libc::MS_NOATIME,
                "nodiratime" => libc::MS_NODIRATIME,
                "relatime" => libc::MS_RELATIME,
                _ => 0,
            };
        }
        if let Ok(c) = CString::new(path) {
            out.push((c, flags));
        }
    }
    out
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn exit_code(status: libc::c_int) -> libc::c_int {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + (libc::WTERMSIG(status) & 0x7f)
    }
}

fn errno() -> libc::c_int {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Closes every descriptor of the calling process.
///
/// # Safety
/// Only for a forked child that will not touch any descriptor afterwards.
unsafe fn close_all() {
    if libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32) != 0 {
        for fd in 0..4096 {
            libc::close(fd);
        }
    }
}

/// # Safety
/// Runs in a freshly forked child: raw system calls only.
unsafe fn make_readonly(plan: &NsPlan) -> io::Result<()> {
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let r = libc::syscall(
        libc::SYS_mount_setattr,
        libc::AT_FDCWD,
        plan.root.as_ptr(),
        AT_RECURSIVE,
        &attr as *const MountAttr,
        std::mem::size_of::<MountAttr>(),
    );
    if r == 0 {
        return Ok(());
    }
    if errno() != libc::ENOSYS {
        return Err(io::Error::last_os_error());
    }
    for (path, flags) in &plan.remounts {
        let r = libc::mount(
            std::ptr::null(),
            path.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | flags,
            std::ptr::null(),
        );
        // a mount point hidden under another mount cannot be reached by path; whatever
        // covers it is remounted in its own turn
        if r != 0 && errno() != libc::ENOENT && errno() != libc::EINVAL {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The `pre_exec` body for a namespaced worker; see the module comment.
///
/// # Safety
/// Runs in the child between `fork` and `exec`: raw system calls only, no allocation.
pub(crate) unsafe fn ns_child(plan: &NsPlan) -> io::Result<()> {
    // P
    libc::prctl(
        libc::PR_SET_PDEATHSIG,
        libc::SIGKILL as libc::c_ulong,
        0,
        0,
        0,
    );
    cvt(libc::unshare(
        libc::CLONE_NEWUSER
            | libc::CLONE_NEWNS
            | libc::CLONE_NEWNET
            | libc::CLONE_NEWPID
            | libc::CLONE_NEWIPC,
    ))?;
    let pid = libc::getpid();
    sys::write_all(plan.ready_w, &pid.to_ne_bytes())?;
    let mut go = [1u8; 1];
    let n = libc::read(plan.go_r, go.as_mut_ptr().cast(), 1);
    if n != 1 || go[0] != 0 {
        return Err(io::Error::from_raw_os_error(libc::EPERM));
    }
    cvt(libc::mount(
        std::ptr::null(),
        plan.root.as_ptr(),
        std::ptr::null(),
        libc::MS_REC | libc::MS_PRIVATE,
        std::ptr::null(),
    ))?;
    make_readonly(plan)?;
    // private, writable scratch space: the only writable places in the sandbox
    let scratch_flags = libc::MS_NOSUID | libc::MS_NODEV;
    cvt(libc::mount(
        plan.tmpfs.as_ptr(),
        plan.tmp_dir.as_ptr(),
        plan.tmpfs.as_ptr(),
        scratch_flags,
        plan.scratch_opts.as_ptr().cast(),
    ))?;
    // /dev/shm may not exist; where it does it must not stay the host's
    if libc::mount(
        plan.tmpfs.as_ptr(),
        plan.shm_dir.as_ptr(),
        plan.tmpfs.as_ptr(),
        scratch_flags,
        plan.scratch_opts.as_ptr().cast(),
    ) != 0
        && errno() != libc::ENOENT
    {
        return Err(io::Error::last_os_error());
    }

    let a = libc::fork();
    if a < 0 {
        return Err(io::Error::last_os_error());
    }
    if a > 0 {
        libc::close(plan.a2p_w);
        let mut buf = [0u8; 4];
        let n = libc::read(plan.a2p_r, buf.as_mut_ptr().cast(), 4);
        let code = if n == 4 {
            i32::from_ne_bytes(buf)
        } else {
            libc::ECHILD
        };
        if code != 0 {
            let mut st = 0;
            libc::waitpid(a, &mut st, 0);
            return Err(io::Error::from_raw_os_error(code));
        }
        close_all();
        let mut st = 0;
        loop {
            let r = libc::waitpid(a, &mut st, 0);
            if r == a {
                libc::_exit(exit_code(st));
            }
            if r < 0 && errno() != libc::EINTR {
                libc::_exit(125);
            }
        }
    }

    // A: pid 1 of the new pid namespace
    libc::prctl(
        libc::PR_SET_PDEATHSIG,
        libc::SIGKILL as libc::c_ulong,
        0,
        0,
        0,
    );
    libc::close(plan.a2p_r);
    let report = |code: i32| {
        let _ = sys::write_all(plan.a2p_w, &code.to_ne_bytes());
    };
    let proc_flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_RDONLY;
    if libc::mount(
        plan.proc_fs.as_ptr(),
        plan.proc_dir.as_ptr(),
        plan.proc_fs.as_ptr(),
        proc_flags,
        std::ptr::null(),
    ) != 0
        && libc::mount(
            plan.tmpfs.as_ptr(),
            plan.proc_dir.as_ptr(),
            plan.tmpfs.as_ptr(),
            proc_flags,
            plan.tmpfs_opts.as_ptr().cast(),
        ) != 0
    {
        report(errno());
        libc::_exit(126);
    }
    let b = libc::fork();
    if b < 0 {
        report(errno());
        libc::_exit(126);
    }
    if b == 0 {
        // B: drops its privileges and goes on to exec the interpreter
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        );
        if plan.keep_fd >= 0 {
            libc::fcntl(plan.keep_fd, libc::F_SETFD, 0);
        }
        return drop_privileges(plan.privs);
    }
    report(0);
    close_all();
    let mut st = 0;
    loop {
        let r = libc::waitpid(-1, &mut st, 0);
        if r == b {
            libc::_exit(exit_code(st));
        }
        if r < 0 && errno() != libc::EINTR {
            libc::_exit(125);
        }
    }
}

/// The `pre_exec` body for a worker without namespaces.
///
/// # Safety
/// Runs in the child between `fork` and `exec`.
pub(crate) unsafe fn plain_child(keep_fd: RawFd, privs: Privileges) -> io::Result<()> {
    libc::prctl(
        libc::PR_SET_PDEATHSIG,
        libc::SIGKILL as libc::c_ulong,
        0,
        0,
        0,
    );
    if keep_fd >= 0 {
        cvt(libc::fcntl(keep_fd, libc::F_SETFD, 0))?;
    }
    drop_privileges(privs)
}

/// How the interpreter's privileges are dropped before it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Privileges {
    /// Become `uid`/`gid` with no supplementary groups and no capabilities, except
    /// CAP_DAC_READ_SEARCH when `keep_read` (the interpreter lives where that id may not
    /// go, e.g. under a 0700 /root).
    ToId { uid: u32, gid: u32, keep_read: bool },
    /// Stay uid 0 of a user namespace that maps only our own id, with every capability
    /// gone for good (bounding set emptied, "root" semantics off and locked).
    AllCaps,
    /// Not root and no namespace: nothing to drop.
    Nothing,
}

const CAP_DAC_READ_SEARCH: u32 = 2;
const PR_CAP_AMBIENT: libc::c_int = 47;
const PR_CAP_AMBIENT_RAISE: libc::c_ulong = 2;
/// NOROOT | NOROOT_LOCKED | NO_SETUID_FIXUP | NO_SETUID_FIXUP_LOCKED | KEEP_CAPS_LOCKED
const SECBITS_NO_ROOT: libc::c_ulong = 0x2F;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// # Safety
/// Raw system calls only; for a forked child before exec.
unsafe fn capset(mask: u32) -> io::Result<()> {
    let header = CapHeader {
        version: 0x2008_0522,
        pid: 0,
    };
    let data = [
        CapData {
            effective: mask,
            permitted: mask,
            inheritable: mask,
        },
        CapData {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        },
    ];
    if libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()) != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// # Safety
/// Raw system calls only; for a forked child before exec.
unsafe fn drop_privileges(privs: Privileges) -> io::Result<()> {
    match privs {
        Privileges::ToId {
            uid,
            gid,
            keep_read,
        } => {
            cvt(libc::setgroups(0, std::ptr::null()))?;
            cvt(libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0))?;
            for cap in 0..64 {
                if !(keep_read && cap == CAP_DAC_READ_SEARCH) {
                    libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0);
                }
            }
            cvt(libc::setresgid(gid, gid, gid))?;
            cvt(libc::setresuid(uid, uid, uid))?;
            let keep = if keep_read {
                1 << CAP_DAC_READ_SEARCH
            } else {
                0
            };
            capset(keep)?;
            if keep_read {
                cvt(libc::prctl(
                    PR_CAP_AMBIENT,
                    PR_CAP_AMBIENT_RAISE,
                    CAP_DAC_READ_SEARCH as libc::c_ulong,
                    0,
                    0,
                ))?;
            }
        }
        Privileges::AllCaps => {
            for cap in 0..64 {
                libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0);
            }
            cvt(libc::prctl(
                libc::PR_SET_SECUREBITS,
                SECBITS_NO_ROOT,
                0,
                0,
                0,
            ))?;
            capset(0)?;
        }
        Privileges::Nothing => {}
    }
    cvt(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
    Ok(())
}

/// Whether an unprivileged id can reach and run `python` (every directory above it
/// searchable by others, the file executable by others).
pub(crate) fn reachable_by_others(python: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let Ok(real) = std::fs::canonicalize(python) else {
        return false;
    };
    let Ok(meta) = std::fs::metadata(&real) else {
        return false;
    };
    if meta.permissions().mode() & 0o001 == 0 {
        return false;
    }
    real.ancestors().skip(1).all(|dir| {
        std::fs::metadata(dir)
            .map(|m| m.permissions().mode() & 0o001 != 0)
            .unwrap_or(false)
    })
}

/// Writes the id maps of P's new user namespace: inside uid/gid 0 is us, and when we
/// are root outside, inside uid/gid 1 is [`SANDBOX_OUTER_ID`].
fn write_id_maps(pid: i32) -> io::Result<()> {
    let (uid, gid) = (sys::euid(), sys::egid());
    let dir = format!("/proc/{pid}");
    if uid == 0 && id_mapped(SANDBOX_OUTER_ID) {
        std::fs::write(
            format!("{dir}/uid_map"),
            format!("0 0 1\n1 {SANDBOX_OUTER_ID} 1\n"),
        )?;
        std::fs::write(
            format!("{dir}/gid_map"),
            format!("0 0 1\n1 {SANDBOX_OUTER_ID} 1\n"),
        )?;
    } else {
        std::fs::write(format!("{dir}/setgroups"), "deny")?;
        std::fs::write(format!("{dir}/uid_map"), format!("0 {uid} 1\n"))?;
        std::fs::write(format!("{dir}/gid_map"), format!("0 {gid} 1\n"))?;
    }
    Ok(())
}

/// Whether `id` is both a uid and a gid of our own user namespace (always, outside
/// containers; a rootless container may map only a few ids).
pub(crate) fn id_mapped(id: u32) -> bool {
    let mapped = |file: &str| {
        std::fs::read_to_string(file)
            .map(|text| {
                text.lines().any(|line| {
                    let f: Vec<u64> = line
                        .split_whitespace()
                        .filter_map(|x| x.parse().ok())
                        .collect();
                    f.len() == 3 && (f[0]..f[0] + f[2]).contains(&u64::from(id))
                })
            })
            .unwrap_or(false)
    };
    mapped("/proc/self/uid_map") && mapped("/proc/self/gid_map")
}

/// Spawns `cmd` with the namespace `pre_exec` hook installed, serving the id-map
/// handshake from a helper thread while `spawn` blocks.
pub(crate) fn spawn_namespaced(
    cmd: &mut Command,
    keep_fd: RawFd,
    scratch_bytes: u64,
    privs: Privileges,
) -> io::Result<std::process::Child> {
    let pipes = NsPipes::new()?;
    let plan = NsPlan::new(&pipes, keep_fd, scratch_bytes, privs);
    // SAFETY: ns_child only makes raw system calls on `plan`, prepared before the fork.
    unsafe {
        cmd.pre_exec(move || ns_child(&plan));
    }
    let NsPipes {
        ready_r,
        ready_w,
        go_r,
        go_w,
        a2p_r,
        a2p_w,
    } = pipes;
    let mapper = std::thread::spawn(move || -> io::Result<()> {
        let mut r = File::from(ready_r);
        let mut buf = [0u8; 4];
        if r.read_exact(&mut buf).is_err() {
            return Ok(()); // P failed before asking; spawn reports why
        }
        let res = write_id_maps(i32::from_ne_bytes(buf));
        let _ = sys::write_all(go_w.as_raw_fd(), &[u8::from(res.is_err())]);
        res
    });
    let spawned = cmd.spawn();
    drop((ready_w, go_r, a2p_r, a2p_w));
    let mapped = mapper
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("id-map thread panicked")));
    match (spawned, mapped) {
        (Ok(child), _) => Ok(child),
        (Err(e), Err(m)) => Err(io::Error::new(
            e.kind(),
            format!("{e} (writing the id maps: {m})"),
        )),
        (Err(e), Ok(())) => Err(e),
    }
}
