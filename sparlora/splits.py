"""Derived data dirs: speaker-disjoint splits and nested training subsets by duration.

Usage: python -m sparlora.splits --config conf/demo.yaml +data=scales_and_noise [overrides...]

Both read a prepared data dir (stage 0 output: wav.scp, text, utt2spk, utt2dur and the
optional segments, reco2sr_ch, spk2gender, text.raw) and write new prepared dirs next to
it through `subset_data_dir`. That function keeps every table consistent in the way
Kaldi's `utils/subset_data_dir.sh --utt-list` does: the utterance tables are filtered by
the list, wav.scp and reco2sr_ch keep the recordings still used, spk2gender keeps the
speakers still used, and spk2utt is rebuilt. The source dir is only read.

Speaker split (`corpus.speaker_split`): for a corpus without an official split, divide
one prepared split into speaker-disjoint splits (for example train/dev/test) by shares
of speech hours or of speakers. Speakers who share a recording form one group and go to
the same split, so no recording is heard in two splits. Groups are visited in one seeded
order, and each goes to the split that is furthest below its target.

Training subsets (`corpus.subsets`): nested subsets such as 10h, 50h and 100h of one split
for data-scale experiments. One seeded order of utterances is drawn, and each subset is
the shortest prefix of it that reaches the requested duration. A smaller subset is
therefore part of every larger one, and a subset exceeds its target by less than the
duration of its last utterance. A request longer than the whole split is an error,
because a subset labelled 100h that contains 60h would mislabel the experiment.
"""

from __future__ import annotations

import logging
import math
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from omegaconf import OmegaConf

from sparlora.kaldi_io import atomic_write_text, read_table, write_table
from sparlora.prepare import OUTPUT_FILES, STAGE1_FILES, Utterance, check_id, read_data_dir

logger = logging.getLogger(__name__)

# Every dir written by subset_data_dir contains this report. A dir without it is never
# overwritten, so a name clash with a prepared split or a user's folder is an error.
SUBSET_REPORT = "subset_report.txt"
SPLIT_MEASURES = ("hours", "speakers")
SUBSET_ORDERS = ("utterance", "speaker")
ALL = "all"
# Tables of a prepared dir that subset_data_dir filters or rebuilds.
COPIED_TABLES = ("wav.scp", "segments", "text", "utt2spk", "spk2utt", "utt2dur", "reco2sr_ch", "spk2gender", "text.raw")
_DURATION = re.compile(r"(?P<number>\d+(?:\.\d+)?)(?P<unit>[hms])")
_SECONDS_PER_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0}


@dataclass(frozen=True)
class SubsetSummary:
    """Counts of one written data dir."""

    name: str
    path: Path
    utterances: int
    speakers: int
    recordings: int
    seconds: float

    @property
    def hours(self) -> float:
        return self.seconds / 3600

    def line(self) -> str:
        """Return the counts as one log line."""
        return (
            f"{self.name}: {self.utterances} utterances, {self.speakers} speaker(s), "
            f"{self.recordings} recording(s), {self.hours:.3f} h ({self.path})"
        )


def check_output_dir(dst: Path, src: Path, marker: str) -> None:
    """Raise unless `dst` may be written: outside `src`, and absent, empty or holding `marker`.

    `marker` is the report file that the writing function leaves in every dir it writes,
    so a rerun may replace its own output but never a prepared split or a user's folder.
    """
    src_resolved, dst_resolved = src.resolve(), dst.resolve()
    if dst_resolved == src_resolved or src_resolved in dst_resolved.parents:
        raise ValueError(f"output dir {dst} must be outside the source data dir {src}, which is only read")
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"output dir {dst} exists and is not a folder; choose another name or remove it")
    if dst.is_dir() and any(dst.iterdir()) and not (dst / marker).is_file():
        raise FileExistsError(
            f"output dir {dst} exists, is not empty and has no {marker}, so this tool did not write it; "
            "choose another split or subset name, or remove the folder"
        )


