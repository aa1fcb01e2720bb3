"""Tests for the Llama model: Llama's hidden-size rule, parity with an independent reference
forward (Meta's complex-number rotary embedding), fused = separate projections, roles from
the spec, μP's forward multipliers, Muon on fused blocks, and [model] arch = "llama" in
configs and training."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import spectral_mup as smup
from spectral_mup.config import load_config
from spectral_mup.errors import ConfigError
from spectral_mup.models import GPTConfig, Llama, LlamaConfig
from spectral_mup.sweep import canonical_config, run_id
from spectral_mup.train import run

pytestmark = pytest.mark.usefixtures("one_thread")


def small(**kw) -> LlamaConfig:
    return LlamaConfig(**{"width": 32, "depth": 2, "vocab_size": 11, "block_size": 16, **kw})


# ----------------------------------------------------------------------------- config


def test_hidden_size_follows_llamas_rule() -> None:
    # Llama-2 7B: dim 4096, multiple_of 256 → 11008 (Meta's ModelArgs / params.json)
    assert LlamaConfig(width=4096, n_heads=32, multiple_of=256).ffn_dim == 11008
    # int(8/3·w) rounded up to a multiple of 16
    assert [LlamaConfig(width=w).ffn_dim for w in (16, 64, 256)] == [48, 176, 688]
    # the exactly proportional option named in LlamaConfig's docstring
    assert [LlamaConfig(width=w, ffn_ratio=2.75, multiple_of=4).ffn_dim for w in (16, 64)] == [
        44,
        176,
    ]


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"width": 30, "n_heads": 2}, "rotary embeddings need an even head size"),
        ({"n_heads": 4, "n_kv_heads": 3}, "not a multiple of model.n_kv_heads"),
        ({"norm_eps": 0.0}, "norm_eps must be a number > 0"),
        ({"rope_theta": None}, "rope_theta must be a number > 0"),
        ({"multiple_of": 0}, "multiple_of must be a positive integer"),
    ],
)
def test_bad_config_is_one_line_error(kw, match) -> None:
    with pytest.raises(ConfigError, match=match):
        small(**kw)


# ------------------------------------------------------------------ parity with a reference


def _reference_logits(model: Llama, idx: torch.Tensor) -> torch.Tensor:
    """Meta's Llama-2 forward written independently (llama/model.py's formulas): rotary
    embedding as complex rotation of consecutive pairs, RMSNorm in float32, SwiGLU, 1/sqrt(d)
    attention. Our model rotates (first half, second half) pairs, so the query/key rows are
    permuted from Meta's interleaved order before they are used here."""
    cfg = model.config
    d, h, kv = cfg.d_head, cfg.n_heads, cfg.kv_heads
    t = idx.shape[1]
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2).float() / d))
    cis = torch.polar(torch.ones(t, d // 2), torch.outer(torch.arange(t).float(), freqs))

    def to_meta(w: torch.Tensor, heads: int) -> torch.Tensor:
        # our head layout [x_0..x_{d/2-1}, y_0..y_{d/2-1}] → Meta's [x_0, y_0, x_1, y_1, ...]
        return w.view(heads, 2, d // 2, -1).transpose(1, 2).reshape(heads * d, -1)

    def rope(x: torch.Tensor) -> torch.Tensor:  # (b, t, heads, d), Meta's apply_rotary_emb
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * cis.view(1, t, 1, d // 2)).flatten(3)

    def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w

    x = model.tok_embeddings.weight[idx]
    b = x.shape[0]
    mask = torch.full((t, t), float("-inf")).triu(1)
    for layer in model.layers:
        a = layer.attention
        hx = rms(x, layer.attention_norm.weight)
        q = rope((hx @ to_meta(a.wq.weight, h).T).view(b, t, h, d))
        k = rope((hx @ to_meta(a.wk.weight, kv).T).view(b, t, kv, d))
        v = (hx @ a.wv.weight.T).view(b, t, kv, d)
        k, v = (z.repeat_interleave(h // kv, dim=2) for z in (k, v))
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + mask, dim=-1)
        x = x + (att @ v).transpose(1, 2).reshape(b, t, h * d) @ a.wo.weight.T
        f = layer.feed_forward
        hx = rms(x, layer.ffn_norm.weight)
        x = x + (F.silu(hx @ f.w1.weight.T) * (hx @ f.w3.weight.T)) @ f.w2.weight.T
    return rms(x, model.norm.weight) @ model.output.weight.T


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_forward_matches_metas_llama_formulas(n_kv_heads) -> None:
    torch.manual_seed(0)
    model = Llama(small(width=64, n_heads=4, n_kv_heads=n_kv_heads))
    with torch.no_grad():  # random norm gains, so a wrong gain would show
        for layer in model.layers:
            layer.attention_norm.weight.uniform_(0.5, 1.5)
            layer.ffn_norm.weight.uniform_(0.5, 1.5)
    idx = torch.randint(0, 11, (3, 16))
    with torch.no_grad():
        ours, ref = model(idx), _reference_logits(model, idx)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_rotary_scores_depend_on_relative_position_only() -> None:
    rot = Llama(small()).layers[0].attention.rotary
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(i: int, j: int) -> float:
        qs, ks = q.expand(1, 1, 16, 16).clone(), k.expand(1, 1, 16, 16).clone()
        return float((rot(qs)[0, 0, i] * rot(ks)[0, 0, j]).sum())

    assert score(5, 2) == pytest.approx(score(13, 10), rel=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-3)


def test_causal() -> None:
    model = Llama(small())
    idx = torch.randint(0, 11, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 11
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[:, :10], model(changed)[:, :10])


def copy_into_fused(sep: Llama, fused: Llama) -> None:
    """Give a fused model the separate model's weights (q, k, v and gate, up stacked by rows)."""
    with torch.no_grad():
        for a, b in zip(sep.layers, fused.layers, strict=True):
            b.attention.wqkv.weight.copy_(
                torch.cat([a.attention.wq.weight, a.attention.wk.weight, a.attention.wv.weight])
            )
            b.attention.wo.weight.copy_(a.attention.wo.weight)
            b.feed_forward.w13.weight.copy_(
                torch.cat([a.feed_forward.w1.weight, a.feed_forward.w3.weight])
            )
            b.feed_forward.w2.weight.copy_(a.feed_forward.w2.weight)
        fused.tok_embeddings.weight.copy_(sep.tok_embeddings.weight)
        fused.output.weight.copy_(sep.output.weight)


def test_fused_projections_equal_separate_ones() -> None:
    torch.manual_seed(0)
    sep, fused = (
        Llama(small(n_heads=4, n_kv_heads=2)),
        Llama(small(n_heads=4, n_kv_heads=2, fused=True)),
    )
    copy_into_fused(sep, fused)
    with torch.no_grad():
        idx = torch.randint(0, 11, (2, 16))
        torch.testing.assert_close(fused(idx), sep(idx))
    assert fused.smup_splits == {
        "layers.*.attention.wqkv.weight": (32, 16, 16),
        "layers.*.feed_forward.w13.weight": (96, 96),
    }


def test_muon_orthogonalizes_each_fused_block_as_the_separate_matrices() -> None:
    """One Muon step on the fused model moves every block exactly as on the separate one."""
    torch.manual_seed(0)
    p = smup.Parametrization(kind="mup", base_width=16, base_depth=2)
    sep, fused = Llama(small(), p), Llama(small(fused=True), p)
    copy_into_fused(sep, fused)
    idx = torch.randint(0, 11, (4, 16))
    for model in (sep, fused):
        opt = smup.build_optimizer("muon", model, p, lr=0.02)
        F.cross_entropy(model(idx).flatten(0, 1), idx.roll(-1, 1).flatten()).backward()
        opt.step()
    for a, b in zip(sep.layers, fused.layers, strict=True):
        qkv = torch.cat([a.attention.wq.weight, a.attention.wk.weight, a.attention.wv.weight])
        torch.testing.assert_close(b.attention.wqkv.weight, qkv, rtol=1e-4, atol=1e-6)
        w13 = torch.cat([a.feed_forward.w1.weight, a.feed_forward.w3.weight])
        torch.testing.assert_close(b.feed_forward.w13.weight, w13, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- μP


def test_roles_match_the_spec() -> None:
    """RULES.md §1: the embedding is input (fan_in = vocab fixed), the head output, every
    block matrix hidden and in a block, norm gains vectors; m per dimension that grows."""
    p = smup.Parametrization(kind="mup", base_width=32, base_depth=2)
    roles = Llama(small(width=128, depth=4, n_heads=2, n_kv_heads=1), p).smup_roles
    assert roles["tok_embeddings.weight"].role == "input"
    assert (roles["tok_embeddings.weight"].fan_in, roles["tok_embeddings.weight"].fan_out) == (
        11,
        128,
    )
    assert roles["output.weight"].role == "output" and roles["output.weight"].m_in == 4
    for name in ("attention.wq", "attention.wk", "attention.wv", "attention.wo"):
        info = roles[f"layers.3.{name}.weight"]
        assert (info.role, info.in_block, info.m_depth) == ("hidden", True, 2.0)
    wk = roles["layers.0.attention.wk.weight"]
    assert (wk.fan_in, wk.fan_out, wk.m_out) == (128, 64, 4.0)  # one kv head of size 64
    w2 = roles["layers.0.feed_forward.w2.weight"]
    assert (w2.fan_in, w2.m_in) == (352, 352 / 96)  # the rounded hidden sizes at 128 and 32
    assert roles["layers.0.ffn_norm.weight"].role == "vector"
    assert roles["norm.weight"].role == "vector" and not roles["norm.weight"].in_block


def test_forward_multipliers_come_from_the_parametrization() -> None:
    p = smup.Parametrization(kind="mup", base_width=32, base_depth=2, depth_alpha=1.0)
    model = Llama(small(width=128, depth=8, n_heads=2), p)
    assert model.readout_multiplier == pytest.approx(1 / 4)  # 1/m
    assert model.layers[0].branch_multiplier == pytest.approx(1 / 4)  # m_L^-1
    # sqrt(d_base)/d_head with d_head 64, d_base 16
    assert model.layers[0].attention.scale == pytest.approx(4 / 64)
    sp = Llama(small(width=128, depth=8, n_heads=2))
    assert sp.readout_multiplier == 1 and sp.layers[0].branch_multiplier == 1
    assert sp.layers[0].attention.scale == pytest.approx(1 / 8)
    # fixed head size: heads added with width, SP's 1/sqrt(d_head) kept
    fixed = Llama(small(width=128, n_heads=8, head_dim=16), p)
    assert fixed.layers[0].attention.scale == pytest.approx(1 / 4)


def test_mup_at_the_base_size_is_sp() -> None:
    mup = smup.Parametrization(kind="mup", base_width=32, base_depth=2)
    idx = torch.randint(0, 11, (2, 16))
    torch.manual_seed(0)
    a = Llama(small(), mup)
    torch.manual_seed(0)
    b = Llama(small())
    with torch.no_grad():
        torch.testing.assert_close(a(idx), b(idx))


def test_init_follows_the_rules() -> None:
    """Hidden std σ_b/sqrt(m), embedding and head σ_b (readout multiplier 1/m), gains 1."""
    p = smup.Parametrization(kind="mup", base_width=128, base_depth=2, init_std=0.02)
    torch.manual_seed(0)
    model = Llama(small(width=512, n_heads=2, vocab_size=97), p)
    with torch.no_grad():
        hidden = float(model.layers[0].attention.wq.weight.std())
        embedding, head = float(model.tok_embeddings.weight.std()), float(model.output.weight.std())
    assert hidden == pytest.approx(0.01, rel=0.03)  # m = 4
    assert embedding == pytest.approx(0.02, rel=0.03) and head == pytest.approx(0.02, rel=0.03)
    assert torch.equal(model.norm.weight, torch.ones(512))


def test_tied_head_and_zero_query() -> None:
    p = smup.Parametrization(kind="mup", base_width=16, base_depth=2, zero_init_query=True)
    model = Llama(small(tie_weights=True, fused=True), p)
    assert model.output.weight is model.tok_embeddings.weight
    assert model.smup_roles["tok_embeddings.weight"].tied_readout == "output"
    assert "output.weight" not in model.smup_roles
    assert not model.layers[0].attention.wqkv.weight[:32].any()
    assert model.layers[0].attention.wqkv.weight[32:].any()
    with pytest.raises(ConfigError, match="tied"):
        Llama(
            small(tie_weights=True), smup.Parametrization(kind="mup", base_width=16, readout="init")
        )


# ----------------------------------------------------------------------------- configs


LLAMA_TOML = """\
[model]
arch = "llama"
width = 32
depth = 1
n_heads = 2
n_kv_heads = 1
block_size = 32

[param]
base_width = 32
base_depth = 1

[train]
batch_size = 4
max_iters = 6
eval_interval = 3
eval_iters = 2
warmup_iters = 2
progress = false
"""


def test_arch_in_configs(tmp_path: Path) -> None:
    path = tmp_path / "llama.toml"
    path.write_text(LLAMA_TOML)
    cfg = load_config(path, ["--train.out_dir", str(tmp_path / "out")])
    assert isinstance(cfg.model, LlamaConfig) and cfg.model.n_kv_heads == 1
    assert cfg.to_dict()["model"]["arch"] == "llama"
    assert canonical_config(cfg)["model"]["arch"] == "llama"
    gpt = load_config(None, [])
    assert isinstance(gpt.model, GPTConfig) and "arch" not in canonical_config(gpt)["model"]
    other = load_config(path, ["--model.arch", "gpt", "--train.out_dir", str(tmp_path / "out")])
    assert isinstance(other.model, GPTConfig) and run_id(other) != run_id(cfg)
    with pytest.raises(ConfigError, match=r"unknown config key 'model.mlp_ratio'.*arch = 'llama'"):
        load_config(path, ["--model.mlp_ratio", "4"])
    with pytest.raises(ConfigError, match=r"model\.arch must be one of gpt, llama"):
        load_config(path, ["--model.arch", "mamba"])
    result = run(cfg, log=None)
    assert result["iters"] == 6 and math.isfinite(result["best_val_loss"])
    assert result["best_val_loss"] < math.log(65)
