#!/usr/bin/env python3
"""Import AISHELL-1's layout into a staging Kaldi data dir per split.

AISHELL-1 (data_aishell/) ships:
  transcript/aishell_transcript_v0.8.txt   <utterance> <text>, one file for all splits;
                                           the text may have spaces between words
  wav/<split>/<speaker>/<utterance>.wav    the recordings, one utterance each

`corpus.transcript` is the transcript file, relative to `corpus.source_dir`, and
`corpus.splits` maps a prepared split name to a subfolder of wav/. The speaker is the
folder that contains the wav. A wav directly in wav/<split>/ is its own speaker.
Transcripts are kept as written (stage 1 normalizes them), except that tags are removed
or kept by `corpus.tags`, and a transcript that is only tags is skipped.

A wav without a transcript is passed on to stage 0, which drops it as "no transcript".
A transcript line is matched to a split through its wav, so a line whose wav is nowhere
under wav/ belongs to no split. Every split's report lists such lines as skipped
("transcript without audio"), and they do not count towards audio.max_drop_fraction. A
repeated transcript line is dropped, and the first one is kept.

Usage: python local/aishell.py --source-dir data_aishell --transcript transcript/aishell_transcript_v0.8.txt --out-dir data/aishell/local train=train dev=dev test=test
"""

from __future__ import annotations

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
    location,
    run_importer_main,
)
from sparlora.kaldi_io import read_lines
from sparlora.prepare import INVALID_ID, check_id

DESCRIPTION = "AISHELL-1's layout (a transcript file and wav/<split>/<speaker>/<utterance>.wav)"
NO_AUDIO = "transcript without audio"


def _read_transcript(path: Path, staged: StagedSplit) -> dict[str, tuple[int, str]]:
    """Return utterance -> (line number, text); blank and repeated lines go into `staged.skipped`."""
    transcripts: dict[str, tuple[int, str]] = {}
    for number, line in enumerate(read_lines(path), start=1):
        fields = line.strip().split(maxsplit=1)
        if not fields:
            staged.skip(location(path, number), BLANK_LINE, expected=True)
            continue
        utterance = fields[0]
        if utterance in transcripts:
            staged.skip(location(path, number), DUPLICATE_UTTERANCE, f"{utterance}, first on line {transcripts[utterance][0]}")
            continue
        transcripts[utterance] = (number, fields[1] if len(fields) > 1 else "")
    return transcripts


def import_split(source_dir: Path, spec: Any, options: ImportOptions) -> StagedSplit:
    """Read one split of an AISHELL-1 layout corpus (see the module doc).

    Raises FileNotFoundError for a missing transcript or split folder, and ValueError
    when corpus.transcript is unset, the transcript is not UTF-8 (naming the file and
    line), or two wavs have the same name.
    """
    source_dir = Path(source_dir)
    if not options.transcript:
        raise ValueError("corpus.transcript is not set: set it to the transcript file, e.g. transcript/aishell_transcript_v0.8.txt")
    transcript_path = Path(options.transcript)
    if not transcript_path.is_absolute():
        transcript_path = source_dir / transcript_path
    if not transcript_path.is_file():
        raise FileNotFoundError(f"transcript {transcript_path} not found: set corpus.transcript relative to corpus.source_dir")
    wav_root = source_dir / "wav"
    split_dir = wav_root / str(spec)
    if not split_dir.is_dir():
        found = sorted(path.name for path in wav_root.iterdir() if path.is_dir()) if wav_root.is_dir() else []
        raise FileNotFoundError(
            f"{split_dir} not found: corpus.splits names subfolders of {wav_root} (found: {', '.join(found) or 'none'})"
        )

    staged = StagedSplit(utt2spk={})
    transcripts = _read_transcript(transcript_path, staged)
    all_wavs = find_files(wav_root, ".wav")
    for utterance, path in sorted(all_wavs.items()):
        if split_dir not in path.parents:
            continue
        reason = check_id(utterance)
        if reason is not None:
            staged.skip(location(path), INVALID_ID, reason)
            continue
        staged.wav[utterance] = str(path.absolute())
        staged.utt2spk[utterance] = utterance if path.parent == split_dir else path.parent.name
        if utterance not in transcripts:
            continue
        number, text = transcripts[utterance]
        transcript = apply_tag_rule(text, options.tags)
        if transcript is None:
            staged.skip(location(transcript_path, number), NO_SPEECH, f"text is only tags: {text.strip()!r}", expected=True)
            del staged.wav[utterance], staged.utt2spk[utterance]
            continue
        staged.text[utterance] = transcript

    for utterance, (number, _) in sorted(transcripts.items(), key=lambda item: item[1][0]):
        if utterance not in all_wavs:
            staged.skip(location(transcript_path, number), NO_AUDIO, f"no {utterance}.wav under {wav_root}", expected=True)
    return staged


def main(argv: list[str] | None = None) -> int:
    return run_importer_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
