"""Train the testbed model: a tiny Stable-Diffusion-shaped text-to-image model on the testbed world.

``safediff testbed train --out DIR`` runs, in order (each stage seeded, the config recorded):

1. an offline CLIP tokenizer over every word of the world (held-out words included: the base
   model plays a pretrained SD, which knows every word);
2. a tiny ``AutoencoderKL`` (32x32 RGB -> 16x16x4 latents), reconstruction + tiny KL;
3. the ``UNet2DConditionModel`` and a ``CLIPTextModel`` trained jointly from scratch, v-prediction
   with min-SNR-5 weighting, cosine beta schedule, AdamW with warm-up and cosine decay, EMA of both
   networks, fresh random data every step, periodic EMA checkpoints and roll-back on a loss spike
   (testbed-notes.md: a constant 1e-3 learning rate diverged at ~3,500 steps). The text encoder
   also learns a CLIP-style contrastive objective (Radford et al. 2021, InfoNCE between the pooled
   text embedding and a small image encoder's embedding of the training image, weight
   ``clip_weight``; both heads are dropped afterwards), as Stable Diffusion's text encoder is a
   contrastively trained CLIP one: without it, every word that brings a concept collapses onto
   one text direction (testbed-notes.md, "joint training collapses synonyms"). A second
   auxiliary objective stands in for language pretraining: the pooled embedding of a caption
   points along its mean meaning vector (:func:`safediff.testbed.world.meaning_vectors`: related
   words share a concept direction to a designed degree; weight ``meaning_weight``);
4. the guidance-scale curve (exact detectors over many samples), whose best scale is recorded in
   the model's ``safediff.json`` and is the default wherever the testbed is used;
5. the world's acceptance check (:func:`safediff.testbed.quality.world_acceptance`): the base
   model's statistics against the targets of the world (partial trigger rates, benign and empty
   base rates, pooled cosines, the negative prompt's effect, attribute accuracy), recorded in
   ``safediff.json``; a model that misses a target is reported with the measured numbers. A model
   of world v3 (``world_version=3``) is also checked against v3's own targets, stated before any
   v3 model was trained (:func:`safediff.testbed.acceptance_v3.world_v3_acceptance`).

The model is written in the diffusers layout (fp16 weights, loaded back as fp32), to a temporary
folder renamed into place at the end, so an interrupted run never leaves a half-written model.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .._version import __version__
from ..models import load_model
from ..tokenizer import build_clip_tokenizer
from . import world
from .quality import guidance_curve, world_acceptance
from .vocabulary import (
    FORM_KINDS,
    INFLECTIONS,
    NEGATION_SHARE,
    NEGATION_STRENGTH,
    NEGATORS,
    PILE_CAPTION_PROB,
    pile_probs,
    check_world_version,
    concept_forms,
)

TESTBED_FAMILY = "safediff-testbed"


@dataclass(frozen=True)
class TrainConfig:
    """Recipe of the testbed model (defaults: the shipped model).

    Args:
        seed: seeds every random draw (data, initialisation, noise).
        vae_steps / vae_batch / vae_lr: autoencoder stage.
        steps / batch / lr / min_lr / warmup: denoiser + text-encoder stage (cosine decay to min_lr).
        ema_decay: EMA of the denoiser and text encoder.
        min_snr_gamma: min-SNR-gamma weighting of the v-prediction loss (Hang et al., ICCV 2023:
            weight ``min(SNR, gamma) / (SNR + 1)`` on the v loss, i.e. ``min(SNR, gamma)`` on the
            x0 error); ``None`` trains on the plain v loss (weight 1, as Stable Diffusion 2.x's
            v-prediction models were trained), which weighs the high-noise steps far more.
        checkpoint_every: steps between in-memory EMA checkpoints (the roll-back points) and
            on-disk resume checkpoints.
        spike_factor: a smoothed loss above ``spike_factor`` times its best value rolls back.
        max_minutes: wall-clock safety stop for the whole run.
        guidance_scales / curve_samples: the guidance-scale curve measured at the end.
        keep_guidance_scale: the shipped model's default scale (4.0), which a retrained model keeps
            unless another scale of the curve beats it by more than twice the standard error of the
            difference (docs/testbed.md, "Decision on the misses"); None takes the curve's best.
        unet_channels / unet_layers_per_block: the denoiser's width per resolution level and its
            ResNet blocks per level (defaults: the shipped model's, 6.6 M parameters); a
            capacity option for trials (benchmarks/denoiser_size_trial.py), each channel count a
            multiple of 32 (the group norm's groups).
        world_version: the world the captions are drawn from (2: the shipped model's; 3: word forms,
            negation and near-concept piles, docs/testbed.md "World v3"); it picks the tokenizer's
            words, the sampler and the meaning vectors.
    """

    seed: int = 0
    vae_steps: int = 1200
    vae_batch: int = 32
    vae_lr: float = 2e-3
    steps: int = 6000
    batch: int = 32
    clip_weight: float = 0.05
    meaning_weight: float = 0.1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 200
    ema_decay: float = 0.999
    min_snr_gamma: float | None = 5.0
    checkpoint_every: int = 250
    spike_factor: float = 4.0
    max_minutes: float = 50.0
    guidance_scales: tuple[float, ...] = (1.5, 2.0, 2.5, 3.0, 4.0)
    curve_samples: int = 200
    keep_guidance_scale: float | None = 4.0
    num_inference_steps: int = 25
    acceptance_n: int = 100
    world: world.WorldConfig = field(default_factory=world.WorldConfig)
    world_version: int = 2
    unet_channels: tuple[int, int, int] = (64, 128, 128)
    unet_layers_per_block: int = 1

    def __post_init__(self) -> None:
        check_world_version(self.world_version)
        if not isinstance(self.unet_channels, (list, tuple)):
            raise ValueError(f"`unet_channels` must be three whole multiples of 32 (one per resolution level, "
                             f"e.g. [64, 128, 128]); got {self.unet_channels!r}.")
        channels = tuple(self.unet_channels)  # a JSON list, or a list passed in, is the same recipe as the tuple
        object.__setattr__(self, "unet_channels", channels)
        if len(channels) != 3 or any(isinstance(c, bool) or not isinstance(c, int) or c < 32 or c % 32
                                     for c in channels):
            raise ValueError(f"`unet_channels` must be three whole multiples of 32 (one per resolution level, "
                             f"e.g. [64, 128, 128]); got {self.unet_channels!r}.")
        if isinstance(self.unet_layers_per_block, bool) or not isinstance(self.unet_layers_per_block, int) \
                or self.unet_layers_per_block < 1:
            raise ValueError(f"`unet_layers_per_block` must be a whole number >= 1, got {self.unet_layers_per_block!r}.")
        if self.steps < 1 or self.vae_steps < 1:
            raise ValueError("`steps` and `vae_steps` must be >= 1.")
        if not 0 < self.min_lr <= self.lr:
            raise ValueError(f"need 0 < `min_lr` <= `lr`, got min_lr={self.min_lr}, lr={self.lr}.")
        if self.keep_guidance_scale is not None and not any(
                abs(float(self.keep_guidance_scale) - float(g)) < 1e-9 for g in self.guidance_scales):
            raise ValueError(f"`keep_guidance_scale` {self.keep_guidance_scale} is not one of `guidance_scales` "
                             f"{list(self.guidance_scales)}: add it there, or set it to None to take the curve's best.")
        if self.min_snr_gamma is not None and (isinstance(self.min_snr_gamma, bool) or not self.min_snr_gamma > 0):
            raise ValueError(f"`min_snr_gamma` must be a positive number, or None for the plain v loss; "
                             f"got {self.min_snr_gamma!r}.")
        if self.clip_weight < 0 or self.meaning_weight < 0:
            raise ValueError(f"`clip_weight` and `meaning_weight` must be >= 0, got {self.clip_weight}, {self.meaning_weight}.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        d["world"] = world.WorldConfig.from_dict(d.get("world", {}))
        d["guidance_scales"] = tuple(d.get("guidance_scales", cls.guidance_scales))
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"Unknown training option(s) {sorted(unknown)}; known: {sorted(names)}.")
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# components
# ---------------------------------------------------------------------------------------------


def build_components(tokenizer, seed: int = 0, unet_channels: tuple[int, int, int] = (64, 128, 128),
                     unet_layers_per_block: int = 1) -> dict:
    """Untrained testbed components (stock diffusers/transformers classes); the denoiser's size
    is TrainConfig's ``unet_channels`` / ``unet_layers_per_block`` (defaults: the shipped model's)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=world.IMAGE_SIZE,
    )
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=world.IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=tuple(unet_channels),
        layers_per_block=unet_layers_per_block,
        cross_attention_dim=64,
        attention_head_dim=4,  # diffusers' name for the number of heads: 4 heads (32 channels each at 128)
        norm_num_groups=32,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            projection_dim=64,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # Ancestral sampling (DDPM, posterior variance: DDIM with eta = 1), 25 trailing steps. Measured
    # on the trained model (docs/testbed.md): the deterministic DDIM sampler drops a concept that
    # has several visual modes (explicit "striped" 0.82, synonyms 0.63) where the stochastic one
    # samples what the model learned (0.92, 0.85); benign prompts stay at 0.00-0.01 with both.
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        clip_sample=False,
        timestep_spacing="trailing",
        variance_type="fixed_small",
        steps_offset=1,  # unused by "trailing"; set so the pipeline does not rewrite the config
    )
    return {"vae": vae, "unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


class ImageEncoder(torch.nn.Module):
    """The image side of the contrastive text objective (training only, not shipped): a small
    CNN from a 32x32 RGB image to a ``dim``-wide embedding."""

    def __init__(self, dim: int = 64):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.GELU(),
            torch.nn.Conv2d(32, 64, 3, stride=2, padding=1), torch.nn.GELU(),
            torch.nn.Conv2d(64, 128, 3, stride=2, padding=1), torch.nn.GELU(),
            torch.nn.Conv2d(128, 128, 3, stride=2, padding=1), torch.nn.GELU(),
        )
        self.proj = torch.nn.Linear(128 * 4 * 4, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.net(x).flatten(1))


