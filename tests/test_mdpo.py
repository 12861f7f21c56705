"""MDPO (He et al. 2025, "MDPO: Overcoming the Training-Inference Divide of Masked Diffusion
Language Models"; DARE's verl/trainer/ppo/mdpo_algos.py): the sampler's per-step decoded
completions, step-level rewards and advantages, and the per-step loss, each checked against a
computation written here."""

import pytest
import torch
from dlmkern.data import CharTokenizer
from dlmkern.models import DiffusionLM, tiny_config
from dlmkern.ops import layouts
from dlmkern.sampling import FullSampler, SamplingConfig

TOK = CharTokenizer()


def _llada(seed=0):
    torch.manual_seed(seed)
    return DiffusionLM(tiny_config("llada", vocab_size=TOK.vocab_size,
                                   mask_token_id=TOK.mask_token_id))


def _replay(model, prompt, traj, gen_length, k):
    """The completion decoded from step k's state, recomputed: the canvas with the tokens
    committed before step k, one forward, the argmax (never the mask) at every masked place."""
    mask = TOK.mask_token_id
    resp = [t if s < k else mask for t, s in zip(traj.token_ids, traj.step_map, strict=True)]
    resp += [mask] * (gen_length - len(resp))
    ids = torch.tensor(prompt + resp)
    lay = layouts.full([len(ids)])
    with torch.no_grad():
        h = model.prediction_hidden(model(ids, lay), lay.cu_seqlens)
        lg = model.logits(h[len(prompt):])
    lg[:, mask] = float("-inf")
    return torch.where(torch.tensor(resp) == mask, lg.argmax(-1), torch.tensor(resp)).tolist()


@pytest.mark.parametrize("block_length", [8, 4])
def test_recorded_predictions_equal_a_step_by_step_replay(block_length):
    m = _llada()
    prompts = [TOK.encode("1+2="), TOK.encode("33+4=")]
    cfg = SamplingConfig(rule="static", steps=2, temperature=0)
    s = FullSampler(m, cfg, gen_length=8, block_length=block_length, record_predictions=True)
    trajs = s.generate(prompts, n_samples=2, seed=3)
    plain = FullSampler(m, cfg, gen_length=8, block_length=block_length).generate(
        prompts, n_samples=2, seed=3)
    for t, p in zip(trajs, plain, strict=True):
        assert (t.token_ids, t.step_map) == (p.token_ids, p.step_map)  # recording changes nothing
        assert p.step_predictions == []                                # and is off by default
        assert len(t.step_predictions) == max(t.step_map) + 1
        for k, pred in enumerate(t.step_predictions):
            assert pred == _replay(m, t.prompt_ids, t, 8, k)
        assert t.step_predictions[-1] == t.token_ids


def test_sampled_predictions_commit_what_the_step_commits():
    m = _llada(1)
    cfg = SamplingConfig(rule="static", steps=4, temperature=1.0)
    s = FullSampler(m, cfg, gen_length=8, block_length=4, record_predictions=True)
    for t in s.generate([TOK.encode("5+5=")], n_samples=3, seed=0):
        for k, pred in enumerate(t.step_predictions):
            for j, st in enumerate(t.step_map):
                if st <= k:  # committed at or before step k: the recorded token is the final one
                    assert pred[j] == t.token_ids[j]


def test_recording_refuses_the_prefix_cache_and_guidance():
    m = _llada()
    with pytest.raises(ValueError, match="record_predictions needs use_cache=False"):
        FullSampler(m, gen_length=8, block_length=4, use_cache=True, record_predictions=True)
    with pytest.raises(ValueError, match="cfg_scale=0"):
        FullSampler(m, SamplingConfig(cfg_scale=1.0), gen_length=8, block_length=4,
                    record_predictions=True)
