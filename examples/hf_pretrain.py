"""Pre-train a Hugging Face causal LM with μP in a plain loop: a tiny ``LlamaForCausalLM`` (or
``GPT2LMHeadModel``) built from a config — no download —, made μP-ready by
``spectral_mup.hf.parametrize``, trained by any of our optimizers with its per-layer param
groups on Tiny Shakespeare (characters).

    SMUP_DATA_DIR=../shared/data python examples/hf_pretrain.py --arch llama --width 256 \
        --optimizer muon --lr 0.02 --steps 200

The learning rate is the one tuned on the base model (``--base-width``, ``--base-depth``):
μP carries it to ``--width``/``--depth``. With ``transformers.Trainer`` the same two lines
apply: pass ``optimizers=(opt, scheduler)`` with ``opt = smup.build_optimizer(...)`` after
``hf.parametrize(model, p)``. Under ``torchrun`` wrap the model in DDP or ``fully_shard``
it *after* ``hf.parametrize`` and build the optimizer on the wrapped model (roles are found
by parameter name through both).
"""

from __future__ import annotations

import argparse
import math

import torch
import transformers

import spectral_mup as smup
from spectral_mup import hf
from spectral_mup.data import load_dataset


def model_for(arch: str, vocab: int, width: int, depth: int, block: int) -> torch.nn.Module:
    heads = max(1, width // 32)  # heads of size 32, added with width
    if arch == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=vocab,
            n_positions=block,
            n_embd=width,
            n_layer=depth,
            n_head=heads,
            bos_token_id=0,  # GPT-2's 50256 is outside a character vocabulary
            eos_token_id=0,
        )
        return transformers.GPT2LMHeadModel(cfg)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=int(8 / 3 * width) // 16 * 16,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=block,
    )
    return transformers.LlamaForCausalLM(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=("llama", "gpt2"), default="llama")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--base-width", type=int, default=64)
    ap.add_argument("--base-depth", type=int, default=2)
    ap.add_argument("--optimizer", default="adamw", help="any of smup's optimizers")
    ap.add_argument("--lr", type=float, default=3e-3, help="the base model's LR")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    data = load_dataset(None)
    model = model_for(args.arch, data.vocab_size, args.width, args.depth, args.block)
    p = smup.Parametrization(
        kind="mup", base_width=args.base_width, base_depth=args.base_depth, depth_alpha=1.0
    )
    hf.parametrize(model, p)  # roles, readout multiplier, attention scale, branches, init
    opt = smup.build_optimizer(args.optimizer, model, p, lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 20)

    def factor(it: int) -> float:  # linear warmup, cosine decay to 10%
        if it < warmup:
            return (it + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (it - warmup) / (args.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    gen = torch.Generator().manual_seed(args.seed)
    for it in range(1, args.steps + 1):
        x, y = data.get_batch("train", args.batch, args.block, gen)
        loss = hf.causal_lm_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if it % max(1, args.steps // 10) == 0 or it == args.steps:
            print(f"step {it}: train loss {loss.item():.4f}", flush=True)
    model.eval()
    val_gen = torch.Generator().manual_seed(10_000)
    with torch.no_grad():
        val = sum(
            hf.causal_lm_loss(model, *data.get_batch("val", args.batch, args.block, val_gen)).item()
            for _ in range(20)
        )
    print(f"val loss {val / 20:.4f}")


if __name__ == "__main__":
    main()
