"""Module partitions and owners (hub_msif/factors/partition.py): balanced, deterministic, complete."""

from __future__ import annotations

import itertools

import pytest

from hub_msif.errors import MsifValueError
from hub_msif.factors.architectures import TrackedModule
from hub_msif.factors.partition import accumulator_elements, group_loads, module_groups, module_owners


def _spec(name: str, d_in: int, d_out: int) -> TrackedModule:
    return TrackedModule(name, "mlp", d_in, d_out, False, False)


# A GPT-NeoX-like layer pattern: qkv (h -> 3h), dense (h -> h), up (h -> 4h), down (4h -> h).
SPECS = [_spec(f"l{i}.{n}", a, b) for i in range(3)
         for n, a, b in (("qkv", 65, 192), ("dense", 65, 64), ("up", 65, 256), ("down", 257, 64))]


def test_accumulator_elements_is_the_documented_formula():
    assert accumulator_elements(_spec("x", 3, 5)) == 9 + 25 + 15


@pytest.mark.parametrize("k", [1, 2, 3, 5, len(SPECS)])
def test_groups_cover_every_module_once_in_model_order(k):
    groups = module_groups(SPECS, k)
    assert len(groups) == k and all(groups)
    assert sorted(itertools.chain(*groups)) == sorted(s.name for s in SPECS)
    order = [s.name for s in SPECS]
    for group in groups:
        assert group == sorted(group, key=order.index)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_groups_are_balanced_within_the_greedy_bound(k):
    loads = group_loads(SPECS, module_groups(SPECS, k))
    total, largest = sum(loads), max(accumulator_elements(s) for s in SPECS)
    # Largest-first greedy: the heaviest bin is at most the mean plus one module, and <= 4/3 of optimal.
    assert max(loads) <= total / k + largest
    best = _optimal(SPECS, k)
    assert max(loads) <= 4 / 3 * best


def _optimal(specs, k):
    """Exhaustive best makespan (12 modules: fine for k <= 4 with symmetry cut)."""
    sizes = sorted((accumulator_elements(s) for s in specs), reverse=True)
    best = [sum(sizes)]

    def place(i, loads):
        if max(loads) >= best[0]:
            return
        if i == len(sizes):
            best[0] = max(loads)
            return
        seen = set()
        for b in range(k):
            if loads[b] in seen:
                continue
            seen.add(loads[b])
            loads[b] += sizes[i]
            place(i + 1, loads)
            loads[b] -= sizes[i]

    place(0, [0] * k)
    return best[0]


def test_owners_are_deterministic_and_balanced():
    owners = module_owners(SPECS, 2)
    assert owners == module_owners(list(SPECS), 2)
    assert set(owners) == {s.name for s in SPECS} and set(owners.values()) == {0, 1}
    assert module_owners(SPECS, 1) == {s.name: 0 for s in SPECS}
    loads = [sum(accumulator_elements(s) for s in SPECS if owners[s.name] == r) for r in (0, 1)]
    assert max(loads) <= sum(loads) / 2 + max(accumulator_elements(s) for s in SPECS)
    # More processes than modules: every module still has exactly one owner.
    many = module_owners(SPECS[:3], 5)
    assert sorted(many.values()) == [0, 1, 2]


def test_bad_counts_are_refused():
    with pytest.raises(MsifValueError, match="positive"):
        module_groups(SPECS, 0)
    with pytest.raises(MsifValueError, match="only 12 tracked"):
        module_groups(SPECS, 13)
    with pytest.raises(MsifValueError, match="positive"):
        module_owners(SPECS, 0)
