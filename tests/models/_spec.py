"""Reference key names and shapes (copied from ../shared/spec/labram_state_dicts.json)."""

import json
from functools import cache
from pathlib import Path

import torch

SPEC_FILE = Path(__file__).parent / "data" / "labram_state_dicts.json"
REFERENCE_NAMES = {
    "labram_base": "labram_base_patch200_200",
    "labram_large": "labram_large_patch200_200",
    "labram_huge": "labram_huge_patch200_200",
    "labram_base_pretrain": "labram_base_patch200_1600_8k_vocab (pretrain)",
    "vqnsp_base": "vqnsp_encoder_base_decoder_3x200x12",
}


@cache
def spec() -> dict:
    return json.loads(SPEC_FILE.read_text())


def reference_shapes(name: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v) for k, v in spec()["models"][REFERENCE_NAMES[name]]["keys"].items()}


def reference_n_params(name: str) -> int:
    return spec()["models"][REFERENCE_NAMES[name]]["n_params"]


def random_reference_state(name: str, seed: int = 0, device="cpu") -> dict[str, torch.Tensor]:
    """Random tensors with every reference key and shape (as a reference checkpoint would have)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in reference_shapes(name).items():
        if device == "meta":
            out[key] = torch.empty(shape, device="meta")
        else:
            out[key] = torch.randn(shape, generator=gen) * 0.05
    return out
