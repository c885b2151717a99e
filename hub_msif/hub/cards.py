"""Dataset cards of published artifacts: YAML metadata plus a body rendered from the package's
card templates (``hub_msif/hub/templates/``, package data, so a wheel renders them too).

A factor card records its stages, one or both (model id and revision, fitting data, sizes, the command that
reproduces each fit); an index card declares ``documents.parquet`` as the dataset's data so that
``datasets.load_dataset(repo)`` reads the documents (docs/design.md, "Hub artifacts").
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
from importlib.resources import files
from pathlib import Path

from hub_msif import __version__
from hub_msif.artifacts.manifest import DOCUMENTS_NAME, MODULE_CHOICES, STAGES
from hub_msif.data import CorpusSpec
from hub_msif.errors import HubError, HubValueError, MsifValueError
from hub_msif.factors.config import FitConfig
from hub_msif.models import check_model_name, is_commit_sha, is_local_record, looks_like_path
from hub_msif.options import command_args, command_text

CARD_NAME = "README.md"
FACTOR_TAGS = ["hub-msif", "ekfac", "influence-functions"]
INDEX_TAGS = ["hub-msif", "document-index", "influence-functions", "sentence-embeddings"]
GRADINDEX_TAGS = ["hub-msif", "gradient-index", "influence-functions"]
DEFAULT_LICENSE = "apache-2.0"
_CARD_DIR_ENV = "HUB_MSIF_CARD_TEMPLATES"


def card_template(kind: str) -> Path:
    """The template ``<kind>.md`` (``factors``, ``index`` or ``space``) among the package data
    ``hub_msif/hub/templates/`` (found through ``importlib.resources``, so in a wheel too);
    ``$HUB_MSIF_CARD_TEMPLATES`` names another folder."""
    override = os.environ.get(_CARD_DIR_ENV)
    path = Path(override) / f"{kind}.md" if override else Path(str(files("hub_msif.hub") / "templates" / f"{kind}.md"))
    if not path.is_file():
        raise HubError(f"card template {path} is missing" + (f" (from {_CARD_DIR_ENV})" if override else
                                                             ": the hub_msif installation lacks its package data"))
    return path


def _size_text(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _data_text(data: dict) -> str:
    source = data.get("data")
    text = ", ".join(f"`{d}`" for d in source) if isinstance(source, list) else f"`{source}`"
    extras = [f"split {data['split']}"] if data.get("split") and not _looks_local(source) else []
    if data.get("revision"):
        extras.append(f"revision `{data['revision']}`")
    return text + (f" ({', '.join(extras)})" if extras else "")


def _looks_local(source) -> bool:
    items = source if isinstance(source, list) else [source]
    return any(isinstance(s, str) and (s.startswith(("/", ".")) or Path(s).suffix) for s in items)


# --- public names: a card never shows a path of the machine that pushed it (docs/design.md, "Hub artifacts")


def model_name(model: dict, given: str | None = None) -> str:
    """What a card calls a model: ``given`` (``--model-name``), else a Hub model's id, else for a
    local folder its last component and the short sha256 of its weights (``finetuned (sha256:30ba2051f116)``)."""
    ident = str(model.get("id") or "")
    if not is_local_record(model):
        if given is not None and given != ident:
            raise MsifValueError(f"the model {ident} is a Hub model: its card names it by its id, not {given!r}")
        return ident
    if given is not None:
        return check_model_name(given)
    revision = str(model.get("revision") or "")
    last = (Path(ident.replace("\\", "/").rstrip("/")).name if looks_like_path(ident) else ident) or "local model"
    return f"{last} (sha256:{revision[7:19]})" if revision.startswith("sha256:") else last


def public_record(record) -> dict:
    """A model or tokenizer record with an older manifest's path id cut to its folder's name, marked local."""
    record = dict(record or {})
    if looks_like_path(str(record.get("id") or "")):
        record["id"] = Path(str(record["id"]).replace("\\", "/").rstrip("/")).name or "local model"
        record["local"] = True
    base = record.get("base")
    if isinstance(base, dict) and looks_like_path(str(base.get("id") or "")):
        record["base"] = {**base, "id": Path(str(base["id"]).replace("\\", "/").rstrip("/")).name, "local": True}
    return record


def public_manifest(manifest: dict, stages) -> dict:
    """The factor manifest as published: only ``stages``, and no path of this machine (a local
    model recorded by its path in older manifests becomes its folder's name, marked local; local
    data paths become file names). Newer fits record no paths at all (docs/design.md, "No machine paths")."""
    out = {**manifest, "stages": {}}
    for stage in stages:
        info = dict(manifest["stages"][stage])
        for key in ("model", "tokenizer"):
            info[key] = public_record(info.get(key))
        data = dict(info.get("data") or {})
        if "data" in data:
            data["data"] = public_source(data["data"])
        info["data"] = data
        out["stages"][stage] = info
    return out


def public_source(source):
    """A data source as a card shows it: Hub ids unchanged, local files and folders by their last
    component only (the sha256 fingerprint next to it identifies the content)."""
    if isinstance(source, (list, tuple)):
        return [public_source(s) for s in source]
    if isinstance(source, str) and looks_like_path(source):
        return Path(source.replace("\\", "/").rstrip("/")).name or source
    return source


def public_stage(info: dict, name: str | None = None) -> dict:
    """A stage's manifest entry with the model named (``model_name``) and local data paths cut to
    their last component: what the card (metadata, tables, fit commands) is rendered from."""
    info = dict(info)
    model = dict(info.get("model") or {})
    model["id"] = model_name(model, name)
    info["model"] = model
    data = dict(info.get("data") or {})
    if "data" in data:
        data["data"] = public_source(data["data"])
    info["data"] = data
    return info


def public_index_manifest(manifest: dict) -> dict:
    """An index manifest as published: no path of this machine (older builds recorded local data and
    a local embedding model by their paths: cut to their names, the model marked local)."""
    out = dict(manifest)
    corpus = dict(out.get("corpus") or {})
    if "data" in corpus:
        corpus["data"] = public_source(corpus["data"])
    out["corpus"] = corpus
    embedding = out.get("embedding_model")
    if isinstance(embedding, dict) and looks_like_path(str(embedding.get("id") or "")):
        out["embedding_model"] = {**embedding, "id": Path(str(embedding["id"])).name, "local": True}
    return out


def recorded_fit_config(info: dict, dtype: str = "float32") -> dict:
    """The ``FitConfig`` values a stage's manifest entry records (``fit.config``, ``asdict`` of the
    config). Manifests written before it have the settings as top-level keys of ``fit`` (some
    missing, the storage dtype only on the module entries: ``dtype``); an explicit module mapping
    was recorded as ``"explicit"`` there and cannot be recovered."""
    fit = info.get("fit") or {}
    if isinstance(fit.get("config"), dict):
        return dict(fit["config"])
    names = {f.name for f in dataclasses.fields(FitConfig)}
    recorded = {k: v for k, v in fit.items() if k in names and k != "modules"}
    if fit.get("modules") in MODULE_CHOICES:
        recorded["modules"] = fit["modules"]
    return recorded | {"storage_dtype": dtype}


def fit_command(stage: str, info: dict, dtype: str = "float32") -> str:
    """The ``hub-msif fit`` command line that reproduces one stage's fit, from what the manifest
    records: every ``FitConfig`` and ``CorpusSpec`` setting whose recorded value differs from its
    default becomes its flag (``hub_msif.options.command_args``; ``checkpoint_every`` changes no
    factor and is left out). ``dtype`` is the storage dtype of manifests without ``fit.config``."""
    model, data, fit = info.get("model", {}), info.get("data", {}), info.get("fit", {})
    q = shlex.quote
    parts = ["hub-msif fit", f"--model {q(str(model.get('id')))}"]
    if is_commit_sha(model.get("revision")):
        parts.append(f"--revision {model['revision']}")
    source = data.get("data")
    parts.append("--data " + " ".join(q(str(s)) for s in (source if isinstance(source, list) else [source])))
    parts.append(command_text(command_args(CorpusSpec, data)))
    parts.append(command_text(command_args(FitConfig, recorded_fit_config(info, dtype) | {"stage": stage})))
    parts.append("--out factors")
    command = " ".join(p for p in parts if p)
    if (fit.get("num_processes") or 1) > 1:
        command = command.replace("hub-msif fit", f"accelerate launch --num_processes {fit['num_processes']} "
                                  "-m hub_msif fit", 1)
    return command


def factors_card(manifest: dict, repo_id: str, tag: str, sizes: dict[str, int], license: str = DEFAULT_LICENSE,
                 model_names: dict[str, str] | None = None):
    """The ``DatasetCard`` of a factor artifact: YAML metadata plus the body of ``model_cards/factors.md``.
    ``model_names`` (``{stage: name}``) names local models (see ``model_name``)."""
    from huggingface_hub import DatasetCard, DatasetCardData

    unknown = sorted(set(model_names or {}) - set(STAGES))
    if unknown:
        raise MsifValueError(f"model names are given per stage ({', '.join(STAGES)}), not for {', '.join(unknown)}")
    present = [name for name in STAGES if name in manifest["stages"]]
    unused = sorted(set(model_names or {}) - set(present))
    if unused:
        raise MsifValueError(f"a model name is given for the {unused[0]} stage, which these factors do not hold")
    stages = []
    for name in present:
        info = public_stage(manifest["stages"][name], (model_names or {}).get(name))
        fit, data = info.get("fit", {}), info.get("data", {})
        dtype = info["modules"][0].get("dtype", "float32") if info["modules"] else "float32"
        stages.append({
            "name": name, "model": {"id": info["model"]["id"], "revision": info["model"]["revision"]},
            "data": {k: data.get(k) for k in ("data", "split", "revision", "text_column", "prompt_column",
                                              "response_column", "template", "max_length", "max_sequences",
                                              "fingerprint")},
            "num_sequences": fit.get("num_sequences"), "num_tokens": fit.get("num_tokens"),
            "seed": fit.get("seed"), "label_mode": fit.get("label_mode"), "num_processes": fit.get("num_processes"),
            "dtype": dtype, "data_text": _data_text(data), "command": fit_command(name, info, dtype),
        })
    modules = [{"name": m["name"], "role": m["role"], "blocks": len(m.get("blocks") or []) or 1,
                "d_out": m["d_out"], "d_in": m["d_in"]} for m in manifest["stages"][present[0]]["modules"]]
    num_mlp = sum(m["role"] == "mlp" for m in modules)
    size = sum(sizes.values())
    meta = {
        "artifact": "factors",
        "format_version": manifest.get("format_version"),
        "library_version": manifest.get("library_version") or __version__,
        "pushed_with": __version__,
        "stages": present,
        **{s["name"]: {k: s[k] for k in ("model", "data", "num_sequences", "num_tokens", "seed", "label_mode",
                                         "num_processes", "dtype")} for s in stages},
        "modules": [{k: m[k] for k in ("name", "role", "blocks", "d_out", "d_in")} for m in modules],
        "roles": {"mlp": num_mlp, "attention": len(modules) - num_mlp},
        "size_bytes": size,
        "num_files": len(sizes),
    }
    by_name = {s["name"]: s for s in stages}
    title = (f"hub_msif EK-FAC factors for {by_name['finetuned']['model']['id']}" if len(stages) == 2 else
             f"hub_msif EK-FAC factors of {stages[0]['model']['id']} ({stages[0]['name']} stage)")
    card_data = DatasetCardData(
        license=license,
        pretty_name=title,
        tags=list(FACTOR_TAGS),
        hub_msif=meta,
    )
    return DatasetCard.from_template(
        card_data, template_path=str(card_template("factors")), repo_id=repo_id, tag=tag,
        library_version=meta["library_version"], stages=stages, pretrained=by_name.get("pretrained"),
        finetuned=by_name.get("finetuned"),
        modules=modules, num_modules=len(modules), num_mlp=num_mlp, num_attn=len(modules) - num_mlp,
        num_files=len(sizes), size_text=_size_text(size),
    )


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                        (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")):
        if n < limit:
            return name
    return "n>1B"


def index_card(manifest: dict, repo_id: str, tag: str, sizes: dict[str, int], license: str = DEFAULT_LICENSE,
               model_name_given: str | None = None):
    """The ``DatasetCard`` of an index artifact; its ``configs`` make ``load_dataset(repo_id)`` read the documents.
    ``model_name_given`` names a local embedding model (see ``model_name``)."""
    from huggingface_hub import DatasetCard, DatasetCardData

    corpus = dict(manifest.get("corpus") or {})
    if "data" in corpus:
        corpus["data"] = public_source(corpus["data"])
    embedding = manifest.get("embedding_model")
    if isinstance(embedding, dict):
        embedding = {**embedding, "id": model_name(embedding, model_name_given)}
    source = corpus.get("data")
    corpus_text = (", ".join(map(str, source)) if isinstance(source, list) else str(source)) if source else "documents"
    size = sum(sizes.values())
    meta = {
        "artifact": "index",
        "format_version": manifest.get("format_version"),
        "library_version": manifest.get("library_version") or __version__,
        "pushed_with": __version__,
        "embedding_model": embedding,
        "dimension": manifest.get("dimension"),
        "metric": manifest.get("metric"),
        "normalised": manifest.get("normalised"),
        "index_type": manifest.get("index_type"),
        "num_documents": manifest.get("num_documents"),
        "corpus": corpus,
        "size_bytes": size,
    }
    examples = [str(q) for q in manifest.get("example_questions") or []]
    if examples:
        meta["example_questions"] = examples
    card_data = DatasetCardData(
        license=license,
        pretty_name=f"hub_msif document index of {corpus_text}",
        tags=list(INDEX_TAGS),
        task_categories=["text-retrieval"],
        size_categories=[_size_category(int(manifest.get("num_documents") or 0))],
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": DOCUMENTS_NAME}]}],
        hub_msif=meta,
    )
    return DatasetCard.from_template(
        card_data, template_path=str(card_template("index")), repo_id=repo_id, tag=tag,
        library_version=meta["library_version"], embedding_model=meta["embedding_model"] or {},
        dimension=meta["dimension"], metric=meta["metric"], index_type=meta["index_type"],
        num_documents=meta["num_documents"], corpus_text=corpus_text,
        corpus_revision=corpus.get("revision") or "not recorded (local files or the default branch)",
        documents_sha256=corpus.get("documents_sha256", ""), size_text=_size_text(size),
        example_questions=examples, example_prompt=shlex.quote(examples[0]) if examples else '"your question"',
    )


# -- gradient indexes (docs/design.md, "Gradient index", "Hub artifacts") -------------------------


def _paths_in(value, where: str = "") -> list[str]:
    """The keys (``a.b[2]``) of ``value`` holding a string written as a path (``looks_like_path``)."""
    if isinstance(value, dict):
        return [hit for key, item in value.items() for hit in _paths_in(item, f"{where}.{key}" if where else str(key))]
    if isinstance(value, (list, tuple)):
        return [hit for i, item in enumerate(value) for hit in _paths_in(item, f"{where}[{i}]")]
    return [where] if isinstance(value, str) and looks_like_path(value) else []


def public_gradindex_manifest(manifest: dict) -> dict:
    """A gradient index manifest as published: no path of this machine. The stage's factors built
    from a local folder (``stage.location``), a local model recorded by its path (older factors),
    local corpus files and a check's local query file are cut to their last component; any other
    value written as a path is refused (``HubValueError`` naming its key) rather than published."""
    out = dict(manifest)
    stage = dict(out.get("stage") or {})
    for key in ("model", "tokenizer"):
        if isinstance(stage.get(key), dict):
            stage[key] = public_record(stage[key])
    if "location" in stage:
        stage["location"] = public_source(stage["location"])
    out["stage"] = stage
    corpus = dict(out.get("corpus") or {})
    if "data" in corpus:
        corpus["data"] = public_source(corpus["data"])
    out["corpus"] = corpus
    if isinstance(out.get("check"), dict):
        check = dict(out["check"])
        for key in ("queries", "queries_file", "data"):
            if isinstance(check.get(key), (str, list)):
                check[key] = public_source(check[key])
        out["check"] = check
    left = [key for key in _paths_in({k: v for k, v in out.items() if k != "files"})]
    if left:
        raise HubValueError(f"gradindex.json records a path of this machine at {', '.join(left)}: refusing to "
                            "publish it (a pushed index must mean the same on every machine)")
    return out


def _k_text(k, num_modules: int) -> str:
    """A projection's ``k`` (one value, or one per module) as the card shows it."""
    def one(value) -> str:
        return " × ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)

    if isinstance(k, dict):
        values = {one(v) for v in k.values()}
        if len(values) == 1:
            return f"{values.pop()} (each of {len(k)} modules)"
        return ", ".join(f"`{name}` {one(v)}" for name, v in k.items())
    return "none (identity)" if k is None else f"{one(k)} (each of {num_modules} modules)"


