"""``%%lmstream`` and ``%lmstream``: the notebook's front door.

A blocking cell cannot await (IPython calls magics synchronously while the kernel's own loop is
running in the same thread), so it streams on the private loop thread (``_loop``) and waits;
the kernel's interrupt then arrives as KeyboardInterrupt in the waiting thread, which cancels
the stream there (closing the connection) and records the run as cancelled. A ``--background``
run is a task on the kernel's loop instead: the cell returns at once, and the task keeps the
cell as its parent, so its view and final output land in that cell and nowhere else.

The view is created and displayed in the cell before anything streams; the stream only updates
the widget it was handed. When the run ends the view's output is replaced by the final status
line and the answer is written as an ordinary output, so saved and headlessly executed notebooks
show both without a kernel. The cell has no value: the status line says what a repr would.
"""

from __future__ import annotations

import asyncio
import shlex
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class, no_var_expand
from IPython.core.magic_arguments import argument, magic_arguments
from IPython.display import display

from . import simulator
from ._config import Budgets, parse_seconds, redact_url, resolve_base_url, seconds_argument
from ._errors import LMStreamError, render
from ._loop import shared_loop
from ._outcome import ending
from ._prompt_fields import check_max_tokens, check_temperature
from ._routes import API_HELP, APIS
from ._template import Prompt, prompt_label
from ._terminal import STATS_HEADERS, TerminalSink, format_stats, stats_rows, table

if TYPE_CHECKING:
    from ._compare import Comparison
    from ._diff import PromptDiff
    from ._run import RunResult
    from ._store import PromptStore
    from ._view import NotebookSink

# The HTTP client, the database and the widgets are imported when a cell first needs them, so
# `%load_ext lmstream_nb` stays quick.

FORMATS = ("text", "markdown", "code", "json")
_CLOSE_WAIT_S = 10.0  # for the loop to record a cancelled run and close its view


class _SessionDefault:
    """The default of the budget options: "the session's setting" (``None`` is no limit)."""

    def __repr__(self) -> str:
        return "the session's"


SESSION = _SessionDefault()


@dataclass
class SessionConfig:
    """Defaults for this kernel session, changed with ``%lmstream config key=value``."""

    base_url: str | None = None
    model: str | None = None
    first_token_timeout: float | None = Budgets().first_token
    idle_timeout: float | None = Budgets().idle
    format: str = "text"
    sim: Any = field(default=None, repr=False)

    def __repr__(self) -> str:
        # The base URL may carry credentials: they are never shown.
        shown = None if self.base_url is None else redact_url(self.base_url)
        return (
            f"SessionConfig(base_url={shown!r}, model={self.model!r}, "
            f"first_token_timeout={self.first_token_timeout!r}, "
            f"idle_timeout={self.idle_timeout!r}, format={self.format!r})"
        )

    def _repr_html_(self) -> str:
        # A notebook shows text/plain in a <pre> that breaks lines inside words.
        from ._view import text_html

        return text_html(repr(self))

    def budgets(
        self,
        first: float | _SessionDefault | None = SESSION,
        idle: float | _SessionDefault | None = SESSION,
    ) -> Budgets:
        """The session's budgets, with those given on the magic's line instead (``None``
        there means no limit, so "not given" is the ``SESSION`` marker)."""
        return Budgets(
            first_token=self.first_token_timeout if isinstance(first, _SessionDefault) else first,
            idle=self.idle_timeout if isinstance(idle, _SessionDefault) else idle,
        )


