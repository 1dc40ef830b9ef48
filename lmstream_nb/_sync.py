"""Blocking twins of the async client, for scripts: same arguments, same events, same errors."""

from __future__ import annotations

from collections.abc import Iterator
from types import TracebackType
from typing import Any

from ._client import ChatStream, LMStudioClient, Messages
from ._events import Completion, Event, Stats, StreamFinished
from ._loop import LoopThread, shared_loop
from ._routes import ServerInfo


class SyncChatStream:
    """Iterate to receive events; ``close()`` (or leaving ``with``) stops the server's work."""

    def __init__(self, runner: LoopThread, stream: ChatStream) -> None:
        self._runner = runner
        self._stream = stream
        self._closed = False

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        if self._closed:
            raise StopIteration
        more, event = self._runner.run(self._next())
        if not more:
            self._closed = True
            raise StopIteration
        assert event is not None
        return event

    async def _next(self) -> tuple[bool, Event | None]:
        try:
            return True, await self._stream.__anext__()
        except StopAsyncIteration:
            return False, None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._runner.run(self._stream.aclose())

    def __enter__(self) -> SyncChatStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self._closed = True
            self._runner.submit(self._stream.aclose())

    @property
    def text(self) -> str:
        return self._stream.text

    @property
    def reasoning(self) -> str:
        return self._stream.reasoning

    @property
    def response_id(self) -> str | None:
        return self._stream.response_id

    @property
    def finished(self) -> StreamFinished | None:
        return self._stream.finished

    @property
    def api(self) -> str:
        return self._stream.api

    @property
    def api_reason(self) -> str:
        return self._stream.api_reason

    def stats(self) -> Stats:
        return self._runner.run(self._stats())

    async def _stats(self) -> Stats:
        return self._stream.stats()


class SyncLMStudioClient:
    """``LMStudioClient`` for code that does not use ``await``; it runs on a private loop thread.

    Works the same in scripts, terminal IPython and Jupyter kernels (whose own loop is busy).
    """

    def __init__(self, base_url: str | None = None, **kwargs: Any) -> None:
        self._runner = shared_loop()
        self._client = LMStudioClient(base_url, **kwargs)
        self.base_url = self._client.base_url
        self.url = self._client.url

    def __repr__(self) -> str:
        return f"SyncLMStudioClient(base_url={self.url!r})"

    def __enter__(self) -> SyncLMStudioClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._runner.run(self._client.aclose())

    def list_models(self) -> list[str]:
        return self._runner.run(self._client.list_models())

    def server_info(self) -> ServerInfo:
        return self._runner.run(self._client.server_info())

    def stream_chat(self, messages: Messages, *, model: str, **kwargs: Any) -> SyncChatStream:
        stream = self._client.stream_chat(messages, model=model, **kwargs)
        return SyncChatStream(self._runner, stream)

    def complete(self, messages: Messages, *, model: str, **kwargs: Any) -> Completion:
        return self._runner.run(self._client.complete(messages, model=model, **kwargs))
