#!/usr/bin/env python3
"""Copy kernel modules and everything they depend on out of an unpacked kernel package.

usage: modules.py MODULE_TREE OUTDIR GROUP=mod,mod... [GROUP=mod,mod...]

MODULE_TREE is a kernel's ``lib/modules/VERSION`` directory. Each module is
written to OUTDIR/NAME.ko, decompressed (busybox ``insmod`` takes plain ELF
files only). For every GROUP, OUTDIR/GROUP.order lists, on one line, the
modules to load for that group, each after those it depends on and without
those an earlier group already loads: loading the groups in the order given,
each list in its order, satisfies every dependency.

Dependencies come from each module's own ``.modinfo`` section (``depends=``),
as depmod reads them, since a kernel package ships no modules.dep: depmod
writes it when the package is installed.
"""

from __future__ import annotations

import lzma
import shutil
import subprocess
import sys
from pathlib import Path

_SUFFIXES = (".ko", ".ko.xz", ".ko.zst")


def canonical(name: str) -> str:
    """Module names treat '-' and '_' alike; the kernel reports them with '_'."""
    return name.replace("-", "_")


def index_tree(tree: Path) -> dict[str, Path]:
    """Every module file under ``tree`` by canonical module name."""
    found: dict[str, Path] = {}
    for path in sorted(tree.rglob("*.ko*")):
        for suffix in _SUFFIXES:
            if path.name.endswith(suffix):
                found[canonical(path.name[: -len(suffix)])] = path
                break
    return found


def read_module(path: Path) -> bytes:
    """The module's ELF image, decompressed."""
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if path.name.endswith(".ko.zst"):
        if shutil.which("zstd") is None:
            sys.exit(f"modules.py: {path.name} is zstd-compressed and zstd is not installed")
        return subprocess.run(["zstd", "-dcq", str(path)], capture_output=True, check=True).stdout
    return path.read_bytes()


def depends(image: bytes) -> list[str]:
    """The ``depends=`` entry of a module's .modinfo strings (NUL-separated)."""
    key = b"depends="
    at = image.find(key)
    while at != -1:
        if at == 0 or image[at - 1] == 0:
            end = image.index(b"\0", at)
            value = image[at + len(key) : end].decode()
            return [canonical(name) for name in value.split(",") if name]
        at = image.find(key, at + 1)
    return []


def main(argv: list[str]) -> None:
    if len(argv) < 3:
        sys.exit(__doc__)
    tree, outdir = Path(argv[0]), Path(argv[1])
    modules = index_tree(tree)
    if not modules:
        sys.exit(f"modules.py: no modules under {tree}")
    outdir.mkdir(parents=True, exist_ok=True)
    loaded: set[str] = set()

    def visit(name: str, chain: tuple[str, ...], order: list[str]) -> None:
        if name in loaded:
            return
        if name in chain:
            sys.exit(f"modules.py: dependency cycle: {' -> '.join((*chain, name))}")
        path = modules.get(name)
        if path is None:
            wanted_by = f" (needed by {chain[-1]})" if chain else ""
            sys.exit(f"modules.py: no module {name} in {tree}{wanted_by}")
        image = read_module(path)
        for dependency in depends(image):
            visit(dependency, (*chain, name), order)
        (outdir / f"{name}.ko").write_bytes(image)
        loaded.add(name)
        order.append(name)

    for spec in argv[2:]:
        group, _, names = spec.partition("=")
        if not group or not names:
            sys.exit(f"modules.py: expected GROUP=mod,mod..., got {spec!r}")
        order: list[str] = []
        for name in names.split(","):
            visit(canonical(name), (), order)
        (outdir / f"{group}.order").write_text(" ".join(order) + "\n")
        print(f"{group}: {' '.join(order)}")


if __name__ == "__main__":
    main(sys.argv[1:])
