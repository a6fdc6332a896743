"""Progress bars for long work, shown only when stderr is a terminal.

Only probescope's own bars are shown: transformers' "Loading weights" and "Writing model
shards" bars and huggingface_hub's download bars are turned off while probescope works,
unless asked for (:func:`library_progress`, ``probescope --library-progress``).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


#: whether the libraries' own progress bars are shown (see :func:`library_progress`)
SHOW_LIBRARY_PROGRESS = False


def progress(items: Iterable[T], desc: str, total: int | None = None, leave: bool = False) -> Iterable[T]:
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, leave=leave, disable=not sys.stderr.isatty(),
                dynamic_ncols=True)


@contextmanager
def library_progress(show: bool) -> Iterator[None]:
    """Show (or not) the libraries' own progress bars while the block runs.

    Sets ``HF_HUB_DISABLE_PROGRESS_BARS``, which transformers and huggingface_hub read
    when they are imported (so this works before they are); when they already are, it
    also switches their bars directly. The previous state comes back afterwards.
    """
    global SHOW_LIBRARY_PROGRESS
    saved_env, saved_flag = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"), SHOW_LIBRARY_PROGRESS
    SHOW_LIBRARY_PROGRESS = show
    if not show:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    try:
        with quiet_libraries():
            yield
    finally:
        SHOW_LIBRARY_PROGRESS = saved_flag
        if saved_env is None:
            os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        else:
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = saved_env


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Turn off transformers' and huggingface_hub's progress bars for the block, unless
    :data:`SHOW_LIBRARY_PROGRESS`; only libraries already imported are touched."""
    if SHOW_LIBRARY_PROGRESS or "transformers" not in sys.modules:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
