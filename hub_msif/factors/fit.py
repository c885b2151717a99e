"""Fitting one stage's EK-FAC factors over a corpus, with ``accelerate`` and resumable checkpoints.

Two passes over the data (docs/design.md, "Fitting EK-FAC"): a covariance pass, then (after a float64
eigendecomposition of the summed covariances) an eigenvalue-correction pass with fresh label
samples. Sequences are sharded ``rank::world`` across processes and every sum is all-reduced, so
any number of processes gives the same factors (labels are seeded per sequence).

Checkpoints: every ``checkpoint_every`` batches each process writes its partial sums atomically;
rank 0 then commits the step in ``latest.json``. A run started again with the same settings
resumes from the last committed step and gives the same factors as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from hub_msif import __version__
from hub_msif.artifacts.atomic import atomic_write_bytes, atomic_write_json
from hub_msif.artifacts.manifest import FACTORS, STAGES, read_manifest, stage_differences
from hub_msif.data import collate
from hub_msif.errors import FactorError, MsifValueError
from hub_msif.factors.capture import GradientCapture, compute_dtype, input_gradients_only
from hub_msif.factors.ekfac import CovarianceAccumulator, LambdaAccumulator, ModuleFactors
from hub_msif.factors.objectives import LABEL_MODES, lm_loss
from hub_msif.factors.storage import STORAGE_DTYPES, StageFactors, load_stage, save_stage, spec_to_json
from hub_msif.factors.tracking import TrackedModule, find_modules

logger = logging.getLogger(__name__)
CHECKPOINT_DIR = ".msif-checkpoints"


@dataclass
class FitConfig:
    """Settings of one fit.

    Attributes:
        stage: ``pretrained`` or ``finetuned``: where the factors go in the folder.
        batch_size: sequences per forward/backward on each process.
        modules: ``all``, ``mlp`` or an explicit ``{module name: role}`` mapping.
        split_heads: one block per head and q/k/v for attention input projections.
        label_mode: ``sampled`` (true Fisher = GGN) or ``empirical`` (true labels).
        seed: seed of the label samples (per sequence, so independent of batching).
        storage_dtype: ``float32``, ``bfloat16`` or ``float64`` for the saved tensors.
        checkpoint_every: batches per process between checkpoints; 0 turns them off.
    """

    stage: str = "pretrained"
    batch_size: int = 8
    modules: str | Mapping[str, str] = "all"
    split_heads: bool = True
    label_mode: str = "sampled"
    seed: int = 0
    storage_dtype: str = "float32"
    checkpoint_every: int = 50

    def validate(self) -> None:
        if self.stage not in STAGES:
            raise MsifValueError(f"stage must be one of {', '.join(STAGES)}, not {self.stage!r}")
        if self.batch_size < 1:
            raise MsifValueError(f"batch size must be positive, got {self.batch_size}")
        if self.label_mode not in LABEL_MODES:
            raise MsifValueError(f"label mode must be one of {', '.join(LABEL_MODES)}, not {self.label_mode!r}")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise MsifValueError(f"storage dtype must be one of {', '.join(STORAGE_DTYPES)}, not {self.storage_dtype!r}")
        if self.checkpoint_every < 0:
            raise MsifValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")


class _Distributed:
    """Rank, world size and collectives; plain single-process when no process group exists."""

    def __init__(self, accelerator=None):
        if accelerator is None:
            from accelerate import Accelerator

            # Launched as several processes on a machine without an accelerator: accelerate only
            # sets up a (gloo) process group with cpu=True; otherwise every process runs alone.
            accelerator = Accelerator(cpu=_launched_world() > 1 and not _has_accelerator())
        self.accelerator = accelerator
        self.rank = accelerator.process_index
        self.world = accelerator.num_processes
        if self.world != _launched_world() and _launched_world() > 1:
            raise RuntimeError(
                f"launched as {_launched_world()} processes but accelerate runs {self.world} (no process "
                "group); each process would fit alone and overwrite the others' factors"
            )
        self.device = accelerator.device
        self.is_main = accelerator.is_main_process

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()


def _launched_world() -> int:
    """Number of processes the launcher (``accelerate launch``, ``torchrun``) started; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _has_accelerator() -> bool:
    """Whether a device other than the CPU (and MPS, which accelerate never runs multi-process) exists."""
    if hasattr(torch, "accelerator"):
        device = torch.accelerator.current_accelerator()
        return device is not None and device.type != "mps"
    return torch.cuda.is_available()


