"""Tests for sparlora.prepare: corpus checks, the prepared data dir and the drop report."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
from omegaconf import OmegaConf

from sparlora.audio import load_audio
from sparlora.prepare import DataPrepError, Utterance, prepare_corpus, prepare_kaldi_dir, read_data_dir

REPO = Path(__file__).resolve().parents[1]
needs_sox = pytest.mark.skipif(shutil.which("sox") is None, reason="sox is not installed")

AUDIO = OmegaConf.create(
    {
        "sample_rate": 16000,
        "channel": "mean",
        "segment_end_tolerance": 0.025,
        "max_drop_fraction": 0.05,
        "min_duration": 0.1,
        "max_duration": 30.0,
    }
)


def tone(frequency: float, sample_rate: int, seconds: float, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    return amplitude * np.sin(2 * np.pi * frequency * t)


def write_lines(path: Path, lines: list[str], encoding: str = "utf-8") -> None:
    path.write_bytes("".join(line + "\n" for line in lines).encode(encoding))


def read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def dropped(report) -> dict[str, str]:
    return {problem.utterance: problem.reason for problem in report.dropped}


# Segments with ends past the recording, rounding and the -1 end.
# rec1 is 16 kHz mono with exactly 16000 samples, rec2 8 kHz mono, 3.0 s.
SEGMENTS = [
    "rec1-a rec1 0.00 0.50",
    "rec1-b rec1 0.50 1.003",
    "rec1-c rec1 0.90 1.30",
    "rec1-d rec1 1.10 1.20",
    "rec1-e rec1 0.40 0.40",
    "rec2-a rec2 0.00 2.03",
    "rec2-f rec2 2.50 -1",
]


@pytest.fixture
def segments_corpus(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    soundfile.write(src / "rec1.wav", tone(440, 16000, 1.0), 16000)
    soundfile.write(src / "rec2.wav", tone(440, 8000, 3.0), 8000)
    write_lines(src / "wav.scp", [f"rec1 {src}/rec1.wav", f"rec2 {src}/rec2.wav"])
    write_lines(src / "segments", SEGMENTS)
    utts = [line.split()[0] for line in SEGMENTS]
    write_lines(src / "text", [f"{utt} 巴适得很" for utt in utts])
    write_lines(src / "utt2spk", [f"{utt} {utt[:4]}" for utt in utts])
    write_lines(src / "spk2gender", ["rec1 f", "rec2 m", "rec9 m"])
    return src


@pytest.fixture
def segments_prepared(segments_corpus, tmp_path):
    dst = tmp_path / "data" / "train"
    report = prepare_kaldi_dir(segments_corpus, dst, AUDIO, max_drop_fraction=0.5)
    return report, dst


def test_segments_dropped_reasons(segments_prepared):
    report, _ = segments_prepared
    assert dropped(report) == {
        "rec1-c": "segment end past recording end",
        "rec1-d": "segment starts at or after recording end",
        "rec1-e": "zero-length or reversed segment",
    }


def test_segments_clipped_ids(segments_prepared):
    report, _ = segments_prepared
    assert [problem.utterance for problem in report.clipped] == ["rec1-b"]


def test_segments_counts(segments_prepared):
    report, _ = segments_prepared
    assert (report.input_utterances, report.kept, len(report.dropped)) == (7, 4, 3)


def test_segments_output_rewrites_ends(segments_prepared):
    _, dst = segments_prepared
    assert read_lines(dst / "segments") == [
        "rec1-a rec1 0.00 0.50",
        "rec1-b rec1 0.50 1.00",
        "rec2-a rec2 0.00 2.03",
        "rec2-f rec2 2.50 3.00",
    ]


def test_segments_utt2dur(segments_prepared):
    _, dst = segments_prepared
    assert read_lines(dst / "utt2dur") == ["rec1-a 0.500", "rec1-b 0.500", "rec2-a 2.030", "rec2-f 0.500"]


@pytest.mark.parametrize(
    ("utt", "sample_rate", "num_samples"),
    [
        ("rec1-a", 16000, 8000),
        ("rec1-b", 16000, 8000),
        ("rec2-a", 8000, 16240),
        ("rec2-a", 16000, 32480),
        ("rec2-f", 8000, 4000),
    ],
)
def test_segments_loaded_lengths(segments_prepared, utt, sample_rate, num_samples):
    _, dst = segments_prepared
    utterance = {u.id: u for u in read_data_dir(dst)}[utt]
    audio = load_audio(utterance.source, utterance.start, utterance.end, sample_rate=sample_rate)
    assert len(audio) == num_samples


def test_segments_report_lines(segments_prepared):
    report, dst = segments_prepared
    lines = read_lines(dst / "prep_report.txt")
    assert "dropped rec1-c: segment end past recording end (end 1.30 s is 0.300 s past the recording end 1.000 s, tolerance 0.025 s)" in lines


def test_segments_report_clipped_line(segments_prepared):
    _, dst = segments_prepared
    lines = read_lines(dst / "prep_report.txt")
    expected = "clipped rec1-b: end 1.003 s is 0.003 s past the recording end 1.000 s, tolerance 0.025 s: end clipped to 1.00 s"
    assert expected in lines


@pytest.mark.parametrize(
    "line",
    ["input utterances: 7", "kept: 4", "dropped: 3", "clipped: 1", "dropped because segment end past recording end: 1"],
)
def test_segments_report_counts(segments_prepared, line):
    _, dst = segments_prepared
    assert line in read_lines(dst / "prep_report.txt")


def test_segments_wav_scp_unchanged(segments_prepared, segments_corpus):
    _, dst = segments_prepared
    assert (dst / "wav.scp").read_bytes() == (segments_corpus / "wav.scp").read_bytes()


def test_segments_spk2utt(segments_prepared):
    _, dst = segments_prepared
    assert read_lines(dst / "spk2utt") == ["rec1 rec1-a rec1-b", "rec2 rec2-a rec2-f"]


def test_segments_spk2gender_filtered(segments_prepared):
    _, dst = segments_prepared
    assert read_lines(dst / "spk2gender") == ["rec1 f", "rec2 m"]


def test_segments_read_data_dir(segments_prepared, segments_corpus):
    _, dst = segments_prepared
    first = read_data_dir(dst)[0]
    assert first == Utterance("rec1-a", f"{segments_corpus}/rec1.wav", 0.0, 0.5, "巴适得很", "rec1", 0.5, "rec1")


def test_segments_source_unchanged(segments_corpus, tmp_path):
    before = tree_hashes(segments_corpus)
    prepare_kaldi_dir(segments_corpus, tmp_path / "data" / "train", AUDIO, max_drop_fraction=0.5)
    assert tree_hashes(segments_corpus) == before


def test_drop_fraction_exceeded_raises(segments_corpus, tmp_path):
    with pytest.raises(DataPrepError, match=r"split train: 3 of 7 utterances were dropped .* more than max_drop_fraction 0.4"):
        prepare_kaldi_dir(segments_corpus, tmp_path / "train", AUDIO, max_drop_fraction=0.4)


def test_drop_fraction_exceeded_writes_report(segments_corpus, tmp_path):
    dst = tmp_path / "train"
    with pytest.raises(DataPrepError, match=str(dst / "prep_report.txt")):
        prepare_kaldi_dir(segments_corpus, dst, AUDIO, max_drop_fraction=0.4)
    assert "dropped: 3" in read_lines(dst / "prep_report.txt")


def test_drop_fraction_exceeded_removes_stale(segments_corpus, tmp_path):
    dst = tmp_path / "train"
    prepare_kaldi_dir(segments_corpus, dst, AUDIO, max_drop_fraction=0.5)
    with pytest.raises(DataPrepError):
        prepare_kaldi_dir(segments_corpus, dst, AUDIO, max_drop_fraction=0.4)
    assert not (dst / "text").exists()


def test_tolerance_zero_drops_overshoot(segments_corpus, tmp_path):
    audio = OmegaConf.merge(AUDIO, {"segment_end_tolerance": 0.0})
    report = prepare_kaldi_dir(segments_corpus, tmp_path / "train", audio, max_drop_fraction=0.6)
    assert dropped(report)["rec1-b"] == "segment end past recording end"


def test_destination_inside_source(segments_corpus):
    with pytest.raises(DataPrepError, match="must be outside the source dir"):
        prepare_kaldi_dir(segments_corpus, segments_corpus / "prepared", AUDIO, max_drop_fraction=0.5)


# Missing, empty, truncated and non-audio recordings.
@pytest.fixture
def bad_audio_corpus(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    soundfile.write(src / "ok1.wav", tone(440, 16000, 1.0), 16000)
    (src / "zero.wav").write_bytes(b"")
    (src / "trunc.wav").write_bytes((src / "ok1.wav").read_bytes()[:30])
    (src / "notwav.wav").write_text("plain text, renamed to .wav\n", encoding="utf-8")
    entries = {"ok1": src / "ok1.wav", "miss": "/nonexistent/x.wav", "zero": src / "zero.wav"}
    entries |= {"trunc": src / "trunc.wav", "notwav": src / "notwav.wav"}
    write_lines(src / "wav.scp", [f"{utt} {path}" for utt, path in entries.items()])
    write_lines(src / "text", [f"{utt} 今天天气好" for utt in entries])
    return src


def test_bad_audio_dropped_reasons(bad_audio_corpus, tmp_path):
    report = prepare_kaldi_dir(bad_audio_corpus, tmp_path / "train", AUDIO, max_drop_fraction=0.9)
    assert dropped(report) == {"miss": "not found", "notwav": "unreadable", "trunc": "unreadable", "zero": "0 samples"}


def test_bad_audio_keeps_ok(bad_audio_corpus, tmp_path):
    dst = tmp_path / "train"
    prepare_kaldi_dir(bad_audio_corpus, dst, AUDIO, max_drop_fraction=0.9)
    assert read_lines(dst / "utt2dur") == ["ok1 1.000"]


def test_bad_audio_report_names_path(bad_audio_corpus, tmp_path):
    dst = tmp_path / "train"
    prepare_kaldi_dir(bad_audio_corpus, dst, AUDIO, max_drop_fraction=0.9)
    assert "dropped miss: not found (/nonexistent/x.wav)" in read_lines(dst / "prep_report.txt")


def test_bad_audio_strict_fails(bad_audio_corpus, tmp_path):
    with pytest.raises(DataPrepError, match="4 of 5 utterances were dropped"):
        prepare_kaldi_dir(bad_audio_corpus, tmp_path / "train", AUDIO, max_drop_fraction=0.0)


def test_no_utt2spk_own_speaker(bad_audio_corpus, tmp_path):
    dst = tmp_path / "train"
    prepare_kaldi_dir(bad_audio_corpus, dst, AUDIO, max_drop_fraction=0.9)
    assert read_lines(dst / "utt2spk") == ["ok1 ok1"]


def test_no_segments_writes_none(bad_audio_corpus, tmp_path):
    dst = tmp_path / "train"
    prepare_kaldi_dir(bad_audio_corpus, dst, AUDIO, max_drop_fraction=0.9)
    assert not (dst / "segments").exists()


def test_read_data_dir_whole_recording(bad_audio_corpus, tmp_path):
    dst = tmp_path / "train"
    prepare_kaldi_dir(bad_audio_corpus, dst, AUDIO, max_drop_fraction=0.9)
    source = str(bad_audio_corpus / "ok1.wav")
    assert read_data_dir(dst) == [Utterance("ok1", source, None, None, "今天天气好", "ok1", 1.0, "ok1")]


# Stereo, 8 kHz, 44.1 kHz, flac and pipe recordings.
@pytest.fixture
def formats_corpus(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name, rate in (("st8k", 8000), ("st44k", 44100)):
        stereo = np.stack([tone(440, rate, 1.0), tone(880, rate, 1.0)], axis=1)
        soundfile.write(src / f"{name}.wav", stereo, rate)
    soundfile.write(src / "mono16k.wav", tone(440, 16000, 1.0), 16000)
    soundfile.write(src / "mono8k.flac", tone(440, 8000, 1.0), 8000)
    entries = [f"{name} {src}/{name}.wav" for name in ("st8k", "st44k", "mono16k")]
    entries.append(f"flac8k {src}/mono8k.flac")
    if shutil.which("sox"):
        entries.append(f"piped sox {src}/st44k.wav -t wav - |")
    write_lines(src / "wav.scp", entries)
    write_lines(src / "text", [f"{entry.split()[0]} 你好" for entry in entries])
    return src


@pytest.mark.parametrize(
    ("recording", "line"),
    [
        ("st8k", "st8k 8000 2"),
        ("st44k", "st44k 44100 2"),
        ("mono16k", "mono16k 16000 1"),
        ("flac8k", "flac8k 8000 1"),
        pytest.param("piped", "piped 44100 2", marks=needs_sox),
    ],
)
def test_formats_reco2sr_ch(formats_corpus, tmp_path, recording, line):
    dst = tmp_path / "train"
    prepare_kaldi_dir(formats_corpus, dst, AUDIO, max_drop_fraction=0.0)
    assert line in read_lines(dst / "reco2sr_ch")


def test_formats_report_lists_recording(formats_corpus, tmp_path):
    dst = tmp_path / "train"
    prepare_kaldi_dir(formats_corpus, dst, AUDIO, max_drop_fraction=0.0)
    assert "recording st8k: 8000 Hz, 2 channel(s), 8000 samples, 1.000 s" in read_lines(dst / "prep_report.txt")


def test_formats_all_load_one_second(formats_corpus, tmp_path):
    dst = tmp_path / "train"
    prepare_kaldi_dir(formats_corpus, dst, AUDIO, max_drop_fraction=0.0)
    lengths = {u.id: len(load_audio(u.source, u.start, u.end)) for u in read_data_dir(dst)}
    assert all(abs(length - 16000) <= 1 for length in lengths.values()), lengths


def test_channel_index_out_of_range(formats_corpus, tmp_path):
    audio = OmegaConf.merge(AUDIO, {"channel": 1})
    report = prepare_kaldi_dir(formats_corpus, tmp_path / "train", audio, max_drop_fraction=0.9)
    assert dropped(report) == {"mono16k": "channel out of range", "flac8k": "channel out of range"}


@needs_sox
def test_failing_pipe_dropped(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    soundfile.write(src / "ok.wav", tone(440, 16000, 1.0), 16000)
    write_lines(src / "wav.scp", [f"ok {src}/ok.wav", f"bad sox {src}/missing.wav -t wav - |"])
    write_lines(src / "text", ["ok 你好", "bad 你好"])
    report = prepare_kaldi_dir(src, tmp_path / "train", AUDIO, max_drop_fraction=0.5)
    assert dropped(report) == {"bad": "command failed"}


# Table problems: transcripts, ids, speakers and durations.
@pytest.fixture
def tables_corpus(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    soundfile.write(src / "one.wav", tone(440, 16000, 1.0), 16000)
    soundfile.write(src / "short.wav", tone(440, 16000, 0.05), 16000)
    wav_ids = ["good", "blank", "spaces", "notext", "a/b", "zw\u200bid", "short", "nospk"]
    wav = [f"{utt} {src}/{'short' if utt == 'short' else 'one'}.wav" for utt in wav_ids]
    write_lines(src / "wav.scp", wav)
    write_lines(
        src / "text",
        ["good 好", "blank", "spaces  \t ", "a/b 好", "zw\u200bid 好", "short 好", "nospk 好", "nowav 好"],
    )
    speakers = ["good s1", "blank s1", "spaces s1", "notext s1", "a/b s1", "zw\u200bid s1", "short s1", "nowav s1"]
    write_lines(src / "utt2spk", speakers)
    return src


def test_tables_dropped_reasons(tables_corpus, tmp_path):
    report = prepare_kaldi_dir(tables_corpus, tmp_path / "train", AUDIO, max_drop_fraction=1.0)
    assert dropped(report) == {
        "blank": "empty transcript",
        "spaces": "empty transcript",
        "notext": "no transcript",
        "nowav": "no recording",
        "a/b": "invalid utterance id",
        "zw\u200bid": "invalid utterance id",
        "short": "too short",
        "nospk": "no speaker",
    }


def test_tables_keeps_good(tables_corpus, tmp_path):
    dst = tmp_path / "train"
    prepare_kaldi_dir(tables_corpus, dst, AUDIO, max_drop_fraction=1.0)
    assert read_lines(dst / "text") == ["good 好"]


def test_tables_input_count(tables_corpus, tmp_path):
    report = prepare_kaldi_dir(tables_corpus, tmp_path / "train", AUDIO, max_drop_fraction=1.0)
    assert report.input_utterances == 9


def test_too_long_dropped(segments_corpus, tmp_path):
    audio = OmegaConf.merge(AUDIO, {"max_duration": 2.0})
    report = prepare_kaldi_dir(segments_corpus, tmp_path / "train", audio, max_drop_fraction=0.6)
    assert dropped(report)["rec2-a"] == "too long"


def test_nothing_kept_raises(tables_corpus, tmp_path):
    audio = OmegaConf.merge(AUDIO, {"max_duration": 0.5})
    with pytest.raises(DataPrepError, match="none of the 9 utterances was kept"):
        prepare_kaldi_dir(tables_corpus, tmp_path / "train", audio, max_drop_fraction=1.0)


@pytest.mark.parametrize("value", ["rec1 0.1", "rec1 zero 0.5", "rec1 nan 0.5", "rec1 -0.1 0.5"])
def test_invalid_segment_line(segments_corpus, tmp_path, value):
    write_lines(segments_corpus / "segments", SEGMENTS + [f"rec1-z {value}"])
    with open(segments_corpus / "text", "a", encoding="utf-8") as out:
        out.write("rec1-z 好\n")
    report = prepare_kaldi_dir(segments_corpus, tmp_path / "train", AUDIO, max_drop_fraction=0.6)
    assert dropped(report)["rec1-z"] == "invalid segment"


def test_segment_unknown_recording(segments_corpus, tmp_path):
    write_lines(segments_corpus / "segments", SEGMENTS + ["rec3-a rec3 0.0 0.5"])
    with open(segments_corpus / "text", "a", encoding="utf-8") as out:
        out.write("rec3-a 好\n")
    report = prepare_kaldi_dir(segments_corpus, tmp_path / "train", AUDIO, max_drop_fraction=0.6)
    assert dropped(report)["rec3-a"] == "recording not in wav.scp"


# Text encodings: GBK is rejected, a BOM and CRLF line endings are stripped.
def encoded_corpus(src: Path, text_bytes: bytes) -> Path:
    src.mkdir(parents=True)
    soundfile.write(src / "u1.wav", tone(440, 16000, 1.0), 16000)
    write_lines(src / "wav.scp", [f"u1 {src}/u1.wav"])
    (src / "text").write_bytes(text_bytes)
    return src


def test_gbk_text_names_file_and_line(tmp_path):
    src = encoded_corpus(tmp_path / "src", "u1 今天天气好\n".encode("gbk"))
    with pytest.raises(DataPrepError, match=rf"{src / 'text'}:1: invalid UTF-8"):
        prepare_kaldi_dir(src, tmp_path / "train", AUDIO, max_drop_fraction=0.0)


@pytest.mark.parametrize("raw", ["\ufeffu1 今天天气好\n".encode("utf-8"), "u1 今天天气好\r\n".encode("utf-8")])
def test_bom_crlf_text(tmp_path, raw):
    src = encoded_corpus(tmp_path / "src", raw)
    dst = tmp_path / "train"
    prepare_kaldi_dir(src, dst, AUDIO, max_drop_fraction=0.0)
    assert (dst / "text").read_bytes() == "u1 今天天气好\n".encode("utf-8")


# Stage 0 entry point.
def corpus_config(tmp_path: Path, source_dir: Path, layout: str = "kaldi") -> OmegaConf:
    return OmegaConf.create(
        {
            "corpus": {"layout": layout, "source_dir": str(source_dir), "splits": {"train": "sc_train"}},
            "data_dir": str(tmp_path / "data"),
            "audio": dict(AUDIO),
        }
    )


def test_corpus_unsupported_layout(tmp_path):
    with pytest.raises(DataPrepError, match="unsupported corpus.layout 'lhotse': supported layouts are kaldi"):
        prepare_corpus(corpus_config(tmp_path, tmp_path, layout="lhotse"))


def test_corpus_missing_source_dir(tmp_path):
    with pytest.raises(DataPrepError, match=r"not found.*run `bash run\.sh --stage 0`"):
        prepare_corpus(corpus_config(tmp_path, tmp_path / "absent"))


def test_corpus_missing_split_dir(tmp_path):
    (tmp_path / "corpus").mkdir()
    with pytest.raises(DataPrepError, match="source data dir not found: .*sc_train"):
        prepare_corpus(corpus_config(tmp_path, tmp_path / "corpus"))


def test_stage_main_gbk_locale(tmp_path):
    """Run stage 0 as a command with a non-UTF-8 locale: files are still read and written as UTF-8.

    Where zh_CN.GBK is not installed, Python falls back to the C locale, whose
    encoding is ASCII, which is just as strict a check.
    """
    encoded_corpus(tmp_path / "corpus" / "sc_train", "\ufeffu1 今天天气好\r\n".encode("utf-8"))
    config = tmp_path / "conf" / "test.yaml"
    config.parent.mkdir()
    config.write_text(OmegaConf.to_yaml(corpus_config(tmp_path, tmp_path / "corpus")), encoding="utf-8")
    env = dict(os.environ, PYTHONIOENCODING="gbk", LC_ALL="zh_CN.GBK", LANG="zh_CN.GBK", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0")
    env["PYTHONPATH"] = str(REPO)
    command = [sys.executable, "-m", "sparlora.prepare", "--config", str(config)]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, check=False)
    assert result.returncode == 0, result.stderr.decode("utf-8", errors="replace")
    assert (tmp_path / "data" / "train" / "text").read_bytes() == "u1 今天天气好\n".encode("utf-8")


def test_rerun_removes_stale_stage1_files(tmp_path):
    """A new raw `text` from stage 0 makes stage 1's text.raw and oov.txt stale, so they go."""
    src = tmp_path / "src"
    src.mkdir()
    wav = tmp_path / "a.wav"
    soundfile.write(wav, np.zeros(16000, dtype=np.float32), 16000)
    (src / "wav.scp").write_text(f"u1 {wav}\n", encoding="utf-8")
    (src / "text").write_text("u1 今天\n", encoding="utf-8")
    dst = tmp_path / "dst"
    prepare_kaldi_dir(src, dst, AUDIO, 0.0)
    for name in ("text.raw", "oov.txt", "text.dropped", "data.jsonl"):
        (dst / name).write_text("stale\n", encoding="utf-8")
    prepare_kaldi_dir(src, dst, AUDIO, 0.0)
    for name in ("text.raw", "oov.txt", "text.dropped", "data.jsonl"):
        assert not (dst / name).exists(), name


