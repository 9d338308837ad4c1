"""Reading, detecting, loading, converting and describing checkpoints; refusing bad files."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny import TINY, tiny_checkpoint, write_tiny

from sdlab import families
from sdlab.checkpoints import keymaps
from sdlab.checkpoints.io import CheckpointError, read_metadata, read_state_dict
from sdlab.checkpoints.load import (
    convert,
    describe,
    load_model,
    read_checkpoint,
    save_single_file,
    to_single_file,
)
from sdlab.cli import main
from sdlab.config import SD1, SD2, SDXL, SDXL_REFINER, ModelConfig
from sdlab.models.clip import CLIPTextModel
from sdlab.models.unet import UNetModel
from sdlab.models.vae import AutoencoderKL


def _meta_single_file(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A full single-file state dict of meta tensors at the real shapes of `cfg`."""
    with torch.device("meta"):
        unet = UNetModel(cfg.unet).state_dict()
        vae = AutoencoderKL(cfg.vae).state_dict()
        text = [CLIPTextModel(t).state_dict() for t in cfg.text]
    text = [
        keymaps.text_openai_to_openclip(sd) if t.layout == "openclip" else sd for t, sd in zip(cfg.text, text)
    ]
    return keymaps.join_single_file(families.get(cfg.family), unet, vae, text)


@pytest.mark.parametrize("cfg", [SD1, SD2, SDXL, SDXL_REFINER], ids=["sd1", "sd2", "sdxl", "sdxl-refiner"])
def test_detects_the_real_architectures_from_shapes(cfg: ModelConfig) -> None:
    sd = _meta_single_file(cfg)
    parts = keymaps.split_single_file(sd)
    text = [
        keymaps.text_openclip_to_openai(t) if lay == "openclip" else t
        for lay, t in zip(parts.text_layouts, parts.text)
    ]
    from sdlab.checkpoints.detect import detect_model

    got = detect_model(parts.unet, parts.vae, list(zip(parts.text_layouts, text)), parts.extras, "meta")
    assert got == cfg


def test_detects_v_prediction_marker_and_inpainting() -> None:
    from sdlab.checkpoints.detect import detect_model

    sd = _meta_single_file(SD1)
    sd["v_pred"] = torch.tensor([])
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.empty(320, 9, 3, 3, device="meta")
    parts = keymaps.split_single_file(sd)
    got = detect_model(parts.unet, parts.vae, list(zip(parts.text_layouts, parts.text)), parts.extras, "meta")
    assert got.prediction == "v" and got.unet.in_channels == 9 and got.family == "sd1-inpaint"


def test_detection_names_the_structure_no_family_has() -> None:
    from sdlab.checkpoints.detect import detect_model

    sd = _meta_single_file(SD1)
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.empty(320, 7, 3, 3, device="meta")
    parts = keymaps.split_single_file(sd)
    with pytest.raises(CheckpointError, match="no known model family has .* 7 input channels"):
        detect_model(parts.unet, parts.vae, list(zip(parts.text_layouts, parts.text)), parts.extras, "meta")


@pytest.mark.parametrize("name", list(TINY))
def test_single_file_round_trip_through_loader(name: str, tmp_path: Path) -> None:
    path = write_tiny(name, tmp_path / "m.safetensors")
    model = load_model(path)
    assert model.config == TINY[name]
    ckpt = tiny_checkpoint(TINY[name])
    pairs = [(model.unet, ckpt.unet), (model.vae, ckpt.vae), *zip(model.text_encoders, ckpt.text)]
    for ours, ref in pairs:
        sd = ours.state_dict()
        assert all(torch.equal(sd[k], ref[k]) for k in ref)


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl", "sdxl-refiner"])
def test_convert_to_diffusers_and_back_is_exact(name: str, tmp_path: Path) -> None:
    path = write_tiny(name, tmp_path / "m.safetensors")
    folder = convert(path, tmp_path / "folder")
    assert json.loads((folder / "model_index.json").read_text())["_class_name"].startswith("StableDiffusion")
    back = convert(folder, tmp_path / "back.safetensors")
    a, b = read_state_dict(path), read_state_dict(back)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_model(folder).config == TINY[name]


