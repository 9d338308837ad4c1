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

from collections import deque
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from sdlab.diffusion.schedule import schedule_name

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


def get_sampler(name: str) -> Sampler:
    """The sampler function for a ComfyUI name or AUTOMATIC1111 display name (case-insensitive)."""
    key = _sampler_key(name)
    if key is None:
        raise _unknown_sampler(name)
    return SAMPLERS[key]


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
