"""Component norm: one number for every (layer, component) of a model.

Answers questions like "which components write the most into the residual stream?" or
"which parts did fine-tuning change most?" (the component heatmap). The components are the
canonical seven (``attn.q`` ... ``mlp.gate``); one a family lacks is NaN, never zero.

Statistics:

- ``activation_norm``: mean over real (non-padding) tokens of all prompts of the L2 norm
  of the component's output. Read inside the run's single traced pass, reduced there to
  a sum and a count per batch, added to one running total per (layer, component) as
  the batches go, so memory does not grow with the number of prompts.
- ``weight_norm``: Frobenius or spectral norm of the component's weight (out x in).
- ``relative_update``: ``||W - W_ref|| / ||W_ref||`` against a reference checkpoint of
  the same architecture.
- ``grad_norm``: norm of the gradient of the language-modelling loss on the run's
  prompts with respect to the component's weight. It needs a backward pass, so it runs
  its own forward and backward pass after the shared trace.

Biases are left out of every weight statistic.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, field_validator, model_validator

from probescope import (
    COMPONENTS, Batch, Block, ConfigPath, DatasetSchema, ModelEntry, ModelLayout, ModelLoadError, Parameters, Probe,
    ProbeRun, ProbescopeError, Problem, Read, Variable, component, distinct, hookimpl, is_model_folder, layer_problems,
    load_weights, progress, read_config, resolve_layers, streamed_layout, lazy_import,
)

np = lazy_import("numpy")
torch = lazy_import("torch")
xr = lazy_import("xarray")


Statistic = Literal["activation_norm", "weight_norm", "relative_update", "grad_norm"]
ComponentName = Literal["attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down", "mlp.gate"]

_LONG_NAMES = {
    "activation_norm": "mean L2 norm of the output",
    "weight_norm": "{norm} norm of the weight",
    "relative_update": "relative weight change ||W - W_ref|| / ||W_ref|| ({norm})",
    "grad_norm": "{norm} norm of the loss gradient of the weight",
}


class ReferenceCheckpoint(Parameters):
    """The checkpoint ``relative_update`` compares against: a local folder or a hub id."""

    path: Optional[ConfigPath] = Field(None, description="local model folder, relative to the config file")
    hub: Optional[str] = Field(None, description="Hugging Face hub id")
    revision: Optional[str] = None
    use_safetensors: bool = True
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> "ReferenceCheckpoint":
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of path (a local model folder) or hub (a hub id)")
        if self.path is not None and not is_model_folder(self.path):
            raise ValueError(f"no model folder at {str(self.path)!r}: expected a folder holding config.json")
        return self

    @property
    def source(self) -> str:
        return str(self.path) if self.path is not None else str(self.hub)

    def entry(self, dtype: str = "float32", device: str = "cpu") -> Any:
        """A :class:`~probescope.ModelEntry` for loading it like any model."""
        return ModelEntry(
            name="reference", path=None if self.path is None else str(self.path), hub=self.hub,
            revision=self.revision, dtype=dtype, device=device,
            use_safetensors=self.use_safetensors, trust_remote_code=self.trust_remote_code,
        )


class ComponentNormParameters(Parameters):
    """Parameters of ``component_norm``."""

    statistic: Statistic = Field(
        "activation_norm",
        description="activation_norm, weight_norm, relative_update (needs reference) or grad_norm",
    )
    components: Optional[list[ComponentName]] = Field(
        None, description="canonical components to include, default all seven"
    )
    layers: Optional[list[Block]] = Field(
        None, description='block indices (negative count from the end) or "last"; default every block'
    )
    norm: Literal["frobenius", "spectral"] = Field(
        "frobenius", description="matrix norm for weight_norm, relative_update and grad_norm"
    )
    divide_by_sqrt_width: bool = Field(
        False,
        description="activation_norm only: divide each norm by sqrt(output width), the "
        "root mean square of the output's entries, so components of different widths compare",
    )
    reference: Optional[ReferenceCheckpoint] = Field(
        None, description='relative_update only: { path = "folder" } or { hub = "id", revision = "..." }'
    )

    @field_validator("components", "layers")
    @classmethod
    def _distinct(cls, values: Optional[list]) -> Optional[list]:
        return distinct(values)

    @model_validator(mode="after")
    def _options_fit(self) -> "ComponentNormParameters":
        if self.statistic == "relative_update" and self.reference is None:
            raise ValueError('statistic "relative_update" needs reference = { path = "..." } or { hub = "..." }')
        if self.statistic != "relative_update" and self.reference is not None:
            raise ValueError(f'reference is only used by statistic "relative_update", not {self.statistic!r}')
        if self.statistic != "activation_norm" and self.divide_by_sqrt_width:
            raise ValueError(f'divide_by_sqrt_width applies to activation_norm, not {self.statistic!r}')
        return self


def _layers(params: ComponentNormParameters, num_layers: int) -> list[int]:
    """The blocks of the dataset, in ascending order."""
    return sorted(resolve_layers(params.layers, num_layers))


def chosen_components(params: ComponentNormParameters) -> list[str]:
    """The components of the dataset, in canonical order."""
    wanted = set(params.components or COMPONENTS)
    return [c for c in COMPONENTS if c in wanted]


def matrix_norm(matrix: torch.Tensor, norm: str) -> float:
    """Frobenius or spectral (largest singular value) norm, computed in float64 at least
    for small matrices and float32 for large ones."""
    m = matrix.detach()
    m = m.to(torch.float64 if m.numel() <= 1 << 22 else torch.float32)
    if norm == "spectral":
        return float(torch.linalg.matrix_norm(m, ord=2))
    return float(torch.linalg.matrix_norm(m, ord="fro"))


def _norm_sum(hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Sum over real tokens of the L2 norm of ``hidden`` ``(batch, token, width)``, and
    the number of real tokens: a ``(2,)`` float64 tensor, added to the run's total as
    each batch ends (the read accumulates), so nothing per batch is kept."""
    norms = torch.linalg.vector_norm(hidden.to(torch.float32), dim=-1)  # (batch, token)
    mask = batch.mask
    total = norms.masked_fill(~mask, 0).sum(dtype=torch.float64)
    return torch.stack([total, mask.sum().to(torch.float64)])


