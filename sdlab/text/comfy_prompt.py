"""ComfyUI's prompt syntax and chunking, for ComfyUI workflows (`CLIPTextEncode` and its SDXL nodes).

As ComfyUI's `comfy/sd1_clip.py` (`token_weights`, `SDTokenizer.tokenize_with_weights`): `(text)`
multiplies the weight by 1.1, `(text:1.3)` sets it, nesting multiplies; `\\(` and `\\)` are literal
brackets; `[`, `]` and `BREAK` are plain text (no A1111 de-emphasis, no forced chunk break). Each weighted
segment is tokenized whole, apart from its `embedding:NAME` words, and is one group: a group that does not
fit in the current 77-token chunk moves to the next one whole, unless it has 8 tokens or more, in which
case it is cut at the chunk's end. The weights are applied by `sdlab.text.prompt.encode_chunks` with the
empty prompt's chunk: z_empty + w·(z − z_empty) (ComfyUI's `ClipTokenWeightEncoder`).
"""

from __future__ import annotations

import math
import re
from itertools import accumulate
from typing import Protocol

from sdlab.text.prompt import PLACEHOLDER, Chunk, Vectors
from sdlab.text.schedule import MAX_NESTING, PromptError
from sdlab.text.tokenizer import CLIPTokenizer

LENGTH = 77  # tokens per chunk, BOS and EOS included
LARGE = 8  # a group of this many tokens or more may be cut across chunks
PREFIX = "embedding:"
_ESCAPES = (("\\)", "\0\1"), ("\\(", "\0\2"))
_EMBEDDING_WORD = re.compile(f" {PREFIX}|\n{PREFIX}")

Token = tuple[int, float, Vectors | None]  # (id, weight, the embedding vector replacing it)


class NamedEmbeddings(Protocol):
    """The textual-inversion embeddings `embedding:NAME` words may name, for one text encoder."""

    def named(self, name: str) -> Vectors | None:
        """The vectors (n, width) of the embedding `NAME` names, None when none was found for it."""
        ...


def parse_parentheses(text: str) -> list[str]:
    """The top-level pieces of `text`: runs outside brackets and whole `(…)` groups, brackets kept
    (ComfyUI's `parse_parentheses`, quirks included: an unmatched `)` makes the nesting negative)."""
    pieces: list[str] = []
    current, depth = "", 0
    for char in text:
        if char == "(" and depth == 0:
            if current:
                pieces.append(current)
            current = char
        elif char == ")" and depth == 1:
            pieces.append(current + char)
            current = ""
        else:
            current += char
        depth += {"(": 1, ")": -1}.get(char, 0)
    if current:
        pieces.append(current)
    return pieces


def token_weights(text: str, weight: float = 1.0) -> list[tuple[str, float]]:
    """(segment, weight) runs of an escaped prompt (ComfyUI's `token_weights`): a `(…)` group weighs
    1.1 times its surroundings, or the number after its last colon when that parses as one."""
    out: list[tuple[str, float]] = []
    for piece in parse_parentheses(text):
        if len(piece) < 2 or piece[0] != "(" or piece[-1] != ")":
            out.append((piece, weight))
            continue
        inner, inner_weight = piece[1:-1], weight * 1.1
        colon = inner.rfind(":")
        if colon > 0:
            try:
                inner_weight = float(inner[colon + 1 :])
                inner = inner[:colon]
            except ValueError:
                pass
        out += token_weights(inner, inner_weight)
    return out


def escape_important(text: str) -> str:
    """`\\(` and `\\)` hidden from the bracket parser (ComfyUI's `escape_important`)."""
    for escaped, hidden in _ESCAPES:
        text = text.replace(escaped, hidden)
    return text


def unescape_important(text: str) -> str:
    """The hidden brackets back as literal `(` and `)`."""
    for escaped, hidden in _ESCAPES:
        text = text.replace(hidden, escaped[1])
    return text


