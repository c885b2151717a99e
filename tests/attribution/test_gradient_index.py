"""The gradient index (docs/design.md, "Gradient index"): projection, build, artifact, search.

A module-scoped fixture trains the tiny pair (``save_tiny_pair``) and fits both stages' factors. The
references are exact: MS-IF from ``precondition_queries`` + ``score_candidates`` (float64 models),
per-document gradients from a for-loop of autograd, a build in one process against two processes
under ``accelerate launch``, an uninterrupted build against one killed with SIGKILL and resumed.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fit_tiny_pair, save_tiny_pair
from scipy.stats import spearmanr

from hub_msif.apps import cli
from hub_msif.artifacts.manifest import GRADINDEX, read_manifest
from hub_msif.attribution.gradient_index import GradientIndex, ivf_pq_parameters
from hub_msif.attribution.gradient_index_build import BUILD_STATE, build_gradindex
from hub_msif.attribution.gradient_projection import GradientProjection, candidate_vectors
from hub_msif.attribution.scoring import per_example_gradients, precondition_queries, score_candidates
from hub_msif.data import CorpusSpec
from hub_msif.errors import IndexIntegrityError, RetrievalError
from hub_msif.factors.storage import load_stage
from hub_msif.models import load_model, pad_token_id

pytestmark = pytest.mark.usefixtures("one_thread")
QUERIES = ["question : what does the cat see ? answer : the river",
           "question : what does the dog eat ? answer : the apple",
           "question : where is the bird ? answer : the tree"]
MAX_LENGTH = 64


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("gradindex_pair")
    made = save_tiny_pair(root)
    fit_tiny_pair(made, root / "factors", max_length=MAX_LENGTH)
    return {**made, "factors": root / "factors", "root": root}


@pytest.fixture(scope="module")
def exact(pair):
    """float64 models and both stages' factors, the corpus's sequences and the queries' gradients."""
    pretrained, tokenizer, _ = load_model(str(pair["pretrained"]))
    finetuned, _, _ = load_model(str(pair["finetuned"]))
    pretrained, finetuned = pretrained.double(), finetuned.double()
    stages = {s: load_stage(pair["factors"], s) for s in ("pretrained", "finetuned")}

    def sequence(text):
        ids = tokenizer(text, add_special_tokens=True)["input_ids"][:MAX_LENGTH]
        return {"input_ids": ids, "labels": list(ids)}

    texts = [json.loads(line)["text"] for line in pair["pretrain"].read_text().splitlines()]
    documents = [sequence(t) for t in texts]
    pad = pad_token_id(tokenizer)
    specs = stages["pretrained"].specs
    grads = per_example_gradients(finetuned, specs, [sequence(q) for q in QUERIES], pad)
    return {"pretrained": pretrained, "finetuned": finetuned, "stages": stages, "documents": documents,
            "pad": pad, "specs": specs, "grads": grads, "tokenizer": tokenizer}


def exact_ms_if(exact, damping: float) -> torch.Tensor:
    """``[C, Q]`` MS-IF scores of the corpus's documents, float64, as the Attributor computes them."""
    stages = exact["stages"]
    weights = precondition_queries(exact["grads"], "ms-if", stages["finetuned"], stages["pretrained"], damping, True)
    return score_candidates(exact["pretrained"], exact["specs"], weights, exact["documents"], exact["pad"]).total


def projected_scores(exact, projection: GradientProjection, damping: float) -> torch.Tensor:
    stages = exact["stages"]
    vectors = candidate_vectors(exact["pretrained"], exact["specs"], projection, exact["documents"], exact["pad"])
    queries = projection.query_vectors(exact["grads"], stages["finetuned"], stages["pretrained"], damping, True)
    return vectors.double() @ queries.T


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


def corpus(pair, **settings) -> CorpusSpec:
    return CorpusSpec(data=str(pair["pretrain"]), max_length=MAX_LENGTH, **settings)


@pytest.fixture(scope="module")
def built(pair, tmp_path_factory):
    """The default index of the pre-training corpus, built in this process (shards of 10 documents)."""
    out = tmp_path_factory.mktemp("gradindex") / "index"
    build_gradindex(str(pair["factors"]), corpus(pair), out, shard_size=10, show_progress=False, device="cpu")
    return out


# -- the projection ------------------------------------------------------------------------------


@pytest.mark.parametrize("damping", [0.1, 0.02])
def test_identity_projection_gives_exact_ms_if(exact, damping):
    """At no compression the index's inner products are MS-IF, at any query damping (one build at 0.1)."""
    projection = GradientProjection(exact["stages"]["pretrained"], "identity", damping=0.1)
    want = exact_ms_if(exact, damping)
    got = projected_scores(exact, projection, damping)
    assert got.shape == want.shape == (len(exact["documents"]), len(QUERIES))
    assert relative_error(got, want) <= 1e-5


