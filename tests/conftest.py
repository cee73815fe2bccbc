import os

import torch

# Triton kernels run on the CPU through the interpreter when there is no GPU. This has to be
# decided before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The Triton attention's launch choices pinned to the fused loops with the tail launch and a dQ
# kernel of its own: on a GPU, timing them would autotune and compile every variant for every
# case the suite runs (the tests of the choice, and of each variant, set the switches themselves).
os.environ.setdefault("EEGFAST_TRITON_PRENORM", "0")
os.environ.setdefault("EEGFAST_TRITON_SPLIT_TAIL", "1")
os.environ.setdefault("EEGFAST_TRITON_ATOMIC_DQ", "0")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "eegfast",
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "eegfast"))
