"""The recipe end to end on a tiny dataset, the export round trip, and the shipped model."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from shared.modeldir import ModelLoadError, read_model_info
from shared.settings import REPO_ROOT
from tests.helpers import SHIPPED_MODEL, require, train_tiny
from training.data import SHARED_JPEG_ARCHIVE

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("train"), "--set", "whiten_bias_epochs=1", "lookahead_start_epoch=1")


def test_training_prints_a_line_per_epoch_and_a_summary(trained):
    _, _, stdout = trained
    epochs = re.findall(
        r"^epoch\s+(\d+)\s+loss ([\d.]+)\s+train_acc ([\d.]+)\s+val_acc ([\d.]+)\s+([\d.]+)s$", stdout, re.M
    )
    assert [int(e[0]) for e in epochs] == [1, 2, 3]
    assert re.search(r"^done: \d+ steps, 3 epochs; training [\d.]+ min", stdout, re.M)


def test_the_loss_falls_and_the_model_learns(trained):
    _, out, _ = trained
    meta = json.loads((out / "model.json").read_text())
    losses = [h["loss"] for h in meta["history"]]
    assert losses[-1] < losses[0]
    assert meta["test"]["accuracy"] > 0.5  # four classes: chance is 0.25


def test_the_model_directory_is_complete(trained):
    _, out, _ = trained
    meta = json.loads((out / "model.json").read_text())
    assert meta["classes"] == ["blue", "green", "red", "yellow"]
    assert meta["tta_level"] == 1 and meta["temperature"] > 0
    assert meta["recipe"]["widths"] == [16, 32, 32] and meta["data"]["sha256"]
    for key in ("accuracy", "top3_accuracy", "ece", "per_class", "confusion"):
        assert key in meta["test"]
    for f in ("model.keras", "MODEL_CARD.md", "training_curves.png", "confusion_matrix.png"):
        assert (out / f).stat().st_size > 0


def test_evaluate_prints_the_accuracy_last(trained):
    archive, out, _ = trained
    run = subprocess.run(
        [sys.executable, "-m", "training.evaluate", "--model", str(out), "--data", str(archive)],
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    last = run.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"accuracy=[01]\.\d{4}", last)
    meta = json.loads((out / "model.json").read_text())
    assert float(last.split("=")[1]) == pytest.approx(meta["test"]["accuracy"], abs=1e-4)
    assert "top3_accuracy=" in run.stdout and "ece=" in run.stdout


def test_a_saved_model_reloads_with_identical_predictions(tmp_path):
    code = f"""
import numpy as np, keras
from pathlib import Path
from training.model import build_net, init_whitening
from training.export import save_inference_model
from shared.predictor import load_predictor
keras.utils.set_random_seed(1)
recipe = dict(widths=(8, 16, 16), bn_momentum=0.6, scaling_factor=1/9, tta_level=0)
net = build_net(10, recipe["widths"], 0.6, 1/9)
x = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3)).astype(np.uint8)
init_whitening(net, x)
net(x, training=True)  # move the BatchNorm statistics away from their initial values
save_inference_model(net, Path({str(tmp_path)!r}), [str(i) for i in range(10)], recipe)
a = np.asarray(net(x, training=False))
b = load_predictor({str(tmp_path)!r}).logits(x)
print(np.abs(a - b).max())
"""
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, check=True, timeout=300
    )
    assert float(run.stdout.strip().splitlines()[-1]) < 1e-5


def test_a_corrupt_model_file_is_refused(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    with open(bad / "model.keras", "r+b") as f:
        f.seek(100)
        f.write(b"\0" * 64)
    with pytest.raises(ModelLoadError, match="checksum"):
        read_model_info(bad)
    (bad / "model.keras").unlink()
    with pytest.raises(ModelLoadError, match="expected"):
        read_model_info(bad)


def test_the_shipped_model_knows_most_real_photos():
    """`training.evaluate --photos`: the photo benchmark through the service's own path (no
    dataset needed: the benchmark is in the repo)."""
    run = subprocess.run(
        [sys.executable, "-m", "training.evaluate", "--photos", "--split", "val"],
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    last = run.stdout.strip().splitlines()[-1]
    figures = dict(kv.split("=") for kv in last.split())
    assert list(figures) == ["photo_accuracy", "photo_top3", "photo_ece"], last
    # The shipped ensemble: 0.861 / 0.950 / ECE 0.051 on val (the model before it: 0.796 / 0.946 / 0.086).
    assert float(figures["photo_accuracy"]) >= 0.83 and float(figures["photo_top3"]) >= 0.93
    assert float(figures["photo_ece"]) <= 0.07
    assert "photos (val split, class-balanced)" in run.stdout and "of other photos" in run.stdout


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_evaluate_reproduces_the_shipped_figure_on_every_test_image():
    """`python -m training.evaluate` on all 10,000 test images gives the accuracy in model.json."""
    require(SHARED_JPEG_ARCHIVE.exists(), "../shared/data beside the repo", "the CIFAR-10 JPEG copy in ../shared/data")
    run = subprocess.run(
        [sys.executable, "-m", "training.evaluate", "--model", str(SHIPPED_MODEL)],
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        check=True,
        timeout=1200,
    )
    last = run.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"accuracy=0\.\d{4}", last), last
    shipped = json.loads((SHIPPED_MODEL / "model.json").read_text())["test"]
    assert float(last.split("=")[1]) == pytest.approx(shipped["accuracy"], abs=1e-4)
    assert "test: 10000 images" in run.stdout


def test_the_muon_preset_trains_and_learns_too(tmp_path):
    _, out, _ = train_tiny(tmp_path, "--muon")
    meta = json.loads((out / "model.json").read_text())
    assert meta["recipe"]["optimizer"] == "muon" and meta["recipe"]["whiten_bias_epochs"] == 0
    losses = [h["loss"] for h in meta["history"]]
    assert losses[-1] < losses[0]
    assert meta["test"]["accuracy"] > 0.5  # the eval-mode net, BatchNorm statistics and all
