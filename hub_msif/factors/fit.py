"""Fitting one stage's EK-FAC factors over a corpus, with ``accelerate`` and resumable checkpoints.

Two passes over the data (docs/design.md, "Fitting EK-FAC"): a covariance pass, then (after a float64
eigendecomposition of the summed covariances) an eigenvalue-correction pass with fresh label
samples. With K module partitions the modules are fitted in K groups, one after the other (2K
passes), so only one group's accumulators live at a time. Sequences are sharded ``rank::world``
across processes; every module has one owner process (hub_msif/factors/partition.py) to which each
batch's captured inputs and gradients of the module are gathered: the owner alone holds its sums,
eigendecomposes, keeps and writes the module's file, and rank 0 writes the manifest last. Any
number of processes and partitions gives the same factors (labels are seeded per sequence);
docs/design.md, "Module partitions and owners", "Precision", "Streaming data".

Checkpoints: every ``checkpoint_every`` batches each process writes its partial sums atomically;
rank 0 then commits the step in ``latest.json``. At the end of each group (but the last) a
checkpoint records the module files already written, which a resumed run reuses. A run started
again with the same settings resumes from the last committed step and gives the same factors as an
uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from hub_msif import __version__
from hub_msif.artifacts.atomic import atomic_write_bytes, atomic_write_json, sha256_bytes
from hub_msif.artifacts.manifest import FACTORS, artifact_path, read_manifest, stage_differences
from hub_msif.data import collate
from hub_msif.errors import FactorError, MsifError, MsifValueError
from hub_msif.factors.architectures import TrackedModule, find_modules
from hub_msif.factors.capture import GradientCapture, compute_dtype, input_gradients_only
from hub_msif.factors.config import ACCUMULATE_DTYPE_NAMES, MODEL_DTYPE_NAMES, FitConfig  # FitConfig: re-exported
from hub_msif.factors.ekfac import CovarianceAccumulator, LambdaAccumulator, ModuleFactors
from hub_msif.factors.objectives import lm_loss
from hub_msif.factors.partition import module_groups, module_owners
from hub_msif.factors.storage import (
    StageFactors,
    load_stage,
    module_path,
    save_module_file,
    spec_to_json,
    write_stage_manifest,
)

logger = logging.getLogger(__name__)
CHECKPOINT_DIR = ".msif-checkpoints"


ACCUMULATE_DTYPES = {name: getattr(torch, name) for name in ACCUMULATE_DTYPE_NAMES}
MODEL_DTYPES = {name: getattr(torch, name) for name in MODEL_DTYPE_NAMES}
# Where a fit's time goes, per process (recorded in the manifest's ``fit.phase_seconds``): forward and
# backward passes with the capture hooks, label sampling and loss, the accumulator updates of each pass,
# gathering inputs and gradients to the owners, eigendecompositions and writing the module files.
PHASES = ("forward_backward", "labels", "covariance_updates", "exchange", "eigendecomposition", "lambda_updates",
          "writing")
# Bumped when the checkpoint's contents change meaning (2: each module's sums are held by its owner only).
CHECKPOINT_LAYOUT = 2


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

    def gather(self, tensor: torch.Tensor, owner: int) -> list[torch.Tensor] | None:
        """Every process's ``tensor`` (all the same shape), in rank order, on the ``owner``; None elsewhere."""
        if self.world == 1:
            return [tensor]
        received = [torch.empty_like(tensor) for _ in range(self.world)] if self.rank == owner else None
        torch.distributed.gather(tensor, received, dst=owner)
        return received

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every process's ``tensor`` (all the same shape), in rank order, on every process."""
        if self.world == 1:
            return [tensor]
        received = [torch.empty_like(tensor) for _ in range(self.world)]
        torch.distributed.all_gather(received, tensor)
        return received

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
         "world": world, "layout": CHECKPOINT_LAYOUT},
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

    def latest(self) -> tuple[int, dict[str, torch.Tensor], list[dict]] | None:
        """(step, this rank's tensors, this rank's finished module entries) of the last committed
        checkpoint of this run, if any."""
        marker = self.folder / "latest.json"
        if not marker.is_file():
            return None
        committed = json.loads(marker.read_text())
        if committed.get("fingerprint") != self.fingerprint:
            logger.warning("ignoring checkpoint in %s: it belongs to a fit with other settings or data", self.folder)
            return None
        step = committed["step"]
        path = self._file(step, self.dist.rank)
        with safe_open(str(path), framework="pt") as handle:
            done = json.loads((handle.metadata() or {}).get("done", "[]"))
        return step, load_file(path), done

    def save(self, step: int, tensors: dict[str, torch.Tensor], done: Sequence[dict] = ()) -> None:
        data = save({k: v.contiguous().cpu() for k, v in tensors.items()}, metadata={"done": json.dumps(list(done))})
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


