"""The embedded default corpus: the Python standard library's own source files.

Real text that is on every machine with Python (found through `sysconfig`), so nothing is
downloaded; the same interpreter always yields the same corpus.
"""

from __future__ import annotations

import json
import os
import sysconfig

# Directories that are not the stdlib proper (third-party packages) or that are mostly test
# fixtures and legacy code (idlelib, lib2to3) rather than representative source.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}


def stdlib_source_files() -> list[tuple[str, str]]:
    """(relative posix path, absolute path) of every stdlib .py file, sorted by relative path."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]  # pruned in place: os.walk skips them
        for name in filenames:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                found.append((os.path.relpath(path, root).replace(os.sep, "/"), path))
    return sorted(found)


def write_stdlib_corpus(output_path: str, max_bytes: int | None = None) -> int:
    """Write one JSON line {"text", "path"} per stdlib source file; returns the number of documents.

    Files are whole documents in sorted order; with `max_bytes`, writing stops once that many bytes
    of (UTF-8) text are written, so the last document may cross the limit. Empty files and files
    that are not UTF-8 are skipped. The file appears under its final name only when complete.
    """
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    tmp = f"{output_path}.{os.getpid()}.tmp"  # same directory, so os.replace is an atomic rename
    docs = written = 0
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            for rel, path in stdlib_source_files():
                if max_bytes is not None and written >= max_bytes:
                    break
                try:
                    with open(path, encoding="utf-8") as f:
                        text = f.read()
                except (UnicodeDecodeError, OSError):
                    continue
                if not text.strip():
                    continue
                out.write(json.dumps({"text": text, "path": rel}) + "\n")
                docs += 1
                written += len(text.encode("utf-8"))
        os.replace(tmp, output_path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return docs