def test_convert_fp16_and_never_overwrite(tmp_path: Path) -> None:
    path = write_tiny("sd1", tmp_path / "m.safetensors")
    half = convert(path, tmp_path / "half.safetensors", dtype="fp16")
    assert {v.dtype for v in read_state_dict(half).values()} == {torch.float16}
    assert "fp16" in describe(read_checkpoint(half))
    before = half.read_bytes()
    with pytest.raises(FileExistsError):
        convert(path, half)
    assert half.read_bytes() == before
    (tmp_path / "folder").mkdir()
    with pytest.raises(FileExistsError):
        convert(path, tmp_path / "folder")
    with pytest.raises(ValueError, match="safetensors only"):
        convert(path, tmp_path / "x.ckpt")
    # fp16 storage loads into an fp32 model
    assert load_model(half).unet.input_blocks[0][0].weight.dtype == torch.float32


def test_loaded_weights_are_the_memory_mapped_file(tmp_path: Path) -> None:
    """fp32 files are adopted without a copy: every parameter lies inside the file's mapping."""
    path = write_tiny("sd1", tmp_path / "m.safetensors")
    model = load_model(path)
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            ranges.append((start, end))
    params = [p for m in (model.unet, model.vae, *model.text_encoders) for p in m.parameters()]
    assert ranges and all(any(a <= p.data_ptr() < b for a, b in ranges) for p in params)


def test_vae_swap_from_ldm_and_diffusers_files(tmp_path: Path) -> None:
    path = write_tiny("sd1", tmp_path / "m.safetensors")
    other = tiny_checkpoint(TINY["sd1"], seed=50).vae
    save_file({f"first_stage_model.{k}": v for k, v in other.items()}, tmp_path / "vae.safetensors")
    save_file(keymaps.vae_ldm_to_diffusers(other, TINY["sd1"].vae), tmp_path / "vae-diffusers.safetensors")
    for vae_file in ("vae.safetensors", "vae-diffusers.safetensors"):
        model = load_model(path, vae=tmp_path / vae_file)
        assert torch.equal(model.vae.decoder.conv_out.weight, other["decoder.conv_out.weight"])
    save_file({"foo": torch.zeros(1)}, tmp_path / "notvae.safetensors")
    with pytest.raises(CheckpointError, match="not a VAE"):
        load_model(path, vae=tmp_path / "notvae.safetensors")


def test_ckpt_loads_through_weights_only(tmp_path: Path) -> None:
    path = write_tiny("sd1", tmp_path / "m.safetensors")
    torch.save({"state_dict": dict(read_state_dict(path)), "global_step": 5}, tmp_path / "m.ckpt")
    assert load_model(tmp_path / "m.ckpt").config == TINY["sd1"]


class _Exploit:
    def __reduce__(self) -> tuple:
        return (Path.touch, (Path(__file__).parent / "PWNED",))


