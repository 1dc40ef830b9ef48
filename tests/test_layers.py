"""Imports point one way (style.md §3): pure stages import no I/O, the simulator no client code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lmstream_nb"


def imports_of(path: Path) -> set[str]:
    """Absolute module names imported by a file (relative imports resolved in the package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    package = parts[:-1]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
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
