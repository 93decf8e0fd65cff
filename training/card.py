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
    histories = [m["history"] for m in meta["members"]] if meta.get("members") else [meta["history"]]
    _plot_training_curves(out, histories)
    if meta.get("test"):
        _plot_confusion(out, meta["classes"], np.array(meta["test"]["confusion"]))
    if meta.get("photos"):
        _plot_reliability(out, meta)
    sections = [
        _summary,
        _figures,
        _photo_figures,
        _serving,
        _members,
        _seed_runs,
        _per_class,
        _training,
        _preprocessing,
        _measurements,
        _known_limits,
    ]
    lines = [f"# Model card: {meta['name']} ({meta['version']})", ""]
    for section in sections:
        lines += section(meta)
    (out / "MODEL_CARD.md").write_text("\n".join(lines))


def _plot_training_curves(out: Path, histories: list[list[dict]]) -> None:
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    for i, history in enumerate(histories):
        tag = f" {i}" if len(histories) > 1 else ""
        epochs = [r["epoch"] for r in history]
        ax[0].plot(epochs, [r["loss"] for r in history], marker="o", label=f"member{tag}")
        ax[1].plot(epochs, [r["train_acc"] for r in history], marker="o", label=f"train (augmented){tag}")
        ax[1].plot(epochs, [r["val_acc"] for r in history], marker="o", label=f"validation (held out){tag}")
    ax[0].set(title="training loss (label-smoothed)", xlabel="epoch")
    ax[1].set(title="accuracy", xlabel="epoch")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "training_curves.png", dpi=90)
    plt.close(fig)


def _plot_reliability(out: Path, meta: dict) -> None:
    """reliability.png: accuracy against confidence per bin, on the CIFAR test and photo test."""
    sets = [("CIFAR-10 test", meta["test"]), ("photo test (class-balanced)", meta["photos"]["test"])]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.8))
    for ax, (title, m) in zip(axes, sets, strict=True):
        bins = np.array(m["reliability"])
        ax.bar(bins[:, 0], bins[:, 2], width=1 / 15, align="edge", edgecolor="#345", color="#9ab8e6", label="accuracy")
        ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
        ax.scatter(bins[:, 1], bins[:, 2], s=8 + 400 * bins[:, 3], color="#c33", zorder=3, label="bin (area: share)")
        ax.set(title=f"{title}: ECE {m['ece']:.3f}", xlabel="confidence (top probability)", ylabel="accuracy")
        ax.set_xlim(0, 1), ax.set_ylim(0, 1)
    axes[0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=90)
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
    n = len(meta.get("members", [])) or 1
    what = (
        f"An ensemble of {n} small convolutional networks (airbench's design: patch-whitening, three "
        "conv blocks with BatchNorm and GELU, trained from different seeds; their logits are averaged)"
        if n > 1
        else "A small convolutional network (airbench's design: patch-whitening, three conv blocks "
        "with BatchNorm and GELU)"
    )
    return [
        f"{what} that labels 32x32 colour images with one of {len(meta['classes'])} classes: "
        f"{', '.join(meta['classes'])}.",
        "",
    ]


def served_as(meta: dict) -> str:
    """The serving configuration in words: TTA level, or cascade, and views per image."""
    serving = meta.get("serving") or {}
    c = serving.get("cascade")
    if c:
        return (
            f"cascade: TTA level {c['first']}, then level {c['then']} where the top probability is "
            f"below {c['below']:g}; {serving['views']:.2f} views per image on the CIFAR test"
        )
    return f"TTA level {meta['tta_level']}"


