"""Our CER counts against NIST sclite on the trn files stage 5 writes (skipped without sclite).

Debian's `sctk` package installs sclite as /usr/lib/sctk/bin/sclite and the wrapper
`sctk sclite`; a source build puts `sclite` on PATH.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from sparlora.kaldi_io import read_table
from sparlora.score import cer_counts, write_trn
from sparlora.text import TextNormConfig

ROOT = Path(__file__).resolve().parents[1]
CFG = TextNormConfig()
SCORES = re.compile(r"id: \((\S+?)\)\nScores: \(#C #S #D #I\) (\d+) (\d+) (\d+) (\d+)")


def sclite_command() -> list[str] | None:
    if shutil.which("sclite"):
        return ["sclite"]
    if Path("/usr/lib/sctk/bin/sclite").is_file():
        return ["/usr/lib/sctk/bin/sclite"]
    return None


SCLITE = sclite_command()
pytestmark = pytest.mark.skipif(SCLITE is None, reason="sclite not installed (Debian: apt-get install sctk)")


def sclite_counts(result, tmp_path: Path, speakers=None) -> dict[str, tuple[int, int, int, int]]:
    """Return utterance id -> (C, S, D, I) as sclite aligns our trn files."""
    write_trn(result, tmp_path / "ref.trn", tmp_path / "hyp.trn", speakers)
    output = subprocess.run(
        [*SCLITE, "-r", str(tmp_path / "ref.trn"), "trn", "-h", str(tmp_path / "hyp.trn"), "trn",
         "-i", "rm", "-e", "utf-8", "-s", "-o", "pralign", "stdout", "-O", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    counts = {}
    for tag, correct, substitutions, deletions, insertions in SCORES.findall(output):
        speaker, _, utterance_id = tag.partition("-")
        counts[utterance_id] = (int(correct), int(substitutions), int(deletions), int(insertions))
    return counts


def our_counts(result) -> dict[str, tuple[int, int, int, int]]:
    return {u.utterance_id: (u.hits, u.substitutions, u.deletions, u.insertions) for u in result.utterances}


def test_sclite_matches_constructed_decode(tmp_path):
    refs = {
        "u1": "你好", "u2": "", "u3": "。", "u4": "今天天气",
        "u5": "今天天气很好", "u6": "我们明天去成都", "u7": "打开wifi开关", "u8": "巴适得很",
    }
    hyps = {
        "u1": "你好", "u2": "", "u3": "嗯", "u4": "",
        "u5": "今天气真好呀", "u6": "我们明天去城都", "u7": "打开wi fi开", "u8": "八十得很很",
    }
    result = cer_counts(refs, hyps, CFG)

    sclite = sclite_counts(result, tmp_path)

    assert set(sclite) == set(refs)
    assert sclite == our_counts(result)
    assert sum(c[1] + c[2] + c[3] for c in sclite.values()) == result.errors == 13


def test_sclite_weighs_edits_differently(tmp_path):
    # sclite weighs a substitution 4 and an insertion or deletion 3, so it keeps the two
    # hits and counts 6 errors where the minimum edit distance is 5 substitutions.
    result = cer_counts({"u1": "abxyz"}, {"u1": "pqrab"}, CFG)

    sclite = sclite_counts(result, tmp_path)

    assert our_counts(result)["u1"] == (0, 5, 0, 0)
    assert sclite["u1"] == (2, 0, 3, 3)


@pytest.mark.parametrize("test_set", ["sc_test", "cmn_test"])
def test_sclite_matches_demo_decode(tmp_path, test_set):
    ref_path = ROOT / "data" / "demo" / test_set / "text"
    hyp_path = ROOT / "exp" / "demo" / "base" / f"decode_{test_set}" / "hyp"
    if not (ref_path.is_file() and hyp_path.is_file()):
        pytest.skip(f"demo decode not present: run bash run.sh --stop-stage 4 first ({hyp_path})")
    utt2spk = ref_path.parent / "utt2spk"
    speakers = dict(read_table(utt2spk)) if utt2spk.is_file() else None
    result = cer_counts(dict(read_table(ref_path)), dict(read_table(hyp_path)), CFG)

    sclite = sclite_counts(result, tmp_path, speakers)
    ours = our_counts(result)

    assert set(sclite) == set(ours)
    for utterance_id, counts in ours.items():
        sclite_errors = sum(sclite[utterance_id][1:])
        our_errors = sum(counts[1:])
        # Ours is the minimum edit distance, so sclite can only count more errors, and
        # only where its weights make another alignment cheaper.
        assert our_errors <= sclite_errors, utterance_id
        if sclite_errors > our_errors:
            s, d, i = counts[1:]
            sclite_s, sclite_d, sclite_i = sclite[utterance_id][1:]
            assert 4 * sclite_s + 3 * (sclite_d + sclite_i) <= 4 * s + 3 * (d + i), utterance_id
    assert sum(sum(c[1:]) for c in sclite.values()) == result.errors
