"""Named model configurations and :func:`create_model`.

Each name maps to a frozen config; ``create_model(name, **config)`` replaces config fields
(unknown keys are errors that list the valid ones) and also accepts braindecode-style signal
arguments: ``n_outputs`` (classes), ``n_chans``, ``n_times``, ``sfreq``, ``ch_names`` or
``chs_info`` (electrode names → rows of the spatial embedding, via :mod:`eegfast.electrodes`).
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from eegfast.models.labram import LaBraM, LaBraMConfig, check_class_count
from eegfast.models.pretrain import LaBraMPretrain, PretrainConfig
from eegfast.models.vqnsp import VQNSP, VQNSPConfig

SIGNAL_ARGS = ("n_outputs", "n_chans", "n_times", "sfreq", "ch_names", "chs_info")


def _labram(embed_dim: int, depth: int, num_heads: int, conv_channels: int, **kw) -> LaBraMConfig:
    return LaBraMConfig(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        conv_channels=conv_channels,
        **kw,
    )


# Sizes from the LaBraM paper / reference (see ../shared/spec/LABRAM.md).
_BACKBONES = {
    "tiny": dict(embed_dim=100, depth=2, num_heads=4, conv_channels=4),
    "base": dict(embed_dim=200, depth=12, num_heads=10, conv_channels=8),
    "large": dict(embed_dim=400, depth=24, num_heads=16, conv_channels=16),
    "huge": dict(embed_dim=800, depth=48, num_heads=16, conv_channels=32),
}

MODEL_CONFIGS: dict[str, LaBraMConfig | PretrainConfig | VQNSPConfig] = {}
for _size, _dims in _BACKBONES.items():
    # fine-tuning defaults: drop path 0.1 (0 for the tiny test model)
    MODEL_CONFIGS[f"labram_{_size}"] = _labram(
        **_dims, num_classes=2, drop_path_rate=0.0 if _size == "tiny" else 0.1
    )
    MODEL_CONFIGS[f"labram_{_size}_pretrain"] = PretrainConfig(
        backbone=_labram(**_dims),
        vocab_size=256 if _size == "tiny" else 8192,
    )
MODEL_CONFIGS["vqnsp_base"] = VQNSPConfig()
MODEL_CONFIGS["vqnsp_tiny"] = VQNSPConfig(
    encoder=_labram(**_BACKBONES["tiny"], qkv_bias=True, qk_norm=False, init_values=0.0),
    decoder=LaBraMConfig(
        embed_dim=100,
        depth=1,
        num_heads=4,
        patch_embed="code",
        code_dim=16,
        qkv_bias=True,
        qk_norm=False,
        init_values=0.0,
    ),
    code_dim=16,
    num_codes=256,
    # No commitment loss: with the reference's beta = 1 (and with 0.25) this small tokenizer's
    # encoder collapsed on the bundled sample within ~60 steps (every patch the same features,
    # feature_spread ~1e-4, its codes carrying nothing); with 0 it kept feature_spread ~0.9 over
    # 500 steps and predicted amplitude and phase better (0.37 / 0.68 against the collapsed
    # 0.43 / 0.91 MSE). The EMA codebook follows the unit-norm features without it.
    beta=0.0,
    # Re-seed codes whose EMA count (in rows of a batch) falls below 0.1: a batch of 16 windows
    # gives ~10 rows a code, so a code unused for ~230 steps. The default 1e-3 (~700 steps) never
    # fired in the quickstart's 500; this one doubled the codes in use there (perplexity 131
    # against 65) at the same reconstruction errors.
    dead_code_threshold=0.1,
)

_BUILDERS = {LaBraMConfig: LaBraM, PretrainConfig: LaBraMPretrain, VQNSPConfig: VQNSP}


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(MODEL_CONFIGS)


def get_config(name: str, **config: Any) -> LaBraMConfig | PretrainConfig | VQNSPConfig:
    """The config that ``create_model(name, **config)`` builds (validated, nothing built)."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    base = MODEL_CONFIGS[name]
    own = [f.name for f in dataclasses.fields(base)]
    backbone_keys: list[str] = []
    if isinstance(base, PretrainConfig):  # backbone fields may be given directly
        backbone_keys = [f.name for f in dataclasses.fields(LaBraMConfig)]
    signal_keys = [k for k in SIGNAL_ARGS if k != "n_outputs" or isinstance(base, LaBraMConfig)]
    valid = own + [k for k in backbone_keys if k not in own] + signal_keys + ["modern_names"]
    unknown = sorted(set(config) - set(valid))
    if unknown:
        raise TypeError(
            f"unknown config keys for {name!r}: {unknown}; valid keys: {', '.join(valid)}"
        )
    for key in ("backbone", "encoder", "decoder"):
        # checked before use: a dict failed with "'dict' object has no attribute 'pos_rows'"
        if key in own and key in config and not isinstance(config[key], LaBraMConfig):
            raise ValueError(
                f"{key} must be a LaBraMConfig (eegfast.models.LaBraMConfig), got "
                f"{type(config[key]).__name__}"
            )
    modern_names = config.pop("modern_names", None)
    signal = {k: config.pop(k) for k in SIGNAL_ARGS if k in config}
    if modern_names is not None:
        if signal.get("ch_names") is None and signal.get("chs_info") is None:
            raise ValueError("modern_names applies to ch_names / chs_info; neither is given")
        signal["modern_names"] = bool(modern_names)
    signal_fields = _signal_fields(base, signal, config)
    _merge_signal_fields(signal_fields, signal, config)
    if isinstance(base, LaBraMConfig):
        return dataclasses.replace(base, **signal_fields, **config)
    if isinstance(base, PretrainConfig):
        backbone_cfg = {
            k: config.pop(k) for k in list(config) if k in backbone_keys and k not in own
        }
        backbone = config.pop("backbone", base.backbone)
        backbone = dataclasses.replace(backbone, **signal_fields, **backbone_cfg)
        return dataclasses.replace(base, backbone=backbone, **config)
    encoder = config.pop("encoder", base.encoder)
    decoder = config.pop("decoder", base.decoder)
    if "code_dim" in config:
        decoder = dataclasses.replace(decoder, code_dim=config["code_dim"])
    return dataclasses.replace(
        base,
        encoder=dataclasses.replace(encoder, **signal_fields),
        decoder=dataclasses.replace(decoder, **signal_fields),
        **config,
    )


