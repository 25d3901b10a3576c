"""Stage 1: Chinese text normalization of transcripts, and an out-of-vocabulary report.

`normalize_text` applies these steps in this order; each one can be switched off in
`TextNormConfig` (the `text:` and `scoring.text:` sections of the recipe config):

1. NFKC (Unicode compatibility composition): full-width letters and digits become ASCII,
   `①` becomes `1`, U+3000 and NBSP become a space. NFKC keeps U+200B, U+200D, U+FEFF
   and `〇` (U+3007), so later steps handle those.
2. Full-width to half-width: U+FF01..U+FF5E to ASCII and U+3000 to a space, for the case
   where NFKC is off.
3. Traditional to simplified Chinese with OpenCC `t2s` (`一零六點二` becomes `一零六点二`).
   It runs before the numeral step so that `點` is read as the decimal point.
4. Case folding (`str.casefold`), which affects Latin and other cased letters only.
5. Removal of invisible characters: terminal escape sequences as a whole (ECMA-48
   control sequences such as the colour codes `ESC[33m` that fortunes-zh carries, and
   operating system commands `ESC]...BEL`), so that no `33m` is left behind; then
   controls (Cc) other than whitespace, format
   characters (Cf: zero-width space and joiners, U+2060, BOM U+FEFF, soft hyphen U+00AD,
   bidi marks) and variation selectors. Line and paragraph separators (Zl, Zp) become a
   space, like the tab and newline that are kept as whitespace.
6. Numerals, by `numerals`: "arabic" writes Chinese numerals as digits (and removes
   whitespace between two CJK characters first, so 二 零 二 三 年 is one year), "spoken"
   writes ASCII digits as Chinese numerals, "keep" leaves them alone.
7. Punctuation strip: Unicode punctuation (P*) and symbols (S*, which includes emoji)
   become a space. It keeps `.` between two ASCII digits and `%` after an ASCII digit, so
   `3.5` and `50%` survive. Thousands separators (`1,000` becomes `1000`) and apostrophes
   inside Latin words (`don't` becomes `dont`) are removed without a space.
8. Whitespace collapse: runs of whitespace become one space, spaces next to a CJK
   character are removed, and one space stays between Latin words or numbers.

Chinese to Arabic numerals ("arabic") works on maximal runs of numeral characters
(零〇一二三四五六七八九幺两十百千万亿) and decides for each run from the run and its
neighbours, so ordinary words with numeral characters stay as they are:

- Years, digit strings and phone numbers (no unit character 十百千万亿) are read digit by
  digit: 二〇〇二年 is 2002年, 一二一二 is 1212. 幺 is 1 in a digit string of two or more
  characters (幺妹 and 幺儿 are words). 〇 is 0.
- Runs with unit characters are cardinals, converted by `cn2an.cn2an` on the run alone:
  两千零十 is 2010, 一万五 (colloquial for 一万五千) is 15000.
- Decimals with 点 (三点五 is 3.5, 五点零三 is 5.03) and percents with 百分之 (百分之一点五七
  is 1.57%) are assembled as strings, never through a float. Clock times whose minutes
  have a 十 or are 零X before 分 (三点二十, 五点零三分) become 3点20, 5点03分.
- Single-character numbers stay Chinese (一个, 十分, 星期一, 张三, 好一点). The exceptions
  are 一 to 十 before 月 or 号, or before 日 right after 月: 二零二三年五月一日 is 2023年5月1日.
- Ordinals stay as they are: a run right after 第 is kept (第一, 第二十三).
- Approximate numbers stay: two neighbouring digits (两三个, 三四十岁, 七八个) and runs next
  to 几 (十几, 几十万). Fractions with 分之 (三分之一) stay.
- Fixed words keep their numeral characters: 统一 (so 统一零售价 stays), 一起, 一样, 一下,
  万一, 千万, 乱七八糟, 八九不离十, 零食, 千克 and the others in `_PROTECTED_WORDS` and
  `_PROTECTED_NUMERAL_RUNS`.

`cn2an.transform` is not used on whole sentences because it also turns 第一 into 第1 and
converts numeral characters inside ordinary words.
"""

from __future__ import annotations

