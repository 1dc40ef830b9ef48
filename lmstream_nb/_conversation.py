"""Conversations: each turn an ordinary recorded run, sent with the turns before it.

The store keeps the conversation (a named chain of runs, see ``m008_conversations``); the
server keeps nothing (LM Studio's native chat is told ``store: false``, and a request with
earlier answers goes to /chat/completions: see ``_routes``). So the context sent is always the
one the store shows, and nothing is left out of it unless asked: a turn that failed or was
cancelled is recorded but not sent again (``include_failed=True`` sends what it had), and
turns are dropped from the context only by ``drop_oldest``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._client import LMStudioClient
from ._errors import ConversationBusy, ConversationTooLong, LMStreamError, PromptTooLong, render
from ._loop import shared_loop
from ._run import RunResult, arun, default_store
from ._store import PromptStore, RunRecord
from ._sync import SyncLMStudioClient
from ._template import Prompt, prompt_label

#: The conversations (store file, name) with a turn under way in this process: a second turn
#: sent meanwhile would not carry the first, so it is refused (``ConversationBusy``). Front
#: ends run turns on different loops (a notebook's background cells), hence a thread lock.
#: Another process's turn is refused by the store, when the turn is written (``start_run``).
_UNDER_WAY: set[tuple[str, str]] = set()
_UNDER_WAY_LOCK = threading.Lock()


@dataclass(frozen=True)
class Turn:
    """One turn as recorded: the user's message, the answer (what arrived, for a turn that
    failed), its status, and whether the next turn sends it as context."""

    run_id: int
    user: str
    answer: str
    status: str
    error: str | None
    in_context: bool


class Conversation:
    """A named conversation kept in the store: ``send`` the next message, read ``turns``.

    ``prompt`` (a stored prompt's name, or a ``Prompt``) starts it: the first ``send`` renders
    its system prompt and template with the variables given (or, with a text, its system
    prompt and the text). A conversation opened again by name continues where it was, and
    remembers a stored prompt it was started with (an inline ``Prompt`` is not stored).
    ``model``, ``temperature``, ``max_tokens``, ``base_url``, ``budgets`` and ``client`` are
    the defaults of every turn (``send``'s ``options`` may override them).
    """

    def __init__(
        self,
        name: str,
        prompt: Prompt | str | None = None,
        *,
        model: str | None = None,
        store: PromptStore | None = None,
        client: LMStudioClient | SyncLMStudioClient | None = None,
        **run_options: Any,
    ) -> None:
        self.name = check_name(name)
        self.store = store or default_store()
        prompt_name = prompt if isinstance(prompt, str) else getattr(prompt, "name", None)
        record = self.store.conversation(name, create=True, prompt_name=prompt_name)
        if prompt is None and record.prompt_name is not None:
            prompt = record.prompt_name
        self._prompt = prompt
        self._options: dict[str, Any] = {"model": model, **run_options}
        self._client = client._client if isinstance(client, SyncLMStudioClient) else client

    def __repr__(self) -> str:
        return f"<Conversation {self.name!r}, {len(self.turns)} turns>"

    @property
    def prompt(self) -> Prompt | None:
        """The prompt that starts the conversation (a stored one is read when asked for)."""
        if isinstance(self._prompt, str):
            self._prompt = self.store.get(self._prompt)
        return self._prompt

    @property
    def turns(self) -> list[Turn]:
        """Every turn, oldest first, as the store has them."""
        runs = self.store.conversation_runs(self.name)
        start = self.store.conversation(self.name).context_from_run or 0
        return [_turn(run, in_context=run.id >= start and run.status == "ok") for run in runs]

    # -- sending --------------------------------------------------------------------------

    def send(
        self,
        text: str | None = None,
        /,
        *,
        include_failed: bool = False,
        drop_oldest: bool = False,
        options: Mapping[str, Any] | None = None,
        **variables: Any,
    ) -> RunResult:
        """Send ``text`` (a template: ``{{name}}`` is filled from ``variables``) as the next
        message and stream the answer; see :meth:`asend`. Blocks, so it works in a kernel."""
        return shared_loop().run(
            self.asend(
                text,
                include_failed=include_failed,
                drop_oldest=drop_oldest,
                options=options,
                **variables,
            )
        )

    async def asend(
        self,
        text: str | None = None,
        /,
        *,
        include_failed: bool = False,
        drop_oldest: bool = False,
        options: Mapping[str, Any] | None = None,
        **variables: Any,
    ) -> RunResult:
        """Send the next message with the turns before it; the answer is recorded as a turn.

        ``include_failed`` also sends earlier turns that failed or were cancelled (with what
        they had); ``drop_oldest`` leaves out as many of the oldest turns as needed to fit the
        context, for good (see :meth:`drop_oldest`). Without it a conversation that no longer
        fits is refused before sending (``ConversationTooLong``). ``options`` are ``arun``'s
        (``on_event``, ``raise_errors``, ``temperature`` …) for this turn.
        """
        return await self.arun_turn(
            await asyncio.to_thread(self._turn_prompt, text),  # may read a stored prompt
            variables,
            include_failed=include_failed,
            drop_oldest=drop_oldest,
            **dict(options or {}),
        )

    def _turn_prompt(self, text: str | None) -> Prompt:
        base = self.prompt
        if text is None:
            if base is None:
                raise ValueError("send() needs the message text (this conversation has no prompt).")
            return base
        if base is None:
            return Prompt(text)
        return dataclasses.replace(base, template=text, name=None, version=None)

    async def arun_turn(
        self,
        prompt: Prompt,
        variables: Mapping[str, Any] | None = None,
        *,
        include_failed: bool = False,
        drop_oldest: bool = False,
        **options: Any,
    ) -> RunResult:
        """Run ``prompt`` as the next turn (its system prompt counts only on the first): the
        one step ``send``, the magic and the CLI share."""
        key = (str(self.store.path), self.name)
        with _UNDER_WAY_LOCK:
            if key in _UNDER_WAY:
                busy = ConversationBusy(self.name)
                busy.interface = options.get("interface", self._options.get("interface", "python"))
                raise busy
            _UNDER_WAY.add(key)
        try:
            return await self._arun_turn(prompt, variables, include_failed, drop_oldest, options)
        finally:
            with _UNDER_WAY_LOCK:
                _UNDER_WAY.discard(key)

    async def _arun_turn(
        self,
        prompt: Prompt,
        variables: Mapping[str, Any] | None,
        include_failed: bool,
        drop_oldest: bool,
        options: dict[str, Any],
    ) -> RunResult:
        options = {**self._options, **options}
        interface = options.get("interface", "python")
        client = options.pop("client", None) or self._client
        own = client is None
        http = client or LMStudioClient(
            options.get("base_url"), budgets=options.get("budgets"), api=options.get("api", "auto")
        )
        options.pop("base_url", None)
        try:
            while True:
                # The store is synchronous: read from a worker thread, as arun writes.
                runs = await asyncio.to_thread(self.store.conversation_runs, self.name)
                record = await asyncio.to_thread(self.store.conversation, self.name)
                context = self._context(runs, record.context_from_run, include_failed)
                turn = prompt if not runs else dataclasses.replace(prompt, system=None)
                # A later turn sends no system prompt: the values only it uses are not wrong
                # (a front end that shows the prompt's variables sends them every turn).
                unsent = set(prompt.variables) - set(turn.variables)
                variables = {k: v for k, v in (variables or {}).items() if k not in unsent}
                try:
                    messages = [*context, *turn.render(variables)]
                except LMStreamError as exc:
                    exc.interface = interface
                    raise
                model = options.get("model") or turn.model
                count, context_length = await self._count(http, messages, model)
                # llama.cpp refuses a prompt that fills its context exactly (see _check_fits).
                # With no earlier turn in it, the message alone is too long: arun refuses it
                # with the sentence for any prompt (shorten it), as a failed turn.
                earlier = any(m["role"] == "assistant" for m in context)
                if count is None or context_length is None or count < context_length or not earlier:
                    break
                if not drop_oldest or not await asyncio.to_thread(
                    self.drop_oldest, 1, include_failed=include_failed
                ):
                    error = ConversationTooLong(
                        self.name, url=http.url, prompt_tokens=count, context_length=context_length
                    )
                    error.interface = interface
                    raise error
            try:
                result = await arun(
                    turn,
                    variables,
                    store=self.store,
                    client=http,
                    context=context,
                    conversation_id=record.id,
                    parent_run_id=record.head_run_id,
                    **options,
                )
            except PromptTooLong as exc:  # the server refused it: the same ways out
                if not earlier:
                    raise
                raise self._too_long(exc) from exc
            if earlier and isinstance(result.exception, PromptTooLong):  # raise_errors=False
                result.exception = self._too_long(result.exception)
                result.error = render(result.exception)
            result.prompt = prompt_label(turn.name, turn.version, self.name)
            return result
        finally:
            if own:
                await http.aclose()

    def _too_long(self, exc: PromptTooLong) -> ConversationTooLong:
        """The server's refusal of a turn, as the conversation's sentence (the turn is
        recorded as failed, so it is not sent again)."""
        if isinstance(exc, ConversationTooLong):
            return exc
        error = ConversationTooLong(
            self.name,
            url=exc.url,
            prompt_tokens=exc.prompt_tokens,
            context_length=exc.context_length,
            status=exc.status,
            server_message=exc.server_message,
        )
        error.run_id, error.interface = exc.run_id, exc.interface
        return error

    @staticmethod
    def _context(
        runs: list[RunRecord], context_from: int | None, include_failed: bool
    ) -> list[dict[str, str]]:
        """The messages sent before the next one: the first turn's system prompt, then each
        turn kept in the context as its user message and its answer."""
        if not runs:
            return []
        first = runs[0].messages
        messages = [dict(first[0])] if first and first[0].get("role") == "system" else []
        for run in runs:
            if run.id < (context_from or 0) or not _sent_again(run, include_failed):
                continue
            messages.append({"role": "user", "content": _user_text(run)})
            messages.append({"role": "assistant", "content": run.text})
        return messages

    @staticmethod
    async def _count(
        http: LMStudioClient, messages: list[dict[str, str]], model: str | None
    ) -> tuple[int | None, int | None]:
        if not http.check_context:
            return None, None
        info = await http.server_info()
        context_length = info.context_of(model or "")
        if context_length is None:
            return None, None
        return await http.prompt_tokens(messages), context_length

    # -- changing the context -------------------------------------------------------------

    def drop_oldest(self, n: int = 1, *, include_failed: bool = False) -> int:
        """Leave the ``n`` oldest turns still sent out of the context from now on (they stay
        in ``turns`` and the history); return how many were dropped."""
        if n < 1:
            raise ValueError(f"drop_oldest needs a number of turns of at least 1, not {n}")
        record = self.store.conversation(self.name)
        runs = self.store.conversation_runs(self.name)
        start = record.context_from_run or 0
        sent = [r for r in runs if r.id >= start and _sent_again(r, include_failed)]
        dropped = sent[:n]
        if not dropped:
            return 0
        later = [r.id for r in runs if r.id > dropped[-1].id]
        head = record.head_run_id or 0
        self.store.update_conversation(
            self.name,
            head_run_id=record.head_run_id,
            context_from_run=later[0] if later else head + 1,
        )
        return len(dropped)

    def reset(self) -> None:
        """Start again with no turns (the earlier ones stay in the history)."""
        self.store.update_conversation(self.name, head_run_id=None, context_from_run=None)

    def fork(self, new_name: str) -> Conversation:
        """A new conversation with this one's turns so far; the two go on separately."""
        check_name(new_name)  # before anything is written
        self.store.fork_conversation(self.name, new_name)
        return Conversation(
            new_name, self._prompt, store=self.store, client=self._client, **self._options
        )


def check_name(name: object) -> str:
    """A conversation's name, or ValueError with the one sentence every front end shows."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(
            f"A conversation needs a name with some text besides spaces, not {name!r}: "
            "give it one, such as 'lesson'."
        )
    return name


def _sent_again(run: RunRecord, include_failed: bool) -> bool:
    if run.status == "ok":
        return True
    return include_failed and run.status != "unfinished" and bool(run.text)


def _user_text(run: RunRecord) -> str:
    for message in reversed(run.messages):
        if message.get("role") == "user":
            return str(message.get("content", ""))
    return ""


def _turn(run: RunRecord, *, in_context: bool) -> Turn:
    return Turn(run.id, _user_text(run), run.text, run.status, run.error, in_context)


# -- what the magic and the CLI share ----------------------------------------------------------


def runner(
    store: PromptStore, chat: str | None, *, include_failed: bool = False, drop_oldest: bool = False
) -> Callable[..., Awaitable[RunResult]]:
    """What runs a front end's prompt: ``arun``, or with ``--chat NAME`` the conversation's
    next turn (the prompt is then the next message). Both take the same arguments."""
    if chat is None:
        return functools.partial(arun, store=store)
    conversation = Conversation(chat, store=store)
    return functools.partial(
        conversation.arun_turn, include_failed=include_failed, drop_oldest=drop_oldest
    )


CHAT_USAGE = "list | show NAME | reset NAME | fork NAME NEW"
CONVERSATION_HEADERS = ["name", "turns", "sent", "latest", "forked from", "prompt"]
TURN_HEADERS = ["turn", "run", "status", "sent", "message", "answer"]


def chat_command(
    store: PromptStore, words: Sequence[str], *, whole: bool = False
) -> tuple[list[str], list[list[Any]]] | str:
    """``chat list | show NAME | reset NAME | fork NAME NEW`` for the magic and the CLI: a
    table (headers, rows) or a sentence saying what was done. ValueError (whose message is
    ``CHAT_USAGE``) for words that make no such command. ``whole`` keeps the messages and
    answers unclipped (for JSON)."""
    action, *names = words or [""]
    wanted = {"list": 0, "show": 1, "reset": 1, "fork": 2}.get(action)
    if wanted is None or len(names) != wanted:
        raise ValueError(CHAT_USAGE)
    if action == "list":
        ids = {c.id: c.name for c in store.conversations()}
        rows: list[list[Any]] = []
        for record in store.conversations():
            turns = Conversation(record.name, store=store).turns
            rows.append(
                [
                    record.name,
                    len(turns),
                    sum(t.in_context for t in turns),
                    turns[-1].status if turns else None,
                    ids.get(record.forked_from) if record.forked_from is not None else None,
                    record.prompt_name,
                ]
            )
        return CONVERSATION_HEADERS, rows
    store.conversation(names[0])  # ConversationNotFound, with close names
    chat = Conversation(names[0], store=store)
    if action == "show":
        shown = str if whole else _clip
        return TURN_HEADERS, [
            [i, t.run_id, t.status, t.in_context, shown(t.user), shown(t.answer)]
            for i, t in enumerate(chat.turns, 1)
        ]
    if action == "reset":
        chat.reset()
        return f"The conversation {names[0]!r} starts again (its turns stay in the history)."
    chat.fork(names[1])
    return f"The conversation {names[1]!r} goes on from {names[0]!r} with its turns so far."


def _clip(text: str, width: int = 40) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"
