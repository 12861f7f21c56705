"""Rewards (SPEC 5): math (math-verify under dlmkern's own timeout), code (sandboxed), and any
user callable ``f(prompts, completions, **columns) -> list[float]``."""

from dlmkern.rewards.code import SandboxLimits, code_reward, extract_code, run_program
from dlmkern.rewards.math import last_boxed, math_reward, verify_answer

__all__ = ["SandboxLimits", "code_reward", "extract_code", "last_boxed", "math_reward",
           "run_program", "verify_answer"]
