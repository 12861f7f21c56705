"""Subprocess worker of tests/test_layout_fuzz.py (a crash here is a failed test there, not a dead
pytest). Usage: python -m tests.layout_fuzz_worker MODE SEED CASES, MODE one of
  native   CPU kernels, eager (they check on the host and raise);
  emu      the CUDA kernels on the emulator, eager: the call reads nothing on the host, the flag
           check after it (check_device_errors) raises naming the argument;
  capture  the emulator with a CUDA-graph capture reported: the kernels' own clamps and error
           flag, whose bits are recorded; nothing here raises, so ASan can watch it.
Each case builds a trusted layout, corrupts it behind the version counter (through `.data` or a
numpy view) before the forward or between forward and backward, runs the op and prints one JSON
line: {"case", "arg", "valid", "error", "flag", "match"}. The line naming the case is printed and
flushed before the op runs, so a crash leaves the culprit as the last line."""

from __future__ import annotations

import contextlib
import json
import random
import sys

import torch
from dlmkern import _cuda_emu
from dlmkern.ops import block_attention, check_device_errors, decode_attention, layouts
from dlmkern.ops import reference as ref

I32_MAX, I32_MIN = 2**31 - 1, -(2**31)


_last: dict = {}  # the case in flight


def _start(rec):
    """Prints the case before running it (the last line if it crashes) and remembers it."""
    _last.clear()
    _last.update(rec)
    print(json.dumps(dict(rec, start=True)), flush=True)


def _cu_corruptions(rng, n):
    """(description, fn(values list) -> None) corrupting a cu_seqlens-like list in place."""
    i = rng.randrange(1, n)
    return [
        ("last past T", lambda c: c.__setitem__(-1, c[-1] + rng.randint(1, 300))),
        ("last short of T", lambda c: c.__setitem__(-1, rng.randint(0, max(c[-1] - 1, 0)))),
        ("negative", lambda c: c.__setitem__(i, -rng.randint(1, 1000))),
        ("decreasing", lambda c: c.__setitem__(i, c[min(i + 1, n - 1)] + rng.randint(1, 90))),
        ("first nonzero", lambda c: c.__setitem__(0, rng.randint(1, 40))),
        ("extreme", lambda c: c.__setitem__(i, rng.choice([I32_MAX, I32_MIN]))),
    ]


def _write(t, values, how):
    """Writes values into t without bumping its version counter (what the trust cannot see)."""
    if how == "numpy":
        t.numpy()[:] = values
    else:
        t.data.copy_(torch.tensor(values, dtype=t.dtype))


def _cu_valid(cu, T):
    return cu[0] == 0 and cu[-1] == T and all(a <= b for a, b in zip(cu, cu[1:], strict=False))


def _clamped(cu, T):
    out, run = [], I32_MIN
    for c in cu:
        run = max(run, c)
        out.append(min(max(run, 0), T))
    return out


