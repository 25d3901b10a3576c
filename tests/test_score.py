"""Tests of CER scoring, alignment output and RESULTS.md."""

import importlib.metadata
import logging

import pytest

from sparlora.score import (
    cer_counts,
    format_alignment,
    format_cer,
    main,
    trn_line,
    write_alignments,
    write_results_md,
    write_trn,
)
from sparlora.text import TextNormConfig

CFG = TextNormConfig()


def per_utterance(result):
    return {utterance.utterance_id: utterance for utterance in result.utterances}


# --- empty references and hypotheses


def empty_sides_result():
    refs = {"u1": "你好", "u2": "", "u3": "。", "u4": "今天天气"}
    hyps = {"u1": "你好", "u2": "", "u3": "嗯", "u4": ""}
    return cer_counts(refs, hyps, CFG)


def test_empty_sides_totals():
    result = empty_sides_result()

    assert result.substitutions == 0
    assert result.deletions == 4
    assert result.insertions == 1
    assert result.hits == 2
    assert result.ref_length == 6
    assert result.cer == pytest.approx(5 / 6)
    assert format_cer(result) == "CER 83.33% (S=0 D=4 I=1 N=6)"


def test_empty_sides_per_utterance():
    utterances = per_utterance(empty_sides_result())

    assert utterances["u1"].cer == 0.0
    assert utterances["u2"].cer == 0.0
    assert utterances["u2"].errors == 0
    assert utterances["u3"].cer is None
    assert utterances["u3"].insertions == 1
    assert utterances["u3"].note == "ref empty"
    assert utterances["u4"].cer == 1.0
    assert utterances["u4"].deletions == 4


def test_all_refs_empty():
    result = cer_counts({"u1": "", "u2": "！"}, {"u1": "嗯", "u2": ""}, CFG)

    assert result.ref_length == 0
    assert result.insertions == 1
    assert result.cer is None
    assert format_cer(result) == "CER n/a (S=0 D=0 I=1 N=0)"


def test_all_empty_is_zero():
    result = cer_counts({"u1": ""}, {"u1": ""}, CFG)

    assert result.cer == 0.0


# --- spaces and English inside Chinese


def test_spaces_never_count():
    refs = {"u1": "我 爱 北京", "u2": "你好", "u3": "打开wifi开关", "u4": "我们明天去成都"}
    hyps = {"u1": "我爱北京", "u2": "你 好", "u3": "打开wi fi开关", "u4": "我们明天去城都"}

    utterances = per_utterance(cer_counts(refs, hyps, CFG))

    assert utterances["u1"].cer == 0.0
    assert utterances["u2"].cer == 0.0
    assert utterances["u3"].cer == 0.0
    assert utterances["u4"].cer == pytest.approx(1 / 7)
    assert utterances["u4"].substitutions == 1
    assert utterances["u4"].ref_length == 7


def test_both_sides_normalized():
    result = cer_counts({"u1": "巴適得很！ＯＫ"}, {"u1": "巴适得很ok"}, CFG)

    assert result.errors == 0
    assert result.ref_length == 6


def test_numerals_compared_after_conversion():
    cfg = TextNormConfig(numerals="arabic")

    same = cer_counts({"u1": "三点五"}, {"u1": "3.5"}, cfg)
    different = cer_counts({"u1": "三点五"}, {"u1": "三十五"}, cfg)

    assert same.errors == 0
    assert different.errors == 1
    assert different.deletions == 1


def test_mixed_errors():
    result = cer_counts({"u1": "今天天气"}, {"u1": "今天天汽x"}, CFG)

    assert result.substitutions == 1
    assert result.insertions == 1
    assert result.deletions == 0
    assert result.hits == 3
    assert result.cer == 0.5


# --- missing and extra hypotheses


def test_missing_hyp_counts_deletions(caplog):
    result = cer_counts({"u1": "你好", "u2": "今天"}, {"u1": "你好"}, CFG)

    assert result.missing_hyp == ["u2"]
    assert result.deletions == 2
    assert per_utterance(result)["u2"].note == "missing hyp"
    assert "references without hypothesis, scored as deletions: 1 (u2)" in caplog.text
    assert "u2" in caplog.text


