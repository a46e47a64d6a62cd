"""Multi-seed summary of the continual retrieval protocol (``results['retrieval']``): per method,
index policy, database and direction, the 95% interval over seeds of the final mAP and of its
forgetting, and paired differences between policies seed by seed (``keep − reindex``: Wang et
al.'s claim that not reindexing forgets less; ``versioned − keep``).

Pure, like ``report.sweep``, whose intervals it uses; ``summarize`` there adds it to summary.json.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mslora_jax.report.retrieval_results import PRIMARY

# (policy, against): each difference is policy − against, seed by seed.
COMPARISONS = (("keep", "reindex"), ("versioned", "keep"))
STATISTICS = ("avg", "forgetting")


def _cells(run: dict[str, Any], method: str) -> dict[tuple[str, str], dict[str, float]]:
    """``{(policy, "gallery/direction"): {statistic: value}}`` of one seed's method."""
    entry = run["retrieval"]["methods"].get(method, {}).get("policies", {})
    out = {}
    for policy, galleries in entry.items():
        for gallery, directions in galleries.items():
            for direction, by_metric in directions.items():
                m = by_metric[PRIMARY]
                out[(policy, f"{gallery}/{direction}")] = {s: m[s] for s in STATISTICS}
    return out


def summarize_retrieval(runs: Sequence[dict[str, Any]], interval) -> dict[str, Any] | None:
    """The retrieval part of summary.json, or None unless every seed ran the protocol.
    ``interval``: ``report.sweep.interval`` (passed in: that module imports this one)."""
    if not runs or not all("retrieval" in r for r in runs):
        return None
    names = list(dict.fromkeys(m for r in runs for m in r["retrieval"]["methods"]))
    methods: dict[str, Any] = {}
    paired: dict[str, Any] = {}
    for method in names:
        per_seed = [_cells(r, method) for r in runs]
        keys = list(dict.fromkeys(k for cells in per_seed for k in cells))
        for policy, where in keys:
            values = [c[(policy, where)] for c in per_seed if (policy, where) in c]
            methods.setdefault(method, {}).setdefault(policy, {})[where] = {
                s: {**interval([v[s] for v in values]).to_json(), "values": [v[s] for v in values]}
                for s in STATISTICS
            }
        for policy, against in COMPARISONS:
            for where in dict.fromkeys(w for _, w in keys):
                both = [c for c in per_seed if (policy, where) in c and (against, where) in c]
                if not both:
                    continue
                label = f"{policy} - {against}"
                paired.setdefault(method, {}).setdefault(label, {})[where] = {
                    s: {
                        **(
                            iv := interval(
                                [c[(policy, where)][s] - c[(against, where)][s] for c in both]
                            )
                        ).to_json(),  # fmt: skip
                        "excludes_zero": iv.excludes_zero,
                    }
                    for s in STATISTICS
                }
    return {"metric": PRIMARY, "methods": methods, "paired": paired}
