"""A NanoGPT / GPT-2 style language model whose forward multipliers come from a
``Parametrization``: learned positions, pre-LayerNorm blocks, GELU MLP, optional biases,
tied or untied head.

μP changes three things in the forward pass (RULES.md §3–4):
  logits       = lm_head(ln_f(x)) · readout_multiplier       (1/m under μP)
  attention    = softmax(q·kᵀ · sqrt(d_base)/d_head)          (1/sqrt(d_head) under SP)
  residual     = x + m_L^-α · branch(x)
Everything else (init, per-tensor LR/WD/eps) is done by ``parametrize`` from the roles
inferred below by comparing this model with copies at other sizes (built on ``meta``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..parametrize import Parametrization, init_weights
from ..roles import ParamRole, infer_roles


@dataclass(frozen=True)
class GPTConfig:
    width: int = 128
    depth: int = 2
    n_heads: int = 2
    vocab_size: int = 65
    block_size: int = 256
    mlp_ratio: int = 4
    bias: bool = True
    tie_weights: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("width", "depth", "n_heads", "vocab_size", "block_size", "mlp_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        if self.width % self.n_heads:
            raise ConfigError(
                f"model.width {self.width} is not divisible by model.n_heads {self.n_heads}; "
                "pick a width that is a multiple of n_heads"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout!r}")


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, scale: float):
        super().__init__()
        self.n_heads, self.scale, self.dropout = cfg.n_heads, scale, cfg.dropout
        self.c_attn = nn.Linear(cfg.width, 3 * cfg.width, bias=cfg.bias)  # fused q, k, v
        self.c_proj = nn.Linear(cfg.width, cfg.width, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_heads, c // self.n_heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            is_causal=True,
            scale=self.scale,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


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
        x = x + self.branch_multiplier * self.attn(self.ln_1(x))
        return x + self.branch_multiplier * self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2 style decoder. ``forward(idx)`` returns logits of shape (B, T, vocab)."""

    def __init__(self, config: GPTConfig, p: Parametrization | None = None, *, _bare: bool = False):
        super().__init__()
        if p is None:
            p = Parametrization(kind="sp", base_width=config.width, base_depth=config.depth)
        if p.is_mup and p.base_width % config.n_heads:
            raise ConfigError(
                f"base_width {p.base_width} is not divisible by n_heads {config.n_heads}; "
                "pick a base width that is a multiple of n_heads"
            )
        if p.is_mup and config.tie_weights and p.readout == "init":
            raise ConfigError(
                "tie_weights needs readout = 'multiplier' under μP (with readout = 'init' the "
                "head's init and LR differ from the embedding's); untie or change readout"
            )
        self.config, self.p = config, p
        d_head = config.width // config.n_heads
        attn_scale = p.attention_scale(d_head, config.n_heads)
        self.readout_multiplier = p.readout_multiplier(config.width)
        self.wte = nn.Embedding(config.vocab_size, config.width)
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
        # logical sub-matrices for optimizers that orthogonalize (fused q, k, v)
        self.smup_splits = {"blocks.*.attn.c_attn.weight": 3}
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Init per the parametrization (and zero the query projection if asked)."""
        init_weights(self, self.smup_roles, self.p, generator)
        if self.p.zero_init_query:
            with torch.no_grad():
                for block in self.blocks:
                    block.attn.c_attn.weight[: self.config.width].zero_()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.config.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.config.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x)) * self.readout_multiplier

    def coord_taps(self) -> dict[str, nn.Module]:
        """Layer groups for coordinate checks: the module whose output is recorded."""
        taps: dict[str, nn.Module] = {"embedding": self.drop}
        for i, block in enumerate(self.blocks):
            taps[f"block{i}.attn"] = block.attn
            taps[f"block{i}.mlp"] = block.mlp
        taps["residual"] = self.blocks[-1]
        taps["logits"] = self
        return taps

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def gpt_roles(config: GPTConfig, p: Parametrization) -> dict[str, ParamRole]:
    """Roles of a GPT by comparison with copies at the base size and at a wider, deeper
    size, all built on the meta device (no memory, no init)."""
    base_cfg = replace(config, width=p.base_width, depth=p.base_depth) if p.is_mup else config
    delta_cfg = replace(
        config,
        width=2 * max(config.width, base_cfg.width),
        depth=max(config.depth, base_cfg.depth) + 1,
    )
    with torch.device("meta"):
        model, base, delta = (GPT(c, p, _bare=True) for c in (config, base_cfg, delta_cfg))
    return infer_roles(model, base, delta)
