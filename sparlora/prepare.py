"""Stage 0: check a corpus and write one prepared Kaldi-style data dir per split.

Usage: python -m sparlora.prepare --config conf/demo.yaml [overrides...]

`corpus.layout` names the layout of `corpus.source_dir`. For "kaldi", each split is a
Kaldi data dir, read as described below. For the other layouts (magicdata, kespeech,
aishell, jsonl) an importer in the recipe's local/ folder first writes each split as a
Kaldi data dir under `<data_dir>/local/<split>/` (see `sparlora.corpus`), and the input
lines it left out appear in the split's report: lines that the corpus or the config
means to leave out (event-only lines, excluded speakers or subdialects, blank lines) as
"skipped at import", and malformed ones (bad times, unknown files) as "dropped at
import", which count towards max_drop_fraction like dropped utterances.

Input, per split: a Kaldi data dir with
  wav.scp     <recording> <path or `cmd args |` pipe>
  text        <utterance> <transcript>
  utt2spk     <utterance> <speaker>           optional: without it each utterance is its own speaker
  segments    <utterance> <recording> <start> <end>   optional, in seconds; end -1 means
              the end of the recording, and the prepared segments file has it replaced
              by the recording's end time
  spk2gender  <speaker> <m|f>                 optional, copied for the speakers kept
Without segments, every wav.scp entry is one utterance with the recording's id.

Output, in the prepared dir: wav.scp (the input entries of the recordings still used),
segments (only if the input had one, with clipped and -1 ends rewritten), text,
utt2spk, spk2utt, utt2dur (seconds, 3 decimals, after clipping), reco2sr_ch
(<recording> <original sample rate> <channels>), spk2gender (if the input had one)
and prep_report.txt. Every file is written to a temporary file and renamed. The
source dir is only read.

Every utterance is checked. One that fails a check is dropped and listed in the
report with its reason, which is one of:
  - an invalid utterance, recording or speaker id, a missing or empty transcript, or
    no entry in wav.scp, segments or utt2spk;
  - missing, unreadable or empty audio, or a failing pipe command;
  - an invalid, empty or reversed segment, or one starting at or after the recording end;
  - a segment ending past the recording end by more than audio.segment_end_tolerance s;
  - an audio.channel index that the recording lacks;
  - a duration outside [audio.min_duration, audio.max_duration].
A segment that ends past the recording end by at most the tolerance is clipped to the
end, kept and listed as clipped. If more than max_drop_fraction of a split's
utterances is dropped, stage 0 fails after writing the report, so max_drop_fraction=0
makes any problem fatal.

Audio is only probed here (header and last sample of files, the whole output of
pipes), never rewritten: `sparlora.audio.load_audio` cuts, mixes down and resamples
when training and decoding read it.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import unicodedata
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from sparlora.audio import END_OF_RECORDING, AudioError, AudioInfo, audio_info, check_channel, seconds_to_samples
from sparlora.config import parse_stage_args
from sparlora.kaldi_io import atomic_write_text, read_table, write_table

logger = logging.getLogger(__name__)

SUPPORTED_LAYOUTS = ("kaldi", "magicdata", "kespeech", "aishell", "jsonl")
REPORT_NAME = "prep_report.txt"
# Files that stage 0 writes into a prepared dir. Those the input does not call for
# (segments, spk2gender) are removed, so a rerun leaves no stale file behind.
# Written by stage 1 from `text`; removed whenever stage 0 writes `text` again.
STAGE1_FILES = ("text.raw", "text.dropped", "oov.txt", "data.jsonl")
OUTPUT_FILES = ("wav.scp", "segments", "text", "utt2spk", "spk2utt", "utt2dur", "reco2sr_ch", "spk2gender")
# Warnings logged per split for dropped or clipped utterances. The report lists all.
MAX_LOGGED_PROBLEMS = 10
# Recordings probed at once. Probing a pipe runs its command, which mostly waits on I/O.
PROBE_THREADS = min(8, os.cpu_count() or 1)

# Drop reasons, counted in the report.
INVALID_ID = "invalid utterance id"
INVALID_SPEAKER = "invalid speaker id"
INVALID_RECORDING = "invalid recording id"
NO_TRANSCRIPT = "no transcript"
EMPTY_TRANSCRIPT = "empty transcript"
NO_RECORDING = "no recording"
UNKNOWN_RECORDING = "recording not in wav.scp"
NO_SPEAKER = "no speaker"
INVALID_SEGMENT = "invalid segment"
EMPTY_SEGMENT = "zero-length or reversed segment"
START_PAST_END = "segment starts at or after recording end"
END_PAST_END = "segment end past recording end"
NOT_FOUND = "not found"
LINE_BREAK = "line break in transcript"
TOO_SHORT = "too short"
TOO_LONG = "too long"
CLIPPED = "clipped"  # not a drop reason: the utterance is kept
# Other reasons for audio problems are AudioError.kind: "unreadable", "0 samples",
# "command failed", "channel out of range".


class DataPrepError(RuntimeError):
    """A split that stage 0 cannot prepare: unreadable tables or too many dropped utterances."""


@dataclass(frozen=True)
class Problem:
    """A dropped or clipped utterance: its id, a fixed reason and the details."""

    utterance: str
    reason: str
    detail: str = ""

    def describe(self) -> str:
        return f"{self.reason} ({self.detail})" if self.detail else self.reason


@dataclass(frozen=True)
class SkippedLine:
    """An input line that a corpus importer left out of the staging dir, and why.

    `expected` marks lines that the corpus or the config means to leave out (event-only
    lines, excluded speakers or subdialects, blank lines). The report lists them apart
    from drops, and they do not count towards max_drop_fraction.
    """

    location: str  # "<file>:<line number>", or a file path for a whole file
    reason: str
    detail: str = ""
    expected: bool = False

    def describe(self) -> str:
        return f"{self.reason} ({self.detail})" if self.detail else self.reason


@dataclass
class PrepReport:
    """Outcome of preparing one split.

    `imported` is True when a corpus importer wrote the source dir. Lines it dropped
    count as dropped utterances of the split, and lines it skipped as expected do not.
    """

    split: str
    source_dir: Path
    report_path: Path
    input_utterances: int = 0
    kept: int = 0
    dropped: list[Problem] = field(default_factory=list)
    clipped: list[Problem] = field(default_factory=list)
    recordings: dict[str, AudioInfo] = field(default_factory=dict)
    imported: bool = False
    dropped_at_import: list[SkippedLine] = field(default_factory=list)
    skipped_at_import: list[SkippedLine] = field(default_factory=list)

    @property
    def dropped_by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(problem.reason for problem in self.dropped).items()))

    @property
    def total_dropped(self) -> int:
        """Dropped utterances plus input lines dropped at import."""
        return len(self.dropped) + len(self.dropped_at_import)

    @property
    def total_input(self) -> int:
        """Utterances of the source dir plus input lines dropped at import."""
        return self.input_utterances + len(self.dropped_at_import)

    @property
    def drop_fraction(self) -> float:
        return self.total_dropped / self.total_input if self.total_input else 0.0

    def summary(self) -> str:
        """Return one line with the split's counts."""
        reasons = ", ".join(f"{reason}: {count}" for reason, count in self.dropped_by_reason.items())
        imported = ""
        if self.imported:
            imported = f", {len(self.dropped_at_import)} dropped and {len(self.skipped_at_import)} skipped at import"
        return (
            f"split {self.split}: {self.kept} of {self.input_utterances} utterances kept, "
            f"{len(self.dropped)} dropped{f' ({reasons})' if reasons else ''}, {len(self.clipped)} clipped{imported}; "
            f"report: {self.report_path}"
        )

    def render(self) -> str:
        """Return the text of prep_report.txt."""
        lines = [
            f"split: {self.split}",
            f"source: {self.source_dir}",
            f"input utterances: {self.input_utterances}",
            f"kept: {self.kept}",
            f"dropped: {len(self.dropped)}",
            f"clipped: {len(self.clipped)}",
        ]
        if self.imported:
            lines += [f"dropped at import: {len(self.dropped_at_import)}", f"skipped at import: {len(self.skipped_at_import)}"]
        lines += [f"dropped because {reason}: {count}" for reason, count in self.dropped_by_reason.items()]
        for kind, skipped in (("dropped", self.dropped_at_import), ("skipped", self.skipped_at_import)):
            counts = sorted(Counter(skip.reason for skip in skipped).items())
            lines += [f"{kind} at import because {reason}: {count}" for reason, count in counts]
        lines += [f"dropped {problem.utterance}: {problem.describe()}" for problem in self.dropped]
        lines += [f"dropped at import {skip.location}: {skip.describe()}" for skip in self.dropped_at_import]
        lines += [f"skipped at import {skip.location}: {skip.describe()}" for skip in self.skipped_at_import]
        lines += [f"clipped {problem.utterance}: {problem.detail}" for problem in self.clipped]
        for recording, info in sorted(self.recordings.items()):
            lines.append(
                f"recording {recording}: {info.sample_rate} Hz, {info.channels} channel(s), "
                f"{info.num_samples} samples, {info.duration:.3f} s"
            )
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Utterance:
    """One utterance of a prepared data dir, as later stages read it."""

    id: str
    source: str  # wav.scp value: a path or a `cmd |` pipe
    start: float | None  # seconds in the recording, None for a whole recording
    end: float | None  # seconds in the recording, None for a whole recording
    text: str
    speaker: str
    duration: float  # seconds
    recording: str


