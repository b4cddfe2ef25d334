"""Which tensor memory is live, allocation by allocation: peak bytes of a piece of PyTorch code.

A ``TorchDispatchMode`` sees every ATen op (forward, and backward too: autograd runs the
backward's ops under the same mode) and its outputs. An output whose storage is not one of the
op's inputs' (a view or an in-place result shares one) is a new allocation of
``storage.nbytes()``. Its release is recorded by a ``weakref.finalize`` on the storage's Python
object: PyTorch keeps that object alive for as long as the C++ storage lives (PyObject
preservation), including when only autograd's saved tensors hold it, so the release is seen
when the memory goes back to the allocator, not when Python drops its last name for it.

What it does not see: tensors made before the mode (weights, inputs) and memory a kernel
allocates for itself and frees before returning (e.g. matmul packing buffers). Device-agnostic,
unlike ``torch.cuda.max_memory_allocated``; exact per allocation, unlike the process's RSS.

    with LiveStorageBytes() as tracker:
        loss = model(x).sum(); loss.backward()
    tracker.peak(exclude=[tracker.allocation_of(p.grad) for p in model.parameters()])
"""

from __future__ import annotations

import weakref
from typing import Callable, Iterable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveStorageBytes(TorchDispatchMode):
    """The timeline of storages that ops allocate while the mode is active, and its peak."""

    def __init__(self):
        super().__init__()
        self.events: list[tuple[int, int]] = []  # (allocation, +bytes when made / -bytes when freed)
        self._sizes: list[int] = []  # bytes of each allocation, by its number
        self._live: dict[int, int] = {}  # data pointer -> allocation number, while allocated

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            pointer = storage.data_ptr()
            if storage.nbytes() == 0 or pointer in inputs or pointer in self._live:
                continue  # nothing new: an empty tensor, a view or in-place result, or one seen already
            allocation = len(self._sizes)
            self._sizes.append(storage.nbytes())
            self._live[pointer] = allocation
            self.events.append((allocation, storage.nbytes()))
            weakref.finalize(storage, self._release, pointer, allocation)
        return out

    def _release(self, pointer: int, allocation: int) -> None:
        self.events.append((allocation, -self._sizes[allocation]))
        if self._live.get(pointer) == allocation:
            del self._live[pointer]

    def allocation_of(self, tensor: torch.Tensor) -> Optional[int]:
        """The number of the live allocation holding ``tensor`` (None if made outside the mode)."""
        return self._live.get(tensor.untyped_storage().data_ptr())

    def peak(self, exclude: Iterable[Optional[int]] = (), start: int = 0, end: Optional[int] = None) -> int:
        """Highest sum of live allocations over the timeline, leaving out those in ``exclude``.

        ``start``/``end`` (event numbers, e.g. ``len(tracker.events)`` taken at two moments)
        restrict the peak to that window; allocations made before ``start`` and still live
        count in it, so the peak of a training step includes the weights and optimizer state
        made while building the run."""
        left_out = set(exclude)
        now = peak = 0
        for number, (allocation, delta) in enumerate(self.events[:end]):
            if allocation not in left_out:
                now += delta
                if number >= start:
                    peak = max(peak, now)
        return max(peak, now) if start >= len(self.events[:end]) else peak


def allocation_profile(fn: Callable[[], object]) -> tuple[int, int]:
    """(peak, net) CPU bytes allocated and not yet freed while ``fn`` runs, relative to its start:
    the profiler's allocator events, so kernels' scratch buffers count too (unlike
    :class:`LiveStorageBytes`, which sees tensor storages only)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, live
