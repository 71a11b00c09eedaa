"""The package's layout: public names where a user looks for them, no private names across packages, and the
recipes apart from the library."""

from __future__ import annotations

import ast
from pathlib import Path

import emu3

SRC = Path(emu3.__file__).parent


def test_the_public_api_imports_from_the_package():
    for name in ("Emu3", "load_model", "VisionTokenizer", "TextTokenizer", "Formatter", "Engine", "Request",
                 "Sampling", "__version__"):
        assert hasattr(emu3, name) and name in emu3.__all__, name
    assert emu3.Emu3.from_pretrained.__defaults__[0] is None  # no folder: the built-in model


def _private_names(tree: ast.AST) -> set[str]:
    """Private names a module defines: functions, classes, class fields and attributes it assigns."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            for target in getattr(node, "targets", [getattr(node, "target", None)]):
                if isinstance(target, ast.Attribute):
                    names.add(target.attr)
                elif isinstance(target, ast.Name):
                    names.add(target.id)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_no_module_reaches_into_another_package_for_private_names():
    """`from ..x import _name` across packages, and `obj._name` where another module defines `_name` (the
    engine's forward, a pipeline's formatter and vision tokenizer, a dataset's shards are public for that)."""
    trees = {path: ast.parse(path.read_text(encoding="utf-8")) for path in SRC.rglob("*.py")}
    defined = {path: _private_names(tree) for path, tree in trees.items()}
    everywhere = set().union(*defined.values())
    problems = []
    for path, tree in trees.items():
        where = path.relative_to(SRC)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                target = path.parent
                for _ in range(node.level - 1):
                    target = target.parent
                for part in (node.module or "").split(".")[:-1]:
                    target = target / part
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if private and target != path.parent:
                    problems.append(f"{where}:{node.lineno} imports {private} from another package")
            if (isinstance(node, ast.Attribute) and node.attr in everywhere - defined[path]
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                problems.append(f"{where}:{node.lineno} uses .{node.attr}, private to another module")
    assert not problems, "\n".join(problems)


def test_recipes_live_apart_from_the_library():
    """The recipes' presets are not the paper's, and nothing in the library imports the recipes (but the
    command line, which runs them)."""
    from emu3.recipes import STAGES as RECIPES
    from emu3.train.config import STAGES

    assert not set(RECIPES) & set(STAGES) and {"demo", "demo-7", "vla", "vla-dagger"} <= set(RECIPES)
    for path in SRC.rglob("*.py"):
        if path.parent.name == "recipes" or path.name == "cli.py":
            continue
        text = path.read_text(encoding="utf-8")
        assert "recipes" not in {a for line in text.splitlines() if line.lstrip().startswith(("from", "import"))
                                 for a in line.replace(".", " ").split()}, path
