"""The run manifest: what a run was, so its results can be trusted and resumed.

Every run that writes results also writes ``manifest.json`` in its output folder, beside
the datasets: the fully resolved configuration, the prompts, the versions of probescope
and of the libraries that computed the numbers, each model's revision or a hash of its
weight files, and every file written, each dataset with a *fingerprint* of everything it
depends on. The manifest is rewritten (atomically) after every file, so an interrupted
run's manifest lists exactly what it finished.

``probescope run --resume`` uses the fingerprints: a dataset whose file is on disk and
whose fingerprint is unchanged (same model and weights, same prompts, same probe,
version and parameters) is read back instead of computed again; a model all of whose
datasets are done is not even loaded.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

MANIFEST_NAME = "manifest.json"
FORMAT = 1

#: Libraries whose versions can change the numbers or the files.
LIBRARIES = ("torch", "transformers", "nnsight", "numpy", "xarray", "netCDF4", "pluggy", "pydantic", "matplotlib",
             "safetensors", "tokenizers")


def library_versions() -> dict[str, str]:
    """The installed version of each library of :data:`LIBRARIES`, and Python's."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def weight_files_hash(folder: Path) -> dict[str, str]:
    """``{file name: sha256}`` of a local model folder's weight files (safetensors, or
    pickled ones when that is all there is). Reads every byte the first time, which for a
    model of many gigabytes takes a while; later runs reuse the hash of each file whose
    size, modification time and inode are unchanged (:mod:`probescope.cache`)."""
    from probescope.cache import cached_sha256
    from probescope.formats import PICKLED_WEIGHTS, SAFE_WEIGHTS

    files = sorted(p for pattern in SAFE_WEIGHTS for p in folder.glob(pattern))
    if not files:
        files = sorted(p for pattern in PICKLED_WEIGHTS for p in folder.glob(pattern))
    return {p.name: digest for p, digest in cached_sha256(files).items()}


def parameters_hash(model: Any) -> str:
    """sha256 over a model's parameters and buffers (names, dtypes, shapes, bytes): the
    identity of a model given in memory, which has no files."""
    import torch

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            t = tensor.detach().cpu().contiguous()
            digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def model_identity(entry: Any, info: Any, model: Any = None) -> dict[str, Any]:
    """What identifies a model's weights: the hub revision, or the hash of a local
    folder's weight files, or (a model given in memory) the hash of its parameters."""
    out: dict[str, Any] = {"source": info.source}
    if entry is None:
        out["parameters_sha256"] = parameters_hash(model)
        return out
    if entry.path is not None:
        out["weights_sha256"] = weight_files_hash(Path(entry.path))
    else:
        out["revision"] = info.revision or entry.revision or "unknown"
    return out


def fingerprint(*parts: Any) -> str:
    """sha256 of the JSON of ``parts`` (keys sorted): equal exactly when the parts are."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def dataset_fingerprint(*, model_entry: Mapping[str, Any], identity: Mapping[str, Any], prompts: list[str] | None,
                        probe: Any, params: Any) -> str:
    """Everything a dataset depends on. ``prompts`` is None for a probe that reads
    weights only (its result does not depend on them)."""
    return fingerprint(model_entry, identity, prompts, probe.name, probe.version, params.model_dump(mode="json"))


def resolved_config(plan: Any) -> dict[str, Any]:
    """The configuration as the run understood it: defaults filled in, paths absolute,
    every probe's and renderer's parameters validated."""
    return {
        "source": plan.source,
        "models": [entry.model_dump(mode="json") for _, entry in plan.models],
        "inputs": {"prompts": list(plan.prompts), "batch_size": plan.batch_size,
                   **({"prompts_file": str(plan.prompt_file.path)} if getattr(plan, "prompt_file", None) else {})},
        "probes": [{"name": t.name, "use": t.probe.name, "version": getattr(t.probe, "version", ""),
                    "parameters": t.params.model_dump(mode="json")} for t in plan.probes],
        "renderers": [{"use": t.renderer.name, "probe": t.probe, "output": str(t.output),
                       "parameters": t.params.model_dump(mode="json")} for t in plan.renderers],
        "output": {"dir": str(plan.output_dir)},
    }


@dataclass
class Manifest:
    """The manifest of one run, written to ``output_dir/manifest.json`` as it goes."""

    output_dir: Path
    config: dict[str, Any]
    prompts: list[str]
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    datasets: dict[str, dict[str, str]] = field(default_factory=dict)  # relative path -> model, probe, fingerprint
    figures: list[str] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)  # datasets read back instead of computed
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    @property
    def path(self) -> Path:
        return self.output_dir / MANIFEST_NAME

    def relative(self, path: Path) -> str:
        try:
            return str(Path(path).relative_to(self.output_dir))
        except ValueError:
            return str(path)

    def to_json(self) -> dict[str, Any]:
        from probescope.version import __version__

        return {
            "format": FORMAT,
            "created": self.created,
            "probescope_version": __version__,
            "libraries": library_versions(),
            "config": self.config,
            "prompts": self.prompts,
            "models": self.models,
            "files": sorted([*self.datasets, *self.figures]),
            "datasets": self.datasets,
            "figures": self.figures,
            "resumed": self.resumed,
            "failures": self.failures,
        }

    def record_dataset(self, path: Path, model: str, probe: str, key: str) -> None:
        self.datasets[self.relative(path)] = {"model": model, "probe": probe, "fingerprint": key}
        self.write()

    def record_figure(self, path: Path) -> None:
        self.figures.append(self.relative(path))
        self.write()

    def write(self) -> Path:
        """Write the manifest atomically (readable by anyone the umask allows)."""
        from probescope.results import atomic_path

        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n")
        return self.path


def read(output_dir: Path) -> dict[str, Any]:
    """The manifest of an earlier run in ``output_dir``, or ``{}`` when there is none
    (or it cannot be read: then nothing is resumed)."""
    path = Path(output_dir) / MANIFEST_NAME
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def finished(previous: Mapping[str, Any], output_dir: Path) -> dict[str, str]:
    """``{relative dataset path: fingerprint}`` of the earlier run's datasets still on disk."""
    out = {}
    for relative, record in (previous.get("datasets") or {}).items():
        if isinstance(record, Mapping) and (Path(output_dir) / relative).is_file():
            out[relative] = str(record.get("fingerprint", ""))
    return out

