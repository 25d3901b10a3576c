#!/usr/bin/env python3
"""Benchmark adapter initialization time on a model with Paraformer-large's shapes.

Builds FunASR's Paraformer with paraformer-large's config (SANM encoder of 50 blocks,
SANM decoder of 16 blocks, d_model 512, FFN 2048, 4 heads, vocabulary 8404) and random
weights, then times, side by side in one process, each initialization on its own copy
of the model (the copy is not timed):

- PEFT LoRA with its default init (Kaiming A, B = 0): `get_peft_model`;
- SPaRLoRA, `lowest` and `energy` selection: `get_peft_model` plus `apply_sparlora`;
- PiSSA with a full SVD, PiSSA with `pissa_niter_4`, and OLoRA, through PEFT;
- the floor: the two matmuls per layer SPaRLoRA cannot avoid (W A^T and the rank-r
  update of W), timed alone on the same weights.

After one untimed warm-up round, each method runs `--repeats` times in a rotating order
and the median is reported. Usage:

    python scripts/bench_init.py [--rank 32] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparlora.adapters import apply_method, lora_layers, resolve_targets  # noqa: E402

LARGE_CONFIG = {
    "encoder": "SANMEncoder",
    "encoder_conf": dict(output_size=512, attention_heads=4, linear_units=2048, num_blocks=50, dropout_rate=0.1,
                         positional_dropout_rate=0.1, attention_dropout_rate=0.1, input_layer="pe",
                         pos_enc_class="SinusoidalPositionEncoder", normalize_before=True, kernel_size=11,
                         sanm_shfit=0, selfattention_layer_type="sanm"),
    "decoder": "ParaformerSANMDecoder",
    "decoder_conf": dict(attention_heads=4, linear_units=2048, num_blocks=16, dropout_rate=0.1,
                         positional_dropout_rate=0.1, self_attention_dropout_rate=0.1,
                         src_attention_dropout_rate=0.1, att_layer_num=16, kernel_size=11, sanm_shfit=0),
    "predictor": "CifPredictorV2",
    "predictor_conf": dict(idim=512, threshold=1.0, l_order=1, r_order=1, tail_threshold=0.45),
    "ctc_weight": 0.0,
    "predictor_weight": 1.0,
    "predictor_bias": 1,
    "sampling_ratio": 0.75,
}


def build_large_paraformer() -> torch.nn.Module:
    """Return a randomly initialized Paraformer with paraformer-large's shapes."""
    import funasr.models.paraformer.model  # noqa: F401  (registers the classes)
    from funasr.register import tables

    model_class = tables.model_classes.get("Paraformer")
    return model_class(**LARGE_CONFIG, vocab_size=8404, input_size=560).eval()


def method(init: str, rank: int, **sparlora) -> dict:
    spec = dict(type="lora", rank=rank, alpha=2 * rank, init=init)
    if sparlora:
        spec["sparlora"] = dict(basis="dft_complex", b_init="lstsq", residual=True, **sparlora)
    return spec


@torch.no_grad()
def floor_seconds(model: torch.nn.Module, rank: int) -> float:
    """Time W A^T and the in-place rank-r update W - B A for every target Linear, A fixed per input size."""
    targets = [model.get_submodule(name) for name in resolve_targets(model, "paraformer")]
    bases = {}
    for layer in targets:
        if layer.in_features not in bases:
            bases[layer.in_features] = torch.linalg.qr(torch.randn(layer.in_features, rank))[0].T.contiguous()
    start = time.perf_counter()
    for layer in targets:
        a = bases[layer.in_features]
        b = layer.weight @ a.T
        layer.weight.addmm_(b, a, alpha=-1.0)
    return time.perf_counter() - start


def time_method(model: torch.nn.Module, spec: dict) -> float:
    fresh = copy.deepcopy(model)
    start = time.perf_counter()
    apply_method(fresh, spec)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-pissa-svd", action="store_true", help="leave out the slowest method (full SVD)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = build_large_paraformer()
    targets = resolve_targets(model, "paraformer")
    parameters = sum(p.numel() for p in model.parameters())
    print(f"model: Paraformer, {parameters / 1e6:.1f} M parameters, {len(targets)} target Linears, rank {args.rank}")
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads")

    methods = {
        "PEFT LoRA (default init)": method("default", args.rank),
        "SPaRLoRA lowest": method("sparlora", args.rank, select="lowest"),
        "SPaRLoRA energy": method("sparlora", args.rank, select="energy"),
        "PiSSA niter_4": method("pissa_niter_4", args.rank),
        "OLoRA": method("olora", args.rank),
    }
    if not args.skip_pissa_svd:
        methods["PiSSA (full SVD)"] = method("pissa", args.rank)

    # One untimed warm-up round, then rounds that interleave the methods in a rotating
    # order, so machine noise and allocator warm-up spread over all of them.
    floor_name = "floor (2 matmuls per layer)"
    runners = {name: (lambda spec=spec: time_method(model, spec)) for name, spec in methods.items()}
    runners[floor_name] = lambda: floor_seconds(copy.deepcopy(model), args.rank)
    names = list(runners)
    for name in names:
        runners[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(args.repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(runners[name]())
    median = {name: statistics.median(times[name]) for name in names}

    lora = median["PEFT LoRA (default init)"]
    print(f"\n| method | median seconds | / PEFT LoRA |")
    print("|---|---:|---:|")
    for name, seconds in median.items():
        print(f"| {name} | {seconds:.3f} | {seconds / lora:.2f} |")

    sparlora = median["SPaRLoRA lowest"]
    floor = median[floor_name]
    print(f"\nSPaRLoRA lowest / PEFT LoRA = {sparlora / lora:.2f} (target <= 1.5)")
    if "PiSSA (full SVD)" in median:
        print(f"PiSSA (full SVD) / SPaRLoRA lowest = {median['PiSSA (full SVD)'] / sparlora:.1f} (target >= 15)")
    print(f"(SPaRLoRA lowest - PEFT LoRA) / floor = {(sparlora - lora) / floor:.2f} (target <= 1.3)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