def weighted_segments(text: str) -> list[tuple[str, float]]:
    """A ComfyUI prompt as (literal text, weight) runs; a weight that is not finite is an error, and so
    are brackets nested deeper than MAX_NESTING (`token_weights` recurses once per level)."""
    escaped = escape_important(text)
    depth = max(accumulate((c == "(") - (c == ")") for c in escaped), default=0)
    if depth > MAX_NESTING:
        raise PromptError(f"the prompt nests brackets {depth} deep; the limit is {MAX_NESTING}")
    out = [(unescape_important(s), w) for s, w in token_weights(escaped)]
    for segment, weight in out:
        if not math.isfinite(weight):
            raise PromptError(f"({segment}:{weight}): a prompt weight must be a finite number")
    return out


def comfy_chunks(
    tokenizer: CLIPTokenizer, text: str, pad_token: int, embeddings: NamedEmbeddings | None = None
) -> list[Chunk]:
    """A prompt's 77-token chunks with their weights as ComfyUI's `tokenize_with_weights` makes them."""
    bos, end, pad = (tokenizer.bos, 1.0, None), (tokenizer.eos, 1.0, None), (pad_token, 1.0, None)
    rows: list[list[Token]] = [[bos]]
    for group in _groups(tokenizer, text, embeddings):
        large = len(group) >= LARGE
        while group:
            row, room = rows[-1], LENGTH - 1 - len(rows[-1])
            if len(group) <= room:
                row += group
                break
            if large:  # cut the group at the chunk's end
                row += [*group[:room], end]
                group = group[room:]
            else:  # move it whole to the next chunk
                row += [end] + [pad] * room
            rows.append([bos])
    rows[-1].append(end)
    rows[-1] += [pad] * (LENGTH - len(rows[-1]))
    return [_chunk(row) for row in rows]


def _groups(tokenizer: CLIPTokenizer, text: str, embeddings: NamedEmbeddings | None) -> list[list[Token]]:
    """Each weighted segment's token groups: its text between `embedding:NAME` words, and each such
    embedding's vectors (ComfyUI only looks for them after a space or a newline, or at a segment's start)."""
    groups: list[list[Token]] = []
    for segment, weight in weighted_segments(text):
        first, *rest = _EMBEDDING_WORD.split(segment)
        for word in filter(None, [first, *(PREFIX + w for w in rest)]):
            if word.startswith(PREFIX) and embeddings is not None:
                vectors, word = _embedding(word[len(PREFIX) :].strip("\n"), embeddings)
                rows = vectors.tensor.shape[0]
                groups.append([(PLACEHOLDER, weight, _row(vectors, i)) for i in range(rows)])
            if word:
                groups.append([(t, weight, None) for t in tokenizer.tokenize(word)])
    return groups


def _embedding(text: str, embeddings: NamedEmbeddings) -> tuple[Vectors, str]:
    """The embedding named by the first word of `text` and the text left after it; a name with trailing
    commas is tried without them, the commas staying text (ComfyUI's `_try_get_embedding`)."""
    name, *rest = text.split() or [""]
    leftover = " ".join(rest)
    vectors = embeddings.named(name)
    stripped = name.strip(",")
    if vectors is None and len(stripped) < len(name):
        vectors, leftover = embeddings.named(stripped), f"{name[len(stripped) :]} {leftover}"
    if vectors is None:
        raise ValueError(f"{PREFIX}{name}: no embedding of that name was found")
    return vectors, leftover


def _row(vectors: Vectors, i: int) -> Vectors:
    return Vectors(vectors.name, vectors.tensor[i : i + 1])


def _chunk(row: list[Token]) -> Chunk:
    """A chunk of ids and weights; each embedding vector fixes its own position."""
    fixes = tuple((p, v) for p, (_, _, v) in enumerate(row) if v is not None)
    return Chunk(tuple(i for i, _, _ in row), tuple(w for _, w, _ in row), fixes)
