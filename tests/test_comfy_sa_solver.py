"""ComfyUI's `SamplerSASolver` node (comfy_extras/nodes_custom_sampler.py): a SAMPLER for
SamplerCustomAdvanced with SA-Solver's options, its SDE interval placed on the node's model's schedule.
At the defaults it draws what KSampler draws with `sa_solver` (and with use_pece, `sa_solver_pece`); other
options draw what `sample_sa_solver` computes with them. Its BOOLEAN inputs validate as ComfyUI's do."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import pytest
import torch
from tiny import write_tiny

from sdlab.diffusion.samplers import sample_sa_solver
from sdlab.diffusion.schedule import DiscreteSchedule
from sdlab.server import graph, nodes
from sdlab.server import nodes_core as core
from sdlab.server.library import Library, ModelCache
from sdlab.server.paths import Folders

DEFAULTS = {"eta": 1.0, "sde_start_percent": 0.2, "sde_end_percent": 0.8, "s_noise": 1.0}
DEFAULTS |= {"predictor_order": 3, "corrector_order": 4, "use_pece": False, "simple_order_2": False}
STEPS, CFG, SEED = 6, 5.0, 7


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[nodes.Env]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny U-Net: threads only contend
    tmp = tmp_path_factory.mktemp("sa_solver")
    write_tiny("sd1", tmp / "models" / "checkpoints" / "tiny.safetensors")
    library = Library(tmp / "models")
    yield nodes.Env(library, ModelCache(library), Folders(tmp / "models", tmp / "o", tmp / "i", tmp / "s"))
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def parts(env: nodes.Env) -> tuple:
    model, clip, _ = nodes.checkpoint_loader(env, "tiny.safetensors")
    with torch.inference_mode():
        (positive,) = nodes.clip_text_encode(env, "a red cat", clip)
        (negative,) = nodes.clip_text_encode(env, "blurry", clip)
    (empty,) = nodes.empty_latent_image(env, 32, 32, 1)
    return model, positive, negative, empty


def _custom(env: nodes.Env, parts: tuple, sampler) -> torch.Tensor:
    """RandomNoise + CFGGuider + `sampler` + BasicScheduler (normal) -> SamplerCustomAdvanced."""
    model, positive, negative, empty = parts
    with torch.inference_mode():
        (noise,) = core.random_noise(env, SEED)
        (guider,) = core.cfg_guider(env, model, positive, negative, CFG)
        (sigmas,) = core.basic_scheduler(env, model, "normal", STEPS, 1.0)
        out, _ = core.sampler_custom_advanced(env, noise, guider, sampler, sigmas, empty)
    return out.samples


def _ksampler(env: nodes.Env, parts: tuple, name: str) -> torch.Tensor:
    model, positive, negative, empty = parts
    with torch.inference_mode():
        (out,) = nodes.ksampler(env, model, SEED, STEPS, CFG, name, "normal", positive, negative, empty, 1.0)
    return out.samples


def test_defaults_draw_what_ksampler_draws(env: nodes.Env, parts: tuple) -> None:
    (sampler,) = core.sampler_sa_solver(env, parts[0], **DEFAULTS)
    assert torch.equal(_custom(env, parts, sampler), _ksampler(env, parts, "sa_solver"))
    (pece,) = core.sampler_sa_solver(env, parts[0], **DEFAULTS | {"use_pece": True})
    assert torch.equal(_custom(env, parts, pece), _ksampler(env, parts, "sa_solver_pece"))


def test_options_draw_what_the_sampler_computes(env: nodes.Env, parts: tuple) -> None:
    """Each option reaches sample_sa_solver under its own name; the interval is on the model's schedule."""
    options = {"eta": 0.6, "sde_start_percent": 0.05, "sde_end_percent": 0.9, "s_noise": 0.7}
    options |= {"predictor_order": 2, "corrector_order": 1, "use_pece": False, "simple_order_2": True}
    (sampler,) = core.sampler_sa_solver(env, parts[0], **options)
    schedule = DiscreteSchedule.for_model(parts[0].sd.config)
    expected = partial(
        sample_sa_solver,
        eta=0.6,
        sde_start_percent=0.05,
        sde_end_percent=0.9,
        s_noise=0.7,
        predictor_order=2,
        corrector_order=1,
        simple_order_2=True,
        schedule=schedule,
    )
    ours = _custom(env, parts, sampler)
    assert torch.equal(ours, _custom(env, parts, expected))
    assert (ours - _ksampler(env, parts, "sa_solver")).abs().max() > 1e-3  # the options change the image


def test_workflow_runs_and_booleans_validate_as_comfyuis(env: nodes.Env) -> None:
    """A workflow with the node runs; `use_pece` / `simple_order_2` take JSON true/false, and a string
    (ComfyUI's bool() reads "false" as true) or a number is refused naming the input. The node is listed
    with ComfyUI's inputs, defaults and category."""

    def n(class_type: str, **inputs) -> dict:
        return {"class_type": class_type, "inputs": inputs}

    model = ["1", 0]
    prompt = {
        "1": n("CheckpointLoaderSimple", ckpt_name="tiny.safetensors"),
        "2": n("CLIPTextEncode", text="a red cat", clip=["1", 1]),
        "3": n("EmptyLatentImage", width=32, height=32, batch_size=1),
        "4": n("RandomNoise", noise_seed=SEED),
        "5": n("CFGGuider", model=model, positive=["2", 0], negative=["2", 0], cfg=CFG),
        "6": n("SamplerSASolver", model=model, **DEFAULTS | {"use_pece": True}),
        "7": n("BasicScheduler", model=model, scheduler="normal", steps=3, denoise=1.0),
        "8": n(
            "SamplerCustomAdvanced",
            noise=["4", 0],
            guider=["5", 0],
            sampler=["6", 0],
            sigmas=["7", 0],
            latent_image=["3", 0],
        ),  # fmt: skip
        "9": n("VAEDecode", samples=["8", 0], vae=["1", 2]),
        "10": n("PreviewImage", images=["9", 0]),
    }
    validation = graph.validate(prompt, env)
    assert validation.ok, validation.node_errors
    outputs = graph.execute(validation, env, lambda _: None, lambda *_: None)
    assert outputs["10"]["images"][0]["type"] == "temp"
    for bad in ("false", 0):
        prompt["6"]["inputs"]["simple_order_2"] = bad
        errors = graph.validate(prompt, env).node_errors["6"]["errors"]
        assert [(e["type"], e["extra_info"]["input_name"]) for e in errors] == [
            ("invalid_input_type", "simple_order_2")
        ]
    declared = nodes.NODE_TYPES["SamplerSASolver"]
    assert declared.category == "sampling/custom_sampling/samplers" and declared.outputs == ("SAMPLER",)
    assert list(declared.inputs) == ["model", *DEFAULTS]
    assert {k: v[1]["default"] for k, v in declared.inputs.items() if k != "model"} == DEFAULTS
    assert declared.inputs["eta"][1] == {
        "default": 1.0,
        "min": 0.0,
        "max": 10.0,
        "step": 0.01,
        "round": False,
    }
