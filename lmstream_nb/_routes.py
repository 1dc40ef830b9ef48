"""Which server is this, and where does a request go: LM Studio's native chat or /chat/completions.

Only LM Studio 0.4's native ``POST /api/v1/chat`` reports model loading and prompt processing
while a long prompt is read; its OpenAI-compatible ``/v1/chat/completions`` is silent until the
first token. So a client that can use the native chat should, but the native request has a
narrower shape (lmstudio-wire.md §9): one input text and a system prompt, no assistant turns,
no tools, no ``response_format``. :func:`choose` makes that decision for one request and says
why; :class:`ServerInfo` is what one probe of the server found out (which kind of server, the
context each loaded model holds, its prediction slots).

Pure: bodies in, decisions out. The client does the HTTP.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard

__all__ = [
    "APIS",
    "API_HELP",
    "UNKNOWN",
    "Route",
    "ServerInfo",
    "choose",
    "native_root",
    "read_llamacpp_props",
    "read_native_models",
    "reports_progress",
]

APIS = ("auto", "native", "openai")
#: What the choice means, in the help of every front end that offers it.
API_HELP = (
    "which endpoint: auto (LM Studio's native chat where a request fits it, for its progress; "
    "else /chat/completions), native, or openai (/chat/completions always) (default: auto)"
)

#: Settings the native chat takes under the same name as /chat/completions.
_SAME = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty")
#: Native-only fields a caller may pass through.
_NATIVE_ONLY = ("reasoning", "context_length", "store", "max_output_tokens")
#: What stream_chat adds by itself; the native stream always ends with its stats.
_IMPLIED = ("stream", "stream_options")
#: What the native chat documents it does not take (custom tools, structured output): such a
#: request is never sent there, not even with api="native".
_OPENAI_ONLY = ("response_format", "tools", "tool_choice", "functions", "function_call")


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """What a probe of the server found.

    ``kind`` is ``"lmstudio"`` (the native API answered), ``"llamacpp"`` (``Server: llama.cpp``)
    or ``"openai"`` (anything else: LM Studio 0.3, Ollama, a proxy, llama-cpp-python).
    ``contexts`` maps a loaded model to the context it was loaded with, ``slots`` to its
    parallel prediction slots; for llama.cpp the one model is under ``"*"``.
    """

    kind: str
    contexts: Mapping[str, int] = field(default_factory=dict)
    slots: Mapping[str, int] = field(default_factory=dict)

    @property
    def native(self) -> bool:
        return self.kind == "lmstudio"

    def context_of(self, model: str) -> int | None:
        """The context a prompt for ``model`` must fit, where the server said it."""
        return self.contexts.get(model, self.contexts.get("*"))

    def slots_of(self, model: str | None) -> int | None:
        """The predictions the server runs at once for ``model``, where it said; for no model
        named, the one figure it gave (one model, or several loaded with the same)."""
        if model is not None:
            return self.slots.get(model, self.slots.get("*"))
        figures = set(self.slots.values())
        return figures.pop() if len(figures) == 1 else None


UNKNOWN = ServerInfo("openai")


@dataclass(frozen=True, slots=True)
class Route:
    """Where one request goes: ``api`` (``"native"`` or ``"openai"``), ``reason`` (a phrase a
    person can read) and, for the native chat, the body to send."""

    api: str
    reason: str
    native_body: dict[str, Any] | None = None


def native_root(base_path: str) -> str | None:
    """The native API's path beside a base URL's path: ``/v1`` → ``/api/v1``.

    The native API lives on the same port as ``/v1`` (lmstudio-wire.md §9); a proxy prefix in
    front of ``/v1`` is kept, so ``/lmstudio/v1`` becomes ``/lmstudio/api/v1``. A base URL
    that does not end in ``/v1`` gets None: it is not LM Studio's OpenAI-compatible address,
    and guessing a native one beside it would hide that mistake until a request the native
    chat cannot carry.
    """
    path = base_path.rstrip("/")
    if not path.endswith("/v1"):
        return None
    return f"{path[: -len('/v1')]}/api/v1"


def read_native_models(obj: object) -> ServerInfo | None:
    """A ``GET /api/v1/models`` body → ServerInfo, or None if it is not LM Studio's shape."""
    if not isinstance(obj, dict) or not isinstance(obj.get("models"), list):
        return None
    contexts: dict[str, int] = {}
    slots: dict[str, int] = {}
    for model in obj["models"]:
        if not isinstance(model, dict) or not isinstance(model.get("key"), str):
            continue
        instances = model.get("loaded_instances")
        for instance in instances if isinstance(instances, list) else ():
            config = instance.get("config") if isinstance(instance, dict) else None
            if not isinstance(config, dict):
                continue
            for target, key in ((contexts, "context_length"), (slots, "parallel")):
                value = config.get(key)
                if _whole(value):
                    # A request names the model's key, and LM Studio does not document which of
                    # several loaded instances takes it: the key gets the smallest figure, so a
                    # prompt that fits fits any of them and no instance gets more at once than
                    # it runs. An instance's own id gets its own (the first instance's id is
                    # often the key itself: the smaller figure again).
                    names = [model["key"]]
                    if isinstance(instance.get("id"), str) and instance["id"] != model["key"]:
                        names.append(instance["id"])
                    for name in names:
                        target[name] = min(value, target.get(name, value))
    return ServerInfo("lmstudio", contexts, slots)