def _figures(meta: dict) -> list[str]:
    members = meta.get("members") or [meta]
    lines = [
        "## Figures: CIFAR-10",
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
        ece = f"{test['ece']:.4f}"
        if "ece_before_temperature" in test:
            ece = f"{ece} (before temperature {test['ece_before_temperature']:.4f})"
        calibrated_on = (
            f"{meta['recipe']['val_size']} held-out train images and the photo val split, equally weighted"
            if meta.get("members")
            else f"{meta['recipe']['val_size']} held-out train images"
        )
        lines += [
            f"| accuracy (as served: {served_as(meta)}) | {test['accuracy']:.4f} |",
            f"| accuracy without TTA | {test['accuracy_no_tta']:.4f} |",
            f"| top-3 accuracy | {test['top3_accuracy']:.4f} |",
            f"| ECE, 15 bins | {ece} |",
            f"| softmax temperature (fit on {calibrated_on}) | {meta['temperature']:.3f} |",
        ]
    m = members[0]["machine"]
    minutes = [x["train_seconds"] / 60 for x in members]
    seeds = ", ".join(str(x["seed"]) for x in members)
    return lines + [
        f"| training time | {' + '.join(f'{t:.1f}' for t in minutes)} min"
        + (
            f" ({meta['wall_seconds'] / 60:.1f} min wall, data loading and evaluation included)"
            if len(members) == 1
            else ""
        )
        + " |",
        f"| machine | {m['cpu']}, {m['cores']} cores, TensorFlow {m['tensorflow']} |",
        f"| seed{'s' if len(members) > 1 else ''} / commit | {seeds} / {meta['git_commit']} |",
        "",
    ]


def _photo_figures(meta: dict) -> list[str]:
    photos = meta.get("photos")
    if not photos:
        return []
    val, test = photos["val"], photos["test"]
    rows = [
        ("top-1 accuracy", "accuracy", "{:.4f}"),
        ("top-3 accuracy", "top3_accuracy", "{:.4f}"),
        ("ECE, 15 bins", "ece", "{:.4f}"),
        ("mean top probability", "mean_confidence", "{:.3f}"),
        ("answered uncertain, photos of the classes", "uncertain_share", "{:.1%}"),
        ("answered uncertain, photos of other things", "uncertain_share_other", "{:.1%}"),
    ]
    lines = [
        "## Figures: real photos",
        "",
        f"The photo benchmark in `benchmarks/photos/` ({test['n']} test and {val['n']} val photos of "
        f"the classes, {test['n_other']} and {val['n_other']} of other things; sources and licences in "
        "`benchmarks/photos/SOURCES.md`), read through the service's own input path by "
        "`python -m training.evaluate --photos`. Figures are class-balanced. The val split chose the "
        "temperature, the serving configuration and the uncertainty threshold; the test split is only reported.",
        "",
        "| figure | photo test | photo val | CIFAR test |",
        "|---|---|---|---|",
    ]
    cifar = meta["test"]
    for title, key, fmt in rows:
        c = fmt.format(cifar[key]) if key in cifar else ""
        lines.append(f"| {title} | {fmt.format(test[key])} | {fmt.format(val[key])} | {c} |")
    lines += [
        "",
        f"**Uncertain**: an answer whose top probability is below **{meta['uncertain_below']:.2f}** is "
        "marked `uncertain`: on photo val, below that confidence an answer is more likely wrong than right "
        "(where a logistic fit of right/wrong on the confidence crosses one half; an answer about a photo of "
        "none of the classes counts as wrong, as it always is).",
        "",
    ]
    study = meta.get("calibration_study")
    if study:
        lines += [
            "One softmax temperature serves both kinds of image. Fit on each validation set alone, or on both "
            "(served), it gives these calibration errors on the test sets:",
            "",
            "| temperature fit on | temperature | CIFAR test ECE | photo test ECE |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['fit_on'].replace('_', ' ')}{' (served)' if r['served'] else ''} | {r['temperature']:.3f} | "
            f"{r['cifar_test_ece']:.4f} | {r['photo_test_ece']:.4f} |"
            for r in study
        ]
    lines += [
        "",
        "![reliability diagrams](reliability.png)",
        "",
        "| class | photo test accuracy | CIFAR test accuracy |",
        "|---|---|---|",
    ]
    lines += [f"| {c} | {a:.4f} | {cifar['per_class'][c]:.4f} |" for c, a in test["per_class"].items()]
    return lines + ["", "![worst photo mistakes](worst_photo_mistakes.png)", ""]


def _serving(meta: dict) -> list[str]:
    study = meta.get("serving_study")
    if not study:
        return []
    lines = [
        "## How it is served",
        "",
        "Every configuration tried (`python -m training.ensemble`): views are the forward passes per "
        f"image, each through all {len(meta.get('members') or [1])} members; a cascade computes its second "
        "level only for the images still unsure after the first, in one more call. Served: the cheapest "
        "within 0.1 point of the best CIFAR test accuracy that is no worse on photo val than that best.",
        "",
        "| configuration | views | CIFAR test | CIFAR test ECE | photo val | photo val top-3 | temperature |",
        "|---|---|---|---|---|---|---|",
    ]
    served = meta["serving"]
    for s in study:
        is_served = s["cascade"] == served["cascade"] and (s["cascade"] or s["level"] == meta["tta_level"])
        name = f"**{s['config']} (served)**" if is_served else s["config"]
        lines.append(
            f"| {name} | {s['views']:.2f} | {s['cifar_test']:.4f} | {s['cifar_test_ece']:.4f} | "
            f"{s['photo_val']:.4f} | {s['photo_val_top3']:.4f} | {s['temperature']:.3f} |"
        )
    return lines + [""]


def _members(meta: dict) -> list[str]:
    members = meta.get("members")
    if not members:
        return []
    lines = [
        "## Every member, alone",
        "",
        f"Each member served at the ensemble's TTA level ({members[0]['served_level']}) with its own "
        "temperature (fit on CIFAR val only).",
        "",
        "| seed | CIFAR test | top-3 | ECE | photo test | top-3 | ECE | photo val | training min |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for x in members:
        lines.append(
            f"| {x['seed']} | {x['cifar_test']:.4f} | {x['cifar_test_top3']:.4f} | {x['cifar_test_ece']:.4f} | "
            f"{x['photo_test']:.4f} | {x['photo_test_top3']:.4f} | {x['photo_test_ece']:.4f} | "
            f"{x['photo_val']:.4f} | {x['train_seconds'] / 60:.1f} |"
        )
    mean = np.mean([x["cifar_test"] for x in members])
    return lines + ["", f"Mean CIFAR test accuracy of the members: {mean:.4f}.", ""]


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
    ] + (
        [
            "Each member: `python -m training.train --seed S --out RUN` with that recipe; then "
            "`python -m training.ensemble RUN ... --out " + f"models/{meta['name']}`.",
            "",
        ]
        if meta.get("members")
        else []
    )


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
        (
            "- Probabilities are calibrated (one temperature) on CIFAR val and photo val together; "
            "photos unlike the benchmark's (drawings, screenshots, close-ups) may still be over-confident."
            if meta.get("photos")
            else "- Probabilities are calibrated (temperature) on CIFAR-like images; on photos unlike the "
            "training data they are over-confident."
        ),
        "- cat/dog and automobile/truck are the most confused pairs (see the confusion matrix).",
        "",
    ]