SCHEMA = DatasetSchema(
    probe="component_norm",
    dims={"layer": "blocks, from 0", "component": "canonical components, in canonical order"},
    coords={
        "layer": Variable(("layer",), "int64", "block index"),
        "component": Variable(("component",), "str", "canonical component name", values=COMPONENTS),
        "present": Variable(("component",), "bool", "whether the model's family has the component"),
        "module": Variable(("component",), "str",
                           'module in each block, "attn.c_attn[q]" for part of a fused one; "" where absent'),
        "width": Variable(("component",), "int64", "output features; -1 where absent"),
    },
    variables={
        "value": Variable(("layer", "component"), "float64",
                          "the statistic; NaN where the family lacks the component. Its long_name attribute "
                          "names the statistic (for axis labels)"),
    },
    attrs={"statistic": "activation_norm, weight_norm, relative_update or grad_norm"},
    optional_attrs={
        "norm": "frobenius or spectral (weight statistics)",
        "divide_by_sqrt_width": "0 or 1 (activation_norm)",
        "tokens": "the real tokens averaged over (activation_norm) or in the loss (grad_norm)",
        "reference": "the reference checkpoint (relative_update)",
        "reference_revision": "its revision (relative_update)",
        "loss": "the mean loss the gradient is of (grad_norm)",
    },
)