def _check_unique(ids: Sequence[str], kind: str) -> None:
    counts = Counter(ids)
    repeated = sorted(key for key, count in counts.items() if count > 1)
    if repeated:
        examples = ", ".join(repeated[:5]) + (", ..." if len(repeated) > 5 else "")
        raise ValueError(f"{len(repeated)} {kind} appear more than once in the utterance list: {examples}")


def _filter_rows(rows: list[tuple[str, str]], keep: set[str]) -> list[tuple[str, str]]:
    return [(key, value) for key, value in rows if key in keep]


def _require_entries(table: dict[str, str], keys: Iterable[str], path: Path, hint: str) -> None:
    missing = [key for key in keys if key not in table]
    if missing:
        examples = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise ValueError(f"{path}: no entry for {len(missing)} id(s): {examples}; {hint}")


def subset_data_dir(src: Path, dst: Path, utterance_ids: Iterable[str], description: str = "") -> SubsetSummary:
    """Write the prepared data dir `dst` with only the listed utterances of `src`.

    Rows keep the order of `src`, and text.raw is filtered like text. Files that stages
    1 and 2 derive (text.dropped, oov.txt, data.jsonl) are not copied and are removed
    from `dst`, because they describe other utterances. Raises ValueError when
    the list is empty, repeats an id or names an utterance missing from `src/text`, and
    when a table of `src` lacks an entry that another refers to. `description` goes into
    `dst/subset_report.txt`.
    """
    src, dst = Path(src), Path(dst)
    ids = list(utterance_ids)
    if not ids:
        raise ValueError(f"empty utterance list for {dst}: a data dir needs at least one utterance")
    _check_unique(ids, "utterance ids")
    check_output_dir(dst, src, SUBSET_REPORT)

    text = read_table(src / "text")
    text_ids = {key for key, _ in text}
    unknown = [utt for utt in ids if utt not in text_ids]
    if unknown:
        examples = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise ValueError(
            f"{len(unknown)} of {len(ids)} listed utterances are not in {src / 'text'}: {examples}; "
            "list only utterances of that data dir"
        )
    keep = set(ids)
    hint = f"rerun stage 0 for {src}"

    utt2spk_rows = read_table(src / "utt2spk")
    utt2dur_rows = read_table(src / "utt2dur")
    utt2dur = dict(utt2dur_rows)
    _require_entries(dict(utt2spk_rows), keep, src / "utt2spk", hint)
    _require_entries(utt2dur, keep, src / "utt2dur", hint)

    segments_path = src / "segments"
    segments = read_table(segments_path) if segments_path.is_file() else None
    if segments is None:
        recording_of = {utt: utt for utt in keep}
    else:
        segment_map = dict(segments)
        _require_entries(segment_map, keep, segments_path, hint)
        recording_of = {}
        for utt in keep:
            fields = segment_map[utt].split()
            if len(fields) != 3:
                raise ValueError(f"{segments_path}: invalid line for {utt!r}: expected '<recording> <start> <end>'; {hint}")
            recording_of[utt] = fields[0]
    recordings = set(recording_of.values())
    wav = read_table(src / "wav.scp")
    _require_entries(dict(wav), recordings, src / "wav.scp", hint)

    dst.mkdir(parents=True, exist_ok=True)
    # The marker goes first, so a rerun may replace a dir that a failed run left half written.
    atomic_write_text(dst / SUBSET_REPORT, "status: incomplete\n")
    write_table(dst / "wav.scp", _filter_rows(wav, recordings))
    if segments is not None:
        write_table(dst / "segments", _filter_rows(segments, keep))
    else:
        (dst / "segments").unlink(missing_ok=True)
    write_table(dst / "text", _filter_rows(text, keep))
    kept_utt2spk = _filter_rows(utt2spk_rows, keep)
    write_table(dst / "utt2spk", kept_utt2spk)
    write_table(dst / "utt2dur", _filter_rows(utt2dur_rows, keep))

    spk2utt: dict[str, list[str]] = {}
    for utt, speaker in kept_utt2spk:
        spk2utt.setdefault(speaker, []).append(utt)
    write_table(dst / "spk2utt", [(speaker, " ".join(utts)) for speaker, utts in sorted(spk2utt.items())])

    _copy_filtered_optional(src, dst, "reco2sr_ch", recordings)
    _copy_filtered_optional(src, dst, "spk2gender", set(spk2utt))
    _copy_filtered_optional(src, dst, "text.raw", keep)
    for name in STAGE1_FILES:
        if name != "text.raw":
            (dst / name).unlink(missing_ok=True)
    not_copied = [name for name in OUTPUT_FILES if name not in COPIED_TABLES and (src / name).is_file()]
    if not_copied:
        logger.warning("%s: %s not copied to %s, because subset_data_dir does not know how to filter them",
                       src, ", ".join(not_copied), dst)

    seconds = sum(float(utt2dur[utt]) for utt in keep)
    summary = SubsetSummary(dst.name, dst, len(keep), len(spk2utt), len(recordings), seconds)
    report = [
        f"source: {src}",
        f"description: {description}" if description else "description: utterance list",
        f"utterances: {summary.utterances}",
        f"speakers: {summary.speakers}",
        f"recordings: {summary.recordings}",
        f"hours: {summary.hours:.4f}",
    ]
    atomic_write_text(dst / SUBSET_REPORT, "\n".join(report) + "\n")
    return summary


