"""Imports point one way only (docs/architecture.md, "Layers"): a lower layer never imports
a higher one."""

from __future__ import annotations

import ast
from pathlib import Path

from pyro_mcp.runtime.rootfs_image import SHARED_WITH_THE_GUEST

SRC = Path(__file__).resolve().parents[2] / "src" / "pyro_mcp"

# Every package and top-level module of src/pyro_mcp, and nothing else. Lower number =
# lower layer; a module may import only its own layer or lower ones.
LAYERS: dict[str, int] = {
    "errors": 0,
    "mcp_profiles": 0,
    "guest": 1,
    "guest_agent": 1,
    "runtime": 2,
    "vmm": 3,
    "storage": 3,
    "network": 3,
    "hosts": 3,  # MCP hosts' configuration files (uses runtime.paths)
    "workspace": 4,
    "api": 5,
    "sdk": 6,
    "cli": 6,
    "mcp_server": 6,
    "server": 6,
    "serve": 6,  # `pyro serve`: REST, MCP (mcp_server) and the dashboard in one process
    "cluster": 6,  # the SDK's operations over a Ray cluster of pyro nodes
}

# guest_agent runs inside the VM: stdlib plus the guest modules copied beside it, which
# import nothing of pyro_mcp themselves.
SHARED = {f"pyro_mcp.guest.{name.removesuffix('.py')}" for name in SHARED_WITH_THE_GUEST}
GUEST_AGENT_ALLOWED = SHARED | {"pyro_mcp.guest_agent"}
# Surfaces reach the machine only through api/.
SURFACES_MUST_NOT_IMPORT = ("vmm",)


def _layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.extend(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
    return [name for name in found if name.startswith("pyro_mcp.")]


def _module_name(path: Path) -> str:
    relative = path.relative_to(SRC.parent).with_suffix("")
    return ".".join(relative.parts).removesuffix(".__init__")


def _violations() -> list[str]:
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        module = _module_name(path)
        own = _layer_of(module)
        if own not in LAYERS:
            if own not in ("__init__", ""):
                problems.append(f"{module}: package {own!r} has no layer in LAYERS")
            continue
        for imported in _imports(path):
            target = _layer_of(imported)
            if module in SHARED:
                problems.append(f"{module} imports {imported}: it runs in the guest too")
            if own == "guest_agent" and not any(
                imported == allowed or imported.startswith(allowed + ".")
                for allowed in GUEST_AGENT_ALLOWED
            ):
                problems.append(f"{module} imports {imported}: the guest agent is stdlib-only")
            if target in LAYERS and LAYERS[target] > LAYERS[own]:
                problems.append(f"{module} ({own}) imports higher layer {imported}")
            if LAYERS[own] == 6 and target in SURFACES_MUST_NOT_IMPORT:
                problems.append(f"{module} is a surface and imports {imported}")
    return problems


def test_imports_point_down_the_layers() -> None:
    assert _violations() == []


def test_the_layers_are_exactly_the_packages_and_modules() -> None:
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules = {p.stem for p in SRC.glob("*.py") if p.stem != "__init__"}
    assert {
        "without a layer": sorted((packages | modules) - set(LAYERS)),
        "listed but not in src/pyro_mcp": sorted(set(LAYERS) - packages - modules),
    } == {"without a layer": [], "listed but not in src/pyro_mcp": []}