def test_extra_hyp_ignored(caplog):
    result = cer_counts({"u1": "你好"}, {"u1": "你好", "x9": "多余"}, CFG)

    assert result.extra_hyp == ["x9"]
    assert result.errors == 0
    assert len(result.utterances) == 1
    assert "x9" in caplog.text


# --- alignment output


def test_alignment_lines():
    result = cer_counts({"u1": "今天天气很好"}, {"u1": "今天气真好呀"}, CFG)

    assert result.utterances[0].ops == "CCDCSCI"
    assert format_alignment(result.utterances[0]) == (
        "u1 ref: 今 天 天 气 很 好 *\n"
        "u1 hyp: 今 天 *  气 真 好 呀\n"
        "u1 op:  C  C  D  C  S  C  I\n"
        "u1 errors: S=1 D=1 I=1 N=6 CER=50.00%\n"
    )


def test_alignment_empty_ref(tmp_path):
    result = cer_counts({"u3": "。", "u4": "好"}, {"u3": "嗯", "u4": "好"}, CFG)
    path = tmp_path / "align.txt"

    write_alignments(result, path)

    assert path.read_text(encoding="utf-8") == (
        "u3 ref: *\n"
        "u3 hyp: 嗯\n"
        "u3 op:  I\n"
        "u3 errors: S=0 D=0 I=1 N=0 CER=n/a (ref empty)\n"
        "\n"
        "u4 ref: 好\n"
        "u4 hyp: 好\n"
        "u4 op:  C\n"
        "u4 errors: S=0 D=0 I=0 N=1 CER=0.00%\n"
    )


# --- sclite trn files


def test_trn_line_one_token_per_character():
    assert trn_line("今天wifi", "spk1", "spk1-u1") == "今 天 w i f i (spk1-spk1-u1)"


def test_trn_line_empty_text():
    assert trn_line("", "spk1", "u2") == "(spk1-u2)"


def test_write_trn_normalized_sides(tmp_path):
    refs = {"u1": "我 爱 北京！", "u2": "。", "u3": "今天"}
    hyps = {"u1": "我爱背景", "u2": "嗯"}
    result = cer_counts(refs, hyps, CFG)

    write_trn(result, tmp_path / "ref.trn", tmp_path / "hyp.trn", {"u1": "s1", "u2": "s2"})

    assert (tmp_path / "ref.trn").read_text(encoding="utf-8") == "我 爱 北 京 (s1-u1)\n(s2-u2)\n今 天 (u3-u3)\n"
    assert (tmp_path / "hyp.trn").read_text(encoding="utf-8") == "我 爱 背 景 (s1-u1)\n嗯 (s2-u2)\n(u3-u3)\n"


def test_write_trn_warns_on_bracketed_ids(tmp_path, caplog):
    result = cer_counts({"u(5)": "你好", "u6": "你好"}, {"u(5)": "你好", "u6": "你"}, CFG)

    with caplog.at_level(logging.WARNING, logger="sparlora.score"):
        write_trn(result, tmp_path / "ref.trn", tmp_path / "hyp.trn", {"u6": "spk)B"})

    assert "2 utterance or speaker ids contain '(' or ')', which sclite cannot read" in caplog.text
    assert "(first: u(5))" in caplog.text


# --- RESULTS.md


def test_results_md(tmp_path):
    path = tmp_path / "exp" / "RESULTS.md"
    sections = {"sc_test": empty_sides_result(), "cmn_test": cer_counts({"u1": "你好"}, {}, CFG)}

    write_results_md(path, sections, "method:\n  rank: 16\n", ["python", "-m", "sparlora.score", "--config", "conf/demo.yaml"])

    text = path.read_text(encoding="utf-8")
    assert "| sc_test | 83.33 | 0 | 4 | 1 | 6 | 4 |" in text
    assert "| cmn_test | 100.00 | 0 | 2 | 0 | 2 | 1 |" in text
    assert "- command: `python -m sparlora.score --config conf/demo.yaml`" in text
    assert "- cmn_test: references without hypothesis (scored as deletions): 1" in text
    assert "```yaml\nmethod:\n  rank: 16\n```" in text
    assert f"jiwer: {importlib.metadata.version('jiwer')}" in text
    assert "- git commit: " in text


