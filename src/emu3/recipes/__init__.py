"""Recipes: the commands that made the models this package ships, kept apart from the library they use.

- `emu3.recipes.builtin`: `emu3 build-demo OUT`, the built-in shapes-world model (vision tokenizer, BPE, token
  shards, the language model in parts, export); `package` writes a shipped model folder.
- `emu3.recipes.vla`: `emu3 build-vla OUT`, the built-in robot policy.
- `emu3.recipes.stages`: their training presets (`demo` .. `demo-7`, `vla`, `vla-dagger`), which `emu3 train`
  accepts beside the paper's.
"""

from .builtin import build_demo, package
from .stages import STAGES, all_stages
from .vla import build_vla

__all__ = ["STAGES", "all_stages", "build_demo", "build_vla", "package"]
