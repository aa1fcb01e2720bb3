"""smup probe: measured update-norm exponents against the spec's families (docs/RULES.md §2–3),
the derived rule, its JSON form and its use by build_optimizer.

The probes here run the bundled GPT at widths 32 → 128, one seed, three measured steps:
small enough for CI, large enough that sign-like and orthogonalized exponents sit near the
spec's. Bounds are set outside the spread measured over seeds 0–2 on one thread (AdamW's
exponents within 0.12 of the spec's, Muon's hidden 0.008–0.017, LAMB's ‖W‖ ratio
2.10–2.11); SGD's raw-gradient exponents spread too much at these widths (hidden
−0.38…−0.03) to bound, so its test checks what is exact: k, ε and the decay."""

import json
import math

import pytest
import torch
from torch import nn

import spectral_mup as smup
from spectral_mup import Parametrization, build_optimizer, rules
from spectral_mup.cli import main
from spectral_mup.errors import ConfigError
from spectral_mup.models import GPT, GPTConfig
from spectral_mup.optim import get_spec
from spectral_mup.probe import cache_path, load_rule, predicted_exponents, probe, spectral_norm

SMALL = dict(widths=(32, 64, 128), depths=(), seeds=(0,), steps=3)


def test_spectral_norm_by_power_iteration_matches_the_svd():
    gen = torch.Generator().manual_seed(0)
    for shape in ((64, 256), (256, 64), (33, 33)):
        a = torch.randn(shape, generator=gen, dtype=torch.float64)
        exact = float(torch.linalg.matrix_norm(a, ord=2))
        assert spectral_norm(a, iters=200) == pytest.approx(exact, rel=1e-6)
    u, v = torch.randn(50, 1, generator=gen), torch.randn(1, 80, generator=gen)
    assert spectral_norm(u @ v) == pytest.approx(float(u.norm() * v.norm()), rel=1e-6)
    assert spectral_norm(torch.tensor([3.0, 4.0])) == pytest.approx(5.0)
    assert spectral_norm(torch.zeros(4, 5)) == 0.0


@pytest.fixture(scope="module")
def adamw():
    return probe("adamw", **SMALL)


def test_adamw_probe_recovers_the_entrywise_family(adamw):
    """RULES.md §3: AdamW's update is entrywise, N = c·sqrt(fan_in·fan_out): exponent +1 for
    hidden matrices, +½ for the embedding and vectors, −½ for the readout (c = 1/m)."""
    spec = {"input": 0.5, "hidden": 1.0, "output": -0.5, "vector (block)": 0.5, "vector": 0.5}
    for group, want in spec.items():
        assert adamw.exponents[group][0] == pytest.approx(want, abs=0.2), group
    assert set(adamw.families.values()) == {"entrywise"}
    assert adamw.k[0] == pytest.approx(0.0, abs=0.02)  # update(s·g) = update(g)
    assert set(adamw.eps.values()) == {"entry"}  # ε is compared with gradient entries
    assert adamw.decay_ratio == pytest.approx(1.0, abs=0.02)  # decoupled lr·λ·W
    assert adamw.weight_ratio == pytest.approx(1.0, abs=0.25)  # does not follow ‖W‖


def test_probed_rule_gives_the_registered_rules_groups(adamw, tmp_path):
    """A probed entrywise rule builds the same per-tensor LR/WD/eps as AdamW's registered
    one; it survives its JSON file, and an imported class takes it by ``rule=``."""
    path = adamw.save_json(tmp_path / "adamw.json")
    rule = load_rule(path)
    assert {rule.family(r).name for r in rules.ROLES} == {"entrywise"}
    p = Parametrization(kind="mup", base_width=32, base_depth=2)
    torch.manual_seed(0)
    model = GPT(GPTConfig(width=128, depth=2, n_heads=2, vocab_size=65, block_size=16), p)

    def table(opt):
        return sorted(
            (n, g["lr"], g["weight_decay"], g["eps"]) for g in opt.param_groups for n in g["names"]
        )

    ours = build_optimizer("torch.optim.AdamW", model, p, 1e-3, 0.1, rule=path, eps=1e-8)
    theirs = build_optimizer("adamw", model, p, 1e-3, 0.1, eps=1e-8)
    assert isinstance(ours, torch.optim.AdamW)
    assert table(ours) == table(theirs)
    hidden = [g for g in ours.param_groups if g["role"] == "hidden"]
    assert hidden and all(g["lr"] == pytest.approx(1e-3 / 4) for g in hidden)  # η/m, m = 4


