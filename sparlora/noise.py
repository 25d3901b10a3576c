"""Additive noise at a set SNR: noisy copies of test sets, and noise augmentation for training.

Usage: python -m sparlora.noise --config conf/demo.yaml +data=scales_and_noise [overrides...]
writes one noisy copy of each split in `noise.test.splits` per SNR in `noise.test.snrs`.

SNR definition. SNR (dB) = 10 log10(P_speech / P_noise), where
  - P_speech is the active speech power. The signal is cut into non-overlapping 20 ms
    frames (the last, shorter frame included). A frame is active when its mean square
    is at most ACTIVE_RANGE_DB (40 dB) below that of the loudest frame, and P_speech is
    the mean square over the samples of the active frames. Pauses and leading or
    trailing silence therefore do not lower the speech level. This is a plain energy threshold, not the ITU-T P.56
    active level, which uses an envelope with hangover.
  - P_noise is the mean square of the whole noise segment that is added.
Speech or noise whose power is at most SILENCE_POWER (1e-10, -100 dB re full scale) is
silent and raises SilentSignalError, because no gain can give it an SNR.

Noise source. `NoiseSource` reads a MUSAN-style folder: `<dir>/noise/<subset>/*.wav`
(also `music/` and `speech/` when configured, and .flac files). Files may have any
sample rate and channel count. `sparlora.audio.load_audio` mixes them down to mono and
resamples them to the speech rate. A noise file longer than the speech is cropped at a
seeded offset. A shorter one is looped from a seeded offset.

Noisy copies. For a prepared split `<split>` and each SNR, `make_noisy_copies` writes
the data dir `<split>_snr<SNR>` (e.g. `sc_test_snr10`) next to it, with one 16-bit WAV
per utterance under its `wav/` folder and a wav.scp that points to them. The noise file
and offset depend only on (seed, utterance), so every SNR of an utterance uses the same
noise segment and only its level changes between the copies. The corpus and the source
split are only read.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import soundfile
from omegaconf import OmegaConf

from sparlora.audio import AudioInfo, audio_info, load_audio
from sparlora.kaldi_io import atomic_write_text, read_table, write_table
from sparlora.prepare import STAGE1_FILES, read_data_dir
from sparlora.splits import SubsetSummary, _filter_rows, check_output_dir

logger = logging.getLogger(__name__)

FRAME_SECONDS = 0.02  # frame length of the active speech power
ACTIVE_RANGE_DB = 40.0  # frames further below the loudest frame count as pauses
SILENCE_POWER = 1e-10  # mean square at or below which a signal is silent (-100 dB re full scale)
PEAK_LIMIT = 0.99  # a noisy signal whose peak exceeds this is scaled down, which keeps its SNR
MAX_NOISE_DRAWS = 10  # draws of a noise segment before a silent noise source is an error
NOISE_REPORT = "noise_report.txt"
AUDIO_SUFFIXES = (".wav", ".flac")
SHORT_NOISE_CACHE_SIZE = 64  # noise files kept in memory after a whole-file read


class NoiseError(ValueError):
    """Noise that cannot be used: no noise files, an invalid SNR, or a silent signal."""


class SilentSignalError(NoiseError):
    """A speech or noise signal with no power to set an SNR with."""


def frame_powers(signal: np.ndarray, sample_rate: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the mean square and the sample count of each FRAME_SECONDS frame of a 1-D signal."""
    frame = max(1, int(round(FRAME_SECONDS * sample_rate)))
    samples = np.asarray(signal, dtype=np.float64)
    full = len(samples) // frame
    energies = np.square(samples[: full * frame]).reshape(full, frame).sum(axis=1)
    counts = np.full(full, frame)
    if len(samples) > full * frame:
        energies = np.append(energies, np.square(samples[full * frame:]).sum())
        counts = np.append(counts, len(samples) - full * frame)
    return energies / counts, counts


def active_speech_power(signal: np.ndarray, sample_rate: int, name: str = "speech") -> float:
    """Return the active speech power of a 1-D signal (see the module doc).

    Raises SilentSignalError naming `name` when the loudest frame is silent.
    """
    if len(signal) == 0:
        raise SilentSignalError(f"{name} has 0 samples, so it has no speech power to set an SNR against")
    powers, counts = frame_powers(signal, sample_rate)
    loudest = float(powers.max())
    if loudest <= SILENCE_POWER:
        raise SilentSignalError(
            f"{name} is silent (loudest {FRAME_SECONDS * 1000:g} ms frame has mean square {loudest:.3g}), "
            "so no noise level gives it an SNR; remove it from the data dir or fix the audio"
        )
    active = powers >= loudest * 10 ** (-ACTIVE_RANGE_DB / 10)
    return float((powers[active] * counts[active]).sum() / counts[active].sum())


