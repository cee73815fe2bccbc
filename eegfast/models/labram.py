"""LaBraM transformer: patch embedding, cls/spatial/temporal embeddings, pre-norm blocks.

Token layout (as the reference, so checkpoints load and give the same outputs): token 0 is cls,
token ``1 + c·A + a`` is electrode c, patch a (electrode-major). Spatial embedding row
``input_chans[c + 1]`` is added to all patches of electrode c (``input_chans[0]`` = 0 to cls),
``time_embed[a]`` to every patch token of patch a.

Batches that mix electrode sets are padded to the largest one; ``channel_padding_mask``
(B, C) True marks padded electrodes, which then neither enter the patch embedding's GroupNorm
statistics, nor act as attention keys, nor enter the mean pooling — each sample's output is the
one it would get alone, whatever the padded electrodes hold (NaN and inf included: their samples
are set to 0 before the patch embedding, see :func:`zero_padded_electrodes`).
"""

from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from eegfast.nn.layers import Block, CodePatchEmbed, TemporalConv
from eegfast.nn.linear import has_call_hooks
from eegfast.nn.moe import MoEAux, MoEFFN


@dataclass(frozen=True)
class LaBraMConfig:
    """Architecture and regularisation of a LaBraM transformer.

    ``patch_embed="temporal_conv"`` takes raw patches of ``patch_size`` samples and then
    ``embed_dim`` must equal 25·``conv_channels``; ``"code"`` takes per-patch vectors of
    ``code_dim`` (the tokenizer decoder). ``num_classes`` 0 means no ``head``.
    ``input_chans`` is the default electrode-row list used when ``forward`` gets none (set
    from electrode names by :func:`eegfast.models.create_model`).
    """

    embed_dim: int = 200
    depth: int = 12
    num_heads: int = 10
    mlp_ratio: float = 4.0
    patch_embed: str = "temporal_conv"
    patch_size: int = 200
    conv_channels: int = 8
    code_dim: int = 64
    num_classes: int = 0
    max_patches: int = 16
    pos_rows: int = 129
    qkv_bias: bool = False
    qk_norm: bool = True
    init_values: float = 0.1
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    head_init_scale: float = 0.001
    grad_checkpointing: bool = False
    attention_backend: str | None = None
    input_chans: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        check_class_count("num_classes", self.num_classes)
        for name in (
            "embed_dim",
            "num_heads",
            "patch_size",
            "conv_channels",
            "code_dim",
            "max_patches",
            "pos_rows",
        ):
            _check_size(name, getattr(self, name), low=1)
        _check_size("depth", self.depth, low=0)
        rate = self.drop_path_rate
        if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 <= rate < 1.0:
            # 1 dropped the last block's branches as 0 / 0 (NaN outputs in training), above 1
            # failed only in forward, and a negative rate silently turned stochastic depth off
            raise ValueError(f"drop_path_rate must be a number in [0, 1), got {rate!r}")
        if self.input_chans is not None:
            # a tuple of ints whatever sequence was given (a list, a tensor, a numpy array): a
            # tensor failed the checks below with "Boolean value of Tensor ... is ambiguous",
            # and a list made the frozen config unhashable
            object.__setattr__(self, "input_chans", _as_rows(self.input_chans))
        if self.patch_embed not in ("temporal_conv", "code"):
            raise ValueError(
                f"patch_embed must be 'temporal_conv' or 'code', got {self.patch_embed!r}"
            )
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(
                f"num_heads ({self.num_heads}) must divide embed_dim ({self.embed_dim})"
            )
        if self.patch_embed == "temporal_conv":
            steps = (self.patch_size + 2 * 7 - 15) // 8 + 1
            if steps * self.conv_channels != self.embed_dim:
                raise ValueError(
                    f"with patch_embed='temporal_conv', embed_dim ({self.embed_dim}) must equal "
                    f"{steps} time steps × conv_channels ({self.conv_channels})"
                )
        if self.input_chans is not None and (
            not self.input_chans
            or self.input_chans[0] != 0
            or min(self.input_chans) < 0  # a negative row would silently wrap to the last ones
            or max(self.input_chans) >= self.pos_rows
        ):
            raise ValueError(
                f"input_chans must start with 0 (cls) and index rows < pos_rows "
                f"({self.pos_rows}), got {self.input_chans}"
            )