def test_muon_probe_orthogonalized_hidden_adamw_rest():
    """Muon: U·Vᵀ·sqrt(fan_out/fan_in) on hidden matrices (exponent 0), AdamW on the rest
    (its auxiliary roles); no ε on the Newton–Schulz part."""
    r = probe("muon", **SMALL)
    assert r.exponents["hidden"][0] == pytest.approx(0.0, abs=0.1)
    assert r.exponents["input"][0] == pytest.approx(0.5, abs=0.2)
    assert r.families["hidden"] in ("orthogonalized", "orthogonalized·spectral")
    assert r.families["input"] == r.families["output"] == "entrywise"
    assert r.eps["hidden"] is None and r.eps["input"] == "entry"
    assert r.rule.auxiliary == ("input", "output", "vector")


def test_sgd_probe_measures_degree_one_and_no_eps():
    r = probe("sgd", **SMALL)
    assert r.k[0] == pytest.approx(1.0, abs=0.03)
    assert set(r.eps.values()) == {None}
    assert r.decay_ratio == pytest.approx(1.0, abs=0.02)  # torch SGD: λW in the gradient


def test_lamb_probe_decay_inside_and_update_follows_the_weight():
    """LAMB (RULES.md §3): φ(‖W‖)/‖u‖·u — doubling W doubles the update, and λθ is inside
    the normalized direction, so the decay is not lr·λ·W."""
    r = probe("lamb", **SMALL)
    assert r.weight_ratio == pytest.approx(2.0, abs=0.3)
    assert abs(r.decay_ratio - 1.0) > 0.5
    assert r.families["hidden"] == "trust_ratio"
    assert r.eps["hidden"] == "entry"  # seen in the update's direction: its norm is ‖W‖


def test_shampoo_probe_finds_the_gram_eps():
    """Shampoo's damping ε is added to G·Gᵀ: scaling it by s² keeps the update homogeneous."""
    r = probe("shampoo", **{**SMALL, "widths": (32, 64)})
    assert r.eps["hidden"] == "gram"
    assert r.families["hidden"] == "orthogonalized"


def test_imported_optimizer_spec_and_missing_rule(tmp_path, monkeypatch):
    spec = get_spec("torch.optim.RAdam")
    assert spec.cls is torch.optim.RAdam and spec.eps_key == "eps"
    assert "betas" in spec.defaults and "foreach" not in spec.defaults
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    p = Parametrization(kind="mup", base_width=32, base_depth=2)
    model = GPT(GPTConfig(width=64, depth=2, n_heads=2, vocab_size=65, block_size=16), p)
    with pytest.raises(ConfigError, match=r"smup probe --optimizer torch\.optim\.RAdam"):
        build_optimizer("torch.optim.RAdam", model, p, 1e-3)
    with pytest.raises(ConfigError, match="cannot import optimizer"):
        get_spec("torch.optim.NoSuchOptimizer")
    with pytest.raises(ConfigError, match=r"not a torch\.optim\.Optimizer subclass"):
        get_spec("math.sqrt")


