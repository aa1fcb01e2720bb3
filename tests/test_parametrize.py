"""Parametrization applied to models: init, param groups, μP == SP at the base."""

import math

import pytest
import torch
from torch import nn

import spectral_mup as smup
from spectral_mup import ConfigError, Parametrization, build_optimizer
from spectral_mup.models import GPT, GPTConfig

CFG = GPTConfig(width=64, depth=3, n_heads=2, vocab_size=65, block_size=16)


def group_table(opt):
    return sorted(
        (name, g["lr"], g["weight_decay"], g.get("eps"))
        for g in opt.param_groups
        for name in g["names"]
    )


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("wd_mode", ["coupled", "independent"])
def test_mup_at_base_equals_sp(optimizer, wd_mode):
    sp = Parametrization(kind="sp", wd_mode=wd_mode)
    mup = Parametrization(
        kind="mup",
        base_width=64,
        base_depth=3,
        wd_mode=wd_mode,
        zero_init_readout=False,
        wd_width_scaling="inverse",
    )
    torch.manual_seed(0)
    a = GPT(CFG, sp)
    torch.manual_seed(0)
    b = GPT(CFG, mup)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb), na  # same init, bit for bit
    assert a.readout_multiplier == b.readout_multiplier == 1.0
    assert a.blocks[0].branch_multiplier == b.blocks[0].branch_multiplier == 1.0
    assert a.blocks[0].attn.scale == b.blocks[0].attn.scale == pytest.approx(1 / math.sqrt(32))
    x = torch.randint(0, 65, (2, 16))
    assert torch.equal(a(x), b(x))
    oa = build_optimizer(optimizer, a, sp, lr=1e-2, weight_decay=0.1)
    ob = build_optimizer(optimizer, b, mup, lr=1e-2, weight_decay=0.1)
    assert group_table(oa) == group_table(ob)


def test_mup_groups_at_width_4x_and_depth_2x():
    p = Parametrization(kind="mup", base_width=32, base_depth=2, depth_alpha=0.5)
    model = GPT(GPTConfig(width=128, depth=4, n_heads=2, vocab_size=65, block_size=16), p)
    opt = build_optimizer("adamw", model, p, lr=1e-2, weight_decay=0.1, eps=1e-8)
    by_name = {n: g for g in opt.param_groups for n in g["names"]}
    ml = 2.0
    hidden = by_name["blocks.1.mlp.c_fc.weight"]
    assert hidden["lr"] == pytest.approx(1e-2 / 4 * ml**-0.5)
    assert hidden["lr"] * hidden["weight_decay"] == pytest.approx(1e-2 * 0.1)  # lr·λ invariant
    assert hidden["eps"] == pytest.approx(1e-8 / (4 * ml**0.5))
    emb = by_name["wte.weight"]
    assert (emb["lr"], emb["weight_decay"], emb["eps"]) == pytest.approx((1e-2, 0.1, 1e-8 / 4))
    head = by_name["lm_head.weight"]
    assert (head["lr"], head["eps"]) == pytest.approx((1e-2, 1e-8 / 4))
    gain = by_name["blocks.0.ln_1.weight"]
    assert (gain["lr"], gain["weight_decay"], gain["eps"]) == pytest.approx(
        (1e-2 * ml**-0.5, 0, 1e-8)
    )
    assert by_name["ln_f.weight"]["lr"] == pytest.approx(1e-2)
    # forward multipliers
    assert model.readout_multiplier == pytest.approx(1 / 4)
    assert model.blocks[0].branch_multiplier == pytest.approx(ml**-0.5)
    assert model.blocks[0].attn.scale == pytest.approx(math.sqrt(16) / 64)


def test_shampoo_and_soap_groups_at_width_4x_and_depth_2x():
    """Shampoo: damping under its own key `epsilon`, scaled by (c·a)²·m_in/m_out; Qiu et al.'s
    blocked formula for the LR. SOAP: Adam-like eps ε·c·a/m_out, blocked LR."""
    p = Parametrization(kind="mup", base_width=32, base_depth=2, depth_alpha=1.0)
    model = GPT(GPTConfig(width=128, depth=4, n_heads=2, vocab_size=65, block_size=16), p)
    sh = build_optimizer("shampoo", model, p, lr=1e-2, eps=1e-6)
    by_name = {n: g for g in sh.param_groups for n in g["names"]}
    ml = 2.0
    hidden, emb = by_name["blocks.1.attn.c_proj.weight"], by_name["wte.weight"]
    assert "eps" not in hidden
    assert hidden["epsilon"] == pytest.approx(1e-6 / ml**2)  # ε/m_L^(2α)
    assert emb["epsilon"] == pytest.approx(1e-6 / 4)  # ε/m on input
    assert by_name["lm_head.weight"]["epsilon"] == pytest.approx(1e-6 / 4)  # and readout
    assert hidden["lr"] == pytest.approx(1e-2)  # orthogonalized: hidden η (× m_L^(α−1) = 1)
    assert emb["lr"] == pytest.approx(1e-2 * 2)  # input η·sqrt(m)
    soap = build_optimizer("soap", model, p, lr=1e-2, block_size=32)
    by_name = {n: g for g in soap.param_groups for n in g["names"]}
    hidden = by_name["blocks.1.attn.c_proj.weight"]
    assert hidden["eps"] == pytest.approx(1e-8 / (4 * ml))
    assert hidden["lr"] == pytest.approx(1e-2 / 4)  # blocks of 32: 4×4 blocks vs 1 → ÷4
    assert by_name["blocks.1.ln_1.weight"]["lr"] == pytest.approx(1e-2)  # vector: Adam


