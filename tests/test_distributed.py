"""DDP and FSDP2 under ``torchrun --nproc_per_node 2`` (gloo, CPU): every optimizer trains
what one process trains at the same global batch, and a checkpoint sharded by two ranks
resumes exactly on two ranks and on one.

One process splits a step's batch into ``train.grad_accum`` micro-batches the way two
ranks split it, so with ``grad_accum = 2`` it makes the ranks' arithmetic: measured
bit-identical for every optimizer under DDP, and under FSDP2 for all but LAMB, whose norms
are all-reduced from the shards (1.2e-7). Against an unsplit batch (``grad_accum = 1``) the
gap is the reordered sums of the batch (1.2e-7 to 2.3e-7), except SOAP's — which one
process shows too between ``grad_accum`` 1 and 2: SOAP's eigenbases follow the last bits of
the gradient (its near-degenerate eigenvalues), so it is SOAP's, not sharding's, and its
size is the CPU's: 7.9e-5 on an AMD EPYC, 2.7e-4 on an Intel Xeon (both 2-core VMs), so
its bound is 2e-3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spectral_mup.train import run

sys.path.insert(0, str(Path(__file__).parent))
from dist_worker import LRS, RESUMED, SPECTRAL, hf_gpt2_muon, tiny

pytestmark = pytest.mark.usefixtures("one_thread")
OPTIMIZERS = sorted(LRS)
WORKER = Path(__file__).with_name("dist_worker.py")


def torchrun(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --standalone: a free port on localhost, so concurrent runs (two CI jobs) cannot collide
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += list(args)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[Path, dict]:
    """Two ranks train every optimizer under DDP and FSDP2 (one launch, about a minute)."""
    out = tmp_path_factory.mktemp("ranks")
    done = torchrun(str(WORKER), str(out), *OPTIMIZERS)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads((out / "curves.json").read_text())


def rel(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) == 20
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_two_ranks_train_what_one_process_trains(tmp_path, ranks, name: str) -> None:
    _, curves = ranks
    one = run(tiny(tmp_path / "one", name), log=None)["history"]["train_loss"]
    split = run(tiny(tmp_path / "split", name, "--train.grad_accum", "2"), log=None)
    split_curve = split["history"]["train_loss"]
    assert sum(one[-5:]) / 5 < one[0] - 0.04, one  # it trains
    for parallel in ("ddp", "fsdp"):
        got = curves[f"{parallel}/{name}"]
        assert rel(got["train"], split_curve) <= 1e-6, parallel
        vals = [v for _, v in split["history"]["val"]]
        assert [v for _, v in got["val"]] == pytest.approx(vals, rel=1e-6)
        assert rel(got["train"], one) <= (2e-3 if name == "soap" else 1e-5), parallel


def test_spectral_normalization_on_two_ranks(tmp_path, ranks) -> None:
    """§6's normalized updates need each matrix's top singular value: gathered, not per shard."""
    _, curves = ranks
    split = run(tiny(tmp_path, "adamw", "--train.grad_accum", "2", *SPECTRAL), log=None)
    for parallel in ("ddp", "fsdp"):
        assert rel(curves[f"{parallel}/spectral"]["train"], split["history"]["train_loss"]) <= 1e-6


def test_an_hf_gpt2_sharded_by_fsdp2_trains_like_one_process(ranks) -> None:
    """The own-loop recipe (docs/your-model.md): hf.parametrize, fully_shard, build_optimizer.
    Muon gathers each fused c_attn and orthogonalizes its q, k, v blocks whole."""
    _, curves = ranks
    one = hf_gpt2_muon(sharded=False)
    got = curves["fsdp/hf-gpt2-muon"]
    assert one[-1] < one[0] - 0.05, one
    assert max(abs(a - b) / b for a, b in zip(got, one, strict=True)) <= 1e-6


def test_ddp_checkpoint_resumes_exactly(ranks) -> None:
    _, curves = ranks
    assert curves["resume-ddp/adamw"]["train"] == curves["ddp/adamw"]["train"]


@pytest.mark.parametrize("name", RESUMED)
def test_sharded_checkpoint_resumes_on_two_ranks_and_on_one(ranks, name: str) -> None:
    out, curves = ranks
    whole = curves[f"fsdp/{name}"]["train"]
    assert curves[f"resume2/{name}"]["train"] == whole  # paused at 10, resumed by 2 ranks
    paused = out / "resume1" / name
    assert (paused / "checkpoint-00000010.dcp").is_dir()
    resumed = run(tiny(paused, name, "--train.grad_accum", "2"), log=None)
    assert rel(resumed["history"]["train_loss"], whole) <= 1e-6
    assert not list(paused.glob("checkpoint-*.dcp"))  # one process writes one file
    assert torch.load(paused / "model.pt", weights_only=True)["lm_head.weight"].shape[1] == 32


def toml(cfg) -> str:
    """A config as TOML (the scalar values ``to_dict`` gives; unset options left out)."""
    lines = []
    for section, items in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in items.items():
            if value is not None:
                lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def test_smup_train_under_torchrun(tmp_path, ranks) -> None:
    """The CLI on two ranks: one log, one set of files, the worker's curve."""
    _, curves = ranks
    config = tmp_path / "tiny.toml"
    config.write_text(toml(tiny(tmp_path / "run", "adamw")))
    done = torchrun("-m", "spectral_mup.cli", "train", str(config), "--train.parallel", "fsdp")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("best val loss") == 1, done.stdout
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["history"]["train_loss"] == curves["fsdp/adamw"]["train"]
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert files == ["checkpoint-00000020.dcp", "checkpoint.pt", "model.pt", "result.json"]


def test_a_batch_that_does_not_split_over_the_ranks_is_an_error(tmp_path) -> None:
    config = tmp_path / "tiny.toml"
    config.write_text(toml(tiny(tmp_path / "run", "adamw", "--train.batch_size", "3")))
    done = torchrun("-m", "spectral_mup.cli", "train", str(config))
    assert done.returncode != 0
    assert "does not split into 2 ranks × 1 micro-batches; make it a multiple of 2" in done.stderr
    assert not (tmp_path / "run").exists()
