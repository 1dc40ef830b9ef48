"""What a front end shows when a run ends: one mapping for the magic, the runner and the relay.

A person sees one of three endings: done, failed or cancelled. A finished run's recorded status
says which (``ok`` is done, ``cancelled`` is cancelled, every other status failed). A front end
that gets an exception instead (``arun`` raises by default) reads the same ending from the
exception: a cancellation (Stop, Ctrl-C, a cancelled task) is cancelled, anything else failed.
The sentence to show comes with it, so every front end says the same thing about the same run.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

from ._errors import LMStreamError, render

DONE, FAILED, CANCELLED = "done", "failed", "cancelled"

#: What a cancelled run says (the same sentence ``arun`` records for it).
CANCELLED_MESSAGE = "Cancelled before the answer was complete; the text received is kept."


def view_state(status: str) -> str:
    """The ending a recorded run status shows as: ``done``, ``failed`` or ``cancelled``."""
    if status == "ok":
        return DONE
    if status == "cancelled":
        return CANCELLED
    return FAILED


class Finished(Protocol):
    """A run that returned (``RunResult``): its status, its error sentence and its id."""

    @property
    def status(self) -> str: ...

    @property
    def error(self) -> str | None: ...

    @property
    def run_id(self) -> int: ...


@dataclass(frozen=True)
class Ending:
    """How a run ended, as a front end shows it."""

    state: str  # DONE, FAILED or CANCELLED
    message: str | None  # the one sentence saying what happened; None when done
    run_id: int | None  # the recorded run, when one was recorded

    @property
    def ok(self) -> bool:
        return self.state == DONE


def ending(outcome: Finished | BaseException) -> Ending:
    """The ending of a run that returned a result or raised ``outcome``."""
    if not isinstance(outcome, BaseException):
        state = view_state(outcome.status)
        message = outcome.error or (CANCELLED_MESSAGE if state == CANCELLED else None)
        return Ending(state, None if state == DONE else message, outcome.run_id)
    if isinstance(outcome, (asyncio.CancelledError, KeyboardInterrupt)):
        return Ending(CANCELLED, CANCELLED_MESSAGE, None)
    if isinstance(outcome, LMStreamError):
        return Ending(FAILED, render(outcome), outcome.run_id)
    return Ending(FAILED, failed_inside(outcome), None)


def failed_inside(error: BaseException) -> str:
    """What a run says when it ended on an error that is not ours: a bug in lmstream_nb or in
    a callback (the same sentence ``arun`` records), never hidden."""
    return f"The run failed inside lmstream_nb or a callback ({error!r})."
