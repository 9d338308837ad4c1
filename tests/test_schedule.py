"""The DDPM schedule as σ against diffusers, and the σ schedules against their (ComfyUI) definitions."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sdlab.diffusion.schedule import (
    SCHEDULES,
    ZERO_TERMINAL_SNR_ALPHA_BAR,
    DiscreteSchedule,
    alphas_cumprod,
    get_sigmas,
    schedule_name,
)

SD = DiscreteSchedule.ddpm()
SD_CONFIG = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def test_alphas_cumprod_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(**SD_CONFIG).alphas_cumprod.double()  # float32 betas there
    torch.testing.assert_close(alphas_cumprod(), ref, rtol=2e-6, atol=0)
    assert SD.sigmas.dtype == torch.float32 and SD.sigmas.shape == (1000,)
    assert SD.sigma_min == pytest.approx(0.0291672, rel=1e-5)
    assert SD.sigma_max == pytest.approx(14.614642, rel=1e-6)


def test_zero_terminal_snr_matches_diffusers_rescale():
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ref = torch.cumprod(1 - rescale_zero_terminal_snr(betas), dim=0)  # exactly 0 at the end
    ours = alphas_cumprod(zero_terminal_snr=True)
    torch.testing.assert_close(ours[:-1], ref[:-1], rtol=1e-9, atol=0)
    assert ours[-1] == ZERO_TERMINAL_SNR_ALPHA_BAR and ref[-1] == 0
    zsnr = DiscreteSchedule.for_model(SimpleNamespace(zero_terminal_snr=True))
    assert zsnr.sigma_max == pytest.approx(4518.76, rel=1e-5)
    assert zsnr.sigma_min == pytest.approx(SD.sigma_min, rel=1e-6)
    assert float(zsnr.sigma_to_t(torch.tensor([zsnr.sigma_max]))) == pytest.approx(999)
    assert torch.equal(DiscreteSchedule.for_model(SimpleNamespace()).sigmas, SD.sigmas)


def test_sigma_to_t_is_log_linear_inverse_of_t_to_sigma():
    t = torch.arange(1000).float()
    torch.testing.assert_close(SD.t_to_sigma(t), SD.sigmas, rtol=1e-6, atol=0)  # exp(log σ) rounds
    torch.testing.assert_close(SD.sigma_to_t(SD.sigmas), t, rtol=0, atol=2e-3)
    frac = torch.tensor([0.25, 10.5, 499.9, 998.01])
    low = frac.floor().long()
    w = frac - low
    log_sigma = (1 - w) * SD.sigmas[low].log() + w * SD.sigmas[low + 1].log()
    torch.testing.assert_close(SD.t_to_sigma(frac), log_sigma.exp(), rtol=1e-6, atol=0)
    torch.testing.assert_close(SD.sigma_to_t(log_sigma.exp()), frac, rtol=0, atol=2e-3)
    outside = SD.sigma_to_t(torch.tensor([1e-4, 100.0]))
    assert outside.tolist() == [0.0, 999.0]  # clamped to the table
    assert SD.sigma_to_t(torch.tensor([[0.03, 14.0]])).shape == (1, 2)
    near = SD.sigmas[[3, 700]] * torch.tensor([1.001, 0.999])
    assert SD.sigma_to_t(near, quantize=True).tolist() == [3.0, 700.0]


def test_karras_and_exponential_match_diffusers():
    diffusers = pytest.importorskip("diffusers")
    for option, name in (("use_karras_sigmas", "karras"), ("use_exponential_sigmas", "exponential")):
        ref = diffusers.EulerDiscreteScheduler(**SD_CONFIG, timestep_spacing="linspace", **{option: True})
        ref.set_timesteps(15)
        # diffusers takes 1 − ᾱ in float32, which leaves its σ_min 1.3e-5 (relative) off the float64 value
        torch.testing.assert_close(get_sigmas(name, SD, 15), ref.sigmas, rtol=2e-5, atol=0)


def test_table_schedules_pick_the_comfyui_timesteps():
    table = SD.sigmas
    exp_log = {
        "rtol": 1e-6,
        "atol": 0,
    }  # normal/sgm_uniform interpolate log σ, so integer t give exp(log σ_t)
    torch.testing.assert_close(
        get_sigmas("normal", SD, 10)[:-1], table[list(range(999, -1, -111))], **exp_log
    )
    torch.testing.assert_close(
        get_sigmas("sgm_uniform", SD, 9)[:-1], table[list(range(999, 0, -111))], **exp_log
    )
    assert torch.equal(get_sigmas("simple", SD, 10)[:-1], table[list(range(999, 0, -100))])
    assert torch.equal(get_sigmas("ddim_uniform", SD, 20)[:-1], table[list(range(951, 0, -50))])
    # ComfyUI's ddim_uniform keeps stepping by 1000 // steps, so 30 steps give 31: t = 991, 958, ..., 1
    assert torch.equal(get_sigmas("ddim_uniform", SD, 30)[:-1], table[list(range(991, 0, -33))])


@pytest.mark.parametrize("steps", [1, 2, 7, 20, 40, 61])
def test_beta_schedule_matches_scipy_quantiles(steps):
    stats = pytest.importorskip("scipy.stats")
    ts = np.rint(stats.beta.ppf(1 - np.linspace(0, 1, steps, endpoint=False), 0.6, 0.6) * 999).astype(int)
    keep = [t for i, t in enumerate(ts) if i == 0 or t != ts[i - 1]]
    assert torch.equal(get_sigmas("beta", SD, steps), torch.cat([SD.sigmas[keep], torch.zeros(1)]))


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("steps", [1, 3, 25])
def test_every_schedule_descends_to_zero(name, steps):
    sigmas = get_sigmas(name, SD, steps)
    assert sigmas.dtype == torch.float32 and sigmas[-1] == 0
    assert (sigmas[:-1] > sigmas[1:]).all()
    assert len(sigmas) == steps + 1 or name in ("ddim_uniform", "beta")
    assert sigmas[0] <= SD.sigma_max * (1 + 1e-6)


def test_names_aliases_and_errors():
    assert [schedule_name(n) for n in ("Karras", "Uniform", "SGM Uniform", "DDIM", "Beta", "simple")] == [
        "karras",
        "normal",
        "sgm_uniform",
        "ddim_uniform",
        "beta",
        "simple",
    ]
    assert torch.equal(get_sigmas("Exponential", SD, 5), get_sigmas("exponential", SD, 5))
    with pytest.raises(ValueError, match="'bogus'.*karras"):
        get_sigmas("bogus", SD, 5)
    with pytest.raises(ValueError, match="resolve_sampler"):
        get_sigmas("Automatic", SD, 5)
    with pytest.raises(ValueError, match="steps"):
        get_sigmas("karras", SD, 0)


def test_discard_penultimate_sigma():
    longer = get_sigmas("karras", SD, 11)
    sigmas = get_sigmas("karras", SD, 10, discard_penultimate=True)
    assert len(sigmas) == 11
    assert torch.equal(sigmas, torch.cat([longer[:-2], longer[-1:]]))


@pytest.mark.parametrize("steps", [2, 5, 20])
def test_kl_optimal_and_linear_quadratic_match_comfyui(steps):
    """ComfyUI's `kl_optimal_scheduler` and `linear_quadratic_schedule` (comfy/samplers.py), transcribed."""
    adj_idxs = torch.arange(steps, dtype=torch.float).div_(steps - 1)
    ref = adj_idxs.new_zeros(steps + 1)
    ref[:-1] = (adj_idxs * math.atan(SD.sigma_min) + (1 - adj_idxs) * math.atan(SD.sigma_max)).tan_()
    torch.testing.assert_close(get_sigmas("KL Optimal", SD, steps), ref, rtol=1e-6, atol=0)
    threshold_noise, linear_steps = 0.025, steps // 2
    linear_sigma_schedule = [i * threshold_noise / linear_steps for i in range(linear_steps)]
    threshold_noise_step_diff = linear_steps - threshold_noise * steps
    quadratic_steps = steps - linear_steps
    quadratic_coef = threshold_noise_step_diff / (linear_steps * quadratic_steps**2)
    linear_coef = threshold_noise / linear_steps - 2 * threshold_noise_step_diff / (quadratic_steps**2)
    const = quadratic_coef * (linear_steps**2)
    quadratic = [quadratic_coef * (i**2) + linear_coef * i + const for i in range(linear_steps, steps)]
    ref = torch.FloatTensor([1.0 - x for x in linear_sigma_schedule + quadratic + [1.0]]) * SD.sigmas[-1]
    torch.testing.assert_close(get_sigmas("linear_quadratic", SD, steps), ref, rtol=1e-6, atol=0)
    assert schedule_name("Linear Quadratic") == "linear_quadratic"
