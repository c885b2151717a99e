"""Which modules are fitted together (module partitions) and which process owns each module.

Both are pure functions of the tracked modules' shapes, so every process, the planner
(``hub_msif.factors.memory_plan``) and a resumed run compute the same answer (docs/design.md,
"Module partitions and owners").

A module's weight is the number of accumulator elements it holds during a fit,
``d_in^2 + d_out^2 + d_out * d_in`` (covariance ``A``, covariance ``S`` as if one block, and
Lambda); ``accumulator_elements`` gives it. Per-head blocks make ``S`` smaller than ``d_out^2``;
the weight keeps the simple upper bound so that it depends on the shape alone.

Balancing is greedy "largest first": modules are taken from the heaviest down (ties: model order)
and each goes to the currently lightest bin (ties: the lowest bin number). The heaviest bin is then
at most 4/3 of the optimum; with many similar modules it is close to the mean.
"""

from __future__ import annotations

from collections.abc import Sequence

from hub_msif.errors import MsifValueError
from hub_msif.factors.architectures import TrackedModule


def accumulator_elements(spec: TrackedModule) -> int:
    """Elements of the module's fit accumulators: ``d_in^2 + d_out^2 + d_out * d_in``."""
    return spec.d_in * spec.d_in + spec.d_out * spec.d_out + spec.d_out * spec.d_in


def _balance(specs: Sequence[TrackedModule], bins: int) -> list[int]:
    """Bin number of each module (in the order of ``specs``), largest first into the lightest bin."""
    loads = [0] * bins
    assignment = [0] * len(specs)
    order = sorted(range(len(specs)), key=lambda i: (-accumulator_elements(specs[i]), i))
    for i in order:
        target = min(range(bins), key=lambda b: (loads[b], b))
        assignment[i] = target
        loads[target] += accumulator_elements(specs[i])
    return assignment


def module_groups(specs: Sequence[TrackedModule], k: int) -> list[list[str]]:
    """The module names in ``k`` groups balanced by accumulator size, each in model order.

    Group ``i`` is fitted (both passes over the data) before group ``i + 1``; only its
    accumulators live at a time. ``k`` must be between 1 and the number of modules.
    """
    if not isinstance(k, int) or k < 1:
        raise MsifValueError(f"module partitions must be a positive integer, got {k!r}")
    if k > len(specs):
        raise MsifValueError(f"{k} module partitions but only {len(specs)} tracked module(s); use at most {len(specs)}")
    assignment = _balance(specs, k)
    return [[s.name for s, b in zip(specs, assignment) if b == group] for group in range(k)]


def module_owners(specs: Sequence[TrackedModule], world: int) -> dict[str, int]:
    """The owner rank of each module among ``world`` processes, balanced by accumulator size.

    The owner receives every process's inputs and gradients of the module and alone holds its sums,
    eigendecomposes them, keeps the factors and writes the module's file. With more processes than modules some ranks own nothing.
    """
    if not isinstance(world, int) or world < 1:
        raise MsifValueError(f"the number of processes must be a positive integer, got {world!r}")
    return {s.name: rank for s, rank in zip(specs, _balance(specs, world))}


def group_loads(specs: Sequence[TrackedModule], groups: Sequence[Sequence[str]]) -> list[int]:
    """Accumulator elements of each group (what lives at once while that group is fitted)."""
    size = {s.name: accumulator_elements(s) for s in specs}
    return [sum(size[name] for name in group) for group in groups]
