"""Random-weight Stable Diffusion models with real architectures, saved as diffusers folders.

No model hub is reachable from our CI machines, so tests and benchmarks build their models here:
tiny ones that keep every structural feature of SD 1.x / 2.x / XL, and the full SD 1.5, 2.1 and
XL architectures (they time exactly like the real weights). All use the real CLIP tokenizer (49408 tokens).

    python -m ldm_deploy.export.random_model --preset tiny-sd1 --out models/tiny-sd1
"""

from __future__ import annotations

import argparse
from pathlib import Path

TOKENIZER_DIR = Path(__file__).parent / "clip_tokenizer"

# SD 1.x's scheduler config (PNDM, as the runwayml release ships it; clip_sample false matters:
# without it diffusers' DDIMScheduler.from_config clamps x0 to [-1, 1], which our tables do not).
SD1_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "clip_sample": False,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}
# SD 2.x's (stabilityai/stable-diffusion-2-1): DDIM, v-prediction.
SD2_SCHEDULER = {
    **SD1_SCHEDULER,
    "_class_name": "DDIMScheduler",
    "prediction_type": "v_prediction",
}

# What SD 1.x and 2.x share: the U-Net's blocks and the VAE.
SD_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
# SDXL's (stabilityai/stable-diffusion-xl-base-1.0): Euler, leading spacing, epsilon.
SDXL_SCHEDULER = {
    **SD1_SCHEDULER,
    "_class_name": "EulerDiscreteScheduler",
    "interpolation_type": "linear",
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}
# SDXL's VAE: the SD VAE's shape, its own scale, and fp16 overflows in it (force_upcast).
SDXL_VAE = dict(scaling_factor=0.13025, force_upcast=True)

PRESETS = {
    # SD 1.x-like: epsilon, conv projections in the transformer blocks, one head count.
    "tiny-sd1": dict(
        unet=dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
            sample_size=32,
        ),
        text=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                  hidden_act="quick_gelu", projection_dim=32),
        vae=dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=256),
        scheduler=SD1_SCHEDULER,
        pad_token="<|endoftext|>",
    ),
    # SD 2.x-like: v-prediction, linear projections, per-block head counts, gelu text encoder,
    # "!" as the padding token.
    "tiny-sd2": dict(
        unet=dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=48,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            norm_num_groups=8,
            sample_size=32,
        ),
        text=dict(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_hidden_layers=2,
                  hidden_act="gelu", projection_dim=48),
        vae=dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=256),
        scheduler=SD2_SCHEDULER,
        pad_token="!",
    ),
    # SDXL-like: two text encoders of different widths (their hidden states concatenated: 32 + 48),
    # the second's pooled projection (40) and six size numbers as added conditioning (6 * 8 + 40),
    # attention only in the lower block, two transformer layers there, "!" padding the second.
    "tiny-sdxl": dict(
        unet=dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=80,
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=88,
            norm_num_groups=8,
            sample_size=32,
        ),
        text=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                  hidden_act="quick_gelu", projection_dim=32),
        text_2=dict(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_hidden_layers=3,
                    hidden_act="gelu", projection_dim=40),
        vae=dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=256,
                 **SDXL_VAE),
        scheduler=SDXL_SCHEDULER,
        pad_token="<|endoftext|>",
        pad_token_2="!",
    ),
    # The real SD 1.5 architecture (860M U-Net, CLIP ViT-L/14 text encoder, 84M VAE).
    "sd15": dict(
        unet=dict(**SD_UNET, cross_attention_dim=768, attention_head_dim=8, sample_size=64),
        text=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                  hidden_act="quick_gelu", projection_dim=768),
        vae=dict(**SD_VAE, sample_size=512),
        scheduler=SD1_SCHEDULER,
        pad_token="<|endoftext|>",
    ),
    # The real SD 2.1 architecture (768x768, v-prediction; 865M U-Net with linear projections
    # and 64-channel heads, OpenCLIP ViT-H/14's text tower without its last layer, the SD 1.x VAE).
    "sd21": dict(
        unet=dict(**SD_UNET, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                  use_linear_projection=True, sample_size=96),
        text=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
                  hidden_act="gelu", projection_dim=512),
        vae=dict(**SD_VAE, sample_size=768),
        scheduler=SD2_SCHEDULER,
        pad_token="!",
    ),
    # The real SDXL base architecture (1024x1024; 2.6B U-Net with 1, 2 and 10 transformer layers a
    # block, CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text encoders, the SD VAE).
    "sdxl": dict(
        unet=dict(block_out_channels=(320, 640, 1280), layers_per_block=2,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  cross_attention_dim=2048, attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                  use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816, sample_size=128),
        text=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                  hidden_act="quick_gelu", projection_dim=768),
        text_2=dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                    hidden_act="gelu", projection_dim=1280),
        vae=dict(**SD_VAE, sample_size=1024, **SDXL_VAE),
        scheduler=SDXL_SCHEDULER,
        pad_token="<|endoftext|>",
        pad_token_2="!",
    ),
}


