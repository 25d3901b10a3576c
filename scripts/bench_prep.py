#!/usr/bin/env python3
"""Time stage 0 (data preparation) and stage 1 (text normalization) on a synthetic Kaldi corpus.

The corpus is written to a temporary folder first, untimed:
  - `whole/`: `--utterances` utterances (default 10,000), one 16 kHz 16-bit WAV each,
    1 to 3 s of low-level noise;
  - `segmented/`: `--segments` utterances (default 300) cut by a segments file from
    recordings of 10 utterances each, with 0.2 to 1 s gaps between them.
Transcripts are random Chinese sentences with Arabic numerals, full-width punctuation,
traditional characters and Latin words, so every step of the normalization has work.

Stage 0 is `sparlora.prepare.prepare_kaldi_dir` on each dir with the `audio` section of
conf/demo.yaml. Stage 1 is `sparlora.text.normalize_data_dir`, the function that
`python -m sparlora.text` calls for each split, with the `text` section of conf/demo.yaml
and a token list that lacks a few of the characters used, so the OOV report is written.
The script prints the seconds of each stage and their total against the target of
120 s on 2 cores. Usage:

    python scripts/bench_prep.py [--utterances 10000] [--segments 300] [--cores 2] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import logging
import os
import platform
import pstats
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparlora.config import load_config  # noqa: E402
from sparlora.prepare import prepare_kaldi_dir  # noqa: E402
from sparlora.text import TextNormConfig, normalize_data_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RATE = 16000  # Hz
TARGET_SECONDS = 120.0
CHARACTERS = "今天天气很好我们去成都吃火锅巴适得板哦要得安逸慢慢走不存在晓得咋个整嘛啥子耍"
TRADITIONAL = "們個說來時點裡還"
EXTRAS = ["，", "。", "！", "？", "“", "”", "ＡＢＣ", "wifi", "OK", "2024年", "3点", "15%", "１２３"]
SEGMENTS_PER_RECORDING = 10


def random_sentence(rng: random.Random) -> str:
    """Return a transcript of 6 to 20 characters with a few items for the normalizer."""
    pieces = [rng.choice(CHARACTERS) for _ in range(rng.randint(6, 20))]
    for _ in range(rng.randint(0, 3)):
        pieces.insert(rng.randrange(len(pieces) + 1), rng.choice(EXTRAS + list(TRADITIONAL)))
    return "".join(pieces)


def write_wav(path: Path, seconds: float, rng: np.random.Generator) -> None:
    samples = 0.01 * rng.standard_normal(int(round(seconds * RATE)))
    soundfile.write(path, samples, RATE, subtype="PCM_16")


def write_tables(data_dir: Path, tables: dict[str, list[str]]) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, lines in tables.items():
        (data_dir / name).write_text("".join(line + "\n" for line in sorted(lines)), encoding="utf-8")


def make_corpus(root: Path, utterances: int, segments: int, seed: int) -> None:
    """Write the `whole` and `segmented` Kaldi data dirs and their WAVs under `root`."""
    rng = random.Random(seed)
    noise_rng = np.random.default_rng(seed)
    wav_dir = root / "wav"
    wav_dir.mkdir(parents=True)

    tables: dict[str, list[str]] = {"wav.scp": [], "text": [], "utt2spk": []}
    for index in range(utterances):
        speaker = f"spk{index % 200:03d}"
        utt = f"{speaker}-u{index:05d}"
        write_wav(wav_dir / f"{utt}.wav", rng.uniform(1.0, 3.0), noise_rng)
        tables["wav.scp"].append(f"{utt} {wav_dir / utt}.wav")
        tables["text"].append(f"{utt} {random_sentence(rng)}")
        tables["utt2spk"].append(f"{utt} {speaker}")
    write_tables(root / "whole", tables)

    tables = {"wav.scp": [], "text": [], "utt2spk": [], "segments": []}
    for recording_index in range((segments + SEGMENTS_PER_RECORDING - 1) // SEGMENTS_PER_RECORDING):
        recording = f"rec{recording_index:04d}"
        speaker = f"talker{recording_index % 20:02d}"
        start = rng.uniform(0.2, 1.0)
        count = min(SEGMENTS_PER_RECORDING, segments - recording_index * SEGMENTS_PER_RECORDING)
        for number in range(count):
            utt = f"{speaker}-{recording}-{number:02d}"
            end = start + rng.uniform(1.0, 3.0)
            tables["segments"].append(f"{utt} {recording} {start:.2f} {end:.2f}")
            tables["text"].append(f"{utt} {random_sentence(rng)}")
            tables["utt2spk"].append(f"{utt} {speaker}")
            start = end + rng.uniform(0.2, 1.0)
        write_wav(wav_dir / f"{recording}.wav", start, noise_rng)
        tables["wav.scp"].append(f"{recording} {wav_dir / recording}.wav")
    write_tables(root / "segmented", tables)


def timed(label: str, function, profile: bool):
    """Run `function()`, print its seconds, and print the top of a cProfile when `profile` is set."""
    profiler = cProfile.Profile() if profile else None
    start = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    result = function()
    if profiler is not None:
        profiler.disable()
    seconds = time.perf_counter() - start
    print(f"{label}: {seconds:.2f} s")
    if profiler is not None:
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats("cumulative").print_stats(20)
        print(stream.getvalue())
    return seconds, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Time stages 0 and 1 on a synthetic Kaldi corpus.")
    parser.add_argument("--utterances", type=int, default=10000, help="whole-file utterances (default: 10000)")
    parser.add_argument("--segments", type=int, default=300, help="utterances cut from longer recordings (default: 300)")
    parser.add_argument("--cores", type=int, default=2, help="CPU cores to run on, by affinity, 0 for all (default: 2)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the synthetic corpus (default: 1234)")
    parser.add_argument("--profile", action="store_true", help="print the top 20 functions by cumulative time per stage")
    parser.add_argument("--workdir", type=Path, help="folder for the corpus (default: a temporary folder, removed at the end)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    if args.cores > 0 and hasattr(os, "sched_setaffinity"):
        available = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, available[: args.cores])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cfg = load_config(REPO / "conf" / "demo.yaml")
    norm_cfg = TextNormConfig.from_dict(cfg.text)
    token_list = ["<blank>", "<s>", "</s>"] + list(CHARACTERS[:-3]) + ["<unk>"]

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        make_corpus(root / "corpus", args.utterances, args.segments, args.seed)
        print(f"corpus: {args.utterances} whole-file and {args.segments} segmented utterances written "
              f"in {time.perf_counter() - start:.1f} s (not timed)")
        print(f"machine: {platform.machine()}, {cores} core(s) used of {os.cpu_count()}, Python {platform.python_version()}")

        stage0, stage1 = 0.0, 0.0
        for split in ("whole", "segmented"):
            seconds, report = timed(
                f"stage 0 {split}",
                lambda split=split: prepare_kaldi_dir(root / "corpus" / split, root / "data" / split, cfg.audio, 0.0),
                args.profile,
            )
            stage0 += seconds
            print(f"  {report.summary()}")
        for split in ("whole", "segmented"):
            seconds, summary = timed(
                f"stage 1 {split}",
                lambda split=split: normalize_data_dir(root / "data" / split, norm_cfg, token_list),
                args.profile,
            )
            stage1 += seconds
            print(f"  {summary['utterances']} utterances, {summary['changed']} changed, "
                  f"{summary['utterances_with_unk']} with <unk>")

    total = stage0 + stage1
    verdict = "met" if total <= TARGET_SECONDS else "NOT met"
    print(f"stage 0: {stage0:.2f} s, stage 1: {stage1:.2f} s, total: {total:.2f} s; "
          f"target {TARGET_SECONDS:.0f} s on 2 cores {verdict}")
    return 0 if total <= TARGET_SECONDS else 1


if __name__ == "__main__":
    sys.exit(main())
