"""emu3: Emu3 (BAAI) in plain PyTorch. Text, images and video as one token stream.

What a user reaches for first:
- `emu3.Emu3`: a model folder with its tokenizers and defaults, one method per task (`emu3.pipeline`);
  `Emu3.from_pretrained()` with no folder loads the built-in model.
- `emu3.load_model` / `emu3.save_model`: language-model checkpoints in the released or -hf layouts, and
  `emu3.load_vq` / `emu3.save_vq` for the vision tokenizer's (`emu3.checkpoint`).
- `emu3.VisionTokenizer`: images and videos <-> visual codes (`emu3.vision`).
- `emu3.TextTokenizer` and its `Vocabulary`: text <-> ids, and where every kind of id lives (`emu3.tokenizer`).
- `emu3.Formatter`: every sequence the model reads or writes, and the parser (`emu3.format`).
- `emu3.Engine`, `emu3.Request`, `emu3.Sampling`: batched generation with CFG and templates (`emu3.generate`).
"""

__version__ = "0.1.0"

from .checkpoint import load_model, load_vq, save_model, save_vq
from .errors import CheckpointError, Emu3Error, InputError
from .format import Formatter
from .generate import Engine, Request, Sampling
from .media import ImageProcessor, smart_resize
from .model import Emu3LM, ModelConfig
from .pipeline import Emu3
from .tokenizer import TextTokenizer, Vocabulary
from .vision import VisionTokenizer
from .vq import VisionVQ, VQConfig, vq_config

__all__ = [
    "CheckpointError", "Emu3", "Emu3Error", "Emu3LM", "Engine", "Formatter", "ImageProcessor", "InputError",
    "ModelConfig", "Request", "Sampling", "TextTokenizer", "VQConfig", "VisionTokenizer", "VisionVQ", "Vocabulary",
    "__version__", "load_model", "load_vq", "save_model", "save_vq", "smart_resize", "vq_config",
]
