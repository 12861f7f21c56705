"""Sandbox launcher: `dlmkern.rewards.sandbox` runs this file's text as `python -I -S -c TEXT`,
with its config on stdin (marshal, format 4: built in, so nothing to import; written by the
trainer). It imports nothing from dlmkern (it may run under another Python 3, as another user),
and only what it needs, each import costing every run its start-up time, before the host file
system goes away.

Process tree, every process single-threaded:
  L (this script, the trainer's user): unshares mount, PID, network, IPC and UTS namespaces (and a
    user namespace when not root), forks C and exits with C's status. The trainer kills L at the
    wall-clock limit; C then dies of its parent-death signal.
  C (PID 1 of the new PID namespace): builds a fresh read-only root (system dirs bound read-only,
    a size-limited tmpfs on /tmp, a new /proc), drops to the run's uid, becomes undumpable (the
    candidate cannot ptrace it) and forks R. When R exits, C exits; the kernel then kills every
    process left in the namespace, however it detached.
  R: rlimits; fds 0 stdin, 1 stdout (or /dev/null), 2 /dev/null, 3... the extra pipes; exec of
    the program. Only R's exec'd program is untrusted.
Setup errors go to the status fd as one line "error: ..."; R writes "ok" just before exec.
"""

import ctypes
import marshal
import os
import resource
import select
import signal
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217, "riscv64": 41}
SYS_MOUNT_SETATTR = 442  # the same number on every architecture
AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = -100, 0x8000, 1
INSIDE_ID = 1000  # the candidate's uid/gid as it sees them inside a user namespace
STAGE = "/tmp"    # where the new root is assembled before pivot_root (hidden afterwards)
TOP = ("bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc")
DEVICES = ("null", "zero", "full", "random", "urandom")

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
libc.syscall.restype = ctypes.c_long


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _error(stage):
    import traceback  # only on the way out: each import costs every run its start-up time

    return f"error: {stage}: {traceback.format_exc(limit=2)}\n".encode()


def _b(s):
    return None if s is None else os.fsencode(s)


def mount(src, dst, fstype, flags, data=None):
    _check(libc.mount(_b(src), _b(dst), _b(fstype), flags, _b(data)), f"mount {dst}")


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def bind_ro(src, dst):
    """Binds `src` (with its submounts) read-only at `dst`."""
    mount(src, dst, None, MS_BIND | MS_REC)

    class MountAttr(ctypes.Structure):
        _fields_ = [("set", ctypes.c_uint64), ("clr", ctypes.c_uint64),
                    ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]

    attr = MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
    if libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, _b(dst), AT_RECURSIVE, ctypes.byref(attr),
                    ctypes.sizeof(attr)) == 0:
        return
    # kernels before 5.12: remount the top mount read-only, keeping its (possibly locked) flags
    st = os.statvfs(dst).f_flag
    keep = st & (MS_NOSUID | MS_NODEV | MS_NOEXEC) | (st & 1024) | (st & 2048)
    if st & 4096:
        keep |= 1 << 21  # ST_RELATIME -> MS_RELATIME
    mount(None, dst, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep)


def build_root(cfg):
    """A new root at STAGE: system dirs read-only, the interpreter's prefix, a few devices, a new
    /proc (we are PID 1 of the new namespace) and a private tmpfs at /tmp holding the files."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates to the host
    mount("tmpfs", STAGE, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=1024,mode=755")
    for name in TOP:
        host = "/" + name
        if os.path.islink(host):
            os.symlink(os.readlink(host), STAGE + host)
        elif os.path.isdir(host):
            os.mkdir(STAGE + host)
            bind_ro(host, STAGE + host)
    prefix = os.path.realpath(sys.base_prefix)
    if not any(prefix == "/" + t or prefix.startswith("/" + t + "/") for t in TOP):
        os.makedirs(STAGE + prefix)
        bind_ro(prefix, STAGE + prefix)
    os.mkdir(STAGE + "/proc")
    mount("proc", STAGE + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.mkdir(STAGE + "/dev")
    for dev in DEVICES:
        open(STAGE + "/dev/" + dev, "w").close()
        mount("/dev/" + dev, STAGE + "/dev/" + dev, None, MS_BIND)
    for i, name in enumerate(("stdin", "stdout", "stderr")):
        os.symlink(f"/proc/self/fd/{i}", STAGE + "/dev/" + name)
    os.symlink("/proc/self/fd", STAGE + "/dev/fd")
    uid, gid = cfg["ids"]
    tmp_opts = (f"size={cfg['disk_mb']}m,nr_inodes={cfg['inodes']},mode=700,"
                f"uid={uid},gid={gid}")
    for d in ("/tmp", "/dev/shm"):
        os.mkdir(STAGE + d)
        mount("tmpfs", STAGE + d, "tmpfs", MS_NOSUID | MS_NODEV, tmp_opts)
    for name, text in cfg["files"].items():
        with open(STAGE + "/tmp/" + name, "w") as f:
            f.write(text)
        os.chown(STAGE + "/tmp/" + name, uid, gid)
    os.chdir(STAGE)
    _check(libc.syscall(SYS_PIVOT_ROOT[os.uname().machine], b".", b"."), "pivot_root")
    _check(libc.umount2(b".", MNT_DETACH), "umount old root")
    os.chdir("/")
    mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def drop_privileges(cfg):
    """Root: to the run's own uid (no capabilities left). In a user namespace we already are
    INSIDE_ID; clear the capabilities the namespace's creator holds."""
    uid, gid = cfg["ids"]
    if cfg["userns"]:
        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
        data = (ctypes.c_uint32 * 6)()
        _check(libc.capset(ctypes.byref(Header(0x20080522, 0)), data), "capset")
    else:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    _check(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "undumpable")
    _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")  # reset by setuid