def _copy_filtered_optional(src: Path, dst: Path, name: str, keep: set[str]) -> None:
    """Copy `src/name` filtered to the keys in `keep`, or remove `dst/name` when `src` has none."""
    if (src / name).is_file():
        write_table(dst / name, _filter_rows(read_table(src / name), keep))
    else:
        (dst / name).unlink(missing_ok=True)


# --- speaker-disjoint splits -------------------------------------------------------


@dataclass
class SpeakerGroup:
    """Speakers that must stay in one split: one speaker, or several sharing a recording."""

    speakers: list[str]
    utterances: list[str] = field(default_factory=list)
    seconds: float = 0.0


def speaker_groups(utterances: Sequence[Utterance]) -> list[SpeakerGroup]:
    """Group speakers connected through shared recordings, sorted by their first speaker id.

    Without segments each utterance is its own recording, so every speaker is a group of
    one. With segments of a conversation, the speakers of one recording form one group.
    """
    parent: dict[str, str] = {}

    def find(speaker: str) -> str:
        while parent[speaker] != speaker:
            parent[speaker] = parent[parent[speaker]]
            speaker = parent[speaker]
        return speaker

    first_speaker_of_recording: dict[str, str] = {}
    for utt in utterances:
        parent.setdefault(utt.speaker, utt.speaker)
        other = first_speaker_of_recording.setdefault(utt.recording, utt.speaker)
        root_a, root_b = find(utt.speaker), find(other)
        if root_a != root_b:
            parent[max(root_a, root_b)] = min(root_a, root_b)

    groups: dict[str, SpeakerGroup] = {}
    for speaker in sorted(parent):
        groups.setdefault(find(speaker), SpeakerGroup(speakers=[])).speakers.append(speaker)
    for utt in utterances:
        group = groups[find(utt.speaker)]
        group.utterances.append(utt.id)
        group.seconds += utt.duration
    return sorted(groups.values(), key=lambda group: group.speakers[0])


def normalize_shares(shares: Mapping[str, float]) -> dict[str, float]:
    """Return the shares divided by their sum; raise ValueError for names or values that cannot be used."""
    if len(shares) < 2:
        raise ValueError(f"invalid shares {dict(shares)}: give at least two splits, e.g. {{train: 0.9, test: 0.1}}")
    for name, share in shares.items():
        reason = check_id(str(name))
        if reason is not None:
            raise ValueError(f"invalid split name {name!r}: {reason}")
        if not isinstance(share, (int, float)) or isinstance(share, bool) or not math.isfinite(share) or share <= 0:
            raise ValueError(f"invalid share {share!r} for split {name!r}: expected a positive number")
    total = float(sum(shares.values()))
    return {str(name): float(share) / total for name, share in shares.items()}


