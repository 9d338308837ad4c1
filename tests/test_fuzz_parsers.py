"""The parsers of client and file input, fuzzed with hypothesis: prompt syntax (A1111 emphasis, prompt
editing, AND, <lora:> tags), ComfyUI workflow graphs, infotext and LoRA key names and shapes. Whatever
they get, they answer or raise the project's own error (PromptError, LoRAError); where a parser was
rewritten for speed, its old form is the oracle on short inputs."""

from __future__ import annotations

import math
import re
from typing import Any

import hypothesis
import hypothesis.strategies as st
import pytest
import torch
from tiny import write_tiny

from sdlab.checkpoints.load import StableDiffusion, load_model
from sdlab.finite import NonFiniteError
from sdlab.infotext import _PARAM, _params, format_infotext, parse_infotext
from sdlab.lora import LoRAError, merge_loras, module_layers, parse_lora
from sdlab.networks import lora_tags, no_tags
from sdlab.server import graph
from sdlab.server.library import Library, ModelCache
from sdlab.server.nodes import NODE_TYPES, Env
from sdlab.server.paths import Folders
from sdlab.text.comfy_prompt import weighted_segments
from sdlab.text.prompt import parse_attention
from sdlab.text.schedule import PromptError, prompt_schedule, split_and

FUZZ = hypothesis.settings(max_examples=100, deadline=None, database=None)
FEWER = hypothesis.settings(FUZZ, max_examples=50)  # examples that build graphs or merge LoRAs
TOKENS = st.sampled_from([*"ab ()[]:|\\,.019-+eE<>&=\t", " AND ", "BREAK", "lora"])
SYNTAX = st.lists(TOKENS, max_size=40).map("".join)
PROMPTS = st.one_of(st.text(max_size=60), SYNTAX)


# ---------------------------------------------------------------------------------------------
# prompt syntax


@FUZZ
@hypothesis.given(prompt=PROMPTS, steps=st.integers(1, 60))
def test_prompt_schedules_are_well_formed_or_a_prompt_error(prompt: str, steps: int) -> None:
    try:
        schedule = prompt_schedule(prompt, steps)
    except PromptError:
        return
    lasts = [last for last, _ in schedule]
    assert lasts == sorted(set(lasts)) and lasts[-1] == steps and lasts[0] >= 1


@FUZZ
@hypothesis.given(prompt=PROMPTS)
def test_emphasis_and_and_never_fail(prompt: str) -> None:
    runs = parse_attention(prompt)
    assert runs and all(math.isfinite(w) for _, w in runs)
    assert all(math.isfinite(w) for _, w in split_and(prompt))


@FUZZ
@hypothesis.given(prompt=PROMPTS)
def test_comfy_prompts_weigh_or_raise_a_prompt_error(prompt: str) -> None:
    try:
        segments = weighted_segments(prompt)
    except PromptError:
        return
    assert all(math.isfinite(w) for _, w in segments)
    if not set(prompt) & set("()\\"):  # no syntax: the text itself at weight 1
        assert segments == ([(prompt, 1.0)] if prompt else [])


def test_comfy_prompt_brackets_are_bounded() -> None:
    assert weighted_segments("(" * 100 + "a" + ")" * 100) == [("a", pytest.approx(1.1**100))]
    with pytest.raises(PromptError, match="nests brackets 5000 deep; the limit is 100"):
        weighted_segments("(" * 5000 + "a" + ")" * 5000)  # was a RecursionError after ~6 s


_OLD_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")  # A1111's re_weight


@FUZZ
@hypothesis.given(prompt=st.text(alphabet=st.sampled_from(list("ab :.1-+\t\n٣")), max_size=30))
def test_split_and_reads_weights_as_a1111s_regex(prompt: str) -> None:
    expected = []
    for sub in re.split(r"\bAND\b", prompt):
        m = _OLD_WEIGHT.search(sub)
        expected.append((m.group(1), float(m.group(2)) if m.group(2) is not None else 1.0))
    assert split_and(prompt) == expected


def test_long_whitespace_and_deep_brackets_are_fast_and_refused_by_name() -> None:
    assert split_and("a" + " " * 20_000 + ":1.5") == [("a", 1.5)]  # A1111's regex: ~9 s here
    for deep in ("(" * 2000, "[a:" * 1000 + "b", "[" * 150 + "x" + "]" * 150):
        with pytest.raises(PromptError, match="nests brackets more than 100 deep"):
            prompt_schedule(deep, 20)
    assert prompt_schedule("[" * 90 + "x" + "]" * 90, 20) == [(20, "[" * 90 + "x" + "]" * 90)]
    assert prompt_schedule("[a:b:1e999][c:d:-1e999]", 10) == [(10, "ad")]  # infinities clamp to the run


