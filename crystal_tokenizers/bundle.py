"""Self-contained remote code: the package modules a tokenizer needs, flattened into its saved folder.

transformers' remote code (``trust_remote_code=True``) copies a class's file and, recursively, the files it
imports with a one-dot relative import from the same folder; nested packages are not followed. The codecs
live in subpackages (``wyckoff/``, ``slices/``), so ``save_pretrained`` writes a flat copy instead: every
``crystal_tokenizers`` module the tokenizer's file imports (transitively, lazy imports inside functions
included) becomes ``<subpackage>_<module>.py`` (``crystal_tokenizers.wyckoff.codec`` -> ``wyckoff_codec.py``)
with its imports of the package rewritten to one-dot relative imports. The folder then loads where only
transformers and the third-party dependencies are installed; the installed package is unchanged.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

PACKAGE = "crystal_tokenizers"


class BundleError(ValueError):
    """A package module uses an import form the flattened copy cannot express."""


def flat_name(module: str) -> str:
    """File stem of a package module in the flat copy: ``crystal_tokenizers.wyckoff.codec`` -> ``wyckoff_codec``."""
    return module.removeprefix(PACKAGE + ".").replace(".", "_")


def _module_file(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise BundleError(f"cannot find the source of {module}")
    return Path(spec.origin)


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str | None:
    """The absolute module of an ``ImportFrom`` node (resolving relative imports), or ``None`` if outside."""
    if node.level == 0:
        target = node.module or ""
    else:
        parts = module.split(".") if is_package else module.split(".")[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        target = ".".join(parts + ([node.module] if node.module else []))
    return target if target == PACKAGE or target.startswith(PACKAGE + ".") else None


def _rewrite(node: ast.ImportFrom, target: str, indent: str) -> tuple[list[str], list[str]]:
    """Replacement lines for one import of the package, and the package modules it needs."""
    lines, needed = [], []
    names, modules = [], []
    for alias in node.names:
        if alias.name == "*":
            raise BundleError(f"'from {target} import *' cannot be bundled")
        (modules if _is_module(f"{target}.{alias.name}") else names).append(alias)
    if names:
        needed.append(target)
        listed = ", ".join(a.name if a.asname is None else f"{a.name} as {a.asname}" for a in names)
        lines.append(f"{indent}from .{flat_name(target)} import {listed}")
    for alias in modules:  # a module imported by name: import it relatively, then bind it
        full = f"{target}.{alias.name}"
        needed.append(full)
        bound = alias.asname or alias.name
        lines.append(f"{indent}from .{flat_name(full)} import __name__ as _{flat_name(full)}_name")
        lines.append(f"{indent}import sys as _sys; {bound} = _sys.modules[_{flat_name(full)}_name]")
    return lines, needed


def _flatten(module: str) -> tuple[str, list[str]]:
    """The flat copy of one module's source and the package modules it imports."""
    path = _module_file(module)
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    tree = ast.parse(source)
    edits, needed = [], []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == PACKAGE for a in node.names):
            raise BundleError(f"{module} line {node.lineno}: 'import {PACKAGE}...' cannot be bundled; "
                              f"use 'from {PACKAGE}.x import name'")
        if isinstance(node, ast.ImportFrom):
            target = _absolute(node, module, path.name == "__init__.py")
            if target is None:
                continue
            indent = lines[node.lineno - 1][: node.col_offset]
            replacement, modules = _rewrite(node, target, indent)
            edits.append((node.lineno, node.end_lineno, replacement))
            needed += modules
    for start, end, replacement in sorted(edits, reverse=True):
        lines[start - 1 : end] = replacement
    return "\n".join(lines) + "\n", needed


def bundle_sources(module: str) -> dict[str, str]:
    """File name -> flattened source for ``module`` and every package module it needs (transitively)."""
    files: dict[str, str] = {}
    queue, seen = [module], set()
    while queue:
        current = queue.pop()
        if current in seen:
            continue
        seen.add(current)
        source, needed = _flatten(current)
        files[f"{flat_name(current)}.py"] = source
        queue += needed
    return files


def write_bundle(module: str, folder: str | Path) -> list[Path]:
    """Write :func:`bundle_sources` of ``module`` into ``folder`` (the tokenizer's own file included)."""
    written = []
    for name, source in bundle_sources(module).items():
        target = Path(folder) / name
        target.write_text(source, encoding="utf-8")
        written.append(target)
    return written


__all__ = ["BundleError", "bundle_sources", "flat_name", "write_bundle"]
