"""``hub-msif push space``: a Space of the demo's fact world published to the loopback Hub, then
downloaded into an empty folder and run from there as a Space runs it (``python app.py``), with
hub_msif coming only from the wheel inside the Space repo.

The module runs its own loopback Hub (on the session's ``HF_ENDPOINT`` port, over the session's
storage) so that the repos pushed once serve every test here.
"""

from __future__ import annotations

import ast
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
import zipfile
from pathlib import Path

import conftest
import pytest
import yaml

pytest.importorskip("gradio")

from huggingface_hub import HfApi, snapshot_download  # noqa: E402

from hub_msif.apps.cli import main as cli_main  # noqa: E402
from hub_msif.hub import push_factors, push_gradindex, push_index  # noqa: E402
from hub_msif.hub.space_push import CONFIG_NAME, push_space, wheel_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SPACE_REPO = "alice/fact-world-space"
FACTORS_REPO = "alice/fact-world-space-factors"
INDEX_REPO = "msif-team/fact-world-space-index"
WHEEL = wheel_name()

# sitecustomize of the Space's process: lookups of any host but loopback are refused and reported.
GUARD = textwrap.dedent("""
    import socket, sys
    _real = socket.getaddrinfo

    def _loopback_only(host, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name not in ("localhost", "127.0.0.1", "::1", "0.0.0.0", "", "None"):
            print(f"GUARD refused a lookup of {name}", file=sys.stderr, flush=True)
            raise socket.gaierror(socket.EAI_NONAME, f"guard: {name} refused")
        return _real(host, *args, **kwargs)

    socket.getaddrinfo = _loopback_only
""")


@pytest.fixture(scope="module")
def hub(hub_root):
    from hub_msif.hub.server import HubServer

    server = HubServer(hub_root, host="127.0.0.1", port=conftest.HUB_PORT, tokens=conftest.HUB_TOKENS).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pushed(hub, fact_world):
    """The fact world's factors and index, published, and a Space serving them (on cpu-basic)."""
    factors = push_factors(fact_world["factors"], FACTORS_REPO)
    index = push_index(fact_world["index_folder"], INDEX_REPO)
    locations = {"factors": f"{FACTORS_REPO}@{factors.tag}", "index": f"{INDEX_REPO}@{index.tag}"}
    space = push_space(SPACE_REPO, locations["factors"], locations["index"], hardware="cpu-basic")
    return {**locations, "space": space}


