"""Ship trained runs as one model: their logits averaged, calibrated on CIFAR and on photos,
flagged when unsure, and served the cheapest way that loses nothing. Read top to bottom.

    python -m training.ensemble RUN_DIR [RUN_DIR ...] [--out models/cifar10-airbench] [--data PATH]

RUN_DIR: what `python -m training.train --out RUN_DIR` wrote. In order:
1. one Keras model whose output is the mean of the members' logits (layer "ensemble");
2. every serving configuration's logits on the CIFAR validation split (held out of every
   member's training: the same fixed split for every seed), the CIFAR test, and both photo splits;
3. per configuration, the temperature that minimises NLL on CIFAR val and photo val together,
   equally weighted, so that probabilities stay honest on both;
4. the configuration served: the cheapest within 0.1 point of the best CIFAR test accuracy and
   no worse on photo val than that best (issue 14's rule);
5. the uncertainty threshold, on photo val: the confidence below which an answer is more likely
   wrong than right (an answer about a photo of none of the classes always is);
6. the OpenVINO IR (float32, and NNCF int8 calibrated on training images);
7. model.json, the figures of every member and of the ensemble, the card and its pictures.
The photo test split is only ever reported.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from shared.digest import file_digest
from shared.modeldir import MODEL_FILE, softmax
from shared.predictor import Cascade, load_predictor
from shared.settings import DEFAULT_MODEL_DIR
from training.card import write_model_card
from training.data import load_dataset
from training.evaluate import photo_figures
from training.export import export_openvino, write_meta
from training.metrics import fit_temperature, metrics, reliability
from training.model import net_for
from training.photos import OTHER, PHOTOS_DIR, class_balanced_weights, load_photos
from training.provenance import git_commit, machine
from training.train import split_validation

# Serving configurations tried: TTA levels, and cascades (every image at `first`, the unsure
# ones again at `then`). Views are the net's forward passes per image, each of every member.
LEVELS = (0, 1, 2)
VIEWS = {0: 1, 1: 2, 2: 6}
CASCADES = [Cascade(f, t, b) for f, t in ((0, 1), (0, 2), (1, 2)) for b in (0.5, 0.6, 0.7, 0.8, 0.9)]
WITHIN = 0.001  # "within 0.1 point of the best" on the CIFAR test
CALIBRATION_IMAGES = 300  # training images for NNCF's int8 calibration


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--data")
    p.add_argument("--runtime", default="keras", choices=["keras", "openvino"], help="served runtime (model.json)")
    args = p.parse_args(argv)
    build(args.runs, args.out, args.data, args.runtime)


def build(runs: list[Path], out: Path, data=None, runtime: str = "keras", photos_dir: Path = PHOTOS_DIR) -> dict:
    started = time.perf_counter()
    metas = [json.loads((r / "model.json").read_text()) for r in runs]
    classes, recipe = metas[0]["classes"], metas[0]["recipe"]
    if any(m["classes"] != classes for m in metas):
        raise SystemExit("the runs were trained on different class lists")

    # 1. One model: the members side by side on the same input, their logits averaged.
    keras.mixed_precision.set_global_policy("float32")
    image = keras.Input((32, 32, 3), dtype="uint8", name="image")
    members = []
    for i, (run, meta) in enumerate(zip(runs, metas, strict=True)):
        r = meta["recipe"]
        net = net_for(r, len(classes), f"member{i}")
        net.set_weights(keras.saving.load_model(run / MODEL_FILE, compile=False).get_weights())
        members.append(net)
    outputs = [m(image) for m in members]
    logits = keras.layers.Average(name="ensemble", dtype="float32")(outputs) if len(members) > 1 else outputs[0]
    out.mkdir(parents=True, exist_ok=True)
    keras.Model(image, logits, name=out.name).save(out / MODEL_FILE)
    digest = file_digest(out / MODEL_FILE)
    meta = dict(
        name=out.name,
        version=f"{time.strftime('%Y%m%d')}-{digest[:8]}",
        classes=classes,
        input=metas[0]["input"],
        temperature=1.0,
        tta_level=0,
        files={MODEL_FILE: digest},
        recipe=recipe,
        members=[_member(run, m) for run, m in zip(runs, metas, strict=True)],
        data=metas[0]["data"],
        git_commit=git_commit(),
        machine=machine(tensorflow=tf.__version__, keras=keras.__version__),
    )
    write_meta(out, meta)

    # 2. Every level's logits on every set, through the served inference path.
    ds = load_dataset(data)
    _, _, val_x, val_y = split_validation(ds.train_x, ds.train_y, recipe["val_size"])
    photos = {s: load_photos(s, photos_dir) for s in ("val", "test")}
    sets = dict(cifar_val=(val_x, val_y), cifar_test=(ds.test_x, ds.test_y))
    for split, ph in photos.items():
        sets[f"photo_{split}"] = ph.in_class(classes)
        sets[f"other_{split}"] = (ph.other(), None)
    level_logits = {}
    for level in LEVELS:
        predictor = load_predictor(out, tta_level=level)
        for name, (x, _) in sets.items():
            level_logits[name, level] = predictor.logits(x)
        print(f"level {level}: logits of every set computed ({time.perf_counter() - started:.0f} s)", flush=True)

    # 3 and 4. Every configuration: its temperature, accuracy, calibration and views per image.
    study = [_configuration(level, None, level_logits, sets) for level in LEVELS]
    study += [_configuration(None, c, level_logits, sets) for c in CASCADES]
    served, best = choose_served(study)
    for s in study:
        mark = " <- served" if s is served else " (best on CIFAR)" if s is best else ""
        print(
            f"{s['config']:<22} views {s['views']:.2f}  CIFAR test {s['cifar_test']:.4f}  photo val "
            f"{s['photo_val']:.4f}  T {s['temperature']:.3f}{mark}",
            flush=True,
        )
    meta["temperature"] = served["temperature"]
    meta["tta_level"] = served["level"] if served["level"] is not None else served["cascade"]["then"]
    meta["serving"] = dict(runtime=runtime, cascade=served["cascade"], views=served["views"])
    meta["serving_study"] = study
    meta["calibration_study"] = calibration_study(served, level_logits, sets, classes)

    # 5. The uncertainty threshold, on photo val (photos of other things count as wrong).
    probs = softmax(_served_logits(served, level_logits, "photo_val") / served["temperature"])
    other = softmax(_served_logits(served, level_logits, "other_val") / served["temperature"])
    top = np.concatenate([probs.max(1), other.max(1)])
    right = np.concatenate([probs.argmax(1) == sets["photo_val"][1], np.zeros(len(other), bool)])
    meta["uncertain_below"] = uncertainty_threshold(top, right)
    print(f"uncertain below {meta['uncertain_below']:.2f} (photo val)", flush=True)

    # 6. The same net for OpenVINO, with checksums.
    calibration = ds.train_x[np.random.default_rng(0).permutation(len(ds.train_x))[:CALIBRATION_IMAGES]]
    meta["files"].update(export_openvino(out, calibration))
    write_meta(out, meta)

    # 7. Figures of the served model (read back from its directory), of every member, and the card.
    served_predictor = load_predictor(out)
    test_probs = served_predictor.predict_proba(ds.test_x)
    meta["test"] = metrics(test_probs, ds.test_y, classes)
    meta["test"]["accuracy_no_tta"] = next(s["cifar_test"] for s in study if s["config"] == "tta0")
    meta["test"]["reliability"] = reliability(test_probs, ds.test_y)
    meta["photos"] = {}
    for split in ("val", "test"):
        figures = photo_figures(served_predictor, split, photos_dir)
        x, y = photos[split].in_class(classes)
        figures["reliability"] = reliability(served_predictor.predict_proba(x), y, class_balanced_weights(y))
        meta["photos"][split] = figures
    for member, run in zip(meta["members"], runs, strict=True):
        member.update(_member_figures(run, served, ds, classes, photos_dir))
    meta["wall_seconds"] = round(time.perf_counter() - started, 1)
    write_meta(out, meta)
    _worst_mistakes_grid(out, served_predictor, photos["test"], classes)
    write_model_card(out, meta)
    t, pt = meta["test"], meta["photos"]["test"]
    print(
        f"served {served['config']}: CIFAR test {t['accuracy']:.4f} top-3 {t['top3_accuracy']:.4f} "
        f"ECE {t['ece']:.4f}; photo test {pt['accuracy']:.4f} top-3 {pt['top3_accuracy']:.4f} "
        f"ECE {pt['ece']:.4f}; saved {out}",
        flush=True,
    )
    return meta


def choose_served(study: list[dict]) -> tuple[dict, dict]:
    """(served, best): the cheapest configuration within WITHIN of the best CIFAR test accuracy
    that is no worse on photo val than that best; ties go to the more accurate."""
    best = max(study, key=lambda s: (s["cifar_test"], s["photo_val"], -s["views"]))
    fit = [s for s in study if s["cifar_test"] >= best["cifar_test"] - WITHIN and s["photo_val"] >= best["photo_val"]]
    return min(fit, key=lambda s: (s["views"], -s["cifar_test"], -s["photo_val"])), best


def uncertainty_threshold(top: np.ndarray, right: np.ndarray) -> float:
    """The confidence below which an answer is more likely wrong than right: where a logistic
    fit of right/wrong on the top probability's log-odds crosses one half (rounded to 0.01),
    0 if it never does. Flagging by the share right among *all* answers below a threshold
    instead flagged a third of the right answers on photo val (a threshold of 0.94)."""
    z = np.log(np.clip(top, 1e-6, 1 - 1e-6) / np.clip(1 - top, 1e-6, 1))
    X, y, w = np.stack([np.ones_like(z), z], 1), right.astype(float), np.zeros(2)
    for _ in range(50):  # Newton's method on the logistic log-likelihood (two parameters)
        q = 1 / (1 + np.exp(-X @ w))
        hessian = X.T @ (X * (q * (1 - q))[:, None]) + 1e-6 * np.eye(2)
        w += np.linalg.solve(hessian, X.T @ (y - q))
    a, b = w
    if b <= 0 or a >= 0:  # confidence says nothing, or even the least confident answers are mostly right
        return 0.0
    return round(float(1 / (1 + np.exp(a / b))), 2)


def calibration_study(served: dict, level_logits: dict, sets: dict, classes: list[str]) -> list[dict]:
    """The served configuration's temperature fit on CIFAR val alone, on photo val alone, and on
    both (what is served), with the ECE each gives on the two test sets (reported, not chosen on)."""
    rows = []
    for fit_on in (("cifar_val",), ("photo_val",), None):
        if fit_on is None:
            t = served["temperature"]
        else:
            logits = np.concatenate([_served_logits(served, level_logits, n) for n in fit_on])
            t = fit_temperature(logits, np.concatenate([sets[n][1] for n in fit_on]))
        row = dict(fit_on=" and ".join(fit_on or ("cifar_val", "photo_val")), served=fit_on is None, temperature=t)
        for name in ("cifar_test", "photo_test"):
            y = sets[name][1]
            w = class_balanced_weights(y) if name.startswith("photo") else None
            probs = softmax(_served_logits(dict(served, temperature=t), level_logits, name) / t)
            row[f"{name}_ece"] = metrics(probs, y, classes, weights=w)["ece"]
        rows.append(row)
    return rows


def _member(run: Path, meta: dict) -> dict:
    """A member's provenance and its own training figures, from its run's model.json."""
    keep = ("name", "version", "seed", "git_commit", "train_seconds", "history", "machine")
    test = meta.get("test", {})
    return {k: meta[k] for k in keep if k in meta} | dict(
        run=run.name,
        weights_sha256=meta["files"][MODEL_FILE],
        own_test=dict(
            accuracy_tta2=test.get("accuracy"),
            accuracy_no_tta=test.get("accuracy_no_tta"),
            ece=test.get("ece"),
            temperature=meta["temperature"],
        ),
    )


def _served_logits(config: dict, level_logits: dict, name: str) -> np.ndarray:
    """What the Predictor computes for this configuration (shared/predictor.py, Predictor._logits)."""
    if config["cascade"] is None:
        return level_logits[name, config["level"]]
    c = Cascade(**config["cascade"])
    logits = level_logits[name, c.first].copy()
    unsure = softmax(logits / config["temperature"]).max(1) < c.below
    logits[unsure] = level_logits[name, c.then][unsure]
    return logits


def _configuration(level: int | None, cascade: Cascade | None, level_logits: dict, sets: dict) -> dict:
    config = dict(level=level, cascade=asdict(cascade) if cascade else None)

    def joint_temperature(t_guess: float) -> float:
        # Both sets weigh the same: the CIFAR split has 8x as many images as photo val.
        cifar = _served_logits(dict(config, temperature=t_guess), level_logits, "cifar_val")
        photo = _served_logits(dict(config, temperature=t_guess), level_logits, "photo_val")
        y_photo = sets["photo_val"][1]
        reps = max(1, round(len(cifar) / len(photo)))
        return fit_temperature(
            np.concatenate([cifar, np.repeat(photo, reps, axis=0)]),
            np.concatenate([sets["cifar_val"][1], np.repeat(y_photo, reps)]),
        )

    # A cascade's choice of unsure images depends on the temperature: fit, choose, fit again.
    temperature = joint_temperature(joint_temperature(1.0)) if cascade else joint_temperature(1.0)
    config["temperature"] = temperature
    row = dict(
        config,
        config=f"tta{level}" if cascade is None else f"cascade {cascade.first}>{cascade.then} <{cascade.below:g}",
    )
    for name in ("cifar_val", "cifar_test", "photo_val"):
        logits, y = _served_logits(config, level_logits, name), sets[name][1]
        w = class_balanced_weights(y) if name.startswith("photo") else None
        m = metrics(softmax(logits / temperature), y, [str(i) for i in range(logits.shape[1])], weights=w)
        row[name], row[f"{name}_top3"], row[f"{name}_ece"] = m["accuracy"], m["top3_accuracy"], m["ece"]
    if cascade is None:
        row["views"] = float(VIEWS[level])
    else:
        first = level_logits["cifar_test", cascade.first]
        share = float(np.mean(softmax(first / temperature).max(1) < cascade.below))
        row["views"], row["second_call_share"] = VIEWS[cascade.first] + share * VIEWS[cascade.then], share
    return row


def _member_figures(run: Path, served: dict, ds, classes: list[str], photos_dir: Path) -> dict:
    """A member alone, served as the ensemble is (its own temperature): CIFAR test and photos."""
    level = served["level"] if served["cascade"] is None else served["cascade"]["then"]
    predictor = load_predictor(run, tta_level=level)
    m = metrics(predictor.predict_proba(ds.test_x), ds.test_y, classes)
    figures = dict(
        served_level=level, cifar_test=m["accuracy"], cifar_test_top3=m["top3_accuracy"], cifar_test_ece=m["ece"]
    )
    for split in ("val", "test"):
        p = photo_figures(predictor, split, photos_dir)
        figures |= {f"photo_{split}": p["accuracy"], f"photo_{split}_top3": p["top3_accuracy"]}
        figures[f"photo_{split}_ece"] = p["ece"]
    return figures


def _worst_mistakes_grid(out: Path, predictor, photos, classes: list[str], n: int = 24) -> None:
    """worst_photo_mistakes.png: the photo test mistakes made with the highest confidence."""
    import matplotlib.pyplot as plt  # training.card chose the Agg backend
    from PIL import Image

    keep = [i for i, label in enumerate(photos.labels) if label != OTHER]
    x, y = photos.in_class(classes)
    probs = predictor.predict_proba(x)
    wrong = np.flatnonzero(probs.argmax(1) != y)
    worst = wrong[np.argsort(-probs[wrong].max(1))][:n]
    cols = 6
    rows = max(1, -(-len(worst) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.9, 2.2 * rows), squeeze=False)
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, i in zip(np.ravel(axes), worst, strict=False):
        ax.imshow(Image.open(photos.folder / photos.files[keep[i]]).convert("RGB"))
        ax.set_title(f"{classes[probs[i].argmax()]} {probs[i].max():.0%}\n(is {classes[y[i]]})", fontsize=8)
    fig.suptitle("Photo test split: the most confident mistakes (answer, probability, truth)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "worst_photo_mistakes.png", dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
