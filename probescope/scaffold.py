"""``probescope new probe NAME`` / ``probescope new renderer NAME``: a package ready to
install, with the ``probescope`` entry point, a working plugin and a test that passes.

The probe skeleton computes something real (the mean norm of the residual stream per
layer) and its test checks it against ``output_hidden_states`` of a tiny model built
offline; the renderer skeleton draws any dataset with a ``layer`` dimension and its test
draws a real run. Both use only names importable from ``probescope``.
"""

from __future__ import annotations

import re
from pathlib import Path

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

_PYPROJECT = '''[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "0.1.0"
description = "{what} {name} for probescope"
requires-python = ">=3.10"
dependencies = ["probescope"]

[project.optional-dependencies]
test = ["pytest"]

# probescope finds plugins through this entry-point group, as it finds its own built-ins.
[project.entry-points.probescope]
{name} = "{module}.plugin"

[tool.setuptools]
packages = ["{module}"]
'''

_PROBE = '''"""The {name} probe: the mean L2 norm of the residual stream after each block, over
every real (non-padding) token of every prompt. Replace the reduction and the dataset
with your own; the shape of the code stays the same."""

from __future__ import annotations

from pydantic import Field

import probescope
from probescope import Parameters, Probe, Read, lazy_import, resid

# Imported on first use, so `probescope plugins` lists this plugin without loading them.
np = lazy_import("numpy")
xr = lazy_import("xarray")


class {cls}Parameters(Parameters):
    layers: list[int] | None = Field(default=None, description="block indices; default every block")


class {cls}(Probe):
    name = "{name}"
    version = "0.1.0"
    description = "mean L2 norm of the residual stream after each block"
    Parameters = {cls}Parameters

    def _layers(self, params, num_layers):
        layers = range(num_layers) if params.layers is None else params.layers
        return sorted({{layer % num_layers for layer in layers}})

    def reads(self, params, model):
        # Each reduction runs inside the shared traced pass: only its result leaves it.
        # accumulate=True: each batch's (sum, count) is added to one running total, so
        # memory does not grow with the number of prompts.
        return [Read(f"resid_{{layer}}", resid(layer), _sum_and_count, accumulate=True)
                for layer in self._layers(params, model.num_layers)]

    def build(self, params, run):
        layers = self._layers(params, run.model.info.num_layers)
        means = []
        for layer in layers:
            (totals,) = run.reductions[f"resid_{{layer}}"]  # the run's (sum, count)
            total, count = totals.tolist()
            means.append(total / count)
        return xr.Dataset(
            {{"mean_norm": ("layer", np.array(means), {{"long_name": "mean L2 norm of the residual stream"}})}},
            coords={{"layer": layers}},
        )


def _sum_and_count(hidden, batch):
    """Sum of per-token norms over real tokens, and how many there were.
    ``hidden`` is (batch, token, width); ``batch.mask`` is True on real tokens."""
    import torch

    mask = batch.mask.to(torch.float64)
    return torch.stack([(hidden.norm(dim=-1).to(torch.float64) * mask).sum(), mask.sum()])


@probescope.hookimpl
def register_probes(register):
    register({cls}())
'''

_PROBE_TEST = '''"""{name} against plain PyTorch: forward hooks on the blocks of a tiny model built offline."""

import torch

import probescope
from probescope import demo

from {module} import plugin

PROMPTS = ["When Mary and John went to the store, John gave a drink to", "The cat sat."]


def test_{name}_equals_a_plain_pytorch_reference():
    tokenizer = demo.build_tokenizer()
    model = demo.build_gpt2(tokenizer, n_layer=3, n_embd=32, n_head=4, seed=1)
    config = {{"inputs": {{"prompts": PROMPTS, "batch_size": 2}}, "probes": [{{"use": "{name}"}}]}}
    ds = probescope.run(config, models={{"tiny": (model, tokenizer)}}, write=False,
                        plugins=[("{name}", plugin)])["tiny"]["{name}"]

    # the reference: each block's output, one prompt at a time (no padding)
    outputs = []
    hooks = [block.register_forward_hook(lambda module, args, out: outputs.append(out[0] if isinstance(out, tuple) else out))
             for block in model.transformer.h]
    total, count = torch.zeros(3, dtype=torch.float64), 0
    with torch.no_grad():
        for prompt in PROMPTS:
            outputs.clear()
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            model(ids)
            total += torch.stack([h[0].norm(dim=-1).sum() for h in outputs]).double()
            count += ids.shape[1]
    for hook in hooks:
        hook.remove()
    assert list(ds.layer.values) == [0, 1, 2]
    assert torch.allclose(torch.tensor(ds.mean_norm.values), total / count, rtol=1e-4)
'''

