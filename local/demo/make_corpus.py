#!/usr/bin/env python3
"""Synthesize the demo corpus: Mandarin and Sichuanese-like speech from real Chinese text.

Text: the Chinese fortunes of Debian's fortunes-zh with ANSI colour codes removed, split
at every character that is not a CJK ideograph. The recipe keeps the segments of
`--min-chars` to `--max-chars` characters (about 2 s of speech) that use only the
`--vocab-size` most frequent characters. Sentences are shuffled with `--seed` and dealt
out to the sets, so no sentence appears in two sets.

Speech: espeak-ng 1.51's `cmn` voice misreads Chinese characters, so each sentence is
converted to numbered pinyin (pypinyin) and spoken by the `cmn-latn-pinyin` voice. Each
utterance gets one of 12 voice variants, a speed of 140-195 words per minute and a pitch
of 30-70.
The Sichuanese-like sets rewrite the pinyin with Southwestern Mandarin traits first:
zh ch sh -> z c s, initial n -> l, -ing -> -in, -eng -> -en, and the tones remapped for
the Chengdu contours (55, 21, 53, 213) as heard through Mandarin tone shapes:
1 -> 1, 2 -> 3, 3 -> 4, 4 -> 3.

Output: one Kaldi-style data dir per set (wav.scp, text, utt2spk, spk2utt) under
`--out-dir`, 16 kHz mono 16-bit wavs under `<out-dir>/wav/<set>/`, and `tokens.json`
(the character vocabulary in FunASR's layout). The demo corpus is synthetic speech
standing in for a real dialect corpus; it is not one.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import random
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import soundfile
from pypinyin import Style, lazy_pinyin
from scipy.signal import resample_poly

logger = logging.getLogger("make_corpus")

FORTUNE_FILE = Path("/usr/share/games/fortunes/chinese")
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
CJK_RUN = re.compile(r"[\u4e00-\u9fff]+")
SAMPLE_RATE = 16000  # Hz
ESPEAK_SAMPLE_RATE = 22050  # Hz, what espeak-ng writes
VOICE_VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m7", "f1", "f2", "f3", "f4", "f5", "klatt"]
SPECIAL_TOKENS_HEAD = ["<blank>", "<s>", "</s>"]
UNK_TOKEN = "<unk>"

# Set name -> (accent, number of sentences). Sets are dealt in this order, so adding a
# set at the end never changes the sentences of the sets before it.
DEFAULT_SET_SIZES = {
    "cmn_train": ("mandarin", 8000),
    "cmn_dev": ("mandarin", 200),
    "cmn_test": ("mandarin", 200),
    "sc_train": ("sichuanese", 1500),
    "sc_dev": ("sichuanese", 100),
    "sc_test": ("sichuanese", 200),
}
SICHUANESE_TONES = {"1": "1", "2": "3", "3": "4", "4": "3", "5": "5"}


def read_fortune_segments(path: Path, min_chars: int, max_chars: int) -> list[str]:
    """Return the CJK-only segments of a fortune file with `min_chars` to `max_chars` characters."""
    raw = path.read_text(encoding="utf-8", errors="strict")
    text = ANSI_ESCAPE.sub("", raw)
    return [run for run in CJK_RUN.findall(text) if min_chars <= len(run) <= max_chars]


def build_vocabulary(segments: list[str], vocab_size: int) -> list[str]:
    """Return the `vocab_size` most frequent characters, ties broken by code point."""
    counts = collections.Counter(char for segment in segments for char in segment)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [char for char, _ in ranked[:vocab_size]]


def select_sentences(segments: list[str], vocabulary: list[str], seed: int) -> list[str]:
    """Return the distinct in-vocabulary segments in a seeded random order."""
    allowed = set(vocabulary)
    unique = sorted({segment for segment in segments if set(segment) <= allowed})
    random.Random(seed).shuffle(unique)
    return unique


def to_sichuanese(syllable: str) -> str:
    """Rewrite one numbered-pinyin syllable (e.g. `zheng4`) with Southwestern Mandarin traits."""
    tone = syllable[-1] if syllable[-1].isdigit() else "5"
    body = syllable.rstrip("012345")
    for retroflex, dental in (("zh", "z"), ("ch", "c"), ("sh", "s")):
        if body.startswith(retroflex):
            body = dental + body[len(retroflex):]
            break
    if body.startswith("n") and not body.startswith("ng"):
        body = "l" + body[1:]
    if body.endswith("ing"):
        body = body[:-3] + "in"
    elif body.endswith("eng"):
        body = body[:-3] + "en"
    return body + SICHUANESE_TONES[tone]


def to_pinyin(sentence: str, accent: str) -> str:
    """Return the numbered pinyin espeak-ng speaks for `sentence` in `accent`."""
    syllables = lazy_pinyin(sentence, style=Style.TONE3, neutral_tone_with_five=True)
    if accent == "sichuanese":
        syllables = [to_sichuanese(syllable) for syllable in syllables]
    return " ".join(syllables)


def synthesize(job: tuple[str, str, str, int, int]) -> tuple[str, float]:
    """Speak one utterance with espeak-ng and write it as 16 kHz mono; return (path, seconds)."""
    wav_path, pinyin, variant, speed, pitch = job
    with tempfile.NamedTemporaryFile(suffix=".wav") as raw:
        subprocess.run(
            ["espeak-ng", "-v", f"cmn-latn-pinyin+{variant}", "-s", str(speed), "-p", str(pitch), "-w", raw.name, pinyin],
            check=True,
            capture_output=True,
        )
        samples, rate = soundfile.read(raw.name, dtype="float32")
    if rate != ESPEAK_SAMPLE_RATE:
        raise RuntimeError(f"espeak-ng wrote {rate} Hz, expected {ESPEAK_SAMPLE_RATE} Hz")
    # 22050 Hz -> 16000 Hz is the exact ratio 320/441.
    resampled = resample_poly(samples, 320, 441).astype(np.float32)
    resampled = np.clip(resampled, -1.0, 1.0)
    soundfile.write(wav_path, resampled, SAMPLE_RATE, subtype="PCM_16")
    return wav_path, len(resampled) / SAMPLE_RATE


def write_lines(path: Path, lines: list[str]) -> None:
    """Write lines through a temporary file and rename, so a killed run leaves no half file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)


