"""Real-size parity: SD1.5 and SD2.1 shapes with seeded random weights, sdlab against diffusers and
transformers loading the very same files, both ways (single file written by sdlab -> diffusers
`from_single_file`; diffusers folder written by sdlab -> sdlab and diffusers `from_pretrained`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from reference import diffusers_pipeline, max_diff

from sdlab.checkpoints.load import convert, load_model, read_checkpoint
from sdlab.config import ModelConfig

pytestmark = pytest.mark.slow
TOL = 1e-4


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def files(request: pytest.FixtureRequest, real_size_files) -> tuple[str, Path, Path]:
    """(family, single-file checkpoint, diffusers config folder) at the real shapes."""
    return (request.param, *real_size_files(request.param))


def _inputs(model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(2, 4, 32, 32, generator=g),
        "t": torch.tensor([981.0, 101.0]),
        "ctx": torch.randn(2, 77, model_cfg.unet.context_dim, generator=g),
        "img": torch.rand(1, 3, 128, 128, generator=g) * 2 - 1,
        "ids": torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [model_cfg.text[0].pad_token] * 70]),
    }


def test_single_file_matches_diffusers(files: tuple[str, Path, Path]) -> None:

    family, path, config = files
    ours = load_model(path)
    assert ours.config.family == {"sd1": "sd1", "sd2": "sd2-v"}[family]
    assert ours.config.prediction == ("v" if family == "sd2" else "eps")
    ref = diffusers_pipeline(path, config)
    assert ref.scheduler.config.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    inp = _inputs(ours.config)
    with torch.no_grad():
        eps = ours.unet(inp["x"], inp["t"], inp["ctx"])
        assert eps.abs().mean() > 0.1  # a real comparison, not of near-zero outputs
        d_unet = max_diff(eps, ref.unet(inp["x"], inp["t"], encoder_hidden_states=inp["ctx"]).sample)
        post, ref_post = ours.vae.encode(inp["img"]), ref.vae.encode(inp["img"]).latent_dist
        d_mean, d_logvar = max_diff(post.mean, ref_post.mean), max_diff(post.logvar, ref_post.logvar)
        d_dec = max_diff(ours.vae.decode(post.mean), ref.vae.decode(post.mean).sample)
        text = ours.text_encoders[0](inp["ids"])
        r = ref.text_encoder(inp["ids"], output_hidden_states=True)
        # diffusers' SD2 encoder stops at layer 23 (its "last"), the penultimate of the file's 24
        skip = ours.config.clip_skip_default
        used = text.last if skip == 1 else ours.text_encoders[0].text_model.final_layer_norm(text.layer(skip))
        d_last = max_diff(used, r.last_hidden_state)
        d_pen = max_diff(text.layer(skip + 1), r.hidden_states[-2])
    print(
        f"\n{family}: unet {d_unet:.2e} vae mean {d_mean:.2e} logvar {d_logvar:.2e} decode {d_dec:.2e} "
        f"text last {d_last:.2e} penultimate {d_pen:.2e}"
    )
    for d in (d_unet, d_mean, d_logvar, d_dec, d_last, d_pen):
        assert d <= TOL


def test_diffusers_folder_round_trip(files: tuple[str, Path, Path], tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    family, path, _ = files
    folder = convert(path, tmp_path / "folder")
    back = convert(folder, tmp_path / "back.safetensors")
    a, b, c = read_checkpoint(path), read_checkpoint(folder), read_checkpoint(back)
    back.unlink()  # read_checkpoint holds the tensors; the disk copy is not needed any more
    for other in (b, c):
        for x, y in [(a.unet, other.unet), (a.vae, other.vae), *zip(a.text, other.text, strict=True)]:
            assert x.keys() == y.keys()
            assert all(torch.equal(x[k], y[k]) for k in x)
    assert b.detect() == a.detect()
    ours = load_model(folder)
    ref = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet")
    inp = _inputs(ours.config)
    with torch.no_grad():
        d = max_diff(ours.unet(inp["x"], inp["t"], inp["ctx"]), ref(inp["x"], inp["t"], inp["ctx"]).sample)
    shutil.rmtree(folder)
    assert d <= TOL
