"""Shapes real models have (RULES.md §3, "Shapes real models have"): a vocabulary larger
than the width, a head tied to the embedding, transposed (Conv1D) weights, heads added at a
fixed head size, grouped-query attention. Each is tested on a model written without the
library (GPT-2's layout) and on the bundled GPT.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spectral_mup as smup
from spectral_mup import ConfigError, Parametrization, infer_roles, parametrize
from spectral_mup.coord import coord_check
from spectral_mup.models import GPT, GPTConfig
from spectral_mup.optim import Muon, SpectralNormalized

GPT2_VOCAB = 50257


class Conv1D(nn.Module):
    """transformers' Conv1D: weight stored (fan_in, fan_out), y = x·W + b."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        out = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight)
        return out.view(*x.shape[:-1], self.nf)


class Attention(nn.Module):
    def __init__(self, width: int, head_dim: int, scale: float):
        super().__init__()
        self.n_heads, self.head_dim, self.scale = width // head_dim, head_dim, scale
        self.c_attn = Conv1D(3 * width, width)
        self.c_proj = Conv1D(width, width)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (
            z.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
            for z in self.c_attn(x).split(c, dim=2)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.c_fc, self.c_proj = Conv1D(4 * width, width), Conv1D(width, 4 * width)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, width: int, head_dim: int, scale: float):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn, self.mlp = Attention(width, head_dim, scale), MLP(width)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyGPT2(nn.Module):
    """GPT-2's layout, written as a user would: Conv1D layers, the head tied to the token
    embedding, heads of a fixed size (their number grows with width). μP's attention change
    comes from ``p.attention_scale``; everything else from ``parametrize``."""

    def __init__(self, width, depth=2, vocab=GPT2_VOCAB, head_dim=16, block=64, p=None):
        super().__init__()
        p = p or Parametrization(kind="sp")
        scale = p.attention_scale(head_dim, d_head_base=head_dim)  # d_head is the base model's too
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(block, width)
        self.h = nn.ModuleList(Block(width, head_dim, scale) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def coord_taps(self):
        taps = {}
        for i, block in enumerate(self.h):
            taps[f"block{i}.attn"], taps[f"block{i}.mlp"] = block.attn, block.mlp
        return {**taps, "residual": self.h[-1], "logits": self.lm_head}


def build_gpt2(width: int, p: Parametrization, vocab: int = GPT2_VOCAB) -> TinyGPT2:
    with torch.device("meta"):
        base, delta = TinyGPT2(p.base_width, vocab=vocab), TinyGPT2(2 * p.base_width, vocab=vocab)
    model = TinyGPT2(width, vocab=vocab, p=p)
    parametrize(model, p, base=base, delta=delta)
    return model


def word_tokens(data_dir: Path, vocab: int = GPT2_VOCAB) -> torch.Tensor:
    """Tiny Shakespeare as word tokens (ids by frequency rank): a Zipfian stream over a large
    vocabulary, padded to ``vocab`` ids like GPT-2's embedding."""
    text = (data_dir / "tinyshakespeare" / "input.txt").read_text()
    words = re.findall(r"\w+|[^\w\s]", text)
    ranked = {w: i for i, (w, _) in enumerate(_counts(words))}
    assert len(ranked) < vocab
    return torch.tensor([ranked[w] for w in words])


def _counts(words):
    from collections import Counter

    return Counter(words).most_common()


# ------------------------------------------------------------------ roles on GPT-2's layout


def test_conv1d_fans_come_from_the_layer_type_and_the_tied_head_keeps_input_rules():
    p = Parametrization(kind="mup", base_width=32)
    model = build_gpt2(128, p, vocab=500)
    roles = model.smup_roles
    assert "lm_head.weight" not in roles  # one tensor, one entry
    wte = roles["wte.weight"]
    assert (wte.role, wte.fan_in, wte.fan_out, wte.tied_readout) == ("input", 500, 128, "lm_head")
    c_fc = roles["h.0.mlp.c_fc.weight"]  # stored (128, 512): fan_in 128, fan_out 512
    assert (c_fc.role, c_fc.fan_in, c_fc.fan_out, c_fc.transposed) == ("hidden", 128, 512, True)
    c_proj = roles["h.0.mlp.c_proj.weight"]
    assert (c_proj.fan_in, c_proj.fan_out) == (512, 128)
    # the tied head computes W·(x/m): the readout multiplier 1/m = 1/4 is in its forward pass
    x = torch.randn(3, 128)
    assert torch.allclose(model.lm_head(x), F.linear(x, model.wte.weight) / 4, atol=1e-6)
    # init and LR are the embedding's: σ_b and, for AdamW and LAMB, the base LR
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.02)
    for name in ("adamw", "lamb"):
        opt = smup.build_optimizer(name, model, p, lr=1e-3)
        group = next(g for g in opt.param_groups if "wte.weight" in g["names"])
        assert group["lr"] == pytest.approx(1e-3), name


