"""A tiny text-to-image model of our own: coloured shapes on coloured backgrounds.

`data` draws the captioned dataset, `judge` reads an image back into colours and shapes,
`train` trains the VAE, the text encoder and the U-Net (needs torch), and `model/` holds the
trained weights as a standard diffusers folder, which `ldm-run` uses when no engine is named.
"""

from pathlib import Path

MODEL_DIR = Path(__file__).parent / "model"
# Its cached engine: trained at 64x64 (16x16 latents); 32..256 px serve, 64 is tuned for.
EXPORT_SETTINGS = dict(min_size=32, max_size=256)
