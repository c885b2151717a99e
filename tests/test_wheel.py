"""The wheel: ``python -m build --wheel`` gives one that carries the card templates and the Space
app, and that, installed alone (``pip install --no-deps --target``), pushes artifacts whose cards
are rendered from it and name no path of the machine.

The wheel is built once per session, from a copy of the package's sources (so the build leaves
nothing in the checkout), without build isolation (setuptools from the test environment: no
download).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ["factors.md", "index.md", "space.md", "space_requirements.txt"]

# sitecustomize of the wheel's processes: huggingface_hub may only talk to the loopback Hub.
GUARD = textwrap.dedent("""
    import httpx2
    from huggingface_hub.utils import _http

    def refuse_other_hosts(request):
        if request.url.host not in ("127.0.0.1", "localhost", "::1"):
            raise ConnectionRefusedError(f"guard: request to {request.url.host} refused")

    _http.set_client_factory(lambda: httpx2.Client(
        event_hooks={"request": [_http.hf_request_event_hook, refuse_other_hosts]}, follow_redirects=True))
""")


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("wheel-src")
    shutil.copytree(ROOT / "hub_msif", src / "hub_msif", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(src)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (built,) = out.glob("hub_msif-*.whl")
    return built


@pytest.fixture(scope="session")
def installed(wheel, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("wheel-site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--disable-pip-version-check", "--target", str(target), str(wheel)], check=True)
    (target / "sitecustomize.py").write_text(GUARD)
    return target


def test_the_wheel_holds_the_templates_and_the_space_app(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert {f"hub_msif/hub/templates/{t}" for t in TEMPLATES} <= names
    assert "hub_msif/apps/space/app.py" in names and "hub_msif/hub/space_push.py" in names
    assert "hub-msif = hub_msif.apps.cli:main" in entry_points
    assert not any(n.startswith(("tests/", "bench/", "model_cards/", "spaces/")) for n in names)


def test_the_server_dependencies_are_an_extra_of_the_wheel(wheel):
    """Issue 20 (1): the server's modules ship, but starlette and uvicorn are only the extra ``server``."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(archive.read(n).decode() for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    server = [r for r in requires if r.lower().startswith(("starlette", "uvicorn"))]
    assert len(server) == 2 and all('extra == "server"' in r for r in server), requires
    assert "Provides-Extra: server" in metadata
    from hub_msif.hub.space_push import space_requirements

    _, space_pins = space_requirements()  # the Space's packed wheel does not need them either
    assert not any(pin.lower().startswith(("starlette", "uvicorn")) for pin in space_pins)


def test_the_packed_wheel_of_push_space_holds_what_the_built_one_does(wheel):
    from hub_msif.hub.space_push import pack_wheel

    name, data = pack_wheel()
    assert name == wheel.name
    with zipfile.ZipFile(wheel) as built:
        expected = {n for n in built.namelist() if n.startswith("hub_msif/")}
    import io

    with zipfile.ZipFile(io.BytesIO(data)) as packed:
        got = {n for n in packed.namelist() if n.startswith("hub_msif/")}
        assert packed.testzip() is None
    assert got == expected
    assert pack_wheel()[1] == data  # the same files give the same bytes


def _env(installed: Path, tmp_path: Path) -> dict:
    keep = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "HF_ENDPOINT", "HF_TOKEN", "HF_HUB_DISABLE_XET")
            if k in os.environ}
    return {**keep, "PYTHONPATH": str(installed), "HF_HOME": str(tmp_path / "hf-home"),
            "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def _hub_like_factors(fact_world, folder: Path) -> Path:
    """The fact world's factors as if fitted from Hub models and data: the manifest names Hub ids
    (the files, and their sha256s, are the same). How a card names a model fitted from a local
    folder is another matter (the model-naming of the cards); this test is about the templates."""
    shutil.copytree(fact_world["factors"], folder)
    manifest = json.loads((folder / "msif.json").read_text())
    for stage in ("pretrained", "finetuned"):
        info = manifest["stages"][stage]
        info["model"].update(id=f"msif-team/fact-world-{stage}", revision="0123456789abcdef0123456789abcdef01234567")
        info["data"]["data"] = f"msif-team/fact-world-{stage}-data"
    (folder / "msif.json").write_text(json.dumps(manifest, indent=2))
    return folder


def _hub_like_index(fact_world, folder: Path) -> Path:
    """The fact world's index as if built from a Hub dataset (same files and sha256s)."""
    shutil.copytree(fact_world["index_folder"], folder)
    manifest = json.loads((folder / "index.json").read_text())
    manifest["corpus"]["data"] = "msif-team/fact-world-pretrained-data"
    (folder / "index.json").write_text(json.dumps(manifest, indent=2))
    return folder


def test_push_from_the_installed_wheel_renders_cards_without_local_paths(installed, hub_server, fact_world, tmp_path):
    from huggingface_hub import HfApi

    env = _env(installed, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = subprocess.run([sys.executable, "-c", "import hub_msif; print(hub_msif.__file__)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, check=True)
    assert Path(probe.stdout.strip()).is_relative_to(installed)
    factors = _hub_like_factors(fact_world, tmp_path / "factors")
    index = _hub_like_index(fact_world, tmp_path / "index")
    pushes = {"factors": (factors, "alice/wheel-factors"), "index": (index, "alice/wheel-index")}
    for kind, (folder, repo) in pushes.items():
        result = subprocess.run([sys.executable, "-m", "hub_msif", "push", kind, str(folder), "--repo", repo, "--json"],
                                cwd=elsewhere, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        assert json.loads(result.stdout)["repo"] == repo
    api = HfApi()
    cards = {kind: Path(api.hf_hub_download(repo, "README.md", repo_type="dataset")).read_text()
             for kind, (_, repo) in pushes.items()}
    assert "## How they were fitted" in cards["factors"] and "msif-team/fact-world-finetuned" in cards["factors"]
    assert "load_dataset" in cards["index"]
    for kind, card in cards.items():
        for local in (str(ROOT), str(installed), str(tmp_path), str(Path.home()), "/tmp/", "site-packages",
                      "model_cards", str(fact_world["factors"])):
            assert local not in card, f"the {kind} card names {local}"
