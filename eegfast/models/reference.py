"""A plain-PyTorch re-creation of the reference LaBraM architecture, from the spec.

This is the yardstick of the equivalence tests and the "reference recipe" of the benchmarks:
written only from ../shared/spec/LABRAM.md, in the reference's style of computation
(qkv reshape + permute copies, explicit softmax attention, einsum-free embedding adds, two
sequential student passes for the symmetric objective), with the reference's state-dict keys.
It deliberately imports nothing from eegfast, so a mistake in eegfast's layers cannot hide in
it. Not for production use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RefAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        if qk_norm:
            self.q_norm = nn.LayerNorm(head_dim, eps=1e-6)
            self.k_norm = nn.LayerNorm(head_dim, eps=1e-6)
        else:
            self.q_norm = self.k_norm = None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias)
        qkv = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.q_norm is not None:
            q = self.q_norm(q).type_as(v)
            k = self.k_norm(k).type_as(v)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, -1)
        return self.proj(x)


class RefMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class RefBlock(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias, qk_norm, init_values) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RefAttention(dim, num_heads, qkv_bias, qk_norm)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = RefMlp(dim, dim * 4)
        if init_values > 0:
            self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
            self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gamma_1 is None:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        x = x + self.gamma_1 * self.attn(self.norm1(x))
        return x + self.gamma_2 * self.mlp(self.norm2(x))


class RefTemporalConv(nn.Module):
    def __init__(self, out_chans: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, out_chans, kernel_size=(1, 15), stride=(1, 8), padding=(0, 7))
        self.norm1 = nn.GroupNorm(4, out_chans)
        self.conv2 = nn.Conv2d(out_chans, out_chans, kernel_size=(1, 3), padding=(0, 1))
        self.norm2 = nn.GroupNorm(4, out_chans)
        self.conv3 = nn.Conv2d(out_chans, out_chans, kernel_size=(1, 3), padding=(0, 1))
        self.norm3 = nn.GroupNorm(4, out_chans)
        self.gelu = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, A, T = x.shape
        x = x.reshape(B, C * A, T).unsqueeze(1)
        x = self.gelu(self.norm1(self.conv1(x)))
        x = self.gelu(self.norm2(self.conv2(x)))
        x = self.gelu(self.norm3(self.conv3(x)))  # (B, k, C·A, 25)
        B, K, P, S = x.shape
        return x.permute(0, 2, 3, 1).reshape(B, P, S * K)


class RefPatchEmbed(nn.Module):
    """The decoder's 1×1 conv over codes laid out (B, code_dim, C, A)."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class RefTransformer(nn.Module):
    """Classifier / tokenizer encoder (in_chans=1) or decoder (in_chans=code_dim)."""

    def __init__(
        self,
        embed_dim=200,
        depth=12,
        num_heads=10,
        out_chans=8,
        num_classes=0,
        qkv_bias=False,
        qk_norm=True,
        init_values=0.1,
        in_chans=1,
        student=False,
        vocab_size=8192,
    ) -> None:
        super().__init__()
        self.in_chans = in_chans
        if in_chans == 1:
            self.patch_embed = RefTemporalConv(out_chans)
        else:
            self.patch_embed = RefPatchEmbed(in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        if student:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 129, embed_dim))
        self.time_embed = nn.Parameter(torch.zeros(1, 16, embed_dim))
        self.blocks = nn.ModuleList(
            RefBlock(embed_dim, num_heads, qkv_bias, qk_norm, init_values) for _ in range(depth)
        )
        self.student = student
        if student:
            self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
            self.lm_head = nn.Linear(embed_dim, vocab_size)
        else:
            self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6)
            self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else None

    def tokens(self, x, input_chans, bool_masked_pos=None):
        if self.in_chans == 1:
            B, C, A, _ = x.shape
        else:  # (B, code_dim, C, A)
            B, _, C, A = x.shape
        x = self.patch_embed(x)
        if bool_masked_pos is not None:
            w = bool_masked_pos.unsqueeze(-1).type_as(self.mask_token)
            x = x * (1 - w) + self.mask_token.expand(B, x.shape[1], -1) * w
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        used = self.pos_embed[:, input_chans]
        pos = used[:, 1:, :].unsqueeze(2).expand(B, -1, A, -1).flatten(1, 2)
        pos = torch.cat((used[:, 0:1, :].expand(B, -1, -1), pos), dim=1)
        x = x + pos
        time = self.time_embed[:, 0:A, :].unsqueeze(1).expand(B, C, -1, -1).flatten(1, 2)
        x[:, 1:, :] += time
        for blk in self.blocks:
            x = blk(x)
        return x

    def forward(self, x, input_chans, bool_masked_pos=None, return_patch_tokens=False):
        x = self.tokens(x, input_chans, bool_masked_pos)
        if self.student:
            return self.norm(x)
        if return_patch_tokens:
            return self.fc_norm(x[:, 1:])
        x = self.fc_norm(x[:, 1:].mean(1))
        return x if self.head is None else self.head(x)


