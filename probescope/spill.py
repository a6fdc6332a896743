"""Per-batch reductions kept on disk instead of in memory (``Read(spill=True)``).

A reduction whose result is a part of the dataset itself (token_similarity's similarity
of every pair of every prompt), not a summary, makes a result that grows with the prompt
count. Spilled, each batch's tensor is appended to a file as the batch finishes, and
:attr:`probescope.ProbeRun.reductions` holds, under its key, a :class:`Spilled`
sequence: one tensor per batch, read back from the file (memory-mapped, so only what is
touched is read) each time it is indexed. Nothing of it stays in memory between batches.

The files live in a temporary folder (beside the results when the run writes them, so
they take disk where the results go, else in the system's temporary folder), removed
when the model's datasets are written, whatever happens.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Hashable

from probescope.lazy_imports import lazy_import

np = lazy_import("numpy")
torch = lazy_import("torch")


class SpillStore:
    """One folder of spilled reductions: a file per owner (probe entry), appended to."""

    def __init__(self, where: Path | None = None):
        self.folder = Path(tempfile.mkdtemp(prefix=".probescope-spill.", dir=where))
        self._files: dict[str, Any] = {}
        self._index: dict[str, dict[Hashable, list[tuple[int, Any, tuple]]]] = {}

    def append(self, owner: str, key: Hashable, tensor: "torch.Tensor") -> None:
        """Write one batch's result of ``key`` to ``owner``'s file."""
        handle = self._files.get(owner)
        if handle is None:
            handle = self._files[owner] = open(self.folder / f"{len(self._files)}.bin", "wb")
            self._index[owner] = {}
        tensor = tensor.detach().to("cpu").contiguous()
        array = _as_numpy(tensor)
        offset = handle.tell()
        array.tofile(handle)
        self._index[owner].setdefault(key, []).append((offset, tensor.dtype, tuple(tensor.shape)))

    def reductions(self, owner: str) -> dict[Hashable, "Spilled"]:
        """``owner``'s spilled results by key, each a sequence of one tensor per batch."""
        handle = self._files.get(owner)
        if handle is None:
            return {}
        handle.flush()
        return {key: Spilled(Path(handle.name), entries) for key, entries in self._index[owner].items()}

    def drop(self, owner: str) -> None:
        """Forget ``owner``'s results (it failed)."""
        handle = self._files.pop(owner, None)
        if handle is not None:
            handle.close()
            Path(handle.name).unlink(missing_ok=True)
        self._index.pop(owner, None)

    def close(self) -> None:
        """Remove the folder and everything in it."""
        for handle in self._files.values():
            handle.close()
        self._files.clear()
        shutil.rmtree(self.folder, ignore_errors=True)


class Spilled(Sequence):
    """One key's spilled results: item ``b`` is batch ``b``'s tensor, mapped from the
    file when indexed (nothing is kept between accesses)."""

    def __init__(self, path: Path, entries: list[tuple[int, Any, tuple]]):
        self.path, self._entries = path, entries

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, b: Any) -> Any:
        if isinstance(b, slice):
            return [self[i] for i in range(*b.indices(len(self)))]
        offset, dtype, shape = self._entries[b]
        stored = _numpy_dtype(dtype)
        if 0 in shape:
            return torch.empty(shape, dtype=dtype)
        # copy-on-write: writable for torch, never written back to the file
        mapped = np.memmap(self.path, dtype=stored, mode="c", offset=offset, shape=shape or (1,))
        tensor = torch.from_numpy(mapped).reshape(shape)
        return tensor.view(dtype) if stored != _numpy_dtype(dtype, exact=True) else tensor


def _as_numpy(tensor: "torch.Tensor") -> "np.ndarray":
    """The tensor's bytes as a numpy array (dtypes numpy lacks, bfloat16, as integers of
    the same width)."""
    try:
        return tensor.numpy()
    except TypeError:
        return tensor.view(_same_width(tensor.element_size())).numpy()


def _numpy_dtype(dtype: "torch.dtype", exact: bool = False) -> Any:
    """The numpy dtype a tensor of ``dtype`` is stored as (None with ``exact`` when numpy
    has none)."""
    try:
        return torch.empty(0, dtype=dtype).numpy().dtype
    except TypeError:
        return None if exact else torch.empty(0, dtype=_same_width(dtype.itemsize)).numpy().dtype


def _same_width(size: int) -> "torch.dtype":
    """The integer dtype of ``size`` bytes."""
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]