def _download(tmp_path: Path) -> Path:
    folder = tmp_path / "space"
    folder.mkdir()
    snapshot_download(SPACE_REPO, repo_type="space", local_dir=folder)
    return folder


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def test_the_space_repo_is_a_self_contained_gradio_app(pushed, tmp_path):
    import gradio

    space = _download(tmp_path)
    assert {p.name for p in space.iterdir() if p.name != ".cache"} == {
        ".gitattributes", "README.md", "app.py", "requirements.txt", CONFIG_NAME, WHEEL}
    readme = (space / "README.md").read_text()
    meta = _front_matter(readme)
    assert meta["sdk"] == "gradio" and meta["sdk_version"] == gradio.__version__ and meta["app_file"] == "app.py"
    assert meta["python_version"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert meta["datasets"] == [FACTORS_REPO, INDEX_REPO]
    assert "models" not in meta  # the fact world's models are local folders: no Hub ids to name
    assert meta["suggested_hardware"] == "cpu-basic" and meta["short_description"]
    assert len(meta["short_description"]) <= 60  # the Hub's limit
    for local in (str(Path.home()), str(ROOT), "/tmp/"):
        assert local not in readme
    assert "finetuned (a local model folder)" in readme
    # the hardware paragraph: the attribution plan from the recorded models' configs (local folders this
    # pushing machine knows by their weights' sha256; when it cannot, the card says so rather than invent
    # a number: tests/attribution/test_device_plan.py)
    assert "GB** on its device" in readme and "could not be planned" not in readme
    assert json.loads((space / CONFIG_NAME).read_text()) == {"factors": pushed["factors"], "index": pushed["index"]}
    assert (space / "app.py").read_bytes() == (ROOT / "hub_msif" / "apps" / "space" / "app.py").read_bytes()

    requirements = [line for line in (space / "requirements.txt").read_text().splitlines()
                    if line and not line.startswith("#")]
    assert requirements[-1] == f"./{WHEEL}"  # the wheel beside app.py, by a relative path
    constraints = dict(line.split("==") for line in (ROOT / "requirements" / "constraints.txt").read_text()
                       .splitlines() if "==" in line)
    assert all(constraints[name] == version for name, version in (r.split("==") for r in requirements[:-1]))
    assert {"torch", "transformers", "huggingface_hub", "faiss-cpu"} <= {r.split("==")[0] for r in requirements}
    assert "://" not in (space / "requirements.txt").read_text()
    with zipfile.ZipFile(space / WHEEL) as wheel:
        names = set(wheel.namelist())
    assert {"hub_msif/apps/space/app.py", "hub_msif/hub/templates/factors.md", "hub_msif/hub/templates/index.md",
            "hub_msif/hub/templates/space.md", "hub_msif-0.1.0.dist-info/RECORD"} <= names

    api = HfApi()
    assert api.space_info(SPACE_REPO).runtime.requested_hardware == "cpu-basic"
    assert [s.id for s in api.list_spaces(datasets=FACTORS_REPO)] == [SPACE_REPO]
    card = Path(api.hf_hub_download(FACTORS_REPO, "README.md", repo_type="dataset")).read_text()
    assert f"[{SPACE_REPO}]({pushed['space'].url})" in card and pushed["space"].card_linked
    assert pushed["space"].url == f"{os.environ['HF_ENDPOINT']}/spaces/{SPACE_REPO}"


def test_push_space_again_replaces_the_files_and_bad_input_is_one_line(pushed, capsys):
    from huggingface_hub import CommitOperationAdd

    api = HfApi()
    api.create_commit(SPACE_REPO, [CommitOperationAdd("stale.txt", b"left over\n")], repo_type="space",
                      commit_message="a stale file")
    args = ["push", "space", "--repo", SPACE_REPO, "--factors", pushed["factors"], "--index", pushed["index"]]
    assert cli_main([*args, "--hardware", "t4-small", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["card_linked"] is True and summary["repo"] == SPACE_REPO
    files = set(api.list_repo_files(SPACE_REPO, repo_type="space"))
    assert "stale.txt" not in files and {"app.py", WHEEL} <= files  # the Space is exactly its files
    assert api.get_space_runtime(SPACE_REPO).requested_hardware == "t4-small"
    card = Path(api.hf_hub_download(FACTORS_REPO, "README.md", repo_type="dataset")).read_text()
    assert card.count(f"[{SPACE_REPO}]") == 1  # linked once, however often pushed

    refs = api.list_repo_refs(SPACE_REPO, repo_type="space").branches
    for bad, message in [
        (["--factors", str(ROOT)], "give REPO@REV"),
        (["--factors", FACTORS_REPO], "give REPO@REV"),
        (["--hardware", "a-big-one"], "not a Space hardware flavour"),
        (["--index", "alice/no-such-index@v1"], "no dataset repo alice/no-such-index"),
        (["--wheel", str(ROOT / "README.md")], "not a hub_msif wheel"),
        (["--index", pushed["factors"]], "lacks a file"),  # factors are no index
        (["--factors", pushed["index"]], "lacks a file"),  # nor is an index a factor artifact
    ]:
        argv = list(args)
        option = bad[0]
        if option in argv:
            argv[argv.index(option) + 1] = bad[1]
        else:
            argv += bad
        assert cli_main(argv) == 2, bad
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, (bad, err)
    assert api.list_repo_refs(SPACE_REPO, repo_type="space").branches == refs  # nothing written


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _space_env(tmp_path: Path, target: Path, port: int, fact_world) -> dict:
    """The Space process's environment: nothing of the test run's Python path, the wheel's
    installation and the network guard only."""
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(GUARD)
    keep = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "HF_ENDPOINT", "HF_TOKEN", "HF_HUB_DISABLE_XET")
            if k in os.environ}
    # The fact world's models are local folders, recorded by name and weights' sha256 only: a Space
    # on another machine (here: an empty hub_msif cache) is told where they lie.
    models = {stage: str(fact_world["models"] / stage) for stage in ("pretrained", "finetuned")}
    return {**keep, "PYTHONPATH": f"{target}{os.pathsep}{guard}", "HF_HOME": str(tmp_path / "hf-home"),
            "MSIF_MODEL_PATHS": json.dumps(models),
            "HUB_MSIF_CACHE": str(tmp_path / "msif-cache"), "GRADIO_SERVER_PORT": str(port),
            "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_ANALYTICS_ENABLED": "False",
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_UPDATE_DOWNLOAD_COUNTS": "0", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONDONTWRITEBYTECODE": "1"}


def _wait_until_served(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the Space exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the Space did not answer on {url} within {timeout_s} s:\n{log.read_text()[-3000:]}")


@pytest.mark.browser
def test_the_downloaded_space_runs_from_its_wheel(pushed, fact_world, tmp_path):
    from gradio_client import Client
    from playwright.sync_api import sync_playwright
    from test_space import CHROMIUM, CHROMIUM_ARGS, assert_shaded_tokens, wait_for_text

    space = _download(tmp_path)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--disable-pip-version-check", "--target", str(target), str(space / WHEEL)], check=True)
    port = _free_port()
    env = _space_env(tmp_path, target, port, fact_world)
    probe = subprocess.run([sys.executable, "-c", "import hub_msif, sys; print(hub_msif.__file__); print(sys.path)"],
                           cwd=space, env=env, capture_output=True, text=True, check=True)
    where, path = probe.stdout.splitlines()[:2]
    assert Path(where).is_relative_to(target), f"hub_msif imported from {where}, not from the wheel"
    # The checkout is not on the Space's path (the test environment's own site-packages may lie
    # inside it, as .venv does in CI: those entries are the dependencies, not hub_msif).
    # Relative entries (and setuptools' editable path-hook marker) are relative to the Space's folder.
    entries = [(space / entry).resolve() for entry in ast.literal_eval(path) if entry]
    leaks = [str(e) for e in entries if e.is_relative_to(ROOT) and not e.is_relative_to(Path(sys.prefix).resolve())]
    assert not leaks, f"the checkout is on the Space's path: {leaks}"

    log = tmp_path / "space.log"
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "app.py"], cwd=space, env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_served(url, process, log)  # on GRADIO_SERVER_PORT
        client = Client(url, verbose=False, analytics_enabled=False, download_files=False)
        hits = {}
        for query in fact_world["examples"]:
            *_, result = client.predict(query.prompt, "", "ms-if", 0.1, 100, False, api_name="/attribute")
            assert len(result["rows"]) == 10
            hits[query.prompt] = [row["rank"] for row in result["rows"] if row["id"] in query.proponents]
            if hits[query.prompt]:
                break  # one question whose true proponent is in the top 10 is what the test asks
        assert any(hits.values()), f"no true proponent in any top 10: {hits}"

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(url)
                page.locator("#prompt textarea").wait_for(timeout=60_000)
                page.locator("#prompt textarea").fill(fact_world["examples"][0].prompt)
                page.locator("#attribute").click()
                wait_for_text(page, "#status", "ranked 100 candidates")
                assert_shaded_tokens(page, top=10)
                page.screenshot(path=str(tmp_path / "space-from-wheel.png"), full_page=True)
            finally:
                browser.close()
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
    text = log.read_text()
    assert "GUARD refused" not in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]


