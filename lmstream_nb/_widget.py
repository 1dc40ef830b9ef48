"""PromptRunner: pick a stored prompt, fill its variables, run, watch, stop, look back.

It owns no streaming logic: Run starts ``arun`` as a task on the kernel's own event loop (a
button callback already runs on that loop, and the cell that showed the runner has finished,
so the kernel stays free), the task feeds a ``StreamView`` through a ``NotebookSink``, and Stop
cancels the task, which closes the connection and records the run as cancelled. Every runner
has its own widgets, task and view, so several runners in one notebook never share state, and
an error in one run only ever ends that run.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import html
from typing import Any

import anywidget
import ipywidgets as w
import traitlets

from ._client import LMStudioClient
from ._config import Budgets, parse_seconds, resolve_base_url
from ._conversation import runner
from ._errors import InvalidSetting, LMStreamError, render
from ._outcome import ending
from ._prompt_fields import check_max_tokens, check_temperature, describe_setting
from ._run import RunResult, default_store
from ._store import PromptStore
from ._template import Prompt, prompt_label
from ._view import (
    PLAIN_PREFIX,
    NotebookSink,
    StreamView,
    parsed_bundle,
    status_bundle,
    text_html,
)

_WIDE = {"description_width": "7em"}  # room for "Temperature" and "First token s"
_ERROR_STYLE = "color: var(--jp-error-color1, #c62828); font-size: 0.9em"


_NOTE_STYLE = "color: var(--jp-ui-font-color1, #333); font-size: 0.9em"

# The runner's own styles: buttons keep their whole label, history rows line up in columns.
_RUNNER_CSS = """
.lmstream-runner .lmstream-wide-button { width: auto; min-width: 9em; }
.lmstream-runner .lmstream-history select {
  font-family: var(--jp-code-font-family, monospace); font-size: var(--jp-code-font-size, 13px);
  white-space: pre;
}
"""

#: What a saved notebook shows in the runner's place once its kernel is gone.
_STAND_IN_NOTE = "The prompt runner needs its kernel: run this cell to use it. Its last run:"
_STAND_IN_CLASS = "lmstream-runner-stand-in"

# The runner's front-end helper, shown with it in any front end. While a runner is shown, its
# snapshot (an ordinary output under it) is hidden by a rule that names the runner, not the
# front end's own classes. And where the front end saves notebooks through a document context
# (JupyterLab, Notebook 7), it puts a stand-in for the runner into the notebook's widget state
# just before each save: a saved notebook opened without its kernel then draws a one-line
# note where the runner was, not "Error displaying widget: model not found" (a widget output
# is always drawn by the widget manager, which needs the model's state). A runner saved in
# full (Save Widget State Automatically) is left as saved. The kernel cannot do this itself:
# a save writes what the page holds at that moment, and then the runner is still in use.
_KEEPER_ESM = r"""
const STATE = "application/vnd.jupyter.widget-state+json";
const VIEW = "application/vnd.jupyter.widget-view+json";

function shownWidgets(notebook) {
  const ids = new Set();
  for (const cell of notebook.toJSON().cells || []) {
    for (const output of cell.outputs || []) {
      const view = (output.data || {})[VIEW];
      if (view && view.model_id) ids.add(view.model_id);
    }
  }
  return ids;
}

function putStandIn(model, notebook) {
  const runner = model.get("runner_id");
  const standIn = model.get("stand_in");
  if (!runner || !standIn || !standIn.state) return;
  const tag = standIn.state._dom_classes[0];
  const ours = (entry) => ((entry && entry.state && entry.state._dom_classes) || []).includes(tag);
  const read = (key) =>
    notebook.getMetadata ? notebook.getMetadata(key) : notebook.metadata.get(key);  // Lab 4, 3
  const write = (key, value) =>
    notebook.setMetadata ? notebook.setMetadata(key, value) : notebook.metadata.set(key, value);
  const widgets = Object.assign({}, read("widgets") || {});
  const saved = widgets[STATE] || { version_major: 2, version_minor: 0, state: {} };
  const state = Object.assign({}, saved.state || {});
  if (state[runner] && !ours(state[runner])) return;  // saved in full by the widget manager
  const shown = shownWidgets(notebook);
  for (const id of Object.keys(state)) {
    if (ours(state[id]) && !shown.has(id)) delete state[id];  // a runner no longer shown
  }
  if (shown.has(runner)) state[runner] = standIn;
  widgets[STATE] = Object.assign({}, saved, { state });
  write("widgets", widgets);
}

