"""LaBraM models: classifier, masked-modelling pretraining, VQ-NSP tokenizer; checkpoints."""

from eegfast.models.checkpoint import (
    CheckpointMismatchError,
    InferredArchitecture,
    LoadReport,
    infer_architecture,
    load_checkpoint,
    read_reference_checkpoint,
    read_state_dict,
)
from eegfast.models.hybrid import (
    HybridConfig,
    HybridOutput,
    HybridPretrainModel,
    create_hybrid_model,
    load_hybrid_model,
)
from eegfast.models.labram import LaBraM, LaBraMConfig
from eegfast.models.pretrain import (
    LaBraMForMaskedModeling,
    LaBraMPretrain,
    PretrainConfig,
    PretrainOutput,
    pretrain_to_classifier_state_dict,
    random_patch_mask,
)
from eegfast.models.registry import MODEL_CONFIGS, create_model, get_config, list_models
from eegfast.models.upcycle import upcycle
from eegfast.models.vqnsp import VQNSP, TokenizerOutput, VQNSPConfig

__all__ = [
    "MODEL_CONFIGS",
    "VQNSP",
    "CheckpointMismatchError",
    "HybridConfig",
    "HybridOutput",
    "HybridPretrainModel",
    "InferredArchitecture",
    "LaBraM",
    "LaBraMConfig",
    "LaBraMForMaskedModeling",
    "LaBraMPretrain",
    "LoadReport",
    "PretrainConfig",
    "PretrainOutput",
    "TokenizerOutput",
    "VQNSPConfig",
    "create_hybrid_model",
    "create_model",
    "get_config",
    "infer_architecture",
    "list_models",
    "load_checkpoint",
    "load_hybrid_model",
    "pretrain_to_classifier_state_dict",
    "random_patch_mask",
    "read_reference_checkpoint",
    "read_state_dict",
    "upcycle",
]
