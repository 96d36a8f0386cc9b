"""The output side of make-shards: what may be written where, and replacing a split safely.

``make-shards imagefolder --root D/train --out D`` once deleted its own source images, and
writing into an existing output silently deleted the old split with any user file in it. No
command may delete or overwrite what it did not write, so the rules here are:

- The output folder and every input folder must not overlap (one inside the other, after
  resolving links): refused before anything is written.
- An existing, non-empty ``<out>/<split>`` is refused unless ``overwrite``; with it, the folder
  must hold only files a previous run of the writer wrote (shards of this split,
  ``index.parquet``, ``sizes.json``, ``skipped.txt``, IJB-C's tables); anything else is named
  and refused.
- A split is written into a fresh ``<out>/<split>.partial-XXXXXX`` folder beside it and swapped
  in only when complete and validated, so an interrupted or failed write leaves the old split as
  it was. The old split's files are then removed one by one, by name: never a whole tree.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from pipeline.data.catalog import WRITTEN_FILES, is_shard_name
from pipeline.errors import UserError


class ShardWriteError(UserError, RuntimeError):
    """Writing a split failed or was refused; the message names the file and the fix."""


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(path))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_no_overlap(out: str | Path, inputs: Iterable[str | Path]) -> None:
    """Refuse an output folder that is, contains, or lies inside an input folder."""
    out_real = _real(out)
    for source in inputs:
        src_real = _real(source)
        if _within(out_real, src_real) or _within(src_real, out_real):
            resolved = f" (resolved: {out_real} and {src_real})"
            plain = (Path(os.path.abspath(out)), Path(os.path.abspath(source)))
            raise ShardWriteError(
                f"output folder {out} overlaps the input {source}"
                f"{resolved if plain != (out_real, src_real) else ''}: one is inside the other, "
                "so writing a split could replace or mix with the dataset's files; choose an "
                f"--out outside the input, e.g. {src_real.parent / (src_real.name + '_shards')}"
            )


def foreign_entries(split_dir: str | Path, split: str) -> list[str]:
    """Names in ``split_dir`` that the writer does not write (sorted): anything but plain files
    named like this split's shards or one of ``index.WRITTEN_FILES``."""
    with os.scandir(split_dir) as entries:
        return sorted(
            e.name
            for e in entries
            if not (
                e.is_file(follow_symlinks=False)
                and (e.name in WRITTEN_FILES or is_shard_name(e.name, split))
            )
        )


def _owned_rule(split: str) -> str:
    return f"shards <name>-{split}-NNNNNN.tar and {', '.join(WRITTEN_FILES)}"


def check_split_folder(out: str | Path, split: str, *, overwrite: bool) -> None:
    """Refuse to write ``<out>/<split>`` when that would lose something (rules in the module
    docstring). An absent or empty folder is always fine."""
    final = Path(out) / split
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        kind = "a link" if final.is_symlink() else "a file"
        raise ShardWriteError(
            f"{final} is {kind}, not a split folder; make-shards writes split {split!r} there: "
            "move it away or choose another --out"
        )
    if not final.is_dir() or not any(final.iterdir()):
        return
    if not overwrite:
        raise ShardWriteError(
            f"{final} already exists; pass --overwrite to replace it (only what make-shards "
            f"writes is removed: {_owned_rule(split)}), or choose another --out"
        )
    foreign = foreign_entries(final, split)
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise ShardWriteError(
            f"{final / foreign[0]}{more} was not written by make-shards; --overwrite only "
            f"removes {_owned_rule(split)}: move it out of {final}, or choose another --out"
        )


def check_writable(out: str | Path) -> None:
    """Refuse an output folder this process cannot create or write into, naming it.

    ``os.access`` reports a read-only file system even to root; a permission that root
    overrides, or a pseudo file system, fails later at the first write and is reported there.
    """
    target = Path(os.path.abspath(out))
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ShardWriteError(f"{existing} is a file, so --out {out} cannot be created there")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "" if existing == target else f" (to create {target})"
        raise ShardWriteError(
            f"output folder {existing} is not writable{what}: a read-only file system or no "
            "permission; choose a writable --out"
        )


def check_output(
    out: str | Path, split: str, *, overwrite: bool = False, inputs: Iterable[str | Path] = ()
) -> None:
    """Every check that comes before writing ``<out>/<split>``; writes nothing."""
    check_no_overlap(out, inputs)
    check_split_folder(out, split, overwrite=overwrite)
    check_writable(out)


def write_error(error: OSError, where: str | Path) -> ShardWriteError:
    """A one-line ShardWriteError for an OSError while writing under ``where``."""
    path = error.filename or where
    return ShardWriteError(
        f"cannot write {path}: {error.strerror or error}; check that the output folder {where} "
        "is writable and has free space, or choose another --out"
    )


def make_partial(out: str | Path, split: str) -> Path:
    """A new, empty ``<out>/<split>.partial-XXXXXX`` folder (unique: never an existing one)."""
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f"{split}.partial-", dir=out))
        # mkdtemp makes it private (0700); the finished split gets the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        partial.chmod(0o777 & ~umask)
    except OSError as e:
        raise write_error(e, out) from None
    return partial


def discard_partial(partial: Path) -> None:
    """Remove a partial folder this run created (only its plain files, then the folder)."""
    with os.scandir(partial) as entries:
        for e in entries:
            if e.is_file(follow_symlinks=False):
                os.unlink(e.path)
    with contextlib.suppress(OSError):  # something else was put there: not ours to delete
        partial.rmdir()


def swap_in(partial: Path, out: str | Path, split: str, *, overwrite: bool) -> list[str]:
    """Make the complete ``partial`` folder the split ``<out>/<split>``, replacing an old split
    only by the rules above (checked again: the folder may have changed during the write).
    Returns what could not be cleaned up (old files that appeared meanwhile), for a warning."""
    final = Path(out) / split
    check_split_folder(out, split, overwrite=overwrite)
    if not final.is_dir():
        os.rename(partial, final)
        return []
    # Rename the old split aside onto a fresh empty folder (POSIX replaces an empty directory),
    # put the new one in its place, and only then remove the old one's files.
    old = Path(tempfile.mkdtemp(prefix=f"{split}.old-", dir=out))
    os.rename(final, old)
    try:
        os.rename(partial, final)
    except OSError:
        os.rename(old, final)
        raise
    left = foreign_entries(old, split)
    for name in set(os.listdir(old)) - set(left):
        os.unlink(old / name)
    if not left:
        old.rmdir()
    return [str(old / name) for name in left]
