"""Cost model and derived throughput numbers (no jax import: the report tool uses it too)."""
from __future__ import annotations

from typing import Any, Dict, Optional

HIDDEN_LAYERS = 2
NUM_FEATURES = 28  # normalised per-tensor features for the default decays (spec)

# Minimum memory traffic of one step, bytes per parameter, float32:
#   small_fc_lopt: read p, g, m[3], rms[1]; write p, m[3], rms[1] -> 11 floats (spec).
#   adam: read p, g, mu, nu; write p, mu, nu -> 7 floats.
#   adafactor (factored matrices): read p, g; write p -> 3 floats (its factored statistics
#   are O(rows + cols); a real implementation reads g twice, the minimum counts it once).
MIN_BYTES_PER_PARAM = {"fused": 44.0, "fused_bf16": 44.0, "reference": 44.0, "pretrained": 44.0, "adam": 28.0, "adafactor": 12.0}


def useful_flops_per_param(hidden_size: int, hidden_layers: int = HIDDEN_LAYERS,
                           num_features: int = NUM_FEATURES) -> float:
    """MLP FLOPs per parameter per step after folding the step features into b0 (spec):
    2 * (F*H + (L-1)*H*H + 2*H) with F = 28 normalised features (3968 for H=32, 272 for H=4)."""
    h = hidden_size
    return 2.0 * (num_features * h + (hidden_layers - 1) * h * h + 2 * h)


def derived(info: Dict[str, Any], median_s: float, ceilings: Optional[Dict[str, Any]] = None):
    """Throughput from a median step time: params/s, GFLOP/s, GB/s and fractions of the ceilings.

    info needs num_params, min_bytes_per_param and (for the learned optimizer)
    useful_flops_per_param; ceilings: sgemm_gflops and bandwidth_gbs (bench/ceilings.py).
    """
    n = info["num_params"]
    out = {"median_s": median_s, "ns_per_param": 1e9 * median_s / n, "params_per_s": n / median_s}
    out["gb_per_s"] = info["min_bytes_per_param"] * n / median_s / 1e9
    if info.get("useful_flops_per_param"):
        out["gflop_per_s"] = info["useful_flops_per_param"] * n / median_s / 1e9
    if ceilings:
        if out.get("gflop_per_s") and ceilings.get("sgemm_gflops"):
            out["frac_sgemm"] = out["gflop_per_s"] / ceilings["sgemm_gflops"]
        if ceilings.get("bandwidth_gbs"):
            out["frac_bandwidth"] = out["gb_per_s"] / ceilings["bandwidth_gbs"]
    return out
