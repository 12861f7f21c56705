"""Rewards: math (math-verify under dlmkern's own timeout), exact (the whole completion), code
(sandboxed), and any user callable ``f(prompts, completions, **columns) -> list[float]``; by name
through ``get_reward`` (``math``, ``exact``, ``code``, ``path/to/file.py:function``,
``module:function``), the lookup `dlmkern train` and `dlmkern eval` use."""

from dlmkern.rewards.code import SandboxLimits, code_reward, extract_code, run_program
from dlmkern.rewards.math import last_boxed, math_reward, verify_answer
from dlmkern.rewards.registry import exact_reward, get_reward, get_rewards

__all__ = ["SandboxLimits", "code_reward", "exact_reward", "extract_code", "get_reward",
           "get_rewards", "last_boxed", "math_reward", "run_program", "verify_answer"]
