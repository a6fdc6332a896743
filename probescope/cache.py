"""probescope's cache folder, and the sha256 of weight files remembered there.

Every run that writes results records, for a local model folder, the sha256 of its weight
files (the manifest's ``weights_sha256``): that is what makes results traceable to the
exact weights. Reading every byte of a 140 GB checkpoint takes minutes on every run, so a
file's hash is remembered under its path, size, modification time and inode, and read
again only when one of them changes, the rule git's index and ccache use. Delete
``file-hashes.json`` in the cache folder to make every hash be computed again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

HASHES = "file-hashes.json"


def cache_dir() -> Path:
    """Where probescope keeps what it computes once (converted models, file hashes):
    ``$PROBESCOPE_CACHE``, else ``$XDG_CACHE_HOME/probescope``, else ``~/.cache/probescope``."""
    if os.environ.get("PROBESCOPE_CACHE"):
        return Path(os.environ["PROBESCOPE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "probescope"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """The sha256 of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_dev]


def _read(store: Path) -> dict:
    try:
        data = json.loads(store.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):  # absent, unreadable or corrupt: start afresh
        return {}


def cached_sha256(paths: list[Path]) -> dict[Path, str]:
    """``{path: sha256}``, computing only the files whose size, modification time or
    inode changed since their hash was remembered. The cache is best effort: when its
    folder cannot be written, every hash is computed and nothing is remembered."""
    store = cache_dir() / HASHES
    known = _read(store)
    out: dict[Path, str] = {}
    changed = False
    for path in paths:
        key = str(Path(path).resolve())
        stamp = _stamp(Path(path))
        entry = known.get(key)
        if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
            out[path] = entry["sha256"]
            continue
        out[path] = sha256_file(Path(path))
        if _stamp(Path(path)) == stamp:  # unchanged while it was read: safe to remember
            known[key] = {"stamp": stamp, "sha256": out[path]}
            changed = True
    if changed:
        # Forget files that are gone (deleted scratch models), so the store stays small.
        _write(store, {key: entry for key, entry in known.items() if Path(key).exists()})
    return out


def _write(store: Path, known: dict) -> None:
    """Replace the store atomically (a concurrent run sees the old or the new file whole)."""
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        partial = store.with_name(f"{store.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps(known, indent=0, sort_keys=True))
        os.replace(partial, store)
    except OSError:
        pass
