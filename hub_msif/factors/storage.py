"""The factor folder on disk: one safetensors file per module plus the manifest ``msif.json``.

Layout (docs/design.md, "Artifact formats")::

    msif.json
    <stage>/mlp/<module>.safetensors     q_a, q_s, lam, eig_a, eig_s (no covariances)
    <stage>/attn/<module>.safetensors

Every file is written atomically (temporary file in the same folder, fsync, rename), module
files before the manifest, and the manifest records each file's sha256. A load verifies the hash
of the exact bytes it parses, so a truncated, altered or half-written file never loads.
Safetensors holds only tensors and strings; nothing here ever unpickles.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from hub_msif.artifacts.atomic import atomic_write_bytes, sha256_bytes
from hub_msif.artifacts.integrity import read_verified
from hub_msif.artifacts.manifest import (
    FACTORS,
    STAGES,
    artifact_path,
    check_module_record,
    read_manifest,
    select_modules,
    write_stage_manifest,
)
from hub_msif.errors import FactorError, FactorIntegrityError, MsifValueError
from hub_msif.factors.architectures import TrackedModule, linear_shape
from hub_msif.factors.ekfac import ModuleFactors

MANIFEST_NAME = FACTORS.manifest_name
logger = logging.getLogger(__name__)
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}

def module_path(stage: str, spec: TrackedModule) -> str:
    """Relative path of a module's file; ``mlp/`` and ``attn/`` folders allow MLP-only pulls."""
    group = "mlp" if spec.role == "mlp" else "attn"
    return f"{stage}/{group}/{spec.name}.safetensors"


def spec_to_json(spec: TrackedModule) -> dict:
    return {
        "name": spec.name,
        "role": spec.role,
        "d_in": spec.d_in,
        "d_out": spec.d_out,
        "has_bias": spec.has_bias,
        "transposed": spec.transposed,
        "blocks": list(spec.block_labels),
        "block_size": spec.block_size,
    }


def spec_from_json(entry: dict) -> TrackedModule:
    return TrackedModule(
        entry["name"], entry["role"], entry["d_in"], entry["d_out"], entry["has_bias"],
        entry["transposed"], tuple(entry["blocks"]),
    )


def save_stage(
    folder: str | Path,
    stage: str,
    factors: Mapping[str, ModuleFactors],
    info: dict,
    dtype: str = "float32",
) -> dict:
    """Writes one stage's module files, then records them in the manifest; returns the manifest.

    ``info`` describes the stage (model, tokenizer, data, fitting settings) and is stored as is.
    Other stages already in the manifest are kept.
    """
    if stage not in STAGES:
        raise MsifValueError(f"stage must be one of {', '.join(STAGES)}, not {stage!r}")
    if dtype not in STORAGE_DTYPES:
        raise MsifValueError(f"storage dtype must be one of {', '.join(STORAGE_DTYPES)}, not {dtype!r}")
    folder = Path(folder)
    entries = [save_module_file(folder, stage, module_factors, dtype) for module_factors in factors.values()]
    return write_stage_manifest(folder, stage, entries, info)


def save_module_file(folder: str | Path, stage: str, module_factors: ModuleFactors, dtype: str = "float32") -> dict:
    """Writes one module's file atomically; returns its manifest entry (shape, file, sha256, dtype).

    A sharded fit calls this on the module's owner process, as soon as the module is done.
    """
    if dtype not in STORAGE_DTYPES:
        raise MsifValueError(f"storage dtype must be one of {', '.join(STORAGE_DTYPES)}, not {dtype!r}")
    name = module_factors.spec.name
    tensors = {k: v.to(STORAGE_DTYPES[dtype]).contiguous().cpu() for k, v in module_factors.tensors().items()}
    # One metadata key: safetensors writes several in random order (safetensors issue #584),
    # which would give identical factors different bytes and sha256.
    data = st_save(tensors, metadata={"hub_msif": json.dumps({"module": name, "stage": stage}, sort_keys=True)})
    relative = module_path(stage, module_factors.spec)
    atomic_write_bytes(Path(folder) / relative, data)
    return {**spec_to_json(module_factors.spec), "file": relative, "sha256": sha256_bytes(data), "dtype": dtype}


@dataclass
class StageFactors:
    """All loaded factors of one stage, keyed by module name, plus the stage's manifest entry."""

    stage: str
    info: dict
    modules: dict[str, ModuleFactors]

    @property
    def specs(self) -> list[TrackedModule]:
        return [m.spec for m in self.modules.values()]

    def precondition(
        self, grads: Mapping[str, torch.Tensor], damping: float, relative: bool = False
    ) -> dict[str, torch.Tensor]:
        """``P(V)`` for each module's gradient ``[..., d_out, d_in]`` in ``grads``."""
        missing = [name for name in grads if name not in self.modules]
        if missing:
            raise FactorError(f"no {self.stage} factors for module(s) {', '.join(missing)}")
        return {name: self.modules[name].precondition(v, damping, relative) for name, v in grads.items()}

    def check_model(self, model: torch.nn.Module, revision: str | None = None, allow_revision_mismatch: bool = False,
                    model_id: str | None = None) -> None:
        """Raises ``FactorError`` unless ``model`` has every module with the recorded shape (and revision).

        Shapes are checked first: no flag can make factors of other shapes usable. ``model_id``
        (where the model was loaded from) only makes the message name both sides; the revision
        decides, since the same weights may live in another folder.
        """
        problems = []
        for name, factors in self.modules.items():
            try:
                d_out, d_in, has_bias, _ = linear_shape(model.get_submodule(name))
            except (AttributeError, TypeError):
                problems.append(f"{name} (missing in {type(model).__name__})")
                continue
            spec = factors.spec
            if (d_out, d_in + int(has_bias)) != (spec.d_out, spec.d_in):
                problems.append(f"{name} (factors {spec.d_out}x{spec.d_in}, model {d_out}x{d_in + int(has_bias)})")
        if problems:
            raise FactorError(f"{self.stage} factors do not match the model's modules: {'; '.join(problems)}")
        recorded = self.info.get("model", {}).get("revision")
        if revision is not None and recorded is not None and revision != recorded:
            message = (
                f"{self.stage} factors were fitted on model revision {recorded} "
                f"({self.info['model'].get('id')}) but the loaded model"
                f"{f' ({model_id})' if model_id else ''} has revision {revision}"
            )
            if not allow_revision_mismatch:
                raise FactorError(message + "; pass allow_revision_mismatch to use them anyway")
            logger.warning(message)


