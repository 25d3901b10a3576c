"""Stage 5: character error rate (CER) of the decoded test sets, with S/D/I counts.

References and hypotheses go through the same `normalize_text` (the `scoring.text:`
section of the config), then all whitespace is removed, so spaces never count as
characters and `我 爱 北京` scores equal to `我爱北京`. Characters are aligned with
`jiwer.process_characters` (jiwer 4.0.0): CER = (S + D + I) / N, where N is the number of
reference characters. Word error rate is not reported, because Chinese is not written
with spaces between words.

Empty sides are scored here, without jiwer: an empty reference with an empty hypothesis
has no errors, an empty reference with a non-empty hypothesis has only insertions and no
per-utterance CER ("ref empty"), and an empty hypothesis deletes every reference
character.

Each decode folder also gets `ref.trn` and `hyp.trn` in sclite's transcript format: the
normalized characters separated by spaces, then `(speaker-utterance)`. They score with

    sclite -r ref.trn trn -h hyp.trn trn -i rm -e utf-8 -s -o sum stdout

`-s` keeps case as the normalization left it. sclite's alignment weighs a substitution
4 and an insertion or deletion 3, while jiwer's (and Kaldi's `compute-wer`) counts every
edit as 1. Both give the same counts on almost every utterance. Where they differ,
sclite reports more errors: for `abxyz` against `pqrab` it keeps the two hits and
reports 3 deletions and 3 insertions, where jiwer reports 5 substitutions.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import logging
import re
import shlex
import subprocess
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import jiwer

from sparlora.kaldi_io import atomic_write_text, read_table
from sparlora.noise import decode_split_names
from sparlora.text import TextNormConfig, normalize_text

logger = logging.getLogger(__name__)

_WHITESPACE = re.compile(r"\s+")
_JIWER_OPS = {"equal": "C", "substitute": "S", "delete": "D", "insert": "I"}
_REPORTED_PACKAGES = ("torch", "funasr", "peft", "jiwer")
_MAX_LOGGED_IDS = 10


@dataclass
class UtteranceScore:
    """Alignment of one utterance: normalized texts without whitespace and one op per position."""

    utterance_id: str
    ref: str
    hyp: str
    ops: str  # C (correct), S (substitution), D (deletion), I (insertion), one per alignment position
    note: str = ""  # "ref empty" or "missing hyp"

    @property
    def substitutions(self) -> int:
        return self.ops.count("S")

    @property
    def deletions(self) -> int:
        return self.ops.count("D")

    @property
    def insertions(self) -> int:
        return self.ops.count("I")

    @property
    def hits(self) -> int:
        return self.ops.count("C")

    @property
    def ref_length(self) -> int:
        return len(self.ref)

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def cer(self) -> float | None:
        """Errors per reference character; 0.0 for two empty sides, None for an empty reference with insertions."""
        return _error_rate(self.errors, self.ref_length)


@dataclass
class ScoreResult:
    """Per-utterance alignments and corpus totals of one test set."""

    utterances: list[UtteranceScore] = field(default_factory=list)
    missing_hyp: list[str] = field(default_factory=list)  # reference ids without a hypothesis, scored as deletions
    extra_hyp: list[str] = field(default_factory=list)  # hypothesis ids without a reference, ignored

    @property
    def substitutions(self) -> int:
        return sum(utterance.substitutions for utterance in self.utterances)

    @property
    def deletions(self) -> int:
        return sum(utterance.deletions for utterance in self.utterances)

    @property
    def insertions(self) -> int:
        return sum(utterance.insertions for utterance in self.utterances)

    @property
    def hits(self) -> int:
        return sum(utterance.hits for utterance in self.utterances)

    @property
    def ref_length(self) -> int:
        return sum(utterance.ref_length for utterance in self.utterances)

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def cer(self) -> float | None:
        """Corpus CER (S + D + I) / N as a fraction; None when N is 0 but there are insertions."""
        return _error_rate(self.errors, self.ref_length)

    @property
    def empty_refs(self) -> int:
        return sum(1 for utterance in self.utterances if not utterance.ref)


def _error_rate(errors: int, ref_length: int) -> float | None:
    if ref_length == 0:
        return 0.0 if errors == 0 else None
    return errors / ref_length


def _ops_from_chunks(chunks) -> str:
    ops = []
    for chunk in chunks:
        op = _JIWER_OPS[chunk.type]
        length = chunk.hyp_end_idx - chunk.hyp_start_idx if op == "I" else chunk.ref_end_idx - chunk.ref_start_idx
        ops.append(op * length)
    return "".join(ops)


def _log_ids(message: str, ids: list[str]) -> None:
    if not ids:
        return
    shown = " ".join(ids[:_MAX_LOGGED_IDS])
    more = f" (and {len(ids) - _MAX_LOGGED_IDS} more)" if len(ids) > _MAX_LOGGED_IDS else ""
    logger.warning("%s: %d (%s%s)", message, len(ids), shown, more)


def cer_counts(refs: Mapping[str, str], hyps: Mapping[str, str], cfg: TextNormConfig) -> ScoreResult:
    """Align the normalized characters of every reference with its hypothesis.

    Utterances follow the order of `refs`. A reference without hypothesis is scored as an
    empty hypothesis (all deletions) and listed in `missing_hyp`. A hypothesis without
    reference is listed in `extra_hyp` and not scored. Empty texts never raise.
    """
    result = ScoreResult()
    pending: list[tuple[UtteranceScore, str, str]] = []

    for utterance_id, ref_text in refs.items():
        note = ""
        if utterance_id in hyps:
            hyp_text = hyps[utterance_id]
        else:
            hyp_text = ""
            note = "missing hyp"
            result.missing_hyp.append(utterance_id)

        ref = _WHITESPACE.sub("", normalize_text(ref_text, cfg))
        hyp = _WHITESPACE.sub("", normalize_text(hyp_text, cfg))
        if not ref:
            utterance = UtteranceScore(utterance_id, ref, hyp, "I" * len(hyp), note or ("ref empty" if hyp else ""))
        elif not hyp:
            utterance = UtteranceScore(utterance_id, ref, hyp, "D" * len(ref), note)
        else:
            utterance = UtteranceScore(utterance_id, ref, hyp, "", note)
            pending.append((utterance, ref, hyp))
        result.utterances.append(utterance)

    # jiwer rejects empty strings in some versions, so only pairs with two non-empty sides go in.
    if pending:
        output = jiwer.process_characters([ref for _, ref, _ in pending], [hyp for _, _, hyp in pending])
        for (utterance, _, _), chunks in zip(pending, output.alignments):
            utterance.ops = _ops_from_chunks(chunks)

    result.extra_hyp = [utterance_id for utterance_id in hyps if utterance_id not in refs]
    _log_ids("references without hypothesis, scored as deletions", result.missing_hyp)
    _log_ids("hypotheses without reference, ignored", result.extra_hyp)
    return result


def format_cer(result: ScoreResult) -> str:
    """Return e.g. `CER 35.12% (S=3 D=1 I=0 N=...)`; `CER n/a` when there are no reference characters."""
    rate = "n/a" if result.ref_length == 0 else f"{100 * result.cer:.2f}%"
    return f"CER {rate} (S={result.substitutions} D={result.deletions} I={result.insertions} N={result.ref_length})"


def trn_line(text: str, speaker: str, utterance_id: str) -> str:
    """Return one sclite `trn` line: every character of `text` as a token, then `(speaker-utterance)`.

    `text` must be the normalized text without whitespace (`UtteranceScore.ref` or `.hyp`).
    NOTE: sclite reads `(`, `)`, `{`, `}` and `/` inside a transcript as markup, so a
    scoring normalization that keeps punctuation makes sclite's counts differ from ours.
    """
    tokens = " ".join(text)
    utterance_tag = f"({speaker}-{utterance_id})"
    return f"{tokens} {utterance_tag}" if tokens else utterance_tag


def write_trn(result: ScoreResult, ref_path: str | Path, hyp_path: str | Path, speakers: Mapping[str, str] | None = None) -> None:
    """Write the normalized references and hypotheses as sclite `trn` files, atomically.

    `speakers` maps utterance ids to speaker ids (`utt2spk`). An utterance without a
    speaker uses its own id as speaker id. A missing hypothesis is written as an empty line.
    """
    speakers = speakers or {}
    ref_lines, hyp_lines = [], []
    # sclite (sctk 2.4.10) misreads a trn line whose ids contain a parenthesis: it counted
    # "你 好 (u(5)-u(5))" as 3 words and gave it no speaker.
    bracketed = [utterance.utterance_id for utterance in result.utterances
                 if set("()") & set(utterance.utterance_id + speakers.get(utterance.utterance_id, ""))]
    if bracketed:
        logger.warning("%d utterance or speaker ids contain '(' or ')', which sclite cannot read in %s and %s "
                       "(first: %s); our CER is not affected", len(bracketed), ref_path, hyp_path, bracketed[0])
    for utterance in result.utterances:
        speaker = speakers.get(utterance.utterance_id, utterance.utterance_id)
        ref_lines.append(trn_line(utterance.ref, speaker, utterance.utterance_id) + "\n")
        hyp_lines.append(trn_line(utterance.hyp, speaker, utterance.utterance_id) + "\n")
    atomic_write_text(ref_path, "".join(ref_lines))
    atomic_write_text(hyp_path, "".join(hyp_lines))


def _display_width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(char) in ("W", "F") else 1 for char in text)


def _pad(text: str, width: int) -> str:
    return text + " " * (width - _display_width(text))


def format_alignment(utterance: UtteranceScore) -> str:
    """Return the ref, hyp, op and error lines of one utterance, columns aligned for CJK text.

    `*` marks the empty side of a deletion or an insertion.
    """
    ref_cells, hyp_cells = [], []
    ref_index = hyp_index = 0
    for op in utterance.ops:
        if op in "CS":
            ref_cells.append(utterance.ref[ref_index])
            hyp_cells.append(utterance.hyp[hyp_index])
            ref_index += 1
            hyp_index += 1
        elif op == "D":
            ref_cells.append(utterance.ref[ref_index])
            hyp_cells.append("*")
            ref_index += 1
        else:
            ref_cells.append("*")
            hyp_cells.append(utterance.hyp[hyp_index])
            hyp_index += 1

    widths = [max(_display_width(r), _display_width(h)) for r, h in zip(ref_cells, hyp_cells)]
    ref_line = " ".join(_pad(cell, width) for cell, width in zip(ref_cells, widths)).rstrip()
    hyp_line = " ".join(_pad(cell, width) for cell, width in zip(hyp_cells, widths)).rstrip()
    op_line = " ".join(_pad(op, width) for op, width in zip(utterance.ops, widths)).rstrip()

    cer = "n/a" if utterance.cer is None else f"{100 * utterance.cer:.2f}%"
    note = f" ({utterance.note})" if utterance.note else ""
    key = utterance.utterance_id
    return (
        f"{key} ref: {ref_line}\n"
        f"{key} hyp: {hyp_line}\n"
        f"{key} op:  {op_line}\n"
        f"{key} errors: S={utterance.substitutions} D={utterance.deletions} I={utterance.insertions} "
        f"N={utterance.ref_length} CER={cer}{note}\n"
    )


def write_alignments(result: ScoreResult, path: str | Path) -> None:
    """Write the alignment of every utterance (see `format_alignment`), blank line separated, atomically."""
    atomic_write_text(path, "\n".join(format_alignment(utterance) for utterance in result.utterances))


def write_summary(result: ScoreResult, path: str | Path, test_set: str, cfg: TextNormConfig) -> None:
    """Write the totals of one test set (`cer.txt`) atomically."""
    switches = " ".join(f"{name}={value}" for name, value in cfg.to_dict().items())
    text = (
        f"test set: {test_set}\n"
        f"{format_cer(result)}\n"
        f"hits: {result.hits}\n"
        f"errors: {result.errors}\n"
        f"utterances scored: {len(result.utterances)}\n"
        f"utterances with empty reference: {result.empty_refs}\n"
        f"references without hypothesis (scored as deletions): {len(result.missing_hyp)}\n"
        f"hypotheses without reference (ignored): {len(result.extra_hyp)}\n"
        f"normalization: {switches}, whitespace removed\n"
    )
    atomic_write_text(path, text)


def _git_commit(cwd: Path) -> str | None:
    """Return the short commit hash, marked when the tree has uncommitted changes; None outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit} (with uncommitted changes)" if status else commit


