"""Samplers and the denoiser: parity with k-diffusion and diffusers on closed-form denoisers, analytic
convergence on Gaussian data, noise reproducibility, classifier-free guidance, and names.

k-diffusion (test-only: `pip install --no-deps k-diffusion torchsde torchdiffeq trampoline`, plus scipy) is
loaded from its sampling.py / external.py without its package __init__, which needs much more.
"""

import importlib.util
import math
import sys
import types

import pytest
import torch

from sdlab.diffusion.denoiser import Denoiser, add_noise, cfg_denoiser
from sdlab.diffusion.samplers import (
    SAMPLERS,
    BrownianNoiseSampler,
    get_sampler,
    randn_like,
    resolve_sampler,
    sample_euler,
    sample_sa_solver,
    sample_uni_pc,
)
from sdlab.diffusion.schedule import DiscreteSchedule, alphas_cumprod, get_sigmas

SD = DiscreteSchedule.ddpm()
SD_CONFIG = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
FP32 = {"rtol": 1e-5, "atol": 1e-5}  # what float32 arithmetic over a dozen steps allows


def _per_sample(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return sigma.to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))


def gaussian_denoiser(mu: float, s: float):
    """The optimal denoiser E[x_0 | x] for data N(mu, s²) per element."""

    def denoise(x, sigma, **_):
        var = _per_sample(sigma, x) ** 2
        return (s**2 * x + var * mu) / (s**2 + var)

    return denoise


def mixture_denoiser(x, sigma, **_):
    """The optimal denoiser for per-element data 0.4·N(−1, 0.3²) + 0.6·N(1.5, 0.6²): nonlinear in x."""
    mus, stds, weights = (torch.tensor(v, dtype=x.dtype) for v in ([-1.0, 1.5], [0.3, 0.6], [0.4, 0.6]))
    var = stds**2 + _per_sample(sigma, x)[..., None] ** 2
    logits = weights.log() - 0.5 * var.log() - 0.5 * (x[..., None] - mus) ** 2 / var
    posterior_means = (stds**2 * x[..., None] + (var - stds**2) * mus) / var
    return (logits.softmax(-1) * posterior_means).sum(-1)


def keyed_noise(shape):
    """A noise sampler whose noise depends only on (σ, σ_next), so two implementations see the same noise."""

    def sample(sigma, sigma_next):
        seed = round(float(sigma) * 1e6) * 1_000_003 + round(float(sigma_next) * 1e6)
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))

    return sample


