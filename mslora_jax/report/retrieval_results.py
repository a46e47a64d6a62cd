"""The ``retrieval`` part of ``results.json`` (the continual retrieval protocol,
``mslora_jax.continual_retrieval``) and the reports built from it: a Markdown section and heatmaps.

Schema (every metric a fraction in [0, 1]; matrices as the accuracy matrices: row k after stage
k, column j task j, ``null`` for a task not seen yet)::

    {"settings": {...},                                   # free-form: what was indexed and asked
     "router_acc": [float, ...],                          # optional: image queries routed home
     "methods": {"<method>": {
         "policies": {"<policy>": {"<gallery>": {"<direction>": {"<metric>": {
             "matrix": [[float | null, ...], ...], "avg": float, "bwt": float,
             "forgetting": float}}}}},
         "cost": {"<policy>": {"items_encoded": int, "query_encodings": int, ...}}}}}
"""

from __future__ import annotations

from typing import Any

from mslora_jax.errors import DataError
from mslora_jax.eval import metrics

PRIMARY = "map"  # the metric of the tables and heatmaps (label-level relevance)
_DERIVED = {
    "avg": metrics.average_accuracy,
    "bwt": metrics.backward_transfer,
    "forgetting": metrics.forgetting,
}


def _object(value: Any, where: str) -> dict:
    if not isinstance(value, dict) or not value:
        raise DataError(f"{where}: expected a non-empty object")
    return value


def validate_retrieval(obj: Any, num_tasks: int) -> None:
    """Raises ``DataError`` naming the first key of ``results['retrieval']`` that breaks the
    schema, or a derived number the matrix does not give."""
    where = "results['retrieval']"
    _object(obj, where)
    unknown = set(obj) - {"settings", "methods", "router_acc"}
    if unknown or "methods" not in obj:
        raise DataError(f"{where}: expected keys settings, methods (router_acc), got {sorted(obj)}")
    for method, entry in _object(obj["methods"], f"{where}['methods']").items():
        at = f"{where}['methods'][{method!r}]"
        if set(_object(entry, at)) != {"policies", "cost"}:
            raise DataError(f"{at}: expected keys ['cost', 'policies'], got {sorted(entry)}")
        for policy, galleries in _object(entry["policies"], f"{at}['policies']").items():
            for gallery, directions in _object(galleries, f"{at}[{policy!r}]").items():
                for direction, by_metric in _object(directions, f"{at}[{gallery!r}]").items():
                    for name, m in _object(by_metric, f"{at}[{direction!r}]").items():
                        _check_matrix(m, f"{at}[{policy!r}][{gallery!r}][{direction!r}]"
                                      f"[{name!r}]", num_tasks)  # fmt: skip


def _check_matrix(entry: Any, where: str, num_tasks: int) -> None:
    if not isinstance(entry, dict) or set(entry) != {"matrix", *_DERIVED}:
        raise DataError(f"{where}: expected keys matrix, avg, bwt, forgetting")
    try:
        matrix = metrics.check_acc_matrix(entry["matrix"])
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}['matrix']: {e}") from e
    if len(matrix[0]) != num_tasks:
        raise DataError(f"{where}['matrix']: {len(matrix[0])} columns, expected {num_tasks}")
    for key, derive in _DERIVED.items():
        value = derive(matrix)
        got = entry[key]
        if not isinstance(got, (int, float)) or abs(got - value) > 1e-6:
            raise DataError(f"{where}[{key!r}]: is {got!r}, but the matrix gives {value:.6f}")


def format_retrieval(results: dict) -> str:
    """The Markdown section: per gallery and direction, each method's final mAP and its
    forgetting under every index policy."""
    from mslora_jax.report.results import format_percent  # results imports this module

    retrieval = results.get("retrieval")
    if not retrieval:
        return ""
    methods = retrieval["methods"]
    sections = [
        "## Retrieval\n\nmAP (%) after the last stage, forgetting (pp) in brackets; rows method, "
        "columns index policy (docs/retrieval.md)."
    ]
    combos: dict[tuple[str, str], list[str]] = {}
    for entry in methods.values():
        for policy, galleries in entry["policies"].items():
            for gallery, directions in galleries.items():
                for direction in directions:
                    policies = combos.setdefault((gallery, direction), [])
                    if policy not in policies:
                        policies.append(policy)
    for (gallery, direction), policies in combos.items():
        lines = [
            f"**{direction.replace('_', ' ')}, {gallery} database**",
            "",
            "| method | " + " | ".join(policies) + " |",
            "|---|" + "---:|" * len(policies),
        ]
        for method, entry in methods.items():
            cells = []
            for policy in policies:
                m = entry["policies"].get(policy, {}).get(gallery, {}).get(direction)
                m = None if m is None else m[PRIMARY]
                cells.append(
                    "–"
                    if m is None
                    else f"{format_percent(m['avg'])} ({format_percent(m['forgetting'])})"
                )
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def retrieval_heatmap_results(results: dict, gallery: str, direction: str) -> dict:
    """``results`` reshaped for ``report.results.plot_acc_matrices``: one panel per method and
    policy, the ``PRIMARY`` metric's matrix for ``gallery`` and ``direction``."""
    panels = {}
    for method, entry in results["retrieval"]["methods"].items():
        for policy, galleries in entry["policies"].items():
            m = galleries.get(gallery, {}).get(direction)
            if m is not None:
                panels[f"{method} · {policy}"] = {"acc_matrix": m[PRIMARY]["matrix"]}
    return {"tasks": results["tasks"], "methods": panels}
