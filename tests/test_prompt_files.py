"""Prompt files: export and import round trips, and every way a file can be wrong."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
from store_helpers import (
    one_sentence,
    store_fixture,  # noqa: F401 (the `store` fixture)
)

from lmstream_nb._errors import PromptFileError
from lmstream_nb._prompt_files import MAX_FILE_BYTES, MAX_NESTING
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


def test_importing_the_same_library_twice_adds_no_versions(
    store: PromptStore, tmp_path: Path
) -> None:
    store.save("a", "A {{x}}", system="S", temperature=0.2)
    store.save("b", "B", description="bee")
    folder = tmp_path / "library"
    store.export(folder)
    again = store.import_versions(folder)
    assert [(s.prompt.label, s.created) for s in again] == [("a@1", False), ("b@1", False)]
    assert store.import_(folder) == [store.get("a"), store.get("b")]
    (folder / "b.toml").write_text('template = "B changed"\n', encoding="utf-8")
    changed = store.import_versions(folder)
    assert [(s.prompt.label, s.created) for s in changed] == [("a@1", False), ("b@2", True)]
    # A file says everything about its prompt: a key it leaves out is cleared, not kept.
    assert changed[1].dropped == ("description",)
    assert store.get("b").description is None


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


@pytest.mark.parametrize(
    ("body", "line", "fragments"),
    [
        ("first line\nHello {{my name}}\n", 4, ("{{my name}}", "not a variable name")),
        ("first line\nHello {{name\n", 4, ("{{name", "not closed")),
    ],
)
def test_a_placeholder_typo_is_named_by_file_and_line(
    store: PromptStore, tmp_path: Path, body: str, line: int, fragments: tuple[str, ...]
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "p.toml").write_text(
        f'description = "d"\ntemplate = """\n{body}"""\n', encoding="utf-8"
    )
    with pytest.raises(PromptFileError) as caught:
        store.import_(folder)
    assert caught.value.line == line
    assert f"at line {line}" in str(caught.value)
    for fragment in fragments:
        assert fragment in str(caught.value)
    one_sentence(str(caught.value))
    assert store.list() == []


def bad_import(store: PromptStore, folder: Path) -> PromptFileError:
    with pytest.raises(PromptFileError) as caught:
        store.import_(folder)
    one_sentence(str(caught.value))
    assert "nothing was imported" in str(caught.value)
    assert store.list() == []
    return caught.value


def test_a_file_over_the_size_limit_is_refused_by_name(store: PromptStore, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.toml").write_text('template = "fine"\n', encoding="utf-8")
    limit_file = folder / "b.toml"
    body = 'template = """' + "x" * (MAX_FILE_BYTES - 20) + '"""\n'
    limit_file.write_text(body, encoding="utf-8")
    assert limit_file.stat().st_size <= MAX_FILE_BYTES
    assert [p.name for p in store.import_(folder)] == ["a", "b"]  # at the limit: fine
    big = folder / "c.toml"
    big.write_text('template = """' + "x" * (3 * MAX_FILE_BYTES) + '"""\n', encoding="utf-8")
    error = bad_import(PromptStore(tmp_path / "other.db"), folder)
    assert error.file == str(big)
    assert "more than the 1 MiB a prompt file may hold" in str(error)
    assert "3.0 MiB" in str(error)


def test_two_files_with_the_same_prompt_name_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "greet.toml").write_text('template = "Hi"\n', encoding="utf-8")
    (folder / "hello.toml").write_text('description = "d"\nname = "greet"\ntemplate = "Hello"\n')
    with PromptStore(tmp_path / "s.db") as store:
        error = bad_import(store, folder)
    assert error.file == str(folder / "hello.toml")
    assert str(folder / "greet.toml") in str(error)
    assert "holds the prompt 'greet', and so does" in str(error)
    assert error.line == 2


@pytest.mark.parametrize(
    "value",
    [
        "[" * 5000 + "]" * 5000,
        "{a = " * 3000 + "1" + "}" * 3000,
        "[" * (MAX_NESTING + 1) + "]" * (MAX_NESTING + 1),
    ],
    ids=["arrays", "inline-tables", "just-over"],
)
def test_deeply_nested_toml_is_invalid_with_file_and_line(
    store: PromptStore, tmp_path: Path, value: str
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    deep = folder / "deep.toml"
    deep.write_text(f'template = "t"\n\nx = {value}\n', encoding="utf-8")
    error = bad_import(store, folder)  # never a RecursionError
    assert error.file == str(deep)
    assert error.line == 3
    assert "not valid TOML" in str(error)
    assert "nested" in str(error)


def test_brackets_inside_strings_and_comments_do_not_count_as_nesting(
    store: PromptStore, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    many = "[{" * 100
    (folder / "p.toml").write_text(
        f"# {many}\n"
        f'description = "{many} \\" {many}"\n'
        f"model = '{many}'\n"
        f"system = '''{many}\n{many}'''\n"
        f'template = """{many}\n\\""" {many}\n"""\n',
        encoding="utf-8",
    )
    [prompt] = store.import_(folder)
    assert prompt.template.startswith(many)
    assert prompt.model == many


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_pipe_named_like_a_prompt_file_is_refused_without_waiting(
    store: PromptStore, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    os.mkfifo(folder / "pipe.toml")
    error = bad_import(store, folder)  # reading a FIFO would block until someone writes
    assert "not a regular file" in str(error)


# ---------------------------------------------------------------------------------------------
# Export writes only its own files


def saved_two(store: PromptStore) -> None:
    store.save("alpha", "A {{x}}")
    store.save("beta", "B")


def test_export_never_writes_through_a_symbolic_link(store: PromptStore, tmp_path: Path) -> None:
    saved_two(store)
    outside = tmp_path / "outside.txt"
    outside.write_text("precious", encoding="utf-8")
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "beta.toml").symlink_to(outside)
    for force in (False, True):
        with pytest.raises(PromptFileError, match="symbolic link") as caught:
            store.export(folder, force=force)
        one_sentence(str(caught.value))
        assert caught.value.file == str(folder / "beta.toml")
        assert "nothing was written" in str(caught.value)
    assert outside.read_text(encoding="utf-8") == "precious"
    assert sorted(p.name for p in folder.iterdir()) == ["beta.toml"]  # alpha not written either
    (folder / "beta.toml").unlink()
    (folder / "beta.toml").symlink_to(tmp_path / "dangling")  # a link to nothing: same answer
    with pytest.raises(PromptFileError, match="symbolic link"):
        store.export(folder)
    assert not (tmp_path / "dangling").exists()