@dataclass
class _Candidate:
    """An utterance being checked: where its audio is and what the checks found."""

    id: str
    recording: str
    start: float | None = None
    end: float | None = None  # seconds, END_OF_RECORDING for "to the end"
    start_field: str | None = None  # the times as written in segments
    end_field: str | None = None
    first_sample: int = 0
    stop_sample: int = 0


def check_id(name: str) -> str | None:
    """Return why `name` cannot be an utterance, recording or speaker id, or None if it can.

    Ids must be non-empty and must not contain whitespace, control, format or
    unassigned characters (Kaldi splits on whitespace, and invisible characters make
    ids that look equal differ) or "/" (ids become file names). "." and ".." are
    rejected for the same reason.
    """
    if not name:
        return "empty id"
    if name in (".", ".."):
        return f"{name!r} cannot be a file name"
    for char in name:
        if char == "/":
            return f"{name!r} contains '/'"
        if char.isspace() or unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn"):
            return f"{name!r} contains the character U+{ord(char):04X}"
    return None


def format_seconds(sample_index: int, sample_rate: int) -> str:
    """Format a sample index as seconds with the fewest decimals (2 to 9) that round back to it."""
    seconds = sample_index / sample_rate
    for decimals in range(2, 10):
        text = f"{seconds:.{decimals}f}"
        if seconds_to_samples(float(text), sample_rate) == sample_index:
            return text
    return repr(seconds)


