"""CLIP's byte-level BPE tokenizer: text -> token ids, identical to transformers' ``CLIPTokenizer``.

The pipeline is transformers 5's, run by the ``tokenizers`` library: NFC, per-character lower-casing,
the CLIP split regex (which drops whitespace: Oniguruma's ``\\s``, i.e. Unicode White_Space, NBSP and
ideographic space included), GPT-2's byte -> character map, BPE with ``</w>`` word ends.
transformers' ``\\s+ -> " "`` normalizer is left out: the split drops whitespace, so it cannot change
ids. Deliberate differences from OpenAI CLIP's ``SimpleTokenizer``, all kept for parity with transformers:

- no ``ftfy.fix_text``: curly quotes (``it’s``), ligatures (``ﬁ``), full-width letters and mojibake stay
  as typed (and ftfy is not a dependency);
- no ``html.unescape``: ``&amp;`` is the three tokens ``&``, ``amp``, ``;`` rather than ``&``;
- only the exact strings ``<|startoftext|>`` / ``<|endoftext|>`` in the text become BOS / EOS; other
  casings are split into ``<|``, ``endoftext``, ``|>`` by the byte-level step's GPT-2 regex;
- lower-casing is per character: a word-final ``Σ`` gives ``σ``, not ``ς``.
"""

from __future__ import annotations

import functools
import gzip
import json
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

BOS, EOS = 49406, 49407
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
MERGE_TABLE = "bpe_simple_vocab_16e6.txt.gz"  # OpenAI CLIP's merge table (MIT), in sdlab/text/data
N_MERGES = 49152 - 256 - 2  # the merges CLIP uses: 49,408 tokens in all
SPLIT_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, in OpenAI's order (printable bytes first)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]  # "!".."~", "¡".."¬", "®".."ÿ"
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}


def read_merge_table(path: Path | Traversable) -> list[tuple[str, str]]:
    """The merges CLIP uses from OpenAI's gzipped table (line 0 is a header)."""
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    return [_merge(line, path, i) for i, line in enumerate(lines[1 : 1 + N_MERGES], start=2)]


def read_merges_txt(path: Path) -> list[tuple[str, str]]:
    """The merges of a Hugging Face ``merges.txt`` (``#version`` header and blank lines skipped)."""
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    keep = [(i, line) for i, line in enumerate(lines, 1) if line.strip() and not line.startswith("#version")]
    return [_merge(line, path, i) for i, line in keep]


def _merge(line: str, path: Path | Traversable, lineno: int) -> tuple[str, str]:
    """One ``left right`` merge line as a pair; a clear error for anything else."""
    pair = tuple(line.split())
    if len(pair) != 2:
        raise ValueError(f"{path}:{lineno}: expected a merge 'left right', got {line!r}")
    return pair


def vocab_from_merges(merges: list[tuple[str, str]]) -> dict[str, int]:
    """OpenAI CLIP's vocabulary: byte characters, their ``</w>`` forms, the merges, BOS, EOS."""
    chars = list(bytes_to_unicode().values())
    tokens = [*chars, *(c + "</w>" for c in chars), *("".join(m) for m in merges), *SPECIAL_TOKENS]
    return {t: i for i, t in enumerate(tokens)}


def _backend(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    """transformers 5's CLIPTokenizer pipeline without its BOS/EOS post-processor."""
    bpe = models.BPE(
        vocab=vocab,
        merges=merges,
        continuing_subword_prefix="",
        end_of_word_suffix="</w>",
        fuse_unk=False,
        unk_token=SPECIAL_TOKENS[1],
    )
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),  # its GPT-2 regex splits "<|ENDOFTEXT|>"
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer over a vocabulary and its merge list."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]]):
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise ValueError(f"CLIP vocabulary lacks the special tokens {missing}")
        self.bos, self.eos = (vocab[t] for t in SPECIAL_TOKENS)
        self.vocab_size: int = len(vocab)
        self._vocab, self._merges = vocab, merges
        self._backend = _backend(vocab, merges)

    @classmethod
    @functools.cache
    def default(cls) -> CLIPTokenizer:
        """The tokenizer of OpenAI CLIP (SD1, SD2, SDXL), from the bundled merge table; built once."""
        merges = read_merge_table(files("sdlab.text") / "data" / MERGE_TABLE)
        return cls(vocab_from_merges(merges), merges)

    @classmethod
    def from_files(cls, vocab_json: Path, merges_txt: Path) -> CLIPTokenizer:
        """A tokenizer from Hugging Face ``vocab.json`` and ``merges.txt`` files."""
        vocab = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
        return cls(vocab, read_merges_txt(merges_txt))

    @classmethod
    def from_folder(cls, folder: Path) -> CLIPTokenizer:
        """A tokenizer from a diffusers ``tokenizer/`` folder (``vocab.json`` + ``merges.txt``)."""
        paths = [Path(folder) / name for name in ("vocab.json", "merges.txt")]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"CLIP tokenizer folder lacks {' and '.join(missing)}")
        return cls.from_files(*paths)

    def tokenize(self, text: str) -> list[int]:
        """BPE ids of ``text``: no BOS/EOS, no truncation."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode(self, text: str, *, max_length: int | None = 77, pad_token: int = EOS) -> list[int]:
        """BOS + ids + EOS, cut to ``max_length`` (EOS kept last) and padded; ``None``: neither."""
        ids = self.tokenize(text)
        if max_length is None:
            return [self.bos, *ids, self.eos]
        if max_length < 2:
            raise ValueError(f"max_length must leave room for BOS and EOS, got {max_length}")
        ids = [self.bos, *ids[: max_length - 2], self.eos]
        return ids + [pad_token] * (max_length - len(ids))

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` without BOS/EOS, word ends as single spaces (as transformers decodes)."""
        return self._backend.decode(list(ids), skip_special_tokens=True).replace("</w>", " ").strip()

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry (``"cat</w>"``), or None."""
        return self._backend.token_to_id(token)

    def id_to_token(self, i: int) -> str:
        """The vocabulary entry with id ``i``."""
        token = self._backend.id_to_token(i) if 0 <= i < self.vocab_size else None
        if token is None:
            raise IndexError(f"token id {i} is outside the vocabulary of {self.vocab_size}")
        return token

    def save_folder(self, folder: Path, *, pad_token: int = EOS) -> Path:
        """Write a diffusers/transformers ``tokenizer/`` folder; the folder must not exist yet."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=False)
        pad = self.id_to_token(pad_token)
        (folder / "vocab.json").write_text(json.dumps(self._vocab, ensure_ascii=False), encoding="utf-8")
        merges = "".join(f"{a} {b}\n" for a, b in self._merges)
        (folder / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")
        special = {
            "bos_token": SPECIAL_TOKENS[0],
            "eos_token": SPECIAL_TOKENS[1],
            "unk_token": SPECIAL_TOKENS[1],
            "pad_token": pad,
        }
        config = {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": 77,
            "do_lower_case": True,
            **special,
        }
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        return folder
