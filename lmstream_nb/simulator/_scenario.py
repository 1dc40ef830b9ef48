"""What the simulator should do: speed profiles, server configuration and per-request scenarios.

Everything here is plain data. A :class:`Scenario` describes how one chat request is answered
(speed, length, reasoning style, faults, framing quirks); :class:`SimConfig` describes the server
(where it listens, which models exist, the default scenario). A client may override any scenario
field for one request by sending a JSON object under the request-body key ``"sim"``;
:func:`apply_overrides` validates it and merges it over the server default.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

__all__ = [
    "DIALECTS",
    "ERROR_BODIES",
    "FLOODS",
    "LINE_ENDINGS",
    "PROFILES",
    "REASONING_MODES",
    "SCHEMA_FAULTS",
    "Profile",
    "Scenario",
    "ScenarioError",
    "SimConfig",
    "apply_overrides",
    "model_format",
    "model_type",
]


class Profile(NamedTuple):
    """The speed of one imagined machine.

    ``prefill_tps`` is prompt processing speed (tokens/s), ``gen_tps`` generation speed (tokens/s),
    ``load_s`` the time a JIT load of a model takes. ``math.inf`` speeds and a zero load mean "no
    delay at all".
    """

    prefill_tps: float
    gen_tps: float
    load_s: float


#: Speed profiles by name. The first three follow measurements of 8B models on real hardware (a
#: laptop GPU, a laptop CPU) and a fast setting for tests; "instant" never sleeps and is meant for
#: throughput benchmarks of the client itself.
PROFILES: dict[str, Profile] = {
    "laptop-gpu": Profile(prefill_tps=150.0, gen_tps=30.0, load_s=7.0),
    "cpu": Profile(prefill_tps=15.0, gen_tps=5.0, load_s=15.0),
    "test-fast": Profile(prefill_tps=5000.0, gen_tps=500.0, load_s=0.0),
    "instant": Profile(prefill_tps=math.inf, gen_tps=math.inf, load_s=0.0),
}

REASONING_MODES = ("off", "separate", "inline", "reasoning")
DIALECTS = ("lmstudio", "openai", "llamacpp", "llamacpp-python")
LINE_ENDINGS = ("lf", "crlf", "cr")
ERROR_BODIES = ("string", "object", "html", "empty")
FLOODS = ("line", "data", "gzip")
SCHEMA_FAULTS = ("invalid_json", "wrong_type")


class ScenarioError(ValueError):
    """A scenario or configuration value is invalid; the message names the field and the rule."""


@dataclasses.dataclass(frozen=True)
class Scenario:
    """How the simulator answers one chat-completion request.

    Every field has a default, and the names are the JSON keys a client may send under ``"sim"``
    in a request body to override the server's default scenario for that request. A prompt may
    also carry them as text, ``[[sim {"stall_at": 3, "stall_s": 30}]]``, which wins over both.
    Token positions (``*_at``) count every generated token written so far, reasoning and answer
    alike; a position beyond the planned number of tokens never triggers.

    Speed and time:

    - ``prefill_tps``, ``gen_tps``, ``load_s``: prompt-processing speed, generation speed (tokens
      per second) and JIT load time of a not-yet-loaded model. ``None`` takes the profile's value.
    - ``jitter``: each inter-token interval is ``1/gen_tps`` times ``1 ± jitter`` (uniform,
      deterministic from the seed); 0 gives a perfectly even beat. Must be in ``[0, 1)``.
    - ``time_scale``: every simulated duration is multiplied by it (``0.01`` turns a 300 s
      scenario into 3 s). ``None`` takes the server's.

    Length and text:

    - ``output_tokens``: answer tokens to generate (``None`` means 150). A request's
      ``max_tokens`` > 0 caps it, and then ``finish_reason`` is ``"length"``; ``-1`` is unlimited.
    - ``chunk_chars``: when set, every answer delta is exactly this many characters of
      deterministic text instead of one word piece (e.g. ``1048576`` for a 1 MiB data line).
    - ``reply``: a fixed answer to stream instead of generated text, cut into word pieces (for
      demos and for tests of what a front end does with, say, HTML in an answer). Its pieces set
      the default length; ``output_tokens`` repeats or truncates it.
    - ``reasoning``: ``"off"``; ``"separate"`` (thinking as ``delta.reasoning_content`` without a
      ``content`` key, then the answer as ``delta.content``); ``"inline"`` (``<think>…</think>``
      inside ``content``); ``"reasoning"`` (gpt-oss style ``delta.reasoning``).
    - ``reasoning_tokens``: thinking tokens generated before the answer when reasoning is on.

    Stream faults (streaming requests; ``stall_*``, ``disconnect_at`` and ``error_at`` also act on
    non-streaming ones, see below):

    - ``batch_size``: prompt tokens processed per step; progress is reported per step (see
      ``_pace``). ``None``: 2048 for the ``"llamacpp"`` dialect (``llama-server -b``), else 512
      (LM Studio's evaluation batch size).
    - ``ping_s``: while processing the prompt, send an SSE comment line ``: ping`` every
      ``ping_s`` simulated seconds (llama.cpp does this; LM Studio sends nothing, hence ``None``).
    - ``stall_at``, ``stall_s``: after ``stall_at`` tokens, pause ``stall_s`` seconds, then go on.
    - ``prompt_stall_at``: once that many prompt tokens are processed, pause ``stall_s`` seconds
      before processing the rest: progress stops there (and is reported there, between the
      batches, so a client sees exactly where it stopped). 0 pauses right after the first
      progress report; at or beyond the prompt's size it never triggers.
    - ``disconnect_at``: after that many tokens drop the TCP connection without ending the chunked
      body (``0``: right after the headers). A non-streaming request gets headers, then the drop.
    - ``end_at``: after that many tokens end the HTTP body cleanly but send neither the finish
      chunk nor ``[DONE]``.
    - ``error_at``: after that many tokens send an ``event: error`` frame and end without
      ``[DONE]``. A non-streaming request gets a 500 with an object-shaped error instead.
    - ``error_message``: the message of ``error_at`` (default ``"Compute error."``) and of
      ``http_status`` / ``content_type`` bodies.
    - ``schema_fault``: for a request with a JSON Schema ``response_format`` (answered with
      JSON matching it, see ``_schema``), ``"invalid_json"`` cuts that JSON short and
      ``"wrong_type"`` gives its first property a value of the wrong type.
    - ``malformed_at``: just before that token, send a data line that is not JSON
      (``data: {"id": broken``), then continue normally.
    - ``malformed_data``: the data that ``malformed_at`` sends instead (any text, e.g. a chunk
      of the wrong shape such as ``{"choices": "x"}``).
    - ``write_events``: gather up to this many SSE events (text, faults and framing alike)
      into one network write, so that text and the error after it arrive in one read.
      Pending events are written before any pause, so no text waits longer than it would.

    Hostile servers (each bounded, so a test that meets one still ends by itself):

    - ``raw_body``: answer 200 with exactly this body, written in one piece (``text/event-
      stream`` for a streaming request, ``application/json`` otherwise, or ``content_type``).
    - ``flood``: send a body that never ends properly until ``flood_bytes`` are out or the
      client leaves: ``"line"`` one ``data:`` line without a line ending, ``"data"`` endless
      ``data:`` lines without the blank line that ends an event, ``"gzip"`` a gzip-compressed
      (``Content-Encoding: gzip``) endless line, about 1 KB on the wire per MB inflated.
      A non-streaming request gets the same as an unfinished JSON body. With ``http_status``
      the flood is the error body.
    - ``flood_bytes``: how much a flood sends (inflated, for ``"gzip"``, and then at most
      1 GiB); default 256 MiB.
    - ``redirect_to``: answer with a redirect (``http_status`` if it is a 3xx, else 307) to
      this ``Location``.
    - ``echo_request``: every error text this scenario sends (``http_status`` bodies,
      ``error_at`` frames, ``malformed_at`` lines, ``content_type`` bodies) ends with the
      request's ``Authorization`` header and full URL, as careless servers do.

    A server's default scenario (``SimConfig.defaults``) also applies ``redirect_to`` and
    ``flood`` to the model lists (``GET /v1/models``, ``/api/v0/models``).

    Whole-response faults:

    - ``http_status``: answer with this status before any streaming; the body follows
      ``error_body``: ``"string"`` → ``{"error": msg}``, ``"object"`` → an OpenAI-style error
      object, ``"html"`` → a small HTML page, ``"empty"`` → no body.
    - ``content_type``: for a streaming request, answer 200 with this content type and a non-SSE
      body (an HTML page for ``text/html``, an error object for ``application/json``, plain text
      otherwise).
    - ``no_model``: behave as if no model were loaded (LM Studio's 400 with a string error).
    - ``fault_attempts``: the faults above act only on the first N requests with the same
      messages; later ones (a client's retries) are answered normally. This models a transient
      fault, such as a server restart or a dropped connection, that a retry gets past.
      ``None``: every request meets the fault.

    Framing (streaming requests):

    - ``dialect``: ``"lmstudio"`` (role on every delta, text in the first chunk, an empty-delta
      finish chunk), ``"openai"`` (role only in an opening chunk with ``content: ""``) or
      ``"llamacpp"`` (opening chunk ``{"role": "assistant", "content": null}``, usage chunk with
      ``timings``, and ``prompt_progress`` chunks at 0 and after every ``batch_size`` tokens when
      the request has ``"return_progress": true``). A server whose default dialect is
      ``"llamacpp"`` is a llama.cpp server throughout (see ``_app``). ``"llamacpp-python"``
      is llama-cpp-python's own server (``python -m llama_cpp.server``): OpenAI-style
      framing, ``Server: uvicorn``, token counting at ``POST /extras/tokenize/count`` and no
      context size anywhere, and a streamed prompt over the context answered with 200 and an
      empty event stream (its error goes only to its log).
    - ``line_ending``: ``"lf"``, ``"crlf"`` or ``"cr"`` for every SSE line.
    - ``bom``: start the body with a UTF-8 byte-order mark.
    """

    prefill_tps: float | None = None
    gen_tps: float | None = None
    load_s: float | None = None
    jitter: float = 0.2
    time_scale: float | None = None
    output_tokens: int | None = None
    chunk_chars: int | None = None
    reply: str | None = None
    reasoning: str = "off"
    reasoning_tokens: int = 40
    batch_size: int | None = None
    ping_s: float | None = None
    stall_at: int | None = None
    prompt_stall_at: int | None = None
    stall_s: float = 0.0
    disconnect_at: int | None = None
    end_at: int | None = None
    error_at: int | None = None
    error_message: str | None = None
    schema_fault: str | None = None
    malformed_at: int | None = None
    malformed_data: str | None = None
    write_events: int | None = None
    raw_body: str | None = None
    flood: str | None = None
    flood_bytes: int = 256 * 2**20
    redirect_to: str | None = None
    echo_request: bool = False
    http_status: int | None = None
    error_body: str = "object"
    content_type: str | None = None
    no_model: bool = False
    fault_attempts: int | None = None
    dialect: str = "lmstudio"
    line_ending: str = "lf"
    bom: bool = False

    def __post_init__(self) -> None:
        for name, rule in _RULES.items():
            rule(name, getattr(self, name))

    def without_faults(self) -> Scenario:
        """The same scenario with every fault switched off (a retry after a transient fault)."""
        return dataclasses.replace(
            self,
            stall_at=None,
            prompt_stall_at=None,
            disconnect_at=None,
            end_at=None,
            error_at=None,
            schema_fault=None,
            malformed_at=None,
            raw_body=None,
            flood=None,
            redirect_to=None,
            http_status=None,
            content_type=None,
            no_model=False,
        )


# --- validation -------------------------------------------------------------------------------
_Rule = Callable[[str, object], None]
# One small checker per field. They reject booleans where numbers are expected, because JSON
# ``true`` would otherwise pass as the number 1.


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _speed(name: str, value: object) -> None:
    if value is not None and (not _is_number(value) or not value > 0):  # type: ignore[operator]
        raise ScenarioError(
            f"{name} must be a number > 0 (tokens per second) or null, got {value!r}"
        )


def _seconds(name: str, value: object, *, optional: bool = True) -> None:
    if value is None and optional:
        return
    if not _is_number(value) or math.isnan(value) or value < 0:  # type: ignore[arg-type,operator]
        raise ScenarioError(f"{name} must be a number of seconds >= 0, got {value!r}")


def _positive_seconds(name: str, value: object) -> None:
    if value is not None and (not _is_number(value) or not value > 0):  # type: ignore[operator]
        raise ScenarioError(f"{name} must be a number of seconds > 0 or null, got {value!r}")


def _count(name: str, value: object, *, optional: bool = True, minimum: int = 0) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ScenarioError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _jitter(name: str, value: object) -> None:
    if not _is_number(value) or not 0 <= value < 1:  # type: ignore[operator]
        raise ScenarioError(f"{name} must be a number in [0, 1), got {value!r}")


def _choice(options: tuple[str, ...]) -> _Rule:
    def check(name: str, value: object) -> None:
        if value not in options:
            raise ScenarioError(f"{name} must be one of {', '.join(options)}; got {value!r}")

    return check


def _flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ScenarioError(f"{name} must be true or false, got {value!r}")


def _text(name: str, value: object) -> None:
    if value is not None and not isinstance(value, str):
        raise ScenarioError(f"{name} must be a string or null, got {value!r}")


def _status(name: str, value: object) -> None:
    if value is not None and (
        not isinstance(value, int) or isinstance(value, bool) or not 200 <= value <= 599
    ):
        raise ScenarioError(f"{name} must be an HTTP status between 200 and 599, got {value!r}")


_RULES: dict[str, _Rule] = {
    "prefill_tps": _speed,
    "gen_tps": _speed,
    "load_s": _seconds,
    "jitter": _jitter,
    "time_scale": _seconds,
    "output_tokens": _count,
    "chunk_chars": lambda n, v: _count(n, v, minimum=1),
    "reply": _text,
    "reasoning": _choice(REASONING_MODES),
    "reasoning_tokens": lambda n, v: _count(n, v, optional=False),
    "batch_size": lambda n, v: _count(n, v, minimum=1),
    "ping_s": _positive_seconds,
    "stall_at": _count,
    "prompt_stall_at": _count,
    "stall_s": lambda n, v: _seconds(n, v, optional=False),
    "disconnect_at": _count,
    "end_at": _count,
    "error_at": _count,
    "error_message": _text,
    "schema_fault": lambda n, v: None if v is None else _choice(SCHEMA_FAULTS)(n, v),
    "malformed_at": _count,
    "malformed_data": _text,
    "write_events": lambda n, v: _count(n, v, minimum=1),
    "raw_body": _text,
    "flood": lambda n, v: None if v is None else _choice(FLOODS)(n, v),
    "flood_bytes": lambda n, v: _count(n, v, optional=False, minimum=1),
    "redirect_to": _text,
    "echo_request": _flag,
    "http_status": _status,
    "error_body": _choice(ERROR_BODIES),
    "content_type": _text,
    "no_model": _flag,
    "fault_attempts": _count,
    "dialect": _choice(DIALECTS),
    "line_ending": _choice(LINE_ENDINGS),
    "bom": _flag,
}

SCENARIO_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Scenario))
assert set(SCENARIO_FIELDS) == set(_RULES), "every Scenario field needs a validation rule"


def apply_overrides(base: Scenario, overrides: object) -> Scenario:
    """Return ``base`` with the fields in ``overrides`` (a request's ``"sim"`` object) replaced.

    Raises :class:`ScenarioError` naming every unknown key, or the first invalid value.
    """
    if overrides is None:
        return base
    if not isinstance(overrides, Mapping):
        raise ScenarioError(f'"sim" must be a JSON object of scenario fields, got {overrides!r}')
    unknown = sorted(str(key) for key in overrides if key not in SCENARIO_FIELDS)
    if unknown:
        raise ScenarioError(
            f'unknown simulator scenario field(s) in "sim": {", ".join(unknown)}. '
            f"Known fields: {', '.join(SCENARIO_FIELDS)}"
        )
    return dataclasses.replace(base, **{str(k): v for k, v in overrides.items()})


def model_type(model_id: str) -> str:
    """LM Studio's ``type`` for a simulated model: ids containing "embed" are embedding models."""
    return "embeddings" if "embed" in model_id.lower() else "llm"


def model_format(model_id: str) -> str:
    """The weights' format: ids containing "mlx" are MLX models (one prediction at a time)."""
    return "mlx" if "mlx" in model_id.lower() else "gguf"


@dataclasses.dataclass(frozen=True)
class SimConfig:
    """How the simulated LM Studio server is set up.

    - ``host``, ``port``: where to listen; port 0 picks a free port (tests), LM Studio uses 1234.
    - ``profile``: a key of :data:`PROFILES`, giving speeds and load time where the scenario
      leaves them ``None``.
    - ``time_scale``: multiplies every simulated duration (a scenario may override it).
    - ``seed``: seeds text and jitter when a request sends no ``seed`` of its own.
    - ``models``: the downloaded model ids. The first is loaded at start; the others are loaded
      just in time when first requested (taking ``load_s``). Ids containing "embed" are embedding
      models, listed but not usable for chat.
    - ``any_model``: LM Studio's quirk of serving any ``model`` string with the loaded model
      instead of answering ``model_not_found``.
    - ``api_key``: when set, every request needs ``Authorization: Bearer <api_key>`` (else 401).
    - ``parallel``: prediction slots per loaded model (LM Studio 0.4's "Max Concurrent
      Predictions", 4 by default for GGUF models; ``llama-server -np``). Requests beyond them
      queue ("Model is currently generating. Queuing request"); those in the slots share the
      model's speed as ``_pace`` describes. 1 is LM Studio 0.3's (and MLX models') one answer at
      a time; ``None`` serves every request at once at full speed. Models whose id contains
      "mlx" always have one slot.
    - ``context_length``: the loaded context; longer prompts get LM Studio's overflow error.
      ``POST /api/v1/models/load`` and a native chat that loads a model may choose another.
    - ``native_api``: serve LM Studio 0.4's native ``/api/v1`` (the default); ``False`` is
      LM Studio 0.3, whose only chat is the silent ``/v1/chat/completions`` (``/api/v1``
      paths get its "Unexpected endpoint" answer).
    - ``defaults``: the server-wide scenario that a request's ``"sim"`` object is merged over.
    """

    host: str = "127.0.0.1"
    port: int = 0
    profile: str = "laptop-gpu"
    time_scale: float = 1.0
    seed: int = 0
    models: tuple[str, ...] = ("lmstream-sim-8b", "lmstream-sim-embed")
    any_model: bool = False
    api_key: str | None = None
    parallel: int | None = 4
    context_length: int = 131072
    native_api: bool = True
    defaults: Scenario = dataclasses.field(default_factory=Scenario)

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ScenarioError(
                f"unknown profile {self.profile!r}; choose one of {', '.join(PROFILES)}"
            )
        _seconds("time_scale", self.time_scale, optional=False)
        _count("port", self.port, optional=False)
        if self.port > 65535:
            raise ScenarioError(f"port must be at most 65535, got {self.port}")
        _count("seed", self.seed, optional=False)
        models: object = self.models
        if not isinstance(models, tuple) or not all(isinstance(m, str) and m for m in models):
            raise ScenarioError(
                f"models must be a tuple of non-empty model ids, got {self.models!r}"
            )
        if not self.models or len(set(self.models)) != len(self.models):
            raise ScenarioError(f"models must name at least one model, each once: {self.models!r}")
        _count("parallel", self.parallel, minimum=1)
        _count("context_length", self.context_length, optional=False, minimum=1)
        if not isinstance(self.native_api, bool):
            raise ScenarioError(f"native_api must be true or false, got {self.native_api!r}")
        if not isinstance(self.defaults, Scenario):
            raise ScenarioError(f"defaults must be a Scenario, got {self.defaults!r}")

    @property
    def speeds(self) -> Profile:
        """The profile named by :attr:`profile`."""
        return PROFILES[self.profile]