# An SDXL refiner's shape: tiny-sdxl's second text encoder alone (its hidden states, 48, and pooled
# projection, 40) and an aesthetic score after four size numbers (40 + 5 * 8), as
# stabilityai/stable-diffusion-xl-refiner-1.0 is conditioned.
PRESETS["tiny-sdxl-refiner"] = dict(
    {k: v for k, v in PRESETS["tiny-sdxl"].items() if k not in ("text", "pad_token")},
    unet={**PRESETS["tiny-sdxl"]["unet"], "cross_attention_dim": 48, "projection_class_embeddings_input_dim": 80},
    refiner=True,
)
# The real SDXL refiner architecture (stabilityai/stable-diffusion-xl-refiner-1.0: a 2.3B U-Net of
# 384..1536 channels with four transformer layers where it attends, at its two middle levels;
# SDXL's OpenCLIP ViT-bigG/14 alone and its VAE; an aesthetic score after four sizes, 1280 + 5 x
# 256), for its single files.
PRESETS["sdxl-refiner"] = dict(
    {k: v for k, v in PRESETS["sdxl"].items() if k not in ("text", "pad_token")},
    unet=dict(block_out_channels=(384, 768, 1536, 1536), layers_per_block=2,
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
              cross_attention_dim=1280, attention_head_dim=(6, 12, 24, 24), transformer_layers_per_block=4,
              use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
              projection_class_embeddings_input_dim=2560, sample_size=128),
    refiner=True,
)

def model_index(scheduler_class: str, pipeline: str = "StableDiffusionPipeline") -> dict:
    """model_index.json of a StableDiffusionPipeline (or -InpaintPipeline) folder (no safety
    checker), a StableDiffusionXLPipeline one, or an SDXL refiner's (StableDiffusionXLImg2ImgPipeline)."""
    import diffusers

    if pipeline == "StableDiffusionXLImg2ImgPipeline":  # the refiner's: no first text encoder
        return {
            "_class_name": pipeline,
            "_diffusers_version": diffusers.__version__,
            "force_zeros_for_empty_prompt": False,
            "requires_aesthetics_score": True,
            "scheduler": ["diffusers", scheduler_class],
            "text_encoder": [None, None],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": [None, None],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "image_encoder": [None, None],
            "feature_extractor": [None, None],
        }
    if pipeline.startswith("StableDiffusionXL"):
        return {
            "_class_name": pipeline,
            "_diffusers_version": diffusers.__version__,
            "force_zeros_for_empty_prompt": True,  # SDXL base's: no negative prompt is zeros, not ""
            "scheduler": ["diffusers", scheduler_class],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "image_encoder": [None, None],
            "feature_extractor": [None, None],
        }
    return {
        "_class_name": pipeline,
        "_diffusers_version": diffusers.__version__,  # as save_pretrained writes it (the inpainting loader reads it)
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }


