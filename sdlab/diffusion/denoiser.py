"""A U-Net trained on DDPM timesteps, seen as a denoiser D(x, σ) ≈ E[x_0 | x_0 + σε = x] (Karras et al. 2022).

D(x, σ) = c_skip·x + c_out·F(c_in·x, t(σ)) with c_in = 1/√(σ²+1), the scalings of k-diffusion's
`DiscreteEpsDDPMDenoiser` (ε-prediction: c_skip = 1, c_out = −σ) and `DiscreteVDDPMDenoiser`
(v-prediction: c_skip = 1/(σ²+1), c_out = −σ/√(σ²+1)).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Literal

import torch
from torch import Tensor

from sdlab.diffusion.schedule import DiscreteSchedule

Model = Callable[..., Tensor]  # model(x_in, t, **cond) -> ε or v, e.g. unet(x, t, context=..., y=...)
DenoiserFn = Callable[..., Tensor]  # D(x, sigma (B,), **cond) -> denoised x_0
_UNCOND_SINK: ContextVar[list[Tensor] | None] = ContextVar("uncond_sink", default=None)


def _per_sample(sigma: Tensor, x: Tensor) -> Tensor:
    """σ of shape (B,) as (B, 1, …, 1) on x's device, at least float32 (fp32 scalings for half x)."""
    return sigma.to(x.device, torch.promote_types(x.dtype, torch.float32)).reshape(-1, *[1] * (x.ndim - 1))


class Denoiser:
    """D(x, σ, **cond) for an ε- or v-prediction model on a discrete DDPM schedule."""

    def __init__(
        self,
        model: Model,
        schedule: DiscreteSchedule,
        prediction: Literal["eps", "v"] = "eps",
        quantize: bool = False,
    ) -> None:
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
        self.model, self.schedule, self.prediction, self.quantize = model, schedule, prediction, quantize

    def __call__(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        s = _per_sample(sigma, x)  # (B, 1, 1, 1)
        c_in = (s**2 + 1) ** -0.5
        t = self.schedule.sigma_to_t(sigma.to(x.device, torch.float32), self.quantize)
        out = self.model((x * c_in).to(x.dtype), t, **cond)
        if self.prediction == "eps":
            return (x - out * s).to(x.dtype)
        return (x * c_in**2 - out * s * c_in).to(x.dtype)

    def training_pair(self, x0: Tensor, noise: Tensor, t: Tensor, **cond: Any) -> tuple[Tensor, Tensor]:
        """(model output, its target) at the DDPM timesteps t (B,) (integers): the model sees
        x_σ = x_0 + σε scaled by c_in and learns ε, or v = c_in·(ε − σ·x_0) (Salimans & Ho 2022)."""
        sigma = self.schedule.sigmas.to(x0.device)[t]
        s = _per_sample(sigma, x0)
        c_in = (s**2 + 1) ** -0.5
        out = self.model(add_noise(x0, noise, sigma) * c_in, t.float(), **cond)
        return out, noise if self.prediction == "eps" else c_in * (noise - s * x0)


def guide(
    denoiser: DenoiserFn,
    x: Tensor,
    sigma: Tensor,
    conds: Sequence[tuple[Mapping[str, Any], float]],
    uncond: Mapping[str, Any],
    scale: float,
    extra: Mapping[str, Any],
) -> Tensor:
    """Classifier-free guidance (Ho & Salimans 2022) over weighted conditions (composable diffusion, Liu
    et al. 2022): D_u + Σ wᵢ·scale·(D_cᵢ − D_u), as A1111's `combine_denoised`, in one batched call when
    the inputs' shapes agree. One condition of weight 1 at scale 1 skips the unconditional side.

    `conds` and `uncond` map keyword names to batch-first tensors (e.g. {"context": (B, 77, 768)}).
    """
    sink = _UNCOND_SINK.get()
    if scale == 1 and len(conds) == 1 and conds[0][1] == 1 and sink is None:
        return denoiser(x, sigma, **conds[0][0], **extra)
    sides = [c for c, _ in conds] + [uncond]
    for side in sides[:-1]:
        if side.keys() != uncond.keys():
            raise ValueError(f"cond and uncond name different inputs: {sorted(side)} vs {sorted(uncond)}")
    n = len(sides)
    if all(_batchable(side[k], uncond[k]) for side in sides[:-1] for k in uncond):
        out = denoiser(torch.cat([x] * n), torch.cat([sigma] * n), **_cat(sides), **_cat([extra] * n)).chunk(
            n
        )
    else:
        out = tuple(denoiser(x, sigma, **side, **extra) for side in sides)
    d_uncond = out[-1]
    if sink is not None:
        sink.append(d_uncond)
    result = d_uncond
    for d_cond, (_, weight) in zip(out[:-1], conds, strict=True):
        result = result + (d_cond - d_uncond) * (weight * scale)
    return result


@contextmanager
def recording_uncond() -> Iterator[list[Tensor]]:
    """Collects the unconditional predictions D_u that `guide` computes inside the block, at every scale
    (ComfyUI's post-CFG `uncond_denoised` with the scale-1 shortcut off): CFG++ samplers step along D_u."""
    sink: list[Tensor] = []
    token = _UNCOND_SINK.set(sink)
    try:
        yield sink
    finally:
        _UNCOND_SINK.reset(token)


def cfg_denoiser(
    denoiser: DenoiserFn, cond: Mapping[str, Any], uncond: Mapping[str, Any], scale: float
) -> DenoiserFn:
    """D(x, σ) guided by one fixed condition: D_u + scale·(D_c − D_u) (`guide`)."""
    return lambda x, sigma, **extra: guide(denoiser, x, sigma, [(cond, 1.0)], uncond, scale, extra)


def _batchable(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape[1:] == b.shape[1:]
    return not isinstance(a, Tensor) and not isinstance(b, Tensor) and a == b


def _cat(sides: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Tensors of keyword sets concatenated along the batch; anything else taken from the first."""
    return {k: torch.cat([s[k] for s in sides]) if isinstance(v, Tensor) else v for k, v in sides[0].items()}


def add_noise(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """x_σ = x_0 + σ·ε with σ per sample (B,): the noisy input a Denoiser expects (the forward process)."""
    return x0 + noise * _per_sample(sigma, x0).to(x0.dtype)
