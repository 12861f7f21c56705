"""AdamW with fp32 master weights for bf16 / fp16 parameters.

On a GPU the trainers hold the model in bfloat16 (the kernels compute in it, and the sampler's KV
cache uses it). Plain AdamW on bf16 parameters rounds every update to bf16: an update of
lr = 1e-6 on a weight of 0.02 is about 1 % of its bf16 spacing (1.2e-4) and is lost entirely, so
RL at the usual learning rates would not move the model at all. This optimizer keeps, for each
low-precision parameter, an fp32 master copy and fp32 moments in its state (so checkpoints carry
them), applies the AdamW update to the master and writes the rounded result back into the
parameter. fp32 parameters get torch's AdamW unchanged.

If a parameter is changed outside the optimizer (loaded weights, a manual edit), the elements
whose value no longer equals the rounded master are adopted into the master at the next step.
With gradient accumulation, stash_grads / unstash_grads sum the micro-batch gradients in fp32.
"""

from __future__ import annotations

import math

import torch

_LOW = (torch.bfloat16, torch.float16)
_FP32_STATE = ("master", "exp_avg", "exp_avg_sq")


class MixedPrecisionAdamW(torch.optim.AdamW):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, **kwargs):
        if kwargs.get("amsgrad"):
            raise ValueError("MixedPrecisionAdamW: amsgrad is not supported")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         **kwargs)
        self._grad_acc = {}  # parameter -> fp32 gradient sum (outside state: never saved)

    def zero_grad(self, set_to_none: bool = True):
        self._grad_acc.clear()  # e.g. left over by a loop an exception interrupted
        super().zero_grad(set_to_none=set_to_none)

    def load_state_dict(self, state_dict):
        # torch casts floating-point state to its parameter's dtype on load; the masters and
        # moments of low-precision parameters must stay fp32.
        keep = {(pid, k): v for pid, st in state_dict["state"].items() for k, v in st.items()
                if k in _FP32_STATE and torch.is_tensor(v) and v.dtype == torch.float32}
        super().load_state_dict(state_dict)
        ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        by_id = dict(zip(ids, params, strict=True))
        for (pid, k), v in keep.items():
            p = by_id.get(pid)
            if p is not None and p.dtype in _LOW:
                self.state[p][k] = v.to(device=p.device, dtype=torch.float32)

    @torch.no_grad()
    def stash_grads(self):
        """Moves the gradients of low-precision parameters into fp32 accumulators (call after each
        backward of a gradient-accumulation loop but the last), so that summing many micro-batch
        gradients rounds once (unstash_grads) instead of once per backward in bf16."""
        for p in self._low_params():
            if p.grad is not None:
                acc = self._grad_acc.get(p)
                if acc is None:
                    self._grad_acc[p] = p.grad.float()
                else:
                    acc.add_(p.grad)
                p.grad = None

    @torch.no_grad()
    def unstash_grads(self):
        """Puts the fp32 sums back as the parameters' gradients (plus any gradient accumulated
        since the last stash), rounded once to the parameter dtype (under FSDP2 each backward's
        reduced gradient is itself stored in the parameter dtype before it is stashed)."""
        for p in self._low_params():
            acc = self._grad_acc.pop(p, None)
            if acc is not None:
                if p.grad is not None:
                    acc.add_(p.grad)
                p.grad = acc.to(p.dtype)

    def _low_params(self):
        return [p for g in self.param_groups for p in g["params"] if p.dtype in _LOW]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        low = [(group, p, p.grad) for group in self.param_groups for p in group["params"]
               if p.grad is not None and p.dtype in _LOW]
        if any(group["amsgrad"] for group, _, _ in low):
            raise ValueError("MixedPrecisionAdamW: amsgrad is not supported")
        for _, p, _ in low:  # AdamW skips parameters without a gradient
            p.grad = None
        self._init_state_on_host()
        try:
            # AdamW's own step without its hook wrapper (this step already ran the hooks)
            inner = torch.optim.AdamW.step
            getattr(inner, "__wrapped__", inner)(self)
        finally:
            for _, p, g in low:
                p.grad = g
        for group, p, g in low:
            self._master_step(group, p, g)
        return loss

    def _init_state_on_host(self):
        """AdamW's state of parameters about to take their first step, made here as torch's
        AdamW makes it, but with the step counter on the CPU: torch 2.11 creates it on the
        default device (a torch.set_default_device("cuda") would then cost a read-back per
        parameter and step)."""
        scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        for group in self.param_groups:
            if group.get("fused") or group.get("capturable"):
                continue  # torch keeps those counters on the parameter's device on purpose
            for p in group["params"]:
                if p.grad is None or self.state[p]:
                    continue
                state = self.state[p]
                state["step"] = torch.tensor(0.0, dtype=scalar, device="cpu")
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format)

    def _master_step(self, group, p, grad):
        state = self.state[p]
        if "master" not in state:
            state["master"] = p.detach().float()
            state.setdefault("step", torch.tensor(0.0, device="cpu"))  # as torch AdamW
            for k in ("exp_avg", "exp_avg_sq"):
                state[k] = (state[k].float() if k in state
                            else torch.zeros_like(p, dtype=torch.float32))
        master, exp_avg, exp_avg_sq = state["master"], state["exp_avg"], state["exp_avg_sq"]
        master.copy_(torch.where(master.to(p.dtype) == p, master, p.float()))
        g = grad.float()
        if group["maximize"]:
            g = -g
        state["step"] += 1
        step = float(state["step"])
        lr, (beta1, beta2) = float(group["lr"]), group["betas"]
        # torch's single-tensor AdamW, step for step (an fp32 run gives the same masters; with a
        # tensor lr torch computes in tensors: equal to an ulp).
        master.mul_(1 - lr * group["weight_decay"])
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = math.sqrt(1 - beta2**step)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(group["eps"])
        master.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
        p.copy_(master)