def save_diffusers_folder(out: Path, unet, vae, text, tokenizer, scheduler: dict, text_2=None,
                          tokenizer_2=None) -> None:
    """The layout `StableDiffusionPipeline.from_pretrained` (and `ldm-export`) reads; with a second
    text encoder and tokenizer, `StableDiffusionXLPipeline.from_pretrained`'s; with only those (text
    and tokenizer None), an SDXL refiner's (`StableDiffusionXLImg2ImgPipeline`)."""
    import json

    unet.save_pretrained(out / "unet")
    vae.save_pretrained(out / "vae")
    if text is not None:
        text.save_pretrained(out / "text_encoder")
        tokenizer.save_pretrained(out / "tokenizer")
    if text_2 is not None:
        text_2.save_pretrained(out / "text_encoder_2")
        tokenizer_2.save_pretrained(out / "tokenizer_2")
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
    inpainting = unet.config.in_channels != unet.config.out_channels
    kind = "Inpaint" if inpainting else ""
    pipeline = "StableDiffusionXLImg2ImgPipeline" if text is None else \
        f"StableDiffusionXL{kind}Pipeline" if text_2 is not None else f"StableDiffusion{kind}Pipeline"
    index = model_index(scheduler["_class_name"], pipeline)
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def unet_config(preset: str, inpainting: bool = False) -> dict:
    """The U-Net's diffusers config (UNet2DConditionModel's arguments). inpainting: 9 channels in
    (latents, mask, masked image latents), as SD 1.5 / 2.0 inpainting's."""
    return dict(in_channels=9 if inpainting else 4, out_channels=4, **PRESETS[preset]["unet"])


def vae_config(preset: str) -> dict:
    """The VAE's diffusers config (AutoencoderKL's arguments)."""
    cfg = PRESETS[preset]["vae"]
    blocks = len(cfg["block_out_channels"])
    return dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        **cfg,
    )


def text_config(preset: str, key: str = "text"):
    """The text encoder's transformers CLIPTextConfig (key "text_2": SDXL's second's, whose pooled
    output is used: its eos_token_id is 2, as in the released SDXL configs, so transformers pools
    at the highest id, the end token, as it does for them)."""
    from transformers import CLIPTextConfig

    ids = dict(bos_token_id=0, eos_token_id=2) if key == "text_2" else {}
    return CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **ids, **PRESETS[preset][key])


def tokenizer(preset: str, key: str = "pad_token"):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR, model_max_length=77, pad_token=PRESETS[preset][key])


def make_random_model(out: str | Path, preset: str = "tiny-sd1", seed: int = 0, inpainting: bool = False) -> Path:
    """Build a random-weight model of the preset's architecture (its inpainting variant) and save
    it as a diffusers folder."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    out = Path(out)
    xl = "text_2" in PRESETS[preset]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config(preset, inpainting))
    vae = AutoencoderKL(**vae_config(preset))
    refiner = PRESETS[preset].get("refiner", False)
    text = None if refiner else CLIPTextModel(text_config(preset))
    second = {}
    if xl:
        from transformers import CLIPTextModelWithProjection

        second = dict(text_2=CLIPTextModelWithProjection(text_config(preset, "text_2")),
                      tokenizer_2=tokenizer(preset, "pad_token_2"))
    save_diffusers_folder(out, unet, vae, text, None if refiner else tokenizer(preset), PRESETS[preset]["scheduler"],
                          **second)
    return out


def make_random_controlnet(out: str | Path, preset: str = "tiny-sd1", seed: int = 0,
                           conditioning_embedding_out_channels=(16, 32, 96, 256)) -> Path:
    """A random-weight diffusers ControlNet for the preset's U-Net, saved as a folder. Its zero
    convolutions (zero at the start of training) get random weights too, so that it acts, and its
    image encoder larger ones, so that what the control image shows matters."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    out = Path(out)
    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(UNet2DConditionModel(**unet_config(preset)),
                                    conditioning_embedding_out_channels=conditioning_embedding_out_channels)
    with torch.no_grad():
        for module in [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
            for p in module.parameters():
                p.normal_(0, 0.05)
        for p in net.controlnet_cond_embedding.parameters():
            p.normal_(0, 0.3)
    net.save_pretrained(out)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny-sd1")
    p.add_argument("--out", required=True, help="folder to write the diffusers model to")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inpainting", action="store_true", help="an inpainting U-Net (9 channels in)")
    args = p.parse_args(argv)
    print(make_random_model(args.out, args.preset, args.seed, args.inpainting))


if __name__ == "__main__":
    main()