def _setting(audio_cfg: Any, name: str) -> Any:
    """Return a setting from the `audio` config section, a mapping or an object."""
    try:
        return audio_cfg[name] if hasattr(audio_cfg, "__getitem__") else getattr(audio_cfg, name)
    except (KeyError, AttributeError) as error:
        raise KeyError(f"the audio config has no setting {name!r}") from error


def _read_optional_table(path: Path) -> dict[str, str] | None:
    return dict(read_table(path)) if path.is_file() else None


def _probe(source: str) -> AudioInfo | Problem:
    """Return a recording's AudioInfo, or a Problem (with an empty utterance id) saying why not."""
    try:
        return audio_info(source)
    except FileNotFoundError:
        return Problem("", NOT_FOUND, source)
    except AudioError as error:
        return Problem("", error.kind, f"{source}: {error.detail}" if error.detail else source)


# Times in segments: decimal seconds in ASCII digits, as Kaldi reads them. float() would
# also take "1_0", "2e0" and full-width digits, which Kaldi tools reject.
_SECONDS = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


def _parse_segment(utterance: str, value: str) -> _Candidate | Problem:
    """Parse `<recording> <start> <end>` and check the times that need no audio."""
    fields = value.split()
    if len(fields) != 3:
        return Problem(utterance, INVALID_SEGMENT, f"expected '<recording> <start> <end>', got {value!r}")
    recording, start_field, end_field = fields
    if not (_SECONDS.fullmatch(start_field) and _SECONDS.fullmatch(end_field)):
        return Problem(utterance, INVALID_SEGMENT, f"start or end is not a decimal number in ASCII digits: {value!r}")
    try:
        start, end = float(start_field), float(end_field)
    except ValueError:
        return Problem(utterance, INVALID_SEGMENT, f"start or end is not a number: {value!r}")
    if not (math.isfinite(start) and math.isfinite(end)):
        return Problem(utterance, INVALID_SEGMENT, f"start or end is not finite: {value!r}")
    if start < 0:
        return Problem(utterance, INVALID_SEGMENT, f"start {start_field} s is negative")
    if end != END_OF_RECORDING and end <= start:
        return Problem(utterance, EMPTY_SEGMENT, f"start {start_field} s, end {end_field} s")
    return _Candidate(utterance, recording, start, end, start_field=start_field, end_field=end_field)


