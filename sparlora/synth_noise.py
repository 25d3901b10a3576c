"""Synthesize a small noise set in the MUSAN layout, for the demo, without any download.

Usage: python -m sparlora.synth_noise --out-dir data/local/demo_noise [--seconds 60] [--seed 1234]

Writes 16 kHz mono 16-bit WAVs under `<out-dir>/noise/<kind>/`:
  white   Gaussian noise with a flat spectrum.
  pink    power falling with frequency as 1/f (-3 dB per octave) from 20 Hz up, shaped in
          the FFT domain.
  brown   power falling as 1/f^2 (-6 dB per octave) from 20 Hz up, shaped the same way.
  babble  `--talkers` voices speaking at once. The default source (`--babble espeak`) is
          espeak-ng speaking random pinyin syllables, so the babble contains no sentence
          of the demo corpus. `--babble scp --babble-scp FILE` takes speech from a
          wav.scp instead. `--babble none` writes no babble.
Each file is `--seconds` long with an RMS of 0.1 (-20 dB re full scale). The same seed
writes the same white, pink and brown files, and the same babble for a given source.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import soundfile

from sparlora.audio import load_audio, resample
from sparlora.kaldi_io import read_table

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000  # Hz
TARGET_RMS = 0.1
LOW_CUTOFF_HZ = 20.0  # pink and brown noise have no power below this frequency
COLORS = {"white": 0.0, "pink": 1.0, "brown": 2.0}  # exponent of 1/f in the power spectrum
ESPEAK_VOICE = "cmn-latn-pinyin"
ESPEAK_VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m7", "f1", "f2", "f3", "f4", "f5", "klatt"]
# Numbered pinyin syllables for nonsense babble: common initials with simple finals.
BABBLE_SYLLABLES = (
    "ba pa ma fa da ta na la ga ka ha zha cha sha za ca sa bo po mo de te ne le ge ke he zhe che she "
    "re ze ce se bi pi mi di ti ni li ji qi xi bu pu mu fu du tu nu lu gu ku hu zhu chu shu ru zu cu su "
    "wo ai an ang ou yi wu yu wan yan jia xia guo shuo zhong ren tian kan"
).split()
BABBLE_CLIPS = 40  # espeak-ng clips per babble file, reused across its talkers
MAX_SCP_CLIPS = 200  # utterances read from --babble-scp


def colored_noise(exponent: float, num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Return noise whose power spectrum falls as 1/f^exponent, scaled to TARGET_RMS.

    White Gaussian noise is shaped in the FFT domain: each bin is divided by
    f^(exponent/2), and the bins below LOW_CUTOFF_HZ are set to 0. Without the cutoff,
    most of the power of brown noise would sit below 1 Hz, far below the speech band.
    """
    white = rng.standard_normal(num_samples)
    if exponent == 0.0:
        shaped = white
    else:
        spectrum = np.fft.rfft(white)
        frequencies = np.fft.rfftfreq(num_samples, d=1.0 / SAMPLE_RATE)
        audible = frequencies >= LOW_CUTOFF_HZ
        spectrum[~audible] = 0.0
        spectrum[audible] /= frequencies[audible] ** (exponent / 2)
        shaped = np.fft.irfft(spectrum, n=num_samples)
    return _scale_to_rms(shaped)


def _scale_to_rms(signal: np.ndarray) -> np.ndarray:
    rms = math.sqrt(float(np.mean(np.square(signal))))
    if rms == 0.0:
        raise ValueError("cannot scale a silent signal to an RMS")
    return (signal * (TARGET_RMS / rms)).astype(np.float32)


