"""A NanoGPT / GPT-2 style language model whose forward multipliers come from a
``Parametrization``: learned positions (or rotary embeddings of queries and keys, as in
GPT-NeoX: ``position = "rotary"``), pre-LayerNorm blocks, GELU MLP, optional biases,
tied or untied head, a fixed head count (the seed paper's 2 heads) or a fixed head size
(``head_dim``: heads are added as the model widens, as in GPT-2 and Llama), optional
grouped-query attention (``n_kv_heads``).

μP changes three things in the forward pass (RULES.md §3–4):
  logits       = lm_head(ln_f(x) · readout_multiplier)       (1/m under μP)
  attention    = softmax(q·kᵀ · sqrt(d_base)/d_head)          (1/sqrt(d_head) under SP, and
                                                              under μP when d_head is fixed)
  residual     = x + m_L^-α · branch(x)
Everything else (init, per-tensor LR/WD/eps) is done by ``parametrize`` from the roles
inferred below by comparing this model with copies at other sizes (built on ``meta``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..parametrize import Parametrization, check_tied, init_weights
from ..roles import ParamRole
from .common import (
    ROPE_THETA,
    DecoderConfig,
    Rotary,
    attend,
    base_config,
    bundled_roles,
    check_rotary,
    positive_int,
    scaled,
)


@dataclass(frozen=True, kw_only=True)
class GPTConfig(DecoderConfig):
    """The model at one size (the size fields, heads and key/value groups:
    ``DecoderConfig``), with GPT-2's MLP width ratio, biases and dropout. ``position``:
    GPT-2's learned position embedding (``"learned"``) or rotary embeddings of queries and
    keys (``"rotary"``, no position parameters; ``rope_theta`` as in the Llama)."""

    arch: ClassVar[str] = "gpt"

    mlp_ratio: int = 4
    bias: bool = True
    dropout: float = 0.0
    position: str = "learned"
    rope_theta: float | None = None  # None: the Llama's default (common.ROPE_THETA)

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int("mlp_ratio", self.mlp_ratio)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout!r}")
        if self.position not in ("learned", "rotary"):
            raise ConfigError(
                f'model.position must be "learned" or "rotary", got {self.position!r}'
            )
        if self.position == "rotary":
            check_rotary(self)
        elif self.rope_theta is not None:
            raise ConfigError('model.rope_theta is for model.position = "rotary"; remove it')


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, scale: float):
        super().__init__()
        self.n_heads, self.n_kv, self.d_head = cfg.n_heads, cfg.kv_heads, cfg.d_head
        self.scale, self.dropout = scale, cfg.dropout
        # fused q, k, v: rows [q | k | v] of n_heads, n_kv, n_kv heads
        self.sizes = (cfg.width, self.n_kv * self.d_head, self.n_kv * self.d_head)
        self.c_attn = nn.Linear(cfg.width, sum(self.sizes), bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.width, cfg.width, bias=cfg.bias)
        self.rotary = (
            Rotary(cfg.d_head, cfg.block_size, cfg.rope_theta or ROPE_THETA)
            if cfg.position == "rotary"
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.c_attn(x).split(self.sizes, dim=2)
        q = q.view(b, t, self.n_heads, self.d_head).transpose(1, 2)
        k, v = (z.view(b, t, self.n_kv, self.d_head).transpose(1, 2) for z in (k, v))
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        dropout = self.dropout if self.training else 0.0
        return self.c_proj(attend(q, k, v, self.scale, dropout))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.width, cfg.mlp_ratio * cfg.width, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.mlp_ratio * cfg.width, cfg.width, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, attn_scale: float, branch_multiplier: float):
        super().__init__()
        self.branch_multiplier = branch_multiplier
        self.ln_1 = nn.LayerNorm(cfg.width, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg, attn_scale)
        self.ln_2 = nn.LayerNorm(cfg.width, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + scaled(self.attn(self.ln_1(x)), self.branch_multiplier)
        return x + scaled(self.mlp(self.ln_2(x)), self.branch_multiplier)


class GPT(nn.Module):
    """GPT-2 style decoder. ``forward(idx)`` returns logits of shape (B, T, vocab)."""

    smup_native = True  # applies μP's forward changes itself: parametrize() is not for it

    def __init__(self, config: GPTConfig, p: Parametrization | None = None, *, _bare: bool = False):
        super().__init__()
        if p is None:
            p = Parametrization(kind="sp", base_width=config.width, base_depth=config.depth)
        base = base_config(config, p)
        if config.tie_weights:
            check_tied({"wte.weight": ParamRole("input", tied_readout="lm_head")}, p)
        self.config, self.p = config, p
        attn_scale = p.attention_scale(config.d_head, d_head_base=base.d_head)
        self.readout_multiplier = p.readout_multiplier(config.width)
        self.wte = nn.Embedding(config.vocab_size, config.width)
        if config.position == "learned":
            self.wpe = nn.Embedding(config.block_size, config.width)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(config, attn_scale, p.branch_multiplier(config.depth))
            for _ in range(config.depth)
        )
        self.ln_f = nn.LayerNorm(config.width, bias=config.bias)
        self.lm_head = nn.Linear(config.width, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight
        if _bare:
            return
        self.smup_roles: dict[str, ParamRole] = gpt_roles(config, p)
        # logical sub-matrices (row sizes) for optimizers that orthogonalize (fused q, k, v)
        self.smup_splits = {"blocks.*.attn.c_attn.weight": self.blocks[0].attn.sizes}
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Init per the parametrization (and zero the query projection if asked)."""
        init_weights(self, self.smup_roles, self.p, generator)
        if self.p.zero_init_query:
            with torch.no_grad():
                for block in self.blocks:
                    block.attn.c_attn.weight[: self.config.width].zero_()  # the q rows

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.config.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.config.block_size}")
        x = self.wte(idx)
        if self.config.position == "learned":
            x = x + self.wpe(torch.arange(t, device=idx.device))
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        # the readout multiplier scales the head's input (= its output: the head has no bias),
        # so the head module's output is the logits (coordinate checks tap it)
        return self.lm_head(scaled(self.ln_f(x), self.readout_multiplier))

    def coord_taps(self) -> dict[str, nn.Module]:
        """Layer groups for coordinate checks: the module whose output is recorded."""
        taps: dict[str, nn.Module] = {"embedding": self.drop}
        for i, block in enumerate(self.blocks):
            taps[f"block{i}.attn"] = block.attn
            taps[f"block{i}.mlp"] = block.mlp
        taps["residual"] = self.blocks[-1]
        taps["logits"] = self.lm_head
        return taps

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def gpt_roles(config: GPTConfig, p: Parametrization) -> dict[str, ParamRole]:
    """Roles of a GPT (``bundled_roles``: built on meta at the base and a wider, deeper size)."""
    return bundled_roles(GPT, config, p)
