"""Shared prefixes: removal plans that keep the first blocks compute them once.

Removing a set :math:`R` of decoder blocks leaves blocks :math:`0 \\dots b-1` untouched,
where :math:`b = \\min R`. The hidden state entering block :math:`b` is therefore the same
as in the unpruned model,

.. math:: h_b^{(R)} = h_b = f_{b-1}(\\dots f_0(\\mathrm{embed}(x))),

so a sweep over many plans records :math:`h_b` once per batch, during the unpruned pass,
and starts every plan with :math:`\\min R = b` from it. A plan then costs the blocks from
:math:`b` on, and the model is never copied: inside :meth:`SharedPrefix.removed` the first
block returns the recorded state, blocks :math:`1 \\dots b-1` and the removed blocks return
their input (:func:`shortgpt_lite.importance.skip_layer`), which is what the pruned model
computes (a test checks it against :func:`shortgpt_lite.removal.remove_layers`).

The recorded batches must be replayed in the same order with the same shapes: run the
same evaluation (same windows or items, same batch size) inside ``recording()`` and
inside ``removed()``.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from .layers import decoder_layers, replaced_forward

__all__ = ["SharedPrefix", "first_removed"]


def first_removed(plans: Iterable[Iterable[int]]) -> set[int]:
    """The distinct :math:`\\min R` of non-empty plans: the states worth recording."""
    return {min(plan) for plan in map(list, plans) if plan}


def _hidden(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _as_block_output(hidden: torch.Tensor, tuple_of: int | None):
    return hidden if tuple_of is None else (hidden,) + (None,) * (tuple_of - 1)


class SharedPrefix:
    """Hidden states entering the blocks in ``boundaries``, recorded once per batch of the
    unpruned model and replayed for every plan that removes nothing before them.

    ``boundaries`` are block indices (see :func:`first_removed`); block 0 needs no record,
    since a plan that removes it shares nothing. The states are kept on the CPU, in the
    model's dtype: ``len(boundaries) × tokens × hidden size`` values.
    """

    def __init__(self, model: nn.Module, boundaries: Iterable[int]):
        self.model = model
        self.layers = decoder_layers(model)
        n = len(self.layers)
        self.boundaries = sorted({int(b) for b in boundaries if 0 < int(b) < n})
        self.states: dict[int, list[torch.Tensor]] = {b: [] for b in self.boundaries}
        self.formats: list[int | None] = [None] * n
        self.recorded = False

    def nbytes(self) -> int:
        """Memory held by the recorded states."""
        return sum(t.numel() * t.element_size() for ts in self.states.values() for t in ts)

    @contextmanager
    def recording(self):
        """Inside, every forward pass of the unpruned model stores its states at the
        boundaries (earlier records are dropped first)."""
        self.states = {b: [] for b in self.boundaries}

        def keep(b):
            def hook(module, args, kwargs):
                self.states[b].append(_hidden(args, kwargs).detach().to("cpu", copy=True))
            return hook

        def note_format(i):
            def hook(module, args, output):
                self.formats[i] = len(output) if isinstance(output, (tuple, list)) else None
            return hook

        handles = [self.layers[b].register_forward_pre_hook(keep(b), with_kwargs=True)
                   for b in self.boundaries]
        handles += [layer.register_forward_hook(note_format(i))
                    for i, layer in enumerate(self.layers)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
        self.recorded = True

    @contextmanager
    def removed(self, layers: Iterable[int]):
        """Inside, the model computes as if ``layers`` were removed, starting from the
        recorded state when one exists for the first removed block."""
        removed = sorted({int(i) for i in layers})
        n = len(self.layers)
        if removed and not 0 <= removed[0] <= removed[-1] < n:
            raise ValueError(f"Layers {removed} are not all in 0..{n - 1}.")
        start = removed[0] if removed else None
        replay = start in self.states and self.recorded
        if replay and not self.states[start]:
            raise RuntimeError(f"Nothing was recorded at block {start}: run the unpruned "
                               "evaluation inside recording() first.")
        with ExitStack() as stack:
            for i in removed + (list(range(1, start)) if replay else []):
                stack.enter_context(replaced_forward(self.layers[i], self._identity(i)))
            if replay:
                states = iter(self.states[start])
                stack.enter_context(replaced_forward(self.layers[0],
                                                     self._replay(states, start)))
            yield self.model
            if replay and next(states, None) is not None:
                raise RuntimeError(f"Fewer batches ran than were recorded at block {start}: "
                                   "replay the same evaluation that was recorded.")

    def _identity(self, i: int):
        tuple_of = self.formats[i]

        def identity(*args, **kwargs):
            return _as_block_output(_hidden(args, kwargs), tuple_of)
        return identity

    def _replay(self, states, start: int):
        tuple_of = self.formats[0]

        def replay(*args, **kwargs):
            hidden = _hidden(args, kwargs)
            state = next(states, None)
            if state is None or state.shape != hidden.shape:
                raise RuntimeError(
                    f"The batches differ from those recorded at block {start} (got "
                    f"{tuple(hidden.shape)}, recorded "
                    f"{None if state is None else tuple(state.shape)}): replay the same "
                    "evaluation, with the same batch size, that was recorded.")
            return _as_block_output(state.to(hidden.device), tuple_of)
        return replay
