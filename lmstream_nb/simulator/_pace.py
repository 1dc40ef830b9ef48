"""How fast a simulated model works: its slots, how concurrent requests share its speed, and the
cadence of the progress it reports.

Parallel predictions. LM Studio 0.4 answers up to ``parallel`` predictions per loaded model at
once ("Max Concurrent Predictions", continuous batching: 4 by default for GGUF models on the
llama.cpp engine) and queues the rest; MLX models, and every model in LM Studio 0.3, answer one
at a time. llama.cpp's server does the same with ``-np`` slots. A :class:`Engine` is one loaded
model: a semaphore of ``parallel`` slots, and counts of the requests in prompt processing and in
generation, from which each request's pace is worked out.

How concurrent requests share the speed (per model; a profile's speeds are those of one request
alone):

- Prompt processing is compute-bound: processing several prompts in one batch barely raises the
  total throughput. llama.cpp's ``batched-bench`` README (LLaMA 7B F16 on a GPU) measures a total
  prompt speed of 1187 tok/s for one prompt, 1374 tok/s for 4 and 1363 tok/s for 8. So the
  profile's ``prefill_tps`` is split evenly: with ``k`` prompts in processing, each advances at
  ``prefill_tps / k``.
- Generation is bound by memory bandwidth: one decoding step for several sequences costs little
  more than for one. The same README measures a total generation speed of 41.6 tok/s for one
  sequence, 50.9 for 2, 74.4 for 4 and 139.4 for 8 (1.22x, 1.79x, 3.35x). The simulator's total
  is ``gen_tps * (1 + BATCH_GAIN * (g - 1))`` for ``g`` generating requests (1.25x, 1.75x,
  2.75x: close up to the default 4 slots, cautious beyond), shared evenly, so each of 4 streams
  generates at 0.44x its speed alone. LM Studio publishes no figure of its own (its docs say only
  that the requests share the GPU), hence llama.cpp's, which is its engine for GGUF models.
- Prompt processing and generation of different requests do not slow each other down. This is
  assumed: in llama.cpp a step that carries a prompt batch also takes longer for the sequences
  generating in it, but no published figure separates that cost, and leaving it out keeps one
  request's pace a function of how many others are in the same phase only.
- The pace is decided per step (one batch of prompt tokens, one generated token) from the counts
  when the step begins, so a request that starts or ends changes the others' pace from their next
  step on: close to exact processor sharing while steps are short, and deterministic for a given
  order of arrivals.
- ``parallel=None`` is an idealised server without slots: every request at full speed at once
  (what the benchmark uses to model a server that serves everyone). With one slot nothing is
  ever shared, so the pace is exactly that of one request alone.

Progress cadence (simulated time, so a time scale shrinks it with everything else):

- Prompt processing runs in steps of ``batch_size`` tokens (the scenario's, else 2048 for the
  llama.cpp dialect as ``llama-server -b``, else :data:`LMSTUDIO_BATCH`, LM Studio's default
  "Evaluation Batch Size"). llama.cpp's ``prompt_progress`` chunk comes at 0 processed tokens and
  after every batch, as measured (a 3,635-token prompt with batches of 2048: three chunks, at
  0, 2048 and 3635 processed tokens). LM Studio's native ``prompt_processing.progress`` comes at
  0 and after every step, where a step is a batch but at least ``total / MAX_PROMPT_EVENTS``
  tokens, so a prompt never sends more than ``MAX_PROMPT_EVENTS + 1`` of them (LM Studio does
  not document its cadence; this one is assumed).
- A JIT load reports ``model_load.progress`` :data:`LOAD_STEPS` times, at equal fractions of
  the load time, the last at 1.0 (assumed too).
"""

from __future__ import annotations

import asyncio
import math

__all__ = [
    "BATCH_GAIN",
    "LLAMACPP_BATCH",
    "LMSTUDIO_BATCH",
    "LOAD_STEPS",
    "MAX_PROMPT_EVENTS",
    "Engine",
    "prompt_steps",
]

#: Extra total generation throughput each further concurrent sequence brings (see above).
BATCH_GAIN = 0.25
#: llama-server's default logical batch size (``-b``).
LLAMACPP_BATCH = 2048
#: LM Studio's default "Evaluation Batch Size" (``eval_batch_size`` in ``/api/v1/models``).
LMSTUDIO_BATCH = 512
#: At most this many native prompt-processing progress events after the first one.
MAX_PROMPT_EVENTS = 64
#: Progress events of one JIT load.
LOAD_STEPS = 10


def prompt_steps(total: int, batch: int, *, bounded: bool) -> list[int]:
    """The prompt tokens processed after each step, ending at ``total`` (at least one step).

    ``bounded`` spreads a long prompt over at most :data:`MAX_PROMPT_EVENTS` steps.
    """
    step = max(1, batch)
    if bounded:
        step = max(step, math.ceil(total / MAX_PROMPT_EVENTS))
    marks = list(range(step, total, step))
    return [*marks, total]


class Engine:
    """One loaded model's slots and the counts of the requests sharing it."""

    def __init__(self, parallel: int | None) -> None:
        self.parallel = parallel
        self.slots = None if parallel is None else asyncio.Semaphore(parallel)
        self.prefilling = 0
        self.generating = 0
        self.busy = 0  # slots held (a request gone during prompt processing holds it till the end)

    @property
    def shared(self) -> bool:
        """Whether concurrent requests slow each other down (slots, more than one)."""
        return self.parallel is not None and self.parallel > 1

    def prefill_factor(self) -> float:
        """How much longer a prompt step takes than alone, now."""
        return float(max(1, self.prefilling)) if self.shared else 1.0

    def gen_factor(self) -> float:
        """How much longer a token takes than alone, now."""
        g = max(1, self.generating)
        if not self.shared or g == 1:
            return 1.0
        return g / (1.0 + BATCH_GAIN * (g - 1))

    async def acquire(self) -> None:
        if self.slots is not None:
            await self.slots.acquire()
        self.busy += 1

    def release(self, at: float | None = None) -> None:
        """Free a slot now, or at loop time ``at`` (prompt processing can't be interrupted)."""
        self._later(at, self._free)

    def _free(self) -> None:
        self.busy -= 1
        if self.slots is not None:
            self.slots.release()

    def leave_prefill(self, at: float | None = None) -> None:
        """One prompt less in processing, now or at loop time ``at``."""
        self._later(at, self._prefill_done)

    def _prefill_done(self) -> None:
        self.prefilling -= 1

    @staticmethod
    def _later(at: float | None, action: object) -> None:
        loop = asyncio.get_running_loop()
        assert callable(action)
        if at is None or at <= loop.time():
            action()
        else:
            loop.call_at(at, action)
