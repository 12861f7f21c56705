"""dlmkern's ops: C++/CPU and CUDA kernels behind ``torch.ops.dlmkern``, with fake (meta) and
autograd registrations beside each op, and pure-torch references in ``dlmkern.ops.reference``."""

from dlmkern.ops import layouts, reference
from dlmkern.ops._checks import check_device_errors
from dlmkern.ops.attention import block_attention, check_layout_errors, decode_attention
from dlmkern.ops.backend import use_backend
from dlmkern.ops.logprobs import logprobs_from_logits, masked_logprobs
from dlmkern.ops.objective import Objective
from dlmkern.ops.policy_value_loss import policy_value_loss

__all__ = [
    "Objective", "block_attention", "check_device_errors", "check_layout_errors",
    "decode_attention", "layouts",
    "logprobs_from_logits", "masked_logprobs",
    "policy_value_loss", "reference", "use_backend",
]
