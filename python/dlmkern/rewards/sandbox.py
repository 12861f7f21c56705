"""The code sandbox (SPEC 5), trainer side: runs a Python program in fresh namespaces and reads its
output with a cap. The launcher (`_sandbox_init.py`, its own process) does the isolating; see the
README section "Code reward sandbox: threat model".

Every run gets new mount, PID, network, IPC and UTS namespaces (plus a user namespace when the
trainer is not root), a read-only root with a private size-limited tmpfs on /tmp, its own uid
(as root: a fresh uid per run; otherwise the namespace's own uid, and the run cannot see or signal
any process outside its PID namespace), rlimits, and a wall clock. When the program's PID 1 exits
or is killed, the kernel kills every process of the run. Where the kernel allows no namespaces,
nothing runs: `SandboxUnavailable` says why.
"""

from __future__ import annotations

import functools
import itertools
import marshal
import os
import select
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass

# Root runs each program under a fresh uid (no passwd entry needed), so one run's processes never
# count against the next run's process limit and no two runs share a uid.
_UID_BASE, _UID_SPAN = 200000, 100000
_counter = itertools.count()


class SandboxUnavailable(RuntimeError):
    """This machine cannot isolate candidate programs; nothing was run."""


@dataclass
class SandboxLimits:
    """Per-run limits. `processes` counts the run's own processes; `disk_mb` sizes the private
    tmpfs (/tmp, also the working dir); `output_kb` is how much stdout is kept (the rest is read,
    counted and dropped). `network` is kept for compatibility: "require" and "try" both demand
    the namespace sandbox (there is no unisolated fallback)."""

    wall_seconds: float = 10.0
    cpu_seconds: int = 5
    memory_mb: int = 512
    file_mb: int = 16
    processes: int = 16
    disk_mb: int = 64
    output_kb: int = 1024
    network: str = "require"

    def __post_init__(self):
        if self.network not in ("require", "try"):
            raise ValueError(f"SandboxLimits.network must be 'require' or 'try', got "
                             f"{self.network!r}")


@dataclass
class RunResult:
    exit_code: int | None     # None: the wall clock ran out (or the launch failed)
    stdout: bytes             # at most output_kb KiB
    stdout_bytes: int         # everything the program wrote to stdout
    setup_error: str | None = None

    @property
    def timed_out(self) -> bool:
        return self.exit_code is None and self.setup_error is None


@functools.cache
def _launcher_source() -> str:
    with open(os.path.join(os.path.dirname(__file__), "_sandbox_init.py")) as f:
        return f.read()


def sandbox_python() -> str:
    """An interpreter both we and the sandboxed uid can run (as root the run's uid needs the
    binary world-executable; the directories on the way do not matter, they are bound in)."""
    need = (lambda p: os.stat(p).st_mode & 0o001) if os.geteuid() == 0 else \
        (lambda p: os.access(p, os.X_OK))
    for cand in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        real = os.path.realpath(cand)
        try:
            if os.path.isfile(real) and need(real):
                return real
        except OSError:
            continue
    return os.path.realpath(sys.executable)


def _config(args, files, stdin, limits, fds) -> bytes:
    userns = os.geteuid() != 0
    uid = None if userns else _UID_BASE + (os.getpid() * 7919 + next(_counter)) % _UID_SPAN
    return marshal.dumps({
        "args": args, "files": {**files, ".stdin": stdin}, "userns": userns,
        "ids": [uid, uid], "fds": fds, "processes": limits.processes,
        "cpu_seconds": limits.cpu_seconds, "memory_mb": limits.memory_mb,
        "file_mb": limits.file_mb, "disk_mb": limits.disk_mb, "inodes": 4096,
        "env": {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp",
                "PYTHONDONTWRITEBYTECODE": "1"},
    }, 4)


