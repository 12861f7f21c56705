"""Worker pools for rewards (SPEC 5): math-verify in a pool of worker processes, each answer under
dlmkern's own timeout, and the bounded concurrency code rewards use for their sandbox runs.

math-verify's signal-based timeout only works on a process's main thread, so each answer is
checked in a worker process (`_verify_worker.py`) with one answer in flight; the caller's thread
waits on the pipes and kills a worker whose answer takes longer than `timeout` (that answer
scores 0; a fresh worker takes the slot when it is next needed), so a pathological answer costs
its timeout on one worker while the others go on. Each worker is a fresh interpreter (exec'd,
as multiprocessing's "spawn" start method makes them), never a fork of the trainer: a fork of a
process that holds CUDA or OpenMP threads is unsafe. Unlike multiprocessing's spawn it does not
re-import the trainer's __main__ (an unguarded script would start workers recursively), and it
imports only math-verify, not dlmkern or torch (~0.7 s and ~60 MB per worker instead of ~4 s
and ~0.8 GB).

Size: `workers=`, else $DLMKERN_REWARD_WORKERS, else the CPUs this process may run on divided by
the ranks on this machine ($LOCAL_WORLD_SIZE). Pools are shared per size, safe to call from
several threads at once, and killed at exit.
"""

from __future__ import annotations

import atexit
import collections
import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time
from multiprocessing.connection import wait

from dlmkern.rewards._verify_worker import RUN_NAME

WORKER_FILE = os.path.join(os.path.dirname(__file__), "_verify_worker.py")
ENV_WORKERS = "DLMKERN_REWARD_WORKERS"
ENV_LOCAL_RANKS = "LOCAL_WORLD_SIZE"  # set by torchrun: ranks on this machine
START_METHOD = "spawn"  # a fresh interpreter per worker; never a fork of the trainer
START_TIMEOUT = 60.0  # for a fresh worker to import sympy / math-verify on a loaded machine
MAX_TRIES = 2         # an answer whose worker died under it (not by our timeout) is tried again
_EMPTY = object()     # an idle slot with no worker process (started when the slot is taken)


