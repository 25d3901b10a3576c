"""Tests for sparlora.audio: formats, pipes, segment cuts, channel reduction, resampling."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
from hypothesis import given, settings
from hypothesis import strategies as st

from sparlora.audio import AudioError, AudioInfo, audio_info, load_audio, resample, seconds_to_samples

needs_sox = pytest.mark.skipif(shutil.which("sox") is None, reason="sox is not installed")


def tone(frequency: float, sample_rate: int, seconds: float = 1.0, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    return amplitude * np.sin(2 * np.pi * frequency * t)


def write_stereo(path: Path, sample_rate: int) -> str:
    """Write 1.0 s of stereo audio: left 440 Hz, right 880 Hz, amplitude 0.3."""
    stereo = np.stack([tone(440, sample_rate), tone(880, sample_rate)], axis=1)
    soundfile.write(path, stereo, sample_rate)
    return str(path)


def write_mono(path: Path, sample_rate: int = 16000, seconds: float = 1.0, frequency: float = 440) -> str:
    soundfile.write(path, tone(frequency, sample_rate, seconds), sample_rate)
    return str(path)


def spectrum_at(signal: np.ndarray, sample_rate: int, frequency: float) -> float:
    """Return the magnitude spectrum of `signal` at `frequency`, relative to its peak."""
    magnitude = np.abs(np.fft.rfft(signal))
    bin_index = round(frequency * len(signal) / sample_rate)
    return float(magnitude[bin_index] / magnitude.max())


@pytest.fixture
def st8k(tmp_path):
    return write_stereo(tmp_path / "st8k.wav", 8000)


@pytest.fixture
def st44k(tmp_path):
    return write_stereo(tmp_path / "st44k.wav", 44100)


def test_seconds_to_samples_rounds():
    assert seconds_to_samples(2.03, 8000) == 16240


def test_load_stereo_8k_length(st8k):
    audio = load_audio(st8k)
    assert audio.shape == (16000,)


def test_load_stereo_8k_dtype(st8k):
    assert load_audio(st8k).dtype == np.float32


def test_load_stereo_44k_length(st44k):
    audio = load_audio(st44k)
    assert abs(len(audio) - 16000) <= 1


def test_load_mono_16k_unchanged(tmp_path):
    path = write_mono(tmp_path / "mono16k.wav")
    audio = load_audio(path)
    expected = soundfile.read(path, dtype="float32")[0]
    assert np.array_equal(audio, expected)


@pytest.mark.parametrize("name", ["st8k", "st44k"])
@pytest.mark.parametrize("frequency", [440, 880])
def test_mean_mixdown_keeps_tone(request, name, frequency):
    audio = load_audio(request.getfixturevalue(name))
    assert spectrum_at(audio, 16000, frequency) > 0.9


def test_mean_mixdown_amplitude(st8k):
    # Each tone keeps half its amplitude after the mean: 0.3 / 2.
    audio = load_audio(st8k)
    peak = 2 * np.abs(np.fft.rfft(audio))[440] / len(audio)
    assert peak == pytest.approx(0.15, abs=0.005)


def test_channel_index_picks_right(st8k):
    audio = load_audio(st8k, channel=1)
    assert spectrum_at(audio, 16000, 440) < 0.01


def test_channel_index_keeps_right_tone(st8k):
    audio = load_audio(st8k, channel=1)
    assert spectrum_at(audio, 16000, 880) == pytest.approx(1.0)


def test_channel_index_as_string(st8k):
    assert np.array_equal(load_audio(st8k, channel="1"), load_audio(st8k, channel=1))


def test_channel_out_of_range(st8k):
    with pytest.raises(AudioError, match=r"st8k\.wav.*channel index 2, but the recording has 2 channel"):
        load_audio(st8k, channel=2)


@pytest.mark.parametrize("rule", ["left", -1, True, 1.5])
def test_channel_rule_invalid(st8k, rule):
    with pytest.raises(ValueError, match="invalid channel rule"):
        load_audio(st8k, channel=rule)


def test_cut_rounds_at_original_rate(tmp_path):
    path = write_mono(tmp_path / "rec2.wav", sample_rate=8000, seconds=3.0)
    assert len(load_audio(path, 0.0, 2.03, sample_rate=8000)) == 16240


def test_cut_then_resample_length(tmp_path):
    path = write_mono(tmp_path / "rec2.wav", sample_rate=8000, seconds=3.0)
    assert len(load_audio(path, 0.0, 2.03)) == 32480


def test_cut_matches_file_samples(tmp_path):
    path = write_mono(tmp_path / "rec2.wav", sample_rate=8000, seconds=3.0)
    full = soundfile.read(path, dtype="float32")[0]
    assert np.array_equal(load_audio(path, 0.5, 1.0, sample_rate=8000), full[4000:8000])


def test_cut_end_minus_one(tmp_path):
    path = write_mono(tmp_path / "rec2.wav", sample_rate=8000, seconds=3.0)
    assert len(load_audio(path, 2.5, -1, sample_rate=8000)) == 4000


def test_cut_end_past_recording(tmp_path):
    path = write_mono(tmp_path / "rec1.wav")
    with pytest.raises(AudioError, match="past the recording end"):
        load_audio(path, 0.9, 1.3)


def test_cut_start_after_recording(tmp_path):
    path = write_mono(tmp_path / "rec1.wav")
    with pytest.raises(AudioError, match="at or after the recording end"):
        load_audio(path, 1.1, 1.2)


def test_cut_zero_length(tmp_path):
    path = write_mono(tmp_path / "rec1.wav")
    with pytest.raises(AudioError, match="empty or reversed"):
        load_audio(path, 0.4, 0.4)


def test_resample_8k_doubles_odd_length():
    assert len(resample(np.zeros(8001), 8000, 16000)) == 16002


@settings(max_examples=40, deadline=None)
@given(
    original_rate=st.sampled_from([8000, 11025, 16000, 22050, 32000, 44100, 48000]),
    num_samples=st.integers(min_value=1, max_value=3000),
)
def test_resample_length_exact_ratio(original_rate, num_samples):
    resampled = resample(np.zeros(num_samples), original_rate, 16000)
    assert len(resampled) == math.ceil(num_samples * 16000 / original_rate)


def test_load_clips_to_unit_range(tmp_path):
    # A full-scale square wave rings past +-1 when resampled.
    square = np.sign(tone(440, 8000, amplitude=1.0))
    path = tmp_path / "square.wav"
    soundfile.write(path, square, 8000, subtype="FLOAT")
    assert np.abs(load_audio(str(path))).max() <= 1.0


def test_load_flac(tmp_path):
    path = tmp_path / "mono8k.flac"
    soundfile.write(path, tone(440, 8000), 8000)
    assert len(load_audio(str(path))) == 16000


def test_info_stereo_44k(st44k):
    assert audio_info(st44k) == AudioInfo(sample_rate=44100, channels=2, num_samples=44100, duration=1.0)


@needs_sox
def test_pipe_load_matches_file(st44k):
    pipe = f"sox {st44k} -t wav - |"
    assert np.array_equal(load_audio(pipe), load_audio(st44k))


@needs_sox
def test_pipe_info(st8k):
    assert audio_info(f"sox {st8k} -t wav - |") == AudioInfo(8000, 2, 8000, 1.0)


def test_pipe_failure_names_command():
    with pytest.raises(AudioError, match=r"exit status 3: echo boom >&2; exit 3: boom"):
        audio_info("echo boom >&2; exit 3 |")


def test_pipe_failure_early_in_pipeline(tmp_path):
    with pytest.raises(AudioError, match="command failed"):
        audio_info(f"cat {tmp_path}/missing.wav | cat |")


def test_pipe_no_output():
    with pytest.raises(AudioError, match="0 samples"):
        audio_info("true |")


def test_missing_file_not_found():
    with pytest.raises(FileNotFoundError, match="/nonexistent/x.wav"):
        load_audio("/nonexistent/x.wav")


def test_missing_file_info_not_found():
    with pytest.raises(FileNotFoundError, match="/nonexistent/x.wav"):
        audio_info("/nonexistent/x.wav")


def make_bad_file(tmp_path: Path, case: str) -> str:
    """Write a file that is not usable audio: zero-byte, header only, text or no samples."""
    valid = Path(write_mono(tmp_path / "valid.wav"))
    path = tmp_path / f"{case}.wav"
    if case == "zero":
        path.write_bytes(b"")
    elif case == "trunc":
        path.write_bytes(valid.read_bytes()[:30])
    elif case == "notwav":
        path.write_text("this is a text file, not audio\n", encoding="utf-8")
    elif case == "nosamples":
        soundfile.write(path, np.zeros(0), 16000)
    return str(path)


@pytest.mark.parametrize(
    ("case", "kind"),
    [("zero", "0 samples"), ("trunc", "unreadable"), ("notwav", "unreadable"), ("nosamples", "0 samples")],
)
def test_bad_file_info_kind(tmp_path, case, kind):
    with pytest.raises(AudioError) as caught:
        audio_info(make_bad_file(tmp_path, case))
    assert caught.value.kind == kind


@pytest.mark.parametrize("case", ["zero", "trunc", "notwav", "nosamples"])
def test_bad_file_load_names_path(tmp_path, case):
    path = make_bad_file(tmp_path, case)
    with pytest.raises(AudioError, match=f"{case}.wav"):
        load_audio(path)


def test_info_truncated_flac(tmp_path):
    # The header is intact, so only decoding the last sample finds the damage.
    path = tmp_path / "cut.flac"
    soundfile.write(path, tone(440, 16000), 16000)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AudioError, match="unreadable"):
        audio_info(str(path))


def test_info_truncated_pcm_wav(tmp_path):
    # libsndfile reads a cut PCM WAV up to its last whole frame; the header's data size shows the cut.
    path = tmp_path / "cut.wav"
    soundfile.write(path, tone(440, 16000), 16000, subtype="PCM_16")
    data = path.read_bytes()
    path.write_bytes(data[:44 + 16000])

    with pytest.raises(AudioError) as caught:
        audio_info(str(path))

    assert caught.value.kind == "truncated"
    assert "the WAV header declares 32000 bytes of audio, the file has 16000" in caught.value.detail


@pytest.mark.parametrize("placeholder", [0xFFFFFFFF, 0x7FFFF000])
def test_info_streamed_wav_size_unknown(tmp_path, placeholder):
    # Streaming writers leave a placeholder data size: the length is unknown, not cut.
    path = tmp_path / "streamed.wav"
    soundfile.write(path, tone(440, 16000), 16000, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    assert data[36:40] == b"data"
    data[40:44] = placeholder.to_bytes(4, "little")
    path.write_bytes(bytes(data))

    assert audio_info(str(path)).num_samples == 16000


@pytest.mark.skipif(shutil.which("sox") is None, reason="sox not installed (scripts/setup_env.sh installs it)")
def test_info_sox_speed_pipe(tmp_path):
    # sox writes a placeholder size to a pipe after speed; Kaldi speed perturbation uses such entries.
    path = tmp_path / "full.wav"
    soundfile.write(path, tone(440, 16000), 16000, subtype="PCM_16")

    info = audio_info(f"sox {path} -t wav - speed 1.1 |")

    assert info.sample_rate == 16000
    assert abs(info.num_samples - 16000 / 1.1) < 50


def test_info_wrong_riff_size_kept(tmp_path):
    # Only the data chunk counts: a wrong RIFF size alone does not mean missing audio.
    path = tmp_path / "riff.wav"
    soundfile.write(path, tone(440, 16000), 16000, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    data[4:8] = (len(data) + 1000).to_bytes(4, "little")
    path.write_bytes(bytes(data))

    assert audio_info(str(path)).num_samples == 16000