@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_pickle_with_code_is_refused_and_never_run(tmp_path: Path, container: str) -> None:
    marker = Path(__file__).parent / "PWNED"
    marker.unlink(missing_ok=True)
    evil = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"x": torch.zeros(1)}, "payload": _Exploit()}
    if container == "zip":
        torch.save(payload, evil)
    else:
        with evil.open("wb") as f:
            pickle.dump(payload, f, protocol=2)
    with pytest.raises(CheckpointError, match="refused to load"):
        read_checkpoint(evil)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a safetensors file at all", "not a readable safetensors file"),
        (None, "not a Stable Diffusion checkpoint"),
    ],
)
def test_broken_and_foreign_files_get_clear_errors(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    path = tmp_path / "x.safetensors"
    if content is None:
        save_file({"some.other.model": torch.zeros(2)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as e:
        read_checkpoint(path)
    assert str(path) in str(e.value)


def test_missing_and_misshapen_tensors_are_named(tmp_path: Path) -> None:
    sd = dict(read_state_dict(write_tiny("sd1", tmp_path / "m.safetensors")))
    del sd["model.diffusion_model.out.2.bias"]
    save_file(sd, tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="out.2.bias"):
        load_model(tmp_path / "missing.safetensors")
    sd = dict(read_state_dict(tmp_path / "m.safetensors"))
    sd["first_stage_model.decoder.conv_out.bias"] = torch.zeros(5)
    save_file(sd, tmp_path / "shape.safetensors")
    with pytest.raises(CheckpointError, match="conv_out"):
        load_model(tmp_path / "shape.safetensors")


def test_cli_info_tokenize_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_tiny("sd2", tmp_path / "m.safetensors")
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "family:      sd2" in out and "v-prediction" in out and "fp32" in out and "openclip" in out
    assert main(["info", str(tmp_path / "nope.safetensors")]) != 0
    assert "no such model file or folder" in capsys.readouterr().err
    assert main(["tokenize", "a photo of a cat"]) == 0
    assert json.loads(capsys.readouterr().out) == [49406, 320, 1125, 539, 320, 2368, 49407]
    # the installed console script
    result = subprocess.run(
        [sys.executable, "-m", "sdlab.cli", "info", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (
        result.returncode != 0
        and "not a diffusers folder" in result.stderr
        and "Traceback" not in result.stderr
    )


def test_save_refuses_existing_file(tmp_path: Path) -> None:
    path = write_tiny("sd1", tmp_path / "m.safetensors")
    with pytest.raises(FileExistsError):
        save_single_file(tiny_checkpoint(TINY["sd1"]), path)


def test_same_checkpoint_same_bytes(tmp_path: Path) -> None:
    """safetensors writes its header keys in hash-map order; ours sorts them, so a re-run of the same
    training or conversion gives the same file hash. The reordered header still reads back whole."""
    ckpt = tiny_checkpoint(TINY["sd1"])
    ckpt = replace(ckpt, metadata={f"sdlab.k{i}": "é" * i for i in range(8)})
    a = save_single_file(ckpt, tmp_path / "a.safetensors").read_bytes()
    b = save_single_file(ckpt, tmp_path / "b.safetensors").read_bytes()
    assert a == b
    size = int.from_bytes(a[:8], "little")
    keys = list(json.loads(a[8 : 8 + size]))
    assert keys == sorted(keys)
    family = {"format": "pt", "sdlab.family": "sd1", "sdlab.prediction": "eps"}
    assert read_metadata(tmp_path / "a.safetensors") == ckpt.metadata | family
    back = read_state_dict(tmp_path / "a.safetensors")
    ours = to_single_file(ckpt, ckpt.detect())
    assert back.keys() == ours.keys() and all(torch.equal(back[k], v) for k, v in ours.items())


@pytest.mark.parametrize(
    ("key", "what"),
    [
        ("edm_mean", "EDM latent format"),
        ("edm_vpred.sigma_max", "EDM v-prediction"),
        ("ztsnr", "zero-terminal-SNR"),
    ],
)
def test_models_sdlab_would_sample_wrongly_are_refused(key: str, what: str) -> None:
    from sdlab.checkpoints.detect import detect_model

    sd = _meta_single_file(SDXL)
    sd[key] = torch.zeros(4)
    parts = keymaps.split_single_file(sd)
    text = [
        keymaps.text_openclip_to_openai(t) if lay == "openclip" else t
        for lay, t in zip(parts.text_layouts, parts.text)
    ]
    with pytest.raises(CheckpointError, match=f"does not support .*{what}"):
        detect_model(parts.unet, parts.vae, list(zip(parts.text_layouts, text)), parts.extras, "meta")
