#!/usr/bin/env python3
"""Import FunASR jsonl manifests into a staging Kaldi data dir per split.

A manifest has one JSON object per line, as FunASR's training reads it:
  {"key": <utterance>, "source": <audio>, "target": <transcript>,
   "source_len": <frames>, "target_len": <tokens>}
source_len and target_len are optional and not read: stage 2 computes them again. The
manifests that stage 2 writes (data.jsonl) add "start" and "end" in seconds, null for a
whole recording, and read back through this importer. "source" is a file path, relative
to `corpus.source_dir` unless absolute, or a Kaldi pipe (`cmd args |`).

`corpus.splits` maps a prepared split name to a manifest file, relative to
`corpus.source_dir` unless absolute. When any utterance of a split has start and end,
the staging dir gets `segments`: each distinct source becomes one recording, named after
its file (with -2, -3, ... for repeated names), and an utterance without times covers
its whole recording (end -1). Otherwise each utterance is its own recording. Manifests
carry no speakers, so every utterance is its own speaker.

These lines are dropped and count towards audio.max_drop_fraction: invalid JSON, a
missing or non-string key, source or target, and a key that is not a valid Kaldi id.
So are lines with invalid or reversed start and end times, and a repeated key, of which
the first line is kept. Tags in targets are removed or kept by
`corpus.tags`, and a target that is only tags is skipped.

Usage: python local/jsonl.py --source-dir manifests --out-dir data/mine/local train=train.jsonl dev=dev.jsonl
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from sparlora.audio import END_OF_RECORDING
from sparlora.corpus import (
    BLANK_LINE,
    DUPLICATE_UTTERANCE,
    NO_SPEECH,
    ImportOptions,
    StagedSplit,
    apply_tag_rule,
    audio_source,
    kaldi_safe_id,
    location,
    run_importer_main,
)
from sparlora.kaldi_io import read_lines
from sparlora.prepare import EMPTY_SEGMENT, INVALID_ID, INVALID_SEGMENT, check_id

DESCRIPTION = "the FunASR jsonl layout (manifests with one JSON object per line: key, source, target)"
REQUIRED_FIELDS = ("key", "source", "target")
INVALID_JSON = "invalid JSON"
MISSING_FIELD = "missing field"
INVALID_FIELD = "invalid field"


@dataclass(frozen=True)
class _Entry:
    key: str
    source: str
    target: str
    start: float | None  # seconds; None for a whole recording
    end: float | None  # seconds; END_OF_RECORDING for "to the end"


def _format_time(seconds: float) -> str:
    """Format seconds for `segments` in plain decimal notation, to the nanosecond."""
    if seconds == END_OF_RECORDING:
        return "-1"
    return f"{seconds:.9f}".rstrip("0").rstrip(".")


def _parse_times(record: dict) -> tuple[float | None, float | None] | tuple[str, str]:
    """Return (start, end) in seconds, or (reason, detail) when they are unusable."""
    start, end = record.get("start"), record.get("end")
    if start is None and end is None:
        return None, None
    if start is None or end is None:
        return INVALID_SEGMENT, f"start {start!r} and end {end!r}: give both or neither"
    for name, value in (("start", start), ("end", end)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return INVALID_SEGMENT, f"{name} {value!r} is not a finite number of seconds"
    if start < 0:
        return INVALID_SEGMENT, f"start {start} s is negative"
    if end != END_OF_RECORDING and end <= start:
        return EMPTY_SEGMENT, f"start {start} s, end {end} s"
    return float(start), float(end)


def _parse_line(line: str) -> _Entry | tuple[str, str]:
    """Return the entry of one manifest line, or (reason, detail) when it is unusable."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        return INVALID_JSON, str(error)
    if not isinstance(record, dict):
        return INVALID_JSON, f"expected a JSON object, got {type(record).__name__}"
    for name in REQUIRED_FIELDS:
        if name not in record:
            return MISSING_FIELD, f"no {name!r}; a line needs {', '.join(REQUIRED_FIELDS)}"
        if not isinstance(record[name], str):
            return INVALID_FIELD, f"{name!r} is {record[name]!r}, expected a string"
    times = _parse_times(record)
    if isinstance(times[0], str):
        return times
    return _Entry(record["key"], record["source"], record["target"], *times)


def _recording_ids(sources: list[str]) -> dict[str, str]:
    """Name each distinct source after its file name, adding -2, -3, ... to repeated names."""
    ids: dict[str, str] = {}
    used: set[str] = set()
    for source in sources:
        if source in ids:
            continue
        name = source.rstrip().rstrip("|").split()[0] if source.rstrip().endswith("|") else source
        base = kaldi_safe_id(PurePosixPath(name.replace("\\", "/")).stem)
        candidate, number = base, 1
        while candidate in used:
            number += 1
            candidate = f"{base}-{number}"
        used.add(candidate)
        ids[source] = candidate
    return ids


def import_split(source_dir: Path, spec: Any, options: ImportOptions) -> StagedSplit:
    """Read one split from a jsonl manifest (see the module doc).

    Raises FileNotFoundError for a missing manifest and ValueError for one that is not
    UTF-8 (naming the file and line).
    """
    source_dir = Path(source_dir)
    path = Path(str(spec))
    if not path.is_absolute():
        path = source_dir / path
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} not found: corpus.splits names jsonl files relative to corpus.source_dir")

    staged = StagedSplit()
    entries: list[_Entry] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(read_lines(path), start=1):
        where = location(path, number)
        if not line.strip():
            staged.skip(where, BLANK_LINE, expected=True)
            continue
        entry = _parse_line(line)
        if not isinstance(entry, _Entry):
            staged.skip(where, *entry)
            continue
        reason = check_id(entry.key)
        if reason is not None:
            staged.skip(where, INVALID_ID, reason)
            continue
        if entry.key in first_line:
            staged.skip(where, DUPLICATE_UTTERANCE, f"{entry.key}, first on line {first_line[entry.key]}")
            continue
        first_line[entry.key] = number
        target = apply_tag_rule(entry.target, options.tags)
        if target is None:
            staged.skip(where, NO_SPEECH, f"target is only tags: {entry.target.strip()!r}", expected=True)
            continue
        entries.append(_Entry(entry.key, audio_source(entry.source, source_dir), target, entry.start, entry.end))

    staged.text = {entry.key: entry.target for entry in entries}
    if not any(entry.start is not None for entry in entries):
        staged.wav = {entry.key: entry.source for entry in entries}
        return staged

    recordings = _recording_ids([entry.source for entry in entries])
    staged.wav = {recording: source for source, recording in recordings.items()}
    staged.segments = {}
    for entry in entries:
        start = "0" if entry.start is None else _format_time(entry.start)
        end = "-1" if entry.end is None else _format_time(entry.end)
        staged.segments[entry.key] = f"{recordings[entry.source]} {start} {end}"
    return staged


def main(argv: list[str] | None = None) -> int:
    return run_importer_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