# --- stage 5 entry point


def test_stage5_main(tmp_path, capsys):
    data = tmp_path / "data"
    exp = tmp_path / "exp"
    (data / "sc_test").mkdir(parents=True)
    (data / "sc_test" / "text").write_text("u1 你好\nu2 我们明天去成都\n", encoding="utf-8")
    (exp / "lora_r16" / "decode_sc_test").mkdir(parents=True)
    (exp / "lora_r16" / "decode_sc_test" / "hyp").write_text("u1\nu2 我们明天去城都\n", encoding="utf-8")
    (exp / "base" / "decode_sc_test").mkdir(parents=True)
    (exp / "base" / "decode_sc_test" / "hyp").write_text("u1\nu2 我们\n", encoding="utf-8")
    (data / "sc_test" / "utt2spk").write_text("u2 spk9\n", encoding="utf-8")
    config = tmp_path / "conf" / "test.yaml"
    config.parent.mkdir()
    config.write_text(
        f"corpus:\n  test_splits: [sc_test]\ndata_dir: {data}\nexp_root: {exp}\ntag: lora_r16\nexp_dir: {exp}/lora_r16\n"
        "decode:\n  checkpoint: last\nscoring:\n  text:\n    numerals: keep\n",
        encoding="utf-8",
    )

    assert main(["--config", str(config)]) == 0

    # zero-shot: u1 2 deletions, u2 5 deletions -> 7/9; fine-tuned: 3/9
    assert capsys.readouterr().out == "sc_test: zero-shot CER 77.78% -> fine-tuned CER 33.33%, relative change -57.1%\n"
    summary = (exp / "lora_r16" / "decode_sc_test" / "cer.txt").read_text(encoding="utf-8")
    assert "CER 33.33% (S=1 D=2 I=0 N=9)" in summary
    assert "u2 op:  C  C  C  C  C  S  C" in (exp / "lora_r16" / "decode_sc_test" / "align.txt").read_text(encoding="utf-8")
    # u1 has no utt2spk entry, so its own id is the speaker id.
    assert (exp / "lora_r16" / "decode_sc_test" / "hyp.trn").read_text(encoding="utf-8") == (
        "(u1-u1)\n我 们 明 天 去 城 都 (spk9-u2)\n")
    assert (exp / "base" / "decode_sc_test" / "ref.trn").read_text(encoding="utf-8") == (
        "你 好 (u1-u1)\n我 们 明 天 去 成 都 (spk9-u2)\n")
    results = (exp / "lora_r16" / "RESULTS.md").read_text(encoding="utf-8")
    assert "| sc_test (lora_r16) | 33.33 | 1 | 2 | 0 | 9 | 2 |" in results
    assert "| sc_test (base model, zero-shot) | 77.78 | 0 | 7 | 0 | 9 | 2 |" in results


def test_stage5_missing_hyp_file(tmp_path):
    (tmp_path / "data" / "t").mkdir(parents=True)
    (tmp_path / "data" / "t" / "text").write_text("u1 你好\n", encoding="utf-8")
    config = tmp_path / "test.yaml"
    config.write_text(
        f"corpus:\n  test_splits: [t]\ndata_dir: {tmp_path / 'data'}\nexp_root: {tmp_path / 'exp'}\n"
        f"tag: t\nexp_dir: {tmp_path / 'exp' / 't'}\ndecode:\n  checkpoint: last\nscoring:\n  text: {{}}\n",
        encoding="utf-8",
    )

    with pytest.raises(FileNotFoundError, match="stage 4"):
        main(["--config", str(config)])