def noise_power(noise: np.ndarray, name: str = "noise") -> float:
    """Return the mean square of a noise segment, or raise SilentSignalError naming `name`."""
    power = float(np.mean(np.square(np.asarray(noise, dtype=np.float64)))) if len(noise) else 0.0
    if power <= SILENCE_POWER:
        raise SilentSignalError(f"{name} is silent (mean square {power:.3g}), so it cannot be mixed at an SNR")
    return power


def check_snr(snr_db: float) -> float:
    """Return `snr_db` as a float, or raise NoiseError when it is not a finite number."""
    if isinstance(snr_db, bool) or not isinstance(snr_db, (int, float)) or not math.isfinite(snr_db):
        raise NoiseError(f"invalid SNR {snr_db!r}: expected a finite number of dB")
    return float(snr_db)


def noise_gain(speech_power: float, noise_power_value: float, snr_db: float) -> float:
    """Return the amplitude factor that puts noise of `noise_power_value` at `snr_db` below the speech."""
    return math.sqrt(speech_power / (noise_power_value * 10 ** (check_snr(snr_db) / 10)))


def fit_noise(noise: np.ndarray, num_samples: int, offset: int) -> np.ndarray:
    """Return `num_samples` of `noise` from sample `offset`, looping past its end."""
    if len(noise) == 0:
        raise NoiseError("cannot fit a noise signal of 0 samples")
    if offset + num_samples <= len(noise):
        return noise[offset: offset + num_samples]
    return np.take(noise, (offset + np.arange(num_samples)) % len(noise))


def mix_at_snr(
    speech: np.ndarray,
    noise: np.ndarray,
    snr_db: float,
    sample_rate: int,
    speech_name: str = "speech",
    noise_name: str = "noise",
) -> np.ndarray:
    """Return speech plus the noise scaled to `snr_db`, as float32, without peak limiting.

    `noise` must have as many samples as `speech` (see `fit_noise`). Raises
    SilentSignalError naming the silent signal.
    """
    if len(noise) != len(speech):
        raise NoiseError(f"{noise_name} has {len(noise)} samples but {speech_name} has {len(speech)}; fit the noise first")
    gain = noise_gain(active_speech_power(speech, sample_rate, speech_name), noise_power(noise, noise_name), snr_db)
    mixed = np.asarray(speech, dtype=np.float64) + gain * np.asarray(noise, dtype=np.float64)
    return mixed.astype(np.float32)


def limit_peak(signal: np.ndarray, peak: float = PEAK_LIMIT) -> tuple[np.ndarray, float]:
    """Scale `signal` down when its peak exceeds `peak`; return it and the factor used (1.0 if none).

    Scaling speech and noise together keeps the SNR, where clipping would not.
    """
    highest = float(np.max(np.abs(signal))) if len(signal) else 0.0
    if highest <= peak:
        return signal, 1.0
    factor = peak / highest
    return (signal * factor).astype(signal.dtype), factor


# --- noise source ------------------------------------------------------------------


@dataclass(frozen=True)
class NoiseSegment:
    """Noise fitted to one utterance: the samples, the file and where in it they start."""

    samples: np.ndarray  # float32 at the speech sample rate
    path: Path
    offset_seconds: float