class ComponentNorm(Probe):
    name = "component_norm"
    version = "0.1.0"
    description = "one statistic (activation, weight, update or gradient norm) per layer and component"
    Parameters = ComponentNormParameters
    schema = SCHEMA
    any_prompt_order = True  # sums over every prompt's tokens

    def check(self, params: ComponentNormParameters, model: Any) -> list[Problem]:
        problems = layer_problems(params.layers, model.num_layers)
        if not model.adapter.component_modules:
            problems.append(Problem("", f"architecture {model.adapter.name!r} has no component sites; "
                                        "component_norm needs an adapter that names them (see docs/architectures.md)"))
        if params.reference is not None and not problems:
            problems += _reference_problems(params.reference, model)
        return problems

    def needs_prompts(self, params: ComponentNormParameters, model: Any) -> bool:
        return params.statistic in ("activation_norm", "grad_norm")

    def reads(self, params: ComponentNormParameters, model: Any) -> list[Read]:
        if params.statistic != "activation_norm":
            return []
        present = model.adapter.components(model.config)
        return [
            Read((layer, name), component(name, layer), _norm_sum, accumulate=True)
            for layer in _layers(params, model.num_layers)
            for name in chosen_components(params) if name in present
        ]

    def build(self, params: ComponentNormParameters, run: ProbeRun) -> xr.Dataset:
        layout = run.model.layout
        layers = _layers(params, run.model.info.num_layers)
        names = chosen_components(params)
        widths = np.array([_width(layout, name) or -1 for name in names], dtype=np.int64)
        values = np.full((len(layers), len(names)), np.nan)
        attrs: dict[str, Any] = {"statistic": params.statistic}

        if params.statistic == "activation_norm":
            tokens = 0
            for li, layer in enumerate(layers):
                for ci, name in enumerate(names):
                    parts = run.reductions.get((layer, name))
                    if not parts:
                        continue
                    total, count = torch.stack(parts).sum(dim=0).tolist()
                    tokens = int(count)  # the same real tokens for every component
                    values[li, ci] = total / count
            if params.divide_by_sqrt_width:
                values = values / np.sqrt(np.where(widths > 0, widths, np.nan))
            attrs["divide_by_sqrt_width"] = int(params.divide_by_sqrt_width)
            attrs["tokens"] = tokens
        elif params.statistic == "weight_norm":
            for li, layer in enumerate(progress(layers, desc=f"{run.model.name}: weight norms")):
                for ci, name in enumerate(names):
                    weight = layout.weight(layer, name)
                    if weight is not None:
                        values[li, ci] = matrix_norm(weight, params.norm)
        elif params.statistic == "relative_update":
            values = _relative_update(params, run, layout, layers, names)
            attrs["reference"] = params.reference.source
            attrs["reference_revision"] = params.reference.revision or ""
        else:  # grad_norm
            values, loss, tokens = _grad_norms(params, run, layout, layers, names)
            attrs["loss"] = loss
            attrs["tokens"] = tokens
        if params.statistic != "activation_norm":
            attrs["norm"] = params.norm

        norm = params.norm if params.statistic == "relative_update" else params.norm.capitalize()
        long_name = _LONG_NAMES[params.statistic].format(norm=norm)
        if params.divide_by_sqrt_width:
            long_name += " / sqrt(width)"
        present = np.array([name in layout.components for name in names])
        modules = np.array([_module_label(layout, name) for name in names], dtype=object)
        return xr.Dataset(
            {"value": (("layer", "component"), values,
                       {"long_name": long_name, "description": "NaN where the model's family lacks the component"})},
            coords={
                "layer": ("layer", np.array(layers, dtype=np.int64), {"description": "block index (0-based)"}),
                "component": ("component", np.array(names, dtype=object)),
                "present": ("component", present, {"description": "whether the family has the component"}),
                "module": ("component", modules, {"description": "module in each block, [part] of a fused one"}),
                "width": ("component", widths, {"description": "output features; -1 where absent"}),
            },
            attrs=attrs,
        )


def _module_label(layout: ModelLayout, name: str) -> str:
    part = layout.components.get(name)
    if part is None:
        return ""
    fused = sum(p.module == part.module for p in layout.components.values()) > 1
    return f"{part.module}[{name.split('.')[1]}]" if fused else part.module


def _width(layout: ModelLayout, name: str) -> int | None:
    weight = layout.weight(0, name)
    return None if weight is None else int(weight.shape[0])


def _reference_problems(reference: ReferenceCheckpoint, model: Any) -> list[Problem]:
    """The reference must be the same architecture with the same shapes."""
    try:
        config = read_config(reference.entry())
    except ModelLoadError as exc:
        return [Problem("reference", str(exc))]
    adapter = model.adapter
    mine, theirs = model.config, config
    if getattr(theirs, "model_type", None) != getattr(mine, "model_type", None):
        return [Problem("reference", f"the reference {reference.source!r} is a {theirs.model_type!r} model, "
                                     f"but this model is {mine.model_type!r}; relative_update compares "
                                     "checkpoints of the same architecture")]
    shape = [("layers", adapter.num_layers), ("width", adapter.hidden_size), ("attention heads", adapter.attention_shape)]
    for what, of in shape:
        if of(theirs) != of(mine):
            return [Problem("reference", f"the reference {reference.source!r} has {what} {of(theirs)}, "
                                         f"this model {of(mine)}; relative_update compares checkpoints of the same shape")]
    return []