def start(sigmas, shape=(2, 3, 4, 4), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * sigmas[0]


# ---------------------------------------------------------------------------------------------
# k-diffusion


@pytest.fixture(scope="module")
def kd():
    """k-diffusion's sampling and external modules (utils stubbed: it imports torchvision)."""
    for dep in ("torchsde", "torchdiffeq", "scipy", "tqdm"):
        pytest.importorskip(dep)
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        pytest.skip("k-diffusion not installed")
    root = spec.submodule_search_locations[0]
    saved = {k: v for k, v in sys.modules.items() if k == "k_diffusion" or k.startswith("k_diffusion.")}
    pkg, utils = types.ModuleType("k_diffusion"), types.ModuleType("k_diffusion.utils")
    pkg.__path__, pkg.utils = [root], utils
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    sys.modules.update({"k_diffusion": pkg, "k_diffusion.utils": utils})
    try:
        for name in ("sampling", "external"):
            mod_spec = importlib.util.spec_from_file_location(f"k_diffusion.{name}", f"{root}/{name}.py")
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[mod_spec.name] = module
            mod_spec.loader.exec_module(module)
            setattr(pkg, name, module)
        yield pkg
    finally:
        for k in [k for k in sys.modules if k == "k_diffusion" or k.startswith("k_diffusion.")]:
            del sys.modules[k]
        sys.modules.update(saved)


KD_SAMPLERS = {  # ours -> (k-diffusion function, extra kwargs, takes a noise sampler)
    "euler": ("sample_euler", {}, False),
    "euler_ancestral": ("sample_euler_ancestral", {}, True),
    "heun": ("sample_heun", {}, False),
    "dpm_2": ("sample_dpm_2", {}, False),
    "dpm_2_ancestral": ("sample_dpm_2_ancestral", {}, True),
    "lms": ("sample_lms", {}, False),
    "dpmpp_2s_ancestral": ("sample_dpmpp_2s_ancestral", {}, True),
    "dpmpp_sde": ("sample_dpmpp_sde", {}, True),
    "dpmpp_2m": ("sample_dpmpp_2m", {}, False),
    "dpmpp_2m_sde": ("sample_dpmpp_2m_sde", {}, True),
    "dpmpp_2m_sde_heun": ("sample_dpmpp_2m_sde", {"solver_type": "heun"}, True),
    "dpmpp_3m_sde": ("sample_dpmpp_3m_sde", {}, True),
}


@pytest.mark.parametrize("name", KD_SAMPLERS)
@pytest.mark.parametrize("schedule", ["karras", "img2img"])
def test_matches_k_diffusion(kd, name, schedule):
    fn, options, noisy = KD_SAMPLERS[name]
    sigmas = get_sigmas("karras", SD, 12) if schedule == "karras" else get_sigmas("normal", SD, 10)[4:]
    x = start(sigmas)
    noise = {"noise_sampler": keyed_noise(x.shape)} if noisy else {}
    ref = getattr(kd.sampling, fn)(mixture_denoiser, x, sigmas, disable=True, **options, **noise)
    ours = SAMPLERS[name](mixture_denoiser, x, sigmas, **noise)
    torch.testing.assert_close(ours, ref, **FP32)


def test_denoiser_matches_k_diffusion_wrappers(kd):
    def unet(x, t, context):  # any smooth function of the scaled input, the timestep and the conditioning
        return torch.tanh(x) * (t / 1000)[:, None, None, None] + context.mean(dim=(1, 2))[:, None, None, None]

    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 3
    sigma = torch.tensor([14.0, 0.7, 0.0311])
    context = torch.randn(3, 77, 16, generator=torch.Generator().manual_seed(2))
    ac = alphas_cumprod().float()  # what LDM checkpoints (and so AUTOMATIC1111) hand k-diffusion
    for prediction, wrapper in (
        ("eps", kd.external.DiscreteEpsDDPMDenoiser),
        ("v", kd.external.DiscreteVDDPMDenoiser),
    ):
        for quantize in (False, True):
            ref = wrapper(unet, ac, quantize=quantize)(x, sigma, context=context)
            ours = Denoiser(unet, SD, prediction, quantize=quantize)(x, sigma, context=context)
            torch.testing.assert_close(ours, ref, **FP32)
    random_sigmas = torch.rand(64, generator=torch.Generator().manual_seed(3)) * 15 + 0.03
    torch.testing.assert_close(
        SD.sigma_to_t(random_sigmas), kd.external.DiscreteSchedule(SD.sigmas, False).sigma_to_t(random_sigmas)
    )


def test_schedules_match_k_diffusion(kd):
    smin, smax = SD.sigma_min, SD.sigma_max
    assert torch.equal(get_sigmas("karras", SD, 17), kd.sampling.get_sigmas_karras(17, smin, smax))
    assert torch.equal(get_sigmas("exponential", SD, 17), kd.sampling.get_sigmas_exponential(17, smin, smax))
    uniform = kd.external.DiscreteSchedule(SD.sigmas, False).get_sigmas(17)  # AUTOMATIC1111's "Uniform"
    torch.testing.assert_close(get_sigmas("Uniform", SD, 17), uniform, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------
# diffusers


def _eps(x_ve, sigma):
    """ε for the mixture data at noise level σ, from the closed-form denoiser."""
    return (x_ve - mixture_denoiser(x_ve, sigma.reshape(1).expand(x_ve.shape[0]))) / sigma


@pytest.mark.parametrize("name", ["euler", "heun", "lms"])
def test_matches_diffusers_discrete_schedulers(name):
    diffusers = pytest.importorskip("diffusers")
    cls = {"euler": "EulerDiscreteScheduler", "heun": "HeunDiscreteScheduler", "lms": "LMSDiscreteScheduler"}[
        name
    ]
    sched = getattr(diffusers, cls)(**SD_CONFIG, use_karras_sigmas=True, timestep_spacing="linspace")
    sched.set_timesteps(10)
    x = start(sched.sigmas)
    ref = x
    for k, t in enumerate(sched.timesteps):  # model call k is at sched.sigmas[k] (Heun repeats each σ)
        sigma = sched.sigmas[k]
        x_in = sched.scale_model_input(ref, t) * (sigma**2 + 1) ** 0.5
        ref = sched.step(_eps(x_in, sigma), t, ref).prev_sample
    sigmas = torch.cat([sched.sigmas[:1], sched.sigmas[1::2]]) if name == "heun" else sched.sigmas
    torch.testing.assert_close(SAMPLERS[name](mixture_denoiser, x, sigmas), ref, **FP32)


def _diffusers_vp_run(sched, sigma_of, x_vp, generator=None):
    """Run a diffusers scheduler that works on VP samples x/√(σ²+1); returns the sample before each step."""
    seen = []
    for k, t in enumerate(sched.timesteps):
        seen.append(x_vp)
        sigma = sigma_of(k, t)
        kw = {"generator": generator} if generator is not None else {}
        x_vp = sched.step(_eps(x_vp * (sigma**2 + 1) ** 0.5, sigma), t, x_vp, **kw).prev_sample
    return x_vp, seen


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_uni_pc_matches_diffusers(variant):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.UniPCMultistepScheduler(
        **SD_CONFIG, use_karras_sigmas=True, timestep_spacing="linspace", solver_order=3,
        solver_type=variant, lower_order_final=True, final_sigmas_type="zero",
    )  # fmt: skip
    sched.set_timesteps(10)
    sigmas = sched.sigmas.float()
    z = start(sigmas) / sigmas[0]
    ref, ref_inputs = _diffusers_vp_run(sched, lambda k, t: sched.sigmas[k], z)
    seen = []
    ours = sample_uni_pc(
        mixture_denoiser, z * (sigmas[0] ** 2 + 1) ** 0.5, sigmas, variant=variant,
        callback=lambda i, sigma, x, denoised: seen.append((x, denoised)),
    )  # fmt: skip
    for k, (x_vp, (x, _)) in enumerate(zip(ref_inputs, seen, strict=True)):  # each predictor+corrector step
        torch.testing.assert_close(x, x_vp * (sigmas[k] ** 2 + 1) ** 0.5, **FP32)
    assert torch.equal(ours, seen[-1][1])  # the last step, into σ = 0, lands on D
    if variant == "bh2":  # diffusers' bh1 divides by B(h) = −h = −inf on that last step and returns NaN
        torch.testing.assert_close(ours, ref, **FP32)


def test_ddim_is_diffusers_ddim_on_ddim_uniform():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(
        **SD_CONFIG, set_alpha_to_one=True, steps_offset=1, timestep_spacing="leading", clip_sample=False
    )
    sched.set_timesteps(20)
    table = ((1 - sched.alphas_cumprod) / sched.alphas_cumprod) ** 0.5  # diffusers' own float32 σ
    sigmas = torch.cat([table[sched.timesteps], torch.zeros(1)])
    torch.testing.assert_close(sigmas, get_sigmas("ddim_uniform", SD, 20), rtol=2e-5, atol=0)
    z = start(sigmas) / sigmas[0]
    ref, _ = _diffusers_vp_run(sched, lambda k, t: table[t], z)
    ours = get_sampler("DDIM")(mixture_denoiser, z * (sigmas[0] ** 2 + 1) ** 0.5, sigmas)
    torch.testing.assert_close(ours, ref, **FP32)


def test_lcm_matches_diffusers_lcm_with_the_same_generator():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.LCMScheduler(**SD_CONFIG)
    sched.set_timesteps(4)
    table = ((1 - sched.alphas_cumprod) / sched.alphas_cumprod) ** 0.5
    sigmas = torch.cat([table[sched.timesteps], torch.zeros(1)])
    z = start(sigmas) / sigmas[0]
    # diffusers' LCM boundary scalings (c_skip ≈ 4e-8 at t = 259) are the identity to float32 precision
    ref, _ = _diffusers_vp_run(sched, lambda k, t: table[t], z, torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(7)
    ours = get_sampler("lcm")(mixture_denoiser, z * (sigmas[0] ** 2 + 1) ** 0.5, sigmas, generator=generator)
    torch.testing.assert_close(ours, ref, **FP32)


# ---------------------------------------------------------------------------------------------
# analytic

DETERMINISTIC = ["euler", "heun", "dpm_2", "lms", "dpmpp_2m", "ddim", "uni_pc", "uni_pc_bh2"]


OWN_STEPS = ("dpm_fast", "dpm_adaptive")  # step from σ_max to σ_min at their own λ, ending at σ_min


@pytest.mark.parametrize("name", [n for n in SAMPLERS if n not in OWN_STEPS])
def test_zero_denoiser_scales_x_with_sigma(name):
    """With D ≡ 0 the ODE is dx/dσ = x/σ: x_i = x_0·σ_i/σ_0 exactly, and every sampler ends at 0."""
    sigmas = get_sigmas("karras", SD, 8)
    x = start(sigmas)
    seen = []
    out = SAMPLERS[name](
        lambda x, sigma, **_: torch.zeros_like(x), x, sigmas,
        callback=lambda i, sigma, xi, denoised: seen.append((i, float(sigma), xi)),
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert out.abs().max() < 1e-5 * sigmas[0]
    assert [i for i, _, _ in seen] == list(range(8))
    assert [s for _, s, _ in seen] == sigmas[:-1].tolist()
    if name in DETERMINISTIC:
        for i, _, xi in seen:
            torch.testing.assert_close(xi, x * sigmas[i] / sigmas[0], **FP32)


def _gaussian_start(n: int, mu: float, s: float, sigma_max: float) -> torch.Tensor:
    """Exact marginal samples x_σmax ~ N(mu, s² + σ_max²), standardized so sample statistics are exact."""
    z = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = (z - z.mean()) / z.std()
    return (mu + z * math.sqrt(s**2 + sigma_max**2)).reshape(-1, 64)


CONVERGENCE_ORDER = {"euler": 1, "heun": 2, "dpm_2": 2, "dpmpp_2m": 2, "lms": 3, "uni_pc": 3, "uni_pc_bh2": 3}


@pytest.mark.parametrize("name", CONVERGENCE_ORDER)
def test_ode_samplers_converge_at_their_order(name):
    """On Gaussian data the probability-flow ODE maps x_σ to mu + (x_σ − mu)·√(s² + σ'²)/√(s² + σ²)."""
    mu, s = 0.5, 1.0
    errors = []
    for steps in (16, 32, 64):
        sigmas = get_sigmas("karras", SD, steps)[:-1].double()  # end at σ_min, where the ODE is smooth
        x = _gaussian_start(4096, mu, s, float(sigmas[0]))
        exact = mu + (x - mu) * math.sqrt(s**2 + sigmas[-1] ** 2) / math.sqrt(s**2 + sigmas[0] ** 2)
        errors.append((SAMPLERS[name](gaussian_denoiser(mu, s), x, sigmas) - exact).abs().max().item())
    orders = [math.log2(a / b) for a, b in zip(errors, errors[1:], strict=False)]
    assert min(orders) > CONVERGENCE_ORDER[name] - 0.2, (errors, orders)


DISTRIBUTION_STEPS = {"euler": 200, "ddim": 200, "euler_ancestral": 400}  # first order; 50 steps otherwise


# not here: lcm (needs a consistency model); the *_gpu names (the same functions); CFG++ samplers (plain
# ones without guidance; checked against ComfyUI with it); first-order/heuristic ones that need hundreds of
# steps (ddpm, heunpp2, gradient_estimation) and the variants of samplers already here, for time
NOT_LANDING = {
    "lcm",
    "euler_cfg_pp",
    "euler_ancestral_cfg_pp",
    "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_2m_cfg_pp",
}
NOT_LANDING |= {n for n in SAMPLERS if n.endswith(("_gpu", "_cfg_pp"))} | {"ddpm", "heunpp2", "ipndm"}
NOT_LANDING |= {"gradient_estimation", "res_multistep", "exp_heun_2_x0_sde", "dpm_adaptive", "dpm_fast"}


@pytest.mark.parametrize("name", [n for n in SAMPLERS if n not in NOT_LANDING])
def test_samplers_land_on_gaussian_data(name):
    """Every sampler turns exact N(mu, s² + σ_max²) samples into N(mu, s²) ones."""
    mu, s = 0.7, 0.5
    sigmas = get_sigmas("karras", SD, DISTRIBUTION_STEPS.get(name, 50))
    x = _gaussian_start(65536, mu, s, float(sigmas[0])).float()
    out = SAMPLERS[name](gaussian_denoiser(mu, s), x, sigmas, generator=torch.Generator().manual_seed(1))
    assert abs(out.mean().item() - mu) < 0.01 and abs(out.std().item() - s) < 0.01, (out.mean(), out.std())


def test_lcm_with_a_consistency_function_lands_on_the_data():
    """LCM needs a consistency model; for N(mu, s²) that is the ODE map to σ = 0, exact at any steps."""
    mu, s = 0.7, 0.5

    def consistency(x, sigma, **_):
        return mu + (x - mu) * s / (s**2 + _per_sample(sigma, x) ** 2) ** 0.5

    sigmas = get_sigmas("sgm_uniform", SD, 4)
    x = _gaussian_start(65536, mu, s, float(sigmas[0])).float()
    out = get_sampler("LCM")(consistency, x, sigmas, generator=torch.Generator().manual_seed(1))
    assert abs(out.mean().item() - mu) < 0.01 and abs(out.std().item() - s) < 0.01


# ---------------------------------------------------------------------------------------------
# noise, denoiser, guidance


def test_per_sample_generators_reproduce_single_runs():
    sigmas = get_sigmas("karras", SD, 6)
    x = start(sigmas)
    sampler = get_sampler("Euler a")
    batch = sampler(mixture_denoiser, x, sigmas, generator=[torch.Generator().manual_seed(s) for s in (5, 6)])
    for i, seed in enumerate((5, 6)):
        single = sampler(
            mixture_denoiser, x[i : i + 1], sigmas, generator=torch.Generator().manual_seed(seed)
        )
        torch.testing.assert_close(batch[i : i + 1], single, rtol=0, atol=0)
    again = sampler(mixture_denoiser, x, sigmas, generator=[torch.Generator().manual_seed(s) for s in (5, 6)])
    assert torch.equal(batch, again)
    with pytest.raises(ValueError, match="3 generators"):
        randn_like(x, [torch.Generator()] * 3)


def test_noise_is_drawn_in_float32_on_the_generator():
    x = torch.zeros(2, 4, 8, 8, dtype=torch.float16)
    expected = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).half()
    assert torch.equal(randn_like(x, torch.Generator().manual_seed(3)), expected)


def test_brownian_noise_sampler_nests_intervals():
    """Noise over [σ, σ_b] then [σ, σ_c] ⊃ it: correlation √(|σ_b − σ|/|σ_c − σ|), as on a Brownian path."""
    x = torch.zeros(200_000)
    noise = BrownianNoiseSampler(x, torch.Generator().manual_seed(0))
    first, second = noise(torch.tensor(10.0), torch.tensor(9.0)), noise(torch.tensor(10.0), torch.tensor(6.0))
    third = noise(torch.tensor(6.0), torch.tensor(4.0))  # disjoint: independent
    assert torch.corrcoef(torch.stack([first, second]))[0, 1].item() == pytest.approx(0.5, abs=0.01)
    assert abs(torch.corrcoef(torch.stack([second, third]))[0, 1].item()) < 0.01
    assert second.std().item() == pytest.approx(1, abs=0.01)


def test_denoiser_recovers_x0_from_its_own_noise():
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([3.0, 0.2])
    x = add_noise(x0, noise, sigma)
    ac = 1 / (1 + sigma**2)  # the VP view the U-Net sees: x_in = √ᾱ·x_0 + √(1 − ᾱ)·ε
    v = ac.sqrt()[:, None, None, None] * noise - (1 - ac).sqrt()[:, None, None, None] * x0
    for prediction, target in (("eps", noise), ("v", v)):
        model = lambda x_in, t, target=target: target  # noqa: E731
        torch.testing.assert_close(Denoiser(model, SD, prediction)(x, sigma), x0, **FP32)
    half = Denoiser(lambda x_in, t: noise.half(), SD)(x.half(), sigma)
    assert half.dtype == torch.float16
    with pytest.raises(ValueError, match="prediction"):
        Denoiser(lambda x_in, t: x_in, SD, "x0")


def test_cfg_denoiser_guides_in_one_batched_call():
    calls = []

    def denoiser(x, sigma, context):
        calls.append(x.shape[0])
        return x * context.mean(dim=(1, 2))[:, None, None, None] + sigma[:, None, None, None]

    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([2.0, 2.0])
    cond, uncond = {"context": torch.full((2, 77, 8), 3.0)}, {"context": torch.full((2, 77, 8), 1.0)}
    guided = cfg_denoiser(denoiser, cond, uncond, 7.5)(x, sigma)
    assert calls == [4]
    torch.testing.assert_close(guided, x * 1 + 2 + 7.5 * (x * 3 - x * 1))
    calls.clear()
    torch.testing.assert_close(cfg_denoiser(denoiser, cond, uncond, 1.0)(x, sigma), x * 3 + 2)
    assert calls == [2]
    calls.clear()
    longer = {"context": torch.full((2, 154, 8), 1.0)}  # prompts of different chunk counts: two calls
    torch.testing.assert_close(cfg_denoiser(denoiser, cond, longer, 7.5)(x, sigma), guided)
    assert calls == [2, 2]


def test_extra_reaches_the_denoiser():
    sigmas = get_sigmas("karras", SD, 3)
    seen = []
    sample_euler(
        lambda x, sigma, context: seen.append(context) or x * 0, start(sigmas), sigmas, extra={"context": 1}
    )
    assert seen == [1, 1, 1]


# ---------------------------------------------------------------------------------------------
# ComfyUI's other samplers: k-diffusion where it has them, else transcriptions of ComfyUI's
# comfy/k_diffusion/sampling.py (VE models: α = 1, λ = −log σ) written out here as the reference


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_dpm_fast_matches_k_diffusion(kd, eta):
    for steps in (7, 12):  # 12 % 3 == 0 ends with orders 2, 1
        sigmas = get_sigmas("karras", SD, steps)
        x = start(sigmas)
        noise = keyed_noise(x.shape)
        ref = kd.sampling.sample_dpm_fast(
            mixture_denoiser, x, float(sigmas[-2]), float(sigmas[0]), steps, disable=True, eta=eta,
            noise_sampler=noise,
        )  # fmt: skip
        ours = get_sampler("DPM fast")(mixture_denoiser, x, sigmas, eta=eta, noise_sampler=noise)
        torch.testing.assert_close(ours, ref, **FP32)


@pytest.mark.parametrize("order", [2, 3])
def test_dpm_adaptive_matches_k_diffusion(kd, order):
    sigmas = get_sigmas("karras", SD, 10)
    x = start(sigmas)
    ref, info = kd.sampling.sample_dpm_adaptive(
        mixture_denoiser, x, float(sigmas[-2]), float(sigmas[0]), order=order, disable=True, return_info=True
    )
    calls = []
    ours = get_sampler("DPM adaptive")(
        mixture_denoiser, x, sigmas, order=order, callback=lambda i, *_: calls.append(i)
    )
    torch.testing.assert_close(ours, ref, **FP32)
    assert info["n_reject"] > 0 and len(calls) == info["steps"]  # the controller rejected steps, as there


def _comfy_ancestral_step(sigma, sigma_next, eta):
    """ComfyUI `get_ancestral_step`: (σ_down, σ_up)."""
    if not eta:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up


def _comfy_euler_ancestral_cfg_pp(model, x, sigmas, eta, noise_sampler):
    """ComfyUI `sample_euler_ancestral_cfg_pp` (α_s = α_t = 1); model returns (denoised, uncond_denoised)."""
    for i in range(len(sigmas) - 1):
        denoised, uncond_denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            d = (x - uncond_denoised) / sigmas[i]
            sigma_down, sigma_up = _comfy_ancestral_step(sigmas[i], sigmas[i + 1], eta)
            x = denoised + sigma_down * d
            if eta > 0:
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigma_up
    return x


def _comfy_dpmpp_2s_ancestral_cfg_pp(model, x, sigmas, eta, noise_sampler):
    """ComfyUI `sample_dpmpp_2s_ancestral_cfg_pp` (not RF: α = 1)."""
    sigma_fn, t_fn = (lambda t: t.neg().exp()), (lambda sigma: sigma.log().neg())
    for i in range(len(sigmas) - 1):
        denoised, uncond_denoised = model(x, sigmas[i])
        guidance_vector = denoised - uncond_denoised
        sigma_down, sigma_up = _comfy_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if sigma_down == 0:
            x = x + (x - uncond_denoised) / sigmas[i] * (sigma_down - sigmas[i])
        else:
            t, t_next = t_fn(sigmas[i]), t_fn(sigma_down)
            h = t_next - t
            s = t + h / 2
            x_2 = (sigma_fn(s) / sigma_fn(t)) * x - (-h / 2).expm1() * uncond_denoised
            _, uncond_denoised_2 = model(x_2, sigma_fn(s))
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * uncond_denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigma_up
        x = x + guidance_vector
    return x


def _comfy_dpmpp_2m_cfg_pp(model, x, sigmas):
    """ComfyUI `sample_dpmpp_2m_cfg_pp`."""
    t_fn = lambda sigma: sigma.log().neg()  # noqa: E731
    old_uncond_denoised = None
    for i in range(len(sigmas) - 1):
        denoised, uncond_denoised = model(x, sigmas[i])
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_uncond_denoised is None or sigmas[i + 1] == 0:
            denoised_mix = -torch.exp(-h) * uncond_denoised
        else:
            r = (t - t_fn(sigmas[i - 1])) / h
            denoised_mix = -torch.exp(-h) * uncond_denoised - torch.expm1(-h) * (1 / (2 * r)) * (
                denoised - old_uncond_denoised
            )  # noqa: E501
        x = denoised + denoised_mix + torch.exp(-h) * x
        old_uncond_denoised = uncond_denoised
    return x


def _comfy_res_multistep(model, x, sigmas, eta, cfg_pp, noise_sampler):
    """ComfyUI `res_multistep`."""
    sigma_fn, t_fn = (lambda t: t.neg().exp()), (lambda sigma: sigma.log().neg())
    phi1_fn = lambda t: torch.expm1(t) / t  # noqa: E731
    phi2_fn = lambda t: (phi1_fn(t) - 1.0) / t  # noqa: E731
    old_sigma_down = old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised, uncond_denoised = model(x, sigmas[i])
        sigma_down, sigma_up = _comfy_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if sigma_down == 0 or old_denoised is None:
            if cfg_pp:
                x = denoised + (x - uncond_denoised) / sigmas[i] * sigma_down
            else:
                x = x + (x - denoised) / sigmas[i] * (sigma_down - sigmas[i])
        else:
            t, t_old, t_next, t_prev = (
                t_fn(sigmas[i]),
                t_fn(old_sigma_down),
                t_fn(sigma_down),
                t_fn(sigmas[i - 1]),
            )
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1_val, phi2_val = phi1_fn(-h), phi2_fn(-h)
            b1 = torch.nan_to_num(phi1_val - phi2_val / c2, nan=0.0)
            b2 = torch.nan_to_num(phi2_val / c2, nan=0.0)
            if cfg_pp:
                x = x + (denoised - uncond_denoised)
                x = sigma_fn(h) * x + h * (b1 * uncond_denoised + b2 * old_denoised)
            else:
                x = sigma_fn(h) * x + h * (b1 * denoised + b2 * old_denoised)
        if sigmas[i + 1] > 0 and eta:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigma_up
        old_denoised = uncond_denoised if cfg_pp else denoised
        old_sigma_down = sigma_down
    return x


def _mixture(x, sigma):
    """The mixture denoiser called as ComfyUI's samplers call their model, with one σ for the batch."""
    return mixture_denoiser(x, sigma.expand(x.shape[0]))


def _unguided(x, sigma):
    """The mixture denoiser as a reference (denoised, uncond_denoised) model without guidance."""
    return (_mixture(x, sigma),) * 2


def _guided_pair(scale):
    """A guided denoiser (sdlab's `cfg_denoiser`) and the reference's (guided, unconditional) model."""

    def inner(x, sigma, shift):
        return mixture_denoiser(x + shift[:, None, None, None], sigma)

    cond, uncond = {"shift": torch.full((2,), 0.3)}, {"shift": torch.full((2,), -0.2)}

    def reference(x, sigma):
        sigma = sigma.expand(x.shape[0])
        d_u = inner(x, sigma, uncond["shift"])
        return d_u + scale * (inner(x, sigma, cond["shift"]) - d_u), d_u

    return cfg_denoiser(inner, cond, uncond, scale), reference


@pytest.mark.parametrize("scale", [1.0, 4.0])  # scale 1 still evaluates D_u (ComfyUI's cfg1 shortcut off)
def test_cfg_pp_samplers_match_comfyui(scale):
    guided, reference = _guided_pair(scale)
    sigmas = get_sigmas("karras", SD, 10)
    x = start(sigmas)
    noise = keyed_noise(x.shape)
    cases = {
        "euler_cfg_pp": _comfy_euler_ancestral_cfg_pp(reference, x, sigmas, 0.0, noise),
        "euler_ancestral_cfg_pp": _comfy_euler_ancestral_cfg_pp(reference, x, sigmas, 1.0, noise),
        "dpmpp_2m_cfg_pp": _comfy_dpmpp_2m_cfg_pp(reference, x, sigmas),
        "res_multistep_cfg_pp": _comfy_res_multistep(reference, x, sigmas, 0.0, True, noise),
        "res_multistep_ancestral_cfg_pp": _comfy_res_multistep(reference, x, sigmas, 1.0, True, noise),
        "dpmpp_2s_ancestral_cfg_pp": _comfy_dpmpp_2s_ancestral_cfg_pp(reference, x, sigmas, 1.0, noise),
        "gradient_estimation_cfg_pp": _comfy_gradient_estimation(reference, x, sigmas, cfg_pp=True),
    }
    for name, ref in cases.items():
        options = {"noise_sampler": noise} if "ancestral" in name else {}
        torch.testing.assert_close(SAMPLERS[name](guided, x, sigmas, **options), ref, **FP32, msg=name)
    assert not torch.allclose(cases["euler_cfg_pp"], SAMPLERS["euler"](guided, x, sigmas), atol=1e-3)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_res_multistep_matches_comfyui(eta):
    sigmas = get_sigmas("karras", SD, 10)
    x = start(sigmas)
    noise = keyed_noise(x.shape)
    ref = _comfy_res_multistep(_unguided, x, sigmas, eta, False, noise)
    name = "res_multistep_ancestral" if eta else "res_multistep"
    torch.testing.assert_close(SAMPLERS[name](mixture_denoiser, x, sigmas, noise_sampler=noise), ref, **FP32)


def _comfy_ipndm_v(model, x, sigmas, max_order=4):
    """ComfyUI `sample_ipndm_v` (from zju-pi/diff-sampler)."""
    t_steps, buffer_model = sigmas, []
    for i in range(len(sigmas) - 1):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, t_cur.expand(x.shape[0]))
        d_cur = (x - denoised) / t_cur
        order = min(max_order, i + 1)
        if t_next == 0:
            x_next = denoised
        elif order == 1:
            x_next = x + (t_next - t_cur) * d_cur
        elif order == 2:
            h_n, h_n_1 = (t_next - t_cur), (t_cur - t_steps[i - 1])
            coeff1, coeff2 = (2 + (h_n / h_n_1)) / 2, -(h_n / h_n_1) / 2
            x_next = x + (t_next - t_cur) * (coeff1 * d_cur + coeff2 * buffer_model[-1])
        elif order == 3:
            h_n, h_n_1, h_n_2 = (t_next - t_cur), (t_cur - t_steps[i - 1]), (t_steps[i - 1] - t_steps[i - 2])
            temp = (1 - h_n / (3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)) / (h_n_1 * (h_n_1 + h_n_2))) / 2
            coeff1 = (2 + (h_n / h_n_1)) / 2 + temp
            coeff2 = -(h_n / h_n_1) / 2 - (1 + h_n_1 / h_n_2) * temp
            coeff3 = temp * h_n_1 / h_n_2
            x_next = x + (t_next - t_cur) * (
                coeff1 * d_cur + coeff2 * buffer_model[-1] + coeff3 * buffer_model[-2]
            )
        else:
            h_n, h_n_1, h_n_2 = (t_next - t_cur), (t_cur - t_steps[i - 1]), (t_steps[i - 1] - t_steps[i - 2])
            h_n_3 = t_steps[i - 2] - t_steps[i - 3]
            temp1 = (1 - h_n / (3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)) / (h_n_1 * (h_n_1 + h_n_2))) / 2
            temp2 = (
                (
                    (1 - h_n / (3 * (h_n + h_n_1))) / 2
                    + (1 - h_n / (2 * (h_n + h_n_1))) * h_n / (6 * (h_n + h_n_1 + h_n_2))
                )
                * (h_n * (h_n + h_n_1) * (h_n + h_n_1 + h_n_2))
                / (h_n_1 * (h_n_1 + h_n_2) * (h_n_1 + h_n_2 + h_n_3))
            )  # noqa: E501
            coeff1 = (2 + (h_n / h_n_1)) / 2 + temp1 + temp2
            coeff2 = (
                -(h_n / h_n_1) / 2
                - (1 + h_n_1 / h_n_2) * temp1
                - (1 + (h_n_1 / h_n_2) + (h_n_1 * (h_n_1 + h_n_2) / (h_n_2 * (h_n_2 + h_n_3)))) * temp2
            )  # noqa: E501
            coeff3 = (
                temp1 * h_n_1 / h_n_2
                + (
                    (h_n_1 / h_n_2)
                    + (h_n_1 * (h_n_1 + h_n_2) / (h_n_2 * (h_n_2 + h_n_3))) * (1 + h_n_2 / h_n_3)
                )
                * temp2
            )  # noqa: E501
            coeff4 = -temp2 * (h_n_1 * (h_n_1 + h_n_2) / (h_n_2 * (h_n_2 + h_n_3))) * h_n_1 / h_n_2
            x_next = x + (t_next - t_cur) * (
                coeff1 * d_cur
                + coeff2 * buffer_model[-1]
                + coeff3 * buffer_model[-2]
                + coeff4 * buffer_model[-3]
            )  # noqa: E501
        buffer_model = (buffer_model + [d_cur])[-(max_order - 1) :]
        x = x_next
    return x


