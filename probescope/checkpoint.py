"""Tensors of a safetensors checkpoint, read one at a time without loading the model.

A checkpoint is a folder (or hub repository) holding ``model.safetensors``, or shards
``model-0000i-of-0000n.safetensors`` listed by ``model.safetensors.index.json``. Each file
is an 8-byte little-endian header length, a JSON header giving every tensor's dtype,
shape and byte range, then the bytes. :class:`Checkpoint` reads a tensor by seeking to
its range and reading it into a fresh tensor: nothing is memory-mapped, so the process
holds exactly the tensors it asked for and frees them when it drops them. Shards of a
hub repository are downloaded when one of their tensors is first read, so a probe that
needs a fifth of the tensors fetches only the shards that hold them.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable

from probescope.errors import ModelLoadError
from probescope.lazy_imports import lazy_import

torch = lazy_import("torch")


INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

#: safetensors dtype names -> names of torch dtypes (names, so importing this module does
#: not import torch)
DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}

Fetch = Callable[[str], Path]  # file name in the checkpoint -> local path (downloading it if need be)


class Checkpoint:
    """The tensors of one checkpoint by name, read on demand.

    :param fetch: gives the local path of a file of the checkpoint, by name.
    :param weight_map: tensor name -> file name (from the index), or None for one file.
    :param source: how to name the checkpoint in messages.
    """

    def __init__(self, fetch: Fetch, weight_map: dict[str, str] | None, source: str):
        self.fetch = fetch
        self.source = source
        self._headers: dict[str, tuple[Path, int, dict]] = {}  # file -> (path, data start, header)
        if weight_map is None:
            weight_map = {key: SINGLE for key in self._header(SINGLE)[2] if key != "__metadata__"}
        self.weight_map = weight_map

    # -- finding a checkpoint ----------------------------------------------------------

    @classmethod
    def local(cls, folder: Path | str) -> "Checkpoint":
        """The safetensors checkpoint in a local model folder.

        :raises ModelLoadError: the folder holds neither an index nor ``model.safetensors``.
        """
        folder = Path(folder)
        if (folder / INDEX).is_file():
            return cls(lambda name: folder / name, _weight_map(folder / INDEX), str(folder))
        if (folder / SINGLE).is_file():
            return cls(lambda name: folder / name, None, str(folder))
        raise ModelLoadError(f"{str(folder)!r} holds no safetensors checkpoint: expected {INDEX} or {SINGLE}")

    @classmethod
    def hub(cls, repo: str, revision: str | None = None) -> "Checkpoint":
        """The safetensors checkpoint of a hub repository: the index (or the single file)
        is downloaded now, shards when a tensor of theirs is first read."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        def fetch(name: str) -> Path:
            try:
                return Path(hf_hub_download(repo, name, revision=revision))
            except Exception as exc:
                raise ModelLoadError(f"cannot download {name!r} of {repo!r}: {exc}") from exc

        try:
            index = Path(hf_hub_download(repo, INDEX, revision=revision))
        except EntryNotFoundError:
            return cls(fetch, None, repo)
        except Exception as exc:
            raise ModelLoadError(f"cannot download {INDEX!r} of {repo!r}: {exc}") from exc
        return cls(fetch, _weight_map(index), repo)

    # -- reading -----------------------------------------------------------------------

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def entry(self, key: str) -> dict:
        """The header entry of tensor ``key``: ``dtype``, ``shape``, ``data_offsets``."""
        if key not in self.weight_map:
            raise ModelLoadError(f"checkpoint {self.source!r} has no tensor {key!r}")
        entry = self._header(self.weight_map[key])[2].get(key)
        if entry is None:
            raise ModelLoadError(f"checkpoint {self.source!r}: {self.weight_map[key]!r} does not hold {key!r}, "
                                 "though the index says it does")
        return entry

    def dtype(self, key: str) -> torch.dtype:
        """The stored dtype of tensor ``key`` (reads only the header)."""
        name = self.entry(key)["dtype"]
        if name not in DTYPES:
            raise ModelLoadError(f"checkpoint {self.source!r}: tensor {key!r} has dtype {name}, which probescope "
                                 f"cannot read; readable: {', '.join(DTYPES)}")
        return getattr(torch, DTYPES[name])

    def read(self, key: str) -> torch.Tensor:
        """Tensor ``key`` as stored (dtype and shape), in memory of its own."""
        entry = self.entry(key)
        dtype = self.dtype(key)
        path, data_start, _ = self._header(self.weight_map[key])
        start, stop = entry["data_offsets"]
        raw = torch.empty(stop - start, dtype=torch.uint8)
        with open(path, "rb", buffering=0) as f:
            f.seek(data_start + start)
            view, done = memoryview(raw.numpy()), 0
            while done < len(view):  # one read returns at most about 2 GB on Linux
                n = f.readinto(view[done:])
                if not n:
                    raise ModelLoadError(f"checkpoint {self.source!r}: {path.name} ends inside tensor {key!r}")
                done += n
        return raw.view(dtype).reshape(entry["shape"])

    def _header(self, name: str) -> tuple[Path, int, dict]:
        if name not in self._headers:
            path = self.fetch(name)
            try:
                with open(path, "rb") as f:
                    (length,) = struct.unpack("<Q", f.read(8))
                    header = json.loads(f.read(length))
            except (OSError, ValueError, struct.error) as exc:
                raise ModelLoadError(f"checkpoint {self.source!r}: cannot read the header of {name!r}: {exc}") from exc
            self._headers[name] = (path, 8 + length, header)
        return self._headers[name]


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"cannot read the weight map of {str(index)!r}: {exc}") from exc
    if not isinstance(weight_map, dict):
        raise ModelLoadError(f"{str(index)!r}: weight_map is not a table of tensor name -> file name")
    return weight_map
