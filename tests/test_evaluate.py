"""The sdlab-mini evaluator: object classifier, reading and scoring, the report, VAE PSNR, grid and CLI."""

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny import write_tiny

from sdlab.checkpoints.load import load_model
from sdlab.train import evaluate as ev
from sdlab.train import mini_classifier as mc
from sdlab.train.mini_data import FONT_PATH, caption, is_heldout, parse_prompt, render

needs_font = pytest.mark.skipif(
    not Path(FONT_PATH).is_file(), reason="emoji font missing: apt-get install fonts-noto-color-emoji"
)
needs_classifier = pytest.mark.skipif(
    not mc.CLASSIFIER_PATH.is_file(),
    reason="no shipped classifier: python -m sdlab.train.mini_classifier --out FILE",
)
TINY_SAMPLING = {"steps": 2, "cfg": 3.0, "sampler": "euler", "size": 32}  # the readers' minimum side


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread than on two contended ones, and leave a core to others."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny("sd1", tmp_path_factory.mktemp("tiny") / "tiny.safetensors")


@pytest.fixture(scope="module")
def tiny_model(tiny_path: Path):
    return load_model(tiny_path)


@needs_classifier
def test_shipped_classifier_is_tiny_fp16():
    assert mc.CLASSIFIER_PATH.stat().st_size <= 1_000_000
    model = mc.load_classifier()
    assert model is mc.load_classifier()  # cached
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, mc.NUM_CLASSES)


@needs_font
@needs_classifier
def test_classifier_recognises_heldout_renders():
    assert mc.heldout_accuracy(limit=300) >= 0.9


@needs_font
def test_training_data_is_deterministic_and_reads_like_generated_images():
    crops, labels = mc.training_crops(6, seed=3)
    again = mc.training_crops(6, seed=3)
    assert torch.equal(crops, again[0]) and torch.equal(labels, again[1])
    assert crops.shape == (6, 3, 32, 32) and crops.dtype == torch.uint8 and labels.max() < mc.NUM_CLASSES
    batch = mc._augment(crops, torch.Generator().manual_seed(0))
    assert batch.shape == (6, 3, 32, 32) and -1 <= batch.min() and batch.max() <= 1


def test_heldout_prompts_and_seeds():
    scenes = ev.heldout_scenes(50, seed=2)
    assert scenes == ev.heldout_scenes(50, seed=2) and scenes != ev.heldout_scenes(50, seed=3)
    assert len(set(scenes)) == 50 and all(is_heldout(s) for s in scenes)
    assert min(ev.eval_seeds(50, 0)) >= 10**6
    assert not set(ev.eval_seeds(ev.MAX_PROMPTS, 0)) & set(ev.eval_seeds(ev.MAX_PROMPTS, 1))
    with pytest.raises(ValueError):
        ev.heldout_scenes(10**5)


def _asked(scene) -> dict:
    return {"obj": scene.obj, "colour": scene.colour, "size": scene.size, "place": scene.place}


@needs_font
@needs_classifier
def test_evaluator_end_to_end_on_a_tiny_model(tiny_model):
    report = ev.evaluate_model(tiny_model, n_prompts=3, seed=5, **TINY_SAMPLING)
    again = ev.evaluate_model(tiny_model, n_prompts=3, seed=5, **TINY_SAMPLING)
    assert report.records == again.records  # deterministic given the seed
    assert [r.seed for r in report.records] == ev.eval_seeds(3, 5)
    for record in report.records:
        assert parse_prompt(record.prompt) == _asked(record.scene) and is_heldout(record.scene)
    counts = report.counts()
    small = sum(r.scene.size == "small" for r in report.records)
    assert {a: judged for a, (_, judged) in counts.items()} == {
        "background": 3,
        "place": small,
        "size": 3,
        "object": 3,
        "all": 3,
    }
    assert all(0 <= right <= judged for right, judged in counts.values())
    assert report.sampling == ev.Sampling(**TINY_SAMPLING) and report.generate_seconds > 0
    data = json.loads(report.to_json())
    assert data["prompts"] == 3 and len(data["records"]) == 3 and data["accuracy"]["object"]["target"] == 0.6
    assert "background" in report.format() and "s/prompt" in report.format()


@needs_font
@needs_classifier
def test_oracle_images_score_perfectly():
    """Ground-truth renders in place of generated images: the evaluator itself must be right."""
    scenes = ev.heldout_scenes(120, seed=1)
    records = ev.score_images(scenes, [render(s, 64) for s in scenes], ev.eval_seeds(120, 1))
    report = ev.EvalReport("oracle", ev.Sampling(1, 1.0), 1, tuple(records), 1.0, 1.0)
    acc = report.accuracy()
    assert acc["background"] == acc["size"] == acc["place"] == 1.0 and acc["object"] >= 0.9
    assert report.counts()["place"][1] == sum(s.size == "small" for s in scenes)


@needs_font
@needs_classifier
def test_vae_psnr_is_finite(tiny_model):
    psnr = ev.vae_psnr(tiny_model, n=4, size=32)
    assert math.isfinite(psnr) and psnr > 0
    check = ev.check_vae(tiny_model, n=4, size=32)
    assert check.psnr == psnr and check.readback["all"][1] == 4 and "VAE PSNR" in check.format()


def test_psnr_of_known_error():
    image = Image.new("RGB", (8, 8), (100, 100, 100))
    assert ev.psnr([image], [Image.new("RGB", (8, 8), (110, 100, 100))]) == pytest.approx(
        10 * math.log10(255**2 / (100 / 3))
    )
    assert ev.psnr([image], [image]) == math.inf


def test_grid_has_a_tile_and_caption_per_image():
    images = [Image.new("RGB", (64, 64), c) for c in ("red", "blue", "green")]
    grid = ev.grid_image(images, ["a small red apple in the top left, blue background", "b", "c"], columns=2)
    assert grid.width == 2 * ev.GRID_TILE + ev.GRID_GAP and grid.height > 2 * ev.GRID_TILE
    assert grid.getpixel((10, 10)) == (255, 0, 0)


@needs_font
@needs_classifier
def test_cli_writes_table_json_and_grid(tiny_path, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    ev.add_eval_parser(parser.add_subparsers())
    out_json, out_grid = tmp_path / "eval.json", tmp_path / "grid.png"
    args = parser.parse_args(
        [
            "eval",
            "mini",
            "-m",
            str(tiny_path),
            "--prompts",
            "2",
            "--steps",
            "1",
            "--size",
            "32",
            "--vae-images",
            "2",
        ]
        + ["--json", str(out_json), "--grid", str(out_grid), "-q"]
    )
    assert args.func(args) == 0
    assert "VAE PSNR" in capsys.readouterr().out
    data = json.loads(out_json.read_text())
    assert data["sampling"]["steps"] == 1 and data["vae"]["psnr"] > 0
    assert data["records"][0]["prompt"] == caption(ev.heldout_scenes(2)[0])
    assert Image.open(out_grid).width == 2 * ev.GRID_TILE + ev.GRID_GAP


@needs_font
def test_classifier_training_is_deterministic(tmp_path):
    paths = [
        mc.train_classifier(tmp_path / f"{i}.safetensors", steps=2, seed=4, pool=16, batch_size=8, log=str)
        for i in range(2)
    ]
    first, second = (load_file(str(p)) for p in paths)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    model = mc.load_classifier(paths[0])
    assert model is mc.load_classifier(paths[0]) and not model.training
    with pytest.raises(FileExistsError, match="not overwriting"):  # refused before any training
        mc.train_classifier(paths[0], steps=2, seed=4, pool=16, batch_size=8, log=pytest.fail)
