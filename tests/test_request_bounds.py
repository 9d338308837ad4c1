"""Hostile request values are refused before any work, naming the field: pixel and prompt-length bounds,
non-finite numbers (CLI, pipeline, A1111 API, ComfyUI graphs), and generation defaults read from a
file's metadata."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from tiny import write_tiny

from sdlab.checkpoints.io import CheckpointError, read_metadata
from sdlab.checkpoints.load import load_model
from sdlab.cli import main
from sdlab.pipeline import MAX_PIXELS, MAX_PROMPT_CHARS, GenerationRequest
from sdlab.server import graph


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"width": 100000, "height": 100000}, "exceeds the limit"),
        ({"width": 4096, "height": 4096, "batch_size": 2}, "exceeds the limit"),
        ({"cfg_scale": float("nan")}, "cfg_scale must be a finite number"),
        ({"cfg_scale": float("inf")}, "cfg_scale must be a finite number"),
        ({"strength": float("nan")}, "strength must be a finite number"),
        ({"prompt": "a" * (MAX_PROMPT_CHARS + 1)}, "prompt is longer than"),
        ({"negative_prompt": "b" * (MAX_PROMPT_CHARS + 1)}, "negative_prompt is longer than"),
    ],
)
def test_requests_are_bounded_before_any_work(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GenerationRequest(**{"prompt": "a cat", **fields}).validate()
    assert 4096 * 4096 <= MAX_PIXELS  # one 4096² image (or 16 at 1024²) is allowed
    GenerationRequest("a cat", width=4096, height=4096).validate()


def test_cli_refuses_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = write_tiny("sd1", tmp_path / "m.safetensors")
    for args, field in ((["--cfg", "nan"], "cfg_scale"), (["-W", "99992", "-H", "99992"], "width x height")):
        assert main(["generate", "a cat", "-m", str(model), "-q", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and field in err and "Traceback" not in err


def test_metadata_defaults_are_input_too(tmp_path: Path) -> None:
    path = write_tiny("sd1", tmp_path / "m.safetensors")
    tensors, meta = load_file(path), read_metadata(path)
    for key, value, problem in (
        ("sdlab.native_size", "100000", "outside"),
        ("sdlab.native_size", "63", "not a multiple of 8"),
        ("sdlab.cfg", "nan", "outside"),
        ("sdlab.steps", "many", "not a number"),
    ):
        bad = tmp_path / f"{key}-{value}.safetensors"
        save_file(tensors, bad, metadata={**meta, key: value})
        model = load_model(bad)
        attribute = {
            "sdlab.native_size": "native_size",
            "sdlab.cfg": "default_cfg",
            "sdlab.steps": "default_steps",
        }
        with pytest.raises(CheckpointError, match=f"{key}.*{problem}"):
            getattr(model, attribute[key])
        assert main(["generate", "a cat", "-m", str(bad), "-q", "-W", "32", "-H", "32"]) == 2


def test_comfy_graph_refuses_non_finite_floats() -> None:
    import json

    for bad in (float("nan"), float("inf"), "-inf"):
        _, error = graph._literal("cfg", bad, ("FLOAT", {"min": 0.0, "max": 100.0}), None)  # type: ignore[arg-type]
        assert error is not None and "finite" in error["details"]
        json.dumps(error, allow_nan=False)  # the error itself is valid JSON (no NaN echoed back)
