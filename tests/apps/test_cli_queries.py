"""``hub-msif attribute --queries / --documents / --threads`` on the demo's fact world (issue 10,
item 5; docs/design.md, "Many queries"): many queries in one pass give the scores of one call per
query, an explicit candidate list the scores of an index holding exactly those documents, and every
output line is strict JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli import fake_work, strict_json  # noqa: F401  (fake_work is a fixture)

from hub_msif.apps import cli

pytestmark = pytest.mark.usefixtures("one_thread")
TOLERANCE = 1e-6  # relative to the largest |score| of the query's candidates


@pytest.fixture(scope="module")
def attributor(fact_world):
    from hub_msif.attribution.attributor import Attributor

    return Attributor(fact_world["factors"], index=fact_world["index"])


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _assert_same_scores(got: dict, want, tolerance: float = TOLERANCE) -> None:
    """``got`` (a parsed JSON attribution) ranks the same documents with the scores of ``want``."""
    assert got["answer"] == want.answer and got["answer_generated"] == want.answer_generated
    assert got["num_candidates"] == want.num_candidates
    expected = {row.id: row for row in want.rows}
    assert {row["id"] for row in got["rows"]} == set(expected)
    bound = tolerance * want.scale
    for row in got["rows"]:
        assert abs(row["score"] - expected[row["id"]].score) <= bound, (row["id"], row["score"], expected[row["id"]].score)
        assert abs(row["relative_score"] - expected[row["id"]].relative_score) <= tolerance
    assert got["scale"] == pytest.approx(want.scale, rel=tolerance)


def test_queries_give_the_scores_of_one_call_per_query(fact_world, attributor, tmp_path, capsys):
    """Answers given or generated, ids given or defaulted to the line number, a prompt asked twice:
    each JSON line holds the ranking one ``attribute`` call gives (all candidates compared)."""
    queries = fact_world["world"].queries[:5]
    rows = [{"prompt": queries[0].prompt, "id": "born"},
            {"prompt": queries[1].prompt, "answer": queries[1].answer},
            {"prompt": queries[2].prompt, "answer": "the violin", "id": 7},
            {},  # a blank line, skipped
            {"prompt": queries[3].prompt},
            {"prompt": queries[0].prompt, "answer": queries[4].answer, "id": "born-other-answer"}]
    path = tmp_path / "queries.jsonl"
    path.write_text("".join((json.dumps(r) if r else "  ") + "\n" for r in rows))
    argv = ["attribute", "--factors", str(fact_world["factors"]), "--index", str(fact_world["index_folder"]),
            "--queries", str(path), "--candidates", "40", "--top", "40", "--threads", "1"]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5
    got = [strict_json(line) for line in lines]
    assert [g["id"] for g in got] == ["born", 2, 7, 5, "born-other-answer"]
    for g, r in zip(got, [r for r in rows if r]):
        want = attributor.attribute(r["prompt"], r.get("answer"), candidates=40, top=40)
        assert g["prompt"] == r["prompt"]
        _assert_same_scores(g, want)


def test_documents_give_the_scores_of_an_index_of_exactly_those_documents(fact_world, tmp_path, capsys):
    """``--documents`` scores exactly the listed documents: the same as an index built of them
    (``build_index``) retrieving all of them, with ``--prompt`` and with ``--queries``."""
    from hub_msif.attribution.retrieval import build_index
    from hub_msif.data import CorpusSpec

    world = fact_world["world"]
    query = fact_world["examples"][0]
    picked = [d for d in world.documents if d["id"] in query.proponents]
    picked += [d for d in world.documents if d["id"] not in query.proponents][::60]
    documents = _write_jsonl(tmp_path / "documents.jsonl", [{"id": d["id"], "text": d["text"]} for d in picked])
    build_index(CorpusSpec(data=str(documents)), out=tmp_path / "index")
    n = str(len(picked))
    common = ["attribute", "--factors", str(fact_world["factors"]), "--top", n, "--threads", "1"]
    assert cli.main([*common, "--documents", str(documents), "--prompt", query.prompt, "--json"]) == 0
    explicit = strict_json(capsys.readouterr().out)
    assert cli.main([*common, "--index", str(tmp_path / "index"), "--candidates", n, "--prompt", query.prompt,
                     "--json"]) == 0
    indexed = strict_json(capsys.readouterr().out)
    assert explicit["num_candidates"] == indexed["num_candidates"] == len(picked)
    assert {r["id"] for r in explicit["rows"]} == {d["id"] for d in picked}
    by_id = {r["id"]: r["score"] for r in indexed["rows"]}
    for row in explicit["rows"]:
        assert abs(row["score"] - by_id[row["id"]]) <= TOLERANCE * indexed["scale"]

    queries = _write_jsonl(tmp_path / "queries.jsonl", [{"prompt": q.prompt} for q in fact_world["examples"]])
    assert cli.main([*common, "--documents", str(documents), "--queries", str(queries)]) == 0
    many_explicit = [strict_json(line) for line in capsys.readouterr().out.splitlines()]
    assert cli.main([*common, "--index", str(tmp_path / "index"), "--candidates", n, "--queries", str(queries)]) == 0
    many_indexed = [strict_json(line) for line in capsys.readouterr().out.splitlines()]
    assert len(many_explicit) == len(many_indexed) == 3
    assert many_explicit[0]["answer"] == explicit["answer"]
    for a, b in zip(many_explicit, many_indexed):
        assert a["answer"] == b["answer"] and a["num_candidates"] == b["num_candidates"] == len(picked)
        scores = {r["id"]: r["score"] for r in b["rows"]}
        assert {r["id"] for r in a["rows"]} == set(scores)
        for row in a["rows"]:
            assert abs(row["score"] - scores[row["id"]]) <= TOLERANCE * b["scale"]


@pytest.mark.parametrize("method", ["ss-if", "gdp", "repsim", "bm25"])
def test_attribute_many_equals_attribute_for_every_method(method, fact_world, attributor):
    """The batch entry point for the other methods, candidates given, answers given and generated."""
    world = fact_world["world"]
    documents = world.documents[::37]
    queries = [(q.prompt, q.answer if i % 2 else None) for i, q in enumerate(world.queries[5:9])]
    many = attributor.attribute_many(queries, documents, top=len(documents), method=method)
    for (prompt, answer), got in zip(queries, many):
        want = attributor.attribute(prompt, answer, documents, top=len(documents), method=method)
        _assert_same_scores(got.to_json(), want)


def test_attribute_many_keeps_token_shares_and_module_splits(fact_world, attributor):
    documents = fact_world["world"].documents[:9]
    queries = [(q.prompt, q.answer) for q in fact_world["examples"]]
    many = attributor.attribute_many(queries, documents, top=4, token_shares=True)
    for (prompt, answer), got in zip(queries, many):
        want = attributor.attribute(prompt, answer, documents, top=4, token_shares=True)
        assert [r.id for r in got.rows] == [r.id for r in want.rows]
        for a, b in zip(got.rows, want.rows):
            assert [t.token for t in a.tokens] == [t.token for t in b.tokens]
            assert torch.allclose(torch.tensor([t.share for t in a.tokens]), torch.tensor([t.share for t in b.tokens]),
                                  rtol=0, atol=TOLERANCE * want.scale)
            for name, value in b.by_module.items():
                assert abs(a.by_module[name] - value) <= TOLERANCE * want.scale


def test_attribute_many_scores_queries_in_chunks_with_the_same_result(fact_world, attributor, monkeypatch):
    """Queries beyond the memory budget go in chunks, each against its own candidates' union."""
    queries = [(q.prompt, q.answer) for q in fact_world["world"].queries[10:15]]
    whole = attributor.attribute_many(queries, candidates=20, top=20)
    monkeypatch.setattr(type(attributor), "query_chunk", lambda self, *args: 2)
    chunked = attributor.attribute_many(queries, candidates=20, top=20)
    for a, b in zip(chunked, whole):
        _assert_same_scores(a.to_json(), b)