function initialize({ model }) {
  const context = model.widget_manager && model.widget_manager.context;
  const notebook = context && context.model;
  if (!context || !context.saveState || !notebook) return;  // no save to prepare for
  const onSave = (_, phase) => {
    if (phase !== "started") return;
    try {
      putStandIn(model, notebook);
    } catch (error) {
      console.warn("lmstream: the runner's stand-in was not saved", error);
    }
  };
  context.saveState.connect(onSave);
  return () => context.saveState.disconnect(onSave);
}

function render({ model, el }) {
  const runner = model.get("runner_id");
  if (!/^[0-9a-f]+$/.test(runner)) return;
  const rule = document.createElement("style");
  rule.textContent = `.lmstream-snapshot[data-lmstream-runner="${runner}"] { display: none; }`;
  document.head.append(rule);
  return () => rule.remove();
}

export default { initialize, render };
"""


class _Keeper(anywidget.AnyWidget):
    """The runner's front-end helper (see ``_KEEPER_ESM``); it shows nothing itself."""

    _esm = traitlets.Unicode(_KEEPER_ESM).tag(sync=True)
    _css = traitlets.Unicode(_RUNNER_CSS).tag(sync=True)
    runner_id = traitlets.Unicode("").tag(sync=True)
    stand_in = traitlets.Dict().tag(sync=True)


def _stand_in_state() -> dict[str, Any]:
    """The saved widget state of the note that takes the runner's place (an ipywidgets HTML)."""
    traits = w.HTML.class_traits()
    return {
        "model_module": traits["_model_module"].default_value,
        "model_module_version": traits["_model_module_version"].default_value,
        "model_name": traits["_model_name"].default_value,
        "state": {
            "value": f"<i>{html.escape(_STAND_IN_NOTE)}</i>",
            "_dom_classes": [_STAND_IN_CLASS],
        },
    }


def _error_html(message: str) -> str:
    text = html.escape(message)
    return f'<span class="lmstream-field-error" style="{_ERROR_STYLE}">{text}</span>'


def _note_html(message: str) -> str:
    """A sentence that is not an error (a run the user stopped)."""
    return f'<span class="lmstream-note" style="{_NOTE_STYLE}">{html.escape(message)}</span>'


