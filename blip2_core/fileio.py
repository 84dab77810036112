"""Atomic file writes: a killed process never leaves a half file that a re-run would trust."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it onto `final` only if the block succeeds.

    The temporary name starts with `.tmp-` so that globs over finished files never see it, and it
    lives in the same folder so that the rename is atomic on POSIX file systems.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{final.name}.", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(final: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(final: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(final, text.encode("utf-8"))


class UnsafeKeyError(ValueError):
    """A sample key from outside (a manifest, a tar, a sidecar) that would name a path outside its folder."""


def check_sample_key(key: str) -> str:
    """`key` itself when it is a safe relative name; UnsafeKeyError when it could escape a folder.

    WebDataset keys may hold folders (`part/0001`), so `/` is allowed inside a key; an absolute path, a
    `..` segment, a backslash (a Windows separator) or a NUL byte is not. Keys become tar member names,
    and `tar -x` of a member named `../x.jpg` writes outside the folder it was extracted into.
    """
    if not isinstance(key, str) or not key:
        raise UnsafeKeyError(f"sample key {key!r} is empty or not a string")
    if key.startswith("/") or "\\" in key or "\x00" in key:
        raise UnsafeKeyError(f"sample key {key!r} is an absolute path or holds a backslash or NUL byte")
    if ".." in key.split("/"):
        raise UnsafeKeyError(f"sample key {key!r} climbs out of its folder ('..')")
    return key


def path_under(folder: str | os.PathLike[str], name: object, where: str) -> Path:
    """`folder/name` for an image path read from an annotation file (COCO `file_name`, Karpathy
    `filepath/filename`, a VQA or Visual Genome image id through its file-name pattern).

    Annotation files come from outside, so a name that is absolute, holds a NUL byte, or climbs out of
    `folder` through `..` is refused with UnsafeKeyError naming `where` (the file and the entry) and the
    name. Checked on the names alone: a symlink inside `folder` is the user's own choice and is followed.
    """
    text = str(name)
    if "\x00" in text:
        raise UnsafeKeyError(f"{where}: image path {text!r} holds a NUL byte")
    if os.path.isabs(text):
        raise UnsafeKeyError(f"{where}: image path {text!r} is absolute; give it relative to {folder}")
    if os.path.normpath(text).split(os.sep)[0] == "..":
        raise UnsafeKeyError(f"{where}: image path {text!r} resolves outside the image folder {folder}")
    return Path(folder) / text
