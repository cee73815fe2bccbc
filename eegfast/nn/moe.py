"""Top-k Mixture-of-Experts FFN: a drop-in for the two-layer GELU MLP (``fc1`` / act / ``fc2``).

:class:`MoEFFN` routes every token to ``top_k`` of ``num_experts`` expert MLPs (linear gate →
softmax → top-k, weights renormalised over the chosen experts) and runs them with the
:mod:`eegfast.ops.moe` kernels (dispatch, grouped expert GEMMs, combine). Dropless by default.
With ``top_k=1`` the renormalised weight is 1; the router's gradient is then the straight-through
``p / stop_gradient(p)`` one (the expert's output times d log p), so the router still learns.

Task-aware routing (``num_tasks > 0``): ``forward(x, task_id=...)`` adds a learned per-task
term to the router, so tasks can prefer different experts:

- ``task_routing="bias"`` (default): a per-task gate bias (num_tasks, E) added to the logits.
- ``task_routing="embedding"``: a learned task embedding (num_tasks, dim) added to the router
  input.

Both start at zero (routing starts task-agnostic). ``"bias"`` is the default because it
learned the task split better in ``python -m benchmarks.bench_moe --task-routing`` (4 tasks
with conflicting teacher MLPs over the same inputs, 8 experts, top-2, 400 Adam steps; held-out
MSE / variance over 3 seeds): bias 0.058, embedding 0.124, no task input 0.79. The embedding's
effect on the logits is ``router.weight @ embed``: tied to a router weight that is initialised
small and is also fitted to the token features, so the task signal reaches the logits late and
weakly; the bias acts on the logits directly and costs only num_tasks x E parameters.

Auxiliary losses (Switch Transformer): ``load_balance_loss = E * sum_e f_e P_e`` (f_e: fraction
of the T·k slots routed to expert e, P_e: mean router probability of e; 1 when balanced) and
``z_loss = mean(logsumexp(logits)^2)``. They are in the graph; add them to the task loss with
small weights (typically 1e-2 and 1e-3), e.g. via :func:`moe_aux_losses`. In training under
torch.distributed (world size > 1) they are of every rank's tokens together: the slot and token
counts are all-reduced in each layer's forward (every rank must run it, as under DDP / FSDP),
and each rank's value is its share, W · (its sum over its tokens) / (all ranks' tokens), so
that the mean over the ranks (DDP / FSDP's gradient average, the engine's logged mean) is the
whole batch's loss, as one process on that batch would have it. ``expert_load``, ``tokens``
and the entropy stay this rank's own. Not reproduced across process counts: the capacity limit
(``capacity_factor``) counts each rank's tokens, and the jitter is drawn per rank.

Padding (``forward(x, padding_mask=...)``, True = padding token, e.g. the patches of padded
electrodes in a batch that mixes electrode sets; :class:`~eegfast.nn.Block` passes its key
padding mask): padding tokens are not routed (no expert slot, output 0) and every aux loss and
statistic is a mean over the real tokens, so a real token's output and the losses do not
depend on how much padding the batch holds.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from eegfast.nn._ranks import sum_over_ranks, world_size
from eegfast.ops.moe import MAX_EXPERTS, moe_combine, moe_dispatch, moe_expert_ffn

TaskRouting = Literal["bias", "embedding"]


@dataclass(frozen=True)
class MoEAux:
    """What one :class:`MoEFFN` forward reports. Indexable by name as well (``aux["z_loss"]``)."""

    load_balance_loss: torch.Tensor  # () fp32, in the graph
    z_loss: torch.Tensor  # () fp32, in the graph
    expert_load: torch.Tensor  # (E,) fp32 fraction of slots routed to each expert (before drops)
    router_entropy: torch.Tensor  # () fp32 mean entropy of the router distribution (detached)
    dropped: torch.Tensor  # () int64 slots dropped by the capacity limit (0 when dropless)
    tokens: torch.Tensor  # () int64 real (non-padding) tokens routed: the weight of the means

    def __getitem__(self, name: str) -> torch.Tensor:
        return getattr(self, name)

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class MoEFFN(nn.Module):
    """Top-k MoE replacement of ``Mlp(dim, hidden)``: ``(..., dim) -> (..., out_dim)``.

    Args:
        dim, hidden: as the dense MLP (``fc1``: dim → hidden, ``fc2``: hidden → out_dim).
        num_experts: E in [1, 64]. top_k: k in [1, E] (1 or 2 in practice).
        out_dim: fc2 output size (default ``dim``).
        num_tasks: > 0 enables task-aware routing with ``task_routing``.
        capacity_factor: None (dropless) or a finite c > 0: each expert takes at most
            ``ceil(c * T * k / E)`` slots (T: the real, non-padding tokens), earliest tokens
            first; the others are dropped (their gate contribution is 0, the residual path
            carries the token) and counted in ``last_aux.dropped``. Dropped slots cost no
            expert FLOPs. T and the order are those of the whole call, in eval mode too: a
            sample's output then depends on the other samples of its batch and on its tokens'
            order (electrode order); keep None where it must not (batched inference).
        jitter_eps: multiplicative router-input noise ``U(1 - eps, 1 + eps)`` in training.
        drop: dropout on the output (the dense Mlp's ``drop``). Only there: the fused expert
            FFN has no dropout between its two products, where the reference / timm Mlp
            applies the same ``drop`` too, so with ``drop > 0`` an upcycled model trains
            with less dropout than its dense original (LaBraM's configs use 0).
        backend: forwarded to the ops (None = automatic).

    State dict (stacked experts, each slice laid out like ``nn.Linear``)::

        router.weight   (E, dim)
        fc1_weight      (E, hidden, dim)     fc1_bias  (E, hidden)
        fc2_weight      (E, out_dim, hidden) fc2_bias  (E, out_dim)
        task_bias       (num_tasks, E)       # task_routing="bias", num_tasks > 0
        task_embed      (num_tasks, dim)     # task_routing="embedding", num_tasks > 0

    After each forward, ``last_aux`` holds a :class:`MoEAux`. That write is a side effect,
    which torch.compile refuses inside an activation-checkpointed region (a graph break per
    block); ``forward(..., return_aux=True)`` writes nothing and returns the report instead,
    which the checkpointed blocks of the LaBraM models use (the block returns it from its
    checkpointed region and ``last_aux`` is set outside, see
    :func:`eegfast.models.labram.checkpoint_block`), as do the eegfast ``Block`` modules
    of another model checkpointed by ``eegfast.train.engine.enable_activation_checkpointing``
    (whose hooks run outside the region). A LaBraM block with hooks (FSDP2's
    ``fully_shard`` adds them) keeps its tensor output and the write stays in the region:
    compiled, that needs ``torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint``,
    which :func:`eegfast.train.fit` sets while it trains a compiled checkpointed model.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int,
        top_k: int = 2,
        *,
        out_dim: int | None = None,
        num_tasks: int = 0,
        task_routing: TaskRouting = "bias",
        capacity_factor: float | None = None,
        jitter_eps: float = 0.0,
        drop: float = 0.0,
        backend: str | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if not 1 <= num_experts <= MAX_EXPERTS:
            raise ValueError(f"num_experts must be in [1, {MAX_EXPERTS}], got {num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(
                f"top_k must be in [1, num_experts={num_experts}], got {top_k} "
                "(a token cannot choose more experts than exist)"
            )
        if num_tasks < 0:
            raise ValueError(f"num_tasks must be >= 0, got {num_tasks}")
        if task_routing not in ("bias", "embedding"):
            raise ValueError(f"task_routing must be 'bias' or 'embedding', got {task_routing!r}")
        for name, size in (("dim", dim), ("hidden", hidden), ("out_dim", out_dim)):
            # (0 failed in reset_parameters with a bare "float division by zero")
            if size is not None and not (isinstance(size, numbers.Integral) and size >= 1):
                raise ValueError(f"{name} must be an int >= 1, got {size!r}")
        if capacity_factor is not None and not 0 < capacity_factor < math.inf:
            # inf, meant as "no limit", overflowed the capacity's integer: an OverflowError,
            # or, with a padding mask, a negative capacity that dropped every slot silently
            raise ValueError(
                f"capacity_factor must be finite and > 0, or None (no limit), got {capacity_factor}"
            )
        if not jitter_eps >= 0:  # (NaN too)
            raise ValueError(f"jitter_eps must be >= 0, got {jitter_eps}")
        factory = {"device": device, "dtype": dtype}
        out_dim = out_dim or dim
        self.dim, self.hidden, self.out_dim = dim, hidden, out_dim
        self.num_experts, self.top_k, self.num_tasks = num_experts, top_k, num_tasks
        self.task_routing = task_routing
        self.capacity_factor, self.jitter_eps, self.backend = capacity_factor, jitter_eps, backend
        self.router = nn.Linear(dim, num_experts, bias=False, **factory)
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, hidden, dim, **factory))
        self.fc1_bias = nn.Parameter(torch.empty(num_experts, hidden, **factory))
        self.fc2_weight = nn.Parameter(torch.empty(num_experts, out_dim, hidden, **factory))
        self.fc2_bias = nn.Parameter(torch.empty(num_experts, out_dim, **factory))
        if num_tasks and task_routing == "bias":
            self.task_bias = nn.Parameter(torch.zeros(num_tasks, num_experts, **factory))
        if num_tasks and task_routing == "embedding":
            self.task_embed = nn.Parameter(torch.zeros(num_tasks, dim, **factory))
        self.drop = nn.Dropout(drop)
        self.last_aux: MoEAux | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert as a fresh ``nn.Linear`` pair; router small so routing starts uniform."""
        for weight, bias in ((self.fc1_weight, self.fc1_bias), (self.fc2_weight, self.fc2_bias)):
            bound = 1.0 / math.sqrt(weight.shape[2])
            nn.init.uniform_(weight, -bound, bound)
            nn.init.uniform_(bias, -bound, bound)
        nn.init.normal_(self.router.weight, std=0.02)

    def extra_repr(self) -> str:
        text = (
            f"dim={self.dim}, hidden={self.hidden}, out_dim={self.out_dim}, "
            f"num_experts={self.num_experts}, top_k={self.top_k}"
        )
        if self.num_tasks:
            text += f", num_tasks={self.num_tasks}, task_routing={self.task_routing!r}"
        if self.capacity_factor is not None:
            text += f", capacity_factor={self.capacity_factor}"
        return text

    def __getstate__(self) -> dict:
        # last_aux is the last forward's report; after a forward with grad its losses are
        # non-leaf tensors, which copy.deepcopy refuses (an EMA copy, AveragedModel, a
        # "best model" snapshot raised). A copy or a pickle starts without one.
        state = super().__getstate__()
        state["last_aux"] = None
        return state

    @classmethod
    def from_dense(
        cls,
        fc1: nn.Linear,
        fc2: nn.Linear,
        num_experts: int,
        top_k: int = 2,
        *,
        noise_std: float = 0.0,
        generator: torch.Generator | None = None,
        **kwargs,
    ) -> MoEFFN:
        """Sparse upcycling: every expert a copy of the dense ``fc1`` / ``fc2`` (plus optional
        Gaussian noise of ``noise_std`` times each weight tensor's std), fresh router. Built
        where ``fc1``'s weight is and in its dtype, then moved to ``device`` / ``dtype`` if
        given (they had collided with those, a TypeError of "multiple values")."""
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        if fc1.bias is None or fc2.bias is None:
            raise ValueError("from_dense: fc1 and fc2 must have biases (as the LaBraM Mlp)")
        if fc2.in_features != fc1.out_features:
            raise ValueError(
                f"from_dense: fc1 gives {fc1.out_features} features but fc2 takes {fc2.in_features}"
            )
        weight = fc1.weight
        moe = cls(
            fc1.in_features,
            fc1.out_features,
            num_experts,
            top_k,
            out_dim=fc2.out_features,
            device=weight.device,
            dtype=weight.dtype,
            **kwargs,
        )
        with torch.no_grad():
            for stacked, dense in (
                (moe.fc1_weight, fc1.weight),
                (moe.fc1_bias, fc1.bias),
                (moe.fc2_weight, fc2.weight),
                (moe.fc2_bias, fc2.bias),
            ):
                stacked.copy_(dense.detach().expand_as(stacked))
                # (one value has no spread: its std is NaN, which made every expert NaN; a
                # meta tensor, a model built for its shapes only, has no values to spread)
                if noise_std > 0 and dense.numel() > 1 and not dense.is_meta:
                    scale = noise_std * float(dense.detach().float().std())
                    # drawn where the generator lives (CPU by default: the same noise on any
                    # device); a CUDA generator cannot draw CPU numbers
                    noise = torch.randn(
                        stacked.shape,
                        generator=generator,
                        dtype=torch.float32,
                        device=generator.device if generator is not None else "cpu",
                    )
                    stacked.add_((noise * scale).to(stacked.device, stacked.dtype))
        if device is not None or dtype is not None:
            moe = moe.to(device=device, dtype=dtype)
        return moe

    def _task_ids(self, task_id, leading: tuple[int, ...], T: int, device) -> torch.Tensor | None:
        """Per-token task ids (T,) from an int, a () tensor, per-sample (B,) or per-token ids."""
        if task_id is None:
            return None
        if self.num_tasks == 0:
            raise ValueError("task_id was given but this MoEFFN has num_tasks=0")
        ids = torch.as_tensor(task_id)
        if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise TypeError(f"task_id must hold integers, got {ids.dtype}")
        valid_range = f"task_id values must be in [0, num_tasks={self.num_tasks})"
        if ids.numel() > 0 and ids.device.type == "cpu" and not torch.compiler.is_compiling():
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= self.num_tasks:
                raise ValueError(f"{valid_range}, got values in [{low}, {high}]")
        elif ids.numel() > 0:
            # Ids already on the GPU (or traced): reading them on the host would make every MoE
            # layer wait for the GPU (and break a compiled graph); the check runs on the device
            # instead, failing as a device-side assertion, as an out-of-range embedding does.
            torch._assert_async(((ids >= 0) & (ids < self.num_tasks)).all(), valid_range)
        ids = ids.to(device=device, dtype=torch.long)
        if ids.dim() == 0:
            return ids.expand(T)
        if ids.dim() == 1 and len(leading) >= 1 and ids.shape[0] == leading[0]:
            return ids.reshape(-1, *([1] * (len(leading) - 1))).expand(leading).reshape(T)
        if ids.shape == leading or (ids.dim() == 1 and ids.shape[0] == T):
            return ids.reshape(T)
        raise ValueError(
            f"task_id must be an int, shape () , ({leading[0] if leading else T},) per sample or "
            f"{tuple(leading)} per token, got shape {tuple(ids.shape)}"
        )

    def router_logits(self, x: torch.Tensor, task_ids: torch.Tensor | None) -> torch.Tensor:
        """(T, dim) -> (T, E) router logits, fp32 (fp64 for fp64 x), with task term and jitter."""
        router_in = x
        if task_ids is not None and self.task_routing == "embedding":
            router_in = router_in + self.task_embed[task_ids].to(router_in.dtype)
        if self.training and self.jitter_eps > 0:
            noise = torch.empty_like(router_in).uniform_(1 - self.jitter_eps, 1 + self.jitter_eps)
            router_in = router_in * noise
        precision = torch.promote_types(router_in.dtype, torch.float32)  # fp32, or fp64
        with torch.autocast(x.device.type, enabled=False):  # routing decisions in full precision
            logits = F.linear(router_in.to(precision), self.router.weight.to(precision))
        if task_ids is not None and self.task_routing == "bias":
            logits = logits + self.task_bias[task_ids].to(precision)
        return logits

    def _valid_tokens(self, padding_mask, leading: tuple[int, ...], T: int, device):
        """(T,) bool, True = real token, from a padding mask (True = padding) shaped as x's
        leading dims; None without a mask."""
        if padding_mask is None:
            return None
        if not isinstance(padding_mask, torch.Tensor) or padding_mask.dtype != torch.bool:
            raise TypeError(
                "padding_mask must be a bool tensor (True = padding token), got "
                f"{getattr(padding_mask, 'dtype', type(padding_mask).__name__)}"
            )
        if tuple(padding_mask.shape) != leading:
            raise ValueError(
                f"padding_mask must have x's leading shape {leading}, "
                f"got {tuple(padding_mask.shape)}"
            )
        return ~padding_mask.to(device).reshape(T)

    def forward(
        self,
        x: torch.Tensor,
        task_id=None,
        *,
        padding_mask: torch.Tensor | None = None,
        return_aux: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, MoEAux]:
        """x: (B, N, dim) or (T, dim) (any leading dims); task_id: None, an int, (B,) per
        sample or per-token ids, in [0, num_tasks). Returns (..., out_dim), and stores this
        forward's :class:`MoEAux` in ``last_aux``; with ``return_aux`` returns
        ``(output, aux)`` and stores nothing (``last_aux`` is left as it was: for a caller
        inside an activation-checkpointed region, which sets it outside).

        padding_mask: bool, x's leading shape (e.g. (B, N)), True = padding token (a padded
        electrode's patch). Padding tokens are not routed (they take no expert slot, cost no
        expert FLOPs and their output is 0) and are left out of the aux losses and statistics
        (means over the real tokens; the capacity counts the real tokens only), so the real
        tokens get what they would get without the padding in the batch.
        """
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have last dim {self.dim}, got shape {tuple(x.shape)}")
        leading = tuple(x.shape[:-1])
        flat = x.reshape(-1, self.dim)
        T, E, k = flat.shape[0], self.num_experts, self.top_k
        task_ids = self._task_ids(task_id, leading, T, x.device)
        valid = self._valid_tokens(padding_mask, leading, T, x.device)

        # Padding tokens' values are arbitrary: keep them out of the router's arithmetic (a
        # non-finite one would reach the router's gradient through 0 * inf).
        router_in = flat if valid is None else flat.masked_fill(~valid[:, None], 0)
        logits = self.router_logits(router_in, task_ids)
        probs = logits.softmax(-1)
        top_p, expert_idx = probs.topk(k, dim=-1)
        if k == 1:
            # Renormalised over one expert the gate is the constant 1, through which no gradient
            # reaches the router (nor the task bias / embedding): only the aux losses would
            # train it. p / p.detach() is exactly 1 in the forward (the same outputs, upcycled
            # models included) and passes d log p to the router in the backward.
            gates = top_p / top_p.detach()
        else:
            gates = top_p / top_p.sum(-1, keepdim=True)
        dropped = torch.zeros((), dtype=torch.int64, device=x.device)
        if valid is None:
            plan = moe_dispatch(expert_idx, E, backend=self.backend)
            counts, offsets, sorted_slots, slot_pos = plan
            n_tokens = None
        else:
            # Padding tokens' slots go to the extra bucket E that no expert computes (the
            # bucket of dropped slots below): they take no slot and rank behind no real token.
            valid_slots = valid[:, None].expand(T, k)
            routed = torch.where(valid_slots, expert_idx, torch.full_like(expert_idx, E))
            counts, offsets, sorted_slots, slot_pos = moe_dispatch(
                routed, E + 1, backend=self.backend
            )
            counts, offsets = counts[:E], offsets[: E + 1]
            n_tokens = valid.sum()
        if self.capacity_factor is not None:
            # At most every slot (T * k): no drops, as any larger capacity, which a huge factor
            # (1e30) overflowed int64 with (every slot dropped, or an OverflowError).
            if valid is None:
                capacity = math.ceil(min(self.capacity_factor * T * k / E, T * k))
            else:  # the same arithmetic over the real tokens, on the device (no host sync)
                wide = n_tokens.to(torch.float64) * self.capacity_factor * k / E
                capacity = wide.clamp_max(T * k).ceil().to(torch.int64)
            rank_in_expert = slot_pos - offsets[expert_idx.reshape(-1)]
            keep = (rank_in_expert < capacity).reshape(T, k)
            if valid is not None:
                keep = keep & valid_slots
                dropped = (valid_slots & ~keep).sum()
            else:
                dropped = (~keep).sum()
            # Dropped slots go to an extra bucket E that no expert computes.
            bucketed = torch.where(keep, expert_idx, torch.full_like(expert_idx, E))
            _, offsets_b, sorted_slots, slot_pos = moe_dispatch(
                bucketed, E + 1, backend=self.backend
            )
            offsets = offsets_b[: E + 1]
            gates = gates * keep
        elif valid is not None:
            gates = gates * valid_slots

        compute_dtype = flat.dtype
        if torch.is_autocast_enabled(x.device.type):
            compute_dtype = torch.get_autocast_dtype(x.device.type)
        weights = [
            p.to(compute_dtype)
            for p in (self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias)
        ]
        with torch.autocast(x.device.type, enabled=False):
            y_sorted = moe_expert_ffn(
                flat.to(compute_dtype), sorted_slots, offsets, *weights, k, backend=self.backend
            )
            out = moe_combine(y_sorted, gates, slot_pos, backend=self.backend)
        out = self.drop(out)

        if T == 0:
            zero = logits.sum()  # 0, but attached to the graph like the losses below
            expert_load = logits.new_zeros(E)
            load_balance, z_loss, entropy = zero, zero, zero.detach()
        elif valid is None:
            expert_load = counts.to(logits.dtype) / (T * k)
            load_balance = E * (expert_load * probs.mean(0)).sum()
            z_loss = torch.logsumexp(logits, dim=-1).square().mean()
            entropy = -(probs * probs.clamp_min(1e-20).log()).sum(-1).mean().detach()
        else:  # means over the real tokens (0 when there are none)
            weight = valid.to(logits.dtype)
            count = n_tokens.clamp_min(1).to(logits.dtype)
            expert_load = counts.to(logits.dtype) / (count * k)
            mean_probs = (probs * weight[:, None]).sum(0) / count
            load_balance = E * (expert_load * mean_probs).sum()
            z_loss = (torch.logsumexp(logits, dim=-1).square() * weight).sum() / count
            token_entropy = -(probs * probs.clamp_min(1e-20).log()).sum(-1)
            entropy = ((token_entropy * weight).sum() / count).detach()
        if self.training and world_size() > 1:
            load_balance, z_loss = self._aux_losses_over_ranks(logits, probs, counts, valid)
        # new_full is an async fill on the device; torch.tensor(T, device=...) would copy from host
        tokens = dropped.new_full((), T) if n_tokens is None else n_tokens.to(torch.int64)
        aux = MoEAux(load_balance, z_loss, expert_load, entropy, dropped, tokens)
        out = out.reshape(*leading, self.out_dim)
        if return_aux:
            return out, aux
        self.last_aux = aux
        return out

    def _aux_losses_over_ranks(
        self,
        logits: torch.Tensor,
        probs: torch.Tensor,
        counts: torch.Tensor,
        valid: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(load_balance_loss, z_loss) of every rank's real tokens together, as this rank's
        share: logits, probs (T, E) and valid (T,) this rank's, counts (E,) its real tokens'
        slots per expert.

        Each rank's own losses, averaged over the ranks by DDP / FSDP (gradients) and the
        engine (logged values), were not the whole batch's: f_e (a fraction of the slots) and
        P_e (a mean probability) of each rank's tokens multiply, and the means weighed ranks
        with more padding as much as the others. Here the slot and token counts are summed
        over the ranks (no gradient), f_e is the global fraction, and this rank's terms are
        sums over its tokens divided by the global token count N, times the world size W:
        the mean over ranks is the whole batch's loss, and so is its gradient."""
        E, k, dtype = self.num_experts, self.top_k, logits.dtype
        if valid is None:
            local = torch.full((1,), logits.shape[0], dtype=torch.int64, device=counts.device)
            prob_sum = probs.sum(0)
            z_sum = torch.logsumexp(logits, dim=-1).square().sum()
        else:
            local = valid.sum().reshape(1)
            weight = valid.to(dtype)
            prob_sum = (probs * weight[:, None]).sum(0)
            z_sum = (torch.logsumexp(logits, dim=-1).square() * weight).sum()
        totals = torch.cat([counts.to(torch.int64), local.to(torch.int64)])
        totals = sum_over_ranks(totals)
        tokens = totals[E].clamp_min(1).to(dtype)
        expert_load = totals[:E].to(dtype) / (tokens * k)  # f_e of the whole batch
        share = world_size() / tokens
        return E * (expert_load * prob_sum).sum() * share, z_sum * share


def moe_aux_losses(model: nn.Module) -> dict[str, torch.Tensor]:
    """Sum of ``load_balance_loss`` and ``z_loss`` over every :class:`MoEFFN` in ``model`` that
    has run a forward (zeros if none). Unweighted: scale them in the training loss."""
    totals: dict[str, torch.Tensor] = {}
    for module in model.modules():
        if isinstance(module, MoEFFN) and module.last_aux is not None:
            for name in ("load_balance_loss", "z_loss"):
                value = module.last_aux[name]
                totals[name] = value if name not in totals else totals[name] + value
    for name in ("load_balance_loss", "z_loss"):
        totals.setdefault(name, torch.zeros(()))
    return totals
