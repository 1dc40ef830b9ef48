"""Settings that travel with a client: where the server is, how long to wait, how often to retry.

Time budgets are per phase and there is deliberately no total timeout: a long generation is not a
failure. ``None`` means "wait for ever" for that phase.
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote, unquote_plus

from ._errors import InvalidBaseURL

DEFAULT_BASE_URL = "http://localhost:1234/v1"
BASE_URL_ENV = "LMSTREAM_BASE_URL"
API_KEY_ENV = "LMSTREAM_API_KEY"


@dataclass(frozen=True, slots=True)
class Budgets:
    """How long to wait in each phase of a streamed request.

    connect: to open the TCP connection.
    first_token: from sending the request to the first sign of life: a token, or a progress
        report (LM Studio's native chat and llama.cpp report model loading and prompt
        processing). Prompt processing of a long prompt on a laptop takes minutes, hence the
        generous default of 10 minutes.
    idle: between one piece of text and the next once text is flowing; and, before the first
        token, between two progress reports that advance.

    The rules, and why:

    - Progress is a sign of life: it proves the server works on this request. Once it came,
      a phase that keeps advancing is never timed out however long it takes, and one whose
      progress stops for longer than ``idle`` fails as ``FirstTokenTimeout`` saying where it
      stopped. Progress can only lengthen the wait: never before ``first_token`` has passed.
    - A finished phase (model loaded, prompt processed) starts ``first_token`` again, since
      what follows (a queue for a slot, a phase that reports nothing) is silent.
    - Without progress, a busy server queues requests (LM Studio 0.3 and MLX models answer one
      at a time, 0.4 four at once per model), so while another stream of the same client is
      being answered a waiting request is queued, not stuck: the budget then counts from the
      moment the server last started or finished one of those streams, or last reported
      progress on one (four long prompts processed side by side keep the fifth waiting for
      longer than the budget, visibly at work).
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
    """The argument wins, then ``LMSTREAM_BASE_URL``, then LM Studio's default address.

    The URL is checked (see :func:`parse_base_url`), so a front end that keeps it for later
    refuses a bad one at once, with the same sentence the client would give.
    """
    chosen = (base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).strip()
    parse_base_url(chosen)
    return chosen.rstrip("/")


def base_url_source(base_url: str | None) -> str:
    """Where :func:`resolve_base_url` takes the URL from: ``argument``, ``environment``
    (``LMSTREAM_BASE_URL``) or ``default``; advice on fixing the URL names that place."""
    if base_url:
        return "argument"
    return "environment" if os.environ.get(BASE_URL_ENV) else "default"


def resolve_api_key(api_key: str | None) -> str | None:
    """The argument wins, then ``LMSTREAM_API_KEY``; LM Studio needs none by default."""
    return api_key or os.environ.get(API_KEY_ENV) or None


@dataclass(frozen=True, slots=True)
class BaseURL:
    """A checked base URL, taken apart into what goes where.

    ``url`` is where requests go (scheme, host, port and path: no credentials, no query);
    ``query`` is the raw query string, sent unchanged with every request; ``username`` and
    ``password`` are the decoded userinfo; ``shown`` is the redacted form for messages, reprs
    and records; ``secrets`` are the credentials the URL carries, in every form a server could
    echo them back (raw, decoded, and as the HTTP Basic token).
    """

    url: str
    query: str
    username: str | None
    password: str | None
    shown: str
    secrets: tuple[str, ...]


#: Secrets shorter than this are not scrubbed from server text: they would mangle every
#: message that happens to contain the same few letters, and hide nothing worth hiding.
MIN_SECRET_CHARS = 4

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_USERINFO = re.compile(r"^((?:[A-Za-z][A-Za-z0-9+.-]*:)?//)[^/?#]*@")
_EXAMPLE = "http://localhost:1234/v1"


