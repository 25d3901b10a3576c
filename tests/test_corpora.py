"""Tests for the corpus importers in local/ run through stage 0 (`prepare_corpus`).

Each test builds a small corpus of one layout in tmp_path. The corpora have stereo,
8 kHz and 44.1 kHz recordings, a corrupt file, a segment past the recording end, blank
lines and a BOM. The tests check the prepared tables, prep_report.txt, and that the
corpus is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile
from omegaconf import OmegaConf

from sparlora.config import load_config
from sparlora.corpus import ImportOptions, apply_tag_rule, load_importer
from sparlora.data import write_manifest
from sparlora.manifest import build_manifest
from sparlora.prepare import DataPrepError, prepare_corpus, prepare_kaldi_dir, read_data_dir

REPO = Path(__file__).resolve().parents[1]

AUDIO = {
    "sample_rate": 16000,
    "channel": "mean",
    "segment_end_tolerance": 0.025,
    # The corpora below drop up to 4 of 6 lines on purpose; test_import_drops_count
    # checks that the fraction applies.
    "max_drop_fraction": 0.7,
    "min_duration": 0.1,
    "max_duration": 30.0,
}


def tone(sample_rate: int, seconds: float, channels: int = 1) -> np.ndarray:
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    mono = 0.3 * np.sin(2 * np.pi * 440 * t)
    return mono if channels == 1 else np.stack([mono] * channels, axis=1)


def write_wav(path: Path, sample_rate: int, seconds: float, channels: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, tone(sample_rate, seconds, channels), sample_rate)


def write_text(path: Path, lines: list[str], encoding: str = "utf-8", bom: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(line + "\n" for line in lines).encode(encoding)
    path.write_bytes(b"\xef\xbb\xbf" + data if bom else data)


def read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def corpus_config(tmp_path: Path, layout: str, source_dir: Path, splits: dict, **corpus) -> OmegaConf:
    return OmegaConf.create(
        {
            "corpus": {"layout": layout, "source_dir": str(source_dir), "splits": splits, **corpus},
            "data_dir": str(tmp_path / "data"),
            "audio": AUDIO,
        }
    )


def report_section(path: Path, prefix: str) -> list[str]:
    return [line for line in read_lines(path) if line.startswith(prefix)]


# MagicData: WAV/<split>/ and TXT/<split>/, one tab-separated transcript per recording.
# A0001: 8 kHz stereo, 4.0 s, transcript with a BOM. A0002: 44.1 kHz mono, 3.0 s.
# A0003: corrupt wav. A0004: wav without transcript. A0005: transcript without wav.
A0001_LINES = [
    "[0.000,1.500]\tG00000140\t女,四川话\t今天[+]天气好",
    "[1.500,2.700]\tG00000141\t男,四川话\t巴适得很 [LAUGHTER]",
    "[2.700,3.000]\tG00000140\t女,四川话\t[*]",
    "",
    "[3.100,3.050]\tG00000141\t男,四川话\t时间反了",
    "[abc,3.5]\tG00000141\t男,四川话\t时间坏了",
    "[3.000,3.990]\tG00000000\t\t没有说话人",
    "[3.500,4.020]\tG00000141\t男,四川话\t超出一点",
    "[0.5,1.0]\tG00000141",
]
A0002_LINES = [
    "[0.2,1.2]\tG00000150\t女,普通话\t我们去成都",
    "[1.3,2.0]\tG00000150\t男,普通话\t性别不一致",
    "[2.5,3.5]\tG00000151\t男,普通话\t超出太多",
]


@pytest.fixture
def magicdata_corpus(tmp_path):
    root = tmp_path / "magicdata"
    write_wav(root / "WAV" / "train" / "A0001.wav", 8000, 4.0, channels=2)
    write_wav(root / "WAV" / "train" / "A0002.wav", 44100, 3.0)
    (root / "WAV" / "train" / "A0003.wav").write_bytes(b"not a wav file\n")
    write_wav(root / "WAV" / "train" / "A0004.wav", 16000, 1.0)
    write_text(root / "TXT" / "train" / "A0001.txt", A0001_LINES, bom=True)
    write_text(root / "TXT" / "train" / "A0002.txt", A0002_LINES)
    write_text(root / "TXT" / "train" / "A0003.txt", ["[0.0,1.0]\tG00000160\t男,四川话\t坏文件"])
    write_text(root / "TXT" / "train" / "A0005.txt", ["[0.0,1.0]\tG00000170\t女,四川话\t没有录音"])
    write_wav(root / "WAV" / "dev" / "B0001.wav", 16000, 2.0)
    write_text(root / "TXT" / "dev" / "B0001.txt", ["[0.0,1.0]\tG00000180\t女,四川话\t好"])
    write_text(root / "SPKINFO.txt", ["CHANNEL\tSPEAKER_ID\tGENDER"])
    return root


@pytest.fixture
def magicdata_prepared(magicdata_corpus, tmp_path):
    before = tree_hashes(magicdata_corpus)
    cfg = corpus_config(tmp_path, "magicdata", magicdata_corpus, {"train": "train", "dev": "dev"})
    reports = prepare_corpus(cfg)
    return reports, tmp_path / "data", before


def test_magicdata_text(magicdata_prepared):
    _, data, _ = magicdata_prepared
    assert read_lines(data / "train" / "text") == [
        "G00000000_A0001-A0001-00003000-00003990 没有说话人",
        "G00000140-A0001-00000000-00001500 今天 天气好",
        "G00000141-A0001-00001500-00002700 巴适得很",
        "G00000141-A0001-00003500-00004020 超出一点",
        "G00000150-A0002-00000200-00001200 我们去成都",
        "G00000150-A0002-00001300-00002000 性别不一致",
    ]


def test_magicdata_segments_clipped(magicdata_prepared):
    _, data, _ = magicdata_prepared
    assert read_lines(data / "train" / "segments") == [
        "G00000000_A0001-A0001-00003000-00003990 A0001 3.000 3.990",
        "G00000140-A0001-00000000-00001500 A0001 0.000 1.500",
        "G00000141-A0001-00001500-00002700 A0001 1.500 2.700",
        "G00000141-A0001-00003500-00004020 A0001 3.500 4.00",
        "G00000150-A0002-00000200-00001200 A0002 0.2 1.2",
        "G00000150-A0002-00001300-00002000 A0002 1.3 2.0",
    ]


def test_magicdata_speakers_genders(magicdata_prepared):
    _, data, _ = magicdata_prepared
    assert read_lines(data / "train" / "spk2utt") == [
        "G00000000_A0001 G00000000_A0001-A0001-00003000-00003990",
        "G00000140 G00000140-A0001-00000000-00001500",
        "G00000141 G00000141-A0001-00001500-00002700 G00000141-A0001-00003500-00004020",
        "G00000150 G00000150-A0002-00000200-00001200 G00000150-A0002-00001300-00002000",
    ]
    # G00000150 has lines marked 女 and 男, so it gets no gender.
    assert read_lines(data / "train" / "spk2gender") == ["G00000140 f", "G00000141 m"]


def test_magicdata_wav_scp_and_formats(magicdata_prepared, magicdata_corpus):
    _, data, _ = magicdata_prepared
    train = magicdata_corpus / "WAV" / "train"
    assert read_lines(data / "train" / "wav.scp") == [f"A0001 {train / 'A0001.wav'}", f"A0002 {train / 'A0002.wav'}"]
    assert read_lines(data / "train" / "reco2sr_ch") == ["A0001 8000 2", "A0002 44100 1"]


def test_magicdata_report_counts(magicdata_prepared):
    _, data, _ = magicdata_prepared
    report = data / "train" / "prep_report.txt"
    assert read_lines(report)[2:10] == [
        "input utterances: 8",
        "kept: 6",
        "dropped: 2",
        "clipped: 1",
        "dropped at import: 5",
        "skipped at import: 2",
        "dropped because segment end past recording end: 1",
        "dropped because unreadable: 1",
    ]


def test_magicdata_report_import_lines(magicdata_prepared, magicdata_corpus):
    _, data, _ = magicdata_prepared
    report = data / "train" / "prep_report.txt"
    txt, wav = magicdata_corpus / "TXT" / "train", magicdata_corpus / "WAV" / "train"
    assert report_section(report, "dropped at import") == [
        "dropped at import: 5",
        "dropped at import because invalid line: 1",
        "dropped at import because invalid time field: 1",
        "dropped at import because no audio file: 1",
        "dropped at import because no transcript file: 1",
        "dropped at import because zero-length or reversed segment: 1",
        f"dropped at import {txt / 'A0001.txt'}:5: zero-length or reversed segment (start 3.100 s, end 3.050 s)",
        f"dropped at import {txt / 'A0001.txt'}:6: invalid time field (expected [start,end] in seconds, got '[abc,3.5]')",
        f"dropped at import {txt / 'A0001.txt'}:9: invalid line (expected [start,end], speaker, gender and text "
        "separated by 3 tabs, got 2 field(s): '[0.5,1.0]\\tG00000141')",
        f"dropped at import {wav / 'A0004.wav'}: no transcript file (no A0004.txt under TXT/)",
        f"dropped at import {txt / 'A0005.txt'}:1: no audio file (no A0005.wav under WAV/)",
    ]
    assert report_section(report, "skipped at import") == [
        "skipped at import: 2",
        "skipped at import because blank line: 1",
        "skipped at import because no speech: 1",
        f"skipped at import {txt / 'A0001.txt'}:3: no speech (text is only tags: '[*]')",
        f"skipped at import {txt / 'A0001.txt'}:4: blank line",
    ]


def test_magicdata_report_stage0_drops(magicdata_prepared):
    _, data, _ = magicdata_prepared
    report = data / "train" / "prep_report.txt"
    dropped = [line for line in report_section(report, "dropped ") if not line.startswith(("dropped at", "dropped because"))]
    assert dropped[0] == (
        "dropped G00000151-A0002-00002500-00003500: segment end past recording end "
        "(end 3.5 s is 0.500 s past the recording end 3.000 s, tolerance 0.025 s)"
    )
    assert dropped[1].startswith("dropped G00000160-A0003-00000000-00001000: unreadable (")
    assert len(dropped) == 2


def test_magicdata_drop_fraction_counts_import(magicdata_prepared):
    reports, _, _ = magicdata_prepared
    train = reports[0]
    assert train.total_dropped == 7
    assert train.total_input == 13


def test_magicdata_dev_split(magicdata_prepared):
    _, data, _ = magicdata_prepared
    assert read_lines(data / "dev" / "text") == ["G00000180-B0001-00000000-00001000 好"]


def test_magicdata_staging_dir(magicdata_prepared):
    _, data, _ = magicdata_prepared
    staging = data / "local" / "train"
    assert sorted(path.name for path in staging.iterdir()) == [
        "import_skipped.txt", "segments", "spk2gender", "text", "utt2spk", "wav.scp"
    ]
    assert len(read_lines(staging / "import_skipped.txt")) == 7


def test_magicdata_source_unchanged(magicdata_prepared, magicdata_corpus):
    _, _, before = magicdata_prepared
    assert tree_hashes(magicdata_corpus) == before


def test_magicdata_loads_one_channel_16k(magicdata_prepared):
    from sparlora.audio import load_audio

    _, data, _ = magicdata_prepared
    utterance = {u.id: u for u in read_data_dir(data / "train")}["G00000140-A0001-00000000-00001500"]
    assert load_audio(utterance.source, utterance.start, utterance.end).shape == (24000,)


def test_magicdata_keep_tags_skip_no_speaker(magicdata_corpus, tmp_path):
    cfg = corpus_config(tmp_path, "magicdata", magicdata_corpus, {"train": "train"}, tags="keep", no_speaker="skip")
    prepare_corpus(cfg)
    report = tmp_path / "data" / "train" / "prep_report.txt"
    text = read_lines(tmp_path / "data" / "train" / "text")
    assert text[:2] == ["G00000140-A0001-00000000-00001500 今天[+]天气好", "G00000141-A0001-00001500-00002700 巴适得很 [LAUGHTER]"]
    assert "skipped at import because no speaker (corpus.no_speaker: skip): 1" in read_lines(report)


def test_magicdata_expected_skips_not_drops(tmp_path):
    root = tmp_path / "magicdata"
    write_wav(root / "WAV" / "A0001.wav", 16000, 2.0)
    write_text(root / "TXT" / "A0001.txt", ["[0.0,1.0]\tG00000001\t女,四川话\t好的", "[1.0,2.0]\tG00000001\t女,四川话\t[*]", ""])
    audio = dict(AUDIO, max_drop_fraction=0.0)
    cfg = OmegaConf.merge(corpus_config(tmp_path, "magicdata", root, {"all": "."}), {"audio": audio})
    (report,) = prepare_corpus(cfg)
    assert report.kept == 1
    assert report.total_dropped == 0
    assert len(report.skipped_at_import) == 2


def test_import_drops_count(magicdata_corpus, tmp_path):
    audio = dict(AUDIO, max_drop_fraction=0.5)
    cfg = OmegaConf.merge(corpus_config(tmp_path, "magicdata", magicdata_corpus, {"train": "train"}), {"audio": audio})
    with pytest.raises(DataPrepError, match=r"split train: 7 of 13 utterances were dropped, 5 of them at import \(53.8%\)"):
        prepare_corpus(cfg)


def test_magicdata_gbk_transcript_names_file(magicdata_corpus, tmp_path):
    gbk = magicdata_corpus / "TXT" / "dev" / "B0001.txt"
    write_text(gbk, ["[0.0,1.0]\tG00000180\t女,四川话\t今天天气好"], encoding="gbk")
    cfg = corpus_config(tmp_path, "magicdata", magicdata_corpus, {"dev": "dev"})
    with pytest.raises(DataPrepError, match=rf"split dev: cannot import dev .*{re.escape(str(gbk))}:1: invalid UTF-8"):
        prepare_corpus(cfg)


def test_import_failure_removes_stale_outputs(magicdata_corpus, tmp_path):
    cfg = corpus_config(tmp_path, "magicdata", magicdata_corpus, {"dev": "dev"})
    prepare_corpus(cfg)
    write_text(magicdata_corpus / "TXT" / "dev" / "B0001.txt", ["[0.0,1.0]\tG00000180\t女,四川话\t好"], encoding="gbk")
    with pytest.raises(DataPrepError):
        prepare_corpus(cfg)
    data = tmp_path / "data"
    assert not (data / "dev" / "text").exists()
    assert not (data / "local" / "dev" / "text").exists()
    assert read_lines(data / "dev" / "prep_report.txt")[2].startswith("failed: split dev: cannot import dev from ")


def test_magicdata_recording_list(magicdata_corpus, tmp_path):
    write_text(tmp_path / "DataPartition" / "dev.tsv", ["wav_path\tinfo", "B0001.wav\tx", "Z0009.wav\tx"])
    cfg = corpus_config(tmp_path, "magicdata", magicdata_corpus, {"dev": "../DataPartition/dev.tsv"})
    prepare_corpus(cfg)
    report = tmp_path / "data" / "dev" / "prep_report.txt"
    assert read_lines(tmp_path / "data" / "dev" / "text") == ["G00000180-B0001-00000000-00001000 好"]
    assert report_section(report, "dropped at import /") == [
        f"dropped at import {magicdata_corpus / '../DataPartition/dev.tsv'}:3: listed recording not found "
        f"(no Z0009.wav under {magicdata_corpus / 'WAV'} or Z0009.txt under {magicdata_corpus / 'TXT'})"
    ]


def test_magicdata_missing_split_folder(magicdata_corpus, tmp_path):
    cfg = corpus_config(tmp_path, "magicdata", magicdata_corpus, {"test": "test"})
    with pytest.raises(DataPrepError, match=r"WAV/test not found: .*\(found: dev, train\)"):
        prepare_corpus(cfg)


# KeSpeech: Tasks/ASR/<part>/ tables, wav.scp paths relative to the corpus root.
@pytest.fixture
def kespeech_corpus(tmp_path):
    root = tmp_path / "KeSpeech"
    write_wav(root / "Audio" / "u1.wav", 16000, 1.0)
    write_wav(root / "Audio" / "u2.wav", 8000, 1.0, channels=2)
    write_wav(root / "Audio" / "u3.wav", 16000, 1.0)
    write_wav(root / "Audio" / "u4.wav", 16000, 1.0)
    write_wav(root / "Audio" / "u5.wav", 44100, 1.0)
    write_wav(root / "Audio" / "u7.wav", 16000, 1.5)
    part1 = root / "Tasks" / "ASR" / "train_phase1"
    write_text(part1 / "wav.scp", [
        "u1 Audio/u1.wav", f"u2 {root / 'Audio' / 'u2.wav'}", "u3 Audio/u3.wav",
        "u4 Audio/u4.wav", "u5 Audio/u5.wav", "u6 Audio/missing.wav",
    ], bom=True)
    write_text(part1 / "text", ["u1 我们<SPOKEN_NOISE>去吃火锅", "u2 巴适", "u3 普通话", "u4 <SPOKEN_NOISE>", "u5 要得", "u6 找不到"])
    write_text(part1 / "utt2spk", ["u1 s1", "u2 s1", "u3 s2", "u4 s1", "u5 s3", "u6 s3"])
    write_text(part1 / "utt2subdialect", ["u1 Southwestern", "u2 Southwestern", "u3 Mandarin", "", "u4 Southwestern", "u5 southwestern", "u6 Southwestern"])
    part2 = root / "Tasks" / "ASR" / "train_phase2"
    write_text(part2 / "wav.scp", ["u7 Audio/u7.wav"])
    write_text(part2 / "text", ["u7 好得很"])
    write_text(part2 / "utt2spk", ["u7 s4"])
    write_text(part2 / "utt2subdialect", ["u7 Southwestern"])
    return root


def test_kespeech_southwestern(kespeech_corpus, tmp_path):
    before = tree_hashes(kespeech_corpus)
    cfg = corpus_config(tmp_path, "kespeech", kespeech_corpus, {"train": ["train_phase1", "train_phase2"]}, subdialects=["SOUTHWESTERN"])
    (report,) = prepare_corpus(cfg)
    train = tmp_path / "data" / "train"
    audio = kespeech_corpus / "Audio"
    assert read_lines(train / "text") == ["u1 我们 去吃火锅", "u2 巴适", "u5 要得", "u7 好得很"]
    assert read_lines(train / "wav.scp") == [f"u1 {audio / 'u1.wav'}", f"u2 {audio / 'u2.wav'}", f"u5 {audio / 'u5.wav'}", f"u7 {audio / 'u7.wav'}"]
    assert read_lines(train / "utt2spk") == ["u1 s1", "u2 s1", "u5 s3", "u7 s4"]
    assert read_lines(train / "reco2sr_ch") == ["u1 16000 1", "u2 8000 2", "u5 44100 1", "u7 16000 1"]
    assert report.input_utterances == 5
    assert report.kept == 4
    assert report.total_dropped == 1
    assert tree_hashes(kespeech_corpus) == before


def test_kespeech_report(kespeech_corpus, tmp_path):
    cfg = corpus_config(tmp_path, "kespeech", kespeech_corpus, {"train": "train_phase1"}, subdialects=["Southwestern"])
    prepare_corpus(cfg)
    part1 = kespeech_corpus / "Tasks" / "ASR" / "train_phase1"
    report = tmp_path / "data" / "train" / "prep_report.txt"
    assert report_section(report, "skipped at import") == [
        "skipped at import: 3",
        "skipped at import because blank line: 1",
        "skipped at import because no speech: 1",
        "skipped at import because subdialect not selected: 1",
        f"skipped at import {part1 / 'utt2subdialect'}:4: blank line",
        f"skipped at import {part1 / 'utt2subdialect'}:3: subdialect not selected (u3: Mandarin)",
        f"skipped at import {part1 / 'text'}:4: no speech (text is only tags: '<SPOKEN_NOISE>')",
    ]
    assert f"dropped u6: not found ({kespeech_corpus / 'Audio' / 'missing.wav'})" in read_lines(report)


def test_kespeech_keep_tags_no_filter(kespeech_corpus, tmp_path):
    cfg = corpus_config(tmp_path, "kespeech", kespeech_corpus, {"train": "train_phase1"}, tags="keep")
    prepare_corpus(cfg)
    assert read_lines(tmp_path / "data" / "train" / "text") == [
        "u1 我们<SPOKEN_NOISE>去吃火锅", "u2 巴适", "u3 普通话", "u5 要得"
    ]


def test_kespeech_unknown_subdialect_lists_names(kespeech_corpus, tmp_path):
    cfg = corpus_config(tmp_path, "kespeech", kespeech_corpus, {"train": "train_phase1"}, subdialects=["Sichuan"])
    with pytest.raises(DataPrepError, match=r"names Sichuan, which no utterance of train_phase1 has; .*Mandarin \(1\), Southwestern \(4\), southwestern \(1\)"):
        prepare_corpus(cfg)


def test_kespeech_missing_part(kespeech_corpus, tmp_path):
    cfg = corpus_config(tmp_path, "kespeech", kespeech_corpus, {"test": "test"})
    with pytest.raises(DataPrepError, match=r"KeSpeech part .*test not found: .*\(found: train_phase1, train_phase2\)"):
        prepare_corpus(cfg)


# AISHELL-1: one transcript file, wav/<split>/<speaker>/<utterance>.wav.
@pytest.fixture
def aishell_corpus(tmp_path):
    root = tmp_path / "data_aishell"
    write_text(root / "transcript" / "aishell_transcript_v0.8.txt", [
        "BAC009S0002W0122 而 对 楼市 成交",
        "BAC009S0002W0123 抑制 作用",
        "",
        "BAC009S0003W0121 最 大 的",
        "BAC009S0009W0001 没有 音频",
        "BAC009S0002W0122 重复 的 一行",
    ])
    write_wav(root / "wav" / "train" / "S0002" / "BAC009S0002W0122.wav", 16000, 1.0)
    write_wav(root / "wav" / "train" / "S0002" / "BAC009S0002W0123.wav", 44100, 1.2, channels=2)
    write_wav(root / "wav" / "train" / "S0002" / "BAC009S0002W0124.wav", 16000, 1.0)
    write_wav(root / "wav" / "dev" / "S0003" / "BAC009S0003W0121.wav", 8000, 1.0)
    return root


def test_aishell_tables(aishell_corpus, tmp_path):
    before = tree_hashes(aishell_corpus)
    cfg = corpus_config(
        tmp_path, "aishell", aishell_corpus, {"train": "train", "dev": "dev"},
        transcript="transcript/aishell_transcript_v0.8.txt",
    )
    train, dev = prepare_corpus(cfg)
    data = tmp_path / "data"
    assert read_lines(data / "train" / "text") == ["BAC009S0002W0122 而 对 楼市 成交", "BAC009S0002W0123 抑制 作用"]
    assert read_lines(data / "train" / "utt2spk") == ["BAC009S0002W0122 S0002", "BAC009S0002W0123 S0002"]
    assert read_lines(data / "dev" / "utt2dur") == ["BAC009S0003W0121 1.000"]
    assert train.kept == 2
    assert len(train.dropped) == 1
    assert train.total_dropped == 2
    assert len(train.skipped_at_import) == 2
    assert dev.kept == 1
    assert tree_hashes(aishell_corpus) == before


def test_aishell_report(aishell_corpus, tmp_path):
    cfg = corpus_config(tmp_path, "aishell", aishell_corpus, {"train": "train"}, transcript="transcript/aishell_transcript_v0.8.txt")
    prepare_corpus(cfg)
    transcript = aishell_corpus / "transcript" / "aishell_transcript_v0.8.txt"
    lines = read_lines(tmp_path / "data" / "train" / "prep_report.txt")
    assert "dropped BAC009S0002W0124: no transcript (not in text)" in lines
    assert f"dropped at import {transcript}:6: duplicate utterance id (BAC009S0002W0122, first on line 1)" in lines
    assert f"skipped at import {transcript}:3: blank line" in lines
    assert f"skipped at import {transcript}:5: transcript without audio (no BAC009S0009W0001.wav under {aishell_corpus / 'wav'})" in lines


def test_aishell_needs_transcript_setting(aishell_corpus, tmp_path):
    cfg = corpus_config(tmp_path, "aishell", aishell_corpus, {"train": "train"})
    with pytest.raises(DataPrepError, match="corpus.transcript is not set"):
        prepare_corpus(cfg)


# FunASR jsonl manifests.
@pytest.fixture
def jsonl_corpus(tmp_path):
    root = tmp_path / "manifests"
    write_wav(root / "wav" / "a.wav", 16000, 1.0)
    write_wav(root / "wav" / "b.wav", 8000, 1.0, channels=2)
    write_wav(root / "wav" / "c.wav", 16000, 1.0)
    lines = [
        json.dumps({"key": "j1", "source": "wav/a.wav", "source_len": 98, "target": "你好", "target_len": 2}, ensure_ascii=False),
        json.dumps({"key": "j2", "source": str(root / "wav" / "b.wav"), "target": "世界"}, ensure_ascii=False),
        "",
        '{"key": "j3", "source": "wav/a.wav" "target": "坏"}',
        json.dumps({"key": "j4", "target": "缺"}, ensure_ascii=False),
        json.dumps({"key": "j1", "source": "wav/c.wav", "target": "重复"}, ensure_ascii=False),
        json.dumps({"key": "j5", "source": "wav/c.wav", "target": "[*]"}),
        json.dumps({"key": "j6", "source": "wav/c.wav", "target": 7}),
    ]
    write_text(root / "train.jsonl", lines, bom=True)
    return root


def test_jsonl_tables(jsonl_corpus, tmp_path):
    before = tree_hashes(jsonl_corpus)
    (report,) = prepare_corpus(corpus_config(tmp_path, "jsonl", jsonl_corpus, {"train": "train.jsonl"}))
    train = tmp_path / "data" / "train"
    assert read_lines(train / "text") == ["j1 你好", "j2 世界"]
    assert read_lines(train / "wav.scp") == [f"j1 {jsonl_corpus / 'wav' / 'a.wav'}", f"j2 {jsonl_corpus / 'wav' / 'b.wav'}"]
    assert read_lines(train / "reco2sr_ch") == ["j1 16000 1", "j2 8000 2"]
    assert report.kept == 2
    assert report.total_dropped == 4
    assert len(report.skipped_at_import) == 2
    assert tree_hashes(jsonl_corpus) == before


def test_jsonl_report_names_lines(jsonl_corpus, tmp_path):
    prepare_corpus(corpus_config(tmp_path, "jsonl", jsonl_corpus, {"train": "train.jsonl"}))
    manifest = jsonl_corpus / "train.jsonl"
    lines = report_section(tmp_path / "data" / "train" / "prep_report.txt", "dropped at import /")
    assert lines == [
        f"dropped at import {manifest}:4: invalid JSON (Expecting ',' delimiter: line 1 column 37 (char 36))",
        f"dropped at import {manifest}:5: missing field (no 'source'; a line needs key, source, target)",
        f"dropped at import {manifest}:6: duplicate utterance id (j1, first on line 1)",
        f"dropped at import {manifest}:8: invalid field ('target' is 7, expected a string)",
    ]


def test_jsonl_missing_manifest(tmp_path):
    (tmp_path / "corpus").mkdir()
    cfg = corpus_config(tmp_path, "jsonl", tmp_path / "corpus", {"train": "train.jsonl"})
    with pytest.raises(DataPrepError, match=r"manifest .*train.jsonl not found"):
        prepare_corpus(cfg)


def test_jsonl_round_trip_stage2_manifest(tmp_path):
    """A data.jsonl written by stage 2 reads back to the same utterances, segments included."""
    src = tmp_path / "kaldi" / "train"
    write_wav(src / "rec1.wav", 16000, 1.0)
    write_wav(src / "rec2.wav", 8000, 3.0, channels=2)
    write_text(src / "wav.scp", [f"rec1 {src / 'rec1.wav'}", f"rec2 {src / 'rec2.wav'}"])
    write_text(src / "segments", ["u1 rec1 0.00 0.50", "u2 rec1 0.50 1.003", "u3 rec2 0.00 2.03", "u4 rec2 2.50 -1"])
    write_text(src / "text", ["u1 今天", "u2 天气", "u3 很好", "u4 巴适"])
    first = tmp_path / "first" / "train"
    prepare_kaldi_dir(src, first, OmegaConf.create(AUDIO), 0.0)
    entries, _ = build_manifest(first, None)
    write_manifest(first / "data.jsonl", entries)

    cfg = corpus_config(tmp_path, "jsonl", first, {"train": "data.jsonl"})
    prepare_corpus(cfg)
    second = tmp_path / "data" / "train"
    for name in ("text", "utt2dur", "wav.scp", "reco2sr_ch"):
        assert read_lines(second / name) == read_lines(first / name), name
    original = {u.id: (u.source, u.start, u.end, u.duration) for u in read_data_dir(first)}
    assert {u.id: (u.source, u.start, u.end, u.duration) for u in read_data_dir(second)} == original


# Settings, layouts and the example configs.
def test_unknown_layout_lists_all(tmp_path):
    cfg = corpus_config(tmp_path, "lhotse", tmp_path, {"train": "x"})
    with pytest.raises(DataPrepError, match="supported layouts are kaldi, magicdata, kespeech, aishell, jsonl"):
        prepare_corpus(cfg)


def test_invalid_tag_rule(magicdata_corpus, tmp_path):
    cfg = corpus_config(tmp_path, "magicdata", magicdata_corpus, {"train": "train"}, tags="strip")
    with pytest.raises(DataPrepError, match="invalid corpus.tags 'strip': expected one of remove, keep"):
        prepare_corpus(cfg)


def test_data_dir_inside_corpus_rejected(magicdata_corpus, tmp_path):
    cfg = OmegaConf.merge(
        corpus_config(tmp_path, "magicdata", magicdata_corpus, {"train": "train"}),
        {"data_dir": str(magicdata_corpus / "prepared")},
    )
    with pytest.raises(DataPrepError, match="overlap: stage 0 never writes into the corpus"):
        prepare_corpus(cfg)


def test_split_named_local_rejected(magicdata_corpus, tmp_path):
    cfg = corpus_config(tmp_path, "magicdata", magicdata_corpus, {"local": "train"})
    with pytest.raises(DataPrepError, match="names a split 'local'"):
        prepare_corpus(cfg)


@pytest.mark.parametrize(
    ("text", "rule", "expected"),
    [
        ("今天[+]天气好", "remove", "今天 天气好"),
        ("今天[+]天气好", "keep", "今天[+]天气好"),
        (" [*] ", "remove", None),
        ("[SONANT][MUSIC] <SPOKEN_NOISE>", "keep", None),
        ("对[LAUGHTER]", "remove", "对"),
        ("[a] 不是标签", "remove", "[a] 不是标签"),
        ("", "remove", ""),
    ],
)
def test_apply_tag_rule(text, rule, expected):
    assert apply_tag_rule(text, rule) == expected


def test_importer_main_writes_staging(magicdata_corpus, tmp_path):
    module = load_importer("magicdata")
    assert module.main(["--source-dir", str(magicdata_corpus), "--out-dir", str(tmp_path / "out"), "dev=dev"]) == 0
    assert read_lines(tmp_path / "out" / "dev" / "segments") == ["G00000180-B0001-00000000-00001000 B0001 0.0 1.0"]


@pytest.mark.parametrize(
    ("config", "layout", "splits"),
    [
        ("magicdata_sichuan", "magicdata", {"train": "train", "dev": "dev", "sc_test": "test"}),
        ("kespeech_southwestern", "kespeech", {"train": ["train_phase1", "train_phase2"], "dev": ["dev_phase1", "dev_phase2"], "sc_test": "test"}),
    ],
)
def test_example_config_composes(config, layout, splits):
    cfg = load_config(REPO / "conf" / f"{config}.yaml")
    demo = load_config(REPO / "conf" / "demo.yaml")
    assert cfg.corpus.layout == layout
    assert OmegaConf.to_container(cfg.corpus.splits) == splits
    assert cfg.corpus.test_splits == ["sc_test"]
    assert cfg.corpus.make_cmd is None
    assert cfg.train.epochs == demo.train.epochs
    assert cfg.method.name == demo.method.name


def test_example_config_options_valid():
    for config in ("magicdata_sichuan", "kespeech_southwestern"):
        options = ImportOptions.from_config(load_config(REPO / "conf" / f"{config}.yaml").corpus)
        assert options.tags == "remove", config


# --- faults found by feeding messy corpora to stage 0


def test_magicdata_list_without_header(magicdata_corpus, tmp_path):
    """A list whose first line is a recording keeps that recording."""
    write_text(tmp_path / "lists" / "dev.lst", ["B0001"])
    cfg = corpus_config(tmp_path, "magicdata", magicdata_corpus, {"dev": str(tmp_path / "lists" / "dev.lst")})
    prepare_corpus(cfg)
    assert read_lines(tmp_path / "data" / "dev" / "text") == ["G00000180-B0001-00000000-00001000 好"]


def test_magicdata_extra_field_dropped(tmp_path):
    root = tmp_path / "md"
    write_wav(root / "WAV" / "train" / "C0001.wav", 16000, 3.0)
    write_text(root / "TXT" / "train" / "C0001.txt", [
        "[0.0,1.0]\tG00000200\t女\t四川话\t多了一列",
        "[1.0,2.0]\tG00000200\t女,四川话\t正常\t",
    ])
    cfg = corpus_config(tmp_path, "magicdata", root, {"train": "train"})
    cfg.audio.max_drop_fraction = 1.0
    prepare_corpus(cfg)
    assert read_lines(tmp_path / "data" / "train" / "text") == ["G00000200-C0001-00001000-00002000 正常"]
    dropped = report_section(tmp_path / "data" / "train" / "prep_report.txt", "dropped at import /")
    assert len(dropped) == 1
    assert "C0001.txt:1: invalid line (expected [start,end], speaker, gender and text separated by 3 tabs, got 5 field(s)" in dropped[0]


def test_magicdata_classic_mac_line_endings(tmp_path):
    root = tmp_path / "md"
    write_wav(root / "WAV" / "train" / "C0002.wav", 16000, 3.0)
    (root / "TXT" / "train").mkdir(parents=True)
    (root / "TXT" / "train" / "C0002.txt").write_bytes(
        "[0.0,1.0]\tG00000200\t男,四川话\t第一行\r[1.5,2.5]\tG00000200\t男,四川话\t第二行\r".encode()
    )
    prepare_corpus(corpus_config(tmp_path, "magicdata", root, {"train": "train"}))
    assert read_lines(tmp_path / "data" / "train" / "text") == [
        "G00000200-C0002-00000000-00001000 第一行",
        "G00000200-C0002-00001500-00002500 第二行",
    ]


def test_magicdata_fullwidth_time_dropped(tmp_path):
    root = tmp_path / "md"
    write_wav(root / "WAV" / "train" / "C0003.wav", 16000, 3.0)
    write_text(root / "TXT" / "train" / "C0003.txt", [
        "[１.０,２.０]\tG00000200\t男,四川话\t全角时间",
        "[0.0,1.0]\tG00000200\t男,四川话\t半角时间",
    ])
    cfg = corpus_config(tmp_path, "magicdata", root, {"train": "train"})
    cfg.audio.max_drop_fraction = 1.0
    prepare_corpus(cfg)
    assert read_lines(tmp_path / "data" / "train" / "segments") == ["G00000200-C0003-00000000-00001000 C0003 0.0 1.0"]
    dropped = report_section(tmp_path / "data" / "train" / "prep_report.txt", "dropped at import /")
    assert len(dropped) == 1
    assert "C0003.txt:1: invalid time field" in dropped[0]


def test_aishell_apple_double_files_left_out(aishell_corpus, tmp_path):
    (aishell_corpus / "wav" / "train" / "S0002" / "._BAC009S0002W0123.wav").write_bytes(b"\x00\x05\x16\x07")
    cfg = corpus_config(tmp_path, "aishell", aishell_corpus, {"train": "train"},
                        transcript="transcript/aishell_transcript_v0.8.txt")
    cfg.audio.max_drop_fraction = 1.0
    prepare_corpus(cfg)
    report = "\n".join(read_lines(tmp_path / "data" / "train" / "prep_report.txt"))
    assert "._BAC009" not in report


@pytest.mark.parametrize(("text", "expected"), [
    ("我[laughter]笑了", "我 笑了"),
    ("好<unk>嘛", "好 嘛"),
    ("[NOISE1]来了", "来了"),
    ("[+++]", None),
])
def test_tag_forms(text, expected):
    assert apply_tag_rule(text, "remove") == expected


def test_kaldi_data_dir_inside_corpus_rejected(tmp_path):
    root = tmp_path / "corpus"
    write_wav(root / "train" / "u1.wav", 16000, 1.0)
    write_text(root / "train" / "wav.scp", [f"u1 {root / 'train' / 'u1.wav'}"])
    write_text(root / "train" / "text", ["u1 你好"])
    before = tree_hashes(root)
    cfg = OmegaConf.merge(corpus_config(tmp_path, "kaldi", root, {"train": "train"}), {"data_dir": str(root / "prepared")})
    with pytest.raises(DataPrepError, match="overlap: stage 0 never writes into the corpus"):
        prepare_corpus(cfg)
    assert tree_hashes(root) == before


def test_kaldi_carriage_return_in_transcript_dropped(tmp_path):
    root = tmp_path / "corpus"
    for utt in ("u1", "u2"):
        write_wav(root / "train" / f"{utt}.wav", 16000, 1.0)
    write_text(root / "train" / "wav.scp", [f"{utt} {root / 'train' / f'{utt}.wav'}" for utt in ("u1", "u2")])
    (root / "train" / "text").write_bytes("u1 你\r好\nu2 再见\n".encode())
    cfg = corpus_config(tmp_path, "kaldi", root, {"train": "train"})
    cfg.audio.max_drop_fraction = 1.0
    prepare_corpus(cfg)
    assert read_lines(tmp_path / "data" / "train" / "text") == ["u2 再见"]
    report = read_lines(tmp_path / "data" / "train" / "prep_report.txt")
    assert [line for line in report if line.startswith("dropped u1")] == [
        "dropped u1: line break in transcript (a carriage return (\\r) inside the transcript line; remove it or end the line there)"
    ]


def test_prepare_main_reports_every_failed_split(magicdata_corpus, tmp_path):
    """`python -m sparlora.prepare` goes on after a failing split and sums up the failures."""
    import subprocess
    import sys

    write_text(magicdata_corpus / "TXT" / "dev" / "B0002.txt", ["[0.0,1.0]\tG00000180\t女,四川话\t坏编码"], encoding="gbk")
    config = tmp_path / "md.yaml"
    config.write_text(
        "defaults:\n  - demo\n  - _self_\n"
        f"corpus:\n  layout: magicdata\n  source_dir: {magicdata_corpus}\n  make_cmd: null\n"
        f"data_dir: {tmp_path / 'data'}\n",
        encoding="utf-8",
    )
    overrides = ["~corpus.splits", "+corpus.splits={dev: dev, train: train}", "audio.max_drop_fraction=1.0"]
    result = subprocess.run([sys.executable, "-m", "sparlora.prepare", "--config", str(config), *overrides],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "1 of 2 splits failed" in result.stderr
    assert (tmp_path / "data" / "train" / "text").is_file()
