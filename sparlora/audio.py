"""Load audio named by a Kaldi `wav.scp` value, as mono float32 at one sample rate.

A `wav.scp` value is either a file path (any format libsndfile reads: wav, flac, ogg,
...) or a Kaldi pipe, `cmd args |`, whose standard output is an audio file (usually
WAV). Training and decoding both read audio through `load_audio`, so every recording
goes through the same steps in the same order:

1. Cut the segment at the recording's own sample rate. Seconds become samples with
   `round()`, not `int()`: 2.03 s at 8 kHz is 16240 samples, while
   `int(8000 * 2.03)` is 16239 because the product is 16239.999999999998.
2. Reduce the channels to one. soundfile returns (frames, channels), and the rule is
   either "mean" (mixdown) or a channel index.
3. Resample the mono signal with `scipy.signal.resample_poly` by the exact ratio
   target/original reduced by their gcd, so 8 kHz to 16 kHz doubles the sample count.
"""

from __future__ import annotations

import io
import math
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
from scipy.signal import resample_poly

#: Segment end time that means "to the end of the recording" (Kaldi `segments` convention).
END_OF_RECORDING = -1.0


class AudioError(ValueError):
    """Audio that cannot be used: unreadable, empty, a failing pipe command or a bad cut.

    `kind` is a short fixed cause such as "unreadable" or "0 samples" (reports count
    by it), `detail` gives the specifics, `reason` is both, and `source` is the `wav.scp` value.
    """

    def __init__(self, source: str, kind: str, detail: str = ""):
        self.source = source
        self.kind = kind
        self.detail = detail
        self.reason = f"{kind}: {detail}" if detail else kind
        super().__init__(f"{source}: {self.reason}")


@dataclass(frozen=True)
class AudioInfo:
    """Format of a recording as stored: its own sample rate and channel count."""

    sample_rate: int
    channels: int
    num_samples: int
    duration: float  # seconds, num_samples / sample_rate


def is_pipe(source: str) -> bool:
    """Return whether a `wav.scp` value is a Kaldi pipe (`cmd args |`)."""
    return source.rstrip().endswith("|")


def seconds_to_samples(seconds: float, sample_rate: int) -> int:
    """Convert a time in seconds to a sample index by rounding to the nearest sample."""
    return int(round(seconds * sample_rate))


def run_pipe(source: str) -> bytes:
    """Run the command of a Kaldi pipe with `bash -o pipefail -c` and return its stdout.

    pipefail makes a failure anywhere in a pipeline (`sox missing.wav -t wav - | cat`)
    fail the command. Raises AudioError with the command, exit status and stderr.
    """
    command = source.rstrip()[:-1].strip()
    if not command:
        raise AudioError(source, "command failed", "the pipe has no command")
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        stderr = result.stderr.decode("utf-8", errors="replace").strip()
        raise AudioError(source, "command failed", f"exit status {result.returncode}: {command}: {stderr}")
    if not result.stdout:
        raise AudioError(source, "0 samples", f"the command wrote nothing to stdout: {command}")
    return result.stdout


def _library_message(error: Exception) -> str:
    """Return libsndfile's own message, without soundfile's "Error opening <name>" prefix."""
    return getattr(error, "error_string", None) or str(error)


def _open(source: str) -> soundfile.SoundFile:
    """Open a file path or the output of a pipe for reading. The caller closes it."""
    if is_pipe(source):
        target: str | io.BytesIO = io.BytesIO(run_pipe(source))
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"audio file not found: {source}")
        if not path.is_file():
            raise AudioError(source, "unreadable", "not a regular file")
        if path.stat().st_size == 0:
            raise AudioError(source, "0 samples", "the file is empty (0 bytes)")
        target = source
    try:
        return soundfile.SoundFile(target)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as error:
        raise AudioError(source, "unreadable", _library_message(error)) from error


def _read(sound: soundfile.SoundFile, source: str, start: int, stop: int) -> np.ndarray:
    """Read samples [start, stop) as float64 (frames, channels), or raise AudioError."""
    try:
        sound.seek(start)
        data = sound.read(stop - start, dtype="float64", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError) as error:
        raise AudioError(source, "unreadable", _library_message(error)) from error
    if data.shape[0] != stop - start:
        raise AudioError(source, "unreadable", f"expected {stop - start} samples from sample {start}, got {data.shape[0]}")
    return data


def audio_info(source: str) -> AudioInfo:
    """Return the sample rate, channel count and length of a recording as stored.

    For a file this reads the header and decodes only the last sample, which catches
    files truncated in the middle of compressed data. A pipe has to be run and its
    whole output decoded. Raises FileNotFoundError for a missing file and AudioError
    with reason "unreadable: ...", "0 samples" or "truncated: ..." for unusable audio.
    """
    with _open(source) as sound:
        num_samples = sound.frames
        sample_rate = sound.samplerate
        channels = sound.channels
        if num_samples <= 0:
            raise AudioError(source, "0 samples")
        check_wav_data_size(sound, source)
        _read(sound, source, num_samples - 1, num_samples)
    return AudioInfo(sample_rate, channels, num_samples, num_samples / sample_rate)