def _package_versions() -> dict[str, str]:
    versions = {}
    for package in _REPORTED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def provenance_lines(command: Sequence[str] | None = None) -> list[str]:
    """Return Markdown list items with the creation time, command, git commit and package versions.

    `command` defaults to the interpreter's own command line (`sys.orig_argv`).
    """
    command = list(sys.orig_argv if command is None else command)
    commit = _git_commit(Path.cwd()) or "unknown (not a git checkout)"
    versions = _package_versions()
    created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"- created: {created}",
        f"- command: `{shlex.join(command)}`",
        f"- git commit: {commit}",
        f"- python: {sys.version.split()[0]}; " + "; ".join(f"{name}: {version}" for name, version in versions.items()),
    ]


def write_results_md(
    path: str | Path,
    sections: Mapping[str, ScoreResult],
    config_dump: str = "",
    command: Sequence[str] | None = None,
) -> None:
    """Write `RESULTS.md`: one CER table row per test set, the command, git commit, package versions and config.

    `command` defaults to the interpreter's own command line (`sys.orig_argv`). Written atomically.
    """
    lines = [
        "# Results",
        "",
        *provenance_lines(command),
        "",
        "## Character error rate",
        "",
        "CER = (S + D + I) / N over reference characters, after the `scoring.text` normalization "
        "of both sides and with all whitespace removed.",
        "",
        "| test set | CER % | S | D | I | N | #utts |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for test_set, result in sections.items():
        rate = "n/a" if result.ref_length == 0 else f"{100 * result.cer:.2f}"
        lines.append(
            f"| {test_set} | {rate} | {result.substitutions} | {result.deletions} | {result.insertions} "
            f"| {result.ref_length} | {len(result.utterances)} |"
        )
        if result.missing_hyp:
            notes.append(f"- {test_set}: references without hypothesis (scored as deletions): {len(result.missing_hyp)}")
        if result.extra_hyp:
            notes.append(f"- {test_set}: hypotheses without reference (ignored): {len(result.extra_hyp)}")
    if notes:
        lines += ["", *notes]

    if config_dump:
        lines += ["", "## Config", "", "```yaml", config_dump.rstrip("\n"), "```"]
    atomic_write_text(path, "\n".join(lines) + "\n")


def score_test_set(ref_path: Path, hyp_path: Path, decode_dir: Path, test_set: str, cfg: TextNormConfig) -> ScoreResult:
    """Score one test set and write `cer.txt`, `align.txt`, `ref.trn` and `hyp.trn` in `decode_dir`.

    Speaker ids for the `trn` files come from `utt2spk` beside `ref_path`, when it exists.
    """
    if not ref_path.is_file():
        raise FileNotFoundError(f"reference transcripts not found: {ref_path} (written by stages 0 and 1)")
    if not hyp_path.is_file():
        raise FileNotFoundError(f"hypotheses not found: {hyp_path} (written by stage 4, decoding)")

    result = cer_counts(dict(read_table(ref_path)), dict(read_table(hyp_path)), cfg)
    write_alignments(result, decode_dir / "align.txt")
    write_summary(result, decode_dir / "cer.txt", test_set, cfg)

    utt2spk = ref_path.parent / "utt2spk"
    speakers = dict(read_table(utt2spk)) if utt2spk.is_file() else None
    write_trn(result, decode_dir / "ref.trn", decode_dir / "hyp.trn", speakers)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    from omegaconf import OmegaConf

    from sparlora.config import parse_stage_args

    cfg = parse_stage_args("Stage 5: score the decoded test sets (CER with S/D/I counts) and write RESULTS.md.", argv)
    norm_cfg = TextNormConfig.from_dict(cfg.scoring.text)
    exp_dir = Path(cfg.exp_dir)
    base_dir = Path(cfg.exp_root) / "base"
    finetuned = cfg.decode.checkpoint != "base"

    sections = {}
    for test_set in decode_split_names(cfg):
        ref_path = Path(cfg.data_dir) / test_set / "text"
        base_decode = base_dir / f"decode_{test_set}"
        base = score_test_set(ref_path, base_decode / "hyp", base_decode, test_set, norm_cfg)
        sections[f"{test_set} (base model, zero-shot)"] = base
        if not finetuned:
            print(f"{test_set}: zero-shot {format_cer(base)}", flush=True)
            continue
        decode_dir = exp_dir / f"decode_{test_set}"
        result = score_test_set(ref_path, decode_dir / "hyp", decode_dir, test_set, norm_cfg)
        sections[f"{test_set} ({cfg.tag})"] = result
        change = ""
        if base.cer and result.cer is not None:
            change = f", relative change {100 * (result.cer - base.cer) / base.cer:+.1f}%"
        print(f"{test_set}: zero-shot CER {_percent(base.cer)} -> fine-tuned CER {_percent(result.cer)}{change}", flush=True)

    results_path = (exp_dir if finetuned else base_dir) / "RESULTS.md"
    write_results_md(results_path, sections, OmegaConf.to_yaml(cfg))
    logger.info("wrote %s", results_path)
    return 0


def _percent(rate: float | None) -> str:
    return "n/a" if rate is None else f"{100 * rate:.2f}%"


if __name__ == "__main__":
    from sparlora.config import run_main

    raise SystemExit(run_main(main))
