"""The ``lmstream`` command: run the simulator, list models, stream a templated prompt, demo.

Built on argparse (standard library): sub-commands, typed options and generated help are all
this CLI needs, so no third-party parser is pulled in.

Exit status: 0 success, 1 the request or stream failed (partial text stays on stdout, one
sentence on stderr), 2 bad usage (for example a missing template variable), 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from . import simulator
from ._client import ChatStream, LMStudioClient
from ._config import Budgets
from ._errors import LMStreamError, StreamError, TemplateError, UnknownVariables
from ._events import ReasoningDelta, Stats, StreamFinished, StreamStarted, TextDelta
from ._template import Template

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value


def _seconds_or_none(text: str) -> float | None:
    if text.lower() in ("none", "inf", "0"):
        return None
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("a budget must be a positive number of seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmstream",
        description="Stream prompts to LM Studio (or its embedded simulator) from a terminal.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p_sim = sub.add_parser(
        "sim",
        help="run the LM-Studio-compatible simulator in the foreground",
        description="Serve an LM-Studio-compatible API with simulated timing and faults.",
    )
    simulator.add_cli_arguments(p_sim)

    p_models = sub.add_parser("models", help="list the models the server offers")
    _add_server_options(p_models)

    p_run = sub.add_parser(
        "run",
        help="stream a templated prompt to stdout",
        description="Render TEMPLATE ({{KEY}} placeholders) and stream the answer to stdout.",
    )
    p_run.add_argument("template", metavar="TEMPLATE", help="prompt text; '-' reads stdin")
    p_run.add_argument(
        "--var", "-v", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
        help="value for a {{KEY}} placeholder (repeatable)",
    )
    p_run.add_argument("--model", "-m", help="model id (default: the server's first LLM)")
    p_run.add_argument("--system", help="system prompt (may use {{KEY}} placeholders too)")
    p_run.add_argument("--temperature", type=float)
    p_run.add_argument("--max-tokens", type=int)
    p_run.add_argument("--json", action="store_true", help="print one JSON event per line")
    _add_server_options(p_run)
    _add_budget_options(p_run)

    p_demo = sub.add_parser(
        "demo",
        help="start the simulator, stream a templated prompt, print the stats, stop",
        description="The main job end to end, on the embedded simulator (no LM Studio needed).",
    )
    p_demo.add_argument(
        "--profile", default="laptop-gpu", choices=sorted(simulator.PROFILES),
        help="simulated hardware speed (default: laptop-gpu)",
    )
    p_demo.add_argument(
        "--time-scale", type=float, default=1.0,
        help="multiply every simulated duration (0.1 runs ten times faster)",
    )
    return parser


def _add_server_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--base-url",
        help="server address (default: $LMSTREAM_BASE_URL or http://localhost:1234/v1)",
    )


def _add_budget_options(p: argparse.ArgumentParser) -> None:
    defaults = Budgets()
    p.add_argument(
        "--first-token-timeout", type=_seconds_or_none, default=defaults.first_token,
        metavar="S", help=f"budget for the first token (default {defaults.first_token:g}; none)",
    )
    p.add_argument(
        "--idle-timeout", type=_seconds_or_none, default=defaults.idle,
        metavar="S", help=f"budget between chunks once text flows (default {defaults.idle:g})",
    )
    p.add_argument(
        "--connect-timeout", type=_seconds_or_none, default=defaults.connect,
        metavar="S", help=f"budget to connect (default {defaults.connect:g})",
    )


def _budgets(args: argparse.Namespace) -> Budgets:
    return Budgets(
        connect=args.connect_timeout, first_token=args.first_token_timeout, idle=args.idle_timeout
    )


# ---------------------------------------------------------------------------------------------


async def pick_model(client: LMStudioClient) -> str:
    """The server's first model that is not an embedding model."""
    models = await client.list_models()
    for model in models:
        if "embed" not in model.lower():
            return model
    if models:
        return models[0]
    raise LMStreamError(
        f"The server at {client.url} lists no models: load one in LM Studio (or run "
        "`lms load <model>`), or pass --model."
    )


