"""The embedded default corpus: the Python standard library's own source files.

Real text that exists on every machine with Python, found through `sysconfig`, no download.
"""

from __future__ import annotations

import json
import os
import sysconfig

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}


def stdlib_source_files() -> list[tuple[str, str]]:
    """(relative path, absolute path) of the stdlib's .py files, in a fixed (sorted) order."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                found.append((os.path.relpath(path, root), path))
    return sorted(found)


def write_stdlib_corpus(output_path: str, max_bytes: int | None = None) -> tuple[int, int]:
    """Write one JSON line {"text", "path"} per stdlib source file; returns (documents, text bytes)."""
    tmp = output_path + ".tmp"
    docs = total = 0
    with open(tmp, "w") as out:
        for rel, path in stdlib_source_files():
            if max_bytes is not None and total >= max_bytes:
                break
            try:
                text = open(path, encoding="utf-8").read()
            except (UnicodeDecodeError, OSError):
                continue
            if not text.strip():
                continue
            out.write(json.dumps({"text": text, "path": rel}) + "\n")
            docs += 1
            total += len(text.encode())
    os.replace(tmp, output_path)
    return docs, total
