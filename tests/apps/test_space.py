"""The Gradio Space (hub_msif.apps.space, spaces/msif-attribution): its files, the API through
gradio_client, the page in a real browser (Debian Chromium), limits and bad input, and no traffic
to any outside host.

The fact world is the session's ``fact_world`` fixture (the demo's own cache, built once per
machine, see conftest.py), served once on loopback; every test talks to that server.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import socket
import time
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")

from hub_msif.apps.space import (  # noqa: E402
    SpaceError,
    SpaceSettings,
    build_app,
    highlight,
    query_terms,
)

ROOT = Path(__file__).resolve().parents[2]
SPACE_DIR = ROOT / "spaces" / "msif-attribution"
OUTPUT = ROOT / "test-output"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run"]
# The app under test: small limits so that the checks of them are cheap to reach.
SETTINGS = SpaceSettings(max_prompt_tokens=24, max_candidates=150, concurrency=1, queue_size=8)
LONG_PROMPT = " ".join(["where was ranusin born ?"] * 10)  # 50 tokens > 24


# ---------------------------------------------------------------------------------------------
# Guard: no socket of this process may reach (or even resolve) a non-loopback host
# ---------------------------------------------------------------------------------------------


def _is_local(host) -> bool:
    if host in (None, "", "localhost"):
        return True
    if isinstance(host, bytes):
        host = host.decode()
    try:
        address = ipaddress.ip_address(str(host).split("%")[0])
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


class NetworkGuard:
    """Replaces ``socket.getaddrinfo`` and ``socket.socket.connect(_ex)``: loopback passes, anything
    else is refused and recorded in ``attempts``."""

    def __init__(self):
        self.attempts: list[str] = []
        self._saved = None

    def install(self) -> NetworkGuard:
        real_getaddrinfo, real_connect, real_connect_ex = socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex
        guard = self

        def getaddrinfo(host, *args, **kwargs):
            if not _is_local(host):
                guard.attempts.append(f"getaddrinfo {host}")
                raise socket.gaierror(socket.EAI_NONAME, f"test guard: lookup of {host} refused")
            return real_getaddrinfo(host, *args, **kwargs)

        def check(sock, address):
            if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address[0]):
                guard.attempts.append(f"connect {address}")
                raise ConnectionRefusedError(f"test guard: connection to {address} refused")

        def connect(sock, address):
            check(sock, address)
            return real_connect(sock, address)

        def connect_ex(sock, address):
            check(sock, address)
            return real_connect_ex(sock, address)

        self._saved = (real_getaddrinfo, real_connect, real_connect_ex)
        socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex = getaddrinfo, connect, connect_ex
        return self

    def uninstall(self) -> None:
        socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex = self._saved


@pytest.fixture(scope="module")
def network_guard():
    guard = NetworkGuard().install()
    yield guard
    guard.uninstall()


# ---------------------------------------------------------------------------------------------
# The fact world and the served app
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifacts(fact_world, network_guard):
    """The session's fact world (the demo's cache), used while the network guard is on."""
    return fact_world


@pytest.fixture(scope="module")
def served(artifacts):
    app = build_app(artifacts["factors"], artifacts["index_folder"], artifacts["examples"], SETTINGS)
    app.launch(server_name="127.0.0.1", server_port=None, share=False, prevent_thread_lock=True, quiet=True)
    yield app, app.local_url
    app.close()


@pytest.fixture(scope="module")
def gradient_served(served, artifacts, fact_gradindex):
    """A second app over the first one's loaded attributor and the same document index, with a
    gradient index (given by its folder): the page offers the candidate source."""
    app = build_app(served[0].msif_backend.attributor("all"), artifacts["index_folder"], artifacts["examples"], SETTINGS,
                    gradindex=str(fact_gradindex["folder"]))
    app.launch(server_name="127.0.0.1", server_port=None, share=False, prevent_thread_lock=True, quiet=True)
    yield app, app.local_url
    app.close()


@pytest.fixture(scope="module")
def client(served):
    from gradio_client import Client

    return Client(served[1], verbose=False, analytics_enabled=False, download_files=False)


def _attribute(client, prompt, answer="", method="ms-if", damping=0.1, candidates=100, mlp_only=False, **source):
    """``(answer, answer log-probability, proponents table, opponents table, chart, status, token
    shading HTML, result JSON)``; ``candidates_from=...`` picks the candidate source (default: the Space's)."""
    return client.predict(prompt, answer, method, damping, candidates, mlp_only, api_name="/attribute", **source)


def _served_expectation(artifacts) -> dict:
    """What the page must name: both models as id@revision from the factors' manifest, the factor
    location for each stage, the index location and its size."""
    import json

    stages = json.loads((Path(artifacts["factors"]) / "msif.json").read_text())["stages"]
    return {"models": {stage: f"{info['model']['id']}@{info['model']['revision']}" for stage, info in stages.items()},
            "factors": dict.fromkeys(stages, str(artifacts["factors"])), "index": str(artifacts["index_folder"]),
            "documents": len(artifacts["world"].documents)}


# ---------------------------------------------------------------------------------------------
# Files and settings (no model needed: build_app loads nothing until the first request)
# ---------------------------------------------------------------------------------------------


def _front_matter(path: Path) -> dict:
    import yaml

    text = path.read_text()
    assert text.startswith("---\n"), "README.md must start with YAML front matter"
    return yaml.safe_load(text.split("---\n", 2)[1])


def test_space_files_are_a_valid_gradio_space():
    meta = _front_matter(SPACE_DIR / "README.md")
    assert meta["sdk"] == "gradio"
    assert meta["sdk_version"] == gr.__version__, "the Space must pin the gradio this project is tested with"
    assert meta["python_version"] == "3.11"  # a string: unquoted 3.10 would read as 3.1
    assert meta["app_file"] == "app.py" and (SPACE_DIR / meta["app_file"]).is_file()
    assert meta["license"] == "apache-2.0"
    assert meta["colorFrom"] in ("red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray")
    assert meta["colorTo"] in ("red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray")
    assert len(meta["datasets"]) == 2
    readme = (SPACE_DIR / "README.md").read_text()
    for var in ("MSIF_FACTORS", "MSIF_INDEX", "MSIF_MAX_PROMPT_TOKENS", "MSIF_MAX_CANDIDATES", "MSIF_CONCURRENCY"):
        assert var in readme

    requirements = [line.split("#")[0].strip() for line in (SPACE_DIR / "requirements.txt").read_text().splitlines()]
    requirements = [r for r in requirements if r]
    assert requirements[-1] == "./hub_msif-0.1.0-py3-none-any.whl"  # the wheel push space ships beside app.py
    assert not any(r.startswith("-") for r in requirements), "no index options: the default index serves every pin"
    text = (SPACE_DIR / "requirements.txt").read_text()
    assert "://" not in text and "git+" not in text
    constraints = dict(line.strip().split("==") for line in (ROOT / "requirements" / "constraints.txt").read_text()
                       .splitlines() if "==" in line)
    for pin in requirements[:-1]:  # every other line pins a tested version
        name, version = pin.split("==")
        assert constraints[name] == version, pin
    from hub_msif.hub.space_push import pack_wheel, pinned_requirements

    # the wheel's own dependencies, pinned, gradio at the sdk_version (what push space writes)
    assert requirements[:-1] == pinned_requirements(pack_wheel()[1])
    assert f"gradio=={gr.__version__}" in requirements and "peft==0.21.2" in requirements

    spec = importlib.util.spec_from_file_location("msif_space_app", SPACE_DIR / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # importing must not launch anything
    assert callable(module.build_app) and callable(module.serve_demo) and callable(module.main)


def test_build_app_is_lazy_and_configures_the_queue(tmp_path):
    app = build_app(tmp_path / "no-factors", tmp_path / "no-index", ["a question ?"],
                    SpaceSettings(concurrency=3, queue_size=5))
    assert app.analytics_enabled is False
    assert app._queue.max_size == 5
    assert app._queue.default_concurrency_limit == 3
    names = {dep.api_name for dep in app.fns.values() if dep.api_visibility == "public"}
    assert {"generate", "attribute", "compare"} <= names


def test_settings_from_env():
    settings = SpaceSettings.from_env({"MSIF_MAX_PROMPT_TOKENS": "64", "MSIF_MAX_CANDIDATES": "20",
                                       "MSIF_CONCURRENCY": "2"})
    assert (settings.max_prompt_tokens, settings.max_candidates, settings.concurrency) == (64, 20, 2)
    assert settings.default_candidates == 20  # never above the maximum
    assert SpaceSettings.from_env({}) == SpaceSettings()
    with pytest.raises(SpaceError, match="MSIF_MAX_CANDIDATES"):
        SpaceSettings.from_env({"MSIF_MAX_CANDIDATES": "many"})
    with pytest.raises(SpaceError, match="MSIF_CONCURRENCY"):
        SpaceSettings.from_env({"MSIF_CONCURRENCY": "0"})


def test_main_needs_both_locations_or_neither():
    from hub_msif.apps.space import main

    for environ in ({"MSIF_FACTORS": "your-org/factors"}, {"MSIF_INDEX": "your-org/index"},
                    {"MSIF_FACTORS_PRETRAINED": "org/base@v1", "MSIF_INDEX": "org/i@v1"}):
        with pytest.raises(SystemExit, match=r"set MSIF_FACTORS \(or MSIF_FACTORS_PRETRAINED and "
                                             r"MSIF_FACTORS_FINETUNED\) and MSIF_INDEX"):
            main(environ)


def test_space_locations_from_the_config_file_or_the_environment(tmp_path):
    import json

    from hub_msif.apps.space.settings import space_locations

    config = tmp_path / "msif_space.json"
    assert space_locations({}, config) == ("", "")  # no file: the demo
    config.write_text(json.dumps({"factors": "org/f@v1", "index": "org/i@v2"}))
    assert space_locations({}, config) == ("org/f@v1", "org/i@v2")
    assert space_locations({"MSIF_FACTORS": "a/b@v3", "MSIF_INDEX": "c/d@v4"}, config) == ("a/b@v3", "c/d@v4")
    # Each stage from its own place (issue 17): a dict of stage locations; one stage replaces that of a pair.
    stages = {"pretrained": "org/base@v1", "finetuned": "org/tune@v2"}
    assert space_locations({"MSIF_FACTORS_PRETRAINED": "org/base@v1", "MSIF_FACTORS_FINETUNED": "org/tune@v2",
                            "MSIF_INDEX": "c/d@v4"}, config) == (stages, "c/d@v4")
    assert space_locations({"MSIF_FACTORS": "org/tune@v2", "MSIF_FACTORS_PRETRAINED": "org/base@v1",
                            "MSIF_INDEX": "c/d@v4"}, config) == (stages, "c/d@v4")
    config.write_text(json.dumps({"factors_pretrained": "org/base@v1", "factors_finetuned": "org/tune@v2",
                                  "index": "org/i@v2"}))
    assert space_locations({}, config) == (stages, "org/i@v2")
    for bad in ("[]", "{}", '{"factors": "org/f@v1", "index": ""}', "not json",
                '{"factors_pretrained": "org/f@v1", "index": "org/i@v1"}', '{"factors": 3, "index": "org/i@v1"}'):
        config.write_text(bad)
        with pytest.raises(SpaceError, match="msif_space.json"):
            space_locations({}, config)


def test_zero_gpu_decorates_only_on_zero_gpu_hardware_with_the_spaces_package(monkeypatch):
    import sys
    import types

    from hub_msif.apps.space.gpu import gpu_task

    def handler():
        return "ran"

    assert gpu_task(handler, {}) is handler  # not ZeroGPU hardware
    monkeypatch.setitem(sys.modules, "spaces", None)  # the package is missing: import fails
    assert gpu_task(handler, {"SPACES_ZERO_GPU": "true"}) is handler
    calls = []

    def gpu(fn=None, duration=None):
        if fn is None:
            return lambda f: gpu(f, duration)
        calls.append(duration)
        return lambda *a, **k: f"on gpu: {fn(*a, **k)}"

    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=gpu))
    assert gpu_task(handler, {"SPACES_ZERO_GPU": "1"})() == "on gpu: ran"
    assert gpu_task(handler, {"SPACES_ZERO_GPU": "1", "MSIF_GPU_DURATION": "120"})() == "on gpu: ran"
    assert calls == [None, 120]