@FUZZ
@hypothesis.given(prompt=st.one_of(PROMPTS, st.text(alphabet=st.sampled_from(list("<lora:x1.5>=: nanif")))))
def test_lora_tags_take_tags_or_name_the_bad_one(prompt: str) -> None:
    try:
        text, tags = lora_tags(prompt)
    except PromptError as e:
        assert str(e).startswith("<")  # the message starts with the tag it refuses
        return
    assert "<lora:" not in text.replace("<lora:>", "") or "<lora:" not in prompt
    assert all(isinstance(name, str) and math.isfinite(weight) for name, weight in tags)
    try:
        no_tags(prompt, "negative prompt")
    except PromptError as e:
        assert "negative prompt" in str(e)


# ---------------------------------------------------------------------------------------------
# ComfyUI workflows

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
LITERALS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 2**70),
    st.floats(),
    st.text(max_size=4),
    st.lists(st.integers(), max_size=3),
)
IDS = ["1", "²", "2", "3", "4", "x", "5"]  # "²".isdigit(), but int("²") fails
OUTPUTS = [name for name, node in NODE_TYPES.items() if node.output_node]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    root = tmp_path_factory.mktemp("fuzz-env")
    library = Library(root / "models")
    return Env(library, ModelCache(library), Folders(root / "models", root / "out", root / "in", root / "st"))


@st.composite
def graphs(draw: st.DrawFn) -> dict[str, Any]:
    """Workflows of known node types whose inputs are literals of any JSON type or links to any id and
    slot (present or not, of the right type or not)."""
    nodes = {}
    for node_id in draw(st.lists(st.sampled_from(IDS), min_size=1, max_size=6, unique=True)):
        class_type = draw(st.sampled_from([*NODE_TYPES, "NoSuchNode"]) | st.sampled_from(OUTPUTS))
        names = list(NODE_TYPES[class_type].inputs) if class_type in NODE_TYPES else ["x"]
        link = st.tuples(st.sampled_from(IDS), st.one_of(st.integers(-1, 3), st.booleans())).map(list)
        inputs = {name: draw(st.one_of(link, LITERALS)) for name in names if draw(st.integers(0, 9))}
        nodes[node_id] = {"class_type": class_type, "inputs": inputs}
    return nodes


@FEWER
@hypothesis.given(prompt=st.one_of(JSON, st.dictionaries(st.sampled_from(IDS), JSON, max_size=4)))
def test_any_json_is_a_validation_result(env: Env, prompt: Any) -> None:
    checked = graph.validate(prompt, env)
    assert checked.ok or checked.error["type"] in (
        "invalid_prompt",
        "prompt_no_outputs",
        "prompt_outputs_failed_validation",
    )


@FEWER
@hypothesis.given(prompt=graphs())
def test_random_graphs_validate_and_order_without_raising(env: Env, prompt: dict[str, Any]) -> None:
    checked = graph.validate(prompt, env)
    if not checked.ok:
        return
    order = graph.execution_order(checked.prompt, checked.outputs)
    position = {node_id: i for i, node_id in enumerate(order)}
    assert set(checked.outputs) <= set(order) and len(order) == len(position)
    for node_id in order:  # every node runs after the nodes it links to
        for value in checked.prompt[node_id]["inputs"].values():
            if isinstance(value, list) and len(value) == 2:
                assert position[str(value[0])] < position[node_id]


# ---------------------------------------------------------------------------------------------
# infotext


@FUZZ
@hypothesis.given(text=st.one_of(st.text(), st.text(alphabet=st.sampled_from(list('ab :,"\\\t-/\n')))))
def test_any_infotext_parses(text: str) -> None:
    params = parse_infotext(text)
    assert {"Prompt", "Negative prompt"} <= set(params)


@FUZZ
@hypothesis.given(line=st.text(alphabet=st.sampled_from(list('ab :,"\\\t-/é1')), max_size=24))
def test_infotext_fields_match_a1111s_finditer(line: str) -> None:
    expected = [(m.end(), *m.groups()) for m in _PARAM.finditer(line)]
    assert [(m.end(), *m.groups()) for m in _params(line)] == expected


def test_infotext_with_a_long_unkeyed_line_is_fast() -> None:
    params = parse_infotext("a cat\n" + "word " * 20_000 + ", Steps: 20")  # finditer: ~15 s
    assert params["Steps"] == "20" and params["Prompt"] == "a cat"


