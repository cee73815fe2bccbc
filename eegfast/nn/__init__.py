"""Drop-in layers built on eegfast ops."""

from eegfast.nn.attention import QKNormAttention
from eegfast.nn.layers import Block, Mlp, TemporalConv
from eegfast.nn.vq import CodebookEMA, NormEMAVectorQuantizer, QuantizerOutput

__all__ = [
    "Block",
    "Mlp",
    "QKNormAttention",
    "TemporalConv",
    "CodebookEMA",
    "NormEMAVectorQuantizer",
    "QuantizerOutput",
]
