"""Tests for sparlora.noise and sparlora.synth_noise: SNR mixing, noise sources, noisy copies, augmentation."""

from __future__ import annotations

import hashlib
import math
import random
from pathlib import Path

import numpy as np
import pytest
import soundfile
from omegaconf import OmegaConf

from sparlora.audio import load_audio
from sparlora.kaldi_io import read_table
from sparlora.noise import (
    NOISE_REPORT,
    NoiseAugmenter,
    NoiseError,
    NoiseSource,
    SilentSignalError,
    active_speech_power,
    fit_noise,
    main,
    make_noisy_copies,
    mix_at_snr,
    noisy_split_name,
)
from sparlora.prepare import prepare_kaldi_dir
from sparlora.synth_noise import write_noise_dir

REPO = Path(__file__).resolve().parents[1]
RATE = 16000
SNRS = [20.0, 10.0, 5.0, 0.0, -5.0]
AUDIO = OmegaConf.create(
    {"sample_rate": RATE, "channel": "mean", "segment_end_tolerance": 0.025, "max_drop_fraction": 0.0,
     "min_duration": 0.1, "max_duration": 30.0}
)


def padded_tone(amplitude: float = 0.1, rate: int = RATE, lead: float = 0.2, tone: float = 1.0, tail: float = 0.3) -> np.ndarray:
    """Return silence, a 400 Hz tone and silence, with the tone on 20 ms frame boundaries at 16 kHz."""
    t = np.arange(int(round(tone * rate))) / rate
    return np.concatenate([np.zeros(int(round(lead * rate))), amplitude * np.sin(2 * np.pi * 400 * t), np.zeros(int(round(tail * rate)))])


def measured_snr(speech: np.ndarray, mixed: np.ndarray, active: slice) -> float:
    """Return the SNR of `mixed` against the clean `speech`, with the speech power taken over `active`."""
    added = np.asarray(mixed, dtype=np.float64) - np.asarray(speech, dtype=np.float64)
    return 10 * math.log10(np.mean(np.square(speech[active])) / np.mean(np.square(added)))


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def write_noise_file(root: Path, name: str, samples: np.ndarray, rate: int = RATE) -> Path:
    path = root / "noise" / "test" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, samples, rate)
    return path


@pytest.fixture
def noise_dir(tmp_path) -> Path:
    root = tmp_path / "musan"
    write_noise_file(root, "white.wav", 0.1 * np.random.default_rng(0).standard_normal(3 * RATE))
    return root


@pytest.fixture
def prepared_test_split(tmp_path) -> Path:
    """A prepared test split of 3 utterances: two whole 16 kHz files and one segment of an 8 kHz stereo file."""
    src = tmp_path / "corpus"
    src.mkdir()
    soundfile.write(src / "a.wav", padded_tone(0.1), RATE)
    soundfile.write(src / "b.wav", padded_tone(0.05, tone=0.6), RATE)
    stereo = np.stack([padded_tone(0.1, rate=8000, tone=2.0), padded_tone(0.1, rate=8000, tone=2.0)], axis=1)
    soundfile.write(src / "c.wav", stereo, 8000)
    (src / "wav.scp").write_text(f"a {src}/a.wav\nb {src}/b.wav\nc {src}/c.wav\n", encoding="utf-8")
    (src / "segments").write_text("utt-a a 0 -1\nutt-b b 0 -1\nutt-c c 0.10 2.40\n", encoding="utf-8")
    (src / "text").write_text("utt-a 巴适得很\nutt-b 今天天气好\nutt-c 去成都\n", encoding="utf-8")
    (src / "utt2spk").write_text("utt-a s1\nutt-b s2\nutt-c s1\n", encoding="utf-8")
    (src / "spk2gender").write_text("s1 f\ns2 m\n", encoding="utf-8")
    data_dir = tmp_path / "data" / "test"
    prepare_kaldi_dir(src, data_dir, AUDIO, 0.0)
    return data_dir


# --- SNR mixing --------------------------------------------------------------------------


def test_active_power_ignores_silence():
    speech = padded_tone(0.2)

    assert active_speech_power(speech, RATE) == pytest.approx(0.2**2 / 2, rel=1e-9)


@pytest.mark.parametrize("snr", SNRS)
def test_mix_measured_snr_matches_target(snr):
    speech = padded_tone(0.1)
    noise = 0.3 * np.random.default_rng(1).standard_normal(len(speech))

    mixed = mix_at_snr(speech, noise, snr, RATE)

    assert mixed.dtype == np.float32
    assert abs(measured_snr(speech, mixed, slice(3200, 19200)) - snr) < 0.1


