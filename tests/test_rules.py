"""Rule values against the tables of docs/RULES.md §3–5."""

import math

import pytest

from spectral_mup import rules
from spectral_mup.optim import REGISTRY

M, ML = 8.0, 4.0  # width and depth multipliers used throughout
ADAM = rules.FAMILIES["entrywise"]
SGD = rules.FAMILIES["raw_gradient"]


def scales(family, role, alpha=1.0, in_block=False, readout="multiplier", vocab=65):
    """A layer of a vocab-``vocab`` model at width 64·M (base width 64)."""
    m_in = {"input": 1.0, "hidden": M, "output": M, "vector": 1.0}[role]
    m_out = {"input": M, "hidden": M, "output": 1.0, "vector": M}[role]
    fan_in = {"input": vocab, "hidden": 64 * M, "output": 64 * M, "vector": 1}[role]
    fan_out = {"input": 64 * M, "hidden": 64 * M, "output": vocab, "vector": 64 * M}[role]
    return rules.param_scales(
        family, role, fan_in, fan_out, m_in, m_out, ML, in_block, alpha, readout
    )


@pytest.mark.parametrize(
    ("role", "lr", "wd", "eps"),
    [
        ("input", 1.0, 1.0, 1 / M),
        ("hidden", 1 / M, M, 1 / M),
        ("output", 1.0, 1.0, 1 / M),
        ("vector", 1.0, 1.0, 1.0),
    ],
)
def test_adamw_width_row(role, lr, wd, eps):
    s = scales(ADAM, role)
    assert s.lr == pytest.approx(lr)
    assert s.weight_decay == pytest.approx(wd)
    assert s.eps == pytest.approx(eps)


@pytest.mark.parametrize(
    ("role", "lr", "wd"),
    [("input", M, 1 / M), ("hidden", 1.0, 1.0), ("output", M, 1 / M), ("vector", M, 1 / M)],
)
def test_sgd_width_row(role, lr, wd):
    s = scales(SGD, role)
    assert s.lr == pytest.approx(lr)
    assert s.weight_decay == pytest.approx(wd)
    assert s.eps == 1.0  # SGD has no eps


@pytest.mark.parametrize("vocab", [65, 50257])
@pytest.mark.parametrize(
    ("role", "lr", "eps"),
    # RULES.md §3's LAMB row (η everywhere) with the project's measured hidden η/sqrt(m)
    [("input", 1.0, 1 / M), ("hidden", M**-0.5, 1 / M), ("output", 1.0, 1 / M), ("vector", 1, 1)],
)
def test_lamb_width_row(role, lr, eps, vocab):
    """Measured rule (docs/RULES.md §3): hidden η/sqrt(m); λ stays inside the trust ratio.
    Input and readout keep η whether the vocabulary is below the width (65 at widths 64→512,
    the base width just under it) or far above it (GPT-2's 50257)."""
    s = scales(rules.FAMILIES["trust_ratio"], role, vocab=vocab)
    assert s.lr == pytest.approx(lr)
    assert s.weight_decay == 1.0
    assert s.eps == pytest.approx(eps)


@pytest.mark.parametrize("vocab", [65, 50257])
@pytest.mark.parametrize("optimizer", sorted(rules.OPTIMIZER_RULES))
def test_embedding_and_readout_rules_do_not_depend_on_the_vocabulary_size(optimizer, vocab):
    """RULES.md §3 "Vocabulary larger than width": a rule follows which fans grow. The input
    and output rows of every optimizer, and of every Shampoo/SOAP option family, are the
    same at vocab 65 and 50257, at widths 64→512 (the issue's LAMB 0.5 and grafted 2.0 at
    vocab 50257, m = 4, were wrong)."""
    families = [rules.rule_for(optimizer).family("input")]
    if optimizer in ("shampoo", "soap"):
        families += [rules.grafted_family(), rules.grafted_family(128)]
        families += [rules.kronecker_family(block_size=128), rules.preconditioned_family("sgd")]
    for family in families:
        for role in ("input", "output"):
            small = scales(family, role, vocab=65)
            large = scales(family, role, vocab=vocab)
            assert (large.lr, large.weight_decay, large.eps) == pytest.approx(
                (small.lr, small.weight_decay, small.eps)
            ), (family.name, role)


