"""The discrete DDPM noise schedule seen as continuous σ, and the σ schedules samplers step through.

A DDPM timestep t ∈ {0, …, 999} with cumulative signal ᾱ_t is the noise level σ_t = √((1 − ᾱ_t)/ᾱ_t) of
the variance-exploding view x_σ = x_0 + σ·ε used by k-diffusion, AUTOMATIC1111 and ComfyUI. Schedule
names and definitions are ComfyUI's (`comfy/samplers.py: calculate_sigmas`); AUTOMATIC1111's display
names are accepted as aliases.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

ZERO_TERMINAL_SNR_ALPHA_BAR = 4.8973451890853435e-08  # ComfyUI's stand-in for ᾱ_T = 0 (σ_max ≈ 4519)


def alphas_cumprod(
    num_steps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    zero_terminal_snr: bool = False,
) -> Tensor:
    """ᾱ_t of the LDM scaled-linear β schedule in float64; optionally rescaled to zero terminal SNR."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, dim=0)
    return rescale_zero_terminal_snr(ac) if zero_terminal_snr else ac


def rescale_zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale √ᾱ to zero terminal SNR (ᾱ_T clamped as ComfyUI)."""
    s = alphas_cumprod.sqrt()
    s0, s_t = s[0].clone(), s[-1].clone()
    ac = ((s - s_t) * (s0 / (s0 - s_t))) ** 2
    ac[-1] = ZERO_TERMINAL_SNR_ALPHA_BAR
    return ac


@dataclass(frozen=True, eq=False)
class DiscreteSchedule:
    """σ of each DDPM timestep (ascending) and the log-σ-linear map between σ and fractional t."""

    sigmas: Tensor  # (num_steps,) float32, ascending: sigmas[t] is the noise level of timestep t

    @classmethod
    def ddpm(
        cls,
        num_steps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        zero_terminal_snr: bool = False,
    ) -> DiscreteSchedule:
        """The schedule of a scaled-linear DDPM (Stable Diffusion 1/2/XL by default)."""
        ac = alphas_cumprod(num_steps, beta_start, beta_end, zero_terminal_snr)
        return cls((((1 - ac) / ac) ** 0.5).float())

    @classmethod
    def for_model(cls, config: Any) -> DiscreteSchedule:
        """The schedule for a model config; a truthy `zero_terminal_snr` attribute selects ZSNR."""
        return cls.ddpm(zero_terminal_snr=bool(getattr(config, "zero_terminal_snr", False)))

    @property
    def log_sigmas(self) -> Tensor:
        return self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: Tensor, quantize: bool = False) -> Tensor:
        """Fractional timestep of σ, linear in log σ (k-diffusion); the nearest t if `quantize`."""
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.to(log_sigmas.dtype).log()
        if quantize:
            return (log_sigma[..., None] - log_sigmas).abs().argmin(dim=-1).to(log_sigmas.dtype)
        low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, len(log_sigmas) - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return (1 - w) * low + w * (low + 1)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """σ at fractional timestep t (log-σ linear interpolation, t clamped to the table)."""
        log_sigmas = self.log_sigmas.to(t.device)
        t = t.float().clamp(0, len(log_sigmas) - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()

    def percent_to_sigma(self, percent: float) -> float:
        """σ at a fraction of sampling (0: before the first step, 1: the end), as ComfyUI's discrete model
        sampling maps it: σ(t) at t = (1 − percent)·999."""
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return float(self.t_to_sigma(torch.tensor((1.0 - percent) * 999.0)))


# ---------------------------------------------------------------------------------------------
# σ schedules: (schedule, steps) -> descending σ ending in 0


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas.float(), sigmas.new_zeros(1, dtype=torch.float32)])


def karras_sigmas(schedule: DiscreteSchedule, steps: int, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022, eq. 5: σ uniform in σ^(1/ρ) between σ_max and σ_min."""
    ramp = torch.linspace(0, 1, steps)
    min_inv_rho, max_inv_rho = schedule.sigma_min ** (1 / rho), schedule.sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential_sigmas(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """σ uniform in log σ between σ_max and σ_min (k-diffusion `get_sigmas_exponential`)."""
    return _append_zero(
        torch.linspace(math.log(schedule.sigma_max), math.log(schedule.sigma_min), steps).exp()
    )


def normal_sigmas(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """Timesteps uniform from the last to the first (ComfyUI `normal`, AUTOMATIC1111 `Uniform`)."""
    return _append_zero(schedule.t_to_sigma(torch.linspace(len(schedule.sigmas) - 1, 0, steps)))


def sgm_uniform_sigmas(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """Timesteps uniform over steps + 1 points, the last (t = 0) dropped (ComfyUI `sgm_uniform`)."""
    return _append_zero(schedule.t_to_sigma(torch.linspace(len(schedule.sigmas) - 1, 0, steps + 1)[:-1]))


def simple_sigmas(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """Every (N/steps)-th table entry counting down from σ_max (ComfyUI `simple`)."""
    stride = len(schedule.sigmas) / steps
    return _append_zero(schedule.sigmas[[-(1 + int(i * stride)) for i in range(steps)]])


def ddim_uniform_sigmas(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """DDIM's uniform timesteps 1, 1 + N//steps, … (ComfyUI `ddim_uniform`; may give more than `steps`)."""
    ts = range(1, len(schedule.sigmas), max(len(schedule.sigmas) // steps, 1))
    return _append_zero(schedule.sigmas[list(ts)].flip(0))


def beta_sigmas(schedule: DiscreteSchedule, steps: int, alpha: float = 0.6, beta: float = 0.6) -> Tensor:
    """Timesteps at Beta(α, β) quantiles, repeats dropped (Lee et al. 2024, arXiv:2407.12173)."""
    quantiles = 1 - np.linspace(0, 1, steps, endpoint=False)
    # rounded to 1e-9 first so exact ties (q = 0.5 of a symmetric Beta: t = 499.5) round as exact values
    ts = np.rint(np.round(_beta_ppf(quantiles, alpha, beta) * (len(schedule.sigmas) - 1), 9)).astype(int)
    keep = [t for i, t in enumerate(ts) if i == 0 or t != ts[i - 1]]
    return _append_zero(schedule.sigmas[keep])


def kl_optimal_sigmas(schedule: DiscreteSchedule, steps: int) -> Tensor:
    """σ uniform in arctan σ from σ_max to σ_min (Sabour et al. 2024, "Align Your Steps", §3; ComfyUI
    `kl_optimal`, which gives NaN for 1 step: here σ_max)."""
    ramp = torch.arange(steps, dtype=torch.float32) / max(steps - 1, 1)
    angles = ramp * math.atan(schedule.sigma_min) + (1 - ramp) * math.atan(schedule.sigma_max)
    return _append_zero(angles.tan())


def linear_quadratic_sigmas(
    schedule: DiscreteSchedule, steps: int, threshold_noise: float = 0.025, linear_steps: int | None = None
) -> Tensor:
    """σ_max·(1 − s): s linear up to `threshold_noise` over the first half, then quadratic to 1 (Mochi's
    schedule, ComfyUI `linear_quadratic`)."""
    if steps == 1:
        return torch.tensor([1.0, 0.0]) * schedule.sigma_max
    linear_steps = steps // 2 if linear_steps is None else linear_steps
    quadratic_steps = steps - linear_steps
    step_diff = linear_steps - threshold_noise * steps
    quadratic_coef = step_diff / (linear_steps * quadratic_steps**2)
    linear_coef = threshold_noise / linear_steps - 2 * step_diff / quadratic_steps**2
    const = quadratic_coef * linear_steps**2
    ramp = [i * threshold_noise / linear_steps for i in range(linear_steps)]
    ramp += [quadratic_coef * i**2 + linear_coef * i + const for i in range(linear_steps, steps)]
    return torch.tensor([1.0 - v for v in ramp + [1.0]]) * schedule.sigma_max


def _beta_ppf(q: np.ndarray, a: float, b: float) -> np.ndarray:
    """Inverse of the regularized incomplete beta function I_x(a, b) by bisection (float64)."""
    lo, hi = np.zeros_like(q), np.ones_like(q)
    for _ in range(53):  # float64 resolution; midpoints stay strictly inside (0, 1)
        mid = (lo + hi) / 2
        below = _betainc(a, b, mid) < q
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return np.where(q >= 1, 1.0, np.where(q <= 0, 0.0, (lo + hi) / 2))  # the CDF saturates before x = 1


def _betainc(a: float, b: float, x: np.ndarray) -> np.ndarray:
    """Regularized incomplete beta I_x(a, b) for 0 < x < 1 (Numerical Recipes §6.4 continued fraction)."""
    swap = x > (a + 1) / (a + b + 2)  # the fraction converges fast below this point; use the symmetry above
    xs, aa, bb = np.where(swap, 1 - x, x), np.where(swap, b, a), np.where(swap, a, b)
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)  # symmetric in a, b
    log_front = aa * np.log(xs) + bb * np.log1p(-xs) - log_beta
    result = np.exp(log_front) * _betacf(aa, bb, xs) / aa
    return np.where(swap, 1 - result, result)


def _betacf(a: np.ndarray, b: np.ndarray, x: np.ndarray, max_iters: int = 300) -> np.ndarray:
    """Lentz's evaluation of the continued fraction for I_x(a, b)."""
    tiny = 1e-300
    c, d = np.ones_like(x), 1 - (a + b) * x / (a + 1)
    d = 1 / np.where(np.abs(d) < tiny, tiny, d)
    h = d.copy()
    for m in range(1, max_iters + 1):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1 + num * d
            d = 1 / np.where(np.abs(d) < tiny, tiny, d)
            c = 1 + num / c
            c = np.where(np.abs(c) < tiny, tiny, c)
            h = h * d * c
        if np.all(np.abs(d * c - 1) < 1e-15):
            break
    return h


Schedule = Callable[[DiscreteSchedule, int], Tensor]

SCHEDULES: dict[str, Schedule] = {
    "normal": normal_sigmas,
    "karras": karras_sigmas,
    "exponential": exponential_sigmas,
    "sgm_uniform": sgm_uniform_sigmas,
    "simple": simple_sigmas,
    "ddim_uniform": ddim_uniform_sigmas,
    "beta": beta_sigmas,
    "linear_quadratic": linear_quadratic_sigmas,
    "kl_optimal": kl_optimal_sigmas,
}
# AUTOMATIC1111 display names (lower-cased) that differ from ComfyUI's
SCHEDULE_ALIASES = {
    "uniform": "normal",
    "sgm uniform": "sgm_uniform",
    "sgmuniform": "sgm_uniform",
    "ddim": "ddim_uniform",
    "kl optimal": "kl_optimal",
    "linear quadratic": "linear_quadratic",
}


SCHEDULE_DISPLAY = {
    "normal": "Uniform",
    "karras": "Karras",
    "exponential": "Exponential",
    "sgm_uniform": "SGM Uniform",
    "simple": "Simple",
    "ddim_uniform": "DDIM",
    "beta": "Beta",
    "linear_quadratic": "Linear Quadratic",
    "kl_optimal": "KL Optimal",
}


def schedule_display_name(name: str) -> str:
    """AUTOMATIC1111's display name of a schedule (its "Schedule type" infotext field)."""
    return SCHEDULE_DISPLAY[schedule_name(name)]


def schedule_name(name: str) -> str:
    """The ComfyUI name of a schedule given by its ComfyUI or AUTOMATIC1111 name (case-insensitive)."""
    key = name.strip().lower()
    key = SCHEDULE_ALIASES.get(key, key)
    if key in SCHEDULES:
        return key
    if key == "automatic":
        raise ValueError(
            "schedule 'Automatic' depends on the sampler: use resolve_sampler(sampler, 'Automatic')"
        )
    raise ValueError(
        f"unknown schedule {name!r}; valid: {', '.join(SCHEDULES)} (or Uniform, SGM Uniform, DDIM)"
    )


def get_sigmas(
    name: str, schedule: DiscreteSchedule, steps: int, *, discard_penultimate: bool = False
) -> Tensor:
    """Descending float32 σ for `steps` steps, ending in 0 (steps + 1 values; ddim_uniform may give more).

    `discard_penultimate` computes one step more and drops the σ before the final 0, as ComfyUI and
    AUTOMATIC1111 do for DPM2 and UniPC.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    fn = SCHEDULES[schedule_name(name)]
    if not discard_penultimate:
        return fn(schedule, steps)
    sigmas = fn(schedule, steps + 1)
    return torch.cat([sigmas[:-2], sigmas[-1:]])
