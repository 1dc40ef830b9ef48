"""``lmstream serve``: stored prompts run over HTTP, streamed to browsers as Server-Sent Events.

A front end (like the CLI and the magics): it runs prompts through ``arun``, so every run is
recorded exactly as elsewhere, and relays each run's events to any number of clients, who can
reconnect with ``Last-Event-ID`` and lose nothing.

    from lmstream_nb.serve import serve
    with serve(base_url="http://localhost:1234/v1") as server:
        print(server.url)
"""

from __future__ import annotations

from ._app import create_app
from ._hub import Hub
from ._server import TOKEN_ENV, ServeHandle, check_host, run, serve

__all__ = ["TOKEN_ENV", "Hub", "ServeHandle", "check_host", "create_app", "run", "serve"]
