"""Smoke example run by scripts/setup.sh until the full `dlmkern demo` exists: masked log-probs
of a random lm_head against the naive full-logits path, on whatever device is available."""

import time

import dlmkern
import torch
from dlmkern.ops import masked_logprobs, reference

device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
n, h, v = 1024, 256, 32000
hidden = torch.randn(n, h, device=device, requires_grad=True)
weight = (torch.randn(v, h, device=device) / h**0.5).requires_grad_()
targets = torch.randint(0, v, (n,), device=device)
rows = torch.rand(n, device=device) < 0.5  # e.g. the masked positions of a diffusion step

t0 = time.perf_counter()
logp, entropy = masked_logprobs(hidden, weight, targets, rows=rows, return_entropy=True)
(logp.sum() - 0.01 * entropy.sum()).backward()
elapsed = time.perf_counter() - t0
ref_logp = reference.masked_logprobs(hidden.detach(), weight.detach(), targets, rows=rows)
err = (logp.detach() - ref_logp).abs().max().item()
print(f"dlmkern {dlmkern.__version__} on {device}: {logp.numel()} of {n} rows, V={v}, "
      f"fwd+bwd {elapsed * 1e3:.1f} ms, max |logp - reference| = {err:.2e}")
assert err < 1e-3, "masked_logprobs disagrees with the reference"
print("smoke example OK")
