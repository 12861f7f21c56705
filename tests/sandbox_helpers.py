"""Shared by the sandbox suites: run a trainer-side call as root or as an unprivileged user, find
processes a run left behind, and the marker that skips a suite without a sandbox (or fails it,
under DLMKERN_REQUIRE_SANDBOX=1, as CI sets: CI must run these suites, never skip them)."""

import ctypes
import json
import os

import dlmkern.rewards.sandbox as sandbox
import pytest

NOBODY = 65534
USERS = ["root", "nobody"]
REQUIRE_SANDBOX = os.environ.get("DLMKERN_REQUIRE_SANDBOX") == "1"
needs_sandbox = pytest.mark.skipif(
    not REQUIRE_SANDBOX and not sandbox.sandbox_available(),
    reason="no sandbox here (tests/test_rewards.py checks the error; "
           "DLMKERN_REQUIRE_SANDBOX=1 fails instead)")


def proc_with(token: str) -> list[int]:
    """PIDs of live (non-zombie) processes whose argv contains `token`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read()
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if token.encode() in argv and state != "Z":
            found.append(int(pid))
    return found


def as_user(user: str, fn, *args, **kwargs):
    """fn(*args, **kwargs) called as the trainer running as `user`; returns its JSON-able result.
    The unprivileged trainer is a forked child that drops to nobody and sends its result back as
    JSON on a pipe (a killed trainer sends nothing: the test fails)."""
    if user == "root" and os.geteuid() != 0:
        pytest.skip("needs root")
    if user == "root" or os.geteuid() != 0:
        return fn(*args, **kwargs)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the unprivileged trainer
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # dumpable again: /proc/self is ours
            sandbox._availability = None             # probe again, as this user
            os.write(w, json.dumps({"result": fn(*args, **kwargs)}).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0 and data, f"the unprivileged trainer died (status {status})"
    return json.loads(data)["result"]