class PromptRunner(w.VBox):  # type: ignore[misc]
    """A small app for stored prompts: pick, fill, run, stop, and browse earlier runs."""

    def __init__(
        self,
        store: PromptStore | None = None,
        base_url: str | None = None,
        *,
        model: str | None = None,
        budgets: Budgets | None = None,
    ) -> None:
        self.store = store or default_store()
        self.base_url = resolve_base_url(base_url)
        self.task: asyncio.Task[RunResult | None] | None = None
        self.last_result: RunResult | None = None
        self.last_status: dict[str, Any] | None = None  # the final status of the last run
        self.last_text = ""
        self.last_parsed: dict[str, Any] | None = None  # the parsed bundle of the last run
        self._snapshots: list[Any] = []
        self._values: dict[str, str] = {}
        self._var_inputs: dict[str, w.Textarea] = {}
        budgets = budgets or Budgets()

        layout = w.Layout(width="auto")
        wide = _WIDE
        self.prompt_picker = w.Dropdown(
            description="Prompt", layout=w.Layout(width="60%"), style=wide
        )
        self.version_picker = w.Dropdown(description="Version", layout=w.Layout(width="30%"))
        self.preview = w.HTML(layout=layout)
        self.variables_box = w.VBox()
        self.model_picker = w.Dropdown(
            description="Model", layout=w.Layout(width="60%"), style=wide
        )
        self.refresh_button = w.Button(description="Refresh models", icon="refresh")
        self.refresh_button.add_class("lmstream-wide-button")
        self.model_message = w.HTML()
        self.temperature = w.Text(
            description="Temperature", placeholder="prompt's default", style=wide
        )
        self.temperature_error = w.HTML()
        self.max_tokens = w.Text(
            description="Max tokens", placeholder="prompt's default", style=wide
        )
        self.max_tokens_error = w.HTML()
        self.conversation = w.Text(
            description="Conversation",
            placeholder="none: each run stands alone",
            style=wide,
            layout=w.Layout(width="60%"),
        )
        self.first_token_timeout = w.Text(
            description="First token s", value=_seconds_text(budgets.first_token), style=wide
        )
        self.idle_timeout = w.Text(
            description="Idle s", value=_seconds_text(budgets.idle), style=wide
        )
        self.budget_error = w.HTML()
        advanced = w.Accordion(
            children=[
                w.VBox(
                    [
                        w.HBox([self.first_token_timeout, self.idle_timeout]),
                        self.budget_error,
                    ]
                )
            ]
        )
        advanced.set_title(0, "Advanced")
        advanced.selected_index = None
        self.run_button = w.Button(description="Run", button_style="primary", icon="play")
        self.stop_button = w.Button(
            description="Stop", button_style="danger", icon="stop", disabled=True
        )
        self.message = w.HTML()
        self.view_box = w.Box(layout=layout)
        # A prompt with a schema: its answer's validated value, pretty-printed (escaped).
        self.parsed_view = w.HTML(layout=layout)
        self.editor = w.Textarea(
            description="Template", layout=w.Layout(width="100%", height="8em")
        )
        self.save_button = w.Button(description="Save as new version", icon="save")
        self.save_button.add_class("lmstream-wide-button")
        self.save_message = w.HTML()
        editor = w.Accordion(
            children=[w.VBox([self.editor, w.HBox([self.save_button, self.save_message])])]
        )
        editor.set_title(0, "Edit template")
        editor.selected_index = None
        self.history_select = w.Select(rows=6, layout=w.Layout(width="100%"))
        self.history_text = w.HTML()
        history_box = w.VBox([self.history_select, self.history_text])
        history_box.add_class("lmstream-history")
        history = w.Accordion(children=[history_box])
        history.set_title(0, "History")
        history.selected_index = None

        keeper = _Keeper(layout=w.Layout(display="none"))
        super().__init__(
            [
                w.HBox([self.prompt_picker, self.version_picker]),
                self.preview,
                self.variables_box,
                w.HBox([self.model_picker, self.refresh_button]),
                self.model_message,
                w.HBox([self.temperature, self.temperature_error]),
                w.HBox([self.max_tokens, self.max_tokens_error]),
                self.conversation,
                advanced,
                w.HBox([self.run_button, self.stop_button]),
                self.message,
                self.view_box,
                self.parsed_view,
                editor,
                history,
                keeper,
            ]
        )
        keeper.runner_id = self.model_id
        keeper.stand_in = _stand_in_state()
        self.add_class("lmstream-runner")

        self.prompt_picker.observe(self._on_prompt, names="value")
        self.version_picker.observe(self._on_version, names="value")
        self.history_select.observe(self._on_history, names="value")
        self.run_button.on_click(lambda _: self.run())
        self.stop_button.on_click(lambda _: self.stop())
        self.refresh_button.on_click(lambda _: self.refresh_models())
        self.save_button.on_click(lambda _: self.save_version())
        self._preferred_model = model
        self.reload_prompts()
        self.refresh_models()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        # A constant plain-text twin: the widget's default repr lists every child's state,
        # which changes as models load (saved notebooks and nbval compare it).
        bundle = super()._repr_mimebundle_(**kwargs)
        data = bundle[0] if isinstance(bundle, tuple) else bundle
        if isinstance(data, dict):
            data["text/plain"] = "lmstream prompt runner"
        return bundle

    def _url_argument(self) -> str | None:
        """The base URL to pass on: None when it is the one the environment or the default
        gives, so advice about an unreachable server names where it really came from."""
        return None if self.base_url == resolve_base_url(None) else self.base_url

    def _ipython_display_(self) -> None:
        """The runner, and under it a snapshot of its last run as an ordinary output.

        A saved notebook opened without its kernel cannot show the runner (a widget), but it
        shows the snapshot: the last run's status line and text (and, in JupyterLab, a note in
        the runner's place; see ``_KEEPER_ESM``). While the runner is shown, the snapshot is
        hidden; it is updated after every run.
        """
        from IPython.display import display

        display(self._repr_mimebundle_(), raw=True)  # type: ignore[no-untyped-call]
        snapshot = display(self.snapshot_bundle(), raw=True, display_id=True)  # type: ignore[no-untyped-call]
        self._snapshots.append(snapshot)

    def snapshot_bundle(self) -> dict[str, Any]:
        """The last run as an ordinary output (status line, sentence, text): needs no kernel."""
        # Named after its runner, whose helper hides it while the runner is shown.
        opening = f'<div class="lmstream-snapshot" data-lmstream-runner="{self.model_id}">'
        if self.last_status is None:
            note = "The prompt runner has not run a prompt yet; run the cell to use it."
            return {
                "text/plain": PLAIN_PREFIX + note,
                "text/html": f"{opening}<i>{html.escape(note)}</i></div>",
            }
        status = status_bundle(self.last_status)
        text = self.last_text
        parsed = self.last_parsed
        return {
            "text/plain": status["text/plain"]
            + (f"\n\n{text}" if text else "")
            + (f"\n\n{parsed['text/plain']}" if parsed else ""),
            "text/html": f"{opening}{status['text/html']}{text_html(text) if text else ''}"
            f"{parsed['text/html'] if parsed else ''}</div>",
        }

    def _remember(self, final: dict[str, Any], text: str, parsed: Any = None) -> None:
        """Keep the last run for the snapshot; ``parsed`` is a structured answer's value."""
        self.last_status, self.last_text = final, text
        self.last_parsed = parsed_bundle(parsed) if parsed is not None else None
        self.parsed_view.value = self.last_parsed["text/html"] if self.last_parsed else ""
        bundle = self.snapshot_bundle()
        for shown in self._snapshots:
            shown.update(bundle, raw=True)

    # -- prompts and variables -------------------------------------------------------------

    @property
    def prompt(self) -> Prompt | None:
        name, version = self.prompt_picker.value, self.version_picker.value
        if not name:
            return None
        return self.store.get(name, version)

    def reload_prompts(self, select: str | None = None) -> None:
        names = [p.name for p in self.store.list() if p.name]
        current = select or self.prompt_picker.value
        self.prompt_picker.options = names
        if names:
            self.prompt_picker.value = current if current in names else names[0]
        self._on_prompt(None)

    def _on_prompt(self, _change: Any) -> None:
        name = self.prompt_picker.value
        versions = [p.version for p in self.store.versions(name)] if name else []
        self.version_picker.options = [(f"v{v}", v) for v in reversed(versions)]
        if versions:
            self.version_picker.value = versions[-1]
        self._on_version(None)
        self.refresh_history()

    def _on_version(self, _change: Any) -> None:
        prompt = self.prompt
        self._remember_values()
        if prompt is None:
            self.preview.value = "<i>No stored prompts yet: save one with %%lmstream --save.</i>"
            self.variables_box.children = ()
            self._var_inputs = {}
            return
        system = f"<b>System:</b> {html.escape(prompt.system)}<br>" if prompt.system else ""
        self.preview.value = (
            f'<div class="lmstream-preview">{system}{text_html(prompt.template)}</div>'
        )
        self.editor.value = prompt.template
        inputs: dict[str, w.Textarea] = {}
        rows = []
        for name in prompt.variables:
            box = w.Textarea(
                value=self._values.get(name, ""),
                description=name,
                placeholder=f"value for {{{{{name}}}}}",
                style=_WIDE,
                layout=w.Layout(width="60%", height="3.2em"),
            )
            box.add_class(f"lmstream-var-{name}")
            error = w.HTML()
            inputs[name] = box
            rows.append(w.HBox([box, error]))
        self._var_inputs = inputs
        self.variables_box.children = tuple(rows)

    def _remember_values(self) -> None:
        for name, box in self._var_inputs.items():
            self._values[name] = box.value

    def set_variable(self, name: str, value: str) -> None:
        """Fill a variable's input (what a user types)."""
        self._var_inputs[name].value = value

    # -- models ----------------------------------------------------------------------------

    def refresh_models(self) -> asyncio.Task[None]:
        """Fill the model picker from the server; say so in the widget if it cannot."""
        self.model_message.value = "<i>Loading models…</i>"

        async def fetch() -> None:
            try:
                async with LMStudioClient(self._url_argument()) as client:
                    chat = await client.chat_models()
            except LMStreamError as exc:
                self.model_message.value = _error_html(render(exc, "runner"))
                return
            current = self.model_picker.value
            self.model_picker.options = chat
            for choice in (current, self._preferred_model, *chat[:1]):
                if choice in chat:
                    self.model_picker.value = choice
                    break
            self.model_message.value = ""

        self.models_task: asyncio.Task[None] = _spawn(fetch())
        return self.models_task

    # -- running ---------------------------------------------------------------------------

    def _read_inputs(self) -> dict[str, Any] | None:
        """Check every field; report problems next to them; None when anything is wrong."""
        ok = True
        settings: dict[str, Any] = {}
        for field, error, key, check in (
            (self.temperature, self.temperature_error, "temperature", check_temperature),
            (self.max_tokens, self.max_tokens_error, "max_tokens", check_max_tokens),
        ):
            error.value = ""
            text = field.value.strip()
            if not text:
                continue
            try:
                settings[key] = check(_number(text))  # the range every front end keeps
            except InvalidSetting as exc:
                error.value = _error_html(render(exc, "runner"))
                ok = False
        self.budget_error.value = ""
        budgets: dict[str, float | None] = {}
        for field, key in ((self.first_token_timeout, "first_token"), (self.idle_timeout, "idle")):
            try:
                budgets[key] = parse_seconds(field.value)
            except ValueError as exc:
                self.budget_error.value = _error_html(f"{field.description}: {exc}")
                ok = False
        if ok:
            settings["budgets"] = Budgets(first_token=budgets["first_token"], idle=budgets["idle"])
        variables: dict[str, str] = {}
        for row, (name, box) in zip(
            self.variables_box.children, self._var_inputs.items(), strict=True
        ):
            # An empty value is a value, as everywhere (see _template): it is sent as typed.
            row.children[1].value = ""
            variables[name] = box.value
        settings["variables"] = variables
        return settings if ok else None

    def run(self) -> asyncio.Task[RunResult | None] | None:
        """What the Run button does; returns the task (or None when a field is wrong)."""
        prompt = self.prompt
        if prompt is None or (self.task is not None and not self.task.done()):
            return None
        settings = self._read_inputs()
        if settings is None:
            self.message.value = _error_html("Nothing was sent: fix the fields marked above.")
            return None
        self.message.value = ""
        self.parsed_view.value = ""
        variables = settings.pop("variables")
        view = StreamView()
        self.view_box.children = (view,)
        chat = self.conversation.value.strip() or None
        sink = NotebookSink(view, prompt=prompt_label(prompt.name, prompt.version, chat))
        model = self.model_picker.value or None
        # With a conversation's name, the run is its next turn (the same conversation the
        # magic's and the CLI's --chat continue); a new name starts one with this prompt.
        run_it = runner(self.store, chat)
        self._set_running(True)

        async def go() -> RunResult | None:
            try:
                result = await run_it(
                    prompt,
                    variables,
                    model=model,
                    base_url=self._url_argument(),
                    on_event=sink.handle,
                    interface="runner",
                    on_stream=sink.attach,
                    **settings,
                )
            except BaseException as exc:
                end = ending(exc)
                final = sink.close(
                    state=end.state, show_text=True, run_id=end.run_id, message=end.message
                )
                self._remember(final, sink.text)
                if isinstance(exc, Exception):
                    return None  # a runner must keep working after any error
                raise  # a cancellation (Stop) goes on
            finally:
                self._set_running(False)
                self.refresh_history()
            end = ending(result)
            final = sink.close(
                state=end.state,
                stats=result.stats,
                model=result.model,
                run_id=end.run_id,
                message=end.message,
                show_text=True,
            )
            self._remember(final, result.text, result.parsed if result.ok else None)
            self.last_result = result
            return result

        self.task = _spawn(go())
        return self.task

    def stop(self) -> None:
        """What the Stop button does: cancel the stream (the connection is closed at once)."""
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def _set_running(self, running: bool) -> None:
        self.run_button.disabled = running
        self.stop_button.disabled = not running

    # -- editing and history ---------------------------------------------------------------

    def save_version(self) -> Prompt | None:
        """Store the edited template as a new version of the selected prompt."""
        prompt = self.prompt
        if prompt is None or not prompt.name:
            return None
        if not self.editor.value.strip():
            self.save_message.value = _error_html("The template is empty: nothing was saved.")
            return None
        # The settings of the version being edited are kept (the one rule, _prompt_fields).
        outcome = self.store.add(prompt.name, self.editor.value, base_version=prompt.version)
        saved = outcome.prompt
        if not outcome.created:
            said = f"Unchanged: {saved.label} already holds this template; no version was added."
        else:
            kept = ", ".join(describe_setting(k, getattr(saved, k)) for k in outcome.carried)
            said = f"Saved {saved.label}" + (f" (kept {kept})." if kept else ".")
        self.save_message.value = html.escape(said)
        self.reload_prompts(select=saved.name)
        self.version_picker.value = saved.version
        return saved

    def refresh_history(self) -> None:
        name = self.prompt_picker.value
        runs = self.store.history(prompt=name, limit=20) if name else []
        rows = [
            (
                f"#{r.id}",
                dt.datetime.fromtimestamp(r.started_at).strftime("%H:%M:%S"),
                r.status,
                r.label,
                # The first sign of life (a progress report, else the first token), then
                # the first token: what the wait felt like beside what it was.
                "progress " + _seconds_cell(r.first_progress_s, 2),
                "ttft " + _seconds_cell(r.ttft_s, 2),
                "total " + _seconds_cell(r.duration_s, 1),
                r.preview[:40].replace("\n", " "),
            )
            for r in runs
        ]
        # Columns padded to their widest cell (the list is shown in a monospace font).
        widths = [max((len(row[i]) for row in rows), default=0) for i in range(7)]
        self.history_select.options = [
            (
                "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
                + "  "
                + row[7],
                r.id,
            )
            for row, r in zip(rows, runs, strict=True)
        ]

    def _on_history(self, change: Any) -> None:
        run_id = change["new"] if change else None
        if run_id is None:
            self.history_text.value = ""
            return
        rec = self.store.get_run(run_id)
        said = _note_html if rec.status == "cancelled" else _error_html
        error = f"<div>{said(rec.error)}</div>" if rec.error else ""
        self.history_text.value = (
            f'<div class="lmstream-history-text"><b>run #{rec.id}</b> '
            f"{html.escape(rec.label)} "
            f"{html.escape(rec.status)}"
            f"{error}{text_html(rec.text)}</div>"
        )


def _number(text: str) -> object:
    """What a number field holds: an int or a float if it reads as one, else the text (which
    the range check then refuses in its own words)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _seconds_cell(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}s"


def _seconds_text(value: float | None) -> str:
    return "none" if value is None else f"{value:g}"


def _spawn(coro: Any) -> asyncio.Task[Any]:
    """A task on the running loop (the kernel's, for button callbacks), else on a new one."""
    loop = asyncio.get_event_loop()
    return loop.create_task(coro)
