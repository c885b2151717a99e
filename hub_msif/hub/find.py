"""Finding published factors for a model pair (docs/design.md, "Hub artifacts").

A model is identified by its revision: a Hub commit sha, or a sha256 over a local folder's
weights (which identifies the weights wherever the folder lies). ``find_factors`` searches the
dataset repos tagged ``hub-msif`` and ``ekfac`` for the newest version recorded on both models.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from hub_msif.artifacts.manifest import FACTORS, STAGES
from hub_msif.errors import HubError, RepositoryNotFoundError
from hub_msif.hub.cards import FACTOR_TAGS
from hub_msif.hub.failures import endpoint, first_line, hub_failures
from hub_msif.hub.location import REPO_TYPE
from hub_msif.hub.push import version_number
from hub_msif.hub.reach import require_hub
from hub_msif.models import ModelRef, folder_revision, is_commit_sha

logger = logging.getLogger(__name__)


def model_ref(model: str | Path | ModelRef, token: str | None = None) -> ModelRef:
    """The ``ModelRef`` of a model given as ``ModelRef``, local folder, ``ID@REV`` or Hub ``ID``
    (resolved to the current commit sha of its ``main``)."""
    if isinstance(model, ModelRef):
        return model
    path = Path(model)
    if path.is_dir():
        return ModelRef(str(path.resolve()), folder_revision(path))
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
    return ModelRef(model_id, info.sha)


def same_model(recorded: dict, ref: ModelRef) -> bool:
    """Whether a manifest's model entry is the model ``ref``: the same revision (a commit sha, or a
    sha256 over the weights, which identifies the weights wherever the folder lies), and for Hub
    commits the same repo id."""
    revision = recorded.get("revision")
    if revision != ref.revision:
        return False
    return str(revision).startswith("sha256:") or recorded.get("id") == ref.id


def find_factors(pretrained: str | Path | ModelRef, finetuned: str | Path | ModelRef, token: str | None = None,
                 author: str | None = None) -> str:
    """``REPO@TAG`` of the newest published factors for this model pair.

    Candidates are the dataset repos tagged ``hub-msif`` and ``ekfac`` (of ``author``, when
    given); in each, versions ``vN`` are read newest first, and the first whose manifest records
    both models (same revisions) is the repo's match. Among repos, the most recently modified wins.
    """
    from huggingface_hub import HfApi

    require_hub("cannot search the Hub for factors")  # one line at once, rather than retries for half a minute
    refs = {"pretrained": model_ref(pretrained, token), "finetuned": model_ref(finetuned, token)}
    api = HfApi(token=token)
    with hub_failures("(search)", None, "cannot search the Hub for factors", token):
        candidates = list(api.list_datasets(filter=FACTOR_TAGS[:2], author=author))
    matches = []
    for dataset in candidates:
        repo_id = dataset.id
        try:
            tags = api.list_repo_refs(repo_id, repo_type=REPO_TYPE).tags
        except Exception as err:
            logger.info("skipping %s: %s", repo_id, first_line(err))
            continue
        versions = sorted(((n, t) for t in tags if (n := version_number(t.name)) is not None), reverse=True,
                          key=lambda item: item[0])
        for _, tag in versions:
            try:
                path = api.hf_hub_download(repo_id, FACTORS.manifest_name, repo_type=REPO_TYPE, revision=tag.target_commit)
                manifest = json.loads(Path(path).read_text())
                stages = manifest["stages"]
                if all(same_model(stages[s]["model"], refs[s]) for s in STAGES):
                    matches.append((getattr(dataset, "last_modified", None), repo_id, tag.name))
                    break
            except Exception as err:
                logger.info("skipping %s@%s: %s", repo_id, tag.name, first_line(err))
    if not matches:
        described = "; ".join(f"{s} {refs[s].id} at {refs[s].revision}" for s in STAGES)
        raise HubError(f"no published factors match {described} (searched {len(candidates)} dataset repo(s) "
                       f"tagged {' and '.join(FACTOR_TAGS[:2])} on {endpoint()})")
    matches.sort(key=lambda m: (m[0] is not None, m[0] or 0), reverse=True)
    _, repo_id, tag = matches[0]
    return f"{repo_id}@{tag}"
