"""Corpus importers: convert a corpus in its own layout into staging Kaldi data dirs for stage 0.

Each layout other than "kaldi" has an importer module in the recipe's `local/` folder
(`local/<layout>.py`). It reads one split of the corpus, which it never writes to, and
returns a `StagedSplit`. That is the tables of a Kaldi data dir (wav.scp, text, utt2spk,
and segments and spk2gender where the corpus has them), plus every input line it left
out as a `SkippedLine` with its location and reason. `prepare_imported_split` writes the
tables to the staging dir `<data_dir>/local/<split>/` and runs
`sparlora.prepare.prepare_kaldi_dir` on it, which checks the audio and writes the
prepared dir `<data_dir>/<split>/` with the skipped lines in its prep_report.txt.

An importer module defines:
  DESCRIPTION   the layout it reads, in one line, for error messages
  import_split(source_dir: Path, spec, options: ImportOptions) -> StagedSplit
where `spec` is the value of the split in `corpus.splits`.

Settings, all in the `corpus` config section:
  tags         "remove" (default) or "keep": event and noise tags such as [*], [+],
               [LAUGHTER], [SONANT], [MUSIC] and <SPOKEN_NOISE> in transcripts
  no_speaker   "placeholder" (default) or "skip": lines without a speaker (MagicData)
  subdialects  null (default: all) or a list of subdialect names to keep (KeSpeech)
  transcript   the transcript file, relative to source_dir (AISHELL)
A line whose text is only tags carries no speech. It is skipped under either tag rule.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import re
import sys
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

from omegaconf import OmegaConf

from sparlora.kaldi_io import atomic_write_text, read_lines, write_table
from sparlora.prepare import (
    OUTPUT_FILES,
    REPORT_NAME,
    STAGE1_FILES,
    DataPrepError,
    PrepReport,
    SkippedLine,
    prepare_kaldi_dir,
)

logger = logging.getLogger(__name__)

IMPORTERS_DIR = Path(__file__).resolve().parents[1] / "local"
IMPORTED_LAYOUTS = ("magicdata", "kespeech", "aishell", "jsonl")
STAGING_DIR_NAME = "local"  # staging dirs are <data_dir>/local/<split>/
SKIPPED_FILE = "import_skipped.txt"
STAGING_FILES = ("wav.scp", "text", "utt2spk", "segments", "spk2gender", SKIPPED_FILE)
TAG_RULES = ("remove", "keep")
NO_SPEAKER_RULES = ("placeholder", "skip")

# Skip and drop reasons shared by the importers.
BLANK_LINE = "blank line"
NO_SPEECH = "no speech"
DUPLICATE_UTTERANCE = "duplicate utterance id"

# Event and noise tags: MagicData's [*] [+] [++], bracketed words of two or more Latin
# letters, digits or underscores in either case ([LAUGHTER], [laughter], [NOISE1]), and
# angle-bracketed ones such as KeSpeech's <SPOKEN_NOISE> and <unk>.
TAG = re.compile(r"\[(?:\*|\++|[A-Za-z][A-Za-z0-9_]+)\]|<[A-Za-z][A-Za-z0-9_]+>")
# Kaldi tables separate the key from the value by ASCII spaces or tabs only.
_TABLE_LINE = re.compile(r"([^ \t]+)(?:[ \t]+(.*))?")


@dataclass(frozen=True)
class ImportOptions:
    """Importer settings from the `corpus` config section (see the module doc)."""

    tags: str = "remove"
    no_speaker: str = "placeholder"
    subdialects: tuple[str, ...] | None = None
    transcript: str | None = None

    def __post_init__(self) -> None:
        if self.tags not in TAG_RULES:
            raise DataPrepError(f"invalid corpus.tags {self.tags!r}: expected one of {', '.join(TAG_RULES)}")
        if self.no_speaker not in NO_SPEAKER_RULES:
            raise DataPrepError(
                f"invalid corpus.no_speaker {self.no_speaker!r}: expected one of {', '.join(NO_SPEAKER_RULES)}"
            )
        if self.subdialects is not None and not self.subdialects:
            raise DataPrepError("corpus.subdialects is an empty list: list the subdialects to keep, or set null to keep all")

    @classmethod
    def from_config(cls, corpus_cfg: Any) -> "ImportOptions":
        subdialects = OmegaConf.select(corpus_cfg, "subdialects", default=None)
        if isinstance(subdialects, str):
            subdialects = [subdialects]
        transcript = OmegaConf.select(corpus_cfg, "transcript", default=None)
        return cls(
            tags=str(OmegaConf.select(corpus_cfg, "tags", default="remove")),
            no_speaker=str(OmegaConf.select(corpus_cfg, "no_speaker", default="placeholder")),
            subdialects=None if subdialects is None else tuple(str(name) for name in subdialects),
            transcript=None if transcript is None else str(transcript),
        )


@dataclass
class StagedSplit:
    """The Kaldi tables an importer made from one split, and the input lines it left out.

    `segments` values are `<recording> <start> <end>` in seconds, as in a Kaldi segments
    file. `spk2gender` values are "m" or "f". None means the table is not written.
    """

    wav: dict[str, str] = field(default_factory=dict)
    text: dict[str, str] = field(default_factory=dict)
    utt2spk: dict[str, str] | None = None
    segments: dict[str, str] | None = None
    spk2gender: dict[str, str] | None = None
    skipped: list[SkippedLine] = field(default_factory=list)

    def skip(self, location: str, reason: str, detail: str = "", expected: bool = False) -> None:
        self.skipped.append(SkippedLine(location, reason, detail, expected))


@dataclass(frozen=True)
class NumberedRow:
    """One non-blank line of a Kaldi-style table, with its 1-based line number."""

    line: int
    key: str
    value: str


def apply_tag_rule(text: str, rule: str) -> str | None:
    """Return `text` with tags removed or kept by `rule`, or None when it holds only tags.

    Removing a tag leaves a space in its place, then runs of spaces collapse to one, so
    words on both sides stay apart. Text without any tag is returned stripped, even when
    empty: stage 0 drops an empty transcript and counts it.
    """
    stripped = text.strip()
    if not TAG.search(stripped):
        return stripped
    without_tags = " ".join(TAG.sub(" ", stripped).split())
    if not without_tags:
        return None
    return without_tags if rule == "remove" else stripped


def location(path: Path, line: int | None = None) -> str:
    """Format where an input line is, as `<path>:<line>` or the path alone."""
    return f"{path}:{line}" if line is not None else str(path)


def read_numbered_table(path: Path, staged: StagedSplit) -> list[NumberedRow]:
    """Read a UTF-8 Kaldi-style table (`<key> <value>`) with line numbers.

    Blank lines are recorded in `staged` as expected skips. A key that appears twice
    raises ValueError naming the file and both lines, as `kaldi_io.read_table` does. A
    line that is not valid UTF-8 raises ValueError naming the file and the line.
    """
    rows = []
    first_line: dict[str, int] = {}
    for number, text in enumerate(read_lines(path), start=1):
        stripped = text.strip(" \t")
        if not stripped:
            staged.skip(location(path, number), BLANK_LINE, expected=True)
            continue
        match = _TABLE_LINE.fullmatch(stripped)
        key, value = match.group(1), match.group(2) or ""
        if key in first_line:
            raise ValueError(
                f"{path}:{number}: duplicate key {key!r}, first seen on line {first_line[key]}; each key must appear once"
            )
        first_line[key] = number
        rows.append(NumberedRow(number, key, value))
    return rows


def kaldi_safe_id(name: str) -> str:
    """Return `name` with every character that a Kaldi id cannot contain replaced by "_".

    Those are whitespace, "/" and control, format, surrogate, private-use or unassigned
    characters, the ones `sparlora.prepare.check_id` rejects.
    """
    characters = []
    for char in name:
        invalid = char == "/" or char.isspace() or unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn")
        characters.append("_" if invalid else char)
    safe = "".join(characters)
    return "_" if safe in ("", ".", "..") else safe


def audio_source(value: str, source_dir: Path) -> str:
    """Return a wav.scp value with a relative path made absolute from `source_dir`.

    Absolute paths and Kaldi pipes (`cmd args |`) are returned unchanged.
    """
    value = value.strip()
    if value.endswith("|") or os.path.isabs(value):
        return value
    return os.path.abspath(source_dir / value)


def find_files(folder: Path, suffix: str) -> dict[str, Path]:
    """Map the stem of every file below `folder` whose name ends in `suffix` (any case) to its path.

    Files named `._*` (macOS metadata) are left out and counted in the log. Raises
    ValueError naming both files when two files share a stem, because the stem is the
    recording or utterance id.
    """
    found: dict[str, Path] = {}
    apple_double = 0
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or not path.name.lower().endswith(suffix):
            continue
        if path.name.startswith("._"):
            # macOS writes these resource-fork files beside every file it copies; they hold no audio or text.
            apple_double += 1
            continue
        stem = path.name[: -len(suffix)]
        if stem in found:
            raise ValueError(f"two files with the id {stem!r}: {found[stem]} and {path}; rename or remove one")
        found[stem] = path
    if apple_double:
        logger.info("%s: left out %d macOS metadata files named ._*", folder, apple_double)
    return found


def write_staging_dir(out_dir: Path, staged: StagedSplit) -> None:
    """Write the staged tables, sorted by key, and the skipped lines to `out_dir`.

    Tables the split does not have (segments, spk2gender, utt2spk) are removed, so no
    file of an earlier run is left behind. SKIPPED_FILE has one line per skipped input
    line: `expected` or `dropped`, the location, the reason and the detail, tab-separated.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = {
        "wav.scp": staged.wav,
        "text": staged.text,
        "utt2spk": staged.utt2spk,
        "segments": staged.segments,
        "spk2gender": staged.spk2gender,
    }
    for name, table in tables.items():
        if table is None:
            (out_dir / name).unlink(missing_ok=True)
        else:
            write_table(out_dir / name, sorted(table.items()))

    lines = [
        "\t".join(("expected" if skip.expected else "dropped", skip.location, skip.reason, skip.detail)) + "\n"
        for skip in staged.skipped
    ]
    atomic_write_text(out_dir / SKIPPED_FILE, "".join(lines))