@pytest.mark.parametrize("optimizer", ["adopt", "sophia", "lion"])
def test_entrywise_optimizers_share_adamw_rules(optimizer):
    for role in rules.ROLES:
        for alpha in rules.DEPTH_ALPHAS:
            mine = scales(rules.rule_for(optimizer).family(role), role, alpha, in_block=True)
            assert mine == scales(ADAM, role, alpha, in_block=True)


def test_init_and_forward_multipliers():
    assert scales(ADAM, "input").init_std == 1.0
    assert scales(ADAM, "hidden").init_std == pytest.approx(1 / math.sqrt(M))
    assert scales(ADAM, "output").init_std == 1.0
    assert scales(ADAM, "output").forward == pytest.approx(1 / M)
    assert scales(ADAM, "hidden").forward == 1.0
    # the alternative readout: no multiplier, head init σ_b/m, Adam head LR η/m
    alt = scales(ADAM, "output", readout="init")
    assert (alt.forward, alt.init_std, alt.lr) == (1.0, pytest.approx(1 / M), pytest.approx(1 / M))


@pytest.mark.parametrize(
    ("alpha", "adam_lr", "sgd_lr", "adam_eps", "branch"),
    [
        (1.0, 1.0, ML, 1 / ML, 1 / ML),
        (0.5, ML**-0.5, 1.0, ML**-0.5, ML**-0.5),
        (0.0, 1.0, 1.0, 1.0, 1.0),
    ],
)
def test_depth_rules(alpha, adam_lr, sgd_lr, adam_eps, branch):
    """RULES.md §4: Adam hidden × m_L^(α-1), SGD × m_L (α=1) / × 1 (α=0.5), eps ε/(m·m_L^α)."""
    adam = scales(ADAM, "hidden", alpha, in_block=True)
    assert adam.lr == pytest.approx(adam_lr / M)
    assert adam.eps == pytest.approx(adam_eps / M)
    assert adam.weight_decay == pytest.approx(1 / adam.lr)
    assert scales(SGD, "hidden", alpha, in_block=True).lr == pytest.approx(sgd_lr)
    vec = scales(ADAM, "vector", alpha, in_block=True)
    assert vec.lr == pytest.approx(adam_lr)  # gains/biases in blocks: × m_L^(α-1)
    assert rules.branch_multiplier(ML, alpha) == pytest.approx(branch)


def test_every_rule_is_one_at_the_base():
    for family in rules.FAMILIES.values():
        for role in rules.ROLES:
            s = rules.param_scales(family, role, 65, 128, 1.0, 1.0, 1.0, True, 1.0)
            assert (s.init_std, s.forward, s.lr, s.weight_decay, s.eps) == (1, 1, 1, 1, 1)


def test_update_norm_families():
    """The hidden-LR column of RULES.md §2 (absolute: lr ∝ target / N)."""
    n = 512.0
    hidden = {name: rules.lr_scale(f, n, n, 1.0) for name, f in rules.FAMILIES.items()}
    assert hidden["entrywise"] == pytest.approx(1 / n)
    assert hidden["orthogonalized"] == pytest.approx(1.0)
    assert hidden["trust_ratio"] == pytest.approx(1 / math.sqrt(n))  # measured, see RULES.md
    assert hidden["spectral_normalized"] == pytest.approx(1.0)
    assert hidden["raw_gradient"] == pytest.approx(1.0)
    # orthogonalized on every matrix: input/output η·sqrt(m) (the "Muon everywhere" row)
    ortho = rules.FAMILIES["orthogonalized"]
    assert rules.width_lr_multiplier(ortho, 65, 64 * M, 1.0, M, 1.0) == pytest.approx(math.sqrt(M))
    assert rules.width_lr_multiplier(ortho, 64 * M, 65, M, 1.0, 1 / M) == pytest.approx(
        math.sqrt(M)
    )


def test_independent_weight_decay_is_schedule_times_lambda():
    lam, group_lr = 0.1, 0.003
    wd = rules.independent_weight_decay(ADAM, lam, group_lr, 1.0)
    assert group_lr * wd == pytest.approx(lam)  # decay per step at peak LR = λ
    assert group_lr * rules.independent_weight_decay(ADAM, lam, group_lr, 1 / M) == pytest.approx(
        lam / M
    )
    assert rules.independent_weight_decay(ADAM, 0.0, group_lr, 1.0) == 0.0


