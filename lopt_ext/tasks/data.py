"""Offline data for the task family: nothing is downloaded.

* digits: scikit-learn's bundled ``load_digits`` (1797 8x8 grey images, 10 classes), split
  once with a fixed permutation into 1437 train / 360 test images.
* breast cancer: scikit-learn's bundled ``load_breast_cancer`` (569 x 30, 2 classes),
  standardised with train statistics; used only as an out-of-family task.
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


@functools.lru_cache(maxsize=None)
def digits():
    """(x_train [1438,8,8,1], y_train, x_test [359,8,8,1], y_test); pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[..., None]
    y = d.target.astype(np.int32)
    tr, te = _split(len(y), 0.2)
    return x[tr], y[tr], x[te], y[te]


@functools.lru_cache(maxsize=None)
def breast_cancer():
    from sklearn.datasets import load_breast_cancer
    d = load_breast_cancer()
    x = d.data.astype(np.float32)
    y = d.target.astype(np.int32)
    tr, te = _split(len(y), 0.2)
    mean, std = x[tr].mean(0), x[tr].std(0) + 1e-6
    x = (x - mean) / std
    return x[tr], y[tr], x[te], y[te]


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
