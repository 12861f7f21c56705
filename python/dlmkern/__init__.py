"""dlmkern: fast, tested RL post-training for diffusion language models.

Kernels (``dlmkern.ops``) are C++/CUDA ops registered as ``torch.ops.dlmkern.*``; each one also has
a pure-torch reference in ``dlmkern.ops.reference``. Trainers: ``from dlmkern import TraceRL, DiPO,
SFT``.
"""

from dlmkern import ops
from dlmkern._build import build_info
from dlmkern.trainers import SFT, DiPO, TraceRL

__all__ = ["SFT", "DiPO", "TraceRL", "build_info", "ops"]
__version__ = "0.1.0"
