"""Code reward (SPEC 5): run a candidate program against tests in a sandboxed subprocess.

Limits: CPU time, address space, file size, number of processes (as an unprivileged user when
started as root), a private temporary directory (also TMPDIR), no network (an empty network
namespace: directly as root, inside a new user namespace otherwise) and a wall-clock timeout after
which the whole process group is killed. A crash, hang, fork bomb or memory hog scores 0 and never
takes the trainer down. Where the kernel forbids the namespace, `network="require"` (the default)
raises a clear error at the first run instead of running code with the network up; `"try"` warns
once and runs without network isolation.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass

_CLONE_NEWNET = 0x40000000
_CLONE_NEWUSER = 0x10000000
# Dropped privileges use a fresh uid per run (no passwd entry needed), so one run's leftover
# processes never count against the next run's process limit.
_UID_BASE, _UID_SPAN = 200000, 100000
_counter = itertools.count()


@dataclass
class SandboxLimits:
    wall_seconds: float = 10.0
    cpu_seconds: int = 5
    memory_mb: int = 512
    file_mb: int = 16
    processes: int = 16
    network: str = "require"   # "require": no network or an error; "try": isolate when possible

    def __post_init__(self):
        if self.network not in ("require", "try"):
            raise ValueError(f"SandboxLimits.network must be 'require' or 'try', got "
                             f"{self.network!r}")


def _unshare_network() -> None:
    """Moves the calling process into an empty network namespace (only loopback, down). As root
    directly; otherwise inside a new user namespace, which unprivileged users may create on most
    kernels. Raises OSError when the kernel refuses."""
    flags = _CLONE_NEWNET if os.geteuid() == 0 else _CLONE_NEWUSER | _CLONE_NEWNET
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(network namespace): {os.strerror(err)}")


_isolation: bool | None = None


def network_isolation_available() -> bool:
    """Whether sandboxed programs can be cut off from the network here (probed once)."""
    global _isolation
    if _isolation is None:
        try:
            subprocess.run([sys.executable, "-I", "-S", "-c", "pass"], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           preexec_fn=_unshare_network, timeout=30)
            _isolation = True
        except (OSError, subprocess.SubprocessError):
            _isolation = False
    return _isolation


def _world_executable(path: str) -> bool:
    """Whether an unprivileged user can run `path` (every directory on the way searchable)."""
    real = os.path.realpath(path)
    if not os.path.isfile(real) or not os.stat(real).st_mode & 0o001:
        return False
    d = os.path.dirname(real)
    while d and d != "/":
        if not os.stat(d).st_mode & 0o001:
            return False
        d = os.path.dirname(d)
    return True


def sandbox_python() -> tuple[str, bool]:
    """(interpreter, drop privileges): as root, an interpreter an unprivileged user can run, so the
    process limit applies (root ignores RLIMIT_NPROC); otherwise this interpreter."""
    if os.geteuid() != 0:
        return sys.executable, False
    for cand in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if _world_executable(cand):
            return cand, True
    return sys.executable, False


def _preexec(limits: SandboxLimits, workdir: str, uid: int | None, isolate: bool):
    def run():
        os.setsid()  # own process group: the timeout kills every descendant
        mb = 1024 * 1024
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * mb, limits.memory_mb * mb))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_mb * mb, limits.file_mb * mb))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if isolate:  # no network; a failure here fails the launch (the program never runs)
            _unshare_network()
        if uid is not None:
            os.chown(workdir, uid, uid)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)  # RLIMIT_NPROC is not enforced for root
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))
    return run


def run_program(source: str, stdin: str = "", limits: SandboxLimits | None = None):
    """Runs Python `source` in the sandbox. Returns (exit_code or None on timeout, stdout)."""
    limits = limits or SandboxLimits()
    isolate = network_isolation_available()
    if not isolate:
        if limits.network == "require":
            raise RuntimeError(
                "dlmkern code sandbox: this kernel does not let us create a network namespace "
                "(unshare failed), so candidate programs would run with the network up. Allow "
                "unprivileged user namespaces, run as root, or pass "
                "SandboxLimits(network='try') to accept running without network isolation.")
        _warn_once("dlmkern code sandbox: no network namespace available; running candidate "
                   "programs WITHOUT network isolation (SandboxLimits(network='try'))")
    workdir = tempfile.mkdtemp(prefix="dlmkern-sandbox-")
    try:
        path = os.path.join(workdir, "main.py")
        with open(path, "w") as f:
            f.write(source)
        os.chmod(workdir, 0o755)
        os.chmod(path, 0o644)
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
               "PYTHONDONTWRITEBYTECODE": "1"}
        python, drop = sandbox_python()
        uid = _UID_BASE + (os.getpid() * 7919 + next(_counter)) % _UID_SPAN if drop else None
        proc = subprocess.Popen([python, "-I", "-S", path], cwd=workdir, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL,
                                preexec_fn=_preexec(limits, workdir, uid, isolate))
        try:
            out, _ = proc.communicate(stdin.encode(), timeout=limits.wall_seconds)
            return proc.returncode, out.decode(errors="replace")
        except subprocess.TimeoutExpired:
            return None, ""
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
    except (OSError, subprocess.SubprocessError):  # the launch itself failed: scores 0
        return None, ""
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def extract_code(completion: str) -> str:
    """The last ```python fenced block of a completion (or the whole text if there is none)."""
    blocks = re.findall(r"```(?:python|py)?\s*\n(.*?)```", completion, flags=re.S)
    return blocks[-1] if blocks else completion


def code_reward(prompts: list, completions: list[str], tests: list, *,
                limits: SandboxLimits | None = None, **_columns) -> list[float]:
    """Fraction of a sample's tests passed. `tests[i]` is a list of test snippets (asserts) run
    after the candidate program, each in its own sandboxed process."""
    scores = []
    for completion, cases in zip(completions, tests, strict=True):
        cases = [cases] if isinstance(cases, str) else list(cases)
        code = extract_code(completion)
        passed = sum(1 for case in cases
                     if run_program(code + "\n\n" + case, limits=limits)[0] == 0)
        scores.append(passed / len(cases) if cases else 0.0)
    return scores
