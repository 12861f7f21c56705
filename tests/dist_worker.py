"""Run by test_distributed.py under torchrun: one TraceRL (or SFT, or VRPO) step on a tiny
model, then the full parameters and a checkpoint are written to OUT."""

import sys

import torch
from dlmkern import SFT, TraceRL, distributed
from dlmkern.data import CharTokenizer
from dlmkern.models import DiffusionLM, tiny_config
from dlmkern.sampling import SamplingConfig
from dlmkern.trainers import VRPO, SFTConfig, TraceRLConfig, VRPOConfig
from dlmkern.trainers.checkpoint import full_state

TOK = CharTokenizer()
DATA = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(10) for b in range(10)]


def reward(prompts, completions, **_):
    return [float(len(c) % 2) for c in completions]


MODES = {
    "tracerl": {},
    "value": {"use_value_model": True},
    # 3 mini-batches over 16 trajectories: chunk bounds cut across the ranks' shares
    "minibatch": {"num_minibatches": 3, "ppo_epochs": 2},
    # the prompts sampled on rank 1 all score 0 and are filtered: rank 1 joins every step with
    # zero weight while rank 0 trains
    "uneven": {"num_minibatches": 3, "ppo_epochs": 2, "pass_rate_low": 0.1},
    # a baseline estimator: random masks drawn per trajectory, whatever rank holds it
    "coupled": {"estimator": "coupled", "num_minibatches": 3},
    # 3 prompts on 2 ranks: rank 0 samples two, rank 1 one
    "odd": {"prompts_per_step": 3},
    # DAPO dynamic sampling: oversampling rounds whose shortfall need not divide by the ranks
    "dynamic": {"prompts_per_step": 3, "dynamic_sampling": True, "max_oversample_rounds": 3,
                "num_minibatches": 2},
    # a frozen reference policy (sharded like the policy) and a KL to it
    "refkl": {"kl_coef": 0.1, "kl_to": "ref", "num_minibatches": 2},
    # a full-attention model: uncached sampling runs FSDP forwards a data-dependent number of
    # times, and with 1 prompt rank 1 samples nothing (it deadlocked before gathered() kept
    # the layers unsharded)
    "llada": {"prompts_per_step": 2, "gen_block_length": 4, "steps": 2},
    # micro-batches of at most 50 row tokens (1-2 trajectories): the ranks hold different
    # numbers of them, so one runs zero-weight stand-ins to match the other's FSDP passes
    "micro": {"micro_batch_tokens": 50, "num_minibatches": 2, "use_value_model": True},
    "bf16": {"micro_batch_tokens": 50, "pass_rate_low": 0.0, "pass_rate_high": 1.0},
    # micro-batches on a rank that kept nothing (it pads with stand-ins at weight 0), and a
    # summed loss (stand-ins must add nothing)
    "uneven_micro": {"num_minibatches": 3, "ppo_epochs": 2, "pass_rate_low": 0.1,
                     "micro_batch_tokens": 50},
    "sum_micro": {"reduction": "sum", "loss_normalizer": 64.0, "num_minibatches": 2,
                  "micro_batch_tokens": 50},
}


def make_trainer(out_dir, mode="tracerl"):
    torch.manual_seed(0)
    model = DiffusionLM(tiny_config("llada" if mode == "llada" else "sdar",
                                    vocab_size=TOK.vocab_size, mask_token_id=TOK.mask_token_id))
    if mode == "bf16":  # the GPU set-up: bf16 weights, fp32 masters, fp32 gradient reduction
        model = model.to(torch.bfloat16)
    kw = {"prompts_per_step": 4, **MODES[mode]}
    kw = {"pass_rate_low": 0.0, "pass_rate_high": 1.0, **kw}
    steps = kw.pop("steps", 4)
    cfg = TraceRLConfig(group_size=4, max_new_tokens=8, total_steps=1, output_dir=out_dir,
                        progress_bar=False, lr=1e-3, max_grad_norm=100.0,
                        sampling=SamplingConfig(temperature=1.0, steps=steps), **kw)
    tr = TraceRL(model, TOK, DATA, reward, cfg)
    if mode.startswith("uneven"):  # step 0's prompts 1 and 3 (rank 1's share) score 0
        zero = {DATA[tr.data_order[i]]["prompt"] for i in (1, 3)}
        tr.reward_fns = [lambda prompts, completions, **_: [
            0.0 if p in zero else float(len(c) % 2) for p, c in zip(prompts, completions,
                                                                     strict=True)]]
    return tr


def make_sft(out_dir, micro_batch_tokens=0):
    torch.manual_seed(0)
    model = DiffusionLM(tiny_config("sdar", vocab_size=TOK.vocab_size,
                                    mask_token_id=TOK.mask_token_id))
    cfg = SFTConfig(batch_size=6, lr=1e-3, total_steps=1, output_dir=out_dir,
                    progress_bar=False, max_grad_norm=100.0,
                    micro_batch_tokens=micro_batch_tokens)
    return SFT(model, TOK, DATA, cfg)


def make_vrpo(out_dir, micro_batch_tokens=0):
    torch.manual_seed(0)
    model = DiffusionLM(tiny_config("sdar", vocab_size=TOK.vocab_size,
                                    mask_token_id=TOK.mask_token_id))
    cfg = VRPOConfig(batch_size=6, lr=1e-3, total_steps=2, output_dir=out_dir,
                     progress_bar=False, max_grad_norm=100.0, beta=1.0,
                     micro_batch_tokens=micro_batch_tokens)
    rows = [{"prompt": r["prompt"], "chosen": r["answer"], "rejected": r["answer"] + "1"}
            for r in DATA]
    return VRPO(model, TOK, rows, cfg)


if __name__ == "__main__":
    out = sys.argv[1]
    if "vrpo" in sys.argv:
        tr = make_vrpo(out + "/run")
    elif "vrpo_micro" in sys.argv:  # 3 rows per rank in micro-batches of 1-2 rows
        tr = make_vrpo(out + "/run", micro_batch_tokens=300)
    elif "sft" in sys.argv:
        tr = make_sft(out + "/run")
    elif "sft_micro" in sys.argv:  # 3 rows per rank in micro-batches of 1-2 rows
        tr = make_sft(out + "/run", micro_batch_tokens=30)
    else:
        tr = make_trainer(out + "/run", sys.argv[2])
    log = tr.train_step()
    if distributed.rank() == 0:
        torch.save(log, out + "/log.pt")
    full = full_state(tr.model)
    value = full_state(tr.value_model) if getattr(tr, "value_model", None) is not None else None
    if distributed.rank() == 0:
        torch.save(full, out + "/params.pt")
        if value is not None:
            torch.save(value, out + "/value_params.pt")
    tr.save(out + "/ckpt")
