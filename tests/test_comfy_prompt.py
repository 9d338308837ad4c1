"""ComfyUI's prompt syntax, chunking and weighting (`sdlab.text.comfy_prompt`, `encode_text`).

The tables state what ComfyUI's `comfy/sd1_clip.py` (`parse_parentheses`, `token_weights`,
`SDTokenizer.tokenize_with_weights`) returns, worked out by reading its code; the weighting is checked
against ComfyUI's formula z_empty + w·(z − z_empty) computed here from plain, unweighted encodings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from reference import randomize
from tiny import TINY

from sdlab.checkpoints.load import StableDiffusion
from sdlab.conditioning import encode_prompt_pair, encode_text
from sdlab.models.clip import CLIPTextModel
from sdlab.text.comfy_prompt import (
    PREFIX,
    comfy_chunks,
    escape_important,
    parse_parentheses,
    token_weights,
    weighted_segments,
)
from sdlab.text.prompt import PLACEHOLDER, Vectors
from sdlab.text.tokenizer import EOS, CLIPTokenizer

W11 = 1.1 * 1.1  # ComfyUI multiplies 1.1 per level: 1.2100000000000002, not 1.21

# (prompt, parse_parentheses(escape_important(prompt)), token_weights(escape_important(prompt), 1.0))
TABLE = [
    ("a (b:1.2) c", ["a ", "(b:1.2)", " c"], [("a ", 1.0), ("b", 1.2), (" c", 1.0)]),
    ("((a)) b", ["((a))", " b"], [("a", W11), (" b", 1.0)]),
    ("(a (b) c:0.5)", ["(a (b) c:0.5)"], [("a ", 0.5), ("b", 0.5 * 1.1), (" c", 0.5)]),
    ("[a] (b) BREAK c", ["[a] ", "(b)", " BREAK c"], [("[a] ", 1.0), ("b", 1.1), (" BREAK c", 1.0)]),
    ("a) (b", ["a) (b"], [("a) (b", 1.0)]),  # an unmatched ")" makes the nesting negative
    ("(a:x)", ["(a:x)"], [("a:x", 1.1)]),  # not a number: the colon stays text
    ("(:1.5)", ["(:1.5)"], [(":1.5", 1.1)]),  # a colon at position 0 is not a weight
    ("(a:1.2:0.8)", ["(a:1.2:0.8)"], [("a:1.2", 0.8)]),  # the last colon
    ("a \\(b\\) (c)", ["a \0\2b\0\1 ", "(c)"], [("a \0\2b\0\1 ", 1.0), ("c", 1.1)]),
    ("(a (b:1.5)):1.2", ["(a (b:1.5))", ":1.2"], [("a ", 1.1), ("b", 1.5), (":1.2", 1.0)]),
    ("()", ["()"], []),
    ("(a", ["(a"], [("(a", 1.0)]),  # unclosed: literal
    ("a (b (c", ["a ", "(b (c"], [("a ", 1.0), ("(b (c", 1.0)]),
    ("(embedding:foo:1.3)", ["(embedding:foo:1.3)"], [("embedding:foo", 1.3)]),
    ("", [], []),
]


@pytest.mark.parametrize(("text", "pieces", "weights"), TABLE)
def test_parser_matches_comfyui_table(text: str, pieces: list[str], weights: list) -> None:
    assert parse_parentheses(escape_important(text)) == pieces
    assert token_weights(escape_important(text)) == weights  # exact: the same float products


def test_escapes_come_back_literal_and_weights_must_be_finite() -> None:
    assert weighted_segments("a \\(b\\) (c)") == [("a (b) ", 1.0), ("c", 1.1)]
    for bad in ("(a:nan)", "(a:inf)"):
        with pytest.raises(ValueError, match="finite"):
            weighted_segments(bad)


def _ids(tok: CLIPTokenizer, words: str, n: int) -> list[int]:
    return tok.tokenize(words)[:n]


def test_chunks_follow_comfyui_grouping() -> None:
    tok = CLIPTokenizer.default()
    apple = tok.token_to_id("apple</w>")
    (chunk,) = comfy_chunks(tok, "a photo of a cat", EOS)
    assert list(chunk.ids) == tok.encode("a photo of a cat") and set(chunk.weights) == {1.0}
    (open_clip,) = comfy_chunks(tok, "a cat", 0)
    assert list(open_clip.ids) == tok.encode("a cat", pad_token=0)
    # [ ] and BREAK are plain text in ComfyUI: no de-emphasis, no new chunk
    (plain,) = comfy_chunks(tok, "[a cat] BREAK a dog", EOS)
    assert list(plain.ids) == tok.encode("[a cat] BREAK a dog") and set(plain.weights) == {1.0}
    # one segment of 100 tokens is one large group: cut after 75 tokens, the rest in chunk 2
    first, second = comfy_chunks(tok, " ".join(["apple"] * 100), EOS)
    assert first.ids == (tok.bos, *[apple] * 75, EOS) and second.ids[:27] == (tok.bos, *[apple] * 25, EOS)
    # a group of fewer than 8 tokens that does not fit moves whole: "(b c d e:1.2)" after 73 tokens
    text = " ".join(["apple"] * 73) + " (big red shiny fruit:1.2)"
    first, second = comfy_chunks(tok, text, EOS)
    assert first.ids[74:] == (EOS, EOS, EOS) and first.weights[74:] == (1.0, 1.0, 1.0)
    assert second.ids[1:6] == (*tok.tokenize("big red shiny fruit"), EOS)
    assert second.weights[:6] == (1.0, 1.2, 1.2, 1.2, 1.2, 1.0)
    # the same words as one large group (8 tokens) are cut at the chunk's end instead
    text = " ".join(["apple"] * 73) + " (big red shiny fruit on a wooden table:1.2)"
    first, second = comfy_chunks(tok, text, EOS)
    words = tok.tokenize("big red shiny fruit on a wooden table")
    assert first.ids[74:] == (*words[:2], EOS) and second.ids[1:8] == (*words[2:], EOS)


class _Named:
    """One embedding `NAME` of n vectors, as `EncoderEmbeddings.named` gives them."""

    def __init__(self, name: str, vectors: torch.Tensor) -> None:
        self.name, self.vectors = name, Vectors(name, vectors)

    def named(self, name: str) -> Vectors | None:
        return self.vectors if name == self.name else None


def test_embedding_words_become_weighted_vectors() -> None:
    tok = CLIPTokenizer.default()
    vectors = torch.randn(3, 16)
    named = _Named("style", vectors)
    (chunk,) = comfy_chunks(tok, f"a ({PREFIX}style, cat:1.3) dog", EOS, named)
    # "a " | "embedding:style, cat" at 1.3 -> the vectors, then the leftover ", cat" | " dog"
    rest = tok.tokenize(", cat")
    assert chunk.ids[1:8] == (*tok.tokenize("a"), *[PLACEHOLDER] * 3, *rest, *tok.tokenize("dog"))
    assert chunk.weights[1:8] == (1.0, 1.3, 1.3, 1.3, 1.3, 1.3, 1.0)
    assert [p for p, _ in chunk.fixes] == [2, 3, 4]
    assert all(torch.equal(v.tensor[0], vectors[i]) for i, (_, v) in enumerate(chunk.fixes))
    # only after a space or newline: "a,embedding:style" is text; an unknown name is an error
    (text,) = comfy_chunks(tok, f"a,{PREFIX}style", EOS, named)
    assert text.fixes == () and list(text.ids) == tok.encode(f"a,{PREFIX}style")
    with pytest.raises(ValueError, match="embedding:other"):
        comfy_chunks(tok, f"a {PREFIX}other", EOS, named)
    # 8 vectors or more are a large group and may be cut across chunks, as ComfyUI does
    long = _Named("style", torch.randn(10, 16))
    first, second = comfy_chunks(tok, " ".join(["apple"] * 70) + f" {PREFIX}style", EOS, long)
    assert len(first.fixes) == 5 and len(second.fixes) == 5 and second.fixes[0][0] == 1


@pytest.fixture(scope="module")
def models() -> dict[str, StableDiffusion]:
    """The tiny SD1 and SDXL models' text side only (no U-Net or VAE is needed to encode prompts)."""
    tok = CLIPTokenizer.default()

    def text_only(name: str) -> StableDiffusion:
        encoders = [randomize(CLIPTextModel(t), 3 + i) for i, t in enumerate(TINY[name].text)]
        return StableDiffusion(TINY[name], None, None, encoders, tok, Path(name))  # type: ignore[arg-type]

    return {n: text_only(n) for n in ("sd1", "sdxl")}