def test_local_folders_must_hold_the_artifact_and_a_missing_one_fails_on_first_use(tmp_path):
    from hub_msif.apps.space import Backend
    from hub_msif.errors import FactorsNotFoundError, IndexNotFoundError
    from hub_msif.hub.pull import pull_factors, pull_index

    # a folder is taken as it is, but only when it holds the artifact
    with pytest.raises(IndexNotFoundError, match="has no manifest index.json"):
        pull_index(tmp_path)
    with pytest.raises(FactorsNotFoundError, match="has no manifest msif.json"):
        pull_factors(str(tmp_path))
    backend = Backend(str(tmp_path / "no-such-factors"), str(tmp_path / "no-such-index"))
    with pytest.raises(SpaceError, match="cannot load the factors from .*no-such-factors"):
        backend.attributor()
    with pytest.raises(SpaceError, match="cannot load the index from .*no-such-index"):
        backend.index()


def test_highlight_bolds_query_words_and_escapes_markdown():
    terms = query_terms("where was ranusin born ?", "kyoto")
    assert terms == {"ranusin", "born", "kyoto"}
    assert highlight("ranusin was born in kyoto .", terms) == r"**ranusin** was **born** in **kyoto** \."
    assert highlight("a *star* [link](x) <b>", set()) == r"a \*star\* \[link\]\(x\) \<b\>"


