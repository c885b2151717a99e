"""Attribute many answers of a fine-tuned model to pre-training documents, from Python.

Copy this file and edit the defaults below (or pass the options). It loads the model pair and its
published factors once (``Attributor``), then ranks candidate documents for every query in one
pass (``Attributor.attribute_many``: one gradient pass per chunk of queries and one per candidate
and model), and writes one JSON line per query.

Candidates are either ``--documents`` (a jsonl file of ``{"id", "text"}`` rows, scored for every
query) or the top ``--candidates`` of a published document index (``--index REPO@REV``; needs the
``hub_msif[retrieval]`` extra). Queries are ``--queries`` (a jsonl file of ``{"prompt", "answer"}``
rows; a missing answer is generated) or the ``QUERIES`` below.

Run: ``python examples/attribute_many.py --factors your-name/pythia-70m-factors@v1 --documents docs.jsonl``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hub_msif import Attributor, DocumentIndex

# -- edit these ------------------------------------------------------------------------------------
FACTORS = "your-name/pythia-70m-factors@v1"  # REPO@REV of published factors, or a local factor folder
QUERIES = [  # (prompt, answer); None: the fine-tuned model's own answer is attributed
    ("Where was Marie Curie born?", "Warsaw"),
    ("What did Ada Lovelace write?", None),
]


def read_jsonl(path: str | Path) -> list[dict]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--factors", default=FACTORS, help=f"factors: REPO@REV or a folder (default {FACTORS})")
    parser.add_argument("--pretrained", default=None, help="pre-trained model (default: the one the factors record)")
    parser.add_argument("--finetuned", default=None, help="fine-tuned model (default: the one the factors record)")
    parser.add_argument("--queries", default=None, help="jsonl of {prompt, answer} (default: QUERIES in this file)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--documents", help="jsonl of {id, text}: the candidates of every query")
    source.add_argument("--index", help="document index (REPO@REV or folder) to retrieve candidates from")
    parser.add_argument("--candidates", type=int, default=100, help="candidates retrieved per query (default 100)")
    parser.add_argument("--top", type=int, default=5, help="documents kept per query (default 5)")
    parser.add_argument("--method", default="ms-if", help="ms-if (default), ss-if, gdp, repsim or bm25")
    parser.add_argument("--out", default="attributions.jsonl", help="one JSON line per query (default attributions.jsonl)")
    return parser.parse_args(argv)


def main(argv=None) -> list:
    args = parse_args(argv)
    queries = ([(row["prompt"], row.get("answer")) for row in read_jsonl(args.queries)] if args.queries
               else QUERIES)
    documents = index = None
    if args.documents:
        documents = [{"id": str(row.get("id", number)), "text": row["text"]}
                     for number, row in enumerate(read_jsonl(args.documents), start=1)]
    else:
        index = DocumentIndex.load(args.index)
    attributor = Attributor(args.factors, pretrained=args.pretrained, finetuned=args.finetuned)
    results = attributor.attribute_many(queries, documents=documents, index=index, candidates=args.candidates,
                                        top=args.top, method=args.method)
    with open(args.out, "w", encoding="utf-8") as out:
        for result in results:
            out.write(json.dumps(result.to_json()) + "\n")
    for result in results:
        best = result.rows[0]
        print(f"{result.prompt!r} -> {result.answer!r}: top document {best.id} (score {best.score:.3g}) "
              f"{best.text[:60]!r}")
    print(f"{len(results)} attributions written to {args.out}")
    return results


if __name__ == "__main__":
    main()
