"""Which process records a running run, and whether that process is still alive.

A run is ``unfinished`` while its process streams it. If the process is killed (``kill -9``,
an out-of-memory kill, a crashed kernel), nobody will ever finish the row, so the store records
the owner of each running run and, when a store is opened, ends the runs whose owner is gone.

An owner is the host name, the boot id (``/proc/sys/kernel/random/boot_id``, so a reboot ends
every run of the boot before), the pid, and the process's start time in clock ticks since boot
(field 22 of ``/proc/<pid>/stat``), so a pid that the system has since given to another
process is not mistaken for the owner. Where ``/proc`` is missing (macOS) the pid alone is
checked; on Windows, where signal 0 would terminate a process, an owner is always taken to be
alive, so nothing is ever ended by mistake. Only owners on this host are judged: another
machine's processes cannot be seen from here.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Owner", "current_owner"]


@dataclass(frozen=True)
class Owner:
    """A process, as recorded in ``runs.owner``."""

    host: str
    boot: str | None
    pid: int
    start: int | None

    def to_json(self) -> str:
        return json.dumps(
            {"host": self.host, "boot": self.boot, "pid": self.pid, "start": self.start},
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> Owner | None:
        """The owner recorded as ``text``, or None if it cannot be read (then nothing is done)."""
        try:
            data = json.loads(text)
            host, boot, pid, start = data["host"], data["boot"], data["pid"], data["start"]
        except (ValueError, TypeError, KeyError):
            return None
        if not isinstance(host, str) or isinstance(pid, bool) or not isinstance(pid, int):
            return None
        if boot is not None and not isinstance(boot, str):
            return None
        if start is not None and (isinstance(start, bool) or not isinstance(start, int)):
            return None
        return cls(host=host, boot=boot, pid=pid, start=start)

    def is_gone(self) -> bool:
        """True only when this process has certainly ended (on this host); else False."""
        here = current_owner()
        if self.host != here.host or sys.platform == "win32":
            return False
        if self.boot is not None and here.boot is not None and self.boot != here.boot:
            return True  # the machine has rebooted since
        if self.pid == here.pid:
            return self.start is not None and here.start is not None and self.start != here.start
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # it exists, and belongs to another user
        except OSError:
            return False
        state = _stat_fields(self.pid)
        if state is None:
            return False  # no /proc: the pid exists, so take it as the owner
        if state[0] in ("Z", "X"):
            return True  # killed, and not yet reaped by its parent
        return self.start is not None and state[1] is not None and state[1] != self.start


def _stat_fields(pid: int) -> tuple[str, int | None] | None:
    """The state letter and start time of ``pid`` from ``/proc/<pid>/stat``, if readable."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    # "pid (comm) state ...": comm may hold spaces and parentheses, so split after the last ")".
    fields = raw[raw.rfind(")") + 2 :].split()
    if not fields:
        return None
    try:
        start = int(fields[19])  # field 22 of the whole line
    except (IndexError, ValueError):
        start = None
    return fields[0], start


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


_current: Owner | None = None


def current_owner() -> Owner:
    """This process (computed once per process; a forked child computes its own)."""
    global _current
    pid = os.getpid()
    if _current is None or _current.pid != pid:
        state = _stat_fields(pid)
        _current = Owner(
            host=socket.gethostname(),
            boot=_boot_id(),
            pid=pid,
            start=state[1] if state is not None else None,
        )
    return _current
