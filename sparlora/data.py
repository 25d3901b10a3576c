"""Training and decoding data: jsonl manifests, features, and batches by duration.

A manifest line is FunASR's jsonl layout plus the segment times:
`{"key", "source", "target", "source_len", "target_len", "start", "end"}`, where
`source` is the wav.scp value (a path or a `cmd |` pipe), `start`/`end` are seconds
(null for a whole recording), `source_len` is the number of 10 ms fbank frames and
`target_len` the number of tokens.

Features come from the pretrained model's own FunASR frontend (fbank, LFR, CMVN from
its am.mvn) through `extract_features`, the one function both training and decoding
call, so the two paths give identical tensors.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from sparlora.audio import load_audio

logger = logging.getLogger(__name__)

FRAME_SHIFT_SECONDS = 0.01  # fbank frame shift
IGNORE_ID = -1  # target padding value the Paraformer loss ignores
TOKEN_PIECE = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*|\S")


def tokenizer_input(text: str) -> str:
    """Return `text` with every character and every Latin word separated by one space.

    FunASR's CharTokenizer with a seg_dict (Paraformer-large ships one) splits on
    spaces. It turns a whole chunk into one `<unk>` when the chunk's first character is
    not a CJK ideograph, Latin letter or digit, and it looks Latin words up only when
    they stand alone. One character per chunk, and Latin words kept whole, give one
    token (or one `<unk>`) per character and let words such as `wifi` reach the
    seg_dict. Without a seg_dict the tokenizer skips spaces, so the result is the same.
    """
    return " ".join(TOKEN_PIECE.findall(text))


def encode_target(tokenizer, text: str) -> list[int]:
    """Return the token ids of a normalized transcript."""
    return list(tokenizer.encode(tokenizer_input(text)))


@dataclass
class ManifestEntry:
    key: str
    source: str
    target: str
    source_len: int  # fbank frames
    target_len: int  # tokens
    start: float | None = None  # seconds
    end: float | None = None  # seconds


def write_manifest(path: Path, entries: Sequence[ManifestEntry]) -> None:
    """Write entries as jsonl through a temporary file and rename."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as out:
        for entry in entries:
            out.write(json.dumps(entry.__dict__, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_manifest(path: Path) -> list[ManifestEntry]:
    """Read a jsonl manifest; a malformed line raises naming the file and line."""
    entries = []
    with Path(path).open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                entries.append(
                    ManifestEntry(
                        key=record["key"],
                        source=record["source"],
                        target=record["target"],
                        source_len=int(record["source_len"]),
                        target_len=int(record["target_len"]),
                        start=record.get("start"),
                        end=record.get("end"),
                    )
                )
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                raise ValueError(f"{path}:{number}: invalid manifest line ({error}); rerun stage 2") from error
    return entries


def extract_features(frontend, waveform: torch.Tensor) -> torch.Tensor:
    """Return the model's input features `[frames, dims]` for one mono waveform in [-1, 1].

    The frontend is the pretrained model's FunASR `WavFrontend`: fbank (scaled to 16-bit
    sample values), LFR stacking, then CMVN with the model's am.mvn.
    """
    lengths = torch.tensor([waveform.numel()])
    feats, feat_lengths = frontend(waveform.unsqueeze(0).float(), lengths)
    return feats[0, : int(feat_lengths[0])]


class AsrDataset(torch.utils.data.Dataset):
    """Utterances of a manifest as (key, features, token ids), with features cached in memory."""

    def __init__(self, entries: Sequence[ManifestEntry], frontend, tokenizer, sample_rate: int, channel, cache: bool = True,
                 augment=None):
        """`augment(waveform, key, epoch)`, when given, adds noise to each waveform as it is
        loaded (`sparlora.noise.NoiseAugmenter`); features are then never cached."""
        self.entries = list(entries)
        self.augment = augment
        self.epoch = 1  # the trainer sets it, so the noise of each epoch differs
        self.frontend = frontend
        self.tokenizer = tokenizer
        self.sample_rate = sample_rate
        self.channel = channel
        self.cache = cache
        self._features: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def features(self, index: int) -> torch.Tensor:
        if self.augment is None and index in self._features:
            return self._features[index]
        entry = self.entries[index]
        waveform = load_audio(entry.source, entry.start, entry.end, sample_rate=self.sample_rate, channel=self.channel)
        if self.augment is not None:
            waveform = self.augment(waveform, entry.key, self.epoch)
        feats = extract_features(self.frontend, torch.from_numpy(waveform))
        if self.cache and self.augment is None:
            self._features[index] = feats
        return feats

    def token_ids(self, index: int) -> torch.Tensor:
        return torch.tensor(encode_target(self.tokenizer, self.entries[index].target), dtype=torch.long)

    def __getitem__(self, index: int):
        return self.entries[index].key, self.features(index), self.token_ids(index)


class DatasetSubset:
    """A subset of an AsrDataset's utterances with the same interface, sharing its feature cache."""

    def __init__(self, dataset: AsrDataset, indices: Sequence[int]):
        self.dataset = dataset
        self.indices = list(indices)
        self.entries = [dataset.entries[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]


def collate(items) -> dict:
    """Pad a list of (key, features, token ids) into the Paraformer's forward arguments."""
    keys = [key for key, _, _ in items]
    feats = [f for _, f, _ in items]
    targets = [t for _, _, t in items]
    return {
        "keys": keys,
        "speech": pad_sequence(feats, batch_first=True, padding_value=0.0),
        "speech_lengths": torch.tensor([f.shape[0] for f in feats]),
        "text": pad_sequence(targets, batch_first=True, padding_value=IGNORE_ID),
        "text_lengths": torch.tensor([t.numel() for t in targets]),
    }


class DurationBatchSampler(torch.utils.data.Sampler):
    """Batches filled up to `max_frames` padded fbank frames, from length-sorted buckets.

    Utterances are sorted by length and cut into batches whose padded size (longest
    utterance x batch size) stays within `max_frames`. The batch order is shuffled with
    `seed + epoch`. An utterance longer than `max_frames` forms a batch of its own.
    Under DDP every rank builds these same global batches and trains on its slice of
    each (`sparlora.distributed.shard`).
    """

    def __init__(self, lengths: Sequence[int], max_frames: int, seed: int, shuffle: bool = True):
        if max_frames <= 0:
            raise ValueError(f"max_frames must be positive, got {max_frames}")
        self.lengths = list(lengths)
        self.max_frames = max_frames
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.batches = self._make_batches()

    def _make_batches(self) -> list[list[int]]:
        order = sorted(range(len(self.lengths)), key=lambda i: (self.lengths[i], i))
        batches, current, longest = [], [], 0
        for index in order:
            length = self.lengths[index]
            if current and max(longest, length) * (len(current) + 1) > self.max_frames:
                batches.append(current)
                current, longest = [], 0
            current.append(index)
            longest = max(longest, length)
        if current:
            batches.append(current)
        return batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        batches = list(self.batches)
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(batches)
        return iter(batches)

    def __len__(self) -> int:
        return len(self.batches)


def num_fbank_frames(duration_seconds: float) -> int:
    """Return the approximate number of 10 ms fbank frames of a duration."""
    return max(1, math.floor(duration_seconds / FRAME_SHIFT_SECONDS))
