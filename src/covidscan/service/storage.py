"""Content-addressed file store: bytes live under ``DIR/blobs/ab/abcdef...`` named by their SHA-256.

A stored file is never overwritten (same bytes, same name) and never reached by a name a user chose, so
``../`` or markup in an upload's file name cannot touch the file system or the pages.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from covidscan.errors import CovidscanError
from covidscan.service.errors import StorageFull

FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})  # no space, quota, file size limit


TMP_PREFIX = ".tmp-"


class BlobStore:
    """Write-once storage of byte strings keyed by their SHA-256 hex digest."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.write_failed: str | None = None  # why the last write failed; cleared by the next good one

    def path(self, sha256: str) -> Path:
        """Where the blob with this digest lives (whether or not it exists)."""
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise CovidscanError(f"not a SHA-256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def put(self, data: bytes) -> str:
        """Store ``data`` once and return its digest; storing the same bytes again changes nothing."""
        digest = hashlib.sha256(data).hexdigest()
        target = self.path(digest)
        if target.exists():
            # fresh again: an old orphan that a new case now refers to must not be swept meanwhile
            with contextlib.suppress(FileNotFoundError):
                os.utime(target)
                return digest
        target.parent.mkdir(parents=True, exist_ok=True)
        # Write to a temporary file and link it into place: readers never see a half-written blob, and
        # os.link fails instead of replacing when a concurrent writer got there first.
        try:
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=TMP_PREFIX)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                with contextlib.suppress(FileExistsError):
                    os.link(tmp, target)
            finally:
                os.unlink(tmp)
        except OSError as exc:
            if exc.errno not in FULL_ERRNOS:
                raise
            self.write_failed = f"storing a file failed: {exc.strerror}"
            raise StorageFull(
                f"the disk of the service's files ({self.root}) is full: free space there, then send again"
            ) from None
        self.write_failed = None
        return digest

    def free_bytes(self) -> int:
        """Free space on the file system of the store."""
        return shutil.disk_usage(self.root).free

    def sweep(self, referenced: Iterable[str], *, older_than: float) -> int:
        """Remove blobs no row refers to and temporary files, both older than ``older_than`` seconds
        (younger ones may belong to an upload still being committed); returns how many were removed.

        Orphans come from uploads interrupted between storing their files and committing their case
        (a killed server, a full database)."""
        keep, cutoff, removed = set(referenced), time.time() - older_than, 0
        for path in self.root.glob("??/*"):
            orphan = path.name.startswith(TMP_PREFIX) or path.name not in keep
            with contextlib.suppress(FileNotFoundError):
                if orphan and path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
        return removed

    def read(self, sha256: str) -> bytes:
        """The stored bytes; a missing blob is an error naming the store."""
        try:
            return self.path(sha256).read_bytes()
        except FileNotFoundError:
            raise CovidscanError(
                f"blob {sha256} is missing from {self.root}; was the data folder copied incompletely?"
            ) from None
