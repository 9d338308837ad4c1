"""AUTOMATIC1111 prompt syntax: attention weights, BREAK, 75-token chunks, clip skip.

`(word)` multiplies attention by 1.1, `[word]` divides by 1.1, `(word:1.3)` sets 1.3, `\\(` is a
literal bracket, `BREAK` starts a new 75-token chunk. Long prompts become several 77-token chunks
encoded separately and concatenated, so the context has 77·k tokens. A prompt without any syntax and
at most 75 tokens gives exactly the embedding of plain `tokenizer -> text encoder` (diffusers).
Textual-inversion embeddings (`sdlab.embeddings`) found in the token stream become placeholder positions
whose token embeddings are replaced by their vectors, never split across chunks (A1111).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from sdlab.models.clip import CLIPTextModel
from sdlab.models.ops import device_of
from sdlab.text.tokenizer import CLIPTokenizer

CHUNK = 75  # tokens per chunk between BOS and EOS
COMMA_BACKTRACK = 20  # a full chunk is cut at its last comma if that is at most this far back

_ATTENTION = re.compile(
    r"\\\(|\\\)|\\\[|\\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|[^\\()\[\]:]+|:",
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) runs; `("BREAK", -1.0)` marks a forced chunk break."""
    res: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for item in res[start:]:
            item[1] *= factor

    for m in _ATTENTION.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\") and len(tok) == 2:
            res.append([tok[1:], 1.0])
        elif tok == "(":
            round_open.append(len(res))
        elif tok == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            scale_from(round_open.pop(), float(weight))
        elif tok == ")" and round_open:
            scale_from(round_open.pop(), 1.1)
        elif tok == "]" and square_open:
            scale_from(square_open.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(_BREAK.split(tok)):
                if i:
                    res.append(["BREAK", -1.0])
                res.append([part, 1.0])
    for start in round_open:
        scale_from(start, 1.1)
    for start in square_open:
        scale_from(start, 1 / 1.1)
    merged: list[list] = []
    for item in res or [["", 1.0]]:
        if merged and merged[-1][1] == item[1] and item[1] != -1.0:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return [(t, w) for t, w in merged]


@dataclass(frozen=True, eq=False)
class Vectors:
    """A textual-inversion embedding's vectors (n, width) for one text encoder (compared by identity)."""

    name: str
    tensor: Tensor


class EmbeddingFinder(Protocol):
    """Finds an embedding's name in a fragment's tokens (A1111's `find_embedding_at_position`)."""

    def find(self, tokens: Sequence[int], position: int) -> tuple[Vectors, int] | None:
        """(vectors, number of prompt tokens the name spans) of the embedding named at `position`."""
        ...


PLACEHOLDER = 0  # the id of an embedding's positions (A1111's); its token embedding is replaced


@dataclass(frozen=True)
class Chunk:
    """77 token ids (BOS, 75 tokens, EOS, padding), one attention weight per id, and the embeddings whose
    vectors replace the token embeddings from a position on: ((position, vectors), ...)."""

    ids: tuple[int, ...]
    weights: tuple[float, ...]
    fixes: tuple[tuple[int, Vectors], ...] = ()


def chunk_prompt(
    tokenizer: CLIPTokenizer, text: str, pad_token: int, embeddings: EmbeddingFinder | None = None
) -> list[Chunk]:
    """Tokenize a prompt with weights into 77-token chunks as AUTOMATIC1111 does (`tokenize_line`);
    `embeddings`: the textual-inversion embeddings its words may name."""
    chunks: list[Chunk] = []
    ids: list[int] = []
    weights: list[float] = []
    fixes: list[tuple[int, Vectors]] = []  # positions in `ids`
    last_comma = -1
    comma = tokenizer.token_to_id(",</w>")

    def close(keep_from: int | None = None) -> None:
        nonlocal ids, weights, fixes, last_comma
        cut = len(ids) if keep_from is None else keep_from
        head_ids, head_w = ids[:cut], weights[:cut]
        n = CHUNK - len(head_ids)
        pad = [tokenizer.eos, *[pad_token] * n]  # A1111 pads with EOS, then ids after the first EOS are pad
        body = [tokenizer.bos, *head_ids, *pad]
        head_fixes = tuple((p + 1, v) for p, v in fixes if p < cut)  # +1: BOS
        chunks.append(Chunk(tuple(body), (1.0, *head_w, *[1.0] * (n + 1)), head_fixes))
        fixes = [(p - cut, v) for p, v in fixes if p >= cut]  # an embedding never spans a comma
        ids, weights, last_comma = ids[cut:], weights[cut:], -1

    for fragment, weight in parse_attention(text):
        if weight == -1.0:
            close()
            continue
        tokens = tokenizer.tokenize(fragment)
        position = 0
        while position < len(tokens):
            tok = tokens[position]
            if tok == comma:
                last_comma = len(ids)
            elif len(ids) == CHUNK and last_comma != -1 and len(ids) - last_comma <= COMMA_BACKTRACK:
                close(last_comma + 1)
            if len(ids) == CHUNK:
                close()
            found = embeddings.find(tokens, position) if embeddings is not None else None
            if found is None:
                ids.append(tok)
                weights.append(weight)
                position += 1
                continue
            vectors, length = found
            n = vectors.tensor.shape[0]
            if len(ids) + n > CHUNK:  # the whole embedding moves to the next chunk
                close()
            fixes.append((len(ids), vectors))
            ids += [PLACEHOLDER] * n
            weights += [weight] * n
            position += length
    if ids or not chunks:
        close()
    return chunks


def pad_chunks(chunks: list[Chunk], count: int, empty: Chunk) -> list[Chunk]:
    """Extend a chunk list to `count` chunks with the empty prompt's chunk (cond/uncond alignment)."""
    return chunks + [empty] * (count - len(chunks))


def encode_chunks(
    encoder: CLIPTextModel,
    chunks: list[Chunk],
    layer: int = 1,
    final_norm: bool = True,
    empty: Chunk | None = None,
) -> tuple[Tensor, Tensor]:
    """Context (1, 77·k, width) and the first chunk's pooled vector (1, dim).

    `layer` picks the hidden states (1 = last; see `CLIPTextModel.encode`). Weights scale each token's
    vector, then the chunk's mean is restored (A1111's emphasis); given the empty prompt's chunk `empty`
    (ComfyUI's weighting), a weighted token's vector is moved from the empty prompt's instead, which is
    encoded in the same batch: z_empty + w·(z − z_empty).
    """
    device = device_of(encoder)
    weights = torch.tensor([c.weights for c in chunks], dtype=torch.float64)[..., None]  # (k, 77, 1)
    weighted = bool((weights != 1.0).any())
    batch = [*chunks, empty] if weighted and empty is not None else chunks
    ids = torch.tensor([c.ids for c in batch], device=device)
    with _embedding_fixes(encoder, batch):
        z, pooled = encoder.encode(ids, layer, final_norm)
    w = weights.to(z)
    if weighted and empty is not None:
        z, z_empty = z[:-1], z[-1:]
        z = torch.where((weights != 1.0).to(device), (z - z_empty) * w + z_empty, z)
    elif weighted:
        mean = z.mean(dim=(1, 2), keepdim=True)
        z = z * w
        z = z * (mean / z.mean(dim=(1, 2), keepdim=True))
    return z.reshape(1, -1, z.shape[-1]), pooled[:1]


@contextmanager
def _embedding_fixes(encoder: CLIPTextModel, chunks: list[Chunk]) -> Iterator[None]:
    """While encoding `chunks`, their embeddings' vectors replace the token embeddings at their positions
    (A1111's `EmbeddingsWithFixes`)."""
    if not any(c.fixes for c in chunks):
        yield
        return

    def fix(module: torch.nn.Module, args: tuple, out: Tensor) -> Tensor:
        out = out.clone()
        for row, chunk in enumerate(chunks):
            for position, vectors in chunk.fixes:
                vec = vectors.tensor.to(out)
                out[row, position : position + vec.shape[0]] = vec
        return out

    handle = encoder.text_model.embeddings.token_embedding.register_forward_hook(fix)
    try:
        yield
    finally:
        handle.remove()