def _place_in_recording(candidate: _Candidate, info: AudioInfo, tolerance: float) -> Problem | None:
    """Set the candidate's sample range in its recording, clipping a small overshoot.

    Returns a Problem with reason CLIPPED when the end was clipped (the utterance is
    kept), with another reason when the segment cannot be used, and None when the
    segment fits. A clipped or -1 end is rewritten in `end_field` as the recording end.
    """
    rate, length = info.sample_rate, info.num_samples
    if candidate.start is None:
        candidate.first_sample, candidate.stop_sample = 0, length
        return None

    first = seconds_to_samples(candidate.start, rate)
    if first >= length:
        detail = f"start {candidate.start_field} s, recording end {info.duration:.3f} s"
        return Problem(candidate.id, START_PAST_END, detail)

    stop = length if candidate.end == END_OF_RECORDING else seconds_to_samples(candidate.end, rate)
    clipped = None
    if stop > length:
        overshoot = stop - length
        detail = (
            f"end {candidate.end_field} s is {overshoot / rate:.3f} s past the recording end "
            f"{info.duration:.3f} s, tolerance {tolerance:g} s"
        )
        if overshoot > seconds_to_samples(tolerance, rate):
            return Problem(candidate.id, END_PAST_END, detail)
        stop = length
        clipped = Problem(candidate.id, CLIPPED, f"{detail}: end clipped to {format_seconds(length, rate)} s")
    if stop <= first:
        detail = f"start {candidate.start_field} s, end {candidate.end_field} s round to the same sample"
        return Problem(candidate.id, EMPTY_SEGMENT, detail)

    candidate.first_sample, candidate.stop_sample = first, stop
    if candidate.end == END_OF_RECORDING or clipped is not None:
        candidate.end_field = format_seconds(length, rate)
    return clipped


def _remove_unless(dst: Path, name: str, needed: bool) -> None:
    if not needed:
        (dst / name).unlink(missing_ok=True)


def _check_paths(src: Path, dst: Path) -> None:
    """Reject a destination that is the source dir or inside it, and a source without tables."""
    if not src.is_dir():
        raise DataPrepError(f"source data dir not found: {src}")
    for name in ("wav.scp", "text"):
        if not (src / name).is_file():
            raise DataPrepError(f"{src / name} not found: a Kaldi data dir needs wav.scp and text")
    src_resolved, dst_resolved = src.resolve(), dst.resolve()
    if dst_resolved == src_resolved or src_resolved in dst_resolved.parents:
        raise DataPrepError(f"the prepared dir {dst} must be outside the source dir {src}, which stage 0 only reads")


def _collect_candidates(
    src: Path, wav: dict[str, str], text: dict[str, str], utt2spk: dict[str, str] | None, report: PrepReport
) -> list[_Candidate]:
    """Return the utterances that pass the checks that need no audio, and report the others."""
    segments = _read_optional_table(src / "segments")
    if segments is None:
        audio_entries: dict[str, _Candidate | Problem] = {utt: _Candidate(utt, utt) for utt in wav}
    else:
        audio_entries = {utt: _parse_segment(utt, value) for utt, value in segments.items()}
        referenced = {entry.recording for entry in audio_entries.values() if isinstance(entry, _Candidate)}
        unreferenced = len(set(wav) - referenced)
        if unreferenced:
            logger.info("%s: %d recordings of wav.scp have no segment and are left out", src, unreferenced)

    all_ids = sorted(set(audio_entries) | set(text))
    report.input_utterances = len(all_ids)
    candidates = []
    for utt in all_ids:
        problem = _check_without_audio(utt, audio_entries.get(utt), wav, text, utt2spk, segments is not None)
        if problem is None:
            candidates.append(audio_entries[utt])
        else:
            report.dropped.append(problem)
    return candidates