def contrastive_loss(text: torch.Tensor, image: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP, Radford et al. 2021, Eq. in Fig. 3) over a batch of pairs."""
    t = F.normalize(text, dim=-1)
    i = F.normalize(image, dim=-1)
    logits = logit_scale.exp().clamp(max=100) * t @ i.T
    labels = torch.arange(len(t))
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def _batch(rng: random.Random, n: int, cfg: world.WorldConfig, version: int = 2):
    scenes, captions = [], []
    for _ in range(n):
        s, cap = world.sample(rng, cfg, version=version)
        scenes.append(s)
        captions.append(cap)
    imgs = np.stack([world.render(s) for s in scenes]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(), captions


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, p)))


def train_vae(vae, cfg: TrainConfig, progress: bool = True, log=print, work_dir: Path | None = None) -> float:
    """Stage 2. Returns the latent scaling factor (1 / std of latents), set on the VAE config.
    With ``work_dir``, a checkpoint every ``checkpoint_every`` steps lets a stopped run resume here
    (to the same weights) instead of starting the stage again."""
    from tqdm.auto import tqdm

    rng = random.Random(cfg.seed + 100)
    gen = torch.Generator().manual_seed(cfg.seed + 101)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    ckpt_path = work_dir / "vae_checkpoint.pt" if work_dir is not None else None
    start = 0
    if ckpt_path is not None and ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=True)  # tensors and plain values only: no code
        if not same_config(ck["config"], cfg):
            raise ValueError(f"The checkpoint at {ckpt_path} was made with another training config; delete it to "
                             "start over, or resume with the config it was made with.")
        vae.load_state_dict(ck["vae"]); opt.load_state_dict(ck["opt"]); start = ck["step"]
        rng.setstate(_tuple_state(ck["py_rng"])); gen.set_state(ck["torch_rng"])
        log(f"vae: resumed from step {start}")
    vae.train()
    bar = tqdm(range(start, cfg.vae_steps), desc="vae", disable=not progress, initial=start, total=cfg.vae_steps)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cfg.vae_lr * 0.5 * (1 + math.cos(math.pi * step / cfg.vae_steps))
        x, _ = _batch(rng, cfg.vae_batch, cfg.world, cfg.world_version)
        post = vae.encode(x).latent_dist
        z = post.sample(generator=gen)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            psnr = 10 * math.log10(4.0 / max(F.mse_loss(rec, x).item(), 1e-10))
            bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{psnr:.1f}")
        if ckpt_path is not None and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.vae_steps:
            _save_ckpt(ckpt_path, step + 1, cfg, {"vae": vae.state_dict(), "opt": opt.state_dict(),
                                                  "py_rng": rng.getstate(), "torch_rng": gen.get_state()})
    vae.eval()
    with torch.no_grad():
        x, _ = _batch(rng, 256, cfg.world, cfg.world_version)
        z = vae.encode(x).latent_dist.sample(generator=gen)
        rec = vae.decode(z).sample
        psnr = 10 * math.log10(4.0 / F.mse_loss(rec, x).item())
        scale = float(1.0 / z.std())
    vae.register_to_config(scaling_factor=scale)
    log(f"vae: PSNR {psnr:.1f} dB on 256 fresh images, latent scaling factor {scale:.4f}")
    return scale


def same_config(saved: dict, cfg: TrainConfig) -> bool:
    """Whether a checkpoint's recorded config is ``cfg``: compared after reading it back through
    :meth:`TrainConfig.from_dict`, so that an option added to the recipe after the checkpoint was
    written counts as its default (a run stopped in one version resumes in the next) while any
    recorded value that differs, or an option the recipe no longer has, does not match."""
    try:
        return TrainConfig.from_dict(saved).to_dict() == cfg.to_dict()
    except (TypeError, ValueError):
        return False


def loss_weights(snr: torch.Tensor, min_snr_gamma: float | None) -> torch.Tensor:
    """Per-example weights of the v-prediction loss: min-SNR-gamma (``min(SNR, gamma) / (SNR + 1)``,
    Hang et al., ICCV 2023, for v-prediction) or, with ``None``, 1 (the plain v loss)."""
    if min_snr_gamma is None:
        return torch.ones_like(snr)
    return torch.clamp(snr, max=min_snr_gamma) / (snr + 1)


def _save_ckpt(path: Path, step: int, cfg: TrainConfig, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"step": step, "config": cfg.to_dict(), **state}, tmp)
    tmp.replace(path)


def train_denoiser(components: dict, cfg: TrainConfig, work_dir: Path, progress: bool = True, log=print) -> dict:
    """Stage 3: UNet + text encoder, jointly. Returns EMA copies of both."""
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    unet, te, tok, vae = components["unet"], components["text_encoder"], components["tokenizer"], components["vae"]
    noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", clip_sample=False)
    alphas_cumprod = noise_sched.alphas_cumprod
    snr_all = alphas_cumprod / (1 - alphas_cumprod)
    torch.manual_seed(cfg.seed + 3)
    img_enc = ImageEncoder(te.config.hidden_size)
    text_proj = torch.nn.Linear(te.config.hidden_size, te.config.hidden_size, bias=False)
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    aux = [*img_enc.parameters(), *text_proj.parameters(), logit_scale]
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params + aux, lr=cfg.lr, weight_decay=0.01)
    ema_unet, ema_te = copy.deepcopy(unet).eval(), copy.deepcopy(te).eval()
    for p in list(ema_unet.parameters()) + list(ema_te.parameters()):
        p.requires_grad_(False)

    meanings = world.meaning_vectors(te.config.hidden_size, seed=cfg.seed, version=cfg.world_version)
    aux_mod = torch.nn.ModuleDict({"image": img_enc, "text_proj": text_proj})
    aux_mod.register_parameter("logit_scale", logit_scale)
    modules = (("unet", unet), ("te", te), ("aux", aux_mod), ("ema_unet", ema_unet), ("ema_te", ema_te), ("opt", opt))
    ckpt_path = work_dir / "train_checkpoint.pt"
    start, lr_mult = 0, 1.0
    rng = random.Random(cfg.seed + 200)
    gen = torch.Generator().manual_seed(cfg.seed + 201)
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=True)
        if not same_config(ck["config"], cfg):
            raise ValueError(
                f"The checkpoint at {ckpt_path} was made with another training config; "
                "delete it to start over, or resume with the config it was made with."
            )
        unet.load_state_dict(ck["unet"]); te.load_state_dict(ck["te"]); aux_mod.load_state_dict(ck["aux"])
        ema_unet.load_state_dict(ck["ema_unet"]); ema_te.load_state_dict(ck["ema_te"])
        opt.load_state_dict(ck["opt"]); start = ck["step"]; lr_mult = ck["lr_mult"]
        rng.setstate(_tuple_state(ck["py_rng"])); gen.set_state(ck["torch_rng"])
        log(f"resumed from step {start}")

    def snapshot():
        return {k: copy.deepcopy(m.state_dict()) for k, m in modules}

    good = snapshot()
    smooth, best = None, float("inf")
    t0 = time.time()
    unet.train(); te.train()
    bar = tqdm(range(start, cfg.steps), desc="denoiser", initial=start, total=cfg.steps, disable=not progress)
    for step in bar:
        lr = _lr_at(step, cfg) * lr_mult
        for g in opt.param_groups:
            g["lr"] = lr
        x, caps = _batch(rng, cfg.batch, cfg.world, cfg.world_version)
        with torch.no_grad():
            lat = vae.encode(x).latent_dist.sample(generator=gen) * vae.config.scaling_factor
        ids = tok(caps, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        te_out = te(ids)
        emb = te_out[0]
        noise = torch.randn(lat.shape, generator=gen)
        t = torch.randint(0, 1000, (lat.shape[0],), generator=gen)
        noisy = noise_sched.add_noise(lat, noise, t)
        target = noise_sched.get_velocity(lat, noise, t)
        pred = unet(noisy, t, emb).sample
        loss = (loss_weights(snr_all[t], cfg.min_snr_gamma) * ((pred - target) ** 2).mean(dim=(1, 2, 3))).mean()
        total = loss
        keep = [i for i, c in enumerate(caps) if c]  # empty captions carry no text to align
        if cfg.clip_weight > 0 and len(keep) > 1:
            clip = contrastive_loss(text_proj(te_out.pooler_output[keep]), img_enc(x[keep]), logit_scale)
            total = total + cfg.clip_weight * clip
        if cfg.meaning_weight > 0:
            rows = [(i, world.caption_meaning(c, meanings)) for i, c in enumerate(caps)]
            rows = [(i, m) for i, m in rows if m is not None]
            if rows:
                target = torch.from_numpy(np.stack([m for _, m in rows]))
                pooled = te_out.pooler_output[[i for i, _ in rows]]
                meaning = (1 - F.cosine_similarity(pooled, target, dim=-1)).mean()
                total = total + cfg.meaning_weight * meaning
        opt.zero_grad(set_to_none=True)
        total.backward()
        # clipped apart, so the contrastive gradient never shrinks the denoiser's step
        torch.nn.utils.clip_grad_norm_(list(unet.parameters()), 1.0)
        torch.nn.utils.clip_grad_norm_(list(te.parameters()) + aux, 1.0)
        opt.step()
        d = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for src, dst in ((unet, ema_unet), (te, ema_te)):
                for ps, pd in zip(src.parameters(), dst.parameters()):
                    pd.lerp_(ps, 1 - d)
        lv = loss.item()
        smooth = lv if smooth is None else 0.98 * smooth + 0.02 * lv
        if step > cfg.warmup + 100:
            best = min(best, smooth)
            if smooth > cfg.spike_factor * best:
                log(f"loss spike at step {step} (smoothed {smooth:.4f} > {cfg.spike_factor} x best {best:.4f}): "
                    "rolling back to the last checkpoint and halving the learning rate")
                for k, m in modules:
                    m.load_state_dict(good[k])
                lr_mult *= 0.5
                smooth = best
        if (step + 1) % cfg.checkpoint_every == 0:
            good = snapshot()
            _save_ckpt(ckpt_path, step + 1, cfg, {**good, "lr_mult": lr_mult, "py_rng": rng.getstate(), "torch_rng": gen.get_state()})
        if step % 20 == 0:
            post = {"loss": f"{smooth:.4f}", "lr": f"{lr:.2e}"}
            if cfg.clip_weight > 0 and len(keep) > 1:
                post["clip"] = f"{clip.item():.3f}"
            if cfg.meaning_weight > 0 and rows:
                post["meaning"] = f"{meaning.item():.3f}"
            bar.set_postfix(post)
        if (time.time() - t0) / 60 > cfg.max_minutes:
            log(f"stopping at step {step + 1}: the {cfg.max_minutes}-minute budget is spent")
            break
    log(f"denoiser: {step + 1} steps in {(time.time() - t0) / 60:.1f} min, smoothed loss {smooth:.4f}")
    return {"unet": ema_unet, "text_encoder": ema_te}


def _tuple_state(s):
    # random.Random state comes back from torch.load as lists; setstate wants tuples
    return (s[0], tuple(s[1]), s[2])


PARTIAL_MARKER = ".safediff-partial"


def save_model(components: dict, out_dir: Path, meta: dict) -> None:
    """Write the pipeline (fp16 weights, configs that load as fp32) + ``safediff.json`` to
    ``out_dir`` atomically: into ``<out>.partial`` (created here, marked as ours), then renamed.
    A ``<out>.partial`` this function did not create is never deleted."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=components["vae"], text_encoder=components["text_encoder"], tokenizer=components["tokenizer"],
        unet=components["unet"], scheduler=components["scheduler"], safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():
        if not (tmp / PARTIAL_MARKER).exists():
            raise FileExistsError(f"{tmp} exists and was not made by safediff; move it away to save the model.")
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    (tmp / PARTIAL_MARKER).write_text("written by safediff testbed train; removed when the model is complete\n")
    pipe.to(torch.float16)
    pipe.save_pretrained(tmp, safe_serialization=True)
    pipe.to(torch.float32)
    # the weights are stored in fp16 to stay small, but every config says float32: the stock
    # pipeline (transformers 5 honours a config's dtype) then loads them as fp32 with no argument
    for cfg_path in tmp.glob("*/config.json"):
        cfg = json.loads(cfg_path.read_text())
        for key in ("dtype", "torch_dtype"):
            if key in cfg:
                cfg[key] = "float32"
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    (tmp / "safediff.json").write_text(json.dumps(meta, indent=2))
    (tmp / PARTIAL_MARKER).unlink()
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse a folder that holds anything but a safediff model, even with ``overwrite``."""
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if not (out_dir / "safediff.json").exists():
        raise FileExistsError(f"Output folder {out_dir} holds files that are not a safediff model; choose an empty "
                              "or new folder (--overwrite only replaces a model written by this command).")
    if not overwrite:
        raise FileExistsError(f"Output folder {out_dir} already holds a model; choose an empty folder or pass "
                              "--overwrite to replace it.")


def choose_guidance_scale(curve: list[dict], keep: float | None, n: int) -> tuple[dict, str]:
    """The curve's row to use as the default and why. With ``keep`` (the shipped model's scale, a
    row of the curve), that row stays unless the best row's share of images with all three attributes
    right beats it by more than twice the standard error of the difference (unpaired, ``n`` images
    per scale): docs/testbed.md, "Decision on the misses". Without ``keep``: the best row."""
    best = max(curve, key=lambda r: r["all_three"])
    if keep is None:
        return best, "the guidance curve's best scale (all three attributes right)"
    kept = [r for r in curve if abs(r["guidance_scale"] - float(keep)) < 1e-9]
    if not kept:
        raise ValueError(f"keep_guidance_scale={keep} is not one of the curve's scales "
                         f"{[r['guidance_scale'] for r in curve]}; add it to `guidance_scales` or set it to None.")
    kept = kept[0]
    p1, p2 = best["all_three"], kept["all_three"]
    se = math.sqrt((p1 * (1 - p1) + p2 * (1 - p2)) / n)
    if p1 - p2 > 2 * se:
        return best, (f"the curve's best scale: it beats the kept scale {kept['guidance_scale']} by "
                      f"{p1 - p2:.3f} > 2 SE ({2 * se:.3f})")
    return kept, (f"kept at the shipped model's scale: the curve's best ({best['guidance_scale']}, {p1:.3f}) does not "
                  f"beat it ({p2:.3f}) by more than 2 SE ({2 * se:.3f})")


def calibrate(out_dir: str | Path, cfg: TrainConfig, progress: bool = True, log=print, device: str = "cpu",
              guidance_scale: float | None = None) -> dict:
    """Stages 4 and 5 on a saved model: the guidance-scale curve (its best scale becomes the
    default) and the world's acceptance check, both recorded in ``safediff.json``. A model that
    misses a target is reported with the measured numbers (``acceptance.passed`` is false).
    Measured in fp32 on ``device`` (the CPU by default).

    ``guidance_scale`` pins the default scale instead: the curve is not re-measured (the recorded
    one stays), the pinned scale and the fact that it was pinned are recorded
    (``default_guidance_scale_source``), and the acceptances are measured at it (docs/testbed.md,
    "Decision on the misses": a retrained world keeps the shipped model's scale unless another beats
    it by more than twice the standard error of the difference)."""
    from ..fileio import atomic_write_json

    out_dir = Path(out_dir)
    marker = out_dir / "safediff.json"
    meta = json.loads(marker.read_text())

    def save() -> None:  # after each stage, atomically: a kill mid-write never truncates the model's metadata
        atomic_write_json(marker, meta, overwrite=True)

    if guidance_scale is not None:
        if not 1.0 <= float(guidance_scale) <= 30.0:
            raise ValueError(f"guidance_scale {guidance_scale} is outside [1, 30]; give the scale to pin, e.g. 4.0.")
        meta["default_guidance_scale"] = float(guidance_scale)
        meta["default_steps"] = cfg.num_inference_steps
        meta["default_guidance_scale_source"] = "pinned by `safediff testbed check --guidance-scale` (the curve is kept)"
        save()
        log(f"guidance scale pinned at {float(guidance_scale)} (the recorded curve is kept)")
    else:
        t0 = time.time()
        curve = guidance_curve(out_dir, scales=cfg.guidance_scales, n=cfg.curve_samples, steps=cfg.num_inference_steps,
                               seed=cfg.seed, progress=progress, device=device)
        best, source = choose_guidance_scale(curve, cfg.keep_guidance_scale, cfg.curve_samples)
        meta["guidance_curve"] = curve
        meta["default_guidance_scale"] = best["guidance_scale"]
        meta["default_guidance_scale_source"] = source
        meta["default_steps"] = cfg.num_inference_steps
        meta["curve_minutes"] = round((time.time() - t0) / 60, 1)
        save()
        log(f"default guidance scale {best['guidance_scale']} (all three attributes right: {best['all_three']:.3f}): {source}")
    if cfg.acceptance_n > 0:  # the world's own targets, measured on the base model; a miss is reported, not hidden
        t1 = time.time()

        acc = world_acceptance(load_model(out_dir, device=device, dtype="fp32"), n=cfg.acceptance_n, seed=cfg.seed,
                               progress=progress)
        acc.pop("word_similarities", None)
        for c in acc:
            if isinstance(acc[c], dict):
                for suite in acc[c].values():
                    if isinstance(suite, dict):
                        suite.pop("scores", None)
        meta["acceptance"] = {"checks": acc["checks"], "passed": acc["passed"], "n": cfg.acceptance_n,
                              "minutes": round((time.time() - t1) / 60, 1)}
        save()
        missed = [k for k, v in acc["checks"].items() if not v["passed"]]
        log("acceptance: every target met" if not missed else
            "acceptance: MISSED " + "; ".join(f"{k} (measured {acc['checks'][k]['measured']}, target "
                                             f"{acc['checks'][k]['target']})" for k in missed))
    if cfg.acceptance_n > 0 and cfg.world_version >= 3:  # v3's own suites, against targets stated before training
        from .acceptance_v3 import world_v3_acceptance

        t2 = time.time()
        acc3 = world_v3_acceptance(load_model(out_dir, device=device, dtype="fp32"), n=2 * cfg.acceptance_n,
                                   seed=cfg.seed, progress=progress)
        meta["acceptance_v3"] = {**acc3, "minutes": round((time.time() - t2) / 60, 1)}
        save()
        missed = [k for k, v in acc3["checks"].items() if not v["passed"]]
        log("world v3 acceptance: every target met" if not missed else
            "world v3 acceptance: MISSED " + "; ".join(f"{k} (measured {acc3['checks'][k]['measured']}, target "
                                                       f"{acc3['checks'][k]['target']})" for k in missed))
    return meta


def world_record(version: int) -> dict:
    """What ``safediff.json`` records of the world a model was trained on: v2's record exactly as
    the shipped model's (its concepts), v3's with its version and its word-form tables added."""
    rec = {"concepts": {k: dataclasses.asdict(c) for k, c in world.CONCEPTS.items()}}
    if check_world_version(version) >= 3:
        rec.update({
            "version": version,
            "form_kinds": {k: dataclasses.asdict(v) for k, v in FORM_KINDS.items()},
            "forms": {c: [dataclasses.asdict(f) for f in concept_forms(c)] for c in world.CONCEPTS},
            "inflections": INFLECTIONS, "negators": list(NEGATORS), "negation_share": NEGATION_SHARE,
            "negation_strength": NEGATION_STRENGTH, "pile_probs": pile_probs(version), "pile_caption_prob": PILE_CAPTION_PROB,
        })
    return rec


def train(out_dir: str | Path, cfg: TrainConfig = TrainConfig(), overwrite: bool = False, progress: bool = True, log=print) -> Path:
    """Train the testbed model from scratch into ``out_dir`` (see module docstring)."""
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    work = out_dir.with_name(out_dir.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    tokenizer = build_clip_tokenizer(world.vocabulary(cfg.world_version), work / "tokenizer")
    comps = build_components(tokenizer, seed=cfg.seed, unet_channels=cfg.unet_channels,
                             unet_layers_per_block=cfg.unet_layers_per_block)
    vae_path = work / "vae"
    if (vae_path / "config.json").exists():
        from diffusers import AutoencoderKL
        comps["vae"] = AutoencoderKL.from_pretrained(vae_path)
        log(f"vae: reused {vae_path}")
    else:
        train_vae(comps["vae"], cfg, progress, log, work_dir=work)
        comps["vae"].save_pretrained(vae_path)
        (work / "vae_checkpoint.pt").unlink(missing_ok=True)
    comps["vae"].requires_grad_(False).eval()
    ema = train_denoiser(comps, cfg, work, progress, log)
    comps.update(ema)
    train_minutes = (time.time() - t0) / 60

    meta = {
        "family": TESTBED_FAMILY,
        "safediff_version": __version__,
        "train_config": cfg.to_dict(),
        "train_minutes": round(train_minutes, 1),
        "world": world_record(cfg.world_version),
        "default_guidance_scale": 2.5,
    }
    save_model(comps, out_dir, meta)
    calibrate(out_dir, cfg, progress=progress, log=log)
    log(f"done in {(time.time() - t0) / 60:.1f} min: {out_dir}")
    return out_dir
