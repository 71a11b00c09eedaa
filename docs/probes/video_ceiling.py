"""What caps a vision tokenizer's video round trip: the codebook, or the autoencoder under it?
For held-out clips (emu3 eval's placement: an object counts when the detector finds one of its colour and
kind within 4 px of where the world's physics puts it in frames 4-15), the share placed after the round
trip through the codes, and after the same encoder and decoder with the quantiser left out (the encoder's
latents decoded directly). If the second is not much higher, more codes cannot help.

    python docs/probes/video_ceiling.py TOKENIZER_DIR [SEED CLIPS]    # default: 32000 48

Measured (README): the built-in 1,024-code tokenizer 0.787 quantised / 0.813 unquantised; a 4,096-code one
trained by the same recipe (`emu3 train-vq demo codebook_size=4096`) 0.790 / 0.804.
"""

import sys

import numpy as np
import torch

from emu3.eval.bench import placement
from emu3.media import to_pixels, to_uint8
from emu3.vision import VisionTokenizer
from emu3.world.motion import sample_clip


def main(folder: str, seed: int = 32_000, clips: int = 48) -> None:
    model = VisionTokenizer.from_pretrained(folder).model.eval()
    rng = np.random.default_rng(seed)
    placed = {"quantised": [], "unquantised": []}
    with torch.no_grad():
        for _ in range(clips):
            clip = sample_clip(rng)
            frames = clip.render()  # (16, 64, 64, 3) uint8
            z = model.encode_frames(to_pixels(frames))  # (T, C, h, w)
            latents = model.encode_temporal(z.transpose(0, 1)[None])  # (1, C, T', h, w)
            for name, lat in (("quantised", model.embed_codes(model.quantize(latents))), ("unquantised", latents)):
                dz, dzq = model.decode_temporal(lat)  # (1, C, T, h, w) each
                pixels = to_uint8(model.decode_frames(dz[0].transpose(0, 1), dzq[0].transpose(0, 1)))
                placed[name].append(placement(clip, pixels, 4.0))
    print(f"{folder}: {clips} clips from seed {seed}, codebook {model.config.codebook_size}")
    for name, rows in placed.items():
        rows = np.concatenate(rows)  # (objects x frames, 2)
        print(f"  {name:12s} within 4 px: {rows[:, 0].mean():.3f} (kind and colour), {rows[:, 1].mean():.3f} (colour)")


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:4]))
