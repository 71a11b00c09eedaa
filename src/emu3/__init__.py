"""emu3: Emu3 (BAAI) in plain PyTorch. Text, images and video as one token stream.

Public entry points so far:
- `emu3.VisionTokenizer`: images and videos <-> visual codes (`emu3.vision`).
- `emu3.load_vq` / `emu3.save_vq`: vision tokenizer checkpoints in the released or transformers
  layouts (`emu3.checkpoint`); `emu3.VisionVQ` and `emu3.VQConfig` (`emu3.vq`).
"""

__version__ = "0.1.0"

from .checkpoint import load_vq, save_vq
from .errors import CheckpointError, Emu3Error, InputError
from .media import ImageProcessor, smart_resize
from .vision import VisionTokenizer
from .vq import VisionVQ, VQConfig, vq_config

__all__ = [
    "CheckpointError", "Emu3Error", "ImageProcessor", "InputError", "VQConfig", "VisionTokenizer", "VisionVQ",
    "load_vq", "save_vq", "smart_resize", "vq_config",
]