def _check_size(name: str, value, low: int) -> None:
    """ValueError naming ``name`` unless ``value`` is an int >= ``low`` (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _as_rows(input_chans) -> tuple[int, ...]:
    """``input_chans`` as a tuple of ints (ValueError for a string or non-integer entries)."""
    try:
        if isinstance(input_chans, str):
            raise TypeError
        return tuple(operator.index(i) for i in input_chans)
    except TypeError:
        raise ValueError(
            f"input_chans must be a sequence of int rows of pos_embed, got {input_chans!r}"
        ) from None


def check_class_count(name: str, value) -> int:
    """``value`` as an int >= 0 (a number of classes; 0 = no head), or ValueError naming ``name``.

    bool and non-integral numbers are refused rather than truncated: ``2.5`` classes or a
    negative count is a mistake, and a negative count would otherwise build a headless model.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be an int >= 0 (0 = no head), got {value!r}")
    return int(value)


def _check_signal(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, A, T) as is, or (B, C, A·T) split into patches of ``patch_size``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    shape = tuple(x.shape)  # as given, for the messages
    if x.dim() == 3:
        if x.shape[-1] % patch_size != 0:
            raise ValueError(
                f"x of shape (B, C, n_times) needs n_times divisible by {patch_size}, "
                f"got {tuple(x.shape)}"
            )
        # and on to the emptiness check: n_times = 0 would otherwise reach the convolution
        x = x.unflatten(-1, (-1, patch_size))
    elif x.dim() != 4 or x.shape[-1] != patch_size:
        raise ValueError(
            f"x must have shape (B, C, A, {patch_size}) or (B, C, A·{patch_size}), "
            f"got {tuple(x.shape)}"
        )
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"x must hold at least one electrode and one patch, got shape {shape}")
    return x


def check_channel_padding_mask(
    channel_padding_mask: torch.Tensor | None, batch: int, n_chans: int
) -> None:
    """ValueError unless ``channel_padding_mask`` is None or a (batch, n_chans) bool tensor."""
    if channel_padding_mask is None:
        return
    if not isinstance(channel_padding_mask, torch.Tensor):
        raise ValueError(
            f"channel_padding_mask must be a (B, C) = {(batch, n_chans)} bool tensor, got "
            f"{type(channel_padding_mask).__name__}"
        )
    if channel_padding_mask.dtype != torch.bool or tuple(channel_padding_mask.shape) != (
        batch,
        n_chans,
    ):
        raise ValueError(
            f"channel_padding_mask must be a (B, C) = {(batch, n_chans)} bool tensor (True = "
            f"padded electrode), got {channel_padding_mask.dtype} of shape "
            f"{tuple(channel_padding_mask.shape)}"
        )


def zero_padded_electrodes(
    x: torch.Tensor, channel_padding_mask: torch.Tensor | None
) -> torch.Tensor:
    """x (B, C, ...) with every value of a padded electrode set to 0 (checked mask; x as is if
    None).

    The padding is otherwise applied by multiplying by 0 (GroupNorm weights, attention
    probabilities, pooling weights), and NaN·0 = NaN: a NaN or inf fill (a common mark of a
    missing electrode) would turn the whole sample's output into NaN.
    """
    if channel_padding_mask is None:
        return x
    check_channel_padding_mask(channel_padding_mask, x.shape[0], x.shape[1])
    padded = channel_padding_mask.to(x.device).view(
        *channel_padding_mask.shape, *[1] * (x.dim() - 2)
    )
    return x.masked_fill(padded, 0)


def token_padding_mask(channel_padding_mask: torch.Tensor | None, n_patches: int):
    """(B, C) electrode padding -> (B, 1 + C·A) token padding (cls never padded), or None."""
    if channel_padding_mask is None:
        return None
    patches = channel_padding_mask.to(torch.bool).repeat_interleave(n_patches, dim=1)
    return F.pad(patches, (1, 0), value=False)


