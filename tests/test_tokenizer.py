"""The CLIP tokenizer against transformers' CLIPTokenizer on the same vocabulary, plus known ids."""

from __future__ import annotations

import json
import random
import string
from importlib.resources import files
from pathlib import Path

import pytest

from sdlab.text.tokenizer import BOS, EOS, CLIPTokenizer, read_merge_table

ACCENTED = ["café", "naïve", "Ångström", "résumé", "Ærøskøbing", "ñandú", "cafe\u0301", "İstanbul", "ΟΔΟΣ"]
ACCENTED += ["straße", "ﬁne", "Łódź", "Dvořák", "Ὀδυσσεύς", "Москва", "Tiếng Việt", "ǅemal", "ﬀ"]
CJK = ["東京", "日本語のテキスト", "한국어", "中文字符", "ｆｕｌｌｗｉｄｔｈ", "ｶﾀｶﾅ", "一二三", "〜ー"]
EMOJI = ["😀", "👍🏽", "👨\u200d👩\u200d👧\u200d👦", "🏳️\u200d🌈", "🇯🇵", "🇺🇸", "❤️", "🧑🏿\u200d🚀", "1️⃣"]
EMOJI += ["🐈\u200d⬛", "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f"]  # tag flag
NUMBERS = ["3.14159", "1,000,000", "1e-5", "½", "①②", "٣٤٥", "Ⅻ", "0x1F", "-42", "²³", "१२३"]
PUNCT = string.punctuation + "…—–«»“”‘’¿¡·•§¶†‰′″※"
SPACES = [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2003", "\u200b", "\x0b", "\x0c", "\x1c"]
SPACES += ["\x85", "\u2028", "\u180e", "\ufeff"]
HTML = ["&amp;", "&lt;b&gt;", "&quot;hi&quot;", "&#39;", "&nbsp;", "&#x1F600;", "&amp;amp;", "&copy;"]
A1111 = ["(word:1.2)", "((masterpiece))", "[a|b]", "[cat:dog:0.5]", "<lora:x:1>", "<lora:add_detail:0.8>"]
A1111 += ["BREAK", "{a|b}", r"\(escaped\)", "embedding:foo", "(red hair:0.9), [blue eyes]", "AND"]
APOSTROPHES = ["it's", "don't", "they're", "we've", "I'm", "you'll", "he'd", "IT'S", "it’s", "''s"]
APOSTROPHES += ["rock'n'roll", "'twas", "o'clock"]
SPECIALS = ["<|endoftext|>", "<|startoftext|>", "<|ENDOFTEXT|>", "<|endoftext|>x", "a<|startoftext|>b"]
WORDS = "a photo of cat dog portrait landscape highly detailed oil painting by artist trending".split()
UNICODE_RANGES = [(0x20, 0x250), (0x300, 0x530), (0x590, 0x700), (0x900, 0xE80), (0x1100, 0x11FF)]
UNICODE_RANGES += [(0x2000, 0x2BFF), (0x1F300, 0x1FAFF), (0x20000, 0x2A6DF)]


def _random_case(rng: random.Random, word: str) -> str:
    """``word`` with about a third of its characters upper-cased."""
    return "".join(c.upper() if rng.random() < 0.3 else c for c in word)


def _fragment(rng: random.Random) -> str:
    """One piece of a test string, from a randomly chosen category."""
    lists = [ACCENTED, CJK, EMOJI, NUMBERS, HTML, A1111, APOSTROPHES, SPECIALS]
    kind = rng.randrange(5 + len(lists))
    if kind == 0:
        return "".join(rng.choice(string.digits) for _ in range(rng.randint(1, 40)))
    if kind == 1:
        return "".join(rng.choice(PUNCT) for _ in range(rng.randint(1, 12)))
    if kind == 2:
        return "".join(rng.choice(string.ascii_letters) for _ in range(rng.randint(100, 600)))
    if kind == 3:
        return "".join(chr(rng.randint(*rng.choice(UNICODE_RANGES))) for _ in range(rng.randint(1, 8)))
    if kind == 4:
        return _random_case(rng, rng.choice(WORDS))
    return _random_case(rng, rng.choice(lists[kind - 5]))


def varied_strings(n: int = 1200, seed: int = 0) -> list[str]:
    """``n`` deterministic strings mixing every hard case, joined by odd whitespace or nothing."""
    rng = random.Random(seed)
    fixed = ["", " ", "\t\n", "a photo of a cat", "A  Photo\tOF\na CAT", "a" * 500, "x" * 77, "word " * 100]
    fixed += ACCENTED + CJK + EMOJI + NUMBERS + HTML + A1111 + APOSTROPHES + SPECIALS
    out = list(fixed)
    while len(out) < n:
        parts = [_fragment(rng) for _ in range(rng.randint(1, 6))]
        out.append("".join(p + rng.choice([*SPACES, "", "", ",", " "]) for p in parts))
    return out


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer.default()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tok):
    """A diffusers-style ``tokenizer/`` folder from the bundled table (its ids checked in test_known_ids)."""
    path = tmp_path_factory.mktemp("tokenizer")
    vocab = {tok.id_to_token(i): i for i in range(tok.vocab_size)}
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = read_merge_table(files("sdlab.text") / "data" / "bpe_simple_vocab_16e6.txt.gz")
    lines = ["#version: 0.2", *(" ".join(m) for m in merges)]
    (path / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def oracle(folder):
    transformers = pytest.importorskip("transformers")
    ref = transformers.CLIPTokenizer.from_pretrained(folder)
    ref.model_max_length = 10**9  # compare untruncated sequences without length warnings
    return ref


def test_known_ids(tok):
    assert tok.encode("a photo of a cat", max_length=None) == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.tokenize("masterpiece, best quality") == [12066, 267, 949, 3027]
    assert (tok.bos, tok.eos, tok.vocab_size) == (BOS, EOS, 49408)
    expected = {0: "!", 93: "~", 94: "¡", 188: "Ā", 256: "!</w>", 512: "in", 49405: "jekyll</w>"}
    expected |= {BOS: "<|startoftext|>", EOS: "<|endoftext|>"}
    assert {i: tok.id_to_token(i) for i in expected} == expected
    assert tok.token_to_id("cat</w>") == 2368 and tok.token_to_id("no such token") is None
    with pytest.raises(IndexError):
        tok.id_to_token(49408)


def test_default_is_cached():
    assert CLIPTokenizer.default() is CLIPTokenizer.default()


def test_matches_transformers(tok, oracle):
    texts = varied_strings()
    assert len(texts) >= 1000
    expected = oracle(texts)["input_ids"]
    got = [tok.encode(t, max_length=None) for t in texts]
    mismatches = [t for t, ids, want in zip(texts, got, expected, strict=True) if ids != want]
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[0]!r}"


