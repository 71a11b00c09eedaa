"""Errors that reach users as one line (the CLI prints them without a traceback).

Every message names the problem and, where there is one, the limit that was crossed.
"""


class Emu3Error(Exception):
    """Base class: a problem with what the user gave us, not a bug in emu3."""


class InputError(Emu3Error, ValueError):
    """A file, array or argument that cannot be used (wrong format, too large, out of range)."""


class CheckpointError(Emu3Error):
    """A checkpoint folder that is missing files, has the wrong keys/shapes, or is not safetensors."""
