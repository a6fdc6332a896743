"""Progress bars for long work, shown only when stderr is a terminal."""

from __future__ import annotations

import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, total: int | None = None, leave: bool = False) -> Iterable[T]:
    return tqdm(items, desc=desc, total=total, leave=leave, disable=not sys.stderr.isatty(),
                dynamic_ncols=True)
