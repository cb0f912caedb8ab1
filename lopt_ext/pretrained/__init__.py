"""Pretrained learned optimizers shipped with the package (loaded offline).

    from lopt_ext import pretrained
    lopt, theta = pretrained.load()       # the best shipped one (DEFAULT)
    tx = lopt.transform(theta)            # optax GradientTransformation (fused kernel)

Each entry is NAME.safetensors (theta, lopt_ext.checkpoint format, config in its metadata) plus
NAME.json (provenance: command, config, outer steps, budget, meta-loss, evaluation summary).
"""
from __future__ import annotations

import json
from importlib import resources
from typing import Any, Dict, List

AVAILABLE = ("scaled_small_fc_lopt_h4_es", "scaled_small_fc_lopt_h4", "small_fc_lopt_h4")
# What load() returns without a name: the entry with the best held-out evaluation
# (docs/evaluation/; scaled_small_fc_lopt_h4 is the rule it was searched from and
# small_fc_lopt_h4 the first release, both kept for comparison).
DEFAULT = "scaled_small_fc_lopt_h4_es"


def default_name() -> str:
    return DEFAULT


def list_pretrained() -> List[str]:
    return list(AVAILABLE)


def _file(name: str, suffix: str):
    if name not in AVAILABLE:
        hint = (" lopt_ext ships hidden_size=4 weights meta-trained on its offline task family as "
                "'small_fc_lopt_h4'; PyLO's hidden_size=32 small_fc_lopt weights can be imported with "
                "lopt_ext.checkpoint.import_pylo(path).") if name.startswith("small_fc_lopt") else ""
        raise KeyError(f"no pretrained optimizer named {name!r}; available: {list(AVAILABLE)}.{hint}")
    return resources.files(__name__).joinpath(name + suffix)


def info(name: str = DEFAULT) -> Dict[str, Any]:
    """The provenance JSON of a pretrained entry."""
    return json.loads(_file(name, ".json").read_text())


def load(name: str = DEFAULT):
    """(learned optimizer config, theta) of a shipped pretrained optimizer; no network access.
    Without a name: the best shipped one (``DEFAULT``)."""
    from lopt_ext import checkpoint
    with resources.as_file(_file(name, ".safetensors")) as path:
        return checkpoint.load_theta(str(path))


def resolve(theta_path: str | None = None, name: str | None = None):
    """(lopt, theta, source) from a theta file when given, else from a shipped entry (default:
    DEFAULT); source is the path or "pretrained:NAME", as evaluations record it."""
    from lopt_ext import checkpoint
    if theta_path:
        return (*checkpoint.load_theta(theta_path), theta_path)
    name = name or DEFAULT
    return (*load(name), f"pretrained:{name}")
