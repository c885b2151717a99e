"""Finding published factors: a pair of stages, or one stage of a model (docs/design.md, "Hub artifacts").

A model is identified by its revision: a Hub commit sha, or a sha256 over a local folder's
weights (which identifies the weights wherever the folder lies). Both searches read the dataset
repos tagged ``hub-msif`` and ``ekfac`` and their version tags ``vN``: ``find_factors`` returns the
newest version recorded on both models of a pair; ``find_stages`` lists every published stage of
one model (a pre-trained stage serves every fine-tune of its base), newest first, each pre-trained
stage with the gradient indexes built from it (repos tagged ``hub-msif`` and ``gradient-index``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from hub_msif.artifacts.manifest import FACTORS, GRADINDEX, STAGES, ArtifactKind
from hub_msif.errors import HubError, RepositoryNotFoundError
from hub_msif.hub.cards import FACTOR_TAGS, GRADINDEX_TAGS, gradindex_bytes_per_document, public_source
from hub_msif.hub.connectivity import require_hub
from hub_msif.hub.hub_errors import endpoint, first_line, hub_failures
from hub_msif.hub.location import REPO_TYPE, parse_location
from hub_msif.hub.push import version_number
from hub_msif.models import ModelRef, folder_revision, is_commit_sha, local_name

logger = logging.getLogger(__name__)


def model_ref(model: str | Path | ModelRef, token: str | None = None) -> ModelRef:
    """The ``ModelRef`` of a model given as ``ModelRef``, local folder, ``ID@REV`` or Hub ``ID``
    (resolved to the current commit sha of its ``main``)."""
    if isinstance(model, ModelRef):
        return model
    path = Path(model)
    if path.is_dir():
        return ModelRef(local_name(path), folder_revision(path), folder=str(path.resolve()))
    model = str(model)
    model_id, _, revision = model.partition("@")
    if revision and is_commit_sha(revision):
        return ModelRef(model_id, revision)
    from huggingface_hub import HfApi, errors

    try:
        info = HfApi(token=token).model_info(model_id, revision=revision or None)
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as err:
        raise RepositoryNotFoundError(f"model {model!r} is neither a local folder nor a model on {endpoint()}") from err
    except Exception as err:
        raise HubError(f"cannot resolve the revision of model {model!r}: {first_line(err)}") from err
    if info.sha is None:  # model_info always gives it; None only in partial (expand=) answers
        raise HubError(f"cannot resolve the revision of model {model!r}: the Hub gave no commit sha")
    return ModelRef(model_id, info.sha)


def same_model(recorded: dict, ref: ModelRef) -> bool:
    """Whether a manifest's model entry is the model ``ref``: the same revision (a commit sha, or a
    sha256 over the weights, which identifies the weights wherever the folder lies), and for Hub
    commits the same repo id."""
    revision = recorded.get("revision")
    if revision != ref.revision:
        return False
    return str(revision).startswith("sha256:") or recorded.get("id") == ref.id


def _published_versions(api, author: str | None, token: str | None, what: str, kind: ArtifactKind = FACTORS):
    """``(repos searched, iterator of (repo id, tag, commit, date, manifest))`` over every version
    ``vN`` of every factor repo (``kind`` GRADINDEX: every gradient index repo), each repo's newest
    first; unreadable ones are skipped (logged)."""
    tags = GRADINDEX_TAGS[:2] if kind is GRADINDEX else FACTOR_TAGS[:2]
    with hub_failures("(search)", None, what, token):
        candidates = list(api.list_datasets(filter=tags, author=author))

    def versions():
        for dataset in candidates:
            repo_id = dataset.id
            try:
                tags = api.list_repo_refs(repo_id, repo_type=REPO_TYPE).tags
                dates = {c.commit_id: c.created_at for c in api.list_repo_commits(repo_id, repo_type=REPO_TYPE)}
            except Exception as err:
                logger.info("skipping %s: %s", repo_id, first_line(err))
                continue
            numbered = sorted(((n, t) for t in tags if (n := version_number(t.name)) is not None), reverse=True,
                              key=lambda item: item[0])
            for _, tag in numbered:
                try:
                    path = api.hf_hub_download(repo_id, kind.manifest_name, repo_type=REPO_TYPE,
                                               revision=tag.target_commit)
                    manifest = json.loads(Path(path).read_text())
                    if kind is GRADINDEX and manifest.get("format") != kind.format_name:
                        raise ValueError(f"the manifest is not a {kind.format_name} manifest")
                    if not isinstance(manifest.get("stages" if kind is FACTORS else "stage"), dict):
                        raise ValueError("the manifest records no stage")
                except Exception as err:
                    logger.info("skipping %s@%s: %s", repo_id, tag.name, first_line(err))
                    continue
                yield repo_id, tag.name, tag.target_commit, dates.get(tag.target_commit), manifest

    return len(candidates), versions()


def _stage_summary(repo_id: str, tag: str, commit: str, date, stage: str, manifest: dict) -> dict:
    """One published stage as ``find_stages`` lists it: where, which model, fitted on what, how."""
    info = manifest["stages"][stage]
    model, data, fit = dict(info.get("model") or {}), dict(info.get("data") or {}), dict(info.get("fit") or {})
    measured = ("num_sequences", "num_tokens", "num_processes", "seconds", "hub_msif_version", "torch_version")
    return {
        "location": f"{repo_id}@{tag}", "repo": repo_id, "tag": tag, "commit": commit,
        "date": date.isoformat() if hasattr(date, "isoformat") else date, "stage": stage,
        "stages_in_version": [s for s in STAGES if s in manifest["stages"]],
        "model": {k: model[k] for k in ("id", "revision", "local", "base") if k in model},
        "data": {**{k: data.get(k) for k in ("data", "split", "revision", "source_sha256") if data.get(k) is not None},
                 "data": public_source(data.get("data"))},
        "num_sequences": fit.get("num_sequences"), "num_tokens": fit.get("num_tokens"),
        "settings": {k: v for k, v in fit.items() if k not in measured},
        "num_modules": len(info.get("modules") or []),
    }


def find_stages(model: str | Path | ModelRef, revision: str | None = None, stage: str | None = None,
                token: str | None = None, author: str | None = None, gradindexes: bool = True) -> list[dict]:
    """Every published stage of ``model``, newest first (by the date of the tagged commit), each
    with the published gradient indexes built from it (``gradient_indexes``; ``gradindexes=False``:
    not searched).

    ``model``: a Hub id (every revision, unless ``revision`` or ``ID@REV`` is given: then that
    commit only), a local folder (matched by its weights' sha256), or a ``ModelRef``. ``stage``:
    ``pretrained`` or ``finetuned`` only. Each entry (``_stage_summary``) says where it is
    (``REPO@TAG``), the model id and revision, the data it was fitted on and its settings.
    """
    from huggingface_hub import HfApi

    if stage is not None and stage not in STAGES:
        raise HubError(f"stage must be one of {', '.join(STAGES)}, not {stage!r}")
    require_hub("cannot search the Hub for factors")
    text = str(model) if not isinstance(model, ModelRef) else model.id
    exact = isinstance(model, ModelRef) or Path(text).is_dir() or "@" in text or revision is not None
    ref = model_ref(f"{text}@{revision}" if revision is not None and not Path(text).is_dir() else model, token) \
        if exact else None
    wanted_id = ref.id if ref is not None else text
    api = HfApi(token=token)
    _, versions = _published_versions(api, author, token, "cannot search the Hub for factors")
    found = []
    for repo_id, tag, commit, date, manifest in versions:
        for name in STAGES if stage is None else [stage]:
            recorded = (manifest["stages"].get(name) or {}).get("model") or {}
            if not recorded:
                continue
            matches = same_model(recorded, ref) if ref is not None else recorded.get("id") == wanted_id
            if matches:
                found.append(_stage_summary(repo_id, tag, commit, date, name, manifest))
    found.sort(key=lambda e: (e["date"] is not None, e["date"] or "", e["location"]), reverse=True)
    if gradindexes:
        _attach_gradindexes(api, found, author, token)
    return found


def _gradindex_summary(repo_id: str, tag: str, commit: str, date, manifest: dict) -> dict:
    """One published gradient index as ``find_stages`` lists it beside its stage."""
    stage, projection = dict(manifest.get("stage") or {}), dict(manifest.get("projection") or {})
    corpus, model = dict(manifest.get("corpus") or {}), dict(stage.get("model") or {})
    return {
        "location": f"{repo_id}@{tag}", "repo": repo_id, "tag": tag, "commit": commit,
        "date": date.isoformat() if hasattr(date, "isoformat") else date,
        "model": {k: model[k] for k in ("id", "revision", "local") if k in model},
        "stage_location": stage.get("location"), "stage_manifest_sha256": stage.get("manifest_sha256"),
        "num_documents": manifest.get("num_documents"),
        "corpus": {**{k: corpus[k] for k in ("split", "revision", "documents_sha256") if corpus.get(k) is not None},
                   "data": public_source(corpus.get("data"))},
        "projection": {k: projection[k] for k in ("kind", "k", "dims", "balance", "seed", "damping", "relative")
                       if k in projection},
        "bytes_per_document": gradindex_bytes_per_document(manifest),
        "check": manifest.get("check"),
    }


def _names_version(location, entry: dict) -> bool | None:
    """Whether a gradient index's recorded stage ``location`` names the published stage ``entry``
    (its repo at its tag or commit); None when it names no published version at all (a local
    folder, or a branch such as ``main``), so that only the model can tell."""
    if not isinstance(location, str):
        return None
    try:
        where = parse_location(location)
    except HubError:
        return None
    if where.repo_id is None:
        return None
    if where.repo_id == entry["repo"] and where.revision in (entry["tag"], entry["commit"]):
        return True
    if where.revision is None or (version_number(where.revision) is None and not is_commit_sha(where.revision)):
        return None  # a branch: which version it pointed at when the index was built is not recorded
    return False


def _attach_gradindexes(api, found: list[dict], author: str | None, token: str | None) -> None:
    """Adds ``gradient_indexes`` to each listed stage: every published gradient index built from it
    (for a pre-trained stage). An index belongs to a stage when it records the stage's model (same
    revision) and names that stage's version (``REPO@TAG`` or commit) as its ``stage.location``
    (``pinned``); an index whose location names no published version (built from a local folder or
    a branch) is listed beside every pre-trained stage of its model, ``pinned`` false."""
    for entry in found:
        entry["gradient_indexes"] = []
    stages = [e for e in found if e["stage"] == "pretrained"]
    if not stages:
        return
    _, versions = _published_versions(api, author, token, "cannot search the Hub for gradient indexes", GRADINDEX)
    for repo_id, tag, commit, date, manifest in versions:
        summary = _gradindex_summary(repo_id, tag, commit, date, manifest)
        for entry in stages:
            if not same_model(summary["model"], ModelRef(entry["model"]["id"], entry["model"]["revision"])):
                continue
            pinned = _names_version(summary["stage_location"], entry)
            if pinned is not False:
                entry["gradient_indexes"].append({**summary, "pinned": bool(pinned)})
    for entry in stages:
        entry["gradient_indexes"].sort(key=lambda g: (g["date"] is not None, g["date"] or "", g["location"]),
                                       reverse=True)


def _by_date(item: tuple) -> tuple:
    """Sort key of ``(date or None, ...)``: undated entries before every dated one."""
    return (item[0] is not None, item[0] or 0)


def find_factors(pretrained: str | Path | ModelRef, finetuned: str | Path | ModelRef, token: str | None = None,
                 author: str | None = None) -> str:
    """``REPO@TAG`` of the newest published factors holding both stages of this model pair.

    Candidates are the dataset repos tagged ``hub-msif`` and ``ekfac`` (of ``author``, when
    given); in each, versions ``vN`` are read newest first, and the first whose manifest records
    both models (same revisions) is the repo's match. Among repos, the newest tagged commit wins.
    When no version holds the pair but each stage is published on its own, the error names both
    (``--factors-pretrained``, ``--factors-finetuned``).
    """
    from huggingface_hub import HfApi

    require_hub("cannot search the Hub for factors")  # one line at once, rather than retries for half a minute
    refs = {"pretrained": model_ref(pretrained, token), "finetuned": model_ref(finetuned, token)}
    api = HfApi(token=token)
    searched, versions = _published_versions(api, author, token, "cannot search the Hub for factors")
    matches, seen, stages = [], set(), {}  # type: list, set, dict
    for repo_id, tag, _, date, manifest in versions:
        held = [s for s in STAGES if same_model((manifest["stages"].get(s) or {}).get("model") or {}, refs[s])]
        for stage in held:  # each stage's newest version, for the hint below
            found = (date, f"{repo_id}@{tag}")
            stages[stage] = max(stages.get(stage, found), found, key=_by_date)
        if repo_id not in seen and len(held) == len(STAGES):
            seen.add(repo_id)
            matches.append((date, repo_id, tag))
    if not matches:
        described = "; ".join(f"{s} {refs[s].id} at {refs[s].revision}" for s in STAGES)
        hint = ""
        if len(stages) == len(STAGES):
            hint = (f"; each stage is published on its own: --factors-pretrained {stages['pretrained'][1]} "
                    f"--factors-finetuned {stages['finetuned'][1]}")
        raise HubError(f"no published factors match {described} (searched {searched} dataset repo(s) "
                       f"tagged {' and '.join(FACTOR_TAGS[:2])} on {endpoint()}){hint}")
    matches.sort(key=_by_date, reverse=True)
    _, repo_id, tag = matches[0]
    return f"{repo_id}@{tag}"
