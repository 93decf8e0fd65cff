"""The predictor's small helpers: precision choice, the machine's name, top-k."""

import numpy as np
import pytest

from shared import machine
from shared.machine import cpu_name
from shared.modeldir import resolve_precision, top_k
from shared.predictor import load_predictor
from tests.helpers import SHIPPED_MODEL
from training.photos import load_photos


def test_an_explicit_precision_is_kept_and_a_wrong_one_refused():
    assert resolve_precision("float32") == "float32"
    assert resolve_precision("bfloat16") == "bfloat16"
    with pytest.raises(ValueError, match="auto, float32, bfloat16 or int8"):
        resolve_precision("fp16")


def test_int8_is_refused_on_the_keras_runtime(tiny_model_dir):
    with pytest.raises(ValueError, match="openvino runtime only"):
        load_predictor(tiny_model_dir, precision="int8", runtime="keras")


ZEN5 = {"model name": "AMD EPYC", "cpu family": "26", "model": "2", "flags": "fpu avx512f avx512_bf16"}


@pytest.mark.parametrize(
    "flags, expected",
    [
        ("fpu avx512f avx512_bf16 avx512_vnni", "bfloat16"),
        ("fpu avx amx_bf16 amx_tile", "bfloat16"),
        ("fpu avx2 avx512f", "float32"),
        (None, "float32"),  # no /proc/cpuinfo
    ],
)
def test_auto_precision_is_bfloat16_only_where_the_cpu_computes_it(monkeypatch, flags, expected):
    info = {} if flags is None else dict(ZEN5, flags=flags)
    monkeypatch.setattr(machine, "_first_cpu", lambda: info)
    assert resolve_precision("auto") == expected


def test_the_cpu_name_carries_family_and_model(monkeypatch):
    # "AMD EPYC" alone names two generations whose speeds differ by almost 2x.
    monkeypatch.setattr(machine, "_first_cpu", lambda: ZEN5)
    assert cpu_name() == "AMD EPYC (family 26, model 2)"
    monkeypatch.setattr(machine, "_first_cpu", lambda: {})
    assert cpu_name() == "unknown"


def test_this_machines_cpu_is_read():
    assert cpu_name() != "unknown" and "family" in cpu_name()


def test_top_k_orders_by_probability_and_names_the_classes():
    probs = np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    assert top_k(probs, ["a", "b", "c"], k=2) == [
        [{"label": "b", "probability": 0.6}, {"label": "c", "probability": 0.3}],
        [{"label": "a", "probability": 0.5}, {"label": "c", "probability": 0.3}],
    ]


@pytest.fixture(scope="module")
def photos():
    return load_photos("all").x  # real photos, through the service's own input path


def test_tta_levels_average_exactly_the_views_they_name(photos):
    x = photos[:24]
    plain = load_predictor(SHIPPED_MODEL, tta_level=0).logits
    flip = lambda a: a[:, :, ::-1]
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    up_left, down_right = padded[:, :32, :32], padded[:, 2:, 2:]  # the image shifted by one pixel
    mirror = (plain(x) + plain(flip(x))) / 2
    assert np.allclose(load_predictor(SHIPPED_MODEL, tta_level=1).logits(x), mirror, atol=1e-3)
    shifts = sum(plain(v) for v in (up_left, flip(up_left), down_right, flip(down_right))) / 8
    assert np.allclose(load_predictor(SHIPPED_MODEL, tta_level=2).logits(x), mirror / 2 + shifts, atol=1e-3)


def test_bfloat16_gives_the_same_answers_as_float32(photos):
    """Served (a cascade), the answers agree. Probabilities are compared at one TTA level: a
    cascade's second level is a step at its threshold, so an image just at it may get more
    views in one precision than in the other (0.105 apart on one photo, the first time)."""
    f32, bf16 = (load_predictor(SHIPPED_MODEL, precision=p) for p in ("float32", "bfloat16"))
    assert np.mean(f32.predict_proba(photos).argmax(1) == bf16.predict_proba(photos).argmax(1)) >= 0.98
    f32, bf16 = (load_predictor(SHIPPED_MODEL, precision=p, tta_level=0) for p in ("float32", "bfloat16"))
    assert np.abs(f32.predict_proba(photos) - bf16.predict_proba(photos)).max() < 0.1