def create_model(name: str, *, device=None, dtype=None, **config: Any) -> nn.Module:
    """Build a registered model, replacing any of its config fields.

    Args:
        name: one of :func:`list_models` (``labram_base``, ``labram_base_pretrain``,
            ``vqnsp_base``, ``labram_tiny`` ...).
        device, dtype: where and in which dtype to create the parameters.
        **config: config fields (e.g. ``num_classes=6, drop_path_rate=0.2``), or signal
            arguments: ``n_outputs``, ``n_chans``, ``n_times``, ``sfreq``, ``ch_names`` /
            ``chs_info`` (MNE-style dicts with ``ch_name``). Old 10-20 names (T3, T4, T5, T6)
            take the rows of their 10-10 names (T7, T8, P7, P8); ``modern_names=False`` keeps
            the table's old-name rows, as the reference code does for TUH recordings (to match
            a checkpoint fine-tuned on them).

    Example::

        model = create_model("labram_base", n_outputs=2, ch_names=["Fp1", "Fp2", "Cz"])
    """
    cfg = get_config(name, **config)
    return _BUILDERS[type(cfg)](cfg, device=device, dtype=dtype)


def _signal_fields(
    base, signal: dict[str, Any], config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Config fields implied by braindecode-style signal arguments (validated).

    ``config``: the config fields given with them; the signal is checked against the model
    they build (its ``patch_size``, ``max_patches`` and ``pos_rows``, or those of a given
    ``backbone`` / ``encoder``), not against ``base``'s. Electrodes past the reference's
    129-row table are accepted only for a model built with a larger table (``pos_rows``, e.g.
    ``eegfast.electrodes.LABRAM_EXTENDED_TABLE_ROWS``).
    """
    config = config or {}
    if isinstance(base, PretrainConfig):
        backbone = config.get("backbone", base.backbone)
    elif isinstance(base, VQNSPConfig):
        backbone = config.get("encoder", base.encoder)
    else:
        backbone = base

    def built(name: str):  # a field as the built model will have it
        return config.get(name, getattr(backbone, name))

    pos_rows = built("pos_rows")
    fields: dict[str, Any] = {}
    if "n_outputs" in signal:
        fields["num_classes"] = check_class_count("n_outputs", signal["n_outputs"])
    patch, max_patches = built("patch_size"), built("max_patches")
    sfreq = signal.get("sfreq")
    if sfreq is not None and (isinstance(sfreq, bool) or not isinstance(sfreq, numbers.Real)):
        raise ValueError(f"sfreq must be a number (Hz), got {sfreq!r}")
    if sfreq is not None and float(sfreq) != float(patch):
        raise ValueError(
            f"sfreq must be {patch} Hz (LaBraM patches are {patch} samples = 1 s), got {sfreq}; "
            "resample the recording first"
        )
    n_times = signal.get("n_times")
    if n_times is not None:
        n_times = _positive_count("n_times", n_times)
    if n_times is not None and (n_times % patch != 0 or not 0 < n_times // patch <= max_patches):
        raise ValueError(
            f"n_times must be a multiple of {patch} up to {patch * max_patches}, got {n_times}"
        )
    names = signal.get("ch_names")
    if signal.get("chs_info") is not None:
        info_names = _chs_info_names(signal["chs_info"])
        if names is not None and list(names) != info_names:
            raise ValueError("ch_names and chs_info name different electrodes")
        names = info_names
    n_chans = signal.get("n_chans")
    if n_chans is not None:
        n_chans = _positive_count("n_chans", n_chans)
    if names is not None:
        names = _as_names(names)
        if n_chans is not None and n_chans != len(names):
            raise ValueError(f"n_chans ({n_chans}) != number of ch_names ({len(names)})")
        from eegfast.electrodes import LABRAM_TABLE_ROWS, labram_input_chans

        rows = labram_input_chans(
            names,
            allow_extended=pos_rows > LABRAM_TABLE_ROWS,
            modern_names=signal.get("modern_names", True),
        )
        fields["input_chans"] = tuple(int(i) for i in rows)
    return fields


def _positive_count(name: str, value: Any) -> int:
    """``value`` as an int > 0 (an integral float such as 800.0 included), or ValueError naming
    ``name``: a string, bool, fraction or non-positive count is a mistake, which ``%`` or a
    comparison would otherwise report as an unrelated TypeError or let through."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not float(value).is_integer()
        or value <= 0
    ):
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _chs_info_names(chs_info: Any) -> list[str]:
    """The ``ch_name`` of each MNE-style channel dict of ``chs_info`` (ValueError naming the
    entry that has none)."""
    names = []
    for i, ch in enumerate(chs_info):
        if not isinstance(ch, Mapping) or "ch_name" not in ch:
            raise ValueError(
                f"chs_info[{i}] must be a dict with a 'ch_name' key (as MNE's info['chs']), "
                f"got {ch!r}"
            )
        names.append(ch["ch_name"])
    return names


