"""Every error lmstream_nb raises on purpose, in one tree.

    LMStreamError                    .run_id (set when a recorded run failed), .interface
    ├── InvalidSetting               .setting, .value, .rule  (temperature, max tokens)
    ├── TemplateError
    │   ├── MissingVariables         .names
    │   ├── UnknownVariables         .names
    │   ├── InvalidPlaceholder       .placeholder, .line, .column, .unclosed  ({{my var}}, {{x)
    │   └── InvalidVariables         .names  (values that are not text, numbers or booleans)
    ├── InvalidBaseURL               .url (credentials removed)
    ├── UnsupportedRequest           .reason  (api="native" and a request it cannot carry)
    ├── InvalidSchema                .reason  (a schema= that is not JSON or not a JSON Schema)
    ├── InvalidOutput                .path, .text  (an answer that does not match its schema)
    ├── ConversationBusy             .name  (a turn sent while the previous one streams)
    ├── StoreError                   .path
    │   ├── PromptNotFound           .name, .suggestions
    │   ├── RunNotFound              .run_id
    │   ├── ConversationNotFound     .name, .suggestions
    │   ├── StoreUnavailable         (corrupt, foreign, newer or read-only database)
    │   └── PromptFileError          .file, .line  (export/import files)
    └── RequestError                 .url
        ├── ServerUnreachable
        ├── RequestTimedOut          .timeout          (blocking requests only)
        ├── HTTPStatusError          .status, .server_message
        │   ├── AuthenticationError
        │   ├── RedirectNotFollowed  .location
        │   ├── ModelNotFound        .model
        │   ├── ModelNotLoaded
        │   └── PromptTooLong        .prompt_tokens, .context_length
    │       └── ConversationTooLong  .name  (a conversation's turns no longer fit)
        └── StreamError              .partial_text, .partial_reasoning
            ├── FirstTokenTimeout    .budget, .phase, .fraction  (where progress stopped)
            ├── StreamStalled        .budget
            ├── StreamInterrupted
            ├── ServerStreamError    .server_message
            └── ProtocolError        .line

Each message is one sentence: what happened, the concrete fact (URL, status, names, the offending
line) and what to do. The same facts ride on attributes so code never has to parse the message.
A stream that fails after text has arrived keeps that text in ``partial_text``: nothing the user
saw is lost. Cancellation (Ctrl-C, Stop, a cancelled task) is deliberately *not* an error here:
it propagates unchanged as ``KeyboardInterrupt`` / ``asyncio.CancelledError``.

What to do is said in the words of the interface the user is in: ``--idle-timeout`` on the
command line and in the magic, ``idle_timeout=`` in Python, the field in the runner, the request
field in the relay. A message names what to fix with neutral terms (a setting, the kept text,
where the base URL came from), and :func:`render` words them for an interface from one small
vocabulary table (``_WORDS``); ``str(error)`` is the Python wording. Every front end shows an
error through ``render``, so one rule decides the words everywhere.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable, Iterable
from urllib.parse import quote

#: Columns of an error shown in a notebook (see LMStreamError._render_traceback_).
TRACEBACK_WIDTH = 100

#: The interfaces an error sentence can be worded for (see :func:`render`).
INTERFACES = ("python", "cli", "magic", "runner", "relay")

# A term in a message: what to fix, named neutrally, worded by render() for an interface.
# Private-use characters delimit it, so no text a server sends can be mistaken for one.
_OPEN, _CLOSE = "\ue000", "\ue001"
_TERM = re.compile("\ue000([a-z_]+):([^\ue001]*)\ue001")


def term(kind: str, arg: str = "") -> str:
    """A term for a message (``kind`` from ``_WORDS``, ``arg`` its fact), for render()."""
    return f"{_OPEN}{kind}:{arg}{_CLOSE}"


class LMStreamError(Exception):
    """Base class of every error raised by lmstream_nb."""

    #: The id of the recorded run this error ended, when there was one.
    run_id: int | None = None
    #: The interface whose words ``render`` uses by default (the front end that ran it).
    interface: str = "python"
    _template: str | None = None

    def __init__(self, *args: object) -> None:
        if args and isinstance(args[0], str) and _OPEN in args[0]:
            self._template = args[0]
            args = (_word(args[0], "python"), *args[1:])
        super().__init__(*args)

    def _render_traceback_(self) -> list[str]:
        """IPython shows this instead of a traceback: the one sentence is the whole story.

        It is cut into lines at spaces: notebooks show error output in a ``<pre>`` that breaks
        long lines anywhere, even inside a word, where the sentence would otherwise wrap.
        """
        name = type(self).__name__
        lines = textwrap.wrap(
            f"{name}: {render(self)}",
            width=TRACEBACK_WIDTH,
            break_long_words=False,  # a URL or a path stays whole
            break_on_hyphens=False,
        )
        lines[0] = f"\x1b[0;31m{name}\x1b[0m" + lines[0][len(name) :]
        return lines


def render(error: BaseException, interface: str | None = None) -> str:
    """The sentence of ``error`` in the words of ``interface`` (one of INTERFACES; by default
    the interface the error was raised for). Every front end shows errors through this."""
    if not isinstance(error, LMStreamError):
        return str(error)
    chosen = interface or error.interface
    if chosen not in _WORDS:
        raise ValueError(f"interface must be one of {', '.join(INTERFACES)}, not {chosen!r}")
    return str(error) if error._template is None else _word(error._template, chosen)


def _word(template: str, interface: str) -> str:
    words = _WORDS[interface]
    return _TERM.sub(lambda m: words[m.group(1)](m.group(2)), template)


#: The kinds of term a message may hold; every interface words each one (a test checks).
TERM_KINDS = (
    "raise",
    "kept",
    "given",
    "set",
    "url",
    "values",
    "extra",
    "db",
    "names",
    "versions",
    "runs",
    "models",
    "key",
    "chats",
    "shorter",
)


# -- the vocabulary ----------------------------------------------------------------------------
# Each entry words one kind of term for one interface; the argument is the term's fact.

_FLAGS = {
    "first_token_timeout": "--first-token-timeout",
    "idle_timeout": "--idle-timeout",
    "temperature": "--temperature",
    "max_tokens": "--max-tokens",
}
_FIELDS = {
    "first_token_timeout": "First token s (under Advanced)",
    "idle_timeout": "Idle s (under Advanced)",
    "temperature": "Temperature",
    "max_tokens": "Max tokens",
}
_SPLIT = "|"  # separates the parts of a term's fact: "temperature|5.0", "x|y"


def _names(arg: str) -> list[str]:
    return arg.split(_SPLIT)


def _kept(where: str) -> Callable[[str], str]:
    def phrase(count: str) -> str:
        if count == "0":
            return "no text had arrived"
        return f"the {count} characters received are kept {where}"

    return phrase


def _given(shown: Callable[[str, str], str]) -> Callable[[str], str]:
    def phrase(arg: str) -> str:
        setting, _, value = arg.partition(_SPLIT)
        return shown(setting, value)

    return phrase


def _url(argument: str, environment: str, default: str) -> Callable[[str], str]:
    phrases = {"argument": argument, "environment": environment, "default": default}
    return lambda source: phrases.get(source, default)


_ENV = "the environment variable LMSTREAM_BASE_URL"

_CLI: dict[str, Callable[[str], str]] = {
    "key": lambda _: "set the environment variable LMSTREAM_API_KEY to the server's API token",
    "db": lambda path: f" in {path}",
    "names": lambda _: "see `lmstream prompts list` for the names there are",
    "versions": lambda n: f"see `lmstream prompts versions {n}` for the versions it has",
    "runs": lambda _: "see `lmstream history` for the ids there are",
    "models": lambda _: "pick one listed by `lmstream models`",
    "raise": lambda s: f"raise {_FLAGS[s]}",
    "kept": _kept("above and in `lmstream history`"),
    "given": _given(lambda s, v: f"{_FLAGS[s]} {v}"),
    "set": lambda s: f"give {_FLAGS[s]} such a value, or leave it out for the prompt's own",
    "url": _url(
        "or give --base-url where it listens",
        f"or fix {_ENV}, which gave this address (or give --base-url)",
        f"or give --base-url (or set {_ENV}) to where it listens",
    ),
    "values": lambda a: "add " + " ".join(f"--var {n}=..." for n in _names(a)),
    "extra": lambda _: "fix the --var name",
    "chats": lambda _: "see `lmstream chat list` for the names there are",
    "shorter": lambda n: (
        f"add --drop-oldest to `lmstream run --chat {n}` to leave out as many of its oldest "
        f"turns as needed (`lmstream chat fork {n} NEW` first keeps a whole copy), or start "
        f"again with `lmstream chat reset {n}`"
    ),
}

_WORDS: dict[str, dict[str, Callable[[str], str]]] = {
    "python": {
        "key": lambda _: "set LMSTREAM_API_KEY, or pass api_key=, to the server's API token",
        "db": lambda path: f" in {path}",
        "names": lambda _: "see PromptStore().list() for the names there are",
        "versions": lambda n: f"see PromptStore().versions({n!r}) for the versions it has",
        "runs": lambda _: "see lmstream_nb.history() for the ids there are",
        "models": lambda _: "pick one listed by SyncLMStudioClient().list_models()",
        "raise": lambda s: f"raise {s}",
        "kept": _kept("in .partial_text"),
        "given": _given(lambda s, v: f"{s}={v}"),
        "set": lambda s: f"pass {s}= such a value",
        "url": _url(
            "or pass base_url= to where it listens",
            "or set LMSTREAM_BASE_URL (which gave this address) to where it listens",
            "or pass base_url= (or set LMSTREAM_BASE_URL) to where it listens",
        ),
        "values": lambda a: "pass " + " ".join(f"{n}=..." for n in _names(a)),
        "extra": lambda _: "fix the name, or pass allow_extra=True to allow extra variables",
        "chats": lambda _: "see PromptStore().conversations() for the names there are",
        "shorter": lambda _: (
            "leave out its oldest turns with Conversation.drop_oldest(n), or send(..., "
            "drop_oldest=True) for as many as needed (Conversation.fork(new_name) first keeps "
            "a whole copy), or start again with Conversation.reset()"
        ),
    },
    "cli": _CLI,
    # The magic takes the command line's options, and has its session settings besides.
    "magic": {
        **_CLI,
        "names": lambda _: "see %lmstream prompts for the names there are",
        "versions": lambda n: f"see %lmstream ui (its Version list) for the versions {n} has",
        "runs": lambda _: "see %lmstream history for the ids there are",
        "models": lambda _: "pick one listed by %lmstream models",
        "raise": lambda s: f"raise {_FLAGS[s]} (or %lmstream config {s}=...)",
        "kept": _kept("in the cell's output"),
        "url": _url(
            "or fix --base-url or %lmstream config base_url=..., which gave this address",
            f"or fix {_ENV}, which gave this address (or use %lmstream config base_url=...)",
            "or set %lmstream config base_url=... (or --base-url) to where it listens",
        ),
        "values": lambda a: (
            "add "
            + " ".join(f"--var {n}=..." for n in _names(a))
            + " to the %%lmstream line or define it in the notebook"
        ),
        "chats": lambda _: "see %lmstream chat list for the names there are",
        "shorter": lambda n: (
            f"add --drop-oldest to the %%lmstream --chat {n} line to leave out as many of its "
            f"oldest turns as needed (%lmstream chat fork {n} NEW first keeps a whole copy), "
            f"or start again with %lmstream chat reset {n}"
        ),
    },
    "runner": {
        "key": lambda _: (
            "set the environment variable LMSTREAM_API_KEY to the server's API token before "
            "the kernel starts"
        ),
        "db": lambda path: f" in {path}",
        "names": lambda _: "pick one from the Prompt list",
        "versions": lambda _: "pick one from the Version list",
        "runs": lambda _: "pick one from the History list",
        "models": lambda _: "pick one from the Model list (Refresh models)",
        "raise": lambda s: f"raise {_FIELDS[s]}",
        "kept": _kept("below"),
        "given": _given(lambda s, v: f"{_FIELDS[s]} {v}"),
        "set": lambda s: (
            f"type such a value in {_FIELDS[s]}, or leave it empty for the prompt's own"
        ),
        "url": _url(
            "or run %lmstream config base_url=... with where it listens and open a new runner",
            f"or fix {_ENV}, which gave this address, and open a new runner",
            "or run %lmstream config base_url=... with where it listens and open a new runner",
        ),
        "values": lambda a: "fill in " + ", ".join(_names(a)),
        "extra": lambda _: "fix the variable's name",
        "chats": lambda _: "see %lmstream chat list for the names there are",
        "shorter": lambda n: f"run %lmstream chat reset {n} to start again",
    },
    "relay": {
        "key": lambda _: "set LMSTREAM_API_KEY to the server's API token where lmstream serve runs",
        "db": lambda _: "",  # a web client is never told where the server keeps its files
        "names": lambda _: "see GET /api/prompts for the names there are",
        "versions": lambda n: f"see GET /api/prompts/{quote(n, safe='')} for the versions it has",
        "runs": lambda _: "see GET /api/runs for the runs there are",
        "models": lambda _: "pick one listed by GET /api/models",
        "raise": lambda s: f"start the relay with a larger {s} (its Budgets)",
        "kept": _kept("in the run (GET /api/runs/ID)"),
        "given": _given(lambda s, v: f'"{s}": {v}'),
        "set": lambda s: f'send "{s}" as such a value, or leave it out for the prompt\'s own',
        "url": _url(
            "or restart lmstream serve with --base-url where it listens",
            f"or fix {_ENV} where lmstream serve runs, which gave this address",
            "or restart lmstream serve with --base-url where it listens",
        ),
        "values": lambda a: (
            'send "variables": {' + ", ".join(f'"{n}": "..."' for n in _names(a)) + "}"
        ),
        "extra": lambda _: 'fix the name in "variables"',
        "chats": lambda _: "choose a conversation that exists",
        "shorter": lambda _: (
            'send "drop_oldest": true to leave out as many of its oldest turns as needed, '
            'or send "chat" with a new name to start again'
        ),
    },
}


# ---------------------------------------------------------------------------------------------
# Templates


class TemplateError(LMStreamError):
    """A template could not be rendered with the variables given."""


class MissingVariables(TemplateError):
    """Placeholders without a value; all of them are named, so one fix is enough."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = tuple(sorted(set(names)))
        listed = ", ".join(self.names)
        plural = "s" if len(self.names) > 1 else ""
        super().__init__(
            f"The template needs a value for the variable{plural} {listed}: "
            f"{term('values', _SPLIT.join(self.names))} and run again."
        )


