"""Prompt files: export and import round trips, and every way a file can be wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
from store_helpers import (
    one_sentence,
    store_fixture,  # noqa: F401 (the `store` fixture)
)

from lmstream_nb._errors import PromptFileError
from lmstream_nb._store import PromptStore


def test_export_then_import_into_a_fresh_store_round_trips(
    store: PromptStore, tmp_path: Path
) -> None:
    store.save("old", "replaced")
    store.save(
        "old",
        "Línea 1 {{x}}\n\tindented \"quoted\" 'single' \\ backslash\n\nlast line ✓ 🦉",
        system="Système:\nbe brief",
        model="qwen2.5-7b",
        temperature=0.7,
        max_tokens=-1,
        description="with ünïcode",
    )
    store.save("plain", "one line only")
    store.save("trailing", "ends with newline\n", description='"""triple"""')
    folder = tmp_path / "exported" / "deep"
    files = store.export(folder)
    assert files == [folder / "old.toml", folder / "plain.toml", folder / "trailing.toml"]
    old_text = (folder / "old.toml").read_text(encoding="utf-8")
    assert '"""' in old_text
    assert "Línea 1 {{x}}" in old_text
    assert old_text.index("name") < old_text.index("description") < old_text.index("template")
    plain_text = (folder / "plain.toml").read_text(encoding="utf-8")
    assert "model" not in plain_text
    assert "system" not in plain_text

    with PromptStore(tmp_path / "fresh.db") as fresh:
        imported = fresh.import_(folder)
        assert [p.name for p in imported] == ["old", "plain", "trailing"]
        fields = ("name", "template", "system", "model", "temperature", "max_tokens", "description")
        for original in store.list():
            copy = fresh.get(original.name or "")
            assert copy.version == 1
            assert [getattr(copy, f) for f in fields] == [getattr(original, f) for f in fields]


def test_import_names_from_file_stem_and_adds_versions(store: PromptStore, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "greet.toml").write_text('template = "Hi {{name}}"\n', encoding="utf-8")
    (folder / "x.toml").write_text('name = "named"\ntemplate = "t"\n', encoding="utf-8")
    (folder / "notes.txt").write_text("not a prompt", encoding="utf-8")
    store.save("greet", "older")
    imported = store.import_(folder)
    assert [(p.name, p.version) for p in imported] == [("greet", 2), ("named", 1)]
    assert store.get("greet").template == "Hi {{name}}"
    assert store.import_(tmp_path / "in" / "..") == []  # no *.toml there


BAD_FILES = [
    pytest.param('template = "a"\nmodel = = 3\n', 2, "not valid TOML", id="syntax"),
    pytest.param('template = """never closed\n\nstill open\n', 3, "not valid TOML", id="eof"),
    pytest.param(
        'template = "a"\n\ntemprature = 0.5\n', 3, "unknown key 'temprature'", id="unknown-key"
    ),
    pytest.param('template = "a"\n[extra]\nx = 1\n', 2, "unknown key 'extra'", id="table"),
    pytest.param('description = "no template"\n', 1, "no 'template' key", id="missing"),
    pytest.param('template = "a"\nmodel = 3\n', 2, "'model' an integer", id="wrong-type"),
    pytest.param(
        'template = "a"\n\n\ntemperature = "hot"\n', 4, "'temperature'", id="wrong-type-number"
    ),
    pytest.param('template = "a"\nmax_tokens = 0\n', 2, "'max_tokens'", id="range"),
    pytest.param('name = "a/b"\ntemplate = "a"\n', 1, "contains '/'", id="bad-name"),
    pytest.param(b'template = "caf\xe9"\n', 1, "not UTF-8", id="encoding"),
]


@pytest.mark.parametrize(("content", "line", "fragment"), BAD_FILES)
def test_a_bad_prompt_file_names_file_and_line_and_imports_nothing(
    store: PromptStore, tmp_path: Path, content: str | bytes, line: int, fragment: str
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a_good.toml").write_text('template = "fine {{x}}"\n', encoding="utf-8")
    bad = folder / "b_bad.toml"
    if isinstance(content, bytes):
        bad.write_bytes(content)
    else:
        bad.write_text(content, encoding="utf-8")
    (folder / "c_good.toml").write_text('template = "also fine"\n', encoding="utf-8")
    with pytest.raises(PromptFileError) as caught:
        store.import_(folder)
    error = caught.value
    assert error.file == str(bad)
    assert error.line == line
    assert str(bad) in str(error)
    assert f"at line {line}" in str(error)
    assert fragment in str(error)
    assert "nothing was imported" in str(error)
    one_sentence(str(error))
    assert store.list() == []


def test_a_file_name_that_is_no_prompt_name_is_reported(store: PromptStore, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / ("n" * 201 + ".toml")).write_text('template = "t"\n', encoding="utf-8")
    with pytest.raises(PromptFileError, match="file name") as caught:
        store.import_(folder)
    assert caught.value.line == 1


def test_import_from_a_missing_folder(store: PromptStore, tmp_path: Path) -> None:
    with pytest.raises(PromptFileError, match="does not exist") as caught:
        store.import_(tmp_path / "nowhere")
    assert caught.value.line is None
    one_sentence(str(caught.value))


def test_a_placeholder_that_is_no_name_is_named_by_file_and_line(
    store: PromptStore, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "p.toml").write_text(
        'description = "d"\ntemplate = """\nfirst line\nHello {{my name}}\n"""\n', encoding="utf-8"
    )
    with pytest.raises(PromptFileError) as caught:
        store.import_(folder)
    assert caught.value.line == 4
    assert "{{my name}}" in str(caught.value)
    assert "at line 4" in str(caught.value)
    one_sentence(str(caught.value))
    assert store.list() == []
