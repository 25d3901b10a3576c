"""Tests of Chinese text normalization and the stage 1 data directory step."""

import json
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparlora.text import TextNormConfig, main, normalize_data_dir, normalize_text, split_latin_runs

DEFAULT = TextNormConfig()
ARABIC = TextNormConfig(numerals="arabic")
SPOKEN = TextNormConfig(numerals="spoken")


# --- configuration


def test_config_defaults_match_demo():
    assert DEFAULT.to_dict() == {
        "nfkc": True,
        "fullwidth_to_halfwidth": True,
        "traditional_to_simplified": True,
        "casefold": True,
        "remove_invisible": True,
        "strip_punctuation": True,
        "numerals": "keep",
        "collapse_whitespace": True,
    }


def test_config_from_dict():
    cfg = TextNormConfig.from_dict({"numerals": "arabic", "casefold": False})

    assert cfg.numerals == "arabic"
    assert cfg.casefold is False
    assert cfg.nfkc is True


def test_config_unknown_key():
    with pytest.raises(ValueError, match="numeral_mode") as info:
        TextNormConfig.from_dict({"numeral_mode": "arabic"})
    assert "numerals" in str(info.value)


def test_config_bad_numerals():
    with pytest.raises(ValueError, match="'roman'") as info:
        TextNormConfig.from_dict({"numerals": "roman"})
    assert "arabic, spoken, keep" in str(info.value)


def test_config_bad_switch():
    with pytest.raises(ValueError, match="nfkc='yes'"):
        TextNormConfig.from_dict({"nfkc": "yes"})


# --- facts the pipeline relies on


def test_nfkc_keeps_format_chars():
    assert unicodedata.normalize("NFKC", "\u3007") == "\u3007"
    assert unicodedata.normalize("NFKC", "\ufeff") == "\ufeff"
    assert unicodedata.normalize("NFKC", "\u200b") == "\u200b"
    assert unicodedata.normalize("NFKC", "\u200d") == "\u200d"


# --- digit readings of years, digit strings and phone numbers


def test_digit_readings():
    assert normalize_text("二零二三年", ARABIC) == "2023年"
    assert normalize_text("二〇〇二年的第一场雪", ARABIC) == "2002年的第一场雪"
    assert normalize_text("两千零十年", ARABIC) == "2010年"
    assert normalize_text("一九九八年", ARABIC) == "1998年"
    assert normalize_text("一二一二", ARABIC) == "1212"
    assert normalize_text("房间号幺零八", ARABIC) == "房间号108"
    assert normalize_text("我的号码是幺二三四五六七八九零幺", ARABIC) == "我的号码是12345678901"


# --- percents, decimals, traditional 點 and the punctuation guard


def test_percent_and_decimal():
    assert normalize_text("百分之五十", ARABIC) == "50%"
    assert normalize_text("百分之一点五七", ARABIC) == "1.57%"
    assert normalize_text("三点五", ARABIC) == "3.5"
    assert normalize_text("零点五", ARABIC) == "0.5"
    assert normalize_text("五点零三", ARABIC) == "5.03"
    assert normalize_text("一百二十三", ARABIC) == "123"
    assert normalize_text("一零六點二", ARABIC) == "106.2"


def test_decimal_differs_from_cardinal():
    assert normalize_text("三点五", ARABIC) != normalize_text("三十五", ARABIC)
    assert normalize_text("三十五", ARABIC) == "35"


def test_strip_keeps_decimal_point_and_percent():
    assert normalize_text("3.5", DEFAULT) == "3.5"
    assert normalize_text("50%", DEFAULT) == "50%"
    assert normalize_text("涨了1.57%。", DEFAULT) == "涨了1.57%"
    assert normalize_text("第1.", DEFAULT) == "第1"
    assert normalize_text("50 %", DEFAULT) == "50"
    assert normalize_text("1,000元", DEFAULT) == "1000元"


# --- width, invisible characters, emoji


def test_width_and_invisible():
    assert normalize_text("ＡＢＣ１２３，你好！", DEFAULT) == "abc123你好"
    assert normalize_text("你\u200b好", DEFAULT) == "你好"
    assert normalize_text("\ufeff今天", DEFAULT) == "今天"
    assert normalize_text("早上\u00a0好", DEFAULT) == "早上好"
    assert normalize_text("再见\u200d", DEFAULT) == "再见"
    assert normalize_text("😀开心", DEFAULT) == "开心"
    assert normalize_text("你好\t世界", DEFAULT) == "你好世界"
    assert normalize_text("\u3000中文\u3000", DEFAULT) == "中文"
    assert normalize_text("①号线", DEFAULT) == "1号线"