# ---------------------------------------------------------------------------------------------
# The API through gradio_client
# ---------------------------------------------------------------------------------------------


def test_api_attribute_ranks_true_proponents(client, artifacts):
    hits = {}
    for query in artifacts["examples"]:
        answer, logprob, table, opposing, _chart, status, shading, result = _attribute(client, query.prompt)
        assert answer == result["answer"] and answer.strip()
        assert isinstance(logprob, float) and logprob == pytest.approx(result["answer_logprob"], rel=1e-5) and logprob < 0
        opponents = result["opponents"]  # the most negative first, all below 0, ranked among all candidates
        assert opponents and len(opponents) <= SETTINGS.top and all(row["score"] < 0 for row in opponents)
        assert [row["score"] for row in opponents] == sorted(row["score"] for row in opponents)
        assert opponents[0]["rank"] == 100 and len(opposing["data"]) == len(opponents)
        assert [line[0] for line in opposing["data"]] == [row["rank"] for row in opponents]
        assert result["answer_generated"] is True and result["method"] == "ms-if"
        assert table["headers"][:3] == ["rank", "score", "relative score"]
        assert len(table["data"]) == len(result["rows"]) == SETTINGS.top
        assert [row["rank"] for row in result["rows"]] == list(range(1, SETTINGS.top + 1))
        scores = [row["score"] for row in result["rows"]]
        assert scores == sorted(scores, reverse=True) and all(isinstance(s, float) for s in scores)
        assert max(abs(row["relative_score"]) for row in result["rows"]) <= 1.0 + 1e-9
        for row in result["rows"]:  # the role split adds up to the score
            assert row["by_role"]["mlp"] + row["by_role"]["attention"] == pytest.approx(row["score"], rel=1e-4, abs=1e-6)
        assert "ranked 100 candidates" in status
        for row in result["rows"]:  # token shares come with MS-IF and add up to the score they shade
            assert sum(t["share"] for t in row["tokens"]) == pytest.approx(row["score"], rel=1e-4, abs=1e-6)
        assert shading.count('class="msif-token"') == sum(len(row["tokens"]) for row in result["rows"])
        hits[query.prompt] = [row["rank"] for row in result["rows"] if row["id"] in query.proponents]
    assert any(hits.values()), f"no true proponent in any top {SETTINGS.top}: {hits}"


