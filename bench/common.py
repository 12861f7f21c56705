"""Shared helpers for dlmkern benchmarks: size sets, timing quantiles, peak memory, and the one
results-row schema with its single writer.

Every row of bench/results/results.jsonl (and of DLMKERN_BENCH_RESULTS) has exactly ROW_KEYS:
one row per (op, shape, provider). Ratios between providers are derived from p50_ms when
printed or summarised; they are never stored.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

RESULTS = os.path.join(os.path.dirname(__file__), "results", "results.jsonl")

# The row schema (Liger style): key -> allowed types. shape holds every size parameter and dtype.
ROW_SCHEMA: dict[str, tuple[type, ...]] = {
    "op": (str,), "shape": (dict,), "provider": (str,),
    "p20_ms": (float, type(None)), "p50_ms": (float,), "p80_ms": (float, type(None)),
    "tflops": (float, type(None)), "gbps": (float, type(None)), "peak_mib": (float, type(None)),
    "device": (str,), "torch": (str,), "git": (str,), "date": (str,),
}
ROW_KEYS = tuple(ROW_SCHEMA)
SHAPE_VALUE_TYPES = (int, float, str, bool)
SIZE_SETS = ("default", "quick", "tiny")
BASELINE = "dlmkern"  # the provider every ratio is taken against


# ---------------------------------------------------------------- command line and size sets

def parser(doc: str) -> argparse.ArgumentParser:
    """The flags every bench takes: --device, a size set (--quick / --tiny; default otherwise),
    --set KEY=VALUE overrides, --repeat, --no-save."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    sizes = p.add_mutually_exclusive_group()
    sizes.add_argument("--quick", dest="size_set", action="store_const", const="quick",
                       help="the GPU set: SPEC 6 shapes that fit ~45 s on an H200")
    sizes.add_argument("--tiny", dest="size_set", action="store_const", const="tiny",
                       help="a few seconds on a 2-core CPU (dry runs)")
    p.set_defaults(size_set="default")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one size parameter of the chosen set")
    p.add_argument("--repeat", type=int, help="timed runs per provider (default: by device)")
    p.add_argument("--no-save", action="store_true", help="print only, append no rows")
    return p


def _parse_value(text: str, like):
    if isinstance(like, bool):
        return text.lower() in ("1", "true", "yes")
    if isinstance(like, (int, float)):
        return type(like)(text)
    if isinstance(like, list):
        return [_parse_value(t, like[0]) for t in text.split(",")]
    return text


def pick_sizes(args, sizes: dict[str, dict]) -> dict:
    """The chosen size set with --set overrides applied (types follow the set's values)."""
    cfg = dict(sizes[args.size_set])
    for item in args.set:
        key, _, text = item.partition("=")
        if key not in cfg:
            raise SystemExit(f"--set {item}: unknown key; choose from {sorted(cfg)}")
        cfg[key] = _parse_value(text, cfg[key])
    return cfg


def parse(doc: str, sizes: dict[str, dict], add_args=None):
    """Parses the common flags (plus add_args(parser)); returns (args, size config)."""
    p = parser(doc)
    if add_args is not None:
        add_args(p)
    args = p.parse_args()
    if args.size_set == "tiny" and args.repeat is None:
        args.repeat = 2  # a dry run proves the plumbing; its numbers mean little
    return args, pick_sizes(args, sizes)


# ---------------------------------------------------------------- timing and memory

@dataclass(frozen=True)
class Timing:
    """Quantiles of one provider's wall time, in seconds."""
    p20: float
    p50: float
    p80: float


