"""Command-line flags for the simulator, for ``lmstream sim`` and any other argparse program."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from ._scenario import (
    DIALECTS,
    FLOODS,
    LINE_ENDINGS,
    PROFILES,
    REASONING_MODES,
    Scenario,
    SimConfig,
)

__all__ = ["add_cli_arguments", "config_from_cli"]

# Scenario fields that get a flag: (field, type, metavar, help). The flag is --field-name.
_SCENARIO_FLAGS: tuple[tuple[str, type, str, str], ...] = (
    ("prefill_tps", float, "TPS", "prompt-processing speed in tokens/s (default: the profile's)"),
    ("gen_tps", float, "TPS", "generation speed in tokens/s (default: the profile's)"),
    ("load_s", float, "SECONDS", "JIT load time of a not-loaded model (default: the profile's)"),
    ("jitter", float, "FRACTION", "± fraction of random variation between tokens (default 0.2)"),
    ("output_tokens", int, "N", "answer tokens per request (default 150)"),
    ("chunk_chars", int, "N", "send answer deltas of exactly N characters instead of words"),
    (
        "reasoning_tokens",
        int,
        "N",
        "thinking tokens before the answer when reasoning is on (default 40)",
    ),
    (
        "batch_size",
        int,
        "TOKENS",
        "prompt tokens per processing step and progress report (default 512; llamacpp 2048)",
    ),
    ("ping_s", float, "SECONDS", "send ': ping' comment lines this often during prompt processing"),
    ("stall_at", int, "N", "after N tokens pause for --stall-s seconds"),
    ("stall_s", float, "SECONDS", "length of the --stall-at pause (default 0)"),
    (
        "prompt_stall_at",
        int,
        "N",
        "after N prompt tokens are processed, pause for --stall-s seconds",
    ),
    ("disconnect_at", int, "N", "after N tokens drop the connection (0: right after the headers)"),
    ("end_at", int, "N", "after N tokens end the body without a finish chunk or [DONE]"),
    ("error_at", int, "N", "after N tokens send an 'event: error' frame and end the stream"),
    ("error_message", str, "TEXT", "message for --error-at and --http-status bodies"),
    ("malformed_at", int, "N", "before token N send a data line that is not JSON"),
    ("malformed_data", str, "TEXT", "the data line --malformed-at sends (default: broken JSON)"),
    ("write_events", int, "N", "gather up to N SSE events into one network write"),
    ("flood_bytes", int, "N", "how many bytes a --flood sends before it ends (default 256 MiB)"),
    ("redirect_to", str, "URL", "answer every request with a redirect to URL"),
    ("http_status", int, "STATUS", "answer every chat request with this HTTP status"),
    ("content_type", str, "TYPE", "answer streaming requests with this content type, not SSE"),
    ("fault_attempts", int, "N", "faults act only on the first N requests with the same messages"),
)


def _slots(text: str) -> int | None:
    if text.strip().lower() in ("unlimited", "none"):
        return None
    try:
        slots = int(text)
    except ValueError:
        slots = 0
    if slots < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of slots: use 1 or more, or 'unlimited'"
        )
    return slots


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the simulator's flags (server, speed, text and fault options) to ``parser``."""
    server = parser.add_argument_group("simulated server")
    server.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    server.add_argument(
        "--port",
        type=int,
        default=1234,
        help="port to listen on; 0 picks a free one (default 1234, like LM Studio)",
    )
    server.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default="laptop-gpu",
        help="speed profile (default laptop-gpu: prefill 150 tok/s, generation 30 tok/s, load 7 s)",
    )
    server.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        metavar="FACTOR",
        help="multiply every simulated duration (0.01 turns 300 s into 3 s)",
    )
    server.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for text and jitter when a request has none (default 0)",
    )
    server.add_argument(
        "--model",
        action="append",
        metavar="ID",
        help="a downloaded model id (repeatable); the first is loaded, the others load just "
        "in time; ids containing 'embed' are embedding models (default: "
        f"{' '.join(SimConfig().models)})",
    )
    server.add_argument(
        "--any-model",
        action="store_true",
        help="serve any model name with the loaded model (an LM Studio quirk)",
    )
    server.add_argument("--no-model", action="store_true", help="behave as if no model were loaded")
    server.add_argument(
        "--api-key",
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on every request (default: none needed)",
    )
    server.add_argument(
        "--parallel",
        "--max-parallel",
        dest="parallel",
        type=_slots,
        default=4,
        metavar="N",
        help="prediction slots per model, sharing its speed; later requests queue (default 4, "
        "LM Studio 0.4; 1: one at a time, as LM Studio 0.3; 'unlimited': all at full speed)",
    )
    server.add_argument(
        "--context-length",
        type=int,
        default=131072,
        metavar="TOKENS",
        help="loaded context length; longer prompts are refused (default 131072)",
    )
    server.add_argument(
        "--no-native-api",
        dest="native_api",
        action="store_false",
        help="be LM Studio 0.3: no native /api/v1, so no progress while a prompt is processed",
    )

    behaviour = parser.add_argument_group(
        "default scenario (a request may override it with a 'sim' object)"
    )
    behaviour.add_argument(
        "--reasoning",
        choices=REASONING_MODES,
        default="off",
        help="how thinking tokens are sent (default off)",
    )
    behaviour.add_argument(
        "--dialect",
        choices=DIALECTS,
        default="lmstudio",
        help="stream chunk style (default lmstudio)",
    )
    behaviour.add_argument(
        "--line-ending",
        choices=LINE_ENDINGS,
        default="lf",
        help="line ending of SSE lines (default lf)",
    )
    behaviour.add_argument(
        "--bom", action="store_true", help="start every stream with a UTF-8 byte-order mark"
    )
    behaviour.add_argument(
        "--flood",
        choices=FLOODS,
        help="a hostile body that never ends properly: one endless line, endless data lines "
        "without a blank line, or a gzip bomb (default: none)",
    )
    behaviour.add_argument(
        "--echo-request",
        action="store_true",
        help="repeat the request's Authorization header and URL in every error text",
    )
    for name, kind, metavar, text in _SCENARIO_FLAGS:
        shown = text if "default" in text else f"{text} (default: off)"
        behaviour.add_argument(
            "--" + name.replace("_", "-"), type=kind, metavar=metavar, help=shown
        )


def config_from_cli(ns: argparse.Namespace) -> SimConfig:
    """Build a :class:`SimConfig` from flags added by :func:`add_cli_arguments`.

    Raises ``ValueError`` (a ``ScenarioError``) naming the first invalid value.
    """
    scenario: dict[str, Any] = {
        "reasoning": ns.reasoning,
        "dialect": ns.dialect,
        "line_ending": ns.line_ending,
        "bom": ns.bom,
        "no_model": ns.no_model,
        "flood": ns.flood,
        "echo_request": ns.echo_request,
    }
    for name, *_ in _SCENARIO_FLAGS:
        value = getattr(ns, name)
        if value is not None:
            scenario[name] = value
    fields: dict[str, Any] = {
        "host": ns.host,
        "port": ns.port,
        "profile": ns.profile,
        "time_scale": ns.time_scale,
        "seed": ns.seed,
        "any_model": ns.any_model,
        "api_key": ns.api_key,
        "parallel": ns.parallel,
        "context_length": ns.context_length,
        "native_api": ns.native_api,
        "defaults": Scenario(**scenario),
    }
    if ns.model:
        fields["models"] = tuple(ns.model)
    return dataclasses.replace(SimConfig(), **fields)