def assign_speaker_groups(
    groups: Sequence[SpeakerGroup], shares: Mapping[str, float], by: str, seed: int, source: str = "the data dir"
) -> dict[str, list[SpeakerGroup]]:
    """Assign every group to one split; return split name -> groups, in the order of `shares`.

    `by` is "hours" (shares of speech duration) or "speakers" (shares of speaker count).
    Groups are shuffled with `seed`, and each goes to the split with the largest deficit
    (target minus the amount assigned so far). Ties go to the split listed first. A split left
    empty then takes the smallest group of the split with the most groups. Raises
    ValueError when there are fewer groups than splits.
    """
    if by not in SPLIT_MEASURES:
        raise ValueError(f"invalid split measure {by!r}: expected one of {', '.join(SPLIT_MEASURES)}")
    fractions = normalize_shares(shares)
    if len(groups) < len(fractions):
        raise ValueError(
            f"{source} has {len(groups)} speaker group(s) (speakers sharing a recording count as one), "
            f"fewer than the {len(fractions)} splits requested ({', '.join(fractions)}); "
            "request fewer splits or use a corpus with more speakers"
        )

    def amount(group: SpeakerGroup) -> float:
        return group.seconds if by == "hours" else float(len(group.speakers))

    order = list(groups)
    random.Random(seed).shuffle(order)
    total = sum(amount(group) for group in order)
    targets = {name: fraction * total for name, fraction in fractions.items()}
    assigned: dict[str, list[SpeakerGroup]] = {name: [] for name in fractions}
    filled = dict.fromkeys(fractions, 0.0)
    for group in order:
        name = max(fractions, key=lambda split: targets[split] - filled[split])
        assigned[name].append(group)
        filled[name] += amount(group)

    for name in fractions:
        if assigned[name]:
            continue
        donor = max(fractions, key=lambda split: len(assigned[split]))
        smallest = min(assigned[donor], key=lambda group: (amount(group), group.speakers[0]))
        assigned[donor].remove(smallest)
        assigned[name].append(smallest)
        logger.info("split %s was empty after assignment, so it took speaker group %s from %s",
                    name, ",".join(smallest.speakers), donor)
    return assigned


def split_by_speaker(
    src: Path, out_root: Path, shares: Mapping[str, float], by: str = "hours", seed: int = 1234
) -> list[SubsetSummary]:
    """Divide the prepared dir `src` into speaker-disjoint dirs `out_root/<split>`.

    Returns one summary per split in the order of `shares`, and logs them with the
    target and achieved shares. See `assign_speaker_groups` for the rule.
    """
    src, out_root = Path(src), Path(out_root)
    utterances = read_data_dir(src)
    groups = speaker_groups(utterances)
    speakers = sum(len(group.speakers) for group in groups)
    if speakers == len(utterances):
        logger.warning(
            "%s: every speaker has exactly one utterance, so utt2spk probably maps each utterance to itself; "
            "the split is disjoint by utterance (and recording), not by real speaker", src,
        )
    shared = [group for group in groups if len(group.speakers) > 1]
    if shared:
        logger.info("%s: %d groups of speakers share recordings and stay together (%d speakers)",
                    src, len(shared), sum(len(group.speakers) for group in shared))

    for name in shares:
        check_output_dir(out_root / str(name), src, SUBSET_REPORT)
    assigned = assign_speaker_groups(groups, shares, by, seed, source=str(src))
    fractions = normalize_shares(shares)
    total_seconds = sum(group.seconds for group in groups)
    summaries = []
    for name, split_groups in assigned.items():
        ids = [utt for group in split_groups for utt in group.utterances]
        description = f"speaker split of {src.name}: share {fractions[name]:.4f} by {by}, seed {seed}"
        summary = subset_data_dir(src, out_root / name, ids, description)
        summaries.append(summary)
        achieved = summary.seconds / total_seconds if by == "hours" else summary.speakers / speakers
        logger.info("%s; target share %.3f, achieved %.3f by %s", summary.line(), fractions[name], achieved, by)
    return summaries


