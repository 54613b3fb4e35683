"""The sampler and the epsilon-space arithmetic every method shares.

* :func:`to_epsilon` / :func:`epsilon_coefficients` -- the model's prediction in epsilon space
  whatever it predicts (epsilon, v or sample), from the scheduler's ``alphas_cumprod``; every
  guidance rule and training objective is written in epsilon space.
* :func:`image_generator` -- each image's noise comes from its own generator seeded from
  ``(seed, image_index)``, so an image never depends on what else is in its batch.
* :func:`sample` -- the one sampling loop: the scheduler steps on the prediction of a
  :class:`~safediff.denoiser.DefendedDenoiser` (which holds classifier-free guidance and every
  guidance defense).
* :func:`noised_batch` -- the denoising-loss batch of inversion, relearning and Dark Miner.

With no active guidance defense, :func:`sample` computes exactly what diffusers'
``StableDiffusionPipeline`` computes (same batch layout ``[uncond, cond]``, same CFG formula in the
model's own parametrisation, same scheduler calls): the tests state the tolerance.
"""

from __future__ import annotations

import hashlib
import inspect

import torch


# ---------------------------------------------------------------------------------------------
# epsilon space
# ---------------------------------------------------------------------------------------------


def epsilon_coefficients(prediction_type: str, alpha_bar: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` with ``eps = a * model_output + b * x_t`` for the model's parametrisation.

    x_t = sqrt(ab) x0 + sqrt(1-ab) eps;  v = sqrt(ab) eps - sqrt(1-ab) x0.
    """
    ab = torch.as_tensor(alpha_bar, dtype=torch.float64)
    if prediction_type == "epsilon":
        return torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    if prediction_type == "v_prediction":
        return ab.sqrt(), (1 - ab).sqrt()
    if prediction_type == "sample":
        return -ab.sqrt() / (1 - ab).sqrt(), 1 / (1 - ab).sqrt()
    raise ValueError(f"Unknown prediction_type {prediction_type!r}; expected 'epsilon', 'v_prediction' or 'sample'.")


def noised_batch(latents: torch.Tensor, alphas_cumprod: torch.Tensor, batch_size: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch for the denoising loss (Ho et al. 2020, Eq. 14): ``batch_size`` latents drawn with
    replacement, uniform timesteps, ``x_t = sqrt(ab) x0 + sqrt(1 - ab) eps``. Returns
    ``(idx, x_t, t, ab, eps)``; the loss compares :func:`to_epsilon` of the prediction with ``eps``."""
    idx = torch.randint(0, len(latents), (batch_size,), generator=generator)
    x0 = latents[idx]
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    t = torch.randint(0, len(alphas_cumprod), (batch_size,), generator=generator).to(alphas_cumprod.device)
    ab = alphas_cumprod[t].view(-1, 1, 1, 1)
    return idx, ab.sqrt() * x0 + (1 - ab).sqrt() * noise, t, ab, noise


def to_epsilon(model_output: torch.Tensor, x_t: torch.Tensor, alpha_bar, prediction_type: str) -> torch.Tensor:
    """The model's prediction as epsilon (noise), whatever it predicts."""
    a, b = epsilon_coefficients(prediction_type, alpha_bar)
    return (a * model_output.double() + b * x_t.double()).to(model_output.dtype)


def from_epsilon(eps: torch.Tensor, x_t: torch.Tensor, alpha_bar, prediction_type: str) -> torch.Tensor:
    """Inverse of :func:`to_epsilon`."""
    a, b = epsilon_coefficients(prediction_type, alpha_bar)
    return ((eps.double() - b * x_t.double()) / a).to(eps.dtype)


def alpha_bar(scheduler, t, like: torch.Tensor):
    """``alpha_bar`` of timestep ``t``: a float for one timestep (the sampler), a ``(B, 1, 1, 1)``
    tensor on ``like``'s device for one timestep per sample (a loss at random timesteps)."""
    ac = scheduler.alphas_cumprod
    if torch.is_tensor(t) and t.dim() > 0:
        return ac[t.long().cpu()].view(-1, 1, 1, 1).to(like.device)
    return float(ac[int(round(float(t)))])


# ---------------------------------------------------------------------------------------------
# seeds
# ---------------------------------------------------------------------------------------------


def image_seed(seed: int, image_index: int) -> int:
    """The seed of image ``image_index`` of a prompt under base ``seed``.

    Image 0 uses ``seed`` itself, so a single image matches diffusers with
    ``torch.Generator().manual_seed(seed)``; later images use a hash of ``(seed, index)``.
    """
    if image_index == 0:
        return int(seed)
    digest = hashlib.sha256(f"safediff:{seed}:{image_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def image_generator(seed: int, image_index: int, device: str | torch.device = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(image_seed(seed, image_index))


def initial_latents(model, generators: list[torch.Generator], height: int, width: int,
                    num_inference_steps: int | None = None) -> torch.Tensor:
    """One latent per generator, drawn separately (as diffusers does with a list of generators),
    times the scheduler's ``init_noise_sigma``.

    ``num_inference_steps``: set the scheduler's timesteps first, as diffusers' pipelines do before
    ``prepare_latents``: for sigma schedulers (Euler, SDXL's default) ``init_noise_sigma`` depends
    on the schedule (for DDIM / PNDM / DDPM it is 1 either way)."""
    from diffusers.utils.torch_utils import randn_tensor

    if num_inference_steps is not None:
        model.scheduler.set_timesteps(num_inference_steps, device=model.device)
    shape = (len(generators), model.unet.config.in_channels, height // model.vae_scale_factor, width // model.vae_scale_factor)
    latents = randn_tensor(shape, generator=generators, device=model.device, dtype=model.dtype)
    return latents * model.scheduler.init_noise_sigma


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------


def sample(model, denoiser, latents: torch.Tensor, *, num_inference_steps: int, scheduler=None,
           generators: list[torch.Generator] | None = None, eta: float = 0.0, stop_after: int | None = None,
           on_step=None) -> torch.Tensor:
    """Run the scheduler on ``denoiser``'s prediction; returns the latents.

    Args:
        denoiser: a :class:`~safediff.denoiser.DefendedDenoiser` (entered by the caller).
        scheduler: default the model's; ESD samples with its own DDIM scheduler.
        stop_after: stop after this many steps (ESD's partial sampling to ``t_enc``).
        on_step: called as ``on_step(i, total)`` after each step (progress bars).
    """
    sched = scheduler if scheduler is not None else model.scheduler
    sched.set_timesteps(num_inference_steps, device=model.device)
    step_params = set(inspect.signature(sched.step).parameters)
    extra = {}
    if "eta" in step_params:
        extra["eta"] = eta
    if "generator" in step_params:
        extra["generator"] = generators
    total = len(sched.timesteps) if stop_after is None else min(stop_after, len(sched.timesteps))
    for i, t in enumerate(sched.timesteps):
        if stop_after is not None and i >= stop_after:
            break
        x_in = sched.scale_model_input(latents, t)
        native = denoiser.model_output(x_in, t, i)
        latents = sched.step(native, t, latents, **extra, return_dict=False)[0]
        if on_step is not None:
            on_step(i, total)
    return latents


def decode(model, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [0, 1], ``(B, 3, H, W)``, as diffusers' VAE decode + postprocess."""
    with torch.no_grad():
        img = model.vae.decode(latents / model.vae.config.scaling_factor, return_dict=False)[0]
    return (img / 2 + 0.5).clamp(0, 1)


def to_uint8(images: torch.Tensor):
    """``(B, 3, H, W)`` in [0, 1] -> list of ``(H, W, 3)`` uint8 arrays, rounding as diffusers does."""
    arr = images.detach().cpu().permute(0, 2, 3, 1).float().numpy()
    return [(a * 255).round().astype("uint8") for a in arr]
