"""Offline data for the task family: nothing is downloaded.

* classification: scikit-learn's bundled ``load_digits`` (1797 8x8 grey images, 10 classes),
  ``load_breast_cancer`` (569 x 30, 2 classes) and ``load_wine`` (178 x 13, 3 classes), each
  split once with fixed permutations into train / valid / test (64 / 16 / 20 %).
* teacher-student regression: a fixed random tanh network labels Gaussian inputs; training
  batches are fresh samples, valid and test are fixed samples.
* text: a character corpus built from docstrings of Python's standard library (always
  present with the interpreter), restricted to printable ASCII, split 90/10.
"""
from __future__ import annotations

import functools

import numpy as np

_SPLIT_SEED = 1234


def _split(n, test_fraction, seed=_SPLIT_SEED):
    perm = np.random.RandomState(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return perm[n_test:], perm[:n_test]


CLASSIFICATION_DATASETS = ("digits", "breast_cancer", "wine")


@functools.lru_cache(maxsize=None)
def classification(name: str):
    """Bundled scikit-learn data split train / valid / test (64 / 16 / 20 %).

    Returns {"x_train", "y_train", "x_valid", "y_valid", "x_test", "y_test", "num_classes"}.
    digits: images [N, 8, 8, 1] with pixels scaled to [0, 1]; the tabular sets: features
    standardised with training statistics. The test part is held out for evaluation; the
    valid part is what meta-training may score an optimizer on.
    """
    from sklearn import datasets
    loaders = {"digits": datasets.load_digits, "breast_cancer": datasets.load_breast_cancer,
               "wine": datasets.load_wine}
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}; known: {list(loaders)}")
    d = loaders[name]()
    y = d.target.astype(np.int32)
    if name == "digits":
        x = (d.images.astype(np.float32) / 16.0)[..., None]
    else:
        x = d.data.astype(np.float32)
    rest, te = _split(len(y), 0.2)
    order = np.random.RandomState(_SPLIT_SEED + 1).permutation(len(rest))
    n_valid = int(round(len(rest) * 0.2))
    va, tr = rest[order[:n_valid]], rest[order[n_valid:]]
    if name != "digits":
        mean, std = x[tr].mean(0), x[tr].std(0) + 1e-6
        x = (x - mean) / std
    return {"x_train": x[tr], "y_train": y[tr], "x_valid": x[va], "y_valid": y[va],
            "x_test": x[te], "y_test": y[te], "num_classes": int(y.max()) + 1}


@functools.lru_cache(maxsize=None)
def teacher(dim: int, seed: int, hidden: int = 32):
    """A fixed random teacher network R^dim -> R (tanh, one hidden layer) as numpy arrays,
    and fixed valid / test samples of 1024 inputs each; training batches are fresh draws."""
    rng = np.random.RandomState(10_000 + seed)
    w1 = rng.normal(size=(dim, hidden)).astype(np.float32) * np.float32(1.5 / np.sqrt(dim))
    b1 = rng.normal(size=(hidden,)).astype(np.float32) * np.float32(0.5)
    w2 = rng.normal(size=(hidden, 1)).astype(np.float32) * np.float32(1.0 / np.sqrt(hidden))
    out = {"w1": w1, "b1": b1, "w2": w2}
    for part, offset in (("valid", 1), ("test", 2)):
        x = np.random.RandomState(20_000 + 3 * seed + offset).normal(size=(1024, dim)).astype(np.float32)
        out[f"x_{part}"] = x
        out[f"y_{part}"] = (np.tanh(x @ w1 + b1) @ w2)[:, 0]
    return out


_TEXT_MODULES = ("textwrap", "json", "collections", "functools", "itertools", "argparse",
                 "logging", "string", "pathlib", "dataclasses", "random", "statistics")


@functools.lru_cache(maxsize=None)
def text_corpus():
    """(train_ids, test_ids, vocab) as int32 arrays / str: stdlib docstrings, printable ASCII."""
    import importlib
    import inspect
    chunks = []
    for name in _TEXT_MODULES:
        mod = importlib.import_module(name)
        chunks.append(inspect.getdoc(mod) or "")
        for attr in sorted(dir(mod)):
            obj = getattr(mod, attr, None)
            if attr.startswith("_") or obj is None:
                continue
            doc = inspect.getdoc(obj) if (inspect.isfunction(obj) or inspect.isclass(obj)) else None
            if doc:
                chunks.append(doc)
    text = "\n\n".join(chunks)
    text = "".join(c if (32 <= ord(c) < 127 or c == "\n") else " " for c in text)
    vocab = "".join(sorted(set(text)))
    lut = {c: i for i, c in enumerate(vocab)}
    ids = np.asarray([lut[c] for c in text], np.int32)
    cut = int(len(ids) * 0.9)
    return ids[:cut], ids[cut:], vocab
