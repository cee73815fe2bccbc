"""Drop-in layers built on eegfast ops."""

from eegfast.nn.vq import CodebookEMA, NormEMAVectorQuantizer, QuantizerOutput

__all__ = ["CodebookEMA", "NormEMAVectorQuantizer", "QuantizerOutput"]
