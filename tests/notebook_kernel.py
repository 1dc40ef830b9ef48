"""A real IPython kernel for tests: execute cells and read back every message they caused.

Output is grouped the way a front end groups it: by the parent message (the cell), plus every
widget (comm) message by widget id, so a test can check that text landed in its own cell and
its own view, and count the bytes that crossed the wire.
"""

from __future__ import annotations

import json
import queue
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from jupyter_client.manager import KernelManager


@dataclass
class Cell:
    msg_id: str
    reply: dict[str, Any] | None = None
    outputs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def status(self) -> str | None:
        return None if self.reply is None else self.reply["content"]["status"]

    def displays(self) -> list[dict[str, Any]]:
        return [
            o["content"]["data"]
            for o in self.outputs
            if o["msg_type"] in ("display_data", "execute_result")
        ]

    def widget_ids(self) -> list[str]:
        ids = []
        for data in self.displays():
            view = data.get("application/vnd.jupyter.widget-view+json")
            if view:
                ids.append(view["model_id"])
        return ids

    def finals(self, shown_in: Cell | None = None) -> list[dict[str, Any]]:
        """What replaced a display (update_display_data) during this cell, with what it
        replaced (``replaces``) in this cell or in ``shown_in``."""
        shown = {
            o["content"].get("transient", {}).get("display_id"): o["content"]["data"]
            for o in (shown_in or self).outputs
            if o["msg_type"] == "display_data"
        }
        return [
            {**o["content"]["data"], "replaces": shown.get(o["content"]["transient"]["display_id"])}
            for o in self.outputs
            if o["msg_type"] == "update_display_data"
        ]

    def plain(self) -> list[str]:
        """text/plain of display_data outputs that are not widget views (the final answers)."""
        return [
            o["content"]["data"]["text/plain"]
            for o in self.outputs
            if o["msg_type"] == "display_data"
            and "application/vnd.jupyter.widget-view+json" not in o["content"]["data"]
            and "text/plain" in o["content"]["data"]
        ]

    def result(self) -> str | None:
        """text/plain of the cell's value (execute_result), if any."""
        for o in self.outputs:
            if o["msg_type"] == "execute_result":
                return str(o["content"]["data"].get("text/plain"))
        return None

    def stream(self, name: str = "stdout") -> str:
        return "".join(
            o["content"]["text"]
            for o in self.outputs
            if o["msg_type"] == "stream" and o["content"]["name"] == name
        )

    def error(self) -> dict[str, Any] | None:
        for o in self.outputs:
            if o["msg_type"] == "error":
                return dict(o["content"])
        return None


class Kernel:
    """One kernel; ``execute`` runs a cell and collects its messages until it is idle."""

    def __init__(self, km: KernelManager) -> None:
        self.km = km
        self.kc = km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)
        self.cells: dict[str, Cell] = {}
        self.comm_msgs: dict[str, list[dict[str, Any]]] = {}
        self.iopub_bytes = 0
        self.iopub_count = 0

    def close(self) -> None:
        self.kc.stop_channels()

    def _pump(self, timeout: float) -> dict[str, Any] | None:
        try:
            msg: dict[str, Any] = self.kc.get_iopub_msg(timeout=timeout)
        except queue.Empty:
            return None
        self.iopub_count += 1
        self.iopub_bytes += (
            len(json.dumps(msg["content"], default=str))
            + len(json.dumps(msg["header"], default=str))
            + len(json.dumps(msg["parent_header"], default=str))
        )
        parent = msg["parent_header"].get("msg_id")
        kind = msg["msg_type"]
        if kind in ("comm_msg", "comm_open"):
            comm_id = msg["content"].get("comm_id", "")
            self.comm_msgs.setdefault(comm_id, []).append(msg)
        elif parent in self.cells and kind in (
            "stream",
            "display_data",
            "execute_result",
            "error",
            "update_display_data",
        ):
            self.cells[parent].outputs.append(msg)
        return msg

    def submit(self, code: str) -> Cell:
        msg_id = self.kc.execute(code)
        cell = self.cells[msg_id] = Cell(msg_id)
        return cell

    def wait(self, cell: Cell, timeout: float = 30) -> Cell:
        """Until the cell's reply and its idle status have arrived (bounded)."""
        deadline = time.monotonic() + timeout
        idle = False
        while cell.reply is None or not idle:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"cell {cell.msg_id} did not finish in {timeout} s")
            if cell.reply is None:
                try:
                    reply = self.kc.get_shell_msg(timeout=0.01)
                    if reply["parent_header"].get("msg_id") in self.cells:
                        self.cells[reply["parent_header"]["msg_id"]].reply = reply
                except queue.Empty:
                    pass
            msg = self._pump(min(0.05, max(remaining, 0.001)))
            if (
                msg is not None
                and msg["msg_type"] == "status"
                and msg["parent_header"].get("msg_id") == cell.msg_id
                and msg["content"]["execution_state"] == "idle"
            ):
                idle = True
        return cell

    def execute(self, code: str, timeout: float = 30) -> Cell:
        return self.wait(self.submit(code), timeout)

    def until(self, predicate: Any, timeout: float = 30) -> None:
        """Read messages until ``predicate()`` holds (bounded)."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError("the kernel did not produce the expected messages in time")
            self._pump(0.05)

    def deltas(self, widget_id: str) -> list[str]:
        """The text deltas sent to one view, in order (progress and status messages, which
        come before any text, are not deltas)."""
        texts = []
        for msg in self.comm_msgs.get(widget_id, []):
            data = msg["content"].get("data", {})
            if data.get("method") == "custom" and "t" in data["content"]:
                texts.append(data["content"]["t"])
        return texts

    def widget_state(self, widget_id: str) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for msg in self.comm_msgs.get(widget_id, []):
            data = msg["content"].get("data", {})
            if "state" in data:
                state.update(data["state"])
        return state


@contextmanager
def running_kernel(env: dict[str, str]) -> Iterator[Kernel]:
    km = KernelManager(kernel_name="python3")
    # The kernel must run this interpreter (the installed spec may say just "python").
    spec = km.kernel_spec
    assert spec is not None
    spec.argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    km.start_kernel(env=env)
    kernel = Kernel(km)
    try:
        yield kernel
    finally:
        kernel.close()
        km.shutdown_kernel(now=False)