def make_set(name: str, accent: str, sentences: list[str], out_dir: Path, seed: int, jobs: int) -> None:
    """Synthesize one set and write its Kaldi-style data dir."""
    rng = random.Random(f"{seed}-{name}")
    wav_dir = out_dir / "wav" / name
    wav_dir.mkdir(parents=True, exist_ok=True)

    utterances = []
    for index, sentence in enumerate(sentences):
        variant = rng.choice(VOICE_VARIANTS)
        speed = rng.randint(140, 195)  # words per minute
        pitch = rng.randint(30, 70)  # espeak-ng pitch, 0-99
        utt_id = f"{variant}-{name}-{index:05d}"
        utterances.append((utt_id, variant, sentence, to_pinyin(sentence, accent), speed, pitch))

    synthesis_jobs = [(str(wav_dir / f"{u[0]}.wav"), u[3], u[1], u[4], u[5]) for u in utterances]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(synthesize, synthesis_jobs, chunksize=16))
    total_seconds = sum(seconds for _, seconds in results)

    set_dir = out_dir / name
    set_dir.mkdir(parents=True, exist_ok=True)
    utterances.sort()
    write_lines(set_dir / "wav.scp", [f"{u[0]} {(wav_dir / (u[0] + '.wav')).resolve()}" for u in utterances])
    write_lines(set_dir / "text", [f"{u[0]} {u[2]}" for u in utterances])
    write_lines(set_dir / "pinyin", [f"{u[0]} {u[3]}" for u in utterances])
    write_lines(set_dir / "utt2spk", [f"{u[0]} {u[1]}" for u in utterances])
    speakers = collections.defaultdict(list)
    for u in utterances:
        speakers[u[1]].append(u[0])
    write_lines(set_dir / "spk2utt", [f"{spk} {' '.join(ids)}" for spk, ids in sorted(speakers.items())])
    logger.info("%s: %d utterances, %.1f minutes of %s speech", name, len(utterances), total_seconds / 60, accent)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, required=True, help="corpus folder to write")
    parser.add_argument("--sets", default="cmn_test,sc_train,sc_dev,sc_test", help="comma-separated sets to synthesize")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the sentence order and voice choices")
    parser.add_argument("--vocab-size", type=int, default=800, help="number of most frequent characters kept")
    parser.add_argument("--min-chars", type=int, default=4, help="minimum sentence length, in characters")
    parser.add_argument("--max-chars", type=int, default=10, help="maximum sentence length, in characters")
    parser.add_argument("--max-utts", type=int, default=0, help="cap on utterances per set (0: the set's full size), for quick tests")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel espeak-ng processes")
    parser.add_argument("--fortune-file", type=Path, default=FORTUNE_FILE, help="fortunes-zh text file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [%(name)s] %(message)s")

    if not args.fortune_file.is_file():
        logger.error("%s not found: install Debian's fortunes-zh (apt-get install fortunes-zh)", args.fortune_file)
        return 1
    segments = read_fortune_segments(args.fortune_file, args.min_chars, args.max_chars)
    vocabulary = build_vocabulary(segments, args.vocab_size)
    sentences = select_sentences(segments, vocabulary, args.seed)
    logger.info("%d segments, %d distinct in-vocabulary sentences, %d characters", len(segments), len(sentences), len(vocabulary))

    args.out_dir.mkdir(parents=True, exist_ok=True)
    tokens = SPECIAL_TOKENS_HEAD + vocabulary + [UNK_TOKEN]
    (args.out_dir / "tokens.json").write_text(json.dumps(tokens, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")

    offset = 0
    requested = [name for name in args.sets.split(",") if name]
    unknown = [name for name in requested if name not in DEFAULT_SET_SIZES]
    if unknown:
        logger.error("unknown sets %s; known sets: %s", unknown, ", ".join(DEFAULT_SET_SIZES))
        return 1
    for name, (accent, size) in DEFAULT_SET_SIZES.items():
        chosen = sentences[offset: offset + size]
        offset += size
        if len(chosen) < size:
            logger.error("only %d sentences left for %s, which needs %d", len(chosen), name, size)
            return 1
        if name in requested:
            count = min(size, args.max_utts) if args.max_utts > 0 else size
            make_set(name, accent, chosen[:count], args.out_dir, args.seed, args.jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