class _Source:
    """The sequences of a fit, as a list or a re-iterable stream (``hub_msif.data.TokenStream``).

    Sequence ``i`` (in corpus order) goes to process ``i % world``; each process cuts its own
    sequences into batches, and every process runs the same number of batches per pass (the last
    ones may be empty), so collectives and checkpoints line up (docs/design.md, "Streaming data").
    """

    def __init__(self, sequences):
        self.sequences = sequences
        if hasattr(sequences, "survey"):
            self.count, self.tokens, _ = sequences.survey()
            self.max_length = sequences.spec.max_length  # a bound: the plan needs no exact longest
        else:
            if not isinstance(sequences, Sequence):
                sequences = self.sequences = list(sequences)
            self.count = len(sequences)
            self.tokens = sum(len(s["input_ids"]) for s in sequences)
            self.max_length = max((len(s["input_ids"]) for s in sequences), default=0)

    def num_batches(self, world: int, batch_size: int) -> int:
        return math.ceil(math.ceil(self.count / world) / batch_size)

    def batches(self, rank: int, world: int, batch_size: int, skip: int = 0) -> Iterator[tuple[list[int], list[dict]]]:
        """This process's batches of one pass, ``(global indices, sequences)``, after the first ``skip``."""
        total = self.num_batches(world, batch_size)
        if isinstance(self.sequences, Sequence):
            local = range(rank, self.count, world)
            for b in range(skip, total):
                indices = list(local[b * batch_size : (b + 1) * batch_size])
                yield indices, [self.sequences[i] for i in indices]
            return
        emitted, indices, batch = 0, [], []
        for index, sequence in enumerate(self.sequences):
            if index >= self.count:
                break
            if index % world != rank:
                continue
            indices.append(index)
            batch.append(sequence)
            if len(batch) == batch_size:
                if emitted >= skip:
                    yield indices, batch
                emitted, indices, batch = emitted + 1, [], []
        if batch:
            if emitted >= skip:
                yield indices, batch
            emitted += 1
        for _ in range(max(emitted, skip), total):
            yield [], []


def _progress_bar(**kwargs):
    """One tqdm bar per phase (covariance, eigendecomposition, Lambda) of each group."""
    from tqdm.auto import tqdm

    return tqdm(**kwargs)


def _report_plan(model, config: FitConfig, world: int, max_length: int, show_progress: bool) -> None:
    """The memory plan of this fit (docs/design.md, "Memory plan"): on stderr when progress is shown,
    else in the log (``hub-msif -v``)."""
    from hub_msif.factors.memory_plan import format_plan, plan_of_fit

    try:
        text = format_plan(plan_of_fit(model, config, world, max_length))
    except MsifError as err:  # a model the planner cannot describe still fits
        logger.warning("no memory plan for this fit: %s", err)
        return
    if show_progress:
        print(text, file=sys.stderr)
    else:
        logger.info("%s", text)


def _lambda_pass_index(sample: int) -> int:
    """Label-sample pass index of the ``sample``-th draw in the Lambda pass (the covariance pass is 0)."""
    return 1 + sample