@pytest.mark.parametrize("signal", [np.zeros(RATE), np.full(RATE, 1e-7), np.zeros(0)])
def test_silent_speech_raises(signal):
    with pytest.raises(SilentSignalError, match="utterance x1"):
        mix_at_snr(signal, np.ones(len(signal)), 10.0, RATE, speech_name="utterance x1")


def test_silent_noise_raises():
    with pytest.raises(SilentSignalError, match=r"noise n\.wav is silent"):
        mix_at_snr(padded_tone(), np.zeros(len(padded_tone())), 10.0, RATE, noise_name="noise n.wav")


@pytest.mark.parametrize("snr", [float("nan"), float("inf"), "10", True])
def test_invalid_snr_raises(snr):
    with pytest.raises(NoiseError, match="invalid SNR"):
        mix_at_snr(padded_tone(), np.ones(len(padded_tone())), snr, RATE)


def test_fit_noise_crops_and_loops():
    noise = np.arange(10)

    assert fit_noise(noise, 4, 3).tolist() == [3, 4, 5, 6]
    assert fit_noise(noise, 15, 7).tolist() == [7, 8, 9, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


# --- noise source ------------------------------------------------------------------------


def test_noise_source_resamples_and_mixes_down(tmp_path):
    rate = 44100
    t = np.arange(4 * rate) / rate
    left = 0.4 * np.sin(2 * np.pi * 440 * t)
    write_noise_file(tmp_path / "musan", "stereo.wav", np.stack([left, 0.5 * left], axis=1), rate)
    source = NoiseSource(tmp_path / "musan", ["noise"], RATE)
    speech = padded_tone(0.1)

    segment = source.segment(len(speech), random.Random(0))
    mixed = mix_at_snr(speech, segment.samples, 5.0, RATE)

    assert len(segment.samples) == len(speech)
    assert segment.path.name == "stereo.wav"
    assert math.sqrt(np.mean(np.square(segment.samples[100:-100]))) == pytest.approx(0.3 / math.sqrt(2), rel=0.01)
    assert abs(measured_snr(speech, mixed, slice(3200, 19200)) - 5.0) < 0.1


def test_noise_source_loops_short_file(tmp_path):
    short = 0.1 * np.random.default_rng(2).standard_normal(RATE // 2)
    write_noise_file(tmp_path / "musan", "short.wav", short)
    source = NoiseSource(tmp_path / "musan", ["noise"], RATE)

    segment = source.segment(2 * RATE, random.Random(3))

    assert len(segment.samples) == 2 * RATE
    assert np.array_equal(segment.samples[: RATE + RATE // 2], segment.samples[RATE // 2: 2 * RATE])


def test_noise_source_all_zero_file_raises(tmp_path):
    path = write_noise_file(tmp_path / "musan", "zeros.wav", np.zeros(RATE))
    source = NoiseSource(tmp_path / "musan", ["noise"], RATE)

    with pytest.raises(SilentSignalError, match=rf"10 noise segments drawn in a row .* were silent \(last: {path}\)"):
        source.segment(RATE // 2, random.Random(0))


def test_noise_source_missing_dir_raises(tmp_path):
    (tmp_path / "empty" / "noise").mkdir(parents=True)

    with pytest.raises(NoiseError, match="noise dir .*nowhere not found"):
        NoiseSource(tmp_path / "nowhere")
    with pytest.raises(NoiseError, match=r"no \.wav or \.flac files found under .*empty/noise"):
        NoiseSource(tmp_path / "empty")
    with pytest.raises(NoiseError, match="noise folder .*music not found"):
        NoiseSource(tmp_path / "empty", ["music"])


# --- noisy copies --------------------------------------------------------------------------


def test_noisy_copies_tables_consistent(prepared_test_split, noise_dir, tmp_path):
    corpus = prepared_test_split.parents[1] / "corpus"
    before = (tree_hashes(prepared_test_split), tree_hashes(corpus))

    summaries = make_noisy_copies(prepared_test_split, prepared_test_split.parent, [10, 0], NoiseSource(noise_dir), seed=4)

    assert [summary.name for summary in summaries] == ["test_snr10", "test_snr0"]
    ids = ["utt-a", "utt-b", "utt-c"]
    for summary in summaries:
        out = summary.path
        for table in ("wav.scp", "text", "utt2spk", "utt2dur", "reco2sr_ch"):
            assert [key for key, _ in read_table(out / table)] == ids, table
        assert not (out / "segments").exists()
        assert dict(read_table(out / "text")) == dict(read_table(prepared_test_split / "text"))
        assert dict(read_table(out / "spk2utt")) == {"s1": "utt-a utt-c", "s2": "utt-b"}
        assert dict(read_table(out / "spk2gender")) == {"s1": "f", "s2": "m"}
        assert {value for _, value in read_table(out / "reco2sr_ch")} == {"16000 1"}
        assert dict(read_table(out / "utt2dur"))["utt-c"] == "2.300"
        for utt, path in read_table(out / "wav.scp"):
            assert Path(path) == (out / "wav" / f"{utt}.wav").resolve()
            assert soundfile.info(path).samplerate == RATE
        assert (out / NOISE_REPORT).is_file()
    assert (tree_hashes(prepared_test_split), tree_hashes(corpus)) == before


@pytest.mark.parametrize("snr", [10, 0])
def test_noisy_copy_wav_has_target_snr(prepared_test_split, noise_dir, snr):
    make_noisy_copies(prepared_test_split, prepared_test_split.parent, [snr], NoiseSource(noise_dir), seed=4)

    clean = load_audio(str(prepared_test_split.parents[1] / "corpus" / "a.wav"))
    noisy = load_audio(str(prepared_test_split.parent / noisy_split_name("test", snr) / "wav" / "utt-a.wav"))
    assert len(noisy) == len(clean)
    assert abs(measured_snr(clean, noisy, slice(3200, 19200)) - snr) < 0.1


def test_noisy_copies_deterministic_per_seed(prepared_test_split, noise_dir, tmp_path):
    source = NoiseSource(noise_dir)
    for root, seed in (("a", 4), ("b", 4), ("c", 5)):
        make_noisy_copies(prepared_test_split, tmp_path / root, [5], source, seed=seed)

    a, b, c = (tree_hashes(tmp_path / root / "test_snr5" / "wav") for root in ("a", "b", "c"))
    assert a == b
    assert a["utt-a.wav"] != c["utt-a.wav"]


def test_noisy_copies_silent_utterance_left_out(tmp_path, noise_dir):
    src = tmp_path / "corpus"
    src.mkdir()
    soundfile.write(src / "quiet.wav", np.zeros(RATE), RATE)
    soundfile.write(src / "loud.wav", 0.3 * np.sin(2 * np.pi * 440 * np.arange(RATE) / RATE), RATE)
    (src / "wav.scp").write_text(f"loud {src}/loud.wav\nquiet {src}/quiet.wav\n", encoding="utf-8")
    (src / "text").write_text("loud 大声\nquiet 安静\n", encoding="utf-8")
    prepare_kaldi_dir(src, tmp_path / "data" / "test", AUDIO, 0.0)

    make_noisy_copies(tmp_path / "data" / "test", tmp_path / "data", [10], NoiseSource(noise_dir), seed=0)

    out = tmp_path / "data" / "test_snr10"
    assert (out / "text").read_text(encoding="utf-8") == "loud 大声\n"
    report = (out / NOISE_REPORT).read_text(encoding="utf-8").splitlines()
    assert "left out as silent: 1" in report
    assert "silent quiet" in report


def test_noisy_copies_all_silent_raises(tmp_path, noise_dir):
    src = tmp_path / "corpus"
    src.mkdir()
    soundfile.write(src / "quiet.wav", np.zeros(RATE), RATE)
    (src / "wav.scp").write_text(f"quiet {src}/quiet.wav\n", encoding="utf-8")
    (src / "text").write_text("quiet 安静\n", encoding="utf-8")
    prepare_kaldi_dir(src, tmp_path / "data" / "test", AUDIO, 0.0)

    with pytest.raises(SilentSignalError, match="every utterance of .*test is silent"):
        make_noisy_copies(tmp_path / "data" / "test", tmp_path / "data", [10], NoiseSource(noise_dir), seed=0)

    out = tmp_path / "data" / "test_snr10"
    assert (out / NOISE_REPORT).read_text(encoding="utf-8") == "status: incomplete\n"
    assert not (out / "wav.scp").exists()


def test_noisy_copies_never_overwrite_foreign_dir(prepared_test_split, noise_dir):
    foreign = prepared_test_split.parent / "test_snr10"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine\n", encoding="utf-8")

    with pytest.raises(FileExistsError, match="has no noise_report.txt"):
        make_noisy_copies(prepared_test_split, prepared_test_split.parent, [10], NoiseSource(noise_dir), seed=0)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_noisy_split_names():
    assert noisy_split_name("sc_test", 10) == "sc_test_snr10"
    assert noisy_split_name("sc_test", -5.0) == "sc_test_snr-5"
    assert noisy_split_name("sc_test", 2.5) == "sc_test_snr2.5"


# --- training augmentation -----------------------------------------------------------------


def test_augmenter_deterministic_per_epoch_and_key(noise_dir):
    augment = NoiseAugmenter(NoiseSource(noise_dir), [10.0], probability=1.0, seed=9)
    speech = padded_tone(0.1).astype(np.float32)

    first = augment(speech, "utt1", epoch=1)
    again = augment(speech, "utt1", epoch=1)
    next_epoch = augment(speech, "utt1", epoch=2)

    assert np.array_equal(first, again)
    assert not np.array_equal(first, next_epoch)
    assert abs(measured_snr(speech, first, slice(3200, 19200)) - 10.0) < 0.1
    assert augment.applied == 3


def test_augmenter_probability(noise_dir):
    augment = NoiseAugmenter(NoiseSource(noise_dir), [20.0, 5.0], probability=0.5, seed=9)
    speech = padded_tone(0.1).astype(np.float32)

    changed = sum(not np.array_equal(augment(speech, f"utt{i}", 1), speech) for i in range(200))

    assert 80 <= changed <= 120
    assert augment.applied == changed


def test_augmenter_skips_silent_utterance(noise_dir):
    augment = NoiseAugmenter(NoiseSource(noise_dir), [10.0], probability=1.0, seed=0)
    silent = np.zeros(RATE, dtype=np.float32)

    assert augment(silent, "quiet", 1) is silent
    assert augment.skipped_silent == 1
    assert augment.applied == 0


def test_augmenter_from_config_off_by_default(noise_dir):
    cfg = OmegaConf.create({"audio": {"sample_rate": RATE}, "noise": {"dir": str(noise_dir), "folders": ["noise"], "seed": 1,
                                                                    "train": {"probability": 0.0, "snrs": [10]}}})
    assert NoiseAugmenter.from_config(cfg) is None
    cfg.noise.train.probability = 0.3
    augment = NoiseAugmenter.from_config(cfg)
    assert augment.probability == 0.3
    assert augment.snrs_db == [10.0]


# --- demo noise --------------------------------------------------------------------------


def band_psd_db(samples: np.ndarray, low: float, high: float) -> float:
    spectrum = np.abs(np.fft.rfft(samples)) ** 2
    frequencies = np.fft.rfftfreq(len(samples), d=1.0 / RATE)
    return 10 * math.log10(spectrum[(frequencies >= low) & (frequencies < high)].mean())


def test_synth_noise_layout_and_spectra(tmp_path, prepared_test_split):
    scp = prepared_test_split.parents[1] / "corpus" / "wav.scp"

    written = write_noise_dir(tmp_path / "noise_set", seconds=4.0, seed=1, files_per_kind=1, babble_source="scp", babble_scp=scp, talkers=3)

    names = sorted(str(path.relative_to(tmp_path / "noise_set")) for path in written)
    assert names == ["noise/babble/babble_00.wav", "noise/brown/brown_00.wav", "noise/pink/pink_00.wav", "noise/white/white_00.wav"]
    # Mean power per bin from 200-400 Hz against 1600-3200 Hz: 3 octaves, at 0, 3.01 and 6.02 dB per octave.
    for name, expected_db in (("white", 0.0), ("pink", 9.03), ("brown", 18.06)):
        samples, rate = soundfile.read(tmp_path / "noise_set" / "noise" / name / f"{name}_00.wav")
        assert rate == RATE
        assert len(samples) == 4 * RATE
        assert band_psd_db(samples, 200, 400) - band_psd_db(samples, 1600, 3200) == pytest.approx(expected_db, abs=0.5), name
    babble, _ = soundfile.read(tmp_path / "noise_set" / "noise" / "babble" / "babble_00.wav")
    assert math.sqrt(np.mean(np.square(babble))) == pytest.approx(0.1, rel=0.01)
    assert NoiseSource(tmp_path / "noise_set").files == sorted(written)


# --- command line ------------------------------------------------------------------------


def test_main_writes_configured_copies(prepared_test_split, noise_dir):
    data_dir = prepared_test_split.parent
    argv = [
        "--config", str(REPO / "conf" / "demo.yaml"), "+data=scales_and_noise", f"data_dir={data_dir}",
        f"noise.dir={noise_dir}", "noise.test.splits=[test]", "noise.test.snrs=[10,-5]",
    ]

    assert main(argv) == 0

    assert sorted(p.name for p in data_dir.iterdir()) == ["test", "test_snr-5", "test_snr10"]
