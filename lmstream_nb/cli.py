"""The ``lmstream`` command: prompts, runs, history and stats, the simulator, and a demo.

Built on argparse (standard library): sub-commands, typed options and generated help are all
this CLI needs, so no third-party parser is pulled in.

Exit status: 0 success, 1 the request, stream or database failed (partial text stays on
stdout, one sentence on stderr), 2 bad usage (for example a missing template variable),
130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from . import simulator
from ._config import Budgets, seconds_argument
from ._errors import (
    InvalidSchema,
    InvalidSetting,
    LMStreamError,
    PromptNotFound,
    TemplateError,
    render,
)
from ._history import STATS_BY
from ._history import STATUSES as RUN_STATUSES
from ._prompt_fields import KEEP, describe_setting
from ._template import Prompt
from .bench import DEFAULT_QUEUES, FAULT_KINDS, MODES

if TYPE_CHECKING:
    from ._store import PromptStore, SavedVersion

# A command imports what it uses when it runs (the HTTP client, the database, asyncio, the
# simulator's server), so `lmstream --help` and quick commands start fast.

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value


def _status(text: str) -> str:
    """An argparse ``type`` for ``--status``: one of the recorded run statuses."""
    if text not in RUN_STATUSES:
        raise argparse.ArgumentTypeError(
            f"the status {text!r} is not known: use one of {', '.join(RUN_STATUSES)}"
        )
    return text


def _whole_number(minimum: int, noun: str) -> Callable[[str], int]:
    """An argparse ``type``: a whole number of ``noun`` that is at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a number of {noun}: use a whole number, {minimum} or more."
            )
        return value

    return parse


def _limit_seconds(text: str) -> float:
    """An argparse ``type`` for a limit that must exist: a positive number of seconds."""
    value = seconds_argument(text)
    if value is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} would mean no limit here: use a positive number of seconds."
        )
    return value


def _number(*, zero: bool) -> Callable[[str], float]:
    """An argparse ``type``: a finite number above 0, or from 0 when ``zero`` (a duration, a
    scale, a factor)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (value >= 0 if zero else value > 0) or math.isinf(value):
            noun = "a number 0 or more" if zero else "a number above 0"
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}: use one.")
        return value

    return parse


_positive_number = _number(zero=False)
_not_negative = _number(zero=True)
_version = _whole_number(1, "a version")


def _rate(text: str) -> float:
    """An argparse ``type``: a fraction from 0 to 1."""
    value = _not_negative(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate from 0 to 1: use one.")
    return value


def _conversation_name(text: str) -> str:
    """An argparse ``type``: a conversation's name, by the rule every front end keeps."""
    from ._conversation import check_name

    try:
        return check_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).rstrip(".")) from None


def _port(text: str) -> int:
    """An argparse ``type``: a TCP port, 0 to pick a free one."""
    value = _whole_number(0, "port")(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: use 0 to 65535.")
    return value


def _prompt_setting(key: str) -> Callable[[str], Any]:
    """An argparse ``type`` for ``--temperature`` or ``--max-tokens``, checked by the range rule
    every entry point applies (check_temperature, check_max_tokens), in the CLI's words."""
    from ._prompt_fields import check_max_tokens, check_temperature

    convert: Callable[[str], Any] = float if key == "temperature" else int
    check: Callable[[object], object] = (
        check_temperature if key == "temperature" else check_max_tokens
    )

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            noun = "a number" if key == "temperature" else "a whole number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}: use one.") from None
        try:
            check(value)
        except InvalidSetting as exc:
            raise argparse.ArgumentTypeError(render(exc, "cli").rstrip(".")) from None
        return value

    return parse


def _writable_file(text: str) -> Path:
    """An argparse ``type`` for an output file: its folder must exist, so a long run never
    ends on a file that cannot be written."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder: name a file.")
    if not path.resolve().parent.is_dir():
        raise argparse.ArgumentTypeError(f"the folder of {text!r} does not exist: create it.")
    return path


def _readable_file(text: str) -> Path:
    """An argparse ``type`` for an input file that must exist."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not a file: name one that exists.")
    return path


def _base_url(text: str) -> str:
    """An argparse ``type`` for ``--base-url``: checked at once (a missing scheme, a bad port)
    by the one rule every client applies."""
    from ._config import parse_base_url

    try:
        parse_base_url(text)
    except LMStreamError as exc:
        raise argparse.ArgumentTypeError(str(exc).rstrip(".")) from None
    return text


def help_text(action: argparse.Action) -> str:
    """An option's help with its default, unless the help already says it (or the default is
    nothing to show: none, a flag that is off)."""
    text = action.help or ""
    default = action.default
    if (
        not action.option_strings
        or "default" in text
        or default is None
        or default is False
        or default == argparse.SUPPRESS
        or default == []
    ):
        return text
    if isinstance(default, (list, tuple)):
        default = " ".join(str(d) for d in default)
    shown = str(default).replace("%", "%%")
    return f"{text} (default: {shown})" if text else f"default: {shown}"