def test_attention_scale():
    assert rules.attention_scale(64, 64, "mup") == pytest.approx(1 / 8)
    assert rules.attention_scale(256, 64, "mup") == pytest.approx(8 / 256)
    assert rules.attention_scale(256, 64, "inverse") == pytest.approx(1 / 256)
    assert rules.attention_scale(256, 64, "sp") == pytest.approx(1 / 16)


def test_registry_and_rules_cover_the_same_optimizers():
    assert set(REGISTRY) == set(rules.OPTIMIZER_RULES)
    with pytest.raises(
        KeyError, match="known: adamw, adopt, lamb, lion, muon, sgd, shampoo, soap, sophia"
    ):
        rules.rule_for("lion9")


def _hidden_lr(family, width, base=64):
    m = width / base
    return rules.param_scales(family, "hidden", width, width, m, m).lr


def test_kronecker_family_qiu_formula():
    """Qiu et al.: lr ∝ (fo/fi)^(1−s) / (m_L^(2s−1)·n_blocks^s), n_blocks = ⌈fo/b⌉⌈fi/b⌉."""
    assert rules.kronecker_family() is rules.FAMILIES["orthogonalized"]  # e = ¼, unblocked
    b128 = rules.kronecker_family(block_size=128)
    # widths 64, 128 are one block; 256 is 2×2 blocks, 512 is 4×4: n_blocks^-½ = 1, 1, ½, ¼
    assert [_hidden_lr(b128, w) for w in (64, 128, 256, 512)] == pytest.approx([1, 1, 0.5, 0.25])
    b32 = rules.kronecker_family(block_size=32)  # every width blocked: AdamW's η/m
    for w in (128, 256, 512):
        assert _hidden_lr(b32, w) == pytest.approx(_hidden_lr(ADAM, w))
    # e = ½ each (s = 1): width-independent hidden LR unblocked, ∝ 1/n_blocks blocked, depth 1/m_L
    half = rules.kronecker_family((0.5, 0.5))
    assert _hidden_lr(half, 512) == pytest.approx(1.0)
    assert _hidden_lr(rules.kronecker_family((0.5, 0.5), 32), 512) == pytest.approx(1 / 64)
    deep = rules.param_scales(half, "hidden", 64, 64, 1, 1, ML, in_block=True, alpha=1.0)
    assert deep.lr == pytest.approx(1 / ML)
    # rectangular layer, s = ½: (fo/fi)^½ / n_blocks^½ relative to the base
    fam = rules.kronecker_family(block_size=64)
    s = rules.param_scales(fam, "hidden", 512, 2048, 8, 8)
    assert s.lr == pytest.approx(1 / 8)  # base 64×256: n_blocks 4; width 512×2048: 256


def test_grafted_family_divides_the_adam_norm_by_the_direction_rank():
    """Adam-grafted Shampoo: ‖update‖_F is Adam's, the direction's spectrum is flat, so
    N = c·sqrt(fi·fo / min(fi, fo, b)): hidden η/sqrt(m) unblocked (docs/RULES.md, changed),
    AdamW's η/m once every width is blocked, AdamW's rule for embedding and readout."""
    unblocked = rules.grafted_family()
    assert [_hidden_lr(unblocked, w) for w in (64, 128, 256, 512)] == pytest.approx(
        [1, 2**-0.5, 0.5, 8**-0.5]
    )
    b128 = rules.grafted_family(128)  # one block up to 128, then rank 128: sqrt(min(w,128))/w
    assert [_hidden_lr(b128, w) for w in (64, 128, 256, 512)] == pytest.approx(
        [1, 2**-0.5, 2**-1.5, 2**-2.5]
    )
    b32 = rules.grafted_family(32)
    for w in (128, 256, 512):
        assert _hidden_lr(b32, w) == pytest.approx(_hidden_lr(ADAM, w))
    for vocab in (50, 50257):  # embedding and readout: AdamW's rule, at any vocabulary size
        for role in ("input", "output"):
            ours = scales(unblocked, role, vocab=vocab).lr
            assert ours == pytest.approx(scales(ADAM, role, vocab=vocab).lr), (vocab, role)
            assert ours == pytest.approx(1.0)  # RULES.md §3: grafted → AdamW rules, η


