"""eegfast ops: typed functions over reference, C++ CPU, CUDA and Triton kernels.

Every op takes ``backend=None`` (automatic: C++ on CPU tensors, the fastest GPU kernel on CUDA
tensors), ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``; ``EEGFAST_BACKEND`` sets the
default. :func:`available_backends` reports what is built here and, if not, why.
"""

from eegfast.ops._backend import BACKENDS, BackendStatus, ExtensionMissingError, available_backends
from eegfast.ops._variants import chosen_variants as launch_choices
from eegfast.ops._variants import forget_choices as forget_launch_choices
from eegfast.ops.moe import (
    MoEDispatch,
    moe_combine,
    moe_dispatch,
    moe_expert_ffn,
    moe_ffn,
)
from eegfast.ops.qk_norm_attention import (
    cpu_attention_isa,
    cpu_output_pool_bytes,
    qk_norm_attention,
    qk_norm_attention_packed,
    qk_norm_attention_reference,
    release_cpu_output_pool,
)
from eegfast.ops.vq import (
    vq_code_stats,
    vq_ema_update,
    vq_kmeans,
    vq_nearest,
    vq_nearest_reference,
)

__all__ = [
    "BACKENDS",
    "BackendStatus",
    "ExtensionMissingError",
    "available_backends",
    "launch_choices",
    "forget_launch_choices",
    "MoEDispatch",
    "moe_combine",
    "moe_dispatch",
    "moe_expert_ffn",
    "moe_ffn",
    "qk_norm_attention",
    "qk_norm_attention_packed",
    "qk_norm_attention_reference",
    "cpu_attention_isa",
    "cpu_output_pool_bytes",
    "release_cpu_output_pool",
    "vq_code_stats",
    "vq_ema_update",
    "vq_kmeans",
    "vq_nearest",
    "vq_nearest_reference",
]
