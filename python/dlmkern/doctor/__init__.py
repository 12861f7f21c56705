"""`dlmkern doctor` (also ``python -m dlmkern.doctor``): checks an install on the device it finds.

Prints the build, then a PASS / FAIL table: every op against its pure-torch reference (forward
and backward, each dtype the device's kernels take, GQA, head dims 64 and 128, decode with
commit), the CUDA-graph sampler against the eager one, and a few steps of each trainer on tiny
models with a save + resume round trip. Exits non-zero when any check fails."""

from __future__ import annotations

import json
import math
import sys
import time
import traceback
from dataclasses import asdict, dataclass

import torch


@dataclass
class Check:
    name: str
    device: str
    dtype: str
    measured: float | None   # max abs error against the reference (trainers: the largest |loss|)
    ratio: float | None      # measured / tolerance (error checks); the check passes at <= 1
    ok: bool
    seconds: float
    detail: str = ""


def _run_one(name: str, device: str, dtype: str, thunk, verbose: bool = False) -> Check:
    t0 = time.perf_counter()
    try:
        measured, ratio = thunk()
        ok = math.isfinite(measured) and math.isfinite(ratio) and ratio <= 1.0
        detail = "" if ok else "outside tolerance"
    except Exception as e:  # a check that raises fails; the others still run
        measured = ratio = None
        ok, detail = False, f"{type(e).__name__}: {e}".splitlines()[0][:200]
        if verbose:
            traceback.print_exc()
    if device == "cuda":
        torch.cuda.synchronize()
    return Check(name, device, dtype, measured, ratio, ok, time.perf_counter() - t0, detail)


def _plan(device: str, only: str):
    from dlmkern.doctor import e2e_checks, ops_checks

    plan = []
    if only in ("all", "ops"):
        plan += [(n, str(dt).replace("torch.", ""), f) for n, dt, f in ops_checks.cases(device)]
    if only in ("all", "e2e"):
        dt = "bfloat16" if device == "cuda" else "float32"
        plan += [(n, dt, lambda f=f: f(device)) for n, f in e2e_checks.cases(device)]
    return plan


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def print_table(checks: list[Check], out=None) -> None:
    out = out or sys.stdout
    w = max(len(c.name) for c in checks)
    print(f"{'check':<{w}}  {'dtype':<8}  {'measured':>9}  {'/tol':>8}  {'time':>6}  result",
          file=out)
    for c in checks:
        res = "PASS" if c.ok else f"FAIL {c.detail}"
        print(f"{c.name:<{w}}  {c.dtype:<8}  {_fmt(c.measured):>9}  {_fmt(c.ratio):>8}  "
              f"{c.seconds:5.1f}s  {res}", file=out, flush=True)


def run(device: str | None = None, only: str = "all", json_path: str | None = None,
        verbose: bool = False) -> int:
    """Runs the checks; returns the process exit code (0: every check passed)."""
    import dlmkern

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    info = dlmkern.build_info()
    print("dlmkern doctor")
    for k, v in info.items():
        print(f"  {k}: {v}")
    if device == "cuda":
        if not torch.cuda.is_available():
            print("FAIL: --device cuda but torch sees no GPU")
            return 2
        print(f"  device: {torch.cuda.get_device_name()}")
        if not info.get("cuda_kernels_registered"):
            print("FAIL: this build has no CUDA kernels (rebuild with DLMKERN_CUDA=ON)")
            return 2
    t0 = time.perf_counter()
    checks = []
    for name, dtype, thunk in _plan(device, only):
        checks.append(_run_one(name, device, dtype, thunk, verbose))
    print()
    print_table(checks)
    failed = [c for c in checks if not c.ok]
    print(f"\n{len(checks) - len(failed)} passed, {len(failed)} failed "
          f"({time.perf_counter() - t0:.0f} s on {device})")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"build": info, "device": device, "passed": not failed,
                       "checks": [asdict(c) for c in checks]}, f, indent=1, default=str)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    from dlmkern.cli import main as cli_main

    return cli_main(["doctor", *(sys.argv[1:] if argv is None else argv)])
