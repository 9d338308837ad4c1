"""A1111 prompt syntax, chunking and weighting."""

from __future__ import annotations

import pytest
import torch
from reference import randomize

from sdlab.config import TextConfig
from sdlab.models.clip import CLIPTextModel
from sdlab.text.prompt import CHUNK, chunk_prompt, encode_chunks, pad_chunks, parse_attention
from sdlab.text.tokenizer import EOS, CLIPTokenizer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("a (unbalanced", [("a ", 1.0), ("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (house:1.3) [on] a (hill:0.5), sun, (((sky)))",
            [
                ("a ", 1.0),
                ("house", 1.3),
                (" ", 1.0),
                ("on", 1 / 1.1),
                (" a ", 1.0),
                ("hill", 0.5),
                (", sun, ", 1.0),
                ("sky", 1.1**3),
            ],
        ),
        ("[[[a]]] BREAK b", [("a", 1 / 1.1**3), ("", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("", [("", 1.0)]),
    ],
)
def test_parse_attention(text: str, expected: list[tuple[str, float]]) -> None:
    got = parse_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


def test_short_prompt_is_one_plain_chunk() -> None:
    tok = CLIPTokenizer.default()
    (chunk,) = chunk_prompt(tok, "a photo of a cat", EOS)
    assert list(chunk.ids) == tok.encode("a photo of a cat")
    assert set(chunk.weights) == {1.0}


def test_openclip_padding_after_first_eos() -> None:
    tok = CLIPTokenizer.default()
    (chunk,) = chunk_prompt(tok, "a cat", 0)
    assert list(chunk.ids) == tok.encode("a cat", pad_token=0)


def test_long_prompt_and_break_make_chunks() -> None:
    tok = CLIPTokenizer.default()
    long = chunk_prompt(tok, " ".join(["apple"] * 100), EOS)
    assert len(long) == 2 and all(len(c.ids) == CHUNK + 2 for c in long)
    assert long[0].ids[1:76] == (tok.token_to_id("apple</w>"),) * 75
    broken = chunk_prompt(tok, "a cat BREAK a dog", EOS)
    assert len(broken) == 2 and broken[1].ids[:4] == tuple(tok.encode("a dog")[:4])
    # a full chunk is cut after its last comma when that is close to the end
    commas = chunk_prompt(tok, "word " * 70 + ", " + "other " * 10, EOS)
    assert commas[0].ids[71] == tok.token_to_id(",</w>") and commas[1].ids[1] == tok.token_to_id("other</w>")
    empty = chunk_prompt(tok, "", EOS)[0]
    assert len(pad_chunks(broken, 3, empty)) == 3


def test_weights_scale_tokens_and_restore_mean() -> None:
    cfg = TextConfig(width=64, layers=2, heads=4, intermediate=128)
    enc = randomize(CLIPTextModel(cfg), seed=3)
    tok = CLIPTokenizer.default()
    with torch.no_grad():
        plain, _ = encode_chunks(enc, chunk_prompt(tok, "a red apple", EOS))
        ref = enc(torch.tensor([tok.encode("a red apple")])).last
        assert torch.equal(plain, ref)  # unweighted prompts are exactly the plain embedding
        weighted, _ = encode_chunks(enc, chunk_prompt(tok, "a (red:1.5) apple", EOS))
        assert torch.allclose(weighted.mean(), plain.mean(), atol=1e-6)
        ratio = (weighted[0, 2] / plain[0, 2]) / (weighted[0, 1] / plain[0, 1])
        assert torch.allclose(ratio, torch.full_like(ratio, 1.5), rtol=1e-4)
        skipped, _ = encode_chunks(enc, chunk_prompt(tok, "a red apple", EOS), layer=2)
        out = enc(torch.tensor([tok.encode("a red apple")]))
        assert torch.equal(skipped, enc.text_model.final_layer_norm(out.hidden_states[-2]))
