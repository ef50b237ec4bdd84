"""The layers of ``peer/`` import only downward, and ``coordinator/`` only the public ones (see ``peer/__init__``)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# lowest first; a module may import its own layer and any layer below
LAYERS = ["peer.errors", "peer.run", "peer.data", "peer.store", "peer.swarm", "peer"]
LEAVES = ("peer.store.atomic",)  # import nothing of bertswarm but peer.errors: every layer may use them


def layer_of(module: str) -> int:
    if module.startswith(LEAVES):
        return 0
    for index, layer in enumerate(LAYERS[:-1]):
        if module == layer or module.startswith(layer + "."):
            return index
    return len(LAYERS) - 1  # the running peer: peer.cli, peer.trainer, ...


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name == "peer" or name.startswith(("peer.", "coordinator"))}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


PEER_FILES = sorted((ROOT / "peer").rglob("*.py"))


@pytest.mark.parametrize("path", PEER_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_peer_layers_import_only_downward(path):
    name = module_name(path)
    if name.startswith("peer.testing"):
        return  # test hooks may reach anything; nothing of the product imports them (peer.hooks loads them lazily)
    own = layer_of(name)
    for imported in imports(path):
        assert not imported.startswith("coordinator"), f"{name} imports {imported}: peer/ never imports coordinator/"
        if imported.startswith("peer.testing"):
            assert name == "peer.hooks", f"{name} imports the test hooks {imported}; only peer.hooks may"
            continue
        assert layer_of(imported) <= own, f"{name} (layer {LAYERS[own]}) imports {imported} from a higher layer"


@pytest.mark.parametrize("path", sorted((ROOT / "coordinator").rglob("*.py")), ids=lambda p: p.name)
def test_the_coordinator_never_imports_the_test_hooks(path):
    assert not [name for name in imports(path) if name.startswith("peer.testing")]