def _merge_signal_fields(
    signal_fields: dict[str, Any], signal: dict[str, Any], config: dict[str, Any]
) -> None:
    """Drop from ``config`` a field that a signal argument also sets to the same value; raise
    ValueError naming both arguments when they disagree (``n_outputs`` vs ``num_classes``,
    ``ch_names``/``chs_info`` vs ``input_chans``)."""
    sources = {"num_classes": ("n_outputs",), "input_chans": ("ch_names", "chs_info")}
    for field_name, value in signal_fields.items():
        if field_name not in config:
            continue
        given = [name for name in sources[field_name] if signal.get(name) is not None]
        arguments = " and ".join(given)
        if _same_field_value(config[field_name], value):
            del config[field_name]
            continue
        raise ValueError(
            f"{arguments} and {field_name} disagree ({field_name}={value!r} from {arguments}, "
            f"{field_name}={config[field_name]!r} given); pass only one of them"
        )


def _same_field_value(given: Any, derived: Any) -> bool:
    """Whether a config value equals the one a signal argument implies (input_chans may be
    given as any sequence of ints)."""
    if isinstance(derived, tuple):
        try:
            return tuple(int(i) for i in given) == derived
        except (TypeError, ValueError):
            return False
    return given == derived


def _as_names(names: Sequence[str]) -> list[str]:
    if isinstance(names, str):
        raise TypeError("ch_names must be a sequence of electrode names, not one string")
    return [str(n) for n in names]
