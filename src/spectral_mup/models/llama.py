"""A Llama-2 style language model whose forward multipliers come from a ``Parametrization``:
token embedding only (positions enter as rotary embeddings of queries and keys), pre-RMSNorm
blocks, a SwiGLU MLP, no biases, an untied head (tying is an option), grouped-query
attention (``n_kv_heads``), and the q/k/v and gate/up projections separate (Meta's
``wq, wk, wv`` and ``w1, w3``) or fused into one matrix each (``fused = true``; optimizers
that orthogonalize treat each logical block on its own, ``smup_splits``).

μP changes the same three things in the forward pass as in the GPT (RULES.md §3–4):
  logits       = output(norm(x) · readout_multiplier)          (1/m under μP)
  attention    = softmax(q·kᵀ · sqrt(d_base)/d_head)           (1/sqrt(d_head) under SP, and
                                                               under μP when d_head is fixed)
  residual     = x + m_L^-α · branch(x)
Everything else (init, per-tensor LR/WD/eps) is done by ``parametrize`` from the roles
inferred by comparing this model with copies at other sizes (built on ``meta``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

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
    positive_number,
    scaled,
)


@dataclass(frozen=True, kw_only=True)
class LlamaConfig(DecoderConfig):
    """The model at one size (the size fields, heads and key/value groups: ``DecoderConfig``).

    The SwiGLU hidden size follows Llama's rule at every width: ``ffn_ratio``·width rounded
    up to a multiple of ``multiple_of`` (Meta: 8/3 and 256 at widths ≥ 4096; the default 16
    keeps it growing with width at CPU sizes). Rounding makes the ratio drift a little with
    width (2.75 at width 64, 2.69 at 256); μP's rules read each matrix's own fans, so they stay
    exact, and ``ffn_ratio = 2.75, multiple_of = 4`` makes it exactly proportional at widths
    that are multiples of 16."""

    arch: ClassVar[str] = "llama"

    ffn_ratio: float = 8 / 3
    multiple_of: int = 16
    norm_eps: float = 1e-5
    rope_theta: float = ROPE_THETA
    fused: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int("multiple_of", self.multiple_of)
        check_rotary(self)
        for name in ("ffn_ratio", "norm_eps", "rope_theta"):  # rope_theta: never unset here
            positive_number(name, getattr(self, name))

    @property
    def ffn_dim(self) -> int:
        """The SwiGLU hidden size at this width (Llama's rounding of ffn_ratio·width)."""
        return self.multiple_of * math.ceil(int(self.ffn_ratio * self.width) / self.multiple_of)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, scale: float):
        super().__init__()
        self.n_heads, self.n_kv, self.d_head, self.scale = (
            cfg.n_heads,
            cfg.kv_heads,
            cfg.d_head,
            scale,
        )
        self.sizes = (cfg.width, self.n_kv * self.d_head, self.n_kv * self.d_head)  # q, k, v
        if cfg.fused:
            self.wqkv = nn.Linear(cfg.width, sum(self.sizes), bias=False)
        else:
            self.wq = nn.Linear(cfg.width, self.sizes[0], bias=False)
            self.wk = nn.Linear(cfg.width, self.sizes[1], bias=False)
            self.wv = nn.Linear(cfg.width, self.sizes[2], bias=False)
        self.wo = nn.Linear(cfg.width, cfg.width, bias=False)
        self.rotary = Rotary(cfg.d_head, cfg.block_size, cfg.rope_theta)

    def query_weight(self) -> torch.Tensor:
        """The query projection's rows (a view into the fused matrix when fused)."""
        return self.wqkv.weight[: self.sizes[0]] if hasattr(self, "wqkv") else self.wq.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        if hasattr(self, "wqkv"):
            q, k, v = self.wqkv(x).split(self.sizes, dim=2)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.view(b, t, self.n_heads, self.d_head).transpose(1, 2)
        k, v = (z.view(b, t, self.n_kv, self.d_head).transpose(1, 2) for z in (k, v))
        return self.wo(attend(self.rotary(q), self.rotary(k), v, self.scale))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1·x) * w3·x)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.hidden = cfg.ffn_dim
        if cfg.fused:
            self.w13 = nn.Linear(cfg.width, 2 * self.hidden, bias=False)  # rows [gate | up]
        else:
            self.w1 = nn.Linear(cfg.width, self.hidden, bias=False)
            self.w3 = nn.Linear(cfg.width, self.hidden, bias=False)
        self.w2 = nn.Linear(self.hidden, cfg.width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "w13"):
            gate, up = self.w13(x).chunk(2, dim=-1)
        else:
            gate, up = self.w1(x), self.w3(x)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, attn_scale: float, branch_multiplier: float):
        super().__init__()
        self.branch_multiplier = branch_multiplier
        self.attention_norm = nn.RMSNorm(cfg.width, eps=cfg.norm_eps)
        self.attention = Attention(cfg, attn_scale)
        self.ffn_norm = nn.RMSNorm(cfg.width, eps=cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + scaled(self.attention(self.attention_norm(x)), self.branch_multiplier)
        return x + scaled(self.feed_forward(self.ffn_norm(x)), self.branch_multiplier)


class Llama(nn.Module):
    """Llama-2 style decoder. ``forward(idx)`` returns logits of shape (B, T, vocab)."""

    smup_native = True  # applies μP's forward changes itself: parametrize() is not for it

    def __init__(
        self, config: LlamaConfig, p: Parametrization | None = None, *, _bare: bool = False
    ):
        super().__init__()
        if p is None:
            p = Parametrization(kind="sp", base_width=config.width, base_depth=config.depth)
        base = base_config(config, p)
        if config.tie_weights:
            check_tied({"tok_embeddings.weight": ParamRole("input", tied_readout="output")}, p)
        self.config, self.p = config, p
        attn_scale = p.attention_scale(config.d_head, d_head_base=base.d_head)
        self.readout_multiplier = p.readout_multiplier(config.width)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.width)
        self.layers = nn.ModuleList(
            Block(config, attn_scale, p.branch_multiplier(config.depth))
            for _ in range(config.depth)
        )
        self.norm = nn.RMSNorm(config.width, eps=config.norm_eps)
        self.output = nn.Linear(config.width, config.vocab_size, bias=False)
        if config.tie_weights:
            self.output.weight = self.tok_embeddings.weight
        if _bare:
            return
        self.smup_roles: dict[str, ParamRole] = llama_roles(config, p)
        # logical sub-matrices (row sizes) for optimizers that orthogonalize
        first = self.layers[0]
        self.smup_splits = (
            {
                "layers.*.attention.wqkv.weight": first.attention.sizes,
                "layers.*.feed_forward.w13.weight": (first.feed_forward.hidden,) * 2,
            }
            if config.fused
            else {}
        )
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Init per the parametrization (and zero the query projection if asked)."""
        init_weights(self, self.smup_roles, self.p, generator)
        if self.p.zero_init_query:
            with torch.no_grad():
                for layer in self.layers:
                    layer.attention.query_weight().zero_()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.shape[1] > self.config.block_size:
            raise ValueError(
                f"sequence length {idx.shape[1]} exceeds block_size {self.config.block_size}"
            )
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x)
        # the readout multiplier scales the head's input (the head has no bias), so the head
        # module's output is the logits (coordinate checks tap it)
        return self.output(scaled(self.norm(x), self.readout_multiplier))

    def coord_taps(self) -> dict[str, nn.Module]:
        """Layer groups for coordinate checks: the module whose output is recorded (the same
        group names as the GPT's)."""
        taps: dict[str, nn.Module] = {"embedding": self.tok_embeddings}
        for i, layer in enumerate(self.layers):
            taps[f"block{i}.attn"] = layer.attention
            taps[f"block{i}.mlp"] = layer.feed_forward
        taps["residual"] = self.layers[-1]
        taps["logits"] = self.output
        return taps

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def llama_roles(config: LlamaConfig, p: Parametrization) -> dict[str, ParamRole]:
    """Roles of a Llama (``bundled_roles``: built on meta at the base and a wider, deeper size)."""
    return bundled_roles(Llama, config, p)