def test_cli_probe_writes_json_plot_and_cache(tmp_path, monkeypatch, capsys):
    """`smup probe` on an imported class caches the rule, which build_optimizer then uses."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "probe"
    argv = ["probe", "--optimizer", "torch.optim.NAdam", "--widths", "32,64,128", "--depths", "2"]
    argv += ["--seeds", "1", "--steps", "3", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    data = json.loads((out / "probe.json").read_text())
    assert data["format"] == "spectral-mup-rule-v1"
    assert (out / "probe.png").stat().st_size > 0
    assert math.isclose(data["k"][0], 0.0, abs_tol=0.05)
    from spectral_mup.probe import full_options

    assert cache_path("torch.optim.NAdam", full_options("torch.optim.NAdam", {})).exists()
    p = Parametrization(kind="mup", base_width=32, base_depth=2)
    model = GPT(GPTConfig(width=128, depth=2, n_heads=2, vocab_size=65, block_size=16), p)
    opt = build_optimizer("torch.optim.NAdam", model, p, 1e-3)
    hidden = [g for g in opt.param_groups if g["role"] == "hidden"]
    assert all(g["lr"] == pytest.approx(1e-3 / 4) for g in hidden)  # probed: entrywise, η/m
    assert "cached the rule" in capsys.readouterr().out


class _MLP(nn.Module):
    """A plain classifier: 16 features → width → width → 10 classes, with biases."""

    def __init__(self, width: int):
        super().__init__()
        self.inp, self.hid, self.out = (
            nn.Linear(16, width),
            nn.Linear(width, width),
            nn.Linear(width, 10),
        )

    def forward(self, x):
        return self.out(torch.relu(self.hid(torch.relu(self.inp(x)))))


def _mlp(width, depth, p):
    model = _MLP(width)
    smup.parametrize(model, p, base=_MLP(p.base_width), delta=_MLP(2 * p.base_width))
    return model


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_probe_of_a_plain_module_uses_its_own_fans(optimizer):
    """Any model factory: an MLP on float features with a fixed 16-feature input and 10
    classes. Its roles come from parametrize(); the predictions follow its own fans (RULES.md
    §3, entrywise N = c·sqrt(fan_in·fan_out): input m×16 → +½, hidden → +1, readout c = 1/m
    → −½, biases of sizes m, m, 10 → (½ + ½ + 0)/3; Muon's hidden update orthogonalized → 0).
    Spread over seeds 0–2: AdamW input 0.37–0.46, hidden 0.88–0.89, output −0.56…−0.52,
    vector 0.26–0.29; Muon hidden 0.03–0.04."""
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(64, 16, generator=gen), torch.randint(0, 10, (64,), generator=gen))
               for _ in range(8)]  # fmt: skip
    result = probe(optimizer, model=_mlp, batches=batches, **SMALL)
    hidden = 0.0 if optimizer == "muon" else 1.0
    spec = {"input": 0.5, "hidden": hidden, "output": -0.5, "vector": 1 / 3}
    assert predicted_exponents(result.rule, result) == pytest.approx(spec, abs=1e-9)
    for group, want in spec.items():
        tol = 0.1 if (group, optimizer) == ("hidden", "muon") else 0.2
        assert result.exponents[group][0] == pytest.approx(want, abs=tol), group
    hidden_family = "orthogonalized" if optimizer == "muon" else "entrywise"
    assert result.families == {"input": "entrywise", "hidden": hidden_family,
                               "output": "entrywise", "vector": "entrywise"}  # fmt: skip
    assert result.model == "_mlp" and "on _mlp" in result.table()
    with pytest.raises(ConfigError, match="without roles"):
        probe(optimizer, model=lambda w, d, p: _MLP(w), batches=batches, **SMALL)
    with pytest.raises(ConfigError, match="takes 8 steps"):
        probe(optimizer, model=_mlp, batches=batches[:4], **SMALL)


def test_cli_probe_of_a_model_factory(tmp_path, monkeypatch, capsys):
    """`smup probe --model pkg.module:function` probes the user's language model on Tiny
    Shakespeare tokens; a bad path exits 2."""
    (tmp_path / "my_lm.py").write_text(
        "import torch\nfrom torch import nn\nimport spectral_mup as smup\n\n"
        "class LM(nn.Module):\n"
        "    def __init__(self, width):\n"
        "        super().__init__()\n"
        "        self.emb = nn.Embedding(65, width)\n"
        "        self.hid = nn.Linear(width, width, bias=False)\n"
        "        self.head = nn.Linear(width, 65, bias=False)\n\n"
        "    def forward(self, idx):\n"
        "        return self.head(torch.relu(self.hid(self.emb(idx))))\n\n"
        "def build(width, depth, p):\n"
        "    model = LM(width)\n"
        "    smup.parametrize(model, p, base=LM(p.base_width), delta=LM(2 * p.base_width))\n"
        "    return model\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "probe"
    argv = ["probe", "--optimizer", "adamw", "--model", "my_lm:build", "--widths", "32,64,128"]
    argv += ["--depths", "2", "--seeds", "1", "--steps", "3", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    data = json.loads((out / "probe.json").read_text())
    assert data["model"] == "build"
    assert data["families"] == {r: "entrywise" for r in ("input", "hidden", "output", "vector")}
    assert data["exponents"]["hidden"][0] == pytest.approx(1.0, abs=0.2)
    capsys.readouterr()
    for bad in ("my_lm:nothing", "no_such_module:build", "math.pi"):
        assert main(["probe", "--optimizer", "adamw", "--model", bad]) == 2
        assert "model factory" in capsys.readouterr().err, bad


def test_cli_probe_bad_input_exits_2(capsys):
    assert main(["probe", "--optimizer", "torch.optim.Nope"]) == 2
    assert "cannot import optimizer" in capsys.readouterr().err
    assert main(["probe", "--optimizer", "adamw", "--widths", "64"]) == 2
    assert "at least two different positive widths" in capsys.readouterr().err


def test_sweep_of_an_unprobed_optimizer_stops_before_any_run(tmp_path, monkeypatch, capsys):
    """A sweep over an imported optimizer checks its probed rule when it expands the grid:
    without one it exits 2 naming the probe command, and writes no store."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    spec = tmp_path / "s.toml"
    spec.write_text(
        '[sweep]\nname = "s"\nstore = "s.sqlite"\nout_dir = "runs"\n[grid]\n'
        'optimizer = "torch.optim.RAdam"\nlr = [1e-3]\nwidth = [32]\n'
    )
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", str(spec)]) == 2
    assert "smup probe --optimizer torch.optim.RAdam" in capsys.readouterr().err
    assert not (tmp_path / "s.sqlite").exists() and not (tmp_path / "runs").exists()


def test_a_registered_optimizers_own_family_is_a_candidate_and_survives_json():
    """Blocked Shampoo's Kronecker family is no generic family: a probed rule may name it
    (the probe compares a registered optimizer's own families, with its options, after the
    generic ones), and its JSON form rebuilds it from the optimizer's name and options."""
    from spectral_mup.probe import _candidates, full_options, rule_from_json

    options = {"block_size": 128}
    own = rules.rule_for("shampoo", full_options("shampoo", options)).family("hidden")
    names = list(_candidates("shampoo", options))
    assert own.name == "kronecker(e=0.25+0.25, block=128)" and names[-1] == own.name
    assert own.name not in _candidates()  # generic candidates only: not there
    data = {
        "name": "shampoo", "options": options, "eps": {r: "gram" for r in rules.ROLES},
        "families": {r: {"known": own.name if r != "vector" else "entrywise"} for r in rules.ROLES},
    }  # fmt: skip
    rule = rule_from_json(data)
    got = rule.family("hidden")
    assert got.name == own.name and rule.family("vector") == rules.FAMILIES["entrywise"]
    for fans in ((256, 1024), (1024, 256), (512, 512)):  # the same update-norm model
        assert got.norm(*fans, 1.0, "hidden") == own.norm(*fans, 1.0, "hidden")
    with pytest.raises(ConfigError, match="unknown family"):
        rule_from_json({**data, "options": {"block_size": 64}})
