"""Integrity of a stored index version: checksums written when it is sealed, checked at open.

An embedded version directory holds memory-mapped engine files.  A truncated vector
file makes the engine's next read of it a SIGBUS (the process dies); random bytes of
the right size give garbage scores.  So every version gets ``checksums.json`` (size and
SHA-256 of every file of the shard, written when the version is committed, just before
its manifest) and a reader checks it before it loads a version: a damaged version is
refused with :class:`IndexCorruptError` instead of being served.

The FIRST load of a sealed shard (the build's verification) folds the engine's journals
into its files; later loads rewrite file times but never contents (checked in
``tests/indexing/test_integrity.py``), so checksums taken at commit stay valid.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ecomrec.errors import IndexUnavailableError

CHECKSUMS_FILE = "checksums.json"
_CHUNK = 1 << 20


class IndexCorruptError(IndexUnavailableError):
    """A stored version does not match its checksums (or returned impossible values)."""


@dataclass(frozen=True)
class IntegrityReport:
    """Outcome of checking one version directory against its ``checksums.json``."""

    version: str
    files: int
    bytes: int
    problems: tuple[str, ...]
    has_checksums: bool = True

    @property
    def ok(self) -> bool:
        return not self.problems


#: Files of a version beside its shard that the checksums cover (``base.json`` and
#: ``tombstones.npy`` exist in delta versions only: see :mod:`indexing.qdrant_edge`).
VERSION_FILES = ("meta.json", "base.json", "tombstones.npy")


def _data_files(vdir: Path) -> Iterator[Path]:
    """Files covered by the checksums: everything under ``shard/`` plus the version files."""
    for name in VERSION_FILES:
        if (vdir / name).exists():
            yield vdir / name
    shard = vdir / "shard"
    if shard.is_dir():
        for p in sorted(shard.rglob("*")):
            if p.is_file():
                yield p


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's logical content (holes of sparse files read as zeros)."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def compute_checksums(vdir: Path) -> dict[str, dict[str, int | str]]:
    """``{relative path: {"size": bytes, "sha256": hex}}`` of a version's data files."""
    return {
        p.relative_to(vdir).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in _data_files(vdir)
    }


def write_checksums(vdir: Path) -> Path:
    """Write ``checksums.json`` for a sealed version (atomically); returns its path."""
    out = vdir / CHECKSUMS_FILE
    tmp = out.with_name(f".{CHECKSUMS_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"algorithm": "sha256", "files": compute_checksums(vdir)}, indent=1))
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, out)
    return out


def read_checksums(vdir: Path) -> dict[str, dict[str, int | str]] | None:
    """The recorded checksums, or None for a version written before checksums existed."""
    f = vdir / CHECKSUMS_FILE
    if not f.exists():
        return None
    try:
        data = json.loads(f.read_text())
        files = data["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not an object")
        return files
    except (ValueError, KeyError, TypeError) as e:
        raise IndexCorruptError(f"{f}: unreadable checksums ({e})") from e


def check_version_dir(vdir: Path, *, full: bool = True) -> IntegrityReport:
    """Compare a version directory with its ``checksums.json``.

    ``full=False`` only compares sizes and the file list (a few ``stat`` calls: catches
    truncation); ``full=True`` also hashes every file.  A version without checksums
    (built before they existed) reports ``has_checksums=False`` and no problems.
    """
    recorded = read_checksums(vdir)
    if recorded is None:
        return IntegrityReport(vdir.name, 0, 0, (), has_checksums=False)
    problems: list[str] = []
    total = 0
    for rel, want in sorted(recorded.items()):
        p = vdir / rel
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            problems.append(f"{rel}: missing")
            continue
        total += size
        if size != want.get("size"):
            problems.append(f"{rel}: size {size} bytes, expected {want.get('size')}")
        elif full and file_sha256(p) != want.get("sha256"):
            problems.append(f"{rel}: content does not match its checksum")
    extra = {p.relative_to(vdir).as_posix() for p in _data_files(vdir)} - set(recorded)
    problems.extend(f"{rel}: not in the checksums" for rel in sorted(extra))
    return IntegrityReport(vdir.name, len(recorded), total, tuple(problems))


def require_intact(vdir: Path, *, full: bool = True) -> IntegrityReport:
    """:func:`check_version_dir`, raising :class:`IndexCorruptError` naming the damage."""
    rep = check_version_dir(vdir, full=full)
    if not rep.ok:
        more = f" (+{len(rep.problems) - 3} more)" if len(rep.problems) > 3 else ""
        raise IndexCorruptError(
            f"index version {vdir.name} is damaged: {'; '.join(rep.problems[:3])}{more}"
        )
    return rep
