"""Metadata that survives: roles live by parameter name (never on tensors), so a shapes file,
copies, pickles, state dicts and the torch.compile / DDP / FSDP2 wrappers all see the same
param groups."""

import copy
import json
import pickle

import pytest
import torch
import torch.distributed as dist
from torch import nn

import spectral_mup as smup
from spectral_mup import ConfigError, Parametrization, build_optimizer

VOCAB = 50


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.norm(x))))


class Net(nn.Module):
    """A plain residual LM: embedding, blocks, norm, untied head."""

    def __init__(self, width: int, depth: int):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB, bias=False)

    def forward(self, idx):
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


P = Parametrization(kind="mup", base_width=16, base_depth=2, depth_alpha=1.0)


def meta(width: int, depth: int) -> Net:
    with torch.device("meta"):
        return Net(width, depth)


def groups(model: nn.Module, optimizer: str = "adamw") -> list[tuple]:
    opt = build_optimizer(optimizer, model, P, lr=1e-2, weight_decay=0.1)
    return sorted(
        (smup.roles.canonical_name(n), g["lr"], g["weight_decay"], bool(g.get("aux")))
        for g in opt.param_groups
        for n in g["names"]
    )


def target() -> Net:
    torch.manual_seed(0)
    return Net(64, 6)


@pytest.mark.parametrize("optimizer", ["adamw", "muon", "lamb"])
def test_shapes_file_round_trip_gives_the_same_groups(tmp_path, optimizer) -> None:
    path = smup.save_shapes(tmp_path / "net.shapes.json", meta(16, 2), meta(32, 3))
    doc = json.loads(path.read_text())
    assert doc["base"]["blocks.1.up.weight"] == [64, 16]
    assert doc["delta"]["blocks.2.down.weight"] == [32, 128]
    from_model, from_file = target(), target()
    smup.parametrize(from_model, P, base=meta(16, 2), delta=meta(32, 3))
    smup.parametrize(from_file, P, base=str(path))  # delta from the file
    assert from_file.smup_roles == from_model.smup_roles
    assert groups(from_file, optimizer) == groups(from_model, optimizer)
    # the values are the rules' (RULES.md §2, §4): hidden AdamW LR 1/m_in · m_L^(α-1), m = 4
    lrs = {name: lr for name, lr, _, _ in groups(from_file, "adamw")}
    assert lrs["blocks.0.up.weight"] == pytest.approx(1e-2 / 4 * (6 / 2) ** 0)
    assert lrs["head.weight"] == pytest.approx(1e-2)


def test_shapes_file_errors(tmp_path) -> None:
    model = target()
    with pytest.raises(ConfigError, match="does not exist; write it with save_shapes"):
        smup.parametrize(model, P, base=tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "other"}')
    with pytest.raises(ConfigError, match="not a spectral-mup shapes file"):
        smup.parametrize(model, P, base=bad)
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not readable JSON"):
        smup.load_shapes(bad)
    bad.write_text('{"format": "spectral-mup-shapes-v1"}')
    with pytest.raises(ConfigError, match="has no 'base' shapes"):
        smup.load_shapes(bad)
    bad.write_text('{"format": "spectral-mup-shapes-v1", "base": {"w": "64x16"}}')
    with pytest.raises(ConfigError, match="must map parameter names to lists of ints"):
        smup.load_shapes(bad)


def test_copies_pickles_and_state_dicts_keep_roles_and_outputs(tmp_path) -> None:
    model = target()
    smup.parametrize(model, P, base=meta(16, 2), delta=meta(32, 3))
    idx = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        want = model(idx)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    fresh = Net(64, 6)  # other init; the readout hook comes from parametrize, not the file
    smup.parametrize(fresh, P, base=meta(16, 2), delta=meta(32, 3))
    fresh.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)), fresh):
        with torch.no_grad():
            torch.testing.assert_close(clone(idx), want, rtol=0, atol=0)
        assert clone.smup_roles == model.smup_roles
        assert groups(clone, "muon") == groups(model, "muon")


@pytest.fixture
def process_group():
    """A one-rank gloo group, enough to wrap a model in DDP and FSDP2."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_wrappers_keep_the_groups(process_group, optimizer) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    def parametrized() -> Net:
        model = target()
        smup.parametrize(model, P, base=meta(16, 2), delta=meta(32, 3))
        return model

    want = groups(parametrized(), optimizer)
    compiled = torch.compile(parametrized())
    assert groups(compiled, optimizer) == want
    assert groups(DistributedDataParallel(parametrized()), optimizer) == want
    sharded = parametrized()
    mesh = init_device_mesh("cpu", (1,))
    for block in sharded.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    assert type(next(sharded.parameters())).__name__ == "DTensor"
    assert groups(sharded, optimizer) == want


def test_an_hf_llama_sharded_by_fsdp2_steps_with_muon(process_group) -> None:
    """hf.parametrize, then fully_shard each decoder layer and the root: the optimizer finds
    every role by name and Muon steps the (one-rank) DTensors like the unsharded model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from spectral_mup import hf
    from test_hf import llama as hf_llama

    p = Parametrization(kind="mup", base_width=32, base_depth=1)

    def llama() -> nn.Module:
        torch.manual_seed(0)
        model = hf_llama(width=64, depth=2, heads=4, kv=2, ffn=128)
        hf.parametrize(model, p)
        return model

    plain, sharded = llama(), llama()
    mesh = init_device_mesh("cpu", (1,))
    for layer in sharded.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    idx = torch.randint(0, 65, (2, 16))  # test_hf's vocabulary
    losses = []
    for model in (plain, sharded):
        opt = build_optimizer("muon", model, p, lr=0.02)
        for _ in range(3):
            opt.zero_grad()
            loss = hf.causal_lm_loss(model, idx, idx)
            loss.backward()
            opt.step()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
