"""Notebook cells run as nbval items; some do real work (notebook 05 drives a real model).

Notebook 05 needs llama.cpp's server, which the project's launcher (``tools/llama_server.py``)
builds once and caches. Where it cannot be built (no compiler or cmake), every cell of that
notebook is skipped with the launcher's reason instead of failing.
"""

from __future__ import annotations

import importlib.util
import sys
from functools import cache
from pathlib import Path

import pytest

REAL_MODEL_NOTEBOOKS = {"05-real-model.ipynb"}
LAUNCHER = Path(__file__).resolve().parent.parent / "tools" / "llama_server.py"


@cache
def _real_server_unavailable() -> str | None:
    spec = importlib.util.spec_from_file_location("lmstream_llama_server_check", LAUNCHER)
    if spec is None or spec.loader is None:
        return f"the launcher {LAUNCHER} is missing"
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    reason: str | None = module.unavailable_reason()
    return reason


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.suffix != ".ipynb":  # nbval items: one per cell
            continue
        item.add_marker(pytest.mark.timeout(600))
        if item.path.name in REAL_MODEL_NOTEBOOKS:
            item.add_marker(pytest.mark.real_server)
            reason = _real_server_unavailable()
            if reason is not None:
                item.add_marker(pytest.mark.skip(reason=reason))
