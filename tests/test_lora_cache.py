"""The merged-LoRA cache (`sdlab.lora.use_loras`): a loaded model keeps the last LoRA set merged, the same
set is not merged again, another set (or none) first gets the base weights back bit-exactly, and only the
touched layers' original tensors are kept. Used by `generate` (A1111 API, CLI) and ComfyUI's nodes on
the server's shared `ModelCache` model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tiny import write_tiny

from sdlab import lora
from sdlab.checkpoints.load import StableDiffusion
from sdlab.pipeline import GenerationRequest, generate
from sdlab.server import nodes
from sdlab.server.library import Library, ModelCache
from sdlab.server.paths import Folders


def _random_lora(model: StableDiffusion, path: Path, seed: int, only: str = "") -> Path:
    """A rank-2 kohya LoRA on the default targets whose name contains `only`."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, layer in lora.training_targets(model.unet, model.text_encoders, model.family).items():
        if only not in name:
            continue
        w = layer.weight
        sd[f"{name}.lora_down.weight"] = torch.randn(2, *w.shape[1:], generator=g) * 0.3
        sd[f"{name}.lora_up.weight"] = torch.randn(w.shape[0], 2, *[1] * (w.ndim - 2), generator=g) * 0.3
    return lora.save_lora(sd, path)


@pytest.fixture
def env(tmp_path: Path) -> nodes.Env:
    root = tmp_path / "models"
    write_tiny("sd1", root / "Stable-diffusion" / "tiny.safetensors")
    library = Library(root)
    folders = Folders(root, tmp_path / "o", tmp_path / "i", tmp_path / "s")
    return nodes.Env(library, ModelCache(library), folders)


@pytest.fixture
def merges(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of layers each `merge_loras` call merged, in order."""
    calls: list[int] = []
    real = lora.merge_loras

    def counting(*args, **kwargs):
        merged = real(*args, **kwargs)
        calls.append(len(merged.applied))
        return merged

    monkeypatch.setattr(lora, "merge_loras", counting)
    return calls


def _params(model: StableDiffusion) -> dict[str, torch.nn.Parameter]:
    nets = {"unet": model.unet, **{f"te{i}": t for i, t in enumerate(model.text_encoders)}}
    return {f"{k}.{n}": p for k, net in nets.items() for n, p in net.named_parameters()}


def test_same_set_is_not_merged_again_and_base_comes_back_bit_exactly(env, merges, tmp_path: Path) -> None:
    model = env.models.model("tiny.safetensors")
    a = _random_lora(model, tmp_path / "a.safetensors", 1)
    b = _random_lora(model, tmp_path / "b.safetensors", 2, only="attn")
    base = _params(model)
    base_values = {k: p.detach().clone() for k, p in base.items()}
    lora.use_loras(model, [(a, 0.7)])
    assert len(merges) == 2 and merges[0] > 0 and merges[1] > 0  # the U-Net, then the text encoder
    merged = _params(model)
    touched = [k for k in base if merged[k] is not base[k]]
    # memory: a new tensor for each touched layer only, and one original kept for it: no model copy
    kept = [lora._KEPT[net].merged.originals for net in (model.unet, model.text_encoders[0])]
    originals = {id(p) for o in kept for p in o.values()}
    assert originals == {id(base[k]) for k in touched}
    assert sum(merged[k].numel() for k in touched) < sum(p.numel() for p in base.values())
    lora.use_loras(model, [(a, 0.7)])
    lora.use_loras(model, [(str(a), 0.7)])  # the same file by another spelling
    assert len(merges) == 2  # nothing merged again
    assert all(_params(model)[k] is merged[k] for k in base)
    lora.use_loras(model, [(a, 0.5)])  # another weight: base first, then the new set
    lora.use_loras(model, [(b, 1.0), (a, 0.7)])
    assert len(merges) == 6
    lora.use_loras(model, [(b, 1.0), (a, 0.7)], ("unet",))
    assert len(merges) == 6
    lora.use_loras(model, ())
    after = _params(model)
    assert all(after[k] is base[k] and torch.equal(after[k], base_values[k]) for k in base)
    # a file rewritten in place (new modification time) counts as another LoRA
    lora.use_loras(model, [(a, 0.7)])
    os.utime(a, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns + 1_000_000))
    lora.use_loras(model, [(a, 0.7)])
    assert len(merges) == 10
    lora.use_loras(model, ())


def test_explicit_merge_and_cache_do_not_corrupt_each_other(env, tmp_path: Path) -> None:
    model = env.models.model("tiny.safetensors")
    a = _random_lora(model, tmp_path / "a.safetensors", 1)
    base = {k: p.detach().clone() for k, p in _params(model).items()}
    lora.use_loras(model, [(a, 1.0)])
    with lora.apply_lora(model, a, 0.3):  # on the base weights, not on the kept merge
        explicit = {k: p.detach().clone() for k, p in _params(model).items()}
        lora.use_loras(model, [(a, 1.0)])  # merged again on top while the explicit merge is in place
    lora.use_loras(model, [(a, 0.3)])
    assert all(torch.equal(p, explicit[k]) for k, p in _params(model).items())
    lora.use_loras(model, ())
    assert all(torch.equal(p, base[k]) for k, p in _params(model).items())


def _req(prompt: str = "a cat", **kw: object) -> GenerationRequest:
    return GenerationRequest(prompt, "blurry", 32, 32, steps=1, sampler="euler", seed=3, **kw)  # type: ignore[arg-type]


def test_requests_on_the_shared_model(env, merges, tmp_path: Path) -> None:
    """A1111/CLI requests through `generate` and ComfyUI workflows through the nodes, on the server's
    one cached model: a request without LoRA after one with it gets the base weights bit-exactly."""
    model = env.models.model("tiny.safetensors")
    folder = env.library.root / "Lora"
    path = _random_lora(model, folder / "style.safetensors", 5)
    base = {k: p.detach().clone() for k, p in _params(model).items()}
    plain = generate(model, _req())
    first = generate(model, _req(loras=((str(path), 0.7),)))
    assert env.models.model("tiny.safetensors") is model
    again = generate(model, _req(prompt="a cat <lora:style:0.7>", lora_dirs=(str(folder),)))
    assert len(merges) == 2 and torch.equal(first.latents, again.latents)
    without = generate(model, _req())
    assert all(torch.equal(p, base[k]) for k, p in _params(model).items())
    assert torch.equal(without.latents, plain.latents) and not torch.equal(first.latents, plain.latents)

    def workflow(strength: float | None) -> torch.Tensor:
        m, c, _ = nodes.checkpoint_loader(env, "tiny.safetensors")
        if strength is not None:
            m, c = nodes.lora_loader(env, m, c, "style.safetensors", strength, strength)
        (pos,), (neg,) = nodes.clip_text_encode(env, "a cat", c), nodes.clip_text_encode(env, "blurry", c)
        (latent,) = nodes.empty_latent_image(env, 32, 32, 1)
        (out,) = nodes.ksampler(env, m, 3, 1, 7.0, "euler", "normal", pos, neg, latent, 1.0)
        return out.samples

    del merges[:]
    with torch.inference_mode():
        comfy_plain = workflow(None)
        comfy_lora = workflow(0.7)
        assert len(merges) == 2 and min(merges) > 0  # the text part merged to encode, the U-Net's to sample
        assert torch.equal(workflow(0.7), comfy_lora) and len(merges) == 2  # the same set: kept
        assert torch.equal(workflow(None), comfy_plain) and not torch.equal(comfy_plain, comfy_lora)
    assert all(torch.equal(p, base[k]) for k, p in _params(model).items())
