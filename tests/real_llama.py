"""The project's launcher for llama.cpp's server (``tools/llama_server.py``), importable by tests.

``tools/`` is not a package on the path, so the launcher is loaded from its file once here.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parent.parent / "tools" / "llama_server.py"
_spec = importlib.util.spec_from_file_location("lmstream_llama_server", _PATH)
assert _spec is not None
assert _spec.loader is not None
launcher = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = launcher  # dataclasses look their module up by name
_spec.loader.exec_module(launcher)

Server = launcher.Server

__all__ = ["Server", "launcher"]
