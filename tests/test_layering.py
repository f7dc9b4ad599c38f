"""The layers of the package, kept by reading every import of every module (module level and inside functions).

    leaves (messages, options)  <  analysis  <  io  <  engine  <  frontends

A module imports the package only from its own layer or a lower one; the analysis and the leaves import numpy and
the standard library only (no torch, no Lightning: ``lightning-smd check`` re-judges summaries with them); io
imports no torch; the engine no Lightning; and of the front ends only the Lightning adapter
(``frontends/callback.py``) imports Lightning — ``SMDMonitor`` serves plain PyTorch loops.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
import textwrap

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "lightning_smd"
ORDER = ("leaves", "analysis", "io", "engine", "frontends")
LEAVES = {"messages", "options"}
LIGHTNING = ("pytorch_lightning", "lightning", "lightning_fabric")
#: Third-party packages each layer may import (anything else of the standard library is always allowed).
THIRD_PARTY = {
    "leaves": {"numpy"},
    "analysis": {"numpy"},
    "io": {"numpy", "matplotlib", "wandb", "wandb_workspaces", "rich", "tensorboard", "mlflow", "PIL"},
    "engine": {"numpy", "torch"},
    "frontends": {"numpy", "torch", *LIGHTNING},
}


def _layer(path: pathlib.Path) -> str | None:
    rel = path.relative_to(PACKAGE)
    if len(rel.parts) > 1:
        return rel.parts[0] if rel.parts[0] in ORDER else None
    return "leaves" if rel.stem in LEAVES else None  # __init__, demo: checked on their own below


def _module_layer(name: str) -> str | None:
    """The layer of ``lightning_smd.<...>`` module ``name``."""
    parts = name.split(".")
    if len(parts) < 2:
        return None
    return parts[1] if parts[1] in ORDER else ("leaves" if parts[1] in LEAVES else parts[1])


def _imports(path: pathlib.Path, root: pathlib.Path = PACKAGE) -> list[tuple[int, str]]:
    """Every absolute module name ``path`` (a module of the package at ``root``) imports, with its line (relative
    imports resolved)."""
    tree = ast.parse(path.read_text())
    package = ".".join(("lightning_smd", *path.relative_to(root).parent.parts))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            out.append((node.lineno, module))
            if module == "lightning_smd" or (node.level and not node.module):  # from lightning_smd import analysis
                out += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return out


def _stdlib(name: str) -> bool:
    return name.split(".")[0] in sys.stdlib_module_names or name.split(".")[0] == "__future__"


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if _layer(p) is not None)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_module_imports_only_its_own_layer_or_lower_and_its_allowed_packages(path):
    layer = _layer(path)
    assert layer is not None
    bad = []
    for line, name in _imports(path):
        top = name.split(".")[0]
        if top == "lightning_smd":
            other = _module_layer(name)
            if other is None:
                continue  # the package itself (lazy names)
            if other not in ORDER or ORDER.index(other) > ORDER.index(layer):
                bad.append(f"line {line}: {name} (layer {other}) from layer {layer}")
        elif not _stdlib(name) and top not in THIRD_PARTY[layer]:
            bad.append(f"line {line}: {name} is not allowed in layer {layer}")
    assert not bad, f"{path.relative_to(PACKAGE)}:\n" + "\n".join(bad)


#: The modules of the front ends that serve plain loops, or both front ends: no Lightning.
WITHOUT_LIGHTNING = {
    "frontends/__init__.py",
    "frontends/monitor.py",
    "frontends/loop.py",
    "frontends/shared.py",
    "frontends/trainer.py",
    "frontends/weights.py",
    "frontends/instances.py",
}


def test_only_the_lightning_adapter_imports_lightning():
    importers = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") for _, name in _imports(p) if name.split(".")[0] in LIGHTNING}
    assert "frontends/callback.py" in importers
    outside = sorted(m for m in importers if not m.startswith("frontends/") or m in WITHOUT_LIGHTNING)
    assert not outside, f"Lightning imported outside the Lightning adapter: {outside}"


def test_the_package_root_and_the_demo_import_no_lightning_and_the_root_no_torch_at_import():
    for name in ("__init__.py", "demo.py"):
        assert not [n for _, n in _imports(PACKAGE / name) if n.split(".")[0] in LIGHTNING], name
    root = ast.parse((PACKAGE / "__init__.py").read_text())
    eager = [n for n in root.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not [ast.unparse(n) for n in eager if "torch" in ast.unparse(n) or "engine" in ast.unparse(n) or "frontends" in ast.unparse(n)]


def test_the_layering_is_true_at_run_time_too():
    """What the imports say, checked in a fresh interpreter: the analysis, io and the CLI's module load no torch, the
    engine and the monitor no Lightning."""
    code = textwrap.dedent(
        """
        import sys
        import lightning_smd.analysis, lightning_smd.io.cli, lightning_smd.io.report, lightning_smd.options, lightning_smd.messages
        assert "torch" not in sys.modules, "analysis/io load torch"
        import lightning_smd.engine.session, lightning_smd.frontends.monitor
        assert "torch" in sys.modules
        assert not {"pytorch_lightning", "lightning"} & set(sys.modules), "the engine or the monitor loads Lightning"
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_the_check_itself_finds_a_violation(tmp_path):
    """The import reader sees a function-level import and resolves relative ones (so the tests above can fail)."""
    (tmp_path / "analysis").mkdir()
    sample = tmp_path / "analysis" / "probe.py"
    sample.write_text("def f():\n    import torch\n    from ..engine import session\n")
    found = [n for _, n in _imports(sample, tmp_path)]
    assert "torch" in found and "lightning_smd.engine" in found