def reward_workers(workers: int | None = None) -> int:
    """`workers`, else $DLMKERN_REWARD_WORKERS, else the CPUs this process may use shared among
    the ranks on this machine (torchrun's $LOCAL_WORLD_SIZE; at least one worker per rank)."""
    if workers is None:
        env = os.environ.get(ENV_WORKERS, "").strip()
        if env:
            workers = _env_int(ENV_WORKERS, env)
        else:
            workers = max(1, _cpus() // _local_ranks())
    if workers < 1:
        raise ValueError(f"reward workers must be >= 1, got {workers}")
    return workers


def _cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _local_ranks() -> int:
    """Ranks of this job on this machine: every rank would otherwise start one interpreter per
    CPU (8 ranks x all cores)."""
    env = os.environ.get(ENV_LOCAL_RANKS, "").strip()
    if not env:
        return 1
    n = _env_int(ENV_LOCAL_RANKS, env)
    if n < 1:
        raise ValueError(f"{ENV_LOCAL_RANKS}={env!r} must be >= 1")
    return n


def _env_int(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{key}={value!r} is not an integer") from None


class _Worker:
    """One worker process (a fresh interpreter) and our end of its socket."""

    def __init__(self):
        ours, theirs = mp.Pipe()
        boot = (f"import runpy, sys; sys.path[:] = {sys.path!r}; "
                f"runpy.run_path({WORKER_FILE!r}, run_name={RUN_NAME!r})")
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", boot, str(theirs.fileno())],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         pass_fds=(theirs.fileno(),))
        finally:
            theirs.close()
        self.conn = ours
        self.ready = False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self):
        self.conn.close()
        self.proc.kill()
        self.proc.wait()


class VerifyPool:
    """`size` math-verify worker processes; `verify(pairs, timeout)` -> one bool per pair, in
    order. Started lazily (only as many as a batch needs)."""

    start_method = START_METHOD

    def __init__(self, workers: int | None = None):
        self.size = reward_workers(workers)
        self._cv = threading.Condition()
        self._free: list = [_EMPTY] * self.size
        self._live: set[_Worker] = set()
        self._closed = False
        self.restarts = 0  # workers killed (timeout) or found dead and replaced

    def pids(self) -> list[int]:
        with self._cv:
            return [w.proc.pid for w in self._live]

    def _take(self, block: bool):
        """An idle worker (started or restarted here), or None when none is idle and not block."""
        with self._cv:
            while not self._free and not self._closed:
                if not block:
                    return None
                self._cv.wait()
            if self._closed:
                raise RuntimeError("the reward worker pool was closed (interpreter exit?)")
            w = self._free.pop()
        if w is not _EMPTY and w.alive():
            return w
        if w is not _EMPTY:
            self._drop(w, give_back=False)
        try:
            w = _Worker()
        except BaseException:
            self._give(_EMPTY)  # the slot stays in the pool
            raise
        with self._cv:
            self._live.add(w)
        return w

    def _give(self, w) -> None:
        with self._cv:
            self._free.append(w)
            self._cv.notify()

    def _drop(self, w: _Worker, give_back: bool = True) -> None:
        """Kills a stuck or dead worker; its slot goes back empty."""
        w.kill()
        with self._cv:
            self._live.discard(w)
            self.restarts += 1
        if give_back:
            self._give(_EMPTY)

    def verify(self, pairs: list[tuple[str, str]], timeout: float) -> list[bool]:
        """Whether each (gold, pred) pair is equivalent; False for an answer that took longer
        than `timeout` seconds (its worker is killed)."""
        results = [False] * len(pairs)
        todo = collections.deque((i, 0) for i in range(len(pairs)))  # (index, tries)
        busy: dict = {}  # conn -> [worker, index, tries, deadline]
        try:
            while todo or busy:
                self._dispatch(pairs, todo, busy, timeout)
                self._collect(busy, todo, results, timeout)
        finally:  # interrupted (or an error): the answers in flight are abandoned with them
            for w, *_ in busy.values():
                self._drop(w)
        return results

    def _dispatch(self, pairs, todo, busy, timeout) -> None:
        """Sends pending pairs to idle workers; waits for one only when none is busy for us."""
        while todo:
            w = self._take(block=not busy)
            if w is None:
                return
            i, tries = todo.popleft()
            try:
                w.conn.send(pairs[i])
            except OSError:  # it died since we looked
                self._lost(w, i, tries, todo)
                continue
            limit = timeout if w.ready else START_TIMEOUT + timeout
            busy[w.conn] = [w, i, tries, time.monotonic() + limit]

    def _collect(self, busy, todo, results, timeout) -> None:
        """Reads the answers that came; kills the workers whose answer is past its deadline."""
        if not busy:
            return
        left = min(entry[3] for entry in busy.values()) - time.monotonic()
        for conn in wait(list(busy), timeout=max(left, 0.0)):
            w, i, tries, _ = entry = busy[conn]
            try:
                msg = conn.recv()
            except (EOFError, OSError):  # killed or crashed under this answer
                del busy[conn]
                self._lost(w, i, tries, todo)
                continue
            if msg is None:  # the worker is ready; the answer's own timeout starts now
                w.ready = True
                entry[3] = time.monotonic() + timeout
            elif isinstance(msg, str):
                raise ImportError(msg)
            else:
                del busy[conn]
                results[i] = msg
                self._give(w)
        now = time.monotonic()
        for conn in [c for c, entry in busy.items() if entry[3] <= now]:
            w, i, tries, _ = busy.pop(conn)
            self._lost(w, i, tries if not w.ready else MAX_TRIES, todo)  # stuck: scores 0

    def _lost(self, w: _Worker, i: int, tries: int, todo) -> None:
        """Answer i's worker died or hung: kill it; try the answer again (on a fresh worker)
        unless it had its tries. A worker that never became ready raises instead of scoring 0:
        every answer would silently score 0 otherwise."""
        started = w.ready
        self._drop(w)
        if tries + 1 < MAX_TRIES:
            todo.appendleft((i, tries + 1))
        elif not started:
            raise RuntimeError(f"dlmkern math reward: a math-verify worker did not start (exit "
                               f"code {w.proc.returncode}; its stderr is this process's)")

    def close(self) -> None:
        """Kills every worker; later calls raise."""
        with self._cv:
            self._closed = True
            live, self._live = list(self._live), set()
            self._cv.notify_all()
        for w in live:
            w.kill()


_pools: dict[int, VerifyPool] = {}
_pools_lock = threading.Lock()


def verify_pool(workers: int | None = None) -> VerifyPool:
    """The process's shared pool of `reward_workers(workers)` workers."""
    size = reward_workers(workers)
    with _pools_lock:
        pool = _pools.get(size)
        if pool is None:
            pool = _pools[size] = VerifyPool(size)
        return pool


def close_pools() -> None:
    """Kills every shared pool's workers (at exit; a later call starts new pools)."""
    with _pools_lock:
        pools = list(_pools.values())
        _pools.clear()
    for pool in pools:
        pool.close()


def _forget_pools() -> None:
    """In a forked child: the parent's workers are not ours to use or kill."""
    global _pools_lock
    _pools.clear()
    _pools_lock = threading.Lock()


atexit.register(close_pools)
os.register_at_fork(after_in_child=_forget_pools)


def run_bounded(fn, jobs: list, workers: int | None = None) -> list:
    """[fn(*job) for job in jobs], at most `reward_workers(workers)` at a time in threads (for
    work that runs in subprocesses, e.g. sandbox runs), results in order."""
    n = min(reward_workers(workers), len(jobs))
    if n <= 1:
        return [fn(*job) for job in jobs]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(n, thread_name_prefix="dlmkern-reward") as ex:
        return list(ex.map(lambda job: fn(*job), jobs))
