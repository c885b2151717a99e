"""Which files are LFS files: the ``.gitattributes`` of a new repo and git's pattern matching.

The Hub, not the client, decides whether an uploaded file goes to LFS; one of
its rules is a ``filter=lfs`` pattern in the branch's ``.gitattributes``. A new repo's first commit
holds the Hub's default patterns below.
"""

from __future__ import annotations

import fnmatch
import posixpath

DEFAULT_GITATTRIBUTES = """\
*.7z filter=lfs diff=lfs merge=lfs -text
*.arrow filter=lfs diff=lfs merge=lfs -text
*.bin filter=lfs diff=lfs merge=lfs -text
*.bz2 filter=lfs diff=lfs merge=lfs -text
*.ckpt filter=lfs diff=lfs merge=lfs -text
*.ftz filter=lfs diff=lfs merge=lfs -text
*.gz filter=lfs diff=lfs merge=lfs -text
*.h5 filter=lfs diff=lfs merge=lfs -text
*.joblib filter=lfs diff=lfs merge=lfs -text
*.lfs.* filter=lfs diff=lfs merge=lfs -text
*.mlmodel filter=lfs diff=lfs merge=lfs -text
*.model filter=lfs diff=lfs merge=lfs -text
*.msgpack filter=lfs diff=lfs merge=lfs -text
*.npy filter=lfs diff=lfs merge=lfs -text
*.npz filter=lfs diff=lfs merge=lfs -text
*.onnx filter=lfs diff=lfs merge=lfs -text
*.ot filter=lfs diff=lfs merge=lfs -text
*.parquet filter=lfs diff=lfs merge=lfs -text
*.pb filter=lfs diff=lfs merge=lfs -text
*.pickle filter=lfs diff=lfs merge=lfs -text
*.pkl filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.pth filter=lfs diff=lfs merge=lfs -text
*.rar filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
saved_model/**/* filter=lfs diff=lfs merge=lfs -text
*.tar.* filter=lfs diff=lfs merge=lfs -text
*.tar filter=lfs diff=lfs merge=lfs -text
*.tflite filter=lfs diff=lfs merge=lfs -text
*.tgz filter=lfs diff=lfs merge=lfs -text
*.wasm filter=lfs diff=lfs merge=lfs -text
*.xz filter=lfs diff=lfs merge=lfs -text
*.zip filter=lfs diff=lfs merge=lfs -text
*.zst filter=lfs diff=lfs merge=lfs -text
*tfevents* filter=lfs diff=lfs merge=lfs -text
"""


def lfs_rules(gitattributes: str) -> list[tuple[str, bool]]:
    """``(pattern, is LFS)`` for each line of a ``.gitattributes`` text that sets or unsets the filter."""
    rules = []
    for line in gitattributes.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        pattern, *attributes = line.split()
        if "filter=lfs" in attributes:
            rules.append((pattern, True))
        elif "-filter" in attributes or "!filter" in attributes or any(a.startswith("filter=") for a in attributes):
            rules.append((pattern, False))
    return rules


def tracked_by_lfs(path: str, rules: list[tuple[str, bool]]) -> bool:
    """Whether the repo path ``path`` is an LFS file under ``rules`` (the last matching line wins, as in git)."""
    tracked = False
    for pattern, is_lfs in rules:
        if _matches(pattern, path):
            tracked = is_lfs
    return tracked


def _matches(pattern: str, path: str) -> bool:
    # git's rule: a pattern without '/' matches the file name at any depth, one with '/' the whole path
    anchored = pattern.startswith("/")
    pattern = pattern.lstrip("/")
    if "/" not in pattern and not anchored:
        return fnmatch.fnmatchcase(posixpath.basename(path), pattern)
    if pattern.startswith("**/") and fnmatch.fnmatchcase(posixpath.basename(path), pattern[3:]):
        return True
    if pattern.endswith("/**") and path.startswith(pattern[:-3] + "/"):
        return True
    return fnmatch.fnmatchcase(path, pattern)
