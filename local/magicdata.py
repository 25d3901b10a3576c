#!/usr/bin/env python3
"""Import MagicData's conversational layout into a staging Kaldi data dir per split.

MagicData ships its conversational corpora (its Sichuan dialect conversational speech
corpus and MagicData-RAMC) as:
  WAV/[<split>/]<recording>.wav   one conversation per file, at any depth below WAV/
  TXT/[<split>/]<recording>.txt   its transcript, one segment per line, tab-separated:
                                  [<start>,<end>]  <speaker>  <gender>,<dialect>  <text>
  SPKINFO.txt, UTTERANCEINFO.txt  not read: speakers and genders come from the TXT lines
Times are in seconds. Transcripts are UTF-8, with or without a BOM.

`corpus.splits` maps a prepared split name to a subfolder of both WAV/ and TXT/ ("." for
all of WAV/ and TXT/), or to a recording list, relative to `corpus.source_dir` and ending
in .tsv, .txt, .lst or .list (MagicData-RAMC's `../DataPartition/train.tsv`). A list has
one recording per line in its first field, with or without the .wav suffix and folders,
and a first line that names no recording of WAV/ or TXT/ is a header, skipped and reported.

Every TXT line becomes one utterance `<speaker>-<recording>-<start ms>-<end ms>`, with the
times zero-padded to 8 digits, so ids sort by speaker, then recording, then start time,
cut from its recording through `segments`. Lines whose speaker is G00000000 (no speaker)
get the per-recording speaker `G00000000_<recording>`, or are skipped when
`corpus.no_speaker` is "skip". Lines whose text is only tags, such as `[*]`, carry no
speech and are skipped. Other tags are removed or kept by `corpus.tags`. The gender
field (女 or 男) goes into spk2gender. A speaker whose lines disagree on the gender gets
no entry, with a warning.

Dropped lines, which count towards audio.max_drop_fraction: fewer than 4 fields, an
invalid time field, start >= end, an invalid speaker id, a repeated utterance, a
transcript without a recording (or a listed recording without either file). A recording
without a transcript is dropped as one entry.

Usage: python local/magicdata.py --source-dir CORPUS --out-dir data/sc/local train=train dev=dev
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Any

from sparlora.corpus import (
    BLANK_LINE,
    DUPLICATE_UTTERANCE,
    NO_SPEECH,
    ImportOptions,
    StagedSplit,
    apply_tag_rule,
    find_files,
    kaldi_safe_id,
    location,
    run_importer_main,
)
from sparlora.kaldi_io import read_lines
from sparlora.prepare import EMPTY_SEGMENT, INVALID_SPEAKER, check_id

logger = logging.getLogger(__name__)

DESCRIPTION = "MagicData's conversational layout (WAV/ and TXT/, one transcript per recording)"
NO_SPEAKER_ID = "G00000000"
LIST_SUFFIXES = (".tsv", ".txt", ".lst", ".list")
GENDERS = {"女": "f", "男": "m"}
MS_DIGITS = 8  # zero-padded milliseconds in utterance ids: up to 27.7 hours

INVALID_LINE = "invalid line"
INVALID_TIME = "invalid time field"
NO_AUDIO_FILE = "no audio file"
NO_TRANSCRIPT_FILE = "no transcript file"
NOT_FOUND = "listed recording not found"
HEADER_LINE = "header line"
SKIPPED_NO_SPEAKER = "no speaker (corpus.no_speaker: skip)"

# [<start>,<end>] in seconds: non-negative decimal numbers in ASCII digits (Kaldi's
# segments parser reads no other digits).
_NUMBER = r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_TIME_FIELD = re.compile(rf"\[\s*{_NUMBER}\s*,\s*{_NUMBER}\s*\]")
_GENDER_SEPARATOR = re.compile(r"[,，]")


def _read_recording_list(path: Path) -> list[tuple[int, str]]:
    """Return (line number, recording id) for each entry of a recording list."""
    # NOTE: the DataPartition/*.tsv format (a header line, then a wav name in the first
    # column) comes from public MagicData-RAMC preparation scripts, not from a copy of
    # the corpus, so it is untested on the real files.
    entries = []
    for number, line in enumerate(read_lines(path), start=1):
        fields = line.split()
        if not fields:
            continue
        name = Path(fields[0].replace("\\", "/")).name
        if name.lower().endswith(".wav"):
            name = name[: -len(".wav")]
        entries.append((number, name))
    return entries


def _recordings_of_split(source_dir: Path, spec: str, staged: StagedSplit):
    """Return (recording id, wav path or None, txt path or None) for the split, sorted by id."""
    wav_root, txt_root = source_dir / "WAV", source_dir / "TXT"
    for root in (wav_root, txt_root):
        if not root.is_dir():
            raise FileNotFoundError(f"{root} not found: a MagicData corpus has WAV/ and TXT/ folders")

    if spec.lower().endswith(LIST_SUFFIXES):
        list_path = Path(spec) if Path(spec).is_absolute() else source_dir / spec
        if not list_path.is_file():
            raise FileNotFoundError(f"recording list {list_path} not found")
        wavs, txts = find_files(wav_root, ".wav"), find_files(txt_root, ".txt")
        recordings = []
        for number, name in _read_recording_list(list_path):
            if name not in wavs and name not in txts:
                if number == 1:
                    # A first line that names no recording is the list's header.
                    staged.skip(location(list_path, number), HEADER_LINE, f"{name!r} names no recording", expected=True)
                    continue
                staged.skip(location(list_path, number), NOT_FOUND, f"no {name}.wav under {wav_root} or {name}.txt under {txt_root}")
                continue
            recordings.append((name, wavs.get(name), txts.get(name)))
        return sorted(recordings, key=lambda entry: entry[0])

    wav_dir, txt_dir = wav_root / spec, txt_root / spec
    for folder in (wav_dir, txt_dir):
        if not folder.is_dir():
            subfolders = sorted(path.name for path in folder.parent.iterdir() if path.is_dir())
            raise FileNotFoundError(
                f"{folder} not found: corpus.splits names a subfolder of WAV/ and TXT/ "
                f"(found: {', '.join(subfolders) or 'none'}), '.' for all of them, or a recording list file"
            )
    wavs, txts = find_files(wav_dir, ".wav"), find_files(txt_dir, ".txt")
    return [(name, wavs.get(name), txts.get(name)) for name in sorted(set(wavs) | set(txts))]


class _Genders:
    """Gender per speaker from the TXT lines; speakers whose lines disagree get none."""

    def __init__(self) -> None:
        self.by_speaker: dict[str, str] = {}
        self.conflicting: set[str] = set()

    def add(self, speaker: str, info_field: str) -> None:
        gender = GENDERS.get(_GENDER_SEPARATOR.split(info_field.strip())[0].strip())
        if gender is None:
            return
        if self.by_speaker.setdefault(speaker, gender) != gender:
            self.conflicting.add(speaker)

    def table(self, speakers: set[str]) -> dict[str, str]:
        for speaker in sorted(self.conflicting & speakers):
            logger.warning("speaker %s has lines marked both 女 and 男, so spk2gender leaves it out", speaker)
        return {spk: gender for spk, gender in self.by_speaker.items() if spk in speakers and spk not in self.conflicting}


def _import_transcript(
    txt_path: Path, recording: str, options: ImportOptions, staged: StagedSplit, genders: _Genders, first_line: dict[str, str]
) -> None:
    """Add the utterances of one TXT file to `staged`; `first_line` maps utterance ids to where they were first seen."""
    for number, line in enumerate(read_lines(txt_path, lone_cr_ends_line=True), start=1):
        where = location(txt_path, number)
        if not line.strip():
            staged.skip(where, BLANK_LINE, expected=True)
            continue
        fields = line.rstrip("\t").split("\t")
        if len(fields) != 4:
            detail = f"expected [start,end], speaker, gender and text separated by 3 tabs, got {len(fields)} field(s): {line.strip()!r}"
            staged.skip(where, INVALID_LINE, detail)
            continue
        time_field, speaker, info_field = (value.strip() for value in fields[:3])
        text = fields[3]

        match = _TIME_FIELD.fullmatch(time_field)
        if match is None:
            staged.skip(where, INVALID_TIME, f"expected [start,end] in seconds, got {time_field!r}")
            continue
        start_field, end_field = match.group(1), match.group(2)
        start, end = float(start_field), float(end_field)
        if start >= end:
            staged.skip(where, EMPTY_SEGMENT, f"start {start_field} s, end {end_field} s")
            continue

        if speaker == NO_SPEAKER_ID:
            if options.no_speaker == "skip":
                staged.skip(where, SKIPPED_NO_SPEAKER, expected=True)
                continue
            speaker = f"{NO_SPEAKER_ID}_{recording}"
        reason = check_id(speaker)
        if reason is not None:
            staged.skip(where, INVALID_SPEAKER, reason)
            continue

        transcript = apply_tag_rule(text, options.tags)
        if transcript is None:
            staged.skip(where, NO_SPEECH, f"text is only tags: {text.strip()!r}", expected=True)
            continue

        utterance = f"{speaker}-{recording}-{round(start * 1000):0{MS_DIGITS}d}-{round(end * 1000):0{MS_DIGITS}d}"
        if utterance in first_line:
            staged.skip(where, DUPLICATE_UTTERANCE, f"{utterance}, first on {first_line[utterance]}")
            continue
        first_line[utterance] = where
        staged.text[utterance] = transcript
        staged.utt2spk[utterance] = speaker
        staged.segments[utterance] = f"{recording} {start_field} {end_field}"
        genders.add(speaker, info_field)


def import_split(source_dir: Path, spec: Any, options: ImportOptions) -> StagedSplit:
    """Read one split of a MagicData conversational corpus (see the module doc).

    Raises FileNotFoundError for a missing WAV/ or TXT/ folder, split subfolder or
    recording list, and ValueError for a transcript that is not UTF-8 (naming the file
    and line) or for two recordings whose names give the same id.
    """
    source_dir = Path(source_dir)
    staged = StagedSplit(utt2spk={}, segments={})
    genders = _Genders()
    first_line: dict[str, str] = {}
    names_by_id: dict[str, str] = {}

    for name, wav_path, txt_path in _recordings_of_split(source_dir, str(spec), staged):
        recording = kaldi_safe_id(name)
        if names_by_id.setdefault(recording, name) != name:
            raise ValueError(f"recordings {names_by_id[recording]!r} and {name!r} both become the id {recording!r}; rename one")
        if txt_path is None:
            staged.skip(location(wav_path), NO_TRANSCRIPT_FILE, f"no {name}.txt under TXT/")
            continue
        if wav_path is None:
            for number, line in enumerate(read_lines(txt_path), start=1):
                if line.strip():
                    staged.skip(location(txt_path, number), NO_AUDIO_FILE, f"no {name}.wav under WAV/")
                else:
                    staged.skip(location(txt_path, number), BLANK_LINE, expected=True)
            continue
        staged.wav[recording] = str(wav_path.absolute())
        _import_transcript(txt_path, recording, options, staged, genders, first_line)

    staged.spk2gender = genders.table(set(staged.utt2spk.values())) or None
    return staged


def main(argv: list[str] | None = None) -> int:
    return run_importer_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