def test_independent_weight_decay_groups():
    p = Parametrization(
        kind="mup", base_width=32, base_depth=2, wd_mode="independent", wd_width_scaling="inverse"
    )
    model = GPT(GPTConfig(width=128, depth=2, n_heads=2, vocab_size=65, block_size=16), p)
    opt = build_optimizer("adamw", model, p, lr=1e-2, weight_decay=0.1)
    for g in opt.param_groups:
        if g["role"] == "vector":
            assert g["weight_decay"] == 0.0
        else:  # per-step decay at peak LR = λ · base_width/width, whatever the group's LR
            assert g["lr"] * g["weight_decay"] == pytest.approx(0.1 / 4)


def test_init_statistics():
    p = Parametrization(kind="mup", base_width=64, init_std=0.02)
    torch.manual_seed(0)
    model = GPT(GPTConfig(width=1024, depth=1, n_heads=2, vocab_size=65, block_size=16), p)
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert model.blocks[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02 / 4, rel=0.02)
    # head: σ_b by default (the width-independent init of the readout-multiplier convention)
    assert model.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.05)
    zero = Parametrization(kind="mup", base_width=64, zero_init_readout=True)
    assert GPT(model.config, zero).lm_head.weight.abs().max().item() == 0.0
    assert model.blocks[0].attn.c_attn.bias.abs().max().item() == 0.0
    assert torch.equal(model.blocks[0].ln_1.weight, torch.ones(1024))
    q = Parametrization(kind="mup", base_width=64, zero_init_query=True)
    m2 = GPT(GPTConfig(width=128, depth=1, n_heads=2, vocab_size=65, block_size=16), q)
    assert m2.blocks[0].attn.c_attn.weight[:128].abs().max().item() == 0.0
    assert m2.blocks[0].attn.c_attn.weight[128:].abs().max().item() > 0.0


HPS = dict(
    lr_input=2.0,
    lr_output=0.5,
    lr_vector=4.0,
    readout_scale=3.0,
    init_input=0.5,
    init_output=2.0,
    attention_mult=1.5,
)


def test_transferable_hps_at_width_4x():
    """Base-model HPs beyond the LR (Parametrization docstring): per-role LR multipliers on top
    of the width rules, the readout multiplier's constant, per-role init std, attention
    inverse temperature — each a plain factor on the default value, at any width."""
    shape = GPTConfig(width=256, depth=1, n_heads=2, vocab_size=65, block_size=16)
    plain, tuned = Parametrization(base_width=64), Parametrization(base_width=64, **HPS)
    torch.manual_seed(0)
    a = GPT(shape, plain)
    torch.manual_seed(0)
    b = GPT(shape, tuned)
    ga = {
        n: g for g in build_optimizer("adamw", a, plain, 1e-2, 0.1).param_groups for n in g["names"]
    }
    gb = {
        n: g for g in build_optimizer("adamw", b, tuned, 1e-2, 0.1).param_groups for n in g["names"]
    }
    factors = {"wte.weight": 2.0, "lm_head.weight": 0.5, "ln_f.weight": 4.0,
               "blocks.0.ln_1.weight": 4.0, "blocks.0.mlp.c_fc.weight": 1.0}  # fmt: skip
    for name, want in factors.items():
        assert gb[name]["lr"] == pytest.approx(want * ga[name]["lr"]), name
        assert gb[name]["weight_decay"] == ga[name]["weight_decay"], name  # lr·λ: torch's
    assert ga["blocks.0.mlp.c_fc.weight"]["lr"] == pytest.approx(1e-2 / 4)  # η/m, unchanged
    assert b.readout_multiplier == pytest.approx(3.0 / 4)  # 3 · 1/m
    assert b.blocks[0].attn.scale == pytest.approx(1.5 * math.sqrt(32) / 128)
    assert b.wte.weight.std().item() == pytest.approx(0.5 * 0.02, rel=0.05)
    assert b.lm_head.weight.std().item() == pytest.approx(2.0 * 0.02, rel=0.05)
    assert b.blocks[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02 / 2, rel=0.05)  # σ/√m