def load_importer(layout: str) -> ModuleType:
    """Load the importer module `local/<layout>.py` of the recipe by its path.

    Loading by path works from any working directory, without the recipe root on
    sys.path. The module is cached in sys.modules as `sparlora_importer_<layout>`.
    """
    if layout not in IMPORTED_LAYOUTS:
        raise DataPrepError(f"no importer for corpus.layout {layout!r}: importers exist for {', '.join(IMPORTED_LAYOUTS)}")
    name = f"sparlora_importer_{layout}"
    if name in sys.modules:
        return sys.modules[name]
    path = IMPORTERS_DIR / f"{layout}.py"
    if not path.is_file():
        raise DataPrepError(f"importer {path} not found: the recipe checkout is incomplete")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _overlaps(first: Path, second: Path) -> bool:
    first, second = first.resolve(), second.resolve()
    return first == second or first in second.parents or second in first.parents


def check_outside_corpus(source_dir: Path, targets: Sequence[Path]) -> None:
    """Raise DataPrepError if a dir that the import writes overlaps the corpus dir."""
    for target in targets:
        if _overlaps(target, source_dir):
            raise DataPrepError(
                f"{target} and the corpus dir {source_dir} overlap: stage 0 never writes into the corpus, "
                "so set data_dir or corpus.source_dir so that neither contains the other"
            )