class CountingNet:
    """A stand-in net: logits from the mean pixel value of each image (so a view changes them
    a little), counting its calls and the images in each."""

    def __init__(self):
        self.calls = []

    def __call__(self, images):
        self.calls.append(len(images))
        m = images.reshape(len(images), -1).astype(np.float32).mean(1) / 255
        return np.stack([10 * m, 10 * (1 - m), np.zeros_like(m)], axis=1)


def test_a_cascade_computes_more_views_only_for_the_unsure_images_in_one_more_call():
    from shared.modeldir import ModelInfo
    from shared.predictor import Cascade, Predictor

    info = ModelInfo("m", "1", ["a", "b", "c"], 1.0, 2)
    # Mean 128 is a tie between a and b: unsure. Mean 0 or 255 is sure.
    x = np.stack([np.full((32, 32, 3), v, np.uint8) for v in (0, 128, 255, 127, 3)])
    net = CountingNet()
    p = Predictor(info, net, "keras", "float32", 2, Cascade(first=0, then=2, below=0.9))
    logits = p.logits(x)
    assert net.calls == [5, 2 * 6]  # every image once, then the 2 unsure ones x 6 views, together
    assert p.views_computed == 5 + 12
    alone = lambda level, imgs: Predictor(info, CountingNet(), "keras", "float32", level).logits(imgs)
    assert np.allclose(logits[[0, 2, 4]], alone(0, x[[0, 2, 4]]))  # sure: the first level's answer
    assert np.allclose(logits[[1, 3]], alone(2, x[[1, 3]]))  # unsure: all six views
    net.calls.clear()
    p.logits(x[[0, 2]])
    assert net.calls == [2]  # nobody unsure: no second call


def test_openvino_gives_the_keras_answers_on_real_photos(photos):
    """The IR shipped beside model.keras is the same net: float32 within rounding, the same top-1
    on every photo. int8 (NNCF's quantization, served only when asked for) is close: 94.9 % of
    the photos' top-1 agree (benchmarks.runtimes reports its CIFAR test figures)."""
    keras_probs = load_predictor(SHIPPED_MODEL, runtime="keras", precision="float32").predict_proba(photos)
    openvino = load_predictor(SHIPPED_MODEL, runtime="openvino", precision="float32")
    assert openvino.cascade == load_predictor(SHIPPED_MODEL).cascade  # the same served configuration
    ov_probs = openvino.predict_proba(photos)
    assert np.abs(ov_probs - keras_probs).max() < 1e-3
    assert np.array_equal(ov_probs.argmax(1), keras_probs.argmax(1))
    int8 = load_predictor(SHIPPED_MODEL, runtime="openvino", precision="int8").predict_proba(photos)
    assert np.mean(int8.argmax(1) == keras_probs.argmax(1)) >= 0.93


def test_openvino_model_processes_are_not_pinned_to_cores():
    """OpenVINO pins a process's inference threads to the first cores it sees, so the two
    single-threaded model processes of a worker on 2 cores ran on one: the 1,000-image batch
    used 1.1 of 2 cores, and two such processes side by side did 317 + 318 img/s pinned
    against 645 + 640 unpinned."""
    net = load_predictor(SHIPPED_MODEL, runtime="openvino", threads=1).net
    assert net.compiled.get_property("ENABLE_CPU_PINNING") is False


def test_auto_serves_with_the_runtime_model_json_names(tmp_path):
    import json
    import shutil

    assert (
        load_predictor(SHIPPED_MODEL, runtime="auto").runtime
        == json.loads((SHIPPED_MODEL / "model.json").read_text())["serving"]["runtime"]
    )
    # Without its IR files, a model that serves with OpenVINO falls back to Keras.
    copy = tmp_path / "m"
    shutil.copytree(SHIPPED_MODEL, copy)
    meta = json.loads((copy / "model.json").read_text())
    meta["serving"]["runtime"] = "openvino"
    (copy / "model.json").write_text(json.dumps(meta))
    assert load_predictor(copy, runtime="auto").runtime == "openvino"
    (copy / "model.xml").unlink()
    assert load_predictor(copy, runtime="auto").runtime == "keras"
