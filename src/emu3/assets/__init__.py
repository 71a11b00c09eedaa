"""Files that ship inside the package: the built-in model (`emu3-demo/`: weights in 16-bit floats,
text and vision tokenizers, generation defaults, and RECIPE.json with the command, settings and seed
that made it)."""

from pathlib import Path

BUILTIN = Path(__file__).parent / "emu3-demo"


def builtin_model() -> Path | None:
    """The built-in model folder, when this installation has it."""
    return BUILTIN if (BUILTIN / "config.json").exists() else None
