"""The package's shape: no import cycles, a lazy top level, every module importable."""

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hub_msif"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str, modules: set[str]) -> set[str]:
    """The hub_msif modules that ``path`` imports, at any depth of the file (function-level too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            # the longest known module the import names (``from a.b import c``: a.b.c if a module, else a.b)
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    graph = {}
    for name, path in paths.items():
        # importing a.b.c also runs a/__init__ and a/b/__init__: those are edges too
        edges = imports_of(path, name, modules)
        graph[name] = {e for e in edges if not name.startswith(e + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_subpackages_are_layered():
    """Lower stages never import higher ones: options < artifacts < factors < hub < attribution < apps."""
    order = ["errors", "options", "artifacts", "models", "data", "factors", "hub", "attribution", "apps"]
    rank = {stage: i for i, stage in enumerate(order)}

    def stage(module: str) -> str | None:
        parts = module.split(".")
        return parts[1] if len(parts) > 1 else None

    graph = import_graph()
    upward = [f"{a} -> {b}" for a, edges in graph.items() for b in edges
              if stage(a) in rank and stage(b) in rank and rank[stage(b)] > rank[stage(a)]]
    assert not upward, "imports against the pipeline's direction: " + ", ".join(upward)


@pytest.mark.parametrize("name", sorted(module_name(p) for p in PACKAGE.rglob("*.py") if p.name != "__main__.py"))
def test_every_module_imports(name):
    importlib.import_module(name)


def test_top_level_is_lazy_and_exposes_the_public_api():
    code = (
        "import sys, json, hub_msif as h\n"
        "before = sorted(m for m in ('torch', 'transformers', 'huggingface_hub') if m in sys.modules)\n"
        "names = [h.Attributor, h.DocumentIndex, h.fit_stage, h.FitConfig, h.push_factors, h.pull_factors,\n"
        "         h.push_index, h.pull_index, h.find_factors]\n"
        "print(json.dumps({'before': before, 'torch_after': 'torch' in sys.modules,\n"
        "                  'names': [n.__name__ for n in names]}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result["before"] == []
    assert result["torch_after"]
    assert result["names"] == ["Attributor", "DocumentIndex", "fit_stage", "FitConfig", "push_factors",
                               "pull_factors", "push_index", "pull_index", "find_factors"]
    import hub_msif

    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        hub_msif.nonexistent  # noqa: B018


def test_errors_inherit_their_builtin_kind():
    from hub_msif import errors

    assert issubclass(errors.MsifValueError, ValueError)
    assert issubclass(errors.RepositoryNotFoundError, FileNotFoundError)
    assert issubclass(errors.RevisionNotFoundError, FileNotFoundError)
    assert issubclass(errors.TokenRefusedError, PermissionError)
    assert issubclass(errors.HubUnreachableError, ConnectionError)
    assert issubclass(errors.FactorsNotFoundError, errors.FactorError)
    assert issubclass(errors.FactorsNotFoundError, FileNotFoundError)
    assert issubclass(errors.HubIntegrityError, errors.IntegrityError)
    assert issubclass(errors.Interrupted, KeyboardInterrupt) and not issubclass(errors.Interrupted, Exception)
    for name in errors.__all__:
        if name != "Interrupted":
            assert issubclass(getattr(errors, name), errors.MsifError), name


SERVER_MODULES_NEEDING_THE_EXTRA = ["app", "routes", "repos", "uploads", "spaces", "request_context"]


def test_the_core_and_the_space_app_do_not_import_the_server_extra():
    """Issue 20 (1): starlette and uvicorn are the extra ``hub_msif[server]``; the Hub client, the
    command line, the attributor and the server package itself (tokens, gc) import neither, and the
    Space app (gradio brings starlette of its own) imports none of the server's HTTP modules."""
    code = (
        "import sys, json\n"
        "import hub_msif.hub, hub_msif.hub.server, hub_msif.apps.cli, hub_msif.attribution.attributor\n"
        "core = sorted(m for m in ('starlette', 'uvicorn') if m in sys.modules)\n"
        "import hub_msif.apps.space.app\n"
        "print(json.dumps({'core': core, 'server': sorted(m for m in sys.modules if m.startswith('hub_msif.hub.server.'))}))\n"
    )
    result = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert result["core"] == []
    assert not {f"hub_msif.hub.server.{m}" for m in SERVER_MODULES_NEEDING_THE_EXTRA} & set(result["server"])


REPOSITORY = PACKAGE.parent
SOURCES = ("hub_msif", "bench", "tests", "examples")


def private_imports(path: Path, own_modules: set[str]) -> list[str]:
    """``from X import _y`` (and ``import X._y``) in ``path`` where X is this repository's own code
    (hub_msif, bench, a test module, relative imports); dunder names (``__version__``) are public."""
    def private(name: str) -> bool:
        return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))

    def own(module: str) -> bool:
        return module.split(".")[0] in own_modules

    where = path.relative_to(REPOSITORY) if path.is_relative_to(REPOSITORY) else path.name
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and (node.level or own(node.module or "")):
            found += [f"{where}:{node.lineno}: from {'.' * node.level}{node.module or ''} "
                      f"import {a.name}" for a in node.names if private(a.name)]
        elif isinstance(node, ast.Import):
            found += [f"{where}:{node.lineno}: import {a.name}" for a in node.names
                      if own(a.name) and any(private(part) for part in a.name.split(".")[1:])]
    return found


def own_module_names() -> set[str]:
    return {"hub_msif", "bench", "examples"} | {p.stem for p in (REPOSITORY / "tests").rglob("*.py")}


def test_no_private_name_is_imported_from_another_module():
    """Issue 20 (4): a name starting with ``_`` is its module's own; what another module needs is public."""
    own = own_module_names()
    found = [hit for source in SOURCES for path in sorted((REPOSITORY / source).rglob("*.py"))
             for hit in private_imports(path, own)]
    assert not found, "private names imported from another module:\n" + "\n".join(found)


def test_the_private_import_check_finds_a_planted_one(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("from hub_msif.toy.factworld import _planted\nfrom hub_msif import __version__\n"
                       "from huggingface_hub.utils import _http\nimport hub_msif._private\nfrom ._x import _y\n")
    found = private_imports(planted, own_module_names())
    assert [hit.split(": ", 1)[1] for hit in found] == ["from hub_msif.toy.factworld import _planted",
                                                         "import hub_msif._private", "from ._x import _y"]
