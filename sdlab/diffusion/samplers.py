"""Samplers: pure functions over a denoiser D(x, σ) that take x from σ = sigmas[0] down to sigmas[-1].

Every sampler is `sample_x(denoiser, x, sigmas, *, extra=None, callback=None, generator=None, **options)`
in k-diffusion's formulation (what AUTOMATIC1111 and ComfyUI run): x is the variance-exploding sample
x_0 + σ·ε, `denoiser(x, sigma_per_sample, **extra)` returns the estimate of x_0, `callback(i, sigma, x,
denoised)` sees the first evaluation of each step. Fresh noise comes from `generator` (one
torch.Generator, or one per batch element), drawn on the generator's device so a seed gives the same
result on any device; stochastic samplers also take a `noise_sampler(sigma, sigma_next)` that overrides
it. Where k-diffusion defaults to a Brownian tree (the SDE samplers), ours draw per-step noise with the
same joint law (`BrownianNoiseSampler` for dpmpp_sde's nested intervals, plain Gaussian noise for the
disjoint intervals of the others), not the same numbers. Names are ComfyUI's, with AUTOMATIC1111's
display names as aliases.
"""

from __future__ import annotations

import inspect
import math
from collections import deque
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from sdlab.diffusion.denoiser import recording_uncond
from sdlab.diffusion.schedule import DiscreteSchedule, schedule_name

DenoiserFn = Callable[..., Tensor]  # D(x, sigma (B,), **extra) -> denoised x_0
Callback = Callable[[int, Tensor, Tensor, Tensor], None]  # (step, sigma, x, denoised)
Generators = torch.Generator | Sequence[torch.Generator] | None
# (sigma, sigma_next) -> standard normal noise shaped like x
NoiseSampler = Callable[[Tensor, Tensor], Tensor]
Sampler = Callable[..., Tensor]
Model = Callable[..., Tensor]  # model(x, sigma, step=None) -> denoised; see _bind


def randn_like(x: Tensor, generator: Generators = None) -> Tensor:
    """Standard normal noise shaped like x, drawn in float32 on the generator's device and moved to x.

    A sequence holds one generator per batch element; each draws that element's noise, so a batch
    gives the same noise as separate runs.
    """
    if isinstance(generator, Sequence):
        if len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
        return torch.cat([randn_like(xi[None], g) for xi, g in zip(x, generator, strict=True)])
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(x.shape, generator=generator, device=device).to(x.device, x.dtype)


def gaussian_noise_sampler(x: Tensor, generator: Generators = None) -> NoiseSampler:
    """Independent N(0, I) noise at every call (k-diffusion's `default_noise_sampler`, seeded)."""
    return lambda sigma, sigma_next: randn_like(x, generator)


class BrownianNoiseSampler:
    """Normalized increments (W(σ_next) − W(σ))/√|σ_next − σ| of one Brownian path W in σ.

    A call from the same σ over a longer interval extends the previous increment instead of drawing
    it afresh, which gives `sample_dpmpp_sde`'s two nested intervals per step the joint law that
    k-diffusion's Brownian tree gives them; disjoint intervals get independent noise.
    """

    def __init__(self, x: Tensor, generator: Generators = None) -> None:
        self.x, self.generator = x, generator
        self.last: tuple[float, float, Tensor] | None = None  # (σ, σ_next, W(σ_next) − W(σ))

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        a, b = float(sigma), float(sigma_next)
        fresh = randn_like(self.x, self.generator)
        if self.last is not None and self.last[0] == a and abs(b - a) > abs(self.last[1] - a):
            w = self.last[2] + fresh * abs(b - self.last[1]) ** 0.5
        else:
            w = fresh * abs(b - a) ** 0.5
        self.last = (a, b, w)
        return w / abs(b - a) ** 0.5


def _bind(denoiser: DenoiserFn, extra: dict[str, Any] | None, callback: Callback | None) -> Model:
    """The denoiser with σ broadcast over the batch and `extra` bound; `step=i` reports to callback."""
    extra = extra or {}

    def model(x: Tensor, sigma: Tensor, step: int | None = None) -> Tensor:
        denoised = denoiser(x, sigma.to(x.device).expand(x.shape[0]), **extra)
        if callback is not None and step is not None:
            callback(step, sigma, x, denoised)
        return denoised

    return model


def _to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """dx/dσ of the probability-flow ODE (Karras et al. 2022, eq. 3 with σ(t) = t)."""
    return (x - denoised) / sigma


