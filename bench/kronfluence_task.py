"""The kronfluence adapter of the benchmarks and of ``tests/factors/test_kronfluence.py``: a
``Task`` for causal LMs on hub_msif's collated batches. Importing it needs kronfluence.

``loss(model, batch, sample)`` is the summed training loss of a batch (``sample``: labels drawn
from the model, kronfluence's true Fisher); measurements use the same loss without sampling, so a
query's labels (-100 on the prompt) make it the loss over the answer. With ``empirical_only`` a
request to sample fails: the factors compared use the empirical Fisher.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kronfluence.task import Task

from bench.common import PAD_ID


class LanguageModelTask(Task):
    def __init__(self, module_names: Sequence[str], loss: Callable, empirical_only: bool = False):
        self.module_names = list(module_names)
        self.loss = loss
        self.empirical_only = empirical_only

    def compute_train_loss(self, batch, model, sample=False):
        if sample and self.empirical_only:
            raise AssertionError("this comparison uses the empirical Fisher: kronfluence must not sample labels")
        return self.loss(model, batch, sample)

    def compute_measurement(self, batch, model):
        return self.loss(model, batch, False)

    def get_influence_tracked_modules(self):
        return self.module_names

    def get_attention_mask(self, batch):
        return batch["attention_mask"]


def collator(pad_id: int = PAD_ID) -> Callable[[list[dict]], dict]:
    """kronfluence's ``collate_fn``: hub_msif's ``collate`` with indices 0..n-1."""
    from hub_msif.data import collate

    def collate_fn(items):
        return collate(items, list(range(len(items))), pad_id)

    return collate_fn
