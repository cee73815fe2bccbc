"""Drop-in layers built on eegfast ops."""

from eegfast.nn.attention import QKNormAttention
from eegfast.nn.convert import ConversionReport, convert, convert_report
from eegfast.nn.layers import Block, Mlp, TemporalConv
from eegfast.nn.linear import fused_linear
from eegfast.nn.losses import LinearCrossEntropy, linear_cross_entropy
from eegfast.nn.moe import MoEAux, MoEFFN, moe_aux_losses
from eegfast.nn.vq import CodebookEMA, NormEMAVectorQuantizer, QuantizerOutput

__all__ = [
    "Block",
    "ConversionReport",
    "Mlp",
    "MoEAux",
    "MoEFFN",
    "moe_aux_losses",
    "QKNormAttention",
    "TemporalConv",
    "convert",
    "convert_report",
    "fused_linear",
    "LinearCrossEntropy",
    "linear_cross_entropy",
    "CodebookEMA",
    "NormEMAVectorQuantizer",
    "QuantizerOutput",
]
