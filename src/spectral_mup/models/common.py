"""What the bundled decoders share: the size fields and their rules (heads, key/value groups,
resizing to another width and depth), the attention core, and role inference by building the
model on the ``meta`` device at the base size and at a wider, deeper size."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..parametrize import Parametrization
from ..roles import ParamRole, infer_roles


@dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    """One size of a decoder. ``n_heads`` query heads of size width // n_heads, or, with
    ``head_dim`` set, heads of that fixed size (n_heads = width // head_dim, so the head count
    grows with width). ``n_kv_heads`` < ``n_heads``: grouped-query attention (each key/value
    head serves n_heads // n_kv_heads query heads; None = n_heads)."""

    arch: ClassVar[str]

    width: int = 128
    depth: int = 2
    n_heads: int = 2
    vocab_size: int = 65
    block_size: int = 256
    tie_weights: bool = False
    head_dim: int | None = None
    n_kv_heads: int | None = None

    def __post_init__(self) -> None:
        for name in ("width", "depth", "n_heads", "vocab_size", "block_size"):
            positive_int(name, getattr(self, name))
        for name in ("head_dim", "n_kv_heads"):
            if getattr(self, name) is not None:
                positive_int(name, getattr(self, name))
        if self.head_dim is not None and self.n_heads * self.head_dim != self.width:
            raise ConfigError(
                f"model.head_dim {self.head_dim} with model.width {self.width} means "
                f"{self.width / self.head_dim:g} heads, not model.n_heads {self.n_heads}; set "
                "n_heads = width // head_dim (the config's resized() keeps them consistent)"
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

    @property
    def d_head(self) -> int:
        return self.width // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def resized(self, width: int, depth: int):
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


def positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")


def positive_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"model.{name} must be a number > 0, got {value!r}")


ROPE_THETA = 10000.0  # rotary embeddings' base (Llama, GPT-NeoX)


def check_rotary(cfg: DecoderConfig) -> None:
    """A config with rotary position embeddings: an even head size, ``rope_theta`` > 0
    (or unset: ``ROPE_THETA``)."""
    if cfg.d_head % 2:
        raise ConfigError(
            f"model.width {cfg.width} / model.n_heads {cfg.n_heads} = {cfg.d_head}: "
            "rotary embeddings need an even head size"
        )
    if cfg.rope_theta is not None:
        positive_number("rope_theta", cfg.rope_theta)


class PerRun:
    """A multiplier with one value per run of a stack (``train.stack.stack``, where activations
    carry the K runs in their first dimension, run-major): runs that differ in a forward
    multiplier (``param.readout_scale``, ``param.attention_mult``) still share a stack."""

    def __init__(self, values: Sequence[float]):
        self.values = torch.tensor([float(v) for v in values], dtype=torch.float64)
        self._on: dict[tuple, torch.Tensor] = {}  # per (device, dtype): no copy per forward

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with run k's rows (``x.shape[0] / K`` of them) times value k."""
        k = self.values.numel()
        factor = self._on.get((x.device, x.dtype))
        if factor is None:
            factor = self._on[x.device, x.dtype] = self.values.to(x.device, x.dtype)
        return (x.view(k, -1, *x.shape[1:]) * factor.view(k, *([1] * x.dim()))).view(x.shape)

    def __repr__(self) -> str:
        return f"PerRun({self.values.tolist()})"


def scaled(x: torch.Tensor, multiplier: float | PerRun) -> torch.Tensor:
    """``x · multiplier``, with no op at all for a multiplier of 1 (SP's readout and residual
    branches, μP's at the base size): the same numbers, two ops less per branch in training."""
    if isinstance(multiplier, PerRun):
        return multiplier(x)
    return x if multiplier == 1.0 else x * multiplier


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | PerRun,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Causal attention of ``q`` (B, heads, T, d) over ``k``, ``v`` (B, kv_heads, T, d): each
    key/value head serves a group of consecutive query heads. Returns (B, T, heads·d). A
    per-run scale (a stack's runs) multiplies each run's queries instead."""
    b, h, t, d = q.shape
    if isinstance(scale, PerRun):
        q, scale = scale(q), 1.0
    if k.shape[1] != h:
        group = h // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, dropout_p=dropout)
    return y.transpose(1, 2).reshape(b, t, h * d)


class Rotary(nn.Module):
    """Rotary position embedding (the "rotate half" convention of transformers' Llama: the
    first and second halves of each head are the two coordinates of each rotated pair)."""

    def __init__(self, d_head: int, block_size: int, theta: float):
        super().__init__()
        freqs = theta ** (-torch.arange(0, d_head, 2, dtype=torch.float32) / d_head)
        angles = torch.outer(torch.arange(block_size, dtype=torch.float32), freqs)
        self.register_buffer("cos", angles.cos(), persistent=False)  # (block_size, d_head / 2)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, heads, T, d_head) rotated by position."""
        t = x.shape[2]
        cos, sin = self.cos[:t].to(x.dtype), self.sin[:t].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def base_config(config: DecoderConfig, p: Parametrization) -> DecoderConfig:
    """The base model's config: ``config`` at the base width and depth (itself under SP)."""
    if not p.is_mup:
        return config
    try:
        return config.resized(p.base_width, p.base_depth)
    except ConfigError as exc:
        raise ConfigError(f"the base model (param.base_width {p.base_width}): {exc}") from None


def bundled_roles(cls: type[nn.Module], config: DecoderConfig, p: Parametrization):
    """Roles of a bundled model by comparison with copies at the base size and at a wider,
    deeper size, all built on the meta device (no memory, no init)."""
    base_cfg = base_config(config, p)
    delta_cfg = config.resized(
        2 * max(config.width, base_cfg.width), max(config.depth, base_cfg.depth) + 1
    )
    with torch.device("meta"):
        model, base, delta = (cls(c, p, _bare=True) for c in (config, base_cfg, delta_cfg))
    roles: dict[str, ParamRole] = infer_roles(model, base, delta)
    return roles
