"""Imports point one way: every module has a layer, and imports only from lower layers.

The layers follow the data (HTTP -> SSE events -> run -> sinks -> history): vocabulary, pure
transforms, adapters, presentation, orchestration, front ends. The simulator and the uvicorn
thread runner stand beside them. Beyond the map, pure stages import no I/O and the simulator
no client code.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lmstream_nb"


def import_statements(path: Path) -> Iterator[tuple[str, list[str]]]:
    """(absolute module, names taken from it) for every import in a file, lazy ones included;
    relative imports are resolved in the package, and ``import x`` takes no names."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    package = parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            yield module, [alias.name for alias in node.names]


def imports_of(path: Path) -> set[str]:
    """Absolute module names imported by a file, and ``module.name`` for each name taken."""
    names: set[str] = set()
    for module, taken in import_statements(path):
        names.add(module)
        names.update(f"{module}.{name}" for name in taken)
    return names


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("_errors.py", {"lmstream_nb.", "httpx", "sqlite3", "IPython"}),
        ("_events.py", {"lmstream_nb.", "httpx", "sqlite3", "IPython"}),
        (
            "_sse.py",
            {
                "httpx",
                "sqlite3",
                "IPython",
                "threading",
                "time",
                "asyncio",
                "lmstream_nb._client",
                "lmstream_nb._config",
            },
        ),
        ("_template.py", {"httpx", "sqlite3", "IPython", "threading", "time", "asyncio"}),
        ("_diff.py", {"httpx", "sqlite3", "IPython", "threading", "time", "asyncio"}),
        (
            "_routes.py",
            {"lmstream_nb.", "httpx", "sqlite3", "IPython", "threading", "time", "asyncio"},
        ),
        (
            "_estimate.py",
            {"lmstream_nb.", "httpx", "sqlite3", "IPython", "threading", "time", "asyncio"},
        ),
        (
            "_client.py",
            {
                "lmstream_nb.cli",
                "lmstream_nb.simulator",
                "lmstream_nb._sync",
                "lmstream_nb._store",
                "lmstream_nb._run",
            },
        ),
        (
            "_store.py",
            {
                "httpx",
                "lmstream_nb._client",
                "lmstream_nb._sse",
                "lmstream_nb.cli",
                "lmstream_nb.simulator",
                "lmstream_nb._run",
                "IPython",
            },
        ),
        (
            "_migrations.py",
            {"httpx", "lmstream_nb._client", "lmstream_nb._run", "lmstream_nb._store"},
        ),
    ],
)
def test_pure_and_lower_layers_stay_pure(module: str, forbidden: set[str]) -> None:
    found = imports_of(PACKAGE / module)
    allowed_own = {"lmstream_nb._events", "lmstream_nb._errors"}
    bad = {
        name
        for name in found
        for prefix in forbidden
        if (name == prefix or name.startswith(prefix if prefix.endswith(".") else prefix + "."))
        and not any(name == a or name.startswith(a + ".") for a in allowed_own)
    }
    assert not bad, f"{module} imports {sorted(bad)}"


def test_simulator_imports_nothing_from_the_client_side() -> None:
    """Beside its own modules, only the uvicorn thread runner, which imports nothing of ours."""
    assert not {n for n in imports_of(PACKAGE / "_uvicorn.py") if n.startswith("lmstream_nb")}
    for path in (PACKAGE / "simulator").glob("*.py"):
        own = {
            name
            for name in imports_of(path)
            if name.startswith("lmstream_nb")
            and not name.startswith("lmstream_nb.simulator")
            and not name.startswith("lmstream_nb._uvicorn")
        }
        assert not own, f"{path.name} imports {sorted(own)}"


def test_the_service_is_a_front_end() -> None:
    """``lmstream serve`` runs prompts through ``_run`` like the CLI: no wire format, no httpx,
    no simulator (which it must never be able to agree with by accident), no other front end."""
    forbidden = (
        "httpx",
        "lmstream_nb._sse",
        "lmstream_nb.simulator",
        "lmstream_nb.cli",
        "lmstream_nb._magics",
        "lmstream_nb._widget",
        "IPython",
    )
    for path in (PACKAGE / "serve").glob("*.py"):
        bad = {
            name
            for name in imports_of(path)
            if any(name == prefix or name.startswith(prefix + ".") for prefix in forbidden)
        }
        assert not bad, f"serve/{path.name} imports {sorted(bad)}"


