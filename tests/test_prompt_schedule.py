"""A1111 prompt editing, alternation and AND: the parser against A1111's documented examples
(`modules/prompt_parser.py` doctests and wiki)."""

from __future__ import annotations

import pytest

from sdlab.text.schedule import prompt_schedule, split_and, text_at_call

CASES = [  # prompt, steps, A1111's schedule
    ("test", 10, [(10, "test")]),
    ("a [b:3]", 10, [(3, "a "), (10, "a b")]),
    ("a [b: 3]", 10, [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", 10, [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", 10, [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", 10, [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", 10, [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", 10, [(10, "a [unbalanced")]),
    ("a [b:.5] c", 10, [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", 10, [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", 4, [(1, "a"), (2, "(b:1.1)"), (3, "a"), (4, "(b:1.1)")]),
    ("[fe|]male", 4, [(1, "female"), (2, "male"), (3, "female"), (4, "male")]),
    ("[fe|||]male", 5, [(1, "female"), (2, "male"), (3, "male"), (4, "male"), (5, "female")]),
    # the wiki's examples: a fraction of the steps or a step number; [to:when] and [from::when]
    ("a [fantasy:cyberpunk:16] landscape", 100,
     [(16, "a fantasy landscape"), (100, "a cyberpunk landscape")]),
    ("a [fantasy:cyberpunk:0.25] landscape", 20, [(5, "a fantasy landscape"), (20, "a cyberpunk landscape")]),
    ("a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6][ in background:0.25]", 4,
     [(1, "a mountain and an oak in foreground"), (2, "a lake and an oak in foreground in background"),
      (3, "a lake and an oak in background"), (4, "a lake and a christmas tree in background")]),
    ("[a:b:1.0]", 10, [(10, "a")]),  # "1.0" is the whole run: never switches
    ("[a:b:1]", 10, [(1, "a"), (10, "b")]),  # "1" is step 1
    ("a (red:1.2) [blue] \\[x:y:2\\] apple", 10, [(10, "a (red:1.2) [blue] \\[x:y:2\\] apple")]),
]  # fmt: skip


@pytest.mark.parametrize(("prompt", "steps", "want"), CASES, ids=[c[0] for c in CASES])
def test_schedules_match_a1111(prompt: str, steps: int, want: list[tuple[int, str]]) -> None:
    assert prompt_schedule(prompt, steps) == want


def test_model_calls_pick_entries_as_a1111_s_denoiser_counts_them() -> None:
    schedule = prompt_schedule("[a|b]", 20)
    assert [text_at_call(schedule, call) for call in range(6)] == ["a", "a", "b", "a", "b", "a"]
    edited = prompt_schedule("[a:b:3]", 10)
    assert [text_at_call(edited, call) for call in range(6)] == ["a", "a", "a", "a", "b", "b"]
    assert text_at_call(edited, 50) == "b"  # past the last step (second-order samplers call more)


def test_and_splits_weighted_prompts() -> None:
    assert split_and("a cat AND a dog :1.2") == [("a cat", 1.0), (" a dog", 1.2)]
    assert split_and("a cat AND a dog:-0.5 AND x") == [("a cat", 1.0), (" a dog", -0.5), (" x", 1.0)]
    assert split_and("ANDROID and SAND") == [("ANDROID and SAND", 1.0)]
    assert split_and("a (cat:1.3)") == [("a (cat:1.3)", 1.0)]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    from tiny import write_tiny

    from sdlab.checkpoints.load import load_model

    return load_model(write_tiny("sd1", tmp_path_factory.mktemp("m") / "sd1.safetensors"))


def _contexts_per_call(model, prompt: str, negative: str = "blurry", steps: int = 8) -> list:
    """The context batches the U-Net received, one per model call, in a guided Euler run."""
    from sdlab.pipeline import GenerationRequest, generate

    seen = []
    forward = model.unet.forward
    model.unet.forward = lambda x, t, context, *rest: (
        seen.append(context.clone()) or forward(x, t, context, *rest)
    )
    try:
        generate(model, GenerationRequest(prompt, negative, 32, 32, steps=steps, sampler="euler", seed=1))
    finally:
        del model.unet.forward
    return seen


def _encoded(model, text: str):
    import torch

    from sdlab.conditioning import encode_text

    with torch.inference_mode():
        return encode_text(model, text).context


def test_edited_prompt_switches_at_a1111_s_step(model) -> None:
    import torch

    seen = _contexts_per_call(model, "[a red apple:a blue car:3]")
    apple, car, blurry = (_encoded(model, t) for t in ("a red apple", "a blue car", "blurry"))
    assert len(seen) == 8
    for call, ctx in enumerate(seen):  # calls 0..3 (call <= 3) draw the apple, the rest the car
        assert torch.equal(ctx[0], (apple if call <= 3 else car)[0]) and torch.equal(ctx[1], blurry[0])
    fraction = _contexts_per_call(model, "[a red apple:a blue car:0.5]")  # 0.5 of 8 steps: step 4
    assert [torch.equal(c[0], apple[0]) for c in fraction] == [True] * 5 + [False] * 3
    alternating = _contexts_per_call(model, "[a red apple|a blue car]", steps=5)
    assert [torch.equal(c[0], apple[0]) for c in alternating] == [True, True, False, True, False]
    negative = _contexts_per_call(model, "a red apple", negative="[blurry::2]")
    empty = _encoded(model, "")
    assert [torch.equal(c[1], (blurry if i <= 2 else empty)[0]) for i, c in enumerate(negative)] == [True] * 8


def test_and_guides_with_each_part_at_its_weight(model) -> None:
    import torch

    from sdlab.diffusion.denoiser import guide

    seen = _contexts_per_call(model, "a red apple AND a blue car :-0.5", steps=2)
    apple, car, blurry = (_encoded(model, t) for t in ("a red apple", "a blue car", "blurry"))
    assert all(len(c) == 3 for c in seen)  # both parts and the negative in one batched call
    assert all(
        torch.equal(c[0], apple[0]) and torch.equal(c[1], car[0]) and torch.equal(c[2], blurry[0])
        for c in seen
    )
    # the combination is A1111's: uncond + Σ w·cfg·(cond − uncond)
    d = lambda x, sigma, context: x * context  # noqa: E731
    x, sigma = torch.ones(1, 1), torch.ones(1)
    parts = [({"context": torch.full((1, 1), 2.0)}, 1.0), ({"context": torch.full((1, 1), 5.0)}, -0.5)]
    out = guide(d, x, sigma, parts, {"context": torch.full((1, 1), 1.0)}, 7.0, {})
    assert float(out) == 1 + 7 * (2 - 1) - 0.5 * 7 * (5 - 1)