def _comfy_formula(model: StableDiffusion, plain: str, weights: dict[int, float], layer: int) -> tuple:
    """ComfyUI's weighting computed from the plain prompt's and the empty prompt's encodings, each
    encoder on its own: z_empty + w·(z − z_empty) at the weighted positions (ids of `plain`, one chunk
    or ComfyUI's cut at 75 tokens), joined along the channels; the pooled output of the first chunk."""
    contexts, pooled = [], None
    for encoder, spec, cfg in zip(model.text_encoders, model.family.text, model.config.text, strict=True):
        chunks = comfy_chunks(model.tokenizer, plain, cfg.pad_token)
        empty = model.tokenizer.encode("", pad_token=cfg.pad_token)
        out, out_empty = encoder(torch.tensor([c.ids for c in chunks])), encoder(torch.tensor([empty]))
        pick = (lambda o: o.last) if layer == 1 and spec.final_norm else (lambda o: o.layer(layer))
        norm = encoder.text_model.final_layer_norm if spec.final_norm and layer > 1 else (lambda x: x)
        z, z_empty = norm(pick(out)).reshape(-1, cfg.width), norm(pick(out_empty))[0]
        z_empty = z_empty.repeat(len(chunks), 1)
        for position, w in weights.items():
            z[position] = z_empty[position] + w * (z[position] - z_empty[position])
        contexts.append(z[None])
        if spec.pooled:
            pooled = out.pooled[:1]
    return torch.cat(contexts, dim=-1), pooled


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
def test_weighted_prompt_is_comfyui_interpolation_from_empty(
    models: dict[str, StableDiffusion], name: str
) -> None:
    model = models[name]
    layer = model.text_layer()
    long = " ".join(f"word{i}" for i in range(40))  # one large group: cut at 75 tokens
    n = len(model.tokenizer.tokenize(long))
    cases = [
        ("a (red:1.5) apple", "a red apple", {2: 1.5}),
        ("((a)) [red] (apple:0.5)", "a [red] apple", {1: W11, 5: 0.5}),  # [ ] literal, weight 1
        (f"({long}:1.2) tail", f"{long} tail", {p: 1.2 for p in [*range(1, 76), *range(78, 78 + n - 75)]}),
    ]
    with torch.no_grad():
        for prompt, plain, weights in cases:
            cond = encode_text(model, prompt)
            want, pooled = _comfy_formula(model, plain, weights, layer)
            assert cond.context.shape == want.shape
            assert torch.allclose(cond.context, want, atol=1e-5), prompt
            assert (pooled is None) == (cond.pooled is None)
            if pooled is not None:
                assert torch.allclose(cond.pooled, pooled, atol=1e-5)
        # the weight changes the weighted token and nothing else (A1111's mean restore moves all)
        plain, weighted = (encode_text(model, p).context for p in ("a red apple", "a (red:1.5) apple"))
        changed = (plain - weighted).abs().amax(dim=-1)[0]
        assert changed[2] > 1e-3 and changed[[0, 1, *range(3, 77)]].max() == 0
        a1111 = encode_prompt_pair(model, "a (red:1.5) apple", "")[0].context
        assert (a1111 - plain).abs().amax(dim=-1)[0, [0, 1, 3]].min() > 0
