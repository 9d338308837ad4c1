"""Conditioning as a record, and prompts turned into it by a model's own text encoders.

A `Conditioning` holds what the U-Net sees besides the noisy latents and the timestep: the
cross-attention context, and for families with a vector input (SDXL) the pooled text embedding and the
size / crop / aesthetic-score values that become `y`. Sizes left unset follow the image being sampled
(ComfyUI's `encode_adm`, A1111's and diffusers' defaults), so one record serves any resolution. It is
also ComfyUI's CONDITIONING value. Later features (control residuals, masks, areas, timestep ranges)
add fields here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sdlab.families import VECTOR_EMBED_DIM, Family
from sdlab.finite import check_finite, overflow_cause
from sdlab.models.unet import timestep_embedding
from sdlab.offload import at_home
from sdlab.text.comfy_prompt import comfy_chunks
from sdlab.text.prompt import Chunk, chunk_prompt, encode_chunks, pad_chunks
from sdlab.text.schedule import prompt_schedule, split_and

if TYPE_CHECKING:
    from sdlab.checkpoints.load import StableDiffusion
    from sdlab.control import ComfyControl
    from sdlab.embeddings import Embeddings


@dataclass(frozen=True)
class Conditioning:
    """Cross-attention context (1, T, d) and, for SDXL families, what the vector input y is made of."""

    context: Tensor
    pooled: Tensor | None = None  # (1, P): the pooled, projected output of the family's pooled encoder
    original_size: tuple[int, int] | None = None  # (height, width); None: the sampled image's size
    crop: tuple[int, int] = (0, 0)  # crop_coords_top_left (top, left)
    target_size: tuple[int, int] | None = None  # (height, width); None: the sampled image's size
    aesthetic_score: float | None = None  # refiner; None: the family's score for a positive/negative prompt
    # ComfyUI's area / mask / timestep range (`sdlab.regions` weights the entries as ComfyUI samples them)
    area: tuple | None = None  # (height, width, y, x) in latent pixels, or ("percentage", h, w, y, x)
    strength: float = 1.0  # the area's weight
    mask: Tensor | None = None  # (N, H, W) in [0, 1]: where this entry conditions, at any resolution
    mask_strength: float = 1.0
    set_area_to_bounds: bool = False  # the mask's bounding box becomes the area
    start_percent: float | None = None  # active from this fraction of the schedule ...
    end_percent: float | None = None  # ... to this one (ConditioningSetTimestepRange)
    # ComfyUI's ControlNets on this entry (ControlNetApply/-Advanced): a chain, summed (sdlab.control)
    control: tuple[ComfyControl, ...] = ()
    control_apply_to_uncond: bool = False  # ControlNetApply's: the negative side gets it too

    @property
    def regional(self) -> bool:
        """Whether this entry limits where or when it conditions (ComfyUI's weighting is then needed)."""
        fields = (self.area, self.mask, self.start_percent, self.end_percent)
        return any(f is not None for f in fields) or self.strength != 1.0

    def model_inputs(
        self, family: Family, batch: int, height: int, width: int, negative: bool = False
    ) -> dict[str, Tensor]:
        """Keyword inputs of the U-Net for a batch of `height` x `width` images: context, and y when the
        family has a vector input. `negative`: this is the unconditional side (refiner aesthetic score)."""
        inputs = {"context": self.context.expand(batch, -1, -1)}
        if family.vector:
            inputs["y"] = self.vector(family, height, width, negative).expand(batch, -1)
        return inputs

    def vector(self, family: Family, height: int, width: int, negative: bool = False) -> Tensor:
        """y (N, adm) = pooled (N, P) ‖ sinusoidal embeddings (256 each) of the family's size/score fields."""
        if self.pooled is None:
            raise ValueError(
                f"a {family.label} model needs a pooled text embedding; encode with its own CLIP"
            )
        score = self.aesthetic_score
        if score is None:
            score = family.aesthetic_scores[1 if negative else 0]
        values = {
            "original_size": self.original_size or (height, width),
            "crop_coords_top_left": self.crop,
            "target_size": self.target_size or (height, width),
            "aesthetic_score": (score,),
        }
        scalars = torch.tensor([float(v) for field in family.vector for v in values[field]])
        emb = timestep_embedding(scalars, VECTOR_EMBED_DIM).reshape(1, -1)
        return torch.cat([self.pooled, emb.to(self.pooled).expand(self.pooled.shape[0], -1)], dim=1)

    def zeroed(self) -> Conditioning:
        """The same record with context and pooled embedding zeroed (A1111's empty negative for SDXL)."""
        pooled = None if self.pooled is None else torch.zeros_like(self.pooled)
        return replace(self, context=torch.zeros_like(self.context), pooled=pooled)


def encode_text(
    model: StableDiffusion,
    texts: str | Sequence[str],
    layer: int | None = None,
    embeddings: Embeddings | None = None,
) -> Conditioning:
    """One prompt's conditioning as ComfyUI's CLIPTextEncode makes it, k = its own chunk count: ComfyUI's
    syntax, chunks and weighting (`sdlab.text.comfy_prompt`). `texts`: one prompt for all encoders, or
    one per encoder (SDXL's text_l / text_g, the shorter padded with empty chunks); `layer` from the end,
    default the family's; `embeddings`: the textual-inversion embeddings the prompts may name
    (`Embeddings.comfy`, `embedding:NAME`)."""
    chunks = _chunks(model, texts, embeddings, comfy=True)
    encoded = _encode(model, chunks, max(len(c) for c in chunks), layer or model.text_layer(), comfy=True)
    at_home(model.text_encoders)  # `--offload model`: off the device once the prompt is encoded
    return encoded


@dataclass(frozen=True)
class Prompt:
    """An A1111 prompt over a sampling run: composable parts (`AND`) with their weights, each a schedule
    of conditionings by model call (prompt editing, alternation): `((last_step, Conditioning), …)`."""

    parts: tuple[tuple[tuple[tuple[int, Conditioning], ...], float], ...]

    def at(self, call: int) -> list[tuple[Conditioning, float]]:
        """The weighted conditionings of model call `call` (0, 1, …), as A1111's denoiser picks them."""
        return [(next((c for last, c in sched if call <= last), sched[-1][1]), w) for sched, w in self.parts]

    def single(self) -> Conditioning:
        """The one conditioning of a prompt without `AND`, editing or alternation."""
        if len(self.parts) != 1 or len(self.parts[0][0]) != 1 or self.parts[0][1] != 1:
            raise ValueError("this prompt changes during sampling or has AND parts: use Prompt.at(call)")
        return self.parts[0][0][0][1]

    def map(self, f: Callable[[Conditioning], Conditioning]) -> Prompt:
        """The same prompt with `f` applied to each of its conditionings."""
        return Prompt(tuple((tuple((last, f(c)) for last, c in sched), w) for sched, w in self.parts))


def encode_prompts(
    model: StableDiffusion,
    prompt: str,
    negative: str,
    steps: int,
    clip_skip: int = 1,
    embeddings: Embeddings | None = None,
    first_pass: int | None = None,
) -> tuple[Prompt, Prompt]:
    """(prompt, negative) as AUTOMATIC1111 conditions on them over `steps` steps: `AND` parts (the
    negative has none), prompt editing and alternation (`sdlab.text.schedule`), every distinct text
    encoded once, all padded with empty chunks to one length; a negative prompt that is empty at every
    step is zeroed for families where A1111 does so (SDXL: `force_zero_negative_prompt`). `clip_skip`
    counts from the family's own layer on every encoder (for SDXL, where A1111 ignores its option by
    default, this is diffusers' `clip_skip` + 1). `embeddings`: the textual-inversion embeddings both
    prompts may name (`Embeddings.a1111`: file stems). `first_pass`: the first pass's steps when these
    `steps` are a hires fix's second pass (prompt editing counts on from the first pass, as in A1111)."""
    positive = [(prompt_schedule(text, steps, first_pass), w) for text, w in split_and(prompt)]
    negative_schedule = prompt_schedule(negative, steps, first_pass)
    texts = {t for sched, _ in positive for _, t in sched} | {t for _, t in negative_schedule}
    chunks = {t: _chunks(model, t, embeddings) for t in texts}
    count = max(len(c) for per in chunks.values() for c in per)
    layer = model.text_layer(clip_skip)
    encoded = {t: _encode(model, c, count, layer) for t, c in chunks.items()}
    at_home(model.text_encoders)  # `--offload model`: off the device once the prompts are encoded
    zero = model.family.zero_empty_negative and all(t == "" for _, t in negative_schedule)
    negative_table = {**encoded, "": encoded[""].zeroed()} if zero else encoded

    def schedule(entries: list[tuple[int, str]], table: dict[str, Conditioning]) -> tuple:
        return tuple((last, table[t]) for last, t in entries)

    return (
        Prompt(tuple((schedule(sched, encoded), w) for sched, w in positive)),
        Prompt(((schedule(negative_schedule, negative_table), 1.0),)),
    )


def encode_prompt_pair(
    model: StableDiffusion,
    prompt: str,
    negative: str,
    clip_skip: int = 1,
    embeddings: Embeddings | None = None,
) -> tuple[Conditioning, Conditioning]:
    """(cond, uncond) of a prompt without `AND`, editing or alternation (`encode_prompts` at one step)."""
    cond, uncond = encode_prompts(model, prompt, negative, 1, clip_skip, embeddings)
    return cond.single(), uncond.single()


def _chunks(
    model: StableDiffusion,
    texts: str | Sequence[str],
    embeddings: Embeddings | None = None,
    comfy: bool = False,
) -> list[list[Chunk]]:
    """Each encoder's 77-token chunks of its prompt, A1111's or ComfyUI's (encoders differ in their padding
    token and in the vectors of an embedding)."""
    configs = model.config.text
    per_encoder = [texts] * len(configs) if isinstance(texts, str) else list(texts)
    if len(per_encoder) != len(configs):
        raise ValueError(f"{len(per_encoder)} prompts for {len(configs)} text encoders")
    chunker = comfy_chunks if comfy else chunk_prompt
    return [
        chunker(model.tokenizer, t, c.pad_token, None if embeddings is None else embeddings.encoder(i))
        for i, (t, c) in enumerate(zip(per_encoder, configs, strict=True))
    ]


def _encode(
    model: StableDiffusion, chunks: list[list[Chunk]], count: int, layer: int, comfy: bool = False
) -> Conditioning:
    """Every encoder's chunks padded to `count` with empty ones, encoded at `layer` with A1111's or
    ComfyUI's weighting, contexts joined along the channels (SDXL: CLIP-L 768 ‖ bigG 1280); pooled from
    the family's pooled encoder."""
    contexts, pooled = [], None
    for encoder, spec, cfg, own in zip(
        model.text_encoders, model.family.text, model.config.text, chunks, strict=True
    ):
        empty = chunk_prompt(model.tokenizer, "", cfg.pad_token)[0]  # the same chunk in both syntaxes
        padded = pad_chunks(own, count, empty)
        z, p = encode_chunks(encoder, padded, layer, spec.final_norm, empty if comfy else None)
        contexts.append(check_finite(z, "the text encoder's output", overflow_cause("text encoder", z.dtype)))
        if spec.pooled:
            pooled = p
    return Conditioning(torch.cat(contexts, dim=-1), pooled)


def encode_captions(
    model_family: Family,
    encoders: Sequence[torch.nn.Module],
    ids: Sequence[Tensor],
    layer: int,
) -> Conditioning:
    """A batch's conditioning from each encoder's token ids (B, 77) (training: no prompt syntax)."""
    contexts, pooled = [], None
    for encoder, spec, enc_ids in zip(encoders, model_family.text, ids, strict=True):
        z, p = encoder.encode(enc_ids, layer, spec.final_norm)
        contexts.append(z)
        if spec.pooled:
            pooled = p
    return Conditioning(torch.cat(contexts, dim=-1), pooled)