def test_quoted_label_keeps_characters():
    assert normalize_text("“巴适得很”", DEFAULT) == "巴适得很"
    assert normalize_text("今天“天气”好", DEFAULT) == "今天天气好"


# --- table of hand-checked cases, numerals "arabic"

ARABIC_CASES = [
    # dates and years
    ("二零二三年五月一日", "2023年5月1日"),
    ("十二月二十五号", "12月25号"),
    ("五月十日", "5月10日"),
    ("八九年", "89年"),
    ("〇二年", "02年"),
    # amounts and cardinals
    ("一千万", "10000000"),
    ("三万五", "35000"),
    ("一亿五", "150000000"),
    ("一万零五", "10005"),
    ("两百块", "200块"),
    ("二十个", "20个"),
    ("二十五千克", "25千克"),
    ("十一点", "11点"),
    # percents, decimals, clock times
    ("百分之百", "100%"),
    ("百分之零点五", "0.5%"),
    ("九十五点五分", "95.5分"),
    ("三点二十分", "3点20分"),
    ("五点零三分", "5点03分"),
    ("十二点半", "12点半"),
    # full-width digits and letters, traditional characters
    ("ＡＢＣ１２３", "abc123"),
    ("一零六點二", "106.2"),
    ("兩千零十年", "2010年"),
    # ordinary words and idioms that keep their numeral characters
    ("统一零售价", "统一零售价"),
    ("两三个", "两三个"),
    ("三四十岁", "三四十岁"),
    ("两三年", "两三年"),
    ("万一", "万一"),
    ("十分", "十分"),
    ("十分钟", "十分钟"),
    ("星期一", "星期一"),
    ("张三", "张三"),
    ("一下", "一下"),
    ("好一点", "好一点"),
    ("一点点", "一点点"),
    ("一点零食", "一点零食"),
    ("第一", "第一"),
    ("第二十三名", "第二十三名"),
    ("一起", "一起"),
    ("一样", "一样"),
    ("我有一个苹果", "我有一个苹果"),
    ("一心一意", "一心一意"),
    ("三心二意", "三心二意"),
    ("十全十美", "十全十美"),
    ("乱七八糟", "乱七八糟"),
    ("七上八下", "七上八下"),
    ("八九不离十", "八九不离十"),
    ("不管三七二十一", "不管三七二十一"),
    ("一五一十", "一五一十"),
    ("三三两两", "三三两两"),
    ("千万", "千万"),
    ("十几个", "十几个"),
    ("几十万", "几十万"),
    ("三分之一", "三分之一"),
    ("百分之几", "百分之几"),
    ("五千克", "五千克"),
    ("三点一刻", "三点一刻"),
    ("幺妹", "幺妹"),
    # Sichuanese particles and 儿 endings are words
    ("巴适得很噻", "巴适得很噻"),
    ("要得嘛", "要得嘛"),
    ("走哈", "走哈"),
    ("晓得了嘞", "晓得了嘞"),
    ("一哈儿", "一哈儿"),
    ("好耍得很儿", "好耍得很儿"),
    # invisible characters and emoji around numbers
    ("二零\u200b二三年😀", "2023年"),
    ("二 零 二 三 年", "2023年"),
    ("三 点 五", "3.5"),
    ("五 月 一 日", "5月1日"),
    ("第 一", "第一"),
    ("🎉百分之五十", "50%"),
]


@pytest.mark.parametrize(("raw", "expected"), ARABIC_CASES, ids=[raw for raw, _ in ARABIC_CASES])
def test_arabic_table(raw, expected):
    assert normalize_text(raw, ARABIC) == expected


def test_arabic_table_size():
    assert len(ARABIC_CASES) >= 40


def test_sichuanese_particles_kept():
    text = "这个菜巴适得很噻，你尝一哈嘛，好吃嘞，莫客气哈，幺儿"

    assert normalize_text(text, DEFAULT) == "这个菜巴适得很噻你尝一哈嘛好吃嘞莫客气哈幺儿"
    assert normalize_text(text, ARABIC) == "这个菜巴适得很噻你尝一哈嘛好吃嘞莫客气哈幺儿"


# --- numerals "spoken" and "keep"