def _comfy_deis(model, x, sigmas, max_order=3, n=10000):
    """ComfyUI `sample_deis` with `get_deis_coeff_list(..., deis_mode='tab')` (autograd for d log α/dτ)."""
    import numpy as np

    eps_s, smin, smax = 1e-3, 0.002, 80
    beta_d = (
        2 * (np.log(torch.tensor(smin) ** 2 + 1) / eps_s - np.log(torch.tensor(smax) ** 2 + 1)) / (eps_s - 1)
    )
    beta_min = np.log(torch.tensor(smax) ** 2 + 1) - 0.5 * beta_d
    t_steps = ((beta_min**2 + 2 * beta_d * (sigmas**2 + 1).log()).sqrt() - beta_min) / beta_d
    beta_0, beta_1 = beta_min, beta_d + beta_min
    coeffs = []
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:], strict=True)):
        order = min(i + 1, max_order)
        if order == 1:
            coeffs.append([])
            continue
        taus = torch.linspace(t_cur, t_next, n).requires_grad_(True)
        with torch.enable_grad():
            alpha = torch.exp(-0.5 * taus**2 * (beta_1 - beta_0) - taus * beta_0)
            alpha.log().sum().backward()
        integrand = (-0.5 * taus.grad / torch.sqrt(alpha * (1 - alpha))).detach()
        prev_t = t_steps[[i - k for k in range(order)]]
        polys = [
            math.prod([(taus.detach() - prev_t[k]) / (prev_t[j] - prev_t[k]) for k in range(order) if k != j])
            for j in range(order)
        ]  # noqa: E501
        coeffs.append([torch.sum(integrand * poly) * (t_next - t_cur) / n for poly in polys])
    buffer_model = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i].expand(x.shape[0]))
        d_cur = (x - denoised) / sigmas[i]
        order = 1 if sigmas[i + 1] <= 0 else min(max_order, i + 1)
        if order == 1:
            x_next = x + (sigmas[i + 1] - sigmas[i]) * d_cur
        else:
            x_next = x + sum(c * d for c, d in zip(coeffs[i], [d_cur] + buffer_model[::-1], strict=False))
        buffer_model = (buffer_model + [d_cur])[-(max_order - 1) :]
        x = x_next
    return x


