"""The model card (MODEL_CARD.md) and its plots, written from model.json's figures."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def study_note(study: dict) -> str:
    """What the preprocessing study shows, in words, with its own figures (in points)."""

    def gaps(other, variants):  # ours minus the other path, per variant
        return [100 * (study[f"{v}/ours"] - study[f"{v}/{other}"]) for v in variants]

    variants = list(dict.fromkeys(k.split("/")[0] for k in study))
    square = [v for v in variants if not v.startswith("wide")]
    bicubic, squash, wide = (
        gaps("bicubic", variants),
        gaps("nearest_squash", square),
        gaps("nearest_squash", [v for v in variants if v.startswith("wide")]),
    )
    return (
        f"Against our path with bicubic, area averaging gains {min(bicubic):+.1f} to "
        f"{max(bicubic):+.1f} points. Against the nearest-neighbour squash on square upscales: "
        f"{min(squash):+.1f} to {max(squash):+.1f} points; these images are CIFAR pixels blown "
        "up, and nearest sampling lands on (or next to) the original pixels, which a real photo "
        "does not have (on a real photo nearest neighbour aliases). On the landscape frame, "
        f"which the squash distorts: {min(wide):+.1f} points."
    )


def write_model_card(out: Path, meta: dict) -> None:
    """MODEL_CARD.md and its plots in `out`, from the model's metadata (model.json)."""
    _plot_training_curves(out, meta["history"])
    if meta.get("test"):
        _plot_confusion(out, meta["classes"], np.array(meta["test"]["confusion"]))
    sections = [_summary, _figures, _seed_runs, _per_class, _training, _preprocessing, _measurements, _known_limits]
    lines = [f"# Model card: {meta['name']} ({meta['version']})", ""]
    for section in sections:
        lines += section(meta)
    (out / "MODEL_CARD.md").write_text("\n".join(lines))


def _plot_training_curves(out: Path, history: list[dict]) -> None:
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    epochs = [r["epoch"] for r in history]
    ax[0].plot(epochs, [r["loss"] for r in history], marker="o")
    ax[0].set(title="training loss (label-smoothed)", xlabel="epoch")
    ax[1].plot(epochs, [r["train_acc"] for r in history], marker="o", label="train (augmented)")
    ax[1].plot(epochs, [r["val_acc"] for r in history], marker="o", label="validation (held out)")
    ax[1].set(title="accuracy", xlabel="epoch")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(out / "training_curves.png", dpi=90)
    plt.close(fig)


def _plot_confusion(out: Path, classes: list[str], cm: np.ndarray) -> None:
    fig, ax = plt.subplots(figsize=(6, 5.2))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix (test)")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(
                j,
                i,
                cm[i, j],
                ha="center",
                va="center",
                fontsize=7,
                color="white" if cm[i, j] > cm.max() / 2 else "black",
            )
    fig.tight_layout()
    fig.savefig(out / "confusion_matrix.png", dpi=90)
    plt.close(fig)


def _summary(meta: dict) -> list[str]:
    return [
        "A small convolutional network (airbench's design: patch-whitening, three conv blocks "
        "with BatchNorm and GELU) that labels 32x32 colour images with one of "
        f"{len(meta['classes'])} classes: {', '.join(meta['classes'])}.",
        "",
    ]


def _figures(meta: dict) -> list[str]:
    lines = [
        "## Figures",
        "",
        f"Measured on the test split of `{meta['data']['source']}` ({meta['data']['test']} images)"
        " by `python -m training.evaluate`. For the shared data this is **CIFAR-10 test, "
        "JPEG-q75 copy**, not the official pixels.",
        "",
        "| figure | value |",
        "|---|---|",
    ]
    test = meta.get("test")
    if test:
        lines += [
            f"| accuracy (TTA level {meta['tta_level']}, as served) | {test['accuracy']:.4f} |",
            f"| accuracy without TTA | {test['accuracy_no_tta']:.4f} |",
            f"| top-3 accuracy | {test['top3_accuracy']:.4f} |",
            f"| ECE, 15 bins (after / before temperature) | {test['ece']:.4f} / {test['ece_before_temperature']:.4f} |",
            f"| softmax temperature (fit on {meta['recipe']['val_size']} held-out train images) | "
            f"{meta['temperature']:.3f} |",
        ]
    m = meta["machine"]
    return lines + [
        f"| training time | {meta['train_seconds'] / 60:.1f} min ({meta.get('wall_seconds', 0) / 60:.1f}"
        " min wall, data loading and evaluation included) |",
        f"| machine | {m['cpu']}, {m['cores']} cores, TensorFlow {m['tensorflow']} |",
        f"| seed / commit | {meta['seed']} / {meta['git_commit']} |",
        "",
    ]


