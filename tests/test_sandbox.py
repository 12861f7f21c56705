"""The code sandbox against hostile programs, with the trainer as root and as an unprivileged user.

Every attack must score 0, leave no process behind (each attack puts a unique token in the argv of
the processes it starts; afterwards no process in /proc may carry it) and leave the trainer alive.
The unprivileged half runs the trainer-side call in a forked child that drops to nobody (65534)
and sends its results back as JSON on a pipe (a killed trainer sends nothing: the test fails).
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest
from dlmkern.rewards import SandboxLimits, code_reward
from dlmkern.rewards.sandbox import run_sandboxed

from .sandbox_helpers import NOBODY, USERS, needs_sandbox
from .sandbox_helpers import as_user as _as
from .sandbox_helpers import proc_with as _proc_with

pytestmark = needs_sandbox
LIMITS = SandboxLimits(wall_seconds=3, cpu_seconds=2, memory_mb=256, file_mb=8, processes=16,
                       disk_mb=16, output_kb=64)
GOOD = "def f():\n    return 1\n"
TESTS = ["assert f() == 1", "assert f() + 1 == 2"]


def _evidence_and_score(source: str, limits=LIMITS):
    """As the trainer: the plain run's stdout (evidence the attack ran) and code_reward's score."""
    t0 = time.monotonic()
    res = run_sandboxed(["main.py"], {"main.py": source}, "", limits)
    score = code_reward([None], [source], [TESTS], limits=limits)[0]
    return {"stdout": res.stdout.decode(errors="replace"), "code": res.exit_code,
            "score": score, "seconds": time.monotonic() - t0, "uid": os.geteuid()}


def _check_clean(token: str, out: dict, max_seconds: float = 12.0):
    assert out["score"] == 0.0
    assert out["seconds"] < max_seconds
    time.sleep(0.05)
    assert _proc_with(token) == [], "a process of the run outlived it"


def test_token_scan_sees_live_processes():
    token = uuid.uuid4().hex
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", token])
    try:
        for _ in range(100):
            if _proc_with(token):
                break
            time.sleep(0.02)
        assert _proc_with(token) == [p.pid]
    finally:
        p.kill()
        p.wait()
    assert _proc_with(token) == []


@pytest.mark.parametrize("user", USERS)
def test_correct_and_half_correct(user):
    out = _as(user, lambda: code_reward(
        [None, None, None], [GOOD, GOOD, "def f():\n    return 2\n"],
        [TESTS, ["assert f() == 1", "assert f() == 2"], TESTS], limits=LIMITS))
    assert out == [1.0, 0.5, 0.0]


EARLY_EXITS = {
    "os._exit(0)": "import os\nos._exit(0)\n",
    "SystemExit(0)": "raise SystemExit(0)\n",
    "sys.exit(0)": "import sys\nsys.exit(0)\n",
    "failed test, atexit exit 0": "import atexit, os\natexit.register(os._exit, 0)\n",
    "fake key": ("import os, secrets\nk = secrets.token_hex(32)\nprint(k, flush=True)\n"
                 "try:\n    os.write(3, k.encode())\nexcept OSError:\n    pass\nos._exit(0)\n"),
    "reads fd 4": ("import os\ntry:\n    os.write(3, os.read(4, 99))\nexcept OSError:\n"
                   "    pass\nos._exit(0)\n"),
}


@pytest.mark.parametrize("user", USERS)
@pytest.mark.parametrize("name", list(EARLY_EXITS))
def test_exit_zero_before_the_tests_scores_zero(user, name):
    good = GOOD if name != "failed test, atexit exit 0" else "def f():\n    return 2\n"
    out = _as(user, _evidence_and_score, good + EARLY_EXITS[name])
    assert out["code"] == 0  # exit status 0 ...
    assert out["score"] == 0.0  # ... never counts
    if name == "fake key":  # something shaped like a key reached stdout
        assert len(out["stdout"].strip()) == 64


def _daemon(token: str, double: bool) -> str:
    """Source: start a detached process (setsid; with `double`, also re-parented by a second
    fork) that says 'sleeping' and sleeps 60 s with `token` in its argv; the main process waits
    until it is up, says 'parent out' and exits 0."""
    sleeper = ("import os, sys, time\nprint('sleeping', flush=True)\n"
               "os.write(int(sys.argv[1]), b'1')\ntime.sleep(60)")
    exec_sleeper = (f"os.execv(sys.executable, [sys.executable, '-c', {sleeper!r}, str(w), "
                    f"{token!r}])")
    body = (f"    if os.fork() == 0:\n        {exec_sleeper}\n    os._exit(0)\n" if double
            else f"    {exec_sleeper}\n")
    return ("import os, sys\nr, w = os.pipe()\nos.set_inheritable(w, True)\n"
            "if os.fork() == 0:\n    os.setsid()\n" + body +
            "os.read(r, 1)\nprint('parent out', flush=True)\n")


@pytest.mark.parametrize("user", USERS)
@pytest.mark.parametrize("double", [False, True], ids=["setsid", "double-fork"])
def test_daemons_do_not_outlive_the_run(user, double):
    token = uuid.uuid4().hex
    out = _as(user, _evidence_and_score, _daemon(token, double))
    assert out["stdout"] == "sleeping\nparent out\n" and out["code"] == 0
    _check_clean(token, out, max_seconds=4)  # the run ends with its main process, not the clock


def _flood_rss(source: str) -> dict:
    """Peak RSS growth (KiB) of this process over an allocation of 64 MiB (the meter works) and
    over a run that floods stdout."""
    def peak_growth(fn):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
        base = _status_kib("VmRSS")
        result = fn()
        return _status_kib("VmHWM") - base, result

    control, _ = peak_growth(lambda: b"x" * (64 << 20))
    growth, res = peak_growth(lambda: run_sandboxed(["main.py"], {"main.py": source}, "", LIMITS))
    return {"control_kib": control, "growth_kib": growth, "total": res.stdout_bytes,
            "kept": len(res.stdout), "code": res.exit_code}


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith(key + ":"))


@pytest.mark.parametrize("user", USERS)
def test_output_flood_is_capped(user):
    source = ("import sys\nb = b'x' * (1 << 20)\nfor _ in range(200):\n"
              "    sys.stdout.buffer.write(b)\n")
    out = _as(user, _flood_rss, source)
    assert out["control_kib"] > 60 * 1024
    assert out["total"] == 200 << 20 and out["kept"] == LIMITS.output_kb * 1024
    assert out["growth_kib"] < 16 * 1024, out
    assert out["code"] == 0
    assert _as(user, code_reward, [None], [source], [TESTS], limits=LIMITS) == [0.0]


def _network(port: int) -> dict:
    return _evidence_and_score(
        f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), 1)\n"
        "    print('connected')\nexcept OSError as e:\n    print('refused', e)\n"
        "    raise SystemExit(1)\n" + GOOD)


@pytest.mark.parametrize("user", USERS)
def test_network_is_unreachable(user):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.setblocking(False)
    try:
        out = _as(user, _network, server.getsockname()[1])
        with pytest.raises(BlockingIOError):  # nobody connected
            server.accept()
    finally:
        server.close()
    assert "refused" in out["stdout"] and "connected" not in out["stdout"]
    assert out["score"] == 0.0


@pytest.mark.parametrize("user", USERS)
def test_no_writes_outside_the_run(user):
    token = uuid.uuid4().hex
    owned = tempfile.mkdtemp()  # the trainer's own directory, outside the run
    if os.geteuid() == 0 and user == "nobody":
        os.chown(owned, NOBODY, -1)
    target = os.path.join(owned, token)
    source = (
        "import os\nhits = []\n"
        f"for p in [{target!r}, '/tmp/{token}', '/{token}', '/usr/{token}', '/etc/{token}',"
        f" '/dev/shm/{token}']:\n"
        "    try:\n        open(p, 'w').write('x')\n        hits.append(p)\n"
        "    except OSError:\n        pass\n"
        f"os.makedirs('/tmp/ro/{token}')\nos.chmod('/tmp/ro', 0o500)\nos.chmod('/tmp', 0o000)\n"
        "print('wrote', hits)\n")
    try:
        out = _as(user, _evidence_and_score, source)
        assert out["stdout"].startswith("wrote") and target not in out["stdout"]
        assert f"'/tmp/{token}'" in out["stdout"]  # its own /tmp is writable ...
        assert os.listdir(owned) == []
        assert token not in " ".join(os.listdir(tempfile.gettempdir()))  # ... and private
        assert token not in " ".join(os.listdir("/dev/shm"))
        assert out["score"] == 0.0
    finally:
        shutil.rmtree(owned)


def _signals(bystander: int) -> dict:
    out = _evidence_and_score(
        "import os, signal\n"
        "print('procs', sorted(int(p) for p in os.listdir('/proc') if p.isdigit()), flush=True)\n"
        f"for pid in [os.getppid(), {os.getpid()}, {bystander}, -1, 0]:\n"
        "    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError as e:\n"
        "        print('denied', pid, e.errno, flush=True)\n")
    out["alive"] = True
    return out


@pytest.mark.parametrize("user", USERS)
def test_signals_do_not_reach_the_trainer(user):
    bystander = subprocess.Popen(["sleep", "30"],  # the trainer's user's other process
                                 user=NOBODY if user == "nobody" and os.geteuid() == 0 else None)
    try:
        out = _as(user, _signals, bystander.pid)
        assert out["alive"] and bystander.poll() is None  # trainer and bystander survived
        assert out["stdout"].startswith("procs [1, 2]\n")  # it sees only its own run
        assert f"denied {bystander.pid} 3" in out["stdout"]  # ESRCH: not even visible
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.parametrize("user", USERS)
def test_fork_loop_is_bounded(user):
    token = uuid.uuid4().hex
    loop = "import os\\nwhile True:\\n    try:\\n        os.fork()\\n    except OSError:\\n" \
           "        pass\\n"
    source = (f"import os, sys\nos.execv(sys.executable, [sys.executable, '-c', '{loop}', "
              f"{token!r}])")
    limits = SandboxLimits(**{**LIMITS.__dict__, "wall_seconds": 1.0})
    out = _as(user, _evidence_and_score, GOOD + source, limits)
    _check_clean(token, out, max_seconds=5)
    assert out["code"] is None  # it ran until the wall clock
    # the next run of the same trainer works (no leftover processes count against its limit)
    assert _as(user, code_reward, [None], [GOOD], [TESTS], limits=LIMITS) == [1.0]


HOGS = {
    "memory": "x = bytearray(2 * 1024**3)\n",
    "file size": "open('f', 'wb').write(b'0' * (64 << 20))\n",
    "disk": "for i in range(64):\n    open(f'f{i}', 'wb').write(b'0' * (4 << 20))\n",
    "cpu": "while True:\n    pass\n",
}


@pytest.mark.parametrize("user", USERS)
@pytest.mark.parametrize("name", list(HOGS))
def test_resource_hogs_score_zero(user, name):
    limits = SandboxLimits(**{**LIMITS.__dict__, "cpu_seconds": 1, "wall_seconds": 2.5})
    out = _as(user, _evidence_and_score, GOOD + HOGS[name], limits)
    assert out["score"] == 0.0 and out["code"] != 0 and out["seconds"] < 8


@pytest.mark.parametrize("user", USERS)
def test_identity_inside_the_run(user):
    out = _as(user, _evidence_and_score, "import os\nprint(os.getuid(), os.getgid(), "
                                         "os.getgroups(), os.listdir('/'))\n")
    uid, gid = map(int, out["stdout"].split()[:2])
    if user == "root":  # a fresh uid per run, no groups
        assert 200000 <= uid < 300000 and gid == uid and "[]" in out["stdout"]
    else:  # the user namespace's own id (the kernel's is the trainer's: see the README)
        assert (uid, gid) == (1000, 1000)