SPOKEN_CASES = [
    ("2023年5月1日", "二零二三年五月一日"),
    ("3.5", "三点五"),
    ("0.5", "零点五"),
    ("50%", "百分之五十"),
    ("1.57%", "百分之一点五七"),
    ("123", "一百二十三"),
    ("108", "一百零八"),
    ("010", "零一零"),
    ("12345678901", "一二三四五六七八九零一"),
    ("10000元", "一万元"),
    ("35000", "三万五千"),
    ("1,000", "一千"),
    ("10年", "十年"),
    ("mp3播放", "mp3播放"),
    ("１２３", "一百二十三"),
]


@pytest.mark.parametrize(("raw", "expected"), SPOKEN_CASES, ids=[raw for raw, _ in SPOKEN_CASES])
def test_spoken_table(raw, expected):
    assert normalize_text(raw, SPOKEN) == expected


def test_keep_numerals():
    assert normalize_text("一百二十三", DEFAULT) == "一百二十三"
    assert normalize_text("123", DEFAULT) == "123"
    assert normalize_text("一零六點二", DEFAULT) == "一零六点二"
    assert normalize_text("〇二年", DEFAULT) == "〇二年"


# --- each step can be switched off


def test_switch_nfkc_off():
    cfg = TextNormConfig(nfkc=False)

    assert normalize_text("ＡＢＣ，你好", cfg) == "abc你好"
    assert normalize_text("①号线", cfg) == "①号线"


def test_switch_fullwidth_off():
    cfg = TextNormConfig(nfkc=False, fullwidth_to_halfwidth=False, strip_punctuation=False)

    assert normalize_text("ＡＢＣ", cfg) == "ａｂｃ"


def test_switch_t2s_off():
    assert normalize_text("巴適得很", TextNormConfig(traditional_to_simplified=False)) == "巴適得很"
    assert normalize_text("巴適得很", DEFAULT) == "巴适得很"


def test_switch_casefold_off():
    assert normalize_text("WiFi", TextNormConfig(casefold=False)) == "WiFi"
    assert normalize_text("WiFi", DEFAULT) == "wifi"


def test_switch_invisible_off():
    assert normalize_text("你\u200b好", TextNormConfig(remove_invisible=False)) == "你\u200b好"


def test_switch_punctuation_off():
    assert normalize_text("你好，世界！", TextNormConfig(strip_punctuation=False)) == "你好,世界!"


def test_switch_whitespace_off():
    assert normalize_text("你好 世界", TextNormConfig(collapse_whitespace=False)) == "你好 世界"
    assert normalize_text("你好，世界", TextNormConfig(collapse_whitespace=False)) == "你好 世界"


def test_latin_words_keep_one_space():
    assert normalize_text("I don't  know,OK? 你好 hello   world 世界", DEFAULT) == "i dont know ok你好hello world世界"


def test_line_separator_is_space():
    assert normalize_text("hello\u2028world", DEFAULT) == "hello world"
    assert normalize_text("a\u00adb\ufe0fc\u0007d", DEFAULT) == "abcd"


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="你好一二三十百点年月日幺〇零两第 ，。！abcAB12.%\u200b\u3000😀", max_size=20))
def test_keep_idempotent(text):
    once = normalize_text(text, DEFAULT)
    assert normalize_text(once, DEFAULT) == once


# Punctuation and emoji are left out: 一，二 keeps two single numerals, which the strip
# then joins into 一二, a digit string on a second pass.
@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="你好一二三十百千万点年月日号幺〇零两第几分之统 abc12\u200b\u3000", max_size=20))
def test_arabic_idempotent(text):
    once = normalize_text(text, ARABIC)
    assert normalize_text(once, ARABIC) == once


# --- Latin runs for tokenization


def test_split_latin_runs():
    assert split_latin_runs("打开wifi开关") == "打开 wifi 开关"
    assert split_latin_runs("打开 wifi 开关") == "打开 wifi 开关"
    assert split_latin_runs("abc123你好") == "abc 123你好"
    assert split_latin_runs("你好") == "你好"


# --- stage 1 on a data directory

RAW_TEXT = "u1 “巴适得很”\nu2 〇二年\nu3 今天“天气”好\nu4 这个𠮶好𠮶\nu5 打开wifi开关\nu6 。\n"
TOKENS = list("巴适得很二年今天气好这个打开关零") + ["w", "i", "f@@", "<unk>"]
OOV_REPORT = (
    "# out-of-vocabulary characters: 2 distinct, 3 occurrences; 2 of 5 utterances contain <unk>\n"
    "# token list: 20 tokens\n"
    "# character\tcode point\tcount\n"
    "𠮶\tU+20BB6\t2\n"
    "〇\tU+3007\t1\n"
    "# utterance id\t<unk> count\n"
    "u2\t1\n"
    "u4\t2\n"
)


