"""Labelled images -> uint8 arrays, decoded once and cached.

Accepted sources (the class list always comes from the data and is saved with the model):
  * an image-folder tree ROOT/{train,test}/<class>/<image> (any format the service accepts), as a
    folder or a .tar.gz
    (the shared CIFAR-10 JPEG copy has this layout, and so can a user's own images);
  * the official cifar-10-python.tar.gz, or its extracted cifar-10-batches-py/ folder.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from shared import formats
from shared.digest import file_digest
from shared.images import ImageRefused, preprocess
from shared.settings import REPO_ROOT, Settings

SHARED_JPEG_ARCHIVE = REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
OFFICIAL_MD5 = "c58f30108f718f92721af3b95e74349a"
IMAGE_SUFFIXES = formats.SUFFIXES
SPLITS = ("train", "test")


class DatasetError(RuntimeError):
    """A data source that cannot be used; the message names the file and the reason."""


@dataclass
class Dataset:
    train_x: np.ndarray  # (N, 32, 32, 3) uint8 RGB
    train_y: np.ndarray  # (N,) int64 class indices
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]
    checksum: str  # sha256 of the archive (or of a folder's file list)
    source: str


def cache_dir() -> Path:
    return Settings.from_env().cache_dir


def default_source() -> Path:
    """The shared JPEG copy when it is beside the repo, else the official archive (downloaded)."""
    if SHARED_JPEG_ARCHIVE.exists():
        return SHARED_JPEG_ARCHIVE
    return download_official(cache_dir() / "downloads")


def load_dataset(path: str | Path | None = None) -> Dataset:
    path = Path(path) if path else default_source()
    if not path.exists():
        raise DatasetError(f"{path}: no such file or folder")
    checksum = _checksum(path)
    cached = cache_dir() / "datasets" / f"{checksum}.npz"
    if cached.exists():
        with np.load(cached) as z:
            return Dataset(
                z["train_x"],
                z["train_y"],
                z["test_x"],
                z["test_y"],
                [str(c) for c in z["classes"]],
                checksum,
                str(path),
            )
    ds = _decode(path)
    ds.checksum = checksum
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp.npz")
    np.savez(
        tmp, train_x=ds.train_x, train_y=ds.train_y, test_x=ds.test_x, test_y=ds.test_y, classes=np.array(ds.classes)
    )
    tmp.replace(cached)  # atomic: a killed run never leaves a half-written cache
    return ds


def _checksum(path: Path) -> str:
    if path.is_file():
        return file_digest(path)
    h = hashlib.sha256()  # a folder: its file list, sizes and modification times
    for p in sorted(path.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _decode(path: Path) -> Dataset:
    try:
        if path.is_dir():
            if (path / "batches.meta").exists() or (path / "cifar-10-batches-py").is_dir():
                return _official_from_files(_folder_files(path, official=True), path)
            return _image_folder(_folder_files(path, official=False), path)
        with tarfile.open(path, "r:gz") as tar:
            files = _tar_files(tar, path)
        if any(PurePosixPath(name).name == "batches.meta" for name in files):
            return _official_from_files(files, path)
        return _image_folder(files, path)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DatasetError(f"{path}: corrupt or truncated archive ({exc})") from None


def _folder_files(root: Path, official: bool) -> dict[str, bytes]:
    wanted = (
        (lambda p: p.suffix == "" or p.name == "batches.meta")
        if official
        else (lambda p: p.suffix.lower() in IMAGE_SUFFIXES)
    )
    return {
        p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and wanted(p)
    }


def _tar_files(tar: tarfile.TarFile, path: Path) -> dict[str, bytes]:
    files = {}
    for member in tar:  # streams through; a truncated gzip raises here
        if member.isfile():
            f = tar.extractfile(member)
            files[member.name] = f.read() if f else b""
    if not files:
        raise DatasetError(f"{path}: the archive holds no files")
    return files


def _image_folder(files: dict[str, bytes], path: Path) -> Dataset:
    """Find <split>/<class>/<file> anywhere in the tree (a top folder is allowed)."""
    items = {s: [] for s in SPLITS}
    for name, data in files.items():
        parts = PurePosixPath(name).parts
        if PurePosixPath(name).suffix.lower() not in IMAGE_SUFFIXES or len(parts) < 3:
            continue
        split, label = parts[-3], parts[-2]
        if split in items:
            items[split].append((name, label, data))
    if not items["train"]:
        raise DatasetError(
            f"{path}: no images found under train/<class>/ (expected ROOT/{{train,test}}/<class>/<image files>)"
        )
    classes = sorted({label for _, label, _ in items["train"]})
    unknown = sorted({label for _, label, _ in items["test"]} - set(classes))
    if unknown:
        raise DatasetError(f"{path}: test classes {unknown} do not appear in train/")
    index = {c: i for i, c in enumerate(classes)}

    def decode(item):
        name, label, data = item
        try:
            return preprocess(data), index[label]
        except ImageRefused as exc:
            raise DatasetError(f"{path}: {name}: {exc.message}") from None

    arrays = []
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:  # Pillow decodes without the GIL
        for split in SPLITS:
            decoded = list(pool.map(decode, sorted(items[split])))
            x = np.stack([d[0] for d in decoded]) if decoded else np.zeros((0, 32, 32, 3), np.uint8)
            arrays += [x, np.array([d[1] for d in decoded], dtype=np.int64)]
    return Dataset(*arrays, classes=classes, checksum="", source=str(path))


class _ArrayUnpickler(pickle.Unpickler):
    """The official archive is pickled; allow only what its dicts of arrays need."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle(data: bytes, name: str, path: Path) -> dict:
    try:
        return _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001 - any failure means the file is not a CIFAR batch
        raise DatasetError(f"{path}: {name} is not a CIFAR-10 batch file ({exc})") from None


