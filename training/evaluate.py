"""Evaluate a shipped model, through the worker's own inference path.

    python -m training.evaluate [--model DIR] [--data PATH] [--study]
    python -m training.evaluate --photos [--split test|val|all] [--model DIR]

On every CIFAR test image: per-class accuracy, top-3 accuracy, ECE (15 bins) and, as its last
line, accuracy=0.XXXX (with test-time augmentation as the model ships it). --study also
measures the preprocessing choice on upscaled and wide test images and writes those figures
into the model's card.

--photos: the real-photo benchmark (benchmarks/photos), read through the service's own
preprocessing and served configuration: class-balanced top-1, top-3 and ECE, per-class
accuracy, the share answered "uncertain" among photos of the classes and of other things, and
as its last line photo_accuracy=0.XXXX photo_top3=0.XXXX photo_ece=0.XXXX.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from shared.images import check_image, preprocess, to_model_input
from shared.modeldir import META_FILE
from shared.predictor import Predictor, load_predictor
from shared.settings import DEFAULT_MODEL_DIR
from training.card import write_model_card
from training.data import load_dataset
from training.metrics import metrics
from training.photos import PHOTOS_DIR, class_balanced_weights, load_photos


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


STUDY_VARIANTS = (
    ("upscaled_48", 48, False),
    ("upscaled_97", 97, False),
    ("upscaled_277", 277, False),
    ("wide_4x3", 277, True),
)
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


def evaluate_cifar(args, predictor: Predictor) -> None:
    ds = load_dataset(args.data)
    if list(ds.classes) != predictor.info.classes:
        raise SystemExit(f"the data's classes {ds.classes} differ from the model's {predictor.info.classes}")
    print(f"data {ds.source}")
    plain = load_predictor(args.model, tta_level=0, precision=args.precision, runtime=args.runtime)
    print(f"accuracy without TTA: {np.mean(plain.logits(ds.test_x).argmax(1) == ds.test_y):.4f}")
    if args.study:
        study = preprocessing_study(plain, ds.test_x, ds.test_y)  # without TTA: the input path alone
        for k, v in study.items():
            print(f"preprocessing {k}: {v:.4f}")
        meta_path = Path(args.model) / META_FILE
        meta = json.loads(meta_path.read_text())
        meta["preprocessing_study"] = study
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
        write_model_card(Path(args.model), meta)
    m = metrics(predictor.predict_proba(ds.test_x), ds.test_y, predictor.info.classes)
    report(m, "test")
    print(f"accuracy={m['accuracy']:.4f}")


def photo_figures(predictor: Predictor, split: str, folder: Path = PHOTOS_DIR) -> dict:
    """The photo benchmark's figures for this predictor (class-balanced where it matters)."""
    photos = load_photos(split, folder)
    classes = predictor.info.classes
    x, y = photos.in_class(classes)
    probs = predictor.predict_proba(x)
    m = metrics(probs, y, classes, weights=class_balanced_weights(y))
    threshold = predictor.info.uncertain_below
    other = predictor.predict_proba(photos.other()) if len(photos.other()) else np.zeros((0, len(classes)))
    m.update(
        split=split,
        n_other=int(len(other)),
        uncertain_below=threshold,
        uncertain_share=float(np.mean(probs.max(1) < threshold)),
        uncertain_share_other=float(np.mean(other.max(1) < threshold)) if len(other) else float("nan"),
        mean_confidence=float(probs.max(1).mean()),
        mean_confidence_other=float(other.max(1).mean()) if len(other) else float("nan"),
    )
    return m


def evaluate_photos(args, predictor: Predictor) -> None:
    m = photo_figures(predictor, args.split)
    report(m, f"photos ({args.split} split, class-balanced)")
    print(
        f"mean top probability: {m['mean_confidence']:.3f} on class photos, {m['mean_confidence_other']:.3f} "
        f"on {m['n_other']} photos of other things"
    )
    print(
        f"answered uncertain (top probability below {m['uncertain_below']:.2f}): "
        f"{m['uncertain_share']:.1%} of class photos, {m['uncertain_share_other']:.1%} of other photos"
    )
    print(f"photo_accuracy={m['accuracy']:.4f} photo_top3={m['top3_accuracy']:.4f} photo_ece={m['ece']:.4f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    p.add_argument("--data")
    p.add_argument("--study", action="store_true", help="also run the preprocessing study")
    p.add_argument("--photos", action="store_true", help="the real-photo benchmark instead of CIFAR")
    p.add_argument("--split", default="test", choices=["test", "val", "all"], help="photo benchmark split")
    p.add_argument(
        "--precision",
        default="float32",
        choices=["float32", "bfloat16", "auto"],
        help="compute precision (the worker's PREDICT_PRECISION)",
    )
    p.add_argument(
        "--runtime",
        default="keras",
        choices=["keras", "openvino", "auto"],
        help="inference runtime (the worker's PREDICT_RUNTIME; auto: as model.json serves it)",
    )
    args = p.parse_args(argv)
    predictor = load_predictor(args.model, precision=args.precision, runtime=args.runtime)
    print(
        f"model {predictor.info.name} {predictor.info.version}, TTA level {predictor.tta_level}, "
        f"temperature {predictor.info.temperature:.3f}, {predictor.precision} on {predictor.runtime}"
    )
    (evaluate_photos if args.photos else evaluate_cifar)(args, predictor)


if __name__ == "__main__":
    main()