class NoiseSource:
    """Noise files of a MUSAN-style folder, drawn at random and fitted to a length."""

    def __init__(self, root: str | Path, folders: Sequence[str] = ("noise",), sample_rate: int = 16000):
        self.root = Path(root)
        self.sample_rate = int(sample_rate)
        if not self.root.is_dir():
            raise NoiseError(
                f"noise dir {self.root} not found: set noise.dir to a MUSAN-style folder "
                "(<dir>/noise/<subset>/*.wav), or create the demo noise with "
                "`python -m sparlora.synth_noise --out-dir <dir>`"
            )
        if not folders:
            raise NoiseError(f"no noise folders given for {self.root}: list subfolders such as noise or noise/babble")
        files: list[Path] = []
        for folder in folders:
            path = self.root / str(folder)
            if not path.is_dir():
                raise NoiseError(f"noise folder {path} not found; noise.folders lists subfolders of noise.dir {self.root}")
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
            if not found:
                raise NoiseError(f"no {' or '.join(AUDIO_SUFFIXES)} files found under {path}")
            files += found
        self.files = sorted(set(files))
        self._infos: dict[Path, AudioInfo] = {}
        self._whole_files: OrderedDict[Path, np.ndarray] = OrderedDict()
        logger.info("noise source %s: %d files in %s", self.root, len(self.files), ", ".join(map(str, folders)))

    def _info(self, path: Path) -> AudioInfo:
        if path not in self._infos:
            self._infos[path] = audio_info(str(path))
        return self._infos[path]

    def _whole_file(self, path: Path) -> np.ndarray:
        if path in self._whole_files:
            self._whole_files.move_to_end(path)
            return self._whole_files[path]
        samples = load_audio(str(path), sample_rate=self.sample_rate, channel="mean")
        self._whole_files[path] = samples
        if len(self._whole_files) > SHORT_NOISE_CACHE_SIZE:
            self._whole_files.popitem(last=False)
        return samples

    def _draw(self, path: Path, num_samples: int, rng: random.Random) -> tuple[np.ndarray, float]:
        """Return `num_samples` of one file at a random offset, and the offset in seconds."""
        info = self._info(path)
        native_needed = math.ceil(num_samples * info.sample_rate / self.sample_rate)
        if native_needed <= info.num_samples:
            # Read only the span needed, at the file's own rate, then resample it.
            offset = rng.randrange(info.num_samples - native_needed + 1)
            start, end = offset / info.sample_rate, (offset + native_needed) / info.sample_rate
            samples = load_audio(str(path), start, end, sample_rate=self.sample_rate, channel="mean")
            return samples[:num_samples], start
        whole = self._whole_file(path)
        offset = rng.randrange(len(whole))
        return fit_noise(whole, num_samples, offset), offset / self.sample_rate

    def segment(self, num_samples: int, rng: random.Random) -> NoiseSegment:
        """Draw a file and an offset with `rng`, and return `num_samples` of noise from there.

        A silent draw is logged and redrawn. Raises SilentSignalError after
        MAX_NOISE_DRAWS silent draws in a row.
        """
        if num_samples <= 0:
            raise NoiseError(f"invalid noise length {num_samples}: expected a positive number of samples")
        for _ in range(MAX_NOISE_DRAWS):
            path = rng.choice(self.files)
            samples, offset_seconds = self._draw(path, num_samples, rng)
            power = float(np.mean(np.square(samples, dtype=np.float64)))
            if power > SILENCE_POWER:
                return NoiseSegment(samples, path, offset_seconds)
            logger.warning("noise file %s is silent for %.2f s from %.2f s; drawing another segment",
                           path, num_samples / self.sample_rate, offset_seconds)
        raise SilentSignalError(
            f"{MAX_NOISE_DRAWS} noise segments drawn in a row from {self.root} were silent (last: {path}); "
            "remove silent files from the noise dir or trim their silence"
        )


# --- noisy copies of a test set ------------------------------------------------------


def noisy_split_name(split: str, snr_db: float) -> str:
    """Return the data dir name of a noisy copy, e.g. `sc_test_snr10` or `sc_test_snr-5`."""
    return f"{split}_snr{check_snr(snr_db):g}"


def _write_wav(path: Path, samples: np.ndarray, sample_rate: int) -> None:
    """Write 16-bit PCM through a temporary file in the same folder and rename."""
    temp = path.with_name(f".{path.name}.tmp")
    soundfile.write(temp, samples, sample_rate, subtype="PCM_16", format="WAV")
    os.replace(temp, path)


