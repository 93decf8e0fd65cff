"""Write a trained net as a shipped model directory: model.keras, model.json, MODEL_CARD.md, plots."""
from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import keras
import numpy as np

from shared.predictor import META_FILE, MODEL_FILE, Predictor, file_digest, softmax
from training.evaluate import metrics
from training.model import build_net

PREPROCESSING = ("shared.images.preprocess: decode (format allowlist), EXIF orientation, RGB "
                 "(alpha on white, CMYK/16-bit/palette converted), centre square crop, area-"
                 "averaging (box) downscale to 32x32, uint8; normalisation is inside the model")


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The softmax temperature that minimises validation NLL (a 1-D search over log T)."""
    def nll(t):
        p = softmax(logits / t)
        return -np.mean(np.log(p[np.arange(len(labels)), labels] + 1e-12))
    grid = np.exp(np.linspace(np.log(0.25), np.log(4.0), 161))
    best = grid[np.argmin([nll(t) for t in grid])]
    fine = best * np.exp(np.linspace(-0.02, 0.02, 41))
    return float(fine[np.argmin([nll(t) for t in fine])])


def save_inference_model(model: keras.Model, out: Path, classes: list[str], recipe: dict,
                         **extra) -> dict:
    """Save the net (float32 layers) with its model.json: all the worker needs to serve it."""
    # Ship float32 layers: the serving precision is the worker's choice, not baked into the file.
    keras.mixed_precision.set_global_policy("float32")
    shipped = build_net(len(classes), recipe["widths"], recipe["bn_momentum"],
                        recipe["scaling_factor"], recipe.get("depth", 2), name=model.name)
    shipped.set_weights(model.get_weights())
    out.mkdir(parents=True, exist_ok=True)
    shipped.save(out / MODEL_FILE)
    digest = file_digest(out / MODEL_FILE)
    meta = dict(
        name=out.name,
        version=f"{dt.date.today():%Y%m%d}-{digest[:8]}",
        classes=list(classes),
        input=dict(shape=[32, 32, 3], dtype="uint8", color="RGB", preprocessing=PREPROCESSING),
        temperature=1.0,
        tta_level=int(recipe["tta_level"]),
        files={MODEL_FILE: digest},
        recipe={k: list(v) if isinstance(v, tuple) else v for k, v in recipe.items()},
        **extra,
    )
    _write_meta(out, meta)
    return meta


def save_model_dir(model: keras.Model, out: Path, *, recipe: dict, dataset, seed: int,
                   history: list[dict], val, train_seconds: float, started: float) -> dict:
    """The shipped directory: the model, its temperature, test figures and the model card."""
    from training.train import git_commit, machine  # the training run's provenance

    meta = save_inference_model(
        model, out, dataset.classes, recipe, seed=seed,
        data=dict(source=Path(dataset.source).name, sha256=dataset.checksum,
                  train=int(len(dataset.train_x)), test=int(len(dataset.test_x))),
        git_commit=git_commit(), machine=machine(), train_seconds=round(train_seconds, 1),
        history=history)
    predictor = Predictor(out)
    val_x, val_y = val
    if len(val_x):
        meta["temperature"] = fit_temperature(predictor.logits(val_x), val_y)
    logits = predictor.logits(dataset.test_x)
    if len(dataset.test_x):
        m = metrics(softmax(logits / meta["temperature"]), dataset.test_y, dataset.classes)
        m["accuracy_no_tta"] = float(np.mean(Predictor(out, tta_level=0).logits(dataset.test_x)
                                             .argmax(1) == dataset.test_y))
        m["ece_before_temperature"] = metrics(softmax(logits), dataset.test_y, dataset.classes)["ece"]
        meta["test"] = m
        print(f"test accuracy {m['accuracy']:.4f} (TTA level {meta['tta_level']}), "
              f"{m['accuracy_no_tta']:.4f} without; top-3 {m['top3_accuracy']:.4f}; "
              f"ECE {m['ece']:.4f} (before temperature {m['ece_before_temperature']:.4f})", flush=True)
    meta["wall_seconds"] = round(time.perf_counter() - started, 1)  # data, training, calibration, test
    _write_meta(out, meta)
    write_model_card(out, meta)
    return meta


def _write_meta(out: Path, meta: dict) -> None:
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def study_note(study: dict) -> str:
    """What the preprocessing study shows, in words, with its own figures (in points)."""
    def gaps(other, variants):  # ours minus the other path, per variant
        return [100 * (study[f"{v}/ours"] - study[f"{v}/{other}"]) for v in variants]
    variants = list(dict.fromkeys(k.split("/")[0] for k in study))
    square = [v for v in variants if not v.startswith("wide")]
    bicubic, squash, wide = gaps("bicubic", variants), gaps("nearest_squash", square), \
        gaps("nearest_squash", [v for v in variants if v.startswith("wide")])
    return (f"Against our path with bicubic, area averaging gains {min(bicubic):+.1f} to "
            f"{max(bicubic):+.1f} points. Against the nearest-neighbour squash on square upscales: "
            f"{min(squash):+.1f} to {max(squash):+.1f} points; these images are CIFAR pixels blown "
            "up, and nearest sampling lands on (or next to) the original pixels, which a real photo "
            "does not have (on a real photo nearest neighbour aliases). On the landscape frame, "
            f"which the squash distorts: {min(wide):+.1f} points.")


def write_model_card(out: Path, meta: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = meta["history"]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    epochs = [r["epoch"] for r in h]
    ax[0].plot(epochs, [r["loss"] for r in h], marker="o")
    ax[0].set(title="training loss (label-smoothed)", xlabel="epoch")
    ax[1].plot(epochs, [r["train_acc"] for r in h], marker="o", label="train (augmented)")
    ax[1].plot(epochs, [r["val_acc"] for r in h], marker="o", label="validation (held out)")
    ax[1].set(title="accuracy", xlabel="epoch")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(out / "training_curves.png", dpi=90)
    plt.close(fig)

    lines = [f"# Model card: {meta['name']} ({meta['version']})", ""]
    test = meta.get("test")
    if test:
        classes = meta["classes"]
        cm = np.array(test["confusion"])
        fig, ax = plt.subplots(figsize=(6, 5.2))
        ax.imshow(cm, cmap="Blues")
        ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right")
        ax.set_yticks(range(len(classes)), classes)
        ax.set(xlabel="predicted", ylabel="true", title="confusion matrix (test)")
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(j, i, cm[i, j], ha="center", va="center", fontsize=7,
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
        fig.tight_layout()
        fig.savefig(out / "confusion_matrix.png", dpi=90)
        plt.close(fig)
    r = meta["recipe"]
    lines += [
        "A small convolutional network (airbench's design: patch-whitening, three conv blocks "
        "with BatchNorm and GELU) that labels 32x32 colour images with one of "
        f"{len(meta['classes'])} classes: {', '.join(meta['classes'])}.",
        "",
        "## Figures",
        "",
        f"Measured on the test split of `{meta['data']['source']}` ({meta['data']['test']} images)"
        " by `python -m training.evaluate`. For the shared data this is **CIFAR-10 test, "
        "JPEG-q75 copy**, not the official pixels.",
        "",
        "| figure | value |",
        "|---|---|",
    ]
    if test:
        lines += [
            f"| accuracy (TTA level {meta['tta_level']}, as served) | {test['accuracy']:.4f} |",
            f"| accuracy without TTA | {test['accuracy_no_tta']:.4f} |",
            f"| top-3 accuracy | {test['top3_accuracy']:.4f} |",
            f"| ECE, 15 bins (after / before temperature) | {test['ece']:.4f} / "
            f"{test['ece_before_temperature']:.4f} |",
            f"| softmax temperature (fit on {r['val_size']} held-out train images) | "
            f"{meta['temperature']:.3f} |",
        ]
    lines += [
        f"| training time | {meta['train_seconds'] / 60:.1f} min ({meta.get('wall_seconds', 0) / 60:.1f}"
        f" min wall, data loading and evaluation included) |",
        f"| machine | {meta['machine']['cpu']}, {meta['machine']['cores']} cores, TensorFlow "
        f"{meta['machine']['tensorflow']} |",
        f"| seed / commit | {meta['seed']} / {meta['git_commit']} |",
        "",
    ]
    runs = meta.get("seed_runs")
    if runs:
        accs = [x["accuracy"] for x in runs]
        lines += ["## Every seeded run of this recipe", "",
                  "| seed | accuracy (TTA) | without TTA | top-3 | ECE | training min | note |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {x['seed']} | {x['accuracy']:.4f} | {x.get('accuracy_no_tta', float('nan')):.4f} | "
                  f"{x.get('top3_accuracy', float('nan')):.4f} | {x.get('ece', float('nan')):.4f} | "
                  f"{x['train_minutes']:.1f} | {x.get('note', '')} |" for x in runs]
        lines += ["", f"Mean {np.mean(accs):.4f}, spread (max - min) {max(accs) - min(accs):.4f}; "
                  "the shipped weights are from seed " f"{meta['seed']}.", ""]
    if test:
        lines += ["## Per-class accuracy", "", "| class | accuracy |", "|---|---|"]
        lines += [f"| {c} | {a:.4f} |" for c, a in test["per_class"].items()]
        lines += ["", "![confusion matrix](confusion_matrix.png)", ""]
    lines += ["## Training", "", "![training curves](training_curves.png)", "",
              f"Recipe (also in model.json): `{json.dumps(r)}`", ""]
    study = meta.get("preprocessing_study")
    if study:
        paths = list(dict.fromkeys(k.split("/")[1] for k in study))
        lines += ["## Preprocessing", "",
                  "Input path: " + meta["input"]["preprocessing"] + ".", "",
                  "Accuracy (without TTA) on the 10,000 test images made photo-like (upscaled "
                  "with bicubic, saved as JPEG q90; `wide_4x3` also padded with mirrored margins "
                  "to a landscape frame), through our path, our path with a bicubic filter, and "
                  "the nearest-neighbour squash of the demo this service replaces "
                  "(`python -m training.evaluate --study`):", "",
                  "| test images | " + " | ".join(paths) + " |", "|---" * (len(paths) + 1) + "|"]
        for variant in dict.fromkeys(k.split("/")[0] for k in study):
            lines.append(f"| {variant} | " + " | ".join(f"{study[f'{variant}/{p}']:.4f}" for p in paths) + " |")
        lines += ["", study_note(study), ""]
    notes = meta.get("measurements")
    if notes:
        lines += ["## Other measurements", ""] + [f"- {n}" for n in notes] + [""]
    lines += [
        "## Known limits", "",
        "- Trained on 32x32 CIFAR-10 images (JPEG-q75 copy): it knows ten classes and nothing "
        "else; any other picture still gets one of the ten labels, usually with low confidence.",
        "- A photo is reduced to its central square at 32x32: small or off-centre objects are lost.",
        "- Probabilities are calibrated (temperature) on CIFAR-like images; on photos unlike the "
        "training data they are over-confident.",
        "- cat/dog and automobile/truck are the most confused pairs (see the confusion matrix).",
        "",
    ]
    (out / "MODEL_CARD.md").write_text("\n".join(lines))
