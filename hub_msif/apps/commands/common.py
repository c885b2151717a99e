"""What several commands share: ``--threads`` (and ``use_threads``), ``--device`` and ``--model-dtype``,
and the ``--plan`` action that makes the options a plan does not read optional.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable

from hub_msif.apps.arguments import positive_int
from hub_msif.errors import MsifValueError


def add_threads(p) -> None:
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="CPU threads for torch (intra- and inter-op) and OpenMP (default: the libraries' own choice, "
                        "usually all cores; on a busy machine 1 can be many times faster)")


def use_threads(threads: int | None) -> None:
    """``--threads N``: before any work, so that every pool (torch's intra- and inter-op, OpenMP of
    faiss) starts at that size; set through the environment too when torch is not yet imported."""
    if threads is None:
        return
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # once inter-op work has started (a second command in one process) it is fixed
        pass


def add_device(p) -> None:
    """``--device`` and ``--model-dtype`` of ``attribute`` and ``demo`` (docs/design.md, "Device and attribution plan")."""
    p.add_argument("--device", type=device_text, default="auto", metavar="auto|cpu|cuda[:N]",
                   help="where both models and the factors live (default auto: CUDA when there is one, else the CPU)")
    p.add_argument("--model-dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="dtype of both models' forward and backward (default: as loaded); gradients and "
                        "preconditioning stay float32")


def device_text(text: str) -> str:
    from hub_msif.attribution.device import check_device_text

    try:
        return check_device_text(text)
    except MsifValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


class PlanAction(argparse.Action):
    """``--plan`` (``fit``, ``attribute``): sets the flag and, for this parse, makes the options named in
    ``frees`` optional, and the mutually exclusive groups holding one of them: a plan reads none of them."""

    def __init__(self, option_strings, dest, frees: Iterable[str] = (), **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)
        self.frees = set(frees)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True)
        for action in parser._actions:
            if action.dest in self.frees:
                action.required = False
        for group in parser._mutually_exclusive_groups:
            if {a.dest for a in group._group_actions} & self.frees:
                group.required = False