_RENDERER = '''"""The {name} renderer: one line per model of a dataset's variable against ``layer``
(averaged over every other dimension). Replace the drawing with your own."""

from __future__ import annotations

from pydantic import Field

import probescope
from probescope import Parameters, Renderer, lazy_import

# Imported on first use, so `probescope plugins` lists this plugin without loading matplotlib.
mfigure = lazy_import("matplotlib.figure")
mticker = lazy_import("matplotlib.ticker")


class {cls}Parameters(Parameters):
    variable: str | None = Field(default=None, description="variable to draw; default the dataset's first")
    title: str | None = Field(default=None, description="title above the figure")


class {cls}(Renderer):
    name = "{name}"
    version = "0.1.0"
    description = "a variable per layer, one line per model"
    probe = "{probe}"  # the probe whose datasets it draws
    Parameters = {cls}Parameters

    def render(self, datasets, params):
        figure = mfigure.Figure(figsize=(5, 3.2), layout="constrained")
        ax = figure.add_subplot()
        for index, ds in enumerate(datasets):
            variable = params.variable or next(iter(ds.data_vars))
            values = ds[variable]
            values = values.mean([d for d in values.dims if d != "layer"])
            ax.plot(values["layer"].values, values.values, marker="o",
                    label=str(ds.attrs.get("model", f"model {{index + 1}}")))
            ax.set_ylabel(values.attrs.get("long_name", variable))
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(mticker.MaxNLocator(integer=True))  # layers are whole numbers
        ax.legend(frameon=False)
        if params.title:
            figure.suptitle(params.title)
        return figure


@probescope.hookimpl
def register_renderers(register):
    register({cls}())
'''

_RENDERER_TEST = '''"""{name} draws a real run's datasets."""

import numpy as np

import probescope
from probescope import demo

from {module} import plugin


def test_{name}_draws_one_line_per_model(tmp_path):
    tokenizer = demo.build_tokenizer()
    models = {{name: (demo.build_gpt2(tokenizer, n_layer=layers, n_embd=32, n_head=4, seed=1), tokenizer)
              for name, layers in (("small", 2), ("deeper", 4))}}
    config = {{"inputs": {{"prompts": ["The cat sat on the mat."]}}, "probes": [{{"use": "{probe}"}}]}}
    results = probescope.run(config, models=models, write=False)
    datasets = [results[name]["{probe}"] for name in models]
    figure = probescope.render(datasets, "{name}", tmp_path / "figure.png", plugins=[("{name}", plugin)])
    lines = figure.axes[0].get_lines()
    assert [len(line.get_xdata()) for line in lines] == [datasets[0].sizes["layer"], datasets[1].sizes["layer"]]
    variable = next(iter(datasets[0].data_vars))
    expected = datasets[0][variable].mean([d for d in datasets[0][variable].dims if d != "layer"]).values
    assert np.allclose(lines[0].get_ydata(), expected)
    assert (tmp_path / "figure.png").stat().st_size > 1000
'''

_README = '''# {dist}

A {what} for [probescope](https://pypi.org/project/probescope/), made with
`probescope new {what} {name}`.

```bash
pip install -e .            # registers the plugin: `probescope plugins {name}` shows it
python -m pytest tests      # its test
```

Use it in a configuration as `use = "{name}"`.
'''


def new_plugin(kind: str, name: str, folder: Path, probe: str = "token_similarity") -> Path:
    """Write the package ``probescope-NAME`` under ``folder`` and return its path.

    :raises ValueError: a bad name, or the folder already exists.
    """
    if kind not in ("probe", "renderer"):
        raise ValueError(f"kind must be probe or renderer, not {kind!r}")
    if not _NAME.match(name):
        raise ValueError(f"{name!r} is not a plugin name: use lower-case letters, digits and _, "
                         "starting with a letter (it is a Python module name too)")
    dist = f"probescope-{name.replace('_', '-')}"
    module = f"probescope_{name}"
    root = Path(folder) / dist
    if root.exists():
        raise ValueError(f"{str(root)!r} already exists; choose another name or folder")
    cls = "".join(part.capitalize() for part in name.split("_"))
    fields = dict(name=name, dist=dist, module=module, cls=cls, what=kind, probe=probe)
    code, test = (_PROBE, _PROBE_TEST) if kind == "probe" else (_RENDERER, _RENDERER_TEST)
    files = {
        "pyproject.toml": _PYPROJECT,
        "README.md": _README,
        f"{module}/__init__.py": '"""{what} {name} for probescope."""\n',
        f"{module}/plugin.py": code,
        f"tests/test_{name}.py": test,
    }
    for relative, template in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.format(**fields))
    return root
