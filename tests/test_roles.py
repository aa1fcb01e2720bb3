"""Role inference on the bundled GPT and on models written without the library."""

import pytest
import torch
from torch import nn

from spectral_mup import ConfigError, Parametrization, infer_roles
from spectral_mup.models import GPT, GPTConfig


def expected_gpt_role(name: str) -> str:
    if name in ("wte.weight", "wpe.weight"):
        return "input"
    if name == "lm_head.weight":
        return "output"
    if name.endswith("bias") or ".ln_" in name or name.startswith("ln_f"):
        return "vector"
    return "hidden"


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tie", [True, False])
def test_gpt_roles(bias, tie):
    p = Parametrization(kind="mup", base_width=32, base_depth=2)
    model = GPT(
        GPTConfig(
            width=128, depth=6, n_heads=4, vocab_size=65, block_size=16, bias=bias, tie_weights=tie
        ),
        p,
    )
    roles = model.smup_roles
    names = [n for n, _ in model.named_parameters()]
    assert sorted(roles) == sorted(names)
    assert ("lm_head.weight" in roles) is not tie  # a tied head is the embedding (input role)
    for name, info in roles.items():
        assert info.role == expected_gpt_role(name), name
        assert info.in_block is name.startswith("blocks."), name
        assert info.m_depth == (3.0 if info.in_block else 1.0)
        if info.role == "hidden":
            assert (info.m_in, info.m_out) == (4.0, 4.0)
        if info.role == "input":
            assert (info.m_in, info.m_out) == (1.0, 4.0)
    if not tie:
        assert (roles["lm_head.weight"].m_in, roles["lm_head.weight"].m_out) == (4.0, 1.0)
        assert (roles["lm_head.weight"].fan_in, roles["lm_head.weight"].fan_out) == (128, 65)
    fans = {n: (r.fan_in, r.fan_out) for n, r in roles.items()}
    assert fans["wte.weight"] == (65, 128)  # an embedding's fan_in is the vocabulary
    assert fans["wpe.weight"] == (16, 128)
    assert fans["blocks.0.attn.c_attn.weight"] == (128, 384)
    assert fans["blocks.0.mlp.c_proj.weight"] == (512, 128)
    assert fans["blocks.0.ln_1.weight"] == (1, 128)


def mlp(width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(10, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 3)
    )


def test_sequential_mlp():
    roles = infer_roles(mlp(256), base=mlp(64))
    got = {n: (r.role, r.m_in, r.m_out) for n, r in roles.items()}
    assert got == {
        "0.weight": ("input", 1.0, 4.0),
        "0.bias": ("vector", 1.0, 4.0),
        "2.weight": ("hidden", 4.0, 4.0),
        "2.bias": ("vector", 1.0, 4.0),
        "4.weight": ("output", 4.0, 1.0),
        "4.bias": ("vector", 1.0, 1.0),
    }
    assert not any(r.in_block for r in roles.values())


class HandWrittenBlock(nn.Module):
    """A pre-norm residual block written without the library's help."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 3 * width)
        self.down = nn.Linear(3 * width, width, bias=False)
        self.gate = nn.Parameter(torch.zeros(()))  # a learned scalar

    def forward(self, x):
        return x + self.gate * self.down(torch.relu(self.up(self.norm(x))))


class HandWrittenNet(nn.Module):
    def __init__(self, width: int, depth: int):
        super().__init__()
        self.embed = nn.Embedding(50, width)
        self.pos = nn.Parameter(torch.zeros(16, width))
        self.layers = nn.ModuleList(HandWrittenBlock(width) for _ in range(depth))
        self.readout = nn.Linear(width, 50)


def test_hand_written_block_with_override():
    with pytest.raises(ConfigError, match=r"cannot tell fan_in from fan_out of 'pos'.*overrides"):
        infer_roles(HandWrittenNet(96, 6), HandWrittenNet(32, 2))
    roles = infer_roles(
        HandWrittenNet(96, 6), base=HandWrittenNet(32, 2), overrides={"pos": "input"}
    )
    got = {n: (r.role, r.in_block) for n, r in roles.items() if not n.startswith("layers.1")}
    assert got == {
        "embed.weight": ("input", False),
        "pos": ("input", False),
        "layers.0.norm.weight": ("vector", True),
        "layers.0.norm.bias": ("vector", True),
        "layers.0.up.weight": ("hidden", True),
        "layers.0.up.bias": ("vector", True),
        "layers.0.down.weight": ("hidden", True),
        "layers.0.gate": ("vector", True),
        "layers.2.norm.weight": ("vector", True),
        "layers.2.norm.bias": ("vector", True),
        "layers.2.up.weight": ("hidden", True),
        "layers.2.up.bias": ("vector", True),
        "layers.2.down.weight": ("hidden", True),
        "layers.2.gate": ("vector", True),
        "layers.3.norm.weight": ("vector", True),
        "layers.3.norm.bias": ("vector", True),
        "layers.3.up.weight": ("hidden", True),
        "layers.3.up.bias": ("vector", True),
        "layers.3.down.weight": ("hidden", True),
        "layers.3.gate": ("vector", True),
        "layers.4.norm.weight": ("vector", True),
        "layers.4.norm.bias": ("vector", True),
        "layers.4.up.weight": ("hidden", True),
        "layers.4.up.bias": ("vector", True),
        "layers.4.down.weight": ("hidden", True),
        "layers.4.gate": ("vector", True),
        "layers.5.norm.weight": ("vector", True),
        "layers.5.norm.bias": ("vector", True),
        "layers.5.up.weight": ("hidden", True),
        "layers.5.up.bias": ("vector", True),
        "layers.5.down.weight": ("hidden", True),
        "layers.5.gate": ("vector", True),
        "readout.weight": ("output", False),
        "readout.bias": ("vector", False),
    }
    assert roles["layers.4.up.weight"].m_depth == 3.0
    assert roles["layers.0.gate"].m_out == 1.0  # a scalar does not grow
    assert (roles["pos"].m_in, roles["pos"].m_out) == (1.0, 3.0)


def test_same_width_needs_delta():
    base = HandWrittenNet(32, 2)
    roles = infer_roles(
        HandWrittenNet(32, 2), base, delta=HandWrittenNet(64, 3), overrides={"pos": "input"}
    )
    assert roles["layers.0.up.weight"].role == "hidden"
    assert roles["layers.0.up.weight"].m_in == 1.0  # at the base width every multiplier is 1
    assert roles["layers.0.up.weight"].in_block


def test_bad_override_and_wrapper_names():
    with pytest.raises(ConfigError, match="unknown role"):
        infer_roles(mlp(64), mlp(32), overrides={"0.weight": "embedding"})
    with pytest.raises(ConfigError, match="can only be 'vector'"):
        infer_roles(mlp(64), mlp(32), overrides={"0.bias": "hidden"})
    compiled_names = {f"_orig_mod.{n}": tuple(p.shape) for n, p in mlp(32).named_parameters()}
    roles = infer_roles(mlp(64), compiled_names)
    assert roles["2.weight"].role == "hidden"


def test_meta_device_bases_are_free():
    with torch.device("meta"):
        base, delta = mlp(8), mlp(16)
    roles = infer_roles(mlp(8), base, delta)
    assert roles["2.weight"].role == "hidden"


def test_output_override_on_a_matrix_that_grows_everywhere_is_a_one_line_error():
    class Free(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(width, 2 * width))

    with pytest.raises(ConfigError, match=r"override 'w' -> 'output' needs a dimension that stays"):
        infer_roles(Free(64), Free(32), overrides={"w": "output"})
