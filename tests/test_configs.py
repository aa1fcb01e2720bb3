"""Every config and sweep spec shipped in configs/ loads and validates (nothing trains)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from spectral_mup import rules
from spectral_mup.config import load_config
from spectral_mup.errors import ConfigError
from spectral_mup.models import LlamaConfig
from spectral_mup.sweep import load_spec

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SPECS = sorted(p for p in (CONFIGS / "sweeps").rglob("*.toml") if "[sweep]" in p.read_text())


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_run_configs_load(path: Path) -> None:
    load_config(path)


@pytest.fixture(autouse=True)
def _no_probe_cache(tmp_path, monkeypatch):
    """An empty rule cache, as on a fresh machine: a probe run earlier on this one (in
    ~/.cache) must not decide whether a spec loads."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.mark.parametrize("path", SPECS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_sweep_specs_load(path: Path, monkeypatch) -> None:
    """A spec expands its grid. One over an imported optimizer (configs/sweeps/probed/)
    needs its probed rule: without it the spec stops with the error naming `smup probe`;
    with a rule in place (AdamW's here: which rule does not matter for the grid) it loads."""
    if path.parent.name == "probed":
        with pytest.raises(ConfigError, match=r"run `smup probe --optimizer torch\.optim\.") as e:
            load_spec(path)
        optimizer = str(e.value).split("--optimizer ")[1].split("`")[0]
        assert optimizer in path.read_text()
        monkeypatch.setattr(
            importlib.import_module("spectral_mup.optim.build"),  # where optimizer_rule looks it up
            "cached_rule",
            lambda name, options: rules.rule_for("adamw"),
        )
    spec = load_spec(path)
    assert spec.runs


def test_depth_specs_cover_both_models_every_alpha_and_8x_depth() -> None:
    specs = [load_spec(p) for p in SPECS if p.parent.name == "depth"]
    assert {s.runs[0].config.optim.name for s in specs} >= {
        "adamw",
        "adopt",
        "lamb",
        "sophia",
        "muon",
    }
    for spec in specs:
        configs = [r.config for r in spec.runs]
        assert {c.model.arch for c in configs} == {"gpt", "llama"}
        assert {c.param.depth_alpha for c in configs} == {0.0, 0.5, 1.0}
        assert max(c.model.depth for c in configs) / min(c.model.depth for c in configs) >= 8
        assert {c.model.width for c in configs} == {configs[0].param.base_width}
        llama = next(c.model for c in configs if c.model.arch == "llama")
        assert isinstance(llama, LlamaConfig)
