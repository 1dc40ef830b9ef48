"""Helpers shared by the store's tests: a fresh store, runs started and finished by hand."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lmstream_nb._store import PromptStore


@pytest.fixture(name="store")
def store_fixture(tmp_path: Path) -> Iterator[PromptStore]:
    """A fresh store in a temporary folder (import ``store_fixture``; tests ask for ``store``)."""
    with PromptStore(tmp_path / "data" / "lmstream.db") as opened:
        yield opened


def start(store: PromptStore, **overrides: Any) -> int:
    values: dict[str, Any] = {
        "prompt_name": "p",
        "prompt_version": 1,
        "template": "Say {{x}}",
        "system": None,
        "messages": [{"role": "user", "content": "Say hi"}],
        "variables": {"x": "hi"},
        "model": "m",
        "base_url": "http://127.0.0.1:1234/v1",
        "started_at": time.time(),
    }
    values.update(overrides)
    return store.start_run(**values)


def finish(store: PromptStore, run_id: int, **overrides: Any) -> None:
    values: dict[str, Any] = {
        "status": "ok",
        "text": "hi",
        "reasoning": "",
        "error": None,
        "finish_reason": "stop",
        "model": None,
        "ttft_s": 0.1,
        "duration_s": 0.5,
        "chunks": 2,
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "tokens_per_s": 4.0,
    }
    values.update(overrides)
    store.finish_run(run_id, **values)


def one_sentence(message: str) -> None:
    """Our messages are one line: what happened, the fact, then ``: what to do.``"""
    assert "\n" not in message, message
    assert ": " in message, message
    assert message.endswith((".", "?")), message


def populate(store: PromptStore) -> dict[str, int]:
    """Six runs at known times (unix 1000..1500) over two prompts, two models, four statuses."""
    plan = [
        ("a", "m1", 1000.0, "ok", "First   answer\n\nwith  spaces " + "y" * 100),
        ("a", "m1", 1100.0, "stalled", "half"),
        ("b", "m2", 1200.0, "ok", "b ok"),
        ("a", "m2", 1300.0, "error", ""),
        (None, "m1", 1400.0, "ok", "inline"),
        ("a", "m1", 1400.0, "ok", "same start, later id"),
    ]
    ids: dict[str, int] = {}
    for i, (name, model, started, status, text) in enumerate(plan):
        run_id = start(
            store,
            prompt_name=name,
            prompt_version=1 if name else None,
            model=model,
            started_at=started,
        )
        finish(
            store,
            run_id,
            status=status,
            text=text,
            ttft_s=0.1 * (i + 1),
            duration_s=float(i + 1),
            error="boom" if status == "error" else None,
        )
        ids[f"{name}@{started:g}"] = run_id
    ids["unfinished"] = start(store, prompt_name="b", model="m2", started_at=1500.0)
    store.append_run_text(ids["unfinished"], "streaming   now")
    return ids