def test_decode_matches_transformers(tok, oracle):
    for text in varied_strings(200, seed=1):
        ids = tok.encode(text)
        assert tok.decode(ids) == oracle.decode(ids, skip_special_tokens=True), text
    assert tok.decode(tok.encode("A Photo of a CAT")) == "a photo of a cat"


def test_padding_and_truncation(tok, oracle):
    for text in ["", "a photo of a cat", "word " * 75, "word " * 76, "a" * 500, "lorem ipsum " * 80]:
        want = oracle(text, padding="max_length", truncation=True, max_length=77)["input_ids"]
        got = tok.encode(text)
        assert got == want and len(got) == 77 and got[0] == BOS, text
        assert EOS in got and len(tok.encode(text, max_length=None)) == len(tok.tokenize(text)) + 2
    assert tok.encode("a cat", max_length=6, pad_token=0) == [BOS, 320, 2368, EOS, 0, 0]
    assert tok.encode("a photo of a cat", max_length=4) == [BOS, 320, 1125, EOS]
    with pytest.raises(ValueError):
        tok.encode("a cat", max_length=1)


def test_from_folder(tok, folder):
    loaded = CLIPTokenizer.from_folder(folder)
    assert loaded.vocab_size == tok.vocab_size
    for text in varied_strings(300, seed=2):
        assert loaded.tokenize(text) == tok.tokenize(text), text


def test_from_folder_missing_file(folder, tmp_path):
    (tmp_path / "vocab.json").write_bytes((folder / "vocab.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        CLIPTokenizer.from_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="vocab.json and .*merges.txt"):
        CLIPTokenizer.from_folder(tmp_path / "absent")


def test_bad_files(folder, tmp_path):
    (tmp_path / "merges.txt").write_text("#version: 0.2\ni n\nnot a merge\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"merges.txt:3"):
        CLIPTokenizer.from_files(folder / "vocab.json", tmp_path / "merges.txt")
    (tmp_path / "vocab.json").write_text('{"a": 0}', encoding="utf-8")
    with pytest.raises(ValueError, match="special tokens"):
        CLIPTokenizer.from_files(tmp_path / "vocab.json", folder / "merges.txt")


def test_save_folder_round_trips_and_loads_in_transformers(tmp_path: Path) -> None:
    from transformers import CLIPTokenizer as Reference

    folder = CLIPTokenizer.default().save_folder(tmp_path / "tokenizer", pad_token=0)
    ours = CLIPTokenizer.from_folder(folder)
    text = "A photo of a Cat, (masterpiece:1.2)"
    assert ours.encode(text, max_length=20, pad_token=0) == CLIPTokenizer.default().encode(
        text, max_length=20, pad_token=0
    )
    ref = Reference.from_pretrained(str(folder))
    assert ref(text, padding="max_length", max_length=20).input_ids == ours.encode(
        text, max_length=20, pad_token=0
    )
    with pytest.raises(FileExistsError):
        CLIPTokenizer.default().save_folder(folder)
