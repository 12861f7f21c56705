"""Layout integrity: whatever cu_seqlens / block / stream / cache_seqlens / cu_seqlens_q hold, the
attention kernels never crash or touch memory outside their tensors. Trusted layouts are
corrupted behind torch's version counter (`.data`, numpy views), before the forward or between
forward and backward, in a subprocess (tests/layout_fuzz_worker.py) so a segfault fails the test
instead of killing pytest. The documented outcomes (README "Layout integrity"):
- CPU kernels: a ValueError naming the argument, raised by the call;
- CUDA kernels (the glue reads no value on the host, eager or in a CUDA-graph capture): bounds
  clamped (the rows of the clamped sequences are exactly the reference on the clamped
  cu_seqlens), and the device error flag names the argument at the next check;
- block ids, and stream ids >= 0, are never invalid: the SPEC rule applies to them as they are."""

import json
import os
import subprocess
import sys

import pytest
from dlmkern import _cuda_emu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMU = pytest.mark.skipif(not _cuda_emu.available(), reason="built without DLMKERN_CUDA_EMU=ON")
# The flag bits of csrc/include/dlmkern/error_flag.h, by the argument they name.
FLAG = {"cu_seqlens": 1, "stream": 2, "cu_seqlens_q": 4, "cache_seqlens": 8 | 16}


def _run(mode, seed, cases):
    proc = subprocess.run([sys.executable, "-m", "tests.layout_fuzz_worker", mode, str(seed),
                           str(cases)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    last = lines[-1]["case"] if lines else "before the first case"
    assert proc.returncode == 0, (f"worker died (rc {proc.returncode}) in: {last}\n"
                                  f"{proc.stderr[-3000:]}")
    done = [x for x in lines if not x.get("start")]
    assert len(done) == cases
    return done


def _check_eager(records):
    """Invalid values raise a ValueError naming the argument; valid ones give the reference."""
    kinds = set()
    for r in records:
        if r["valid"]:
            assert "error" not in r and r["match"], r
        else:
            assert f"`{r['arg']}`" in r.get("error", "") or (
                r["arg"] in ("cache_seqlens", "cu_seqlens_q") and r["arg"] in r.get("error", "")
            ), r
        kinds.add((r["arg"], r["valid"]))
    return kinds


@pytest.mark.parametrize("seed", [0, 1])
def test_cpu_rejects_corrupted_layouts(seed):
    kinds = _check_eager(_run("native", seed, 40))
    assert ("cu_seqlens", False) in kinds and ("block", True) in kinds


@EMU
def test_emulator_check_rejects_corrupted_layouts():
    """Eager CUDA calls raise nothing themselves (no host read per call, #25): the flag check
    after each call raises the ValueError naming the argument."""
    kinds = _check_eager(_run("emu", 2, 24))
    assert ("cu_seqlens", False) in kinds


@EMU
@pytest.mark.parametrize("seed", [3, 4])
def test_emulator_capture_fuzz(seed):
    """No host checks: the kernels clamp, never crash (also under scripts/emu_asan.sh), and set
    the error flag exactly for impossible values."""
    records = _run("capture", seed, 40)
    kinds = set()
    for r in records:
        assert "error" not in r, r  # nothing raises while capturing
        assert r["match"], r  # clamped rows = the reference on the clamped layout; finite grads
        bit = FLAG.get(r["arg"], 0)
        assert bool(r["flag"] & bit) == (not r["valid"]), r
        assert r["flag"] & ~bit == 0, r
        kinds.add((r["arg"], r["valid"]))
    assert {("cu_seqlens", False), ("cache_seqlens", False), ("cu_seqlens_q", False)} <= kinds


@EMU
def test_the_flag_check_rejects_a_flagged_layout():
    import torch
    from dlmkern.ops import block_attention, check_device_errors, check_layout_errors, layouts

    lay = layouts.block_causal([10, 20], 4)
    q = k = v = torch.randn(30, 2, 64, dtype=torch.bfloat16)
    lay.cu_seqlens.numpy()[-1] = 1000  # behind the version counter
    with _cuda_emu.emulated_cuda(capturing=True):
        block_attention(q, k, v, lay)  # clamps to [0, 30], flags
    with _cuda_emu.emulated_cuda(), pytest.raises(ValueError, match=r"`cu_seqlens`"):
        check_device_errors()  # what a trainer calls once per step, where it syncs anyway
    with _cuda_emu.emulated_cuda():
        check_device_errors()  # read and cleared: nothing left
        block_attention(q, k, v, lay)  # eager: no host read either, flags again
        block_attention(q, k, v, layouts.block_causal([10, 20], 4))  # a good call: no raise
    with _cuda_emu.emulated_cuda(), pytest.raises(ValueError, match=r"earlier .*`cu_seqlens`"):
        check_layout_errors()  # the former name
    with _cuda_emu.emulated_cuda():
        check_device_errors()  # read and cleared
