"""The bundled GPT: shapes and the three μP forward multipliers."""

import math

import pytest
import torch
import torch.nn.functional as F

from spectral_mup import Parametrization
from spectral_mup.errors import ConfigError
from spectral_mup.models import GPT, GPTConfig

P = Parametrization(
    kind="mup", base_width=32, base_depth=2, depth_alpha=1.0, zero_init_readout=False
)
CFG = GPTConfig(width=128, depth=8, n_heads=4, vocab_size=65, block_size=16)


def test_forward_shape_and_param_count():
    model = GPT(CFG, P)
    assert model(torch.randint(0, 65, (3, 16))).shape == (3, 16, 65)
    n = 128
    per_block = 4 * n + (3 * n * n + 3 * n) + (n * n + n) + (4 * n * n + 4 * n) + (4 * n * n + n)
    assert model.num_params() == 65 * n + 16 * n + 8 * per_block + 2 * n + 65 * n
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.randint(0, 65, (1, 17)))


def test_forward_multipliers_are_applied():
    torch.manual_seed(0)
    model = GPT(CFG, P)
    assert model.readout_multiplier == pytest.approx(1 / 4)
    block = model.blocks[0]
    assert block.branch_multiplier == pytest.approx(2 / 8)
    d_head, d_base = 32, 8
    assert block.attn.scale == pytest.approx(math.sqrt(d_base) / d_head)
    x = torch.randint(0, 65, (2, 16))
    h = model.drop(model.wte(x) + model.wpe(torch.arange(16)))
    # one block by hand: attention with scale sqrt(d_base)/d_head, branches × m_L^-α
    a = block.attn
    q, k, v = a.c_attn(block.ln_1(h)).split(128, dim=2)
    q, k, v = (z.view(2, 16, 4, 32).transpose(1, 2) for z in (q, k, v))
    att = (q @ k.transpose(-2, -1)) * (math.sqrt(d_base) / d_head)
    att = att.masked_fill(torch.triu(torch.ones(16, 16, dtype=torch.bool), 1), float("-inf"))
    y = (F.softmax(att, dim=-1) @ v).transpose(1, 2).reshape(2, 16, 128)
    h1 = h + 0.25 * a.c_proj(y)
    h1 = h1 + 0.25 * block.mlp(block.ln_2(h1))
    torch.testing.assert_close(block(h), h1, rtol=1e-5, atol=1e-5)
    for b in model.blocks:
        h = b(h)
    torch.testing.assert_close(model(x), model.lm_head(model.ln_f(h)) / 4)


def test_sp_ignores_width_and_depth():
    model = GPT(CFG, Parametrization(kind="sp", base_width=32, base_depth=2))
    assert model.readout_multiplier == 1.0
    assert model.blocks[0].branch_multiplier == 1.0
    assert model.blocks[0].attn.scale == pytest.approx(1 / math.sqrt(32))


def test_tied_head_shares_the_embedding():
    model = GPT(GPTConfig(width=64, depth=1, tie_weights=True, block_size=8), P)
    assert model.lm_head.weight is model.wte.weight
    assert "lm_head.weight" not in model.smup_roles
    assert model.wte.weight.abs().sum() > 0  # zero readout init is skipped when tied


def test_coord_taps():
    taps = GPT(GPTConfig(width=32, depth=2, block_size=8), P).coord_taps()
    assert list(taps) == [
        "embedding",
        "block0.attn",
        "block0.mlp",
        "block1.attn",
        "block1.mlp",
        "residual",
        "logits",
    ]


def test_rotary_positions_replace_the_learned_embedding():
    """position = "rotary": no wpe, queries and keys rotated by position (GPT-NeoX's
    "rotate half": pair (i, i + d/2) turned by angle pos · θ^(-2i/d)), everything else as
    the learned-position GPT, μP roles included."""
    torch.manual_seed(0)
    cfg = GPTConfig(width=128, depth=8, n_heads=4, vocab_size=65, block_size=16)
    model = GPT(GPTConfig(**{**cfg.__dict__, "position": "rotary"}), P)
    learned = GPT(cfg, P)
    assert not hasattr(model, "wpe")
    assert model.num_params() == learned.num_params() - 16 * 128
    assert set(model.smup_roles) == set(learned.smup_roles) - {"wpe.weight"}
    assert all(model.smup_roles[n] == learned.smup_roles[n] for n in model.smup_roles)
    x = torch.randint(0, 65, (2, 16))
    h = model.drop(model.wte(x))
    block, a = model.blocks[0], model.blocks[0].attn
    q, k, v = a.c_attn(block.ln_1(h)).split(128, dim=2)
    q, k, v = (z.view(2, 16, 4, 32).transpose(1, 2) for z in (q, k, v))
    angle = torch.arange(16.0)[:, None] * 10000.0 ** (-torch.arange(0, 32, 2) / 32)
    cos, sin = angle.cos(), angle.sin()

    def rotate(z: torch.Tensor) -> torch.Tensor:
        z1, z2 = z[..., :16], z[..., 16:]
        return torch.cat((z1 * cos - z2 * sin, z1 * sin + z2 * cos), dim=-1)

    att = (rotate(q) @ rotate(k).transpose(-2, -1)) * a.scale
    att = att.masked_fill(torch.triu(torch.ones(16, 16, dtype=torch.bool), 1), float("-inf"))
    y = (F.softmax(att, dim=-1) @ v).transpose(1, 2).reshape(2, 16, 128)
    h1 = h + 0.25 * a.c_proj(y)
    h1 = h1 + 0.25 * block.mlp(block.ln_2(h1))
    torch.testing.assert_close(block(h), h1, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"position": "absolute"}, 'model.position must be "learned" or "rotary"'),
        ({"position": "rotary", "width": 30, "n_heads": 2}, "rotary embeddings need an even"),
        ({"position": "rotary", "rope_theta": 0}, "model.rope_theta must be a number > 0"),
        ({"rope_theta": 5000.0}, 'model.rope_theta is for model.position = "rotary"'),
    ],
)
def test_position_config_errors(fields, match):
    with pytest.raises(ConfigError, match=match):
        GPTConfig(**{"width": 32, **fields})
