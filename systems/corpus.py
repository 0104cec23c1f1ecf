"""The built-in corpus: a seeded generator of mixed Chinese/English text with numbers, written by us.

chuanliu must train out of the box with no downloads and no third-party text, so this module writes its own
corpus. Documents are templated facts about arithmetic, dates, units, made-up cities and people, word pairs,
lists and counting, in English, in Chinese and in both. A small made-up "world" (cities, people) is drawn
once per seed so the same facts recur across documents: that, and the templates, give a small LM structure
to learn within a few dozen steps, while the generated names and the mix of scripts give a BPE tokenizer
enough variety for a few thousand pieces. Digits exercise split_digits; rare CJK Extension A characters
(U+3400-U+4DBF) are sprinkled in so that byte fallback is exercised too.

A document is a run of non-blank lines; documents are separated by one blank line. The output is a pure
function of (n_files, total_mb, seed, GENERATOR_VERSION): the same bytes every time.

Usage: python -m systems.corpus --out DIR [--files N --mb X --seed S]
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("systems.corpus")

# Bump whenever the generated text changes, so cached corpora (and tokenizers trained on them) are rebuilt.
GENERATOR_VERSION = 1
# Marker written last into a cache directory; its presence means the directory is complete.
COMPLETE_MARKER = ".complete"
# Share of characters that are rare CJK Extension A characters. SentencePiece keeps the most frequent
# characters covering character_coverage (0.9995) of the text, so rare characters making up well under
# 0.05% of it all fall outside the vocabulary and go through byte fallback.
RARE_CHAR_RATE = 0.0003
# The rare characters are drawn by code point from CJK Unified Ideographs Extension A.
RARE_CHAR_RANGE = (0x3400, 0x4DBF)
# "MB" here is 10**6 bytes.
_BYTES_PER_MB = 1_000_000

# Word lists (our own, written for this generator): data, in corpus_words.json beside this file, each list
# described there. Rows become tuples, as the templates unpack them.
_LISTS = json.loads((Path(__file__).with_name("corpus_words.json")).read_text(encoding="utf-8"))


def _rows(name: str) -> list:
    return [tuple(row) if isinstance(row, list) else row for row in _LISTS[name]]


_WORDS, _FOODS, _JOBS, _PETS, _PRODUCTS = (_rows(k) for k in ("words", "foods", "jobs", "pets", "products"))
_SURNAMES, _GIVEN, _SYLLABLES, _UNITS = (_rows(k) for k in ("surnames", "given", "syllables", "units"))
_COLORS, _MATERIALS, _OBJECTS, _DIRECTIONS = (_rows(k) for k in ("colors", "materials", "objects", "directions"))
_MONTHS, _WEEKDAYS_EN, _WEEKDAYS_ZH = (_rows(k) for k in ("months", "weekdays_en", "weekdays_zh"))
_ZH_DIGITS, _EN_ONES, _EN_TENS = _LISTS["zh_digits"], _rows("en_ones"), _rows("en_tens")


# ---------------------------------------------------------------------------------------------------------
# Number words.
# ---------------------------------------------------------------------------------------------------------


def _zh_section(n: int) -> str:
    """Chinese numeral for 0 < n < 10000, with 零 for inner zero runs (1005 -> 一千零五)."""
    out, pending_zero = [], False
    for power, unit in ((1000, "千"), (100, "百"), (10, "十"), (1, "")):
        digit = n // power % 10
        if digit == 0:
            pending_zero = bool(out)
            continue
        if pending_zero:
            out.append("零")
            pending_zero = False
        out.append(_ZH_DIGITS[digit] + unit)
    return "".join(out)


def zh_number(n: int) -> str:
    """Chinese numeral for an integer with |n| < 10**12, e.g. 82 -> 八十二, 10005 -> 一万零五."""
    if n < 0:
        return "负" + zh_number(-n)
    if n == 0:
        return "零"
    parts, need_zero = [], False
    for power, unit in ((10**8, "亿"), (10**4, "万"), (1, "")):
        section = n // power % 10000
        if section == 0:
            need_zero = bool(parts)
            continue
        # A section below 1000 after a higher one reads with 零 (一万零五百), as does one after a gap.
        if parts and (need_zero or section < 1000):
            parts.append("零")
        parts.append(_zh_section(section) + unit)
        need_zero = False
    text = "".join(parts)
    # 10-19 (and 十万 etc.) are read without the leading 一.
    return text[1:] if text.startswith("一十") else text


def zh_decimal(text: str) -> str:
    """Chinese reading of a decimal string such as "3.25" -> 三点二五."""
    whole, _, frac = text.partition(".")
    digits = "".join(_ZH_DIGITS[int(d)] for d in frac)
    return zh_number(int(whole)) + ("点" + digits if frac else "")


def en_number(n: int) -> str:
    """English words for 0 <= n < 10000, e.g. 45 -> forty-five."""
    if n < 20:
        return _EN_ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _EN_TENS[tens] + ("-" + _EN_ONES[ones] if ones else "")
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return _EN_ONES[hundreds] + " hundred" + (" " + en_number(rest) if rest else "")
    thousands, rest = divmod(n, 1000)
    return en_number(thousands) + " thousand" + (" " + en_number(rest) if rest else "")


def _money(x: float) -> str:
    return f"{x:.2f}"


# ---------------------------------------------------------------------------------------------------------
# The made-up world: fixed per seed so that facts repeat consistently across documents.
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _City:
    en: str  # Latin name, e.g. "Kalovor"
    zh: str  # Chinese name, e.g. "卡洛沃城"
    population: int  # number of inhabitants
    founded: int  # founding year
    river: tuple[str, str]  # (Latin, Chinese) name of its river
    product: tuple[str, str]  # (Chinese, English) thing it is famous for
    neighbor: int  # index of a neighbouring city
    distance_km: int  # distance to that neighbour
    direction: tuple[str, str]  # (Chinese, English) direction of this city from the neighbour


@dataclass(frozen=True)
class _Person:
    en: str  # "Chen Mei"
    zh: str  # "陈美"
    age: int  # years
    job: tuple[str, str]  # (Chinese, English)
    city: int  # index of home city
    pet: tuple[str, str, str, str]  # an entry of _PETS
    pets: int  # how many


@dataclass(frozen=True)
class _World:
    cities: list[_City]  # made-up cities
    people: list[_Person]  # made-up people


def _place_name(rng: random.Random, n_syllables: int) -> tuple[str, str]:
    picks = [rng.choice(_SYLLABLES) for _ in range(n_syllables)]
    latin = "".join(p[0] for p in picks)
    return latin[0].upper() + latin[1:].lower(), "".join(p[1] for p in picks)


def _make_cities(rng: random.Random, n: int) -> list[_City]:
    cities, seen = [], set()
    while len(cities) < n:
        en, zh = _place_name(rng, rng.choice((2, 2, 3)))
        if en in seen:
            continue
        seen.add(en)
        river = _place_name(rng, 2)
        cities.append(_City(
            en=en, zh=zh + rng.choice(("城", "城", "市", "镇")), population=rng.randrange(2_000, 2_000_000),
            founded=rng.randrange(800, 1950), river=(river[0], river[1] + "河"),
            product=rng.choice(_PRODUCTS),
            neighbor=rng.randrange(n), distance_km=rng.randrange(5, 900), direction=rng.choice(_DIRECTIONS)))
    return cities


def _make_people(rng: random.Random, n: int, n_cities: int) -> list[_Person]:
    people = []
    for _ in range(n):
        surname = rng.choice(_SURNAMES)
        given = [rng.choice(_GIVEN) for _ in range(rng.choice((1, 2)))]
        en = surname[1] + " " + ("".join(g[1] for g in given)).capitalize()
        people.append(_Person(
            en=en, zh=surname[0] + "".join(g[0] for g in given), age=rng.randrange(6, 90),
            job=rng.choice(_JOBS), city=rng.randrange(n_cities), pet=rng.choice(_PETS),
            pets=rng.randrange(1, 6)))
    return people


def _make_world(seed: int) -> _World:
    rng = random.Random(seed)
    cities = _make_cities(rng, 160)
    return _World(cities=cities, people=_make_people(rng, 400, len(cities)))


# ---------------------------------------------------------------------------------------------------------
# Document templates. Each returns the lines of one document.
# ---------------------------------------------------------------------------------------------------------


def _arith_problem(rng: random.Random) -> tuple[int, str, int, int]:
    """(a, op, b, result) with small non-negative integers and exact division."""
    op = rng.choice("+-*/")
    if op == "+":
        a, b = rng.randrange(0, 1000), rng.randrange(0, 1000)
        return a, op, b, a + b
    if op == "-":
        a = rng.randrange(0, 1000)
        b = rng.randrange(0, a + 1)
        return a, op, b, a - b
    a, b = rng.randrange(1, 50), rng.randrange(1, 30)
    return (a, op, b, a * b) if op == "*" else (a * b, op, b, a)


def _doc_arith_en(rng: random.Random, world: _World) -> list[str]:
    words = {"+": "plus", "-": "minus", "*": "times", "/": "divided by"}
    lines = [f"Exercise {rng.randrange(1, 500)}:"] if rng.random() < 0.5 else []
    for _ in range(rng.randrange(3, 9)):
        a, op, b, c = _arith_problem(rng)
        style = rng.random()
        if style < 0.5:
            lines.append(f"{a} {op} {b} = {c}")
        elif style < 0.8:
            lines.append(f"What is {a} {words[op]} {b}? It is {c}.")
        else:
            lines.append(f"{en_number(a).capitalize()} {words[op]} {en_number(b)} is {en_number(c)}.")
    return lines


def _doc_arith_zh(rng: random.Random, world: _World) -> list[str]:
    words = {"+": "加", "-": "减", "*": "乘以", "/": "除以"}
    lines = [f"练习{zh_number(rng.randrange(1, 100))}："] if rng.random() < 0.5 else []
    for _ in range(rng.randrange(3, 9)):
        a, op, b, c = _arith_problem(rng)
        if rng.random() < 0.5:
            lines.append(f"{zh_number(a)}{words[op]}{zh_number(b)}等于{zh_number(c)}。")
        else:
            lines.append(f"{a}{words[op]}{b}等于{c}。")
    return lines


def _doc_word_problem(rng: random.Random, world: _World) -> list[str]:
    person = rng.choice(world.people)
    zh, en_one, en_many, _ = rng.choice(_FOODS)
    have, more = rng.randrange(1, 40), rng.randrange(1, 40)
    eaten = rng.randrange(0, have + more)
    left = have + more - eaten
    return [
        f"{person.en} has {have} {en_many if have != 1 else en_one} and buys {more} more.",
        f"{person.zh}有{have}个{zh}，又买了{more}个。",
        f"Now {person.en} has {have + more}. After giving away {eaten}, {left} are left.",
        f"现在{person.zh}一共有{zh_number(have + more)}个{zh}，送出{eaten}个以后，还剩{left}个。",
    ]


def _random_date(rng: random.Random) -> datetime.date:
    return datetime.date(1950, 1, 1) + datetime.timedelta(days=rng.randrange(0, 80 * 365))


def _date_en(d: datetime.date) -> str:
    return f"{_MONTHS[d.month - 1]} {d.day}, {d.year}"


def _date_zh(d: datetime.date) -> str:
    return f"{d.year}年{d.month}月{d.day}日"


def _doc_dates(rng: random.Random, world: _World) -> list[str]:
    city = rng.choice(world.cities)
    d = _random_date(rng)
    later = rng.randrange(1, 60)
    e = d + datetime.timedelta(days=later)
    return [
        f"On {d.isoformat()} the market in {city.en} opened.",
        f"{_date_en(d)} was a {_WEEKDAYS_EN[d.weekday()]}.",
        f"{_date_zh(d)}是{_WEEKDAYS_ZH[d.weekday()]}，{city.zh}的市场开门了。",
        f"{later} days later it was {_date_en(e)} ({e.isoformat()}), a {_WEEKDAYS_EN[e.weekday()]}.",
        f"{zh_number(later)}天以后是{_date_zh(e)}，{_WEEKDAYS_ZH[e.weekday()]}。",
    ][: rng.randrange(3, 6)]


def _unit_line(rng: random.Random) -> str:
    big_en, big_sym, big_zh, factor, small_en, small_sym, small_zh = rng.choice(_UNITS)
    n = rng.randrange(1, 100)
    style = rng.random()
    if style < 0.35:
        return f"{n} {big_sym} = {n * factor} {small_sym}"
    if style < 0.6:
        return f"{n} {big_en} is {n * factor} {small_en}."
    if style < 0.85:
        return f"{n}{big_zh}等于{n * factor}{small_zh}。"
    return f"{zh_number(n)}{big_zh}等于{zh_number(n * factor)}{small_zh}。"


def _temperature_line(rng: random.Random) -> str:
    c = rng.randrange(-8, 9) * 5
    f = c * 9 // 5 + 32
    return rng.choice((f"{c} °C = {f} °F", f"摄氏{c}度等于华氏{f}度。",
                       f"{c} degrees Celsius is {f} degrees Fahrenheit."))


def _doc_units(rng: random.Random, world: _World) -> list[str]:
    lines = ["Unit conversions:"] if rng.random() < 0.3 else (["单位换算："] if rng.random() < 0.4 else [])
    for _ in range(rng.randrange(3, 8)):
        lines.append(_temperature_line(rng) if rng.random() < 0.15 else _unit_line(rng))
    return lines


def _city_facts(city: _City, world: _World) -> list[str]:
    other = world.cities[city.neighbor]
    dir_zh, dir_en = city.direction
    return [
        f"{city.en} ({city.zh}) is a city of {city.population:,} people, founded in {city.founded}.",
        f"{city.zh}有{city.population}人，建于{city.founded}年。",
        f"The {city.river[0]} River runs through {city.en}.",
        f"{city.river[1]}流经{city.zh}。",
        f"{city.en} is famous for its {city.product[1]}.",
        f"{city.zh}以{city.product[0]}闻名。",
        f"{city.en} lies {city.distance_km} km {dir_en} of {other.en}.",
        f"{city.zh}位于{other.zh}以{dir_zh}{city.distance_km}公里。",
    ]


def _doc_city(rng: random.Random, world: _World) -> list[str]:
    facts = _city_facts(rng.choice(world.cities), world)
    # Keep English/Chinese pairs together so the translation structure stays visible.
    pairs = [facts[i : i + 2] for i in range(0, len(facts), 2)]
    picked = rng.sample(pairs, rng.randrange(2, len(pairs) + 1))
    return [line for pair in picked for line in pair]


def _doc_person(rng: random.Random, world: _World) -> list[str]:
    p = rng.choice(world.people)
    city = world.cities[p.city]
    pet_zh, measure, pet_one, pet_many = p.pet
    lines = [
        f"{p.en} is {p.age} years old.",
        f"{p.zh}今年{zh_number(p.age)}岁。",
        f"{p.en} works as a {p.job[1]} in {city.en}.",
        f"{p.zh}在{city.zh}当{p.job[0]}。",
        f"{p.en} has {p.pets} {pet_one if p.pets == 1 else pet_many}.",
        f"{p.zh}有{zh_number(p.pets) if p.pets != 2 else '两'}{measure}{pet_zh}。",
    ]
    if rng.random() < 0.3:
        return [f"Name: {p.en}", f"Age: {p.age}", f"City: {city.en}", f"姓名：{p.zh}", f"年龄：{p.age}",
                f"城市：{city.zh}"]
    return lines[: rng.randrange(2, 7)]


def _doc_words(rng: random.Random, world: _World) -> list[str]:
    lines = [rng.choice((f"Word list {rng.randrange(1, 300)}:", "生词表：", "Vocabulary:"))]
    for zh, en in rng.sample(_WORDS, rng.randrange(3, 9)):
        style = rng.random()
        if style < 0.35:
            lines.append(f"{zh} means {en}.")
        elif style < 0.6:
            lines.append(f"{en} 的中文是“{zh}”。")
        elif style < 0.8:
            lines.append(f"{zh} - {en}")
        else:
            lines.append(f"Q: What is {zh} in English? A: {en}.")
    return lines


def _doc_shopping(rng: random.Random, world: _World) -> list[str]:
    items = rng.sample(_FOODS, rng.randrange(2, 6))
    en_lines, zh_lines, total = ["Shopping list:"], ["购物清单："], 0.0
    for i, (zh, one, many, price) in enumerate(items, start=1):
        n = rng.randrange(1, 13)
        total += n * price
        en_lines.append(f"- {n} {one if n == 1 else many}, {_money(n * price)} yuan")
        zh_lines.append(f"{i}. {zh}{n}个，{_money(n * price)}元")
    en_lines.append(f"Total: {_money(total)} yuan")
    zh_lines.append(f"合计：{_money(total)}元")
    return en_lines if rng.random() < 0.5 else zh_lines


def _doc_counting(rng: random.Random, world: _World) -> list[str]:
    start, step, n = rng.randrange(0, 100), rng.randrange(1, 13), rng.randrange(5, 15)
    seq = [start + step * i for i in range(n)]
    style = rng.random()
    if style < 0.35:
        return [f"Count by {step} from {start}:", ", ".join(map(str, seq)) + "."]
    if style < 0.7:
        return [f"从{zh_number(start)}开始每次加{zh_number(step)}：",
                "、".join(zh_number(x) for x in seq) + "。"]
    down = list(range(n, 0, -1))
    return ["Counting down:", ", ".join(map(str, down)) + ", go!",
            "倒数：" + "、".join(map(zh_number, down)) + "！"]


def _doc_objects(rng: random.Random, world: _World) -> list[str]:
    lines = []
    for _ in range(rng.randrange(2, 5)):
        color, material, obj = rng.choice(_COLORS), rng.choice(_MATERIALS), rng.choice(_OBJECTS)
        kg, cm = f"{rng.randrange(1, 400) / 10:.1f}", rng.randrange(5, 200)
        lines.append(f"The {color[1]} {material[1]} {obj[1]} weighs {kg} kg and is {cm} cm wide.")
        lines.append(f"这个{color[0]}的{material[0]}{obj[0]}重{zh_decimal(kg)}公斤，宽{cm}厘米。")
    return lines


def _doc_compare(rng: random.Random, world: _World) -> list[str]:
    nums = [rng.randrange(0, 1000) for _ in range(rng.randrange(3, 7))]
    a, b = nums[0], nums[1]
    if a == b:
        rel_en, rel_zh = "equal to", "等于"
    else:
        rel_en, rel_zh = ("greater than", "大于") if a > b else ("less than", "小于")
    return [
        f"{a} is {rel_en} {b}.",
        f"{zh_number(a)}{rel_zh}{zh_number(b)}。",
        f"The largest of {', '.join(map(str, nums))} is {max(nums)}.",
        f"{'、'.join(map(str, nums))}中最小的是{min(nums)}。",
        f"Sorted: {', '.join(map(str, sorted(nums)))}.",
    ][: rng.randrange(2, 6)]


def _doc_percent(rng: random.Random, world: _World) -> list[str]:
    lines = []
    for _ in range(rng.randrange(2, 6)):
        pct, base = rng.choice((5, 10, 20, 25, 50, 75)), rng.randrange(1, 80) * 20
        part = base * pct // 100
        lines.append(rng.choice((f"{pct}% of {base} is {part}.", f"{base}的{pct}%是{part}。",
                                 f"{zh_number(base)}的百分之{zh_number(pct)}是{zh_number(part)}。")))
    return lines


def _doc_train(rng: random.Random, world: _World) -> list[str]:
    a, b = rng.sample(world.cities, 2)
    dep = rng.randrange(5 * 60, 22 * 60)
    trip = rng.randrange(20, 8 * 60)
    arr = (dep + trip) % (24 * 60)
    h, m = divmod(trip, 60)
    return [
        f"The train from {a.en} to {b.en} leaves at {dep // 60:02d}:{dep % 60:02d} and arrives at "
        f"{arr // 60:02d}:{arr % 60:02d}; the trip takes {h} hours {m} minutes.",
        f"从{a.zh}到{b.zh}的火车{dep // 60}点{dep % 60}分出发，"
        f"{arr // 60}点{arr % 60}分到达，全程{h}小时{m}分钟。",
    ]


# Templates and their relative weights.
_TEMPLATES: list[tuple[Callable[[random.Random, _World], list[str]], int]] = [
    (_doc_arith_en, 3), (_doc_arith_zh, 3), (_doc_word_problem, 2), (_doc_dates, 2), (_doc_units, 2),
    (_doc_city, 3), (_doc_person, 3), (_doc_words, 4), (_doc_shopping, 1), (_doc_counting, 2),
    (_doc_objects, 1), (_doc_compare, 1), (_doc_percent, 1), (_doc_train, 2),
]


def _sprinkle_rare(rng: random.Random, text: str) -> str:
    """Insert rare Extension A characters at about RARE_CHAR_RATE of the positions."""
    expected = RARE_CHAR_RATE * len(text)
    count = int(expected) + (rng.random() < expected - int(expected))
    if not count:
        return text
    chars = list(text)
    for _ in range(count):
        chars.insert(rng.randrange(len(chars) + 1), chr(rng.randint(*RARE_CHAR_RANGE)))
    return "".join(chars)


def _document(rng: random.Random, world: _World) -> str:
    funcs, weights = zip(*_TEMPLATES)
    lines = rng.choices(funcs, weights=weights)[0](rng, world)
    # Templates never produce blank lines, which would split the document in two.
    return _sprinkle_rare(rng, "\n".join(lines))


def _file_text(seed: int, index: int, target_bytes: int, world: _World) -> str:
    # One RNG per file (seeded by seed and index) so each file can be generated on its own.
    rng = random.Random(seed * 1_000_003 + index)
    docs, size = [], 0
    while size < target_bytes:
        doc = _document(rng, world)
        docs.append(doc)
        size += len(doc.encode("utf-8")) + 2
    return "\n\n".join(docs) + "\n"


# ---------------------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------------------


def _check_params(n_files: int, total_mb: float) -> None:
    if n_files < 1:
        raise ValueError(f"data.corpus_files is {n_files} but must be at least 1.")
    if not total_mb > 0:
        raise ValueError(f"data.corpus_mb is {total_mb} but must be a positive size in MB.")


def generate_corpus(out_dir: Path, *, n_files: int = 8, total_mb: float = 2.0,
                    seed: int = 1234) -> list[Path]:
    """Write out_dir/corpus_00.txt ... (UTF-8, about total_mb MB in all) and return their sorted paths."""
    _check_params(n_files, total_mb)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    world = _make_world(seed)
    target = max(1, int(total_mb * _BYTES_PER_MB / n_files))
    width = max(2, len(str(n_files - 1)))
    paths = []
    for i in range(n_files):
        path = out_dir / f"corpus_{i:0{width}d}.txt"
        path.write_bytes(_file_text(seed, i, target, world).encode("utf-8"))
        paths.append(path)
    return sorted(paths)


def build_once(final_dir: Path, build: Callable[[Path], None]) -> bool:
    """Make final_dir by calling build(tmp_dir) once, safely across concurrent processes.

    Returns True if this call built it, False if it was already complete. Processes (e.g. torchrun ranks)
    serialise on an flock next to final_dir; the builder writes into a private temp dir which is renamed
    into place after COMPLETE_MARKER is written last, so readers never see a half-written directory.
    """
    final_dir = Path(final_dir)
    if (final_dir / COMPLETE_MARKER).is_file():
        return False
    parent = final_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    with open(parent / f".{final_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final_dir / COMPLETE_MARKER).is_file():
            return False  # another process finished it while we waited
        _remove_leftovers(final_dir)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.tmp-", dir=parent))
        try:
            build(tmp)
            (tmp / COMPLETE_MARKER).write_text(f"complete {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
            os.replace(tmp, final_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return True


def _remove_leftovers(final_dir: Path) -> None:
    """Remove temp dirs and an incomplete final dir left by a crashed builder (we hold the lock)."""
    for stale in final_dir.parent.glob(f".{final_dir.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if final_dir.exists():
        shutil.rmtree(final_dir)


def ensure_builtin_corpus(cache_dir: Path, *, n_files: int = 8, total_mb: float = 2.0,
                          seed: int = 1234) -> Path:
    """Return the cached built-in corpus directory under cache_dir, generating it at first use."""
    _check_params(n_files, total_mb)
    name = f"corpus-v{GENERATOR_VERSION}-files{n_files}-mb{total_mb:g}-seed{seed}"
    final_dir = Path(cache_dir).expanduser() / name

    def build(tmp: Path) -> None:
        start = time.perf_counter()
        generate_corpus(tmp, n_files=n_files, total_mb=total_mb, seed=seed)
        log.info("generated the built-in corpus (%d files, %g MB) in %.1f s", n_files, total_mb,
                 time.perf_counter() - start)

    if not build_once(final_dir, build):
        log.info("using the cached built-in corpus at %s", final_dir)
    return final_dir


# Seed of the held-out streams. Held-out RNGs are seeded with strings ("heldout:<seed>:<category>") while
# training files use integers (seed * 1_000_003 + index), so no held-out stream can replay a training file's.
HELDOUT_SEED = 20240817


def category_name(template: Callable[[random.Random, _World], list[str]]) -> str:
    """Short name of a document template: _doc_arith_en -> "arith_en"."""
    return template.__name__.removeprefix("_doc_")


def _plain(doc: str) -> str:
    """A document without its sprinkled rare characters: two documents equal up to those are the same text."""
    lo, hi = RARE_CHAR_RANGE
    return "".join(ch for ch in doc if not lo <= ord(ch) <= hi)


def training_documents(*, n_files: int = 8, total_mb: float = 2.0, seed: int = 1234) -> set[str]:
    """The documents of the built-in corpus with these parameters (rare characters removed), made in memory."""
    _check_params(n_files, total_mb)
    world = _make_world(seed)
    target = max(1, int(total_mb * _BYTES_PER_MB / n_files))
    # Documents never hold a blank line (see _document), so "\n\n" splits a file exactly into them.
    return {_plain(doc) for i in range(n_files)
            for doc in _file_text(seed, i, target, world).removesuffix("\n").split("\n\n")}


def heldout_documents(per_category: int = 20, seed: int = HELDOUT_SEED, *, n_files: int = 8,
                      total_mb: float = 2.0, corpus_seed: int = 1234) -> dict[str, list[str]]:
    """per_category unseen documents of every template, keyed by category_name, from the training corpus's world.

    The facts (cities, people) are those of the built-in corpus (n_files, total_mb, corpus_seed), so a model is
    scored on what that corpus teaches; the text comes from a separate RNG stream per category, and any document
    that occurs in the training corpus, or earlier in the held-out set, is dropped (compared without the sprinkled
    rare characters, so a copy that differs only by them counts as seen). Deterministic; the first k documents
    of a category do not depend on per_category.
    """
    if per_category < 1:
        raise ValueError(f"per_category is {per_category} but must be at least 1.")
    world = _make_world(corpus_seed)
    seen = training_documents(n_files=n_files, total_mb=total_mb, seed=corpus_seed)
    out = {}
    for template, _ in _TEMPLATES:
        name = category_name(template)
        rng = random.Random(f"heldout:{seed}:{name}")
        docs: list[str] = []
        for _ in range(100 * per_category + 1000):  # bounded: a template with few distinct texts fails below
            if len(docs) == per_category:
                break
            doc = _sprinkle_rare(rng, "\n".join(template(rng, world)))
            if _plain(doc) not in seen:
                seen.add(_plain(doc))
                docs.append(doc)
        if len(docs) < per_category:
            raise ValueError(f"template {name} yields only {len(docs)} documents unseen in training; ask for "
                             f"fewer than {per_category} per category.")
        out[name] = docs
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI: write the built-in corpus to a directory so a user can look at it."""
    parser = argparse.ArgumentParser(prog="python -m systems.corpus", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="directory to write corpus_XX.txt into")
    parser.add_argument("--files", type=int, default=8, help="number of files (default 8)")
    parser.add_argument("--mb", type=float, default=2.0, help="total size in MB (10**6 bytes; default 2)")
    parser.add_argument("--seed", type=int, default=1234, help="generator seed (default 1234)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    paths = generate_corpus(args.out, n_files=args.files, total_mb=args.mb, seed=args.seed)
    size = sum(p.stat().st_size for p in paths)
    print(f"wrote {len(paths)} files, {size:,} bytes, to {args.out} in {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