def format_stats(stats: Stats, finished: StreamFinished | None = None) -> str:
    """One human line: tokens, time, TTFT, speed, chunks, model, finish reason."""
    parts = []
    if stats.completion_tokens is not None:
        parts.append(f"{stats.completion_tokens} tokens")
    parts.append(f"{stats.text_chars} chars in {stats.duration_s:.1f} s")
    if stats.ttft_s is not None:
        parts.append(f"first token after {stats.ttft_s:.2f} s")
    if stats.tokens_per_s is not None:
        parts.append(f"{stats.tokens_per_s:.1f} tokens/s")
    if stats.prompt_tokens is not None:
        parts.append(f"{stats.prompt_tokens} prompt tokens")
    parts.append(f"{stats.chunks} chunks")
    if finished is not None:
        if finished.model:
            parts.append(f"model {finished.model}")
        parts.append(f"finish: {finished.finish_reason or 'unknown'}")
    return ", ".join(parts)


class _Waiting:
    """Shows "waiting for the first token… N s" on a terminal's stderr until text arrives."""

    def __init__(self, err: TextIO, enabled: bool) -> None:
        self._err = err
        self._enabled = enabled
        self._task: asyncio.Task[None] | None = None
        self._shown = False

    def start(self) -> None:
        if self._enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        while True:
            elapsed = loop.time() - t0
            self._err.write(f"\r\033[2mwaiting for the first token… {elapsed:.0f} s\033[0m\033[K")
            self._err.flush()
            self._shown = True
            await asyncio.sleep(1.0)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._shown:
            self._err.write("\r\033[K")
            self._err.flush()
            self._shown = False


async def stream_to(
    stream: ChatStream, out: TextIO, err: TextIO, *, as_json: bool, show_waiting: bool
) -> StreamFinished | None:
    """Write a stream's text to ``out`` as it arrives (flushed per chunk); stats go to ``err``."""
    waiting = _Waiting(err, show_waiting and not as_json)
    in_reasoning = False
    try:
        async for event in stream:
            if isinstance(event, TextDelta):
                waiting.stop()
                if in_reasoning:
                    err.write("\033[0m\n" if show_waiting else "\n")
                    in_reasoning = False
                if as_json:
                    out.write(json.dumps({"event": "text", "content": event.content}) + "\n")
                else:
                    out.write(event.content)
                out.flush()
            elif isinstance(event, ReasoningDelta):
                waiting.stop()
                if as_json:
                    out.write(json.dumps({"event": "reasoning", "content": event.content}) + "\n")
                    out.flush()
                else:
                    if not in_reasoning and show_waiting:
                        err.write("\033[2m")
                    in_reasoning = True
                    err.write(event.content)
                    err.flush()
            elif isinstance(event, StreamStarted):
                if as_json:
                    out.write(json.dumps({
                        "event": "start", "model": event.model,
                        "request_id": event.request_id, "url": event.url,
                    }) + "\n")
                    out.flush()
                waiting.start()
            elif isinstance(event, StreamFinished):
                waiting.stop()
                if as_json:
                    out.write(json.dumps({
                        "event": "done", "finish_reason": event.finish_reason,
                        "model": event.model, "response_id": event.response_id,
                        "stats": event.stats.as_dict(),
                    }) + "\n")
                    out.flush()
                return event
    finally:
        waiting.stop()
        if in_reasoning and show_waiting:
            err.write("\033[0m")
    return None


def _print_error(
    exc: BaseException, out: TextIO, err: TextIO, *, as_json: bool, wrote: bool
) -> None:
    if as_json:
        record: dict[str, Any] = {
            "event": "error", "error": type(exc).__name__, "message": str(exc)
        }
        out.write(json.dumps(record) + "\n")
        out.flush()
    elif wrote:
        out.write("\n")
        out.flush()
    err.write(f"lmstream: {exc}\n")
    err.flush()


async def _cmd_run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    text = sys.stdin.read() if args.template == "-" else args.template
    values = dict(args.var)
    try:
        prompt = Template(text)
        system = Template(args.system) if args.system else None
        used = set(prompt.variables) | set(system.variables if system else ())
        unknown = [k for k in values if k not in used]
        if unknown:
            raise UnknownVariables(unknown, used)
        messages: list[dict[str, str]] = []
        if system is not None:
            messages.append({"role": "system", "content": system.render(values, allow_extra=True)})
        messages.append({"role": "user", "content": prompt.render(values, allow_extra=True)})
    except TemplateError as exc:
        err.write(f"lmstream: {exc}\n")
        return EXIT_USAGE
    async with LMStudioClient(args.base_url, budgets=_budgets(args)) as client:
        stream: ChatStream | None = None
        try:
            model = args.model or await pick_model(client)
            stream = client.stream_chat(
                messages, model=model, temperature=args.temperature, max_tokens=args.max_tokens
            )
            finished = await stream_to(
                stream, out, err, as_json=args.json, show_waiting=err.isatty()
            )
        except LMStreamError as exc:
            wrote = bool(stream is not None and stream.text) or isinstance(exc, StreamError)
            _print_error(exc, out, err, as_json=args.json, wrote=wrote and not args.json)
            return EXIT_FAILED
        if not args.json:
            if stream.text and not stream.text.endswith("\n"):
                out.write("\n")
                out.flush()
            if finished is not None:
                err.write(f"\033[2m{format_stats(finished.stats, finished)}\033[0m\n"
                          if err.isatty() else f"{format_stats(finished.stats, finished)}\n")
    return EXIT_OK