def test_a_query_too_long_for_the_model_is_named_before_any_scoring(fact_world, attributor, monkeypatch):
    from hub_msif.attribution import attributor as module
    from hub_msif.errors import MsifValueError

    def refuse(*args, **kwargs):
        raise AssertionError("scored before every query was checked")

    monkeypatch.setattr(module, "per_example_gradients", refuse)
    monkeypatch.setattr(module, "score_candidates", refuse)
    queries = [(fact_world["examples"][0].prompt, None), ("where " * 80 + "?", "kyoto")]
    with pytest.raises(MsifValueError, match=r"^query 2 of 2: prompt and answer are \d+ tokens, more than the model's "
                                             r"maximum of 64"):
        attributor.attribute_many(queries, candidates=5)


# --- --threads, lazy imports --------------------------------------------------------------------


def test_threads_sets_torch_threads_before_the_work(fake_work, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    seen = {}
    from hub_msif.attribution import attributor

    class Recording(attributor.Attributor):
        def __init__(self, *args, **kwargs):
            seen["threads"] = torch.get_num_threads()

        def attribute(self, prompt, answer=None, **kwargs):
            from test_cli import fake_attribution

            return fake_attribution(0.5)

    monkeypatch.setattr(attributor, "Attributor", Recording)
    before = torch.get_num_threads()
    try:
        folder = str(tmp_path / "folder")
        assert cli.main(["attribute", "--factors", folder, "--index", folder, "--prompt", "hi", "--threads", "2"]) == 0
        assert seen["threads"] == 2
    finally:
        torch.set_num_threads(before)


HEAVY = ("torch", "transformers", "huggingface_hub", "datasets", "sentence_transformers", "numpy", "faiss")


@pytest.mark.parametrize("argv", [["--help"], ["attribute", "--help"], ["attribute", "--factors", "f", "--index", "i",
                                                                        "--prompt", "p", "--threads", "0"],
                                  ["attribute", "--factors", "f", "--documents", "d.jsonl", "--queries", "q.jsonl"]])
def test_help_and_argument_errors_import_no_heavy_library(argv, tmp_path):
    """``python -m hub_msif --help`` and argument errors answer without torch, transformers,
    huggingface_hub, datasets, numpy (checked in the process's ``sys.modules``, not timed)."""
    probe = (
        "import json, runpy, sys\n"
        f"sys.argv = ['hub_msif', *{argv!r}]\n"
        "try:\n    runpy.run_module('hub_msif', run_name='__main__')\n"
        "except SystemExit as exit_:\n    status = exit_.code\n"
        f"heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))\n"
        "print('\\nPROBE ' + json.dumps({'status': status, 'heavy': heavy}), file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    report = json.loads(result.stderr.rsplit("PROBE ", 1)[1])
    assert report["heavy"] == []
    assert report["status"] in (0, 2)
    if argv == ["--help"]:
        assert "attribute" in result.stdout and report["status"] == 0
    elif "--threads" in argv:
        assert "argument --threads: must be at least 1, got 0" in result.stderr


# --- quiet, readable demo output (issue 10, item 6) -------------------------------------------------


def test_demo_prints_no_progress_bars_and_ends_with_the_table_and_the_next_command(fact_world):
    """The cached demo as a process whose stderr is a pipe, not a terminal: no progress bar from
    any library (downloads, uploads, weight loading, embeddings) or of its own, and stdout ends with
    the summary table under the legend of score and rel, then the folders it keeps and the next command."""
    import os

    from hub_msif.toy.demo import default_cache

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUB_MSIF_DEBUG")) and k not in ("TQDM_DISABLE",)}
    env["HUB_MSIF_CACHE"] = str(default_cache().parent)
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run([sys.executable, "-m", "hub_msif", "demo", "--threads", "1"], capture_output=True,
                            text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    everything = result.stdout + result.stderr
    pieces = [p for line in everything.splitlines() for p in line.split("\r")]
    bars = [p for p in pieces if "it/s]" in p or "s/it]" in p or "%|" in p]
    assert bars == [], bars[:5]
    assert result.stderr == ""
    lines = result.stdout.rstrip("\n").splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("question "))
    assert lines[header - 3].startswith("score: influence of the document on the answer")
    assert lines[header - 2].startswith("rel: score / the largest |score|")
    table = lines[header + 1:header + 4]
    assert all(row.split()[-1].startswith(("+", "-")) for row in table)
    for example in fact_world["examples"]:
        assert any(row.startswith(example.prompt) for row in table)
    # then the folders it keeps (its cache, not the pulled copies of the loopback Hub) and the next command
    closing = lines[header + 4:]
    assert closing[0] == "" and closing[1].startswith("The factors and the index stay in the demo's cache")
    assert closing[2] == f"  factors  {default_cache().resolve() / 'factors'}"
    assert closing[3] == f"  index    {default_cache().resolve() / 'index'}"
    assert closing[4].startswith("  hub-msif attribute --factors ") and len(closing) == 5


MEMORY_PROBE = """
import resource, sys, torch
torch.set_num_threads(1)
from hub_msif.toy.demo import default_cache, prepare
from hub_msif.attribution.attributor import Attributor
artifacts = prepare(default_cache())
attributor = Attributor(artifacts["factors"], index=artifacts["index"])
attributor.query_memory_bytes = 128 << 20
queries = [(q.prompt, q.answer) for q in artifacts["world"].queries]
attributor.attribute_many(queries[:1], candidates=100, top=5)  # the runtime and one query: the baseline
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
chunk = attributor.query_chunk(100, len(artifacts["index"].documents))
attributor.attribute_many((queries * 50)[: 2 * chunk + 1], candidates=100, top=5)
print(chunk, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
"""


def test_many_queries_stay_within_the_chunk_budget(fact_world):
    # Issue 23: 1000 queries peaked at 4.6 GB against a 2 GiB budget (the chunk counted 3 copies of the
    # tracked weights per query; measured 3.6-3.8, and the union of candidates grows with the chunk).
    # Here a 128 MiB budget: the peak grows by at most 1.2x that (measured 135 MiB; the old chunk: 170 MiB).
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout.split()
    chunk, growth = int(out[0]), int(out[1])
    assert chunk > 1 and growth <= 1.2 * (128 << 20), (chunk, growth / 2**20)