def test_ipndm_v_and_deis_match_comfyui():
    sigmas = get_sigmas("karras", SD, 12)
    x = start(sigmas)
    torch.testing.assert_close(
        SAMPLERS["ipndm_v"](mixture_denoiser, x, sigmas), _comfy_ipndm_v(mixture_denoiser, x, sigmas), **FP32
    )  # noqa: E501
    # ComfyUI sums 10,000 float32 points per weight: its DEIS weights carry ~1e-5 relative rounding
    torch.testing.assert_close(
        SAMPLERS["deis"](mixture_denoiser, x, sigmas),
        _comfy_deis(mixture_denoiser, x, sigmas),
        rtol=1e-4,
        atol=1e-4,
    )  # noqa: E501


def _comfy_gradient_estimation(model, x, sigmas, ge_gamma=2.0, cfg_pp=False):
    """ComfyUI `sample_gradient_estimation`; model returns (denoised, uncond_denoised)."""
    old_d = None
    for i in range(len(sigmas) - 1):
        denoised, uncond_denoised = model(x, sigmas[i])
        d = (x - (uncond_denoised if cfg_pp else denoised)) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = denoised + d * sigmas[i + 1] if cfg_pp else x + d * dt
            if i >= 1:
                x = x + (ge_gamma - 1) * (d - old_d) * dt
        old_d = d
    return x


