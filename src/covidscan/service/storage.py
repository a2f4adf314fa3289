"""Content-addressed file store: bytes live under ``DIR/blobs/ab/abcdef...`` named by their SHA-256.

A stored file is never overwritten (same bytes, same name) and never reached by a name a user chose, so
``../`` or markup in an upload's file name cannot touch the file system or the pages.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

from covidscan.errors import CovidscanError


class BlobStore:
    """Write-once storage of byte strings keyed by their SHA-256 hex digest."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

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
            return digest
        target.parent.mkdir(parents=True, exist_ok=True)
        # Write to a temporary file and link it into place: readers never see a half-written blob, and
        # os.link fails instead of replacing when a concurrent writer got there first.
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, target)
        finally:
            os.unlink(tmp)
        return digest

    def read(self, sha256: str) -> bytes:
        """The stored bytes; a missing blob is an error naming the store."""
        try:
            return self.path(sha256).read_bytes()
        except FileNotFoundError:
            raise CovidscanError(
                f"blob {sha256} is missing from {self.root}; was the data folder copied incompletely?"
            ) from None