# -- the layer map -----------------------------------------------------------------------------

#: Every module of the package, lowest layer first. A module may import from any lower layer,
#: from its own layer only through the helpers listed in SAME_LAYER, and from the modules
#: beside the pipeline only as BESIDE allows.
LAYERS: dict[str, tuple[str, ...]] = {
    "vocabulary": ("_errors.py", "_events.py", "_config.py"),
    "pure transforms": (
        "_sse.py",
        "_template.py",
        "_structured.py",
        "_routes.py",
        "_estimate.py",
        "_diff.py",
    ),
    "adapters": (
        "_client.py",
        "_migrations.py",
        "_owners.py",
        "_prompt_fields.py",
        "_prompt_files.py",
        "_history.py",
        "_store.py",
    ),
    "presentation": (
        "_throttle.py",
        "_progress.py",
        "_batch_progress.py",
        "_view.py",
        "_grid.py",
        "_terminal.py",
        "_outcome.py",
    ),
    "orchestration": (
        "_loop.py",
        "_sync.py",
        "_run.py",
        "_batch.py",
        "_conversation.py",
        "_compare.py",
    ),
    "front ends": (
        "cli.py",
        "_magics.py",
        "_widget.py",
        "__init__.py",
        "__main__.py",
        "bench/__init__.py",
        "bench/_report.py",
        "bench/_runner.py",
        "bench/_simhost.py",
        "bench/_timeline.py",
        "bench/_workload.py",
        "serve/__init__.py",
        "serve/_app.py",
        "serve/_events.py",
        "serve/_hub.py",
        "serve/_openapi.py",
        "serve/_security.py",
        "serve/_server.py",
        "serve/_validate.py",
    ),
}

#: Beside the pipeline: an independent implementation of the wire format, and the uvicorn
#: runner it shares with ``lmstream serve``. Each entry: (may import, may be imported by).
BESIDE: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "_uvicorn.py": (frozenset(), frozenset({"simulator", "serve"})),
    **{
        f"simulator/{name}": (frozenset({"_uvicorn.py"}), frozenset({"front ends"}))
        for name in (
            "__init__.py",
            "_app.py",
            "_cli.py",
            "_pace.py",
            "_produce.py",
            "_records.py",
            "_scenario.py",
            "_schema.py",
            "_server.py",
            "_text.py",
            "_wire.py",
        )
    },
}

#: Same-layer imports that are allowed (a sub-package's modules may also use each other).
SAME_LAYER: dict[str, frozenset[str]] = {
    "_config.py": frozenset({"_errors.py"}),
    "_diff.py": frozenset({"_template.py"}),  # compares two Prompt values
    # A Prompt keeps its JSON Schema as the canonical text structured output defines.
    "_template.py": frozenset({"_structured.py"}),
    # The store is one adapter in several modules: PromptStore uses the others, which never
    # use it (prompt files name it in type annotations only).
    "_store.py": frozenset(
        {"_history.py", "_prompt_files.py", "_prompt_fields.py", "_owners.py", "_migrations.py"}
    ),
    "_prompt_files.py": frozenset({"_prompt_fields.py", "_store.py"}),
    "_view.py": frozenset({"_throttle.py", "_progress.py"}),
    "_grid.py": frozenset({"_throttle.py", "_view.py", "_outcome.py"}),
    "_terminal.py": frozenset({"_progress.py"}),
    "_batch_progress.py": frozenset({"_progress.py"}),
    "_sync.py": frozenset({"_loop.py"}),
    "_run.py": frozenset({"_loop.py", "_sync.py"}),
    "_batch.py": frozenset({"_loop.py", "_run.py"}),
    "_conversation.py": frozenset({"_loop.py", "_sync.py", "_run.py"}),
    "_compare.py": frozenset({"_loop.py", "_run.py", "_batch.py"}),
    "__init__.py": frozenset({"_magics.py", "_widget.py"}),
    "__main__.py": frozenset({"cli.py"}),
    "cli.py": frozenset({"bench/__init__.py", "serve/__init__.py"}),
    "_magics.py": frozenset({"_widget.py"}),
}