def _check_without_audio(
    utt: str,
    entry: _Candidate | Problem | None,
    wav: dict[str, str],
    text: dict[str, str],
    utt2spk: dict[str, str] | None,
    has_segments: bool,
) -> Problem | None:
    """Return the first problem of an utterance found from the tables alone, or None."""
    reason = check_id(utt)
    if reason is not None:
        return Problem(utt, INVALID_ID, reason)
    if utt not in text:
        return Problem(utt, NO_TRANSCRIPT, "not in text")
    if not text[utt].strip():
        return Problem(utt, EMPTY_TRANSCRIPT)
    if "\r" in text[utt]:
        return Problem(utt, LINE_BREAK, "a carriage return (\\r) inside the transcript line; remove it or end the line there")
    if entry is None:
        return Problem(utt, NO_RECORDING, "not in segments" if has_segments else "not in wav.scp")
    if isinstance(entry, Problem):
        return entry
    reason = check_id(entry.recording)
    if reason is not None:
        return Problem(utt, INVALID_RECORDING, reason)
    if entry.recording not in wav:
        return Problem(utt, UNKNOWN_RECORDING, entry.recording)
    if utt2spk is not None:
        if utt not in utt2spk:
            return Problem(utt, NO_SPEAKER, "not in utt2spk")
        reason = check_id(utt2spk[utt].strip())
        if reason is not None:
            return Problem(utt, INVALID_SPEAKER, reason)
    return None


def _check_audio(
    candidates: list[_Candidate], wav: dict[str, str], audio_cfg: Any, report: PrepReport
) -> list[_Candidate]:
    """Probe each recording once, then check every candidate against its recording."""
    tolerance = float(_setting(audio_cfg, "segment_end_tolerance"))
    min_duration = float(_setting(audio_cfg, "min_duration"))
    max_duration = float(_setting(audio_cfg, "max_duration"))
    channel = check_channel(_setting(audio_cfg, "channel"))

    recordings = sorted({candidate.recording for candidate in candidates})
    with ThreadPoolExecutor(max_workers=PROBE_THREADS) as pool:
        probes = dict(zip(recordings, pool.map(_probe, [wav[recording] for recording in recordings])))
    report.recordings = {rec: probe for rec, probe in probes.items() if isinstance(probe, AudioInfo)}

    kept = []
    for candidate in candidates:
        probe = probes[candidate.recording]
        if isinstance(probe, Problem):
            report.dropped.append(Problem(candidate.id, probe.reason, probe.detail))
            continue
        if channel != "mean" and channel >= probe.channels:
            detail = f"audio.channel is {channel}, but recording {candidate.recording} has {probe.channels} channel(s)"
            report.dropped.append(Problem(candidate.id, "channel out of range", detail))
            continue
        problem = _place_in_recording(candidate, probe, tolerance)
        if problem is not None and problem.reason != CLIPPED:
            report.dropped.append(problem)
            continue

        duration = (candidate.stop_sample - candidate.first_sample) / probe.sample_rate
        if duration < min_duration:
            report.dropped.append(Problem(candidate.id, TOO_SHORT, f"{duration:.3f} s < audio.min_duration {min_duration:g} s"))
            continue
        if duration > max_duration:
            report.dropped.append(Problem(candidate.id, TOO_LONG, f"{duration:.3f} s > audio.max_duration {max_duration:g} s"))
            continue
        if problem is not None:
            report.clipped.append(problem)
        kept.append(candidate)
    return kept


