"""DiffusionLM.prefill (issue #25 item 6): every prompt's k / v written into its cache row by one
scatter per layer, from slots computed once on the host; nothing read from the device (given
host offsets), and a number of device ops that does not grow with the number of prompts."""

import pytest
import torch
from dlmkern.models import DiffusionLM, tiny_config
from dlmkern.models.transformer import KVCache
from dlmkern.ops import layouts
from torch.utils._python_dispatch import TorchDispatchMode

PROMPTS = [8, 0, 13, 4]  # an empty prompt, one ending mid-block


def _model(family, device="cpu", **kw):
    torch.manual_seed(0)
    return DiffusionLM(tiny_config(family, **kw)).eval().to(device)


@pytest.mark.parametrize("family", ["sdar", "llada", "dream"])
@pytest.mark.parametrize("offsets", ["list", "cpu tensor"])
def test_each_prompt_fills_its_row_as_if_alone(family, offsets):
    m = _model(family)
    ids = torch.randint(0, 62, (sum(PROMPTS),), generator=torch.Generator().manual_seed(1))
    cu = layouts.offsets(PROMPTS)
    cache = KVCache.empty(m.config, len(PROMPTS) + 1, 20, "cpu", torch.float32)
    arg = cu if offsets == "list" else torch.tensor(cu, dtype=torch.int32)
    h = m.prefill(ids, arg, cache)
    for i, n in enumerate(PROMPTS):
        alone = KVCache.empty(m.config, 1, 20, "cpu", torch.float32)
        h1 = m.prefill(ids[cu[i]:cu[i + 1]], [0, n], alone)
        torch.testing.assert_close(h[cu[i]:cu[i + 1]], h1, atol=1e-5, rtol=1e-5)
        for layer in range(m.config.num_layers):
            assert cache.seqlens[layer][i] == n
            for mine, ref in ((cache.k, alone.k), (cache.v, alone.v)):
                torch.testing.assert_close(mine[layer][i, :n], ref[layer][0, :n], atol=1e-5,
                                           rtol=1e-5)
                assert not mine[layer][i, n:].any()  # nothing past the prompt
    for layer in range(m.config.num_layers):  # the spare row is left alone
        assert cache.seqlens[layer][-1] == 0 and not cache.k[layer][-1].any()


def test_prefill_refills_rows_that_held_an_earlier_prompt():
    m = _model("sdar")
    ids = torch.randint(0, 62, (12,), generator=torch.Generator().manual_seed(2))
    fresh = KVCache.empty(m.config, 3, 16, "cpu", torch.float32)
    used = KVCache.empty(m.config, 3, 16, "cpu", torch.float32)
    m.prefill(torch.randint(0, 62, (30,)), [0, 16, 30], used)
    for c in (fresh, used):
        m.prefill(ids, [0, 5, 12], c)
    for layer in range(m.config.num_layers):
        assert used.seqlens[layer].tolist() == [5, 7, 0]
        for i, n in enumerate([5, 7]):
            torch.testing.assert_close(used.k[layer][i, :n], fresh.k[layer][i, :n])


def test_bad_offsets_raise_naming_them():
    m = _model("sdar")
    cache = KVCache.empty(m.config, 2, 8, "cpu", torch.float32)
    ids = torch.zeros(10, dtype=torch.long)
    with pytest.raises(ValueError, match=r"`cu_seqlens` must rise from 0 to the 10 tokens"):
        m.prefill(ids, [0, 4, 9], cache)
    with pytest.raises(ValueError, match=r"`cu_seqlens` must rise"):
        m.prefill(ids, [0, 6, 4, 10], cache)
    with pytest.raises(ValueError, match=r"3 prompts of up to 4 tokens do not fit a cache of 2"):
        m.prefill(ids, [0, 3, 6, 10], cache)
    with pytest.raises(ValueError, match=r"up to 9 tokens do not fit a cache of 2 rows x 8"):
        m.prefill(ids, [0, 9, 10], cache)


class _DeviceOps(TorchDispatchMode):
    """Counts the ops that touch a meta tensor (the 'device'); host bookkeeping is not counted."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = torch.utils._pytree.tree_leaves((args, kwargs))
        self.calls += any(isinstance(t, torch.Tensor) and t.is_meta for t in flat)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("num_layers", [2, 4])
def test_prefill_reads_nothing_and_its_device_ops_do_not_grow_with_prompts(num_layers):
    """On the meta device (no data: any read back would fail) with host offsets; before #25 each
    layer read cu_seqlens back and copied each prompt on its own."""
    m = _model("sdar", "meta", num_layers=num_layers)
    counts = []
    for prompts in ([8, 4], [8, 4, 12, 0, 4, 16, 8, 4]):
        cache = KVCache.empty(m.config, len(prompts), 32, "meta", torch.float32)
        ids = torch.zeros(sum(prompts), dtype=torch.long, device="meta")
        with _DeviceOps() as ops:
            m.prefill(ids, layouts.offsets(prompts), cache)
        counts.append(ops.calls)
    assert counts[0] == counts[1], counts
