"""The ComfyUI routes and nodes docs/comfyui-coverage.md found without a test, checked against ComfyUI's
semantics: the model-folder routes agree with /models, LoraLoaderModelOnly is LoraLoader at CLIP strength 0,
DisableNoise samples the latents as they are, ConditioningSetAreaStrength weights an entry in ComfyUI's
Σ D·strength / Σ strength, CheckpointLoader loads what CheckpointLoaderSimple loads; and the KSampler node
runs sa_solver with the model's schedule. Also that every route and node keeps a test (the script's --check).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from test_comfy_frontend import client  # noqa: F401  (the fixture: a server with the shipped model)
from test_comfy_nodes import _denoise, _init, _one_step, env, parts  # noqa: F401  (env, parts: fixtures)
from test_server_api import tiny_lora

from sdlab import pipeline
from sdlab.checkpoints.io import write_safetensors
from sdlab.diffusion.samplers import get_sampler
from sdlab.diffusion.schedule import DiscreteSchedule
from sdlab.server import nodes
from sdlab.server import nodes_core as core

ROOT = Path(__file__).resolve().parent.parent


def test_model_folder_routes_follow_models(client: TestClient) -> None:  # noqa: F811
    """ComfyUI answers /experiment/models and /internal/folder_paths for the folders /models lists (sdlab
    names each folder by its kind rather than its path on disk); an unknown global subgraph is a 404."""
    folders = client.get("/api/models").json()
    assert {"checkpoints", "loras", "vae", "embeddings"} <= set(folders)
    assert client.get("/api/experiment/models").json() == [{"name": f, "folders": [f]} for f in folders]
    assert client.get("/internal/folder_paths").json() == {f: [f] for f in folders}
    assert client.get("/api/global_subgraphs").json() == {}
    assert client.get("/api/global_subgraphs/any-id").status_code == 404


@pytest.fixture(scope="module")
def lora(env: nodes.Env, parts: tuple) -> str:  # noqa: F811
    model = parts[0]
    path = env.folders.models / "loras" / "tiny-lora.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(tiny_lora(model.sd), path)
    return path.name


def _sample(env: nodes.Env, model: nodes.Model, pos, neg, sampler: str = "euler") -> torch.Tensor:  # noqa: F811
    (empty,) = nodes.empty_latent_image(env, 32, 32, 1)
    with torch.inference_mode():
        (out,) = nodes.ksampler(env, model, 3, 3, 5.0, sampler, "karras", pos, neg, empty, 1.0)
    return out.samples


def test_lora_loader_model_only_is_lora_loader_without_clip(env: nodes.Env, parts: tuple, lora: str) -> None:  # noqa: F811
    """ComfyUI's LoraLoaderModelOnly is `load_lora(model, None, name, strength_model, 0)`."""
    model, clip, _, a, _, n = parts
    (only,) = core.lora_loader_model_only(env, model, lora, 0.8)
    both, _ = nodes.lora_loader(env, model, clip, lora, 0.8, 0.0)
    got = _sample(env, only, a, n)
    assert torch.equal(got, _sample(env, both, a, n))
    assert (got - _sample(env, model, a, n)).abs().max() > 1e-3  # the LoRA did change the U-Net


def test_disable_noise_samples_the_latents_as_they_are(env: nodes.Env, parts: tuple) -> None:  # noqa: F811
    """DisableNoise (ComfyUI's Noise_EmptyNoise: zeros) + SamplerCustomAdvanced over BasicScheduler's last
    2 of 4 σ equals KSamplerAdvanced from step 2 of 4 without added noise."""
    model, _, _, a, _, n = parts
    latent = _init(3)
    with torch.inference_mode():
        (noise,) = core.disable_noise(env)
        (guider,) = core.cfg_guider(env, model, a, n, 5.0)
        (sigmas,) = core.basic_scheduler(env, model, "normal", 2, 0.5)
        out, _ = core.sampler_custom_advanced(env, noise, guider, "euler", sigmas, latent)
        (expected,) = nodes.ksampler_advanced(
            env, model, "disable", 0, 4, 5.0, "euler", "normal", a, n, latent, 2, 10000, "disable"
        )
    assert torch.equal(out.samples, expected.samples)
    assert (out.samples - latent.samples).abs().max() > 1e-2


def test_conditioning_set_area_strength_weights_the_entry(env: nodes.Env, parts: tuple) -> None:  # noqa: F811
    """Two whole-image entries at strengths 3 and 1: ComfyUI's cond weighting gives (3·D_a + D_b) / 4."""
    model, _, _, a, b, n = parts
    latent = _init(4)
    (strong,) = core.conditioning_set_area_strength(env, a, 3.0)
    (both,) = core.conditioning_combine(env, strong, b)
    got = _one_step(env, model, both, n, latent, 1.0)  # cfg 1: the negative is not run
    x = latent.samples
    expected = (3 * _denoise(model, x, a) + _denoise(model, x, b)) / 4
    assert (got - expected).abs().max() <= 1e-5
    assert (got - (_denoise(model, x, a) + _denoise(model, x, b)) / 2).abs().max() > 1e-4


def test_checkpoint_loader_with_config_loads_the_checkpoint(env: nodes.Env, parts: tuple) -> None:  # noqa: F811
    model, clip, vae, *_ = parts
    loaded = core.checkpoint_loader_with_config(env, "v1-inference.yaml", "tiny.safetensors")
    assert loaded == (model, clip, vae)  # the cached model: the same objects


def test_ksampler_node_runs_sa_solver_on_the_models_schedule(
    env: nodes.Env,  # noqa: F811
    parts: tuple,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sampling seam hands the model's schedule to the sampler lookup, which binds it for sa_solver (the
    binding itself is checked against ComfyUI's code in test_samplers)."""
    model, _, _, a, _, n = parts
    seen = []

    def spy(name: str, schedule: DiscreteSchedule | None = None):
        seen.append((name, schedule))
        return get_sampler(name, schedule)

    monkeypatch.setattr(pipeline, "get_sampler", spy)
    plain = _sample(env, model, a, n, "sa_solver")
    [(name, schedule)] = seen
    assert name == "sa_solver" and schedule.sigmas.equal(DiscreteSchedule.for_model(model.sd.config).sigmas)
    assert not torch.equal(plain, _sample(env, model, a, n, "sa_solver_pece"))


def test_every_route_and_node_has_a_test() -> None:
    """scripts/comfyui_coverage.py --check, in this process (its imports are loaded already)."""
    spec = importlib.util.spec_from_file_location(
        "comfyui_coverage", ROOT / "scripts" / "comfyui_coverage.py"
    )
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # dataclasses look their module up
    spec.loader.exec_module(script)
    assert script.bare(*script.coverage()) == []
