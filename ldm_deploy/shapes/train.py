"""Train the shapes model the way latent diffusion is trained (Rombach et al.), on 2 CPU cores:

1. the VAE: 64x64x3 images <-> 16x16x4 latents (reconstruction + a small KL term);
2. a CLIP-style text encoder, contrastively against a small image tower on the frozen VAE's
   latents (the tower is thrown away, as CLIP's is for Stable Diffusion);
3. the U-Net only, with the VAE and text encoder frozen: epsilon prediction under the SD 1.x
   noise schedule, text through cross-attention, 10% of captions dropped for classifier-free
   guidance, an EMA of its weights kept for sampling.

Each stage saves its result under --work, and a rerun resumes after the last finished stage.
The result is a standard diffusers folder (fp16 safetensors) that `ldm-export` takes like SD 1.5:

    python -m ldm_deploy.shapes.train --work /tmp/shapes-train --out ldm_deploy/shapes/model

Everything is seeded; with the same torch build and thread count the weights come out the same.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ldm_deploy.export.random_model import SD1_SCHEDULER, TOKENIZER_DIR, save_diffusers_folder
from ldm_deploy.shapes import data

log = logging.getLogger("shapes.train")


@dataclass
class Settings:
    seed: int = 0
    threads: int = 2
    images: int = 50_000  # training scenes (held-out triples never among them)
    vae_steps: int = 2400
    vae_batch: int = 16
    vae_lr: float = 2e-3
    vae_l1: float = 1.0  # weight of the per-pixel L1 term (sharper edges than MSE alone)
    vae_kl: float = 1e-7  # weight of the KL term against the per-pixel MSE
    clip_steps: int = 600
    clip_batch: int = 256
    clip_lr: float = 1e-3
    unet_steps: int = 3600
    unet_batch: int = 64
    unet_lr: float = 6e-4
    unet_warmup: int = 200
    # A second U-Net phase from the first one's EMA weights, at a lower peak learning rate: the
    # first phase alone left held-out colour triples at 86% right (the bar is 90%).
    unet2_steps: int = 1800
    unet2_lr: float = 2e-4
    uncond: float = 0.1  # fraction of captions replaced by "" (for classifier-free guidance)
    ema: float = 0.999


VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=data.SIZE,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=2,
)  # two downsamplings: 64x64 -> 16x16. Few norm groups: a group of one channel (instance norm)
#    removes each channel's image-wide mean, which is the background's colour here.
TEXT = dict(
    vocab_size=49408, max_position_embeddings=77, hidden_size=64, intermediate_size=256,
    num_attention_heads=4, num_hidden_layers=3, hidden_act="quick_gelu", projection_dim=64,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)
UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 128), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=64, attention_head_dim=4, norm_num_groups=8,
)  # attention_head_dim is the head count in SD 1.x configs (a diffusers naming quirk)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, 64, 64, 3) uint8 -> (N, 3, 64, 64) float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine down to 1% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return peak * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * p)))


class Progress:
    """One log line every `every` steps: step, loss (mean since the last line), speed."""

    def __init__(self, stage: str, steps: int, every: int = 50):
        self.stage, self.steps, self.every = stage, steps, every
        self.t0 = time.time()
        self.losses: list[float] = []

    def __call__(self, step: int, loss: float) -> None:
        self.losses.append(loss)
        if (step + 1) % self.every == 0 or step + 1 == self.steps:
            dt = time.time() - self.t0
            log.info("%s %d/%d loss %.5f  %.1f s elapsed, %.0f s left", self.stage, step + 1, self.steps,
                     np.mean(self.losses), dt, dt / (step + 1) * (self.steps - step - 1))
            self.losses = []


def tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR, model_max_length=77, pad_token="<|endoftext|>")


def tokenize(tok, captions: list[str]) -> torch.Tensor:
    return tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def train_vae(s: Settings, images: np.ndarray):
    from diffusers import AutoencoderKL

    torch.manual_seed(s.seed + 1)
    vae = AutoencoderKL(**VAE)
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(s.seed + 1)
    prog = Progress("vae", s.vae_steps)
    for step in range(s.vae_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, s.vae_steps, s.vae_lr, 50)
        x = to_tensor(images[torch.randint(len(images), (s.vae_batch,), generator=g).numpy()])
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + s.vae_l1 * (rec - x).abs().mean() + s.vae_kl * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        prog(step, loss.item())
    return vae.eval()


@torch.no_grad()
def encode(vae, images: np.ndarray, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image: (N, 4, 16, 16) each."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        post = vae.encode(to_tensor(images[i:i + batch])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


class LatentTower(torch.nn.Module):
    """The contrastive image side: (B, 4, 16, 16) latents -> (B, 64) embeddings."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(4, 64, 3, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(64, 128, 3, stride=2, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(128, 128, 3, stride=2, padding=1), torch.nn.SiLU(),
            torch.nn.Flatten(), torch.nn.Linear(128 * 4 * 4, width),
        )

    def forward(self, z):
        return self.net(z)