def parse_base_url(base_url: str) -> BaseURL:
    """Check a base URL and take it apart; the one place that decides what a usable one is.

    Refused, each with one sentence (:class:`InvalidBaseURL`): no ``http://`` or ``https://``
    scheme, another scheme, no host, a port that is not a number from 1 to 65535, a broken
    IPv6 literal, spaces or control characters. The standard library's ``urlsplit`` is not
    enough on its own: it accepts ``http://[::1]x/`` and ``http://:80/``, and httpx then fails
    with a traceback at the first request.
    """
    text = base_url.strip()
    shown = redact_url(text)

    def refuse(problem: str, fix: str) -> InvalidBaseURL:
        return InvalidBaseURL(f"The base URL {shown!r} {problem}: {fix}.", url=shown)

    if any(c.isspace() or not c.isprintable() for c in text):
        raise refuse("contains a space or a control character", "remove it and try again")
    scheme_match = _SCHEME.match(text)
    if scheme_match is None or not text[scheme_match.end() :].startswith("//"):
        raise refuse(
            "does not start with http:// or https://", f"write it in full, like {_EXAMPLE}"
        )
    scheme = scheme_match.group(1).lower()
    if scheme not in ("http", "https"):
        raise refuse(
            f"uses the scheme {scheme!r}, and only http and https are supported",
            f"write it like {_EXAMPLE}",
        )
    rest = text[scheme_match.end() + 2 :]
    cut = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, rest = rest[:cut], rest[cut:]
    path, _, query = rest.partition("#")[0].partition("?")
    userinfo, _, hostport = authority.rpartition("@")
    host, port = _host_and_port(hostport, refuse)
    username = password = None
    secrets: list[str] = []
    if "@" in authority:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user)
        password = unquote(secret) if colon else None
        basic = f"{username}:{password or ''}".encode()
        secrets += [user, secret, username, password or "", base64.b64encode(basic).decode()]
    for pair in query.split("&"):
        value = pair.partition("=")[2] if "=" in pair else pair
        secrets += [value, unquote_plus(value)]
    netloc = host if port is None else f"{host}:{port}"
    url = f"{scheme}://{netloc}{path.rstrip('/')}"
    return BaseURL(
        url=url,
        query=query,
        username=username,
        password=password,
        shown=redact_url(f"{url}?{query}" if query else url),
        secrets=tuple(dict.fromkeys(s for s in secrets if len(s) >= MIN_SECRET_CHARS)),
    )


def _host_and_port(
    hostport: str, refuse: Callable[[str, str], InvalidBaseURL]
) -> tuple[str, int | None]:
    if hostport.startswith("["):
        inside, bracket, after = hostport[1:].partition("]")
        address = inside.partition("%")[0]  # a zone id (fe80::1%eth0) is not part of it
        try:
            valid = bool(bracket) and ipaddress.IPv6Address(address) is not None
        except ValueError:
            valid = False
        if not valid or (after and not after.startswith(":")):
            raise refuse(
                f"has a broken IPv6 address ({hostport!r})",
                "write it in square brackets, like http://[::1]:1234/v1",
            )
        host, port_text = f"[{inside}]", after[1:] if after else ""
        has_port = bool(after)
    else:
        host, colon, port_text = hostport.partition(":")
        has_port = bool(colon)
        if "[" in host or "]" in host:
            raise refuse(
                f"has a broken IPv6 address ({hostport!r})",
                "write it in square brackets, like http://[::1]:1234/v1",
            )
    if not host:
        raise refuse("names no host", f"write it like {_EXAMPLE}")
    if not has_port or not port_text:
        return host, None
    if not (port_text.isascii() and port_text.isdigit() and 0 < int(port_text) <= 65535):
        raise refuse(
            f"has the port {port_text!r}, which is not a number from 1 to 65535",
            "fix the port (LM Studio listens on 1234 unless told otherwise)",
        )
    return host, int(port_text)


def redact_url(url: str) -> str:
    """The URL without any ``user:password@`` part and with every query value masked.

    Safe to print, log and store, and it works on any text, also on a URL that does not
    parse. All query values are masked, not only those with telling names such as ``key``:
    servers use any name for a token (Azure's ``code``, a signature's ``sig``), and a masked
    ``api-version`` costs nothing.
    """
    url = _USERINFO.sub(r"\1", url)
    head, question, tail = url.partition("?")
    if not question:
        return url
    query, hash_, fragment = tail.partition("#")
    masked = "&".join(
        (name + "=***" if value else name + "=") if eq else ("***" if name else "")
        for name, eq, value in (pair.partition("=") for pair in query.split("&"))
    )
    return f"{head}?{masked}{hash_}{fragment}"


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
    try:
        return parse_seconds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
