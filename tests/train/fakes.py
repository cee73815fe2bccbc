"""Small stand-ins for the engine tests: a synthetic EEG dataset and tiny models with the
interfaces of eegfast's LaBraM classifier, pretraining model and tokenizer (CONTRACTS.md)."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode


class SyntheticEEG(torch.utils.data.Dataset):
    """Items like eegfast.data.ShardDataset's: x (C, A, 200), input_chans (C+1,), label, subject,
    task. Class 1 adds a 10 Hz rhythm so the label is learnable."""

    def __init__(self, n: int = 48, channels=(4, 3), patches: int = 2, tasks=("mi",), seed=0):
        g = torch.Generator().manual_seed(seed)
        t = torch.arange(patches * 200) / 200.0
        self.items = []
        for i in range(n):
            c = channels[i % len(channels)]
            label = (i // len(channels)) % 2
            task = tasks[(i // 2) % len(tasks)]
            x = 0.5 * torch.randn(c, patches * 200, generator=g)
            if label:
                x = x + torch.sin(2 * torch.pi * 10 * t)
            self.items.append(
                {
                    "x": x.reshape(c, patches, 200).float(),
                    "input_chans": torch.arange(c + 1, dtype=torch.long),
                    "label": label,
                    "subject": f"s{i % 6}",
                    "task": task,
                    "recording": f"s{i % 6}-r{i % 2}",
                }
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]

    def group_keys(self) -> list:
        return [(it["task"], it["x"].shape[0]) for it in self.items]


def collate(items: list[dict]) -> dict:
    return {
        "x": torch.stack([it["x"] for it in items]),
        "input_chans": torch.stack([it["input_chans"] for it in items]),
        "channel_padding_mask": torch.zeros(len(items), items[0]["x"].shape[0], dtype=torch.bool),
        "label": torch.tensor([it["label"] for it in items], dtype=torch.long),
        "subject": [it["subject"] for it in items],
        "task": [it["task"] for it in items],
    }


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, task_id=None):
        return x + self.mlp(self.norm1(x))


class TinyClassifier(nn.Module):
    """forward(x, input_chans, *, channel_padding_mask=None, task_id=None) -> logits."""

    def __init__(self, num_classes: int = 2, dim: int = 16, depth: int = 2) -> None:
        super().__init__()
        self.patch_embed = nn.Linear(101, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, 130, dim))
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.fc_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes) if num_classes else None

    def forward_features(self, x, input_chans=None, *, channel_padding_mask=None, task_id=None):
        spectrum = torch.fft.rfft(x.float(), dim=-1).abs().clamp_min(1e-6).log()
        h = self.patch_embed(spectrum).flatten(1, 2)  # (B, C*A, dim)
        h = h + self.pos_embed[:, : h.shape[1]]
        for block in self.blocks:
            h = block(h, task_id=task_id)
        return self.fc_norm(h.mean(1))

    def forward(self, x, input_chans=None, *, channel_padding_mask=None, task_id=None):
        f = self.forward_features(x, input_chans, channel_padding_mask=channel_padding_mask)
        return f if self.head is None else self.head(f)


class TinyTokenizer(nn.Module):
    """Codes = argmax of a fixed random projection of the patch spectrum (no training)."""

    def __init__(self, vocab: int = 16) -> None:
        super().__init__()
        self.proj = nn.Linear(101, vocab)
        self.loss_scale = nn.Parameter(torch.ones(()))

    def get_codebook_indices(self, x, input_chans=None, **_):
        spectrum = torch.fft.rfft(x.float(), dim=-1).abs().clamp_min(1e-6).log()
        return self.proj(spectrum).argmax(-1).flatten(1)

    def forward(self, x, input_chans=None, **_):
        spectrum = torch.fft.rfft(x.float(), dim=-1).abs().clamp_min(1e-6).log()
        rec = self.loss_scale * self.proj(spectrum)
        loss = F.mse_loss(rec, torch.zeros_like(rec))
        return SimpleNamespace(loss=loss, rec_loss=loss.detach())


class TinyPretrain(nn.Module):
    """forward(x, input_chans, targets, mask) -> .loss/.accuracy (symmetric masked CE)."""

    def __init__(self, vocab: int = 16, dim: int = 16) -> None:
        super().__init__()
        self.student = TinyClassifier(num_classes=0, dim=dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.lm_head = nn.Linear(dim, vocab)

    def forward(self, x, input_chans, targets, mask=None, **_):
        s = self.student
        spectrum = torch.fft.rfft(x.float(), dim=-1).abs().clamp_min(1e-6).log()
        h = s.patch_embed(spectrum).flatten(1, 2)
        losses, accs = [], []
        for m in (mask, ~mask):
            hm = torch.where(m[..., None], self.mask_token.expand_as(h), h)
            hm = hm + s.pos_embed[:, : h.shape[1]]
            for block in s.blocks:
                hm = block(hm)
            logits = self.lm_head(s.fc_norm(hm))[m]
            losses.append(F.cross_entropy(logits, targets[m]))
            accs.append((logits.argmax(-1) == targets[m]).float().mean())
        return SimpleNamespace(loss=losses[0] + losses[1], accuracy=(accs[0] + accs[1]) / 2)


class HostReads(TorchDispatchMode):
    """Counts the ops that need a tensor's values on the host: reads of a value, and outputs
    whose shape depends on values (boolean indexing, nonzero, masked_select). On a GPU each one
    makes the host wait for every kernel queued before it."""

    READS = (
        torch.ops.aten._local_scalar_dense.default,
        torch.ops.aten.equal.default,
        torch.ops.aten.nonzero.default,
        torch.ops.aten.masked_select.default,
    )
    INDEXING = (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default,
                torch.ops.aten.index_put_.default)  # fmt: skip

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self._counting = True

    @contextlib.contextmanager
    def paused(self):
        self._counting = False
        try:
            yield
        finally:
            self._counting = True

    @classmethod
    def on_device(cls, monkeypatch) -> HostReads:
        """A counter that leaves out the reads a GPU run never makes: the models' check of
        input_chans when it is on the host (on a GPU it has gone to the device), and the CPU
        Linears' check that their pre-packed weights are current (oneDNN packing is CPU-only)."""
        from eegfast.models.labram import LaBraMTrunk
        from eegfast.nn import linear

        reads = cls()

        def uncounted(function):
            def call(*args, **kwargs):
                with reads.paused():
                    return function(*args, **kwargs)

            return call

        monkeypatch.setattr(
            LaBraMTrunk, "resolve_input_chans", uncounted(LaBraMTrunk.resolve_input_chans)
        )
        monkeypatch.setattr(linear, "_packed_weight", uncounted(linear._packed_weight))
        return reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self._counting and (func in self.READS or self._boolean_index(func, args)):
            self.count += 1
        return func(*args, **(kwargs or {}))

    def _boolean_index(self, func, args) -> bool:
        if func not in self.INDEXING or len(args) < 2:
            return False
        indices = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
        return any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices
        )
