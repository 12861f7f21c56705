"""Held-out evaluation, one owner for `dlmkern eval` and the trainers' `eval_dataset`: the rows'
prompts rendered by the prompt format, completions generated with the given settings, scored
by the reward (a name of dlmkern.rewards.registry or a function); the accuracy is the mean
score."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch

from dlmkern.rewards.registry import describe_reward, get_rewards
from dlmkern.sampling import SamplingConfig, sampler_for
from dlmkern.trainers.checks import RewardSpec, check_reward_columns, reward_name

PREVIEW_ROWS = 3  # completions shown beside their answers by `dlmkern eval`


@dataclass
class Generation:
    """How completions are generated: the unmasking rule and its settings (greedy by default),
    the completion length, and the semi-autoregressive block length of full-attention models."""

    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.0))
    max_new_tokens: int = 256
    block_length: int = 32

    def sampler(self, model, eos_token_id: int | None):
        return sampler_for(model, self.sampling, self.max_new_tokens, self.block_length,
                           eos_token_id)


@dataclass
class EvalResult:
    reward: str  # the spec the scores came from, as the user named it
    completions: list[str]
    scores: list[float]
    seconds: float  # generation only
    n_tokens: int  # generated tokens
    n_steps: int  # denoising steps that unmasked them (summed over completions)

    @property
    def accuracy(self) -> float:
        return sum(self.scores) / len(self.scores)

    def summary(self) -> dict:
        """What `dlmkern eval` prints as JSON."""
        return {"accuracy": self.accuracy, "reward": self.reward,
                "tokens_per_s": self.n_tokens / max(self.seconds, 1e-9),
                "tokens_per_step": self.n_tokens / max(self.n_steps, 1),
                "samples": len(self.scores)}


def evaluate(model, tok, rows: list[dict], reward, generation: Generation | None = None,
             prompt_format=None, seed: int = 0) -> EvalResult:
    """One completion per row, scored by `reward` (a name, a function, or a list of them:
    summed), each reward receiving the row columns its signature names. The model is left in
    the train / eval mode it came in."""
    from dlmkern.data import PromptFormat

    generation = generation or Generation()
    fmt = prompt_format or PromptFormat()
    specs = [RewardSpec(f) for f in get_rewards(reward)]
    was_training = model.training
    model.eval()
    try:
        prompts = [fmt.encode(r, tok) for r in rows]
        t0 = time.perf_counter()
        trajs = generation.sampler(model, getattr(tok, "eos_token_id", None)).generate(
            prompts, seed=seed)
        seconds = time.perf_counter() - t0
    finally:
        model.train(was_training)
    completions = [t.text(tok) for t in trajs]
    keys = dict.fromkeys(k for r in rows for k in r if k != "prompt")
    columns = {k: [r.get(k) for r in rows] for k in keys}
    texts = [r["prompt"] for r in rows]
    scores = [0.0] * len(rows)
    for spec in specs:
        scores = [a + b for a, b in zip(scores, spec(texts, completions, columns), strict=True)]
    return EvalResult(_label(reward), completions, scores, seconds,
                      sum(len(t.token_ids) for t in trajs),
                      sum(len(set(t.step_map)) for t in trajs))


def _label(reward) -> str:
    items = reward if isinstance(reward, (list, tuple)) else [reward]
    return " + ".join(r if isinstance(r, str) else reward_name(r) for r in items)


def report(result: EvalResult, rows: list[dict], show: int = PREVIEW_ROWS) -> list[str]:
    """Lines for people: the reward used, the first completions beside their answers, and a
    warning when the math reward found nothing to score."""
    from dlmkern.rewards.math import last_boxed

    lines = [f"reward: {describe_reward(result.reward)}",
             f"the first {min(show, len(rows))} of {len(rows)} completions:"]
    for r, c, s in list(zip(rows, result.completions, result.scores, strict=True))[:show]:
        lines.append(f"  answer {str(r.get('answer'))!r:<14} score {s:g}  completion {c!r:.120}")
    if result.reward == "math" and not any(result.scores) and \
            all(last_boxed(c) is None for c in result.completions):
        lines.append("warning: every score is 0 and no completion has a \\boxed{} answer, the "
                     "only place the math reward looks; for plain answers use --reward exact "
                     "(or your own: --reward path/to/file.py:function)")
    return lines


def eval_due(step: int, every: int, total: int) -> bool:
    """Whether step (0-based) ends with a held-out evaluation: every `every` steps and the
    last step (`every` 0: never)."""
    return every > 0 and ((step + 1) % every == 0 or step + 1 == total)


def require_held_out(eval_every: int, eval_fn) -> None:
    """eval_every without held-out rows is a mistake, refused before the first step."""
    if eval_every and eval_fn is None:
        raise ValueError(f"config: eval_every={eval_every} scores held-out rows, but the trainer "
                         "has none: pass eval_dataset= (a run file: the eval_dataset key) or "
                         "set trainer.eval_fn")


class HeldOut:
    """A trainer's eval_fn: the held-out accuracy of the live model on `rows`, by evaluate()
    (the code of `dlmkern eval`). Built before any model work: rows the prompt format cannot
    render and reward columns the rows lack are refused here."""

    def __init__(self, rows: list[dict], tok, reward, generation: Generation, prompt_format):
        prompt_format.check(rows, tok)
        check_reward_columns(rows, [RewardSpec(f) for f in get_rewards(reward)])
        self.rows, self.tok, self.reward = rows, tok, reward
        self.generation, self.prompt_format = generation, prompt_format

    @classmethod
    def for_rl(cls, rows, tok, reward, cfg, prompt_format) -> HeldOut:
        """Greedy completions with the run's rule, steps and lengths."""
        sampling = dataclasses.replace(cfg.sampling, temperature=0.0)
        return cls(rows, tok, reward, Generation(sampling, cfg.max_new_tokens,
                                                 cfg.gen_block_length), prompt_format)

    @classmethod
    def for_sft(cls, rows, tok, reward, prompt_format, answer_key: str = "answer") -> HeldOut:
        """Greedy completions as long as the longest answer and its EOS (what SFT trains)."""
        longest = max(len(prompt_format.encode_answer(r, str(r[answer_key]), tok)) for r in rows)
        return cls(rows, tok, reward, Generation(max_new_tokens=longest + 1), prompt_format)

    @torch.no_grad()
    def __call__(self, model) -> float:
        return evaluate(model, self.tok, self.rows, self.reward, self.generation,
                        self.prompt_format).accuracy