def make_noisy_copies(
    src: Path,
    out_root: Path,
    snrs_db: Sequence[float],
    source: NoiseSource,
    seed: int,
    channel: str | int = "mean",
) -> list[SubsetSummary]:
    """Write `out_root/<src name>_snr<SNR>` for each SNR: the utterances of `src` with noise added.

    The audio is read with `load_audio` at `source.sample_rate` and `channel`, so each
    noisy copy is a mono recording per utterance without segments. Other tables are
    copied (text, text.raw, utt2spk, spk2gender) or rebuilt (spk2utt, utt2dur,
    reco2sr_ch). A silent utterance has no SNR, so it is left out of the copies and listed
    in their reports.
    """
    src, out_root = Path(src), Path(out_root)
    snrs = [check_snr(snr) for snr in snrs_db]
    if not snrs:
        raise NoiseError(f"no SNRs given for the noisy copies of {src}: list dB values such as 20, 10, 5, 0")
    names = [noisy_split_name(src.name, snr) for snr in snrs]
    if len(set(names)) != len(names):
        raise NoiseError(f"repeated SNRs {list(snrs_db)} for {src}: each SNR gives one data dir")
    out_dirs = [out_root / name for name in names]
    for out_dir in out_dirs:
        check_output_dir(out_dir, src, NOISE_REPORT)

    from tqdm import tqdm

    utterances = read_data_dir(src)
    rate = source.sample_rate
    for out_dir in out_dirs:
        (out_dir / "wav").mkdir(parents=True, exist_ok=True)
        # The marker goes first, so a rerun may replace a dir that a failed run left half
        # written. Without wav.scp, later stages cannot read such a dir.
        atomic_write_text(out_dir / NOISE_REPORT, "status: incomplete\n")
        (out_dir / "wav.scp").unlink(missing_ok=True)
    report_rows: list[list[str]] = [[] for _ in snrs]
    durations, limited = [], [0] * len(snrs)
    voiced, silent = [], []
    for utt in tqdm(utterances, desc=f"noisy copies of {src.name}", leave=False, disable=None):
        speech = load_audio(utt.source, utt.start, utt.end, sample_rate=rate, channel=channel)
        try:
            speech_power = active_speech_power(speech, rate, f"utterance {utt.id} of {src}")
        except SilentSignalError as error:
            logger.warning("%s; left out of the noisy copies", error)
            silent.append(utt.id)
            continue
        voiced.append(utt)
        segment = source.segment(len(speech), random.Random(f"{seed}/{utt.id}"))
        power = noise_power(segment.samples, f"noise {segment.path}")
        durations.append((utt.id, f"{len(speech) / rate:.3f}"))
        for index, (snr, out_dir) in enumerate(zip(snrs, out_dirs)):
            mixed = speech.astype(np.float64) + noise_gain(speech_power, power, snr) * segment.samples
            mixed, factor = limit_peak(mixed)
            limited[index] += factor < 1.0
            _write_wav(out_dir / "wav" / f"{utt.id}.wav", mixed, rate)
            report_rows[index].append(
                f"{utt.id} {segment.path.relative_to(source.root)} offset {segment.offset_seconds:.3f} s"
                + (f", scaled by {factor:.4f} to avoid clipping" if factor < 1.0 else "")
            )

    if not voiced:
        raise SilentSignalError(f"every utterance of {src} is silent: there is no speech to add noise to")
    utterances = voiced
    summaries = []
    for snr, out_dir, rows, count in zip(snrs, out_dirs, report_rows, limited):
        _write_noisy_tables(src, out_dir, [utt.id for utt in utterances], durations, rate)
        _remove_stale_wavs(out_dir, {utt.id for utt in utterances})
        header = [
            f"source: {src}",
            f"snr_db: {snr:g}",
            f"seed: {seed}",
            f"noise dir: {source.root}",
            f"sample rate: {rate}",
            f"utterances: {len(utterances)}",
            f"scaled down to avoid clipping: {count}",
            f"left out as silent: {len(silent)}",
        ] + [f"silent {utt}" for utt in silent]
        atomic_write_text(out_dir / NOISE_REPORT, "\n".join(header + rows) + "\n")
        seconds = sum(float(value) for _, value in durations)
        speakers = len({utt.speaker for utt in utterances})
        summary = SubsetSummary(out_dir.name, out_dir, len(utterances), speakers, len(utterances), seconds)
        logger.info("%s; SNR %g dB, %d utterances scaled down to avoid clipping", summary.line(), snr, count)
        summaries.append(summary)
    return summaries


def _write_noisy_tables(src: Path, dst: Path, ids: list[str], durations: list[tuple[str, str]], rate: int) -> None:
    """Write the tables of one noisy copy: one recording per utterance, named like it."""
    wav_dir = (dst / "wav").resolve()
    write_table(dst / "wav.scp", [(utt, str(wav_dir / f"{utt}.wav")) for utt in ids])
    (dst / "segments").unlink(missing_ok=True)
    utterances = set(ids)
    write_table(dst / "text", _filter_rows(read_table(src / "text"), utterances))
    utt2spk = _filter_rows(read_table(src / "utt2spk"), utterances)
    write_table(dst / "utt2spk", utt2spk)
    spk2utt: dict[str, list[str]] = {}
    for utt, speaker in utt2spk:
        spk2utt.setdefault(speaker, []).append(utt)
    write_table(dst / "spk2utt", [(speaker, " ".join(utts)) for speaker, utts in sorted(spk2utt.items())])
    write_table(dst / "utt2dur", durations)
    write_table(dst / "reco2sr_ch", [(utt, f"{rate} 1") for utt in ids])
    for name, keys in (("spk2gender", set(spk2utt)), ("text.raw", utterances)):
        if (src / name).is_file():
            write_table(dst / name, _filter_rows(read_table(src / name), keys))
        else:
            (dst / name).unlink(missing_ok=True)
    for name in STAGE1_FILES:
        if name != "text.raw":
            (dst / name).unlink(missing_ok=True)


