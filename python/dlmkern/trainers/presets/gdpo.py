"""GDPO: the preset."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from dlmkern.trainers.rl_config import RLConfig
from dlmkern.trainers.rl_config import preset_default as _same


@dataclass
class GDPOConfig(RLConfig):
    """GDPO, Group Diffusion Policy Optimization ("Improving Reasoning for Diffusion Language
    Models via Group Diffusion Policy Optimization", Rojas et al. 2025, arXiv 2510.08554;
    gdpo.github.io). The sequence ELBO by semi-deterministic Monte Carlo (estimator quadrature):
    a Gauss-Legendre rule over the masking level t, one random mask per node, its tokens
    weighted w_k / t_k; one ratio per sequence on the ELBO difference over the length, clipped
    at 0.2, GRPO advantages, averaged over sequences. Choices the stored paper text did not
    settle (its code was not available to us): 3 nodes; no KL term (kl_coef 0; set kl_coef with
    kl_level: sequence for one on the sequence ELBO); each node masks exactly round(t_k n)
    tokens (at least 1) of the completion up to its EOS. Block and full-attention models
    alike."""

    algo: ClassVar[str] = "gdpo"
    estimator: str = _same("estimator", "quadrature")
    quadrature_nodes: int = _same("quadrature_nodes", 3)
    token_weights: str = _same("token_weights", "elbo")
    ratio_level: str = _same("ratio_level", "sequence")
    reduction: str = _same("reduction", "seq_mean")