def _official_from_files(files: dict[str, bytes], path: Path) -> Dataset:
    by_name = {PurePosixPath(n).name: (n, d) for n, d in files.items()}
    needed = ["batches.meta", "test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]
    missing = [n for n in needed if n not in by_name]
    if missing:
        raise DatasetError(f"{path}: missing {', '.join(missing)} (not a complete CIFAR-10 archive)")
    meta = _unpickle(by_name["batches.meta"][1], "batches.meta", path)
    classes = [c.decode() for c in meta[b"label_names"]]

    def batch(name):
        d = _unpickle(by_name[name][1], name, path)
        x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return np.ascontiguousarray(x), np.asarray(d[b"labels"], dtype=np.int64)

    train = [batch(f"data_batch_{i}") for i in range(1, 6)]
    test_x, test_y = batch("test_batch")
    return Dataset(
        np.concatenate([t[0] for t in train]),
        np.concatenate([t[1] for t in train]),
        test_x,
        test_y,
        classes,
        "",
        str(path),
    )


def verify_md5(path: Path, expected: str = OFFICIAL_MD5) -> None:
    actual = file_digest(path, "md5")
    if actual != expected:
        raise DatasetError(
            f"{path}: md5 {actual} does not match the expected {expected}; "
            "the file is corrupt or not the official archive. Delete it and retry."
        )


def download_official(folder: Path, url: str = OFFICIAL_URL) -> Path:
    """Fetch the official archive once into the cache; a wrong md5 is an error, never a retry."""
    target = folder / "cifar-10-python.tar.gz"
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".part")
        print(f"downloading {url} -> {target}", flush=True)
        try:
            urllib.request.urlretrieve(url, tmp)
        except OSError as exc:
            raise DatasetError(
                f"could not download {url} ({exc}); pass --data PATH to a local copy of the dataset"
            ) from None
        tmp.replace(target)
    verify_md5(target)
    return target
