"""Coordinate checks through Hugging Face forwards (issue 11's table in docs/measurements.md).

GPT-2 (``GPT2LMHeadModel``: head tied to the token embedding, ``Conv1D`` weights, vocabulary
50257) and Llama (``LlamaForCausalLM``: untied head, grouped-query attention with two query
heads per key/value head, vocabulary 32000), both built from configs (no download) at widths
128 → 512 with heads of size 32 added with width (as both families grow), depth 2,
parametrized with ``spectral_mup.hf.parametrize`` (base width 128). Five steps of AdamW,
LAMB and Muon at the CLI's coordinate-check LRs on Tiny Shakespeare batches (8 × 64 chars),
three seeds. Prints the slope of log RMS change vs log width per layer group, μP and SP;
``logits:ΔW·x`` is the head's own update (the part μP keeps flat; the rest, W₀·Δx, shrinks
as 1/sqrt(m) by design, RULES.md §1).

    SMUP_DATA_DIR=../shared/data python benchmarks/hf_coord.py [--arch gpt2,llama]
        [--optimizers adamw,lamb,muon] [--seeds 0,1,2] [--widths 128,256,512]
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

import spectral_mup as smup
from spectral_mup import hf
from spectral_mup.coord import coord_check
from spectral_mup.data import load_dataset
from spectral_mup.optim import REGISTRY, get_spec

HEAD = 32


def build(arch: str):
    def make(width: int, p: smup.Parametrization):
        heads = width // HEAD
        if arch == "gpt2":
            cfg = transformers.GPT2Config(
                vocab_size=50257, n_positions=64, n_embd=width, n_layer=2, n_head=heads
            )
            model = transformers.GPT2LMHeadModel(cfg)
        else:
            cfg = transformers.LlamaConfig(
                vocab_size=32000,
                hidden_size=width,
                intermediate_size=int(8 / 3 * width) // 16 * 16,
                num_hidden_layers=2,
                num_attention_heads=heads,
                num_key_value_heads=heads // 2,
                max_position_embeddings=64,
            )
            model = transformers.LlamaForCausalLM(cfg)
        hf.parametrize(model, p)
        return model

    return make


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="gpt2,llama")
    ap.add_argument("--optimizers", default="adamw,lamb,muon")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--widths", default="128,256,512")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    widths = [int(w) for w in args.widths.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    gen = torch.Generator().manual_seed(1234)
    data = load_dataset(None)
    batches = [data.get_batch("train", 8, 64, gen) for _ in range(5)]
    params = {
        "sp": smup.Parametrization(kind="sp"),
        "mup": smup.Parametrization(kind="mup", base_width=widths[0], base_depth=2),
    }
    print(f"widths {widths}, seeds {seeds}, 5 steps; slope of log RMS change vs log width")
    for arch in args.arch.split(","):
        for name in args.optimizers.split(","):
            kwargs = {"adam_lr": REGISTRY["muon"].aux.coord_lr} if name == "muon" else {}
            start = time.perf_counter()
            report = coord_check(
                build(arch),
                params,
                widths,
                batches,
                loss=hf.causal_lm_loss,
                optimizer=name,
                lr=get_spec(name).coord_lr,
                optimizer_kwargs=kwargs,
                taps=hf.coord_taps,
                seeds=seeds,
                split_terms=("logits",),
            )
            slopes = report.slopes()
            groups = list(slopes["mup"])
            print(f"\n{arch} {name} ({time.perf_counter() - start:.0f} s)")
            print("| group | " + " | ".join(groups) + " |")
            print("|---" * (len(groups) + 1) + "|")
            for kind in ("mup", "sp"):
                row = " | ".join(f"{slopes[kind][g]:+.2f}" for g in groups)
                print(f"| {kind} | {row} |", flush=True)


if __name__ == "__main__":
    main()
