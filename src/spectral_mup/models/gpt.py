"""A NanoGPT / GPT-2 style language model whose forward multipliers come from a
``Parametrization``: learned positions, pre-LayerNorm blocks, GELU MLP, optional biases,
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

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..parametrize import Parametrization, check_tied, init_weights
from ..roles import ParamRole, infer_roles


@dataclass(frozen=True)
class GPTConfig:
    """The model at one size. ``n_heads`` query heads of size width // n_heads, or, with
    ``head_dim`` set, heads of that fixed size (n_heads = width // head_dim, so the head count
    grows with width). ``n_kv_heads`` < ``n_heads``: grouped-query attention (each key/value
    head serves n_heads // n_kv_heads query heads; None = n_heads)."""

    width: int = 128
    depth: int = 2
    n_heads: int = 2
    vocab_size: int = 65
    block_size: int = 256
    mlp_ratio: int = 4
    bias: bool = True
    tie_weights: bool = False
    dropout: float = 0.0
    head_dim: int | None = None
    n_kv_heads: int | None = None

    def __post_init__(self) -> None:
        for name in ("width", "depth", "n_heads", "vocab_size", "block_size", "mlp_ratio"):
            _positive_int(name, getattr(self, name))
        for name in ("head_dim", "n_kv_heads"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if self.head_dim is not None and self.n_heads * self.head_dim != self.width:
            raise ConfigError(
                f"model.head_dim {self.head_dim} with model.width {self.width} means "
                f"{self.width / self.head_dim:g} heads, not model.n_heads {self.n_heads}; set "
                "n_heads = width // head_dim (GPTConfig.resized keeps them consistent)"
            )
        if self.width % self.n_heads:
            raise ConfigError(
                f"model.width {self.width} is not divisible by model.n_heads {self.n_heads}; "
                "pick a width that is a multiple of n_heads"
            )
        if self.n_heads % self.kv_heads:
            raise ConfigError(
                f"model.n_heads {self.n_heads} is not a multiple of model.n_kv_heads "
                f"{self.kv_heads}; each key/value head must serve a whole group of query heads"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def d_head(self) -> int:
        return self.width // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def resized(self, width: int, depth: int) -> GPTConfig:
        """The same architecture at another width and depth: the head count is kept (or, with
        ``head_dim``, the head size), and so is the number of query heads per key/value head."""
        if self.head_dim is None:
            return replace(self, width=width, depth=depth)
        if width % self.head_dim:
            raise ConfigError(
                f"width {width} is not a multiple of model.head_dim {self.head_dim}; pick base "
                "and model widths that are multiples of the head size"
            )
        n_heads = width // self.head_dim
        group = self.n_heads // self.kv_heads
        if n_heads % group:
            raise ConfigError(
                f"width {width} gives {n_heads} heads, not a multiple of the {group} query heads "
                "per key/value head; pick a width with a whole number of groups"
            )
        n_kv = None if self.n_kv_heads is None else n_heads // group
        return replace(self, width=width, depth=depth, n_heads=n_heads, n_kv_heads=n_kv)


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, scale: float):
        super().__init__()
        self.n_heads, self.n_kv, self.d_head = cfg.n_heads, cfg.kv_heads, cfg.d_head
        self.scale, self.dropout = scale, cfg.dropout
        # fused q, k, v: rows [q | k | v] of n_heads, n_kv, n_kv heads
        self.sizes = (cfg.width, self.n_kv * self.d_head, self.n_kv * self.d_head)
        self.c_attn = nn.Linear(cfg.width, sum(self.sizes), bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.width, cfg.width, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(self.sizes, dim=2)
        q = q.view(b, t, self.n_heads, self.d_head).transpose(1, 2)
        k, v = (z.view(b, t, self.n_kv, self.d_head).transpose(1, 2) for z in (k, v))
        if self.n_kv != self.n_heads:  # each key/value head serves a group of query heads
            group = self.n_heads // self.n_kv
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
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
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        # the readout multiplier scales the head's input (= its output: the head has no bias),
        # so the head module's output is the logits (coordinate checks tap it)
        return self.lm_head(self.ln_f(x) * self.readout_multiplier)

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


def base_config(config: GPTConfig, p: Parametrization) -> GPTConfig:
    """The base model's config: ``config`` at the base width and depth (itself under SP)."""
    if not p.is_mup:
        return config
    try:
        return config.resized(p.base_width, p.base_depth)
    except ConfigError as exc:
        raise ConfigError(f"the base model (param.base_width {p.base_width}): {exc}") from None


def gpt_roles(config: GPTConfig, p: Parametrization) -> dict[str, ParamRole]:
    """Roles of a GPT by comparison with copies at the base size and at a wider, deeper
    size, all built on the meta device (no memory, no init)."""
    base_cfg = base_config(config, p)
    delta_cfg = config.resized(
        2 * max(config.width, base_cfg.width), max(config.depth, base_cfg.depth) + 1
    )
    with torch.device("meta"):
        model, base, delta = (GPT(c, p, _bare=True) for c in (config, base_cfg, delta_cfg))
    return infer_roles(model, base, delta)