def _quantile(sorted_xs: list[float], q: float) -> float:
    pos = q * (len(sorted_xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def _one_run(fn, device: str) -> float:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_fn(fn, device: str, warmup: int | None = None, repeat: int | None = None,
            budget_s: float = 2.0) -> Timing:
    """p20 / p50 / p80 wall time of fn() after warm-up runs. CUDA: CUDA events, 3 warm-up runs
    and as many timed runs (5 to 50) as fit in about budget_s. CPU: 1 warm-up, 3 timed runs."""
    cuda = device == "cuda"
    warmup = (3 if cuda else 1) if warmup is None else warmup
    for _ in range(warmup):
        fn()
    sync(device)
    if repeat is None:
        repeat = 3
        if cuda:
            first = _one_run(fn, device)
            repeat = max(5, min(50, int(budget_s / max(first, 1e-6))))
    times = sorted(_one_run(fn, device) for _ in range(repeat))
    return Timing(*(_quantile(times, q) for q in (0.2, 0.5, 0.8)))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(fn, device: str) -> int:
    """Bytes allocated at the peak of fn() beyond what was live before it.

    CUDA: the caching allocator's peak (in this process). CPU: peak RSS growth, so call this in
    a fresh process (see compare_paths) before anything else has raised the high-water mark.
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


def _child_peak(script: str, cfg: dict, device: str, path: str) -> int:
    """Runs `python script --child PATH --child-cfg JSON` in a fresh process; its peak bytes."""
    out = subprocess.run([sys.executable, script, "--device", device, "--child", path,
                          "--child-cfg", json.dumps(cfg)], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


def add_child_args(p: argparse.ArgumentParser, paths):
    p.add_argument("--child", choices=list(paths), help=argparse.SUPPRESS)
    p.add_argument("--child-cfg", help=argparse.SUPPRESS)


def run_child(args, paths: dict, make_inputs) -> bool:
    """In a --child process: measures one path's peak memory, prints it as JSON, returns True."""
    if not args.child:
        return False
    inputs = make_inputs(json.loads(args.child_cfg), args.device)
    print(json.dumps({"peak_bytes": peak_memory(lambda: paths[args.child](*inputs),
                                                args.device)}))
    return True


def compare_paths(script: str, cfg: dict, paths: dict, make_inputs, device: str,
                  repeat: int | None):
    """Peak memory and timing of each path on one set of inputs (input gradients cleared before
    each run). CPU peaks come from a fresh `script --child NAME` process per path (RSS);
    CUDA peaks from the allocator in this process. Returns (inputs, peaks, timings)."""
    if device == "cpu":
        peaks = {k: _child_peak(script, cfg, device, k) for k in paths}
    inputs = make_inputs(cfg, device)

    def run(path):
        def fn():
            for t in inputs:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.grad = None
            paths[path](*inputs)
        return fn

    if device == "cuda":
        peaks = {k: peak_memory(run(k), device) for k in paths}
    timings = {k: time_fn(run(k), device, repeat=repeat) for k in paths}
    return inputs, peaks, timings


# ---------------------------------------------------------------- rows: schema and writer

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


def git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        return ""


def _r(x: float | None, digits: int = 6) -> float | None:
    """x to `digits` significant digits (microsecond kernels keep their precision)."""
    return None if x is None else float(f"{x:.{digits}g}")


def make_row(op: str, shape: dict, provider: str, timing: Timing, device: str, *,
             flops: float | None = None, nbytes: float | None = None,
             peak_bytes: int | None = None) -> dict:
    """One schema row. tflops / gbps are flops / nbytes over the p50 time (None when not
    counted); peak_mib from peak_bytes."""
    return {
        "op": op, "shape": dict(shape), "provider": provider,
        "p20_ms": _r(timing.p20 * 1e3), "p50_ms": _r(timing.p50 * 1e3),
        "p80_ms": _r(timing.p80 * 1e3),
        "tflops": None if flops is None else _r(flops / timing.p50 / 1e12),
        "gbps": None if nbytes is None else _r(nbytes / timing.p50 / 1e9),
        "peak_mib": None if peak_bytes is None else _r(peak_bytes / 2**20),
        "device": device_name(device), "torch": torch.__version__, "git": git_rev(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def check_row(row: dict) -> list[str]:
    """What is wrong with a row against the schema (empty when it conforms)."""
    errors = []
    if set(row) != set(ROW_KEYS):
        errors.append(f"keys {sorted(set(row) ^ set(ROW_KEYS))} differ from the schema")
    for key, types in ROW_SCHEMA.items():
        if key in row and not isinstance(row[key], types):
            errors.append(f"{key}={row[key]!r} is not {'/'.join(t.__name__ for t in types)}")
    shape = row.get("shape")
    if isinstance(shape, dict):
        if "dtype" not in shape:
            errors.append("shape has no dtype")
        bad = {k: v for k, v in shape.items() if not isinstance(v, SHAPE_VALUE_TYPES)}
        if bad:
            errors.append(f"shape values not scalars: {bad}")
    return errors


def write_rows(rows: list[dict], path: str | None = None) -> list[dict]:
    """The single writer: appends schema rows to DLMKERN_BENCH_RESULTS (default
    bench/results/results.jsonl); refuses a row that does not conform."""
    for row in rows:
        errors = check_row(row)
        if errors:
            raise ValueError(f"bench row does not fit the schema: {errors}: {row}")
    path = path or os.environ.get("DLMKERN_BENCH_RESULTS", RESULTS)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps({k: row[k] for k in ROW_KEYS}) + "\n")
    return rows


def describe(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


def report(rows: list[dict], args, unit: tuple[str, float] | None = None,
           new: list[dict] | None = None) -> list[dict]:
    """Prints one (op, shape)'s providers side by side (p20/p50/p80, TFLOP/s, GB/s, peak MiB,
    time ratio vs dlmkern) and writes the rows unless --no-save. unit=(name, amount) adds a
    throughput column, amount per p50 second (e.g. ("tok/s", generated tokens)). The speed-up
    column is each provider's p50 over dlmkern's: derived here, never stored. Writes `new` (default:
    all of rows; a later provider passes the rows already written plus its own as new)."""
    first = rows[0]
    print(f"{first['op']}  {describe(first['shape'])}  on {first['device']}")
    base = next((r["p50_ms"] for r in rows if r["provider"] == BASELINE), None)
    head = f"  {'provider':<18}{'p20 ms':>11}{'p50 ms':>11}{'p80 ms':>11}"
    head += f"{'TFLOP/s':>10}{'GB/s':>9}{'peak MiB':>10}"
    head += f"{unit[0]:>11}" if unit else ""
    print(head + f"  {BASELINE} speed-up")

    def num(x, width, fmt):
        return f"{'-':>{width}}" if x is None else f"{x:>{width}{fmt}}"

    for r in rows:
        line = (f"  {r['provider']:<18}{num(r['p20_ms'], 11, '.3f')}{num(r['p50_ms'], 11, '.3f')}"
                f"{num(r['p80_ms'], 11, '.3f')}{num(r['tflops'], 10, '.3g')}"
                f"{num(r['gbps'], 9, '.4g')}{num(r['peak_mib'], 10, '.1f')}")
        if unit:
            line += num(unit[1] / (r["p50_ms"] / 1e3), 11, ".5g")
        ratio = None if base is None else r["p50_ms"] / base
        line += "  " + ("-" if ratio is None else f"{ratio:.2f}x")
        print(line)
    if not args.no_save:
        write_rows(rows if new is None else new)
    return rows


# ---------------------------------------------------------------- models for end-to-end benches

MODEL_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
              "num_kv_heads", "head_dim", "block_size")


def optimizer_step(opt, loss_fn):
    """run(): one training step (loss_fn(), backward, opt.step()), the thing a step bench times;
    run.loss is loss_fn (to check a path's loss against another's outside the timer)."""
    def run():
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    run.loss = loss_fn
    return run


def sdar_model(c: dict, device: str):
    """A randomly initialised SDAR-architecture model from the MODEL_KEYS of a size set (mask
    token: the last id), in c["dtype"], initialised on the device (a 4B model is slow on CPU)."""
    from dlmkern.models import DiffusionLM, tiny_config

    torch.manual_seed(0)
    kw = {k: c[k] for k in MODEL_KEYS}
    with torch.device(device):
        model = DiffusionLM(tiny_config("sdar", mask_token_id=c["vocab_size"] - 1, **kw))
    return model.to(getattr(torch, c["dtype"]))