class UnknownVariables(TemplateError):
    """Values for names the template does not use (usually a typo)."""

    def __init__(self, names: Iterable[str], known: Iterable[str]) -> None:
        self.names = tuple(sorted(set(names)))
        self.known = tuple(sorted(set(known)))
        listed = ", ".join(self.names)
        uses = ", ".join(self.known) if self.known else "no variables"
        super().__init__(
            f"The template has no variable named {listed} (it uses {uses}): {term('extra')}."
        )


class InvalidPlaceholder(TemplateError):
    """A ``{{...}}`` whose inside is not a variable name, or (when saving) a ``{{`` that is
    never closed: either would otherwise be sent as typed."""

    def __init__(
        self,
        placeholder: str,
        *,
        line: int,
        column: int = 1,
        where: str = "template",
        unclosed: bool = False,
    ) -> None:
        self.placeholder = placeholder
        self.line = line
        self.column = column
        self.where = where
        self.unclosed = unclosed
        at = f"at line {line}, column {column}"
        if unclosed:
            message = (
                f"The {where} has a placeholder {placeholder} {at} that is not closed on its "
                "line: write it as {{my_var}}, or write \\{{ for a literal {{."
            )
        else:
            message = (
                f"The {where} has the placeholder {placeholder} {at}, whose inside is not a "
                "variable name: use ASCII letters, digits, _, . or - starting with a letter or "
                "_ (such as {{my_var}}), or write \\{{ for a literal {{."
            )
        super().__init__(message)


