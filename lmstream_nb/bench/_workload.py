"""What the benchmark sends: the speed profile it imitates, the prompt sizes, the injected faults.

The numbers live here, apart from the code that runs them, so a reader can check them against
their sources without reading any asyncio. Everything is plain, frozen data and deterministic:
the same seed gives the same prompts and the same faults on every machine, which is what lets
two runs at different time scales be compared verdict for verdict.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

__all__ = [
    "DEFAULT_QUEUES",
    "FAULT_KINDS",
    "LAPTOP_GPU",
    "MODES",
    "PRE_FIRST_TOKEN_FAULTS",
    "SizeBucket",
    "SpeedProfile",
    "Workload",
    "default_workload",
    "queue_label",
    "quick_workload",
]


@dataclass(frozen=True)
class SpeedProfile:
    """How fast the imagined machine is, and where the figures come from.

    ``prefill_tps``: prompt processing, tokens per second. ``gen_tps``: generation, tokens per
    second. ``load_s``: a just-in-time model load (the simulator starts with the model loaded,
    so it only matters for a cold real server). ``source``: the measurements behind the numbers.
    """

    name: str
    prefill_tps: float
    gen_tps: float
    load_s: float
    source: str

    def service_s(self, prompt_tokens: int, answer_tokens: int) -> float:
        """Seconds one request keeps the model busy: prompt processing, then generation."""
        return prompt_tokens / self.prefill_tps + answer_tokens / self.gen_tps


#: An 8B model (Q4) on a laptop-class GPU, the simulator's own "laptop-gpu" profile.
LAPTOP_GPU = SpeedProfile(
    name="laptop-gpu",
    prefill_tps=150.0,
    gen_tps=30.0,
    load_s=7.0,
    source=(
        "Rounded down from an Apple M2 Pro GPU running a 7B Q4_0 model (~170 tok/s prompt "
        "processing, ~35 tok/s generation; "
        "https://github.com/XiongjieDai/GPU-Benchmarks-on-LLM-Inference/issues/1) towards "
        "slower laptops (an i9-13900K CPU does ~55 / ~18 tok/s on a 7B, "
        "https://github.com/ggml-org/llama.cpp/issues/34); load time of an 8B Q4 model "
        "(4.69 GB) measured at 6.9 s (https://github.com/lmstudio-ai/lms/issues/419)."
    ),
)


#: The simulated server's prediction slots per model, one pass of the benchmark each: LM Studio
#: 0.4's default for GGUF models (llama.cpp engine), and one at a time, as MLX models and every
#: model of LM Studio 0.3 answer (https://lmstudio.ai/docs/app/advanced/parallel-requests).
DEFAULT_QUEUES: tuple[int | None, ...] = (4, 1)


def queue_label(parallel: int | None) -> str:
    """How the tables name a queue model: "parallel 4", "one at a time", "all at once"."""
    if parallel is None:
        return "all at once"
    return "one at a time" if parallel == 1 else f"parallel {parallel}"


#: The ways to ask: a blocking request, a stream with progress (LM Studio 0.4's native chat),
#: a stream without (the OpenAI-compatible endpoint, silent until the first token).
MODES = ("blocking", "stream", "stream-openai")


@dataclass(frozen=True)
class SizeBucket:
    """One prompt size: about ``prompt_tokens`` in, ``answer_tokens`` out."""

    name: str
    prompt_tokens: int
    answer_tokens: int


#: Kinds of injected faults (``faults=`` rate > 0, simulator only). Each is transient: it hits
#: the first request of a row, and a retry of that row is answered normally.
#: ``disconnect_before`` - the server drops the connection before the first token;
#: ``error_before`` - the server answers 503 (busy, or restarting) before the first token;
#: ``stall`` - the answer pauses half-way for three idle budgets (a stream reports it as stalled);
#: ``disconnect_after`` - the connection drops half-way through the answer.
#: The first two happen before any text, so retrying them is safe and the client does; the
#: last two happen after text arrived, so they are reported, never retried.
FAULT_KINDS = ("disconnect_before", "error_before", "stall", "disconnect_after")
#: The faults a retry before the first token can recover from.
PRE_FIRST_TOKEN_FAULTS = ("disconnect_before", "error_before")


@dataclass(frozen=True)
class Workload:
    """The prompt sizes to run. Each cell (mode x size x concurrency ``c``) sends ``c`` prompts
    at once (times ``rows_per_user``), the way ``c`` people pressing Enter together would."""

    buckets: tuple[SizeBucket, ...]
    rows_per_user: int = 1

    def rows(self, concurrency: int) -> int:
        return concurrency * self.rows_per_user

    def prompt_text(
        self, bucket: SizeBucket, row: int, *, overrides: dict[str, object] | None
    ) -> str:
        """A prompt of about ``bucket.prompt_tokens`` tokens (4 characters each).

        ``overrides`` (simulator only) are written in as a ``[[sim {...}]]`` marker: the
        simulator reads its per-request scenario from it; a real server never sees one.
        """
        head = (
            f"Benchmark prompt {bucket.name} #{row}: summarise the notes below in about "
            f"{bucket.answer_tokens} tokens.\n"
        )
        if overrides is not None:
            head = f"[[sim {json.dumps(overrides, sort_keys=True)}]]\n" + head
        target = max(bucket.prompt_tokens * 4, len(head))
        words = ("note", "river", "ledger", "signal", "harbour", "matrix", "amber", "quiet")
        # The words cycle from ``row`` on; repeating one turn of the cycle is the same text as
        # appending word after word, without a Python loop over a 64k-token prompt.
        turn = "".join(words[(row + i) % len(words)] + " " for i in range(len(words)))
        body = turn * ((target - len(head)) // len(turn) + 1)
        return (head + body)[:target]

    def fault(
        self,
        bucket: SizeBucket,
        row: int,
        rate: float,
        seed: int,
        kinds: tuple[str, ...] = FAULT_KINDS,
    ) -> str | None:
        """The fault injected into one row, the same in every mode and at every scale."""
        if rate <= 0:
            return None
        rng = random.Random(f"lmstream-bench|{seed}|{bucket.name}|{row}")
        if rng.random() >= rate:
            return None
        return rng.choice(kinds)


def fault_overrides(kind: str | None, events: int, idle_s: float) -> dict[str, object]:
    """The simulator scenario fields that produce a fault kind in an answer of ``events`` data
    events (simulated seconds)."""
    half = max(1, events // 2)
    once = {"fault_attempts": 1}
    if kind == "stall":
        return {"stall_at": half, "stall_s": 3 * idle_s, **once}
    if kind == "disconnect_before":
        return {"disconnect_at": 0, **once}
    if kind == "error_before":
        return {"http_status": 503, "error_message": "Model is busy, try again.", **once}
    if kind == "disconnect_after":
        return {"disconnect_at": half, **once}
    return {}


def default_workload() -> Workload:
    """Five sizes from a short question to a 64k-token document.

    The sizes are picked so that no cell sits near a verdict boundary on the default profile:
    with ``k`` requests queued one behind the other (k = 1..8), the k-th one finishes at least
    9.7 % away from 30, 120 and 300 s, and the longest prompt processing (427 s) stays 29 %
    inside the 600 s first-token budget. In real time the runner widens that further, by
    running the cells with the closest verdicts slower (see ``_runner``). Queued behind each
    other, eight 64k-token prompts keep the simulated server busy for 92 minutes; the third
    of three finishes after 35.
    """
    return Workload(
        buckets=(
            SizeBucket("0.5k", 500, 250),  # 12 s of work on laptop-gpu
            SizeBucket("2k", 2_000, 400),  # 27 s
            SizeBucket("7.5k", 7_500, 500),  # 67 s
            SizeBucket("20k", 20_000, 1_600),  # 2 min 13 s to the first token, 3 min 7 s in all
            SizeBucket("64k", 64_000, 8_000),  # 7 min 7 s to the first token, 11 min 33 s
        )
    )


def quick_workload() -> Workload:
    """A short question and a long document: enough to show the headline, in seconds."""
    return Workload(buckets=(SizeBucket("0.5k", 500, 250), SizeBucket("20k", 20_000, 1_600)))
