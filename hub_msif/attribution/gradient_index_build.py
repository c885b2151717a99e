"""Building a gradient index from a stage's factors and a corpus (docs/design.md, "Gradient index": Build).

The corpus streams (``hub_msif.data.load_rows``: memory-mapped, read row by row); document ``i``
(rows with empty text skipped and not numbered) goes to process ``i mod W``. Each process computes
its documents' projected gradients (``CandidateVectors``: one forward and backward per batch) and
writes them in shards of ``shard_size`` documents, atomically (``shards/r<rank>-<k>.safetensors``:
float16 unit rows, float32 norms, int64 document numbers, and the build's fingerprint in the
metadata). A run started again after a SIGKILL skips the documents of this process's finished
shards; its settings must match those of the partial folder (``.gradindex-build.json``), else one
line says what differs. Once every process has finished, rank 0 checks that the shards cover every
document once, writes ``documents.parquet``, then the manifest ``gradindex.json`` (last).

The manifest records the stage's model and tokenizer as the factors record them, the factors'
location without machine paths (a folder by its name; docs/design.md, "No machine paths"), the
corpus as the embedding index records it, and the projection's settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hub_msif import __version__
from hub_msif.artifacts.atomic import atomic_write_bytes, atomic_write_json, sha256_bytes
from hub_msif.artifacts.manifest import (
    DOCUMENTS_NAME,
    FACTORS,
    GRADINDEX,
    read_manifest,
    stage_info,
    stage_sha256,
)
from hub_msif.attribution.checks import DEFAULT_DAMPING
from hub_msif.attribution.device import resolve_device
from hub_msif.attribution.documents import corpus_columns, documents_sha256, documents_to_parquet
from hub_msif.attribution.gradient_defaults import (
    ANN_CHOICES,
    DEFAULT_BALANCE,
    DEFAULT_BATCH_SIZE,
    DEFAULT_DIMS,
    DEFAULT_K,
    DEFAULT_SHARD_SIZE,
)
from hub_msif.attribution.gradient_index import SHARD_FOLDER, ivf_pq_parameters, shard_name
from hub_msif.attribution.gradient_projection import CandidateVectors, GradientProjection
from hub_msif.data import CorpusSpec, load_rows, public_data, remember_source, report_skipped, row_text
from hub_msif.errors import CorpusError, MsifValueError, RetrievalError
from hub_msif.hub.location import parse_location
from hub_msif.hub.pull import pull_factors
from hub_msif.models import load_model, pad_token_id, recorded_model

logger = logging.getLogger(__name__)
BUILD_STATE = ".gradindex-build.json"


class _Processes:
    """Rank, world size, device and barrier: accelerate's ``PartialState`` when launched as several
    processes (gloo on a machine without an accelerator), else this process alone on ``device``."""

    def __init__(self, device: str | None):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            from accelerate import PartialState

            cpu = device == "cpu" or not torch.cuda.is_available()
            self.state = PartialState(cpu=cpu)
            if self.state.num_processes != world:
                raise RuntimeError(f"launched as {world} processes but accelerate runs {self.state.num_processes}")
            self.rank, self.world, self.device = self.state.process_index, self.state.num_processes, self.state.device
        else:
            self.state = None
            self.rank, self.world, self.device = 0, 1, resolve_device(device or "auto")

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()


def _documents(rows, corpus: CorpusSpec, text_column: str, id_column: str | None,
               counts: dict | None = None) -> Iterator[tuple[int, str, str]]:
    """``(document number, id, text)`` of every row with text, in corpus order, up to ``max_sequences``;
    ``counts["skipped"]``: the rows left out for empty text, once the iteration has ended."""
    number = skipped = 0
    for row_number, row in enumerate(rows):
        if corpus.max_sequences is not None and number >= corpus.max_sequences:
            break
        text = row_text(row[text_column], row_number, text_column)
        if text is None:
            skipped += 1
            continue
        doc_id = row[id_column] if id_column else str(row_number)
        if doc_id is None:
            raise CorpusError(f"row {row_number + 1} (1-based) has no value in the id column {id_column!r}")
        yield number, str(doc_id), text
        number += 1
    if counts is not None:
        counts["skipped"] = skipped


def _public_location(location) -> str:
    where = parse_location(location)
    return where.folder.resolve().name if where.folder is not None else str(where)


def _shard_tensors(vectors: torch.Tensor, rows: list[int]) -> dict[str, np.ndarray]:
    v = vectors.double().cpu()
    norms = v.norm(dim=1)
    units = torch.where(norms.unsqueeze(1) > 0, v / norms.clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(1),
                        torch.zeros_like(v))
    if not bool(torch.isfinite(v).all()):
        raise RetrievalError(f"non-finite gradients for document(s) among {rows[0]}..{rows[-1]}: not indexed")
    return {"vectors": units.to(torch.float16).numpy(), "norms": norms.to(torch.float32).numpy(),
            "rows": np.asarray(rows, dtype=np.int64)}


def _read_shard(path: Path, fingerprint: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load as st_load

    from hub_msif.artifacts.manifest import safetensors_metadata

    data = path.read_bytes()
    try:
        metadata = safetensors_metadata(data=data)
        tensors = st_load(data)
    except (SafetensorError, ValueError) as err:
        raise RetrievalError(f"{path} is not a readable shard ({err}): remove it and build again") from None
    if metadata.get("build") != fingerprint:
        raise RetrievalError(f"{path} was written by a build with other settings: remove it (or the folder) and "
                             "build again")
    return tensors


def _own_shards(out: Path, rank: int) -> list[Path]:
    shards = sorted((out / SHARD_FOLDER).glob(f"r{rank:03d}-*.safetensors"))
    for number, path in enumerate(shards):
        if path.name != Path(shard_name(rank, number)).name:
            raise RetrievalError(f"{out / SHARD_FOLDER} has {path.name} but not the shards before it: remove the "
                                 "folder and build again")
    return shards


def build_gradindex(
    factors: str | Path,
    corpus: CorpusSpec,
    out: str | Path,
    *,
    stage: str = "pretrained",
    kind: str = "kronecker",
    k: int = DEFAULT_K,
    dims: int = DEFAULT_DIMS,
    balance: float = DEFAULT_BALANCE,
    seed: int = 0,
    damping: float = DEFAULT_DAMPING,
    relative: bool = True,
    ann: str = "flat",
    batch_size: int = DEFAULT_BATCH_SIZE,
    shard_size: int = DEFAULT_SHARD_SIZE,
    id_column: str | None = None,
    device: str | None = None,
    model_paths: Mapping[str, str] | None = None,
    token: str | None = None,
    show_progress: bool = True,
    on_shard: Callable[[Path], None] | None = None,
) -> dict | None:
    """Builds the gradient index of ``corpus`` for the ``stage`` factors at ``factors`` (a folder or
    ``REPO[@REV]``) into ``out``; returns the manifest on rank 0 (None on the other processes).

    Launched under ``accelerate launch`` the documents are split across the processes (``device``:
    each process's own when not ``cpu``); alone, it runs on ``device`` (``auto``: CUDA when present).
    ``on_shard(path)`` is called after each shard is written (tests slow a build down with it).
    """
    started = time.perf_counter()
    corpus.validate()
    if corpus.prompt_column or corpus.response_column:
        raise CorpusError("a gradient index is built over one text column; prompt/response columns do not apply")
    if ann not in ANN_CHOICES:
        raise MsifValueError(f"ann must be one of {', '.join(ANN_CHOICES)}, not {ann!r}")
    for what, value in (("batch size", batch_size), ("shard size", shard_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MsifValueError(f"{what} must be a whole number of at least 1, got {value!r}")
    out = Path(out)
    if (out / GRADINDEX.manifest_name).exists():
        raise RetrievalError(f"{out} already holds a gradient index ({GRADINDEX.manifest_name}): choose another --out")
    processes = _Processes(device)
    folder = pull_factors(factors, stages=[stage], token=token)
    info = stage_info(read_manifest(folder, FACTORS), stage, str(factors))
    from hub_msif.factors.storage import load_stage

    stage_factors = load_stage(folder, stage)
    projection = GradientProjection(stage_factors, kind, k, dims, balance, seed, damping, relative)
    recorded = info.get("model") or {}
    where, pinned = recorded_model(recorded, f"{stage} model", model_paths)
    model, tokenizer, ref = load_model(where, pinned, name=str(recorded.get("id")) if recorded.get("local") else None)
    if recorded.get("revision") is not None and ref.revision != recorded["revision"]:
        raise RetrievalError(f"the {stage} factors ({factors}) were fitted for {recorded.get('id')}@"
                             f"{recorded['revision']} but the model found is {ref.id}@{ref.revision}")
    stage_factors.check_model(model, model_id=ref.id)
    model.to(processes.device)
    stage_record = {"name": stage, "model": recorded, "tokenizer": info.get("tokenizer"),
                    "location": _public_location(factors), "manifest_sha256": stage_sha256(info),
                    "modules": projection.names}
    rows = load_rows(corpus)
    text_column, id_column = corpus_columns(rows, corpus.text_column, id_column)
    corpus_record = {"data": public_data(corpus.data), "split": corpus.split, "revision": corpus.revision,
                     "text_column": text_column, "id_column": id_column, "num_rows": len(rows),
                     "source_sha256": remember_source(corpus), "max_sequences": corpus.max_sequences}
    settings = {"stage": stage_record, "projection": projection.to_json(), "corpus": corpus_record,
                "max_length": corpus.max_length, "num_processes": processes.world, "batch_size": batch_size,
                "shard_size": shard_size, "ann": ann}
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    _check_or_record(out, settings, processes)

    shards = _own_shards(out, processes.rank)
    done = sum(len(_read_shard(path, fingerprint)["rows"]) for path in shards)
    vectorize = CandidateVectors(model, projection.specs, projection, pad_token_id(tokenizer))
    from tqdm.auto import tqdm

    total = min(len(rows), corpus.max_sequences or len(rows))
    bar = tqdm(total=-(-total // processes.world), initial=done, desc="gradient index", unit="doc",
               disable=not (show_progress and processes.rank == 0), leave=False)
    pending_rows: list[int] = []
    pending: list[dict] = []
    shard_rows: list[int] = []
    shard_parts: list[torch.Tensor] = []
    number_of_shard = len(shards)
    num_documents = 0

    def flush_batch() -> None:
        if pending:
            shard_parts.append(vectorize(pending, batch_size).cpu())
            shard_rows.extend(pending_rows)
            bar.update(len(pending))
            pending.clear()
            pending_rows.clear()

    def write_shard() -> None:
        nonlocal number_of_shard
        from safetensors.numpy import save as st_save

        tensors = _shard_tensors(torch.cat(shard_parts), shard_rows)
        data = st_save(tensors, metadata={"build": fingerprint})
        path = out / shard_name(processes.rank, number_of_shard)
        atomic_write_bytes(path, data)
        number_of_shard += 1
        shard_parts.clear()
        shard_rows.clear()
        if on_shard is not None:
            on_shard(path)

    local = 0
    for number, _, text in _documents(rows, corpus, text_column, id_column):
        num_documents = number + 1
        if number % processes.world != processes.rank:
            continue
        local += 1
        if local <= done:
            continue
        ids = tokenizer(text, add_special_tokens=True)["input_ids"][: corpus.max_length]
        if len(ids) < 2:  # as Attributor.document_sequence: one token carries no loss, so one more
            ids = ids + [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else pad_token_id(tokenizer)]
        pending.append({"input_ids": ids, "labels": list(ids)})
        pending_rows.append(number)
        if len(pending) == batch_size or len(shard_rows) + len(pending) >= shard_size:
            flush_batch()
            if len(shard_rows) >= shard_size:
                write_shard()
    flush_batch()
    if shard_rows:
        write_shard()
    bar.close()
    if local < done:
        raise RetrievalError(f"{out} holds more documents for process {processes.rank} than the corpus has: it was "
                             "built from another corpus; remove it and build again")
    processes.barrier()
    manifest, failure = None, None
    if processes.rank == 0:
        try:
            manifest = _finish(out, rows, corpus, text_column, id_column, num_documents, fingerprint, settings,
                               corpus_record, processes.world, time.perf_counter() - started, ann, projection.dims)
        except Exception as err:  # raised after the barrier: the other processes must not wait forever
            failure = err
    processes.barrier()
    if failure is not None:
        raise failure
    return manifest


def _check_or_record(out: Path, settings: dict, processes: _Processes) -> None:
    """The settings of a partial folder must be these (one line naming what differs); a new one records them."""
    path = out / BUILD_STATE
    failure = None
    if processes.rank == 0 and not path.is_file():
        if (out / SHARD_FOLDER).exists() and any((out / SHARD_FOLDER).iterdir()):
            failure = RetrievalError(f"{out / SHARD_FOLDER} holds shards of an unknown build: remove them and build again")
        else:
            atomic_write_json(path, settings)
    processes.barrier()  # every process decides after rank 0 has looked (none waits for one that failed)
    if failure is not None:
        raise failure
    if not path.is_file():
        raise RetrievalError(f"{out} holds shards of an unknown build: remove them and build again")
    _compare(path, settings)


def _compare(path: Path, settings: dict) -> None:
    try:
        found = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RetrievalError(f"{path} cannot be read ({err}): remove the folder and build again") from None
    differ = sorted(key for key in set(found) | set(settings) if found.get(key) != settings.get(key))
    if differ:
        raise RetrievalError(f"{path.parent} holds a partial gradient index built with other settings ({', '.join(differ)} "
                             "differ): build with the same settings to resume, or choose another --out")


def _finish(out: Path, rows, corpus: CorpusSpec, text_column: str, id_column: str | None, num_documents: int,
            fingerprint: str, settings: dict, corpus_record: dict, world: int, seconds: float, ann: str,
            dims: int) -> dict:
    """Rank 0, after every process: the shards cover each document once; documents, then the manifest."""
    files: dict[str, dict[str, Any]] = {}
    seen = np.zeros(num_documents, dtype=bool)
    for rank in range(world):
        for path in _own_shards(out, rank):
            tensors = _read_shard(path, fingerprint)
            got = tensors["rows"]
            if got.size and (got.min() < 0 or got.max() >= num_documents or seen[got].any()):
                raise RetrievalError(f"{path} holds documents outside the corpus or twice: remove the folder and build again")
            seen[got] = True
            relative = path.relative_to(out).as_posix()
            data = path.read_bytes()
            files[relative] = {"sha256": sha256_bytes(data), "bytes": len(data)}
    if not seen.all():
        raise RetrievalError(f"the shards in {out} lack {int((~seen).sum())} of {num_documents} documents")
    counts: dict = {}
    documents = [{"id": doc_id, "text": text}
                 for _, doc_id, text in _documents(rows, corpus, text_column, id_column, counts)]
    skipped = counts.get("skipped", 0)
    report_skipped(skipped, len(documents) + skipped, f"text in column {text_column!r}")
    if not documents:
        raise CorpusError(f"the corpus {corpus.data!r} has no non-empty text in column {text_column!r}")
    ids = [d["id"] for d in documents]
    if len(set(ids)) != len(ids):
        raise CorpusError(f"ids in column {id_column!r} must be unique; {len(ids) - len(set(ids))} repeat")
    data = documents_to_parquet(documents)
    atomic_write_bytes(out / DOCUMENTS_NAME, data)
    files[DOCUMENTS_NAME] = {"sha256": sha256_bytes(data), "bytes": len(data)}
    vector_bytes = sum(v["bytes"] for n, v in files.items() if n != DOCUMENTS_NAME)
    search = {"ann": ann} | (ivf_pq_parameters(num_documents, dims) if ann != "flat" else {})
    manifest = {
        "format": GRADINDEX.format_name, "format_version": GRADINDEX.format_version, "library_version": __version__,
        "stage": settings["stage"], "projection": settings["projection"],
        "corpus": corpus_record | {"skipped_empty": skipped, "documents_sha256": documents_sha256(documents)},
        "num_documents": num_documents, "max_length": corpus.max_length, "search": search,
        "build": {"num_processes": world, "batch_size": settings["batch_size"], "shard_size": settings["shard_size"],
                  "seconds": round(seconds, 3), "bytes_per_document": round(vector_bytes / num_documents, 1)},
        "files": files,
    }
    atomic_write_json(out / GRADINDEX.manifest_name, manifest)
    (out / BUILD_STATE).unlink(missing_ok=True)
    return manifest