class _HelpFormatter(argparse.HelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str:
        return help_text(action)


def _cleared(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type`` for a setting of ``prompts add``: '' or none clears it (None)."""

    def parse(text: str) -> Any:
        if text.strip().lower() in ("", "none"):
            return None
        try:
            return kind(text)
        except ValueError:
            noun = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {noun}: give one, or none to drop the setting."
            ) from None

    return parse


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (no usage block), with exit status 2,
    and shows every option's default in its help."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        # argparse says "argument --x: …"; a sentence that already starts with the option
        # (the shared range rules do) is shown without repeating it.
        head, sep, rest = message.partition(": ")
        if sep and head.startswith("argument ") and rest.startswith(head[len("argument ") :]):
            message = rest
        self.exit(EXIT_USAGE, f"{self.prog}: {message.rstrip('.')} (see {self.prog} --help).\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lmstream",
        description="Stream prompts to LM Studio (or its embedded simulator) from a terminal.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p_run = sub.add_parser(
        "run",
        help="stream a stored prompt or a template to stdout (the run is recorded)",
        description="Render a stored prompt (--prompt) or TEMPLATE ({{KEY}} placeholders) "
        "and stream the answer to stdout. Every run is recorded in the history.",
    )
    p_run.add_argument(
        "template", metavar="TEMPLATE", nargs="?", help="prompt text; '-' reads stdin"
    )
    p_run.add_argument(
        "--prompt", "-p", metavar="NAME", help="run this stored prompt (default: TEMPLATE)"
    )
    p_run.add_argument("--version", type=_version, help="stored prompt version (default: latest)")
    p_run.add_argument(
        "--var",
        "-v",
        action="append",
        type=_key_value,
        default=[],
        metavar="KEY=VALUE",
        help="value for a {{KEY}} placeholder (repeatable; default: none)",
    )
    p_run.add_argument("--model", "-m", help="model id (default: the prompt's, else the server's)")
    p_run.add_argument(
        "--system", help="system prompt for TEMPLATE, may use {{KEY}} too (default: none)"
    )
    p_run.add_argument(
        "--temperature",
        type=_prompt_setting("temperature"),
        help="sampling temperature, 0 to 2 (default: the prompt's, else the server's)",
    )
    p_run.add_argument(
        "--max-tokens",
        type=_prompt_setting("max_tokens"),
        metavar="N",
        help="answer tokens at most, -1 for no limit (default: the prompt's, else the server's)",
    )
    p_run.add_argument(
        "--schema",
        metavar="FILE_OR_JSON",
        help="answer as JSON matching this JSON Schema: a .json file or inline JSON; checked "
        "at the end, status invalid_output if it does not match (default: the prompt's, else "
        "none)",
    )
    p_run.add_argument(
        "--json",
        action="store_true",
        help="print one JSON event per line (the last has the run id)",
    )
    p_run.add_argument(
        "--chat",
        metavar="NAME",
        type=_conversation_name,
        help="send this as the next message of conversation NAME, with its earlier turns "
        "(default: a run on its own)",
    )
    p_run.add_argument(
        "--drop-oldest",
        action="store_true",
        help="with --chat: leave out as many of the oldest turns as the context needs",
    )
    p_run.add_argument(
        "--include-failed",
        action="store_true",
        help="with --chat: also send earlier turns that failed or were stopped",
    )
    _add_server_options(p_run)
    _add_budget_options(p_run)
    _add_api_option(p_run)

    p_prompts = sub.add_parser("prompts", help="manage stored prompts")
    psub = p_prompts.add_subparsers(dest="action", required=True, metavar="ACTION")
    p_add = psub.add_parser("add", help="store a prompt (a new version if the name exists)")
    p_add.add_argument("name", help="the prompt's name")
    p_add.add_argument("template", nargs="?", help="template text (or --file, or '-' for stdin)")
    p_add.add_argument(
        "--file", "-f", type=_readable_file, help="read the template from a file (default: none)"
    )
    # Each setting left out is kept from the latest version; '' (or none) drops it.
    kept = "(default: kept from the latest version; '' or none drops it)"
    p_add.add_argument(
        "--system",
        type=_cleared(str),
        default=KEEP,
        help=f"system prompt, may use {{{{KEY}}}} placeholders {kept}",
    )
    p_add.add_argument(
        "--model", type=_cleared(str), default=KEEP, help=f"model id to run it with {kept}"
    )
    p_add.add_argument(
        "--temperature",
        type=_cleared(_prompt_setting("temperature")),
        default=KEEP,
        help=f"sampling temperature, 0 to 2 {kept}",
    )
    p_add.add_argument(
        "--max-tokens",
        type=_cleared(_prompt_setting("max_tokens")),
        default=KEEP,
        metavar="N",
        help=f"answer tokens at most, -1 for no limit {kept}",
    )
    p_add.add_argument(
        "--description",
        type=_cleared(str),
        default=KEEP,
        help=f"one line saying what it is for {kept}",
    )
    p_add.add_argument(
        "--schema",
        metavar="FILE_OR_JSON",
        type=_cleared(str),
        default=KEEP,
        help=f"JSON Schema its answers must match, a .json file or inline JSON {kept}",
    )
    p_list = psub.add_parser("list", help="list stored prompts (latest versions)")
    _add_json_option(p_list)
    p_show = psub.add_parser("show", help="show one prompt")
    p_show.add_argument("name", help="the prompt's name")
    p_show.add_argument("--version", type=_version, help="which version (default: latest)")
    _add_json_option(p_show)
    p_versions = psub.add_parser("versions", help="list the versions of a prompt")
    p_versions.add_argument("name", help="the prompt's name")
    _add_json_option(p_versions)
    p_rm = psub.add_parser("rm", help="delete a prompt (all versions; its runs stay recorded)")
    p_rm.add_argument("name", help="the prompt's name")
    p_export = psub.add_parser("export", help="write every prompt to FOLDER as TOML files")
    p_export.add_argument("folder", type=Path, help="where to write the files")
    p_export.add_argument(
        "--force", action="store_true", help="overwrite files that are not this prompt's file"
    )
    p_import = psub.add_parser("import", help="read every FOLDER/*.toml (all or nothing)")
    p_import.add_argument("folder", type=Path, help="the folder of .toml prompt files")
    p_diff = psub.add_parser(
        "diff",
        help="what changed between two versions of a prompt (a unified diff)",
        description="Compare version A of a stored prompt with version B: the template, the "
        "system prompt, the model and every setting. Coloured on a terminal, plain when piped.",
    )
    p_diff.add_argument("name", help="the prompt's name")
    p_diff.add_argument("a", metavar="A", type=_version, help="the version to compare from")
    p_diff.add_argument(
        "b",
        metavar="B",
        type=_version,
        nargs="?",
        help="the version to compare to (default: the latest)",
    )

    p_batch = sub.add_parser(
        "batch",
        help="run a stored prompt over every row of a CSV or JSON-lines file",
        description="Run stored prompt PROMPT once per row of FILE (.csv with a header, or "
        ".jsonl); rows are the variables. Failed rows are recorded and the batch goes on.",
    )
    p_batch.add_argument("prompt", metavar="PROMPT", help="the stored prompt's name")
    p_batch.add_argument(
        "file", type=_readable_file, metavar="FILE", help="rows of variables: .csv or .jsonl"
    )
    p_batch.add_argument(
        "--concurrency",
        "-c",
        type=_whole_number(1, "rows at once"),
        default=None,
        metavar="N",
        help="rows streaming at once in all (default: as many on each server as it has "
        "prediction slots, 3 where it reports none)",
    )
    p_batch.add_argument(
        "--out",
        "-o",
        type=_writable_file,
        help="write rows + results, .csv or .jsonl (default: none)",
    )
    p_batch.add_argument(
        "--resume",
        metavar="BATCH_ID",
        help="run only the rows of this batch that did not succeed (default: a new batch)",
    )
    p_batch.add_argument(
        "--model", "-m", help="model id (default: the prompt's, else the server's)"
    )
    p_batch.add_argument(
        "--schema",
        metavar="FILE_OR_JSON",
        help="answer as JSON matching this JSON Schema (a .json file or inline JSON); --out "
        "gets a parsed.KEY column per field (default: the prompt's, else none)",
    )
    p_batch.add_argument(
        "--max-tokens",
        type=_prompt_setting("max_tokens"),
        metavar="N",
        help="answer tokens at most, -1 for no limit (default: the prompt's)",
    )
    p_batch.add_argument(
        "--base-url",
        action="append",
        type=_base_url,
        default=None,
        help="server address; repeat to spread rows over several servers "
        "(default: $LMSTREAM_BASE_URL or http://localhost:1234/v1)",
    )
    _add_budget_options(p_batch)
    _add_api_option(p_batch)

    p_chat = sub.add_parser(
        "chat",
        help="conversations: list, show, reset or fork one (lmstream run --chat NAME)",
        description="The conversations `lmstream run --chat NAME` keeps.",
    )
    csub = p_chat.add_subparsers(dest="action", required=True, metavar="ACTION")
    c_list = csub.add_parser("list", help="every conversation, with its number of turns")
    _add_json_option(c_list)
    c_show = csub.add_parser("show", help="the turns of one conversation")
    c_show.add_argument("names", nargs=1, metavar="NAME", help="the conversation")
    _add_json_option(c_show)
    c_reset = csub.add_parser("reset", help="start a conversation again (its runs stay)")
    c_reset.add_argument("names", nargs=1, metavar="NAME", help="the conversation")
    c_fork = csub.add_parser("fork", help="a new conversation with one's turns so far")
    c_fork.add_argument(
        "names", nargs=2, metavar="NAME", help="the conversation, then the new name"
    )

    p_history = sub.add_parser("history", help="recorded runs, newest first")
    p_history.add_argument("--prompt", help="only runs of this stored prompt (default: all)")
    p_history.add_argument(
        "--status",
        type=_status,
        help=f"only runs with this status: {', '.join(RUN_STATUSES)} (default: all)",
    )
    p_history.add_argument("--model", help="only runs of this model (default: all)")
    p_history.add_argument(
        "--batch", metavar="BATCH_ID", help="only the runs of this batch (default: all)"
    )
    p_history.add_argument(
        "--limit", type=_whole_number(0, "runs"), default=20, help="newest runs shown at most"
    )
    p_history.add_argument(
        "--run",
        type=_whole_number(1, "a run id"),
        metavar="ID",
        help="show one run in full: variables, messages, timings, text (default: the list)",
    )
    _add_json_option(p_history)

    p_stats = sub.add_parser("stats", help="success rate, failures and timings of runs")
    p_stats.add_argument("--prompt", help="only runs of this stored prompt (default: all)")
    p_stats.add_argument("--model", help="only runs of this model (default: all)")
    p_stats.add_argument(
        "--by",
        choices=STATS_BY,
        default="prompt",
        help="one line per prompt and model, or per prompt version and model (default: prompt)",
    )
    p_stats.add_argument(
        "--batch",
        metavar="ID",
        help="only the runs of this batch or comparison (default: all)",
    )
    _add_json_option(p_stats)

    p_models = sub.add_parser("models", help="list the models the server offers")
    _add_server_options(p_models)

    p_sim = sub.add_parser(
        "sim",
        help="run the LM-Studio-compatible simulator in the foreground",
        description="Serve an LM-Studio-compatible API with simulated timing and faults.",
    )
    simulator.add_cli_arguments(p_sim)

    p_demo = sub.add_parser(
        "demo",
        help="start the simulator, stream a templated prompt, print the stats, stop",
        description="The main job end to end, on the embedded simulator (no LM Studio needed).",
    )
    p_demo.add_argument(
        "--profile",
        default="laptop-gpu",
        choices=sorted(simulator.PROFILES),
        help="simulated hardware speed",
    )
    p_demo.add_argument(
        "--time-scale",
        type=_not_negative,
        default=1.0,
        metavar="FACTOR",
        help="multiply every simulated duration (0.1 runs ten times faster)",
    )
    _add_bench_parser(sub)
    _add_serve_parser(sub)
    _add_compare_parser(sub)
    return parser


def _add_bench_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark blocking requests against streams by prompt size and concurrency",
        description="Run the lmstream_nb.bench workload (embedded simulator unless --base-url) "
        "and print the success table.",
    )
    p.add_argument(
        "--base-url",
        type=_base_url,
        help="a real server (default: $LMSTREAM_BASE_URL, else the embedded simulator)",
    )
    p.add_argument(
        "--scale",
        type=_positive_number,
        default=None,
        help="the fastest simulator time scale (default 0.0125; a cell runs slower where its "
        "closest verdict would be under 2 s of real time from its boundary; ignored with a "
        "real server)",
    )
    p.add_argument(
        "--concurrency",
        type=_whole_number(1, "requests at once"),
        nargs="+",
        default=[1, 3, 8],
        metavar="N",
        help="requests at once, one cell per value",
    )
    p.add_argument(
        "--timeouts",
        type=_positive_number,
        nargs="+",
        default=[30, 120, 300],
        metavar="S",
        help="total timeouts of the blocking mode, in seconds",
    )
    p.add_argument(
        "--modes",
        nargs="+",
        default=list(MODES),
        choices=MODES,
        help="request modes to compare: blocking, a stream with progress (LM Studio 0.4's "
        "native chat), a stream without (the OpenAI-compatible endpoint)",
    )
    p.add_argument(
        "--queues",
        type=_whole_number(1, "prediction slots"),
        nargs="+",
        default=list(DEFAULT_QUEUES),
        metavar="SLOTS",
        help="the simulated server's prediction slots per model, one pass each (default: 4, "
        "LM Studio 0.4's default, and 1, one at a time as MLX models and LM Studio 0.3)",
    )
    p.add_argument("--quick", action="store_true", help="two prompt sizes instead of five")
    p.add_argument(
        "--faults",
        type=_rate,
        default=0.0,
        metavar="RATE",
        help="rate of rows with an injected transient fault, 0 to 1 (simulator only)",
    )
    p.add_argument(
        "--fault-kinds",
        nargs="+",
        default=None,
        choices=FAULT_KINDS,
        metavar="KIND",
        help=f"which faults to inject: {', '.join(FAULT_KINDS)} (default: all)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated text and faults")
    p.add_argument(
        "--csv", type=_writable_file, help="write the table as CSV to this file (default: none)"
    )
    p.add_argument(
        "--json",
        type=_writable_file,
        help="write the table and every run as JSON to this file (default: none)",
    )
    p.add_argument(
        "--plot-dir",
        type=Path,
        help="write success.png, ttfv.png and first-visible.png here (default: none)",
    )
    p.add_argument(
        "--db",
        type=Path,
        help="record the benchmark's prompts and runs in this database (default: a temporary "
        "one, deleted afterwards, so your history stays yours)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


async def _cmd_bench(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    import os
    import tempfile

    from . import bench
    from ._config import BASE_URL_ENV
    from ._store import PromptStore

    base_url = args.base_url or os.environ.get(BASE_URL_ENV) or None
    workload = bench.quick_workload() if args.quick else bench.default_workload()
    with contextlib.ExitStack() as stack:
        if args.db is not None:
            db = args.db
            err.write(f"lmstream bench: recording the benchmark's runs in {db}.\n")
        else:
            db = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "bench.db"
            err.write(
                "lmstream bench: recording the benchmark's runs in a temporary database "
                "(your history and prompts are left alone; --db FILE keeps them).\n"
            )
        err.flush()
        store = stack.enter_context(PromptStore(db))
        try:
            report = await bench.arun_benchmark(
                workload,
                base_url=base_url,
                scale=None if base_url else args.scale,
                modes=args.modes,
                queues=args.queues,
                concurrency=args.concurrency,
                timeouts=args.timeouts,
                faults=args.faults,
                seed=args.seed,
                progress=not args.no_progress,
                fault_kinds=args.fault_kinds or bench.FAULT_KINDS,
                store=store,
            )
        except ValueError as exc:
            err.write(f"lmstream: {exc}\n")
            return EXIT_USAGE
    out.write(report.table() + "\n")
    if args.csv is not None:
        report.to_csv(args.csv)
    if args.json is not None:
        report.to_json(args.json)
    if args.plot_dir is not None:
        args.plot_dir.mkdir(parents=True, exist_ok=True)
        report.plot_success(args.plot_dir / "success.png")
        report.plot_ttfv(args.plot_dir / "ttfv.png")
        report.plot_first_visible(args.plot_dir / "first-visible.png")
    return EXIT_OK


def _add_server_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--base-url",
        type=_base_url,
        help="server address (default: $LMSTREAM_BASE_URL or http://localhost:1234/v1)",
    )


def _add_json_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _add_budget_options(p: argparse.ArgumentParser) -> None:
    defaults = Budgets()
    p.add_argument(
        "--first-token-timeout",
        type=seconds_argument,
        default=defaults.first_token,
        metavar="S",
        help=f"seconds to wait for the first token, or none (default {defaults.first_token:g})",
    )
    p.add_argument(
        "--idle-timeout",
        type=seconds_argument,
        default=defaults.idle,
        metavar="S",
        help=f"seconds between chunks once text flows, or none (default {defaults.idle:g})",
    )
    p.add_argument(
        "--connect-timeout",
        type=seconds_argument,
        default=defaults.connect,
        metavar="S",
        help=f"seconds to connect, or none (default {defaults.connect:g})",
    )


def _add_api_option(p: argparse.ArgumentParser) -> None:
    from ._routes import API_HELP, APIS

    p.add_argument("--api", choices=APIS, default="auto", help=API_HELP)


def _budgets(args: argparse.Namespace) -> Budgets:
    return Budgets(
        connect=args.connect_timeout, first_token=args.first_token_timeout, idle=args.idle_timeout
    )


# ---------------------------------------------------------------------------------------------
# Commands


async def _cmd_run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from ._client import LMStudioClient
    from ._conversation import runner
    from ._run import default_store
    from ._structured import read_schema_arg
    from ._terminal import TerminalSink, dim, format_stats

    values = dict(args.var)
    if (args.prompt is None) == (args.template is None):
        err.write("lmstream: give either TEMPLATE or --prompt NAME: run one or the other.\n")
        return EXIT_USAGE
    store = default_store()
    if args.prompt is not None:
        prompt: Prompt = store.get(args.prompt, args.version)
    else:
        text = sys.stdin.read() if args.template == "-" else args.template
        prompt = Prompt(template=text, system=args.system)
    try:
        prompt.render(values)  # refuse missing or unknown variables before anything is sent
        schema = read_schema_arg(args.schema) if args.schema is not None else None
    except (TemplateError, InvalidSchema) as exc:
        err.write(f"lmstream: {render(exc, 'cli')}\n")
        return EXIT_USAGE
    sink = TerminalSink(out, err, as_json=args.json)
    go = runner(store, args.chat, include_failed=args.include_failed, drop_oldest=args.drop_oldest)
    async with LMStudioClient(args.base_url, budgets=_budgets(args), api=args.api) as client:
        try:
            result = await go(
                prompt,
                values,
                model=args.model,
                client=client,
                on_event=sink.handle,
                temperature=args.temperature,
                max_tokens=args.max_tokens,
                budgets=_budgets(args),
                raise_errors=False,
                interface="cli",
                schema=schema,
            )
        finally:
            sink.close()
    if not result.ok:
        if args.json:
            sink._json(
                {
                    "event": "error",
                    "status": result.status,
                    "message": result.error,
                    "run_id": result.run_id,
                }
            )
        sink.end_text()
        err.write(f"lmstream: {result.error}\n")
        return EXIT_FAILED
    if args.json:
        recorded: dict[str, Any] = {
            "event": "recorded",
            "status": result.status,
            "run_id": result.run_id,
        }
        if result.parsed is not None:
            recorded["parsed"] = result.parsed  # the validated value of a structured answer
        sink._json(recorded)
    else:
        sink.end_text()
        err.write(
            dim(err, f"{format_stats(result.stats, sink.finished)}, run #{result.run_id}") + "\n"
        )
    return EXIT_OK


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of variables from a CSV file with a header or a JSON-lines file."""
    import csv

    if path.suffix.lower() == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as exc:
                raise LMStreamError(
                    f"Line {number} of {path} is not JSON ({exc}): write one JSON object per line."
                ) from None
            if not isinstance(value, dict):
                raise LMStreamError(
                    f"Line {number} of {path} is not a JSON object: write one "
                    "object of variables per line."
                )
            rows.append(value)
        return rows
    with path.open(newline="", encoding="utf-8") as handle:
        return [dict(row) for row in csv.DictReader(handle)]


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    import csv

    if path.suffix.lower() == ".jsonl":
        path.write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
        )
        return
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        # A parsed answer's field may be a list or an object: a CSV cell holds it as JSON.
        writer.writerows(
            {
                k: json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else v
                for k, v in row.items()
            }
            for row in rows
        )


def _with_parsed(
    lines: list[dict[str, Any]], columns: dict[str, list[Any]]
) -> list[dict[str, Any]]:
    """Rows to write, each with the ``parsed.KEY`` fields of its structured answer (if any)."""
    return [
        {**line, **{key: values[i] for key, values in columns.items()}}
        for i, line in enumerate(lines)
    ]


async def _cmd_batch(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    import asyncio

    from ._batch import BatchResult, arun_many, new_batch_id
    from ._structured import read_schema_arg

    try:
        schema = read_schema_arg(args.schema) if args.schema is not None else None
    except InvalidSchema as exc:
        err.write(f"lmstream: {render(exc, 'cli')}\n")
        return EXIT_USAGE
    rows = _read_rows(args.file)
    batch_id = args.resume or new_batch_id()
    urls = args.base_url or None
    try:
        batch: BatchResult = await arun_many(
            args.prompt,
            rows,
            concurrency=args.concurrency,
            model=args.model,
            base_url=urls,
            budgets=_budgets(args),
            resume=args.resume,
            batch_id=batch_id,
            max_tokens=args.max_tokens,
            interface="cli",
            schema=schema,
            api=args.api,
        )
    except (KeyboardInterrupt, asyncio.CancelledError):
        err.write(
            f"\nlmstream: batch {batch_id} stopped; finished rows are kept: resume with "
            f"`lmstream batch {args.prompt} {args.file} --resume {batch_id}`.\n"
        )
        return EXIT_INTERRUPTED
    if args.out is not None:
        merged = [{**row, **result} for row, result in zip(rows, batch.as_dicts(), strict=True)]
        _write_rows(args.out, _with_parsed(merged, batch.parsed_columns()))
    err.write(batch_summary(batch, f"lmstream batch {args.prompt} {args.file}"))
    return EXIT_OK if not batch.failed else EXIT_FAILED


def batch_summary(batch: Any, command: str) -> str:
    """The lines a finished batch ends with: counts, why rows failed (each error sentence
    once, with how many rows it ended), and ``--resume`` only when a rerun could help."""
    lines = [f"batch {batch.batch_id}: {batch.succeeded} ok, {batch.failed} failed"]
    for sentence, count, alike in batch.failures():
        rows = f"{count} row{'s' if count != 1 else ''}"
        lines.append(f"  {rows}: {sentence}" if alike else f"  {rows}, the first: {sentence}")
    if batch.failed:
        where = f"`lmstream history --batch {batch.batch_id}`"
        if batch.rerun_could_help:
            lines.append(
                f"Some failures may pass on a second try: rerun only the failed rows with "
                f"`{command} --resume {batch.batch_id}` (every row is in {where})."
            )
        else:
            lines.append(
                f"A rerun would fail the same way: fix what the errors say, then run the batch "
                f"again (every row is in {where})."
            )
    return "\n".join(lines) + "\n"


async def _cmd_models(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from ._client import LMStudioClient, describe_model

    async with LMStudioClient(args.base_url) as client:
        models = await client.list_model_kinds()
    for model, kind in models:
        out.write(describe_model(model, kind) + "\n")
    return EXIT_OK


DEMO_PROMPT = Prompt(
    name="release-notes-summary",
    system="You are a concise assistant for {{team}}.",
    template="Summarise these release notes for {{audience}} in {{n}} short bullet points:"
    "\n\n{{notes}}",
    max_tokens=160,
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


def _demo_prompt(store: PromptStore) -> Prompt:
    """The demo's stored prompt: saved once, and again only if this version of it changed."""
    name = DEMO_PROMPT.name or "demo"
    with contextlib.suppress(PromptNotFound):
        latest = store.get(name)
        if (latest.template, latest.system, latest.max_tokens) == (
            DEMO_PROMPT.template,
            DEMO_PROMPT.system,
            DEMO_PROMPT.max_tokens,
        ):
            return latest
    return store.save_prompt(DEMO_PROMPT)


async def _cmd_demo(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from ._client import LMStudioClient
    from ._run import arun, default_store
    from ._terminal import TerminalSink, format_stats

    store = default_store()
    with simulator.serve(profile=args.profile, time_scale=args.time_scale) as sim:
        err.write(f"Simulator (profile {args.profile}) listening on {sim.base_url}\n")
        prompt = _demo_prompt(store)
        err.write(f"Stored prompt {prompt.label} in {store.path}\n")
        err.write(f"System:    {prompt.system}\nTemplate:  {prompt.template.splitlines()[0]}…\n")
        shown = {k: (v if len(v) < 40 else v[:37] + "...") for k, v in DEMO_VARIABLES.items()}
        err.write(f"Variables: {json.dumps(shown)}\n")
        err.write(
            "The answer below is simulated filler text, streamed at the profile's speed: the "
            "simulator does not read the prompt (a model in LM Studio would answer it).\n\n"
        )
        err.flush()
        sink = TerminalSink(out, err, as_json=False)
        async with LMStudioClient(sim.base_url) as client:
            try:
                result = await arun(
                    prompt,
                    DEMO_VARIABLES,
                    store=store,
                    client=client,
                    on_event=sink.handle,
                    raise_errors=False,
                )
            finally:
                sink.close()
        sink.end_text()
        if not result.ok:
            err.write(f"lmstream: {result.error}\n")
            return EXIT_FAILED
        err.write(f"\nStats: {format_stats(result.stats, sink.finished)}\n")
        err.write(f"Recorded as run #{result.run_id}: see `lmstream history`.\n")
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


def _add_serve_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="serve stored prompts over HTTP, streaming runs as Server-Sent Events",
        description="Run stored prompts from a browser or any HTTP client (JSON API, SSE "
        "streams that resume with Last-Event-ID, a page at /). Binds 127.0.0.1 unless told.",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (any non-loopback address needs a token)",
    )
    p.add_argument("--port", type=_port, default=8765, help="port (default 8765; 0 picks one)")
    _add_server_options(p)
    p.add_argument(
        "--token", help="require this token on every request (default: $LMSTREAM_SERVER_TOKEN)"
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="allow browser calls from this origin (repeatable; default: none)",
    )
    p.add_argument(
        "--grace",
        type=_not_negative,
        default=60.0,
        metavar="S",
        help="seconds a run with no listener goes on before it is cancelled",
    )
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also accept requests whose Host header names this (a DNS name the server is "
        "reached by; repeatable; default: the listening address and loopback names)",
    )
    p.add_argument(
        "--request-timeout",
        type=_limit_seconds,
        default=5.0,
        metavar="S",
        help="seconds a client has to send a whole request before it is answered 408 and "
        "closed (default 5)",
    )
    p.add_argument(
        "--max-connections",
        type=_whole_number(1, "connections"),
        default=1000,
        metavar="N",
        help="open connections at most; beyond it the longest idle one is closed (default 1000)",
    )
    p.add_argument(
        "--db", type=Path, help="the prompt and run database (default: $LMSTREAM_HOME/lmstream.db)"
    )


def _cmd_serve(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    import os

    from . import serve
    from ._config import redact_url, resolve_base_url
    from ._run import default_store
    from ._store import PromptStore

    token = args.token or os.environ.get(serve.TOKEN_ENV) or None
    try:
        serve.check_host(args.host, token)
    except ValueError as exc:
        err.write(f"lmstream serve: {exc}\n")
        return EXIT_USAGE
    store = PromptStore(args.db) if args.db is not None else default_store()

    def ready(url: str) -> None:
        where = url if not token else url + "/?token=..."
        err.write(
            f"lmstream serve: listening on {where} (models at "
            f"{redact_url(resolve_base_url(args.base_url))}); press Ctrl-C to stop.\n"
        )
        err.flush()

    try:
        serve.run(
            host=args.host,
            port=args.port,
            on_ready=ready,
            store=store,
            base_url=args.base_url,
            token=token,
            cors_origins=args.cors_origin,
            grace=args.grace,
            allowed_hosts=args.allow_host,
            request_timeout=args.request_timeout,
            max_connections=args.max_connections,
        )
    except OSError as exc:
        err.write(f"lmstream serve: {exc}: pick another --port.\n")
        return EXIT_FAILED
    return EXIT_OK


# -- prompts, history, stats ------------------------------------------------------------------


def _cmd_prompts(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from ._run import default_store
    from ._terminal import table, when

    store = default_store()
    action = args.action
    if action == "add":
        if args.file is not None:
            template = args.file.read_text(encoding="utf-8")
        elif args.template == "-":
            template = sys.stdin.read()
        elif args.template is not None:
            template = args.template
        else:
            err.write("lmstream: give the template as an argument, with --file, or '-'.\n")
            return EXIT_USAGE
        try:
            schema: object = args.schema
            if isinstance(schema, str):
                from ._structured import read_schema_arg

                schema = read_schema_arg(schema)
            saved = store.add(
                args.name,
                template,
                system=args.system,
                model=args.model,
                temperature=args.temperature,
                max_tokens=args.max_tokens,
                description=args.description,
                schema=schema,
            )
        except (ValueError, TemplateError) as exc:
            err.write(f"lmstream: {render(exc, 'cli')}\n")
            return EXIT_USAGE
        out.write(_saved_lines(saved))
    elif action == "list":
        prompts = store.list()
        if args.json:
            out.write(json.dumps([p.as_dict() for p in prompts], ensure_ascii=False) + "\n")
        else:
            out.write(
                table(
                    [
                        (
                            p.name,
                            p.version,
                            ", ".join(p.variables),
                            p.model,
                            " ".join((p.description or p.template)[:50].split()),
                        )
                        for p in prompts
                    ],
                    ["name", "version", "variables", "model", "description"],
                )
            )
    elif action == "show":
        p = store.get(args.name, args.version)
        if args.json:
            out.write(json.dumps(p.as_dict(), ensure_ascii=False) + "\n")
        else:
            out.write(f"{p.label}  saved {when(p.created_at)}\n")
            for key in ("description", "model", "temperature", "max_tokens"):
                value = getattr(p, key)
                if value is not None:
                    out.write(f"{key}: {value}\n")
            out.write(f"variables: {', '.join(p.variables) or 'none'}\n")
            if p.system:
                out.write(f"--- system\n{p.system}\n")
            out.write(f"--- template\n{p.template}\n")
            if p.schema is not None:
                from ._structured import readable_schema

                out.write(f"--- schema\n{readable_schema(p.schema)}\n")
    elif action == "versions":
        versions = store.versions(args.name)
        if args.json:
            out.write(json.dumps([p.as_dict() for p in versions], ensure_ascii=False) + "\n")
        else:
            out.write(
                table(
                    [
                        (
                            p.version,
                            when(p.created_at),
                            ", ".join(p.variables),
                            p.model,
                            " ".join(p.template[:50].split()),
                        )
                        for p in versions
                    ],
                    ["version", "saved", "variables", "model", "template"],
                )
            )
    elif action == "rm":
        count = store.delete(args.name)
        out.write(f"Deleted {args.name!r} ({count} version{'s' if count != 1 else ''}).\n")
    elif action == "export":
        files = store.export(args.folder, force=args.force)
        out.write(f"Wrote {len(files)} prompt file(s) to {args.folder}.\n")
    elif action == "import":
        imported = store.import_versions(args.folder)
        added = [s.prompt.label for s in imported if s.created]
        same = [s.prompt.label for s in imported if not s.created]
        out.write(f"Imported {len(added)} new version(s): {', '.join(added) or 'none'}.\n")
        if same:
            out.write(f"Unchanged (no new version): {', '.join(same)}.\n")
    elif action == "diff":
        out.write(store.diff(args.name, args.a, args.b).unified(color=out.isatty()))
    return EXIT_OK


def _saved_lines(saved: SavedVersion) -> str:
    """What ``prompts add`` did: the version, then one line per setting kept or dropped."""
    prompt, base = saved.prompt, saved.base
    if not saved.created:
        return (
            f"Unchanged: {prompt.label} already holds this template and these settings, so no "
            "version was added.\n"
        )
    lines = [f"Saved {prompt.label} (variables: {', '.join(prompt.variables) or 'none'}).\n"]
    if base is not None:
        for key in saved.carried:
            flag = "--" + key.replace("_", "-")
            drop = f"{flag} none" if key in ("temperature", "max_tokens") else f"{flag} ''"
            lines.append(
                f"Kept from {base.label}: {describe_setting(key, getattr(prompt, key))} "
                f"({drop} drops it).\n"
            )
        for key in saved.dropped:
            lines.append(f"Dropped: {describe_setting(key, getattr(base, key))} of {base.label}.\n")
    return "".join(lines)


def _cmd_chat(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from ._conversation import chat_command
    from ._run import default_store
    from ._terminal import table

    try:
        done = chat_command(
            default_store(),
            [args.action, *getattr(args, "names", [])],
            whole=getattr(args, "json", False),
        )
    except ValueError as exc:
        err.write(f"lmstream: use lmstream chat {exc}.\n")
        return EXIT_USAGE
    if isinstance(done, str):
        out.write(done + "\n")
        return EXIT_OK
    headers, rows = done
    if args.json:
        out.write(
            json.dumps([dict(zip(headers, row, strict=True)) for row in rows], ensure_ascii=False)
            + "\n"
        )
    else:
        out.write(table([tuple(row) for row in rows], headers))
    return EXIT_OK


def _cmd_history(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from dataclasses import asdict

    from ._run import default_store
    from ._terminal import secs, table, when

    store = default_store()
    if args.run is not None:
        rec = store.get_run(args.run)
        if args.json:
            out.write(json.dumps(asdict(rec), ensure_ascii=False) + "\n")
        else:
            out.write(run_record_text(rec))
        return EXIT_OK
    runs = store.history(
        prompt=args.prompt, status=args.status, limit=args.limit, model=args.model, batch=args.batch
    )
    if args.json:
        out.write(json.dumps(runs.as_dicts(), ensure_ascii=False) + "\n")
        return EXIT_OK
    out.write(
        table(
            [
                (
                    r.id,
                    when(r.started_at),
                    r.status,
                    r.label,
                    r.model,
                    secs(r.ttft_s),
                    secs(r.duration_s),
                    r.completion_tokens,
                    _clip(r.error or r.preview, 40 if r.error else 30),
                )
                for r in runs
            ],
            [
                "id",
                "started",
                "status",
                "prompt",
                "model",
                "ttft s",
                "total s",
                "tokens",
                "error / text",
            ],
        )
    )
    return EXIT_OK


def _clip(text: str | None, width: int) -> str | None:
    if not text:
        return None
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


#: How ``history --run`` names the endpoint a run's request went to.
_ENDPOINTS = {
    "native": "native (LM Studio's /api/v1/chat)",
    "openai": "openai (/chat/completions)",
}
#: Facts of a run record shown only where known: where the request went and what progress
#: told (older runs, and servers that report no progress, have none of them).
_SHOWN_IF_KNOWN = frozenset(
    {"endpoint", "first sign of life", "model load", "prompt processing", "prompt tokens/s"}
)


def _seconds(value: float | None) -> str | None:
    from ._terminal import secs

    return f"{secs(value)} s" if value is not None else None


def _per_second(value: float | None) -> str | None:
    return f"{value:.1f}" if value is not None else None


def run_record_text(rec: Any) -> str:
    """One recorded run in full, for a person: what was sent, what came back, how long it
    took and how it ended."""
    from ._terminal import when

    label = rec.label
    lines = [f"run #{rec.id}  {rec.status}  {label}  {rec.model or '-'}  {when(rec.started_at)}"]
    if rec.error:
        lines.append(f"error: {rec.error}")
    facts = [
        ("server", rec.base_url),
        ("endpoint", _ENDPOINTS.get(rec.api, rec.api)),
        ("finish reason", rec.finish_reason),
        ("first sign of life", _seconds(rec.first_progress_s)),
        ("model load", _seconds(rec.load_s)),
        ("prompt processing", _seconds(rec.prompt_s)),
        ("prompt tokens/s", _per_second(rec.prompt_tokens_per_s)),
        ("first token", _seconds(rec.ttft_s)),
        ("total", _seconds(rec.duration_s)),
        ("prompt tokens", rec.prompt_tokens),
        ("answer tokens", rec.completion_tokens),
        ("tokens/s", _per_second(rec.tokens_per_s)),
        ("chunks", rec.chunks),
        (
            "batch",
            f"{rec.batch_id} row {rec.batch_row}" if rec.batch_id is not None else None,
        ),
    ]
    lines += [
        f"{key}: {'-' if value is None else value}"
        for key, value in facts
        if value is not None or key not in _SHOWN_IF_KNOWN
    ]
    lines.append("--- variables")
    lines += [f"{key} = {value}" for key, value in rec.variables.items()] or ["(none)"]
    if rec.context_messages:
        lines.append(
            f"--- {rec.context_messages} earlier messages (the conversation's turns before "
            "this one, stored with them)"
        )
    for message in rec.messages:
        lines.append(f"--- {message.get('role', 'message')}")
        lines.append(str(message.get("content", "")))
    if rec.schema is not None:
        from ._structured import readable_schema

        lines.append(f"--- schema\n{readable_schema(rec.schema)}")
    if rec.reasoning:
        lines.append(f"--- reasoning\n{rec.reasoning}")
    lines.append(f"--- answer\n{rec.text}")
    return "\n".join(lines) + "\n"


def _cmd_stats(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from dataclasses import asdict

    from ._run import default_store
    from ._terminal import STATS_HEADERS, stats_rows, table

    report = default_store().stats(
        prompt=args.prompt, model=args.model, by=args.by, batch=args.batch
    )
    if args.json:
        payload = {"overall": asdict(report.overall), "groups": report.as_dicts()}
        out.write(json.dumps(payload, ensure_ascii=False) + "\n")
        return EXIT_OK
    out.write(table(stats_rows(report), STATS_HEADERS))
    return EXIT_OK


def _add_compare_parser(sub: Any) -> None:
    p = sub.add_parser(
        "compare",
        help="run prompt versions side by side on models and rows, print the summary",
        description="Run every stored prompt VERSION (NAME@N, NAME for the latest) on every "
        "model and every row of variables; each cell is recorded under one comparison id. "
        "Prints one summary line per version and model.",
    )
    p.add_argument("versions", nargs="+", metavar="VERSION", help="stored versions, NAME@N")
    p.add_argument(
        "--models",
        metavar="A,B",
        help="models to run every version on, comma-separated (default: each version's own, "
        "else the server's)",
    )
    p.add_argument(
        "--var",
        "-v",
        action="append",
        type=_key_value,
        default=[],
        metavar="KEY=VALUE",
        help="value for a {{KEY}} placeholder in every row (repeatable; default: none)",
    )
    p.add_argument(
        "--rows",
        type=_readable_file,
        metavar="FILE",
        help="rows of variables, .csv with a header or .jsonl (default: one row of the --var "
        "values)",
    )
    p.add_argument(
        "--out",
        "-o",
        type=_writable_file,
        help="write one line per cell (its row's variables and result), .csv or .jsonl "
        "(default: none)",
    )
    p.add_argument(
        "--concurrency",
        "-c",
        type=_whole_number(1, "cells at once"),
        default=None,
        metavar="N",
        help="cells streaming at once in all (default: as many on each server as it has "
        "prediction slots, 3 where it reports none)",
    )
    p.add_argument(
        "--max-tokens",
        type=_prompt_setting("max_tokens"),
        metavar="N",
        help="answer tokens at most, -1 for no limit (default: each version's)",
    )
    p.add_argument(
        "--base-url",
        action="append",
        type=_base_url,
        default=None,
        help="server address; repeat to spread cells over several servers "
        "(default: $LMSTREAM_BASE_URL or http://localhost:1234/v1)",
    )
    _add_budget_options(p)
    _add_api_option(p)


async def _cmd_compare(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    import asyncio

    from ._batch import new_batch_id
    from ._compare import SUMMARY_HEADERS, Comparison, acompare, merge_rows, resolve_prompts
    from ._run import default_store
    from ._terminal import table

    store = default_store()
    versions = resolve_prompts(args.versions, store)
    rows = merge_rows(dict(args.var), _read_rows(args.rows) if args.rows else None)
    for prompt in versions:  # a missing value is refused before anything is sent
        for row in rows:
            prompt.render(row, allow_extra=True)
    comparison_id = new_batch_id()
    try:
        comparison: Comparison = await acompare(
            versions,
            args.models,
            rows,
            store=store,
            base_url=args.base_url or None,
            concurrency=args.concurrency,
            budgets=_budgets(args),
            comparison_id=comparison_id,
            max_tokens=args.max_tokens,
            interface="cli",
            api=args.api,
        )
    except (KeyboardInterrupt, asyncio.CancelledError):
        err.write(
            f"\nlmstream: comparison {comparison_id} stopped; the cells that ended are recorded "
            f"(`lmstream history --batch {comparison_id}`).\n"
        )
        return EXIT_INTERRUPTED
    if args.out is not None:
        from ._batch import parsed_columns

        lines = [{**comparison.rows[cell["row"]], **cell} for cell in comparison.as_dicts()]
        _write_rows(args.out, _with_parsed(lines, parsed_columns(comparison.results)))
    failed = len(comparison) - comparison.succeeded
    out.write(
        f"comparison {comparison.comparison_id}: {comparison.succeeded} of {len(comparison)} "
        f"cells ok{f', {failed} failed' if failed else ''}\n"
    )
    out.write(table(comparison.summary_rows(), SUMMARY_HEADERS))
    return EXIT_OK if not failed else EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    # httpcore imports trio, when it is installed, only to learn whether it runs under trio
    # (about 100 ms of start-up); every command here runs on asyncio, so none needs it.
    sys.modules.setdefault("trio", None)  # type: ignore[arg-type]
    args = build_parser().parse_args(argv)
    out, err = sys.stdout, sys.stderr
    import asyncio

    try:
        if args.command == "sim":
            return _cmd_sim(args, err)
        sync_commands: dict[str, Callable[[argparse.Namespace, TextIO, TextIO], int]] = {
            "prompts": _cmd_prompts,
            "history": _cmd_history,
            "stats": _cmd_stats,
            "chat": _cmd_chat,
            "serve": _cmd_serve,
        }
        if args.command in sync_commands:
            return sync_commands[args.command](args, out, err)
        commands = {
            "run": _cmd_run,
            "models": _cmd_models,
            "demo": _cmd_demo,
            "batch": _cmd_batch,
            "bench": _cmd_bench,
            "compare": _cmd_compare,
        }
        return asyncio.run(commands[args.command](args, out, err))
    except LMStreamError as exc:
        err.write(f"lmstream: {render(exc, 'cli')}\n")
        # A bad value in the command itself is a usage error; nothing was sent.
        return EXIT_USAGE if isinstance(exc, (TemplateError, InvalidSetting)) else EXIT_FAILED
    except KeyboardInterrupt:
        out.flush()
        err.write(
            "\nlmstream: stopped by Ctrl-C; the text received so far is above and "
            "recorded in the history.\n"
        )
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
