"""The layering DESIGN.md promises, checked on the source: recipes reach models only through the adapter
registry, and losses never import models."""

from __future__ import annotations

import ast
import os

import pytest

from mmalign import adapters
from mmalign.adapters.base import Adapter

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mmalign")
MODALITY_MODULES = {f"mmalign.adapters.{name}" for name in ("diffusion", "flow")}


def nodes(path: str):
    """Every node of the syntax tree of the Python file ``path``."""
    with open(path) as f:
        yield from ast.walk(ast.parse(f.read()))


def imported_modules(path: str) -> set[str]:
    names = set()
    for node in nodes(path):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("folder", ["recipes", "losses"])
def test_recipes_and_losses_import_no_modality_module(folder):
    for name in sorted(os.listdir(os.path.join(PACKAGE, folder))):
        if name.endswith(".py"):
            found = imported_modules(os.path.join(PACKAGE, folder, name)) & MODALITY_MODULES
            assert not found, f"mmalign/{folder}/{name} imports {sorted(found)}; go through mmalign.adapters"


def test_every_registered_adapter_implements_the_protocol():
    wanted = {name for name in dir(Adapter) if not name.startswith("_")}
    wanted |= set(Adapter.__annotations__)
    for kind, adapter in adapters.ADAPTERS.items():
        assert adapter.kind == kind
        missing = sorted(name for name in wanted if not hasattr(adapter, name) and name != "network")
        assert not missing, f"{adapter.__name__} lacks {missing}"
        assert isinstance(adapter.__dict__.get("network"), property), f"{adapter.__name__}.network"


ROOT = os.path.dirname(PACKAGE)


def python_files(*folders: str):
    for folder in folders:
        for base, _, names in os.walk(os.path.join(ROOT, folder)):
            yield from (os.path.join(base, name) for name in sorted(names) if name.endswith(".py"))


def called_names(path: str) -> set[str]:
    calls = [node.func for node in nodes(path) if isinstance(node, ast.Call)]
    return {func.id if isinstance(func, ast.Name) else getattr(func, "attr", "") for func in calls}


def test_one_builder_makes_the_small_tokenizers_and_clip_text_towers():
    """Tests, benchmarks and the toy world build word-level tokenizers and CLIP text towers in one place."""
    builders = {"CLIPTextConfig", "Tokenizer", "WordLevel"}
    makers = {
        os.path.relpath(path, ROOT)
        for path in python_files("mmalign", "tests", "benchmarks")
        if called_names(path) & builders
    }
    assert makers == {"mmalign/toy/text.py"}


def test_the_global_batch_is_computed_once():
    """micro-batch × accumulation × processes lives in runtime.global_batch; everything else calls it."""
    spelled = []
    for path in python_files("mmalign"):
        with open(path) as f:
            for number, line in enumerate(f, 1):
                if "num_processes" in line and "*" in line and "def global_batch" not in line:
                    spelled.append(f"{os.path.relpath(path, ROOT)}:{number}: {line.strip()}")
    assert [entry.split(":", 1)[0] for entry in spelled] == ["mmalign/recipes/runtime.py"], spelled
    assert "return cfg.optim.batch_size * cfg.optim.gradient_accumulation_steps" in spelled[0]
