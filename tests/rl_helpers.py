"""Test configs for the RL trainers: a preset with overrides, sampling keys routed to its nested
SamplingConfig (``steps_per_block`` is SamplingConfig.steps)."""

import dataclasses

from dlmkern.sampling import SamplingConfig
from dlmkern.trainers import TraceRLConfig

SAMPLING = {f.name for f in dataclasses.fields(SamplingConfig)}


def rl_config(preset=TraceRLConfig, **kw):
    sampling = {("steps" if k == "steps_per_block" else k): kw.pop(k)
                for k in list(kw) if k in SAMPLING or k == "steps_per_block"}
    return preset(**kw, sampling=SamplingConfig(**sampling))
