"""The retrieval commands: index a source with a finished run's encoder, query and evaluate an
index, and export one for FAISS (``mslora_jax.run.retrieval_index``, ``interop.faiss_index``).

Like ``commands``, each is a thin call into the library, which is imported inside the function.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

from absl import flags

from mslora_jax.cli.command import Command, define_workdir


def _split_flag(fv: flags.FlagValues, default: str) -> None:
    flags.DEFINE_string(
        "split",
        default,
        "Which split of a run task or .npz: train or test (an .npz also: val).",
        flag_values=fv,
    )


def _rows_flag(fv: flags.FlagValues, what: str) -> None:
    flags.DEFINE_enum(
        "rows", "image", ["image", "text"], f"{what}: the images, or their captions.", fv
    )


def _index_flags(fv: flags.FlagValues) -> None:
    define_workdir(fv, "The folder of a finished run (mslora-jax run --workdir).")
    flags.DEFINE_string("method", None, "Whose encoder: one of the run's methods.", flag_values=fv)
    flags.DEFINE_integer(
        "stage", None, "The encoder after this stage (0-based; default: the last).", flag_values=fv
    )
    flags.DEFINE_string(
        "data",
        None,
        "What to index: a task of the run (name or id), an .npz in MedMNIST layout, or a folder "
        "of images (with captions.jsonl or captions.csv for --rows text).",
        flag_values=fv,
    )
    flags.DEFINE_string("out", None, "The index folder to write (new or empty).", flag_values=fv)
    _split_flag(fv, "train")
    _rows_flag(fv, "What the rows embed")
    flags.DEFINE_enum(
        "dtype", "float32", ["float32", "bfloat16"], "Stored embeddings (bfloat16: half).", fv
    )


def _index(args: SimpleNamespace) -> None:
    from mslora_jax.run.retrieval_index import build_index

    index = build_index(
        args.workdir, args.method, args.data, args.out,
        stage=args.stage, split=args.split, rows=args.rows, dtype=args.dtype,
    )  # fmt: skip
    version = index.encoder_versions[0]
    print(
        f"indexed {len(index)} {index.rows} rows of {args.data} with {version.method} after "
        f"stage {version.stage} (adapter slots {list(version.slots)}) into {args.out}"
    )


INDEX = Command(
    name="index",
    summary="Embed a task, .npz or image folder with a finished run's encoder into an index.",
    usage="--workdir DIR --method METHOD [--stage K] --data SOURCE --out INDEX [--split S] "
    "[--rows image|text] [--dtype float32|bfloat16]",
    run=_index,
    define_flags=_index_flags,
    required=("workdir", "method", "data", "out"),
)


def _query_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("index", None, "An index folder (mslora-jax index --out).", flag_values=fv)
    flags.DEFINE_string("text", None, "A text query.", flag_values=fv)
    flags.DEFINE_string("image", None, "An image file query (PNG or JPEG).", flag_values=fv)
    flags.DEFINE_integer("k", 10, "How many results.", flag_values=fv)
    flags.DEFINE_bool("json", False, 'Print {"results": [{"id", "task", "score"}]}.', fv)


def _query(args: SimpleNamespace) -> None:
    from mslora_jax.run.retrieval_index import query_index

    results = query_index(args.index, text=args.text, image=args.image, k=args.k)
    if args.json:
        print(json.dumps({"results": results}, indent=1))
        return
    for rank, r in enumerate(results, 1):
        print(f"{rank:3d}  {r['score']:.4f}  {r['task']}  {r['id']}")


QUERY = Command(
    name="query",
    summary="Print the top-k items of an index for a text or an image.",
    usage='--index INDEX (--text "..." | --image FILE) [--k 10] [--json]',
    run=_query,
    define_flags=_query_flags,
    required=("index",),
)


def _evaluate_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("index", None, "An index folder (mslora-jax index --out).", flag_values=fv)
    flags.DEFINE_string(
        "queries",
        None,
        "The queries: a task of the index's run (name or id), an .npz or an image folder.",
        flag_values=fv,
    )
    _split_flag(fv, "test")
    _rows_flag(fv, "What the queries are")
    flags.DEFINE_bool("json", False, "Print the metrics as JSON (null: undefined).", fv)


def _evaluate_retrieval(args: SimpleNamespace) -> None:
    from mslora_jax.run.retrieval_index import evaluate_index

    found = evaluate_index(args.index, args.queries, split=args.split, rows=args.rows)
    clean = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in found.items()}
    if args.json:
        print(json.dumps(clean, indent=1))
        return
    for key, value in clean.items():
        shown = "–" if value is None else (f"{value:.4f}" if isinstance(value, float) else value)
        print(f"{key:26s} {shown}")


EVALUATE_RETRIEVAL = Command(
    name="evaluate-retrieval",
    summary="Score an index with queries: Recall@K, MRR, mAP, mAP@R, Precision@10.",
    usage="--index INDEX --queries SOURCE [--split S] [--rows image|text] [--json]",
    run=_evaluate_retrieval,
    define_flags=_evaluate_flags,
    required=("index", "queries"),
)


def _export_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("index", None, "An index folder (mslora-jax index --out).", flag_values=fv)
    flags.DEFINE_string(
        "out", None, "The folder to write: index.faiss and rows.jsonl.", flag_values=fv
    )


def _export_faiss(args: SimpleNamespace) -> None:
    from mslora_jax.interop.faiss_index import export_faiss

    out = export_faiss(args.index, args.out)
    print(f"wrote {out}/index.faiss (IndexFlatIP) and {out}/rows.jsonl")


EXPORT_FAISS = Command(
    name="export-faiss",
    summary="Write an index as a FAISS IndexFlatIP file, with its rows' ids in a sidecar.",
    usage="--index INDEX --out DIR",
    run=_export_faiss,
    define_flags=_export_flags,
    required=("index", "out"),
)

RETRIEVAL_COMMANDS = (INDEX, QUERY, EVALUATE_RETRIEVAL, EXPORT_FAISS)
