"""Hooks that capture each tracked module's input activations and output gradients.

For every tracked module the consumer receives ``a`` (``[B, T, d_in]``, a trailing 1 appended
when the module has a bias) and ``g = dLoss/d(output)`` (``[B, T, d_out]``), both zero on
padding positions, in a float dtype at least as wide as float32. A sequence's weight gradient is
``G = sum_t g_t a_t^T``; it is never formed here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import cast

import torch
from torch import nn

from hub_msif.factors.architectures import TrackedModule

Consumer = Callable[[TrackedModule, torch.Tensor, torch.Tensor], None]


def compute_dtype(model: nn.Module) -> torch.dtype:
    """float64 for float64 models, else float32 (bf16/fp16 activations are upcast)."""
    dtype = next(model.parameters()).dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


class GradientCapture:
    """Registers hooks on ``tracked`` modules of ``model`` and feeds ``consumer`` per batch.

    Use as a context manager; set ``mask`` (``[B, T]``, 1 on real tokens) before each forward.
    """

    def __init__(self, model: nn.Module, tracked: Sequence[TrackedModule], consumer: Consumer):
        self.model = model
        self.tracked = list(tracked)
        self.consumer = consumer
        self.dtype = compute_dtype(model)
        self._mask_value: torch.Tensor | None = None
        self._all_real = False  # no padding in the batch: the masks change nothing, so no masked copies
        self._handles: list = []

    @property
    def mask(self) -> torch.Tensor | None:
        return self._mask_value

    @mask.setter
    def mask(self, value: torch.Tensor | None) -> None:
        self._mask_value = value
        self._all_real = value is not None and bool(value.all())

    def _activation(self, spec: TrackedModule, inputs: tuple) -> torch.Tensor:
        a = inputs[0].detach().to(self.dtype)
        if spec.has_bias:
            a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
        mask = self._mask()
        if self._all_real:
            # The concatenation is already a fresh tensor; a bare input is copied, since the model
            # could change it in place before the backward reaches this module.
            return a if spec.has_bias else a.clone()
        return a * mask.unsqueeze(-1).to(self.dtype)

    def _mask(self) -> torch.Tensor:
        if self.mask is None:
            raise RuntimeError("GradientCapture.mask must be set before the forward pass")
        return self.mask

    def _forward_hook(self, spec: TrackedModule):
        def hook(module, inputs, output):
            if not output.requires_grad:
                return
            a = self._activation(spec, inputs)

            def on_grad(grad):
                g = grad.detach().to(self.dtype)
                if not self._all_real:
                    g = g * self._mask().unsqueeze(-1).to(self.dtype)
                self.consumer(spec, a, g)

            output.register_hook(on_grad)

        return hook

    def __enter__(self) -> GradientCapture:
        for spec in self.tracked:
            module = self.model.get_submodule(spec.name)
            self._handles.append(module.register_forward_hook(self._forward_hook(spec)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@contextlib.contextmanager
def input_gradients_only(model: nn.Module) -> Iterator[None]:
    """Backward computes activation gradients only, never parameter gradients.

    The captured output gradients are all that the factors need; skipping the weight-gradient
    matmuls saves about a third of a backward pass. Parameters are frozen and the embedding
    output is made to require grad so that gradients still flow; both are restored on exit.
    """
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    # transformers' PreTrainedModel method (nn.Module does not declare it)
    get_input_embeddings = cast(Callable[[], nn.Module], model.get_input_embeddings)
    handle = get_input_embeddings().register_forward_hook(
        lambda module, inputs, output: output.requires_grad_(True)
    )
    try:
        yield
    finally:
        handle.remove()
        for p, flag in saved:
            p.requires_grad_(flag)