# --- nested training subsets ---------------------------------------------------------


def parse_duration(size: str) -> float | None:
    """Return a subset size such as "10h", "30m", "90s" or "1.5h" in seconds, or None for "all"."""
    text = str(size).strip()
    if text == ALL:
        return None
    match = _DURATION.fullmatch(text)
    if match is None or float(match["number"]) <= 0:
        raise ValueError(
            f"invalid subset size {size!r}: expected a positive number with a unit h, m or s "
            f"(e.g. 10h, 30m, 90s) or {ALL!r}"
        )
    return float(match["number"]) * _SECONDS_PER_UNIT[match["unit"]]


def subset_order(utterances: Sequence[Utterance], order: str, seed: int) -> list[Utterance]:
    """Return the utterances in the seeded order whose prefixes are the subsets.

    "utterance" shuffles all utterances, so even a small subset has most speakers.
    "speaker" shuffles the speakers and then each speaker's utterances, so a small
    subset has few speakers with all their data, and only the last speaker is partial.
    """
    if order not in SUBSET_ORDERS:
        raise ValueError(f"invalid subset order {order!r}: expected one of {', '.join(SUBSET_ORDERS)}")
    rng = random.Random(seed)
    by_id = sorted(utterances, key=lambda utt: utt.id)
    if order == "utterance":
        rng.shuffle(by_id)
        return by_id

    by_speaker: dict[str, list[Utterance]] = {}
    for utt in by_id:
        by_speaker.setdefault(utt.speaker, []).append(utt)
    speaker_order = sorted(by_speaker)
    rng.shuffle(speaker_order)
    ordered = []
    for speaker in speaker_order:
        own = by_speaker[speaker]
        rng.shuffle(own)
        ordered.extend(own)
    return ordered


def prefix_for_duration(ordered: Sequence[Utterance], target_seconds: float) -> list[Utterance]:
    """Return the shortest prefix of `ordered` whose total duration reaches `target_seconds`."""
    total = 0.0
    for count, utt in enumerate(ordered, start=1):
        total += utt.duration
        if total >= target_seconds:
            return list(ordered[:count])
    return list(ordered)


def subset_name(source: str, size: str) -> str:
    """Return the data dir name of a subset, e.g. `train_10h`."""
    name = f"{source}_{str(size).strip()}"
    reason = check_id(name)
    if reason is not None:
        raise ValueError(f"invalid subset name {name!r}: {reason}")
    return name


def make_duration_subsets(
    src: Path, out_root: Path, sizes: Sequence[str], order: str = "utterance", seed: int = 1234
) -> list[SubsetSummary]:
    """Write nested subsets of the prepared dir `src` as `out_root/<src name>_<size>`.

    `sizes` are strings for `parse_duration`, e.g. ["10h", "50h", "all"]. Raises
    ValueError before anything is written when a size is invalid or repeated, or when
    a size exceeds the duration of `src`. The message then gives the duration of `src`.
    """
    src, out_root = Path(src), Path(out_root)
    if not sizes:
        raise ValueError("no subset sizes given: list sizes such as 10h, 50h or all")
    requested = [(str(size).strip(), parse_duration(size)) for size in sizes]
    _check_unique([size for size, _ in requested], "subset sizes")

    utterances = read_data_dir(src)
    total = sum(utt.duration for utt in utterances)
    too_long = [size for size, seconds in requested if seconds is not None and seconds > total]
    if too_long:
        raise ValueError(
            f"{src} contains {total / 3600:.3f} h of speech, less than the requested subset(s) "
            f"{', '.join(too_long)}; lower these sizes or use {ALL!r} for the whole split"
        )

    for size, _ in requested:
        check_output_dir(out_root / subset_name(src.name, size), src, SUBSET_REPORT)
    ordered = subset_order(utterances, order, seed)
    summaries = []
    for size, seconds in sorted(requested, key=lambda item: math.inf if item[1] is None else item[1]):
        chosen = ordered if seconds is None else prefix_for_duration(ordered, seconds)
        description = f"duration subset {size} of {src.name}: first utterances of the {order} order, seed {seed}"
        summary = subset_data_dir(src, out_root / subset_name(src.name, size), [utt.id for utt in chosen], description)
        logger.info("%s; requested %s", summary.line(), size)
        summaries.append(summary)
    return summaries


