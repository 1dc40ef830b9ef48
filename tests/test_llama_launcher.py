"""The project's launcher for llama.cpp's server says why it cannot run instead of failing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from real_llama import launcher

LAUNCHER = Path(__file__).resolve().parent.parent / "tools" / "llama_server.py"


def test_without_build_tools_the_reason_names_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no cmake, make or compiler on it
    reason = launcher.unavailable_reason(tmp_path / "cache")
    assert reason is not None
    assert "cmake" in reason
    assert "C++ compiler" in reason
    assert "apt-get install" in reason


def test_check_command_prints_the_reason_and_fails(tmp_path: Path) -> None:
    env = {"PATH": str(tmp_path), "LMSTREAM_LLAMA_HOME": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, str(LAUNCHER), "check"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "cannot be built here" in done.stdout
    assert "Traceback" not in done.stderr


def test_start_refuses_with_the_reason_when_it_cannot_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(launcher.Unavailable, match="not installed"):
        launcher.start(home=tmp_path / "cache")


def test_nothing_is_built_in_the_background_when_the_server_is_cached(tmp_path: Path) -> None:
    binary = launcher._binary(tmp_path)
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    assert launcher.build_in_background(tmp_path) is None


def test_a_background_build_stopped_with_its_group_leaves_no_scratch_folder(
    tmp_path: Path,
) -> None:
    if launcher.unavailable_reason(tmp_path) is not None:
        pytest.skip("no build tools here: there is no build to stop")
    build = launcher.build_in_background(tmp_path)
    assert build is not None
    try:
        deadline = time.monotonic() + 30
        while not any(p.name.startswith(("model-", "build-")) for p in tmp_path.iterdir()):
            assert build.poll() is None, "the build ended before it began its work"
            assert time.monotonic() < deadline, "no scratch folder within 30 s"
            time.sleep(0.05)  # polling a folder: no event to wait on
    finally:
        os.killpg(build.pid, signal.SIGTERM)
        build.wait(timeout=30)
    assert build.returncode == 143
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(("model-", "build-"))]
    assert left == []
