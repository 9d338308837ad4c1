"""`<lora:NAME:W>` in prompts and `--lora PATH:W`: found in the LoRA folders, merged while generating,
restored bit-exactly after, written into `Lora hashes`; tags sdlab cannot honour are errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny import write_tiny

from sdlab import lora
from sdlab.checkpoints.load import StableDiffusion, load_model
from sdlab.cli import main
from sdlab.images import read_parameters, to_tensor
from sdlab.infotext import parse_infotext
from sdlab.networks import lora_hash, lora_tags
from sdlab.pipeline import GenerationRequest, generate


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[StableDiffusion, Path, Path]:
    root = tmp_path_factory.mktemp("loras")
    model = load_model(write_tiny("sd1", root / "sd1.safetensors"))
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, layer in lora.training_targets(model.unet, model.text_encoders, model.family).items():
        rank = 2
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, *layer.weight.shape[1:], generator=g) * 0.3
        sd[f"{name}.lora_up.weight"] = (
            torch.randn(layer.weight.shape[0], rank, *[1] * (layer.weight.ndim - 2), generator=g) * 0.3
        )
    folder = root / "Lora"
    path = lora.save_lora(sd, folder / "sub" / "style.safetensors")
    return model, folder, path


def _req(prompt: str, **kw: object) -> GenerationRequest:
    return GenerationRequest(prompt, "blurry", 32, 32, steps=3, sampler="euler", seed=5, **kw)  # type: ignore[arg-type]


def test_tags_are_parsed_as_a1111_and_refused_when_not_honoured() -> None:
    assert lora_tags("<lora:style:0.7> a cat, <lyco:x> dog") == (" a cat,  dog", [("style", 0.7), ("x", 1.0)])
    for bad, message in (
        ("<hypernet:x:1> a cat", "no 'hypernet'"),
        ("<lora:x:0.5:0.8> a cat", "one weight"),
        ("<lora:x:te=0.5> a cat", "one weight"),
        ("<lora:x:strong> a cat", "not a number"),
    ):
        with pytest.raises(ValueError, match=message):
            lora_tags(bad)


def test_prompt_tag_equals_the_merged_lora_and_restores_the_weights(setup) -> None:
    model, folder, path = setup
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    plain = generate(model, _req("a cat"))
    tagged = generate(model, _req("<lora:style:0.7> a cat", lora_dirs=(str(folder),)))
    by_path = generate(model, _req("a cat", loras=((str(path), 0.7),)))
    by_subpath = generate(model, _req("a cat <lora:sub/style:0.7>", lora_dirs=(str(folder),)))
    with lora.apply_lora(model, path, 0.7):
        merged = generate(model, _req("a cat"))
    assert all(torch.equal(v, before[k]) for k, v in model.unet.state_dict().items())  # restored exactly
    assert torch.equal(tagged.latents, merged.latents) and torch.equal(by_path.latents, merged.latents)
    assert torch.equal(by_subpath.latents, merged.latents)
    assert not torch.equal(tagged.latents, plain.latents)
    assert tagged.request.loras == ((str(path), 0.7),)
    with pytest.raises(ValueError, match="<lora:missing>: no LoRA file"):
        generate(model, _req("a cat <lora:missing>", lora_dirs=(str(folder),)))
    with pytest.raises(ValueError, match="negative prompt"):
        generate(model, GenerationRequest("a cat", "<lora:style:1> ugly", 32, 32, steps=2))
    with pytest.raises(ValueError, match="not a LoRA name"):
        generate(model, _req("a cat <lora:../sd1:1>", lora_dirs=(str(folder),)))


def test_lora_hash_is_a1111_s_and_cli_writes_it(setup, tmp_path: Path) -> None:
    model, folder, path = setup
    data = path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    assert lora_hash(path) == hashlib.sha256(data[header:]).hexdigest()[:12]  # kohya's addnet hash
    out = tmp_path / "out.png"
    args = ["generate", "<lora:style:0.7> a cat", "-n", "blurry", "-m", str(model.source), "-W", "32"]
    args += [
        "-H",
        "32",
        "--steps",
        "3",
        "--sampler",
        "euler",
        "-s",
        "5",
        "--lora-dir",
        str(folder),
        "-o",
        str(out),
        "-q",
    ]
    assert main(args) == 0
    params = parse_infotext(read_parameters(out))
    assert params["Prompt"] == "<lora:style:0.7> a cat"  # A1111 keeps the tag in the infotext
    assert params["Lora hashes"] == f"style: {lora_hash(path)}"
    want = generate(model, _req("a cat", loras=((str(path), 0.7),))).images[0]
    assert torch.equal(to_tensor(Image.open(out).convert("RGB")), to_tensor(want))
    out2 = tmp_path / "out2.png"
    args2 = [a if a != "<lora:style:0.7> a cat" else "a cat" for a in args[:-3]] + [
        "--lora",
        f"{path}:0.7",
        "-o",
        str(out2),
        "-q",
    ]
    assert main(args2) == 0
    assert torch.equal(to_tensor(Image.open(out2).convert("RGB")), to_tensor(want))
