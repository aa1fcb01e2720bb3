"""Run by ``torchrun --nproc_per_node 2`` from tests/test_distributed.py: train the tiny
config with every optimizer under DDP and FSDP2 and write each run's curve to a JSON file;
also leave an FSDP2 run paused at iteration 10 (``train.stop_at``) for the resume tests.

    torchrun --nproc_per_node 2 tests/dist_worker.py OUT_DIR OPTIMIZER...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from spectral_mup.config import RunConfig, load_config
from spectral_mup.train import run

LRS = {
    "adamw": 3e-3,
    "adopt": 3e-3,
    "lamb": 3e-2,
    "lion": 1e-3,
    "sophia": 3e-3,
    "sgd": 0.3,
    "muon": 0.05,
    "shampoo": 1e-2,
    "soap": 3e-3,
}

RESUMED = ("adamw", "muon", "shampoo")
SPECTRAL = ("--optim.spectral_normalize", "true")  # AdamW with §6's normalized updates


def tiny(out_dir: Path, optimizer: str, *overrides: str) -> RunConfig:
    """20 steps of a width-32, depth-2 GPT at global batch 8 (no dropout: its masks depend
    on how the batch is split)."""
    args = [
        *("--model.width", "32", "--model.depth", "2", "--model.n_heads", "2"),
        *("--model.block_size", "32", "--model.dropout", "0"),
        *("--param.base_width", "16", "--param.base_depth", "1"),
        *("--optim.name", optimizer, "--optim.lr", str(LRS[optimizer])),
        *("--optim.weight_decay", "0.1", "--train.batch_size", "8"),
        *("--train.max_iters", "20", "--train.warmup_iters", "4"),
        *("--train.eval_interval", "10", "--train.eval_iters", "2"),
        *("--train.progress", "false", "--train.out_dir", str(out_dir)),
    ]
    if optimizer == "sophia":
        args += ["--optim.hessian_interval", "3"]
    return load_config(None, [*args, *overrides])


def curve(result: dict) -> dict:
    return {"train": result["history"]["train_loss"], "val": result["history"]["val"]}


def hf_gpt2_muon(sharded: bool, steps: int = 5) -> list[float]:
    """A μP HF GPT-2 (tied head, Conv1D, fused c_attn: three Muon blocks) trained by Muon in
    a plain loop, each step's batch in two halves: one per rank, ``fully_shard`` per layer
    and root (``sharded``), or both halves accumulated by one process."""
    import torch.nn.functional as F
    import transformers

    import spectral_mup as smup
    from spectral_mup import hf

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=65,
        n_positions=32,
        n_embd=64,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        resid_pdrop=0.0,  # dropout masks depend on how the batch is split
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(cfg)
    p = smup.Parametrization(kind="mup", base_width=32, base_depth=1)
    hf.parametrize(model, p)
    halves = [dist.get_rank()] if sharded else [0, 1]
    if sharded:
        from torch.distributed.fsdp import fully_shard

        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
    opt = smup.build_optimizer("muon", model, p, lr=0.05, weight_decay=0.1)
    x = torch.randint(0, 65, (4, 17), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):  # one batch, memorized
        opt.zero_grad(set_to_none=True)
        total = torch.zeros(())
        for half in halves:
            xs = x[2 * half : 2 * half + 2]
            logits = model(xs[:, :-1]).logits
            loss = F.cross_entropy(logits.flatten(0, 1), xs[:, 1:].flatten()) / 2
            loss.backward()
            total += loss.detach()
        if sharded:
            dist.all_reduce(total)
        opt.step()
        losses.append(total.item())
    return losses


def main() -> None:
    out, optimizers = Path(sys.argv[1]), sys.argv[2:]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    curves = {}
    for parallel in ("ddp", "fsdp"):
        for name in optimizers:
            cfg = tiny(out / parallel / name, name, "--train.parallel", parallel)
            curves[f"{parallel}/{name}"] = curve(run(cfg, log=None))
        cfg = tiny(out / parallel / "spectral", "adamw", "--train.parallel", parallel, *SPECTRAL)
        curves[f"{parallel}/spectral"] = curve(run(cfg, log=None))
    for stop in ("--train.stop_at", "10"), ():  # DDP: paused and resumed by 2 ranks
        cfg = tiny(out / "resume-ddp" / "adamw", "adamw", "--train.parallel", "ddp", *stop)
        curves["resume-ddp/adamw"] = curve(run(cfg, log=None))
    # paused by 2 ranks; the tests resume them on 2 ranks and on 1 (Shampoo: whole state)
    for name in [n for n in RESUMED if n in optimizers]:
        for copy in ("resume2", "resume1"):
            cfg = tiny(out / copy / name, name, "--train.parallel", "fsdp", "--train.stop_at", "10")
            run(cfg, log=None)
        cfg = tiny(out / "resume2" / name, name, "--train.parallel", "fsdp")
        curves[f"resume2/{name}"] = curve(run(cfg, log=None))
    curves["fsdp/hf-gpt2-muon"] = hf_gpt2_muon(sharded=True)
    if dist.get_rank() == 0:
        (out / "curves.json").write_text(json.dumps(curves))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
