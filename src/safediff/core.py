"""The sampler and the epsilon-space arithmetic every method shares.

* :func:`to_epsilon` / :func:`epsilon_coefficients` -- the model's prediction in epsilon space
  whatever it predicts (epsilon, v or sample, from the scheduler's ``alphas_cumprod``; a
  flow-matching velocity, from the step's sigma); every guidance rule and training objective is
  written in epsilon space.
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

    ``alpha_bar`` is the step's noise level (:func:`noise_level`): ``alpha_bar`` for the
    variance-preserving parametrisations, ``sigma`` for ``"flow"``.

    * x_t = sqrt(ab) x0 + sqrt(1-ab) eps;  v = sqrt(ab) eps - sqrt(1-ab) x0 (Salimans & Ho 2022).
    * flow matching (rectified flow; SD3 / FLUX, Esser et al. 2024 Eq. 2-3):
      x_t = (1 - sigma) x0 + sigma eps and the model predicts the velocity u = eps - x0, so
      eps = x_t + (1 - sigma) u, i.e. ``a = 1 - sigma``, ``b = 1``. Every epsilon-space rule is
      then a rule on the velocity too: a change ``d`` of epsilon is a change ``d / (1 - sigma)``
      of the velocity at the same ``x_t``.
    """
    if prediction_type == "flow":
        sigma = torch.as_tensor(alpha_bar, dtype=torch.float64)
        return 1 - sigma, torch.ones_like(sigma)
    ab = torch.as_tensor(alpha_bar, dtype=torch.float64)
    if prediction_type == "epsilon":
        return torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    if prediction_type == "v_prediction":
        return ab.sqrt(), (1 - ab).sqrt()
    if prediction_type == "sample":
        return -ab.sqrt() / (1 - ab).sqrt(), 1 / (1 - ab).sqrt()
    raise ValueError(f"Unknown prediction_type {prediction_type!r}; expected 'epsilon', 'v_prediction', 'sample' or 'flow'.")


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