import functools
import logging
import re
import shutil
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from sparlora.kaldi_io import atomic_write_text, read_table, read_token_list, write_table
from sparlora.splits import prepared_split_names

logger = logging.getLogger(__name__)

NUMERAL_MODES = ("arabic", "spoken", "keep")


@dataclass(frozen=True)
class TextNormConfig:
    """Switches of `normalize_text`; the defaults match `text:` in conf/demo.yaml."""

    nfkc: bool = True  # Unicode NFKC normalization
    fullwidth_to_halfwidth: bool = True  # U+FF01..U+FF5E and U+3000 to ASCII
    traditional_to_simplified: bool = True  # OpenCC t2s
    casefold: bool = True  # str.casefold
    remove_invisible: bool = True  # controls, format characters, variation selectors
    strip_punctuation: bool = True  # punctuation and symbols, emoji included
    numerals: str = "keep"  # "arabic" | "spoken" | "keep"
    collapse_whitespace: bool = True  # one space between Latin words, none next to CJK

    def __post_init__(self) -> None:
        if self.numerals not in NUMERAL_MODES:
            raise ValueError(f"invalid text normalization numerals={self.numerals!r}; allowed: {', '.join(NUMERAL_MODES)}")
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name != "numerals" and not isinstance(value, bool):
                raise ValueError(f"invalid text normalization {field.name}={value!r}; expected true or false")

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any]) -> "TextNormConfig":
        """Build a config from a mapping such as the `text:` section; missing keys keep their defaults.

        Raises ValueError naming an unknown key, or an invalid value with the allowed ones.
        """
        known = [field.name for field in fields(cls)]
        values = {str(key): mapping[key] for key in mapping}
        unknown = [key for key in values if key not in known]
        if unknown:
            raise ValueError(f"unknown text normalization option(s) {', '.join(unknown)}; known options: {', '.join(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Return the switches as a plain dict, e.g. for a results file."""
        return asdict(self)


# ---------------------------------------------------------------------------
# Character-level steps

_FULLWIDTH_TO_HALFWIDTH = {0xFF01 + offset: 0x21 + offset for offset in range(0x5E)} | {0x3000: 0x20}

# Han ideographs (with extensions and compatibility forms), 〇 and other ideographic
# numbers, kana, bopomofo and Hangul. A space next to one of these is removed.
_CJK = (
    "\u2e80-\u2fdf\u3005-\u3007\u3021-\u3029\u3038-\u303b\u3040-\u30ff\u3100-\u312f\u31a0-\u31ff"
    "\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0003134f"
)
_SPACE_NEXT_TO_CJK = re.compile(rf"(?<=[{_CJK}]) | (?=[{_CJK}])")
_SPACE_BETWEEN_CJK = re.compile(rf"(?<=[{_CJK}])\s+(?=[{_CJK}])")
_WHITESPACE_RUN = re.compile(r"\s+")
_THOUSANDS_SEPARATOR = re.compile(r"(?<=[0-9]),(?=[0-9]{3}(?![0-9]))")
_APOSTROPHE_IN_WORD = re.compile(r"(?<=[A-Za-z])['\u2019](?=[A-Za-z])")
_LATIN_RUN = re.compile(r"[A-Za-z]+")


def _is_variation_selector(char: str) -> bool:
    code = ord(char)
    return 0xFE00 <= code <= 0xFE0F or 0xE0100 <= code <= 0xE01EF or 0x180B <= code <= 0x180F


@functools.lru_cache(maxsize=1)
def _opencc_t2s():
    import opencc

    return opencc.OpenCC("t2s")


# ECMA-48 escape sequences: CSI (ESC [, parameter and intermediate bytes, a final byte),
# OSC (ESC ], text, ended by BEL or by ESC and a backslash) and ESC with one byte (ESC 7,
# ESC M, ESC c). Case folding runs before this step, so the one-byte form admits a-z too.
_ESCAPE_SEQUENCE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[0-~]")


def _remove_invisible(text: str) -> str:
    if "\x1b" in text:
        text = _ESCAPE_SEQUENCE.sub("", text)
    kept = []
    for char in text:
        category = unicodedata.category(char)
        if category in ("Zl", "Zp"):
            kept.append(" ")
        elif category == "Cc" and not char.isspace():
            continue
        elif category == "Cf" or _is_variation_selector(char):
            continue
        else:
            kept.append(char)
    return "".join(kept)


def _strip_punctuation(text: str) -> str:
    text = _THOUSANDS_SEPARATOR.sub("", text)
    text = _APOSTROPHE_IN_WORD.sub("", text)

    kept = []
    last = len(text) - 1
    for index, char in enumerate(text):
        category = unicodedata.category(char)
        if category[0] not in "PS" and category != "Me":
            kept.append(char)
            continue

        previous_is_digit = index > 0 and "0" <= text[index - 1] <= "9"
        next_is_digit = index < last and "0" <= text[index + 1] <= "9"
        if char == "." and previous_is_digit and next_is_digit:
            kept.append(char)
        elif char == "%" and previous_is_digit:
            kept.append(char)
        else:
            kept.append(" ")
    return "".join(kept)


def _collapse_whitespace(text: str) -> str:
    text = _WHITESPACE_RUN.sub(" ", text).strip()
    return _SPACE_NEXT_TO_CJK.sub("", text)


def split_latin_runs(text: str) -> str:
    """Put one space around each run of ASCII Latin letters: `打开wifi开关` becomes `打开 wifi 开关`.

    FunASR's tokenizer splits a target on spaces and looks each chunk up in its seg_dict,
    so an English word must be its own chunk. Used when building training targets from
    normalized text; runs of whitespace become one space.
    """
    spaced = _LATIN_RUN.sub(lambda match: f" {match.group(0)} ", text)
    return _WHITESPACE_RUN.sub(" ", spaced).strip()


# ---------------------------------------------------------------------------
# Chinese numerals to Arabic digits

_DIGIT_VALUES = {
    "零": 0, "〇": 0, "一": 1, "幺": 1, "二": 2, "两": 2, "三": 3,
    "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9,
}
_PLAIN_DIGITS = "零〇一二三四五六七八九"  # digits of a decimal fraction or a minute count
_UNITS = "十百千万亿"
_NUMERAL_CHARS = frozenset(_DIGIT_VALUES) | frozenset(_UNITS)
_LOWER_UNIT = {"百": "十", "千": "百", "万": "千", "亿": "千万"}

# A private-use character that replaces each numeral character of a protected word in
# the working copy of the text, so that no numeral run includes it.
_MASK = "\ue000"

# Words whose numeral characters are never converted, wherever they occur.
# NOTE: a number that touches such a word is cut at the word, so 十一起案件 (11 cases)
# keeps 十一 because 一起 matches.
_PROTECTED_WORDS = (
    "统一", "唯一", "同一", "单一", "划一", "专一", "整齐划一",
    "一起", "一样", "一下", "一些", "一定", "一直", "一般", "一切", "一边", "一会", "一共",
    "一旦", "一致", "一同", "一向", "一再", "一律", "一番", "一阵", "一点儿", "一点点", "一点一点",
    "星期一", "星期二", "星期三", "星期四", "星期五", "星期六",
    "礼拜一", "礼拜二", "礼拜三", "礼拜四", "礼拜五", "礼拜六",
    "周一", "周二", "周三", "周四", "周五", "周六",
    "一心一意", "三心二意", "十全十美", "乱七八糟", "七上八下", "七嘴八舌", "一模一样",
    "略知一二", "八九不离十", "十之八九", "十有八九", "不管三七二十一", "九九归一",
    "五一节", "五一劳动节", "五一假期",
    "初一十五", "三十而立", "四十不惑", "五十而知天命", "五十步笑百步", "十万八千里", "一千零一夜",
    "一二年级", "三四年级", "五六年级",
    "零食", "零钱", "零件", "零售", "零下", "零星", "零碎", "零散", "零用", "零花", "零头", "零工",
    "千克", "千米", "千瓦", "千卡", "千兆",
)
_PROTECTED_WORD_PATTERN = re.compile("|".join(sorted(map(re.escape, _PROTECTED_WORDS), key=len, reverse=True)))

# Words made only of numeral characters, kept when a whole run equals one of them.
# They are not masked like `_PROTECTED_WORDS`, because 一千万 must still become 10000000.
_PROTECTED_NUMERAL_RUNS = frozenset({
    "万一", "千万", "万万", "亿万", "千千万万", "一一", "九九", "一五一十", "三三两两", "七七八八", "二百五", "五一",
})

# Pairs of neighbouring digits that state an approximate count (两三个, 三四十岁).
_APPROXIMATE_PAIRS = frozenset({"一两", "两三", "二三", "三四", "四五", "五六", "六七", "七八", "八九", "三五"})


def _mask_protected_words(text: str) -> str:
    def mask(match: re.Match) -> str:
        return "".join(_MASK if char in _NUMERAL_CHARS else char for char in match.group(0))

    return _PROTECTED_WORD_PATTERN.sub(mask, text)


def _run_end(text: str, start: int) -> int:
    end = start
    while end < len(text) and text[end] in _NUMERAL_CHARS:
        end += 1
    return end


def _digit_string(run: str) -> str | None:
    """Read a run without unit characters digit by digit; None when it contains 两."""
    if "两" in run:
        return None
    return "".join(str(_DIGIT_VALUES[char]) for char in run)


def _cardinal(run: str) -> int | None:
    """Return the value of a run with unit characters, or None when it is not a well-formed number."""
    if "幺" in run:
        return None
    run = run.replace("两", "二").replace("〇", "零")

    # Colloquial elision: 一万五 is 一万五千, 三百二 is 三百二十.
    if len(run) >= 3 and run[-1] in "一二三四五六七八九" and run[-2] in _LOWER_UNIT:
        run += _LOWER_UNIT[run[-2]]

    import cn2an

    try:
        value = cn2an.cn2an(run, "strict")
    except ValueError:
        return None
    return value if isinstance(value, int) else None


def _integer_text(run: str) -> str | None:
    """Return the digits of a run read as one integer (part of a decimal, percent or clock time)."""
    if any(char in _UNITS for char in run):
        if run == "百":
            return "100"
        value = _cardinal(run)
        return None if value is None else str(value)
    if len(run) == 1:
        return str(_DIGIT_VALUES[run])
    if run[0] in "零〇":
        return None
    return _digit_string(run)


def _percent(text: str, start: int) -> tuple[str, int] | None:
    """Match 百分之 + number at `start`; return ("N%", end)."""
    if not text.startswith("百分之", start):
        return None
    number_start = start + 3
    decimal = _decimal(text, number_start)
    if decimal is not None:
        return decimal[0] + "%", decimal[1]

    end = _run_end(text, number_start)
    if end == number_start:
        return None
    digits = _integer_text(text[number_start:end])
    return None if digits is None else (digits + "%", end)


def _decimal(text: str, start: int) -> tuple[str, int] | None:
    """Match integer + 点 + fraction digits at `start`; return ("I.F", end)."""
    point = _run_end(text, start)
    if point == start or not text.startswith("点", point):
        return None
    whole = text[start:point]
    if "两" in whole or "幺" in whole:
        return None

    end = point + 1
    while end < len(text) and text[end] in _PLAIN_DIGITS:
        end += 1
    if end == point + 1:
        return None
    # 三点五十 is a clock time, 三点一刻 a quarter past three.
    if end < len(text) and (text[end] in _NUMERAL_CHARS or text[end] in "点刻"):
        return None

    whole_digits = _integer_text(whole)
    if whole_digits is None:
        return None
    fraction = "".join(str(_DIGIT_VALUES[char]) for char in text[point + 1:end])
    return f"{whole_digits}.{fraction}", end


def _clock_time(text: str, start: int) -> tuple[str, int] | None:
    """Match hour + 点 + minutes (+ 分) at `start`, e.g. 三点二十 or 五点零三分; return ("3点20", end)."""
    point = _run_end(text, start)
    if point == start or point - start > 3 or not text.startswith("点", point):
        return None
    minute_end = _run_end(text, point + 1)
    if minute_end == point + 1:
        return None

    minutes = text[point + 1:minute_end]
    has_fen = text.startswith("分", minute_end)
    if "十" in minutes:
        minute_digits = _integer_text(minutes)
    elif has_fen and len(minutes) == 2 and minutes[0] in "零〇" and minutes[1] in _PLAIN_DIGITS:
        minute_digits = _digit_string(minutes)
    else:
        return None

    hour_run = text[start:point]
    hour_digits = "2" if hour_run == "两" else _integer_text(hour_run)
    if hour_digits is None or minute_digits is None or int(hour_digits) > 24 or int(minute_digits) > 59:
        return None

    end = minute_end + 1 if has_fen else minute_end
    return f"{hour_digits}点{minute_digits}" + ("分" if has_fen else ""), end


def _is_date_unit(before: str, after: str) -> bool:
    return after.startswith(("月", "号")) or (after.startswith("日") and before.endswith("月"))


def _convert_run(run: str, before: str, after: str) -> str | None:
    """Return the digits for one maximal numeral run, or None to keep it as written."""
    if run in _PROTECTED_NUMERAL_RUNS:
        return None
    if after.startswith("几") or before.endswith("几"):
        return None
    if after.startswith("分之") or before.endswith("分之"):
        return None

    if run[:2] in _APPROXIMATE_PAIRS and all(char in _UNITS for char in run[2:]):
        # 八九年 is a year ('89); 两三年 and 三四十年 are approximate counts.
        if run[2:] or "两" in run or not after.startswith("年"):
            return None

    has_unit = any(char in _UNITS for char in run)
    if len(run) == 1:
        if run in "零〇幺两百千万亿" or not _is_date_unit(before, after):
            return None
        return "10" if run == "十" else str(_DIGIT_VALUES[run])

    if not has_unit:
        # Two numerals without a unit are a digit string only before a year-like word
        # (九八年, 零五级). Elsewhere they are a repetition (一一, 三三两两) or two numbers that
        # punctuation kept apart (生二，二生三), which a second pass would otherwise read as 22.
        if len(run) == 2 and not after.startswith(("年", "级", "届")):
            return None
        return _digit_string(run)
    value = _cardinal(run)
    return None if value is None else str(value)


def _chinese_to_arabic(text: str) -> str:
    # Punctuation between numerals is stripped only after this step, so 一、二 stays as two
    # single numerals and comes out as 一二, which a second pass keeps (see _convert_run).
    # Word-segmented transcripts put spaces inside numbers (二 零 二 三 年, 百分之 五十).
    text = _SPACE_BETWEEN_CJK.sub("", text)
    shadow = _mask_protected_words(text)
    pieces = []
    position = 0
    while position < len(shadow):
        if shadow[position] not in _NUMERAL_CHARS:
            pieces.append(text[position])
            position += 1
            continue

        before = shadow[max(0, position - 2):position]
        if before.endswith("第"):
            # Ordinals are kept in characters: 第一, 第二十三.
            end = _run_end(shadow, position)
            pieces.append(text[position:end])
            position = end
            continue

        match = _percent(shadow, position) or _clock_time(shadow, position) or _decimal(shadow, position)
        if match is not None:
            replacement, end = match
        else:
            end = _run_end(shadow, position)
            replacement = _convert_run(shadow[position:end], before, shadow[end:end + 2])
            if replacement is None:
                replacement = text[position:end]
        pieces.append(replacement)
        position = end
    return "".join(pieces)


# ---------------------------------------------------------------------------
# Arabic digits to spoken Chinese numerals

_ARABIC_NUMBER = re.compile(r"(?<![A-Za-z0-9])(?<![0-9]\.)([0-9]+)(?:\.([0-9]+))?(%?)(?![A-Za-z0-9])(?!\.[0-9])")
_SPOKEN_DIGITS = "零一二三四五六七八九"


def _spoken_digit_string(digits: str) -> str:
    return "".join(_SPOKEN_DIGITS[int(char)] for char in digits)


def _spoken_integer(digits: str, is_year: bool) -> str:
    """Read an integer as Chinese numerals.

    Years (four digits before 年), numbers with a leading zero and numbers of five or more
    digits are read digit by digit (phone, room and account numbers). A number of five or
    more digits that is round after its first two digits (10000, 35000, 120000) is an
    amount and is read as a cardinal.
    """
    if is_year or (len(digits) > 1 and digits[0] == "0"):
        return _spoken_digit_string(digits)
    if len(digits) >= 5 and digits[2:].strip("0"):
        return _spoken_digit_string(digits)

    import cn2an

    try:
        return cn2an.an2cn(digits, "low")
    except ValueError:
        return _spoken_digit_string(digits)


def _arabic_to_chinese(text: str) -> str:
    text = _THOUSANDS_SEPARATOR.sub("", text)

    def speak(match: re.Match) -> str:
        whole, fraction, percent = match.group(1), match.group(2), match.group(3)
        is_year = len(whole) == 4 and fraction is None and not percent and text.startswith("年", match.end())
        spoken = _spoken_integer(whole, is_year)
        if fraction is not None:
            spoken += "点" + _spoken_digit_string(fraction)
        return "百分之" + spoken if percent else spoken

    return _ARABIC_NUMBER.sub(speak, text)


# ---------------------------------------------------------------------------
# The pipeline


def normalize_text(text: str, cfg: TextNormConfig) -> str:
    """Normalize one transcript with the steps of `cfg`, in the order given in the module docstring."""
    if cfg.nfkc:
        text = unicodedata.normalize("NFKC", text)
    if cfg.fullwidth_to_halfwidth:
        text = text.translate(_FULLWIDTH_TO_HALFWIDTH)
    if cfg.traditional_to_simplified:
        text = _opencc_t2s().convert(text)
    if cfg.casefold:
        text = text.casefold()
    if cfg.remove_invisible:
        text = _remove_invisible(text)

    if cfg.numerals == "arabic":
        text = _chinese_to_arabic(text)
    elif cfg.numerals == "spoken":
        text = _arabic_to_chinese(text)

    if cfg.strip_punctuation:
        text = _strip_punctuation(text)
    if cfg.collapse_whitespace:
        text = _collapse_whitespace(text)
    return text


# ---------------------------------------------------------------------------
# Stage 1 on a Kaldi data directory


def _out_of_vocabulary(text: str, tokens: frozenset[str]) -> list[str]:
    """Return the characters of `text` that the token list lacks, in order.

    NOTE: characters are checked one by one. A Latin letter counts as known when the
    letter or its BPE continuation form (`a@@`) is a token. FunASR maps whole English words
    through its seg_dict, so for Latin text this report is an approximation.
    """
    return [
        char
        for char in text
        if not char.isspace() and char not in tokens and not (char.isascii() and char.isalpha() and f"{char}@@" in tokens)
    ]


def _format_oov_report(oov_counts: Counter, unk_per_utterance: list[tuple[str, int]], num_utterances: int, num_tokens: int) -> str:
    lines = [
        f"# out-of-vocabulary characters: {len(oov_counts)} distinct, {sum(oov_counts.values())} occurrences; "
        f"{len(unk_per_utterance)} of {num_utterances} utterances contain <unk>",
        f"# token list: {num_tokens} tokens",
        "# character\tcode point\tcount",
    ]
    for char, count in sorted(oov_counts.items(), key=lambda item: (-item[1], ord(item[0]))):
        lines.append(f"{char}\tU+{ord(char):04X}\t{count}")
    lines.append("# utterance id\t<unk> count")
    for utterance_id, count in unk_per_utterance:
        lines.append(f"{utterance_id}\t{count}")
    return "\n".join(lines) + "\n"


def normalize_data_dir(data_dir: Path, cfg: TextNormConfig, token_list: Sequence[str] | None) -> dict[str, Any]:
    """Normalize `data_dir/text` in place, keeping the raw transcripts in `data_dir/text.raw`.

    The first run copies `text` to `text.raw`, and every run reads `text.raw`. A rerun with
    the same config therefore writes identical files and never overwrites the raw transcripts.
    Stage 0 deletes `text.raw` whenever it writes a new raw `text`, so a rerun of stage 0
    is picked up here.

    Utterances that are empty after normalization are logged, left out of `text` and
    listed with the reason in `text.dropped`. With a token list, `oov.txt` lists every
    out-of-vocabulary character with its count (most frequent first) and the `<unk>`
    count of each utterance that has one. Returns counts for the summary line.
    """
    data_dir = Path(data_dir)
    text_path = data_dir / "text"
    raw_path = data_dir / "text.raw"
    dropped_path = data_dir / "text.dropped"
    oov_path = data_dir / "oov.txt"

    if not raw_path.exists():
        if not text_path.exists():
            raise FileNotFoundError(f"transcripts not found: {text_path} (written by stage 0, data preparation)")
        read_table(text_path)  # reject a non-UTF-8 file before keeping it as the raw copy
        temp_path = data_dir / ".text.raw.tmp"
        shutil.copyfile(text_path, temp_path)
        temp_path.replace(raw_path)
        logger.info("%s: kept the raw transcripts in %s", data_dir, raw_path.name)

    rows = read_table(raw_path)
    normalized_rows = []
    dropped_rows = []
    changed = 0
    for utterance_id, raw_text in rows:
        normalized = normalize_text(raw_text, cfg)
        if not normalized:
            logger.warning("%s: dropped utterance %s, empty after normalization (raw text: %r)", data_dir, utterance_id, raw_text)
            dropped_rows.append((utterance_id, f"empty after normalization; raw text: {raw_text!r}"))
            continue
        changed += normalized != raw_text
        normalized_rows.append((utterance_id, normalized))

    write_table(text_path, normalized_rows)
    if dropped_rows:
        write_table(dropped_path, dropped_rows)
    elif dropped_path.exists():
        dropped_path.unlink()

    summary: dict[str, Any] = {
        "utterances": len(rows),
        "written": len(normalized_rows),
        "changed": changed,
        "dropped_empty": len(dropped_rows),
        "oov_checked": token_list is not None,
        "oov_distinct": 0,
        "oov_occurrences": 0,
        "utterances_with_unk": 0,
    }

    if token_list is None:
        if oov_path.exists():
            oov_path.unlink()
            logger.info("%s: removed the old %s because no token list was given", data_dir, oov_path.name)
        return summary

    tokens = frozenset(token_list)
    oov_counts: Counter = Counter()
    unk_per_utterance = []
    for utterance_id, normalized in normalized_rows:
        missing = _out_of_vocabulary(normalized, tokens)
        if missing:
            oov_counts.update(missing)
            unk_per_utterance.append((utterance_id, len(missing)))
    atomic_write_text(oov_path, _format_oov_report(oov_counts, unk_per_utterance, len(normalized_rows), len(tokens)))

    summary["oov_distinct"] = len(oov_counts)
    summary["oov_occurrences"] = sum(oov_counts.values())
    summary["utterances_with_unk"] = len(unk_per_utterance)
    return summary


def find_token_list(model_name_or_path: str, model_dir: str | Path) -> Path | None:
    """Return the model's tokens.json: in `model_name_or_path` when it is a local folder, else in `model_dir`."""
    candidates = []
    if Path(model_name_or_path).is_dir():
        candidates.append(Path(model_name_or_path) / "tokens.json")
    candidates.append(Path(model_dir) / "tokens.json")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


def main(argv: Sequence[str] | None = None) -> int:
    from sparlora.config import parse_stage_args

    cfg = parse_stage_args("Stage 1: normalize the transcripts of every split and report out-of-vocabulary characters.", argv)
    norm_cfg = TextNormConfig.from_dict(cfg.text)

    token_path = find_token_list(cfg.model.name_or_path, cfg.model.dir)
    if token_path is None:
        logger.info(
            "no tokens.json in %s or %s: skipping the out-of-vocabulary report "
            "(a model id is downloaded in stage 2; rerun stage 1 afterwards for the report)",
            cfg.model.name_or_path, cfg.model.dir,
        )
        token_list = None
    else:
        token_list = read_token_list(token_path)
        logger.info("checking out-of-vocabulary characters against %s (%d tokens)", token_path, len(token_list))

    for split in prepared_split_names(cfg):
        data_dir = Path(cfg.data_dir) / split
        summary = normalize_data_dir(data_dir, norm_cfg, token_list)
        oov = (
            f"out-of-vocabulary characters: {summary['oov_occurrences']} ({summary['oov_distinct']} distinct), "
            f"utterances with <unk>: {summary['utterances_with_unk']}"
            if summary["oov_checked"]
            else "out-of-vocabulary report skipped"
        )
        logger.info(
            "%s: %d utterances, %d changed by normalization, %d dropped as empty, %s",
            split, summary["utterances"], summary["changed"], summary["dropped_empty"], oov,
        )
    return 0


if __name__ == "__main__":
    from sparlora.config import run_main

    raise SystemExit(run_main(main))
