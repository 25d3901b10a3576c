"""Tests of the Kaldi table and token list helpers."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparlora.kaldi_io import atomic_write_text, read_table, read_token_list, write_table

REPO_ROOT = Path(__file__).resolve().parents[1]
LINE = "u1 今天天气好"


def test_read_gbk_file_raises(tmp_path):
    path = tmp_path / "text.gbk"
    path.write_bytes(LINE.encode("gbk") + b"\n")

    with pytest.raises(ValueError) as info:
        read_table(path)

    message = str(info.value)
    assert f"{path}:1:" in message
    assert "UTF-8" in message
    assert "iconv -f GBK -t UTF-8" in message


def test_read_gbk_names_line(tmp_path):
    path = tmp_path / "text"
    path.write_bytes("u0 好\n".encode("utf-8") + LINE.encode("gbk") + b"\n")

    with pytest.raises(ValueError, match=r"text:2:"):
        read_table(path)


def test_read_utf8_bom(tmp_path):
    path = tmp_path / "text.bom"
    path.write_bytes(b"\xef\xbb\xbf" + LINE.encode("utf-8") + b"\n")

    rows = read_table(path)

    assert rows == [("u1", "今天天气好")]
    assert rows[0][0] == "u1"


def test_read_crlf(tmp_path):
    path = tmp_path / "text.crlf"
    path.write_bytes((LINE + "\r\n" + "u2 你好\r\n").encode("utf-8"))

    rows = read_table(path)

    assert rows == [("u1", "今天天气好"), ("u2", "你好")]
    assert "\r" not in rows[0][1]


def test_read_cr_only_file(tmp_path):
    # Classic Mac line endings: each lone CR ends a line, so no utterance swallows the next.
    path = tmp_path / "hyp"
    path.write_bytes("u1 我爱\ru2 北京\r".encode("utf-8"))

    assert read_table(path) == [("u1", "我爱"), ("u2", "北京")]


def test_read_lone_cr_inside_lf_file_kept(tmp_path):
    # In a file with LF line ends, a lone CR is part of the value; stage 0 deals with it.
    path = tmp_path / "text"
    path.write_bytes("u1 我爱\r北京\nu2 你好\n".encode("utf-8"))

    assert read_table(path) == [("u1", "我爱\r北京"), ("u2", "你好")]


def test_read_one_line_with_inner_cr(tmp_path):
    # No final line end: the CR is inside the value, not a line end.
    path = tmp_path / "text"
    path.write_bytes("u1 我爱\r北京".encode("utf-8"))

    assert read_table(path) == [("u1", "我爱\r北京")]


def test_read_ignores_locale(tmp_path):
    # With the C locale, no UTF-8 mode and no locale coercion, Python's default encoding is
    # ASCII, and stdout is GBK: a reader relying on either would fail or garble the text.
    path = tmp_path / "text"
    path.write_bytes(b"\xef\xbb\xbf" + (LINE + "\r\n").encode("utf-8"))
    script = (
        "import json, locale, sys\n"
        "from sparlora.kaldi_io import read_table, write_table\n"
        "rows = read_table(sys.argv[1])\n"
        "write_table(sys.argv[1] + '.out', rows)\n"
        "print(json.dumps({'encoding': locale.getpreferredencoding(False), 'rows': rows, "
        "'again': read_table(sys.argv[1] + '.out')}))\n"
    )
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(REPO_ROOT),
        "LC_ALL": "C",
        "LANG": "C",
        "PYTHONIOENCODING": "gbk",
        "PYTHONUTF8": "0",
        "PYTHONCOERCECLOCALE": "0",
    }

    completed = subprocess.run(
        [sys.executable, "-c", script, str(path)], env=env, capture_output=True, check=True, timeout=60
    )
    report = json.loads(completed.stdout)

    assert "utf" not in report["encoding"].lower()
    assert report["rows"] == [["u1", "今天天气好"]]
    assert report["again"] == [["u1", "今天天气好"]]
    assert (tmp_path / "text.out").read_bytes() == LINE.encode("utf-8") + b"\n"


def test_read_empty_value_and_tabs(tmp_path):
    path = tmp_path / "hyp"
    path.write_text("u1\nu2\t你好\u3000世界  \nu3   a  b\n", encoding="utf-8")

    rows = read_table(path)

    assert rows == [("u1", ""), ("u2", "你好\u3000世界"), ("u3", "a  b")]


def test_read_duplicate_key(tmp_path):
    path = tmp_path / "text"
    path.write_text("u1 a\nu2 b\nu1 c\n", encoding="utf-8")

    with pytest.raises(ValueError) as info:
        read_table(path)

    assert f"{path}:3:" in str(info.value)
    assert "'u1'" in str(info.value)
    assert "line 1" in str(info.value)


def test_read_blank_lines_logged(tmp_path, caplog):
    path = tmp_path / "text"
    path.write_text("u1 a\n\n  \nu2 b\n", encoding="utf-8")

    with caplog.at_level(logging.WARNING, logger="sparlora.kaldi_io"):
        rows = read_table(path)

    assert rows == [("u1", "a"), ("u2", "b")]
    assert "skipped 2 blank lines (lines 2, 3)" in caplog.text


def test_write_roundtrip(tmp_path):
    path = tmp_path / "sub" / "text"
    rows = [("u1", "今天 天气"), ("u2", "")]

    write_table(path, rows)

    assert path.read_bytes() == "u1 今天 天气\nu2\n".encode("utf-8")
    assert read_table(path) == rows
    assert [p.name for p in path.parent.iterdir()] == ["text"]


def test_write_permissions(tmp_path):
    path = tmp_path / "text"
    umask = os.umask(0o022)
    try:
        write_table(path, [("u1", "a")])
    finally:
        os.umask(umask)

    assert path.stat().st_mode & 0o777 == 0o644


def test_write_rejects_bad_rows(tmp_path):
    with pytest.raises(ValueError, match="key"):
        write_table(tmp_path / "text", [("u 1", "a")])
    with pytest.raises(ValueError, match="line break"):
        write_table(tmp_path / "text", [("u1", "a\nb")])
    assert not (tmp_path / "text").exists()


def test_atomic_write_keeps_old_on_error(tmp_path):
    path = tmp_path / "text"
    path.write_text("old\n", encoding="utf-8")

    class Unwritable:
        pass

    with pytest.raises(TypeError):
        atomic_write_text(path, Unwritable())

    assert path.read_text(encoding="utf-8") == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text"]


def test_token_list_json(tmp_path):
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps(["<blank>", "<s>", "</s>", "你", "好", "wi@@", "<unk>"], ensure_ascii=False), encoding="utf-8")

    assert read_token_list(path) == ["<blank>", "<s>", "</s>", "你", "好", "wi@@", "<unk>"]


def test_token_list_txt(tmp_path):
    path = tmp_path / "tokens.txt"
    path.write_bytes("<blank>\r\n你\r\n\r\n好\r\n".encode("utf-8"))

    assert read_token_list(path) == ["<blank>", "你", "好"]


def test_token_list_bad_json(tmp_path):
    path = tmp_path / "tokens.json"
    path.write_text('{"a": 1}', encoding="utf-8")

    with pytest.raises(ValueError, match="list of token strings"):
        read_token_list(path)