def speakers_sorted_with_utterances(speakers_in_utterance_order: Sequence[str]) -> bool:
    """Return True when sorting by utterance id also sorts by speaker and keeps each speaker's utterances together."""
    previous: str | None = None
    for speaker in speakers_in_utterance_order:
        if previous is not None and speaker < previous:
            return False
        previous = speaker
    return True


def _write_outputs(
    dst: Path,
    kept: list[_Candidate],
    wav: dict[str, str],
    text: dict[str, str],
    speakers: dict[str, str],
    has_segments: bool,
    spk2gender: dict[str, str] | None,
    recordings: dict[str, AudioInfo],
) -> None:
    """Write the prepared tables for the kept utterances, all sorted by id."""
    used = sorted({candidate.recording for candidate in kept})
    write_table(dst / "wav.scp", [(rec, wav[rec]) for rec in used])

    if has_segments:
        rows = [(c.id, f"{c.recording} {c.start_field} {c.end_field}") for c in kept]
        write_table(dst / "segments", rows)
    _remove_unless(dst, "segments", has_segments)

    write_table(dst / "text", [(c.id, text[c.id].strip()) for c in kept])
    # Stage 1 normalizes from text.raw when it exists; a fresh `text` makes the old
    # raw copy and everything derived from it stale.
    for derived in STAGE1_FILES:
        (dst / derived).unlink(missing_ok=True)
    write_table(dst / "utt2spk", [(c.id, speakers[c.id]) for c in kept])

    spk2utt: dict[str, list[str]] = {}
    for candidate in kept:
        spk2utt.setdefault(speakers[candidate.id], []).append(candidate.id)
    write_table(dst / "spk2utt", [(spk, " ".join(utts)) for spk, utts in sorted(spk2utt.items())])
    if not speakers_sorted_with_utterances([speakers[c.id] for c in kept]):
        # This recipe reads the tables by key, but Kaldi's tools need both orders to agree.
        logger.warning(
            "%s: the speakers of utt2spk are not in the order of spk2utt, which Kaldi's validate_data_dir.sh "
            "rejects; make every utterance id start with its speaker id and a '-' to use the dir with Kaldi", dst
        )

    durations = []
    for candidate in kept:
        seconds = (candidate.stop_sample - candidate.first_sample) / recordings[candidate.recording].sample_rate
        durations.append((candidate.id, f"{seconds:.3f}"))
    write_table(dst / "utt2dur", durations)

    info_rows = [(rec, f"{recordings[rec].sample_rate} {recordings[rec].channels}") for rec in used]
    write_table(dst / "reco2sr_ch", info_rows)

    if spk2gender is not None:
        write_table(dst / "spk2gender", [(spk, spk2gender[spk]) for spk in sorted(spk2utt) if spk in spk2gender])
    _remove_unless(dst, "spk2gender", spk2gender is not None)