# libsndfile's header log for a WAV file whose data chunk is shorter than its header declares,
# e.g. "data : 32000 (should be 15979)".
_SHORT_DATA_CHUNK = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
# Streaming writers put a placeholder data size in the header when the length is not known
# yet: sox 14.4 writes 0x7FFFF000 to a pipe after speed, tempo or trim, others 0xFFFFFFFF.
# Sizes from the smaller of those up are taken as unknown (a real one would be over 18 hours
# of 16 kHz 16-bit mono).
_PLACEHOLDER_DATA_SIZE = 0x7FFFF000


def check_wav_data_size(sound: soundfile.SoundFile, source: str) -> None:
    """Raise AudioError "truncated" when a WAV file has less audio than its header declares.

    libsndfile reads such a file up to its last whole frame without an error, so a file cut
    short by a failed copy would otherwise pass with part of its speech missing.
    """
    if not sound.format.startswith("WAV"):
        return
    match = _SHORT_DATA_CHUNK.search(sound.extra_info)
    if match is None:
        return
    declared, present = int(match.group(1)), int(match.group(2))
    if declared >= _PLACEHOLDER_DATA_SIZE or present >= declared:
        return
    raise AudioError(source, "truncated", f"the WAV header declares {declared} bytes of audio, the file has {present}; "
                                          "copy or export the file again")


def check_channel(channel: str | int) -> str | int:
    """Return the channel rule as "mean" or an int index, or raise ValueError.

    Strings of digits are accepted as indices because YAML and command-line overrides
    may give "0".
    """
    if isinstance(channel, bool):
        raise ValueError(f'invalid channel rule {channel!r}: expected "mean" or a channel index >= 0')
    if isinstance(channel, int) and channel >= 0:
        return channel
    if isinstance(channel, str):
        if channel == "mean":
            return channel
        if channel.isdigit():
            return int(channel)
    raise ValueError(f'invalid channel rule {channel!r}: expected "mean" or a channel index >= 0')


def reduce_channels(data: np.ndarray, channel: str | int, source: str) -> np.ndarray:
    """Reduce (frames, channels) audio to (frames,) by "mean" mixdown or a channel index."""
    rule = check_channel(channel)
    if rule == "mean":
        return data.mean(axis=1)
    if rule >= data.shape[1]:
        raise AudioError(
            source, "channel out of range", f"channel index {rule}, but the recording has {data.shape[1]} channel(s)"
        )
    return data[:, rule]


def resample(signal: np.ndarray, original_rate: int, target_rate: int) -> np.ndarray:
    """Resample a 1-D signal by the exact ratio target_rate/original_rate.

    The output has ceil(len(signal) * target_rate / original_rate) samples.
    """
    if original_rate == target_rate:
        return signal
    divisor = math.gcd(original_rate, target_rate)
    return resample_poly(signal, target_rate // divisor, original_rate // divisor)


def segment_bounds(
    source: str, start: float | None, end: float | None, sample_rate: int, num_samples: int
) -> tuple[int, int]:
    """Return the sample range [first, stop) of a cut in a recording, or raise AudioError.

    `start` None means 0, and `end` None or -1 means the end of the recording. A cut
    that ends past the recording is rejected, never shortened: stage 0 already clips
    segments that overshoot by less than its tolerance.
    """
    first = 0 if start is None else seconds_to_samples(start, sample_rate)
    if end is None or end == END_OF_RECORDING:
        stop = num_samples
    else:
        stop = seconds_to_samples(end, sample_rate)
    if first < 0:
        raise AudioError(source, "invalid segment", f"start {start} s is negative")
    if first >= num_samples:
        raise AudioError(
            source, "invalid segment", f"start {start} s is at or after the recording end ({num_samples} samples)"
        )
    if stop > num_samples:
        raise AudioError(source, "invalid segment", f"end {end} s is past the recording end ({num_samples} samples)")
    if stop <= first:
        raise AudioError(source, "invalid segment", f"{start}-{end} s is empty or reversed")
    return first, stop


def load_audio(
    source: str,
    start: float | None = None,
    end: float | None = None,
    sample_rate: int = 16000,
    channel: str | int = "mean",
) -> np.ndarray:
    """Load a recording or a segment of it as mono float32 at `sample_rate`.

    `start` and `end` are seconds in the recording (None, or end -1, for its ends).
    The cut is taken at the recording's own rate, then channels are reduced, then the
    signal is resampled. Values are clipped to [-1, 1] because resampling can
    overshoot slightly near full-scale peaks. Raises FileNotFoundError for a missing
    file and AudioError for unusable audio, a failing pipe, a bad cut or an
    out-of-range channel index.
    """
    if sample_rate <= 0:
        raise ValueError(f"invalid sample_rate {sample_rate}: expected a positive number of Hz")
    check_channel(channel)

    with _open(source) as sound:
        original_rate = sound.samplerate
        num_samples = sound.frames
        if num_samples <= 0:
            raise AudioError(source, "0 samples")
        first, stop = segment_bounds(source, start, end, original_rate, num_samples)
        data = _read(sound, source, first, stop)

    mono = reduce_channels(data, channel, source)
    mono = resample(mono, original_rate, sample_rate)
    return np.clip(mono, -1.0, 1.0).astype(np.float32)