def test_transposed_weights_get_the_same_update_as_their_linear_twin():
    """Muon (with its shape factor) and spectral normalization on a Conv1D weight give
    exactly the transpose of what they give the same matrix stored as an nn.Linear."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 48, bias=False)  # fan_in 16, fan_out 48: factor sqrt(3)
    conv = Conv1D(48, 16)
    with torch.no_grad():
        conv.weight.copy_(lin.weight.T)
    grad = torch.randn(48, 16)
    results = []
    for module, g, transposed in ((lin, grad, False), (conv, grad.T.contiguous(), True)):
        w0 = module.weight.detach().clone()
        for wrap in (False, True):
            module.weight.data.copy_(w0)
            group = {"params": [module.weight], "transposed": transposed, "role": "hidden"}
            opt = Muon([group], lr=0.1, momentum=0.0)
            opt = SpectralNormalized(opt) if wrap else opt
            module.weight.grad = g.clone()
            opt.step()
            delta = module.weight.detach() - w0
            results.append(delta.T if transposed else delta)
    muon_lin, sn_lin, muon_conv, sn_conv = results
    assert torch.allclose(muon_lin, muon_conv, atol=1e-6)
    assert torch.allclose(sn_lin, sn_conv, atol=1e-6)
    # the factor sqrt(fan_out/fan_in) = sqrt(3), not its inverse: singular values ≈ 0.1·sqrt(3)
    sigma = torch.linalg.svdvals(muon_conv)
    assert sigma.max().item() == pytest.approx(0.1 * math.sqrt(3), rel=0.2)
    # (5 warm-start power iterations: σ̂ within 10%; the wrong orientation would give 1/3 of it)
    assert torch.linalg.matrix_norm(sn_conv, 2).item() == pytest.approx(0.1 * math.sqrt(3), 0.1)


def test_build_optimizer_marks_transposed_groups():
    p = Parametrization(kind="mup", base_width=32)
    model = build_gpt2(64, p, vocab=100)
    opt = smup.build_optimizer("muon", model, p, lr=0.02)
    for group in opt.param_groups:
        for name in group["names"]:
            conv = name.startswith("h.") and name.endswith("weight") and ".ln_" not in name
            assert group["transposed"] is conv, name


def test_a_custom_layer_whose_fans_cannot_be_told_is_an_error_until_its_layout_is_named():
    class XW(nn.Module):  # y = x @ W with W stored (fan_in, fan_out)
        def __init__(self, width):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(width, 3 * width))

    with pytest.raises(ConfigError, match=r"cannot tell fan_in from fan_out of 'w'.*layouts="):
        infer_roles(XW(64), XW(32))
    roles = infer_roles(XW(64), XW(32), layouts={"w": "transposed"})
    assert (roles["w"].fan_in, roles["w"].fan_out, roles["w"].transposed) == (64, 192, True)
    with pytest.raises(ConfigError, match="unknown layout"):
        infer_roles(XW(64), XW(32), layouts={"w": "columns"})
    smup.register_layout(XW, "transposed", "w")
    try:
        assert infer_roles(XW(64), XW(32))["w"].fan_out == 192
    finally:
        from spectral_mup import roles as roles_module

        del roles_module._LAYOUT_REGISTRY[XW]


def test_tied_weights_in_conflicting_roles_and_bad_options_are_errors():
    class Tied(nn.Module):
        def __init__(self, width, readouts=1):
            super().__init__()
            self.emb = nn.Embedding(10, width)
            self.mid = nn.Linear(width, width)
            self.heads = nn.ModuleList(nn.Linear(width, 10, bias=False) for _ in range(readouts))
            for head in self.heads:
                head.weight = self.emb.weight

    with pytest.raises(ConfigError, match="only an embedding tied to one readout"):
        infer_roles(Tied(64, readouts=2), Tied(32, readouts=2))
    for bad, match in [
        ({"zero_init_readout": True}, "zero_init_readout would zero the embedding"),
        ({"readout": "init"}, "readout='init' would give the shared tensor two inits"),
    ]:
        with pytest.raises(ConfigError, match=match):
            parametrize(Tied(64), Parametrization(base_width=32, **bad), base=Tied(32))
    p = Parametrization(kind="mup", base_width=32)
    roles = parametrize(Tied(64), p, base=Tied(32))
    assert roles["emb.weight"].tied_readout == "heads.0"
    with pytest.raises(ConfigError, match="applies μP itself"):
        parametrize(GPT(GPTConfig(width=64)), p, base=GPT(GPTConfig(width=32)))


def test_bundled_gpt_tied_head_has_the_readout_multiplier():
    p = Parametrization(kind="mup", base_width=32)
    model = GPT(GPTConfig(width=128, vocab_size=GPT2_VOCAB, block_size=16, tie_weights=True), p)
    assert model.lm_head.weight is model.wte.weight
    assert model.smup_roles["wte.weight"].tied_readout == "lm_head"
    assert model.readout_multiplier == pytest.approx(1 / 4)


# ------------------------------------------------------------------ vocabulary > width


@pytest.mark.parametrize("name", ["lamb", "shampoo"])
def test_embedding_and_readout_lr_at_vocab_50257_is_the_base_lr(name):
    """RULES.md §3: LAMB's and Adam-grafted Shampoo's input and readout LR is η at any vocab
    (the bug: 0.5·η and 2·η at vocab 50257, m = 4)."""
    p = Parametrization(kind="mup", base_width=64)
    model = GPT(GPTConfig(width=256, vocab_size=GPT2_VOCAB, block_size=16), p)
    kwargs = {"grafting": "adam"} if name == "shampoo" else {}
    opt = smup.build_optimizer(name, model, p, lr=1e-3, **kwargs)
    lrs = {n: g["lr"] for g in opt.param_groups for n in g["names"]}
    assert lrs["wte.weight"] == pytest.approx(1e-3)
    assert lrs["lm_head.weight"] == pytest.approx(1e-3)
    # hidden: η/sqrt(m) = η/2 for both (LAMB's and grafted Shampoo's measured rules)
    assert lrs["blocks.0.mlp.c_fc.weight"] == pytest.approx(1e-3 / 2)


# ------------------------------------------------------------------ heads and GQA


def test_attention_scale_follows_the_base_models_head_size():
    """Fixed head count: sqrt(d_base)/d_head; fixed head size: SP's 1/sqrt(d_head) at every
    width (RULES.md §3)."""
    p = Parametrization(kind="mup", base_width=64)
    fixed_count = GPT(GPTConfig(width=256, n_heads=2, block_size=8), p)
    assert fixed_count.blocks[0].attn.scale == pytest.approx(math.sqrt(32) / 128)
    fixed_size = GPT(GPTConfig(width=256, n_heads=16, head_dim=16, block_size=8), p)
    assert fixed_size.blocks[0].attn.n_heads == 16
    assert fixed_size.blocks[0].attn.scale == pytest.approx(1 / 4)
    assert p.attention_scale(16, d_head_base=16) == pytest.approx(1 / 4)
    assert Parametrization(kind="sp").attention_scale(128, d_head_base=32) == pytest.approx(
        1 / math.sqrt(128)
    )
    cfg = GPTConfig(width=256, n_heads=16, head_dim=16, n_kv_heads=4).resized(64, 3)
    assert (cfg.n_heads, cfg.kv_heads, cfg.d_head, cfg.depth) == (4, 1, 16, 3)
    with pytest.raises(ConfigError, match=r"means 8 heads, not model\.n_heads 2"):
        GPTConfig(width=128, head_dim=16)
    with pytest.raises(ConfigError, match=r"not a multiple of model\.head_dim 16"):
        GPT(GPTConfig(width=64, n_heads=4, head_dim=16), Parametrization(base_width=40))


def test_grouped_query_attention_roles_splits_and_forward():
    p = Parametrization(kind="mup", base_width=64)
    cfg = GPTConfig(width=128, n_heads=4, n_kv_heads=2, block_size=16, vocab_size=50)
    model = GPT(cfg, p)
    attn = model.blocks[0].attn
    assert attn.c_attn.weight.shape == (128 + 2 * 64, 128)
    info = model.smup_roles["blocks.0.attn.c_attn.weight"]
    assert (info.role, info.fan_in, info.fan_out, info.m_in, info.m_out) == (
        "hidden",
        128,
        256,
        2.0,
        2.0,
    )
    assert model.smup_splits["blocks.*.attn.c_attn.weight"] == (128, 64, 64)
    # forward = attention with each K/V head repeated over its query group
    x = torch.randn(2, 16, 128)
    q, k, v = attn.c_attn(x).split((128, 64, 64), dim=2)
    q = q.view(2, 16, 4, 32).transpose(1, 2)
    k, v = (z.view(2, 16, 2, 32).transpose(1, 2).repeat_interleave(2, dim=1) for z in (k, v))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scale)
    ref = attn.c_proj(ref.transpose(1, 2).reshape(2, 16, 128))
    assert torch.allclose(attn(x), ref, atol=1e-5)
    # Muon orthogonalizes q, k and v as three blocks of unequal height
    opt = smup.build_optimizer("muon", model, p, lr=0.02)
    w = attn.c_attn.weight
    w0 = w.detach().clone()
    w.grad = torch.randn_like(w)
    for other in model.parameters():
        if other is not w:
            other.grad = None
    opt.step()
    delta = (w.detach() - w0) / -0.02
    for rows in delta.split((128, 64, 64)):  # each block ≈ U·Vᵀ · sqrt(fan_out/fan_in)
        factor = math.sqrt(rows.size(0) / 128)
        assert torch.linalg.svdvals(rows).max().item() / factor == pytest.approx(1.0, abs=0.2)


# ------------------------------------------------------------------ coordinate checks


def gpt2_batches(batch_size: int = 4, block: int = 32) -> list:
    from conftest import shared_data_dir  # tests/ is on sys.path (no package)

    tokens = word_tokens(shared_data_dir())
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(tokens) - block - 1, (5, batch_size), generator=gen)
    return [
        tuple(torch.stack([tokens[s + k : s + k + block] for s in row]) for k in (0, 1))
        for row in starts
    ]


def tied_gpt2_coord_check(optimizer: str, lr: float, seeds=(0, 1, 2)):
    """GPT-2's shapes at widths 64→256: vocab 50257 > width, the head tied to the embedding,
    Conv1D weights, heads of size 16 added with width; the readout's change split into its
    own update ΔW·x and W₀·Δx."""

    def loss(model, x, y):
        logits = model(x)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))

    params = {"sp": Parametrization(kind="sp"), "mup": Parametrization(kind="mup", base_width=64)}
    return coord_check(
        build_gpt2,
        params,
        (64, 128, 256),
        gpt2_batches(),
        loss=loss,
        optimizer=optimizer,
        lr=lr,
        seeds=seeds,
        split_terms=("logits",),
    )


HIDDEN = ("block0.attn", "block0.mlp", "block1.attn", "block1.mlp", "residual")


@pytest.mark.parametrize("optimizer", ["adamw", "lamb"])
def test_tied_gpt2_vocab_50257_coord_check(optimizer):
    """μP: hidden groups and the tied head's own update ΔW·x flat, logits flat (AdamW) or
    falling (LAMB); SP: logits grow. LAMB's head moves by η·RMS(W) per step, so at these
    widths the logit change is mostly W₀·Δx, which μP makes vanish as 1/sqrt(m) (slope
    ≈ −0.5, measured) — the term that says whether the head's rule is right is ΔW·x
    (benchmarks/coord_spread.py: spread of every slope here)."""
    slopes = tied_gpt2_coord_check(optimizer, 3e-3).slopes()
    mup, sp = slopes["mup"], slopes["sp"]
    for group in (*HIDDEN, "logits:ΔW·x"):
        assert abs(mup[group]) <= 0.2, (optimizer, group, slopes)
    assert sp["logits"] >= 0.5, (optimizer, slopes)
    if optimizer == "adamw":
        assert abs(mup["logits"]) <= 0.2, slopes
    else:
        assert mup["logits"] <= 0.2 and mup["logits:W₀·Δx"] <= -0.3, slopes