def check_output_dirs(source_dir: Path, data_dir: Path, splits: Sequence[str]) -> None:
    """Raise DataPrepError unless every staging and prepared dir lies outside the corpus."""
    if STAGING_DIR_NAME in splits:
        raise DataPrepError(
            f"corpus.splits names a split {STAGING_DIR_NAME!r}, but {data_dir / STAGING_DIR_NAME} contains the "
            "staging dirs of the corpus importers; rename that split"
        )
    targets = [data_dir / STAGING_DIR_NAME / split for split in splits] + [data_dir / split for split in splits]
    check_outside_corpus(source_dir, targets)


def _write_failure(staging: Path, dst: Path, split: str, source: Path, failure: str) -> None:
    """Remove the split's staging and prepared files and write a report with the reason the import failed."""
    for name in STAGING_FILES:
        (staging / name).unlink(missing_ok=True)
    for name in OUTPUT_FILES + STAGE1_FILES:
        (dst / name).unlink(missing_ok=True)
    if dst.is_dir():
        atomic_write_text(dst / REPORT_NAME, f"split: {split}\nsource: {source}\nfailed: {failure}\n")


def prepare_imported_split(
    importer: ModuleType,
    source_dir: Path,
    spec: Any,
    options: ImportOptions,
    data_dir: Path,
    split: str,
    audio_cfg: Any,
    max_drop_fraction: float,
) -> PrepReport:
    """Import one split into its staging dir, then check it and write the prepared dir.

    Raises DataPrepError when the import fails (a missing folder or file, a transcript
    that is not UTF-8, two files with one id) or when stage 0 rejects the split. An
    import failure also removes the split's earlier staging and prepared files, as a
    stage-0 failure removes the prepared ones.
    """
    staging = data_dir / STAGING_DIR_NAME / split
    dst = data_dir / split
    try:
        staged = importer.import_split(source_dir, spec, options)
        write_staging_dir(staging, staged)
    except (ValueError, OSError) as error:
        failure = f"split {split}: cannot import {spec} from {source_dir} ({importer.DESCRIPTION}): {error}"
        _write_failure(staging, dst, split, source_dir, failure)
        raise DataPrepError(failure) from error
    return prepare_kaldi_dir(staging, dst, audio_cfg, max_drop_fraction, skipped_at_import=staged.skipped)


