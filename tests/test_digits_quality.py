"""The embedded default model means something: generated digits are recognised as the class asked for.

A classifier trained here on scikit-learn's load_digits labels 100 samples (10 per class, the model's default
settings); at least 90% must match the requested class, and the samples must be diverse. Runs for every
backend this machine has.
"""

import importlib.util

import numpy as np
import pytest
import torch

import aim_rt
from aim_rt.backends import make_backend
from aim_rt.cli import default_model_path
from aim_rt.generate import parse_classes, plan_images
from aim_rt.sampling import SamplingSettings

sklearn = pytest.importorskip("sklearn")


def available_backends():
    out = ["torch"]
    if importlib.util.find_spec("onnxruntime") is not None:
        out.append("onnxruntime")
    if torch.cuda.is_available():
        out.append("cuda")
    return out


@pytest.fixture(scope="module")
def classifier():
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    d = load_digits()
    return SVC(gamma=0.001, C=10).fit(d.data, d.target)


def to_digits_features(images: torch.Tensor) -> np.ndarray:
    """(N, 3, 32, 32) in [-1, 1], dark ink on white → load_digits' 8x8 ink intensities in [0, 16]."""
    ink = (1 - images.float().cpu().mean(1, keepdim=True)) / 2
    return (torch.nn.functional.adaptive_avg_pool2d(ink, 8)[:, 0] * 16).reshape(len(images), -1).numpy()


@pytest.mark.parametrize("backend_name", available_backends())
def test_generated_digits_are_recognised_and_diverse(backend_name, classifier, tmp_path):
    device = "cuda" if backend_name == "cuda" else "cpu"
    model = aim_rt.load_model(default_model_path(), device=device)
    settings = SamplingSettings(**model.sampling_defaults)
    plan = plan_images(parse_classes("all", 10), 10, 0, 10, base_seed=0)
    backend = make_backend(backend_name, model, artifacts=tmp_path / "engines", dtype="float32")
    classes = torch.tensor([s.cls for s in plan])
    tokens = backend.sample(classes, torch.tensor([s.seed for s in plan]), settings)
    images = backend.decode(tokens)
    predicted = classifier.predict(to_digits_features(images))
    agreement = float((predicted == classes.numpy()).mean())
    print(f"{backend_name}: class agreement {agreement:.2f}")
    assert agreement >= 0.90
    assert len({tuple(t.tolist()) for t in tokens}) == 100  # no sample repeated
    for c in range(10):  # within a class, images differ visibly (mean pixel distance to each other)
        x = images[classes == c].float().cpu().reshape(10, -1)
        distances = torch.cdist(x, x)[~torch.eye(10, dtype=torch.bool)]
        assert distances.min() > 0 and distances.mean() > 2.0


def test_classifier_check_is_not_vacuous(classifier):
    """The same check fails for images of the wrong class (real digits of class c labelled c+1)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    predicted = classifier.predict(d.data[:100])
    assert (predicted == (d.target[:100] + 1) % 10).mean() < 0.1