async def _cmd_models(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    async with LMStudioClient(args.base_url) as client:
        try:
            models = await client.list_models()
        except LMStreamError as exc:
            err.write(f"lmstream: {exc}\n")
            return EXIT_FAILED
    for model in models:
        out.write(model + "\n")
    return EXIT_OK


DEMO_SYSTEM = "You are a concise assistant for {{team}}."
DEMO_TEMPLATE = (
    "Summarise these release notes for {{audience}} in {{n}} short bullet points:\n\n{{notes}}"
)
DEMO_VARIABLES = {
    "team": "the data platform team",
    "audience": "product managers",
    "n": "3",
    "notes": (
        "- Streaming answers now arrive token by token instead of after the whole reply.\n"
        "- Long prompts no longer fail on a fixed 30 s timeout; a first-token budget applies.\n"
        "- Partial text is kept when a stream breaks, with one sentence saying why.\n"
    )
    * 4,
}


async def _cmd_demo(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    with simulator.serve(profile=args.profile, time_scale=args.time_scale) as sim:
        err.write(f"Simulator (profile {args.profile}) listening on {sim.base_url}\n")
        err.write(f"System:   {DEMO_SYSTEM}\nTemplate: {DEMO_TEMPLATE.splitlines()[0]}…\n")
        shown = {k: (v if len(v) < 40 else v[:37] + "...") for k, v in DEMO_VARIABLES.items()}
        err.write(f"Variables: {json.dumps(shown)}\n\n")
        err.flush()
        messages = [
            {"role": "system", "content": Template(DEMO_SYSTEM).render(DEMO_VARIABLES,
                                                                        allow_extra=True)},
            {"role": "user", "content": Template(DEMO_TEMPLATE).render(DEMO_VARIABLES,
                                                                        allow_extra=True)},
        ]
        async with LMStudioClient(sim.base_url) as client:
            try:
                model = await pick_model(client)
                stream = client.stream_chat(messages, model=model, max_tokens=160)
                finished = await stream_to(
                    stream, out, err, as_json=False, show_waiting=err.isatty()
                )
            except LMStreamError as exc:
                _print_error(exc, out, err, as_json=False, wrote=True)
                return EXIT_FAILED
        out.write("\n")
        out.flush()
        if finished is not None:
            err.write(f"\nStats: {format_stats(finished.stats, finished)}\n")
        err.write(
            "Simulator stopped. Against LM Studio: lmstream run 'Hello {{name}}' --var name=you\n"
        )
    return EXIT_OK


def _cmd_sim(args: argparse.Namespace, err: TextIO) -> int:
    try:
        config = simulator.config_from_cli(args)
    except ValueError as exc:
        err.write(f"lmstream sim: {exc}\n")
        return EXIT_USAGE

    def log(line: str) -> None:
        err.write(line + "\n")
        err.flush()

    def ready(base_url: str) -> None:
        log(
            f"LM Studio simulator (profile {config.profile}, time scale {config.time_scale:g}) "
            f"listening on {base_url}; press Ctrl-C to stop."
        )

    try:
        with contextlib.suppress(KeyboardInterrupt):
            simulator.run(config, log=log, on_ready=ready)
    except OSError as exc:
        err.write(f"lmstream sim: {exc}: pick another --port.\n")
        return EXIT_FAILED
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out, err = sys.stdout, sys.stderr
    try:
        if args.command == "sim":
            return _cmd_sim(args, err)
        commands = {"run": _cmd_run, "models": _cmd_models, "demo": _cmd_demo}
        return asyncio.run(commands[args.command](args, out, err))
    except KeyboardInterrupt:
        out.flush()
        err.write("\nlmstream: stopped by Ctrl-C; the text received so far is above.\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