def test_the_space_requirements_come_from_the_wheel_resolve_and_cover_the_app(pushed, tmp_path):
    """Issue 21 (3b): requirements.txt is the wheel's own dependencies (peft included: factors of a PEFT
    adapter need it at start), pinned, with gradio at the sdk version; pip's resolver accepts it with the
    project's pins (dry run: everything but the wheel is the tested environment's), and every third-party
    module the app path imports is provided by a listed requirement or one of their dependencies."""
    import importlib.metadata as metadata

    import gradio

    from hub_msif.hub.space_push import wheel_dependencies

    space = _download(tmp_path)
    listed = [line for line in (space / "requirements.txt").read_text().splitlines()
              if line and not line.startswith("#")]
    names = {re.split(r"[=<>!~;\[ ]", line, maxsplit=1)[0].lower().replace("_", "-") for line in listed[:-1]}
    declared = {re.split(r"[=<>!~;\[ ]", r, maxsplit=1)[0].lower().replace("_", "-")
                for r in wheel_dependencies((space / WHEEL).read_bytes())}
    assert names == declared and {"peft", "gradio", "torch", "sentence-transformers"} <= names
    assert f"gradio=={gradio.__version__}" in listed

    report = tmp_path / "report.json"
    subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--disable-pip-version-check",
                    "-r", "requirements.txt", "-c", str(ROOT / "requirements" / "constraints.txt"),
                    "--report", str(report)], cwd=space, check=True)
    assert [i["metadata"]["name"] for i in json.loads(report.read_text())["install"]] == ["hub_msif"]

    probe = ("import json, sys, hub_msif.apps.space.app, hub_msif.apps.space.page, hub_msif.attribution.retrieval, "
             "peft; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    imported = json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                         check=True).stdout)
    providers = metadata.packages_distributions()
    needed = {d.lower().replace("_", "-") for m in imported if m not in sys.stdlib_module_names
              and not m.startswith("_") and m != "hub_msif" for d in providers.get(m, [])}
    closure, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in closure:
            continue
        closure.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:  # a dependency for another platform (colorama on Windows)
            continue
        for requirement in requires:
            if "extra ==" not in requirement:
                todo.append(re.split(r"[=<>!~;\[ (]", requirement, maxsplit=1)[0].lower().replace("_", "-"))
    optional = {"opt-einsum"}  # torch imports it when present (kronfluence's, in the test env) and runs without it
    assert needed - closure - optional == set(), f"imported by the app but not required: {sorted(needed - closure)}"


# -- issue 23 item 3 and issue 21 item 10: what push space refuses before anything is written --------


def _copy_artifact(api: HfApi, folder: Path, repo: str, private: bool = False, edits: dict | None = None) -> str:
    """``repo@main``: a fresh dataset repo holding the files of ``folder``, with ``edits``
    (``{path: bytes}``) replacing some of them, as a hand-made or damaged upload would."""
    from huggingface_hub import CommitOperationAdd

    api.create_repo(repo, repo_type="dataset", private=private, exist_ok=True)
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    files.update(edits or {})
    api.create_commit(repo, [CommitOperationAdd(path, data) for path, data in files.items()], repo_type="dataset",
                      commit_message="a copy")
    return f"{repo}@main"


def _space_push_args(space: str, factors: str, index: str) -> list[str]:
    return ["push", "space", "--repo", space, "--factors", factors, "--index", index]


def test_push_space_refuses_artifacts_that_attribute_refuses(pushed, fact_world, capsys):
    import uuid

    api = HfApi()
    tag = uuid.uuid4().hex[:6]
    factors, index = Path(fact_world["factors"]), Path(fact_world["index_folder"])
    manifest = json.loads((factors / "msif.json").read_text())
    no_format = {k: v for k, v in manifest.items() if k != "format"}
    module = manifest["stages"]["finetuned"]["modules"][0]["file"]
    index_manifest = json.loads((index / "index.json").read_text())
    bad_model = {**index_manifest, "embedding_model": "some-model"}
    cases = [
        ("factors", _copy_artifact(api, factors, f"alice/bad-f-nofmt-{tag}",
                                   edits={"msif.json": json.dumps(no_format).encode()}), "format=None"),
        ("factors", _copy_artifact(api, factors, f"alice/bad-f-file-{tag}", edits={module: b"not the factors"}),
         "the artifact is damaged"),
        ("index", _copy_artifact(api, index, f"alice/bad-i-json-{tag}", edits={"index.json": b"{not json"}),
         "not valid JSON"),
        ("index", _copy_artifact(api, index, f"alice/bad-i-fake-{tag}", edits={"documents.parquet": b"PAR1 fake"}),
         "the artifact is damaged"),
        ("index", _copy_artifact(api, index, f"alice/bad-i-model-{tag}",
                                 edits={"index.json": json.dumps(bad_model).encode()}), "embedding_model"),
    ]
    space = f"alice/bad-space-{tag}"
    for kind, location, message in cases:
        argv = _space_push_args(space, location if kind == "factors" else pushed["factors"],
                                location if kind == "index" else pushed["index"])
        assert cli_main(argv) == 2, location
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err and "Traceback" not in err, (location, err)
        assert not api.repo_exists(space, repo_type="space")  # nothing written


def test_push_space_with_a_gradient_index(pushed, fact_gradindex, tmp_path, capsys):
    """``--gradindex REPO@REV``: checked (sha256, built from the served pre-trained stage), written into
    msif_space.json, which the Space's settings read; one of other factors is refused in one line."""
    import uuid

    from hub_msif.apps.space.settings import space_gradindex, space_locations

    api = HfApi()
    tag = uuid.uuid4().hex[:6]
    published = push_gradindex(fact_gradindex["folder"], f"alice/fact-world-gradindex-{tag}")
    location = f"alice/fact-world-gradindex-{tag}@{published.tag}"
    space = f"alice/gradindex-space-{tag}"
    argv = [*_space_push_args(space, pushed["factors"], pushed["index"]), "--gradindex", location]
    assert cli_main([*argv, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["gradindex"] == location and summary["index"] == pushed["index"]
    config = Path(api.hf_hub_download(space, CONFIG_NAME, repo_type="space"))
    assert json.loads(config.read_text()) == {"factors": pushed["factors"], "index": pushed["index"],
                                              "gradindex": location}
    assert space_locations({}, config) == (pushed["factors"], pushed["index"])
    assert space_gradindex({}, config) == location

    manifest = json.loads((fact_gradindex["folder"] / "gradindex.json").read_text())
    other = {**manifest, "stage": {**manifest["stage"], "manifest_sha256": "0" * 64}}
    copy = _copy_artifact(api, fact_gradindex["folder"], f"alice/other-gradindex-{tag}",
                          edits={"gradindex.json": json.dumps(other).encode()})
    refused = f"alice/refused-space-{tag}"
    assert cli_main([*_space_push_args(refused, pushed["factors"], pushed["index"]), "--gradindex", copy]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "was built for other pre-trained factors" in err and "Traceback" not in err
    assert not api.repo_exists(refused, repo_type="space")  # nothing written


def test_push_space_over_a_space_of_another_sdk_needs_replace(pushed, capsys):
    import uuid

    from huggingface_hub import CommitOperationAdd

    api = HfApi()
    space = f"alice/docker-space-{uuid.uuid4().hex[:6]}"
    api.create_repo(space, repo_type="space", space_sdk="docker")
    api.create_commit(space, [CommitOperationAdd("Dockerfile", b"FROM python:3.11\n"),
                              CommitOperationAdd("server.py", b"print('hi')\n")],
                      repo_type="space", commit_message="a docker app")
    head = api.space_info(space).sha
    argv = _space_push_args(space, pushed["factors"], pushed["index"])
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "docker Space" in err and "Dockerfile, server.py" in err and "--replace" in err
    assert api.space_info(space).sha == head  # untouched
    assert cli_main([*argv, "--replace", "--no-card-link"]) == 0
    files = set(api.list_repo_files(space, repo_type="space"))
    assert "Dockerfile" not in files and "app.py" in files and api.space_info(space).sdk == "gradio"


def test_a_private_artifact_behind_a_public_space_is_warned_about(pushed, fact_world, caplog):
    import logging
    import uuid

    api = HfApi()
    tag = uuid.uuid4().hex[:6]
    index = _copy_artifact(api, Path(fact_world["index_folder"]), f"alice/private-index-{tag}", private=True)
    space = f"alice/public-space-{tag}"
    with caplog.at_level(logging.WARNING, logger="hub_msif.hub.space_push"):
        assert cli_main([*_space_push_args(space, pushed["factors"], index), "--no-card-link"]) == 0
    warned = [r.getMessage() for r in caplog.records if "is private" in r.getMessage()]
    assert warned and f"alice/private-index-{tag}" in warned[0] and space in warned[0]
    caplog.clear()
    private_space = f"alice/private-space-{tag}"
    with caplog.at_level(logging.WARNING, logger="hub_msif.hub.space_push"):
        assert cli_main([*_space_push_args(private_space, pushed["factors"], index), "--private",
                         "--no-card-link"]) == 0
    assert not [r for r in caplog.records if "is private" in r.getMessage()]  # a private Space may name it


@pytest.mark.parametrize("after", [False, True], ids=["before-the-commit", "after-the-commit"])
def test_ctrl_c_during_push_space_says_whether_the_commit_landed(pushed, monkeypatch, capsys, after):
    import uuid

    api = HfApi()
    space = f"alice/ctrl-c-space-{uuid.uuid4().hex[:6]}"
    real = HfApi.create_commit

    def interrupted(self, repo_id, *args, **kwargs):
        if kwargs.get("repo_type") != "space":
            return real(self, repo_id, *args, **kwargs)
        if after:
            real(self, repo_id, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(HfApi, "create_commit", interrupted)
    assert cli_main([*_space_push_args(space, pushed["factors"], pushed["index"]), "--no-card-link"]) == 130
    err = capsys.readouterr().err.strip()
    head = api.list_repo_refs(space, repo_type="space").branches[0].target_commit
    if after:
        assert f"Space commit {head} landed" in err, err
        assert "app.py" in api.list_repo_files(space, repo_type="space")
    else:
        assert "unchanged" in err and "app.py" not in api.list_repo_files(space, repo_type="space"), err
