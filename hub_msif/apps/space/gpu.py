"""ZeroGPU: where the Space runs on such hardware, requests compute inside ``spaces.GPU``. (Which device
the models and factors live on is the attributor's ``device``, ``MSIF_DEVICE``: ``hub_msif.apps.space.settings``.)

On ZeroGPU hardware (the Hub sets ``SPACES_ZERO_GPU``), a GPU is lent to a request only inside a
function decorated with ``spaces.GPU`` (the ``spaces`` package that such Spaces have installed);
``gpu_task`` applies that decorator there, and leaves functions alone everywhere else, including
where the package is missing (it is not a dependency of hub_msif). See docs/design.md, "Space".
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping

logger = logging.getLogger(__name__)

ZERO_GPU_ENV = "SPACES_ZERO_GPU"
GPU_DURATION_ENV = "MSIF_GPU_DURATION"  # seconds of GPU a ZeroGPU request may hold (spaces.GPU duration)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def zero_gpu_decorator(environ: Mapping[str, str] | None = None) -> Callable | None:
    """``spaces.GPU`` (with ``MSIF_GPU_DURATION`` when set) on ZeroGPU hardware where the
    ``spaces`` package imports; None elsewhere."""
    environ = os.environ if environ is None else environ
    if not _truthy(environ.get(ZERO_GPU_ENV)):
        return None
    try:
        import spaces  # noqa: PLC0415 (only on ZeroGPU hardware)
    except ImportError:
        logger.warning("%s is set but the spaces package is missing: running without ZeroGPU", ZERO_GPU_ENV)
        return None
    duration = (environ.get(GPU_DURATION_ENV) or "").strip()
    # mypy resolves `spaces` to this repository's spaces/ folder (the example Space), not the package
    gpu: Callable = spaces.GPU  # type: ignore[attr-defined]
    return gpu(duration=int(duration)) if duration.isdigit() else gpu


def gpu_task(fn: Callable, environ: Mapping[str, str] | None = None) -> Callable:
    """``fn`` decorated with ``spaces.GPU`` on ZeroGPU hardware, else ``fn`` itself."""
    decorator = zero_gpu_decorator(environ)
    return fn if decorator is None else decorator(fn)
