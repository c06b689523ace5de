"""Folders that appear under their final name only once they are complete.

A folder is written under a temporary sibling name, flushed to disk, and renamed into place: a
rename within one filesystem is atomic, so a process killed at any moment leaves either the old
folder, or the new one, under the final name, never a half-written one. What a crash leaves
behind carries the prefix ``_hf_oto-`` (Trainer's Hub uploads skip names starting with ``_``) and
is removed, or put back, by :func:`clean_leftovers` at the next run.
"""

from __future__ import annotations

import os
import secrets
import shutil

LEFTOVER_PREFIX = "_hf_oto-"
_STAGING = LEFTOVER_PREFIX + "staging-"
_OLD = LEFTOVER_PREFIX + "old-"
_TRASH = LEFTOVER_PREFIX + "trash-"


def staging_path(target: str | os.PathLike, unique: bool = True) -> str:
    """A new temporary folder beside ``target`` to write it in (``unique=False``: a fixed name,
    the same in every process, for folders several processes write into).

    Example:
        >>> staging_path("out/checkpoint-10", unique=False)
        'out/_hf_oto-staging-checkpoint-10'
    """
    parent, name = os.path.split(os.fspath(target))
    if not unique:
        return os.path.join(parent, _STAGING + name)
    os.makedirs(parent or ".", exist_ok=True)
    while True:
        # Not tempfile.mkdtemp: its folders are private (0700), and this one becomes the result.
        path = os.path.join(parent, f"{_STAGING}{name}-{secrets.token_hex(4)}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


def fsync_tree(path: str | os.PathLike) -> None:
    """Flush every file under ``path``, then the folders, so a rename after it publishes data
    that survives a power cut, not only a killed process."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(path: str) -> None:
    if not hasattr(os, "O_DIRECTORY"):  # Windows cannot open a folder; its renames are journaled
        return
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_dir(staging: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the complete folder ``staging`` to ``target``, replacing any folder there.

    A folder already at ``target`` is first renamed aside (``_hf_oto-old-<name>``), then deleted;
    a crash between the two renames leaves no ``target`` and the old folder aside, which
    :func:`clean_leftovers` puts back.

    Example:
        >>> staging = staging_path("out/result")
        >>> with open(os.path.join(staging, "a.txt"), "w") as f:
        ...     _ = f.write("complete")
        >>> publish_dir(staging, "out/result")
        >>> open("out/result/a.txt").read(), os.path.exists(staging)
        ('complete', False)
    """
    staging, target = os.fspath(staging), os.fspath(target)
    parent, name = os.path.split(target)
    fsync_tree(staging)
    if os.path.lexists(target):
        old = os.path.join(parent, _OLD + name)
        if os.path.lexists(old):
            shutil.rmtree(old)
        os.replace(target, old)
        os.replace(staging, target)
        _fsync_dir(parent)
        shutil.rmtree(old)
    else:
        os.replace(staging, target)
        _fsync_dir(parent)


def remove_dir(path: str | os.PathLike) -> None:
    """Delete a folder so that it never exists half-deleted under its own name."""
    path = os.fspath(path)
    parent, name = os.path.split(path)
    trash = os.path.join(parent, _TRASH + name)
    if os.path.lexists(trash):
        shutil.rmtree(trash)
    os.replace(path, trash)
    shutil.rmtree(trash)


def clean_leftovers(parent: str | os.PathLike, name: str | None = None) -> list[str]:
    """Remove what interrupted writes left in ``parent`` (only those for ``name`` if given), and
    put back a folder that was renamed aside and never replaced. Returns the names removed.

    Example:
        >>> os.makedirs("out/_hf_oto-staging-result-1234")
        >>> clean_leftovers("out")
        ['_hf_oto-staging-result-1234']
    """
    parent = os.fspath(parent)
    if not os.path.isdir(parent):
        return []
    removed = []
    for entry in sorted(os.listdir(parent)):
        path = os.path.join(parent, entry)
        if entry.startswith(_OLD):
            original = entry[len(_OLD):]
            if name is not None and original != name:
                continue
            if not os.path.lexists(os.path.join(parent, original)):
                os.replace(path, os.path.join(parent, original))
                continue
        elif entry.startswith((_STAGING, _TRASH)):
            rest = entry.removeprefix(_STAGING).removeprefix(_TRASH)
            if name is not None and rest != name and not rest.startswith(name + "-"):
                continue
        else:
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
        removed.append(entry)
    return removed


__all__ = ["LEFTOVER_PREFIX", "clean_leftovers", "fsync_tree", "publish_dir", "remove_dir", "staging_path"]
