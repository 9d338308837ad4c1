"""Every user error of the command line is one line naming the file or flag, exit status 2, no traceback:
usage errors (argparse), unreadable images and model files, bounds on training flags."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

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
