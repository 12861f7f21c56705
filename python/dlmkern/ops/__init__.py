"""dlmkern's ops: C++/CPU and CUDA kernels behind ``torch.ops.dlmkern``, with fake (meta) and
autograd registrations beside each op, and pure-torch references in ``dlmkern.ops.reference``."""

from dlmkern.ops import reference
from dlmkern.ops.logprobs import logprobs_from_logits, masked_logprobs

__all__ = ["logprobs_from_logits", "masked_logprobs", "reference"]
