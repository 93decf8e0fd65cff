"""The image store: originals and thumbnails under content-addressed names (sha256).

Names never come from the user: a file called ../../etc/passwd.jpg is stored as
<storage_dir>/ab/abcd...ef and its thumbnail as abcd...ef.thumb.jpg beside it.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from pathlib import Path

_SHA = re.compile(r"^[0-9a-f]{64}$")
log = logging.getLogger(__name__)


class ImageStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def _path(self, sha: str, suffix: str = "") -> Path:
        if not _SHA.match(sha):
            raise ValueError("not a sha256 name")
        return self.root / sha[:2] / f"{sha}{suffix}"

    def put(self, sha: str, original: bytes, thumbnail: bytes) -> None:
        for path, data in ((self._path(sha), original), (self._path(sha, ".thumb.jpg"), thumbnail)):
            if path.exists():
                os.utime(path)  # the same image again: keep it for another retention period
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename: a reader never sees half a file, and two writers cannot collide.
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)

    def keep(self, sha: str, original: bytes, thumbnail: bytes) -> bool:
        """Store an image, or log why not: predictions need no storage (the task carries the
        image), only thumbnails do, so a full or missing disk must not fail the job."""
        try:
            self.put(sha, original, thumbnail)
            return True
        except OSError as exc:
            log.warning("could not store image %s: %s", sha, exc)
            return False

    def thumbnail_path(self, sha: str) -> Path | None:
        try:
            path = self._path(sha, ".thumb.jpg")
        except ValueError:
            return None
        return path if path.is_file() else None

    def sweep(self, max_age_seconds: float) -> int:
        """Delete files older than the retention period; returns how many."""
        cutoff, removed = time.time() - max_age_seconds, 0
        if not self.root.is_dir():
            return 0
        for path in self.root.glob("??/*"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
        return removed