def _ancestral_step(sigma: Tensor, sigma_next: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    """Split σ → σ_next into a deterministic step to σ_down and noise σ_up (σ_down² + σ_up² = σ_next²)."""
    if not eta:
        return sigma_next, torch.zeros_like(sigma_next)
    sigma_up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up


def _t(sigma: Tensor) -> Tensor:
    """λ = −log σ, the half log-SNR time of DPM-Solver (α = 1 in the variance-exploding view)."""
    return sigma.log().neg()


def _sigma(t: Tensor) -> Tensor:
    return t.neg().exp()


# ---------------------------------------------------------------------------------------------
# single-step methods: (model, x, denoised at σ, σ, σ_next) -> x at σ_next


def _euler_step(model: Model, x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    return x + _to_d(x, sigma, denoised) * (sigma_next - sigma)


def _heun_step(model: Model, x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    d = _to_d(x, sigma, denoised)
    x_2 = x + d * (sigma_next - sigma)
    if sigma_next == 0:
        return x_2
    d_2 = _to_d(x_2, sigma_next, model(x_2, sigma_next))
    return x + (d + d_2) / 2 * (sigma_next - sigma)


def _dpm_2_step(model: Model, x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    d = _to_d(x, sigma, denoised)
    if sigma_next == 0:
        return x + d * (sigma_next - sigma)
    sigma_mid = sigma.log().lerp(sigma_next.log(), 0.5).exp()
    x_2 = x + d * (sigma_mid - sigma)
    d_2 = _to_d(x_2, sigma_mid, model(x_2, sigma_mid))
    return x + d_2 * (sigma_next - sigma)


def _dpmpp_2s_step(model: Model, x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    if sigma_next == 0:
        return _euler_step(model, x, denoised, sigma, sigma_next)
    t, t_next = _t(sigma), _t(sigma_next)
    h = t_next - t
    s = t + h / 2
    x_2 = (_sigma(s) / _sigma(t)) * x - (-h / 2).expm1() * denoised
    denoised_2 = model(x_2, _sigma(s))
    return (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised_2


def _single_step_sampler(
    step: Callable[..., Tensor],
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra: dict[str, Any] | None,
    callback: Callback | None,
    generator: Generators,
    eta: float = 0.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """The single-step samplers' loop: step to σ_down, then add σ_up of fresh noise (ancestral if eta > 0)."""
    model = _bind(denoiser, extra, callback)
    noise = noise_sampler or gaussian_noise_sampler(x, generator)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma, i)
        sigma_down, sigma_up = _ancestral_step(sigma, sigma_next, eta)
        x = step(model, x, denoised, sigma, sigma_down)
        if eta and sigma_next > 0:
            x = x + noise(sigma, sigma_next) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_euler(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generators = None,
) -> Tensor:
    """Euler steps on the probability-flow ODE (Karras et al. 2022, Alg. 2 without churn); DDIM with η = 0."""
    return _single_step_sampler(_euler_step, denoiser, x, sigmas, extra, callback, generator)


@torch.no_grad()
def sample_euler_ancestral(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generators = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Ancestral sampling with Euler steps (k-diffusion `sample_euler_ancestral`)."""
    return _single_step_sampler(
        _euler_step, denoiser, x, sigmas, extra, callback, generator, eta, s_noise, noise_sampler
    )


@torch.no_grad()
def sample_heun(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generators = None,
) -> Tensor:
    """Heun's second-order steps (Karras et al. 2022, Algorithm 1); Euler into σ = 0."""
    return _single_step_sampler(_heun_step, denoiser, x, sigmas, extra, callback, generator)


@torch.no_grad()
def sample_dpm_2(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generators = None,
) -> Tensor:
    """DPM-Solver-2 (Lu et al. 2022) midpoint steps in log σ, as k-diffusion's `sample_dpm_2`."""
    return _single_step_sampler(_dpm_2_step, denoiser, x, sigmas, extra, callback, generator)


@torch.no_grad()
def sample_dpm_2_ancestral(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generators = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Ancestral sampling with DPM-Solver-2 steps (k-diffusion `sample_dpm_2_ancestral`)."""
    return _single_step_sampler(
        _dpm_2_step, denoiser, x, sigmas, extra, callback, generator, eta, s_noise, noise_sampler
    )


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generators = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Ancestral sampling with DPM-Solver++(2S) steps (Lu et al. 2022b, Algorithm 1 with r = 1/2)."""
    return _single_step_sampler(
        _dpmpp_2s_step, denoiser, x, sigmas, extra, callback, generator, eta, s_noise, noise_sampler
    )


@torch.no_grad()
def sample_lcm(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generators = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Latent consistency multistep sampling (Luo et al. 2023): jump to D(x, σ), re-noise to σ_next."""
    model = _bind(denoiser, extra, callback)
    noise = noise_sampler or gaussian_noise_sampler(x, generator)
    for i in range(len(sigmas) - 1):
        x = model(x, sigmas[i], i)
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1]
    return x


@torch.no_grad()
def sample_dpmpp_sde(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generators = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """DPM-Solver++ (stochastic), k-diffusion's `sample_dpmpp_sde`: two ancestral stages split at ratio r.

    The default noise follows one Brownian path across each step's two stages (`BrownianNoiseSampler`).
    """
    model = _bind(denoiser, extra, callback)
    noise = noise_sampler or BrownianNoiseSampler(x, generator)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma, i)
        if sigma_next == 0:
            x = _euler_step(model, x, denoised, sigma, sigma_next)
            continue
        t, t_next = _t(sigma), _t(sigma_next)
        s = t + (t_next - t) * r
        sd, su = _ancestral_step(_sigma(t), _sigma(s), eta)  # stage 1: t -> s
        s_ = _t(sd)
        x_2 = (_sigma(s_) / _sigma(t)) * x - (t - s_).expm1() * denoised
        x_2 = x_2 + noise(_sigma(t), _sigma(s)) * s_noise * su
        denoised_2 = model(x_2, _sigma(s))
        sd, su = _ancestral_step(_sigma(t), _sigma(t_next), eta)  # stage 2: t -> t_next
        t_next_ = _t(sd)
        denoised_d = (1 - 1 / (2 * r)) * denoised + 1 / (2 * r) * denoised_2
        x = (_sigma(t_next_) / _sigma(t)) * x - (t - t_next_).expm1() * denoised_d
        x = x + noise(_sigma(t), _sigma(t_next)) * s_noise * su
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generators = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2) with variable steps; first order into σ = 0."""
    model = _bind(denoiser, extra, callback)
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i], i)
        t, t_next = _t(sigmas[i]), _t(sigmas[i + 1])
        h = t_next - t
        denoised_d = denoised
        if old_denoised is not None and sigmas[i + 1] != 0:
            r = (t - _t(sigmas[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generators = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    solver_type: Literal["midpoint", "heun"] = "midpoint",
) -> Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022b, SDE-DPM-Solver++(2M)), k-diffusion's `sample_dpmpp_2m_sde`."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    model = _bind(denoiser, extra, callback)
    noise = noise_sampler or gaussian_noise_sampler(x, generator)
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma, i)
        if sigma_next == 0:
            x = denoised
            continue
        h = _t(sigma_next) - _t(sigma)
        eta_h = eta * h
        phi = (-h - eta_h).expm1().neg()
        x = sigma_next / sigma * (-eta_h).exp() * x + phi * denoised
        if old_denoised is not None:
            r = h_last / h
            correction = phi / (-h - eta_h) + 1 if solver_type == "heun" else 0.5 * phi
            x = x + correction * (1 / r) * (denoised - old_denoised)
        if eta:
            x = x + noise(sigma, sigma_next) * sigma_next * (-2 * eta_h).expm1().neg().sqrt() * s_noise
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generators = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """DPM-Solver++(3M) SDE: third-order multistep exponential integrator (k-diffusion's)."""
    model = _bind(denoiser, extra, callback)
    noise = noise_sampler or gaussian_noise_sampler(x, generator)
    denoised_1 = denoised_2 = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma, i)
        h = None
        if sigma_next == 0:
            x = denoised
        else:
            h = _t(sigma_next) - _t(sigma)
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            phi_2 = h_eta.neg().expm1() / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (denoised - denoised_1) / r0, (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            elif h_1 is not None:
                x = x + phi_2 * ((denoised - denoised_1) / (h_1 / h))
            if eta:
                x = x + noise(sigma, sigma_next) * sigma_next * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        denoised_1, denoised_2, h_1, h_2 = denoised, denoised_1, h, h_1
    return x


@torch.no_grad()
def sample_lms(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generators = None,
    order: int = 4,
) -> Tensor:
    """Linear multistep in σ (k-diffusion `sample_lms`): Adams–Bashforth over the last `order` derivatives."""
    model = _bind(denoiser, extra, callback)
    nodes = sigmas.detach().cpu().double().numpy()
    ds: deque[Tensor] = deque(maxlen=order)
    for i in range(len(sigmas) - 1):
        ds.appendleft(_to_d(x, sigmas[i], model(x, sigmas[i], i)))
        coeffs = [_lms_coeff(nodes, i, j, len(ds)) for j in range(len(ds))]
        x = x + sum(c * d for c, d in zip(coeffs, ds, strict=True))
    return x


def _lms_coeff(t: np.ndarray, i: int, j: int, order: int) -> float:
    """∫ from t_i to t_{i+1} of the Lagrange basis polynomial that is 1 at t_{i-j}, 0 at the other t_{i-k}."""
    basis = np.polynomial.Polynomial([1.0])
    for k in range(order):
        if k != j:
            basis = basis * np.polynomial.Polynomial([-t[i - k], 1.0]) / (t[i - j] - t[i - k])
    integral = basis.integ()
    return float(integral(t[i + 1]) - integral(t[i]))


@torch.no_grad()
def sample_uni_pc(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generators = None,
    order: int = 3,
    variant: Literal["bh1", "bh2"] = "bh1",
) -> Tensor:
    """UniPC (Zhao et al. 2023): multistep UniP predictor + UniC corrector on x_0 predictions, B(h) bh1/bh2.

    Orders ramp up from 1 and fall again over the final steps (`lower_order_final`), as in ComfyUI and
    diffusers; the corrector reuses the next step's model evaluation, so each step costs one call.
    """
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
    n = len(sigmas) - 1
    if n < 1:
        return x
    model = _bind(denoiser, extra, callback)
    lambdas = _t(sigmas.detach().cpu().double())  # λ_i = −log σ_i (inf at σ = 0); float64 for the weights
    history = [model(x, sigmas[0], 0)]  # data predictions D_i, newest last
    for i in range(n):
        k = min(order, i + 1, n - i)
        rho_p, rho_c, h_phi_1, b_h = _unipc_coefficients(lambdas, i, k, variant)
        d0 = history[-1]
        diffs = [(history[-1 - m] - d0) / float(_unipc_r(lambdas, i, m)) for m in range(1, k)]  # D1s
        x_base = (sigmas[i + 1] / sigmas[i]) * x - h_phi_1 * d0
        x_pred = x_base - b_h * _weighted(rho_p, diffs) if diffs else x_base  # UniP
        if i == n - 1:
            return x_pred
        d_next = model(x_pred, sigmas[i + 1], i + 1)
        x = x_base - b_h * (_weighted(rho_c[:-1], diffs) + rho_c[-1] * (d_next - d0))  # UniC
        history = (history + [d_next])[-order:]
    return x


def _weighted(weights: list[float], tensors: list[Tensor]) -> Tensor | float:
    return sum((w * t for w, t in zip(weights, tensors, strict=True)), 0.0)


def _unipc_r(lambdas: Tensor, i: int, m: int) -> Tensor:
    """r_m = (λ_{i−m} − λ_i) / h_i: the position of an older data prediction in units of the current step."""
    return (lambdas[i - m] - lambdas[i]) / (lambdas[i + 1] - lambdas[i])


def _unipc_coefficients(
    lambdas: Tensor, i: int, k: int, variant: str
) -> tuple[list[float], list[float], float, float]:
    """UniPC's predictor/corrector weights ρ_p, ρ_c (the R·ρ = b systems), h·φ₁(−h) and B(h), in float64."""
    h = lambdas[i + 1] - lambdas[i]
    hh = -h
    h_phi_1 = torch.expm1(hh)  # e^{−h} − 1
    b_h = hh if variant == "bh1" else h_phi_1
    rks = torch.stack([_unipc_r(lambdas, i, m) for m in range(1, k)] + [torch.ones_like(h)])
    h_phi_k, factorial, b = h_phi_1 / hh - 1, 1, []
    for p in range(1, k + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= p + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    big_r, big_b = torch.stack([rks ** (p - 1) for p in range(1, k + 1)]), torch.stack(b)
    rho_p = [] if k == 1 else [0.5] if k == 2 else torch.linalg.solve(big_r[:-1, :-1], big_b[:-1]).tolist()
    rho_c = [0.5] if k == 1 else torch.linalg.solve(big_r, big_b).tolist()
    return rho_p, rho_c, float(h_phi_1), float(b_h)


# ---------------------------------------------------------------------------------------------
# DPM-Solver with its own step sizes (k-diffusion's DPMSolver): the schedule only gives σ_max, σ_min, steps


def _eps_fn(model: Model) -> Callable[[Tensor, Tensor], Tensor]:
    """ε(x, λ) = (x − D(x, σ(λ)))/σ(λ): DPM-Solver's noise prediction at half log-SNR time λ."""
    return lambda x, t: (x - model(x, _sigma(t))) / _sigma(t)


def _dpm_solver_step(
    eps_at: Callable[[Tensor, Tensor], Tensor], x: Tensor, eps: Tensor, t: Tensor, t_next: Tensor, order: int
) -> tuple[Tensor, Tensor]:
    """DPM-Solver-1/2/3 (Lu et al. 2022, Algorithms 1 and 2; r₁ = 1/2 at order 2, 1/3 and 2/3 at order 3)
    from λ = t to t_next given ε at (x, t), and the order-lower estimate sharing its evaluations."""
    h = t_next - t
    x_1 = x - _sigma(t_next) * h.expm1() * eps
    if order == 1:
        return x_1, x_1
    r1 = 1 / 2 if order == 2 else 1 / 3
    eps_r1 = eps_at(x - _sigma(t + r1 * h) * (r1 * h).expm1() * eps, t + r1 * h)
    x_2 = x_1 - _sigma(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps)
    if order == 2:
        return x_2, x_1
    r2, s2 = 2 / 3, t + 2 / 3 * h
    u2 = x - _sigma(s2) * (r2 * h).expm1() * eps
    u2 = u2 - _sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps)
    x_3 = x_1 - _sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_at(u2, s2) - eps)
    return x_3, x_2


def _sigma_range(sigmas: Tensor) -> tuple[Tensor, Tensor]:
    """(σ_min, σ_max) ComfyUI hands DPM fast/adaptive: the last σ, or the one before a final 0."""
    sigma_min = sigmas[-1] if sigmas[-1] > 0 or len(sigmas) < 2 else sigmas[-2]
    return sigma_min.float().cpu(), sigmas[0].float().cpu()


def _dpm_ancestral(t: Tensor, t_next: Tensor, t_end: Tensor, eta: float) -> tuple[Tensor, float | Tensor]:
    """(λ to step to, σ of noise to add) of an ancestral DPM-Solver step (k-diffusion's, clamped at t_end)."""
    if not eta:
        return t_next, 0.0
    sigma_down, _ = _ancestral_step(_sigma(t), _sigma(t_next), eta)
    t_next_ = torch.minimum(t_end, _t(sigma_down))
    return t_next_, (_sigma(t_next) ** 2 - _sigma(t_next_) ** 2) ** 0.5


@torch.no_grad()
def sample_dpm_fast(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generators = None,
    eta: float = 0.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """DPM-Solver-fast (Lu et al. 2022, §3.4): len(sigmas) − 1 evaluations as order-3 steps uniform in λ
    from σ_max to σ_min (k-diffusion `sample_dpm_fast`); it ends at σ_min, as in ComfyUI and A1111."""
    model = _bind(denoiser, extra, callback)
    noise = noise_sampler or gaussian_noise_sampler(x, generator)
    nfe = len(sigmas) - 1
    if nfe < 1:
        return x
    sigma_min, sigma_max = _sigma_range(sigmas)
    t_end, m = _t(sigma_min), nfe // 3 + 1
    ts = torch.linspace(float(_t(sigma_max)), float(t_end), m + 1)
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    for i, order in enumerate(orders):
        t, t_next = ts[i], ts[i + 1]
        t_next_, sigma_up = _dpm_ancestral(t, t_next, t_end, eta)
        eps = (x - model(x, _sigma(t), i)) / _sigma(t)
        x = _dpm_solver_step(_eps_fn(model), x, eps, t, t_next_, order)[0]
        if eta:
            x = x + sigma_up * s_noise * noise(_sigma(t), _sigma(t_next))
    return x


class _PIDStepSize:
    """PID control of the step size h on the inverse error (Söderlind 2003), k-diffusion's controller."""

    def __init__(self, h: float, pcoeff: float, icoeff: float, dcoeff: float, order: float, safety: float):
        self.h, self.safety = h, safety
        self.b = ((pcoeff + icoeff + dcoeff) / order, -(pcoeff + 2 * dcoeff) / order, dcoeff / order)
        self.errs: list[float] = []

    def accept(self, error: float) -> bool:
        """Scale h by the controller's factor; True if the step just taken is accepted."""
        inv_error = 1 / (error + 1e-8)
        self.errs = self.errs or [inv_error] * 3
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b[0] * self.errs[1] ** self.b[1] * self.errs[2] ** self.b[2]
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


@torch.no_grad()
def sample_dpm_adaptive(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generators = None,
    order: int = 3,
    rtol: float = 0.05,
    atol: float = 0.0078,
    h_init: float = 0.05,
    pcoeff: float = 0.0,
    icoeff: float = 1.0,
    dcoeff: float = 0.0,
    accept_safety: float = 0.81,
    eta: float = 0.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """DPM-Solver-12/23 with adaptive steps (Lu et al. 2022, §3.4, Algorithm 4) from σ_max to σ_min of
    `sigmas` (k-diffusion `sample_dpm_adaptive`): the number of steps is the solver's, not the schedule's."""
    if order not in (2, 3):
        raise ValueError(f"order must be 2 or 3, got {order}")
    model = _bind(denoiser, extra, callback)
    noise = noise_sampler or gaussian_noise_sampler(x, generator)
    sigma_min, sigma_max = _sigma_range(sigmas)
    s, t_end = _t(sigma_max), _t(sigma_min)
    atol_t, rtol_t = torch.tensor(atol), torch.tensor(rtol)
    pid = _PIDStepSize(abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    x_prev, step = x, 0
    while s < t_end - 1e-5:
        t = torch.minimum(t_end, s + pid.h)
        t_, sigma_up = _dpm_ancestral(s, t, t_end, eta)
        eps = (x - model(x, _sigma(s), step)) / _sigma(s)
        x_high, x_low = _dpm_solver_step(_eps_fn(model), x, eps, s, t_, order)
        delta = torch.maximum(atol_t, rtol_t * torch.maximum(x_low.abs(), x_prev.abs()))
        error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
        if pid.accept(float(error)):
            x_prev = x_low
            x = x_high + sigma_up * s_noise * noise(_sigma(s), _sigma(t)) if eta else x_high
            s = t
        step += 1
    return x


# ---------------------------------------------------------------------------------------------
# CFG++ (Chung et al. 2024): the guided D_c̃ sets the data estimate, the unconditional D_u the noise


def _bind_uncond(
    denoiser: DenoiserFn, extra: dict[str, Any] | None, callback: Callback | None, record: bool = True
) -> Callable[..., tuple[Tensor, Tensor]]:
    """`_bind`'s model returning (guided D, unconditional D_u) as `guide` computed them; D_u = D when the
    denoiser is not guided (or `record` is off, for the plain variants of a sampler)."""
    model = _bind(denoiser, extra, callback)

    def both(x: Tensor, sigma: Tensor, step: int | None = None) -> tuple[Tensor, Tensor]:
        if not record:
            denoised = model(x, sigma, step)
            return denoised, denoised
        with recording_uncond() as seen:
            denoised = model(x, sigma, step)
        return denoised, seen[-1] if seen else denoised

    return both


@torch.no_grad()
def sample_euler_ancestral_cfg_pp(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generators = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Euler ancestral with CFG++ (Chung et al. 2024, Algorithm 2): x = D + σ_down·(x − D_u)/σ + noise."""
    model = _bind_uncond(denoiser, extra, callback)
    noise = noise_sampler or gaussian_noise_sampler(x, generator)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised, uncond = model(x, sigma, i)
        if sigma_next == 0:
            x = denoised
            continue
        sigma_down, sigma_up = _ancestral_step(sigma, sigma_next, eta)
        x = denoised + _to_d(x, sigma, uncond) * sigma_down
        if eta and s_noise:
            x = x + noise(sigma, sigma_next) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_euler_cfg_pp(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generators = None,
) -> Tensor:
    """Euler steps with CFG++ (Chung et al. 2024, Algorithm 1; DDIM η = 0): x = D + σ_next·(x − D_u)/σ."""
    return sample_euler_ancestral_cfg_pp(
        denoiser, x, sigmas, extra=extra, callback=callback, generator=generator, eta=0.0
    )


@torch.no_grad()
def sample_dpmpp_2s_ancestral_cfg_pp(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generators = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """DPM-Solver++(2S) ancestral on D_u plus each step's guidance D − D_u (ComfyUI's CFG++ variant)."""
    model = _bind_uncond(denoiser, extra, callback)
    noise = noise_sampler or gaussian_noise_sampler(x, generator)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised, uncond = model(x, sigma, i)
        sigma_down, sigma_up = _ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0:
            x = _euler_step(model, x, uncond, sigma, sigma_down)
        else:
            t, t_next = _t(sigma), _t(sigma_down)
            h = t_next - t
            x_2 = (_sigma(t + h / 2) / _sigma(t)) * x - (-h / 2).expm1() * uncond
            _, uncond_2 = model(x_2, _sigma(t + h / 2))
            x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * uncond_2
        if sigma_next > 0 and eta:
            x = x + noise(sigma, sigma_next) * s_noise * sigma_up
        x = x + (denoised - uncond)
    return x


@torch.no_grad()
def sample_dpmpp_2m_cfg_pp(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generators = None,
) -> Tensor:
    """DPM-Solver++(2M) with CFG++ (ComfyUI's `dpmpp_2m_cfg_pp`): D sets x_0, D_u the multistep noise."""
    model = _bind_uncond(denoiser, extra, callback)
    old_uncond = None
    for i in range(len(sigmas) - 1):
        denoised, uncond = model(x, sigmas[i], i)
        t, t_next = _t(sigmas[i]), _t(sigmas[i + 1])
        h = t_next - t
        mix = -torch.exp(-h) * uncond
        if old_uncond is not None and sigmas[i + 1] != 0:
            r = (t - _t(sigmas[i - 1])) / h
            mix = mix - torch.expm1(-h) * (1 / (2 * r)) * (denoised - old_uncond)
        x = denoised + mix + torch.exp(-h) * x
        old_uncond = uncond
    return x


def _phi_1(h: Tensor) -> Tensor:
    return torch.expm1(h) / h


def _phi_2(h: Tensor) -> Tensor:
    return (_phi_1(h) - 1) / h


def _res_multistep(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra: dict[str, Any] | None,
    callback: Callback | None,
    generator: Generators,
    eta: float,
    s_noise: float,
    noise_sampler: NoiseSampler | None,
    cfg_pp: bool,
) -> Tensor:
    """RES second-order multistep (Zhang et al. 2023, arXiv:2308.02157) with optional ancestral noise and
    CFG++, ComfyUI's `res_multistep` (its variants differ in eta and cfg_pp)."""
    model = _bind_uncond(denoiser, extra, callback, record=cfg_pp)
    noise = noise_sampler or gaussian_noise_sampler(x, generator)
    old_denoised = old_sigma_down = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised, uncond = model(x, sigma, i)
        sigma_down, sigma_up = _ancestral_step(sigma, sigma_next, eta)
        if (sigma_down == 0 or old_denoised is None) and cfg_pp:
            x = denoised + _to_d(x, sigma, uncond) * sigma_down
        elif sigma_down == 0 or old_denoised is None:
            x = x + _to_d(x, sigma, denoised) * (sigma_down - sigma)
        else:
            t, t_next = _t(sigma), _t(sigma_down)
            h = t_next - t
            c2 = (_t(sigmas[i - 1]) - _t(old_sigma_down)) / h
            b1 = torch.nan_to_num(_phi_1(-h) - _phi_2(-h) / c2, nan=0.0)
            b2 = torch.nan_to_num(_phi_2(-h) / c2, nan=0.0)
            x = x + (denoised - uncond)  # zero unless cfg_pp
            x = _sigma(h) * x + h * (b1 * uncond + b2 * old_denoised)
        if sigma_next > 0 and eta:
            x = x + noise(sigma, sigma_next) * s_noise * sigma_up
        old_denoised, old_sigma_down = uncond, sigma_down
    return x


def _res_multistep_sampler(eta_default: float, cfg_pp: bool) -> Sampler:
    @torch.no_grad()
    def sample(
        denoiser: DenoiserFn,
        x: Tensor,
        sigmas: Tensor,
        *,
        extra: dict[str, Any] | None = None,
        callback: Callback | None = None,
        generator: Generators = None,
        eta: float = eta_default,
        s_noise: float = 1.0,
        noise_sampler: NoiseSampler | None = None,
    ) -> Tensor:
        return _res_multistep(
            denoiser, x, sigmas, extra, callback, generator, eta, s_noise, noise_sampler, cfg_pp
        )

    sample.__doc__ = _res_multistep.__doc__
    return sample


@torch.no_grad()
def sample_gradient_estimation(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generators = None,
    ge_gamma: float = 2.0,
    cfg_pp: bool = False,
) -> Tensor:
    """Euler with gradient estimation (Permenter & Yuan 2024, "Interpreting and improving diffusion models
    from an optimization perspective"): d + (γ − 1)(d − d_prev); CFG++ takes d from D_u."""
    model = _bind_uncond(denoiser, extra, callback, record=cfg_pp)
    old_d = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised, uncond = model(x, sigma, i)
        d = _to_d(x, sigma, uncond)
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = denoised
        else:
            x = denoised + d * sigma_next if cfg_pp else x + d * dt
            if old_d is not None:
                x = x + (ge_gamma - 1) * (d - old_d) * dt
        old_d = d
    return x


# ---------------------------------------------------------------------------------------------
# more ComfyUI samplers


@torch.no_grad()
def sample_ddpm(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generators = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Ancestral DDPM (Ho et al. 2020, Algorithm 2) between the schedule's σ in the VP view (ComfyUI)."""
    model = _bind(denoiser, extra, callback)
    noise = noise_sampler or gaussian_noise_sampler(x, generator)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        eps = _to_d(x, sigma, model(x, sigma, i))
        ac, ac_prev = 1 / (sigma**2 + 1), 1 / (sigma_next**2 + 1)
        alpha = ac / ac_prev
        x = (1 / alpha).sqrt() * (x / (1 + sigma**2).sqrt() - (1 - alpha) * eps / (1 - ac).sqrt())
        if sigma_next > 0:
            x = x + ((1 - alpha) * (1 - ac_prev) / (1 - ac)).sqrt() * noise(sigma, sigma_next)
            x = x * (1 + sigma_next**2).sqrt()
    return x


@torch.no_grad()
def sample_heunpp2(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generators = None,
) -> Tensor:
    """Heun++ (Carzit's sd-webui-samplers-scheduler, in ComfyUI): Euler, Heun, or three slopes weighted by
    σ_next/3σ_max and σ_next2/3σ_max looking two steps ahead."""
    model = _bind(denoiser, extra, callback)
    s_end = sigmas[-1]
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        d = _to_d(x, sigma, model(x, sigma, i))
        dt = sigma_next - sigma
        if sigma_next == s_end:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = _to_d(x_2, sigma_next, model(x_2, sigma_next))
        if sigmas[i + 2] == s_end:
            w2 = sigma_next / (2 * sigmas[0])
            x = x + (d * (1 - w2) + d_2 * w2) * dt
            continue
        x_3 = x_2 + d_2 * (sigmas[i + 2] - sigma_next)
        d_3 = _to_d(x_3, sigmas[i + 2], model(x_3, sigmas[i + 2]))
        w2, w3 = sigma_next / (3 * sigmas[0]), sigmas[i + 2] / (3 * sigmas[0])
        x = x + ((1 - w2 - w3) * d + w2 * d_2 + w3 * d_3) * dt
    return x


_ADAMS_BASHFORTH: dict[int, list[Tensor | float]] = {
    1: [1.0],
    2: [3 / 2, -1 / 2],
    3: [23 / 12, -16 / 12, 5 / 12],
    4: [55 / 24, -59 / 24, 37 / 24, -9 / 24],
}


def _ipndm_weights(sigmas: Tensor, i: int, order: int, variable: bool) -> list[Tensor | float]:
    """Adams–Bashforth weights of d_i, d_{i−1}, … (iPNDM, Zhang & Chen 2023; variable-step from Zhou et al.
    2024's diff-sampler, as ComfyUI's `ipndm`/`ipndm_v`)."""
    if not variable or order == 1:
        return _ADAMS_BASHFORTH[order]
    h = [sigmas[i + 1] - sigmas[i]] + [sigmas[i - k] - sigmas[i - k - 1] for k in range(order - 1)]
    c1, c2 = (2 + h[0] / h[1]) / 2, -(h[0] / h[1]) / 2
    if order == 2:
        return [c1, c2]
    temp1 = (1 - h[0] / (3 * (h[0] + h[1])) * (h[0] * (h[0] + h[1])) / (h[1] * (h[1] + h[2]))) / 2
    if order == 3:
        return [c1 + temp1, c2 - (1 + h[1] / h[2]) * temp1, temp1 * h[1] / h[2]]
    ratio = h[1] * (h[1] + h[2]) / (h[2] * (h[2] + h[3]))
    h01, h012 = h[0] + h[1], h[0] + h[1] + h[2]
    temp2 = ((1 - h[0] / (3 * h01)) / 2 + (1 - h[0] / (2 * h01)) * h[0] / (6 * h012)) * (h[0] * h01 * h012)
    temp2 = temp2 / (h[1] * (h[1] + h[2]) * (h[1] + h[2] + h[3]))
    return [
        c1 + temp1 + temp2,
        c2 - (1 + h[1] / h[2]) * temp1 - (1 + h[1] / h[2] + ratio) * temp2,
        temp1 * h[1] / h[2] + (h[1] / h[2] + ratio * (1 + h[2] / h[3])) * temp2,
        -temp2 * ratio * h[1] / h[2],
    ]


def _deis_weights(sigmas: Tensor, max_order: int, points: int = 10_000) -> list[list[float]]:
    """DEIS-tAB weights (Zhang & Chen 2023): ∫ over each step of the Lagrange basis on the past VP times,
    times dσ/dt, with the VP time of EDM's σ ∈ [0.002, 80] and ComfyUI's `points`-point sum, in float64."""
    eps_s, smin, smax = 1e-3, 0.002, 80.0
    beta_d = 2 * (math.log(smin**2 + 1) / eps_s - math.log(smax**2 + 1)) / (eps_s - 1)
    beta_min = math.log(smax**2 + 1) - 0.5 * beta_d
    s = sigmas.detach().cpu().double()
    ts = ((beta_min**2 + 2 * beta_d * (s**2 + 1).log()).sqrt() - beta_min) / beta_d
    weights: list[list[float]] = []
    for i in range(len(ts) - 1):
        order = min(i + 1, max_order)
        taus = torch.linspace(float(ts[i]), float(ts[i + 1]), points, dtype=torch.float64)
        log_alpha = -0.5 * taus**2 * beta_d - taus * beta_min
        integrand = 0.5 * (taus * beta_d + beta_min) / (log_alpha.exp() * -log_alpha.expm1()).sqrt()
        dtau = (ts[i + 1] - ts[i]) / points
        past = ts[[i - k for k in range(order)]]
        weights.append([float((integrand * _lagrange(past, j, taus)).sum() * dtau) for j in range(order)])
    return weights


def _lagrange(nodes: Tensor, j: int, at: Tensor) -> Tensor:
    """The Lagrange basis polynomial that is 1 at nodes[j] and 0 at the other nodes, evaluated at `at`."""
    out = torch.ones_like(at)
    for k in range(len(nodes)):
        if k != j:
            out = out * (at - nodes[k]) / (nodes[j] - nodes[k])
    return out


def _multistep_in_sigma(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    extra: dict[str, Any] | None,
    callback: Callback | None,
    max_order: int,
    weights: Callable[[int, int], Sequence[Tensor | float]],
) -> Tensor:
    """x_{i+1} = x_i + Σ_j w_j·d_{i−j} over the last `max_order` slopes (weights(i, order) × Δσ or absolute);
    Euler on the first step, D into σ = 0. The loop of iPNDM and DEIS."""
    model = _bind(denoiser, extra, callback)
    ds: deque[Tensor] = deque(maxlen=max_order)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i], i)
        ds.appendleft(_to_d(x, sigmas[i], denoised))
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = x + sum(w * d for w, d in zip(weights(i, len(ds)), ds, strict=False))
    return x


@torch.no_grad()
def sample_ipndm(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generators = None,
    max_order: int = 4,
    variable: bool = False,
) -> Tensor:
    """Improved PNDM (Zhang & Chen 2023, DEIS paper): Adams–Bashforth in σ up to 4th order, fixed-step
    weights (`variable=True`: the variable-step weights of ComfyUI's `ipndm_v`)."""

    def weights(i: int, order: int) -> list[Tensor | float]:
        return [w * (sigmas[i + 1] - sigmas[i]) for w in _ipndm_weights(sigmas, i, order, variable)]

    return _multistep_in_sigma(denoiser, x, sigmas, extra, callback, max_order, weights)


@torch.no_grad()
def sample_deis(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generators = None,
    max_order: int = 3,
) -> Tensor:
    """DEIS-tAB (Zhang & Chen 2023, arXiv:2204.13902): exponential-integrator multistep with polynomial
    extrapolation in the VP time, ComfyUI's `deis` (mode 'tab'); Euler on the first step."""
    table = _deis_weights(sigmas, max_order)

    def weights(i: int, order: int) -> list[Tensor | float]:
        return [sigmas[i + 1] - sigmas[i]] if order == 1 else table[i]

    return _multistep_in_sigma(denoiser, x, sigmas, extra, callback, max_order, weights)


@torch.no_grad()
def sample_er_sde(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generators = None,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    max_stage: int = 3,
) -> Tensor:
    """ER-SDE-Solver-3 (Cui et al. 2023, arXiv:2309.06169) with ComfyUI's noise scaler λ(e^{λ^0.3} + 10)
    and 200-point integrals; λ = σ in the variance-exploding view."""
    model = _bind(denoiser, extra, callback)
    noise = noise_sampler or gaussian_noise_sampler(x, generator)
    points = torch.arange(200, dtype=torch.float32)

    def scaler(v: Tensor) -> Tensor:
        return v * ((v**0.3).exp() + 10.0)

    old_denoised = old_denoised_d = None
    for i in range(len(sigmas) - 1):
        ls, lt = sigmas[i], sigmas[i + 1]
        denoised = model(x, ls, i)
        if lt == 0:
            x = denoised
            continue
        r = scaler(lt) / scaler(ls)
        x = r * x + (1 - r) * denoised
        if old_denoised is not None and max_stage >= 2:
            dt = lt - ls
            pos = lt + points.to(lt) * (-dt / 200)
            s = torch.sum(1 / scaler(pos)) * (-dt / 200)
            denoised_d = (denoised - old_denoised) / (ls - sigmas[i - 1])
            x = x + (dt + s * scaler(lt)) * denoised_d
            if old_denoised_d is not None and max_stage >= 3:
                s_u = torch.sum((pos - ls) / scaler(pos)) * (-dt / 200)
                denoised_u = (denoised_d - old_denoised_d) / ((ls - sigmas[i - 2]) / 2)
                x = x + (dt**2 / 2 + s_u * scaler(lt)) * denoised_u
            old_denoised_d = denoised_d
        if s_noise > 0:
            x = x + noise(ls, lt) * s_noise * (lt**2 - ls**2 * r**2).sqrt().nan_to_num(nan=0.0)
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_seeds_2(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generators = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    r: float = 0.5,
    solver_type: Literal["phi_1", "phi_2"] = "phi_1",
) -> Tensor:
    """SEEDS-2 (Gonzalez et al. 2023, arXiv:2305.14267): two-stage stochastic exponential solver on x_0
    predictions in λ, ComfyUI's `seeds_2`; r = 1, phi_2 is its `exp_heun_2_x0` (deterministic at eta 0)."""
    if solver_type not in ("phi_1", "phi_2"):
        raise ValueError(f"solver_type must be 'phi_1' or 'phi_2', got {solver_type!r}")
    model = _bind(denoiser, extra, callback)
    noise = noise_sampler or gaussian_noise_sampler(x, generator)
    inject = eta > 0 and s_noise > 0
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma, i)
        if sigma_next == 0:
            x = denoised
            continue
        h = _t(sigma_next) - _t(sigma)
        h_eta = h * (eta + 1)
        sigma_s1 = _sigma(torch.lerp(_t(sigma), _t(sigma_next), r))
        x_2 = sigma_s1 / sigma * (-r * h * eta).exp() * x - (-r * h_eta).expm1() * denoised
        if inject:
            sde_noise = (-2 * r * h * eta).expm1().neg().sqrt() * noise(sigma, sigma_s1)
            x_2 = x_2 + sde_noise * sigma_s1 * s_noise
        denoised_2 = model(x_2, sigma_s1)
        if solver_type == "phi_1":
            mixed = (-h_eta).expm1() * torch.lerp(denoised, denoised_2, 1 / (2 * r))
        else:
            b2 = ((-h_eta).expm1() + h_eta) / -h_eta / r
            mixed = ((-h_eta).expm1() - b2) * denoised + b2 * denoised_2
        x = sigma_next / sigma * (-h * eta).exp() * x - mixed
        if inject:
            segment = (r - 1) * h * eta
            fresh = noise(sigma_s1, sigma_next)
            sde_noise = sde_noise * segment.exp() + (2 * segment).expm1().neg().sqrt() * fresh
            x = x + sde_noise * sigma_next * s_noise
    return x


@torch.no_grad()
def sample_seeds_3(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generators = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    r_1: float = 1 / 3,
    r_2: float = 2 / 3,
) -> Tensor:
    """SEEDS-3 (Gonzalez et al. 2023, arXiv:2305.14267): three-stage stochastic exponential solver on x_0
    predictions, stages at fractions r_1, r_2 of the step in λ, ComfyUI's `seeds_3`; the SDE noise of a
    step is carried from stage to stage, decayed, with fresh noise for each segment."""
    model = _bind(denoiser, extra, callback)
    noise = noise_sampler or gaussian_noise_sampler(x, generator)
    inject = eta > 0 and s_noise > 0

    def carried(previous: Tensor, segment: Tensor, fresh: Tensor) -> Tensor:
        return previous * segment.exp() + (2 * segment).expm1().neg().sqrt() * fresh

    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma, i)
        if sigma_next == 0:
            x = denoised
            continue
        h = _t(sigma_next) - _t(sigma)
        h_eta = h * (eta + 1)
        sigma_1, sigma_2 = (_sigma(torch.lerp(_t(sigma), _t(sigma_next), r)) for r in (r_1, r_2))
        x_2 = sigma_1 / sigma * (-r_1 * h * eta).exp() * x - (-r_1 * h_eta).expm1() * denoised
        if inject:
            sde_noise = (-2 * r_1 * h * eta).expm1().neg().sqrt() * noise(sigma, sigma_1)
            x_2 = x_2 + sde_noise * sigma_1 * s_noise
        denoised_2 = model(x_2, sigma_1)
        a_2 = r_2 / r_1 * _h_phi_2(-r_2 * h_eta)
        a_1 = (-r_2 * h_eta).expm1() - a_2
        x_3 = sigma_2 / sigma * (-r_2 * h * eta).exp() * x - (a_1 * denoised + a_2 * denoised_2)
        if inject:
            sde_noise = carried(sde_noise, (r_1 - r_2) * h * eta, noise(sigma_1, sigma_2))
            x_3 = x_3 + sde_noise * sigma_2 * s_noise
        denoised_3 = model(x_3, sigma_2)
        b_3 = _h_phi_2(-h_eta) / r_2
        b_1 = (-h_eta).expm1() - b_3
        x = sigma_next / sigma * (-h * eta).exp() * x - (b_1 * denoised + b_3 * denoised_3)
        if inject:
            sde_noise = carried(sde_noise, (r_2 - 1) * h * eta, noise(sigma_2, sigma_next))
            x = x + sde_noise * sigma_next * s_noise
    return x


def _h_phi_2(t: Tensor) -> Tensor:
    """t·φ₂(t) = (eᵗ − 1 − t) / t, the second exponential-integrator coefficient."""
    return (t.expm1() - t) / t


def _sa_weights(nodes: Tensor, lambda_s: Tensor, lambda_t: Tensor, tau: float) -> Tensor:
    """SA-Solver's b_j (Xue et al. 2023, eqs. 15 and 18): (1+τ²)∫ e^{(1+τ²)(λ−λ_t)} ℓ_j(λ) dλ over [λ_s, λ_t]
    for the Lagrange basis ℓ_j on `nodes`; the monomial integrals come by parts in u = λ − λ_t."""
    k, h = 1 + tau**2, lambda_t - lambda_s
    decay = torch.exp(-k * h)
    moments = [-torch.expm1(-k * h)]  # (1+τ²)∫_{−h}^0 e^{(1+τ²)u} u^p du for p = 0, 1, …
    for p in range(1, len(nodes)):
        moments.append(-decay * (-h) ** p - p / k * moments[-1])
    vandermonde = torch.vander(nodes - lambda_t, N=len(nodes), increasing=True)
    return torch.linalg.solve(vandermonde.T, torch.stack(moments))


def _sa_weights_simple_2(
    nodes: Tensor, lambda_s: Tensor, lambda_t: Tensor, tau: float, corrector: bool
) -> Tensor:
    """The paper's simplified order-2 weights (its appendix D), oldest first: the predictor extrapolates
    the slope through the two nodes, the corrector takes the trapezoid's half step."""
    k, h = 1 + tau**2, lambda_t - lambda_s
    total = -torch.expm1(-k * h)
    if corrector:
        newest = k * h / 2
        return torch.stack([total - newest, newest])
    oldest = k * h**2 / 2 / (nodes[0] - lambda_s)
    return torch.stack([oldest, total - oldest])


def _sa_step(
    x: Tensor,
    history: Sequence[Tensor],
    lambdas: Tensor,
    s: int,
    tau: float,
    simple_order_2: bool,
    corrector: bool,
) -> Tensor:
    """x from λ_s = lambdas[s] to λ_t = lambdas[s + 1] on the data predictions `history` (oldest first, the
    newest at λ_t for the corrector, at λ_s for the predictor): σ_t/σ_s·e^{−τ²h}·x + Σ b_j·D_j, no noise."""
    order = len(history)
    lambda_s, lambda_t = lambdas[s], lambdas[s + 1]
    nodes = lambdas[s + int(corrector) - order + 1 : s + int(corrector) + 1]
    if simple_order_2 and order == 2:
        b = _sa_weights_simple_2(nodes, lambda_s, lambda_t, tau, corrector)
    else:
        b = _sa_weights(nodes, lambda_s, lambda_t, tau)
    decay = float(torch.exp(lambda_s - lambda_t - tau**2 * (lambda_t - lambda_s)))  # σ_t/σ_s · e^{−τ²h}
    return decay * x + _weighted(b.tolist(), list(history))


@torch.no_grad()
def sample_sa_solver(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra: dict[str, Any] | None = None,
    callback: Callback | None = None,
    generator: Generators = None,
    eta: float = 1.0,
    sde_start_percent: float = 0.2,
    sde_end_percent: float = 0.8,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    predictor_order: int = 3,
    corrector_order: int = 4,
    use_pece: bool = False,
    simple_order_2: bool = False,
    schedule: DiscreteSchedule | None = None,
) -> Tensor:
    """SA-Solver (Xue et al. 2023, arXiv:2309.05019): stochastic Adams predictor-corrector on data
    predictions in λ, ComfyUI's `sa_solver` (PEC; `use_pece` re-evaluates the corrected state). The SDE
    runs with τ = eta while σ lies between the σ of `sde_start_percent` and `sde_end_percent` of the
    model's `schedule` (SD's scaled-linear one if None); orders drop near the end as in ComfyUI."""
    model = _bind(denoiser, extra, callback)
    noise_fn = noise_sampler or gaussian_noise_sampler(x, generator)
    schedule = schedule or DiscreteSchedule.ddpm()
    sde_high, sde_low = (schedule.percent_to_sigma(p) for p in (sde_start_percent, sde_end_percent))
    lambdas = _t(sigmas.detach().double().cpu())
    n, to_end = len(sigmas) - 1, bool(sigmas[-1] == 0)
    history: deque[Tensor] = deque(maxlen=max(predictor_order, corrector_order))
    x_pred, tau, noise = x, 0.0, None
    for i in range(n):
        denoised = model(x_pred, sigmas[i], i)
        history.append(denoised)
        c_order = 0 if i == 0 or (sigmas[i + 1] == 0 and not use_pece) else min(corrector_order, len(history))
        p_order = min(predictor_order, len(history))
        if to_end:
            c_order, p_order = min(c_order, n - i), min(p_order, n - 1 - i)
        if c_order:  # correct the step x_{i−1} → x_i now that D(x_pred, σ_i) is known
            x = _sa_step(x, list(history)[-c_order:], lambdas, i - 1, tau, simple_order_2, corrector=True)
            if noise is not None:
                x = x + noise  # the predictor's noise, shared with the corrected state
            if use_pece:
                history[-1] = model(x, sigmas[i])
        else:
            x = x_pred
        if sigmas[i + 1] == 0:
            x_pred = history[-1]
            continue
        tau = eta if eta > 0 and sde_high >= float(sigmas[i + 1]) >= sde_low else 0.0
        x_pred = _sa_step(x, list(history)[-p_order:], lambdas, i, tau, simple_order_2, corrector=False)
        noise = None
        if tau > 0 and s_noise > 0:
            h = float(lambdas[i + 1] - lambdas[i])
            noise = noise_fn(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-math.expm1(-2 * tau**2 * h)) ** 0.5
            noise = noise * s_noise
            x_pred = x_pred + noise
    return x_pred


# ---------------------------------------------------------------------------------------------
# names

SAMPLERS: dict[str, Sampler] = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "lms": sample_lms,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_2m_sde_heun": partial(sample_dpmpp_2m_sde, solver_type="heun"),
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "ddim": sample_euler,  # ComfyUI's ddim: deterministic DDIM is Euler in σ
    "uni_pc": sample_uni_pc,
    "uni_pc_bh2": partial(sample_uni_pc, variant="bh2"),
    "lcm": sample_lcm,
    "euler_cfg_pp": sample_euler_cfg_pp,
    "euler_ancestral_cfg_pp": sample_euler_ancestral_cfg_pp,
    "heunpp2": sample_heunpp2,
    "exp_heun_2_x0": partial(sample_seeds_2, eta=0.0, s_noise=0.0, r=1.0, solver_type="phi_2"),
    "exp_heun_2_x0_sde": partial(sample_seeds_2, r=1.0, solver_type="phi_2"),
    "dpm_fast": sample_dpm_fast,
    "dpm_adaptive": sample_dpm_adaptive,
    "dpmpp_2s_ancestral_cfg_pp": sample_dpmpp_2s_ancestral_cfg_pp,
    "dpmpp_2m_cfg_pp": sample_dpmpp_2m_cfg_pp,
    # ComfyUI's *_gpu variants draw the Brownian tree on the GPU; the maths is the same and sdlab's noise
    # always comes from the CPU generator, so they are the same samplers
    "dpmpp_sde_gpu": sample_dpmpp_sde,
    "dpmpp_2m_sde_gpu": sample_dpmpp_2m_sde,
    "dpmpp_2m_sde_heun_gpu": partial(sample_dpmpp_2m_sde, solver_type="heun"),
    "dpmpp_3m_sde_gpu": sample_dpmpp_3m_sde,
    "ddpm": sample_ddpm,
    "ipndm": sample_ipndm,
    "ipndm_v": partial(sample_ipndm, variable=True),
    "deis": sample_deis,
    "res_multistep": _res_multistep_sampler(0.0, cfg_pp=False),
    "res_multistep_cfg_pp": _res_multistep_sampler(0.0, cfg_pp=True),
    "res_multistep_ancestral": _res_multistep_sampler(1.0, cfg_pp=False),
    "res_multistep_ancestral_cfg_pp": _res_multistep_sampler(1.0, cfg_pp=True),
    "gradient_estimation": sample_gradient_estimation,
    "gradient_estimation_cfg_pp": partial(sample_gradient_estimation, cfg_pp=True),
    "er_sde": sample_er_sde,
    "seeds_2": sample_seeds_2,
    "seeds_3": sample_seeds_3,
    "sa_solver": sample_sa_solver,
    "sa_solver_pece": partial(sample_sa_solver, use_pece=True),
}

# AUTOMATIC1111 display names -> ComfyUI names
SAMPLER_ALIASES = {
    "Euler": "euler",
    "Euler a": "euler_ancestral",
    "Heun": "heun",
    "DPM2": "dpm_2",
    "DPM2 a": "dpm_2_ancestral",
    "LMS": "lms",
    "DPM++ 2S a": "dpmpp_2s_ancestral",
    "DPM++ SDE": "dpmpp_sde",
    "DPM++ 2M": "dpmpp_2m",
    "DPM++ 2M SDE": "dpmpp_2m_sde",
    "DPM++ 2M SDE Heun": "dpmpp_2m_sde_heun",
    "DPM++ 3M SDE": "dpmpp_3m_sde",
    "DDIM": "ddim",
    "UniPC": "uni_pc",
    "LCM": "lcm",
    "DPM fast": "dpm_fast",
    "DPM adaptive": "dpm_adaptive",
    "DDPM": "ddpm",
}
_DISPLAY = {name: alias for alias, name in SAMPLER_ALIASES.items()}
_LOOKUP = {name.lower(): name for name in SAMPLERS} | {a.lower(): name for a, name in SAMPLER_ALIASES.items()}

# AUTOMATIC1111's schedule for "Automatic" (the sampler's own default); `normal` (A1111 "Uniform") otherwise
AUTOMATIC_SCHEDULES = {
    "dpm_2": "karras",
    "dpm_2_ancestral": "karras",
    "dpmpp_2s_ancestral": "karras",
    "dpmpp_sde": "karras",
    "dpmpp_2m": "karras",
    "dpmpp_2m_sde": "exponential",
    "dpmpp_2m_sde_heun": "exponential",
    "dpmpp_3m_sde": "exponential",
    "ddim": "ddim_uniform",
    "lcm": "sgm_uniform",
}
# samplers for which ComfyUI computes one σ more and drops the one before the final 0
DISCARD_PENULTIMATE_SIGMA = frozenset({"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"})
# AUTOMATIC1111 schedule labels that may end an old combined sampler name ("DPM++ 2M Karras")
_SCHEDULE_SUFFIXES = ("karras", "exponential", "uniform", "sgm uniform", "simple", "normal", "ddim", "beta")


def _sampler_key(name: str) -> str | None:
    return _LOOKUP.get(name.strip().lower())


def get_sampler(name: str, schedule: DiscreteSchedule | None = None) -> Sampler:
    """The sampler function for a ComfyUI name or AUTOMATIC1111 display name (case-insensitive); the
    model's `schedule` is bound for samplers that place an interval by schedule fraction (sa_solver)."""
    key = _sampler_key(name)
    if key is None:
        raise _unknown_sampler(name)
    sampler = SAMPLERS[key]
    if schedule is not None and "schedule" in inspect.signature(sampler).parameters:
        return partial(sampler, schedule=schedule)
    return sampler


def display_name(name: str) -> str:
    """AUTOMATIC1111's display name of a sampler (as written in PNG infotexts), e.g. "Euler a"."""
    key = _sampler_key(name)
    if key is None:
        raise _unknown_sampler(name)
    return _DISPLAY.get(key, key)


def _unknown_sampler(name: str) -> ValueError:
    return ValueError(
        f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)} (or {', '.join(SAMPLER_ALIASES)})"
    )


def resolve_sampler(name: str, scheduler: str | None = None) -> tuple[str, str | None]:
    """(ComfyUI sampler, schedule) for a sampler name, old combined names like "DPM++ 2M Karras" included.

    The schedule is the one a combined name carries, else the given `scheduler` resolved to its
    ComfyUI name ("Automatic" picks AUTOMATIC1111's default for the sampler), else None.
    """
    key = _sampler_key(name)
    if key is not None:
        if scheduler is None:
            return key, None
        if scheduler.strip().lower() == "automatic":
            return key, AUTOMATIC_SCHEDULES.get(key, "normal")
        return key, schedule_name(scheduler)
    lowered = name.strip().lower()
    for suffix in _SCHEDULE_SUFFIXES:
        key = _sampler_key(lowered.removesuffix(" " + suffix)) if lowered.endswith(" " + suffix) else None
        if key is not None:
            return key, schedule_name(suffix)
    raise _unknown_sampler(name)