@pytest.fixture
def data_dir(tmp_path):
    directory = tmp_path / "train"
    directory.mkdir()
    (directory / "text").write_bytes(RAW_TEXT.encode("utf-8"))
    return directory


def test_data_dir_normalized(data_dir):
    summary = normalize_data_dir(data_dir, DEFAULT, TOKENS)

    assert (data_dir / "text").read_text(encoding="utf-8") == (
        "u1 巴适得很\nu2 〇二年\nu3 今天天气好\nu4 这个𠮶好𠮶\nu5 打开wifi开关\n"
    )
    assert summary == {
        "utterances": 6,
        "written": 5,
        "changed": 2,
        "dropped_empty": 1,
        "oov_checked": True,
        "oov_distinct": 2,
        "oov_occurrences": 3,
        "utterances_with_unk": 2,
    }


def test_data_dir_keeps_raw(data_dir):
    normalize_data_dir(data_dir, DEFAULT, TOKENS)

    assert (data_dir / "text.raw").read_bytes() == RAW_TEXT.encode("utf-8")


def test_data_dir_oov_report(data_dir):
    normalize_data_dir(data_dir, DEFAULT, TOKENS)

    assert len(set(TOKENS)) == 20
    assert (data_dir / "oov.txt").read_text(encoding="utf-8") == OOV_REPORT


def test_data_dir_dropped(data_dir):
    normalize_data_dir(data_dir, DEFAULT, TOKENS)

    assert (data_dir / "text.dropped").read_text(encoding="utf-8") == "u6 empty after normalization; raw text: '。'\n"


def test_data_dir_rerun_identical(data_dir):
    normalize_data_dir(data_dir, DEFAULT, TOKENS)
    names = ["text", "text.raw", "text.dropped", "oov.txt"]
    first = {name: (data_dir / name).read_bytes() for name in names}

    normalize_data_dir(data_dir, DEFAULT, TOKENS)

    assert {name: (data_dir / name).read_bytes() for name in names} == first
    assert sorted(p.name for p in data_dir.iterdir()) == sorted(names)


def test_data_dir_rerun_reads_raw(data_dir):
    normalize_data_dir(data_dir, DEFAULT, TOKENS)

    normalize_data_dir(data_dir, ARABIC, None)

    assert "u2 02年\n" in (data_dir / "text").read_text(encoding="utf-8")
    assert (data_dir / "text.raw").read_bytes() == RAW_TEXT.encode("utf-8")
    assert not (data_dir / "oov.txt").exists()


def test_data_dir_gbk_keeps_no_raw(tmp_path):
    (tmp_path / "text").write_bytes("u1 今天天气好\n".encode("gbk"))

    with pytest.raises(ValueError, match=r"text:1:.*iconv"):
        normalize_data_dir(tmp_path, DEFAULT, None)

    assert not (tmp_path / "text.raw").exists()


def test_data_dir_missing_text(tmp_path):
    with pytest.raises(FileNotFoundError, match="stage 0"):
        normalize_data_dir(tmp_path, DEFAULT, None)


def test_data_dir_bom_crlf(tmp_path):
    (tmp_path / "text").write_bytes(b"\xef\xbb\xbf" + "u1 今天天氣好\r\nu2 你好\r\n".encode("utf-8"))

    normalize_data_dir(tmp_path, DEFAULT, None)

    assert (tmp_path / "text").read_bytes() == "u1 今天天气好\nu2 你好\n".encode("utf-8")
    assert not (tmp_path / "text.dropped").exists()


def test_stage1_main(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "tokens.json").write_text(json.dumps(TOKENS, ensure_ascii=False), encoding="utf-8")
    for split in ("train", "sc_test"):
        (tmp_path / "data" / split).mkdir(parents=True)
        (tmp_path / "data" / split / "text").write_bytes(RAW_TEXT.encode("utf-8"))
    config = tmp_path / "conf" / "test.yaml"
    config.parent.mkdir()
    config.write_text(
        f"corpus:\n  splits: {{train: sc_train, sc_test: sc_test}}\n"
        f"data_dir: {tmp_path / 'data'}\n"
        f"model:\n  name_or_path: {model_dir}\n  dir: {tmp_path / 'pretrained'}\n"
        "text:\n  numerals: keep\n",
        encoding="utf-8",
    )

    assert main(["--config", str(config), "text.numerals=keep"]) == 0

    # The prepared split names are the keys of corpus.splits.
    for split in ("train", "sc_test"):
        assert (tmp_path / "data" / split / "oov.txt").read_text(encoding="utf-8") == OOV_REPORT
        assert (tmp_path / "data" / split / "text.raw").is_file()