def _seed_runs(meta: dict) -> list[str]:
    runs = meta.get("seed_runs")
    if not runs:
        return []
    accs = [x["accuracy"] for x in runs]
    nan = float("nan")
    return (
        [
            "## Every seeded run of this recipe",
            "",
            "| seed | accuracy (TTA) | without TTA | top-3 | ECE | training min | note |",
            "|---|---|---|---|---|---|---|",
        ]
        + [
            f"| {x['seed']} | {x['accuracy']:.4f} | {x.get('accuracy_no_tta', nan):.4f} | "
            f"{x.get('top3_accuracy', nan):.4f} | {x.get('ece', nan):.4f} | {x['train_minutes']:.1f} | "
            f"{x.get('note', '')} |"
            for x in runs
        ]
        + [
            "",
            f"Mean {np.mean(accs):.4f}, spread (max - min) {max(accs) - min(accs):.4f}; "
            f"the shipped weights are from seed {meta['seed']}.",
            "",
        ]
    )


def _per_class(meta: dict) -> list[str]:
    test = meta.get("test")
    if not test:
        return []
    return (
        ["## Per-class accuracy", "", "| class | accuracy |", "|---|---|"]
        + [f"| {c} | {a:.4f} |" for c, a in test["per_class"].items()]
        + ["", "![confusion matrix](confusion_matrix.png)", ""]
    )


def _training(meta: dict) -> list[str]:
    return [
        "## Training",
        "",
        "![training curves](training_curves.png)",
        "",
        f"Recipe (also in model.json): `{json.dumps(meta['recipe'])}`",
        "",
    ]


def _preprocessing(meta: dict) -> list[str]:
    study = meta.get("preprocessing_study")
    if not study:
        return []
    paths = list(dict.fromkeys(k.split("/")[1] for k in study))
    lines = [
        "## Preprocessing",
        "",
        "Input path: " + meta["input"]["preprocessing"] + ".",
        "",
        "Accuracy (without TTA) on the 10,000 test images made photo-like (upscaled "
        "with bicubic, saved as JPEG q90; `wide_4x3` also padded with mirrored margins "
        "to a landscape frame), through our path, our path with a bicubic filter, and "
        "the nearest-neighbour squash of the demo this service replaces "
        "(`python -m training.evaluate --study`):",
        "",
        "| test images | " + " | ".join(paths) + " |",
        "|---" * (len(paths) + 1) + "|",
    ]
    for variant in dict.fromkeys(k.split("/")[0] for k in study):
        lines.append(f"| {variant} | " + " | ".join(f"{study[f'{variant}/{p}']:.4f}" for p in paths) + " |")
    return lines + ["", study_note(study), ""]


def _measurements(meta: dict) -> list[str]:
    notes = meta.get("measurements")
    return ["## Other measurements", ""] + [f"- {n}" for n in notes] + [""] if notes else []


def _known_limits(meta: dict) -> list[str]:
    return [
        "## Known limits",
        "",
        "- Trained on 32x32 CIFAR-10 images (JPEG-q75 copy): it knows ten classes and nothing "
        "else; any other picture still gets one of the ten labels, usually with low confidence.",
        "- A photo is reduced to its central square at 32x32: small or off-centre objects are lost.",
        "- Probabilities are calibrated (temperature) on CIFAR-like images; on photos unlike the "
        "training data they are over-confident.",
        "- cat/dog and automobile/truck are the most confused pairs (see the confusion matrix).",
        "",
    ]
