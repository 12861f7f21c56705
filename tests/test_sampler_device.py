"""The samplers' CUDA streams, events and graphs live on the model's device (issue 25 item 7).

A model on cuda:1 with cuda:0 current made its side stream, its capture stream and its "block
done" event on cuda:0: the graph captured none of the model's kernels (they run on cuda:1's
stream) and the event never waited for the flag's copy, so a block could be committed masked.

No GPU here: torch.cuda's stream, event and graph API is replaced by fakes that follow CUDA's
rules (a stream or event without a device is made on the current device; torch.cuda.stream(s)
makes s's device current; a capture records only kernels launched on its stream's device)."""

from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from dlmkern.models import DiffusionLM, tiny_config
from dlmkern.sampling import BlockSampler, SamplingConfig
from dlmkern.sampling import block as block_mod

CUDA0, CUDA1 = torch.device("cuda", 0), torch.device("cuda", 1)


class FakeCuda:
    """torch.cuda's device / stream / event / graph calls, on a pretend machine of two GPUs."""

    def __init__(self):
        self.current = CUDA0       # the current device
        self.stream = None         # the stream made current by torch.cuda.stream
        self.capture = None        # (graph, capture stream) while capturing
        self.default_capture = None  # torch.cuda.graph's own stream, made on first use
        self.pinned_on = []        # current device at each pinned allocation
        fake = self

        class Stream:
            def __init__(self, device=None, priority=0):
                self.device = torch.device(device) if device is not None else fake.current

            def wait_stream(self, other):
                pass

        class Event:
            def __init__(self, *a, **k):
                self.recorded_on = None

            def record(self, stream=None):
                self.recorded_on = (stream or fake.current_stream()).device

            def synchronize(self):
                pass

        class CUDAGraph:
            def __init__(self):
                self.kernels, self.replays, self.capture_device = [], [], None

            def replay(self):
                self.replays.append(fake.current)

            def pool(self):
                return ("pool", id(self))

        self.Stream, self.Event, self.CUDAGraph = Stream, Event, CUDAGraph

    def current_stream(self, device=None):
        d = torch.device(device) if device is not None else self.current
        if self.stream is not None and self.stream.device == d:
            return self.stream
        return self.Stream(d)

    @contextmanager
    def device(self, d):
        old, self.current = self.current, torch.device(d)
        try:
            yield
        finally:
            self.current = old

    @contextmanager
    def stream_ctx(self, s):
        old = self.current, self.stream
        self.current, self.stream = s.device, s
        try:
            yield
        finally:
            self.current, self.stream = old

    @contextmanager
    def graph(self, g, pool=None, stream=None, **kw):
        if stream is None:
            if self.default_capture is None:
                self.default_capture = self.Stream()
            stream = self.default_capture
        g.capture_device = stream.device
        self.capture = (g, stream)
        try:
            with self.stream_ctx(stream):
                yield
        finally:
            self.capture = None

    def launch(self, device):
        """A kernel on `device`: on that device's current stream (the capture's, if it is it)."""
        s = self.current_stream(device)
        if self.capture is not None and self.capture[1] is s:
            self.capture[0].kernels.append(device)
            return "captured"
        return "ran"

    def install(self, monkeypatch):
        for name, value in (("Stream", self.Stream), ("Event", self.Event),
                            ("CUDAGraph", self.CUDAGraph), ("current_stream", self.current_stream),
                            ("device", self.device), ("stream", self.stream_ctx),
                            ("graph", self.graph)):
            monkeypatch.setattr(torch.cuda, name, value)
        real_empty = torch.empty

        def empty(*shape, pin_memory=False, **kw):  # pinned memory needs a driver: plain here
            if pin_memory:
                self.pinned_on.append(self.current)
            return real_empty(*shape, **kw)

        monkeypatch.setattr(torch, "empty", empty)


def test_step_runner_captures_on_the_models_device(monkeypatch):
    fake = FakeCuda()
    fake.install(monkeypatch)
    steps = []

    class Sampler:  # BlockSampler.step's part here: its kernels run on the state's device
        def step(self, st, cache):
            steps.append(fake.launch(st.tokens.device))

    st = SimpleNamespace(tokens=SimpleNamespace(device=CUDA1), slots=torch.zeros(6))
    run = block_mod._StepRunner(Sampler(), cache=None, graphs=True)
    run(st)  # warm-up (the real step) then capture
    graph = run._graphs[6]
    assert steps == ["ran", "captured"]
    assert graph.capture_device == CUDA1 and graph.kernels == [CUDA1]
    assert run._stream.device == CUDA1
    run(st)  # replay, with cuda:1 current
    assert graph.replays == [CUDA1] and steps == ["ran", "captured"]
    assert fake.current == CUDA0  # the caller's current device is left as it was


def test_block_done_event_waits_on_the_flags_device(monkeypatch):
    fake = FakeCuda()
    fake.install(monkeypatch)

    class Masked:  # a [S, B] mask on cuda:1 (its values live on the CPU here)
        device = CUDA1

        def __init__(self, values):
            self.values = torch.tensor(values)

        def any(self):
            return self.values.any()

    pending, finished = block_mod.lagged_all_done(Masked([[True, False]]), None)
    event, host = pending
    assert not finished and event.recorded_on == CUDA1 and fake.pinned_on == [CUDA1]
    assert bool(host) is False
    pending, finished = block_mod.lagged_all_done(Masked([[False, False]]), pending)
    assert finished is False  # lags a step: the flag read is the previous step's
    _, finished = block_mod.lagged_all_done(Masked([[False, False]]), pending)
    assert finished is True and fake.current == CUDA0


@pytest.mark.cuda
def test_cuda_graph_sampler_on_a_second_gpu_equals_eager():
    """Two GPUs: a model on cuda:1 with cuda:0 current samples the same tokens with and without
    CUDA graphs, and no generated token is left [MASK]."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    torch.manual_seed(0)
    gpu = DiffusionLM(tiny_config("sdar", head_dim=64, hidden_size=128)).to("cuda:1")
    gpu = gpu.to(torch.bfloat16).eval()
    torch.cuda.set_device(0)
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11]]
    for rule in ("static", "dynamic"):
        cfg = SamplingConfig(rule=rule, steps=2, temperature=1.0, threshold=0.05)
        runs = [BlockSampler(gpu, cfg, max_new_tokens=13, cuda_graphs=g).generate(
            prompts, n_samples=2, seed=1) for g in (True, False)]
        for a, b in zip(*runs, strict=True):
            assert a.token_ids == b.token_ids and a.step_map == b.step_map
            assert gpu.config.mask_token_id not in a.token_ids
