"""Notebook cells run as nbval items; some do real work (notebook 05 drives a real model)."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.suffix == ".ipynb":  # nbval items: one per cell
            item.add_marker(pytest.mark.timeout(600))