def test_transferable_hps_keep_mup_equal_to_sp_at_the_base():
    sp = Parametrization(kind="sp", **HPS)
    mup = Parametrization(kind="mup", base_width=64, base_depth=3, **HPS)
    torch.manual_seed(0)
    a = GPT(CFG, sp)
    torch.manual_seed(0)
    b = GPT(CFG, mup)
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), na
    assert a.readout_multiplier == b.readout_multiplier == 3.0
    x = torch.randint(0, 65, (2, 16))
    assert torch.equal(a(x), b(x))
    oa = build_optimizer("adamw", a, sp, lr=1e-2, weight_decay=0.1)
    ob = build_optimizer("adamw", b, mup, lr=1e-2, weight_decay=0.1)
    assert group_table(oa) == group_table(ob)
    for name in ("lr_input", "readout_scale", "attention_mult"):
        with pytest.raises(ConfigError, match=f"{name} must be a finite number > 0"):
            Parametrization(**{name: 0.0})
    with pytest.raises(ConfigError, match="init_output must be a finite number >= 0"):
        Parametrization(init_output=-1.0)


def test_build_optimizer_matches_hand_written_adamw():
    """Oracle: torch.optim.AdamW fed the per-tensor LRs of RULES.md by hand."""
    p = Parametrization(kind="mup", base_width=32, base_depth=1)
    torch.manual_seed(0)
    a = GPT(GPTConfig(width=96, depth=2, n_heads=2, vocab_size=65, block_size=16), p)
    b = GPT(a.config, p)
    b.load_state_dict(a.state_dict())
    opt_a = build_optimizer("adamw", a, p, lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    m, ml = 3.0, 2.0
    groups = []
    for name, param in b.named_parameters():
        if name.startswith("blocks.") and param.ndim == 2:
            lr, wd, eps = 3e-3 / m, 0.1 * m, 1e-8 / (m * ml)
        elif param.ndim == 2:
            lr, wd, eps = 3e-3, 0.1, 1e-8 / m
        else:
            lr, wd, eps = 3e-3, 0.0, 1e-8
        groups.append({"params": [param], "lr": lr, "weight_decay": wd, "eps": eps})
    # the same (fused) kernel as build_optimizer's: this oracle checks the per-tensor values;
    # fused against foreach is tests/test_optim.py's (they differ by up to 7e-8 here)
    opt_b = torch.optim.AdamW(groups, betas=(0.9, 0.95), fused=True)
    x = torch.randint(0, 65, (4, 16))
    for _ in range(5):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-7)


def test_parametrize_third_party_readout_hook():
    def net(width):
        return nn.Sequential(
            nn.Linear(8, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 2)
        )

    p = Parametrization(kind="mup", base_width=16, zero_init_readout=False)
    model = net(64)
    roles = smup.parametrize(model, p, base=net(16))
    assert model.smup_roles is roles
    x = torch.randn(3, 8)
    features = model[:4](x)
    head = model[4]  # readout input scaled by 1/m, bias untouched
    expected = torch.nn.functional.linear(features / 4, head.weight, head.bias)
    torch.testing.assert_close(model(x), expected)
    smup.parametrize(model, p, base=net(16), init=False)  # again: the hook must not stack
    torch.testing.assert_close(model(x), expected)
    assert model[2].weight.std().item() == pytest.approx(0.02 / 2, rel=0.1)
    opt = build_optimizer("adamw", model, p, lr=1e-3)
    by_name = {n: g["lr"] for g in opt.param_groups for n in g["names"]}
    assert by_name == pytest.approx(
        {
            "0.weight": 1e-3,
            "0.bias": 1e-3,
            "2.weight": 1e-3 / 4,
            "2.bias": 1e-3,
            "4.weight": 1e-3,
            "4.bias": 1e-3,
        }
    )


def test_errors():
    with pytest.raises(ConfigError, match="unknown optimizer 'adamx'"):
        build_optimizer("adamx", GPT(CFG), Parametrization(kind="sp"), lr=1e-3)
    with pytest.raises(ConfigError, match="model has no roles"):
        build_optimizer("adamw", nn.Linear(2, 2), Parametrization(), lr=1e-3)
    for kwargs, msg in [
        ({"base_width": 0}, "base_width"),
        ({"base_depth": -1}, "base_depth"),
        ({"depth_alpha": 0.7}, "depth_alpha"),
        ({"kind": "ntk"}, "kind"),
        ({"wd_mode": "l2"}, "wd_mode"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            Parametrization(**kwargs)
    with pytest.raises(ConfigError, match=r"not divisible by model\.n_heads"):
        GPTConfig(width=30, n_heads=4)
    with pytest.raises(ConfigError, match=r"tied to its readout: readout=.init."):
        GPT(GPTConfig(width=64, tie_weights=True), Parametrization(base_width=32, readout="init"))
    with pytest.raises(
        ConfigError, match=r"base model \(param.base_width 30\): model.width 30 is not divisible"
    ):
        GPT(GPTConfig(width=64, n_heads=4), Parametrization(base_width=30))