def _run_fingerprint(config: FitConfig, tracked: Sequence[TrackedModule], data_fingerprint: str, model_revision: str, world: int) -> str:
    """Hash of everything that changes the partial sums; a checkpoint resumes only on a match."""
    payload = json.dumps(
        {"config": asdict(config) | {"checkpoint_every": None, "storage_dtype": None},
         "modules": [spec_to_json(t) for t in tracked], "data": data_fingerprint, "model": model_revision,
         "world": world},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


class _Checkpoints:
    """Per-rank partial sums under ``<out>/.msif-checkpoints/<stage>/``, committed by rank 0."""

    def __init__(self, out_dir: Path, stage: str, fingerprint: str, dist: _Distributed):
        self.folder = out_dir / CHECKPOINT_DIR / stage
        self.fingerprint = fingerprint
        self.dist = dist

    def _file(self, step: int, rank: int) -> Path:
        return self.folder / f"step{step:08d}-rank{rank}.safetensors"

    def latest(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        """(step, this rank's tensors) of the last committed checkpoint of this run, if any."""
        marker = self.folder / "latest.json"
        if not marker.is_file():
            return None
        committed = json.loads(marker.read_text())
        if committed.get("fingerprint") != self.fingerprint:
            logger.warning("ignoring checkpoint in %s: it belongs to a fit with other settings or data", self.folder)
            return None
        step = committed["step"]
        return step, load_file(self._file(step, self.dist.rank))

    def save(self, step: int, tensors: dict[str, torch.Tensor]) -> None:
        data = save({k: v.contiguous().cpu() for k, v in tensors.items()})
        atomic_write_bytes(self._file(step, self.dist.rank), data)
        self.dist.barrier()
        if self.dist.is_main:
            atomic_write_json(self.folder / "latest.json", {"fingerprint": self.fingerprint, "step": step})
        self.dist.barrier()
        for old in self.folder.glob(f"step*-rank{self.dist.rank}.safetensors"):
            if old != self._file(step, self.dist.rank):
                old.unlink(missing_ok=True)

    def clear(self) -> None:
        self.dist.barrier()
        if self.dist.is_main and self.folder.is_dir():
            for f in self.folder.iterdir():
                f.unlink()
            self.folder.rmdir()
            try:
                self.folder.parent.rmdir()
            except OSError:
                pass


def fit_factors(
    model: torch.nn.Module,
    sequences: Sequence[dict],
    out_dir: str | Path,
    config: FitConfig,
    *,
    pad_id: int,
    info: dict,
    accelerator=None,
    show_progress: bool = True,
    on_checkpoint: Callable[[int], None] | None = None,
) -> StageFactors:
    """Fits one stage's factors on tokenized ``sequences`` and saves them into ``out_dir``.

    ``info`` (model, tokenizer and data descriptions; ``info["data"]["fingerprint"]`` and
    ``info["model"]["revision"]`` identify the run for resuming) goes into the manifest.
    ``on_checkpoint(step)`` is called after each committed checkpoint. Returns the saved factors.
    """
    from tqdm.auto import tqdm

    config.validate()
    if not sequences:
        raise MsifValueError("no sequences to fit on")
    out_dir = Path(out_dir)
    dist = _Distributed(accelerator)
    was_training = model.training
    model.eval().to(dist.device)
    tracked = find_modules(model, config.modules, config.split_heads)
    _check_other_stage(out_dir, config.stage, tracked)
    dtype = compute_dtype(model)

    n = len(sequences)
    local = list(range(dist.rank, n, dist.world))
    num_batches = math.ceil(math.ceil(n / dist.world) / config.batch_size)  # equal on every rank
    batches = [local[i * config.batch_size : (i + 1) * config.batch_size] for i in range(num_batches)]
    fingerprint = _run_fingerprint(
        config, tracked, info.get("data", {}).get("fingerprint", ""), info.get("model", {}).get("revision", ""), dist.world
    )
    checkpoints = _Checkpoints(out_dir, config.stage, fingerprint, dist)

    covariances = {t.name: CovarianceAccumulator(t, dist.device) for t in tracked}
    lambdas: dict[str, LambdaAccumulator] = {}
    eigen: dict[str, tuple] = {}
    counts = torch.zeros(2, dtype=torch.float64, device=dist.device)  # [tokens, sequences] on this rank

    start_step = 0
    resumed = checkpoints.latest()
    if resumed is not None:
        start_step, state = resumed
        counts.copy_(state["counts"].to(dist.device))
        if not any(key.endswith("/lam") for key in state):
            for name, acc in covariances.items():
                acc.load_state({"a": state[f"{name}/a"], "s": state[f"{name}/s"]})
        else:
            covariances.clear()  # resumed after the phase boundary: only Lambda is accumulated
            for t in tracked:
                eigen[t.name] = tuple(state[f"{t.name}/{k}"].to(dist.device) for k in ("eig_a", "q_a", "eig_s", "q_s"))
                lambdas[t.name] = LambdaAccumulator(t, eigen[t.name][1], eigen[t.name][3], dtype)
                lambdas[t.name].load_state({"lam": state[f"{t.name}/lam"].to(dist.device)})
        logger.info("resuming the %s fit from checkpoint step %d", config.stage, start_step)

    accumulators: dict = covariances
    capture = GradientCapture(model, tracked, lambda spec, a, g: accumulators[spec.name].update(a, g))
    bar = tqdm(total=2 * num_batches, initial=start_step, desc=f"fitting {config.stage} factors",
               unit="batch", disable=not (show_progress and dist.is_main))
    started = time.perf_counter()
    try:
        with input_gradients_only(model), capture:
            for step in range(start_step, 2 * num_batches):
                phase = 0 if step < num_batches else 1
                if phase == 1 and not lambdas:
                    # Phase boundary: sum the covariances over processes, eigendecompose in float64.
                    for t in tracked:
                        acc = covariances[t.name]
                        dist.all_reduce(acc.a)
                        dist.all_reduce(acc.s)
                        # Contiguous, like the tensors a resumed run loads from its checkpoint: eigh's
                        # column-major output would take other matmul paths and round differently.
                        eigen[t.name] = tuple(x.contiguous() for x in acc.eigendecompose())
                        lambdas[t.name] = LambdaAccumulator(t, eigen[t.name][1], eigen[t.name][3], dtype)
                        del covariances[t.name], acc  # A and S are not needed any more: free them early
                accumulators = lambdas if phase == 1 else covariances
                indices = batches[step - phase * num_batches]
                if indices:
                    batch = collate([sequences[i] for i in indices], indices, pad_id, dist.device)
                    capture.mask = batch["attention_mask"]
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
                    loss = lm_loss(logits, batch, config.label_mode, config.seed, pass_index=phase)
                    loss.backward()
                    if phase == 0:
                        counts[0] += float(batch["attention_mask"].sum())
                    else:
                        counts[1] += len(indices)
                bar.update(1)
                done = step + 1
                if config.checkpoint_every and done % config.checkpoint_every == 0 and done < 2 * num_batches:
                    checkpoints.save(done, _checkpoint_state(tracked, covariances, lambdas, eigen, counts))
                    if on_checkpoint is not None:
                        on_checkpoint(done)
    finally:
        bar.close()
        model.train(was_training)

    if not lambdas:  # no batch at all in the correction pass (cannot happen with n >= 1)
        raise RuntimeError("the eigenvalue-correction pass did not run")
    for t in tracked:
        dist.all_reduce(lambdas[t.name].lam)
    dist.all_reduce(counts)
    num_sequences, num_tokens = int(counts[1]), int(counts[0])
    factors = {}
    for t in tracked:
        eig_a, q_a, eig_s, q_s = eigen[t.name]
        # K-FAC eigenvalues on Lambda's scale: GGN ~ (A / tokens) kron (S / sequences), see ModuleFactors.
        factors[t.name] = ModuleFactors(
            t, q_a, q_s, lambdas[t.name].lam.div_(num_sequences), eig_a / max(num_tokens, 1), eig_s / num_sequences
        )

    stage_info = {
        **info,
        "fit": {
            "label_mode": config.label_mode, "seed": config.seed, "batch_size": config.batch_size,
            "split_heads": config.split_heads,
            "modules": config.modules if isinstance(config.modules, str) else "explicit",
            "num_processes": dist.world, "num_sequences": num_sequences, "num_tokens": num_tokens,
            "seconds": round(time.perf_counter() - started, 3), "hub_msif_version": __version__,
            "torch_version": torch.__version__,
        },
    }
    if dist.is_main:
        save_stage(out_dir, config.stage, factors, stage_info, config.storage_dtype)
    checkpoints.clear()
    dist.barrier()
    return load_stage(out_dir, config.stage)


def _check_other_stage(out_dir: Path, stage: str, tracked: Sequence[TrackedModule]) -> None:
    """Before any work: the other stage already in the folder must track the same modules and shapes."""
    if not (out_dir / FACTORS.manifest_name).is_file():
        return
    for other, info in read_manifest(out_dir).get("stages", {}).items():
        if other == stage:
            continue
        problems = stage_differences([spec_to_json(t) for t in tracked], info["modules"])
        if problems:
            raise FactorError(
                f"{out_dir} already holds {other} factors over other modules than this {stage} fit; the two stages "
                f"must match ({'; '.join(problems)}; first = this fit)"
            )


def _checkpoint_state(tracked, covariances, lambdas, eigen, counts) -> dict[str, torch.Tensor]:
    """This rank's partial sums: covariances before the phase boundary, Lambda (and Q) after it."""
    state = {"counts": counts.clone()}
    for t in tracked:
        if not lambdas:
            state.update({f"{t.name}/a": covariances[t.name].a, f"{t.name}/s": covariances[t.name].s})
        else:
            eig_a, q_a, eig_s, q_s = eigen[t.name]
            state.update({f"{t.name}/eig_a": eig_a, f"{t.name}/q_a": q_a, f"{t.name}/eig_s": eig_s,
                          f"{t.name}/q_s": q_s, f"{t.name}/lam": lambdas[t.name].lam})
    return state


def fit_stage(
    model: str,
    data: str | Sequence[str],
    out_dir: str | Path,
    config: FitConfig | None = None,
    corpus=None,
    revision: str | None = None,
    accelerator=None,
    show_progress: bool = True,
    on_checkpoint: Callable[[int], None] | None = None,
    base_model: str | None = None,
) -> StageFactors:
    """Loads ``model`` (Hub id or folder) and the corpus ``data``, fits, saves into ``out_dir``.
    A PEFT adapter is merged into its base (``base_model``, else its config's; hub_msif.models).

    ``corpus`` is a ``CorpusSpec`` for columns, template and lengths (``data`` fills its
    ``data`` field). This is what ``hub-msif fit`` runs.
    """
    from hub_msif.data import CorpusSpec, load_rows, source_sha256, tokenize_corpus
    from hub_msif.models import load_model, pad_token_id

    config = config or FitConfig()
    config.validate()
    corpus = corpus or CorpusSpec(data=data)
    corpus.data = data
    corpus.validate()
    lm, tokenizer, ref = load_model(model, revision, base_model=base_model)
    sequences, data_fingerprint = tokenize_corpus(load_rows(corpus), tokenizer, corpus, show_progress)
    info = {
        "model": {**ref.to_json(), "class": type(lm).__name__},
        "tokenizer": {"id": ref.id, "revision": ref.revision, "class": type(tokenizer).__name__},
        "data": {**corpus.describe(), "fingerprint": data_fingerprint, "source_sha256": source_sha256(corpus)},
    }
    return fit_factors(lm, sequences, out_dir, config, pad_id=pad_token_id(tokenizer), info=info,
                       accelerator=accelerator, show_progress=show_progress, on_checkpoint=on_checkpoint)