def train_text_encoder(s: Settings, latents: torch.Tensor, ids: torch.Tensor):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(s.seed + 2)
    text = CLIPTextModel(CLIPTextConfig(**TEXT))
    proj = torch.nn.Linear(TEXT["hidden_size"], TEXT["projection_dim"], bias=False)
    tower = LatentTower(TEXT["projection_dim"])
    scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    params = [*text.parameters(), *proj.parameters(), *tower.parameters(), scale]
    opt = torch.optim.AdamW(params, lr=s.clip_lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(s.seed + 2)
    prog = Progress("text encoder", s.clip_steps)
    labels = torch.arange(s.clip_batch)
    for step in range(s.clip_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, s.clip_steps, s.clip_lr, 50)
        idx = torch.randint(len(ids), (s.clip_batch,), generator=g)
        t = F.normalize(proj(text(ids[idx]).pooler_output), dim=-1)
        v = F.normalize(tower(latents[idx]), dim=-1)
        logits = scale.exp().clamp(max=100) * t @ v.T
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        prog(step, loss.item())
    return text.eval()


@torch.no_grad()
def embed(text, ids: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """(N, 77) ids -> (N, 77, 64) last hidden states, fp16 to halve the memory."""
    return torch.cat([text(ids[i:i + batch]).last_hidden_state.half() for i in range(0, len(ids), batch)])


def train_unet(s: Settings, mean: torch.Tensor, std: torch.Tensor, scaling: float,
               cond: torch.Tensor, uncond: torch.Tensor, start=None, phase: int = 1):
    """Phase 1 from random weights (`start` None), phase 2 from phase 1's EMA weights."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(s.seed + 2 + phase)
    unet = UNet2DConditionModel(**UNET)
    if start is not None:
        unet.load_state_dict(start.state_dict())
    ema = UNet2DConditionModel(**UNET)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    steps, peak = (s.unet_steps, s.unet_lr) if phase == 1 else (s.unet2_steps, s.unet2_lr)
    opt = torch.optim.AdamW(unet.parameters(), lr=peak, weight_decay=0.01)
    betas = torch.linspace(SD1_SCHEDULER["beta_start"] ** 0.5, SD1_SCHEDULER["beta_end"] ** 0.5, 1000) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    g = torch.Generator().manual_seed(s.seed + 2 + phase)
    prog = Progress(f"unet phase {phase}", steps)
    b = s.unet_batch
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, peak, s.unet_warmup)
        idx = torch.randint(len(mean), (b,), generator=g)
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scaling
        c = cond[idx].float()
        drop = torch.rand(b, generator=g) < s.uncond
        c[drop] = uncond.float()
        t = torch.randint(1000, (b,), generator=g)
        noise = torch.randn(z.shape, generator=g)
        a = alphas_cumprod[t].view(b, 1, 1, 1)
        noisy = a.sqrt() * z + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(noisy, t, c).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(s.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        prog(step, loss.item())
    return ema.eval()


def save_model(out: Path, vae, text, unet, settings: Settings) -> None:
    """A standard diffusers folder, weights in fp16 safetensors."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    save_diffusers_folder(tmp, unet.half(), vae.half(), text.half(), tokenizer(), SD1_SCHEDULER)
    (tmp / "training.json").write_text(json.dumps(asdict(settings), indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def train(work: Path, out: Path, s: Settings) -> None:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    images, scenes = data.dataset(s.images, seed=s.seed)
    log.info("dataset: %d scenes drawn in %.0f s", len(scenes), time.time() - t0)

    if not (work / "vae").is_dir():
        train_vae(s, images).save_pretrained(work / "vae")
    vae = AutoencoderKL.from_pretrained(work / "vae").eval()
    mean, std = encode(vae, images)
    # Scale latents to unit variance, as SD's 0.18215 does for its VAE.
    scaling = float(1.0 / (mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(s.seed))).std())
    vae.register_to_config(scaling_factor=scaling)
    log.info("vae ready (%.0f s); latent scaling factor %.4f", time.time() - t0, scaling)

    tok = tokenizer()
    ids = tokenize(tok, [sc.caption for sc in scenes])
    if not (work / "text_encoder").is_dir():
        train_text_encoder(s, mean * scaling, ids).save_pretrained(work / "text_encoder")
    text = CLIPTextModel.from_pretrained(work / "text_encoder").eval()
    cond = embed(text, ids)
    uncond = embed(text, tokenize(tok, [""]))[0]
    log.info("text encoder ready (%.0f s)", time.time() - t0)

    from diffusers import UNet2DConditionModel

    if not (work / "unet").is_dir():
        train_unet(s, mean, std, scaling, cond, uncond).save_pretrained(work / "unet")
    unet = UNet2DConditionModel.from_pretrained(work / "unet").eval()
    if s.unet2_steps:
        if not (work / "unet2").is_dir():
            train_unet(s, mean, std, scaling, cond, uncond, start=unet, phase=2).save_pretrained(work / "unet2")
        unet = UNet2DConditionModel.from_pretrained(work / "unet2").eval()
    save_model(out, vae, text, unet, s)
    log.info("wrote %s (%.0f s in all)", out, time.time() - t0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="folder for each stage's result (a rerun resumes from it)")
    p.add_argument("--out", required=True, help="where to write the diffusers folder")
    for k, v in asdict(Settings()).items():
        p.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    s = Settings(**{k: getattr(args, k) for k in asdict(Settings())})
    train(Path(args.work), Path(args.out), s)


if __name__ == "__main__":
    main()
