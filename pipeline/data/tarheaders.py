"""Walk the member headers of a local shard without reading its images.

A shard whose size is right can still hold a damaged member header (a flipped bit in a copy) or
a ``cls`` member that is not an integer (a hand-edited or foreign shard). The training stream
would meet either in a DataLoader worker, minutes or hours into a run, as a traceback. This
walk finds both before training starts, at the cost of one small read per member: it reads each
512-byte header (and, for a ``cls`` member, the block after it), then seeks over the data.

A tar member is a 512-byte header followed by its data padded to 512 bytes; the header's
checksum is the sum of its bytes with the checksum field counted as spaces (POSIX ustar).
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

BLOCK = 512
_EXTENDED = {b"x", b"g", b"L", b"K"}  # pax and GNU long-name headers: data is not a member


def _octal(field: bytes) -> int:
    text = field.rstrip(b"\0 ").strip()
    return int(text, 8) if text else 0


def _header_problem(header: bytes) -> str | None:
    try:
        stored = _octal(header[148:156])
        size = _octal(header[124:136])
    except ValueError:
        return "its checksum or size field is not an octal number"
    actual = sum(header) - sum(header[148:156]) + 8 * 0x20
    if stored != actual:
        return f"checksum {stored} but the header sums to {actual}"
    if size < 0:
        return "negative size"
    return None


def scan_shard(path: str | Path) -> str | None:
    """The first problem of the local tar shard ``path`` (which member, where, what), or None:
    a damaged or truncated header, a member running past the end of the file, or a ``.cls``
    member whose value is not an integer."""
    with open(path, "rb") as f:
        total = os.fstat(f.fileno()).st_size
        if total == 0:
            return "the file is empty"
        # A memory map: slicing a header costs no system call, and only the pages of the
        # headers are read from disk.
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as tar:
            return _walk(tar, total)


def _walk(tar: mmap.mmap, total: int) -> str | None:
    offset = 0
    while offset < total:
        header = tar[offset : offset + BLOCK]
        if len(header) < BLOCK:
            return f"the file ends inside the member header at byte {offset}"
        if not header.strip(b"\0"):
            return None  # end-of-archive blocks
        problem = _header_problem(header)
        if problem:
            return f"the member header at byte {offset} is damaged ({problem})"
        size = _octal(header[124:136])
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if offset + BLOCK + size > total:
            return f"member {name!r} at byte {offset} runs past the end of the file"
        if header[156:157] not in _EXTENDED and name.endswith(".cls"):
            value = tar[offset + BLOCK : offset + BLOCK + min(size, BLOCK)]
            try:
                int(value)
            except ValueError:
                return f"member {name!r}: cls {value[:20]!r} is not an integer class label"
        offset += BLOCK + -(-size // BLOCK) * BLOCK
    return None