def _log_skipped(split: str, skipped: Sequence[SkippedLine]) -> None:
    counts = Counter((skip.expected, skip.reason) for skip in skipped)
    for (expected, reason), count in sorted(counts.items()):
        kind = "skipped" if expected else "dropped"
        logger.info("split %s: %d input line(s) %s at import because %s", split, count, kind, reason)


def run_importer_main(importer: ModuleType, argv: Sequence[str] | None = None) -> int:
    """Run an importer from the command line: write one staging dir per split, then exit.

    Stage 0 runs the importers itself (`bash run.sh --stage 0`). This entry point only
    shows what an importer makes of a corpus, without checking the audio.
    """
    parser = argparse.ArgumentParser(description=f"Import a corpus in {importer.DESCRIPTION} into staging Kaldi data dirs.")
    parser.add_argument("--source-dir", required=True, type=Path, help="corpus root (corpus.source_dir); only read")
    parser.add_argument("--out-dir", required=True, type=Path, help="writes one staging data dir per split here")
    parser.add_argument("--tags", default="remove", choices=TAG_RULES, help="event and noise tags in transcripts")
    parser.add_argument("--no-speaker", default="placeholder", choices=NO_SPEAKER_RULES, help="lines without a speaker")
    parser.add_argument("--subdialect", action="append", help="subdialect to keep; repeat for more (default: all)")
    parser.add_argument("--transcript", help="transcript file relative to --source-dir (AISHELL layout)")
    parser.add_argument("splits", nargs="+", metavar="NAME=SPEC", help="split name and its value in corpus.splits")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [%(name)s] %(message)s")

    options = ImportOptions(
        tags=args.tags,
        no_speaker=args.no_speaker,
        subdialects=tuple(args.subdialect) if args.subdialect else None,
        transcript=args.transcript,
    )
    pairs = []
    for item in args.splits:
        name, separator, spec = item.partition("=")
        if not separator or not name or not spec:
            parser.error(f"invalid split {item!r}: expected NAME=SPEC, e.g. train=train")
        pairs.append((name, spec))
    try:
        check_outside_corpus(args.source_dir, [args.out_dir / name for name, _ in pairs])
    except DataPrepError as error:
        logger.error("%s", error)
        return 1

    for name, spec in pairs:
        try:
            staged = importer.import_split(args.source_dir, spec, options)
        except (ValueError, OSError) as error:
            logger.error("split %s: cannot import %s: %s", name, spec, error)
            return 1
        write_staging_dir(args.out_dir / name, staged)
        _log_skipped(name, staged.skipped)
        logger.info("split %s: %d utterances written to %s", name, len(staged.text), args.out_dir / name)
    return 0
