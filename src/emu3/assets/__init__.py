"""Files that ship inside the package: the built-in model (`emu3-demo/`: weights in 16-bit floats,
text and vision tokenizers, generation defaults, and RECIPE.json with the command, settings and seed
that made it) and the built-in robot policy (`emu3-vla/`: the same layout plus fast_tokenizer.json)."""

from pathlib import Path

BUILTIN = Path(__file__).parent / "emu3-demo"
BUILTIN_VLA = Path(__file__).parent / "emu3-vla"


def builtin_model() -> Path | None:
    """The built-in model folder, when this installation has it."""
    return BUILTIN if (BUILTIN / "config.json").exists() else None


def builtin_vla() -> Path | None:
    """The built-in VLA policy folder (emu3 build-vla's output), when this installation has it."""
    return BUILTIN_VLA if (BUILTIN_VLA / "fast_tokenizer.json").exists() else None