# --- configuration -------------------------------------------------------------------


def _section(cfg: Any, key: str) -> Any:
    return OmegaConf.select(cfg, key, default=None)


def split_names(cfg: Any) -> list[str]:
    """Return the names of the speaker splits and subsets that the config sets."""
    names = []
    speaker_split = _section(cfg, "corpus.speaker_split")
    if speaker_split is not None:
        names += [str(name) for name in speaker_split.shares]
    subsets = _section(cfg, "corpus.subsets")
    if subsets is not None:
        names += [subset_name(str(subsets.source), str(size)) for size in subsets.sizes]
    return names


def prepared_split_names(cfg: Any) -> list[str]:
    """Return every prepared dir that stages 1 and 2 should process, without repeats.

    These are the keys of `corpus.splits`, then the speaker splits and subsets of this
    module, then the noisy copies of `sparlora.noise`.
    """
    from sparlora.noise import noisy_split_names

    names = [str(name) for name in cfg.corpus.splits] + split_names(cfg) + noisy_split_names(cfg)
    return list(dict.fromkeys(names))


def make_configured_splits(cfg: Any) -> list[SubsetSummary]:
    """Write the speaker split, then the subsets, that `cfg.corpus` configures."""
    data_dir = Path(cfg.data_dir)
    summaries = []
    speaker_split = _section(cfg, "corpus.speaker_split")
    if speaker_split is not None:
        shares = OmegaConf.to_container(speaker_split.shares, resolve=True)
        summaries += split_by_speaker(
            data_dir / str(speaker_split.source), data_dir, shares, str(speaker_split.by), int(speaker_split.seed)
        )
    subsets = _section(cfg, "corpus.subsets")
    if subsets is not None:
        sizes = [str(size) for size in subsets.sizes]
        summaries += make_duration_subsets(
            data_dir / str(subsets.source), data_dir, sizes, str(subsets.order), int(subsets.seed)
        )
    if not summaries:
        logger.info("neither corpus.speaker_split nor corpus.subsets is set: no data dir to write")
    return summaries


def main(argv: Sequence[str] | None = None) -> int:
    from sparlora.config import parse_stage_args

    cfg = parse_stage_args("Write speaker-disjoint splits and nested duration subsets of prepared data dirs.", argv)
    make_configured_splits(cfg)
    warn_unlisted_derived_dirs(cfg)
    return 0


def warn_unlisted_derived_dirs(cfg: Any) -> list[str]:
    """Log a warning naming derived dirs in data_dir that the config no longer writes, and return them.

    A derived dir (speaker split, subset or noisy copy) stays on disk when its setting is
    removed, and then reflects an older stage 0. Later stages only read the dirs that the
    config lists, but a config that names one again would pick up the old copy.
    """
    from sparlora.noise import NOISE_REPORT

    data_dir = Path(cfg.data_dir)
    listed = set(prepared_split_names(cfg))
    unlisted = sorted(
        path.name
        for path in data_dir.glob("*")
        if path.is_dir() and path.name not in listed and ((path / SUBSET_REPORT).is_file() or (path / NOISE_REPORT).is_file())
    )
    if unlisted:
        logger.warning(
            "%s has derived data dirs that the config no longer writes, so they may reflect an older stage 0: %s; "
            "remove them if they are stale", data_dir, ", ".join(unlisted)
        )
    return unlisted


if __name__ == "__main__":
    from sparlora.config import run_main

    sys.exit(run_main(main))