def _attention_case(rng, mode, phase):
    lay = layouts.bd3([rng.randint(1, 40), rng.randint(1, 40)], rng.choice([1, 4, 16]))
    T = lay.num_tokens
    dtype = torch.float32 if mode == "native" else torch.bfloat16
    q, k, v = (torch.randn(T, 2, 64).to(dtype).requires_grad_() for _ in range(3))
    arg = rng.choice(["cu_seqlens", "cu_seqlens", "stream", "block"])
    t = getattr(lay, arg)
    vals = t.tolist()
    if arg == "cu_seqlens":
        desc, fn = rng.choice(_cu_corruptions(rng, len(vals)))
        fn(vals)
    else:
        idx = rng.sample(range(T), min(T, rng.randint(1, 5)))
        lo = -5 if arg == "stream" and rng.random() < 0.5 else 0
        for j in idx:
            vals[j] = rng.choice([rng.randint(lo, 6), rng.randint(I32_MIN if arg == "block" else lo,
                                                                  I32_MAX)])
        desc = f"values at {idx}"
    how = rng.choice(["data", "numpy"])
    cu = vals if arg == "cu_seqlens" else lay.cu_seqlens.tolist()
    stream = vals if arg == "stream" else lay.stream.tolist()
    valid = _cu_valid(cu, T) and min(stream) >= 0
    rec = dict(case=f"block_attention {phase} {arg} {desc} via {how}", arg=arg, valid=valid)
    _start(rec)
    if phase == "backward":
        out, _ = block_attention(q, k, v, lay)
        _write(t, vals, how)
        out.float().sum().backward()
        # invalid values: the rows outside the clamped sequences are not written (undefined)
        rec["match"] = not valid or all(bool(torch.isfinite(x.grad).all()) for x in (q, k, v))
        return rec
    _write(t, vals, how)
    out, _ = block_attention(q, k, v, lay)
    cc = _clamped(cu, T)  # the bounds the CUDA kernels use; equal to cu when valid
    r, _ = ref.block_attention(q.detach().float(), k.detach().float(), v.detach().float(),
                               torch.tensor(cc, dtype=torch.int32), lay.block, lay.stream)
    rows = slice(cc[0], cc[-1])  # rows outside every (clamped) sequence are not written
    rec["match"] = bool(torch.allclose(out[rows].float(), r[rows], atol=3e-2, rtol=3e-2))
    return rec


def _decode_case(rng, mode):
    S, max_len = 2, 24
    lens = [rng.randint(0, 12), rng.randint(0, 12)]
    cu = [0, 3, 3 + rng.randint(1, 5)]
    T = cu[-1]
    arg = rng.choice(["cache_seqlens", "cu_seqlens_q"])
    if arg == "cache_seqlens":
        i = rng.randrange(S)
        lens[i] = rng.choice([-rng.randint(1, 100), max_len + rng.randint(1, 100),
                              max_len - rng.randint(0, 2), I32_MIN, I32_MAX])
        desc = f"[{i}] = {lens[i]}"
    else:
        desc, fn = rng.choice(_cu_corruptions(rng, len(cu)))
        fn(cu)
    commit = rng.random() < 0.5
    dtype = torch.float32 if mode == "native" else torch.bfloat16
    q, kn, vn = (torch.randn(T, h, 64).to(dtype) for h in (2, 1, 1))
    kc, vc = (torch.randn(S, max_len, 1, 64).to(dtype) for _ in range(2))
    blk = [b - a for a, b in zip(cu, cu[1:], strict=False)]
    valid = (_cu_valid(cu, T) and all(0 <= n <= max_len for n in lens) and
             (not commit or all(n + b <= max_len for n, b in zip(lens, blk, strict=True))))
    rec = dict(case=f"decode_attention commit={commit} {arg} {desc}", arg=arg, valid=valid)
    _start(rec)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    out = decode_attention(q, kn, vn, kc, vc, lens_t, torch.tensor(cu, dtype=torch.int32),
                           commit=commit)
    rec["match"] = bool(torch.isfinite(out).all()) if valid else True
    return rec


def main(mode, seed, cases):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    scope = {"native": contextlib.nullcontext(), "emu": _cuda_emu.emulated_cuda(),
             "capture": _cuda_emu.emulated_cuda(capturing=True)}[mode]
    with scope:
        for _ in range(cases):
            kind = rng.choice(["forward", "forward", "backward", "decode"])
            rec = None
            try:
                rec = (_decode_case(rng, mode) if kind == "decode" else
                       _attention_case(rng, mode, kind))
                if mode == "emu":
                    check_device_errors()  # where a sampler block / training step reads it
            except ValueError as e:  # never raised in capture mode (ASan cannot watch a throw)
                rec = dict(_last, **(rec or {}), error=str(e).split("\n")[0])
            if mode == "capture":
                rec["flag"] = int(torch.ops.dlmkern_emu._device_errors(torch.device("cpu")))
            print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