def _comfy_ddpm(model, x, sigmas, noise_sampler):
    """ComfyUI `sample_ddpm` (`generic_step_sampler` with `DDPMSampler_step`)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_prev = sigmas[i], sigmas[i + 1]
        noise = (x - model(x, sigma.expand(x.shape[0]))) / sigma
        alpha_cumprod, alpha_cumprod_prev = 1 / ((sigma * sigma) + 1), 1 / ((sigma_prev * sigma_prev) + 1)
        alpha = alpha_cumprod / alpha_cumprod_prev
        mu = (1.0 / alpha).sqrt() * (
            x / torch.sqrt(1.0 + sigma**2.0) - (1 - alpha) * noise / (1 - alpha_cumprod).sqrt()
        )  # noqa: E501
        if sigma_prev > 0:
            mu += ((1 - alpha) * (1.0 - alpha_cumprod_prev) / (1.0 - alpha_cumprod)).sqrt() * noise_sampler(
                sigma, sigma_prev
            )  # noqa: E501
            mu *= torch.sqrt(1.0 + sigma_prev**2.0)
        x = mu
    return x


def test_gradient_estimation_and_ddpm_match_comfyui():
    sigmas = get_sigmas("karras", SD, 10)
    x = start(sigmas)
    noise = keyed_noise(x.shape)
    ours = SAMPLERS["gradient_estimation"](mixture_denoiser, x, sigmas)
    torch.testing.assert_close(ours, _comfy_gradient_estimation(_unguided, x, sigmas), **FP32)
    ours = get_sampler("DDPM")(mixture_denoiser, x, sigmas, noise_sampler=noise)
    torch.testing.assert_close(ours, _comfy_ddpm(mixture_denoiser, x, sigmas, noise), **FP32)


def _comfy_seeds_3(model, x, sigmas, eta, s_noise, noise_sampler, r_1=1.0 / 3, r_2=2.0 / 3):
    """ComfyUI's sample_seeds_3 for an ε/v (not rectified-flow) model, transcribed: λ = −log σ, α = 1
    (sigma_to_half_log_snr, half_log_snr_to_sigma; offset_first_sigma_for_snr leaves these σ alone)."""
    ei_h_phi_1 = torch.expm1

    def ei_h_phi_2(h):
        return (torch.expm1(h) - h) / h

    lambda_fn, sigma_fn = (lambda s: s.log().neg()), (lambda t: t.neg().exp())
    inject_noise = eta > 0 and s_noise > 0
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lambda_s, lambda_t = lambda_fn(sigmas[i]), lambda_fn(sigmas[i + 1])
        h = lambda_t - lambda_s
        h_eta = h * (eta + 1)
        lambda_s_1 = torch.lerp(lambda_s, lambda_t, r_1)
        lambda_s_2 = torch.lerp(lambda_s, lambda_t, r_2)
        sigma_s_1, sigma_s_2 = sigma_fn(lambda_s_1), sigma_fn(lambda_s_2)
        alpha_s_1 = sigma_s_1 * lambda_s_1.exp()
        alpha_s_2 = sigma_s_2 * lambda_s_2.exp()
        alpha_t = sigmas[i + 1] * lambda_t.exp()
        x_2 = (
            sigma_s_1 / sigmas[i] * (-r_1 * h * eta).exp() * x
            - alpha_s_1 * ei_h_phi_1(-r_1 * h_eta) * denoised
        )
        if inject_noise:
            sde_noise = (-2 * r_1 * h * eta).expm1().neg().sqrt() * noise_sampler(sigmas[i], sigma_s_1)
            x_2 = x_2 + sde_noise * sigma_s_1 * s_noise
        denoised_2 = model(x_2, sigma_s_1)
        a3_2 = r_2 / r_1 * ei_h_phi_2(-r_2 * h_eta)
        a3_1 = ei_h_phi_1(-r_2 * h_eta) - a3_2
        x_3 = sigma_s_2 / sigmas[i] * (-r_2 * h * eta).exp() * x - alpha_s_2 * (
            a3_1 * denoised + a3_2 * denoised_2
        )
        if inject_noise:
            segment_factor = (r_1 - r_2) * h * eta
            sde_noise = sde_noise * segment_factor.exp()
            sde_noise = sde_noise + segment_factor.mul(2).expm1().neg().sqrt() * noise_sampler(
                sigma_s_1, sigma_s_2
            )
            x_3 = x_3 + sde_noise * sigma_s_2 * s_noise
        denoised_3 = model(x_3, sigma_s_2)
        b3 = ei_h_phi_2(-h_eta) / r_2
        b1 = ei_h_phi_1(-h_eta) - b3
        x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * (b1 * denoised + b3 * denoised_3)
        if inject_noise:
            segment_factor = (r_2 - 1) * h * eta
            sde_noise = sde_noise * segment_factor.exp()
            sde_noise = sde_noise + segment_factor.mul(2).expm1().neg().sqrt() * noise_sampler(
                sigma_s_2, sigmas[i + 1]
            )
            x = x + sde_noise * sigmas[i + 1] * s_noise
    return x


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_seeds_3_matches_comfyui(eta):
    sigmas = get_sigmas("karras", SD, 8)
    x = start(sigmas)
    noise = keyed_noise(x.shape)
    ours = SAMPLERS["seeds_3"](mixture_denoiser, x, sigmas, eta=eta, noise_sampler=noise)
    torch.testing.assert_close(ours, _comfy_seeds_3(mixture_denoiser, x, sigmas, eta, 1.0, noise), **FP32)


def _comfy_heunpp2(model, x, sigmas):
    """ComfyUI `sample_heunpp2` (s_churn = 0)."""
    s_end = sigmas[-1]
    for i in range(len(sigmas) - 1):
        d = (x - model(x, sigmas[i])) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == s_end:
            x = x + d * dt
        elif sigmas[i + 2] == s_end:
            x_2 = x + d * dt
            d_2 = (x_2 - model(x_2, sigmas[i + 1])) / sigmas[i + 1]
            w2 = sigmas[i + 1] / (2 * sigmas[0])
            x = x + (d * (1 - w2) + d_2 * w2) * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - model(x_2, sigmas[i + 1])) / sigmas[i + 1]
            x_3 = x_2 + d_2 * (sigmas[i + 2] - sigmas[i + 1])
            d_3 = (x_3 - model(x_3, sigmas[i + 2])) / sigmas[i + 2]
            w2, w3 = sigmas[i + 1] / (3 * sigmas[0]), sigmas[i + 2] / (3 * sigmas[0])
            x = x + ((1 - w2 - w3) * d + w2 * d_2 + w3 * d_3) * dt
    return x


def _comfy_ipndm(model, x, sigmas, max_order=4):
    """ComfyUI `sample_ipndm` (fixed-step Adams–Bashforth weights, from zju-pi/diff-sampler)."""
    buffer_model = []
    for i in range(len(sigmas) - 1):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, t_cur)
        d_cur = (x - denoised) / t_cur
        order = min(max_order, i + 1)
        b = buffer_model
        if t_next == 0:
            x_next = denoised
        elif order == 1:
            x_next = x + (t_next - t_cur) * d_cur
        elif order == 2:
            x_next = x + (t_next - t_cur) * (3 * d_cur - b[-1]) / 2
        elif order == 3:
            x_next = x + (t_next - t_cur) * (23 * d_cur - 16 * b[-1] + 5 * b[-2]) / 12
        else:
            x_next = x + (t_next - t_cur) * (55 * d_cur - 59 * b[-1] + 37 * b[-2] - 9 * b[-3]) / 24
        buffer_model = (buffer_model + [d_cur])[-(max_order - 1) :]
        x = x_next
    return x


def _comfy_er_sde(model, x, sigmas, s_noise, noise_sampler, max_stage=3):
    """ComfyUI `sample_er_sde` with its default noise scaler; VE model: er_lambda = σ, α = 1."""

    def noise_scaler(v):
        return v * ((v**0.3).exp() + 10.0)

    point_indice = torch.arange(0, 200.0, dtype=torch.float32)
    er_lambdas = sigmas
    old_denoised = old_denoised_d = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        stage_used = min(max_stage, i + 1)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            er_lambda_s, er_lambda_t = er_lambdas[i], er_lambdas[i + 1]
            r = noise_scaler(er_lambda_t) / noise_scaler(er_lambda_s)
            x = r * x + (1 - r) * denoised
            if stage_used >= 2:
                dt = er_lambda_t - er_lambda_s
                lambda_step_size = -dt / 200.0
                lambda_pos = er_lambda_t + point_indice * lambda_step_size
                scaled_pos = noise_scaler(lambda_pos)
                s = torch.sum(1 / scaled_pos) * lambda_step_size
                denoised_d = (denoised - old_denoised) / (er_lambda_s - er_lambdas[i - 1])
                x = x + (dt + s * noise_scaler(er_lambda_t)) * denoised_d
                if stage_used >= 3:
                    s_u = torch.sum((lambda_pos - er_lambda_s) / scaled_pos) * lambda_step_size
                    denoised_u = (denoised_d - old_denoised_d) / ((er_lambda_s - er_lambdas[i - 2]) / 2)
                    x = x + ((dt**2) / 2 + s_u * noise_scaler(er_lambda_t)) * denoised_u
                old_denoised_d = denoised_d
            if s_noise > 0:
                scale = (er_lambda_t**2 - er_lambda_s**2 * r**2).sqrt().nan_to_num(nan=0.0)
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * scale
        old_denoised = denoised
    return x


def _comfy_seeds_2(model, x, sigmas, eta, s_noise, noise_sampler, r, solver_type):
    """ComfyUI `sample_seeds_2` for an ε/v model (λ = −log σ, α = 1); `exp_heun_2_x0(_sde)` are r = 1,
    phi_2 with eta = s_noise = 0 (resp. as given)."""
    lambda_fn, sigma_fn = (lambda s: s.log().neg()), (lambda t: t.neg().exp())
    inject_noise = eta > 0 and s_noise > 0
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        lambda_s, lambda_t = lambda_fn(sigmas[i]), lambda_fn(sigmas[i + 1])
        h = lambda_t - lambda_s
        h_eta = h * (eta + 1)
        lambda_s_1 = torch.lerp(lambda_s, lambda_t, r)
        sigma_s_1 = sigma_fn(lambda_s_1)
        alpha_s_1, alpha_t = sigma_s_1 * lambda_s_1.exp(), sigmas[i + 1] * lambda_t.exp()
        x_2 = (
            sigma_s_1 / sigmas[i] * (-r * h * eta).exp() * x - alpha_s_1 * torch.expm1(-r * h_eta) * denoised
        )
        if inject_noise:
            sde_noise = (-2 * r * h * eta).expm1().neg().sqrt() * noise_sampler(sigmas[i], sigma_s_1)
            x_2 = x_2 + sde_noise * sigma_s_1 * s_noise
        denoised_2 = model(x_2, sigma_s_1)
        if solver_type == "phi_1":
            denoised_d = torch.lerp(denoised, denoised_2, 1 / (2 * r))
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * torch.expm1(-h_eta) * denoised_d
        else:
            b2 = (torch.expm1(-h_eta) + h_eta) / -h_eta / r
            b1 = torch.expm1(-h_eta) - b2
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x - alpha_t * (b1 * denoised + b2 * denoised_2)
        if inject_noise:
            segment_factor = (r - 1) * h * eta
            sde_noise = sde_noise * segment_factor.exp()
            sde_noise = sde_noise + segment_factor.mul(2).expm1().neg().sqrt() * noise_sampler(
                sigma_s_1, sigmas[i + 1]
            )
            x = x + sde_noise * sigmas[i + 1] * s_noise
    return x


def test_heunpp2_and_ipndm_match_comfyui():
    sigmas = get_sigmas("karras", SD, 10)
    x = start(sigmas)
    for schedule in (sigmas, sigmas[:-1]):  # ending at 0 and, as with a truncated schedule, at σ_min
        ours = SAMPLERS["heunpp2"](mixture_denoiser, x, schedule)
        torch.testing.assert_close(ours, _comfy_heunpp2(_mixture, x, schedule), **FP32)
        ours = SAMPLERS["ipndm"](mixture_denoiser, x, schedule)
        torch.testing.assert_close(ours, _comfy_ipndm(_mixture, x, schedule), **FP32)


@pytest.mark.parametrize("s_noise", [0.0, 1.0])
def test_er_sde_matches_comfyui(s_noise):
    sigmas = get_sigmas("karras", SD, 10)
    x = start(sigmas)
    noise = keyed_noise(x.shape)
    ours = SAMPLERS["er_sde"](mixture_denoiser, x, sigmas, s_noise=s_noise, noise_sampler=noise)
    torch.testing.assert_close(ours, _comfy_er_sde(_mixture, x, sigmas, s_noise, noise), **FP32)


@pytest.mark.parametrize(
    ("name", "options", "comfy"),
    [
        ("seeds_2", {"eta": 0.0}, (0.0, 1.0, 0.5, "phi_1")),
        ("seeds_2", {}, (1.0, 1.0, 0.5, "phi_1")),
        ("seeds_2", {"solver_type": "phi_2", "r": 0.4}, (1.0, 1.0, 0.4, "phi_2")),
        ("exp_heun_2_x0", {}, (0.0, 0.0, 1.0, "phi_2")),
        ("exp_heun_2_x0_sde", {}, (1.0, 1.0, 1.0, "phi_2")),
    ],
)
def test_seeds_2_and_exp_heun_2_x0_match_comfyui(name, options, comfy):
    eta, s_noise, r, solver = comfy
    sigmas = get_sigmas("karras", SD, 8)
    x = start(sigmas)
    noise = keyed_noise(x.shape)
    ours = SAMPLERS[name](mixture_denoiser, x, sigmas, noise_sampler=noise, **options)
    ref = _comfy_seeds_2(_mixture, x, sigmas, eta, s_noise, noise, r, solver)
    torch.testing.assert_close(ours, ref, **FP32)


def _comfy_percent_to_sigma(schedule, percent):
    """ComfyUI `ModelSamplingDiscrete.percent_to_sigma`: σ(t) log-linear in t at t = (1 − percent)·999."""
    if percent <= 0.0:
        return 999999999.9
    if percent >= 1.0:
        return 0.0
    t = torch.tensor((1.0 - percent) * 999.0).clamp(0, len(schedule.sigmas) - 1)
    log_sigmas = schedule.sigmas.log()
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp().item()


def _comfy_sa_b_coeffs(sigma_next, curr_lambdas, lambda_s, lambda_t, tau_t, simple_order_2, is_corrector):
    """ComfyUI `sa_solver.compute_stochastic_adams_b_coeffs` (with its exponential-coefficient matrix and the
    simple order-2 variant)."""
    tau_mul = 1 + tau_t**2
    h = lambda_t - lambda_s
    alpha_t = sigma_next * lambda_t.exp()
    n = curr_lambdas.shape[0]
    if simple_order_2 and n == 2:
        if is_corrector:
            b_1 = alpha_t * (0.5 * tau_mul * h)
            b_2 = alpha_t * (-h * tau_mul).expm1().neg() - b_1
        else:
            b_2 = alpha_t * (0.5 * tau_mul * h**2) / (curr_lambdas[-2] - lambda_s)
            b_1 = alpha_t * (-h * tau_mul).expm1().neg() - b_2
        return torch.stack([b_2, b_1])
    p = torch.arange(n, dtype=lambda_s.dtype)
    product_terms = lambda_t**p - lambda_s**p * (-tau_mul * h).exp()
    depth = p.unsqueeze(1) - p.unsqueeze(0)
    log_factorial = (p + 1).lgamma()
    coeff = log_factorial.unsqueeze(1) - log_factorial.unsqueeze(0)
    if tau_t > 0:
        coeff = coeff - depth * math.log(tau_mul)
    signs = torch.where(depth % 2 == 0, 1.0, -1.0)
    exp_integrals = (coeff.exp() * signs).tril() @ product_terms
    vandermonde_t = torch.vander(curr_lambdas, n, increasing=True).T
    return alpha_t * torch.linalg.solve(vandermonde_t, exp_integrals)


def _comfy_sa_solver(model, x, sigmas, noise_sampler, schedule=SD, eta=1.0, start=0.2, end=0.8, s_noise=1.0,
                     predictor_order=3, corrector_order=4, use_pece=False, simple_order_2=False):  # fmt: skip
    """ComfyUI `sample_sa_solver` with the default τ interval KSAMPLER gets (`get_tau_interval_func` over
    `percent_to_sigma(0.2)` .. `percent_to_sigma(0.8)`), for a discrete (ε/v) model: λ = −log σ."""
    start_sigma, end_sigma = _comfy_percent_to_sigma(schedule, start), _comfy_percent_to_sigma(schedule, end)

    def tau_func(sigma):
        return 0.0 if eta <= 0 else eta if start_sigma >= sigma.item() >= end_sigma else 0.0

    lambdas = sigmas.log().neg()
    max_used_order = max(predictor_order, corrector_order)
    x_pred, h, tau_t, noise, pred_list = x, 0.0, 0.0, 0.0, []
    lower_order_to_end = sigmas[-1].item() == 0
    for i in range(len(sigmas) - 1):
        denoised = model(x_pred, sigmas[i])
        pred_list = (pred_list + [denoised])[-max_used_order:]
        predictor_order_used = min(predictor_order, len(pred_list))
        if i == 0 or (sigmas[i + 1] == 0 and not use_pece):
            corrector_order_used = 0
        else:
            corrector_order_used = min(corrector_order, len(pred_list))
        if lower_order_to_end:
            predictor_order_used = min(predictor_order_used, len(sigmas) - 2 - i)
            corrector_order_used = min(corrector_order_used, len(sigmas) - 1 - i)
        if corrector_order_used == 0:
            x = x_pred
        else:
            curr_lambdas = lambdas[i - corrector_order_used + 1 : i + 1]
            b = _comfy_sa_b_coeffs(
                sigmas[i], curr_lambdas, lambdas[i - 1], lambdas[i], tau_t, simple_order_2, True
            )
            corr_res = torch.tensordot(torch.stack(pred_list[-corrector_order_used:], dim=1), b, ([1], [0]))
            x = sigmas[i] / sigmas[i - 1] * (-(tau_t**2) * h).exp() * x + corr_res
            if tau_t > 0 and s_noise > 0:
                x = x + noise
            if use_pece:
                denoised = model(x, sigmas[i])
                pred_list[-1] = denoised
        if sigmas[i + 1] == 0:
            x_pred = denoised
        else:
            tau_t = tau_func(sigmas[i + 1])
            curr_lambdas = lambdas[i - predictor_order_used + 1 : i + 1]
            b = _comfy_sa_b_coeffs(
                sigmas[i + 1], curr_lambdas, lambdas[i], lambdas[i + 1], tau_t, simple_order_2, False
            )
            pred_res = torch.tensordot(torch.stack(pred_list[-predictor_order_used:], dim=1), b, ([1], [0]))
            h = lambdas[i + 1] - lambdas[i]
            x_pred = sigmas[i + 1] / sigmas[i] * (-(tau_t**2) * h).exp() * x + pred_res
            if tau_t > 0 and s_noise > 0:
                noise = noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1]
                noise = noise * (-2 * tau_t**2 * h).expm1().neg().sqrt() * s_noise
                x_pred = x_pred + noise
    return x_pred


FP64 = {"rtol": 1e-10, "atol": 1e-10}  # measured 4e-15


@pytest.mark.parametrize(
    "options",
    [
        {},  # ComfyUI's KSampler defaults: SDE (τ = 1) between 20 % and 80 % of the schedule, orders 3 / 4
        {"eta": 0.0},
        {"use_pece": True},
        {"predictor_order": 2, "corrector_order": 2, "simple_order_2": True},
        {"predictor_order": 1, "corrector_order": 0, "s_noise": 0.5, "sde_start_percent": 0.0},
    ],
)
def test_sa_solver_matches_comfyui(options):
    """Against a transcription of ComfyUI's sampler and coefficients in float64, and in float32 against that
    float64 reference (measured 1.4e-6; ComfyUI's own float32 run is 7e-6 off it: its Vandermonde solve in
    raw λ is the worse conditioned)."""
    sigmas = get_sigmas("karras", SD, 10).double()
    x = start(sigmas).double()
    noise = keyed_noise(x.shape)
    noise64 = lambda a, b: noise(a, b).double()  # noqa: E731
    comfy = {"start": options.get("sde_start_percent", 0.2)} | {
        k: v for k, v in options.items() if k != "sde_start_percent"
    }
    ref = _comfy_sa_solver(_mixture, x, sigmas, noise64, **comfy)
    ours = sample_sa_solver(mixture_denoiser, x, sigmas, noise_sampler=noise64, **options)
    torch.testing.assert_close(ours, ref, **FP64)
    ours32 = sample_sa_solver(mixture_denoiser, x.float(), sigmas.float(), noise_sampler=noise, **options)
    torch.testing.assert_close(ours32.double(), ref, **FP32)


def test_sa_solver_pece_and_the_model_schedule():
    """sa_solver_pece is sa_solver with use_pece; `get_sampler(name, schedule)` binds the model's schedule,
    which places the SDE interval (a zero-terminal-SNR schedule moves σ at 20 %)."""
    sigmas = get_sigmas("karras", SD, 10)
    x = start(sigmas)
    noise = keyed_noise(x.shape)
    pece = SAMPLERS["sa_solver_pece"](mixture_denoiser, x, sigmas, noise_sampler=noise)
    torch.testing.assert_close(pece, _comfy_sa_solver(_mixture, x, sigmas, noise, use_pece=True), **FP32)
    zsnr = DiscreteSchedule.ddpm(zero_terminal_snr=True)
    assert zsnr.percent_to_sigma(0.2) == _comfy_percent_to_sigma(zsnr, 0.2)
    ours = get_sampler("sa_solver", zsnr)(mixture_denoiser, x, sigmas, noise_sampler=noise)
    torch.testing.assert_close(ours, _comfy_sa_solver(_mixture, x, sigmas, noise, schedule=zsnr), **FP32)
    assert not torch.allclose(ours, SAMPLERS["sa_solver"](mixture_denoiser, x, sigmas, noise_sampler=noise))
    assert get_sampler("euler", zsnr) is sample_euler  # samplers without a schedule parameter stay as given


# ---------------------------------------------------------------------------------------------
# names


def test_sampler_names_and_aliases():
    comfy = ["euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2s_ancestral"]
    comfy += ["dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "ddim", "uni_pc", "lcm"]
    assert set(comfy) <= set(SAMPLERS)
    a1111 = ["Euler", "Euler a", "Heun", "DPM2", "DPM2 a", "LMS", "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M"]
    a1111 += ["DPM++ 2M SDE", "DPM++ 3M SDE", "DDIM", "UniPC", "LCM"]
    for display, name in zip(a1111, comfy, strict=True):
        assert get_sampler(display) is SAMPLERS[name]
        assert get_sampler(display.upper()) is SAMPLERS[name]
    assert get_sampler("ddim") is sample_euler
    with pytest.raises(ValueError, match=r"'DPM\+\+ 9M'.*euler_ancestral.*Euler a"):
        get_sampler("DPM++ 9M")


@pytest.mark.parametrize(
    ("name", "scheduler", "expected"),
    [
        ("Euler a", None, ("euler_ancestral", None)),
        ("DPM++ 2M Karras", None, ("dpmpp_2m", "karras")),
        ("DPM++ 2M SDE Heun Exponential", None, ("dpmpp_2m_sde_heun", "exponential")),
        ("DPM++ 2M SGM Uniform", "normal", ("dpmpp_2m", "sgm_uniform")),  # the combined name wins
        ("LMS Karras", None, ("lms", "karras")),
        ("dpmpp_2m", "Karras", ("dpmpp_2m", "karras")),
        ("DPM++ 2M", "Automatic", ("dpmpp_2m", "karras")),  # AUTOMATIC1111's per-sampler default
        ("DPM++ 3M SDE", "automatic", ("dpmpp_3m_sde", "exponential")),
        ("Euler", "Automatic", ("euler", "normal")),
        ("DDIM", "Automatic", ("ddim", "ddim_uniform")),
        ("euler", "Uniform", ("euler", "normal")),
    ],
)
def test_resolve_sampler(name, scheduler, expected):
    assert resolve_sampler(name, scheduler) == expected


def test_resolve_sampler_errors():
    with pytest.raises(ValueError, match="unknown sampler 'Euler Karras Turbo'"):
        resolve_sampler("Euler Karras Turbo")
    with pytest.raises(ValueError, match="unknown schedule 'weird'"):
        resolve_sampler("Euler", "weird")
