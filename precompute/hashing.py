"""sha256 in one place: of a file's bytes (model weights, the atlas under its notes) and of an id
(slide ids seed their samples with all of their bytes, so ids sharing a prefix get their own sample)."""

from __future__ import annotations

import hashlib
import os


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def id_words(key: str) -> list[int]:
    """The sha256 of `key` (UTF-8) as eight 32-bit words, for seeding numpy's generators."""
    digest = hashlib.sha256(str(key).encode("utf-8")).digest()
    return [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 32, 4)]