def prepare_kaldi_dir(
    src: Path,
    dst: Path,
    audio_cfg: Any,
    max_drop_fraction: float,
    skipped_at_import: Sequence[SkippedLine] | None = None,
) -> PrepReport:
    """Check the Kaldi data dir `src` and write the prepared data dir `dst` (see the module doc).

    `audio_cfg` is the `audio` config section (segment_end_tolerance, min_duration,
    max_duration, channel). The split name in messages is `dst`'s name. Raises
    DataPrepError when a table is missing or invalid (for example not UTF-8), when no
    utterance is kept, or when the dropped share exceeds `max_drop_fraction`. Each failure
    removes the split's earlier outputs and writes prep_report.txt with the reason, so no
    stale data is left for later stages.

    `skipped_at_import` lists the input lines that a corpus importer left out when it
    wrote `src`. They go into the report, and those not marked expected count as
    dropped utterances towards `max_drop_fraction`.
    """
    src, dst = Path(src), Path(dst)
    split = dst.name
    if not 0.0 <= float(max_drop_fraction) <= 1.0:
        raise ValueError(f"invalid max_drop_fraction {max_drop_fraction}: expected a number in [0, 1]")
    _check_paths(src, dst)
    report = PrepReport(split=split, source_dir=src, report_path=dst / REPORT_NAME)
    if skipped_at_import is not None:
        report.imported = True
        report.dropped_at_import = [skip for skip in skipped_at_import if not skip.expected]
        report.skipped_at_import = [skip for skip in skipped_at_import if skip.expected]

    try:
        wav = dict(read_table(src / "wav.scp"))
        text = dict(read_table(src / "text"))
        utt2spk = _read_optional_table(src / "utt2spk")
        spk2gender = _read_optional_table(src / "spk2gender")
        candidates = _collect_candidates(src, wav, text, utt2spk, report)
        has_segments = (src / "segments").is_file()
    except ValueError as error:
        failure = f"split {split}: invalid table in {src}: {error}"
        _remove_outputs(dst)
        if dst.is_dir():
            atomic_write_text(report.report_path, f"split: {split}\nsource: {src}\nfailed: {failure}\n")
        raise DataPrepError(failure) from error
    if utt2spk is None:
        logger.info("split %s: %s has no utt2spk, so each utterance is its own speaker", split, src)

    kept = _check_audio(candidates, wav, audio_cfg, report)
    report.kept = len(kept)
    report.dropped.sort(key=lambda problem: problem.utterance)
    _log_problems(split, report)

    dst.mkdir(parents=True, exist_ok=True)
    failure = None
    at_import = f", {len(report.dropped_at_import)} of them at import" if report.dropped_at_import else ""
    if report.kept == 0:
        dropped_at_import = f" ({len(report.dropped_at_import)} dropped at import)" if report.dropped_at_import else ""
        failure = (
            f"split {split}: none of the {report.total_input} utterances was kept{dropped_at_import}; "
            f"see {report.report_path}"
        )
    elif report.drop_fraction > float(max_drop_fraction):
        failure = (
            f"split {split}: {report.total_dropped} of {report.total_input} utterances were dropped{at_import} "
            f"({report.drop_fraction:.1%}), more than max_drop_fraction {float(max_drop_fraction):g}; "
            f"see {report.report_path}, then fix the data or raise audio.max_drop_fraction"
        )
    if failure is not None:
        _remove_outputs(dst)
        atomic_write_text(report.report_path, report.render())
        raise DataPrepError(failure)

    speakers = {c.id: (utt2spk[c.id].strip() if utt2spk is not None else c.id) for c in kept}
    _write_outputs(dst, kept, wav, text, speakers, has_segments, spk2gender, report.recordings)
    atomic_write_text(report.report_path, report.render())
    return report


def _remove_outputs(dst: Path) -> None:
    """Remove a split's prepared files, so later stages cannot use stale data after a failure."""
    for name in OUTPUT_FILES + STAGE1_FILES:
        (dst / name).unlink(missing_ok=True)


def _log_problems(split: str, report: PrepReport) -> None:
    """Log the first dropped and clipped utterances as warnings; the report lists them all."""
    problems_by_kind = [
        ("dropped", "dropped utterances", [(problem.utterance, problem.describe()) for problem in report.dropped]),
        ("dropped at import", "input lines dropped at import", [(skip.location, skip.describe()) for skip in report.dropped_at_import]),
        ("clipped", "clipped utterances", [(problem.utterance, problem.describe()) for problem in report.clipped]),
    ]
    for kind, plural, problems in problems_by_kind:
        for name, description in problems[:MAX_LOGGED_PROBLEMS]:
            logger.warning("split %s: %s %s: %s", split, kind, name, description)
        if len(problems) > MAX_LOGGED_PROBLEMS:
            logger.warning(
                "split %s: %d more %s are listed in %s",
                split,
                len(problems) - MAX_LOGGED_PROBLEMS,
                plural,
                report.report_path,
            )