def test_export_leaves_files_it_did_not_write_unless_forced(
    store: PromptStore, tmp_path: Path
) -> None:
    saved_two(store)
    folder = tmp_path / "out"
    assert store.export(folder) == [folder / "alpha.toml", folder / "beta.toml"]
    store.save("alpha", "A again {{x}}")
    store.export(folder)  # its own files: overwritten without asking
    assert "A again" in (folder / "alpha.toml").read_text(encoding="utf-8")

    notes = folder / "beta.toml"
    notes.write_text("my notes, not TOML at all", encoding="utf-8")
    with pytest.raises(PromptFileError) as caught:
        store.export(folder)
    message = str(caught.value)
    one_sentence(message)
    assert f"The file {notes} exists and is not a prompt file for 'beta'" in message
    assert "--force" in message
    assert notes.read_text(encoding="utf-8") == "my notes, not TOML at all"

    notes.write_text('name = "gamma"\ntemplate = "G"\n', encoding="utf-8")  # another prompt's
    with pytest.raises(PromptFileError, match="prompt file of 'gamma'"):
        store.export(folder)

    assert store.export(folder, force=True) == [folder / "alpha.toml", folder / "beta.toml"]
    assert 'template = "B"' in notes.read_text(encoding="utf-8")


def test_export_refuses_a_folder_where_a_file_should_be(store: PromptStore, tmp_path: Path) -> None:
    saved_two(store)
    folder = tmp_path / "out"
    (folder / "alpha.toml").mkdir(parents=True)
    with pytest.raises(PromptFileError, match="not a regular file"):
        store.export(folder, force=True)
    assert not (folder / "beta.toml").exists()


def test_export_refuses_a_stored_name_that_cannot_be_a_file_name(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with PromptStore(path) as store:
        store.save("fine", "t")
    conn = sqlite3.connect(path)  # as an older version, which allowed these names, left it
    with conn:
        conn.execute(
            "INSERT INTO prompts (name, version, template, created_at) VALUES ('..', 1, 't', 0)"
        )
    conn.close()
    with PromptStore(path) as store, pytest.raises(PromptFileError) as caught:
        store.export(tmp_path / "out")
    assert "cannot be a file name" in str(caught.value)
    one_sentence(str(caught.value))
    assert not (tmp_path / "out" / "fine.toml").exists()


SCHEMA = {
    "title": "Reply",
    "type": "object",
    "properties": {"answer": {"type": "string"}, "note": {"const": None}},
    "required": ["answer"],
}


def test_a_schema_round_trips_as_indented_json(store: PromptStore, tmp_path: Path) -> None:
    store.save("structured", "Answer {{q}}.", schema=SCHEMA)
    [file] = store.export(tmp_path / "out")
    text = file.read_text(encoding="utf-8")
    assert text.index("template") < text.index("schema")
    assert '  "type": "object"' in text  # readable in a diff, one key a line
    with PromptStore(tmp_path / "fresh.db") as fresh:
        [copy] = fresh.import_(tmp_path / "out")
        assert copy.schema == store.get("structured").schema
        assert json.loads(copy.schema or "") == SCHEMA  # null survives (TOML has none)
        assert not fresh.import_versions(tmp_path / "out")[0].created  # same schema: no version


def test_a_schema_may_be_a_toml_table_and_a_bad_one_names_its_line(
    store: PromptStore, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "t.toml").write_text(
        'template = "Hi"\n\n[schema]\ntype = "object"\nrequired = ["a"]\n', encoding="utf-8"
    )
    [saved] = store.import_(folder)
    assert json.loads(saved.schema or "") == {"type": "object", "required": ["a"]}
    (folder / "t.toml").write_text('template = "Hi"\nschema = """{"type": 3}"""\n', "utf-8")
    with pytest.raises(PromptFileError) as caught:
        store.import_(folder)
    assert caught.value.line == 2
    assert "has a bad 'schema' (The schema is not a valid JSON Schema at $.type" in str(
        caught.value
    )
    one_sentence(str(caught.value))


def test_a_schema_that_cannot_be_a_literal_string_is_escaped(
    store: PromptStore, tmp_path: Path
) -> None:
    for said in ("quotes ''' here", "a \x7f here"):
        schema = {"type": "string", "description": said}
        store.save("odd", "Hi", schema=schema)
        store.export(tmp_path / "out")
        with PromptStore(tmp_path / f"fresh{len(said)}.db") as fresh:
            [copy] = fresh.import_(tmp_path / "out")
            assert json.loads(copy.schema or "") == schema