# --- real text from Debian's fortunes-zh (the demo corpus's source)

FORTUNES_ZH = "/usr/share/games/fortunes/chinese"

# Lines of fortunes-zh as the file contains them (terminal colour codes, NBSP, English
# words, digits, Chinese numerals), normalized with numerals="arabic".
FORTUNE_CASES = [
    ("\x1b[33m    -- Debian \x1b[32m《行为准则》\x1b[m第一条\x1b[m", "debian行为准则第一条"),
    ("根据\x1b[32m《Debian 社会契约》\x1b[m，除非是讨论一些敏感话题，", "根据debian社会契约除非是讨论一些敏感话题"),
    ("\x1b[37;1m2.\xa0什么是 Debian\x1b[;m", "2什么是debian"),
    ("\x1b[33;1m\xa0\xa0\xa0   *\x1b[;m 大量预编译的高质量软件包", "大量预编译的高质量软件包"),
    ("\x1b[37;1m2.1.5.\xa0Debian 是100% 的自由软件\x1b[;m", "2.1.5 debian是100%的自由软件"),
    ("\x1b[33;1m      *\x1b[;m 20年：相变光盘存储（CD-RW）", "20年相变光盘存储cd rw"),
    ("子曰：“三年无改于父之道，可谓孝矣。”", "子曰三年无改于父之道可谓孝矣"),
    ("原思为之宰，与之粟九百，辞。子曰：“毋！以与尔邻里乡党乎！”", "原思为之宰与之粟900辞子曰毋以与尔邻里乡党乎"),
    ("这些管理员的联系方式可以在“Debian 组织结构”[1] 页面下找到。", "这些管理员的联系方式可以在debian组织结构1页面下找到"),
    ("道生一，一生二，二生三，三生万物。", "道生一一生二二生三三生万物"),
]


@pytest.mark.parametrize("raw, expected", [
    ("道生一一生二二生三三生万物", "道生一一生二二生三三生万物"),  # a hypothesis has no punctuation
    ("三三两两", "三三两两"),
    ("九八年毕业", "98年毕业"),
    ("零五级的学生", "05级的学生"),
    ("房间三零二", "房间302"),
    ("一二年级的学生", "一二年级的学生"),
])
def test_two_numerals_need_year_word(raw, expected):
    assert normalize_text(raw, ARABIC) == expected


@pytest.mark.parametrize("idiom", ["初一十五", "三十而立", "五十步笑百步", "十万八千里", "一千零一夜"])
def test_numeral_idioms_kept(idiom):
    assert normalize_text(f"他说{idiom}啊", ARABIC) == f"他说{idiom}啊"


@pytest.mark.parametrize("raw, expected", FORTUNE_CASES)
def test_fortunes_zh_lines(raw, expected):
    assert normalize_text(raw, ARABIC) == expected


@pytest.mark.parametrize("raw, expected", [
    ("a\x1b]0;title\x07b", "ab"),            # OSC ended by BEL
    ("a\x1b]2;t\x1b\\b", "ab"),              # OSC ended by ESC backslash
    ("a\x1bMb\x1b7c", "abc"),                # one-byte forms, M before case folding
    ("红\x1b[1;31;40m色\x1b[0m", "红色"),     # CSI with several parameters
])
def test_escape_sequences_removed_whole(raw, expected):
    assert normalize_text(raw, DEFAULT) == expected


def test_fortunes_zh_whole_file():
    """Every line of fortunes-zh: no control character or colour-code remnant is left, and a second pass changes nothing."""
    from pathlib import Path

    lines = Path(FORTUNES_ZH).read_text(encoding="utf-8").splitlines()
    assert len(lines) > 30000
    colored = [line for line in lines if "\x1b[" in line]
    assert len(colored) > 5000
    for line in lines:
        once = normalize_text(line, ARABIC)
        # Private-use characters (Co) stay: the OOV report of stage 1 lists them.
        assert not [c for c in once if unicodedata.category(c) in ("Cc", "Cf")], line
        assert normalize_text(once, ARABIC) == once, line
    # A colour code leaves no "33m" or "32m" behind.
    for line in colored[:2000]:
        stripped = normalize_text(line.replace("\x1b[33m", "").replace("\x1b[32m", ""), ARABIC)
        assert normalize_text(line, ARABIC) == normalize_text(stripped, ARABIC), line
