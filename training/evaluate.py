"""Evaluate a shipped model on every test image, through the worker's own inference path.

    python -m training.evaluate [--model DIR] [--data PATH] [--study]

Prints per-class accuracy, top-3 accuracy, ECE (15 bins) and, as its last line,
accuracy=0.XXXX (with test-time augmentation as the model ships it).
--study also measures the preprocessing choice on upscaled and wide test images
and writes those figures into the model's card.
"""
from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from shared.images import check_image, preprocess, to_model_input
from shared.predictor import META_FILE, Predictor, softmax
from training.data import REPO_ROOT, load_dataset

DEFAULT_MODEL = REPO_ROOT / "models" / "cifar10-airbench"


def metrics(probs: np.ndarray, labels: np.ndarray, classes: list[str], bins: int = 15) -> dict:
    pred = probs.argmax(1)
    top3 = np.argsort(-probs, axis=1)[:, :3]
    conf = probs.max(1)
    correct = pred == labels
    # Expected calibration error: |accuracy - confidence| per confidence bin, weighted by bin size.
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    ece = sum(abs(correct[which == b].mean() - conf[which == b].mean()) * np.mean(which == b)
              for b in range(bins) if np.any(which == b))
    confusion = np.zeros((len(classes), len(classes)), dtype=int)
    np.add.at(confusion, (labels, pred), 1)
    return dict(
        n=int(len(labels)),
        accuracy=float(correct.mean()),
        top3_accuracy=float(np.mean((top3 == labels[:, None]).any(1))),
        ece=float(ece),
        nll=float(-np.mean(np.log(probs[np.arange(len(labels)), labels] + 1e-12))),
        per_class={c: float(confusion[i, i] / max(1, confusion[i].sum())) for i, c in enumerate(classes)},
        confusion=confusion.tolist(),
    )


def report(m: dict, title: str) -> None:
    print(f"{title}: {m['n']} images")
    for c, acc in m["per_class"].items():
        print(f"  {c:<12} {acc:.4f}")
    print(f"top3_accuracy={m['top3_accuracy']:.4f}  ece={m['ece']:.4f}  nll={m['nll']:.4f}")


def squash_nearest(data: bytes) -> np.ndarray:
    """What the synchronous demo this service replaces did: squash to 32x32, nearest neighbour."""
    img = Image.open(io.BytesIO(data)).convert("RGB").resize((32, 32), Image.Resampling.NEAREST)
    return np.asarray(img, dtype=np.uint8)


def crop_bicubic(data: bytes) -> np.ndarray:
    """Our path with a bicubic filter in place of area averaging (the filter we used first)."""
    return to_model_input(check_image(data).image, Image.Resampling.BICUBIC)


STUDY_VARIANTS = (("upscaled_48", 48, False), ("upscaled_97", 97, False),
                  ("upscaled_277", 277, False), ("wide_4x3", 277, True))
STUDY_PATHS = (("ours", preprocess), ("bicubic", crop_bicubic), ("nearest_squash", squash_nearest))


def preprocessing_study(predictor: Predictor, x: np.ndarray, y: np.ndarray) -> dict:
    """Accuracy of input paths on photo-like versions of the test images: upscaled (bicubic)
    to `size` px square, or also widened to 4:3 with mirrored margins (a landscape photo);
    saved as JPEG quality 90, as a camera would. Sizes that are not whole multiples of 32, so
    that nearest neighbour cannot land exactly on the original pixels."""
    def encode(a, size, wide):
        img = Image.fromarray(a).resize((size, size), Image.Resampling.BICUBIC)
        if wide:
            margin = size // 6
            img = Image.fromarray(np.pad(np.asarray(img), ((0, 0), (margin, margin), (0, 0)), mode="symmetric"))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        return buf.getvalue()

    results = {}
    for variant, size, wide in STUDY_VARIANTS:
        files = [encode(a, size, wide) for a in x]
        for path, fn in STUDY_PATHS:
            inputs = np.stack([fn(f) for f in files])
            results[f"{variant}/{path}"] = float(np.mean(predictor.predict_proba(inputs).argmax(1) == y))
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--data")
    p.add_argument("--study", action="store_true", help="also run the preprocessing study")
    p.add_argument("--precision", default="float32", choices=["float32", "bfloat16", "auto"],
                   help="compute precision (the worker's PREDICT_PRECISION)")
    args = p.parse_args(argv)
    ds = load_dataset(args.data)
    predictor = Predictor(args.model, precision=args.precision)
    if list(ds.classes) != predictor.info.classes:
        raise SystemExit(f"the data's classes {ds.classes} differ from the model's {predictor.info.classes}")
    print(f"model {predictor.info.name} {predictor.info.version}, TTA level {predictor.tta_level}, "
          f"temperature {predictor.info.temperature:.3f}, {predictor.precision}; data {ds.source}")
    plain = Predictor(args.model, tta_level=0, precision=args.precision)
    print(f"accuracy without TTA: {np.mean(plain.logits(ds.test_x).argmax(1) == ds.test_y):.4f}")
    if args.study:
        study = preprocessing_study(plain, ds.test_x, ds.test_y)  # without TTA: the input path alone
        for k, v in study.items():
            print(f"preprocessing {k}: {v:.4f}")
        meta_path = Path(args.model) / META_FILE
        meta = json.loads(meta_path.read_text())
        meta["preprocessing_study"] = study
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
        from training.export import write_model_card
        write_model_card(Path(args.model), meta)
    m = metrics(softmax(predictor.logits(ds.test_x) / predictor.info.temperature), ds.test_y,
                predictor.info.classes)
    report(m, "test")
    print(f"accuracy={m['accuracy']:.4f}")


if __name__ == "__main__":
    main()