def _remove_stale_wavs(dst: Path, ids: set[str]) -> None:
    """Remove WAVs that an earlier run wrote for utterances no longer in the source split."""
    stale = [path for path in (dst / "wav").glob("*.wav") if path.stem not in ids]
    for path in stale:
        path.unlink()
    if stale:
        logger.info("%s: removed %d WAVs of utterances no longer in the source split", dst, len(stale))


# --- training augmentation -----------------------------------------------------------


class NoiseAugmenter:
    """Additive noise for training waveforms, drawn anew for each (seed, epoch, utterance).

    With probability `probability`, an utterance gets a noise segment at an SNR drawn
    uniformly from `snrs_db`. The draw depends only on its arguments, so a run is
    reproducible with any number of dataloader workers. A silent utterance stays clean
    and is counted in `skipped_silent` with a warning.
    """

    def __init__(self, source: NoiseSource, snrs_db: Sequence[float], probability: float, seed: int):
        if not 0.0 <= float(probability) <= 1.0:
            raise NoiseError(f"invalid noise.train.probability {probability!r}: expected a number in [0, 1]")
        self.snrs_db = [check_snr(snr) for snr in snrs_db]
        if not self.snrs_db:
            raise NoiseError("noise.train.snrs is empty: list dB values such as 20, 10, 5")
        self.source = source
        self.probability = float(probability)
        self.seed = int(seed)
        self.applied = 0
        self.skipped_silent = 0

    def __call__(self, waveform: np.ndarray, key: str, epoch: int) -> np.ndarray:
        """Return `waveform` (float32 at the source's rate) with noise added, or unchanged."""
        rng = random.Random(f"{self.seed}/{epoch}/{key}")
        if rng.random() >= self.probability:
            return waveform
        snr = rng.choice(self.snrs_db)
        try:
            speech_power = active_speech_power(waveform, self.source.sample_rate, f"utterance {key}")
        except SilentSignalError as error:
            self.skipped_silent += 1
            logger.warning("epoch %d: no noise added: %s", epoch, error)
            return waveform
        segment = self.source.segment(len(waveform), rng)
        gain = noise_gain(speech_power, noise_power(segment.samples, f"noise {segment.path}"), snr)
        mixed, _ = limit_peak(waveform.astype(np.float64) + gain * segment.samples)
        self.applied += 1
        return mixed.astype(np.float32)

    @classmethod
    def from_config(cls, cfg: Any) -> "NoiseAugmenter | None":
        """Return the augmenter that `cfg.noise.train` configures, or None when it is off."""
        train = OmegaConf.select(cfg, "noise.train", default=None)
        if train is None or float(train.probability) == 0.0:
            return None
        source = NoiseSource(cfg.noise.dir, list(cfg.noise.folders), int(cfg.audio.sample_rate))
        return cls(source, list(train.snrs), float(train.probability), int(cfg.noise.seed))


# --- configuration -------------------------------------------------------------------


def noisy_split_names(cfg: Any) -> list[str]:
    """Return the names of the noisy copies that `noise.test` configures, split by split."""
    test = OmegaConf.select(cfg, "noise.test", default=None)
    if test is None:
        return []
    return [noisy_split_name(str(split), snr) for split in test.splits for snr in test.snrs]


def decode_split_names(cfg: Any) -> list[str]:
    """Return `corpus.test_splits` followed by their noisy copies, for decoding and scoring."""
    names = [str(split) for split in cfg.corpus.test_splits]
    return list(dict.fromkeys(names + noisy_split_names(cfg)))


def make_configured_noisy_copies(cfg: Any) -> list[SubsetSummary]:
    """Write the noisy copies that `noise.test` configures, or nothing when it is unset."""
    test = OmegaConf.select(cfg, "noise.test", default=None)
    if test is None or not test.splits:
        logger.info("noise.test is not set: no noisy copies to write")
        return []
    source = NoiseSource(cfg.noise.dir, list(cfg.noise.folders), int(cfg.audio.sample_rate))
    data_dir = Path(cfg.data_dir)
    summaries = []
    for split in test.splits:
        summaries += make_noisy_copies(data_dir / str(split), data_dir, list(test.snrs), source,
                                       int(cfg.noise.seed), cfg.audio.channel)
    return summaries


def main(argv: Sequence[str] | None = None) -> int:
    from sparlora.config import parse_stage_args

    cfg = parse_stage_args("Write noisy copies of prepared test sets at the configured SNRs.", argv)
    make_configured_noisy_copies(cfg)
    return 0


if __name__ == "__main__":
    from sparlora.config import run_main

    sys.exit(run_main(main))