def test_api_generate_compare_and_mlp_only(client, artifacts):
    query = artifacts["examples"][0]
    answer, status = client.predict(query.prompt, api_name="/generate")
    assert answer.strip() and "fine-tuned model" in status

    answer2, table, status, summary = client.predict(query.prompt, answer, 0.1, 60, False, api_name="/compare")
    assert answer2 == answer
    assert table["headers"] == ["rank", "MS-IF", "SS-IF", "GDP", "RepSim", "BM25"]
    assert len(table["data"]) == SETTINGS.top and summary["candidates"] == 60
    assert set(summary["top_ids"]) == {"ms-if", "ss-if", "gdp", "repsim", "bm25"}
    assert all(len(ids) == SETTINGS.top for ids in summary["top_ids"].values())
    assert "overlap with MS-IF" in status

    *_, result = _attribute(client, query.prompt, answer, method="ms-if", candidates=40, mlp_only=True)
    assert result["modules"] == "mlp"
    assert all(row["by_role"]["attention"] == 0 for row in result["rows"])
    *_, result = _attribute(client, query.prompt, answer, method="bm25", candidates=40)
    assert result["rows"] and "by_role" not in result["rows"][0]


def test_api_describe_names_what_the_space_serves_and_outputs_are_labelled(client, artifacts):
    served = client.predict(api_name="/describe")[1]
    expected = _served_expectation(artifacts)
    assert {k: served[k] for k in expected} == expected
    assert served["corpus"] and "/" not in served["corpus"]  # a local file by its name only
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert [r["label"] for r in api["/attribute"]["returns"]] == [
        "Answer", "Answer log-probability", "Proponents (the top documents)", "Opponents (the most negative scores)",
        "Influence by layer and role", "Status", "Token shares of the top documents", "Result (JSON)"]
    assert [r["label"] for r in api["/compare"]["returns"]] == [
        "Answer", "Top documents per method", "Status", "Comparison summary (JSON)"]
    assert [r["label"] for r in api["/generate"]["returns"]] == ["Answer", "Status"]
    assert [p["label"] for p in api["/attribute"]["parameters"]][:2] == ["Prompt (a question for the fine-tuned model)",
                                                                        "Answer"]