def read_llamacpp_props(obj: object) -> ServerInfo:
    """llama.cpp's ``GET /props``: the context of one slot (what one prompt must fit) and the
    number of slots. ``default_generation_settings.n_ctx`` is per slot; older builds only
    have the top-level ``n_ctx``."""
    contexts: dict[str, int] = {}
    slots: dict[str, int] = {}
    if isinstance(obj, dict):
        settings = obj.get("default_generation_settings")
        n_ctx = settings.get("n_ctx") if isinstance(settings, dict) else None
        if not _whole(n_ctx):
            n_ctx = obj.get("n_ctx")
        if _whole(n_ctx):
            contexts["*"] = n_ctx
        if _whole(obj.get("total_slots")):
            slots["*"] = obj["total_slots"]
    return ServerInfo("llamacpp", contexts, slots)


def _whole(value: object) -> TypeGuard[int]:
    return type(value) is int and value > 0


def _text_of(content: object) -> str | None:
    return content if isinstance(content, str) else None


def choose(api: str, info: ServerInfo, body: Mapping[str, Any]) -> Route:
    """Decide where a /chat/completions-shaped ``body`` goes, and build the native body.

    ``api="openai"`` always keeps /chat/completions; ``"auto"`` uses the native chat when the
    server has it and the request fits it; ``"native"`` insists (a request that cannot be
    expressed there is refused by the caller with this route's reason).
    """
    if api == "openai":
        return Route("openai", "the client was told to use the OpenAI-compatible API")
    if api == "auto" and not info.native:
        return Route("openai", f"the server ({info.kind}) has no LM Studio native chat")
    if "response_format" in body:
        # Structured output (a run with a schema): LM Studio 0.4's native chat takes no
        # response_format (lmstudio-wire.md §9), so such a request goes to /chat/completions.
        # What it gives up is progress before the first token: llama.cpp still reports it
        # (return_progress), other servers get the history-based estimate instead.
        return Route("openai", "the native chat takes no 'response_format' (structured output)")
    built = _native_body(body, passthrough=api == "native")
    if isinstance(built, str):
        return Route("openai", built)
    why = (
        "the client was told to use LM Studio's native chat"
        if api == "native"
        else "LM Studio's native chat reports model loading and prompt processing"
    )
    return Route("native", why, built)


def reports_progress(route: Route, info: ServerInfo, body: Mapping[str, Any]) -> bool:
    """Whether the server will say how prompt processing goes before the first token: LM
    Studio's native chat does, llama.cpp's /chat/completions does when asked for
    ``return_progress``, and any other OpenAI-compatible server is silent until then."""
    if route.api == "native":
        return True
    return info.kind == "llamacpp" and body.get("return_progress") is True


def _native_body(body: Mapping[str, Any], *, passthrough: bool) -> dict[str, Any] | str:
    """The native request for ``body``, or why there is none (a phrase)."""
    messages: Sequence[Any] = body.get("messages") or ()
    system: str | None = None
    user: str | None = None
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            return "a message is not an object"
        role = message.get("role")
        content = _text_of(message.get("content"))
        if role == "system" and i == 0 and content is not None:
            system = content
        elif (
            role == "user"
            and user is None
            and content is not None
            and set(message)
            <= {
                "role",
                "content",
            }
        ):
            user = content
        elif role == "assistant":
            # A conversation's later turns carry the earlier answers, which LM Studio 0.4's
            # native chat cannot take (it keeps conversations itself, by previous_response_id;
            # we keep ours in the store and send "store": false): such a request goes to
            # /v1/chat/completions with the whole messages array, where llama.cpp still
            # reports progress (return_progress) and elsewhere the history-based estimate
            # shows. A first turn (no assistant message yet) still fits the native chat.
            return "the native chat takes no assistant turns"
        else:
            return f"the native chat takes one system prompt and one user message (message {i})"
    if user is None:
        return "the native chat needs one user message"
    native: dict[str, Any] = {"model": body.get("model"), "input": user, "stream": True}
    if system is not None:
        native["system_prompt"] = system
    native["store"] = False  # LM Studio would keep the conversation otherwise
    for key, value in body.items():
        if key in ("model", "messages", *_IMPLIED):
            continue
        if key in _SAME or key in _NATIVE_ONLY:
            native[key] = value
        elif key == "max_tokens":
            native["max_output_tokens"] = value
        elif passthrough and key not in _OPENAI_ONLY:
            native[key] = value
        else:
            return f"the native chat has no {key!r} setting"
    return native
