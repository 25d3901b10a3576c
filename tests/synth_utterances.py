"""Synthesized test utterances: 16 kHz mono wavs of varied length and a stage 2 manifest for them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile

from sparlora.data import ManifestEntry, write_manifest

SAMPLE_RATE = 16000


def write_utterances(folder: Path, count: int = 6, seed: int = 0) -> list[ManifestEntry]:
    """Write `count` wavs of 0.6 to 2.6 seconds (tones plus noise) and return their manifest entries.

    The lengths differ, so batches of them are padded.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = []
    for index in range(count):
        seconds = 0.6 + 2.0 * index / max(count - 1, 1)
        samples = int(round(seconds * SAMPLE_RATE))
        time = np.arange(samples) / SAMPLE_RATE
        signal = 0.3 * np.sin(2 * np.pi * (180 + 60 * index) * time) * np.sin(2 * np.pi * 3 * time)
        signal += 0.05 * rng.standard_normal(samples)
        path = folder / f"utt{index}.wav"
        soundfile.write(path, signal.astype(np.float32), SAMPLE_RATE)
        # source_len counts 10 ms fbank frames (25 ms windows), as stage 2 writes it.
        frames = 1 + (samples - 400) // 160
        entries.append(ManifestEntry(key=f"spk{index % 2}-utt{index}", source=str(path), target="今天天气很好",
                                     source_len=frames, target_len=6))
    return entries


def write_test_split(data_dir: Path, name: str, entries: list[ManifestEntry]) -> Path:
    """Write `data_dir/name/data.jsonl` and `text` for `entries`; return the manifest path."""
    split = data_dir / name
    split.mkdir(parents=True, exist_ok=True)
    write_manifest(split / "data.jsonl", entries)
    (split / "text").write_text("".join(f"{entry.key} {entry.target}\n" for entry in entries), encoding="utf-8")
    return split / "data.jsonl"