def fit_factors(
    model: torch.nn.Module,
    sequences,
    out_dir: str | Path,
    config: FitConfig,
    *,
    pad_id: int,
    info: dict,
    accelerator=None,
    show_progress: bool = True,
    on_checkpoint: Callable[[int], None] | None = None,
    on_reduce: Callable[[int, dict], None] | None = None,
    load_result: bool = True,
) -> StageFactors | None:
    """Fits one stage's factors on tokenized ``sequences`` and saves them into ``out_dir``.

    ``sequences`` is a list of tokenized sequences or a re-iterable stream with ``survey()``
    (``hub_msif.data.TokenStream``). ``info`` (model, tokenizer and data descriptions;
    ``info["data"]["fingerprint"]`` and ``info["model"]["revision"]`` identify the run for
    resuming) goes into the manifest. ``on_checkpoint(step)`` is called after each committed
    checkpoint; ``on_reduce(group, kept)`` after each group's Lambda pass, with the names of the
    modules whose eigenvalues and Lambda this process holds (its owned ones, the only ones it ever sums).
    Returns the saved factors, or None with ``load_result=False`` (then no process ever holds
    more than its own modules: loading every module at the end would cost the artifact's size).

    Steps: the K module groups each take ``2 * num_batches`` steps (covariance pass, then Lambda
    pass); checkpoints and ``on_checkpoint`` count steps over the whole fit.
    """
    config.validate()
    source = _Source(sequences)
    if not source.count:
        raise MsifValueError("no sequences to fit on")
    run = _FitRun(model, source, Path(out_dir), config, pad_id, info, _Distributed(accelerator), show_progress,
                  on_checkpoint, on_reduce)
    run.resume()
    started = time.perf_counter()
    try:
        with input_gradients_only(model):
            for g in range(run.start_step // run.per_group, config.module_partitions):
                run.run_group(g)
    finally:
        model.train(run.was_training)
    run.write_manifest(time.perf_counter() - started)
    return load_stage(run.out_dir, config.stage) if load_result else None


class _FitRun:
    """One ``fit_factors`` call: the module groups, owners and checkpoints of a fit, its resume point,
    one module group at a time, and the stage manifest at the end (docs/design.md, "Fitting EK-FAC",
    "Module partitions and owners")."""

    def __init__(self, model: torch.nn.Module, source: _Source, out_dir: Path, config: FitConfig, pad_id: int,
                 info: dict, dist: _Distributed, show_progress: bool, on_checkpoint: Callable[[int], None] | None,
                 on_reduce: Callable[[int, dict], None] | None):
        self.source, self.out_dir, self.config, self.info, self.dist = source, out_dir, config, info, dist
        self.on_checkpoint, self.on_reduce = on_checkpoint, on_reduce
        self.tracked = find_modules(model, config.modules, config.split_heads)
        _check_other_stage(out_dir, config.stage, self.tracked)
        self.groups = [[t for t in self.tracked if t.name in set(names)]
                       for names in module_groups(self.tracked, config.module_partitions)]
        owners = module_owners(self.tracked, dist.world)
        if dist.is_main:
            _report_plan(model, config, dist.world, source.max_length, show_progress)
        self.was_training = model.training
        if config.model_dtype is not None:
            model.to(MODEL_DTYPES[config.model_dtype])  # in place, like the move to the device
        model.eval().to(dist.device)

        self.num_batches = source.num_batches(dist.world, config.batch_size)  # equal on every rank
        self.per_group = 2 * self.num_batches
        self.total_steps = config.module_partitions * self.per_group
        fingerprint = _run_fingerprint(config, self.tracked, info.get("data", {}).get("fingerprint", ""),
                                       info.get("model", {}).get("revision", ""), dist.world)
        self.checkpoints = _Checkpoints(out_dir, config.stage, fingerprint, dist)
        self.fitter = _GroupFitter(model, config, dist, owners, source, pad_id, show_progress)
        self.start_step = 0
        self.state: dict[str, torch.Tensor] = {}  # the resumed group's partial sums
        self.done: list[dict] = []  # manifest entries of the module files written so far

    def resume(self) -> None:
        """Starts from the latest checkpoint of this run (same fingerprint), unless a module file it
        recorded as finished is missing or changed."""
        resumed = self.checkpoints.latest()
        if resumed is None:
            return
        self.start_step, self.state, self.done = resumed
        if not _files_intact(self.out_dir, self.done, self.dist):
            logger.warning("ignoring checkpoint in %s: module files it recorded as finished are missing or changed",
                           self.checkpoints.folder)
            self.start_step, self.state, self.done = 0, {}, []
        else:
            logger.info("resuming the %s fit from checkpoint step %d", self.config.stage, self.start_step)

    def _checkpoint(self, step: int, tensors: dict) -> None:
        """Within a group's passes: a checkpoint every ``checkpoint_every`` steps (group ends are saved by ``run_group``)."""
        if self.config.checkpoint_every and step % self.config.checkpoint_every == 0 and step % self.per_group:
            self._save(step, tensors)

    def _save(self, step: int, tensors: dict) -> None:
        self.checkpoints.save(step, tensors, self.done)
        if self.on_checkpoint is not None:
            self.on_checkpoint(step)

    def run_group(self, g: int) -> None:
        """Both passes over module group ``g``, then each owner writes its finished modules' files."""
        config, source, fitter = self.config, self.source, self.fitter
        offset = g * self.per_group
        local = self.state if self.start_step > offset else {}
        kept = fitter.fit_group(g, len(self.groups), self.groups[g], offset, max(self.start_step - offset, 0),
                                self.num_batches, local, self._checkpoint)
        if self.on_reduce is not None:
            self.on_reduce(g, {"eigenvalues": sorted(fitter.eigen), "lambda": sorted(kept)})
        started = time.perf_counter()
        for t in self.groups[g]:
            if t.name in kept:  # the owner: final factors of this module, written now
                eig_a, q_a, eig_s, q_s = fitter.eigen.pop(t.name)
                lam = kept[t.name].lam.double().div_(source.count * config.samples_per_sequence)
                # K-FAC eigenvalues on Lambda's scale: GGN ~ (A / tokens) kron (S / sequences), see ModuleFactors.
                factors = ModuleFactors(t, q_a, q_s, lam, eig_a / max(source.tokens, 1), eig_s / source.count)
                self.done.append(save_module_file(self.out_dir, config.stage, factors, config.storage_dtype))
        fitter.eigen.clear()
        del kept
        fitter.seconds["writing"] += time.perf_counter() - started
        step = offset + self.per_group
        if config.checkpoint_every and step < self.total_steps:  # group boundary: finished files are reused
            self._save(step, {})

    def write_manifest(self, seconds: float) -> None:
        """The stage manifest (on the main process, once every owner has written its files); checkpoints go."""
        config, dist, source, out_dir = self.config, self.dist, self.source, self.out_dir
        stage_info = {
            **self.info,
            "fit": {
                # The settings as given (docs/design.md, "Fitting EK-FAC"): the card's reproduce command is
                # rendered from them. The keys beside it are what was measured, and (older readers) copies.
                "config": asdict(config),
                "label_mode": config.label_mode, "seed": config.seed, "batch_size": config.batch_size,
                "split_heads": config.split_heads,
                "modules": config.modules if isinstance(config.modules, str) else "explicit",
                "num_processes": dist.world, "num_sequences": source.count, "num_tokens": source.tokens,
                "seconds": round(seconds, 3), "hub_msif_version": __version__,
                "phase_seconds": {k: round(v, 3) for k, v in self.fitter.seconds.items()},  # the main process's
                "torch_version": torch.__version__,
                "module_partitions": config.module_partitions, "samples_per_sequence": config.samples_per_sequence,
                "accumulate_dtype": config.accumulate_dtype, "model_dtype": config.model_dtype,
            },
        }
        dist.barrier()  # every owner has written its modules' files
        if dist.is_main:
            entries = [_entry_from_file(out_dir, config.stage, t, config.storage_dtype) for t in self.tracked]
            write_stage_manifest(out_dir, config.stage, entries, stage_info)
        self.checkpoints.clear()
        dist.barrier()


class _GroupFitter:
    """Both passes over the data for one group of modules; each module's sums live on its owner only.

    With several processes, every batch's captured inputs and output gradients of a module are
    gathered to the module's owner as its backward produces them (docs/design.md, "Module partitions
    and owners"): the owner alone accumulates the module's covariances and Lambda, eigendecomposes
    and keeps its float64 eigenbasis; the other processes keep no sums and no eigenbasis of it.
    """

    def __init__(self, model, config: FitConfig, dist: _Distributed, owners: dict[str, int], source: _Source,
                 pad_id: int, show_progress: bool):
        self.model, self.config, self.dist, self.owners = model, config, dist, owners
        self.source, self.pad_id = source, pad_id
        self.dtype = compute_dtype(model)
        self.accumulate = ACCUMULATE_DTYPES[config.accumulate_dtype]
        self.eigen: dict[str, tuple] = {}  # owned modules of the current group: (eig_a, q_a, eig_s, q_s)
        self.progress = None if show_progress and dist.is_main else True  # tqdm: None = only on a terminal
        self.seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)  # this process's time per phase
        self._tokens: list[tuple[int, int]] = []  # (sequences, length) of every process's current batch
        self._index: dict[str, int] = {}  # module name -> position in the group, checked at each exchange

    def _bar(self, **kwargs):
        return _progress_bar(disable=self.progress, **kwargs)

    def _owned(self, specs: Sequence[TrackedModule]) -> list[TrackedModule]:
        return [t for t in specs if self.owners[t.name] == self.dist.rank]

    def fit_group(self, g: int, num_groups: int, specs: Sequence[TrackedModule], offset: int, done_steps: int,
                  num_batches: int, state: dict, checkpoint) -> dict[str, LambdaAccumulator]:
        """Runs the group's remaining steps; returns the Lambda accumulators of the modules this process owns."""
        dist = self.dist
        label = f" (group {g + 1}/{num_groups})" if num_groups > 1 else ""
        owned = self._owned(specs)
        self._index = {t.name: i for i, t in enumerate(specs)}
        covariances: dict[str, CovarianceAccumulator] = {}
        lambdas: dict[str, LambdaAccumulator] = {}
        if done_steps <= num_batches:
            covariances = {t.name: CovarianceAccumulator(t, dist.device, self.accumulate) for t in owned}
            for t in owned if done_steps else ():
                covariances[t.name].load_state({"a": state[f"{t.name}/a"], "s": state[f"{t.name}/s"]})
        else:
            for t in owned:
                eig_a, q_a, eig_s, q_s = (state[f"{t.name}/{k}"].to(dist.device) for k in ("eig_a", "q_a", "eig_s", "q_s"))
                self.eigen[t.name] = (eig_a, q_a, eig_s, q_s)
                lambdas[t.name] = LambdaAccumulator(t, q_a, q_s, self.dtype, self.accumulate)
                lambdas[t.name].load_state({"lam": state[f"{t.name}/lam"].to(dist.device)})

        if done_steps < num_batches:
            self._pass(0, specs, covariances, offset, done_steps, num_batches, f"covariance{label}",
                       lambda: {k: v for t in owned for k, v in (
                           (f"{t.name}/a", covariances[t.name].a), (f"{t.name}/s", covariances[t.name].s))},
                       checkpoint)
        if not lambdas:
            # Phase boundary: each owner decomposes its modules' covariances in float64, one at a time.
            started = time.perf_counter()
            for t in self._bar(iterable=owned, desc=f"eigendecomposition{label}", unit="module"):
                acc = covariances.pop(t.name)
                # Contiguous, like the tensors a resumed run loads from its checkpoint: eigh's
                # column-major output would take other matmul paths and round differently.
                self.eigen[t.name] = tuple(x.contiguous() for x in acc.eigendecompose())
                del acc  # A and S are not needed any more: free them early
                _, q_a, _, q_s = self.eigen[t.name]
                lambdas[t.name] = LambdaAccumulator(t, q_a, q_s, self.dtype, self.accumulate)
            self.seconds["eigendecomposition"] += time.perf_counter() - started

        def lambda_state() -> dict:
            out = {}
            for t in owned:
                eig_a, q_a, eig_s, q_s = self.eigen[t.name]
                out.update({f"{t.name}/q_a": q_a, f"{t.name}/q_s": q_s, f"{t.name}/lam": lambdas[t.name].lam,
                            f"{t.name}/eig_a": eig_a, f"{t.name}/eig_s": eig_s})
            return out

        self._pass(1, specs, lambdas, offset + num_batches, max(done_steps - num_batches, 0), num_batches,
                   f"Lambda{label}", lambda_state, checkpoint)
        return lambdas

    def _pass(self, phase: int, specs, accumulators: dict, first_step: int, skip: int, num_batches: int,
              desc: str, state, checkpoint) -> None:
        """One pass over this process's batches (after the first ``skip``), feeding the owned ``accumulators``."""
        dist, config = self.dist, self.config
        samples = config.samples_per_sequence if phase == 1 else 1
        update_phase = "covariance_updates" if phase == 0 else "lambda_updates"

        def consume(spec: TrackedModule, a: torch.Tensor, g: torch.Tensor) -> None:
            if dist.world == 1:
                started = time.perf_counter()
                accumulators[spec.name].update(a, g)
                self.seconds[update_phase] += time.perf_counter() - started
            else:
                self._exchange(spec, a, g, accumulators, update_phase)

        capture = GradientCapture(self.model, specs, consume)
        bar = self._bar(total=num_batches, initial=skip, desc=desc, unit="batch")
        step = first_step + skip
        try:
            with capture:
                for indices, sequences in self.source.batches(dist.rank, dist.world, config.batch_size, skip):
                    started = time.perf_counter()
                    before = self.seconds["labels"] + self.seconds[update_phase] + self.seconds["exchange"]
                    if indices:
                        batch = collate(sequences, indices, self.pad_id, dist.device)
                        capture.mask = batch["attention_mask"]
                    else:  # an empty last batch still takes part in every exchange (not in any sum)
                        batch = collate([{"input_ids": [self.pad_id] * 2, "labels": [-100] * 2}], [0], self.pad_id,
                                        dist.device)
                        capture.mask = torch.zeros_like(batch["attention_mask"])
                    if dist.world > 1:
                        shape = torch.tensor(list(batch["input_ids"].shape) if indices else [0, 0], device=dist.device)
                        self._tokens = [(int(x[0]), int(x[1])) for x in dist.all_gather(shape)]
                    if indices or dist.world > 1:
                        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                            use_cache=False).logits
                        for sample in range(samples):
                            pass_index = 0 if phase == 0 else _lambda_pass_index(sample)
                            labelled = time.perf_counter()
                            loss = lm_loss(logits, batch, config.label_mode, config.seed, pass_index=pass_index)
                            self.seconds["labels"] += time.perf_counter() - labelled
                            loss.backward(retain_graph=sample + 1 < samples)
                    inner = self.seconds["labels"] + self.seconds[update_phase] + self.seconds["exchange"] - before
                    self.seconds["forward_backward"] += time.perf_counter() - started - inner
                    bar.update(1)
                    step += 1
                    checkpoint(step, state())
        finally:
            bar.close()

    def _exchange(self, spec: TrackedModule, a: torch.Tensor, g: torch.Tensor, accumulators: dict,
                  update_phase: str) -> None:
        """Gathers this batch's ``a`` and ``g`` of one module from every process to its owner, which
        adds them to its sums in rank order. One message per process: the module's position in the
        group (every process must reach the modules in the same order), then ``a`` and ``g``."""
        dist = self.dist
        started = time.perf_counter()
        owner, index = self.owners[spec.name], self._index[spec.name]
        sizes = [b * t for b, t in self._tokens]
        mine = sizes[dist.rank]
        message = a.new_empty(1 + max(sizes) * (spec.d_in + spec.d_out))
        message[0] = index
        if mine:
            message[1 : 1 + mine * spec.d_in] = a.reshape(-1)
            message[1 + mine * spec.d_in : 1 + mine * (spec.d_in + spec.d_out)] = g.reshape(-1)
        received = dist.gather(message, owner)
        self.seconds["exchange"] += time.perf_counter() - started
        if received is None:
            return
        started = time.perf_counter()
        for rank, (message, (b, t)) in enumerate(zip(received, self._tokens)):
            if int(message[0]) != index:
                raise FactorError(f"process {rank} sent module {int(message[0])} of the group while this process "
                                  f"expected {index} ({spec.name}); the processes ran the backward in other orders")
            if not b * t:
                continue
            if rank == dist.rank:
                accumulators[spec.name].update(a, g)
            else:
                n = b * t * spec.d_in
                accumulators[spec.name].update(message[1 : 1 + n].view(b, t, spec.d_in),
                                               message[1 + n : 1 + n + b * t * spec.d_out].view(b, t, spec.d_out))
        self.seconds[update_phase] += time.perf_counter() - started


