#!/usr/bin/env python3
"""Benchmark stage 4 decoding: merged model against base model, and our batching against FunASR's.

Two comparisons, each measured side by side in one process on the same utterances:

(a) Latency of the merged model / latency of the base model. The merged model is the
    base model with a SPaRLoRA adapter (`--method`, default conf/method/sparlora.yaml)
    merged into its weights, as stage 3 exports it. Features are computed once and
    cached, so only the model is timed, over `--passes` passes per measurement. At step
    0 the residual init leaves the outputs unchanged, so the merged model must give the
    base model's transcripts exactly, and also those of the unmerged PEFT model, which
    is timed too for reference. Target: ratio <= 1.01.
(b) Throughput of `sparlora.decode.decode_dataset` (stage 4: audio loading, fbank,
    batches of utterances of similar length) / throughput of
    `funasr.AutoModel.generate` on the same model and wav files. Both read and
    featurize the audio on every run. Target: ratio >= 1.5 against `generate` with its
    default batch size (1), whose transcripts must equal ours. `generate` at our batch
    size is reported too. Its transcripts may differ from ours, because FunASR's CIF
    predictor reads the encoder output at padded frames (see
    `sparlora.decode.zero_padded_frames`).

After one untimed warm-up run of each system, `--repeats` rounds run the systems in a
rotating order, and the median of each is reported with the ratios. Usage:

    python scripts/bench_decode.py [--model-dir local/demo/base_model]
        [--manifest data/demo/sc_test/data.jsonl] [--utterances 200] [--repeats 7]
        [--batch-size 16] [--threads 2] [--passes 5]
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparlora.adapters import apply_method, merged_state_dict  # noqa: E402
from sparlora.data import AsrDataset, read_manifest  # noqa: E402
from sparlora.decode import decode_dataset  # noqa: E402
from sparlora.model import load_paraformer  # noqa: E402


def interleaved_medians(runners: dict, repeats: int) -> tuple[dict[str, float], dict[str, object]]:
    """Run each runner once untimed, then `repeats` rotating rounds; return medians and last outputs."""
    outputs = {name: runner() for name, runner in runners.items()}
    names = list(runners)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            outputs[name] = runners[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}, outputs


def print_table(medians: dict[str, float], reference: str, utterances: int) -> None:
    print(f"| system | median seconds | utterances/s | / {reference} |")
    print("|---|---:|---:|---:|")
    for name, seconds in medians.items():
        print(f"| {name} | {seconds:.3f} | {utterances / seconds:.1f} | {seconds / medians[reference]:.3f} |")


def compare_transcripts(name: str, reference: dict[str, str], other: dict[str, str]) -> bool:
    differing = [key for key in reference if reference[key] != other.get(key)]
    print(f"transcripts of {name}: {len(reference) - len(differing)} of {len(reference)} identical"
          + (f"; differing: {' '.join(differing[:5])}" if differing else ""))
    return not differing


def merged_model(base, method: dict):
    """Return a copy of `base` with `method` applied at step 0 and merged, and the unmerged PEFT copy."""
    peft_model = apply_method(copy.deepcopy(base), method)
    peft_model.eval()
    merged = copy.deepcopy(base)
    merged.load_state_dict(merged_state_dict(copy.deepcopy(peft_model)))
    merged.eval()
    return merged, peft_model


def bench_merged(args, model_dir: Path, entries) -> bool:
    from omegaconf import OmegaConf

    base, kwargs = load_paraformer(model_dir, num_threads=args.threads)
    method = OmegaConf.to_container(OmegaConf.load(args.method), resolve=True)
    merged, peft_model = merged_model(base, method)
    dataset = AsrDataset(entries, kwargs["frontend"], kwargs["tokenizer"], 16000, "mean", cache=True)
    for index in range(len(dataset)):
        dataset.features(index)

    def runner(model):
        def run():
            for _ in range(args.passes):
                hyps = decode_dataset(model, dataset, kwargs["tokenizer"], kwargs["frontend"], args.batch_size, "cpu", progress=False)
            return hyps
        return run

    runners = {"base model": runner(base), "merged model": runner(merged), "unmerged PEFT model": runner(peft_model)}
    medians, outputs = interleaved_medians(runners, args.repeats)
    print(f"\n(a) decoding latency, features cached, batch size {args.batch_size}, {args.passes} passes per measurement, "
          f"method {method['name']} rank {method['rank']}\n")
    print_table(medians, "base model", len(entries) * args.passes)
    ratio = medians["merged model"] / medians["base model"]
    print(f"\nmerged / base latency = {ratio:.3f} (target <= 1.01)")
    identical = compare_transcripts("merged model vs base model", outputs["base model"], outputs["merged model"])
    identical &= compare_transcripts("merged model vs unmerged PEFT model", outputs["unmerged PEFT model"], outputs["merged model"])
    return identical and ratio <= 1.01


def bench_automodel(args, model_dir: Path, entries) -> bool:
    from funasr import AutoModel

    model, kwargs = load_paraformer(model_dir, num_threads=args.threads)
    funasr_model = AutoModel(model=str(model_dir), device="cpu", ncpu=args.threads, disable_update=True,
                             disable_pbar=True, log_level="ERROR")
    torch.set_num_threads(args.threads)
    paths = [entry.source for entry in entries]
    keys = [entry.key for entry in entries]

    def ours():
        dataset = AsrDataset(entries, kwargs["frontend"], kwargs["tokenizer"], 16000, "mean", cache=False)
        return decode_dataset(model, dataset, kwargs["tokenizer"], kwargs["frontend"], args.batch_size, "cpu", progress=False)

    def theirs(batch_size):
        def run():
            results = funasr_model.generate(input=paths, batch_size=batch_size, disable_pbar=True)
            return {key: result["text"] for key, result in zip(keys, results)}
        return run

    funasr_default = "funasr.AutoModel.generate, batch size 1"
    funasr_batched = f"funasr.AutoModel.generate, batch size {args.batch_size}"
    runners = {"decode_dataset (ours)": ours, funasr_default: theirs(1), funasr_batched: theirs(args.batch_size)}
    medians, outputs = interleaved_medians(runners, args.repeats)
    print(f"\n(b) decoding throughput from wav files, batch size {args.batch_size}\n")
    print_table(medians, "decode_dataset (ours)", len(entries))
    ours_seconds = medians["decode_dataset (ours)"]
    ratio_default = medians[funasr_default] / ours_seconds
    ratio_batched = medians[funasr_batched] / ours_seconds
    print(f"\nour throughput / AutoModel.generate at batch size 1 (its default) = {ratio_default:.2f} (target >= 1.5)")
    print(f"our throughput / AutoModel.generate at batch size {args.batch_size} = {ratio_batched:.2f} (no target)")
    identical = compare_transcripts("AutoModel batch size 1 vs ours", outputs["decode_dataset (ours)"], outputs[funasr_default])
    compare_transcripts(f"AutoModel batch size {args.batch_size} vs ours (padding-dependent in FunASR)",
                        outputs["decode_dataset (ours)"], outputs[funasr_batched])
    return identical and ratio_default >= 1.5


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default=str(ROOT / "local" / "demo" / "base_model"), help="FunASR model directory")
    parser.add_argument("--manifest", default=str(ROOT / "data" / "demo" / "sc_test" / "data.jsonl"),
                        help="stage 2 jsonl manifest whose sources are wav paths")
    parser.add_argument("--utterances", type=int, default=200, help="first N utterances of the manifest")
    parser.add_argument("--method", default=str(ROOT / "conf" / "method" / "sparlora.yaml"), help="method config merged in (a)")
    parser.add_argument("--batch-size", type=int, default=16, help="utterances per batch (stage 4's decode.batch_size)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per system")
    parser.add_argument("--passes", type=int, default=5, help="decodes of the cached features per measurement in (a)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--only", choices=("merged", "automodel"), help="run one of the two comparisons")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    manifest = Path(args.manifest)
    if not manifest.is_file():
        parser.error(f"manifest not found: {manifest}; prepare the demo data first: bash run.sh --stage 0 --stop-stage 2")
    entries = read_manifest(manifest)[: args.utterances]
    audio_seconds = sum(entry.source_len for entry in entries) / 100
    print(f"model: {args.model_dir}; {len(entries)} utterances, {audio_seconds:.1f} s of audio from {manifest}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads")

    passed = True
    if args.only in (None, "merged"):
        passed &= bench_merged(args, Path(args.model_dir), entries)
    if args.only in (None, "automodel"):
        passed &= bench_automodel(args, Path(args.model_dir), entries)
    print(f"\n{'all targets met, transcripts identical' if passed else 'a target was missed or transcripts differ'}")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