_LAYER_OF = {module: layer for layer, modules in LAYERS.items() for module in modules}


def _module_name(relative: str) -> str:
    parts = ["lmstream_nb", *Path(relative).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _package_files() -> list[str]:
    return sorted(str(p.relative_to(PACKAGE).as_posix()) for p in PACKAGE.rglob("*.py"))


def _known_modules() -> dict[str, str]:
    """Dotted module name -> file, for every file in the package."""
    return {_module_name(f): f for f in _package_files()}


def package_imports_of(relative: str) -> set[str]:
    """The package files a file imports (``from . import x`` resolved to ``x`` when a module)."""
    known = _known_modules()
    found: set[str] = set()
    for module, taken in import_statements(PACKAGE / relative):
        if module.split(".")[0] != "lmstream_nb":
            continue
        submodules = [f"{module}.{t}" for t in taken if f"{module}.{t}" in known]
        plain = len(submodules) < len(taken) or not taken  # names from the module itself
        for name in [*submodules, *([module] if plain else [])]:
            while name not in known:
                name = name.rpartition(".")[0]
            found.add(known[name])
    found.discard(relative)
    return found


def _group(relative: str) -> str:
    """The sub-package a file belongs to ("" for top-level modules)."""
    return relative.split("/")[0] if "/" in relative else ""


def _may_import(importer: str, imported: str) -> bool:
    if _group(importer) and _group(importer) == _group(imported):
        return True
    if importer in BESIDE:
        return imported in BESIDE[importer][0]
    if imported in BESIDE:
        users = BESIDE[imported][1]
        return _LAYER_OF[importer] in users or _group(importer) in users
    order = list(LAYERS)
    mine, theirs = order.index(_LAYER_OF[importer]), order.index(_LAYER_OF[imported])
    return theirs < mine or imported in SAME_LAYER.get(importer, frozenset())


def test_every_module_has_a_layer() -> None:
    mapped = set(_LAYER_OF) | set(BESIDE)
    unmapped = [f for f in _package_files() if f not in mapped]
    assert not unmapped, (
        f"Not in the layer map: {', '.join(unmapped)}: add each to LAYERS (or BESIDE) in "
        "tests/test_layers.py, in the layer of what it does, so its imports are checked."
    )
    missing = sorted(mapped - set(_package_files()))
    assert not missing, f"Mapped but not in the package: {', '.join(missing)}: remove them."


def test_imports_point_down_the_layers() -> None:
    wrong = [
        f"{importer} ({_LAYER_OF.get(importer, 'beside')}) imports {imported} "
        f"({_LAYER_OF.get(imported, 'beside')})"
        for importer in _package_files()
        if importer in _LAYER_OF or importer in BESIDE
        for imported in sorted(package_imports_of(importer))
        if (imported in _LAYER_OF or imported in BESIDE)  # else test_every_module_has_a_layer
        and not _may_import(importer, imported)
    ]
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(wrong)


def test_the_checker_sees_lazy_and_relative_imports() -> None:
    """The map is only as good as the import reader: it must see what the modules do."""
    assert "cli.py" in package_imports_of("__main__.py")
    assert "simulator/__init__.py" in package_imports_of("cli.py")
    assert "bench/__init__.py" in package_imports_of("cli.py"), "imported inside a function"
    assert "_widget.py" in package_imports_of("_magics.py"), "imported inside a function"
    assert "_errors.py" in package_imports_of("serve/_events.py"), "from .. import"
    assert not _may_import("_magics.py", "cli.py"), "front ends do not use each other"
    assert not _may_import("_client.py", "_store.py"), "adapters do not use each other"
    assert not _may_import("_run.py", "_magics.py")
    assert not _may_import("simulator/_app.py", "_events.py")
    assert _may_import("serve/_server.py", "_uvicorn.py")
    assert not _may_import("_run.py", "_uvicorn.py")


def test_front_ends_do_not_speak_the_wire_format() -> None:
    """Front ends go through the client and the run; they never decode SSE or call httpx."""
    front = [m for m in LAYERS["front ends"] if (PACKAGE / m).exists()]
    for module in front:
        assert "_sse.py" not in package_imports_of(module), module
        assert not {n for n in imports_of(PACKAGE / module) if n.split(".")[0] == "httpx"}, module