class _Reader:
    """Reads a pipe to EOF, keeping at most `cap` bytes and counting the rest."""

    def __init__(self, fd: int, cap: int):
        self.fd, self.cap, self.kept, self.total = fd, cap, bytearray(), 0
        os.set_blocking(fd, False)

    def read(self) -> bool:
        """Reads what is there; False at EOF (then the fd is closed)."""
        while True:
            try:
                chunk = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return True
            if not chunk:
                self.close()
                return False
            self.total += len(chunk)
            room = self.cap - len(self.kept)
            if room > 0:
                self.kept += chunk[:room]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Sandbox:
    """One started run of `python *args` (see run_sandboxed). `channels` adds pipes: the
    program's fd 3 + i reads (channels[i] == "r") or writes ("w"); `ends[i]` is our end of it.
    Without `keep_stdout` the program's stdout is /dev/null."""

    def __init__(self, args: list[str], files: dict[str, str], limits: SandboxLimits,
                 stdin: str = "", channels: str = "", keep_stdout: bool = True):
        self.started = time.monotonic()
        status_r, status_w = os.pipe()
        pairs = [os.pipe() for _ in channels]
        theirs = [r if mode == "r" else w for mode, (r, w) in zip(channels, pairs, strict=True)]
        self.ends = [w if mode == "r" else r for mode, (r, w) in zip(channels, pairs, strict=True)]
        out_r, out_w = os.pipe() if keep_stdout else (-1, -1)
        fds = {"status": status_w, "stdout": 1 if keep_stdout else None, "extra": theirs}
        try:
            self.proc = subprocess.Popen(
                [sandbox_python(), "-I", "-S", "-c", _launcher_source()], stdin=subprocess.PIPE,
                stdout=out_w if keep_stdout else subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                close_fds=True, pass_fds=(status_w, *theirs), start_new_session=True)
        except BaseException:
            for fd in [status_r, out_r, *self.ends]:
                if fd >= 0:
                    os.close(fd)
            raise
        finally:
            for fd in [status_w, out_w, *theirs]:
                if fd >= 0:
                    os.close(fd)
        self.status = _Reader(status_r, 1 << 16)
        self.stdout = _Reader(out_r, limits.output_kb * 1024) if keep_stdout else None
        try:
            self.proc.stdin.write(_config(args, files, stdin, limits, fds))
            self.proc.stdin.close()
        except BrokenPipeError:
            pass  # the launcher died first; its status says why

    def setup_error(self, finished: bool = True) -> str | None:
        """What went wrong before the program started, if anything (read the status pipe
        first). A run that was stopped while still setting up reports nothing."""
        status = bytes(self.status.kept).decode(errors="replace")
        lines = [ln for ln in status.splitlines() if not ln.startswith("pid ")]
        if lines == ["ok"] or (not finished and not lines):
            return None
        return status.strip() or "the sandbox launcher exited without a status"

    def kill(self) -> None:
        """Ends the run: kill C (the run's PID 1; the kernel then kills the whole namespace and
        L exits once it is gone), and L itself if it does not exit."""
        if self.proc.poll() is None:
            if self.status.fd >= 0:
                self.status.read()
            killed = False
            for line in bytes(self.status.kept).decode(errors="replace").splitlines():
                if line.startswith("pid "):  # C is not reaped while L lives: the pid is C's
                    try:
                        os.kill(int(line[4:]), signal.SIGKILL)
                        killed = True
                    except (ProcessLookupError, PermissionError, ValueError):
                        pass
            if not killed:  # still setting up: C dies of its parent-death signal
                self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        """Closes our ends (the run is over or killed)."""
        for r in (self.status, self.stdout):
            if r is not None:
                r.close()
        for i, fd in enumerate(self.ends):
            if fd >= 0:
                os.close(fd)
                self.ends[i] = -1


def _pump(box: Sandbox, deadline: float) -> bool:
    """Reads the status and stdout pipes until the launcher exited and both hit EOF, or the
    deadline. Returns False when the deadline passed first."""
    poller = select.poll()
    by_fd = {r.fd: r for r in (box.status, box.stdout) if r is not None}
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    while by_fd:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        for fd, _ in poller.poll(left * 1000):
            if fd in by_fd and not by_fd[fd].read():
                poller.unregister(fd)
                del by_fd[fd]
    try:  # both pipes closed: the run is over and the launcher about to exit
        box.proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
    except subprocess.TimeoutExpired:
        return False
    return True


def run_sandboxed(args: list[str], files: dict[str, str], stdin: str = "",
                  limits: SandboxLimits | None = None) -> RunResult:
    """Runs `python *args` in a fresh sandbox with `files` in its working dir /tmp (the
    interpreter is sandbox_python(); with its site-packages unless args say -S). The
    program gets stdin and stdout (kept up to limits.output_kb) and no other fd. Raises
    SandboxUnavailable where no sandbox can be made."""
    limits = limits or SandboxLimits()
    require_sandbox()
    return _run(args, files, stdin, limits)


def _run(args, files, stdin, limits) -> RunResult:
    box = Sandbox(args, files, limits, stdin)
    try:
        finished = _pump(box, box.started + limits.wall_seconds)
        if not finished:
            box.kill()
    finally:
        box.close()
    error = box.setup_error(finished)
    code = box.proc.returncode if finished and error is None else None
    return RunResult(code, bytes(box.stdout.kept), box.stdout.total, error)


_availability: tuple[bool, str] | None = None


def sandbox_available() -> bool:
    """Whether this machine can run the sandbox (probed once: a trivial program must run)."""
    global _availability
    if _availability is None:
        try:
            res = _run(["-c", "print('ok')"], {}, "", SandboxLimits(wall_seconds=30))
            ok = res.setup_error is None and res.exit_code == 0 and res.stdout == b"ok\n"
            _availability = (ok, res.setup_error or f"probe gave {res.exit_code}, {res.stdout}")
        except OSError as e:
            _availability = (False, f"cannot start the launcher: {e}")
    return _availability[0]


def require_sandbox() -> None:
    if not sandbox_available():
        raise SandboxUnavailable(
            "dlmkern code sandbox: this machine cannot isolate candidate programs (new mount, PID "
            "and network namespaces, as root or inside an unprivileged user namespace), so no "
            "candidate program runs. Run as root or allow unprivileged user namespaces "
            "(sysctl kernel.unprivileged_userns_clone=1 / user.max_user_namespaces > 0, no "
            f"seccomp filter blocking unshare). Cause: {_availability[1]}")


_warned: set[str] = set()


def warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