def _parse_assignments(lines: str) -> dict[str, str]:
    """``name = value`` lines (blank lines and ``#`` comments ignored)."""
    values: dict[str, str] = {}
    for number, raw in enumerate(lines.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if not sep or not name.strip():
            raise UsageError(
                f"Line {number} of the cell is not 'name = value' ({raw.strip()!r}): with "
                "--prompt the cell body holds only variable assignments."
            )
        values[name.strip()] = value.strip()
    return values


def _key_values(items: list[str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"Expected name=value, got {item!r}: write --var name=value.")
        values[name.strip()] = value
    return values


class _CellView:
    """A run's live view in its cell, and what replaces it when the run ends.

    The view is a widget, which a notebook saved and opened without its kernel cannot show
    ("model not found"). So at the end its output is replaced (the display is updated) by the
    final status line, and the answer follows as an ordinary output: both need no kernel.
    """

    def __init__(self, sink: NotebookSink, handle: Any, fmt: str, label: str) -> None:
        self.sink = sink
        self.label = label  # the run's prompt, as its status line names it
        self.handle = handle
        self.fmt = fmt
        self.final: dict[str, Any] | None = None
        self.ok = False
        self.text: str | None = None
        self.parsed: Any = None  # the validated value of a structured answer
        self._closed = threading.Event()

    def close(self, outcome: RunResult | BaseException, *, background: bool) -> None:
        """Paint the ending (on the stream's loop, where its times are read). A blocking
        cell's error is printed by IPython right below, so only a background view repeats
        the sentence."""
        from ._run import RunResult

        end = ending(outcome)
        result = outcome if isinstance(outcome, RunResult) else None
        self.final = self.sink.close(
            state=end.state,
            stats=result.stats if result is not None else None,
            model=result.model if result is not None else None,
            run_id=end.run_id,
            message=end.message if background else None,
        )
        self.ok = end.ok
        self.text = result.text if result is not None else self.sink.text
        self.parsed = result.parsed if result is not None else None
        self._closed.set()

    def replace(self) -> None:
        """Swap the view for the status line, then write the answer (if any text came).

        After a Ctrl-C the cell's thread gets here while the loop still records the
        cancellation and closes the view: it waits for that (bounded)."""
        if not self._closed.wait(_CLOSE_WAIT_S):
            self.close(asyncio.CancelledError(), background=False)
        from ._view import final_bundle, parsed_bundle, status_bundle

        assert self.final is not None
        self.handle.update(status_bundle(self.final, self.sink.reasoning), raw=True)
        if self.ok and self.parsed is not None:
            display(parsed_bundle(self.parsed), raw=True)
        elif self.text:
            display(final_bundle(self.text, self.fmt if self.ok else "text"), raw=True)


class ModelList(list[str]):
    """What ``%lmstream models`` returns: the ids, shown one a line as ``lmstream models``
    shows them (embedding models marked)."""

    def __init__(self, kinds: list[tuple[str, str | None]]) -> None:
        super().__init__(model for model, _ in kinds)
        self._kinds = kinds

    def __repr__(self) -> str:
        from ._client import describe_model

        return "\n".join(describe_model(model, kind) for model, kind in self._kinds)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


class BackgroundRun:
    """A run streaming on the kernel's loop while other cells execute.

    Shown in a notebook, it says how it stands, and the display follows it to its end.
    """

    def __init__(self, task: asyncio.Task[RunResult | None], label: str) -> None:
        self.task = task
        self.label = label

    def done(self) -> bool:
        return self.task.done()

    def cancel(self) -> None:
        """Stop the stream (the connection is closed and the run recorded as cancelled)."""
        self.task.cancel()

    def result(self) -> RunResult | None:
        """The RunResult once finished (None if it failed or was cancelled)."""
        if not self.task.done():
            raise RuntimeError(
                f"The background run {self.label} is still streaming: wait for it or cancel it."
            )
        if self.task.cancelled():
            return None
        return self.task.result()

    def __repr__(self) -> str:
        task = self.task
        if not task.done():
            state = "running"
        elif task.cancelled():
            state = "cancelled"
        elif task.exception() is not None or task.result() is None:
            state = "failed"
        else:
            result = task.result()
            assert result is not None
            state = f"{ending(result).state}, run #{result.run_id}"
        return f"<BackgroundRun {self.label} {state}>"

    def _ipython_display_(self) -> None:
        shown = display({"text/plain": repr(self)}, raw=True, display_id=True)
        if not self.task.done() and shown is not None:
            self.task.add_done_callback(
                lambda _: shown.update({"text/plain": repr(self)}, raw=True)
            )


def _usage_first(doc: str) -> str:
    """A magic_arguments docstring without its leading ``::`` and the usage's indent."""
    if not doc.startswith("::"):
        return doc
    usage, _, rest = doc.removeprefix("::").lstrip("\n").partition("\n\n")
    lines = [line.removeprefix("  ") for line in usage.splitlines()]
    return "\n".join(lines) + "\n\n" + rest


@magics_class
class LMStreamMagics(Magics):
    """``%%lmstream`` runs the cell as a prompt; ``%lmstream`` manages prompts and settings."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.config_ = SessionConfig()
        self.background: list[BackgroundRun] = []

    # -- helpers -----------------------------------------------------------------------

    @property
    def store(self) -> PromptStore:
        from ._run import default_store

        return default_store()

    def _user_ns(self) -> dict[str, Any]:
        ns: dict[str, Any] = self.shell.user_ns if self.shell is not None else {}
        return ns

    def _in_kernel(self) -> bool:
        return self.shell is not None and hasattr(self.shell, "kernel")

    def _variables(self, prompt: Prompt, given: dict[str, str]) -> dict[str, Any]:
        """--var values first, then the notebook's variables; missing names before any request."""
        values: dict[str, Any] = dict(given)
        namespace = self._user_ns()
        for name in prompt.variables:
            if name not in values and name in namespace:
                values[name] = namespace[name]
        missing = [name for name in prompt.variables if name not in values]
        if missing:
            names = ", ".join(missing)
            example = " ".join(f"--var {n}=..." for n in missing)
            raise UsageError(
                f"The prompt needs a value for {names}: add {example} to the %%lmstream line "
                "or define it in the notebook, then run the cell again; nothing was sent."
            )
        return {name: values[name] for name in prompt.variables}

    # -- the magic ---------------------------------------------------------------------

    @magic_arguments()
    @argument("words", nargs="*", help="line magic only: a subcommand (see below)")
    @argument(
        "--prompt",
        "-p",
        metavar="NAME",
        help="run this stored prompt (default: the cell is the template)",
    )
    @argument("--version", type=int, help="stored prompt version (default: latest)")
    @argument(
        "--save",
        metavar="NAME",
        help="store the cell as a prompt, a new version if NAME exists (default: not stored)",
    )
    @argument(
        "--var",
        "-v",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="value for a {{NAME}} placeholder, repeatable (default: the notebook's variables)",
    )
    @argument("--model", "-m", help="model id (default: session, prompt, then server)")
    @argument(
        "--system", "-s", help="system prompt, may use {{NAME}} (default: the prompt's, else none)"
    )
    @argument(
        "--temperature",
        type=float,
        help="sampling temperature, 0 to 2 (default: the prompt's, else the server's)",
    )
    @argument(
        "--max-tokens",
        type=int,
        metavar="N",
        help="answer tokens at most, -1 for no limit (default: the prompt's, else the server's)",
    )
    @argument(
        "--schema",
        metavar="FILE_OR_JSON",
        help="answer as JSON matching this JSON Schema (a .json file or inline JSON), shown "
        "pretty-printed at the end (default: the prompt's, else none)",
    )
    @argument("--base-url", help="server address (default: session, LMSTREAM_BASE_URL, :1234)")
    @argument("--api", choices=APIS, default="auto", help=API_HELP)
    @argument(
        "--format",
        "-f",
        choices=FORMATS,
        help="how to show the finished answer (default: the session's, text)",
    )
    @argument(
        "--output",
        "-o",
        metavar="NAME",
        help="assign the RunResult to this variable (default: not assigned)",
    )
    @argument(
        "--background",
        "-b",
        action="store_true",
        help="return at once; the answer keeps streaming into this cell's output",
    )
    @argument(
        "--chat",
        metavar="NAME",
        help="send the cell as the next message of conversation NAME, with its earlier turns "
        "(default: a run on its own)",
    )
    @argument(
        "--drop-oldest",
        action="store_true",
        help="with --chat: leave out as many of the oldest turns as the context needs",
    )
    @argument(
        "--include-failed",
        action="store_true",
        help="with --chat: also send earlier turns that failed or were stopped",
    )
    @argument(
        "--first-token-timeout",
        type=seconds_argument,
        default=SESSION,
        metavar="S",
        help="seconds to wait for the first token, or none for no limit (default: the session's, "
        f"{Budgets().first_token:g})",
    )
    @argument(
        "--idle-timeout",
        type=seconds_argument,
        default=SESSION,
        metavar="S",
        help="seconds between chunks once text flows, or none for no limit (default: the "
        f"session's, {Budgets().idle:g})",
    )
    @argument(
        "--models",
        metavar="A,B",
        help="compare only: models to run every version on, comma-separated (default: each "
        "version's own, else the server's)",
    )
    @argument(
        "--row",
        action="append",
        default=[],
        metavar='"K=V K2=V2"',
        help="compare only: one row of variables, repeatable (default: one row of the --var "
        "values and the notebook's variables)",
    )
    @no_var_expand
    @line_cell_magic
    def lmstream(self, line: str, cell: str | None = None) -> Any:
        """Stream a prompt to LM Studio and watch the answer arrive.

        Cell magic: the cell body is the template; {{name}} placeholders are filled from --var
        options, then from the notebook's variables.

            %%lmstream --model qwen2.5-7b-instruct
            Summarise {{notes}} in three bullet points.

        Line magic subcommands:

            %lmstream run NAME k=v ...      run a stored prompt
            %lmstream prompts               list stored prompts
            %lmstream show NAME             show a stored prompt
            %lmstream diff NAME A [B]       what changed from version A to B
                                            (default: the latest)
            %lmstream history [NAME]        recent runs
            %lmstream stats [NAME]          success rate and timings
            %lmstream models                the server's models
            %lmstream config [key=value]    session defaults: base_url, model,
                                            first_token_timeout, idle_timeout, format
            %lmstream sim start|stop [profile] [time_scale=F]
                                            the embedded simulator, for notebooks that
                                            must run anywhere
            %lmstream ui                    a prompt runner: pick, fill, run, stop, history
            %lmstream chat list | show NAME | reset NAME | fork NAME NEW
                                            conversations (%%lmstream --chat NAME)
            %lmstream compare NAME@1 NAME@2 [--models A,B] [--var K=V] [--row "K=V ..."]
                                            every version x model x row side by side, live
        """
        # Shell-style splitting (shlex), so `key="several words"` is one value; IPython's own
        # splitter keeps quotes that do not start a word.
        try:
            words = shlex.split(line)
        except ValueError as exc:
            raise UsageError(f"Could not read the options ({exc}): check the quotes.") from None
        args = self.lmstream.parser.parse_args(words)
        try:
            if cell is None:
                return self._line(args, line)
            return self._cell(args, cell)
        except LMStreamError as exc:
            exc.interface = "magic"  # its sentence names the magic's options (render)
            raise

    # IPython's magic_arguments writes the usage as a reST literal block ("::" and an indent),
    # which `%lmstream?` shows as a stray "::": the help starts with the usage itself instead.
    lmstream.__doc__ = _usage_first(lmstream.__doc__ or "")

    def _cell(self, args: Any, cell: str) -> Any:
        if args.words:
            raise UsageError(
                f"Unexpected words on the %%lmstream line ({' '.join(args.words)}): put the "
                "prompt in the cell body and options (--model, --var …) on the first line."
            )
        given = _key_values(args.var)
        if args.prompt:
            prompt = self.store.get(args.prompt, args.version)
            given = {**_parse_assignments(cell), **given}
        else:
            if not cell.strip():
                raise UsageError("The cell is empty: write the prompt below the %%lmstream line.")
            prompt = Prompt(
                template=cell.rstrip("\n"),
                system=args.system,
                model=args.model,
                temperature=args.temperature,
                max_tokens=args.max_tokens,
                schema=_schema_option(args),
            )
        variables = self._variables(prompt, given)
        if args.save and args.prompt:
            prompt = self.store.save_prompt(prompt, args.save)
        elif args.save:
            # Options left off the line keep the saved prompt's settings (see _prompt_fields).
            line_settings = {
                "system": args.system,
                "model": args.model,
                "temperature": args.temperature,
                "max_tokens": args.max_tokens,
                "schema": prompt.schema,
            }
            kept: dict[str, Any] = {k: v for k, v in line_settings.items() if v is not None}
            prompt = self.store.add(args.save, prompt.template, **kept).prompt
            variables = self._variables(prompt, given)  # a kept system prompt may use more
        return self._start(prompt, variables, args)

    def _start(self, prompt: Prompt, variables: dict[str, Any], args: Any) -> Any:
        check_temperature(args.temperature)  # the ranges every front end keeps, checked
        check_max_tokens(args.max_tokens)  # before a view is shown
        if args.chat is not None:
            from ._conversation import check_name

            try:
                check_name(args.chat)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        schema = _schema_option(args)
        conf = self.config_
        fmt = args.format or conf.format
        budgets = conf.budgets(args.first_token_timeout, args.idle_timeout)
        base_url = args.base_url or conf.base_url
        kwargs: dict[str, Any] = {
            "model": args.model or conf.model,
            "temperature": args.temperature,
            "max_tokens": args.max_tokens,
            "budgets": budgets,
            "interface": "magic",
            "schema": schema,
            "api": args.api,
        }
        if not self._in_kernel():
            return self._run_terminal(prompt, variables, base_url, kwargs, args)
        from ._view import NotebookSink, StreamView

        view = StreamView()
        label = prompt_label(prompt.name, prompt.version, args.chat)
        sink = NotebookSink(view, prompt=label)
        shown = _CellView(sink, display(view, display_id=True), fmt, label)
        if args.background:
            return self._run_background(prompt, variables, base_url, kwargs, args, shown)
        return self._run_blocking(prompt, variables, base_url, kwargs, args, shown)

    def _runner(self, args: Any) -> Callable[..., Awaitable[RunResult]]:
        """What runs the cell: a run of its own, or with --chat the conversation's next turn."""
        from ._conversation import runner

        return runner(
            self.store,
            args.chat,
            include_failed=args.include_failed,
            drop_oldest=args.drop_oldest,
        )

    def _run_blocking(
        self,
        prompt: Prompt,
        variables: dict[str, Any],
        base_url: str | None,
        kwargs: dict[str, Any],
        args: Any,
        shown: _CellView,
    ) -> None:
        arun = self._runner(args)

        sink = shown.sink

        async def go() -> RunResult:
            try:
                result = await arun(
                    prompt,
                    variables,
                    base_url=base_url,
                    on_event=sink.handle,
                    on_stream=sink.attach,
                    **kwargs,
                )
            except BaseException as exc:
                shown.close(exc, background=False)
                raise
            shown.close(result, background=False)
            return result

        try:
            result = shared_loop().run(go())
        finally:  # shown as it ended (an error is then raised as it came)
            shown.replace()
        if args.output:
            self._user_ns()[args.output] = result
        # Nothing is returned: the status line above already says what a RunResult repr would.

    def _run_background(
        self,
        prompt: Prompt,
        variables: dict[str, Any],
        base_url: str | None,
        kwargs: dict[str, Any],
        args: Any,
        shown: _CellView,
    ) -> BackgroundRun:
        arun = self._runner(args)

        sink = shown.sink

        async def go() -> RunResult | None:
            try:
                result = await arun(
                    prompt,
                    variables,
                    base_url=base_url,
                    on_event=sink.handle,
                    on_stream=sink.attach,
                    **kwargs,
                )
            except BaseException as exc:
                shown.close(exc, background=True)
                shown.replace()
                if isinstance(exc, LMStreamError):
                    return None  # said in the view; the kernel has nowhere else to show it
                raise  # a cancellation goes on; a bug stays visible in .result()
            shown.close(result, background=True)
            shown.replace()
            if args.output:
                self._user_ns()[args.output] = result
            return result

        loop = asyncio.get_event_loop()
        handle = BackgroundRun(loop.create_task(go()), shown.label)
        self.background.append(handle)
        return handle

    def _run_terminal(
        self,
        prompt: Prompt,
        variables: dict[str, Any],
        base_url: str | None,
        kwargs: dict[str, Any],
        args: Any,
    ) -> Any:
        """Terminal IPython: plain text to stdout as it arrives, stats on one line after."""
        import sys

        arun = self._runner(args)

        sink = TerminalSink(sys.stdout, sys.stderr, as_json=False)

        async def go() -> RunResult:
            try:
                return await arun(
                    prompt, variables, base_url=base_url, on_event=sink.handle, **kwargs
                )
            finally:
                sink.close()

        try:
            result = shared_loop().run(go())
        finally:
            sink.end_text()
        print(
            format_stats(result.stats, sink.finished) + f", run #{result.run_id}", file=sys.stderr
        )
        if args.output:
            self._user_ns()[args.output] = result
        return None  # the line above says what its repr would

    # -- line subcommands --------------------------------------------------------------

    def _line(self, args: Any, line: str) -> Any:
        if not args.words:
            raise UsageError(
                "Give %lmstream a subcommand (run, prompts, show, diff, history, stats, "
                "models, config, sim, ui, chat, compare), or use"
                " %%lmstream as a cell magic; see %lmstream?."
            )
        command, *rest = args.words
        if command == "run":
            if not rest:
                raise UsageError("Name the stored prompt: %lmstream run NAME key=value ...")
            prompt = self.store.get(rest[0], args.version)
            given = {**_key_values(rest[1:]), **_key_values(args.var)}
            return self._start(prompt, self._variables(prompt, given), args)
        if command == "prompts":
            return _table(
                self.store.list(),
                ["name", "version", "variables", "model"],
                lambda p: [p.name, p.version, ", ".join(p.variables), p.model],
            )
        if command == "show":
            if not rest:
                raise UsageError("Name the prompt: %lmstream show NAME")
            p = self.store.get(rest[0], args.version)
            system = f"--- system\n{p.system}\n" if p.system else ""
            print(
                f"{p.label}  variables: {', '.join(p.variables) or 'none'}\n{system}"
                f"--- template\n{p.template}"
            )
            return None
        if command == "diff":
            return self._diff(rest)
        if command == "history":
            runs = self.store.history(prompt=rest[0] if rest else None, limit=20)
            return _table(
                runs,
                ["id", "status", "prompt", "model", "ttft s", "total s", "text"],
                lambda r: [
                    r.id,
                    r.status,
                    r.label,
                    r.model,
                    _round(r.ttft_s),
                    _round(r.duration_s),
                    r.preview[:50],
                ],
            )
        if command == "stats":
            report = self.store.stats(prompt=rest[0] if rest else None)
            return _table(stats_rows(report), STATS_HEADERS, list)
        if command == "models":
            url = args.base_url or self.config_.base_url

            from ._client import LMStudioClient

            async def models() -> ModelList:
                async with LMStudioClient(url) as client:
                    return ModelList(await client.list_model_kinds())

            return shared_loop().run(models())
        if command == "chat":
            from ._conversation import chat_command

            try:
                done = chat_command(self.store, rest)
            except ValueError as exc:
                raise UsageError(f"Use %lmstream chat {exc}; see %lmstream?.") from None
            if isinstance(done, str):
                print(done)
                return None
            headers, rows = done
            return _table(rows, headers, list)
        if command == "config":
            return self._config(rest)
        if command == "sim":
            return self._sim(rest)
        if command == "ui":
            from ._widget import PromptRunner

            return PromptRunner(
                self.store,
                self.config_.base_url,
                model=self.config_.model,
                budgets=self.config_.budgets(),
            )
        if command == "compare":
            return self._compare(rest, args)
        raise UsageError(f"Unknown subcommand {command!r}: see %lmstream? for the list.")

    def _compare_rows(
        self, versions: list[Prompt], words: list[str], args: Any
    ) -> list[dict[str, Any]]:
        """``K=V`` words and ``--var`` for every row, each ``--row`` one row, the notebook's
        variables for what none gives; a missing value is named before anything is sent."""
        from ._compare import merge_rows

        shared = {**_key_values(words), **_key_values(args.var)}
        rows: list[dict[str, Any]] = []
        for given in args.row:
            try:
                rows.append(_key_values(shlex.split(given)))
            except ValueError as exc:
                raise UsageError(
                    f"Could not read --row {given!r} ({exc}): check the quotes."
                ) from None
        merged = merge_rows(shared, rows)
        needed = list(dict.fromkeys(name for p in versions for name in p.variables))
        namespace = self._user_ns()
        for number, row in enumerate(merged):
            for name in needed:
                if name not in row and name in namespace:
                    row[name] = namespace[name]
            missing = [name for name in needed if name not in row]
            if missing:
                where = f"row {number}" if args.row else "the comparison"
                example = " ".join(f"--var {n}=..." for n in missing)
                raise UsageError(
                    f"{where.capitalize()} needs a value for {', '.join(missing)}: add {example} "
                    "(or put it in each --row), or define it in the notebook; nothing was sent."
                )
        return merged

    def _compare(self, words: list[str], args: Any) -> Any:
        """Every version x model x row, streaming live into one grid; at the end the grid is
        replaced by the summary and a snapshot of every cell, which need no kernel."""
        from ._compare import acompare, resolve_prompts, summary_html

        refs = [w for w in words if "=" not in w]
        if not refs:
            raise UsageError(
                "Name the versions to compare: %lmstream compare NAME@1 NAME@2 "
                "[--models A,B] [--var K=V]"
            )
        check_temperature(args.temperature)
        check_max_tokens(args.max_tokens)
        versions = resolve_prompts(refs, self.store)
        rows = self._compare_rows(versions, [w for w in words if "=" in w], args)
        conf = self.config_
        models = args.models or args.model
        kwargs: dict[str, Any] = {
            "store": self.store,
            "base_url": args.base_url or conf.base_url,
            "budgets": conf.budgets(args.first_token_timeout, args.idle_timeout),
            "temperature": args.temperature,
            "max_tokens": args.max_tokens,
            "interface": "magic",
            "api": args.api,
        }
        if not self._in_kernel():
            compared = shared_loop().run(acompare(versions, models, rows, **kwargs))
            if args.output:
                self._user_ns()[args.output] = compared
            return compared
        from ._grid import CompareGrid, GridSink, grid_bundle

        grid = CompareGrid()
        handle = display(grid, display_id=True)
        holder: dict[str, GridSink] = {}

        def planned(cells: Any) -> None:
            # one column per (version, model) pair, one line per row of variables
            holder["sink"] = GridSink(grid, cells, columns=len(cells) // len(rows))

        def start(index: int) -> None:
            holder["sink"].started(index)

        def watch(index: int) -> Any:
            return holder["sink"].watch(index)

        def end(index: int, result: RunResult) -> None:
            holder["sink"].ended(index, result)

        comparison: Comparison | None = None
        try:
            comparison = shared_loop().run(
                acompare(
                    versions,
                    models,
                    rows,
                    progress=False,
                    on_plan=planned,
                    on_start=start,
                    watch=watch,
                    on_end=end,
                    **kwargs,
                )
            )
        finally:
            sink = holder.get("sink")
            if sink is not None:
                sink.close()
                texts = {c.index: sink.text(c.index) for c in sink.cells}
                if comparison is not None:
                    plain = repr(comparison)
                    head = summary_html(comparison.comparison_id, comparison.summary_rows())
                else:
                    plain = (
                        "lmstream: the comparison ended early; the cells that ended are recorded"
                    )
                    head = f'<div class="lmstream-final">{plain}</div>'
                handle.update(
                    grid_bundle(plain, head, sink.cells, texts, sink.ends, sink.columns),
                    raw=True,
                )
            else:
                line = "lmstream: the comparison did not start"
                handle.update(
                    {"text/plain": line, "text/html": f'<div class="lmstream-final">{line}</div>'},
                    raw=True,
                )
        if args.output:
            self._user_ns()[args.output] = comparison
        return None  # the summary above says what a repr would

    def _diff(self, words: list[str]) -> PromptDiff:
        """The PromptDiff itself: a notebook shows its HTML (prompt text escaped), text/plain
        and terminal IPython show the unified diff."""
        if not 2 <= len(words) <= 3:
            raise UsageError("Name the prompt and its versions: %lmstream diff NAME A [B]")
        name, *given = words
        versions: list[int] = []
        for word in given:
            try:
                versions.append(int(word))
            except ValueError:
                raise UsageError(
                    f"{word!r} is not a version: use a whole number, as in %lmstream diff "
                    f"{name} 1 2."
                ) from None
        return self.store.diff(name, *versions)

    def _config(self, items: list[str]) -> SessionConfig:
        conf = self.config_
        for key, value in _key_values(items).items():
            if key == "base_url":
                # Checked now, with the client's own sentence, not at the first run.
                try:
                    conf.base_url = resolve_base_url(value) if value else None
                except LMStreamError as exc:
                    raise UsageError(render(exc, "magic")) from None
            elif key == "model":
                conf.model = value or None
            elif key in ("first_token_timeout", "idle_timeout"):
                try:
                    setattr(conf, key, parse_seconds(value))
                except ValueError as exc:
                    raise UsageError(f"The setting {key}: {exc}") from None
            elif key == "format":
                if value not in FORMATS:
                    raise UsageError(f"format must be one of {', '.join(FORMATS)}, not {value!r}.")
                conf.format = value
            else:
                raise UsageError(
                    f"Unknown setting {key!r}: use base_url, model, first_token_timeout, "
                    "idle_timeout or format."
                )
        self.config_ = conf
        return replace(conf)

    def _sim(self, words: list[str]) -> Any:
        if not words or words[0] not in ("start", "stop"):
            raise UsageError("Use %lmstream sim start [profile] [time_scale=F] or sim stop.")
        options: dict[str, Any] = {}
        for word in words[1:]:
            if "=" in word:
                key, _, value = word.partition("=")
                options[key.strip()] = _number_or_text(value)
            else:
                options["profile"] = word
        settings = [f.name for f in fields(simulator.SimConfig)]
        unknown = sorted(set(options) - set(settings))
        if unknown:
            raise UsageError(
                f"The simulator has no setting {', '.join(unknown)}: use a profile name or "
                f"{', '.join(settings)}."
            )
        conf = self.config_
        if conf.sim is not None:
            conf.sim.stop()
            conf.sim = None
            conf.base_url = None
        if words[0] == "stop":
            print("Simulator stopped; runs go to " + resolve_base_url(None) + " again.")
            return None
        try:
            conf.sim = simulator.serve(**options)
        except ValueError as exc:  # a value the simulator refuses; its message names it
            raise UsageError(f"The simulator cannot start: {exc}.") from None
        conf.base_url = conf.sim.base_url
        print(f"Simulator listening on {conf.sim.base_url}; this session's runs go there.")
        return None


def _schema_option(args: Any) -> str | None:
    """``--schema FILE_OR_JSON`` read and checked (InvalidSchema, one sentence), as the
    canonical text a Prompt keeps, or None."""
    if args.schema is None:
        return None
    from ._structured import canonical_schema, read_schema_arg

    return canonical_schema(read_schema_arg(args.schema))


def _number_or_text(value: str) -> Any:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _round(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _table(rows: Any, headers: list[str], cells: Any) -> Any:
    """Rows as a pandas DataFrame when pandas is there, else as printed text."""
    data = [cells(row) for row in rows]
    try:
        import pandas as pd
    except ImportError:
        print(table(data, headers), end="")
        return None
    return pd.DataFrame(data, columns=headers)


def load(ipython: Any) -> None:
    ipython.register_magics(LMStreamMagics(ipython))