class RefPretrain(nn.Module):
    """The reference symmetric objective: two sequential student passes."""

    def __init__(self, embed_dim=200, depth=12, num_heads=10, out_chans=8, vocab_size=8192):
        super().__init__()
        self.student = RefTransformer(
            embed_dim, depth, num_heads, out_chans, student=True, vocab_size=vocab_size
        )
        self.lm_head = nn.Linear(embed_dim, vocab_size)
        self.projection_head = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.ReLU())

    def forward(self, x, input_chans, bool_masked_pos):
        tokens = self.student(x, input_chans, bool_masked_pos)
        x_rec = self.lm_head(tokens[:, 1:][bool_masked_pos])
        tokens_sym = self.student(x, input_chans, ~bool_masked_pos)
        x_rec_sym = self.lm_head(tokens_sym[:, 1:][~bool_masked_pos])
        return x_rec, x_rec_sym


def reference_pretrain_loss(model, tokenizer, x, input_chans, bool_masked_pos):
    """The reference training step's loss and accuracies (targets from the tokenizer)."""
    with torch.no_grad():
        ids = tokenizer.get_codebook_indices(x, input_chans)
    x_rec, x_rec_sym = model(x, input_chans, bool_masked_pos)
    labels, labels_sym = ids[bool_masked_pos], ids[~bool_masked_pos]
    loss = F.cross_entropy(x_rec, labels) + F.cross_entropy(x_rec_sym, labels_sym)
    acc = (x_rec.argmax(-1) == labels).float().mean()
    acc_sym = (x_rec_sym.argmax(-1) == labels_sym).float().mean()
    return loss, acc, acc_sym


class RefQuantizer(nn.Module):
    """Codebook holder with the reference's keys; nearest code by cosine similarity."""

    def __init__(self, num_codes: int, code_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_codes, code_dim)
        self.embedding.weight.requires_grad_(False)
        self.embedding.register_buffer("cluster_size", torch.zeros(num_codes))
        self.embedding.register_buffer("embed_avg", torch.zeros(num_codes, code_dim))
        self.embedding.register_buffer("initted", torch.ones(1))
        self.register_buffer("cluster_size", torch.zeros(num_codes))

    def forward(self, z):  # z: (B, code_dim, C, A)
        z = F.normalize(z.permute(0, 2, 3, 1), dim=-1)
        flat = z.reshape(-1, z.shape[-1])
        codes = self.embedding.weight
        d = flat.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * flat @ codes.t()
        ind = d.argmin(1)
        z_q = F.embedding(ind, codes).view(z.shape)
        loss = F.mse_loss(z_q.detach(), z)
        z_q = z + (z_q - z).detach()
        return z_q.permute(0, 3, 1, 2), loss, ind


class RefVQNSP(nn.Module):
    def __init__(
        self,
        embed_dim=200,
        depth=12,
        decoder_depth=3,
        num_heads=10,
        out_chans=8,
        code_dim=64,
        num_codes=8192,
        patch_size=200,
    ) -> None:
        super().__init__()
        self.encoder = RefTransformer(
            embed_dim, depth, num_heads, out_chans, qkv_bias=True, qk_norm=False, init_values=0
        )
        self.decoder = RefTransformer(
            embed_dim,
            decoder_depth,
            num_heads,
            out_chans,
            qkv_bias=True,
            qk_norm=False,
            init_values=0,
            in_chans=code_dim,
        )
        self.quantize = RefQuantizer(num_codes, code_dim)

        def task(out):
            return nn.Sequential(
                nn.Linear(embed_dim, embed_dim), nn.Tanh(), nn.Linear(embed_dim, out)
            )

        self.encode_task_layer = task(code_dim)
        self.decode_task_layer = task(patch_size)
        self.decode_task_layer_angle = task(patch_size)

    def encode(self, x, input_chans):
        B, C, A, _ = x.shape
        features = self.encoder(x, input_chans, return_patch_tokens=True)
        with torch.autocast(x.device.type, enabled=False):
            z = self.encode_task_layer(features.float())
        z = z.reshape(B, C, A, -1).permute(0, 3, 1, 2)  # (B, code_dim, C, A)
        return self.quantize(z)

    def get_codebook_indices(self, x, input_chans):
        _, _, ind = self.encode(x, input_chans)
        return ind.view(x.shape[0], -1)

    @staticmethod
    def std_norm(x):
        mean = torch.mean(x, dim=(1, 2, 3), keepdim=True)
        std = torch.std(x, dim=(1, 2, 3), keepdim=True)
        return (x - mean) / std

    def forward(self, x, input_chans):
        B, C, A, T = x.shape
        spectrum = torch.fft.fft(x, dim=-1)
        amplitude = self.std_norm(torch.abs(spectrum)).reshape(B, C * A, T)
        angle = self.std_norm(torch.angle(spectrum)).reshape(B, C * A, T)
        z_q, emb_loss, _ = self.encode(x, input_chans)
        features = self.decoder(z_q, input_chans, return_patch_tokens=True)
        rec = self.decode_task_layer(features)
        rec_angle = self.decode_task_layer_angle(features)
        return emb_loss + F.mse_loss(rec, amplitude) + F.mse_loss(rec_angle, angle)
