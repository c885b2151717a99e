"""Publishing a Gradio Space that serves published factors and an index (docs/design.md, "Space").

``push_space`` makes one commit to a Hub ``space`` repo holding everything the Space needs:

- ``app.py``: the package's own Space entry point (``hub_msif/apps/space/app.py``, read as a file:
  the hub layer never imports the apps layer);
- ``hub_msif-<version>-py3-none-any.whl``: this hub_msif, packed from the running package (or the
  wheel given), so the Space depends on no unpublished package;
- ``requirements.txt``: the wheel's own dependencies, pinned to ``templates/space_requirements.txt``
  (the versions the project is tested with; gradio at the README's ``sdk_version``), and ``./<wheel>``;
- ``msif_space.json``: the factor and index locations the app serves, and the gradient index's
  when one is given (docs/design.md, "Gradient index"; a file rather than Space
  variables: it lands in the same commit as the app, so every commit says what it serves, and it
  needs no API beyond commits);
- ``README.md``: the Space's front matter (sdk, sdk_version, app_file, python_version, models,
  datasets, short_description, suggested_hardware) and a body from ``templates/space.md``.

Every other file of the repo (``.gitattributes`` aside) is deleted in that commit; a Space of
another sdk, or one hub_msif did not make, is only replaced with ``replace`` (``--replace``). Both
artifacts are checked first with the readers ``pull`` uses, and nothing is written for a bad one. Afterwards the
factor repo's card on ``main`` gets a link to the Space (``cards.with_space_link``), when the token
may write there.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import re
import sys
import zipfile
from importlib.resources import files
from pathlib import Path
from typing import Any, NamedTuple

from hub_msif import __version__
from hub_msif.artifacts.manifest import (
    FACTORS,
    GRADINDEX,
    INDEX,
    STAGES,
    check_same_modules,
    factor_files,
    gradindex_files,
    index_files,
    read_manifest,
    stage_sha256,
)
from hub_msif.errors import FactorError, HubError, HubValueError, Interrupted, MsifError, TokenRefusedError
from hub_msif.hub.cards import CARD_NAME, DEFAULT_LICENSE, card_template, with_space_link
from hub_msif.hub.connectivity import require_hub
from hub_msif.hub.hub_errors import NO_TOKEN, hub_failures
from hub_msif.hub.location import REPO_TYPE, check_repo_id, is_repo_id, parse_location, stage_locations
from hub_msif.hub.permissions import require_write_access, write_refusal

logger = logging.getLogger(__name__)

SPACE_TYPE = "space"
CONFIG_NAME = "msif_space.json"  # what the Space serves: {"factors": "REPO@REV", "index": "REPO@REV"}
APP_FILE = "app.py"
REQUIREMENTS_NAME = "requirements.txt"
SPACE_TAGS = ["hub-msif", "influence-functions", "data-attribution"]
SPACE_EXTRAS = ("retrieval", "space")  # pyproject's extras the Space's app needs
_KEPT = (".gitattributes",)


class SpacePushed(NamedTuple):
    """What ``push_space`` made: the Space commit, its URL, and whether the factor card now links it."""

    commit: str
    url: str
    card_linked: bool


def hardware_flavors() -> list[str]:
    """The Space hardware flavours ``huggingface_hub`` knows (``cpu-basic``, ``t4-small``, ...)."""
    from huggingface_hub import SpaceHardware

    return [h.value for h in SpaceHardware]


def space_requirements() -> tuple[str, list[str]]:
    """``(gradio version, the other pinned requirement lines)`` of ``templates/space_requirements.txt``."""
    lines = [line.strip() for line in
             (files("hub_msif.hub") / "templates" / "space_requirements.txt").read_text().splitlines()]
    pins = [line for line in lines if line and not line.startswith("#")]
    gradio = next((p.split("==", 1)[1] for p in pins if p.lower().startswith("gradio==")), None)
    if gradio is None:
        raise HubError("templates/space_requirements.txt pins no gradio version (the Space's sdk_version)")
    return gradio, [p for p in pins if not p.lower().startswith("gradio==")]


def app_source() -> bytes:
    """The Space entry point shipped in the package: ``hub_msif/apps/space/app.py``."""
    resource = files("hub_msif") / "apps" / "space" / APP_FILE
    if not resource.is_file():
        raise HubError("hub_msif/apps/space/app.py is missing from this hub_msif installation")
    return resource.read_bytes()


# -- the wheel ------------------------------------------------------------------------------------


def wheel_name(version: str = __version__) -> str:
    return f"hub_msif-{version}-py3-none-any.whl"


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def pack_wheel() -> tuple[str, bytes]:
    """``(file name, bytes)`` of a pure-Python wheel of the running hub_msif package: every file of
    the package folder (modules and package data, no caches), its metadata and the ``hub-msif``
    script. Its dependencies are not declared: the Space's requirements.txt pins them. The same
    files give the same bytes (fixed timestamps, sorted entries)."""
    root = Path(str(files("hub_msif")))
    dist_info = f"hub_msif-{__version__}.dist-info"
    entries: list[tuple[str, bytes]] = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root.parent).as_posix()
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo"):
            entries.append((relative, path.read_bytes()))
    gradio, pins = space_requirements()
    metadata = (f"Metadata-Version: 2.1\nName: hub_msif\nVersion: {__version__}\nRequires-Python: >=3.10\n"
                "Summary: Multi-stage influence functions for fine-tuned LLMs, with EK-FAC factors shared on the "
                "Hugging Face Hub\nLicense: Apache-2.0\n"
                + "".join(f"Requires-Dist: {pin}\n" for pin in [f"gradio=={gradio}", *pins]))
    entries += [
        (f"{dist_info}/METADATA", metadata.encode()),
        (f"{dist_info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: hub_msif.hub.space_push\nRoot-Is-Purelib: true\n"
                               b"Tag: py3-none-any\n"),
        (f"{dist_info}/entry_points.txt", b"[console_scripts]\nhub-msif = hub_msif.apps.cli:main\n"),
        (f"{dist_info}/top_level.txt", b"hub_msif\n"),
    ]
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in entries)
    entries.append((f"{dist_info}/RECORD", (record + f"{dist_info}/RECORD,,\n").encode()))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as wheel:
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            wheel.writestr(info, data)
    return wheel_name(), buffer.getvalue()


# PEP 427: {distribution}-{version}(-{build tag})?-{python tag}-{abi tag}-{platform tag}.whl
_WHEEL_FILE = re.compile(r"(?P<name>[A-Za-z0-9](?:[A-Za-z0-9._]*[A-Za-z0-9])?)-(?P<version>[A-Za-z0-9_.!+]+)"
                         r"(?:-(?P<build>[0-9][A-Za-z0-9_.]*))?-(?P<python>[A-Za-z0-9_.]+)-(?P<abi>[A-Za-z0-9_.]+)"
                         r"-(?P<platform>[A-Za-z0-9_.]+)\.whl")


def canonical_wheel_name(file_name: str) -> str:
    """The canonical PEP 427 name of a hub_msif wheel file (the distribution name normalised to
    ``hub_msif``), or ``HubValueError`` when ``file_name`` is no pure-Python hub_msif wheel name:
    pip refuses a requirement ``./hub_msif-0.1.0-py3-none-any (1).whl`` (a browser's second download)."""
    match = _WHEEL_FILE.fullmatch(file_name)
    expected = "hub_msif-<version>-py3-none-any.whl"
    if match is None or re.sub(r"[-_.]+", "_", match["name"]).lower() != "hub_msif":
        raise HubValueError(f"--wheel {file_name!r}: not a hub_msif wheel file name ({expected}, PEP 427), which "
                            "pip would refuse in requirements.txt: rename the file")
    if "py3" not in match["python"].split(".") or match["abi"] != "none" or match["platform"] != "any":
        raise HubValueError(f"--wheel {file_name!r}: not a pure-Python wheel ({expected})")
    build = f"-{match['build']}" if match["build"] else ""
    return f"hub_msif-{match['version']}{build}-{match['python']}-none-any.whl"


def given_wheel(path: str | Path) -> tuple[str, bytes]:
    """``(canonical file name, bytes)`` of the wheel ``--wheel`` names, checked: its name (PEP 427),
    a zip holding the Space app and the card templates."""
    path = Path(path)
    name = canonical_wheel_name(path.name)
    if not path.is_file():
        raise HubValueError(f"--wheel {path}: no such file")
    try:
        with zipfile.ZipFile(path) as wheel:
            names = set(wheel.namelist())
    except zipfile.BadZipFile:
        raise HubValueError(f"--wheel {path}: not a zip file") from None
    for needed in ("hub_msif/apps/space/app.py", "hub_msif/hub/templates/factors.md"):
        if needed not in names:
            raise HubValueError(f"--wheel {path}: it lacks {needed} (built from an older checkout?)")
    return name, path.read_bytes()


def wheel_dependencies(data: bytes) -> list[str]:
    """The ``Requires-Dist`` lines of a wheel's METADATA: its dependencies and those of the extras a
    Space needs (``SPACE_EXTRAS``, their marker dropped); other extras' lines are left out."""
    with zipfile.ZipFile(io.BytesIO(data)) as wheel:
        meta = next((n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")), None)
        text = wheel.read(meta).decode("utf-8", "replace") if meta else ""
    requires = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]
    kept = []
    for requirement in requires:  # the extras a Space needs (retrieval, space) count as its own; others do not
        name, _, marker = requirement.partition(";")
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", marker)
        if extra is None or extra.group(1) in SPACE_EXTRAS:
            kept.append(name.strip() if extra else requirement)
    return kept


def _project(requirement: str) -> str:
    """The normalised project name of a requirement line (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.split(r"[\s;\[<>=!~(]", requirement, maxsplit=1)[0]).lower()


def pinned_requirements(data: bytes) -> list[str]:
    """The Space's requirement lines: the wheel's own dependencies, each pinned to the tested version of
    ``templates/space_requirements.txt`` where it names one (else as the wheel declares it), and gradio
    at the sdk version whether the wheel declares it or not (``pip install -r`` then gives a runnable app)."""
    gradio, pins = space_requirements()
    tested = {_project(p): p for p in [f"gradio=={gradio}", *pins]}
    lines = [tested.get(_project(r), r) for r in wheel_dependencies(data)]
    if "gradio" not in {_project(line) for line in lines}:
        lines.insert(0, tested["gradio"])
    return list(dict.fromkeys(lines))


# -- the Space's files ----------------------------------------------------------------------------


def _hub_location(value: str, option: str):
    location = parse_location(value)
    if location.is_local or not location.revision:
        raise HubValueError(f"{option} {value!r}: a Space serves published artifacts: give REPO@REV, a dataset repo "
                            "and a version tag or commit (e.g. msif-team/pythia-410m-factors@v1)")
    return location


def _size_text(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _params_text(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


# Space hardware flavours and the memory each offers (GB = 10**9 bytes; the Hub's published sizes): the
# card marks those that hold the attribution plan's total and a runtime margin.
CARD_FLAVOURS = (("cpu-basic", 16, "RAM"), ("t4-small", 16, "GPU"), ("l4x1", 24, "GPU"), ("a10g-small", 24, "GPU"),
                 ("a100-large", 80, "GPU"))
CARD_RUNTIME_MARGIN = 10**9  # the runtime (Python, torch, a CUDA context) the plan leaves out
CARD_PLAN_TOKENS = 512  # candidate documents (and the query) the card's plan assumes, at most the model's maximum
CARD_PLAN_CANDIDATES = 100  # the Space's default number of candidates (MSIF_DEFAULT_CANDIDATES)


def attribution_memory(manifest: dict) -> str:
    """The card's memory paragraph: ``hub_msif.factors.attribution_plan`` for one MS-IF query at full rank over
    100 candidates, from ``manifest`` (both stages' modules and storage dtypes) and the two recorded
    models' configs (Hub ids: ``config.json`` only, at the recorded commit); when a config cannot be
    had, a sentence saying so instead of a number."""
    from hub_msif.factors.attribution_plan import plan_stages
    from hub_msif.factors.memory_plan import load_config
    from hub_msif.models import recorded_model

    configs = {}
    try:
        for stage in STAGES:  # a local model folder: found on this machine by its weights' sha256, if at all
            configs[stage] = load_config(*recorded_model(manifest["stages"][stage]["model"], f"{stage} model"))
        max_length = min(int(getattr(configs["pretrained"], "max_position_embeddings", 0) or CARD_PLAN_TOKENS),
                         CARD_PLAN_TOKENS)
        plan = plan_stages(manifest, configs, candidates=CARD_PLAN_CANDIDATES, length=max_length)
    except Exception as err:  # noqa: BLE001 (any failure to read a config: the card says so, the push goes on)
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        logger.warning("the Space card gives no memory plan: %s", first)
        for stage in STAGES:  # a local model folder is named by its last part, never the pusher's path
            model = str(((manifest.get("stages") or {}).get(stage) or {}).get("model", {}).get("id", ""))
            if model and not is_repo_id(model):
                first = first.replace(model, Path(model).name)
        return (f"The memory this Space needs could not be planned when it was pushed: {first}. Plan it with "
                f"`hub-msif attribute --plan --factors <these factors> [--pretrained ID] [--finetuned ID]`.")
    total = plan.total_bytes
    fitting = [f"`{name}`" for name, size, _ in CARD_FLAVOURS if total + CARD_RUNTIME_MARGIN <= size * 10**9]
    return (
        f"One attribution (MS-IF, one query at full rank, {plan.candidates} candidates of up to "
        f"{plan.candidate_length} tokens, batches of {plan.batch_size}) needs **{total / 1e9:.2f} GB** on its device "
        f"(`hub-msif attribute --plan`; GB = 10^9 bytes): both models' weights {plan.weight_bytes / 1e9:.2f} GB "
        f"({plan.model_dtypes['pretrained']}), both stages' factors {plan.factor_bytes / 1e9:.2f} GB (as stored, "
        f"{plan.tracked_modules} modules per stage), the preconditioned query "
        f"{plan.parts['preconditioned query'] / 1e9:.2f} GB, and the rest for the {plan.peak_phase} phase's "
        f"working set; add about 1 GB for the runtime. "
        + (f"Hardware with room for it: {', '.join(fitting)}." if fitting else
           "None of " + ", ".join(f"`{n}`" for n, _, _ in CARD_FLAVOURS) + " has room for it: push factors of MLP "
           "modules only, or a smaller model.")
    )


def space_card(repo_id: str, factors: str, index: str, manifest: dict, factor_bytes: int, wheel: str,
               endpoint: str, hardware: str | None = None, license: str = DEFAULT_LICENSE) -> str:
    """The README of the Space: front matter the Hub reads, and the body of ``templates/space.md``.
    ``factors``: the pair's ``REPO@REV``, or ``pretrained REPO@REV + finetuned REPO@REV``."""
    from huggingface_hub import SpaceCard, SpaceCardData

    gradio_version, _ = space_requirements()
    models = {stage: manifest["stages"][stage]["model"]["id"] for stage in STAGES}
    tracked = sum(int(m["d_out"]) * int(m["d_in"]) for m in manifest["stages"]["finetuned"].get("modules") or [])
    extra: dict[str, Any] = {"suggested_hardware": hardware} if hardware else {}  # to SpaceCardData's **kwargs
    card_data = SpaceCardData(
        title="MS-IF attribution", sdk="gradio", sdk_version=gradio_version, app_file=APP_FILE,
        python_version=f"{sys.version_info.major}.{sys.version_info.minor}",
        # local model folders are no Hub ids: the Hub would refuse them (and they name the pusher's paths)
        models=[m for m in dict.fromkeys(models.values()) if is_repo_id(m)] or None,
        datasets=list(dict.fromkeys([*_repos_of(factors), index.split("@")[0]])), license=license,
        tags=list(SPACE_TAGS),
        short_description="Which pre-training documents made it say that?", emoji="🔎",
        colorFrom="blue", colorTo="indigo", pinned=False, **extra,
    )
    base = endpoint.rstrip("/")
    # a model fitted from a local folder is named by the folder's last part, never the pusher's path
    shown = {stage: m if is_repo_id(m) else f"{Path(m).name} (a local model folder)" for stage, m in models.items()}
    return str(SpaceCard.from_template(
        card_data, template_path=str(card_template("space")), repo_id=repo_id, factors=factors, index=index,
        factors_url=f"{base}/datasets/{_repos_of(factors)[-1]}", index_url=f"{base}/datasets/{index.split('@')[0]}",
        pretrained=shown["pretrained"], finetuned=shown["finetuned"], library_version=__version__,
        wheel_name=wheel, factor_size=_size_text(factor_bytes), tracked_params=_params_text(tracked),
        hardware=hardware, attribution_memory=attribution_memory(manifest),
    ))


def _repos_of(factors: str) -> list[str]:
    """The factor repo ids in a pair location ``REPO@REV`` or ``pretrained REPO@REV + finetuned REPO@REV``."""
    return list(dict.fromkeys(part.split()[-1].split("@")[0] for part in factors.split(" + ")))


def space_files(repo_id: str, factors: str | dict, index: str, manifest: dict, factor_bytes: int, endpoint: str,
                hardware: str | None = None, wheel: str | Path | None = None,
                gradindex: str | None = None) -> dict[str, bytes]:
    """``{path: content}`` of every file of the Space (see the module docstring); ``factors`` is a pair
    location or ``{stage: location}``; ``gradindex`` (optional) the gradient index's location."""
    name, data = given_wheel(wheel) if wheel is not None else pack_wheel()
    requirements = ("# The hub_msif wheel's own dependencies, pinned to the versions hub_msif is tested with (gradio at "
                    "README.md's sdk_version).\n" + "".join(f"{p}\n" for p in pinned_requirements(data))
                    + f"# hub_msif {__version__} itself, shipped in this repo\n./{name}\n")
    config = ({f"factors_{stage}": location for stage, location in factors.items()} if isinstance(factors, dict)
              else {"factors": factors}) | {"index": index} | ({"gradindex": gradindex} if gradindex else {})
    shown = (" + ".join(f"{stage} {location}" for stage, location in factors.items()) if isinstance(factors, dict)
             else factors)
    return {
        APP_FILE: app_source(),
        name: data,
        REQUIREMENTS_NAME: requirements.encode(),
        CONFIG_NAME: (json.dumps(config, indent=2) + "\n").encode(),
        CARD_NAME: space_card(repo_id, shown, index, manifest, factor_bytes, name, endpoint, hardware).encode(),
    }


# -- the push -------------------------------------------------------------------------------------


def push_space(repo_id: str, factors: str | None, index: str, private: bool = False, hardware: str | None = None,
               token: str | None = None, wheel: str | Path | None = None, commit_message: str | None = None,
               link_card: bool = True, factors_pretrained: str | None = None,
               factors_finetuned: str | None = None, replace: bool = False,
               gradindex: str | None = None) -> SpacePushed:
    """Publishes a Gradio Space that serves ``factors`` (a pair) or ``factors_pretrained`` and
    ``factors_finetuned`` (each stage from its own repo; either replaces that stage of ``factors``)
    and ``index``, all ``REPO@REV`` of published artifacts, as one commit to the space repo
    ``repo_id`` (created when missing, private with ``private``, on ``hardware`` when given).

    Before anything is written, both artifacts are checked with the readers ``pull`` and
    ``attribute`` use: each manifest (format and version), the sha256 of every file it lists
    against the Hub's listing at that revision, the stage pair (both stages, the same modules) and
    the index's embedding model record. An existing Space of another sdk, or one that hub_msif did
    not make, whose files this commit would delete, is refused unless ``replace``. A private
    artifact behind a public Space is warned about. Then each factor repo's card links the Space,
    when ``link_card`` and the token may write there. Ctrl-C raises ``Interrupted`` saying whether
    the Space commit landed. ``gradindex`` (``REPO@REV``, optional): a published gradient index of
    the pre-trained stage, checked like the others and to be built from exactly that stage's factors,
    served beside the index (docs/design.md, "Gradient index"). Returns ``(commit, url, card_linked)``."""
    progress = {"step": "prepare", "api": None, "head": None, "commit": None}
    try:
        return _push_space(repo_id, factors, index, private, hardware, token, wheel, commit_message, link_card,
                           factors_pretrained, factors_finetuned, replace, progress, gradindex)
    except Interrupted:
        raise
    except KeyboardInterrupt as err:
        raise Interrupted(_interrupted_space(repo_id, progress)) from err


def _interrupted_space(repo_id: str, progress: dict) -> str:
    """The one-line account of a ``push space`` stopped by Ctrl-C: did the Space commit land?"""
    step = progress["step"]
    if step == "prepare":
        return f"interrupted before the Space commit was sent: {repo_id} is unchanged"
    if step == "commit":
        try:
            refs = progress["api"].list_repo_refs(repo_id, repo_type=SPACE_TYPE)
            head = next((b.target_commit for b in refs.branches if b.name == "main"), None)
        except (Exception, KeyboardInterrupt):
            return (f"interrupted while the Space commit was being sent to {repo_id}; whether it landed cannot be told "
                    "now: look at the Space's history, or run the same command again (it leaves the same files)")
        if head == progress["head"]:
            return f"interrupted before the Space commit landed: {repo_id} is unchanged; run the command again"
        progress["commit"] = head
    return (f"interrupted after the Space commit {progress['commit']} landed on {repo_id}, before the factor card "
            "linked it; run the command again to add the link")


def _push_space(repo_id, factors, index, private, hardware, token, wheel, commit_message, link_card,
                factors_pretrained, factors_finetuned, replace, progress, gradindex=None) -> SpacePushed:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils import get_token

    check_repo_id(repo_id)
    given = stage_locations(factors, factors_pretrained, factors_finetuned)
    locations = {stage: _hub_location(value, f"--factors-{stage}" if value != factors else "--factors")
                 for stage, value in given.items()}
    index_location = _hub_location(index, "--index")
    gradindex_location = _hub_location(gradindex, "--gradindex") if gradindex is not None else None
    if hardware is not None and hardware not in hardware_flavors():
        raise HubValueError(f"--hardware {hardware!r} is not a Space hardware flavour; use one of "
                            f"{', '.join(hardware_flavors())}")
    token = token or get_token()
    doing = f"cannot push the Space {repo_id}"
    if not token:
        raise TokenRefusedError(f"{doing}: {NO_TOKEN}")
    require_hub(doing)
    api = progress["api"] = HfApi(token=token)
    manifest: dict[str, Any] = {"stages": {}}
    factor_bytes, private_repos = 0, {}
    for stage, location in locations.items():
        stage_manifest, sizes, hidden = _read_factors(api, location, stage, doing)
        manifest["stages"][stage] = stage_manifest["stages"][stage]
        factor_bytes += sum(sizes.get(path, 0) for path in factor_files(stage_manifest, stages=[stage]))
        if stage == "pretrained" or locations["pretrained"] != location:
            factor_bytes += sizes.get(FACTORS.manifest_name, 0)
        private_repos[location.repo_id] = hidden
    try:
        check_same_modules(manifest["stages"])
    except FactorError as err:
        raise HubValueError(f"{doing}: {err}") from None
    private_repos[index_location.repo_id] = _read_index(api, index_location, doing)
    if gradindex_location is not None:
        private_repos[gradindex_location.repo_id] = _read_gradindex(api, gradindex_location,
                                                                    manifest["stages"]["pretrained"], doing)
    pair = locations["pretrained"] == locations["finetuned"]
    served: str | dict[str, str]
    if pair:
        served = described = str(locations["pretrained"])
    else:
        served = {stage: str(loc) for stage, loc in locations.items()}
        described = " + ".join(f"{stage} {loc}" for stage, loc in served.items())
    content = space_files(repo_id, served, str(index_location), manifest, factor_bytes, api.endpoint, hardware, wheel,
                          str(gradindex_location) if gradindex_location is not None else None)
    with hub_failures(repo_id, None, doing, token):
        require_write_access(api, repo_id, doing)
        existed = api.repo_exists(repo_id, repo_type=SPACE_TYPE)
        head, remote, public = None, [], not private
        if existed:  # read before anything is written: a Space this push must not silently replace
            info = api.space_info(repo_id)
            public = not info.private
            refs = api.list_repo_refs(repo_id, repo_type=SPACE_TYPE)
            head = next((b.target_commit for b in refs.branches if b.name == "main"), None)
            remote = [e.path for e in api.list_repo_tree(repo_id, repo_type=SPACE_TYPE, revision=head,
                                                         recursive=True) if isinstance(e, RepoFile)] if head else []
            _check_replace(repo_id, info.sdk, remote, content, replace, doing)
        for repo, hidden in private_repos.items():
            if hidden and public:
                logger.warning("%s is private: the public Space %s names it in its README, and the Space can read it "
                               "only with a token (add HF_TOKEN as a secret of the Space)", repo, repo_id)
        url = str(api.create_repo(repo_id, repo_type=SPACE_TYPE, space_sdk="gradio", private=True if private else None,
                                  space_hardware=hardware, exist_ok=True))
        if existed and hardware:
            api.request_space_hardware(repo_id, hardware)
        if not existed:
            refs = api.list_repo_refs(repo_id, repo_type=SPACE_TYPE)
            head = next((b.target_commit for b in refs.branches if b.name == "main"), None)
        operations: list[CommitOperationAdd | CommitOperationDelete] = [
            CommitOperationAdd(path_in_repo=p, path_or_fileobj=c) for p, c in content.items()]
        operations += [CommitOperationDelete(path_in_repo=p) for p in sorted(remote)
                       if p not in content and p not in _KEPT]
        progress.update(step="commit", head=head)
        commit = api.create_commit(
            repo_id, operations, repo_type=SPACE_TYPE, parent_commit=head,
            commit_message=commit_message or f"hub_msif Space serving {described}",
            commit_description=f"app.py, README.md, requirements.txt, {CONFIG_NAME} and the hub_msif {__version__} "
                               f"wheel; factors {described}, index {index_location}.",
        ).oid
        progress.update(step="link", commit=commit)
    linked = True
    for location in dict.fromkeys(locations.values()):
        linked = (link_card and _link_factor_card(api, location.repo_id, repo_id, url, str(location))) and linked
    logger.info("pushed the Space %s (commit %s) serving %s and %s", repo_id, commit, described, index_location)
    return SpacePushed(commit, url, linked)


def _check_replace(repo_id: str, sdk: str | None, remote: list[str], content: dict, replace: bool, doing: str) -> None:
    """Refuses (unless ``replace``) to push over a Space of another sdk, or over one hub_msif did
    not make (no ``msif_space.json``) whose files the commit would delete, naming them."""
    deleted = [p for p in sorted(remote) if p not in content and p not in _KEPT]
    foreign_sdk = sdk not in (None, "gradio")
    if replace or not (foreign_sdk or (deleted and CONFIG_NAME not in remote)):
        return
    what = f"a {sdk} Space" if foreign_sdk else "a Space that hub_msif did not make"
    shown = ", ".join(deleted[:5]) + (f" and {len(deleted) - 5} more" if len(deleted) > 5 else "")
    raise HubValueError(f"{doing}: {repo_id} is {what}; pushing would make it a gradio Space and delete "
                        f"{len(deleted)} file(s){': ' + shown if deleted else ''}; give --replace to replace it")


def _listed_sha256(api, location, siblings: dict, files: dict[str, str], doing: str) -> None:
    """Checks each ``{path: sha256}`` of a manifest against the Hub's files at the location's
    revision: the LFS sha256 of the listing, or the content's for a regular (small) file."""
    from hub_msif.artifacts.atomic import file_sha256

    for path, expected in files.items():
        sibling = siblings.get(path)
        if sibling is None:
            raise HubValueError(f"{doing}: {location} lacks {path}, which its manifest lists")
        lfs = sibling.lfs
        actual = (lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)) if lfs else None
        if actual is None:
            with hub_failures(location.repo_id, location.revision, doing):
                actual = file_sha256(api.hf_hub_download(location.repo_id, path, repo_type=REPO_TYPE,
                                                         revision=location.revision))
        if actual != expected:
            raise HubValueError(f"{doing}: {location}: {path} has sha256 {actual[:16]}..., its manifest says "
                                f"{str(expected)[:16]}...: the artifact is damaged")


def _read_artifact(api, location, kind, doing: str) -> tuple[dict, dict, bool]:
    """``(manifest, {path: sibling}, private)`` of the artifact published at ``location``, its
    manifest read by ``read_manifest`` (format and version), as ``pull`` reads it."""
    what = {"factors": "factors", "index": "index", "gradindex": "gradient index"}[kind.name]
    with hub_failures(location.repo_id, location.revision, f"{doing}: reading the {what}"):
        manifest_path = Path(api.hf_hub_download(location.repo_id, kind.manifest_name, repo_type=REPO_TYPE,
                                                 revision=location.revision))
        info = api.dataset_info(location.repo_id, revision=location.revision, files_metadata=True)
    try:
        manifest = read_manifest(manifest_path.parent, kind)
    except MsifError as err:
        reason = str(err).replace(str(manifest_path), kind.manifest_name).replace(str(manifest_path.parent), "")
        raise HubValueError(f"{doing}: {location} is no published hub_msif {what}: {reason}") from err
    return manifest, {s.rfilename: s for s in info.siblings or []}, bool(info.private)


def _read_factors(api, location, stage: str, doing: str) -> tuple[dict, dict[str, int], bool]:
    """The factor manifest at ``location`` (checked to hold ``stage`` with a string model id and
    files whose sha256 the Hub lists), the sizes of the files there, and whether the repo is private."""
    manifest, siblings, private = _read_artifact(api, location, FACTORS, doing)
    try:
        if not isinstance(manifest["stages"][stage]["model"]["id"], str):
            raise TypeError(f"the {stage} stage's model id is not a string")
        files = factor_files(manifest, stages=[stage])
        for entry in manifest["stages"][stage]["modules"]:
            int(entry["d_in"]), int(entry["d_out"]), str(entry["name"])  # noqa: B018 (what stage_differences reads)
    except (ValueError, KeyError, TypeError) as err:
        raise HubValueError(f"{doing}: {location} holds no {stage} factors in its manifest ({FACTORS.manifest_name}): "
                            f"{type(err).__name__}: {err}") from err
    _listed_sha256(api, location, siblings, files, doing)
    return manifest, {path: s.size or 0 for path, s in siblings.items()}, private


def _read_gradindex(api, location, pretrained: dict, doing: str) -> bool:
    """Checks the gradient index published at ``location`` as ``GradientIndex.load`` reads it (manifest,
    the sha256 of its documents and shards) and that it was built from exactly the served pre-trained
    stage (``pretrained``: that stage's manifest entry, by its sha256). Returns whether the repo is private."""
    manifest, siblings, private = _read_artifact(api, location, GRADINDEX, doing)
    try:
        files = gradindex_files(manifest)
    except MsifError as err:
        raise HubValueError(f"{doing}: {location}: {err}") from None
    _listed_sha256(api, location, siblings, files, doing)
    built = manifest.get("stage") or {}
    if built.get("manifest_sha256") != stage_sha256(pretrained):
        model = built.get("model") or {}
        raise HubValueError(f"{doing}: the gradient index {location} was built for other pre-trained factors "
                            f"({model.get('id')}@{model.get('revision')}, {built.get('location')}) than the Space "
                            "serves: build one for these factors (hub-msif gradindex build)")
    return private


def _read_index(api, location, doing: str) -> bool:
    """Checks the index published at ``location`` as ``DocumentIndex.load`` would read it: manifest,
    the sha256 of its documents and embeddings, its embedding model record and sizes. Returns
    whether the repo is private."""
    manifest, siblings, private = _read_artifact(api, location, INDEX, doing)
    try:
        files = index_files(manifest)
        model = manifest.get("embedding_model")
        if not isinstance(model, dict) or not isinstance(model.get("id"), str) or not model["id"].strip():
            raise ValueError(f"its embedding_model record is {model!r}, not {{\"id\", \"revision\"}}")
        for key in ("num_documents", "dimension"):
            value = manifest.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"its {key} is {value!r}, not a positive integer")
    except (ValueError, MsifError) as err:
        raise HubValueError(f"{doing}: {location} is no usable index ({INDEX.manifest_name}): {err}") from err
    _listed_sha256(api, location, siblings, files, doing)
    return private


def _link_factor_card(api, factor_repo: str, space_id: str, url: str, served: str) -> bool:
    """Adds the Space's link to the card on ``main`` of ``factor_repo`` (one commit; none when the
    card links it already). False, with a warning, when the token may not write there or the card
    cannot be read: the Space itself is published either way."""
    from huggingface_hub import CommitOperationAdd

    try:
        reason = write_refusal(api.whoami(cache=True), factor_repo.split("/")[0])
        if reason:
            logger.warning("the card of %s does not link the Space %s: %s", factor_repo, space_id, reason)
            return False
        card = Path(api.hf_hub_download(factor_repo, CARD_NAME, repo_type=REPO_TYPE, revision="main")).read_text()
        updated = with_space_link(card, space_id, url, served)
        if updated != card:
            api.create_commit(factor_repo, [CommitOperationAdd(CARD_NAME, updated.encode())], repo_type=REPO_TYPE,
                              commit_message=f"card: link the Space {space_id}")
        return True
    except Exception as err:  # the Space is out; a card that cannot be updated is worth a warning only
        logger.warning("the card of %s does not link the Space %s: %s", factor_repo, space_id,
                       str(err).splitlines()[0] if str(err) else type(err).__name__)
        return False
