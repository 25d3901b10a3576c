#!/usr/bin/env python3
"""Import KeSpeech's ASR task layout into a staging Kaldi data dir per split.

KeSpeech ships one Kaldi-style data dir per part under `Tasks/ASR/`:
  Tasks/ASR/<part>/wav.scp         <utterance> <path>; a relative path is relative to the
                                   corpus root (Audio/...), as lhotse's KeSpeech recipe
                                   reads it; an absolute path or a `cmd |` pipe is kept
  Tasks/ASR/<part>/text            <utterance> <transcript>, with <SPOKEN_NOISE> tags
  Tasks/ASR/<part>/utt2spk         <utterance> <speaker>
  Tasks/ASR/<part>/utt2subdialect  <utterance> <subdialect>, needed only for a filter
The parts are train_phase1, train_phase2, dev_phase1, dev_phase2 and test.

`corpus.splits` maps a prepared split name to one part or a list of parts, whose
utterance ids must not repeat. `corpus.subdialects` keeps only the utterances of the
listed subdialects, compared case-insensitively. Every listed name must occur in each
split, so a misspelt name is an error that lists the names found. Utterances of other
subdialects are skipped as expected, and utterances without a subdialect are dropped.
Tags are removed or kept by `corpus.tags`, and a transcript that is only tags is
skipped. Utterances missing from wav.scp, text or utt2spk are passed on to stage 0,
which drops and reports them.

Usage: python local/kespeech.py --source-dir KeSpeech --out-dir data/ks/local --subdialect Southwestern train=train_phase1
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

from omegaconf import ListConfig

from sparlora.corpus import (
    NO_SPEECH,
    ImportOptions,
    NumberedRow,
    StagedSplit,
    apply_tag_rule,
    audio_source,
    location,
    read_numbered_table,
    run_importer_main,
)
from sparlora.prepare import INVALID_ID, check_id

DESCRIPTION = "KeSpeech's layout (Tasks/ASR/<part>/ with wav.scp, text, utt2spk, utt2subdialect)"
TABLES = ("wav.scp", "text", "utt2spk")
SUBDIALECT_TABLE = "utt2subdialect"
NO_SUBDIALECT = "no subdialect"
OTHER_SUBDIALECT = "subdialect not selected"


def _parts(spec: Any) -> list[str]:
    if isinstance(spec, (list, tuple, ListConfig)):
        parts = [str(part) for part in spec]
    else:
        parts = [str(spec)]
    if not parts:
        raise ValueError("the split lists no KeSpeech part: name one or more parts under Tasks/ASR/")
    return parts


def _read_part_tables(
    tasks_dir: Path, part: str, table_names: tuple[str, ...], staged: StagedSplit
) -> dict[str, dict[str, tuple[Path, NumberedRow]]]:
    """Return table name -> utterance -> (file, row) for one part."""
    part_dir = tasks_dir / part
    if not part_dir.is_dir():
        found = sorted(path.name for path in tasks_dir.iterdir() if path.is_dir()) if tasks_dir.is_dir() else []
        raise FileNotFoundError(
            f"KeSpeech part {part_dir} not found: corpus.splits names parts under {tasks_dir} "
            f"(found: {', '.join(found) or 'none'})"
        )
    tables = {}
    for name in table_names:
        path = part_dir / name
        if not path.is_file():
            needed = " (needed because corpus.subdialects is set)" if name == SUBDIALECT_TABLE else ""
            raise FileNotFoundError(f"{path} not found{needed}")
        tables[name] = {row.key: (path, row) for row in read_numbered_table(path, staged)}
    return tables


def _merge_parts(parts: list[str], tasks_dir: Path, table_names: tuple[str, ...], staged: StagedSplit):
    """Return the tables of all parts, merged; an utterance id in two parts raises ValueError."""
    merged: dict[str, dict[str, tuple[Path, NumberedRow]]] = {name: {} for name in table_names}
    for part in parts:
        for name, rows in _read_part_tables(tasks_dir, part, table_names, staged).items():
            for utterance, (path, row) in rows.items():
                if utterance in merged[name]:
                    first_path, first_row = merged[name][utterance]
                    raise ValueError(
                        f"utterance {utterance!r} is in {first_path}:{first_row.line} and {path}:{row.line}; "
                        "a split's parts must not share utterance ids"
                    )
                merged[name][utterance] = (path, row)
    return merged


def _check_subdialects(requested: tuple[str, ...], subdialects: dict[str, tuple[Path, NumberedRow]], parts: list[str]) -> None:
    counts = Counter(row.value.strip() for _, row in subdialects.values())
    available = {name.casefold() for name in counts}
    missing = [name for name in requested if name.casefold() not in available]
    if missing:
        found = ", ".join(f"{name} ({count})" for name, count in sorted(counts.items())) or "none"
        raise ValueError(
            f"corpus.subdialects names {', '.join(missing)}, which no utterance of {', '.join(parts)} has; "
            f"subdialects found, with utterance counts: {found}"
        )


def import_split(source_dir: Path, spec: Any, options: ImportOptions) -> StagedSplit:
    """Read one split of KeSpeech (see the module doc).

    Raises FileNotFoundError for a missing part or table, and ValueError for a table
    that is not UTF-8 or repeats a key, an utterance id in two parts, or a requested
    subdialect that never occurs.
    """
    source_dir = Path(source_dir)
    tasks_dir = source_dir / "Tasks" / "ASR"
    parts = _parts(spec)
    table_names = TABLES + ((SUBDIALECT_TABLE,) if options.subdialects else ())
    staged = StagedSplit(utt2spk={})
    tables = _merge_parts(parts, tasks_dir, table_names, staged)
    wav, text, utt2spk = tables["wav.scp"], tables["text"], tables["utt2spk"]

    selected = None
    if options.subdialects:
        _check_subdialects(options.subdialects, tables[SUBDIALECT_TABLE], parts)
        selected = {name.casefold() for name in options.subdialects}

    for utterance in sorted(set(wav) | set(text)):
        path, row = text[utterance] if utterance in text else wav[utterance]
        reason = check_id(utterance)
        if reason is not None:
            staged.skip(location(path, row.line), INVALID_ID, reason)
            continue
        if selected is not None:
            if utterance not in tables[SUBDIALECT_TABLE]:
                staged.skip(location(path, row.line), NO_SUBDIALECT, f"{utterance} is not in {SUBDIALECT_TABLE}")
                continue
            subdialect_path, subdialect_row = tables[SUBDIALECT_TABLE][utterance]
            subdialect = subdialect_row.value.strip()
            if subdialect.casefold() not in selected:
                staged.skip(location(subdialect_path, subdialect_row.line), OTHER_SUBDIALECT, f"{utterance}: {subdialect}", expected=True)
                continue

        if utterance in text:
            transcript = apply_tag_rule(row.value, options.tags)
            if transcript is None:
                staged.skip(location(path, row.line), NO_SPEECH, f"text is only tags: {row.value.strip()!r}", expected=True)
                continue
            staged.text[utterance] = transcript
        if utterance in wav:
            staged.wav[utterance] = audio_source(wav[utterance][1].value, source_dir)
        if utterance in utt2spk:
            staged.utt2spk[utterance] = utt2spk[utterance][1].value.strip()
    return staged


def main(argv: list[str] | None = None) -> int:
    return run_importer_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
