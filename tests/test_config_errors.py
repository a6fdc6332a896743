"""Malformed configurations: each one gives its documented message and exit status 2,
and leaves nothing behind.

Every problem is printed as ``FILE: KEY.PATH: message`` (see docs/configuration.md,
"Errors"). These tests run the command line in-process and check, for each mistake, the
exit status, the file, the key path and the wording of what was expected, and that the
folder holding the config is exactly as it was before the run: no output folder, no
result, no figure. Validation never loads weights; an autouse fixture makes loading
weights an error here, so a config that slips through validation fails loudly and fast.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

import probescope
from conftest import PROMPTS, basic_config, toml_list
from probescope import models as models_mod
from probescope.cli import main
from probescope.config import load_plan
from probescope.plugins.manager import load_registry
from probescope.runner import prepare

LONG_PROMPT = " ".join(["word"] * 300)  # far more than the tiny models' 128 positions


@pytest.fixture(autouse=True)
def no_weights(monkeypatch):
    """Loading weights is a test failure: every check here must happen before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded: validation let a bad config through")

    monkeypatch.setattr(models_mod, "load", refuse)


# --------------------------------------------------------------------------------------
# Helpers


def snapshot(folder: Path) -> set[str]:
    """Every file and folder under ``folder``, relative to it."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def run_cli(path: Path, capsys) -> tuple[int, str]:
    rc = main(["run", str(path)])
    captured = capsys.readouterr()
    return rc, captured.err


def problem_lines(stderr: str, path: Path) -> list[str]:
    """The problems of ``stderr``, each as ``KEY.PATH: message`` (the file name removed)."""
    prefix = f"  {path}: "
    return [line[len(prefix):] for line in stderr.splitlines() if line.startswith(prefix)]


def find_problem(stderr: str, path: Path, location: str) -> str:
    """The message of the problem at ``location`` ("" for the whole file); fails the test
    with the whole stderr when there is none."""
    lines = problem_lines(stderr, path)
    if location:
        found = [line[len(location) + 2:] for line in lines if line.startswith(f"{location}: ")]
    else:  # whole-file problems: the message follows the file name directly
        found = lines
    assert found, f"no problem reported at {location or '<file>'!r} in:\n{stderr}"
    return found[0]


def replace(text: str, old: str, new: str) -> str:
    assert old in text, f"{old!r} not in the config text"
    return text.replace(old, new, 1)


def with_prompts(text: str, prompts: str) -> str:
    return replace(text, f"prompts = {toml_list(PROMPTS)}", f"prompts = {prompts}")


def with_model_key(text: str, line: str) -> str:
    return replace(text, 'name = "tiny"', f'name = "tiny"\n{line}')


def with_probe_key(text: str, line: str) -> str:
    return replace(text, 'use = "token_similarity"', f'use = "token_similarity"\n{line}')


def with_renderer_key(text: str, line: str) -> str:
    return replace(text, 'output = "similarity.png"', f'output = "similarity.png"\n{line}')


# --------------------------------------------------------------------------------------
# One malformed config per case


@dataclass
class Case:
    """``build(model_dirs, folder)`` returns the config text; the problem is expected at
    ``location`` with a message containing each of ``expect`` (plain text, or a compiled
    regular expression). ``folder`` is where the config is written."""

    id: str
    build: Callable[[dict[str, Path], Path], str]
    location: str
    expect: list = field(default_factory=list)
    marks: tuple = ()


def gpt2_config(**kw) -> Callable[[dict[str, Path], Path], str]:
    return lambda dirs, folder: basic_config(dirs["gpt2"], **kw)


def edit(change: Callable[[str], str], model: str = "gpt2", **kw) -> Callable[[dict[str, Path], Path], str]:
    return lambda dirs, folder: change(basic_config(dirs[model], **kw))


def empty_model_folder(dirs: dict[str, Path], folder: Path) -> str:
    empty = folder / "empty-model"
    empty.mkdir()
    return basic_config(empty)


CASES = [
    # ---- plugin names and parameters
    Case("unknown-probe", edit(lambda t: replace(t, 'use = "token_similarity"', 'use = "nope"')),
         "probes[0].use", ["unknown probe 'nope'", "available: component_norm, head_classifier, token_similarity"]),
    Case("unknown-renderer", edit(lambda t: replace(t, 'use = "similarity_grid"', 'use = "grid"')),
         "renderers[0].use", ["unknown renderer 'grid'", "available: component_heatmap, head_category_map, similarity_by_distance, similarity_grid"]),
    Case("unknown-probe-parameter", edit(lambda t: with_probe_key(t, "layer = 2")),
         "probes[0]", ["unknown key 'layer'", "token_similarity takes layers, metric"]),
    Case("unknown-renderer-parameter", edit(lambda t: with_renderer_key(t, 'colour = "red"')),
         "renderers[0]", ["unknown key 'colour'", "similarity_grid takes title, prompt, layers,"]),
    Case("metric-not-allowed", edit(lambda t: with_probe_key(t, 'metric = "euclid"')),
         "probes[0].metric", ["'cosine' or 'centred_cosine'", "(got 'euclid')"]),
    Case("renderer-parameter-wrong-type", edit(lambda t: with_renderer_key(t, 'prompt = "first"')),
         "renderers[0].prompt", ["valid integer", "(got 'first')"]),
    # ---- unknown keys and wrong types in the file's own schema
    Case("unknown-top-level-key", lambda dirs, folder: "colour = 1\n" + basic_config(dirs["gpt2"]),
         "", ["unknown key 'colour'"]),
    Case("unknown-model-key", edit(lambda t: with_model_key(t, 'colour = "red"')),
         "models[0]", ["unknown key 'colour'"]),
    Case("batch-size-string", edit(lambda t: replace(t, "batch_size = 2", 'batch_size = "two"')),
         "inputs.batch_size", ["valid integer", "(got 'two')"]),
    Case("batch-size-zero", edit(lambda t: replace(t, "batch_size = 2", "batch_size = 0")),
         "inputs.batch_size", ["greater than or equal to 1", "(got 0)"]),
    Case("layers-not-a-list", gpt2_config(layers='"all"'),
         "probes[0].layers", ["valid list", "(got 'all')"]),
    Case("layers-empty", gpt2_config(layers="[]"),
         "probes[0].layers", ["give at least one"]),
    Case("dtype-not-allowed", edit(lambda t: with_model_key(t, 'dtype = "int8"')),
         "models[0].dtype", ["'float32'", "'bfloat16'", "(got 'int8')"]),
    Case("output-dir-wrong-type", edit(lambda t: replace(t, 'dir = "out"', "dir = 5")),
         "output.dir", ["valid string", "(got 5)"]),
    Case("models-as-table", edit(lambda t: replace(t, "[[models]]", "[models]")),
         "models", ["expected an array of tables"]),
    Case("inputs-missing", edit(lambda t: replace(t, "[inputs]", "[input]")),
         "inputs", ["required section is missing", "prompts"]),
    Case("probe-use-missing", edit(lambda t: replace(t, 'use = "token_similarity"', "")),
         "probes[0].use", ["required key is missing"]),
    Case("no-models", lambda dirs, folder: '[inputs]\nprompts = ["hi"]\n\n[[probes]]\nuse = "token_similarity"\n',
         "models", ["at least one [[models]] entry"]),
    # ---- layers checked against the model's config (3 layers)
    Case("layer-too-high", gpt2_config(layers="[0, 3]"),
         "probes[0].layers[1]", ["model 'tiny'", "layer 3 is out of range", "has 3 layers", 'give -3..2, "last" or "embed"']),
    Case("layer-too-low", gpt2_config(layers="[0, -4]"),
         "probes[0].layers[1]", ["layer -4 is out of range", 'give -3..2, "last" or "embed"']),
    Case("layer-out-of-range-llama", edit(lambda t: t, model="llama", layers='["embed", 7]'),
         "probes[0].layers[1]", ["layer 7 is out of range", "has 3 layers"]),
    # ---- models
    Case("missing-model-folder", lambda dirs, folder: basic_config(folder / "no-such-model"),
         "models[0].path", [re.compile(r"no model folder at '.*/no-such-model'"), "config.json"]),
    Case("missing-model-folder-relative",  # relative paths are taken from the config's folder
         edit(lambda t: re.sub(r'path = ".*"', 'path = "models/absent"', t)),
         "models[0].path", [re.compile(r"no model folder at '.+/models/absent'")]),
    Case("folder-without-config-json", empty_model_folder,
         "models[0].path", [re.compile(r"folder '.*/empty-model' has no config.json")]),
    Case("both-path-and-hub", edit(lambda t: with_model_key(t, 'hub = "gpt2"')),
         "models[0]", ["exactly one of path (a local folder) or hub (a hub id)"]),
    Case("neither-path-nor-hub", edit(lambda t: re.sub(r'path = ".*"\n', "", t)),
         "models[0]", ["exactly one of path (a local folder) or hub (a hub id)"]),
    Case("hub-id-unavailable", edit(lambda t: re.sub(r'path = ".*"', 'hub = "someone/no-such-model"', t)),
         "models[0]", ["model 'tiny'", "cannot read the config of 'someone/no-such-model'"]),
    Case("unknown-architecture", edit(lambda t: with_model_key(t, 'architecture = "bert"')),
         "models[0].architecture", ["unknown architecture 'bert'", "available: gemma, gemma2, gpt2, gpt_neox"]),
    Case("duplicate-model-names",
         lambda dirs, folder: basic_config(dirs["gpt2"]) + f'\n[[models]]\nname = "tiny"\npath = "{dirs["llama"]}"\n',
         "models[1].name", ["model name 'tiny' is used twice"]),
    # ---- inputs
    Case("empty-prompt-list", edit(lambda t: with_prompts(t, "[]")),
         "inputs.prompts", [re.compile(r"at least (1|one)")]),
    Case("blank-prompt", edit(lambda t: with_prompts(t, '["Hello there", "   "]')),
         "inputs.prompts", ["prompt 1 is empty"]),
    Case("prompts-not-a-list", edit(lambda t: with_prompts(t, '"Hello there"')),
         "inputs.prompts", ["valid list", "(got 'Hello there')"]),
    Case("prompt-too-long", edit(lambda t: with_prompts(t, f'["{LONG_PROMPT}"]')),
         "inputs.prompts[0]", ["model 'tiny'", re.compile(r"the prompt is \d+ tokens long"), "at most 128"]),
    # ---- probe entries and renderers
    Case("duplicate-probe-entry-names",
         lambda dirs, folder: basic_config(dirs["gpt2"]) + '\n[[probes]]\nuse = "token_similarity"\n',
         "probes[1]", ["two probe entries are named 'token_similarity'", 'distinct name = "..."']),
    Case("bad-figure-extension", edit(lambda t: replace(t, '"similarity.png"', '"fig.jpg"')),
         "renderers[0].output", ["figure file 'fig.jpg' must end in one of .png, .pdf, .svg"]),
    Case("renderer-names-missing-probe-entry", edit(lambda t: with_renderer_key(t, 'probe = "missing"')),
         "renderers[0].probe", ["no probe entry named 'missing'", "entries: token_similarity"]),
    Case("two-renderers-one-file",
         lambda dirs, folder: basic_config(dirs["gpt2"]) + '\n[[renderers]]\nuse = "similarity_grid"\noutput = "similarity.png"\n',
         "renderers[1].output", ["two renderers write 'similarity.png'"]),
    # ---- the file itself
    Case("invalid-toml", lambda dirs, folder: basic_config(dirs["gpt2"]) + "\nthis is = = not toml\n",
         "", ["not valid TOML", re.compile(r"line \d+")]),
    # ---- messages that once were poor or missing
    Case("unknown-top-level-key-lists-sections",
         lambda dirs, folder: "colour = 1\n" + basic_config(dirs["gpt2"]),
         "", ["unknown key 'colour'", "models", "inputs", "probes", "renderers", "output"]),
    Case("layer-fraction-one-problem", gpt2_config(layers="[0, 1.5]"),
         "probes[0].layers[1]", ["embed", "(got 1.5)"]),
    Case("layer-boolean-rejected", gpt2_config(layers="[true]"),
         "probes[0].layers[0]", ["(got True)"]),
    Case("batch-size-boolean-rejected", edit(lambda t: replace(t, "batch_size = 2", "batch_size = true")),
         "inputs.batch_size", ["valid integer", "(got True)"]),
    Case("model-name-not-a-file-name", edit(lambda t: replace(t, 'name = "tiny"', 'name = "my model"')),
         "models[0].name", ["letters", "digits", "'my model' is not a valid name"]),
    Case("device-unknown", edit(lambda t: with_model_key(t, 'device = "gpu"')),
         "models[0].device", ["'gpu'", "cpu", "cuda"]),
    Case("architecture-does-not-fit-model", edit(lambda t: with_model_key(t, 'architecture = "llama"')),
         "models[0].architecture", ["llama", "'gpt2'"]),
    Case("renderer-prompt-out-of-range", edit(lambda t: with_renderer_key(t, "prompt = 2")),
         "renderers[0].prompt", ["prompt 2", "2 prompts"]),
    Case("renderer-layer-not-probed", edit(lambda t: with_renderer_key(t, "layers = [1]")),
         "renderers[0].layers[0]", ["1"]),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_malformed_config(case: Case, model_dirs, write_config, tmp_path, capsys):
    text = case.build(model_dirs, tmp_path)
    path = write_config(text)
    before = snapshot(tmp_path)

    rc, err = run_cli(path, capsys)

    assert rc == 2, err
    assert err.startswith(f"error: {path}: "), err
    assert "Traceback" not in err
    # Key paths are the user's keys: no pydantic internals such as union members.
    assert not re.search(r"literal\[|function-|\.int\b|\.str\b", err), err
    message = find_problem(err, path, case.location)
    for expected in case.expect:
        if isinstance(expected, re.Pattern):
            assert expected.search(message), f"{expected.pattern!r} not in {message!r}"
        else:
            assert expected in message, f"{expected!r} not in {message!r}"
    assert not (tmp_path / "out").exists()
    assert snapshot(tmp_path) == before  # nothing written, not even an empty folder


def test_problem_count_in_header(model_dirs, write_config, capsys):
    path = write_config(basic_config(model_dirs["gpt2"], layers="[0, 3]"))
    rc, err = run_cli(path, capsys)
    assert rc == 2
    assert err.splitlines()[0] == f"error: {path}: 1 problem(s) in the configuration"
    assert problem_lines(err, path) == [
        "probes[0].layers[1]: model 'tiny': layer 3 is out of range: the model has 3 layers, "
        'so give -3..2, "last" or "embed"'
    ]


def test_layer_checked_against_every_model(model_dirs, write_config, capsys):
    text = basic_config(model_dirs["gpt2"], layers="[5]")
    text += f'\n[[models]]\nname = "other"\npath = "{model_dirs["llama"]}"\n'
    path = write_config(text)
    rc, err = run_cli(path, capsys)
    assert rc == 2
    messages = problem_lines(err, path)
    assert len(messages) == 2
    assert all(m.startswith("probes[0].layers[0]: ") for m in messages)
    assert "model 'tiny'" in messages[0] and "model 'other'" in messages[1]


def test_config_file_does_not_exist(tmp_path, capsys):
    path = tmp_path / "absent.toml"
    rc, err = run_cli(path, capsys)
    assert rc == 2
    assert find_problem(err, path, "") == "no such file"
    assert snapshot(tmp_path) == set()


# --------------------------------------------------------------------------------------
# Every mistake at once


def three_schema_mistakes(dirs: dict[str, Path]) -> str:
    text = basic_config(dirs["gpt2"])
    text = replace(text, "batch_size = 2", 'batch_size = "two"')
    text = with_model_key(text, 'colour = "red"')
    return replace(text, '"similarity.png"', '"fig.jpg"')


def schema_parameter_and_folder_mistakes(dirs: dict[str, Path]) -> str:
    text = basic_config(dirs["gpt2"])
    text = replace(text, "batch_size = 2", 'batch_size = "two"')
    text = with_probe_key(text, 'metric = "euclid"')
    return re.sub(r'path = ".*"', 'path = "no-such-model"', text)


def schema_and_model_mistakes(dirs: dict[str, Path]) -> str:
    text = basic_config(dirs["gpt2"], layers="[0, 3]")
    text = with_prompts(text, f'["{LONG_PROMPT}"]')
    return replace(text, '"similarity.png"', '"fig.jpg"')


def model_mistakes(dirs: dict[str, Path]) -> str:
    text = basic_config(dirs["gpt2"], layers="[0, 3, -4]")
    return with_prompts(text, f'["Hello there", "{LONG_PROMPT}"]')


@pytest.mark.parametrize("build, expected", [
    pytest.param(three_schema_mistakes,
                 {"inputs.batch_size": "(got 'two')", "models[0]": "unknown key 'colour'",
                  "renderers[0].output": "'fig.jpg'"},
                 id="three-schema-mistakes"),
    pytest.param(schema_parameter_and_folder_mistakes,
                 {"inputs.batch_size": "(got 'two')", "probes[0].metric": "(got 'euclid')",
                  "models[0].path": "no model folder"},
                 id="schema-parameter-and-folder"),
    pytest.param(schema_and_model_mistakes,
                 {"renderers[0].output": "'fig.jpg'", "probes[0].layers[1]": "layer 3 is out of range",
                  "inputs.prompts[0]": "at most 128"},
                 id="schema-and-model-checks"),
    pytest.param(model_mistakes,
                 {"probes[0].layers[1]": "layer 3 is out of range",
                  "probes[0].layers[2]": "layer -4 is out of range",
                  "inputs.prompts[1]": "tokens long"},
                 id="prompt-and-layers-against-model"),
])
def test_every_mistake_reported_at_once(build, expected, model_dirs, write_config, tmp_path, capsys):
    path = write_config(build(model_dirs))
    before = snapshot(tmp_path)
    rc, err = run_cli(path, capsys)
    assert rc == 2, err
    for location, words in expected.items():
        assert words in find_problem(err, path, location), err
    assert len(problem_lines(err, path)) == len(expected), err
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------------------
# The valid config passes, so the cases above fail for their one mistake


@pytest.mark.parametrize("model", ["gpt2", "llama"])
@pytest.mark.parametrize("layers", ["[0, -1]", '[-3, "embed", 2]'])
def test_valid_config_passes_validation(model, layers, model_dirs, write_config, tmp_path):
    path = write_config(basic_config(model_dirs[model], layers=layers))
    registry = load_registry()
    plan = load_plan(path, registry)
    prepared = prepare(plan, registry)

    assert [p.info.name for p in prepared] == ["tiny"]
    info = prepared[0].info
    assert (info.num_layers, info.max_positions) == (3, 128)
    assert len(prepared[0].prompts) == len(PROMPTS) and all(len(p) > 0 for p in prepared[0].prompts)
    assert plan.output_dir == tmp_path / "out"
    assert [r.output for r in plan.renderers] == [tmp_path / "out" / "similarity.png"]
    assert not plan.output_dir.exists()


def test_relative_model_path_is_taken_from_the_config_folder(model_dirs, write_config, tmp_path):
    (tmp_path / "models").symlink_to(model_dirs["gpt2"].parent)
    path = write_config(basic_config(Path("models") / "gpt2"))
    plan = load_plan(path, load_registry())
    assert Path(plan.models[0][1].path) == tmp_path / "models" / "gpt2"


# --------------------------------------------------------------------------------------
# The Python API raises ConfigError with the problems as data


def dict_config(model_dir, layers) -> dict:
    return {
        "models": [{"name": "tiny", "path": str(model_dir)}],
        "inputs": {"prompts": list(PROMPTS), "batch_size": 2},
        "probes": [{"use": "token_similarity", "layers": layers}],
        "output": {"dir": "out"},
    }


def test_api_schema_problems(model_dirs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = dict_config(model_dirs["gpt2"], [0])
    config["inputs"]["batch_size"] = "two"
    config["probes"][0]["metric"] = "euclid"
    config["renderers"] = [{"use": "similarity_grid", "output": "grid.jpg"}]
    with pytest.raises(probescope.ConfigError) as info:
        probescope.run(config, write=False)
    error = info.value
    assert error.source == "<config dict>"
    locations = [p.location for p in error.problems]
    assert "inputs.batch_size" in locations
    assert "renderers[0].output" in locations
    assert str(error).startswith("<config dict>: ")
    assert snapshot(tmp_path) == set()


def test_api_model_problems(model_dirs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = dict_config(model_dirs["llama"], [0, 9, "embed", -5])
    with pytest.raises(probescope.ConfigError) as info:
        probescope.run(config, write=False)
    problems = info.value.problems
    assert [p.location for p in problems] == ["probes[0].layers[1]", "probes[0].layers[3]"]
    assert "layer 9 is out of range" in problems[0].message
    assert "layer -5 is out of range" in problems[1].message
    assert snapshot(tmp_path) == set()


def test_api_relative_path_is_taken_from_the_working_directory(model_dirs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = dict_config("nowhere", [0])
    with pytest.raises(probescope.ConfigError) as info:
        probescope.run(config, write=False)
    (problem,) = info.value.problems
    assert problem.location == "models[0].path"
    assert repr(str(tmp_path / "nowhere")) in problem.message


def test_api_given_model_checked_too(gpt2, tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = {
        "inputs": {"prompts": list(PROMPTS)},
        "probes": [{"use": "token_similarity", "layers": [4]}],
    }
    with pytest.raises(probescope.ConfigError) as info:
        probescope.run(config, models={"mem": (gpt2, tokenizer)}, write=False)
    (problem,) = info.value.problems
    assert problem.location == "probes[0].layers[0]"
    assert "model 'mem'" in problem.message and "layer 4 is out of range" in problem.message


# --------------------------------------------------------------------------------------
# Mistakes that used to hide each other (issue: every mistake at once, across both stages)


def test_six_mistakes_of_one_renderer_and_its_probe_in_one_run(model_dirs, write_config, tmp_path, capsys):
    """A bad figure format, an unknown colour map and a bad parameter kept the renderer's
    other checks (against the run's prompts and the probe's layers) from running, and
    those kept each other hidden: four runs to see six mistakes. Now one."""
    text = basic_config(model_dirs["gpt2"], layers="[10, -7]")
    text = replace(text, '"similarity.png"', '"sim.jpg"')
    text = replace(text, 'output = "sim.jpg"', 'output = "sim.jpg"\ncmap = "YlOrRdd"\nprompt = 5\nlayers = [3]')
    path = write_config(text)
    before = snapshot(tmp_path)
    rc, err = run_cli(path, capsys)
    assert rc == 2, err
    expected = {
        "renderers[0].output": "'sim.jpg' must end in one of .png, .pdf, .svg",
        "renderers[0].cmap": "'YlOrRdd' is not a matplotlib colour map; did you mean 'YlOrRd'?",
        "renderers[0].prompt": "prompt 5 is out of range: the run has 2 prompts",
        "renderers[0].layers[0]": "layer 3 is out of range",
        "probes[0].layers[0]": "layer 10 is out of range",
        "probes[0].layers[1]": "layer -7 is out of range",
    }
    for location, words in expected.items():
        assert words in find_problem(err, path, location), err
    assert len(problem_lines(err, path)) == len(expected), err
    assert snapshot(tmp_path) == before


def test_a_misspelt_key_does_not_hide_the_entrys_other_mistakes(model_dirs, write_config, capsys):
    path = write_config(with_probe_key(basic_config(model_dirs["gpt2"], layers="[10]", renderer=False),
                                       'metrc = "cosine"'))
    rc, err = run_cli(path, capsys)
    assert rc == 2
    assert "unknown key 'metrc'; did you mean 'metric'?" in find_problem(err, path, "probes[0]")
    assert "layer 10 is out of range" in find_problem(err, path, "probes[0].layers[0]")
    assert len(problem_lines(err, path)) == 2, err


def test_a_bad_model_key_does_not_hide_the_layer_checks_against_that_model(model_dirs, write_config, capsys):
    path = write_config(with_model_key(basic_config(model_dirs["gpt2"], layers="[10]", renderer=False),
                                       'dtyp = "float32"'))
    rc, err = run_cli(path, capsys)
    assert rc == 2
    assert "unknown key 'dtyp'; did you mean 'dtype'?" in find_problem(err, path, "models[0]")
    assert "layer 10 is out of range" in find_problem(err, path, "probes[0].layers[0]")
    assert len(problem_lines(err, path)) == 2, err


@pytest.mark.parametrize("change, location, words", [
    (lambda t: replace(t, "batch_size = 2", "batch_size = 0"), "inputs.batch_size", "greater than or equal to 1"),
    (lambda t: with_prompts(t, '["Hello", ""]'), "inputs.prompts", "prompt 1 is empty"),
    (lambda t: with_prompts(t, "[]"), "inputs.prompts", "at least 1"),
], ids=["batch-size-zero", "empty-prompt", "no-prompts"])
def test_a_bad_inputs_section_is_not_also_reported_missing(change, location, words, model_dirs, write_config, capsys):
    path = write_config(change(basic_config(model_dirs["gpt2"], layers="[0, 5]", renderer=False)))
    rc, err = run_cli(path, capsys)
    assert rc == 2
    assert words in find_problem(err, path, location)
    assert "required section is missing" not in err
    assert "layer 5 is out of range" in find_problem(err, path, "probes[0].layers[1]")  # stage two still ran
    assert len(problem_lines(err, path)) == 2, err


@pytest.mark.parametrize("change, location, words", [
    (lambda t: replace(t, 'use = "token_similarity"', 'use = "token_similarty"'), "probes[0].use",
     "unknown probe 'token_similarty'; did you mean 'token_similarity'?"),
    (lambda t: replace(t, 'use = "similarity_grid"', 'use = "similarity_grd"'), "renderers[0].use",
     "unknown renderer 'similarity_grd'; did you mean 'similarity_grid'?"),
    (lambda t: with_probe_key(t, 'metrc = "cosine"'), "probes[0]", "unknown key 'metrc'; did you mean 'metric'?"),
    (lambda t: with_renderer_key(t, 'cmap = "viridiss"'), "renderers[0].cmap", "did you mean 'viridis'?"),
    (lambda t: "[[probe]]\nuse = 'x'\n" + t, "", "unknown key 'probe'; did you mean 'probes'?"),
    (lambda t: replace(t, 'dir = "out"', 'dri = "out"'), "output", "unknown key 'dri'; did you mean 'dir'?"),
], ids=["probe", "renderer", "probe-key", "colour-map", "section", "section-key"])
def test_unknown_names_get_the_closest_known_one(change, location, words, model_dirs, write_config, capsys):
    path = write_config(change(basic_config(model_dirs["gpt2"])))
    rc, err = run_cli(path, capsys)
    assert rc == 2
    assert words in find_problem(err, path, location), err


def test_no_suggestion_for_a_name_close_to_nothing(model_dirs, write_config, capsys):
    path = write_config(replace(basic_config(model_dirs["gpt2"]), 'use = "token_similarity"', 'use = "qqqq"'))
    rc, err = run_cli(path, capsys)
    assert "did you mean" not in find_problem(err, path, "probes[0].use")


# --------------------------------------------------------------------------------------
# Everything that can be checked before loading is


def test_output_folder_that_is_a_file(model_dirs, write_config, tmp_path, capsys):
    (tmp_path / "out").write_text("not a folder")
    path = write_config(basic_config(model_dirs["gpt2"]))
    before = snapshot(tmp_path)
    rc, err = run_cli(path, capsys)
    assert rc == 2, err
    assert "is a file, not a folder" in find_problem(err, path, "output.dir")
    assert snapshot(tmp_path) == before and (tmp_path / "out").read_text() == "not a folder"


def test_folder_above_the_output_folder_that_is_a_file(model_dirs, write_config, tmp_path, capsys):
    (tmp_path / "blocker").write_text("")
    path = write_config(replace(basic_config(model_dirs["gpt2"]), 'dir = "out"', 'dir = "blocker/out"'))
    rc, err = run_cli(path, capsys)
    assert rc == 2
    assert "above the output folder, is a file" in find_problem(err, path, "output.dir")


def test_model_result_folder_or_figure_path_taken(model_dirs, write_config, tmp_path, capsys):
    (tmp_path / "out" / "similarity.png").mkdir(parents=True)
    (tmp_path / "out" / "tiny").write_text("")
    path = write_config(basic_config(model_dirs["gpt2"]))
    rc, err = run_cli(path, capsys)
    assert rc == 2
    assert "model 'tiny' writes its datasets into" in find_problem(err, path, "output.dir")
    assert "which is a file; move it away" in find_problem(err, path, "output.dir")
    assert "is a folder; give a figure file name" in find_problem(err, path, "renderers[0].output")


def test_model_folder_without_weights(model_dirs, write_config, tmp_path, capsys):
    folder = tmp_path / "config-only"
    folder.mkdir()
    (folder / "config.json").write_text((model_dirs["gpt2"] / "config.json").read_text())
    path = write_config(basic_config(folder))
    rc, err = run_cli(path, capsys)
    assert rc == 2
    assert "holds no weight files" in find_problem(err, path, "models[0].path")