def test_kronecker_hook_equals_dense_projection_of_for_loop_gradients(exact):
    """Given R_S, R_A, the hook's vector is sum_m B_m vec(R_S^T diag(s) Q_S^T G Q_A diag(t) R_A), G from autograd."""
    stage = exact["stages"]["pretrained"]
    generator = torch.Generator().manual_seed(3)
    matrices = {name: (torch.randn(m.spec.d_out, 5, generator=generator, dtype=torch.float64),
                       torch.randn(m.spec.d_in, 7, generator=generator, dtype=torch.float64))
                for name, m in stage.modules.items()}
    projection = GradientProjection(stage, "kronecker", dims=40, balance=0.7, matrices=matrices)
    documents = exact["documents"][:5]
    got = candidate_vectors(exact["pretrained"], exact["specs"], projection, documents, exact["pad"])
    model = exact["pretrained"]
    want = torch.zeros(len(documents), 40, dtype=torch.float64)
    for i, doc in enumerate(documents):
        ids = torch.tensor([doc["input_ids"]])
        logits = model(input_ids=ids).logits[0]
        loss = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum")
        for name, factors in stage.modules.items():
            layer = model.get_submodule(name)
            weight_grad, bias_grad = torch.autograd.grad(loss, [layer.weight, layer.bias], retain_graph=True)
            g = torch.cat([weight_grad, bias_grad[:, None]], dim=1).double()  # [d_out, d_in], bias last
            s, t = projection.scales(name)
            q_s, q_a = torch.block_diag(*factors.q_s.double()), factors.q_a.double()
            r_s, r_a = matrices[name]
            block = r_s.T @ torch.diag(s) @ q_s.T @ g @ q_a @ torch.diag(t) @ r_a
            want[i] += projection.mixing(name) @ block.reshape(-1)
    assert relative_error(got, want) <= 1e-10


