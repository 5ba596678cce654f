"""A k-diffusion-style sampling loop for tests: schedule, CFG denoiser, four samplers.

Each sampler is a short function of (model, x, sigmas) as in k-diffusion's
``sampling.py``; the CFG denoiser batches cond and uncond rows the way A1111 does and
tells the model which row is which (``RowRole``).
"""
from __future__ import annotations

import torch

from omg_ext.engine.rows import RowRole, roles_cond_then_uncond


class DiscreteSchedule:
    """CompVis SD's discrete VP schedule with k-diffusion's sigma <-> t conversion."""

    def __init__(self, steps: int = 1000):
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, steps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        self.alphas_cumprod = alphas_cumprod.float()
        self.sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).float()
        self.log_sigmas = self.sigmas.log()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        low_v, high_v = self.log_sigmas[low], self.log_sigmas[low + 1]
        w = ((low_v - log_sigma) / (low_v - high_v)).clamp(0, 1)
        return ((1 - w) * low + w * (low + 1)).view(sigma.shape)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        low, high = t.floor().long(), t.ceil().long()
        w = t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def get_sigmas(self, n: int) -> torch.Tensor:
        t = torch.linspace(len(self.sigmas) - 1, 0, n)
        return torch.cat([self.t_to_sigma(t), torch.zeros(1)])

    def get_sigmas_karras(self, n: int, rho: float = 7.0) -> torch.Tensor:
        lo, hi = self.sigmas[0] ** (1 / rho), self.sigmas[-1] ** (1 / rho)
        ramp = torch.linspace(0, 1, n)
        return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1)])


class CFGDenoiser:
    """Classifier-free guidance over a model_fn(x, t, cond, rows) that predicts eps."""

    def __init__(self, model_fn, schedule: DiscreteSchedule, cond: dict, uncond: dict, cfg_scale: float, batch_cond_uncond: bool = True):
        self.model_fn, self.schedule, self.cond, self.uncond = model_fn, schedule, cond, uncond
        self.cfg_scale, self.batch_cond_uncond, self.calls = cfg_scale, batch_cond_uncond, 0

    def _eps(self, x, sigma, cond, rows):
        self.calls += 1
        c_in = 1 / (sigma ** 2 + 1) ** 0.5
        return self.model_fn(x * c_in[:, None, None, None], self.schedule.sigma_to_t(sigma), cond, rows)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        sigma = sigma.expand(b) if sigma.dim() else sigma.repeat(b)
        x_in, sigma_in = torch.cat([x, x]), torch.cat([sigma, sigma])
        if self.batch_cond_uncond:
            cond_in = {k: torch.cat([self.cond[k], self.uncond[k]]) for k in self.cond}
            eps = self._eps(x_in, sigma_in, cond_in, roles_cond_then_uncond(b))
        else:
            eps = torch.cat([
                self._eps(x, sigma, self.cond, [RowRole(True, i) for i in range(b)]),
                self._eps(x, sigma, self.uncond, [RowRole(False, i) for i in range(b)]),
            ])
        denoised = x_in - eps * sigma_in[:, None, None, None]
        cond_out, uncond_out = denoised[:b], denoised[b:]
        return uncond_out + (cond_out - uncond_out) * self.cfg_scale


def to_d(x, sigma, denoised):
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from, sigma_to, eta=1.0):
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    return (sigma_to ** 2 - sigma_up ** 2) ** 0.5, sigma_up


def sample_euler(model, x, sigmas, noise_sampler=None):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


def sample_euler_ancestral(model, x, sigmas, noise_sampler=None):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1])
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigma_up
    return x


def sample_heun(model, x, sigmas, noise_sampler=None):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        d = to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1]))
            x = x + (d + d_2) / 2 * dt
    return x


def sample_dpmpp_2m(model, x, sigmas, noise_sampler=None):
    t_fn = lambda sigma: -sigma.log()  # noqa: E731
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * denoised
        else:
            r = (t - t_fn(sigmas[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * denoised_d
        old_denoised = denoised
    return x


SAMPLERS = {"euler": sample_euler, "euler_a": sample_euler_ancestral, "dpmpp_2m": sample_dpmpp_2m, "heun": sample_heun}


def initial_noise(latent_shape: tuple, seed: int, seeds=None) -> torch.Tensor:
    """The starting noise: one generator for the batch, or with ``seeds`` one per image (as the WebUIs do)."""
    if seeds is None:
        return torch.randn(latent_shape, generator=torch.Generator().manual_seed(seed))
    if len(seeds) != latent_shape[0]:
        raise ValueError(f"{len(seeds)} seeds for a batch of {latent_shape[0]}")
    return torch.stack([torch.randn(latent_shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds])


def img2img_sigmas(sigmas: torch.Tensor, strength: float) -> torch.Tensor:
    """The sigmas img2img walks: the last ``int(strength · steps)`` steps of the schedule (A1111's without
    "img2img fix steps"), at least one."""
    steps = len(sigmas) - 1
    return sigmas[steps - max(int(min(strength, 1.0) * steps), 1):]


@torch.no_grad()
def generate(model_fn, schedule: DiscreteSchedule, sampler: str, cond: dict, uncond: dict, *, seed: int, steps: int,
             latent_shape: tuple, cfg_scale: float = 7.0, karras: bool = False, batch_cond_uncond: bool = True,
             seeds=None, init: torch.Tensor | None = None, strength: float = 1.0) -> torch.Tensor:
    """A whole txt2img sampling run; the same seed gives the same noise, ancestral noise included. With ``init``
    (a latent of ``latent_shape``) an img2img run: from ``init`` noised to the first of ``img2img_sigmas``."""
    sigmas = schedule.get_sigmas_karras(steps) if karras else schedule.get_sigmas(steps)
    if init is not None:
        sigmas = img2img_sigmas(sigmas, strength)
    x = initial_noise(latent_shape, seed, seeds) * sigmas[0] + (0 if init is None else init)
    noise = torch.Generator().manual_seed(seed + 1)
    denoiser = CFGDenoiser(model_fn, schedule, cond, uncond, cfg_scale, batch_cond_uncond)
    return SAMPLERS[sampler](denoiser, x, sigmas, noise_sampler=lambda s, s_next: torch.randn(latent_shape, generator=noise))


def step_timesteps(schedule: DiscreteSchedule, sigmas: torch.Tensor) -> list[float]:
    """The timestep of each step's first model call, as the denoiser computes it."""
    return [float(schedule.sigma_to_t(sigmas[i:i + 1].repeat(1))[0]) for i in range(len(sigmas) - 1)]
