"""Training: every recipe learns on tiny configs, resuming is bit-exact, two torchrun processes equal one,
bad data folders are named, and the sdlab-mini smoke run writes a checkpoint `load_model` reads."""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import TINY, tiny_checkpoint, write_tiny

from sdlab import lora
from sdlab.checkpoints.io import read_state_dict, write_safetensors
from sdlab.checkpoints.load import load_model, save_single_file
from sdlab.cli import main as cli_main
from sdlab.config import TextConfig, VAEConfig, unet_config
from sdlab.models.vae import AutoencoderKL
from sdlab.train import cli as train_cli
from sdlab.train import lora as lora_recipe
from sdlab.train import text, unet, vae
from sdlab.train.cli import add_train_parser
from sdlab.train.data import DataConfig, DataError, ImageFolder, StepBatches
from sdlab.train.loop import (
    Batch,
    LoopConfig,
    Ranks,
    RunState,
    checkpoints,
    rng_state,
    set_rng_state,
    setup_ranks,
)
from sdlab.train.presets import MINI_UNET

torch.set_num_threads(1)

DATA = DataConfig(resolution=32, num_objects=4, epoch_size=8)  # one batch of images: smooth loss curves
LOOP = LoopConfig(steps=30, batch_size=8, lr=2e-3, warmup_steps=3, log_every=3, progress=False)
TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)
TINY_TEXT = TextConfig(width=64, layers=2, heads=1, intermediate=128)
TINY_UNET = unet_config(
    model_channels=32, channel_mult=(1, 2), num_res_blocks=1, depth_per_level=(0, 1), context_dim=64
)
NO_SAMPLES = unet.SampleConfig(prompts=())


def _losses(out: Path, key: str = "loss") -> list[float]:
    return [json.loads(line)[key] for line in (out / "log.jsonl").read_text().splitlines()]


def _learned(out: Path, factor: float, key: str = "loss") -> None:
    losses = _losses(out, key)
    assert losses[-1] < factor * losses[0], losses


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae") / "vae.safetensors"
    return write_safetensors(AutoencoderKL(TINY_VAE).state_dict(), path)


def _unet_cfg(vae_file: Path, **kw) -> unet.UNetTrainConfig:
    base = unet.UNetTrainConfig(
        vae=str(vae_file),
        unet=TINY_UNET,
        text_config=TINY_TEXT,
        train_text_encoder=True,
        data=DATA,
        loop=LOOP,
        sample=NO_SAMPLES,
    )
    return replace(base, **kw)


# ---------------------------------------------------------------------------------------------
# each recipe learns


