"""Weight files that are broken, hostile or not weight files at all are named for what they are, and
refused before anything large is read or allocated (sdlab.checkpoints.io.check_safetensors)."""

from __future__ import annotations

import json
import pickle
import resource
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdlab.checkpoints import io
from sdlab.checkpoints.io import CheckpointError, read_metadata, read_state_dict, write_safetensors

LFS = (
    b"version https://git-lfs.github.com/spec/v1\n"
    b"oid sha256:4c8f1a7e0d5b3f2a9e6c1d8b7a0f3e2d5c4b9a8f7e6d5c4b3a2f1e0d9c8b7a6f\nsize 2132625894\n"
)
HTML = b"<!DOCTYPE html>\n<html lang='en'><head><title>Sign in</title></head><body>...</body></html>\n"


def safetensors_bytes(header: object, data: bytes = b"", *, raw: bytes | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def f32(shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


def refused(path: Path, message: str) -> str:
    with pytest.raises(CheckpointError, match=message) as e:
        read_state_dict(path)
    assert str(path) in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
@pytest.mark.parametrize(
    ("content", "what"),
    [
        (b"", "an empty file"),
        (HTML, r"an HTML page \(a download that failed\?\)"),
        (b"\n  <html><body>403 Forbidden</body></html>", "an HTML page"),
        (LFS, r"a Git LFS pointer, not the model \(run git lfs pull\)"),
        (b"Entry not found", "a plain-text file .*Entry not found"),
        (b'{"error": "Repository not found"}', "a plain-text file"),
        (b"\x1f\x8b\x08\x00" + bytes(40), r"a gzip archive \(unpack it first\)"),
    ],
)
def test_files_that_are_not_weights_are_named(tmp_path: Path, suffix: str, content: bytes, what: str) -> None:
    path = tmp_path / f"model{suffix}"
    path.write_bytes(content)
    kind = "safetensors file" if suffix == ".safetensors" else "PyTorch checkpoint"
    refused(path, f"not a readable {kind}: this is {what}")


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_zip_that_is_not_a_checkpoint(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("model/readme.txt", "hello")
    refused(path, "a ZIP archive that is not a PyTorch checkpoint")


def test_checkpoints_with_the_wrong_suffix_are_named(tmp_path: Path) -> None:
    torch.save({"x": torch.zeros(2)}, tmp_path / "zip.safetensors")
    refused(tmp_path / "zip.safetensors", r"a PyTorch checkpoint in ZIP form.*rename it to \.ckpt")
    with (tmp_path / "legacy.safetensors").open("wb") as f:
        pickle.dump({"x": torch.zeros(2)}, f, protocol=2)
    refused(tmp_path / "legacy.safetensors", "a pickled PyTorch checkpoint")
    save_file({"x": torch.zeros(2)}, tmp_path / "st.ckpt")
    refused(tmp_path / "st.ckpt", r"a safetensors file, not a pickle \(rename it to st.safetensors\)")


def test_duplicate_keys_are_refused(tmp_path: Path) -> None:
    ok = f32([1], 0, 4)
    raw = f'{{"w": {json.dumps(ok)}, "w": {json.dumps(ok)}}}'.encode()
    path = tmp_path / "dup.safetensors"
    path.write_bytes(safetensors_bytes(None, bytes(4), raw=raw))
    refused(path, "lists 'w' twice")
    nested = b'{"w": {"dtype": "F32", "dtype": "F16", "shape": [1], "data_offsets": [0, 4]}}'
    path = tmp_path / "nested.safetensors"
    path.write_bytes(safetensors_bytes(None, bytes(4), raw=nested))
    refused(path, "lists 'dtype' twice")
    meta = b'{"__metadata__": {"a": "1", "a": "2"}}'
    path = tmp_path / "meta.safetensors"
    path.write_bytes(safetensors_bytes(None, raw=meta))
    with pytest.raises(CheckpointError, match="lists 'a' twice"):
        read_metadata(path)


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        (None, b"", None),  # header length beyond the file: built below
        ([1, 2], b"", "not a JSON object"),
        ("s", b"", "not a JSON object"),
        ({"w": [1]}, b"", "tensor 'w': its entry is not a JSON object"),
        ({"w": {**f32([1], 0, 4), "dtype": "F33"}}, bytes(4), "tensor 'w': unknown dtype 'F33'"),
        ({"w": {**f32([1], 0, 4), "dtype": "F4"}}, bytes(4), "tensor 'w': unknown dtype 'F4'"),
        ({"w": {**f32([1], 0, 4), "shape": [-1]}}, bytes(4), "tensor 'w': shape"),
        ({"w": {**f32([1], 0, 4), "shape": [True]}}, bytes(4), "tensor 'w': shape"),
        ({"w": {**f32([1], 0, 4), "data_offsets": [0]}}, bytes(4), "tensor 'w': data_offsets"),
        ({"w": {**f32([1], 0, 4), "data_offsets": [4, 0]}}, bytes(4), "tensor 'w': data_offsets .* outside"),
        ({"w": f32([2], 0, 8)}, bytes(4), r"tensor 'w': data_offsets \[0, 8\] lie outside the 4-byte"),
        ({"w": f32([2], 0, 4)}, bytes(4), r"tensor 'w': F32 \[2\] needs 8 bytes but data_offsets span 4"),
        ({"a": f32([2], 0, 8), "b": f32([2], 4, 12)}, bytes(12), "tensor 'b' overlaps tensor 'a'"),
        ({"a": f32([1], 0, 4), "b": f32([1], 8, 12)}, bytes(12), "4 bytes before tensor 'b' belong to no"),
        ({"a": f32([1], 4, 8)}, bytes(8), "4 bytes before tensor 'a'"),
        ({"a": f32([1], 0, 4)}, bytes(8), "4 bytes of trailing data after the last tensor"),
        ({}, b"junk", "4 bytes of trailing data"),
        ({"__metadata__": {"a": 1}}, b"", "__metadata__ is not a map of strings to strings"),
        ({"__metadata__": "x"}, b"", "__metadata__ is not a map"),
    ],
)
def test_malformed_safetensors_are_refused(tmp_path: Path, header: object, data: bytes, message: str) -> None:
    path = tmp_path / "bad.safetensors"
    if header is None:
        path.write_bytes(struct.pack("<Q", 1000) + b"{}")
        message = "header length 1000 is beyond the end of the file"
    else:
        path.write_bytes(safetensors_bytes(header, data))
    refused(path, message)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b" {}", "not a JSON object"),
        (b"{", "not valid JSON"),
        (b'{"a": 1} x', "not valid JSON"),
        (b'{"\xff": 1}', "not valid JSON"),
        (b"{" + b'"a":[' * 100_000 + b"]" * 100_000 + b"}", "not valid JSON"),
    ],
    ids=["leading-space", "unclosed", "trailing-junk", "not-utf8", "nested-100000-deep"],
)
def test_header_that_is_not_json_is_refused(tmp_path: Path, raw: bytes, message: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(safetensors_bytes(None, raw=raw))
    refused(path, message)


def test_header_length_limits(tmp_path: Path) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x02\x00\x00")
    refused(path, "only 3 bytes long")
    path = tmp_path / "huge.safetensors"
    with path.open("wb") as f:  # a sparse file: large, but the header claims more than 100 MB
        f.write(struct.pack("<Q", 200_000_000) + b"{")
        f.truncate(200_000_100)
    refused(path, "header length 200000000 is over the 100000000 limit")


def test_a_huge_claimed_tensor_is_refused_without_reading_or_allocating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "huge.safetensors"
    terabyte = 1 << 40
    path.write_bytes(safetensors_bytes({"w": f32([terabyte // 4], 0, terabyte)}, bytes(16)))

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("safetensors was asked to open a file that fails the structural checks")

    monkeypatch.setattr(io, "safe_open", never)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    refused(path, r"tensor 'w': data_offsets \[0, 1099511627776\] lie outside the 16-byte data section")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024


def test_valid_files_still_read(tmp_path: Path) -> None:
    tensors = {
        "a.weight": torch.randn(3, 4),
        "b": torch.arange(5, dtype=torch.int64),
        "empty": torch.zeros(0, 7),
        "half": torch.ones(2, dtype=torch.float16),
        "bf": torch.ones(3, dtype=torch.bfloat16),
        "flag": torch.tensor([True, False]),
        "scalar": torch.tensor(2.5),
    }
    ours = write_safetensors(tensors, tmp_path / "ours.safetensors", metadata={"k": "v"})
    save_file(tensors, tmp_path / "theirs.safetensors", metadata={"k": "v", "format": "pt"})
    save_file({}, tmp_path / "empty.safetensors")
    save_file({"z": torch.zeros(0)}, tmp_path / "zero.safetensors")
    for path in (ours, tmp_path / "theirs.safetensors"):
        back = read_state_dict(path)
        assert back.keys() == tensors.keys()
        assert all(torch.equal(back[k], v) for k, v in tensors.items())
        assert read_metadata(path)["k"] == "v"
    assert read_state_dict(tmp_path / "empty.safetensors") == {}
    assert read_metadata(tmp_path / "empty.safetensors") == {}
    assert read_state_dict(tmp_path / "zero.safetensors")["z"].shape == (0,)
    torch.save({"state_dict": tensors}, tmp_path / "m.ckpt")
    assert read_state_dict(tmp_path / "m.ckpt").keys() == tensors.keys()
    with (tmp_path / "legacy.pt").open("wb") as f:
        torch.save(tensors, f, _use_new_zipfile_serialization=False)
    assert read_state_dict(tmp_path / "legacy.pt").keys() == tensors.keys()


def test_fuzzed_headers_only_ever_raise_checkpoint_error(tmp_path: Path) -> None:
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    path = tmp_path / "fuzz.safetensors"
    scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8)
    values = st.recursive(
        scalars, lambda v: st.lists(v, max_size=4) | st.dictionaries(st.text(max_size=6), v)
    )
    entry = st.fixed_dictionaries(
        {"dtype": st.sampled_from(["F32", "F16", "U8", "BOOL", "X"]) | values,
         "shape": st.lists(st.integers(-2, 5), max_size=3) | values,
         "data_offsets": st.lists(st.integers(-2, 40), min_size=2, max_size=2) | values}
    )  # fmt: skip
    names = st.sampled_from(["a", "b", "__metadata__"]) | st.text(max_size=4)
    headers = st.dictionaries(names, entry | values)

    def check(content: bytes) -> None:
        path.write_bytes(content)
        try:
            read_state_dict(path)  # what passes the checks must also load
        except CheckpointError as e:
            assert str(path) in str(e)

    @hypothesis.settings(max_examples=150, deadline=None, database=None)
    @hypothesis.given(st.binary(max_size=64) | st.tuples(headers, st.binary(max_size=40)).map(
        lambda hd: safetensors_bytes(hd[0], hd[1])
    ))  # fmt: skip
    def fuzz(content: bytes) -> None:
        check(content)

    fuzz()