def _value_kind(value: object) -> str:
    if value is None:
        return "None"
    article = "an" if type(value).__name__[:1].lower() in "aeiou" else "a"
    return f"{article} {type(value).__name__}"


class InvalidVariables(TemplateError):
    """Values that are not text, numbers or booleans (``None``, dicts, lists, bytes, objects)."""

    def __init__(self, values: dict[str, object]) -> None:
        self.names = tuple(sorted(values))
        listed = ", ".join(f"{name} ({_value_kind(values[name])})" for name in self.names)
        what = "values of the variables" if len(self.names) > 1 else "value of the variable"
        verb = "are" if len(self.names) > 1 else "is"
        super().__init__(
            f"The {what} {listed} {verb} not text, a number or a boolean: pass a string "
            "(str(value) converts anything) and run again."
        )


# ---------------------------------------------------------------------------------------------
# Settings


class InvalidSetting(LMStreamError, ValueError):
    """A run setting out of its range (``setting`` is ``temperature`` or ``max_tokens``,
    ``rule`` the range in words): refused the same way by every front end before anything
    is sent or saved."""

    def __init__(self, setting: str, value: object, rule: str) -> None:
        self.setting = setting
        self.value = value
        self.rule = rule
        super().__init__(
            f"{term('given', f'{setting}{_SPLIT}{value!r}')} is not {rule}: {term('set', setting)}."
        )


