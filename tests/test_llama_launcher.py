"""The project's launcher for llama.cpp's server says why it cannot run instead of failing."""

from __future__ import annotations

import subprocess
import sys
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
