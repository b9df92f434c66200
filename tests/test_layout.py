"""The layout keeps the trust boundary: no import cycle, and the institution's side never loads the coordinator's.

The import graph is read from the source (every ``import``, function-local ones included; imports under
``if TYPE_CHECKING:`` are left out, as they never run), so a cycle held together by a function-local import
fails here as a top-level one would.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fedkd", "server", "client")
INSTITUTION = ("fedkd.institution", "fedkd.client")
COORDINATOR = ("fedkd.coordinator", "fedkd.server")
# The coordinator's settings sections: declarations an institution's config holds (unused) beside its own. Torch-free
# and importing nothing of the coordinator's code (checked below), they are all of the coordinator that the
# institution's side may load.
DECLARATIONS = ("fedkd.coordinator", "fedkd.coordinator.settings")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    if parts[0] in ("server", "client"):  # installed (and imported) as fedkd.server and fedkd.client
        parts.insert(0, "fedkd")
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, package: str) -> list[str]:
    """Every module an import statement names (relative ones resolved against ``package``), outside
    ``if TYPE_CHECKING:`` blocks."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.append(module)
            found.extend(f"{module}.{alias.name}" for alias in node.names)  # submodules imported by name
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (a package's import reaches its ``__init__``)."""
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "v1" not in p.relative_to(ROOT).parts]
    modules = {_module_name(p): p for p in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for imported in _imports(ast.parse(path.read_text()), package):
            if imported in modules and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_even_through_function_local_imports():
    graph = import_graph()
    assert "fedkd.coordinator.flow" in graph and "fedkd.institution.host" in graph  # the graph was read
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_institution_side_never_imports_the_coordinator_side():
    graph = import_graph()
    crossing = sorted(f"{a} -> {b}" for a, targets in graph.items() if a.startswith(INSTITUTION)
                      for b in targets if b.startswith(COORDINATOR))
    assert crossing == []
    entry_points = ("fedkd.cli", "fedkd.api")  # above both sides: they dispatch to them
    floor = sorted(f"{a} -> {b}" for a, targets in graph.items()
                   if a.startswith("fedkd.") and not a.startswith((*INSTITUTION, *COORDINATOR, *entry_points))
                   and a != "fedkd.config" for b in targets if b.startswith((*INSTITUTION, *COORDINATOR)))
    assert floor == [], "the shared floor of fedkd imports a side"


_INSTITUTION_SCRIPT = r"""
import json, sys
from pathlib import Path
import torch
from fedkd.client.app import app  # the ClientApp
from fedkd.client.cli import host_from_checkpoint  # fedkd teacher
from fedkd.client.node import node_privacy
from fedkd.checkpoint import save_teacher
from fedkd.config import config_from_run_config
from fedkd.models import build_model

run_config = {"dataset": "digits", "num-clients": 2, "method": "tadfkd", "tadfkd.weight-bn": 3.0,
              "cudfkd.weight-bn": 30.0, "ensemble": "class-weighted"}
config = config_from_run_config(run_config, resolve=False)
settings, own = node_privacy(config, {"privacy-mode": "output-noise"}, 0)
model = build_model("lenet5", num_classes=10, channels=1, image_size=8)
path = Path(sys.argv[1]) / "teacher.pt"
save_teacher(path, model, model_name="lenet5", num_classes=10, input_shape=(1, 8, 8), num_samples=10,
             label_counts=[1] * 10, mean=(0.5,), std=(0.5,))
host = host_from_checkpoint(path, max_batch=64, client=0, privacy=settings)
logits = host.forward(torch.zeros(2, 1, 8, 8), None).logits
print(json.dumps({"modules": sorted(sys.modules), "shape": list(logits.shape), "mode": own.privacy.mode,
                  "method": config.to_dict()["method"], "weight": config.to_dict()["tadfkd.weight-bn"]}))
"""


def test_an_institution_builds_its_config_and_host_without_the_coordinator(tmp_path):
    """In a fresh interpreter: the ClientApp, fedkd teacher's host and a node's config load no coordinator
    module (methods, ensemble, synthesis, student, pool, ...): an institution runs only its own side."""
    out = subprocess.run([sys.executable, "-c", _INSTITUTION_SCRIPT, str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["shape"] == [2, 10] and result["mode"] == "output-noise"
    assert result["method"] == "tadfkd" and result["weight"] == 3.0  # the method's options kept, unread
    loaded = [m for m in result["modules"] if m.startswith(COORDINATOR) and m not in DECLARATIONS]
    assert loaded == []
    assert "fedkd.institution.host" in result["modules"]


def test_the_coordinator_s_settings_are_declarations_that_load_no_coordinator_code():
    """What an institution's config loads of the coordinator: its package (a docstring) and its settings
    sections, which import the options floor only (no torch, no coordinator module)."""
    graph = import_graph()
    assert graph["fedkd.coordinator"] == set()
    assert graph["fedkd.coordinator.settings"] == {"fedkd.options"}
    code = ("import sys, fedkd.config; print(sorted(m for m in sys.modules if m.startswith(('torch', "
            "'fedkd.coordinator', 'fedkd.server'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == str(sorted(DECLARATIONS)), out.stdout + out.stderr


def test_every_import_of_opacus_or_torchvision_goes_through_the_lock():
    """Flower runs ClientApps and the ServerApp in threads of one process; two threads importing Opacus and
    torchvision for the first time at once can meet a torch.distributed module half initialised (it failed CI
    twice). Every import of either in the package follows a call that imports it under fedkd.imports' lock."""
    import re

    pattern = re.compile(r"\s*(from|import) (opacus|torchvision)\b")
    guards = ('load_heavy("opacus")', 'load_heavy("torchvision")')
    sites, unguarded = 0, []
    for path in [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if p.name != "imports.py"]:
        lines = path.read_text().splitlines()
        for n, line in enumerate(lines):
            if not pattern.match(line) or pattern.match(lines[n - 1]):  # the first of consecutive imports
                continue
            sites += 1
            if lines[n - 1].strip().split("  #")[0] not in guards:
                unguarded.append(f"{path.relative_to(ROOT)}:{n + 1}")
    assert sites >= 10  # the ledger, PATE, DP-SGD, the open-set recipe, datasets, torchvision models
    assert unguarded == [], "imports of Opacus or torchvision without the lock first"


FIRST_DYNAMO = """
import sys, importlib.abc
from fedkd.imports import _LOCK
seen = []
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch._dynamo" and not seen:
            seen.append(_LOCK._is_owned())
        return None
sys.meta_path.insert(0, Watch())
from fedkd.config import config_from_mapping
from fedkd.coordinator.export import export_program
from fedkd.coordinator.flow import check_names
from fedkd.data import SPECS
from fedkd.models import build_classifier
assert "torch._dynamo" not in sys.modules
if sys.argv[1] == "check":
    check_names(config_from_mapping({"dataset": "digits"}), SPECS["digits"])
else:
    export_program(build_classifier("lenet5-half", num_classes=10, channels=1, image_size=8), (1, 8, 8),
                   __import__("pathlib").Path(sys.argv[2]))
print(seen)
"""


def test_the_start_up_check_and_the_export_import_torch_dynamo_under_the_lock(tmp_path):
    """A forward on the meta device (the start-up check of the student) and torch.export import torch._dynamo, which
    imports torch.distributed: in a Flower simulation it met a ClientApp's import in another thread once (an import
    deadlock reported as a bad student-model). In a fresh process, its first import happens under the lock that the
    other imports take."""
    runs = [subprocess.Popen([sys.executable, "-c", FIRST_DYNAMO, what, str(tmp_path / "student.pt2")], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for what in ("check", "export")]
    for run in runs:
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0 and out.strip() == "[True]", out + err
    assert (tmp_path / "student.pt2").is_file()