class UnsupportedRequest(LMStreamError, ValueError):
    """A request the chosen API cannot carry (LM Studio's native chat takes no assistant turns,
    tools or ``response_format``); ``reason`` says what is missing."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class InvalidSchema(LMStreamError, ValueError):
    """A ``schema=`` / ``--schema`` that cannot be used: not JSON, not an object, or not a valid
    JSON Schema; refused before anything is sent or saved. ``reason`` is the bare fact."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"The schema {reason}: give a JSON Schema object (a dict, a pydantic model class, "
            "a .json file or inline JSON)."
        )
        self.reason = reason


class InvalidOutput(LMStreamError):
    """A finished answer that is not JSON, or not JSON matching the schema the run asked for.

    ``path`` is the first failing place (``$`` for the whole answer, ``$.items[2].price``),
    ``text`` the answer as received (kept in the run's record too).
    """

    def __init__(self, message: str, *, path: str, text: str) -> None:
        super().__init__(message)
        self.path = path
        self.text = text


class ConversationBusy(LMStreamError):
    """A conversation's next message was sent while its previous answer was still streaming
    (two cells, two tasks): the second would not see the first, so it is refused."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"The conversation {name!r} is still waiting for its previous answer, so this "
            "message was not sent: wait for that answer (or stop it), then send again."
        )
        self.name = name


class InvalidBaseURL(LMStreamError):
    """A base URL that cannot be used (no scheme, a scheme other than http(s), no host, a port
    that is not a number, a broken IPv6 literal); ``url`` is the URL with credentials removed."""

    def __init__(self, message: str, *, url: str) -> None:
        super().__init__(message)
        self.url = url


# ---------------------------------------------------------------------------------------------
# The prompt and run database


class StoreError(LMStreamError):
    """The prompt database could not do what was asked; ``path`` is the database file."""

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


class PromptNotFound(StoreError):
    """No stored prompt has that name (or that version); close names are suggested."""

    def __init__(
        self,
        name: str,
        *,
        path: str,
        suggestions: Iterable[str] = (),
        version: int | None = None,
    ) -> None:
        self.name = name
        self.version = version
        self.suggestions = tuple(suggestions)
        if version is not None:
            what = f"The prompt {name!r} has no version {version}"
            fix = term("versions", name) + "."
        else:
            what = f"No prompt is named {name!r}{term('db', path)}"
            if self.suggestions:
                fix = "did you mean " + " or ".join(repr(s) for s in self.suggestions) + "?"
            else:
                fix = term("names") + "."
        super().__init__(f"{what}: {fix}", path=path)


class RunNotFound(StoreError):
    """No recorded run has that id."""

    def __init__(self, run_id: int, *, path: str) -> None:
        super().__init__(
            f"No run with id {run_id} is recorded{term('db', path)}: {term('runs')}.",
            path=path,
        )
        self.run_id = run_id


class ConversationNotFound(StoreError):
    """No conversation has that name; close names are suggested."""

    def __init__(self, name: str, suggestions: Iterable[str] = (), *, path: str) -> None:
        self.name = name
        self.suggestions = tuple(suggestions)
        if self.suggestions:
            fix = "did you mean " + " or ".join(repr(s) for s in self.suggestions) + "?"
        else:
            fix = term("chats") + "."
        super().__init__(f"No conversation is named {name!r}{term('db', path)}: {fix}", path=path)


class StoreUnavailable(StoreError):
    """The database file cannot be used: corrupt, not ours, too new, or not writable."""


class PromptFileError(StoreError):
    """A prompt file being imported is not valid; nothing was imported."""

    def __init__(self, message: str, *, path: str, file: str, line: int | None) -> None:
        super().__init__(message, path=path)
        self.file = file
        self.line = line


# ---------------------------------------------------------------------------------------------
# Requests


class RequestError(LMStreamError):
    """A request to the model server failed; ``url`` says which server."""

    def __init__(self, message: str, *, url: str) -> None:
        super().__init__(message)
        self.url = url


class ServerUnreachable(RequestError):
    """No TCP connection could be made (server off, wrong port, wrong host)."""


class RequestTimedOut(RequestError):
    """A blocking (non-streaming) request hit its total timeout."""

    def __init__(self, message: str, *, url: str, timeout: float) -> None:
        super().__init__(message, url=url)
        self.timeout = timeout


class HTTPStatusError(RequestError):
    """The server refused the request; ``server_message`` is its own explanation."""

    def __init__(self, message: str, *, url: str, status: int, server_message: str | None) -> None:
        super().__init__(message, url=url)
        self.status = status
        self.server_message = server_message


class AuthenticationError(HTTPStatusError):
    """The server requires an API token and did not accept ours."""


class RedirectNotFollowed(HTTPStatusError):
    """The server answered with a redirect. It is never followed, so the API key cannot travel
    to another address; ``location`` (credentials removed) is where the server points."""

    def __init__(self, message: str, *, url: str, status: int, location: str | None) -> None:
        super().__init__(message, url=url, status=status, server_message=None)
        self.location = location


class ModelNotFound(HTTPStatusError):
    """The requested model id is not known to the server."""

    def __init__(
        self, message: str, *, url: str, status: int, server_message: str | None, model: str
    ) -> None:
        super().__init__(message, url=url, status=status, server_message=server_message)
        self.model = model


class ModelNotLoaded(HTTPStatusError):
    """The server has no model loaded (and could not load one just in time)."""


class PromptTooLong(HTTPStatusError):
    """The prompt does not fit the loaded model's context window.

    ``prompt_tokens`` and ``context_length`` are the two numbers where they are known: from
    the server's refusal, or from the check made before sending (then ``status`` is 0, since
    no request was sent).
    """

    def __init__(
        self,
        message: str,
        *,
        url: str,
        status: int,
        server_message: str | None,
        prompt_tokens: int | None = None,
        context_length: int | None = None,
    ) -> None:
        super().__init__(message, url=url, status=status, server_message=server_message)
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length


class ConversationTooLong(PromptTooLong):
    """A conversation's next turn, with the turns before it, no longer fits the context. No
    turn is ever left out without being asked, so the sentence names the ways to ask.

    ``status`` 0: the client counted and sent nothing; otherwise the server refused it (and
    the numbers are those it gave, where it gave them).
    """

    def __init__(
        self,
        name: str,
        *,
        url: str,
        prompt_tokens: int | None,
        context_length: int | None,
        status: int = 0,
        server_message: str | None = None,
    ) -> None:
        self.name = name
        window = (
            "the context" if context_length is None else f"the {context_length:,}-token context"
        )
        size = (
            f"does not fit {window}"
            if prompt_tokens is None
            else f"has {prompt_tokens:,} tokens, too many for {window}"
        )
        how = "so it was not sent" if status == 0 else f"so the server refused it (HTTP {status})"
        super().__init__(
            f"The conversation {name!r} with its next message {size} of the model at {url}, "
            f"{how}: {term('shorter', name)}.",
            url=url,
            status=status,
            server_message=server_message,
            prompt_tokens=prompt_tokens,
            context_length=context_length,
        )


class StreamError(RequestError):
    """A stream failed; whatever text had arrived is kept on the exception."""

    def __init__(
        self, message: str, *, url: str, partial_text: str = "", partial_reasoning: str = ""
    ) -> None:
        super().__init__(message, url=url)
        self.partial_text = partial_text
        self.partial_reasoning = partial_reasoning


class FirstTokenTimeout(StreamError):
    """No token arrived in time: no sign of life within the first-token budget, or progress
    (model loading, prompt processing) that stopped for longer than the idle budget.

    ``phase`` and ``fraction`` say where progress stopped (``"loading"`` or ``"prompt"``), or
    are ``None`` when the server reported no progress at all.
    """

    def __init__(
        self,
        message: str,
        *,
        url: str,
        budget: float,
        partial_reasoning: str = "",
        phase: str | None = None,
        fraction: float | None = None,
    ) -> None:
        super().__init__(message, url=url, partial_reasoning=partial_reasoning)
        self.budget = budget
        self.phase = phase
        self.fraction = fraction


class StreamStalled(StreamError):
    """Text had started to arrive, then nothing new came within the idle budget."""

    def __init__(
        self,
        message: str,
        *,
        url: str,
        budget: float,
        partial_text: str = "",
        partial_reasoning: str = "",
    ) -> None:
        super().__init__(
            message, url=url, partial_text=partial_text, partial_reasoning=partial_reasoning
        )
        self.budget = budget


class StreamInterrupted(StreamError):
    """The connection broke, or the stream ended without a finish signal."""


class ServerStreamError(StreamError):
    """The server reported an error inside the event stream."""

    def __init__(
        self,
        message: str,
        *,
        url: str,
        server_message: str | None,
        partial_text: str = "",
        partial_reasoning: str = "",
    ) -> None:
        super().__init__(
            message, url=url, partial_text=partial_text, partial_reasoning=partial_reasoning
        )
        self.server_message = server_message


class ProtocolError(StreamError):
    """The server's answer is not an OpenAI-style event stream; ``line`` is the offending part."""

    def __init__(
        self,
        message: str,
        *,
        url: str,
        line: str,
        partial_text: str = "",
        partial_reasoning: str = "",
    ) -> None:
        super().__init__(
            message, url=url, partial_text=partial_text, partial_reasoning=partial_reasoning
        )
        self.line = line


# ---------------------------------------------------------------------------------------------
# What a failure means for a rerun


def rerun_could_help(error: BaseException | None) -> bool:
    """Whether sending the same request again, unchanged, could succeed.

    Yes for what depends on the moment: an unreachable or busy server (HTTP 408, 429, 5xx), a
    broken connection, a stall, a first-token budget a queue used up. No for
    what the next attempt would meet again: bad variables, an unknown or unloaded model, a
    prompt too long for the context, a refused key, a redirect, an answer that is not an
    event stream, a database problem. The one rule for suggesting ``--resume`` after a batch.
    """
    if not isinstance(error, LMStreamError):
        return False  # none, or a bug (in lmstream_nb or a callback) that a rerun meets again
    permanent = (
        AuthenticationError,
        RedirectNotFollowed,
        ModelNotFound,
        ModelNotLoaded,
        PromptTooLong,
        ProtocolError,
    )
    if isinstance(error, permanent):
        return False
    if isinstance(error, HTTPStatusError):
        return error.status in (408, 429) or error.status >= 500
    return isinstance(error, RequestError)
