"""Shared helpers for dlmkern benchmarks: timing, peak memory, device naming, results rows."""

from __future__ import annotations

import datetime
import json
import os
import resource
import statistics
import subprocess
import time

import torch

RESULTS = os.path.join(os.path.dirname(__file__), "results", "results.jsonl")


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} x{torch.get_num_threads()} threads"


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device: str, warmup: int = 1, repeat: int = 3) -> float:
    """Median wall time in seconds of fn() over `repeat` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(fn, device: str) -> int:
    """Bytes allocated at the peak of fn() beyond what was live before it.

    CUDA: the caching allocator's peak. CPU: peak RSS growth, so call this in a fresh process
    (see run_child) before anything else has raised the high-water mark.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    base = _rss_bytes()
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base


def run_child(script: str, args: list[str]) -> dict:
    """Runs `python script args` in a fresh process and returns the JSON it prints last."""
    import sys

    out = subprocess.run([sys.executable, script, *args], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_child_peak(fn, device: str):
    """In a --child process: measures fn()'s peak memory and prints it as the child's JSON."""
    print(json.dumps({"peak_bytes": peak_memory(fn, device)}))


def compare_paths(script: str, child_args: list[str], paths: dict, make_inputs, device: str,
                  repeat: int):
    """Peak memory of each path (each in a fresh `script --child NAME` process) and its median
    time on one set of inputs (gradients of the inputs cleared before each run). Returns
    (inputs, peaks, times)."""
    peaks = {k: run_child(script, [*child_args, "--child", k])["peak_bytes"] for k in paths}
    inputs = make_inputs()

    def run(path):
        def fn():
            for t in inputs:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.grad = None
            paths[path](*inputs)
        return fn

    times = {k: time_fn(run(k), device, repeat=repeat) for k in paths}
    return inputs, peaks, times


def report_ratios(times: dict, peaks: dict, row: dict | None) -> tuple[float, float]:
    """Prints dlmkern / naive time and peak-memory ratios; appends `row` (when given) with the
    times, peaks and ratios to the results file. Returns (time_ratio, mem_ratio)."""
    time_ratio = times["dlmkern"] / times["naive"]
    mem_ratio = peaks["dlmkern"] / max(peaks["naive"], 1)
    print(f"dlmkern / naive: time {time_ratio:.3f}x ({1 / time_ratio:.2f}x speed-up), "
          f"peak memory {100 * mem_ratio:.2f} %")
    if row is not None:
        append_result({**row, "time_ms": {k: round(t * 1e3, 3) for k, t in times.items()},
                       "peak_mib": {k: round(v / 2**20, 1) for k, v in peaks.items()},
                       "time_ratio": round(time_ratio, 4), "mem_ratio": round(mem_ratio, 4)})
    return time_ratio, mem_ratio


def git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        return ""


def append_result(row: dict, path: str | None = None):
    """Appends one JSON row (op, shape, device, versions, date, numbers) to the results file."""
    row = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "git": git_rev(),
        **row,
    }
    path = path or os.environ.get("DLMKERN_BENCH_RESULTS", RESULTS)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    return row