def test_invalid_table_removes_stale_outputs(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    wav = tmp_path / "a.wav"
    soundfile.write(wav, np.zeros(16000, dtype=np.float32), 16000)
    (src / "wav.scp").write_text(f"u1 {wav}\n", encoding="utf-8")
    (src / "text").write_text("u1 今天\n", encoding="utf-8")
    dst = tmp_path / "dst"
    prepare_kaldi_dir(src, dst, AUDIO, 0.0)
    (src / "text").write_text("u1 今天\nu1 明天\n", encoding="utf-8")
    with pytest.raises(DataPrepError, match="duplicate"):
        prepare_kaldi_dir(src, dst, AUDIO, 0.0)
    assert not (dst / "text").exists()
    assert not (dst / "wav.scp").exists()
    assert "duplicate" in (dst / "prep_report.txt").read_text(encoding="utf-8")


@pytest.mark.parametrize(("speakers", "expected"), [
    (["a", "a", "b"], True),
    (["b", "a"], False),
    (["a", "b", "a"], False),
    ([], True),
])
def test_speaker_order_check(speakers, expected):
    from sparlora.prepare import speakers_sorted_with_utterances

    assert speakers_sorted_with_utterances(speakers) is expected


def test_half_wav_dropped_as_truncated(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("ok1", "ok2", "half"):
        soundfile.write(src / f"{name}.wav", tone(440, 16000, 1.0), 16000, subtype="PCM_16")
    whole = (src / "half.wav").read_bytes()
    (src / "half.wav").write_bytes(whole[: len(whole) // 2])
    write_lines(src / "wav.scp", [f"{name} {src / name}.wav" for name in ("ok1", "ok2", "half")])
    write_lines(src / "text", [f"{name} 今天天气好" for name in ("ok1", "ok2", "half")])
    dst = tmp_path / "train"

    report = prepare_kaldi_dir(src, dst, AUDIO, max_drop_fraction=0.5)

    assert dropped(report) == {"half": "truncated"}
    assert read_lines(dst / "utt2dur") == ["ok1 1.000", "ok2 1.000"]
    report_lines = [line for line in read_lines(dst / "prep_report.txt") if line.startswith("dropped half: truncated (")]
    assert len(report_lines) == 1
    assert "the WAV header declares 32000 bytes of audio, the file has 15978" in report_lines[0]