def _relative_update(params, run: ProbeRun, layout: ModelLayout, layers, names) -> np.ndarray:
    info = run.model.info
    ref = _reference_layout(params.reference, info, str(run.model.device))
    values = np.full((len(layers), len(names)), np.nan)
    for li, layer in enumerate(progress(layers, desc=f"{info.name}: weight changes")):
        for ci, name in enumerate(names):
            weight, base = layout.weight(layer, name), ref.weight(layer, name)
            if weight is None:
                continue
            if base is None or base.shape != weight.shape:
                raise ProbescopeError(
                    f"the reference {params.reference.source!r} has {name} of layer {layer} shaped "
                    f"{None if base is None else tuple(base.shape)}, this model {tuple(weight.shape)}")
            base = base.to(torch.float32)
            values[li, ci] = matrix_norm(weight.to(torch.float32) - base, params.norm) / matrix_norm(base, params.norm)
    return values


def _reference_layout(reference: ReferenceCheckpoint, info: Any, device: str) -> ModelLayout:
    """The reference checkpoint's weights, streamed one layer at a time from its
    safetensors files in their own dtype (the norms are taken in float32); a reference
    with only pickled weights, which the user allowed, is loaded whole instead."""
    entry = reference.entry(dtype="auto", device=device)
    config = read_config(entry)
    try:
        return streamed_layout(entry, config, info.adapter)
    except ModelLoadError:
        if reference.use_safetensors:
            raise
    model = load_weights(entry)
    return ModelLayout(model, info.adapter, info.adapter.blocks(model))


def _grad_norms(params, run: ProbeRun, layout: ModelLayout, layers, names) -> tuple[np.ndarray, float, int]:
    """Norms of d(mean next-token loss over every real token of every prompt)/d(weight).

    Gradients are taken with :func:`torch.autograd.grad`, so nothing accumulates in the
    parameters' ``.grad``; parameters that had ``requires_grad`` off get it back off.
    """
    model = run.model.model
    modules: dict[tuple[int, str], torch.nn.Module] = {}
    for layer in layers:
        for name in names:
            module = layout.module(layer, name)
            if module is not None:
                modules[(layer, name)] = module
    params_of = list(dict.fromkeys(m.weight for m in modules.values()))
    if getattr(run.model, "remote", False):
        raise ProbescopeError(
            f"grad_norm runs a backward pass over model {run.model.name!r} here, but the model runs remotely "
            f"(remote = {run.model.remote!r}), where only the trace plan goes; run grad_norm on a local entry")
    if any(p.device.type == "meta" for p in params_of):  # accelerate offloaded them (device_map)
        raise ProbescopeError(
            f"grad_norm differentiates the weights in memory, but model {run.model.name!r} was loaded with "
            "device_map and some of them are offloaded (meta tensors between uses); load it without "
            "device_map, or with a device_map that keeps every block in memory")
    frozen = [p for p in params_of if not p.requires_grad]
    total_tokens = sum(int(b.mask[:, 1:].sum()) for b in run.batches)
    if total_tokens == 0:
        raise ProbescopeError("grad_norm needs prompts of at least two tokens (a next token to predict)")
    grads = [torch.zeros_like(p, dtype=torch.float32) for p in params_of]
    loss_sum = 0.0
    was_training = model.training
    try:
        for p in frozen:
            p.requires_grad_(True)
        model.eval()
        with torch.enable_grad():
            for batch in progress(run.batches, desc=f"{run.model.name}: gradients"):
                logits = model(batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
                targets = batch.input_ids[:, 1:].masked_fill(~batch.mask[:, 1:], -100)
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
                for g, new in zip(grads, torch.autograd.grad(loss / total_tokens, params_of)):
                    g += new.float()
                loss_sum += float(loss.detach())
    finally:
        for p in frozen:
            p.requires_grad_(False)
        model.train(was_training)
    grad_of = {id(p): g for p, g in zip(params_of, grads)}
    values = np.full((len(layers), len(names)), np.nan)
    for li, layer in enumerate(layers):
        for ci, name in enumerate(names):
            module = modules.get((layer, name))
            if module is not None:
                values[li, ci] = matrix_norm(layout.oriented(layer, name, grad_of[id(module.weight)]), params.norm)
    return values, loss_sum / total_tokens, total_tokens


@hookimpl
def register_probes(register):
    register(ComponentNorm())