def load_module_file(folder: Path, entry: dict, stage: str) -> ModuleFactors:
    """One module's factors of ``stage``, as its manifest ``entry`` lists them: the path checked to
    stay inside the folder before the file is opened (``artifact_path``), the bytes checked against
    the sha256, the shapes and the plausibility of the tensors, and the file's own record of its
    module and stage against the entry."""
    path = artifact_path(folder, entry["file"])
    if not path.is_file():
        raise FactorError(f"factor file {path} listed in the manifest is missing")
    data = read_verified(path, entry["sha256"], FactorIntegrityError)
    try:
        tensors = st_load(data)
    except SafetensorError as err:
        raise FactorError(f"factor file {path} is not a valid safetensors file: {err}") from err
    spec = spec_from_json(entry)
    expected = {
        "q_a": (spec.d_in, spec.d_in),
        "q_s": (spec.num_blocks, spec.block_size, spec.block_size),
        "lam": (spec.num_blocks, spec.block_size, spec.d_in),
        "eig_a": (spec.d_in,),
        "eig_s": (spec.num_blocks, spec.block_size),
    }
    for key, shape in expected.items():
        if key not in tensors or tuple(tensors[key].shape) != shape:
            found = tuple(tensors[key].shape) if key in tensors else "missing"
            raise FactorError(f"factor file {path}: tensor {key!r} should be {shape}, found {found}")
    recorded = entry.get("dtype")  # when recorded, the manifest's dtype must be the file's
    stored = {str(t.dtype).removeprefix("torch.") for t in tensors.values()}
    if recorded is not None and stored != {recorded}:
        raise FactorError(f"factor file {path}: the manifest says dtype {recorded!r}, the file holds "
                          f"{', '.join(sorted(stored))}")
    check_plausible(path, tensors)
    check_module_record(path, entry, stage, data)
    return ModuleFactors(spec, **{k: tensors[k] for k in expected})


# How far ``Q^T Q x`` may stray from ``x`` (relative) for stored eigenvector blocks, by storage dtype:
# well above the rounding of an orthonormal float64 matrix cast to that dtype, far below garbage.
ORTHONORMAL_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4, torch.bfloat16: 0.1, torch.float16: 0.02}
_PROBES = 4


def check_plausible(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Raises ``FactorError`` unless a module's factors are plausible whatever their checksum says:
    every tensor finite, Lambda and the K-FAC eigenvalues non-negative (up to rounding: they are
    means of squares and eigenvalues of covariances), and the eigenvector blocks orthonormal.

    Orthonormality is probed with a few fixed random vectors (``|Q^T Q x - x| / |x|``), which costs
    ``O(n^2)`` per block instead of the ``O(n^3)`` of forming ``Q^T Q``.
    """
    for key, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            raise FactorError(f"factor file {path}: tensor {key!r} holds NaN or infinite values")
    for key in ("lam", "eig_a", "eig_s"):
        values = tensors[key].double()
        floor = -1e-6 * float(values.abs().max())
        if float(values.min()) < floor:
            raise FactorError(f"factor file {path}: {key!r} has negative values (down to {float(values.min()):.3g}); "
                              "eigenvalues of these factors are never negative: the file was altered or damaged")
    generator = torch.Generator().manual_seed(0)
    for key in ("q_a", "q_s"):
        q = tensors[key].double()
        q = q if q.dim() == 3 else q.unsqueeze(0)  # [blocks, n, n]
        x = torch.randn(q.shape[0], q.shape[-1], _PROBES, generator=generator, dtype=torch.float64)
        error = float(((q.transpose(1, 2) @ (q @ x) - x).norm(dim=1) / x.norm(dim=1)).max())
        tolerance = ORTHONORMAL_TOLERANCE.get(tensors[key].dtype, 1e-4)
        if not error <= tolerance:
            raise FactorError(f"factor file {path}: eigenvectors {key!r} are not orthonormal (error {error:.2g}, "
                              f"tolerance {tolerance:g} for {tensors[key].dtype}): the file was altered or damaged")


def load_stage(
    folder: str | Path, stage: str, modules: str | Iterable[str] | None = "all"
) -> StageFactors:
    """Loads (and verifies) one stage's factors; ``modules`` is ``all``, ``mlp`` or a list of names."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    stages = manifest.get("stages", {})
    if stage not in stages:
        have = ", ".join(stages) or "none"
        raise FactorError(f"{folder} has no {stage!r} factors (stages present: {have})")
    info = stages[stage]
    entries = select_modules(info["modules"], modules)
    return StageFactors(stage, info, {e["name"]: load_module_file(folder, e, stage) for e in entries})
