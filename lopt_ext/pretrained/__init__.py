"""Pretrained learned optimizers shipped with the package (loaded offline).

    from lopt_ext import pretrained
    lopt, theta = pretrained.load()       # the best shipped one (DEFAULT)
    tx = lopt.transform(theta)            # optax GradientTransformation (fused kernel)

Each entry is NAME.safetensors (theta, lopt_ext.checkpoint format, config in its metadata) plus
NAME.json (provenance: command, config, outer steps, budget, meta-loss, evaluation summary).

Published optimizers of other projects load by name too, from their own files (not shipped):
    lopt, theta = pretrained.load("celo", path="theta.state")   # Celo (MIT), see load()
"""
from __future__ import annotations

import json
import os
from importlib import resources
from typing import Any, Dict, List

AVAILABLE = ("scaled_small_fc_lopt_h4_es", "scaled_small_fc_lopt_h4_horizon", "scaled_small_fc_lopt_h4_loss",
             "scaled_small_fc_lopt_h4", "small_fc_lopt_h4")
# What load() returns without a name: the default's rule and API (no num_steps needed);
# scaled_small_fc_lopt_h4 is the rule it was searched from and small_fc_lopt_h4 the first
# release, both kept for comparison. scaled_small_fc_lopt_h4_horizon (the default plus a learned
# schedule over num_steps, which its transform requires) is ahead of the default in most views
# at 3000 steps (docs/evaluation/horizon/) but not yet the default: it diverges on more task-seeds
# and a drop-in `transform(theta)` without num_steps would stop working.
# scaled_small_fc_lopt_h4_loss (the horizon entry plus inputs from the minibatch loss, which every
# update then takes as value=) is ahead in the training-loss views and at least Celo's equal in
# every view (docs/evaluation/loss/), behind the horizon entry on held-out loss and divergences.
DEFAULT = "scaled_small_fc_lopt_h4_es"


# Celo (Moudgil et al., MIT license): its published theta.state, from its HuggingFace repository.
CELO_REPO, CELO_FILE = "amoudgl/celo", "theta.state"
EXTERNAL = ("celo",)


def cache_dir() -> str:
    """Where downloaded weights are kept: $LOPT_EXT_CACHE, else $XDG_CACHE_HOME/lopt_ext
    (~/.cache/lopt_ext)."""
    if os.environ.get("LOPT_EXT_CACHE"):
        return os.environ["LOPT_EXT_CACHE"]
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                        "lopt_ext")


def celo_path(path: str | None = None) -> str:
    """The Celo theta.state to read: ``path`` when given, else the cached copy, else one downloaded
    with huggingface_hub (when installed and online) into the cache. Raises FileNotFoundError
    saying how to get the file otherwise."""
    if path is not None:
        return os.fspath(path)
    cached = os.path.join(cache_dir(), "celo", CELO_FILE)
    if os.path.exists(cached):
        return cached
    how = (f"Celo's weights are not shipped with lopt_ext. Get them (MIT license) with "
           f"`huggingface-cli download {CELO_REPO} {CELO_FILE} --local-dir DIR` and call "
           f"pretrained.load('celo', path='DIR/{CELO_FILE}'), or put the file at {cached}")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise FileNotFoundError(f"{how} (or pip install huggingface_hub to download it here).") from None
    try:
        return hf_hub_download(CELO_REPO, CELO_FILE, local_dir=os.path.dirname(cached))
    except Exception as e:  # offline, no such repo, ...
        raise FileNotFoundError(f"{how}. Downloading it failed: {type(e).__name__}: {e}") from None


def default_name() -> str:
    return DEFAULT


def list_pretrained() -> List[str]:
    return list(AVAILABLE)


def _file(name: str, suffix: str):
    if name not in AVAILABLE:
        hint = (" lopt_ext ships hidden_size=4 weights meta-trained on its offline task family as "
                "'small_fc_lopt_h4'; PyLO's hidden_size=32 small_fc_lopt weights can be imported with "
                "lopt_ext.checkpoint.import_pylo(path).") if name.startswith("small_fc_lopt") else ""
        raise KeyError(f"no pretrained optimizer named {name!r}; available: {list(AVAILABLE)} "
                       f"(and {list(EXTERNAL)} from its own file).{hint}")
    return resources.files(__name__).joinpath(name + suffix)


def info(name: str = DEFAULT) -> Dict[str, Any]:
    """The provenance JSON of a pretrained entry."""
    return json.loads(_file(name, ".json").read_text())


def load(name: str = DEFAULT, path: str | None = None):
    """(learned optimizer config, theta) of a shipped pretrained optimizer; no network access.
    Without a name: the best shipped one (``DEFAULT``).

    ``load("celo", path=PATH)``: Celo's published optimizer from its theta.state file; without
    a path, the cached copy or a download (see celo_path)."""
    if name == "celo":
        from lopt_ext.celo import load_theta_state
        return load_theta_state(celo_path(path))
    if path is not None:
        raise ValueError(f"path is for the optimizers of other projects ({list(EXTERNAL)}); {name!r} is shipped")
    from lopt_ext import checkpoint
    with resources.as_file(_file(name, ".safetensors")) as path:
        return checkpoint.load_theta(str(path))


def resolve(theta_path: str | None = None, name: str | None = None):
    """(lopt, theta, source) from a theta file when given (a Celo theta.state, or lopt_ext's
    .safetensors), else from a shipped entry or "celo" (default: DEFAULT); source is the path
    or "pretrained:NAME", as evaluations record it."""
    from lopt_ext import checkpoint
    if name == "celo" or (theta_path and theta_path.endswith(".state")):  # Celo's theta.state
        return (*load("celo", path=theta_path), theta_path or "pretrained:celo")
    if theta_path:
        return (*checkpoint.load_theta(theta_path), theta_path)
    name = name or DEFAULT
    return (*load(name), f"pretrained:{name}")
