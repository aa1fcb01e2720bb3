"""spectral_mup.hf on tiny transformers models built from configs (no downloads): roles,
attention scale, readout and residual-branch multipliers, and a coordinate check through
the Hugging Face forward pass."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
import transformers  # the [hf] extra, also in [test]

import spectral_mup as smup
from spectral_mup import coord_check, hf  # coord_check: the binding name (DESIGN.md)
from spectral_mup.data import load_dataset
from spectral_mup.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 65


def gpt2(width=128, depth=4, heads=4, **kw):
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=width,
        n_layer=depth,
        n_head=heads,
        bos_token_id=0,
        eos_token_id=0,
        **kw,
    )
    return transformers.GPT2LMHeadModel(cfg)


def llama(width=128, depth=4, heads=4, kv=2, ffn=None):
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=width,
        intermediate_size=ffn or 3 * width,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg)


def test_gpt2_roles_tied_head_conv1d_and_fixed_head_size() -> None:
    p = smup.Parametrization(kind="mup", base_width=32, base_depth=2, depth_alpha=1.0)
    model = gpt2()
    roles = hf.parametrize(model, p)
    wte = roles["transformer.wte.weight"]
    assert (wte.role, wte.tied_readout, wte.m_out) == ("input", "lm_head", 4.0)
    assert "lm_head.weight" not in roles  # one tensor, one entry
    c_attn = roles["transformer.h.0.attn.c_attn.weight"]
    assert (c_attn.role, c_attn.transposed, c_attn.fan_in, c_attn.fan_out) == (
        "hidden",
        True,
        128,
        384,
    )
    assert c_attn.in_block and c_attn.m_depth == 2.0
    # heads of size 32 added with width: SP's 1/sqrt(32) stays (RULES.md §3, shapes)
    scales = [m.scaling for m in model.modules() if hasattr(m, "scaling")]
    assert scales == pytest.approx([32**-0.5] * 4)
    # residual branches × m_L^-1 = 1/2 (depth 4 over base 2), on attn and mlp of 4 layers
    mults = [h.multiplier for h in _branch_hooks(model)]
    assert mults == [0.5] * 8
    # Muon orthogonalizes q, k and v of the fused c_attn as three blocks
    assert model.smup_splits == {"transformer.h.*.attn.c_attn.weight": 3}


def test_gpt2_fixed_head_count_gets_mups_attention_scale() -> None:
    p = smup.Parametrization(kind="mup", base_width=32, base_depth=4)
    model = gpt2(width=128, heads=4)
    hf.parametrize(model, p, heads="count")
    # sqrt(d_base)/d_head with d_base 8 (32/4), d_head 32
    scales = [m.scaling for m in model.modules() if hasattr(m, "scaling")]
    assert scales == pytest.approx([math.sqrt(8) / 32] * 4)
    assert _branch_hooks(model) == []  # base depth: no multiplier
    del model.transformer.h[2].attn.scaling  # a layer that keeps its scale elsewhere
    with pytest.raises(ConfigError, match=r"3 of its 4 layers' attention modules keep"):
        hf.parametrize(model, p, heads="count")


def test_gpt2_inverse_layer_idx_scaling_is_kept() -> None:
    p = smup.Parametrization(kind="mup", base_width=32, base_depth=4)
    model = gpt2(scale_attn_by_inverse_layer_idx=True)
    hf.parametrize(model, p, heads="count")
    attn = [m for m in model.modules() if hasattr(m, "scaling")]
    assert [a.scaling for a in attn] == pytest.approx(
        [math.sqrt(8) / 32 / (i + 1) for i in range(4)]
    )


def test_llama_gqa_roles_readout_and_forward() -> None:
    p = smup.Parametrization(kind="mup", base_width=64, base_depth=2)
    model = llama()
    roles = hf.parametrize(model, p)
    k = roles["model.layers.0.self_attn.k_proj.weight"]
    assert (k.role, k.fan_in, k.fan_out, k.m_out) == ("hidden", 128, 64, 2.0)  # 2 kv heads of 32
    assert roles["lm_head.weight"].role == "output" and roles["lm_head.weight"].m_in == 2.0
    assert roles["model.embed_tokens.weight"].role == "input"
    assert roles["model.layers.0.mlp.down_proj.weight"].fan_in == 384
    assert roles["model.norm.weight"].role == "vector"
    assert model.smup_splits == {}  # q, k, v separate
    # the readout multiplier 1/m scales lm_head's input: logits = W·h/2
    idx = torch.randint(0, VOCAB, (2, 16))
    captured = {}
    model.lm_head.register_forward_hook(lambda m, a, o: captured.update(x=a[0], y=o))
    with torch.no_grad():
        model(idx)
        plain = F.linear(captured["x"], model.lm_head.weight)
    torch.testing.assert_close(captured["y"], plain)
    model.model.norm.register_forward_hook(lambda m, a, o: captured.update(h=o))
    with torch.no_grad():
        model(idx)
    torch.testing.assert_close(captured["x"], captured["h"] / 2)


def test_parametrized_model_deepcopies_and_pickles() -> None:
    p = smup.Parametrization(kind="mup", base_width=64, base_depth=2)
    model = llama()
    hf.parametrize(model, p)
    idx = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        want = model(idx).logits
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        with torch.no_grad():
            torch.testing.assert_close(clone(idx).logits, want)
        assert clone.smup_roles == model.smup_roles


def test_unknown_residual_layout_with_depth_scaling_is_an_error() -> None:
    cfg = transformers.GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=256,
        max_position_embeddings=64,
    )
    model = transformers.GPTNeoXForCausalLM(cfg)
    p = smup.Parametrization(kind="mup", base_width=32, base_depth=2, depth_alpha=1.0)
    with pytest.raises(ConfigError, match=r"cannot find the residual branches.*depth_alpha=0"):
        hf.parametrize(model, p)
    hf.parametrize(
        model, smup.Parametrization(kind="mup", base_width=32, base_depth=2, depth_alpha=0.0)
    )


def test_resized_config_errors_name_the_fix() -> None:
    with pytest.raises(ConfigError, match="not a multiple of the 2 query heads"):
        hf.resized_config(llama().config, 32, 2)
    with pytest.raises(ConfigError, match="heads must be 'size' or 'count'"):
        hf.resized_config(llama().config, 64, 2, heads="fixed")


def _branch_hooks(model):
    return [
        h
        for m in model.modules()
        for h in m._forward_hooks.values()
        if isinstance(h, hf.BranchMultiplier)
    ]


# ------------------------------------------------------------------ coordinate check


def _hf_coord(build, optimizer="adamw", lr=1e-3, base=64, seeds=(0, 1, 2)):
    """Tiny Shakespeare batches (8 × 64 characters, as `model_coord_check`'s)."""
    dataset = load_dataset(None)
    gen = torch.Generator().manual_seed(1234)
    batches = [dataset.get_batch("train", 8, 64, gen) for _ in range(5)]

    params = {
        "sp": smup.Parametrization(kind="sp"),
        "mup": smup.Parametrization(kind="mup", base_width=base, base_depth=2),
    }
    return coord_check(
        build,
        params,
        (64, 128, 256),
        batches,
        loss=hf.causal_lm_loss,
        optimizer=optimizer,
        lr=lr,
        taps=hf.coord_taps,
        seeds=seeds,
        split_terms=("logits",),
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_coord_check_through_the_hf_forward(arch) -> None:
    """μP flat (block groups, residual, the head's own update), SP grows, at widths 64→256
    with heads of size 16 added with width (as both families grow): Llama with GQA (2 query
    heads per key/value head), GPT-2 with its tied head and Conv1D weights. Measured over
    seeds 0–2, 3–5, 6–8 (Llama) and 0–2, 3–5 (GPT-2): μP −0.09…+0.14, SP hidden ≥ +0.92."""

    def build(width, p):
        if arch == "llama":
            model = llama(width, 2, width // 16, width // 32)
        else:
            model = gpt2(width, 2, width // 16)
        hf.parametrize(model, p)
        return model

    slopes = _hf_coord(build).slopes()
    mup, sp = slopes["mup"], slopes["sp"]
    hidden = ("block0.attn", "block0.mlp", "block1.attn", "block1.mlp", "residual")
    for group in (*hidden, "logits:ΔW·x"):
        assert abs(mup[group]) <= 0.2, (arch, group, slopes)
    for group in hidden:
        assert sp[group] >= 0.5, (arch, group, slopes)


def test_muon_steps_an_hf_gpt2_with_its_fused_conv1d_blocks() -> None:
    """Each of q, k, v in GPT-2's c_attn (stored (fan_in, 3·width)) is orthogonalized on its
    own: each block of the update points along Newton–Schulz of that block's gradient and
    has that block's norm — at init q's and k's gradients are far smaller than v's, so
    orthogonalizing the fused matrix would leave their blocks nearly still."""
    from spectral_mup.optim.muon import newton_schulz

    p = smup.Parametrization(kind="mup", base_width=32, base_depth=4)
    model = gpt2(width=64)
    hf.parametrize(model, p)
    opt = smup.build_optimizer("muon", model, p, lr=0.02, momentum=0.0, nesterov=False)
    w = model.transformer.h[0].attn.c_attn.weight
    before = w.detach().clone()
    idx = torch.randint(0, VOCAB, (4, 16))
    F.cross_entropy(model(idx).logits.flatten(0, 1), idx.roll(-1, 1).flatten()).backward()
    grad = w.grad.detach().clone()
    opt.step()
    deltas = (w.detach() - before).split(64, dim=1)
    for delta, g in zip(deltas, grad.split(64, dim=1), strict=True):
        own = newton_schulz(g.T.float()).T
        assert F.cosine_similarity(-delta.flatten(), own.flatten(), dim=0) > 0.999
    norms = [float(d.norm()) for d in deltas]
    fused = [float(b.norm()) for b in newton_schulz(grad.T.float()).T.split(64, dim=1)]
    assert max(norms) / min(norms) < 1.5, norms
    assert max(fused) / min(fused) > 3, fused  # what a fused orthogonalization would do