def test_seeded_projection_is_reproducible_and_unbiased_in_scale(exact):
    stage = exact["stages"]["pretrained"]
    one, two = GradientProjection(stage), GradientProjection(stage)
    name = next(iter(stage.modules))
    for a, b in zip(one.operators(name), two.operators(name), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(one.mixing(name), two.mixing(name))
    other = GradientProjection(stage, seed=1)
    assert not torch.equal(one.mixing(name), other.mixing(name))
    r_s, r_a = one.random_sides(name)
    assert r_s.shape[1] == r_a.shape[1] == 16
    # E[R R^T] = I: entries of variance 1/k
    assert abs(float(r_s.var()) * 16 - 1) < 0.2 and abs(float(one.mixing(name).var()) * one.dims - 1) < 0.05
    assert GradientProjection.from_json(one.to_json(), stage).to_json() == one.to_json()


# Measured: Spearman 0.131, -0.111, 0.382 for the three queries (32 documents); the query's and the documents'
# scaled vectors have a cosine of about 0.004, so a projection to 1000 numbers (noise ~ 1/sqrt(1000)) cannot
# rank them here (docs/design.md, "Gradient index": Accuracy on the tiny models).
@pytest.mark.xfail(strict=True, reason="issue 18 target missed on the tiny pair: Spearman 0.13, -0.11, 0.38 at the "
                   "defaults (target 0.9)")
def test_default_compression_ranks_like_exact_ms_if(exact):
    projection = GradientProjection(exact["stages"]["pretrained"])
    want, got = exact_ms_if(exact, 0.1), projected_scores(exact, projection, 0.1)
    rho = [spearmanr(got[:, q].numpy(), want[:, q].numpy()).statistic for q in range(len(QUERIES))]
    assert min(rho) >= 0.9, rho


# -- the artifact ---------------------------------------------------------------------------------


def test_built_index_holds_the_projected_vectors_and_records_the_stage(built, pair, exact):
    index = GradientIndex.load(built)
    stage = exact["stages"]["pretrained"]
    assert len(index) == len(exact["documents"]) == 32
    manifest = read_manifest(built, GRADINDEX)
    assert manifest["stage"]["model"] == stage.info["model"]
    assert manifest["stage"]["location"] == "factors"  # the folder's name, not its path
    assert str(pair["root"]) not in json.dumps(manifest)
    assert manifest["corpus"]["data"] == "pretrain.jsonl" and manifest["num_documents"] == 32
    assert sorted(manifest["files"]) == ["documents.parquet"] + [f"shards/r000-0000{k}.safetensors" for k in range(4)]
    assert not (built / BUILD_STATE).exists()
    # float32 model (as saved): the stored vectors are the projection's up to float16 rows
    model, tokenizer, _ = load_model(str(pair["pretrained"]))
    projection = GradientProjection.from_json(manifest["projection"], stage)
    want = candidate_vectors(model, exact["specs"], projection, exact["documents"], exact["pad"]).numpy()
    got = index.vectors()
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()
    assert manifest["build"]["bytes_per_document"] < 2100  # 1000 float16 + norm + row + shard headers
    hits = index.search(want[:3], k=5)
    assert [h[0][0] for h in hits] == [int(np.argmax(want[q] @ got.T)) for q in range(3)]
    assert all(len(h) == 5 and h[0][1] >= h[-1][1] for h in hits)


def test_identity_index_scores_are_ms_if_to_float16(pair, exact, tmp_path):
    out = tmp_path / "identity"
    build_gradindex(str(pair["factors"]), corpus(pair), out, kind="identity", show_progress=False, device="cpu")
    index = GradientIndex.load(out)
    stage = exact["stages"]["pretrained"]
    projection = GradientProjection.from_json(index.metadata["projection"], stage)
    queries = projection.query_vectors(exact["grads"], exact["stages"]["finetuned"], stage, 0.1, True)
    want = exact_ms_if(exact, 0.1).numpy()
    hits = index.search(queries.float().numpy(), k=len(index))
    for q, row in enumerate(hits):
        scores = np.array([s for _, s in sorted(row)])
        assert np.abs(scores - want[:, q]).max() <= 2e-3 * np.abs(want[:, q]).max()


def test_corrupted_shard_is_refused_by_sha256(built, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    shard = copy / "shards" / "r000-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(IndexIntegrityError, match="r000-00001.safetensors is corrupted or was altered: sha256") as err:
        GradientIndex.load(copy)
    assert "\n" not in str(err.value)


def test_index_of_another_stage_or_model_is_refused(built, pair, exact):
    index = GradientIndex.load(built)
    index.check_stage(exact["stages"]["pretrained"].info)  # its own stage
    finetuned = exact["stages"]["finetuned"].info
    with pytest.raises(RetrievalError) as err:
        index.check_stage(finetuned, "elsewhere")
    message = str(err.value)
    assert "\n" not in message
    pre, fine = exact["stages"]["pretrained"].info["model"], finetuned["model"]
    assert f"{pre['id']}@{pre['revision']}" in message and f"{fine['id']}@{fine['revision']}" in message
    refit = json.loads(json.dumps(exact["stages"]["pretrained"].info))
    refit["fit"]["seconds"] += 1  # same model, other factors
    with pytest.raises(RetrievalError, match="the gradient index was built for the pretrained factors"):
        index.check_stage(refit)


def test_ivf_pq_search_is_rebuilt_from_the_shards_with_recorded_parameters(built):
    index = GradientIndex.load(built, ann="ivf,pq")
    params = index.search_parameters()
    assert params == {"ann": "ivf,pq"} | ivf_pq_parameters(32, 1000)
    assert params["m"] == 125 and params["refine_factor"] == 4
    flat = GradientIndex.load(built)
    vectors = flat.vectors()[:4]
    approx, exact_hits = index.search(vectors, 5), flat.search(vectors, 5)
    assert [a[0][0] for a in approx] == [e[0][0] for e in exact_hits]


# -- resume and processes ------------------------------------------------------------------------

KILL_WORKER = textwrap.dedent(
    """
    import os, signal, sys

    import torch

    torch.set_num_threads(1)
    from hub_msif.attribution.gradient_index_build import build_gradindex
    from hub_msif.data import CorpusSpec

    factors, data, out, kill_after = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    written = []

    def on_shard(path):
        written.append(path)
        print("shard", path.name, flush=True)
        if len(written) == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    build_gradindex(factors, CorpusSpec(data=data, max_length=64), out, shard_size=4, batch_size=2,
                    show_progress=False, device="cpu", on_shard=on_shard)
    """
)


def test_build_killed_with_sigkill_resumes_to_the_same_index(pair, tmp_path):
    reference = tmp_path / "reference"
    build_gradindex(str(pair["factors"]), corpus(pair), reference, shard_size=4, batch_size=2, show_progress=False,
                    device="cpu")
    out, script = tmp_path / "killed", tmp_path / "kill_worker.py"
    script.write_text(KILL_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(script), str(pair["factors"]), str(pair["pretrain"]), str(out), "3"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert result.stdout.split() == ["shard", "r000-00000.safetensors", "shard", "r000-00001.safetensors",
                                     "shard", "r000-00002.safetensors"]
    assert not (out / "gradindex.json").exists() and (out / BUILD_STATE).exists()
    with pytest.raises(RetrievalError, match=r"built with other settings \(projection differ\)"):
        build_gradindex(str(pair["factors"]), corpus(pair), out, dims=500, shard_size=4, batch_size=2,
                        show_progress=False, device="cpu")
    again: list[Path] = []
    build_gradindex(str(pair["factors"]), corpus(pair), out, shard_size=4, batch_size=2, show_progress=False,
                    device="cpu", on_shard=again.append)
    assert [p.name for p in again] == [f"r000-{k:05d}.safetensors" for k in range(3, 8)], "finished shards were redone"
    got, want = GradientIndex.load(out), GradientIndex.load(reference)
    assert got.documents == want.documents
    assert np.array_equal(got.unit_rows, want.unit_rows) and np.array_equal(got.norms, want.norms)
    assert read_manifest(out, GRADINDEX)["files"] \
        == read_manifest(reference, GRADINDEX)["files"]


TWO_WORKER = textwrap.dedent(
    """
    import sys

    from hub_msif.attribution.gradient_index_build import build_gradindex
    from hub_msif.data import CorpusSpec

    factors, data, out = sys.argv[1:4]
    build_gradindex(factors, CorpusSpec(data=data, max_length=64, max_sequences=21), out, shard_size=4,
                    batch_size=3, show_progress=False, device="cpu")
    """
)


def launch_two(args: list[str], cwd: Path) -> None:
    """``accelerate launch`` with two processes on CPU (gloo), as tests/factors/test_distributed.py does."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(port), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"launch failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


def test_two_processes_build_the_same_index_as_one(pair, tmp_path):
    one = tmp_path / "one"
    build_gradindex(str(pair["factors"]), corpus(pair, max_sequences=21), one, shard_size=4, batch_size=3,
                    show_progress=False, device="cpu")
    script, two = tmp_path / "two_worker.py", tmp_path / "two"
    script.write_text(TWO_WORKER)
    launch_two([str(script), str(pair["factors"]), str(pair["pretrain"]), str(two)], cwd=tmp_path)
    a, b = GradientIndex.load(one), GradientIndex.load(two)
    assert b.metadata["build"]["num_processes"] == 2 and a.metadata["build"]["num_processes"] == 1
    assert sorted(p.name for p in (two / "shards").iterdir()) == [
        "r000-00000.safetensors", "r000-00001.safetensors", "r000-00002.safetensors",
        "r001-00000.safetensors", "r001-00001.safetensors", "r001-00002.safetensors"]
    assert a.documents == b.documents and len(a) == 21
    assert a.metadata["projection"] == b.metadata["projection"] and a.metadata["stage"] == b.metadata["stage"]
    assert np.abs(a.unit_rows.astype(np.float32) - b.unit_rows.astype(np.float32)).max() <= 2 ** -10
    assert np.allclose(a.norms, b.norms, rtol=1e-5, atol=0)


# -- the command line ----------------------------------------------------------------------------


def test_cli_builds_an_index(pair, tmp_path, capsys):
    out = tmp_path / "cli-index"
    status = cli.main(["gradindex", "build", "--factors", str(pair["factors"]), "--data", str(pair["pretrain"]),
                       "--out", str(out), "--max-length", "64", "--dims", "256", "--k", "8", "--device", "cpu",
                       "--json"])
    assert status == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_documents"] == 32 and summary["dims"] == 256 and summary["projection"] == "kronecker"
    index = GradientIndex.load(out)
    assert index.metadata["projection"]["k"][next(iter(index.metadata["projection"]["k"]))] == [8, 8]


def test_cli_refuses_a_balance_outside_0_to_1_in_one_line(pair, tmp_path, capsys):
    status = cli.main(["gradindex", "build", "--factors", str(pair["factors"]), "--data", str(pair["pretrain"]),
                       "--out", str(tmp_path / "x"), "--balance", "2"])
    err = capsys.readouterr().err
    assert status == 2 and err.strip() == "hub-msif gradindex: error: --balance must be from 0 to 1, got 2.0"
    assert not (tmp_path / "x").exists()


def test_partial_folder_of_unknown_shards_is_refused(pair, tmp_path):
    out = tmp_path / "stray"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "r000-00000.safetensors").write_bytes(b"x")
    with pytest.raises(RetrievalError, match="holds shards of an unknown build"):
        build_gradindex(str(pair["factors"]), corpus(pair), out, show_progress=False, device="cpu")
