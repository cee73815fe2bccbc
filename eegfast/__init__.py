"""eegfast: fast kernels, drop-in layers and training for LaBraM-family EEG foundation models."""

__version__ = "0.1.0"
