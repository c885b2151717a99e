"""``hub-msif index build``: embed a corpus into a document index folder.
"""

from __future__ import annotations

from hub_msif.apps.arguments import (
    check_target_folder,
    non_empty,
    positive_int,
)
from hub_msif.apps.commands.common import add_threads, use_threads
from hub_msif.apps.output import print_json, printable, show_progress


def add(sub) -> None:
    p = sub.add_parser("index", help="build a document index for candidate selection",
                       description="Document indexes: sentence embeddings of pre-training documents, searched with faiss.")
    isub = p.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    b = isub.add_parser("build", help="embed a corpus and write an index folder", description=(
        "Embed every document of a corpus with a sentence-transformers model (normalised) and write an index "
        "folder: index.json (manifest), documents.parquet, embeddings.safetensors."))
    b.add_argument("--data", required=True, nargs="+", type=non_empty,
                   help="datasets Hub id, or local .txt/.jsonl/.parquet files or folders")
    b.add_argument("--data-revision", type=non_empty, help="Hub revision of the dataset")
    b.add_argument("--split", default="train", type=non_empty, help="dataset split (Hub datasets; default: train)")
    b.add_argument("--text-column", type=non_empty, help="column holding the document text (default: text)")
    b.add_argument("--id-column", type=non_empty,
                   help="column holding document ids (default: id if present, else the row number)")
    b.add_argument("--embedding-model", type=non_empty,
                   help="sentence-transformers Hub id or local folder (default: all-MiniLM-L6-v2)")
    b.add_argument("--index-type", default="flat", choices=["flat", "hnsw"],
                   help="exact inner-product search (flat, default) or approximate (hnsw)")
    b.add_argument("--batch-size", type=positive_int, default=64, help="documents per embedding batch (default 64)")
    b.add_argument("--out", required=True, type=non_empty, help="index folder to write")
    b.add_argument("--example", action="append", type=non_empty, dest="examples", metavar="QUESTION",
                   help="an example question to record with the index (repeatable; the Space offers them and the "
                        "index card lists them)")
    b.add_argument("--json", action="store_true", help="print a JSON summary")
    add_threads(b)


def run(args) -> int:
    check_target_folder(args.out, "--out")  # found out only after embedding the corpus, otherwise
    use_threads(args.threads)
    import time

    from hub_msif.attribution.retrieval import build_index
    from hub_msif.data import CorpusSpec

    start = time.perf_counter()
    spec = CorpusSpec(data=args.data[0] if len(args.data) == 1 else args.data, split=args.split,
                      revision=args.data_revision, text_column=args.text_column)
    index = build_index(spec, embedding_model=args.embedding_model, index_type=args.index_type, out=args.out,
                        id_column=args.id_column, batch_size=args.batch_size,
                        show_progress=show_progress(args.json), example_questions=args.examples)
    meta = index.metadata
    summary = {"out": str(args.out), "num_documents": meta["num_documents"], "dimension": meta["dimension"],
               "embedding_model": meta["embedding_model"], "index_type": meta["index_type"],
               "example_questions": meta.get("example_questions", []), "seconds": round(time.perf_counter() - start, 3)}
    if args.json:
        print_json(summary)
    else:
        print(f"indexed {summary['num_documents']} documents ({summary['dimension']} dims, {summary['index_type']}) "
              f"with {printable(meta['embedding_model']['id'])} into {printable(args.out)} in {summary['seconds']:.1f}s")
    return 0
