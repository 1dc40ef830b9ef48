"""A local server that imitates LM Studio's HTTP API, for tests, demos and benchmarks.

It serves ``/v1/models``, ``/api/v0/models``, ``/v1/chat/completions`` and
``/api/v0/chat/completions`` with LM Studio's bodies, headers, stream framing and error shapes,
and LM Studio 0.4's native ``/api/v1/chat`` (with model-load and prompt-processing progress),
``/api/v1/models`` and model load/unload; or, with the ``"llamacpp"`` dialect, llama.cpp's
server with its ``prompt_progress`` chunks, ``/props`` and token counting. It runs at the speed
of a chosen hardware profile, with ``parallel`` slots per model that share its speed (see
``_pace``), deterministic text, and faults (stalls, dropped connections, error frames, broken
lines, wrong content types) that a client must survive.
It is an independent implementation of the wire format: it imports nothing from the rest of
``lmstream_nb``.

    from lmstream_nb import simulator

    with simulator.serve(profile="test-fast") as sim:
        ...  # point a client at sim.base_url, then inspect sim.records()

A request can change its own scenario by adding ``"sim": {...}`` to its JSON body, with any
:class:`Scenario` field, e.g. ``{"sim": {"disconnect_at": 5}}``.
"""

import importlib as _importlib
import typing as _typing

from ._cli import add_cli_arguments, config_from_cli
from ._records import RequestRecord
from ._scenario import PROFILES, Scenario, SimConfig

if _typing.TYPE_CHECKING:
    from ._server import SimServer, run, serve


def __getattr__(name: str) -> _typing.Any:
    """The server (uvicorn, Starlette) is imported on first use: the ``lmstream`` command
    reads the flags and profiles above for every ``--help`` and only serves for sim and demo."""
    if name in ("SimServer", "run", "serve"):
        value = getattr(_importlib.import_module(f"{__name__}._server"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PROFILES",
    "RequestRecord",
    "Scenario",
    "SimConfig",
    "SimServer",
    "add_cli_arguments",
    "config_from_cli",
    "run",
    "serve",
]