def _fds(fds):
    return [fd for fd in [fds["status"], fds["stdout"], *fds["extra"]] if fd is not None]


def exec_program(cfg, fds, status):
    """R: limits, fds 0 stdin, 1 stdout, 2 /dev/null, 3... the extra pipes in order; exec."""
    for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    mb = 1024 * 1024
    for lim, val in ((resource.RLIMIT_CPU, cfg["cpu_seconds"]),
                     (resource.RLIMIT_AS, cfg["memory_mb"] * mb),
                     (resource.RLIMIT_FSIZE, cfg["file_mb"] * mb),
                     (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, cfg["nproc"])):
        resource.setrlimit(lim, (val, val))
    os.chdir("/tmp")
    stdin = os.open("/tmp/.stdin", os.O_RDONLY)
    os.unlink("/tmp/.stdin")
    null = os.open("/dev/null", os.O_WRONLY)
    stdout = null if fds["stdout"] is None else fds["stdout"]
    src = [stdin, stdout, null, *fds["extra"], status]
    high = [os.dup(fd) for fd in src]   # first out of the way, then into place
    last = len(src) - 1  # the status fd: closed by the exec
    for target, fd in enumerate(high):
        os.dup2(fd, target, inheritable=target < last)
    os.closerange(last + 1, 1 << 16)
    os.write(last, b"ok\n")
    try:
        os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])
    except BaseException:
        os.write(last, _error("exec"))
        os._exit(127)


def init(cfg, fds, lifeline):
    """C, PID 1 of the new namespace: build the root, drop privileges, run R, exit with it."""
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if select.select([lifeline], [], [], 0)[0]:  # L died before the line above: give up
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.setsid()  # the run's own session: kill(0) from inside cannot reach L
    build_root(cfg)
    drop_privileges(cfg)
    pid = os.fork()
    if pid == 0:
        try:
            exec_program(cfg, fds, fds["status"])
        except BaseException:
            try:  # failed before the fds moved: the status pipe is still where it was
                os.write(fds["status"], _error("exec"))
            except OSError:
                pass
        os._exit(127)
    for fd in _fds(fds):
        os.close(fd)
    while True:
        child, st = os.wait()  # also reaps orphans re-parented to us
        if child == pid:
            os._exit(os.WEXITSTATUS(st) if os.WIFEXITED(st) else 128 + os.WTERMSIG(st))


def main():
    cfg = marshal.loads(sys.stdin.buffer.read())
    cfg["argv"] = [os.path.realpath(sys.executable)] + cfg["args"]
    cfg["nproc"] = cfg["processes"] + (2 if cfg["userns"] else 1)  # L (in the userns) and C count
    fds = cfg["fds"]
    os.set_inheritable(fds["status"], False)
    try:
        uid, gid = os.getuid(), os.getgid()
        flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
        if cfg["userns"]:
            flags |= CLONE_NEWUSER
            cfg["ids"] = [INSIDE_ID, INSIDE_ID]
        else:
            os.setgroups([])
        _check(libc.unshare(flags), "unshare")
        if cfg["userns"]:
            _write("/proc/self/setgroups", "deny")
            _write("/proc/self/uid_map", f"{INSIDE_ID} {uid} 1")
            _write("/proc/self/gid_map", f"{INSIDE_ID} {gid} 1")
        lifeline, keep = os.pipe()
        pid = os.fork()
    except BaseException:
        os.write(fds["status"], _error("setup"))
        os._exit(1)
    if pid == 0:
        try:
            init(cfg, fds, lifeline)
        except BaseException:
            os.write(fds["status"], _error("setup"))
        os._exit(1)
    os.write(fds["status"], f"pid {pid}\n".encode())  # the trainer kills C itself at the time limit
    for fd in _fds(fds) + [lifeline]:
        os.close(fd)
    os.dup2(os.open("/dev/null", os.O_WRONLY), 1)
    st = os.waitpid(pid, 0)[1]
    os._exit(os.WEXITSTATUS(st) if os.WIFEXITED(st) else 128 + os.WTERMSIG(st))


if __name__ == "__main__":
    main()
