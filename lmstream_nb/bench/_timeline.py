"""A cell's expected timeline on the simulator, in simulated seconds, and how near each verdict is
to flipping.

The simulated server is deterministic (jitter 0, one first-come-first-served queue per model), so
when each request of a cell is queued, served and answered, and when the client's total timeout
or budgets fire, can be worked out before the cell runs. That gives every verdict a margin: the
simulated time between the event that decides it and the boundary that would flip it (a blocking
answer 11 s before its timeout has a margin of 11 s; one that would have come 5 s after it, 5 s).
The runner turns that margin into real time when it picks each cell's time scale, and the tests
compare the measured table with the predicted one.

This is a small discrete-event model of the simulator's queue and of the client's rules, kept
here beside the workload rather than in the simulator, which must not know what a client does:

- the server: one queue per model with ``max_parallel`` slots; prompt processing cannot be
  interrupted (a client that leaves during it frees the slot only when it ends), generation can;
  a 503 or a dropped connection before the queue takes no slot. With more than one slot the
  requests in them share the model's speed the way the simulator's ``_pace`` does it: each step
  of prompt processing takes as many times longer as there are prompts in processing when it
  starts, each wait between two answer events as the shared generation speed says when the
  previous event goes out (a step under way keeps its pace when another request starts or ends);
- a blocking request: its total timeout counts from sending and spans its retries; a connection
  dropped after the headers is retried at once (once), a 503 after the back-off;
- a stream: the first-token budget counts only while none of the client's streams is answering
  or reporting progress (``Budgets.first_token``), the idle budget between two events; a stream
  that reports progress (``Rules.progress``: LM Studio 0.4's native chat) shows it from the
  moment its prompt processing starts, and from then on only a gap between two reports longer
  than the idle budget could stop it; a failure before the first token is retried after the
  back-off, one after it is reported.

Each row meets its fault on its first attempt only, like the simulator's ``fault_attempts=1``.
If the simulator or the client change these rules, test_bench's comparison of the predicted and
the measured table fails, which is the point.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

from .._config import Retries
from ..simulator._pace import BATCH_GAIN

__all__ = ["Expected", "Forecast", "Rules", "TimedRow", "expect_cell", "forecast_cell"]

_EPS = 1e-9


@dataclass(frozen=True)
class TimedRow:
    """One request of a cell as the simulator serves it (simulated seconds, alone on the model).

    ``steps``: how long each step of its prompt processing takes alone (they add up to
    ``prefill_s``); empty for one step.
    """

    prefill_s: float
    events: int  # data events carrying the answer text
    event_s: float  # from one event to the next
    fault: str | None = None  # one of FAULT_KINDS, on the first attempt only
    stall_s: float = 0.0  # the pause a "stall" fault inserts half-way
    steps: tuple[float, ...] = ()

    def prompt_steps(self) -> tuple[float, ...]:
        return self.steps or (self.prefill_s,)


@dataclass(frozen=True)
class Rules:
    """How the client and the server of a cell behave (simulated seconds, ``None``: no limit).

    ``max_parallel``: the server's slots per model (``None``: everyone at once at full speed).
    ``progress``: a stream hears of its prompt processing (LM Studio 0.4's native chat).
    """

    kind: str  # "stream" or "blocking"
    concurrency: int
    timeout_s: float | None
    first_token_s: float | None
    idle_s: float | None
    retries: Retries
    max_parallel: int | None
    progress: bool = False


@dataclass(frozen=True)
class Expected:
    """The predicted outcome of one row.

    ``margin_s``: simulated seconds between the event that decides a verdict spanning the whole
    request (a total timeout, a first-token budget) and the boundary that would flip it;
    ``gap_margin_s``: the same for a verdict decided by one gap between two events of a flowing
    stream (the idle budget); ``inf`` when no clock decides it. ``ttfv_s``, ``ttfp_s`` and
    ``total_s``: when the first visible output (text), the first visible sign of progress and
    the end are due, counted from sending, for a successful row.
    """

    status: str
    margin_s: float
    gap_margin_s: float
    decided_s: float  # since the cell started
    ttfv_s: float | None = None
    total_s: float | None = None
    ttfp_s: float | None = None


@dataclass(eq=False)
class _Attempt:
    row: int
    faulty: bool
    state: str = "queued"  # queued, prefill, generating, done, gone
    step: int = 0  # the prompt step under way
    step_end: float = 0.0
    sent: int = 0  # answer events sent
    last_at: float = 0.0  # when the last of them went out
    next_at: float = 0.0  # when the next one is due (its wait is already decided)
    spacing: float = 0.0  # the wait between the later ones, at the model's pace now
    stall_at: int | None = None  # the event the stall delays
    version: int = 0  # a new plan of the generation cancels the events of the old one


@dataclass
class _Trace:
    status: str | None = None
    t0: float = 0.0
    decided: float = 0.0
    attempt: _Attempt | None = None
    retries: int = 0
    silence: float = 0.0  # the longest wait counted against the first-token budget
    first_at: float | None = None
    progress_at: float | None = None  # the first progress report
    done_at: float | None = None
    events: int = 0  # events the stream received
    widest: float = 0.0  # the longest gap between two events (or two progress reports)
    stall_gap: float | None = None  # the gap of a stall that the idle budget ended


@dataclass
class _Model:
    """One run of the model. ``open_row`` has no deciding budget (to see how late it would be)."""

    rows: Sequence[TimedRow]
    rules: Rules
    open_row: int | None = None
    now: float = 0.0
    heap: list[tuple[float, int, Callable[[], None]]] = field(default_factory=list)
    seq: itertools.count[int] = field(default_factory=itertools.count)
    queue: deque[_Attempt] = field(default_factory=deque)
    todo: deque[int] = field(default_factory=deque)
    waiting: list[int] = field(default_factory=list)  # streams before any sign of life
    answering: int = 0
    progress_at: float = -math.inf
    free: float = 0.0
    prefilling: int = 0
    generating: list[_Attempt] = field(default_factory=list)
    traces: list[_Trace] = field(default_factory=list)

    def run(self) -> list[_Trace]:
        self.free = math.inf if self.rules.max_parallel is None else self.rules.max_parallel
        self.traces = [_Trace() for _ in self.rows]
        self.todo.extend(range(len(self.rows)))
        for _ in range(self.rules.concurrency):
            self._next_row()
        while self.heap:
            self.now, _, action = heapq.heappop(self.heap)
            action()
        return self.traces

    def _at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self.heap, (when, next(self.seq), action))

    @property
    def _shared(self) -> bool:
        slots = self.rules.max_parallel
        return slots is not None and slots > 1

    @property
    def _reports(self) -> bool:
        return self.rules.kind == "stream" and self.rules.progress

    # the client

    def _next_row(self) -> None:
        if not self.todo:
            return
        i = self.todo.popleft()
        trace = self.traces[i]
        trace.t0 = self.now
        rules = self.rules
        if rules.kind == "blocking":
            if rules.timeout_s is not None and i != self.open_row:
                self._at(self.now + rules.timeout_s, lambda: self._timed_out(i, "timeout"))
        else:
            self.waiting.append(i)
            if self.answering == 0:
                self._arm_first_token(i)
        self._send(i, faulty=self.rows[i].fault is not None)

    def _finish(self, i: int, status: str) -> None:
        trace = self.traces[i]
        trace.status, trace.decided = status, self.now
        if i in self.waiting:
            self.waiting.remove(i)
        self._next_row()

    def _retry(self, i: int, failed: str) -> None:
        """A failure before any text: try again after the back-off, or give up."""
        trace = self.traces[i]
        trace.retries += 1
        if trace.retries > self.rules.retries.attempts:
            self._finish(i, failed)
            return
        delay = self.rules.retries.delay(trace.retries)
        self._at(self.now + delay, lambda: self._send(i, faulty=False))

    def _timed_out(self, i: int, status: str) -> None:
        trace = self.traces[i]
        if trace.status is not None:
            return
        if status == "first_token_timeout":
            trace.silence = max(trace.silence, self.now - max(trace.t0, self.progress_at))
        if trace.attempt is not None:
            self._leave(trace.attempt)
        self._finish(i, status)

    def _arm_first_token(self, i: int) -> None:
        budget = self.rules.first_token_s
        if budget is None or i == self.open_row:
            return
        self._at(max(self.traces[i].t0, self.progress_at) + budget, lambda: self._check_first(i))

    def _check_first(self, i: int) -> None:
        trace = self.traces[i]
        budget = self.rules.first_token_s
        assert budget is not None
        if trace.status is not None or i not in self.waiting or self.answering > 0:
            return  # answered, alive, or re-armed when the last answering stream ends
        due = max(trace.t0, self.progress_at) + budget
        if self.now >= due:
            self._timed_out(i, "first_token_timeout")
        else:  # progress of another stream moved the budget on
            self._at(due, lambda: self._check_first(i))

    def _sign_of_life(self) -> None:
        """A first token or a progress report of one of the client's streams: the silence every
        waiting stream was counting ends here."""
        if self.answering == 0:
            for j in self.waiting:
                trace = self.traces[j]
                trace.silence = max(trace.silence, self.now - max(trace.t0, self.progress_at))
        self.progress_at = self.now

    def _reading(self, i: int) -> None:
        """A progress report of row ``i``: it is alive from now on."""
        trace = self.traces[i]
        if trace.progress_at is None:
            trace.progress_at = self.now
        self._sign_of_life()
        if i in self.waiting:
            self.waiting.remove(i)

    def _first_token(self, i: int) -> None:
        self._sign_of_life()
        if i in self.waiting:
            self.waiting.remove(i)
        self.traces[i].first_at = self.now
        self.answering += 1

    def _stream_ended(self) -> None:
        self.answering -= 1
        self.progress_at = self.now
        if self.answering == 0:
            for j in self.waiting:
                self._arm_first_token(j)

    # the server

    def _send(self, i: int, *, faulty: bool) -> None:
        trace = self.traces[i]
        if trace.status is not None:
            return  # the total timeout ran out during the back-off
        fault = self.rows[i].fault if faulty else None
        if fault == "error_before":  # a 503 at once, no slot taken
            trace.attempt = None
            self._retry(i, "error")
            return
        if fault == "disconnect_before":  # headers, then the connection drops, no slot taken
            trace.attempt = None
            if self.rules.kind == "blocking":
                self._send(i, faulty=False)  # a reset is retried at once, once
            else:
                self._retry(i, "interrupted")
            return
        attempt = _Attempt(i, faulty)
        trace.attempt = attempt
        self.queue.append(attempt)
        self._pump()

    def _pump(self) -> None:
        while self.free > 0 and self.queue:
            attempt = self.queue.popleft()
            if attempt.state == "gone":
                continue
            self.free -= 1
            self._prefill(attempt)

    def _release(self) -> None:
        self.free += 1
        self._pump()

    def _prefill_factor(self) -> float:
        return float(max(1, self.prefilling)) if self._shared else 1.0

    def _prefill(self, attempt: _Attempt) -> None:
        """Prompt processing starts: the model counts it, it reports 0 (when it reports)."""
        attempt.state = "prefill"
        self.prefilling += 1
        if self._reports:
            self._reading(attempt.row)
        self._step(attempt, 0)

    def _step(self, attempt: _Attempt, k: int) -> None:
        """Prompt step ``k`` begins, at the pace of the prompts in processing now."""
        took = self.rows[attempt.row].prompt_steps()[k] * self._prefill_factor()
        attempt.step, attempt.step_end = k, self.now + took
        idle, budget = self.rules.idle_s, self.rules.first_token_s
        if self._reports:
            trace = self.traces[attempt.row]
            trace.widest = max(trace.widest, took)
            # Progress that stops for longer than the idle budget fails the stream, though
            # never before the first-token budget would have (Budgets).
            floor = math.inf if budget is None else trace.t0 + budget
            due = math.inf if idle is None else max(self.now + idle, floor)
            if attempt.step_end > due and attempt.row != self.open_row:
                self._at(due, partial(self._progress_stopped, attempt, k))
        self._at(attempt.step_end, partial(self._stepped, attempt, k))

    def _progress_stopped(self, attempt: _Attempt, k: int) -> None:
        if attempt.state == "prefill" and attempt.step == k:
            self._timed_out(attempt.row, "first_token_timeout")

    def _stepped(self, attempt: _Attempt, k: int) -> None:
        if attempt.state != "prefill" or attempt.step != k:
            return
        if self._reports:
            self._reading(attempt.row)
        if k + 1 < len(self.rows[attempt.row].prompt_steps()):
            self._step(attempt, k + 1)
            return
        self.prefilling -= 1
        self._generate(attempt)

    def _leave(self, attempt: _Attempt) -> None:
        """The client went away: a queued request leaves the queue, prompt processing runs on."""
        state, attempt.state = attempt.state, "gone"
        if state == "prefill":
            left = sum(self.rows[attempt.row].prompt_steps()[attempt.step + 1 :])
            self._at(attempt.step_end + left * self._prefill_factor(), self._prefill_gone)
        elif state == "generating":
            self._regear(leaving=attempt)
            self._release()

    def _prefill_gone(self) -> None:
        self.prefilling -= 1
        self._release()

    # generation, at the shared pace

    def _gen_factor(self) -> float:
        g = len(self.generating)
        if not self._shared or g <= 1:
            return 1.0
        return g / (1.0 + BATCH_GAIN * (g - 1))

    def _time_of(self, attempt: _Attempt, j: int) -> float:
        """When answer event ``j`` (not before the last one sent) goes out, at today's pace."""
        if j < attempt.sent:
            return attempt.last_at
        stall_at = attempt.stall_at
        extra = 0.0
        if stall_at is not None and attempt.sent < stall_at <= j:
            extra = self.rows[attempt.row].stall_s
        return attempt.next_at + (j - attempt.sent) * attempt.spacing + extra

    def _advance(self, attempt: _Attempt) -> None:
        """Send what is due by now at the pace decided so far (the wait under way keeps it)."""
        if attempt.next_at > self.now + _EPS:
            return
        last = self.rows[attempt.row].events - 1
        if attempt.spacing > 0:
            j = attempt.sent + math.floor((self.now - attempt.next_at) / attempt.spacing + _EPS)
            stall = attempt.stall_at
            if stall is not None and attempt.sent < stall <= j:
                rest = self.now - attempt.next_at - self.rows[attempt.row].stall_s
                j = max(stall - 1, attempt.sent + math.floor(rest / attempt.spacing + _EPS))
        else:
            j = last
        j = min(j, last)
        attempt.last_at = self._time_of(attempt, j)
        attempt.next_at = self._time_of(attempt, j + 1)
        attempt.sent = j + 1

    def _regear(self, joining: _Attempt | None = None, leaving: _Attempt | None = None) -> None:
        """One request more or less in generation: the others send what is due at the old pace,
        then every later wait is at the new one, and each one's next milestone is planned."""
        for other in self.generating:
            self._advance(other)
        if leaving is not None:
            self.generating.remove(leaving)
        if joining is not None:
            self.generating.append(joining)
        pace = self._gen_factor()
        for attempt in self.generating:
            row = self.rows[attempt.row]
            attempt.spacing = row.event_s * pace
            trace = self.traces[attempt.row]
            if row.events >= 2:
                trace.widest = max(trace.widest, attempt.spacing)
            if attempt is joining:  # the wait before event 1 is decided now
                stall = row.stall_s if attempt.stall_at == 1 else 0.0
                attempt.next_at = self.now + attempt.spacing + stall
            attempt.version += 1
            self._milestone(attempt)

    def _generate(self, attempt: _Attempt) -> None:
        """Prompt processing ended: the first event goes out at once."""
        attempt.state = "generating"
        row, i = self.rows[attempt.row], attempt.row
        if self.rules.kind == "stream":
            self._first_token(i)
        half = max(1, row.events // 2)
        fault = row.fault if attempt.faulty else None
        attempt.stall_at = half if fault == "stall" and half < row.events else None
        attempt.sent, attempt.last_at = 1, self.now
        attempt.next_at = self.now  # replaced in _regear, once the pace is known
        self._regear(joining=attempt)

    def _milestone(self, attempt: _Attempt) -> None:
        """The next event of ``attempt`` that matters (its end, a drop, a stall), as planned now."""
        row = self.rows[attempt.row]
        half = max(1, row.events // 2)
        fault = row.fault if attempt.faulty else None
        version = attempt.version
        action: Callable[[], None]
        if fault == "disconnect_after" and half < row.events:
            when = self._time_of(attempt, half - 1)
            action = partial(self._dropped, attempt, half)
        elif attempt.stall_at is not None and self.rules.kind == "stream":
            idle = self.rules.idle_s
            gap = attempt.spacing + row.stall_s
            if idle is not None and gap > idle:
                when = self._time_of(attempt, half - 1) + idle
                action = partial(self._stalled, attempt, half, gap)
            else:
                when = self._time_of(attempt, row.events - 1)
                action = partial(self._answered, attempt, row.events)
        else:
            when = self._time_of(attempt, row.events - 1)
            action = partial(self._answered, attempt, row.events)

        def fire() -> None:
            if attempt.version == version and attempt.state == "generating":
                action()

        self._at(max(when, self.now), fire)

    def _done(self, attempt: _Attempt) -> None:
        self._advance(attempt)
        attempt.state = "done"
        self._regear(leaving=attempt)
        self._release()

    def _answered(self, attempt: _Attempt, events: int) -> None:
        self._done(attempt)
        i = attempt.row
        self.traces[i].done_at = self.now
        self.traces[i].events = events
        if self.rules.kind == "stream":
            self._stream_ended()
        self._finish(i, "ok")

    def _dropped(self, attempt: _Attempt, events: int) -> None:
        self._done(attempt)
        i = attempt.row
        if self.rules.kind == "stream":
            self.traces[i].events = events
            self._stream_ended()
            self._finish(i, "interrupted")
        else:
            self._send(i, faulty=False)  # a reset is retried at once, once

    def _stalled(self, attempt: _Attempt, events: int, gap: float) -> None:
        self._done(attempt)  # the client hangs up during generation, which stops it
        trace = self.traces[attempt.row]
        trace.events, trace.stall_gap = events, gap
        self._stream_ended()
        self._finish(attempt.row, "stalled")


@dataclass(frozen=True)
class Forecast:
    """What the model predicts for a cell.

    ``rows``: each row's outcome (in row order) when the rows sent together reach the server
    in the order they are sent. ``statuses``: how many rows end with each status, or ``None``
    when the order in which rows sent together reach the server decides that (a race the
    benchmark does not control, so no margin can make it reproducible). ``margin_s`` and
    ``gap_margin_s``: the closest verdicts over every such order; ``decided_s``: the latest.
    """

    rows: tuple[Expected, ...]
    statuses: dict[str, int] | None
    margin_s: float
    gap_margin_s: float
    decided_s: float


#: Beyond this many distinct arrival orders a cell is not searched, and counts as decided by
#: its order unless every row is alike.
_MAX_ORDERS = 500


def forecast_cell(rows: Sequence[TimedRow], rules: Rules) -> Forecast:
    """Predict a cell over every distinct order in which its first rows can reach the server.

    The first ``concurrency`` rows are sent at the same moment, so any of them may be queued
    first; rows that only differ in their position are alike, so only orders of different
    faults are tried. Later rows are sent as earlier ones end, in row order.
    """
    together = min(rules.concurrency, len(rows))
    orders = _orders([rows[i].fault for i in range(together)])
    if orders is None:
        expected = tuple(expect_cell(rows, rules))
        return Forecast(
            expected,
            None,
            math.inf,
            min((e.gap_margin_s for e in expected), default=math.inf),
            max((e.decided_s for e in expected), default=0.0),
        )
    outcomes: list[list[Expected]] = []
    for order in orders:
        arranged = [rows[i] for i in order] + list(rows[together:])
        predicted = expect_cell(arranged, rules)
        back = list(predicted)
        for position, i in enumerate(order):
            back[i] = predicted[position]
        outcomes.append(back)
    counts = [_counts(outcome) for outcome in outcomes]
    every = [e for outcome in outcomes for e in outcome]
    return Forecast(
        rows=tuple(outcomes[0]),
        statuses=counts[0] if all(c == counts[0] for c in counts) else None,
        margin_s=min((e.margin_s for e in every), default=math.inf),
        gap_margin_s=min((e.gap_margin_s for e in every), default=math.inf),
        decided_s=max((e.decided_s for e in every), default=0.0),
    )


def _counts(expected: Sequence[Expected]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in expected:
        counts[e.status] = counts.get(e.status, 0) + 1
    return counts


def _orders(kinds: Sequence[str | None]) -> list[list[int]] | None:
    """Index orders of ``kinds`` that differ in some position's kind, the sent order first;
    ``None`` when there are more than ``_MAX_ORDERS``."""
    groups: dict[str | None, list[int]] = {}
    for i, kind in enumerate(kinds):
        groups.setdefault(kind, []).append(i)
    count = math.factorial(len(kinds))
    for members in groups.values():
        count //= math.factorial(len(members))
    if count > _MAX_ORDERS:
        return None
    out: list[list[int]] = []

    def place(prefix: list[int], left: dict[str | None, list[int]]) -> None:
        if not any(left.values()):
            out.append(prefix)
            return
        for kind, members in left.items():
            if members:
                place([*prefix, members[0]], {**left, kind: members[1:]})

    place([], groups)
    sent = list(range(len(kinds)))
    return [sent, *(order for order in out if order != sent)]


def expect_cell(rows: Sequence[TimedRow], rules: Rules) -> list[Expected]:
    """The predicted outcome and margin of each row of a cell, in row order.

    A verdict decided by a timeout (a blocking request's total timeout, a stream's first-token
    budget) gets its margin from a second run of the model in which that row has no such limit:
    how much later than the limit its answer (or first token) would have come.
    """
    traces = _Model(rows, rules).run()
    out: list[Expected] = []
    for i, trace in enumerate(traces):
        status = trace.status or "ok"
        margins, gaps = [math.inf], [math.inf]
        if rules.kind == "stream" and rules.first_token_s is not None:
            silence = trace.silence
            if status == "first_token_timeout":
                silence = _Model(rows, rules, open_row=i).run()[i].silence
            margins.append(abs(rules.first_token_s - silence))
        if rules.kind == "stream" and rules.idle_s is not None and trace.widest > 0:
            gaps.append(abs(rules.idle_s - trace.widest))
        if trace.stall_gap is not None and rules.idle_s is not None:
            gaps.append(trace.stall_gap - rules.idle_s)
        if rules.kind == "blocking" and rules.timeout_s is not None:
            done = trace.done_at
            if status == "timeout":
                done = _Model(rows, rules, open_row=i).run()[i].done_at
            if done is not None:
                margins.append(abs(rules.timeout_s - (done - trace.t0)))
        ok = status == "ok"
        first = trace.first_at if rules.kind == "stream" else trace.done_at
        sign = first if trace.progress_at is None else trace.progress_at
        out.append(
            Expected(
                status=status,
                margin_s=min(margins),
                gap_margin_s=min(gaps),
                decided_s=trace.decided,
                ttfv_s=None if not ok or first is None else first - trace.t0,
                total_s=None if not ok or trace.done_at is None else trace.done_at - trace.t0,
                ttfp_s=None if not ok or sign is None else sign - trace.t0,
            )
        )
    return out