def babble(clips: Sequence[np.ndarray], talkers: int, num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Return the sum of `talkers` streams of random clips with short random pauses, scaled to TARGET_RMS.

    Each stream starts at a random point of its first clip, so the talkers do not start
    together.
    """
    if not clips:
        raise ValueError("no speech clips to make babble from")
    if talkers < 1:
        raise ValueError(f"invalid number of talkers {talkers}: expected 1 or more")
    mixture = np.zeros(num_samples)
    for _ in range(talkers):
        pieces, length = [], 0
        while length < num_samples:
            clip = clips[int(rng.integers(len(clips)))]
            if not pieces:
                clip = clip[int(rng.integers(len(clip))):]
            pause = np.zeros(int(rng.uniform(0.05, 0.3) * SAMPLE_RATE))
            pieces += [clip, pause]
            length += len(clip) + len(pause)
        mixture += np.concatenate(pieces)[:num_samples]
    return _scale_to_rms(mixture)


def espeak_clips(count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Speak `count` strings of 6 to 12 random pinyin syllables with espeak-ng; return 16 kHz clips."""
    if shutil.which("espeak-ng") is None:
        raise FileNotFoundError(
            "espeak-ng not found: install it (apt-get install espeak-ng), or pass --babble scp "
            "--babble-scp <wav.scp> to make babble from recorded speech, or --babble none"
        )
    clips = []
    with tempfile.TemporaryDirectory() as tmp:
        wav_path = Path(tmp) / "clip.wav"
        for _ in range(count):
            syllables = [f"{rng.choice(BABBLE_SYLLABLES)}{rng.integers(1, 5)}" for _ in range(int(rng.integers(6, 13)))]
            variant = ESPEAK_VARIANTS[int(rng.integers(len(ESPEAK_VARIANTS)))]
            speed, pitch = int(rng.integers(140, 196)), int(rng.integers(30, 71))
            command = ["espeak-ng", "-v", f"{ESPEAK_VOICE}+{variant}", "-s", str(speed), "-p", str(pitch),
                       "-w", str(wav_path), " ".join(syllables)]
            result = subprocess.run(command, capture_output=True, check=False)
            if result.returncode != 0:
                stderr = result.stderr.decode("utf-8", errors="replace").strip()
                raise RuntimeError(f"espeak-ng failed with exit status {result.returncode}: {' '.join(command)}: {stderr}")
            samples, rate = soundfile.read(wav_path, dtype="float64", always_2d=True)
            clips.append(resample(samples.mean(axis=1), rate, SAMPLE_RATE))
    return clips


def scp_clips(scp: Path, rng: np.random.Generator) -> list[np.ndarray]:
    """Load up to MAX_SCP_CLIPS random recordings of a wav.scp as 16 kHz mono clips."""
    entries = read_table(scp)
    if not entries:
        raise ValueError(f"{scp} has no entries: give a wav.scp of speech recordings for the babble")
    chosen = rng.permutation(len(entries))[:MAX_SCP_CLIPS]
    return [load_audio(entries[int(index)][1], sample_rate=SAMPLE_RATE) for index in sorted(chosen)]


def _write(path: Path, samples: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    soundfile.write(temp, samples, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    temp.replace(path)


def write_noise_dir(
    out_dir: Path,
    seconds: float = 60.0,
    seed: int = 1234,
    files_per_kind: int = 2,
    babble_source: str = "espeak",
    babble_scp: Path | None = None,
    talkers: int = 6,
) -> list[Path]:
    """Write the noise files under `out_dir/noise/<kind>/` and return their paths."""
    if seconds <= 0:
        raise ValueError(f"invalid --seconds {seconds}: expected a positive duration")
    if files_per_kind < 1:
        raise ValueError(f"invalid --files-per-kind {files_per_kind}: expected 1 or more")
    num_samples = int(round(seconds * SAMPLE_RATE))
    written = []
    for kind_index, (color, exponent) in enumerate(COLORS.items()):
        rng = np.random.default_rng([seed, kind_index])
        for index in range(files_per_kind):
            path = Path(out_dir) / "noise" / color / f"{color}_{index:02d}.wav"
            _write(path, colored_noise(exponent, num_samples, rng))
            written.append(path)

    if babble_source == "none":
        logger.info("--babble none: no babble written")
        return written
    rng = np.random.default_rng([seed, len(COLORS)])
    if babble_source == "espeak":
        clips = espeak_clips(BABBLE_CLIPS * files_per_kind, rng)
    elif babble_source == "scp":
        if babble_scp is None:
            raise ValueError("--babble scp needs --babble-scp <wav.scp>")
        clips = scp_clips(Path(babble_scp), rng)
    else:
        raise ValueError(f"invalid --babble {babble_source!r}: expected espeak, scp or none")
    for index in range(files_per_kind):
        path = Path(out_dir) / "noise" / "babble" / f"babble_{index:02d}.wav"
        _write(path, babble(clips, talkers, num_samples, rng))
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Synthesize white, pink, brown and babble noise in the MUSAN layout.")
    parser.add_argument("--out-dir", type=Path, required=True, help="noise folder to write (noise/<kind>/*.wav under it)")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each file in seconds (default: 60)")
    parser.add_argument("--files-per-kind", type=int, default=2, help="files per kind of noise (default: 2)")
    parser.add_argument("--seed", type=int, default=1234, help="random seed (default: 1234)")
    parser.add_argument("--babble", choices=("espeak", "scp", "none"), default="espeak",
                        help="babble source: espeak-ng nonsense syllables, the speech of --babble-scp, or none")
    parser.add_argument("--babble-scp", type=Path, help="wav.scp whose recordings are mixed into babble")
    parser.add_argument("--talkers", type=int, default=6, help="voices speaking at once in the babble (default: 6)")
    args = parser.parse_args(argv)
    from sparlora.config import setup_logging

    setup_logging()
    written = write_noise_dir(args.out_dir, args.seconds, args.seed, args.files_per_kind, args.babble, args.babble_scp, args.talkers)
    logger.info("wrote %d noise files of %g s under %s", len(written), args.seconds, args.out_dir / "noise")
    return 0


if __name__ == "__main__":
    from sparlora.config import run_main

    sys.exit(run_main(main))