def test_soap_family_entrywise_unblocked_qiu_blocked():
    assert rules.soap_family(None) is ADAM  # changed by measurement (docs/RULES.md)
    assert rules.soap_family(0) is ADAM
    b128 = rules.soap_family(128)
    assert [_hidden_lr(b128, w) for w in (64, 128, 256, 512)] == pytest.approx([1, 1, 0.5, 0.25])
    assert rules.rule_for("soap", {"block_size": 128}).family("vector") is ADAM


def test_preconditioned_family_by_options():
    assert rules.preconditioned_family("adam").name == "grafted(block=None)"
    assert rules.preconditioned_family("adagrad", block_size=128).name == "grafted(block=128)"
    assert rules.preconditioned_family("sgd") is SGD
    assert rules.preconditioned_family("none", block_size=0).name == "orthogonalized"
    # options choose the matrices' family only: Shampoo's vectors stay entrywise
    opts = {"grafting": "none", "exponents": (0.25, 0.25), "block_size": 8}
    shampoo = rules.rule_for("shampoo", opts)
    assert shampoo.family("hidden").name == "kronecker(e=0.25+0.25, block=8)"
    assert shampoo.family("vector") is ADAM


@pytest.mark.parametrize(
    ("role", "entry", "gram"),
    # (m_in, m_out, c) per role as in `scales`; in a block a = 1/m_L (α = 1)
    [
        ("input", 1 / M, 1 / M),
        ("hidden", 1 / (M * ML), 1 / ML**2),
        ("output", 1 / M, 1 / M),
        ("vector", 1.0, 1.0),
    ],
)
def test_eps_rules(role, entry, gram):
    """Adam-like ε·c·a/m_out; Shampoo damping ε·(c·a)²·m_in/m_out (RULES.md §3–4)."""
    in_block = role in ("hidden", "vector")
    m_in = {"input": 1.0, "hidden": M, "output": M, "vector": 1.0}[role]
    m_out = {"input": M, "hidden": M, "output": 1.0, "vector": M}[role]
    c = rules.forward_multiplier(role, m_in)
    a = rules.branch_multiplier(ML, 1.0) if in_block else 1.0
    assert rules.eps_multiplier("entry", role, m_in, m_out, c, a) == pytest.approx(entry)
    assert rules.eps_multiplier("gram", role, m_in, m_out, c, a) == pytest.approx(gram)
    assert rules.eps_multiplier(None, role, m_in, m_out, c, a) == 1.0
    assert rules.rule_for("shampoo").eps_rule("hidden") == "gram"
    assert rules.rule_for("soap", {"block_size": 128}).eps_rule("hidden") == "entry"
    assert rules.rule_for("muon").eps_rule("hidden") is None  # no ε on the Newton–Schulz part
    assert rules.rule_for("muon").eps_rule("input") == "entry"  # its AdamW part's
    assert rules.rule_for("adamw").eps_rule("hidden") == "entry"
    assert rules.rule_for("adamw").spectral_normalized().eps_rule("hidden") is None


def test_an_optimizers_whole_rule_is_one_record():
    """RULES.md §3: Muon is U·Vᵀ·sqrt(fan_out/fan_in) on hidden matrices (its default shape
    factor) and AdamW's rules on the rest, which it routes to its auxiliary AdamW part."""
    muon = rules.rule_for("muon")
    assert muon.family("hidden").name == "orthogonalized·spectral"
    assert [muon.is_auxiliary(r) for r in rules.ROLES] == [True, False, True, True]
    for role in ("input", "output", "vector"):
        assert muon.family(role) is ADAM
    assert muon.family("hidden").norm(64, 256, 1.0, "hidden") == pytest.approx(2.0)
    original = rules.rule_for("muon", {"shape_factor": "original"}).family("hidden")
    assert original.norm(256, 64, 1.0, "hidden") == pytest.approx(1.0)  # sqrt(max(1, 1/4))
    with pytest.raises(ValueError, match="shape_factor must be one of"):
        rules.rule_for("muon", {"shape_factor": "wide"})
    assert rules.rule_for("lamb").follows_weight and not rules.rule_for("adamw").follows_weight
    assert rules.rule_for("sgd").eps_rule("hidden") is None