TEXT = st.text(alphabet=st.sampled_from(list('ab ,:"()[]é1')), min_size=1, max_size=20)


@FUZZ
@hypothesis.given(prompt=TEXT, negative=st.one_of(st.just(""), TEXT), note=TEXT, seed=st.integers(0, 2**32))
def test_infotext_round_trips(prompt: str, negative: str, note: str, seed: int) -> None:
    hypothesis.assume(prompt == prompt.strip() and negative == negative.strip() and note == note.strip())
    text = format_infotext(
        prompt=prompt,
        negative_prompt=negative,
        steps=20,
        sampler="euler",
        scheduler="karras",
        cfg_scale=7.5,
        seed=seed,
        width=512,
        height=768,
        extra={"Note": note},
    )
    params = parse_infotext(text)
    assert (params["Prompt"], params["Negative prompt"], params["Note"]) == (prompt, negative, note)
    assert (params["Seed"], params["CFG scale"], params["Size"]) == (str(seed), "7.5", "512x768")


# ---------------------------------------------------------------------------------------------
# LoRA key names and shapes

FORMATS = [
    ("lora_down.weight", "lora_up.weight"),
    ("lora_down.weight", "lora_up.weight", "alpha"),
    ("lora_down.weight", "lora_up.weight", "lora_mid.weight"),
    ("lora_down.weight", "lora_up.weight", "dora_scale"),
    ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"),
    ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1"),
    ("lokr_w1", "lokr_w2"),
    ("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "alpha"),
]
SHAPES = st.lists(st.integers(0, 4), max_size=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[StableDiffusion, dict[str, torch.nn.Module]]:
    model = load_model(write_tiny("sd1", tmp_path_factory.mktemp("fuzz-lora") / "tiny.safetensors"))
    return model, module_layers(model.unet, model.text_encoders, model.family)


@st.composite
def lora_files(draw: st.DrawFn, layers: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """LoRA state dicts: modules of real layer names (or junk names) in any format, mostly complete,
    with shapes that fit the layer (a rank-1 or rank-2 LoRA) or random ones; alphas may be anything."""
    names = sorted(layers)
    sd = {}
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.one_of(st.sampled_from(names), st.text(max_size=10)))
        parts = draw(st.sampled_from(FORMATS))
        weight = layers[name].weight if name in layers else None
        rank = draw(st.integers(1, 2))
        for part in parts:
            if not draw(st.integers(0, 9)):
                continue  # an incomplete module now and then
            if weight is not None and part in ("lora_down.weight", "lora_up.weight") and draw(st.booleans()):
                out, inp, *kernel = weight.shape
                shape = (rank, inp, *kernel) if "down" in part else (out, rank, *[1] * len(kernel))
            else:
                shape = tuple(draw(SHAPES))
            sd[f"{name}.{part}"] = torch.rand(shape) - 0.5
    return sd


@FEWER
@hypothesis.given(data=st.data())
def test_lora_files_parse_or_raise_lora_error(tiny: tuple, data: st.DataObject) -> None:
    sd = data.draw(lora_files(tiny[1]))
    try:
        parse_lora(sd, "fuzz.safetensors")
    except LoRAError as e:
        assert str(e).startswith("fuzz.safetensors: ")


@FEWER
@hypothesis.given(data=st.data())
def test_lora_merges_are_all_or_nothing(tiny: tuple, data: st.DataObject) -> None:
    model, layers = tiny
    sd = data.draw(lora_files(layers))
    before = {name: layer.weight for name, layer in layers.items()}
    try:
        with merge_loras(model.unet, model.text_encoders, model.family, [(sd, 0.5)]) as merged:
            assert all(layers[name].weight is not before[name] for name in merged.applied)
    except (LoRAError, NonFiniteError):
        pass
    assert all(layer.weight is before[name] for name, layer in layers.items())  # restored, exactly


def test_well_formed_updates_merge(tiny: tuple) -> None:
    """What the strategies aim at: a rank-1 update of a real layer merges as W + s·up@down."""
    model, layers = tiny
    name = next(n for n in sorted(layers) if n.startswith("lora_unet") and layers[n].weight.ndim == 2)
    out, inp = layers[name].weight.shape
    sd = {f"{name}.lora_down.weight": torch.ones(1, inp), f"{name}.lora_up.weight": torch.full((out, 1), 2.0)}
    with merge_loras(model.unet, model.text_encoders, model.family, [(sd, 0.5)]) as merged:
        assert merged.applied == [name]
        assert torch.equal(layers[name].weight, merged.originals[layers[name]] + 1.0)
