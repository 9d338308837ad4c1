"""Textual-inversion embeddings: file formats, A1111's name matching and chunking, parity of the
conditioning with transformers' CLIP fed the same input embeddings, and `sdlab generate` against diffusers
pipelines with `load_textual_inversion` (SD1 and SDXL tiny models), the A1111 listing, refusals."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reference import max_diff, psnr, transformers_clip
from safetensors.torch import save_file
from tiny import write_tiny

from sdlab.checkpoints.load import StableDiffusion, convert, load_model, read_checkpoint
from sdlab.cli import main
from sdlab.conditioning import encode_prompt_pair, encode_text
from sdlab.embeddings import (
    EmbeddingError,
    Embeddings,
    a1111_listing,
    checkpoint_slots,
    embedding_hash,
    model_slots,
    read_embedding,
)
from sdlab.infotext import request_infotext
from sdlab.pipeline import GenerationRequest, generate
from sdlab.text.prompt import CHUNK, PLACEHOLDER, Vectors, chunk_prompt
from sdlab.text.tokenizer import EOS, CLIPTokenizer

NAME = "shinystyle"
SEED, WIDTH, HEIGHT, STEPS, CFG = 1234, 64, 48, 6, 6.0
MIN_PSNR = 40.0


def _vectors(n: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.5


class _Finder:
    """A finder for one name, as `Embeddings.encoder` gives `chunk_prompt`."""

    def __init__(self, tokenizer: CLIPTokenizer, name: str, vec: torch.Tensor) -> None:
        self.ids, self.vectors = tuple(tokenizer.tokenize(name)), Vectors(name, vec)

    def find(self, tokens, position):
        if tuple(tokens[position : position + len(self.ids)]) == self.ids:
            return self.vectors, len(self.ids)
        return None


# ---------------------------------------------------------------------------------------------
# tokenization


def test_embedding_becomes_placeholders_weighted_and_never_split() -> None:
    tok = CLIPTokenizer.default()
    finder = _Finder(tok, NAME, torch.zeros(3, 8))
    assert len(finder.ids) > 1  # the name is several tokens, replaced by 3 positions
    [chunk] = chunk_prompt(tok, f"a photo of ({NAME}:1.2), red", EOS, finder)
    start = 1 + len(tok.tokenize("a photo of"))
    assert chunk.ids[start : start + 3] == (PLACEHOLDER,) * 3
    assert chunk.weights[start : start + 3] == (1.2,) * 3 and chunk.weights[start + 3] == 1.0
    assert [(p, v.name) for p, v in chunk.fixes] == [(start, NAME)]
    assert chunk.ids[start + 3 :][:2] == tuple(tok.tokenize(", red"))

    # 74 tokens, then the 3-vector embedding: it moves whole to the second chunk
    filler = " ".join(["cat"] * 74)
    assert len(tok.tokenize(filler)) == 74
    first, second = chunk_prompt(tok, f"{filler} {NAME} dog", EOS, finder)
    assert first.fixes == () and first.ids[75] == EOS  # chunk 1: 74 tokens, then padding
    assert [p for p, _ in second.fixes] == [1] and second.ids[1:5] == (0, 0, 0, tok.tokenize("dog")[0])
    assert len(first.ids) == len(second.ids) == CHUNK + 2
    # without embeddings the name is ordinary text
    assert chunk_prompt(tok, NAME, EOS)[0].ids[1 : 1 + len(finder.ids)] == finder.ids


# ---------------------------------------------------------------------------------------------
# files


def _write_formats(folder: Path, width: int) -> dict[str, Path]:
    """The same 2 vectors in A1111 .pt, emb_params .safetensors and a diffusers {token: vector} .bin."""
    folder.mkdir(parents=True, exist_ok=True)
    vec = _vectors(2, width, 1)
    pt = folder / "a1111.pt"
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": vec},
            "name": "something-else",
            "step": 1500,
            "sd_checkpoint": "abcdef12",
            "sd_checkpoint_name": "model",
        },
        pt,
    )
    st = folder / "kohya.safetensors"
    save_file({"emb_params": vec}, st)
    one = folder / "diffusers.bin"
    torch.save({"<concept>": vec[0]}, one)
    return {"pt": pt, "st": st, "bin": one}


def test_file_formats(tmp_path: Path) -> None:
    files = _write_formats(tmp_path, 128)
    pt, st, one = (read_embedding(files[k]) for k in ("pt", "st", "bin"))
    assert pt.name == "a1111" and pt.step == 1500 and pt.sd_checkpoint == "abcdef12"
    assert torch.equal(pt.vectors[""], st.vectors[""]) and (pt.count, pt.shape) == (2, 128)
    assert one.vectors[""].shape == (1, 128) and torch.equal(one.vectors[""][0], pt.vectors[""][0])
    xl = tmp_path / "xl.safetensors"
    save_file({"clip_l": _vectors(3, 768, 2), "clip_g": _vectors(3, 1280, 3)}, xl)
    emb = read_embedding(xl)
    assert (emb.count, emb.shape) == (3, 2048)
    assert emb.fits([("clip_l", 768), ("clip_g", 1280)]) and emb.fits([("clip_g", 1280)])
    assert not emb.fits([(None, 768)]) and not pt.fits([("clip_l", 128), ("clip_g", 128)])
    digest = hashlib.sha256(files["pt"].read_bytes()).hexdigest()[:12]
    assert embedding_hash(files["pt"]) == digest


def test_pickle_with_code_is_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": Evil()}}, path)
    with pytest.raises(EmbeddingError, match="refused to load"):
        read_embedding(path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# SD1: conditioning against transformers, generate against diffusers


@pytest.fixture(scope="module")
def sd1(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, StableDiffusion, Path]:
    os.environ["HF_HUB_OFFLINE"] = "1"
    d = tmp_path_factory.mktemp("sd1")
    path = write_tiny("sd1", d / "sd1.safetensors", seed=0)
    folder = d / "embeddings"
    folder.mkdir()
    torch.save({"string_to_param": {"*": _vectors(2, 128, 5)}, "name": "ignored"}, folder / f"{NAME}.pt")
    return path, load_model(path), folder


def test_conditioning_matches_transformers_with_input_embeddings(sd1) -> None:
    path, model, folder = sd1
    embeddings = Embeddings.a1111(model, [folder])
    vec = read_embedding(folder / f"{NAME}.pt").vectors[""]
    hf = transformers_clip(read_checkpoint(path).text[0], model.config.text[0])
    vocab = hf.get_input_embeddings().weight.shape[0]
    hf.resize_token_embeddings(vocab + 2)
    with torch.no_grad():
        hf.get_input_embeddings().weight[vocab:] = vec
    tok = model.tokenizer
    head, tail = tok.tokenize("a photo of"), tok.tokenize("on a table")
    ids = [tok.bos, *head, vocab, vocab + 1, *tail, EOS]
    ids += [EOS] * (77 - len(ids))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).last_hidden_state
        cond, _ = encode_prompt_pair(model, f"a photo of {NAME} on a table", "", 1, embeddings)
        comfy = encode_text(
            model,
            f"a photo of embedding:{NAME} on a table",
            embeddings=Embeddings.comfy(model, f"embedding:{NAME}", [folder]),
        )
        plain, _ = encode_prompt_pair(model, f"a photo of {NAME} on a table", "")
    diff, comfy_diff = max_diff(cond.context, ref), max_diff(comfy.context, ref)
    print(f"\nsd1 context with embedding vs transformers: {diff:.2e} (ComfyUI syntax {comfy_diff:.2e})")
    assert diff <= 1e-4 and comfy_diff <= 1e-4
    assert max_diff(plain.context, ref) > 1e-2  # the embedding changed something
    assert list(embeddings.used) == [NAME]


def _karras(config: dict):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(config, use_karras_sigmas=True, timestep_spacing="linspace")


def _latents(model: StableDiffusion) -> torch.Tensor:
    f = model.config.vae.downscale
    return torch.randn((1, 4, HEIGHT // f, WIDTH // f), generator=torch.Generator("cpu").manual_seed(SEED))


def _ours(path: Path, folder: Path, prompt: str, out: Path) -> Image.Image:
    args = ["generate", prompt, "-n", "blurry", "-m", str(path), "-s", str(SEED), "-q"]
    args += ["-W", str(WIDTH), "-H", str(HEIGHT), "--steps", str(STEPS), "--cfg", str(CFG)]
    args += ["--sampler", "euler", "--scheduler", "karras", "--embeddings-dir", str(folder), "-o", str(out)]
    assert main(args) == 0
    return Image.open(out).convert("RGB")


def _check(ours: Image.Image, ref: Image.Image, plain: Image.Image, what: str) -> None:
    value, std = psnr(ours, ref), float(np.asarray(ref).std())
    print(
        f"\n{what} with embedding vs diffusers: PSNR {value:.1f} dB (vs no embedding {psnr(plain, ref):.1f})"
    )
    assert std > 5 and value >= MIN_PSNR
    assert psnr(plain, ref) < value  # the embedding made the difference


def test_generate_sd1_matches_diffusers_load_textual_inversion(sd1, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    path, model, folder = sd1
    prompt = f"a red apple on a table, ({NAME}:1.0)"
    ours = _ours(path, folder, prompt, tmp_path / "ours.png")
    (tmp_path / "none").mkdir()  # an empty embeddings folder: the name stays plain text
    plain = _ours(path, tmp_path / "none", prompt, tmp_path / "plain.png")
    info = Image.open(tmp_path / "ours.png").text["parameters"]
    digest = hashlib.sha256((folder / f"{NAME}.pt").read_bytes()).hexdigest()[:12]
    assert f'TI hashes: "{NAME}: {digest}"' in info

    pipe = StableDiffusionPipeline.from_pretrained(
        str(convert(path, tmp_path / "diffusers")),
        local_files_only=True,
        safety_checker=None,
        requires_safety_checker=False,
    )
    pipe.scheduler = _karras(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(str(folder / f"{NAME}.pt"), token=NAME)
    with torch.no_grad():
        ref = pipe(
            prompt.replace(f"({NAME}:1.0)", NAME),
            negative_prompt="blurry",
            height=HEIGHT,
            width=WIDTH,
            num_inference_steps=STEPS,
            guidance_scale=CFG,
            latents=_latents(model),
        ).images[0]
    _check(ours, ref, plain, "sd1 generate")


def test_non_fitting_file_is_refused(sd1, tmp_path: Path) -> None:
    path, model, _ = sd1
    save_file({"emb_params": torch.zeros(1, 768)}, tmp_path / "wide.safetensors")
    req = GenerationRequest("a wide photo", width=64, height=64, steps=1, embedding_dirs=(str(tmp_path),))
    with pytest.raises(EmbeddingError, match=r"wide\.safetensors.*width 768.*width is 128"):
        generate(model, req)
    listing = a1111_listing(
        {"wide": tmp_path / "wide.safetensors"}, model_slots(model.family, model.config.text)
    )
    assert listing == {
        "loaded": {},
        "skipped": {
            "wide": {
                "step": None,
                "sd_checkpoint": None,
                "sd_checkpoint_name": None,
                "shape": 768,
                "vectors": 1,
            }
        },
    }
    with pytest.raises(EmbeddingError, match="embedding:missing"):
        Embeddings.comfy(model, "a embedding:missing photo", [tmp_path])


def test_a1111_route_lists_fitting_embeddings(sd1, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient
    from test_server_api import folders

    from sdlab.server.app import create_app
    from sdlab.server.state import Settings

    path, _, folder = sd1
    models = tmp_path / "models"
    (models / "embeddings").mkdir(parents=True)
    (models / "tiny.safetensors").write_bytes(path.read_bytes())
    (models / "embeddings" / f"{NAME}.pt").write_bytes((folder / f"{NAME}.pt").read_bytes())
    save_file(
        {"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)},
        models / "embeddings" / "xl.safetensors",
    )
    assert checkpoint_slots(models / "tiny.safetensors") == ((None, 128),)
    with TestClient(create_app(Settings(folders(tmp_path, models))), base_url="http://localhost") as client:
        client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny.safetensors"})
        listing = client.get("/sdapi/v1/embeddings").json()
    assert listing["loaded"] == {
        NAME: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 128, "vectors": 2}
    }
    assert listing["skipped"]["xl"]["shape"] == 2048


# ---------------------------------------------------------------------------------------------
# SDXL: clip_l for CLIP-L, clip_g for bigG


def test_generate_sdxl_matches_diffusers_load_textual_inversion(tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    os.environ["HF_HUB_OFFLINE"] = "1"
    path = write_tiny("sdxl", tmp_path / "xl.safetensors", seed=0)
    model = load_model(path)
    folder = tmp_path / "embeddings"
    folder.mkdir()
    state = {"clip_l": _vectors(2, 128, 7), "clip_g": _vectors(2, 128, 8)}
    save_file(state, folder / f"{NAME}.safetensors")
    prompt = f"a red apple on a table, {NAME}"
    with torch.no_grad():  # both encoders see their own vectors
        cond, _ = encode_prompt_pair(model, prompt, "", 1, Embeddings.a1111(model, [folder]))
        swapped = tmp_path / "swapped"
        swapped.mkdir()
        save_file({"clip_l": state["clip_g"], "clip_g": state["clip_l"]}, swapped / f"{NAME}.safetensors")
        other, _ = encode_prompt_pair(model, prompt, "", 1, Embeddings.a1111(model, [swapped]))
    assert max_diff(cond.context[..., :128], other.context[..., :128]) > 1e-3
    assert max_diff(cond.context[..., 128:], other.context[..., 128:]) > 1e-3

    ours = _ours(path, folder, prompt, tmp_path / "ours.png")
    (tmp_path / "none").mkdir()  # an empty embeddings folder: the name stays plain text
    plain = _ours(path, tmp_path / "none", prompt, tmp_path / "plain.png")
    pipe = StableDiffusionXLPipeline.from_pretrained(
        str(convert(path, tmp_path / "diffusers")), local_files_only=True, add_watermarker=False
    )
    pipe.scheduler = _karras(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(
        state["clip_l"], token=NAME, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        state["clip_g"], token=NAME, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    with torch.no_grad():
        ref = pipe(
            prompt,
            negative_prompt="blurry",
            height=HEIGHT,
            width=WIDTH,
            num_inference_steps=STEPS,
            guidance_scale=CFG,
            latents=_latents(model),
        ).images[0]
    _check(ours, ref, plain, "sdxl generate")
    req = GenerationRequest(prompt, embeddings=((NAME, str(folder / f"{NAME}.safetensors")),), seed=1)
    assert f'TI hashes: "{NAME}: ' in request_infotext(req, 1, model)
