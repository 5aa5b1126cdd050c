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

Two plans share more than the unpruned prefix. If :math:`R` and :math:`R'` first differ at
block :math:`d = \\min (R \\,\\triangle\\, R')`, both compute the same blocks before
:math:`d` on the same input, so :math:`h_d^{(R)} = h_d^{(R')}`. :func:`sweep_order` sorts
the plans as rows of 0/1 removal flags; in that order the plan just before :math:`R'`
shares the longest prefix with it of any earlier plan, so with ``removed(R', record=True)``
each plan records the states later plans start from and starts from the deepest state
recorded under its own prefix. Each state is stored with the set of removed blocks before
it, so a plan never starts from a state its prefix did not compute.

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

__all__ = ["SharedPrefix", "first_removed", "sweep_order"]


def first_removed(plans: Iterable[Iterable[int]]) -> set[int]:
    """The distinct :math:`\\min R` of non-empty plans: the states worth recording."""
    return {min(plan) for plan in map(list, plans) if plan}


def sweep_order(plans: Iterable[Iterable[int]]) -> tuple[list[list[int]], set[int]]:
    """The distinct non-empty ``plans`` sorted as rows of 0/1 removal flags, and the block
    each starts from in that order: :math:`\\min (R \\,\\triangle\\, R_{prev})`, the first
    block on which it differs from the plan before it (the unpruned model before the
    first). Those blocks are the states a chained sweep records."""
    unique = {tuple(sorted({int(i) for i in plan})) for plan in plans}
    unique.discard(())
    n = max((p[-1] for p in unique), default=0) + 1
    ordered = sorted(unique, key=lambda p: [i in p for i in range(n)])
    starts, before = set(), set()
    for plan in ordered:
        starts.add(min(before ^ set(plan)))
        before = set(plan)
    return [list(p) for p in ordered], starts


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
        # the removed blocks before each recorded state; None where nothing valid is held
        self.prefixes: dict[int, frozenset | None] = {b: None for b in self.boundaries}
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
        self.prefixes = {b: None for b in self.boundaries}

        def note_format(i):
            def hook(module, args, output):
                self.formats[i] = len(output) if isinstance(output, (tuple, list)) else None
            return hook

        handles = [layer.register_forward_hook(note_format(i))
                   for i, layer in enumerate(self.layers)]
        try:
            with self._keeping(self.boundaries, []):
                yield self
        finally:
            for h in handles:
                h.remove()
        self.recorded = True

    @contextmanager
    def _keeping(self, blocks, removed):
        """Record the states entering ``blocks`` afresh; valid only if the pass completes."""
        for b in blocks:
            self.states[b], self.prefixes[b] = [], None

        def keep(b):
            def hook(module, args, kwargs):
                self.states[b].append(_hidden(args, kwargs).detach().to("cpu", copy=True))
            return hook

        handles = [self.layers[b].register_forward_pre_hook(keep(b), with_kwargs=True)
                   for b in blocks]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        for b in blocks:  # reached only when the pass completed
            self.prefixes[b] = frozenset(i for i in removed if i < b)

    @contextmanager
    def removed(self, layers: Iterable[int], *, record: bool = False):
        """Inside, the model computes as if ``layers`` were removed, starting from the
        deepest recorded state whose prefix of removed blocks is this plan's. With
        ``record=True`` the pass also records the states entering the boundaries after its
        start, for later plans of a :func:`sweep_order` that share its prefix."""
        removed = sorted({int(i) for i in layers})
        n = len(self.layers)
        if removed and not 0 <= removed[0] <= removed[-1] < n:
            raise ValueError(f"Layers {removed} are not all in 0..{n - 1}.")
        valid = [b for b in self.boundaries
                 if self.prefixes[b] == frozenset(i for i in removed if i < b)]
        start = max(valid) if removed and valid and self.recorded else 0
        if start and not self.states[start]:
            raise RuntimeError(f"Nothing was recorded at block {start}: run the unpruned "
                               "evaluation inside recording() first.")
        with ExitStack() as stack:
            for i in removed + list(range(1, start)):
                stack.enter_context(replaced_forward(self.layers[i], self._identity(i)))
            if start:
                states = iter(self.states[start])
                stack.enter_context(replaced_forward(self.layers[0],
                                                     self._replay(states, start)))
            if record:
                stack.enter_context(self._keeping([b for b in self.boundaries if b > start],
                                                  removed))
            yield self.model
            if start and next(states, None) is not None:
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