def noise_level(scheduler, t, like: torch.Tensor, prediction_type: str):
    """The noise level :func:`epsilon_coefficients` takes at timestep ``t``: ``sigma = t / T`` for
    a flow-matching model (its scheduler's timesteps are ``sigma * num_train_timesteps``),
    otherwise :func:`alpha_bar`. A float for one timestep, a ``(B, 1, ..., 1)`` tensor shaped
    like ``like`` for one timestep per sample.

    Flow matching: at ``sigma = 1`` (the first step of SD3's schedule) ``x_t`` is pure noise and
    epsilon equals ``x_t`` whatever the model predicts, so an epsilon-space rule could not act and
    its change could not be converted back (``a = 1 - sigma = 0``). ``sigma`` is therefore capped
    at ``1 - 1/T`` [a documented choice]: for the affine rules (classifier-free guidance, negative
    prompt, INE, SAFREE's embeddings) the velocity they produce does not depend on ``sigma`` at all,
    so the cap changes nothing; a rule with thresholds in epsilon units (SLD) sees differences
    ``1/T`` times the velocity's at that one step (SLD's warm-up keeps it off there anyway)."""
    if prediction_type != "flow":
        return alpha_bar(scheduler, t, like)
    T = float(scheduler.config.num_train_timesteps)
    cap = 1.0 - 1.0 / T
    if torch.is_tensor(t) and t.dim() > 0:
        return (t.to(like.device, torch.float64) / T).clamp(max=cap).view(-1, *(1,) * (like.dim() - 1))
    return min(float(t) / T, cap)


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
    on the schedule (for DDIM / PNDM / DDPM it is 1 either way).

    The noise is drawn in fp32 by the (CPU) generators and then moved to the model's device, so a
    seed gives the same noise on every device and in every model dtype; the latents stay fp32
    (the sampler's state; the denoiser casts its input to the model's dtype)."""
    from diffusers.utils.torch_utils import randn_tensor

    if "packed_latents" in model.capabilities:  # FLUX: noise on the latent grid, packed into 2x2 patches, as FluxPipeline
        h, w = flux_latent_grid(model, height, width)
        latents = pack_latents(randn_tensor((len(generators), model.unet.config.in_channels // 4, h, w),
                                            generator=generators, device=model.device, dtype=torch.float32))
        if num_inference_steps is not None:
            set_timesteps(model, model.scheduler, num_inference_steps, latents.shape)
        return latents
    shape = (len(generators), model.unet.config.in_channels, height // model.vae_scale_factor, width // model.vae_scale_factor)
    if num_inference_steps is not None:
        set_timesteps(model, model.scheduler, num_inference_steps, shape)
    latents = randn_tensor(shape, generator=generators, device=model.device, dtype=torch.float32)
    # flow-matching schedulers start from pure noise (no init_noise_sigma)
    return latents * getattr(model.scheduler, "init_noise_sigma", 1.0)


def flux_latent_grid(model, height: int, width: int) -> tuple[int, int]:
    """FLUX's latent grid for a ``height`` x ``width`` image: the VAE's factor, rounded down to an
    even size so that it packs into 2x2 patches (as FluxPipeline)."""
    f = 2 * model.vae_scale_factor
    return 2 * (height // f), 2 * (width // f)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """FLUX's packing: ``(B, C, h, w)`` -> ``(B, h/2 * w/2, 4C)``, one token per 2x2 patch."""
    B, C, h, w = latents.shape
    return latents.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (h // 2) * (w // 2), C * 4)


def unpack_latents(latents: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for a ``h`` x ``w`` latent grid."""
    B, _, D = latents.shape
    return latents.view(B, h // 2, w // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, D // 4, h, w)


def latent_image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """FLUX's position ids of the packed tokens of a ``h`` x ``w`` latent grid: ``(h/2 * w/2, 3)``
    holding (0, row, column), as FluxPipeline."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def set_timesteps(model, scheduler, num_inference_steps: int, latent_shape) -> None:
    """``scheduler.set_timesteps`` as the family's diffusers pipeline calls it: a flow-matching
    scheduler with dynamic shifting gets ``mu`` from the image's token count (SD3's pipeline;
    FLUX's always), and FLUX passes its own sigmas ``linspace(1, 1/n, n)``."""
    import numpy as np

    kwargs = {}
    cfg = scheduler.config
    flux = "packed_latents" in model.capabilities  # FLUX's own sigmas and shift
    if flux and not cfg.get("use_flow_sigmas", False):
        kwargs["sigmas"] = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    if cfg.get("use_dynamic_shifting", False) or flux:
        if len(latent_shape) == 3:  # packed tokens (FLUX)
            seq_len = latent_shape[1]
        else:
            patch = getattr(model.unet.config, "patch_size", 1) or 1
            seq_len = (latent_shape[-2] // patch) * (latent_shape[-1] // patch)
        base_len, max_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
        base_shift, max_shift = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15 if flux else 1.16)
        m = (max_shift - base_shift) / (max_len - base_len)
        kwargs["mu"] = seq_len * m + (base_shift - m * base_len)
    scheduler.set_timesteps(num_inference_steps, device=model.device, **kwargs)


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
    set_timesteps(model, sched, num_inference_steps, latents.shape)
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
        x_in = sched.scale_model_input(latents, t) if hasattr(sched, "scale_model_input") else latents
        native = denoiser.model_output(x_in, t, i)
        # the scheduler steps in the latents' dtype (fp32 from initial_latents), whatever the model's
        latents = sched.step(native.to(latents.dtype), t, latents, **extra, return_dict=False)[0]
        if on_step is not None:
            on_step(i, total)
    return latents


def decode(model, latents: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Latents -> images in [0, 1], ``(B, 3, H, W)``, as diffusers' VAE decode + postprocess
    (SD3's and FLUX's VAEs also have a shift factor). FLUX's packed latents are unpacked first,
    for images of ``size`` ``(height, width)`` (default the model's)."""
    if latents.dim() == 3:
        H, W = size or (model.default_size, model.default_size)
        latents = unpack_latents(latents, *flux_latent_grid(model, H, W))
    shift = getattr(model.vae.config, "shift_factor", None) or 0.0
    with torch.no_grad():  # the VAE decodes in its own dtype (SDXL's stays fp32 under an fp16 model)
        z = latents.to(model.vae.dtype) / model.vae.config.scaling_factor
        img = model.vae.decode(z + shift if shift else z, return_dict=False)[0]
    return (img.float() / 2 + 0.5).clamp(0, 1)


def to_uint8(images: torch.Tensor):
    """``(B, 3, H, W)`` in [0, 1] -> list of ``(H, W, 3)`` uint8 arrays, rounding as diffusers does."""
    arr = images.detach().cpu().permute(0, 2, 3, 1).float().numpy()
    return [(a * 255).round().astype("uint8") for a in arr]
