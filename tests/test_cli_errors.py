"""Every user error of the command line is one line naming the file or flag, exit status 2, no traceback:
usage errors (argparse), unreadable images and model files, bounds on training flags."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from tiny import write_tiny

from sdlab.cli import main


def one_line(capsys: pytest.CaptureFixture[str], start: str, *names: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(start) and "Traceback" not in err, err
    assert all(name in err for name in names), err
    return err


@pytest.mark.parametrize(
    ("argv", "start", "names"),
    [
        (["generate", "a cat", "-W", "abc"], "sdlab generate: error: ", ("-W/--width", "'abc'")),
        (["generate", "a cat", "--resize-mode", "zoom"], "sdlab generate: error: ", ("--resize-mode",)),
        (
            ["train", "lora", "--model", "m", "--out", "o", "--steps", "-5"],
            "sdlab train lora: error: ",
            ("--steps",),
        ),
        (
            ["train", "lora", "--model", "m", "--out", "o", "--workers", "-1"],
            "sdlab train lora: error: ",
            ("--workers",),
        ),
        (["vae"], "sdlab vae: error: ", ("vae_command",)),
        (["serve", "--port", "http"], "sdlab serve: error: ", ("--port",)),
    ],
)
def test_usage_errors_are_one_line(
    argv: list[str], start: str, names: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    one_line(capsys, start, *names)


def test_unreadable_inputs_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    model = tmp_path / "model.safetensors"
    model.write_text("not a model\n")
    good = tmp_path / "good.png"
    Image.new("RGB", (16, 16)).save(good)
    cases = [
        (["png-info", str(text)], "sdlab png-info: error: ", (str(text), "not an image sdlab reads")),
        (["png-info", str(tmp_path / "gone.png")], "sdlab png-info: error: ", ("gone.png: no such file",)),
        (["vae", "roundtrip", str(text)], "sdlab vae: error: ", (str(text),)),
        (["info", str(model)], "sdlab info: error: ", (str(model), "plain-text file")),
        (["generate", "a cat", "-m", str(model), "-q"], "sdlab generate: error: ", (str(model),)),
        (["generate", "a", "-i", str(good), "--mask", str(text)], "sdlab generate: error: ", (str(text),)),
        (["generate", "a", "-i", str(tmp_path)], "sdlab generate: error: ", ("is a folder",)),
    ]
    for argv, start, names in cases:
        assert main(argv) == 2
        one_line(capsys, start, *names)


def test_named_folders_upscaler_queue_and_model_paths_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checked before any model is read, so the model file need not exist; defaults may be absent."""
    good = tmp_path / "good.png"
    Image.new("RGB", (16, 16)).save(good)
    broken_yaml = tmp_path / "extra_model_paths.yaml"
    broken_yaml.write_text("a: [\n")
    gone = str(tmp_path / "nowhere")
    out = str(tmp_path / "o.png")
    tiny = str(write_tiny("sd1", tmp_path / "tiny.safetensors"))  # --control is read once a model is
    cases = [
        (["generate", "a", "-m", "x", "--lora-dir", gone], "sdlab generate: error: ", ("--lora-dir", gone)),
        (
            ["generate", "a", "-m", "x", "--embeddings-dir", gone],
            "sdlab generate: error: ",
            ("--embeddings-dir",),
        ),
        (
            ["generate", "a", "-m", "x", "--upscaler-dir", gone],
            "sdlab generate: error: ",
            ("--upscaler-dir",),
        ),
        (["upscale", str(good), "-m", "nope", "-o", out], "sdlab upscale: error: ", ("-m/--model", "'nope'")),
        (
            ["upscale", str(good), "-m", "x", "--upscaler-dir", gone],
            "sdlab upscale: error: ",
            ("--upscaler-dir",),
        ),
        (
            ["worker", "--queue", "postgresql://nobody@127.0.0.1:1/none", "--models-dir", str(tmp_path)],
            "sdlab worker: error: ",
            ("--queue", "cannot reach the PostgreSQL queue"),
        ),
        (
            ["serve", "--models-dir", str(tmp_path), "--extra-model-paths", str(broken_yaml)],
            "sdlab serve: error: ",
            ("--extra-model-paths", str(broken_yaml)),
        ),
        (["generate", "a", "-m", tiny, "--control", "canny"], "sdlab generate: error: ", ("--control",)),
        (
            ["generate", "a", "-m", tiny, "--control", f"canny:{tmp_path / 'gone.png'}"],
            "sdlab generate: error: ",
            ("gone.png",),
        ),
    ]
    for argv, start, names in cases:
        assert main(argv) == 2, argv
        one_line(capsys, start, *names)


@pytest.mark.parametrize(
    ("flag", "value", "names"),
    [("--hires-resize", "10x", ("--hires-resize", "'10x'")), ("--hires-steps", "many", ("--hires-steps",))],
)
def test_hires_usage_errors_are_one_line(
    flag: str, value: str, names: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "a", flag, value])
    assert exit_.value.code == 2
    one_line(capsys, "sdlab generate: error: ", *names)
