"""Prompts from a file (``[inputs] prompts_file``): .txt and .jsonl, read relative to the
config file, every mistake named by file and line, all at once; a run from a file gives
exactly the datasets of the same prompts written inline, and the manifest records them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import probescope
from conftest import PROMPTS, basic_config, toml_list
from probescope.cli import main
from probescope.config import load_plan
from probescope.plugins.manager import load_registry
from probescope.prompt_files import read_prompts

INLINE = f"prompts = {toml_list(PROMPTS)}"


def file_config(model_dir: Path, inputs: str) -> str:
    """``basic_config`` with its inline prompts replaced by ``inputs``."""
    text = basic_config(model_dir, renderer=False)
    assert INLINE in text
    return text.replace(INLINE, inputs)


def problems_of(path: Path) -> list[str]:
    plan = load_plan(path, load_registry())
    return [f"{p.location}: {p.message}" for p in plan.problems]


def test_txt_lines_are_prompts_as_written_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("  leading spaces stay\n\n   \nsecond \"quoted\" {x}\r\nthird\n")
    read = read_prompts(path)
    assert read.problems == []
    assert read.prompts == ["  leading spaces stay", 'second "quoted" {x}', "third"]
    assert read.lines == [1, 4, 5]
    assert read.where(1) == "p.txt line 4"


def test_jsonl_lines_are_strings_or_objects_with_text(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('"a plain string"\n\n{"text": "two\\nlines", "id": 7}\n"caf\\u00e9"\n')
    read = read_prompts(path)
    assert read.problems == []
    assert read.prompts == ["a plain string", "two\nlines", "café"]
    assert read.lines == [1, 3, 4]


def test_every_bad_jsonl_line_is_named_with_its_line_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([
        '"fine"',
        '{"prompt": "wrong key"}',
        "not json",
        "42",
        '{"text": 3}',
        '"   "',
        '{"text": "fine too"}',
    ]))
    read = read_prompts(path)
    assert read.prompts == ["fine", "fine too"]
    shown = repr(str(path))
    assert read.problems == [
        f"{shown} line 2: the object has no \"text\" key (its keys: 'prompt'); the prompt goes in \"text\"",
        f"{shown} line 3: not valid JSON (Expecting value at column 1); expected a JSON string or {{\"text\": ...}}",
        f"{shown} line 4: expected a JSON string or an object with a \"text\" key, got int 42",
        f"{shown} line 5: \"text\" holds int 3; expected a string",
        f"{shown} line 6: the prompt is empty or only whitespace",
    ]


@pytest.mark.parametrize("name, content, expected", [
    ("missing.txt", None, "no prompts file at {path!r}; the path is relative to the config file"),
    ("empty.txt", "", "{path!r} holds no prompts; expected one prompt per line"),
    ("blank.jsonl", "\n  \n\n", "{path!r} holds no prompts; expected one JSON string or {{\"text\": ...}} object per line"),
    ("prompts.csv", "a,b\n", "{path!r} is neither a .txt nor a .jsonl file"),
    ("latin1.txt", b"fine\ncaf\xe9\n", "{path!r} line 2: not UTF-8 text"),
])
def test_a_file_that_is_not_a_prompts_file_says_why(tmp_path, name, content, expected):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    read = read_prompts(path)
    assert read.prompts == [] and len(read.problems) == 1
    assert read.problems[0].startswith(expected.format(path=str(path)))


def test_prompts_file_is_relative_to_the_config_file(model_dirs, tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    config = folder / "run.toml"
    config.write_text(file_config(model_dirs["gpt2"], 'prompts_file = "data/prompts.txt"'))
    monkeypatch.chdir(tmp_path)  # not the config's folder
    plan = load_plan(config, load_registry())
    assert plan.problems == []
    assert plan.prompts == PROMPTS
    assert plan.prompt_location(1) == "inputs.prompts_file (prompts.txt line 2)"


def test_all_prompt_file_mistakes_come_at_once_with_the_rest(model_dirs, write_config, tmp_path):
    (tmp_path / "bad.jsonl").write_text('"ok"\n{"txt": "typo"}\n[1]\n')
    text = file_config(model_dirs["gpt2"], 'prompts_file = "bad.jsonl"').replace("batch_size = 2", "batch_size = 0")
    found = problems_of(write_config(text))
    bad = repr(str(tmp_path / "bad.jsonl"))
    assert f"inputs.prompts_file: {bad} line 2: the object has no \"text\" key (its keys: 'txt'); " \
           "the prompt goes in \"text\"" in found
    assert f"inputs.prompts_file: {bad} line 3: expected a JSON string or an object with a \"text\" key, " \
           "got list [1]" in found
    assert any(p.startswith("inputs.batch_size: ") for p in found)
    assert len(found) == 3


def test_prompts_and_prompts_file_together_or_neither_is_an_error(model_dirs, write_config, tmp_path):
    (tmp_path / "p.txt").write_text("hello\n")
    both = file_config(model_dirs["gpt2"], f'{INLINE}\nprompts_file = "p.txt"')
    assert problems_of(write_config(both)) == ["inputs: give prompts (inline) or prompts_file, not both"]
    neither = file_config(model_dirs["gpt2"], "")
    assert problems_of(write_config(neither)) == [
        'inputs: give prompts = ["...", ...] or prompts_file = "prompts.txt" (or .jsonl)']


def test_missing_prompts_file_fails_the_cli_with_exit_2_and_writes_nothing(model_dirs, write_config, tmp_path, capsys):
    path = write_config(file_config(model_dirs["gpt2"], 'prompts_file = "nowhere.txt"'))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"inputs.prompts_file: no prompts file at {str(tmp_path / 'nowhere.txt')!r}" in err
    assert not (tmp_path / "out").exists()


def test_a_too_long_prompt_in_a_file_is_located_by_its_line(model_dirs, write_config, tmp_path, capsys):
    (tmp_path / "p.txt").write_text(f"{PROMPTS[0]}\n\n{' '.join(['word'] * 300)}\n")
    path = write_config(file_config(model_dirs["gpt2"], 'prompts_file = "p.txt"'))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "inputs.prompts_file (p.txt line 3): model 'tiny': the prompt is" in err


def test_images_are_counted_against_the_prompts_of_the_file(model_dirs, write_config, tmp_path):
    (tmp_path / "p.txt").write_text("one\ntwo\nthree\n")
    text = file_config(model_dirs["gpt2"], 'prompts_file = "p.txt"\nimages = ["", ""]')
    assert "inputs.images: images has 2 entries for 3 prompts in p.txt; give one per prompt, in the same " \
           "order (\"\" for a prompt without an image)" in problems_of(write_config(text))


@pytest.mark.parametrize("suffix, content", [
    (".txt", "\n".join(PROMPTS) + "\n"),
    (".jsonl", json.dumps(PROMPTS[0]) + "\n" + json.dumps({"text": PROMPTS[1], "id": 2}) + "\n"),
])
def test_a_run_from_a_file_equals_the_inline_run_and_the_manifest_records_its_prompts(
        model_dirs, tmp_path, suffix, content):
    (tmp_path / "inline").mkdir()
    (tmp_path / "file").mkdir()
    inline = tmp_path / "inline" / "run.toml"
    inline.write_text(basic_config(model_dirs["gpt2"], renderer=False))
    (tmp_path / "file" / f"prompts{suffix}").write_text(content)
    from_file = tmp_path / "file" / "run.toml"
    from_file.write_text(file_config(model_dirs["gpt2"], f'prompts_file = "prompts{suffix}"'))
    assert main(["run", str(inline)]) == 0
    assert main(["run", str(from_file)]) == 0
    a = probescope.load(tmp_path / "inline" / "out" / "tiny" / "token_similarity.nc")
    b = probescope.load(tmp_path / "file" / "out" / "tiny" / "token_similarity.nc")
    assert json.loads(b.attrs["prompts"]) == PROMPTS
    np.testing.assert_array_equal(a["similarity"].values, b["similarity"].values)
    manifest = json.loads((tmp_path / "file" / "out" / "manifest.json").read_text())
    assert manifest["prompts"] == PROMPTS
    assert manifest["config"]["inputs"]["prompts"] == PROMPTS
    assert manifest["config"]["inputs"]["prompts_file"] == str(tmp_path / "file" / f"prompts{suffix}")