class LaBraMTrunk(nn.Module):
    """Embeddings and blocks shared by the classifier, the pretraining student and the
    tokenizer's encoder and decoder (keys ``cls_token``, ``pos_embed``, ``time_embed``,
    ``patch_embed.*``, ``blocks.*``)."""

    def __init__(self, config: LaBraMConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        self.config = config
        c = config
        factory = {"device": device, "dtype": dtype}
        if c.patch_embed == "temporal_conv":
            self.patch_embed = TemporalConv(c.conv_channels, patch_size=c.patch_size, **factory)
            self.in_features = c.patch_size
        else:
            self.patch_embed = CodePatchEmbed(c.code_dim, c.embed_dim, **factory)
            self.in_features = c.code_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim, **factory))
        self.pos_embed = nn.Parameter(torch.zeros(1, c.pos_rows, c.embed_dim, **factory))
        self.time_embed = nn.Parameter(torch.zeros(1, c.max_patches, c.embed_dim, **factory))
        self.pos_drop = nn.Dropout(c.drop_rate)
        # on the CPU whatever the default device: under `with torch.device("meta")` the rates
        # (Python floats) could not be read back
        rates = (
            torch.linspace(0, c.drop_path_rate, c.depth, device="cpu").tolist() if c.depth else []
        )
        self.blocks = nn.ModuleList(
            Block(
                c.embed_dim,
                c.num_heads,
                c.mlp_ratio,
                qkv_bias=c.qkv_bias,
                qk_norm=c.qk_norm,
                init_values=c.init_values,
                drop_path=rate,
                drop=c.drop_rate,
                attn_drop=c.attn_drop_rate,
                norm_eps=c.norm_eps,
                backend=c.attention_backend,
                **factory,
            )
            for rate in rates
        )
        self.grad_checkpointing = c.grad_checkpointing
        chans = None if c.input_chans is None else torch.tensor(c.input_chans, device=device)
        self.register_buffer("default_input_chans", chans, persistent=False)

    def _apply(self, fn, recurse: bool = True):
        # ``default_input_chans`` is a non-persistent buffer: ``to_empty`` (the way out of the
        # meta device) leaves it uninitialised and ``load_state_dict`` never restores it, which
        # silently gave every electrode the same, arbitrary pos_embed row. Rewritten from the
        # config on the buffer's new device after every move.
        super()._apply(fn, recurse)
        chans = self.default_input_chans
        if chans is not None and chans.device.type != "meta":
            self.default_input_chans = torch.tensor(
                self.config.input_chans, dtype=chans.dtype, device=chans.device
            )
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    def _init_trunk(self) -> None:
        # Untruncated normals (timm's trunc_normal_ cuts at ±2 absolute), as the reference's
        # fine-tuning model. Its pretraining model truncates at ±1 std and initialises the
        # convolutions too; tried for the pretraining model (2026-12-07), the quickstart's masked
        # accuracy after 500 steps fell from 19% to 12-14% (two seeds each), so both models
        # start from this one.
        std = self.config.init_std
        for p in (self.cls_token, self.pos_embed, self.time_embed):
            nn.init.trunc_normal_(p, std=std)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for i, block in enumerate(self.blocks):  # scale residual outputs by depth
            block.attn.proj.weight.data.div_((2.0 * (i + 1)) ** 0.5)
            if hasattr(block.mlp, "fc2"):
                block.mlp.fc2.weight.data.div_((2.0 * (i + 1)) ** 0.5)

    def resolve_input_chans(
        self, input_chans, n_chans: int, device, batch: int | None = None
    ) -> torch.Tensor:
        """(C+1,) or (B, C+1) long rows of ``pos_embed`` for cls + each electrode.

        batch: B of x, checked against a per-sample (B, C+1) ``input_chans`` (unchecked if None).
        """
        if input_chans is None and self.default_input_chans is not None:
            n_default = self.default_input_chans.shape[0] - 1
            if n_default != n_chans:
                # the user passed no input_chans: "input_chans must have shape ..." (below)
                # named an argument they never gave
                raise ValueError(
                    f"x has {n_chans} electrodes but the model's default electrode list "
                    f"(input_chans of its config, e.g. from ch_names) has {n_default}; pass "
                    "input_chans for this electrode set"
                )
            input_chans = self.default_input_chans
        if input_chans is None:
            if n_chans + 1 != self.config.pos_rows:
                raise ValueError(
                    f"input_chans is required: x has {n_chans} electrodes and the model has no "
                    "default electrode list (pass input_chans, or ch_names to create_model)"
                )
            return torch.arange(n_chans + 1, device=device)
        if not isinstance(input_chans, torch.Tensor):
            input_chans = torch.as_tensor(input_chans)
        if (
            input_chans.is_floating_point()
            or input_chans.is_complex()
            or input_chans.dtype == torch.bool
        ):
            # rows are integers: the cast to long below would truncate 1.7 to row 1 and read
            # True/False as rows 1/0
            raise ValueError(
                f"input_chans must hold integer rows of pos_embed, got {input_chans.dtype}"
            )
        if input_chans.dim() not in (1, 2) or input_chans.shape[-1] != n_chans + 1:
            raise ValueError(
                f"input_chans must have shape (C + 1,) or (B, C + 1) with C + 1 = {n_chans + 1} "
                f"entries (cls row 0 first), got shape {tuple(input_chans.shape)}"
            )
        if input_chans.dim() == 2 and batch is not None and input_chans.shape[0] != batch:
            raise ValueError(
                f"per-sample input_chans must have shape (B, C + 1) = {(batch, n_chans + 1)}, got "
                f"shape {tuple(input_chans.shape)}"
            )
        if (
            input_chans.device.type == "cpu"
            and input_chans.numel()
            and not (torch.compiler.is_compiling())
        ):
            low, high = int(input_chans.min()), int(input_chans.max())
            if low < 0 or high >= self.config.pos_rows:
                raise ValueError(
                    f"input_chans values must be in [0, {self.config.pos_rows}), got "
                    f"[{low}, {high}]"
                )
        return input_chans.to(device=device, dtype=torch.long)

    def embed_patches(
        self,
        patches: torch.Tensor,
        n_chans: int,
        input_chans: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Patch embeddings (B, C·A, E) -> tokens (B, 1 + C·A, E) with cls and embeddings.

        mask: (B, C·A) bool, True = replace that patch by ``mask_token`` (1, 1, E) first.
        """
        B, P, E = patches.shape
        A = P // n_chans
        if A > self.config.max_patches:
            raise ValueError(f"at most {self.config.max_patches} patches per electrode, got {A}")
        if mask is not None:
            if mask_token is None:  # (an AttributeError on None named neither argument)
                raise ValueError("mask_token: required with a mask, the (1, 1, E) replacement")
            patches = torch.where(mask[..., None], mask_token.to(patches.dtype), patches)
        rows = self.pos_embed[0][input_chans]  # (C+1, E) or (B, C+1, E)
        if rows.dim() == 2:
            rows = rows.unsqueeze(0)
        body = patches.view(B, n_chans, A, E) + rows[:, 1:, None, :]
        body = body + self.time_embed[0, :A][None, None]
        cls = (self.cls_token + rows[:, :1]).expand(B, 1, E)
        return self.pos_drop(torch.cat((cls.to(body.dtype), body.flatten(1, 2)), dim=1))

    def run_blocks(
        self,
        x: torch.Tensor,
        *,
        key_padding_mask: torch.Tensor | None = None,
        causal: bool = False,
        block_causal: torch.Tensor | None = None,
        task_id: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, N, E) through every block (checkpointed per block if enabled); masks as in
        :class:`eegfast.nn.QKNormAttention`."""
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        kwargs = dict(
            key_padding_mask=key_padding_mask,
            causal=causal,
            block_causal=block_causal,
            task_id=task_id,
        )
        for block in self.blocks:
            if recompute:
                x = checkpoint_block(block, x, **kwargs)
            else:
                x = block(x, **kwargs)
        return x

    def encode(
        self,
        x: torch.Tensor,
        input_chans=None,
        *,
        channel_padding_mask: torch.Tensor | None = None,
        task_id: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, C, A, F) -> all tokens (B, 1 + C·A, E) after the blocks, and the token
        padding mask (B, 1 + C·A) or None."""
        if self.config.patch_embed == "temporal_conv":
            x = _check_signal(x, self.config.patch_size)
        elif x.dim() != 4 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"x must have shape (B, C, A, {self.in_features}), got {tuple(x.shape)}"
            )
        B, C, A, _ = x.shape
        x = zero_padded_electrodes(x, channel_padding_mask)
        chans = self.resolve_input_chans(input_chans, C, x.device, batch=B)
        key_padding = token_padding_mask(channel_padding_mask, A)
        patches = self.patch_embed(x, None if key_padding is None else key_padding[:, 1:])
        tokens = self.embed_patches(patches, C, chans)
        return self.run_blocks(tokens, key_padding_mask=key_padding, task_id=task_id), key_padding


def checkpoint_block(block: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
    """``block(x, **kwargs)`` (x: (B, N, E) -> (B, N, E)), its activations recomputed in the
    backward pass (non-reentrant checkpointing).

    An MoE FFN in a :class:`~eegfast.nn.Block` stores its aux losses and routing statistics
    on itself (``MoEFFN.last_aux``, which the training step reads); torch.compile refuses
    that write inside the checkpointed region (a graph break in every upcycled block at every
    step). Here the region returns them as outputs instead and ``last_aux`` is set outside
    it, to the same values (and once: eager recomputation no longer writes it again)."""
    mlp = getattr(block, "mlp", None)
    if (
        type(block).forward is not Block.forward  # (a subclass's forward may not return aux)
        or not isinstance(mlp, MoEFFN)
        or has_call_hooks(block)  # (its hooks expect its tensor output)
    ):
        return checkpoint(block, x, use_reentrant=False, **kwargs)
    x, *aux = checkpoint(_block_and_moe_aux, block, x, use_reentrant=False, **kwargs)
    if aux:  # (none from a hooked MoE, which stored its own)
        mlp.last_aux = MoEAux(*aux)
    return x


def _block_and_moe_aux(block: Block, x: torch.Tensor, **kwargs) -> tuple[torch.Tensor, ...]:
    """The checkpointed region of :func:`checkpoint_block`: (x, *MoEAux fields), writing
    nothing on the modules (tensors only, as dynamo's checkpoint operator returns them)."""
    x, aux = block(x, return_aux=True, **kwargs)
    if aux is None:
        return (x,)
    return (x, *(aux[f.name] for f in fields(aux)))


def mean_patch_tokens(tokens: torch.Tensor, key_padding: torch.Tensor | None) -> torch.Tensor:
    """Mean over the non-cls, non-padded tokens: (B, 1 + P, E) -> (B, E)."""
    body = tokens[:, 1:]
    if key_padding is None:
        return body.mean(1)
    keep = ~key_padding[:, 1:, None]
    # where, not a product with 0: a non-finite padded token must not reach the sum
    kept = torch.where(keep, body, 0.0).sum(1)
    return kept / keep.sum(1).clamp_min(1).to(body.dtype)


class LaBraM(LaBraMTrunk):
    """LaBraM classifier (and, with ``num_classes=0``, the tokenizer's encoder/decoder).

    Mean of the patch tokens → ``fc_norm`` (LayerNorm) → ``head`` (Linear). State-dict keys are
    the reference's (``cls_token``, ``pos_embed``, ``time_embed``, ``patch_embed.*``,
    ``blocks.*``, ``fc_norm.*``, ``head.*``); see :func:`eegfast.models.load_checkpoint`.

    Example::

        model = eegfast.models.create_model("labram_base", n_outputs=2, ch_names=names)
        logits = model(x)   # x: (B, C, A, 200) in units of 100 µV
    """

    def __init__(self, config: LaBraMConfig, *, device=None, dtype=None) -> None:
        super().__init__(config, device=device, dtype=dtype)
        factory = {"device": device, "dtype": dtype}
        self.fc_norm = nn.LayerNorm(config.embed_dim, eps=config.norm_eps, **factory)
        if config.num_classes > 0:
            self.head = nn.Linear(config.embed_dim, config.num_classes, **factory)
        else:
            self.head = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference initialisation (truncated normal, depth-scaled residual outputs,
        head scaled by ``head_init_scale``) of every parameter: norms and convolutions to their
        defaults, layer scales to ``init_values``, q/v biases to 0 (a trained model is fully
        re-initialised)."""
        for module in self.modules():
            if isinstance(module, nn.LayerNorm | nn.GroupNorm | nn.Conv1d | nn.Conv2d):
                module.reset_parameters()
            for name in ("q_bias", "v_bias"):
                bias = getattr(module, name, None)
                if isinstance(bias, nn.Parameter):
                    nn.init.zeros_(bias)
        for block in self.blocks:
            for gamma in (getattr(block, "gamma_1", None), getattr(block, "gamma_2", None)):
                if gamma is not None:
                    nn.init.constant_(gamma, self.config.init_values)
        self._init_trunk()
        if self.head is not None:
            self.head.weight.data.mul_(self.config.head_init_scale)
            self.head.bias.data.mul_(self.config.head_init_scale)

    def forward_features(
        self,
        x: torch.Tensor,
        input_chans=None,
        *,
        channel_padding_mask: torch.Tensor | None = None,
        task_id: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, C, A, F) -> pooled features (B, E)."""
        tokens, key_padding = self.encode(
            x, input_chans, channel_padding_mask=channel_padding_mask, task_id=task_id
        )
        return self.fc_norm(mean_patch_tokens(tokens, key_padding))

    def forward_patch_tokens(
        self,
        x: torch.Tensor,
        input_chans=None,
        *,
        channel_padding_mask: torch.Tensor | None = None,
        task_id: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, C, A, F) -> ``fc_norm`` of every patch token (B, C·A, E) (the tokenizer)."""
        tokens, _ = self.encode(
            x, input_chans, channel_padding_mask=channel_padding_mask, task_id=task_id
        )
        return self.fc_norm(tokens[:, 1:])

    def forward(
        self,
        x: torch.Tensor,
        input_chans=None,
        *,
        channel_padding_mask: torch.Tensor | None = None,
        task_id: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, C, A, 200) or (B, C, A·200) -> logits (B, num_classes) (features if no head).

        input_chans: (C+1,) or (B, C+1) long pos_embed rows (default: the model's electrode
        list). channel_padding_mask: (B, C) bool, True = padded electrode.
        """
        features = self.forward_features(
            x, input_chans, channel_padding_mask=channel_padding_mask, task_id=task_id
        )
        return features if self.head is None else self.head(features)