def _files_intact(out_dir: Path, done: Sequence[dict], dist: _Distributed) -> bool:
    """Whether every module file this process recorded as finished is still there with its sha256,
    on every process (all agree, so either all resume or all start over)."""
    ok = all(_intact(out_dir, e) for e in done)
    flag = torch.tensor([0 if ok else 1], dtype=torch.float64, device=dist.device)
    return float(dist.all_reduce(flag)[0]) == 0


def _intact(out_dir: Path, entry: dict) -> bool:
    """Whether a checkpoint's finished module file is in the folder (``artifact_path``: no file out of
    it is ever opened or hashed) with its sha256."""
    try:
        path = artifact_path(out_dir, entry["file"])
    except MsifValueError:
        return False
    return path.is_file() and sha256_bytes(path.read_bytes()) == entry["sha256"]


def _entry_from_file(out_dir: Path, stage: str, spec: TrackedModule, dtype: str) -> dict:
    """A module's manifest entry from the file its owner wrote (rank 0 writes the manifest)."""
    relative = module_path(stage, spec)
    path = out_dir / relative
    if not path.is_file():
        raise FactorError(f"module file {path} is missing after the fit; every process must write to the same folder")
    return {**spec_to_json(spec), "file": relative, "sha256": sha256_bytes(path.read_bytes()), "dtype": dtype}
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
    on_reduce: Callable[[int, dict], None] | None = None,
    load_result: bool = True,
    base_model: str | None = None,
    model_name: str | None = None,
) -> StageFactors | None:
    """Loads ``model`` (Hub id or folder) and the corpus ``data``, fits, saves into ``out_dir``.
    A PEFT adapter is merged into its base (``base_model``, else its config's; hub_msif.models).
    A local model folder is recorded as ``model_name`` (default: the folder's name) and the sha256
    of its weights, local data files by their names and content sha256: the manifest holds no path
    of this machine (docs/design.md, "No machine paths").

    ``corpus`` is a ``CorpusSpec`` for columns, template and lengths (``data`` fills its
    ``data`` field). This is what ``hub-msif fit`` runs. The corpus is streamed: read once to
    count and fingerprint it, then tokenized again on every pass, never held in memory.
    """
    from hub_msif.data import CorpusSpec, TokenStream, load_rows, remember_source
    from hub_msif.models import load_model, pad_token_id

    config = config or FitConfig()
    config.validate()
    corpus = corpus or CorpusSpec(data=data)
    corpus.data = data
    corpus.validate()
    lm, tokenizer, ref = load_model(model, revision, base_model=base_model, name=model_name)
    sequences = TokenStream(load_rows(corpus), tokenizer, corpus)
    _, _, data_fingerprint = sequences.survey(show_progress)
    info = {
        "model": {**ref.to_json(), "class": type(lm).__name__},
        "tokenizer": {"id": ref.id, "revision": ref.revision, "class": type(tokenizer).__name__},
        "data": {**corpus.describe(), "fingerprint": data_fingerprint, "source_sha256": remember_source(corpus)},
    }
    return fit_factors(lm, sequences, out_dir, config, pad_id=pad_token_id(tokenizer), info=info,
                       accelerator=accelerator, show_progress=show_progress, on_checkpoint=on_checkpoint,
                       on_reduce=on_reduce, load_result=load_result)