def test_api_with_a_gradient_index(gradient_served, client, artifacts, fact_gradindex):
    """With a gradient index the Space's candidates come from it by default (the whole corpus, stage
    one), or from the document index, or both; the results are the attributor's own; describe names
    the gradient index. A Space without one refuses it in one line."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    app, url = gradient_served
    gradient_client = Client(url, verbose=False, analytics_enabled=False, download_files=False)
    attributor = app.msif_backend.attributor("all")
    query = artifacts["examples"][0]
    *_, status, _shading, result = _attribute(gradient_client, query.prompt, query.answer, candidates=40)
    assert "ranked 40 candidates (from the whole corpus by the gradient index)" in status
    assert "The gradient index searched 720 documents in" in status
    assert result["stage_one"]["source"] == "gradient" and result["stage_one"]["searched"] == {"gradient": 720}
    want = attributor.attribute(query.prompt, query.answer, candidates=40, top=SETTINGS.top,
                                gradindex=fact_gradindex["index"], candidates_from="gradient")
    assert [row["id"] for row in result["rows"]] == [row.id for row in want.rows]
    for source, text in (("both", "the union of the embedding and gradient indexes' tops"),
                         ("embedding", "nearest by sentence embedding")):
        *_, status, _shading, result = _attribute(gradient_client, query.prompt, query.answer, candidates=40,
                                                  candidates_from=source)
        assert text in status and result["stage_one"]["source"] == source
        assert (result["num_candidates"] >= 40) if source == "both" else (result["num_candidates"] == 40)
    _answer, _table, status, summary = gradient_client.predict(query.prompt, query.answer, 0.1, 30, False, "both",
                                                               api_name="/compare")
    assert "the union of the embedding and gradient indexes' tops" in status and summary["candidates"] >= 30
    served = gradient_client.predict(api_name="/describe")[1]
    assert served["gradindex"]["location"] == str(fact_gradindex["folder"])
    assert served["gradindex"]["documents"] == 720 and served["gradindex"]["projection"] == "kronecker"
    with pytest.raises(AppError, match="This Space has no gradient index") as info:
        _attribute(client, query.prompt, query.answer, candidates=10, candidates_from="gradient")
    assert "Traceback" not in str(info.value)
    assert client.predict(api_name="/describe")[1]["gradindex"] is None


def test_space_gradindex_from_the_environment_or_the_config_file(tmp_path):
    import json

    from hub_msif.apps.space.settings import space_gradindex

    config = tmp_path / "msif_space.json"
    assert space_gradindex({}, config) == ""
    config.write_text(json.dumps({"factors": "org/f@v1", "index": "org/i@v1", "gradindex": "org/g@v2"}))
    assert space_gradindex({}, config) == "org/g@v2"
    assert space_gradindex({"MSIF_GRADINDEX": "org/h@v3"}, config) == "org/h@v3"
    # the variables say what is served: the file's gradient index is not mixed into them
    assert space_gradindex({"MSIF_FACTORS": "a/b@v1", "MSIF_INDEX": "c/d@v1"}, config) == ""
    config.write_text(json.dumps({"factors": "org/f@v1", "index": "org/i@v1", "gradindex": ""}))
    with pytest.raises(SpaceError, match="'gradindex' as a non-empty string"):
        space_gradindex({}, config)


def test_mlp_only_equals_an_mlp_attributor(artifacts):
    """The MLP-only view (what the Space's checkbox uses) shares the loaded models; its scores equal a
    modules="mlp" Attributor's."""
    from hub_msif.attribution.attributor import Attributor

    full = Attributor(artifacts["factors"])
    reference = Attributor(artifacts["factors"], modules="mlp")
    documents = [d["text"] for d in artifacts["world"].documents[:6]]
    query = [(artifacts["examples"][0].prompt, artifacts["examples"][0].answer)]
    ours, _ = full.restrict("mlp").score(query, documents)
    theirs, _ = reference.score(query, documents)
    assert ours[:, 0].tolist() == pytest.approx(theirs[:, 0].tolist(), rel=1e-5)
    assert full.modules == "all" and len(full.specs) > len(full.restrict("mlp").specs)
    assert full.restrict("mlp").models is full.models  # shared, not reloaded


def test_api_bad_input_gives_clear_errors_and_the_app_keeps_serving(client, artifacts):
    from gradio_client.exceptions import AppError

    prompt = artifacts["examples"][0].prompt
    cases = [
        (dict(prompt="   "), "prompt is empty"),
        (dict(prompt=LONG_PROMPT), f"at most {SETTINGS.max_prompt_tokens} tokens"),
        (dict(prompt=prompt, candidates=0), "at least 1"),
        (dict(prompt=prompt, candidates=SETTINGS.max_candidates + 1), f"at most {SETTINGS.max_candidates}"),
        (dict(prompt=prompt, damping=-1), "Damping must be a positive number"),
        (dict(prompt=prompt, method="tf-idf"), "not in the list of choices"),  # gradio's Dropdown check
    ]
    for kwargs, message in cases:
        with pytest.raises(AppError) as info:
            _attribute(client, **kwargs)
        assert message in str(info.value), f"{kwargs}: {info.value}"
        assert "Traceback" not in str(info.value)
    with pytest.raises(AppError, match="prompt is empty"):
        client.predict("", api_name="/generate")
    with pytest.raises(AppError, match="at least 1"):
        client.predict(prompt, "", 0.1, 0, False, api_name="/compare")
    _answer, _logprob, table, *_ = _attribute(client, prompt, candidates=20)  # the next good request is answered
    assert len(table["data"]) == SETTINGS.top


def test_unpullable_repo_gives_a_clear_error_and_the_app_keeps_serving(network_guard, request):
    """A factor repo that cannot be pulled: a one-line message naming it, every time, no crash."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    try:
        import hub_msif.hub  # noqa: F401
        import hub_msif.hub.server  # noqa: F401

        request.getfixturevalue("hub_server")  # the loopback hub answers 404 for the missing repo
    except ImportError:
        pass  # without hub support, a repo id is "not a local folder"
    app = build_app("msif-team/no-such-factors@v1", "msif-team/no-such-index", settings=SETTINGS)
    app.launch(server_name="127.0.0.1", share=False, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(app.local_url, verbose=False, analytics_enabled=False, download_files=False)
        for _ in range(2):
            with pytest.raises(AppError, match="msif-team/no-such-factors") as info:
                _attribute(client, "where was ranusin born ?")
            assert "Traceback" not in str(info.value)
        with pytest.raises(AppError, match="prompt is empty"):  # input checks still answer before any load
            _attribute(client, "")
    finally:
        app.close()


def test_serve_demo_serves_the_fact_world_on_loopback(artifacts):
    import httpx

    from hub_msif.apps.space import serve_demo

    app, url = serve_demo(artifacts["factors"].parent)  # the cache prepare() filled: reused, not rebuilt
    try:
        assert url.startswith("http://127.0.0.1:")
        page = httpx.get(url, timeout=30)
        assert page.status_code == 200 and "gradio" in page.text.lower()
        assert httpx.get(url.rstrip("/") + "/config", timeout=30).json()["title"].startswith("MS-IF attribution")
    finally:
        app.close()


def test_factors_and_index_pulled_from_the_hub(hub_server, artifacts):
    """REPO[@REV] locations: pushed to the loopback hub, pulled by the app on its first request."""
    hub = pytest.importorskip("hub_msif.hub")
    from gradio_client import Client

    factors = hub.push_factors(artifacts["factors"], "msif-team/space-test-factors")
    hub.push_index(artifacts["factors"].parent / "index", "msif-team/space-test-index")
    app = build_app(f"msif-team/space-test-factors@{factors.tag}", "msif-team/space-test-index", settings=SETTINGS)
    app.launch(server_name="127.0.0.1", share=False, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(app.local_url, verbose=False, analytics_enabled=False, download_files=False)
        query = artifacts["examples"][0]
        *_, result = _attribute(client, query.prompt, candidates=30)
        assert len(result["rows"]) == SETTINGS.top and result["num_candidates"] == 30
        *_, result = _attribute(client, query.prompt, candidates=30, mlp_only=True)
        assert result["modules"] == "mlp"
    finally:
        app.close()


# ---------------------------------------------------------------------------------------------
# The page in a real browser
# ---------------------------------------------------------------------------------------------


def wait_for_text(page, selector: str, text: str, timeout_s: float = 90) -> None:
    page.wait_for_function(
        "([sel, text]) => { const el = document.querySelector(sel); return !!el && el.innerText.includes(text); }",
        arg=[selector, text], timeout=timeout_s * 1000)


def assert_shaded_tokens(page, top: int = SETTINGS.top) -> None:
    """The page shows the top documents' tokens, shaded in proportion to their shares of the score."""
    page.locator("#token-shares .msif-token").first.wait_for(timeout=30_000)
    documents = page.locator("#token-shares .msif-document").count()
    shown = page.evaluate("""() => [...document.querySelectorAll('#token-shares .msif-token')].map(el => {
        const rect = el.getBoundingClientRect();
        return {share: parseFloat(el.dataset.share), color: getComputedStyle(el).backgroundColor,
                visible: rect.width > 0 && rect.height > 0};
    })""")
    assert documents == top and len(shown) >= top
    assert all(token["visible"] for token in shown)

    def alpha(color: str) -> float:
        parts = color[color.index("(") + 1:-1].split(",")
        return float(parts[3]) if len(parts) == 4 else 1.0

    shaded = [token for token in shown if alpha(token["color"]) > 0.05]
    assert shaded, "no token is shaded"
    # the largest share of each document is its darkest token: the shading follows the shares
    largest = max(shown, key=lambda token: abs(token["share"]))
    assert alpha(largest["color"]) == pytest.approx(0.85, abs=0.01)


def _dismiss_toasts(page) -> None:
    for button in page.locator(".toast-close").all():
        try:
            button.click(timeout=2000)
        except Exception:
            pass


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"Debian Chromium is not installed at {CHROMIUM} "
                    "(apt-get install -y chromium chromium-driver)")
