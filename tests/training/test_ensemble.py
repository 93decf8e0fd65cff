"""training.ensemble end to end on two tiny runs and a tiny photo benchmark of their classes."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from shared.predictor import load_predictor
from tests.helpers import COLOURS, train_tiny
from training import ensemble
from training.photos import load_photos


def make_photo_benchmark(root, colours) -> object:
    """Photos of the colour classes (larger than 32 px, landscape, JPEG) and of 'other' things
    (grey), split into val and test: the layout of benchmarks/photos/manifest.csv."""
    rng = np.random.default_rng(7)
    root.mkdir()
    rows = []
    for split in ("val", "test"):
        for label, c in [*colours.items(), ("other", (128, 128, 128))]:
            for j in range(12 if label != "other" else 6):
                a = np.clip(np.array(c) + rng.normal(0, 60, (48, 64, 3)), 0, 255).astype(np.uint8)
                name = f"{split}-{label}-{j}.jpg"
                Image.fromarray(a).save(root / name, quality=90)
                rows.append(dict(file=name, label=label, split=split))
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["file", "label", "split"])
        w.writeheader()
        w.writerows(rows)
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble")
    runs = []
    for seed in (0, 1):
        archive, out, _ = train_tiny(root / f"s{seed}", "--seed", str(seed))
        runs.append(out)
    photos = make_photo_benchmark(root / "photos", COLOURS)
    out = root / "shipped"
    meta = ensemble.build(runs, out, data=archive, photos_dir=photos)
    return runs, out, meta, photos, archive


def test_the_ensemble_is_the_mean_of_its_members_logits(built):
    runs, out, meta, photos, _ = built
    x = load_photos("test", photos).x
    members = [load_predictor(r, tta_level=0).logits(x) for r in runs]
    assert np.allclose(load_predictor(out, tta_level=0).logits(x), np.mean(members, axis=0), atol=1e-4)
    assert [m["seed"] for m in meta["members"]] == [0, 1]


def test_the_served_configuration_is_in_model_json_and_is_what_the_worker_loads(built):
    _, out, meta, _, _ = built
    assert len(meta["serving_study"]) == len(ensemble.LEVELS) + len(ensemble.CASCADES)
    served, _ = ensemble.choose_served(meta["serving_study"])
    assert meta["serving"]["cascade"] == served["cascade"] and meta["temperature"] == served["temperature"]
    predictor = load_predictor(out)  # as the worker does: the configuration from model.json
    assert (predictor.cascade is None) == (served["cascade"] is None)
    assert predictor.tta_level == meta["tta_level"] and predictor.info.temperature == meta["temperature"] > 0


def row(config, views, cifar, photo):
    return dict(config=config, views=views, cifar_test=cifar, photo_val=photo)


def test_the_rule_serves_the_cheapest_within_a_tenth_of_a_point_that_is_no_worse_on_photos():
    tta0, tta1, tta2 = row("tta0", 1, 0.9050, 0.80), row("tta1", 2, 0.9158, 0.83), row("tta2", 6, 0.9161, 0.82)
    cheap = row("cascade", 1.3, 0.9152, 0.82)
    assert ensemble.choose_served([tta0, tta1, tta2, cheap]) == (cheap, tta2)  # 0.09 points below, as good on photos
    worse_on_photos = row("cascade", 1.3, 0.9155, 0.81)
    assert ensemble.choose_served([tta0, tta1, tta2, worse_on_photos])[0] == tta1
    too_far = row("cascade", 1.3, 0.9150, 0.9)  # 0.11 points below the best
    assert ensemble.choose_served([tta0, tta2, too_far])[0] == tta2


def test_the_threshold_is_where_answers_become_more_likely_wrong_than_right():
    rng = np.random.default_rng(0)
    top = rng.uniform(0.2, 1.0, 20000)
    calibrated = rng.random(20000) < top  # an answer of confidence c is right with probability c
    assert abs(ensemble.uncertainty_threshold(top, calibrated) - 0.5) <= 0.02
    overconfident = rng.random(20000) < (top - 0.2) / 0.8  # right 0 % at 0.2, 100 % at 1
    assert abs(ensemble.uncertainty_threshold(top, overconfident) - 0.6) <= 0.03
    assert ensemble.uncertainty_threshold(top, np.ones(20000, bool)) == 0.0  # never mostly wrong


def test_the_openvino_ir_gives_the_keras_answers_and_its_files_are_checksummed(built):
    _, out, meta, photos, _ = built
    for f in ("model.xml", "model.bin", "model-int8.xml", "model-int8.bin"):
        assert f in meta["files"] and (out / f).is_file()
    x = load_photos("test", photos).x
    keras_logits = load_predictor(out, runtime="keras").logits(x)
    ov_logits = load_predictor(out, runtime="openvino").logits(x)
    assert np.allclose(ov_logits, keras_logits, atol=1e-3)
    int8 = load_predictor(out, runtime="openvino", precision="int8").logits(x)
    assert int8.shape == keras_logits.shape and np.isfinite(int8).all()


def test_the_card_shows_photos_beside_cifar_with_its_pictures(built):
    _, out, meta, _, _ = built
    card = (out / "MODEL_CARD.md").read_text()
    for heading in ("## Figures: CIFAR-10", "## Figures: real photos", "## How it is served", "## Every member"):
        assert heading in card
    for png in ("reliability.png", "worst_photo_mistakes.png", "training_curves.png", "confusion_matrix.png"):
        assert (out / png).stat().st_size > 1000
    assert json.loads((out / "model.json").read_text())["photos"]["test"]["n"] == 48