def test_vae_learns_and_exports_normalised_latents(tmp_path: Path) -> None:
    cfg = vae.VAETrainConfig(vae=TINY_VAE, data=DATA, loop=LOOP, normalize_images=32)
    path = vae.train(cfg, tmp_path)
    _learned(tmp_path, 0.7)
    model = AutoencoderKL(TINY_VAE)
    model.load_state_dict(read_state_dict(path))
    images = torch.stack([vae.build_dataset(DATA, captions=False)[i][0] for i in range(DATA.epoch_size)])
    mean, var = vae.latent_stats(model, images)
    torch.testing.assert_close(mean, torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(var * TINY_VAE.scale_factor**2, torch.ones(4), atol=1e-4, rtol=0)


def test_decoder_fine_tuning_keeps_the_latents(tmp_path: Path, vae_file: Path) -> None:
    cfg = vae.VAETrainConfig(vae=TINY_VAE, data=DATA, loop=LOOP, init=str(vae_file), train_encoder=False)
    path = vae.train(cfg, tmp_path)
    _learned(tmp_path, 0.95, "rec")  # slowly: the frozen random encoder keeps little of the images
    before, after = read_state_dict(vae_file), read_state_dict(path)
    fixed = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert fixed and all(torch.equal(before[k], after[k]) for k in fixed)  # not even renormalised
    assert not torch.equal(before["decoder.conv_out.weight"], after["decoder.conv_out.weight"])
    with pytest.raises(ValueError, match="needs a trained VAE"):
        vae.train(replace(cfg, init=None), tmp_path / "no-init")


def test_vae_crops_are_windows_of_the_images_on_the_latent_grid(tmp_path: Path) -> None:
    cfg = vae.VAETrainConfig(vae=TINY_VAE, data=DATA, loop=replace(LOOP, steps=60), crop=16)
    trainer = vae.VAETrainer(AutoencoderKL(TINY_VAE), cfg)
    images = torch.rand(8, 3, 32, 32)
    batch = Batch({"image": images}, step=3, seed=0, ranks=setup_ranks("cpu"), global_size=8)
    crops = trainer.crops(batch)
    assert crops.shape == (8, 3, 16, 16)
    origins = set()
    for image, crop in zip(images, crops, strict=True):
        found = [
            (y, x)
            for y in range(17)
            for x in range(17)
            if torch.equal(image[:, y : y + 16, x : x + 16], crop)
        ]
        assert len(found) == 1 and all(v % TINY_VAE.downscale == 0 for v in found[0])
        origins.add(found[0])
    assert len(origins) > 1  # random offsets, not one fixed window
    vae.train(cfg, tmp_path)
    _learned(tmp_path, 0.7)  # measured: 0.56 -> 0.29 in 60 steps
    for bad in (15, 40):  # off the latent grid, larger than the images
        with pytest.raises(ValueError, match=f"crop {bad} must be a multiple of 2 and at most 32"):
            vae.train(replace(cfg, crop=bad), tmp_path / f"bad{bad}")


def test_normalisation_keeps_reconstructions() -> None:
    torch.manual_seed(0)
    model = AutoencoderKL(TINY_VAE).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    mean, var = torch.tensor([0.3, -1.0, 2.0, 0.0]), torch.tensor([4.0, 0.5, 1.0, 9.0])
    normalised = AutoencoderKL(TINY_VAE).eval()
    normalised.load_state_dict(vae.normalized_state(model, mean, var))
    with torch.no_grad():
        z, z2 = model.encode(x).mean, normalised.encode(x).mean
        c = 1 / (TINY_VAE.scale_factor * var.sqrt())
        torch.testing.assert_close(z2, c[:, None, None] * (z - mean[:, None, None]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(normalised.decode(z2), model.decode(z), atol=1e-5, rtol=1e-5)


def test_text_encoder_learns(tmp_path: Path) -> None:
    cfg = text.TextTrainConfig(text=TINY_TEXT, data=DATA, loop=LOOP, embed_dim=32, image_width=32)
    path = text.train(cfg, tmp_path)
    _learned(tmp_path, 0.8)
    assert all(k.startswith("text_model.") for k in read_state_dict(path))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_unet_learns_and_writes_a_loadable_model(tmp_path: Path, vae_file: Path, prediction: str) -> None:
    diffusion = unet.DiffusionConfig(min_snr_gamma=5.0 if prediction == "v" else 0.0)
    loop = replace(LOOP, ema_decay=0.9, sample_every=30)
    sample = unet.SampleConfig(prompts=("a red apple",), seeds=(0,), steps=2)
    path = unet.train(
        _unet_cfg(vae_file, prediction=prediction, diffusion=diffusion, loop=loop, sample=sample), tmp_path
    )
    _learned(tmp_path, 0.6)
    model = load_model(path)
    assert model.config.prediction == prediction and model.config.unet == TINY_UNET
    assert Image.open(tmp_path / "samples" / "step_00000030.png").size == (32, 32)


def test_lora_learns_and_saves_kohya(tmp_path: Path) -> None:
    base = write_tiny("sd1", tmp_path / "base.safetensors")
    cfg = lora_recipe.LoRATrainConfig(
        model=str(base),
        rank=4,
        conv_rank=2,
        train_text_encoder=True,
        data=DATA,
        loop=replace(LOOP, lr=5e-3),
        sample=NO_SAMPLES,
    )
    path = lora_recipe.train(cfg, tmp_path / "run")
    _learned(tmp_path / "run", 0.9)
    sd = lora.read_lora(path)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in sd
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in sd
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight" in sd
    model = load_model(base)
    with lora.apply_lora(model, path, 1.0) as merged:
        assert not merged.unmatched


# ---------------------------------------------------------------------------------------------
# exact resume, data order, distributed equality


def test_resume_is_bit_exact(tmp_path: Path, vae_file: Path) -> None:
    loop = replace(LOOP, steps=8, ema_decay=0.9, checkpoint_every=3)
    diffusion = unet.DiffusionConfig(caption_dropout=0.5, min_snr_gamma=5.0)
    straight = unet.train(_unet_cfg(vae_file, loop=loop, diffusion=diffusion), tmp_path / "a")
    unet.train(_unet_cfg(vae_file, loop=replace(loop, steps=4), diffusion=diffusion), tmp_path / "b")
    resumed = unet.train(_unet_cfg(vae_file, loop=loop, diffusion=diffusion), tmp_path / "b")
    for name in ("trainable.safetensors", "ema.safetensors"):
        a, b = (read_state_dict(checkpoints(tmp_path / r)[-1][1] / name) for r in "ab")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    a, b = read_state_dict(straight), read_state_dict(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [s for s, _ in checkpoints(tmp_path / "b")] == [6, 8]  # keeps the last two
    assert unet.train(_unet_cfg(vae_file, loop=loop, diffusion=diffusion), tmp_path / "b") == resumed  # done


def test_rng_states_round_trip_weights_only(tmp_path: Path) -> None:
    torch.save(rng_state(), tmp_path / "rng.pt")
    first = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and (first[1] == again[1]).all() and first[2] == again[2]


def test_resume_refuses_a_changed_config(tmp_path: Path, vae_file: Path) -> None:
    cfg = _unet_cfg(vae_file, loop=replace(LOOP, steps=2))
    unet.train(cfg, tmp_path)
    with pytest.raises(ValueError, match="different config.*prediction"):
        unet.train(replace(cfg, prediction="v", loop=replace(LOOP, steps=3)), tmp_path)
    with pytest.raises(FileExistsError, match="previous run"):
        unet.train(cfg, tmp_path, resume=False)


def test_rank_shards_union_is_the_global_batch() -> None:
    full = list(StepBatches(50, 8, seed=3, start=0, stop=20))
    ranks = [list(StepBatches(50, 8, seed=3, start=0, stop=20, rank=r, world=2)) for r in range(2)]
    assert [a + b for a, b in zip(*ranks)] == full
    assert list(StepBatches(50, 8, seed=3, start=7, stop=20)) == full[7:]
    epoch = [i for batch in full for i in batch][:50]
    assert sorted(epoch) == list(range(50))  # each epoch is a permutation


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_configs(vae_file: Path) -> dict[str, object]:
    """One config per recipe whose loss couples ranks: contrastive gather, per-sample noise, GAN."""
    loop = replace(LOOP, steps=2, lr=1e-3, warmup_steps=1)
    return {
        "text": text.TextTrainConfig(text=TINY_TEXT, data=DATA, loop=loop, embed_dim=32, image_width=32),
        "unet": _unet_cfg(vae_file, loop=replace(loop, ema_decay=0.9)),
        "vae": vae.VAETrainConfig(
            vae=TINY_VAE, data=DATA, loop=loop, adversarial_weight=0.1, normalize_images=0
        ),
    }


def ddp_run(vae_file: Path, out: Path) -> None:
    """Train each DDP config into out/<recipe> (called by torchrun workers and by the test)."""
    trainers = {"text": text.train, "unet": unet.train, "vae": vae.train}
    for name, cfg in ddp_configs(vae_file).items():
        trainers[name](cfg, out / name)


def test_two_processes_equal_one(tmp_path: Path, vae_file: Path) -> None:
    script = """
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
from test_train import ddp_run

ddp_run(Path(sys.argv[2]), Path(sys.argv[3]))
"""
    (tmp_path / "ddp.py").write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(tmp_path / "ddp.py"),
        str(Path(__file__).parent),
        str(vae_file),
        str(tmp_path / "two"),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp_run(vae_file, tmp_path / "one")
    for name in ("text", "unet", "vae"):
        last = [checkpoints(tmp_path / r / name)[-1][1] for r in ("one", "two")]
        one, two = (read_state_dict(p / "trainable.safetensors") for p in last)
        assert one.keys() == two.keys() and all((one[k] - two[k]).abs().max() < 1e-3 for k in one), name
        # Adam turns float-rounding differences of near-zero gradients into ±lr steps, so compare
        # the gradient averages it keeps, relative to the largest (a wrong rank average shows as 2x)
        m1, m2 = (torch.load(p / "state.pt", weights_only=True)["optimizer"]["state"] for p in last)
        scale = max(float(m["exp_avg"].abs().max()) for m in m1.values())
        worst = max(float((m1[i]["exp_avg"] - m2[i]["exp_avg"]).abs().max()) for i in m1)
        assert worst < 2e-3 * scale, (name, worst / scale)


# ---------------------------------------------------------------------------------------------
# data folders


def _png(path: Path, size: tuple[int, int] = (40, 36), caption: str | None = "a red apple") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption + "\n")


def test_image_folder_reads_captions_and_repeats(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    _png(tmp_path / "3_style" / "b.jpg", (64, 32), "b caption")
    data = ImageFolder(tmp_path, 32, captions=True)
    items = sorted((data[i][1], data[i][2]) for i in range(len(data)))
    assert [c for c, _ in items] == ["a red apple", "b caption", "b caption", "b caption"]
    assert items[0][1].endswith("a.png") and data[0][0].shape == (3, 32, 32)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: None, "no images"),
        (lambda d: (d / "broken.png").write_bytes(b"not a png"), "broken.png: unreadable image"),
        (lambda d: _png(d / "tiny.png", (16, 40)), "tiny.png: 16x40 is smaller than the training size 32"),
        (lambda d: _png(d / "bare.png", caption=None), "bare.png: no caption file bare.txt"),
    ],
)
def test_unusable_data_is_named(tmp_path: Path, make, message: str) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    make(folder)
    cfg = text.TextTrainConfig(text=TINY_TEXT, data=replace(DATA, folder=str(folder)), loop=LOOP)
    with pytest.raises(DataError, match=message):
        text.train(cfg, tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()


def test_missing_folder_and_captions_optional_for_the_vae(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such folder"):
        ImageFolder(tmp_path / "nowhere", 32, captions=True)
    _png(tmp_path / "x.png", caption=None)
    assert len(ImageFolder(tmp_path, 32, captions=False)) == 1


# ---------------------------------------------------------------------------------------------
# the mini recipe through the command line


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sdlab")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.mark.parametrize(
    "text_steps, decoder_steps",
    [("0", "0"), ("2", "2")],  # joint text training / a contrastive text stage and a decoder stage
)
def test_mini_smoke_writes_a_loadable_checkpoint_and_resumes_by_stage(
    tmp_path: Path, text_steps: str, decoder_steps: str
) -> None:
    argv = ["train", "mini", "--out", str(tmp_path), "--smoke", "--text-steps", text_steps, "--no-progress"]
    argv += ["--decoder-steps", decoder_steps]
    assert _cli(argv) == 0
    final = tmp_path / "sdlab-mini.safetensors"
    model = load_model(final)
    assert model.config.unet == MINI_UNET and final.stat().st_size < 40e6
    assert (model.native_size, model.default_steps, model.default_cfg) == (64, 20, 3.0)
    assert (tmp_path / "text").is_dir() == (text_steps != "0")
    assert (tmp_path / "decoder").is_dir() == (decoder_steps != "0")
    stages = [tmp_path / "vae" / "vae.safetensors", *(tmp_path / "text").glob("*.safetensors")]
    stages += [*(tmp_path / "decoder").glob("*.safetensors")]
    if decoder_steps != "0":  # the shipped VAE is the fine-tuned one, with the U-Net stage's encoder
        decoder = read_state_dict(tmp_path / "decoder" / "vae.safetensors")
        ours = {k: v.float() for k, v in model.vae.state_dict().items()}
        assert all(torch.equal(ours[k], decoder[k].half().float()) for k in decoder)
    stamps = {p: p.stat().st_mtime_ns for p in stages}
    final.unlink()
    assert _cli(argv) == 0
    assert final.is_file() and all(p.stat().st_mtime_ns == t for p, t in stamps.items())


# ---------------------------------------------------------------------------------------------
# devices and mixed precision


@pytest.fixture(scope="module")
def fp16_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD1 model stored in float16, as most community files are."""
    path = tmp_path_factory.mktemp("base") / "base-fp16.safetensors"
    return save_single_file(tiny_checkpoint(TINY["sd1"]), path, dtype=torch.float16)


def _lora_run(base: Path, out: Path, precision: str) -> list[float]:
    loop = replace(LOOP, steps=2, batch_size=2, log_every=1, lr=5e-3, precision=precision)
    cfg = lora_recipe.LoRATrainConfig(model=str(base), rank=4, data=DATA, loop=loop, sample=NO_SAMPLES)
    path = lora_recipe.train(cfg, out)
    assert {t.dtype for t in lora.read_lora(path).values()} == {torch.float32}  # the master weights
    return _losses(out)


@pytest.fixture(scope="module")
def fp32_lora_losses(fp16_base: Path, tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    return _lora_run(fp16_base, tmp_path_factory.mktemp("fp32"), "fp32")


@pytest.mark.parametrize(("precision", "tolerance"), [("fp16", 2e-4), ("bf16", 2e-3)])
def test_half_precision_training_follows_fp32(
    fp16_base: Path, fp32_lora_losses: list[float], tmp_path: Path, precision: str, tolerance: float
) -> None:
    """LoRA steps under autocast on the CPU (the frozen base held in the autocast dtype, fp16 with a
    gradient scaler): each step's loss within `tolerance` (relative) of the float32 run's; measured
    6e-5 (fp16) and 8.5e-4 (bf16) over 2 steps."""
    losses = _lora_run(fp16_base, tmp_path, precision)
    assert losses != fp32_lora_losses  # it did run in half precision
    assert all(abs(a - b) <= tolerance * b for a, b in zip(losses, fp32_lora_losses, strict=True)), losses


def test_checkpoints_keep_the_gradient_scale(tmp_path: Path) -> None:
    """fp16 training's loss scale is part of the state an exact resume restores."""
    params, ranks = {"w": torch.nn.Parameter(torch.ones(2))}, Ranks(0, 1, torch.device("cpu"))

    def state(scaler: torch.amp.GradScaler) -> RunState:
        return RunState(tmp_path, params, torch.optim.AdamW(params.values()), scaler, None, ranks, 2)

    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.ones(()))  # the scale is made on first use
    scaler.update(1024.0)  # as after six overflowing steps
    state(scaler).save(1)
    resumed = torch.amp.GradScaler("cpu")
    state(resumed).load(checkpoints(tmp_path)[-1][1])
    assert resumed.get_scale() == 1024.0


def test_train_device_and_dtype_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--dtype auto` is recorded as what it means here (fp32 on the CPU); `--precision` still names it;
    a device this machine lacks is one line, exit 2, before anything is written."""
    parser = argparse.ArgumentParser(prog="sdlab")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    argv = ["train", "lora", "--out", str(tmp_path / "run"), "--model", "m.safetensors"]
    assert train_cli._loop(parser.parse_args(argv), LOOP).precision == "fp32"
    assert train_cli._loop(parser.parse_args([*argv, "--precision", "bf16"]), LOOP).precision == "bf16"
    assert cli_main([*argv, "--device", "cuda"]) == 2
    assert capsys.readouterr().err == "sdlab train: error: --device cuda: 0 CUDA device(s) available\n"
    with pytest.raises(SystemExit) as e:
        cli_main([*argv, "--dtype", "fp8"])
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "run").exists()
