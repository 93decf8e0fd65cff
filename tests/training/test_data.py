"""Dataset loading from archives the tests build: image folders and the official CIFAR format."""

import pickle

import numpy as np
import pytest

from tests.helpers import image_bytes, make_tar
from training import data
from training.data import DatasetError, load_dataset, verify_md5


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR_SVC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def png(color) -> bytes:
    return image_bytes("PNG", size=(32, 32), color=color)


def make_image_folder(root, classes=("cat", "ship"), per_class=3, top="mydata"):
    for split in ("train", "test"):
        for i, c in enumerate(classes):
            folder = root / top / split / c
            folder.mkdir(parents=True)
            for j in range(per_class):
                (folder / f"{j}.png").write_bytes(png((i * 100, j * 10, 50)))
    return root / top


def make_official(root):
    """The official layout: pickled dicts of 10000x3072 arrays, here 4 images per batch."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 9]}
        (folder / name).write_bytes(pickle.dumps(batch))
    return folder


def test_image_folder_as_folder_and_as_tar_gz(tmp_path):
    folder = make_image_folder(tmp_path)
    for source in (folder, make_tar(folder, tmp_path / "mydata.tar.gz")):
        ds = load_dataset(source)
        assert ds.classes == ["cat", "ship"]  # from the folder names, sorted
        assert ds.train_x.shape == (6, 32, 32, 3) and ds.train_x.dtype == np.uint8
        assert ds.test_x.shape == (6, 32, 32, 3)
        assert sorted(ds.train_y.tolist()) == [0, 0, 0, 1, 1, 1]
        # labels follow the pixels: "ship" images have red channel 100
        assert set(ds.train_x[ds.train_y == 1][:, 0, 0, 0].tolist()) == {100}


def test_official_archive_and_extracted_folder(tmp_path):
    folder = make_official(tmp_path)
    for source in (folder, make_tar(folder, tmp_path / "cifar-10-python.tar.gz")):
        ds = load_dataset(source)
        assert ds.classes[0] == "airplane" and ds.classes[9] == "truck"
        assert ds.train_x.shape == (20, 32, 32, 3) and ds.test_x.shape == (4, 32, 32, 3)
        assert ds.train_y.tolist()[:4] == [0, 1, 2, 9]
    # channel-first rows become height x width x RGB
    raw = pickle.loads((folder / "test_batch").read_bytes())[b"data"][0]
    assert np.array_equal(ds.test_x[0], raw.reshape(3, 32, 32).transpose(1, 2, 0))


def test_decoded_data_is_cached_by_checksum(tmp_path, cache):
    archive = make_tar(make_image_folder(tmp_path), tmp_path / "d.tar.gz")
    first = load_dataset(archive)
    cached = list((cache / "datasets").glob("*.npz"))
    assert [p.stem for p in cached] == [first.checksum]
    archive.write_bytes(b"")  # were the archive read again, this would fail
    import os

    os.utime(archive)
    with pytest.raises(DatasetError):
        load_dataset(archive)  # a changed file has a new checksum: not served from the old cache


def test_truncated_archive_is_a_clear_error_naming_the_file(tmp_path):
    archive = make_tar(make_image_folder(tmp_path, per_class=20), tmp_path / "d.tar.gz")
    blob = archive.read_bytes()
    archive.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DatasetError, match="d.tar.gz.*(corrupt|truncated)"):
        load_dataset(archive)


def test_garbage_archive_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"not a tarball at all")
    with pytest.raises(DatasetError, match="bad.tar.gz"):
        load_dataset(bad)


def test_a_corrupt_image_in_the_folder_names_the_file(tmp_path):
    folder = make_image_folder(tmp_path)
    (folder / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DatasetError, match="broken.jpg"):
        load_dataset(folder)


def test_official_batches_refuse_anything_but_arrays(tmp_path):
    folder = make_official(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(DatasetError, match="data_batch_1"):
        load_dataset(folder)


def test_md5_mismatch_is_an_error_not_a_retry(tmp_path):
    f = tmp_path / "cifar-10-python.tar.gz"
    f.write_bytes(b"something else")
    with pytest.raises(DatasetError, match="md5"):
        verify_md5(f)


def test_download_uses_the_cached_archive_and_checks_it(tmp_path, monkeypatch):
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / "cifar-10-python.tar.gz").write_bytes(b"not the real archive")
    monkeypatch.setattr(
        data.urllib.request, "urlretrieve", lambda *a: pytest.fail("must not download when the file is cached")
    )
    with pytest.raises(DatasetError, match="md5"):
        data.download_official(tmp_path / "dl")


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        load_dataset(tmp_path / "nope.tar.gz")
