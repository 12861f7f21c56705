"""The loss scores the policy the sampler drew from (issue #28 item 4): at sampling temperature T
the trainer's old / new / reference log-probs are log_softmax(logits / T), as the sampler's are;
a sampling setting whose distribution the loss cannot score (greedy, top-k, top-p) is refused at
config time, naming the key."""

import pytest
import torch
from dlmkern import TraceRL, demo
from dlmkern.data import CharTokenizer
from dlmkern.models import DiffusionLM, tiny_config
from dlmkern.ops import layouts
from dlmkern.sampling import SamplingConfig
from dlmkern.trainers import RLConfig, TraceRLConfig, build_config

TOK = CharTokenizer()


def parity(prompts, completions, **_):
    return [float(len(c) % 2) for c in completions]


def _demo_trainer(tmp_path, temperature: float, **kw) -> TraceRL:
    """The demo's model (random weights), task and sampling, at `temperature`."""
    torch.manual_seed(0)
    model = demo.build_model(TOK, demo.DemoSize())
    train, _ = demo.addition_task(64, 1, seed=0, drop_carry=0.5)
    cfg = TraceRLConfig(prompts_per_step=4, group_size=4, max_new_tokens=demo.NEW_TOKENS,
                        sampling=SamplingConfig(steps=2, temperature=temperature), lr=1e-3,
                        total_steps=1, output_dir=str(tmp_path), progress_bar=False,
                        pass_rate_low=0.0, pass_rate_high=1.0, **kw)
    return TraceRL(model, TOK, train, [demo.exact_match, parity], cfg)


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.5])
def test_the_trainer_scores_the_sampled_policy_at_the_samplers_temperature(tmp_path,
                                                                            temperature):
    # before: the trainer scored logits at T = 1, the sampler drew from softmax(logits / T):
    # on the demo model (random weights) at T = 0.7 the mean gap was 0.064 per token
    log = _demo_trainer(tmp_path, temperature).train_step()
    assert log["sampler_logp_gap"] < 1e-4, log


def test_the_reference_model_is_scored_at_the_samplers_temperature_too(tmp_path):
    # one step from the start: policy == old == reference, so the k3 KL to the reference is 0
    # only if all three are scored at the same temperature
    log = _demo_trainer(tmp_path, 0.7, kl_coef=0.1, kl_to="ref").train_step()
    assert log["sampler_logp_gap"] < 1e-4, log
    assert abs(log["kl"]) < 1e-6 and log["ratio_mean"] == pytest.approx(1.0, abs=1e-5), log


@pytest.mark.parametrize("family", ["sdar", "dream"])
def test_model_log_probs_at_a_temperature_equal_plain_torch_values_and_gradients(family):
    torch.manual_seed(0)
    cfg = tiny_config(family, vocab_size=TOK.vocab_size, mask_token_id=TOK.mask_token_id)
    model = DiffusionLM(cfg)
    with torch.no_grad():  # peaked distributions, where the temperature matters
        model.lm_head.weight.mul_(20)
    lens = [7, 5]
    ids = torch.randint(0, TOK.vocab_size, (sum(lens),))
    lay = layouts.block_causal(lens, cfg.block_size)
    rows = torch.tensor([1, 3, 6, 8, 11])
    targets = torch.randint(0, TOK.vocab_size, (rows.numel(),))
    T = 0.7
    got = model(ids, lay, rows=rows, targets=targets, temperature=T)
    g_got = torch.autograd.grad(got.sum(), list(model.parameters()))
    hidden = model.prediction_hidden(model(ids, lay), lay.cu_seqlens)
    want = torch.log_softmax(model.logits(hidden).float() / T, -1)[rows].gather(
        -1, targets[:, None]).squeeze(-1)
    g_want = torch.autograd.grad(want.sum(), list(model.parameters()))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    at_one = model(ids, lay, rows=rows, targets=targets)
    assert (at_one - got).abs().max() > 1e-2  # the temperature is not ignored


@pytest.mark.parametrize("key, value, why", [
    ("temperature", 0.0, r"sampling\.temperature=0 .*greedy"),
    ("top_k", 5, r"sampling\.top_k=5 .*truncat"),
    ("top_p", 0.9, r"sampling\.top_p=0\.9 .*truncat"),
    ("cfg_scale", 1.5, r"sampling\.cfg_scale=1\.5 .*guid"),
])
def test_rl_refuses_sampling_the_loss_cannot_score(key, value, why):
    with pytest.raises(ValueError, match=why):
        RLConfig(sampling=SamplingConfig(**{key: value})).validate()
    with pytest.raises(ValueError, match=why):  # a run file's override, before any model
        build_config(TraceRLConfig, {}, [f"sampling.{key}={value}"])
    RLConfig(sampling=SamplingConfig(temperature=0.7)).validate()  # any T > 0 is scored
