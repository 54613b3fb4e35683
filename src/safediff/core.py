"""One denoising core for every defense.

* :func:`encode_prompts` -- tokenise and encode as diffusers does (over-long prompts are cut with a
  warning that says what was cut).
* :func:`to_epsilon` / :func:`epsilon_coefficients` -- the model's prediction in epsilon space
  whatever it predicts (epsilon, v or sample), from the scheduler's ``alphas_cumprod``.
* :func:`image_generator` -- each image's noise comes from its own generator seeded from
  ``(seed, image_index)``, so an image never depends on what else is in its batch.
* :func:`denoise` -- classifier-free guidance with guidance defenses plugged in: their extra
  conditionings are batched into the same UNet call; their rules act in epsilon space.

With no active guidance defense, :func:`denoise` computes exactly what diffusers'
``StableDiffusionPipeline`` computes (same batch layout ``[uncond, cond]``, same CFG formula in the
model's own parametrisation, same scheduler calls): the tests state the tolerance.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Sequence

import torch

from .defenses.base import GuidanceContext, GuidanceDefense, StepInfo


class PromptError(ValueError):
    """A prompt that cannot be generated (empty, wrong type)."""


def validate_prompts(prompts: str | Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise PromptError("No prompt given: pass at least one prompt.")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise PromptError(f"Prompt {i} is a {type(p).__name__}, expected a string.")
        if not p.strip():
            raise PromptError(
                f"Prompt {i} is empty. An empty prompt gives the model's unconditional output; "
                "pass some text (use `guidance_scale=1` with a real prompt for unguided sampling)."
            )
    return prompts


def encode_prompts(model, prompts: list[str], *, warn_truncation: bool = True):
    """Encode prompts with the model's tokenizer and text encoder, as diffusers' ``encode_prompt``.

    Returns ``(embeds (B, L, D), input_ids (B, L), attention_mask (B, L))``; the mask marks the
    real tokens (start, words, first end token) and is what embedding defenses use to skip padding.
    """
    tok, te = model.tokenizer, model.text_encoder
    max_len = tok.model_max_length
    enc = tok(prompts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
    ids = enc.input_ids
    if warn_truncation:
        full = tok(prompts, padding="longest", return_tensors="pt").input_ids
        if full.shape[-1] > ids.shape[-1]:
            for i, p in enumerate(prompts):
                n_real = int((full[i] != tok.pad_token_id).sum()) + 1 if tok.pad_token_id == tok.eos_token_id else int(full[i].ne(tok.pad_token_id).sum())
                if n_real > max_len:
                    removed = tok.batch_decode(full[i : i + 1, max_len - 1 : -1])[0]
                    warnings.warn(
                        f"The prompt {i} is longer than the tokenizer's {max_len} tokens; this part was cut: "
                        f"{removed!r}",
                        stacklevel=3,
                    )
    mask = _real_token_mask(ids, tok)
    use_mask = getattr(te.config, "use_attention_mask", False)
    with torch.no_grad():
        out = te(ids.to(te.device), attention_mask=enc.attention_mask.to(te.device) if use_mask else None)
    return out[0].to(model.dtype), ids, mask


def _real_token_mask(ids: torch.Tensor, tok) -> torch.Tensor:
    """1 up to and including the first end-of-text token, 0 after (padding)."""
    eos = ids == tok.eos_token_id
    first = torch.where(eos.any(1), eos.int().argmax(1), torch.full((ids.shape[0],), ids.shape[1] - 1))
    pos = torch.arange(ids.shape[1])[None]
    return (pos <= first[:, None]).long()


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


def alpha_bar_at(scheduler, t) -> float:
    t_int = int(round(float(t)))
    return float(scheduler.alphas_cumprod[t_int])


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


def initial_latents(model, generators: list[torch.Generator], height: int, width: int) -> torch.Tensor:
    """One latent per generator, drawn separately (as diffusers does with a list of generators)."""
    from diffusers.utils.torch_utils import randn_tensor

    shape = (len(generators), model.unet.config.in_channels, height // model.vae_scale_factor, width // model.vae_scale_factor)
    latents = randn_tensor(shape, generator=generators, device=model.device, dtype=model.dtype)
    return latents * model.scheduler.init_noise_sigma


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------


def denoise(
    model,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor,
    latents: torch.Tensor,
    *,
    guidance_scale: float,
    num_inference_steps: int,
    guidance: Sequence[GuidanceDefense] = (),
    guidance_ctx: GuidanceContext | None = None,
    generators: list[torch.Generator] | None = None,
    eta: float = 0.0,
    progress=None,
) -> torch.Tensor:
    """Run the sampler; returns the final latents.

    ``guidance`` defenses must already be active ones; their :meth:`prepare` conditionings are
    appended after ``[uncond, cond]`` in one UNet call per step.
    """
    import inspect

    sched = model.scheduler
    sched.set_timesteps(num_inference_steps, device=model.device)
    timesteps = sched.timesteps
    B = latents.shape[0]
    do_cfg = guidance_scale > 1.0

    extra_names: list[str] = []
    extra_embeds: list[torch.Tensor] = []
    for g in guidance:
        if guidance_ctx is None:
            raise ValueError("guidance defenses need a GuidanceContext")
        for name, emb in g.prepare(guidance_ctx).items():
            if name in ("uncond", "cond") or name in extra_names:
                raise ValueError(f"Two guidance defenses ask for a conditioning named {name!r}; names must be unique.")
            if emb.shape[0] == 1 and B > 1:
                emb = emb.expand(B, -1, -1)
            extra_names.append(name)
            extra_embeds.append(emb.to(model.dtype))
    if guidance and not do_cfg:
        raise ValueError(
            f"Guidance defenses need classifier-free guidance, but `guidance_scale` is {guidance_scale} (<= 1)."
        )

    if do_cfg:
        cond_all = torch.cat([negative_embeds, prompt_embeds, *extra_embeds])
    else:
        cond_all = prompt_embeds
    n_chunks = cond_all.shape[0] // B

    step_params = set(inspect.signature(sched.step).parameters)
    extra_step = {}
    if "eta" in step_params:
        extra_step["eta"] = eta
    if "generator" in step_params:
        extra_step["generator"] = generators

    for i, t in enumerate(timesteps):
        x_in = torch.cat([latents] * n_chunks) if n_chunks > 1 else latents
        x_in = sched.scale_model_input(x_in, t)
        out = model.unet(x_in, t, encoder_hidden_states=cond_all, return_dict=False)[0]
        if do_cfg:
            chunks = out.chunk(n_chunks)
            out_uncond, out_cond = chunks[0], chunks[1]
            # classifier-free guidance in the model's own parametrisation, exactly as diffusers
            native = out_uncond + guidance_scale * (out_cond - out_uncond)
            if guidance:
                ab = alpha_bar_at(sched, t)
                x_t = x_in[:B]
                eps = {"uncond": to_epsilon(out_uncond, x_t, ab, model.prediction_type),
                       "cond": to_epsilon(out_cond, x_t, ab, model.prediction_type)}
                for name, ch in zip(extra_names, chunks[2:]):
                    eps[name] = to_epsilon(ch, x_t, ab, model.prediction_type)
                eps_cfg = to_epsilon(native, x_t, ab, model.prediction_type)
                info = StepInfo(index=i, num_steps=len(timesteps), timestep=t, alpha_bar=ab, latents=latents)
                guided = eps_cfg
                for g in guidance:
                    guided = g.guide(eps, guided, info)
                # the conversion is affine in the output, so only the change needs converting back
                a, _ = epsilon_coefficients(model.prediction_type, ab)
                native = native + ((guided - eps_cfg).double() / a).to(native.dtype)
        else:
            native = out
        latents = sched.step(native, t, latents, **extra_step, return_dict=False)[0]
        if progress is not None:
            progress.update(1)
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
