"""Tests for sparlora.splits: utterance-list subsets, speaker-disjoint splits, nested duration subsets."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from sparlora.kaldi_io import read_table
from sparlora.prepare import Utterance, read_data_dir
from sparlora.splits import (
    SUBSET_REPORT,
    SpeakerGroup,
    assign_speaker_groups,
    main,
    make_duration_subsets,
    parse_duration,
    speaker_groups,
    split_by_speaker,
    subset_data_dir,
)

REPO = Path(__file__).resolve().parents[1]
SHARES = {"train": 0.8, "dev": 0.1, "test": 0.1}


def write_table_lines(path: Path, rows: list[tuple[str, str]]) -> None:
    path.write_text("".join(f"{key} {value}\n" for key, value in rows), encoding="utf-8")


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def make_prepared_dir(root: Path, speakers: int = 20, seed: int = 0, with_segments: bool = False) -> Path:
    """Write a prepared data dir with `speakers` speakers of 3 to 12 utterances of 1 to 4 s.

    With segments, each speaker's utterances are cut from one recording `rec-<speaker>`,
    except that spk00 and spk01 share the recording `rec-shared`.
    """
    rng = random.Random(seed)
    rows: dict[str, list[tuple[str, str]]] = {name: [] for name in ("wav.scp", "text", "utt2spk", "utt2dur", "segments", "reco2sr_ch", "text.raw")}
    spk2utt, recordings = [], {}
    for index in range(speakers):
        speaker = f"spk{index:02d}"
        utts = []
        recording = "rec-shared" if with_segments and index < 2 else f"rec-{speaker}"
        for number in range(rng.randint(3, 12)):
            utt = f"{speaker}-{number:03d}"
            seconds = rng.randint(1000, 4000) / 1000
            utts.append(utt)
            rows["text"].append((utt, f"今天{index}号"))
            rows["text.raw"].append((utt, f"今天 {index} 号!"))
            rows["utt2spk"].append((utt, speaker))
            rows["utt2dur"].append((utt, f"{seconds:.3f}"))
            if with_segments:
                start = recordings.get(recording, 0.0)
                rows["segments"].append((utt, f"{recording} {start:.3f} {start + seconds:.3f}"))
                recordings[recording] = start + seconds
            else:
                recordings[utt] = seconds
        spk2utt.append((speaker, " ".join(utts)))

    data = root / "all"
    data.mkdir(parents=True)
    rows["wav.scp"] = [(rec, f"/corpus/{rec}.wav") for rec in sorted(recordings)]
    rows["reco2sr_ch"] = [(rec, "16000 1") for rec in sorted(recordings)]
    for name, table in rows.items():
        if name == "segments" and not with_segments:
            continue
        key_order = sorted(table) if name not in ("wav.scp", "reco2sr_ch") else table
        write_table_lines(data / name, key_order)
    write_table_lines(data / "spk2utt", spk2utt)
    write_table_lines(data / "spk2gender", [(f"spk{i:02d}", "f" if i % 2 else "m") for i in range(speakers)] + [("spk99", "m")])
    (data / "data.jsonl").write_text('{"key": "stale"}\n', encoding="utf-8")
    return data


@pytest.fixture
def prepared(tmp_path) -> Path:
    return make_prepared_dir(tmp_path)


@pytest.fixture
def prepared_segments(tmp_path) -> Path:
    return make_prepared_dir(tmp_path, with_segments=True)


def keys(path: Path) -> list[str]:
    return [key for key, _ in read_table(path)]


def speakers_of(data_dir: Path) -> set[str]:
    return {speaker for _, speaker in read_table(data_dir / "utt2spk")}


def total_seconds(data_dir: Path) -> float:
    return sum(float(value) for _, value in read_table(data_dir / "utt2dur"))


# --- subset_data_dir -------------------------------------------------------------------


def test_subset_filters_every_table(prepared_segments, tmp_path):
    src = prepared_segments
    before = tree_hashes(src)
    chosen = ["spk00-001", "spk01-000", "spk05-002", "spk05-000"]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "oov.txt").write_text("stale\n", encoding="utf-8")
    (tmp_path / "sub" / SUBSET_REPORT).write_text("earlier run\n", encoding="utf-8")

    summary = subset_data_dir(src, tmp_path / "sub", chosen)

    dst = tmp_path / "sub"
    expected = sorted(chosen)
    assert keys(dst / "text") == expected
    assert keys(dst / "text.raw") == expected
    assert keys(dst / "utt2spk") == expected
    assert keys(dst / "utt2dur") == expected
    assert keys(dst / "segments") == expected
    assert keys(dst / "wav.scp") == ["rec-shared", "rec-spk05"]
    assert keys(dst / "reco2sr_ch") == ["rec-shared", "rec-spk05"]
    assert dict(read_table(dst / "spk2utt")) == {"spk00": "spk00-001", "spk01": "spk01-000", "spk05": "spk05-000 spk05-002"}
    assert dict(read_table(dst / "spk2gender")) == {"spk00": "m", "spk01": "f", "spk05": "f"}
    assert dict(read_table(dst / "segments"))["spk05-002"] == dict(read_table(src / "segments"))["spk05-002"]
    assert not (dst / "data.jsonl").exists()
    assert not (dst / "oov.txt").exists()
    assert summary.utterances == 4
    assert summary.speakers == 3
    assert summary.recordings == 2
    assert summary.seconds == pytest.approx(sum(float(v) for k, v in read_table(src / "utt2dur") if k in chosen))
    assert tree_hashes(src) == before


def test_subset_is_readable_as_prepared_dir(prepared, tmp_path):
    subset_data_dir(prepared, tmp_path / "sub", ["spk03-000", "spk03-001"])

    utterances = read_data_dir(tmp_path / "sub")

    assert [utt.id for utt in utterances] == ["spk03-000", "spk03-001"]
    assert not (tmp_path / "sub" / "segments").exists()


def test_subset_unknown_utterance_raises(prepared, tmp_path):
    with pytest.raises(ValueError, match=r"1 of 2 listed utterances are not in .*text: nobody-001"):
        subset_data_dir(prepared, tmp_path / "sub", ["spk00-000", "nobody-001"])
    assert not (tmp_path / "sub").exists()


def test_subset_repeated_utterance_raises(prepared, tmp_path):
    with pytest.raises(ValueError, match="appear more than once in the utterance list: spk00-000"):
        subset_data_dir(prepared, tmp_path / "sub", ["spk00-000", "spk00-000"])


def test_subset_empty_list_raises(prepared, tmp_path):
    with pytest.raises(ValueError, match="empty utterance list"):
        subset_data_dir(prepared, tmp_path / "sub", [])


def test_subset_never_overwrites_foreign_dir(prepared, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "text").write_text("keep me\n", encoding="utf-8")

    with pytest.raises(FileExistsError, match="has no subset_report.txt"):
        subset_data_dir(prepared, foreign, ["spk00-000"])
    with pytest.raises(ValueError, match="must be outside the source data dir"):
        subset_data_dir(prepared, prepared, ["spk00-000"])

    assert (foreign / "text").read_text(encoding="utf-8") == "keep me\n"
    assert sorted(p.name for p in foreign.iterdir()) == ["text"]


# --- speaker split -----------------------------------------------------------------------


def test_speaker_split_is_disjoint_and_complete(prepared, tmp_path):
    summaries = split_by_speaker(prepared, tmp_path / "out", SHARES, by="hours", seed=7)

    assert [summary.name for summary in summaries] == ["train", "dev", "test"]
    speaker_sets = [speakers_of(tmp_path / "out" / name) for name in SHARES]
    assert all(speaker_sets)
    assert sum(len(s) for s in speaker_sets) == 20
    assert set().union(*speaker_sets) == speakers_of(prepared)
    utterance_lists = [keys(tmp_path / "out" / name / "text") for name in SHARES]
    assert sorted(u for utts in utterance_lists for u in utts) == keys(prepared / "text")
    train_share = total_seconds(tmp_path / "out" / "train") / total_seconds(prepared)
    assert 0.7 < train_share < 0.9


def test_speaker_split_by_speaker_count(prepared, tmp_path):
    split_by_speaker(prepared, tmp_path / "out", {"train": 8, "dev": 1, "test": 1}, by="speakers", seed=3)

    assert [len(speakers_of(tmp_path / "out" / name)) for name in SHARES] == [16, 2, 2]


def test_speaker_split_deterministic_per_seed(prepared, tmp_path):
    split_by_speaker(prepared, tmp_path / "a", SHARES, seed=11)
    split_by_speaker(prepared, tmp_path / "b", SHARES, seed=11)
    split_by_speaker(prepared, tmp_path / "c", SHARES, seed=12)

    for name in SHARES:
        assert keys(tmp_path / "a" / name / "text") == keys(tmp_path / "b" / name / "text")
    assigned = [[speakers_of(tmp_path / run / name) for name in SHARES] for run in ("a", "c")]
    assert assigned[0] != assigned[1]


def test_speaker_split_keeps_shared_recording_together(prepared_segments, tmp_path):
    groups = speaker_groups(read_data_dir(prepared_segments))
    assert groups[0].speakers == ["spk00", "spk01"]
    assert len(groups) == 19

    for seed in range(5):
        out = tmp_path / f"seed{seed}"
        split_by_speaker(prepared_segments, out, SHARES, seed=seed)
        containing = [name for name in SHARES if {"spk00", "spk01"} & speakers_of(out / name)]
        assert len(containing) == 1
        assert {"spk00", "spk01"} <= speakers_of(out / containing[0])
        recordings = [set(keys(out / name / "wav.scp")) for name in SHARES]
        assert sum(len(r) for r in recordings) == len(set().union(*recordings))


def test_speaker_split_foreign_dir_writes_nothing(prepared, tmp_path):
    (tmp_path / "out" / "test").mkdir(parents=True)
    (tmp_path / "out" / "test" / "text").write_text("keep me\n", encoding="utf-8")

    with pytest.raises(FileExistsError, match="out/test exists, is not empty and has no subset_report.txt"):
        split_by_speaker(prepared, tmp_path / "out", SHARES)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["test"]


def test_speaker_split_too_few_speakers_raises(tmp_path):
    data = make_prepared_dir(tmp_path, speakers=2)

    with pytest.raises(ValueError, match=r"has 2 speaker group\(s\).*fewer than the 3 splits"):
        split_by_speaker(data, tmp_path / "out", SHARES)
    assert not (tmp_path / "out").exists()


def test_speaker_split_fills_empty_split():
    # Targets 9.45/9.45/2.1 s: after the greedy pass some orders leave `test` empty, and
    # the smallest group (c) then moves there from the split containing two groups.
    groups = [SpeakerGroup(["a"], ["a-1"], 10.0), SpeakerGroup(["b"], ["b-1"], 10.0), SpeakerGroup(["c"], ["c-1"], 1.0)]
    for seed in range(12):
        assigned = assign_speaker_groups(groups, {"train": 0.45, "dev": 0.45, "test": 0.10}, "hours", seed)
        assert [group.speakers for group in assigned["test"]] == [["c"]]
        assert len(assigned["train"]) == 1
        assert len(assigned["dev"]) == 1


@pytest.mark.parametrize(
    "shares, by, message",
    [
        ({"train": 1.0}, "hours", "at least two splits"),
        ({"train": 0.9, "test": 0.0}, "hours", "invalid share 0.0 for split 'test'"),
        ({"train": 0.9, "te st": 0.1}, "hours", "invalid split name 'te st'"),
        ({"train": 0.9, "test": 0.1}, "minutes", "invalid split measure 'minutes'"),
    ],
)
def test_speaker_split_invalid_settings_raise(shares, by, message):
    groups = [SpeakerGroup([f"s{i}"], [f"s{i}-1"], 1.0) for i in range(4)]
    with pytest.raises(ValueError, match=message):
        assign_speaker_groups(groups, shares, by, 0)


# --- duration subsets --------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, seconds",
    [("10h", 36000.0), ("30m", 1800.0), ("90s", 90.0), ("1.5h", 5400.0), ("all", None)],
)
def test_parse_duration_valid(size, seconds):
    assert parse_duration(size) == seconds


@pytest.mark.parametrize("size", ["10", "h", "-1h", "0h", "10 hours", "1e3s"])
def test_parse_duration_invalid(size):
    with pytest.raises(ValueError, match="invalid subset size"):
        parse_duration(size)


@pytest.mark.parametrize("order", ["utterance", "speaker"])
def test_duration_subsets_nested_and_on_target(prepared, tmp_path, order):
    durations = {key: float(value) for key, value in read_table(prepared / "utt2dur")}
    summaries = make_duration_subsets(prepared, tmp_path / "out", ["2m", "30s", "all", "1m"], order=order, seed=5)

    assert [summary.name for summary in summaries] == ["all_30s", "all_1m", "all_2m", "all_all"]
    subsets = [set(keys(tmp_path / "out" / summary.name / "text")) for summary in summaries]
    for smaller, larger in zip(subsets, subsets[1:]):
        assert smaller < larger
    assert subsets[-1] == set(durations)
    longest = max(durations.values())
    for summary, target in zip(summaries, (30.0, 60.0, 120.0)):
        hours = sum(durations[utt] for utt in keys(tmp_path / "out" / summary.name / "text"))
        assert target <= hours < target + longest
        assert summary.seconds == pytest.approx(hours)


def test_duration_subsets_speaker_order_keeps_speakers_whole(prepared, tmp_path):
    make_duration_subsets(prepared, tmp_path / "out", ["1m"], order="speaker", seed=5)

    subset = tmp_path / "out" / "all_1m"
    full = {speaker: set(utts.split()) for speaker, utts in read_table(prepared / "spk2utt")}
    partial = [speaker for speaker, utts in read_table(subset / "spk2utt") if set(utts.split()) != full[speaker]]
    assert len(partial) <= 1
    assert len(speakers_of(subset)) < len(full)


def test_duration_subsets_deterministic_per_seed(prepared, tmp_path):
    for run, seed in (("a", 1), ("b", 1), ("c", 2)):
        make_duration_subsets(prepared, tmp_path / run, ["1m"], seed=seed)

    a, b, c = (keys(tmp_path / run / "all_1m" / "text") for run in ("a", "b", "c"))
    assert a == b
    assert a != c


def test_duration_subset_larger_than_split_raises(prepared, tmp_path):
    hours = total_seconds(prepared) / 3600

    with pytest.raises(ValueError, match=rf"contains {hours:.3f} h of speech, less than the requested subset\(s\) 1h; .*'all'"):
        make_duration_subsets(prepared, tmp_path / "out", ["1m", "1h"])
    assert not (tmp_path / "out").exists()


def test_duration_subsets_repeated_size_raises(prepared, tmp_path):
    with pytest.raises(ValueError, match="subset sizes appear more than once"):
        make_duration_subsets(prepared, tmp_path / "out", ["1m", "1m"])


def test_speaker_groups_of_utterances():
    utterances = [
        Utterance("u1", "/a.wav", 0.0, 1.0, "x", "s1", 1.0, "r1"),
        Utterance("u2", "/a.wav", 1.0, 2.0, "x", "s2", 1.0, "r1"),
        Utterance("u3", "/b.wav", 0.0, 2.5, "x", "s3", 2.5, "r2"),
        Utterance("u4", "/c.wav", 0.0, 1.0, "x", "s2", 1.0, "r3"),
        Utterance("u5", "/c.wav", 1.0, 2.0, "x", "s4", 1.0, "r3"),
    ]

    groups = speaker_groups(utterances)

    assert [group.speakers for group in groups] == [["s1", "s2", "s4"], ["s3"]]
    assert [group.utterances for group in groups] == [["u1", "u2", "u4", "u5"], ["u3"]]
    assert [group.seconds for group in groups] == [4.0, 2.5]


# --- command line ------------------------------------------------------------------------


def test_main_writes_configured_dirs(prepared, tmp_path):
    data_dir = prepared.parent
    argv = [
        "--config", str(REPO / "conf" / "demo.yaml"), "+data=scales_and_noise", f"data_dir={data_dir}",
        "corpus.speaker_split.source=all", "corpus.subsets.source=all", "corpus.subsets.sizes=[30s,all]",
    ]

    assert main(argv) == 0

    written = sorted(p.name for p in data_dir.iterdir())
    assert written == ["all", "all_30s", "all_all", "spk_dev", "spk_test", "spk_train"]
    assert set(keys(data_dir / "all_all" / "text")) == set(keys(prepared / "text"))


def test_unlisted_derived_dirs_warned(tmp_path, caplog):
    from omegaconf import OmegaConf

    from sparlora.splits import SUBSET_REPORT, warn_unlisted_derived_dirs

    for name in ("train", "train_10m", "dev"):
        (tmp_path / name).mkdir()
    (tmp_path / "train_10m" / SUBSET_REPORT).write_text("source: train\n", encoding="utf-8")
    cfg = OmegaConf.create({"data_dir": str(tmp_path), "corpus": {"splits": {"train": "a", "dev": "b"}, "test_splits": []}})
    assert warn_unlisted_derived_dirs(cfg) == ["train_10m"]
    assert "config no longer writes" in caplog.text
