"""The CUDA glue reads no argument value on the host (issue #25 item 6: each read is a device
sync, per call and per layer): counted on the CUDA emulator, where the glue runs on the CPU,
through the C++ counter every host read of the op drivers goes through. Impossible values are
checked on the device instead and reported, naming the argument, by check_device_errors (one
read). The CPU kernels keep checking on the host and raising at once."""

import pytest
import torch
from dlmkern import _cuda_emu
from dlmkern.ops import (
    block_attention,
    check_device_errors,
    decode_attention,
    layouts,
    logprobs_from_logits,
    masked_logprobs,
    policy_value_loss,
)

pytestmark = pytest.mark.skipif(not _cuda_emu.available(),
                                reason="dlmkern built without DLMKERN_CUDA_EMU=ON")

emu = _cuda_emu.emulated_cuda
CPU = torch.device("cpu")


def _reads():
    return torch.ops.dlmkern_emu._host_reads()


def _decode(S, lens=None, nq=4, max_len=32):
    g = torch.Generator().manual_seed(S)
    q = torch.randn(S * nq, 2, 64, generator=g).bfloat16()
    kn, vn = (torch.randn(S * nq, 1, 64, generator=g).bfloat16() for _ in range(2))
    kc, vc = (torch.randn(S, max_len, 1, 64, generator=g).bfloat16() for _ in range(2))
    lens = torch.tensor(lens if lens is not None else [5] * S, dtype=torch.int32)
    cu = torch.arange(0, S * nq + 1, nq, dtype=torch.int32)
    return q, kn, vn, kc, vc, lens, cu


def _untrusted(lay):
    """The layout's values in tensors nobody validated (no builder's once-per-layout check)."""
    return layouts.Layout(lay.block.clone(), lay.stream.clone(), lay.position_ids,
                          lay.cu_seqlens.clone(), lay.max_seqlen)


def _block_fwd_bwd(S, lay=None):
    lay = lay if lay is not None else _untrusted(layouts.bd3([12] * S, 4))
    q = torch.randn(lay.num_tokens, 2, 64).bfloat16().requires_grad_()
    out, _ = block_attention(q, q, q, lay)
    out.float().sum().backward()


def _logprobs(n, targets=None, rows=None):
    h = torch.randn(n, 32).requires_grad_()
    w = torch.randn(300, 32)
    t = targets if targets is not None else torch.randint(0, 300, (n,))
    rows = rows if rows is not None else torch.arange(0, n, 2)
    lp = masked_logprobs(h, w, t, rows=rows)
    lp.sum().backward()
    return lp


def _pv(n, seq_ids=None):
    lp = torch.randn(n).requires_grad_()
    seq_ids = seq_ids if seq_ids is not None else torch.arange(n) % 4
    loss, _ = policy_value_loss(lp, lp.detach() + 0.1, torch.randn(n), torch.ones(n, dtype=bool),
                                reduction="seq_mean", seq_ids=seq_ids, num_seqs=4)
    loss.backward()
    return loss


CALLS = {
    "decode_attention": lambda S: decode_attention(*_decode(S), commit=True),
    "block_attention fwd+bwd": _block_fwd_bwd,
    "masked_logprobs fwd+bwd": lambda S: _logprobs(8 * S),
    "logprobs_from_logits": lambda S: logprobs_from_logits(torch.randn(S, 50),
                                                           torch.randint(0, 50, (S,))),
    "policy_value_loss fwd+bwd": lambda S: _pv(16 * S),
}


@pytest.mark.parametrize("op", list(CALLS))
@pytest.mark.parametrize("capturing", [False, True])
def test_cuda_glue_reads_nothing_on_the_host_whatever_the_sequences(op, capturing):
    # Before #25: decode_attention did 3 copies to the host + 3 S item() calls, block_attention
    # (layout not validated at build) 3 reads each way, masked_logprobs 2 each way.
    with emu(capturing=capturing):
        check_device_errors()  # start clean
        for S in (1, 8, 64):
            before = _reads()
            CALLS[op](S)
            assert _reads() == before, (op, S)
        check_device_errors()  # valid values: nothing flagged


def test_the_flag_is_read_once_per_check():
    with emu():
        _block_fwd_bwd(2)
        before = _reads()
        check_device_errors()
        assert _reads() == before + 1


@pytest.mark.parametrize("case, exc, match", [
    ("decode cache_seqlens", ValueError, r"a `cache_seqlens` entry was outside \[0, max_len\]"),
    ("decode cu_seqlens_q", ValueError, r"`cu_seqlens_q` was not 0 = c0"),
    ("block cu_seqlens", ValueError, r"`cu_seqlens` was not 0 = c0"),
    ("block stream", ValueError, r"a `stream` id was negative"),
    ("targets", IndexError, r"a `targets` entry was outside \[0, V\)"),
    ("rows", IndexError, r"a `rows` index was outside \[0, N\)"),
    ("seq_ids", IndexError, r"`seq_ids` entry was outside \[0, num_seqs\)"),
])
def test_bad_values_are_reported_at_the_next_check(case, exc, match):
    with emu():
        check_device_errors()
        before = _reads()
        if case.startswith("decode"):
            args = list(_decode(3, lens=[5, -4 if "cache" in case else 5, 5]))
            if "cu_seqlens_q" in case:
                args[6][1] = 9  # decreasing
            out = decode_attention(*args)
            assert torch.isfinite(out.float()).all()
        elif case.startswith("block"):
            lay = _untrusted(layouts.bd3([12, 12], 4))
            if "stream" in case:
                lay.stream[3] = -2
            else:
                lay.cu_seqlens[-1] = 1000
            _block_fwd_bwd(2, lay)
        elif case == "targets":
            t = torch.randint(0, 300, (16,))
            t[5] = 300
            _logprobs(16, targets=t)
        elif case == "rows":
            lp = _logprobs(16, rows=torch.tensor([0, 16, -3, 7]))  # clamped: never out of bounds
            assert torch.isfinite(lp).all()
        else:
            assert torch.isnan(_pv(64, seq_ids=torch.arange(64) % 5))
        assert _reads() == before  # nothing raised or read during the call
        with pytest.raises(exc, match=match):
            check_device_errors()
        check_device_errors()  # read and cleared


def test_index_and_value_errors_together_raise_a_value_error_naming_both():
    with emu():
        t = torch.zeros(4, dtype=torch.long)
        t[1] = -5
        _logprobs(4, targets=t)
        decode_attention(*_decode(2, lens=[99, 1]))
        with pytest.raises(ValueError, match=r"`cache_seqlens`.*`targets`"):
            check_device_errors()


def test_cpu_kernels_still_raise_at_once():
    t = torch.randint(0, 300, (8,))
    t[2] = 300
    with pytest.raises(IndexError, match=r"targets\[2\] = 300"):
        masked_logprobs(torch.randn(8, 32), torch.randn(300, 32), t)
    q, kn, vn, kc, vc, lens, cu = (x.float() if x.is_floating_point() else x
                                   for x in _decode(2, lens=[40, 1]))
    with pytest.raises(ValueError, match=r"cache_seqlens\[0\] = 40 is outside \[0, 32\]"):
        decode_attention(q, kn, vn, kc, vc, lens, cu)
    check_device_errors()  # the CPU kernels never set a flag
