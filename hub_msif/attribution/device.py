"""Where attribution runs and in which dtype the models compute (docs/design.md, "Device and attribution plan").

``resolve_device`` turns ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` into a ``torch.device`` (``auto``:
CUDA when torch sees a CUDA device, else the CPU), refusing a CUDA device this machine does not
have with one line. ``model_dtype`` checks ``bfloat16``, ``float16``, ``float32`` (or None: the
models stay in the dtype they were loaded in) and gives the torch dtype.
"""

from __future__ import annotations

import re

from hub_msif.errors import MsifValueError
from hub_msif.factors.config import MODEL_DTYPE_NAMES as MODEL_DTYPES

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_DEVICE = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


def check_device_text(text: str) -> str:
    """``text`` when it is of the form ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (no availability check)."""
    match = _DEVICE.match(str(text).strip().lower()) if isinstance(text, str) else None
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise MsifValueError(f"device must be {DEVICE_CHOICES}, not {text!r}")
    return str(text).strip().lower()


def resolve_device(text: str = "auto"):
    """The ``torch.device`` that ``text`` names on this machine; ``MsifValueError`` for a CUDA
    device that is not there."""
    import torch

    text = check_device_text(text)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, no device visible"
        raise MsifValueError(f"device {text!r} asked for, but torch sees no CUDA device on this machine "
                             f"(torch {torch.__version__}, {build}); use cpu or auto")
    device = torch.device(text)
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise MsifValueError(f"device {text!r} asked for, but this machine has {count} CUDA device(s) "
                             f"(cuda:0 to cuda:{count - 1})")
    return device


def model_dtype(name: str | None):
    """The torch dtype of ``bfloat16``, ``float16`` or ``float32``; None for None (as loaded)."""
    import torch

    if name is None:
        return None
    if name not in MODEL_DTYPES:
        raise MsifValueError(f"model dtype must be one of {', '.join(MODEL_DTYPES)}, not {name!r}")
    return getattr(torch, name)