def read_data_dir(data_dir: Path) -> list[Utterance]:
    """Read a prepared data dir (wav.scp, text, utt2spk, utt2dur, optional segments).

    Returns the utterances in text order. Raises ValueError naming the file and the
    utterance when a table lacks an entry that another one refers to.
    """
    data_dir = Path(data_dir)
    wav = dict(read_table(data_dir / "wav.scp"))
    text = read_table(data_dir / "text")
    utt2spk = dict(read_table(data_dir / "utt2spk"))
    utt2dur = dict(read_table(data_dir / "utt2dur"))
    segments = _read_optional_table(data_dir / "segments")

    def lookup(table: dict[str, str], name: str, key: str) -> str:
        if key not in table:
            raise ValueError(f"{data_dir / name}: no entry for {key!r}")
        return table[key]

    utterances = []
    for utt, transcript in text:
        start = end = None
        recording = utt
        if segments is not None:
            fields = lookup(segments, "segments", utt).split()
            if len(fields) != 3:
                raise ValueError(f"{data_dir / 'segments'}: invalid line for {utt!r}: expected '<recording> <start> <end>'")
            recording, start, end = fields[0], float(fields[1]), float(fields[2])
        utterances.append(
            Utterance(
                id=utt,
                source=lookup(wav, "wav.scp", recording),
                start=start,
                end=end,
                text=transcript,
                speaker=lookup(utt2spk, "utt2spk", utt),
                duration=float(lookup(utt2dur, "utt2dur", utt)),
                recording=recording,
            )
        )
    return utterances


def prepare_corpus(cfg: Any) -> list[PrepReport]:
    """Prepare every split of `cfg.corpus.splits`, then raise DataPrepError if any failed.

    The "kaldi" layout reads each split from `<source_dir>/<subfolder>`. Every other
    layout runs its importer from the recipe's local/ folder first (see `sparlora.corpus`).
    """
    layout = cfg.corpus.layout
    if layout not in SUPPORTED_LAYOUTS:
        raise DataPrepError(
            f"unsupported corpus.layout {layout!r}: supported layouts are {', '.join(SUPPORTED_LAYOUTS)}; "
            "the README section 'Bring your own corpus' describes each"
        )
    source_dir = Path(cfg.corpus.source_dir)
    data_dir = Path(cfg.data_dir)
    if layout == "kaldi":
        if not source_dir.is_dir():
            raise DataPrepError(
                f"corpus source dir {source_dir} not found: put one Kaldi data dir per split there "
                f"(subfolders {', '.join(cfg.corpus.splits.values())}, each with wav.scp, text and optionally "
                "utt2spk and segments). For the demo corpus run `bash run.sh --stage 0`, which creates it."
            )
        from sparlora.corpus import check_outside_corpus

        check_outside_corpus(source_dir, [data_dir / str(split) for split in cfg.corpus.splits])

        def prepare_split(split: str, subdir: Any) -> PrepReport:
            return prepare_kaldi_dir(source_dir / subdir, data_dir / split, cfg.audio, cfg.audio.max_drop_fraction)

    else:
        from sparlora.corpus import ImportOptions, check_output_dirs, load_importer, prepare_imported_split

        importer = load_importer(layout)
        options = ImportOptions.from_config(cfg.corpus)
        if not source_dir.is_dir():
            raise DataPrepError(
                f"corpus source dir {source_dir} not found: set corpus.source_dir to the root of a corpus in "
                f"{importer.DESCRIPTION}"
            )
        check_output_dirs(source_dir, data_dir, [str(split) for split in cfg.corpus.splits])

        def prepare_split(split: str, spec: Any) -> PrepReport:
            return prepare_imported_split(
                importer, source_dir, spec, options, data_dir, split, cfg.audio, cfg.audio.max_drop_fraction
            )

    reports, failures = [], []
    for split, spec in cfg.corpus.splits.items():
        try:
            report = prepare_split(str(split), spec)
        except DataPrepError as error:
            logger.error("%s", error)
            failures.append(str(error))
            continue
        logger.info("%s", report.summary())
        reports.append(report)
    if failures:
        raise DataPrepError(f"{len(failures)} of {len(cfg.corpus.splits)} splits failed:\n" + "\n".join(failures))
    return reports


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_stage_args("Stage 0: check the corpus and write the prepared Kaldi data dirs.", argv)
    try:
        prepare_corpus(cfg)
    except DataPrepError as error:
        logger.error("stage 0 failed: %s", error)
        return 1
    return 0


if __name__ == "__main__":
    from sparlora.config import run_main

    # Run the main of the imported module: the importers raise its DataPrepError, which
    # this __main__ copy's `except DataPrepError` would not catch.
    from sparlora.prepare import main

    sys.exit(run_main(main))