def gradindex_bytes_per_document(manifest: dict, dims: int | None = None) -> int | None:
    """What one document costs in the shards' vectors: ``dims`` float16 numbers and a float32 norm
    (``dims * 2 + 4``; ``dims`` from the projection unless given, e.g. read from a shard)."""
    dims = dims if dims is not None else (manifest.get("projection") or {}).get("dims")
    return dims * 2 + 4 if isinstance(dims, int) and not isinstance(dims, bool) else None


def gradindex_card(manifest: dict, repo_id: str, tag: str, sizes: dict[str, int], license: str = DEFAULT_LICENSE,
                   model_name_given: str | None = None, dims: int | None = None):
    """The ``DatasetCard`` of a gradient index: the model and its pre-trained stage, the corpus, the
    number of documents and their bytes, the projection, the last check, and how to use it; tagged
    ``hub-msif`` + ``gradient-index`` so that ``find-factors`` lists it beside its stage.
    ``model_name_given`` names a local model (see ``model_name``); ``dims`` is the vectors' width
    when the projection does not record it (``identity``)."""
    from huggingface_hub import DatasetCard, DatasetCardData

    from hub_msif.hub.location import parse_location

    stage = dict(manifest.get("stage") or {})
    model = dict(stage.get("model") or {})
    model = {"id": model_name(model, model_name_given), "revision": model.get("revision")}
    projection = dict(manifest.get("projection") or {})
    dims = projection.get("dims") if isinstance(projection.get("dims"), int) else dims
    corpus = dict(manifest.get("corpus") or {})
    if "data" in corpus:
        corpus["data"] = public_source(corpus["data"])
    source = corpus.get("data")
    corpus_text = (", ".join(map(str, source)) if isinstance(source, list) else str(source)) if source else "documents"
    location = str(stage.get("location") or "not recorded")
    on_hub = isinstance(stage.get("location"), str) and not looks_like_path(location) and \
        parse_location(location).repo_id is not None
    modules = stage.get("modules") or []
    size = sum(sizes.values())
    check = manifest.get("check") if isinstance(manifest.get("check"), dict) else None
    meta = {
        "artifact": "gradindex",
        "format_version": manifest.get("format_version"),
        "library_version": manifest.get("library_version") or __version__,
        "pushed_with": __version__,
        "model": model,
        "stage": {"name": "pretrained", "location": stage.get("location"),
                  "manifest_sha256": stage.get("manifest_sha256"), "num_modules": len(modules)},
        "projection": projection,
        "num_documents": manifest.get("num_documents"),
        "max_length": manifest.get("max_length"),
        "bytes_per_document": gradindex_bytes_per_document(manifest, dims),
        "corpus": corpus,
        "size_bytes": size,
    }
    if check is not None:
        meta["check"] = check
    card_data = DatasetCardData(
        license=license,
        pretty_name=f"hub_msif gradient index of {corpus_text} for {model['id']}",
        tags=list(GRADINDEX_TAGS),
        task_categories=["text-retrieval"],
        size_categories=[_size_category(int(manifest.get("num_documents") or 0))],
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": DOCUMENTS_NAME}]}],
        hub_msif=meta,
    )
    factors_args = (f"--factors-pretrained {location} --factors-finetuned <FINETUNED_REPO>@<TAG>" if on_hub
                    else "--factors <FACTORS_REPO>@<TAG>")
    return DatasetCard.from_template(
        card_data, template_path=str(card_template("gradindex")), repo_id=repo_id, tag=tag,
        library_version=meta["library_version"], model=model, stage_location=location,
        manifest_sha256=stage.get("manifest_sha256") or "not recorded", num_modules=len(modules),
        corpus_text=corpus_text,
        corpus_revision=corpus.get("revision") or "not recorded (local files or the default branch)",
        documents_sha256=corpus.get("documents_sha256", ""), num_documents=meta["num_documents"],
        max_length=meta["max_length"], bytes_per_document=meta["bytes_per_document"], dims=dims,
        size_text=_size_text(size), projection=projection, k_text=_k_text(projection.get("k"), len(modules)),
        check=check, factors_args=factors_args,
    )


# -- a factor card's links to the Spaces that serve it (docs/design.md, "Space") -----------------

_SPACES_START, _SPACES_END = "<!-- hub-msif:spaces -->", "<!-- /hub-msif:spaces -->"
_SPACES_BLOCK = re.compile(re.escape(_SPACES_START) + r".*?" + re.escape(_SPACES_END), re.S)


def with_space_link(card: str, space_id: str, url: str, served: str) -> str:
    """The card text ``card`` with a line linking the Space ``space_id`` (at ``url``), which serves
    ``served`` (``REPO@REV``), in its "Spaces" block (added at the end when missing). A link to the
    same Space is replaced, others are kept; the same link twice gives the same text."""
    match = _SPACES_BLOCK.search(card)
    lines = [line for line in (match.group(0).splitlines()[1:-1] if match else [])
             if line.startswith("- ") and f"[{space_id}]" not in line]
    lines.append(f"- [{space_id}]({url}) serves `{served}` in a browser")
    block = "\n".join([_SPACES_START, *sorted(lines), _SPACES_END])
    if match:
        return card[:match.start()] + block + card[match.end():]
    return card.rstrip("\n") + "\n\n## Spaces\n\n" + block + "\n"
