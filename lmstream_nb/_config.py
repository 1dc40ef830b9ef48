"""Settings that travel with a client: where the server is, how long to wait, how often to retry.

Time budgets are per phase and there is deliberately no total timeout: a long generation is not a
failure. ``None`` means "wait for ever" for that phase.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

DEFAULT_BASE_URL = "http://localhost:1234/v1"
BASE_URL_ENV = "LMSTREAM_BASE_URL"
API_KEY_ENV = "LMSTREAM_API_KEY"


@dataclass(frozen=True, slots=True)
class Budgets:
    """How long to wait in each phase of a streamed request.

    connect: to open the TCP connection.
    first_token: from sending the request to the first token. Prompt processing of a long prompt
        on a laptop takes minutes, hence the generous default of 10 minutes. LM Studio answers
        one request per model at a time and queues the rest, so while another stream of the
        same client is being answered a waiting request is queued, not stuck: the budget then
        counts from the moment the server last started or finished one of those streams.
    idle: between one piece of text and the next once text is flowing.
    """

    connect: float | None = 10.0
    first_token: float | None = 600.0
    idle: float | None = 120.0

    def __post_init__(self) -> None:
        for name in ("connect", "first_token", "idle"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"Budgets.{name} must be a positive number of seconds or None")


@dataclass(frozen=True, slots=True)
class Retries:
    """Retries for failures that happen before the first token (so no text can be duplicated).

    Retried: connection refused or reset, HTTP 429, 502, 503 and 504 (honouring Retry-After).
    A first-token timeout is never retried: the server would process the same prompt again.
    """

    attempts: int = 2
    backoff: float = 0.5
    max_backoff: float = 8.0

    def delay(self, retry_number: int) -> float:
        """Seconds to wait before retry ``retry_number`` (1-based): exponential, capped."""
        return float(min(self.max_backoff, self.backoff * (2 ** (retry_number - 1))))


def resolve_base_url(base_url: str | None) -> str:
    """The argument wins, then ``LMSTREAM_BASE_URL``, then LM Studio's default address."""
    chosen = base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    return chosen.rstrip("/")


def resolve_api_key(api_key: str | None) -> str | None:
    """The argument wins, then ``LMSTREAM_API_KEY``; LM Studio needs none by default."""
    return api_key or os.environ.get(API_KEY_ENV) or None


def redact_url(url: str) -> str:
    """The URL without any ``user:password@`` part, safe to print, log and store."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


# -- budgets typed by a person -----------------------------------------------------------------

#: What a person types for "no limit" (compared lower-cased, after stripping spaces).
NO_LIMIT = ("", "none", "inf", "infinity")


def parse_seconds(text: str) -> float | None:
    """A time budget typed in a front end: a positive number of seconds, or ``none`` (also
    ``inf`` or nothing) for no limit.

    The one rule for the CLI, the magic and the runner. ``0`` is refused rather than read as
    "no limit": it reads as "no time at all" just as easily, and a budget that means the
    opposite of what was typed is worse than a sentence asking for ``none``.
    """
    import math

    word = text.strip().lower()
    if word in NO_LIMIT:
        return None
    try:
        value = float(word)
    except ValueError:
        value = math.nan
    if not value > 0:  # also refuses nan
        raise ValueError(
            f"{text.strip()!r} is not a time budget: use a positive number of seconds, "
            "or none for no limit."
        )
    return None if math.isinf(value) else value


def seconds_argument(text: str) -> float | None:
    """:func:`parse_seconds` as an argparse ``type`` (the CLI's and the magic's options), so
    argparse reports its sentence instead of "invalid value"."""
    import argparse

    try:
        return parse_seconds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