def test_browser_page(served, artifacts, gradient_served, fact_gradindex):
    from playwright.sync_api import sync_playwright

    _app, url = served
    bases = [url.rstrip("/")]
    outside: list[str] = []
    query = next(q for q in artifacts["examples"])
    OUTPUT.mkdir(exist_ok=True)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})

            def refuse_outside(route):
                if route.request.url.startswith((*bases, "data:", "blob:")):
                    route.continue_()
                else:
                    outside.append(route.request.url)
                    route.abort()

            page.route("**/*", refuse_outside)
            page.goto(url)
            page.locator("#prompt textarea").wait_for(timeout=60_000)
            page.get_by_text(query.prompt).first.wait_for(state="visible", timeout=30_000)  # the examples
            # What the page serves, filled in at page load: both models (id@revision), each stage's
            # factor location, the index's location and its number of documents.
            expected = _served_expectation(artifacts)
            for text in [*expected["models"].values(), *expected["factors"].values(), expected["index"],
                         f"{expected['documents']} documents"]:
                wait_for_text(page, "#served", text)
            assert "pre-trained model" in page.locator("#served").inner_text()

            # A good question: ranked rows, a chart, the generated answer.
            page.locator("#prompt textarea").fill(query.prompt)
            page.locator("#attribute").click()
            wait_for_text(page, "#status", "ranked 100 candidates")
            wait_for_text(page, "#results", "doc-")
            page.wait_for_function(  # the table fills in as it renders
                "n => [...document.querySelectorAll('#results [role=row]')].filter(r => r.innerText.includes('doc-')).length >= n",
                arg=SETTINGS.top, timeout=30_000)
            assert page.locator("#results strong").count() > 0  # query words highlighted
            page.locator("#chart svg, #chart canvas, #chart img").first.wait_for(timeout=30_000)
            page.locator("#chart .role-legend-entry").first.wait_for(timeout=30_000)
            assert page.locator("#answer textarea").input_value().strip()
            logprob = float(page.locator("#answer-logprob input").input_value())  # next to the answer
            assert logprob < 0 and "Answer log-probability" in page.locator("#answer-logprob").inner_text()
            wait_for_text(page, "#opponents", "doc-")  # the opponents under the proponents
            opponents = page.locator("#opponents").inner_text()
            assert "Opponents" in opponents and "rank" in opponents
            box, under = page.locator("#results").bounding_box(), page.locator("#opponents").bounding_box()
            assert under["y"] >= box["y"] + box["height"] - 1
            assert "relative score" in page.locator("#score-legend").inner_text()  # the legend by the table
            assert_shaded_tokens(page)
            time.sleep(1)  # let the chart finish its transition
            page.screenshot(path=str(OUTPUT / "space.png"), full_page=True)

            # The methods side by side.
            page.get_by_role("tab", name="Compare methods").click()
            page.locator("#compare").click()
            wait_for_text(page, "#status", "overlap with MS-IF")
            wait_for_text(page, "#compare-results", "doc-")
            for label in ("MS-IF", "SS-IF", "GDP", "RepSim", "BM25"):
                assert label in page.locator("#compare-results").inner_text()
            page.screenshot(path=str(OUTPUT / "space-compare.png"), full_page=True)
            page.locator("#candidates input").fill("0")  # a failed comparison clears the last one
            page.locator("#compare").click()
            wait_for_text(page, "#status", "must be at least 1")
            page.wait_for_function("() => !document.querySelector('#compare-results').innerText.includes('doc-')",
                                   timeout=10_000)
            _dismiss_toasts(page)
            page.locator("#candidates input").fill("100")
            page.get_by_role("tab", name="Ranked documents").click()

            # Bad input: a visible message (toast and status line), never a traceback, and the
            # previous run's table and chart are gone (no stale result under an error).
            page.locator("#prompt textarea").fill("")
            page.locator("#attribute").click()
            wait_for_text(page, "#status", "prompt is empty")
            page.get_by_text("The prompt is empty").first.wait_for(state="visible", timeout=10_000)  # toast
            page.wait_for_function("() => !document.querySelector('#results').innerText.includes('doc-')",
                                   timeout=10_000)
            page.wait_for_function("() => !document.querySelector('#chart').innerText.includes('layer 0')",
                                   timeout=10_000)  # no bars and no legend of the last run's parts
            page.wait_for_function("() => !document.querySelector('#token-shares .msif-token')", timeout=10_000)
            page.wait_for_function("() => !document.querySelector('#opponents').innerText.includes('doc-')",
                                   timeout=10_000)
            assert page.locator("#answer-logprob input").input_value() == ""
            page.screenshot(path=str(OUTPUT / "space-error.png"))
            _dismiss_toasts(page)
            page.locator("#prompt textarea").fill(LONG_PROMPT)
            page.locator("#attribute").click()
            wait_for_text(page, "#status", f"at most {SETTINGS.max_prompt_tokens} tokens")
            assert "Traceback" not in page.locator("body").inner_text()
            _dismiss_toasts(page)
            page.locator("#prompt textarea").fill(query.prompt)
            page.locator("#candidates input").fill("0")
            page.locator("#attribute").click()
            wait_for_text(page, "#status", "must be at least 1")
            _dismiss_toasts(page)
            page.locator("#candidates input").fill("100")

            # ... and the next good request is answered.
            second = artifacts["examples"][1]
            page.locator("#prompt textarea").fill(second.prompt)
            page.locator("#attribute").click()
            wait_for_text(page, "#status", "ranked 100 candidates")
            wait_for_text(page, "#results", "doc-")

            # No gradient index here: the page offers no choice of candidate source.
            assert not page.locator("#candidates-from").is_visible()

            # With a gradient index: the served panel names it, the page offers the source, and the
            # candidates come from where the visitor chose.
            gradient_url = gradient_served[1]
            bases.append(gradient_url.rstrip("/"))
            page.goto(gradient_url)
            page.locator("#prompt textarea").wait_for(timeout=60_000)
            wait_for_text(page, "#served", "gradient index")
            wait_for_text(page, "#served", str(fact_gradindex["folder"]))
            page.locator("#candidates-from").wait_for(state="visible", timeout=30_000)
            page.locator("#prompt textarea").fill(query.prompt)
            page.locator("#attribute").click()
            wait_for_text(page, "#status", "from the whole corpus by the gradient index")
            wait_for_text(page, "#results", "doc-")
            page.locator("#candidates-from").get_by_text("Both (union)").click()
            page.locator("#attribute").click()
            wait_for_text(page, "#status", "the union of the embedding and gradient indexes' tops")
            wait_for_text(page, "#results", "doc-")
            page.screenshot(path=str(OUTPUT / "space-gradindex.png"), full_page=True)

            # Given no examples, the page offers the index's own example questions (the loaded
            # attributor is shared: nothing is loaded twice).
            from hub_msif.attribution.retrieval import DocumentIndex

            index = DocumentIndex.load(artifacts["index_folder"])
            index.metadata["example_questions"] = [q.prompt for q in artifacts["examples"]]
            other = build_app(_app.msif_backend.attributor("all"), index, None, SETTINGS)
            other.launch(server_name="127.0.0.1", share=False, prevent_thread_lock=True, quiet=True)
            try:
                bases.append(other.local_url.rstrip("/"))
                page.goto(other.local_url)
                for number, example in enumerate(artifacts["examples"]):
                    wait_for_text(page, f"#example-{number}", example.prompt)
                wait_for_text(page, "#served", "a DocumentIndex given in Python")
                page.locator("#example-1").click()
                page.wait_for_function("q => document.querySelector('#prompt textarea').value === q",
                                       arg=artifacts["examples"][1].prompt, timeout=10_000)
            finally:
                other.close()
        finally:
            browser.close()
    assert not outside, f"the page requested outside hosts: {outside}"


# ---------------------------------------------------------------------------------------------
# No network (kept last: it also covers the traffic of the tests above)
# ---------------------------------------------------------------------------------------------


def test_no_outside_host_is_contacted(served, client, network_guard, artifacts):
    app, _url = served
    assert app.analytics_enabled is False
    assert os.environ.get("GRADIO_ANALYTICS_ENABLED", "").lower() == "false"
    _attribute(client, artifacts["examples"][0].prompt, candidates=10)
    assert network_guard.attempts == [], f"outside hosts were contacted: {network_guard.attempts}"
    # The guard does work: an outside lookup is refused and recorded.
    with pytest.raises(OSError):
        socket.getaddrinfo("example.com", 443)
    assert network_guard.attempts == ["getaddrinfo example.com"]
    network_guard.attempts.clear()
