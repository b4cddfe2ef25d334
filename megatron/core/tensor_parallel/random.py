"""Random streams for tensor parallelism: dropout that agrees or differs across TP ranks on purpose.

Two streams per process:

* the default generator, seeded ``seed + 100 * pp_rank`` on every rank (Megatron's rule): the
  same on all TP ranks, so dropout on duplicated activations (the residual stream, outside TP
  regions) draws the same mask everywhere and the duplicates stay identical;
* a tracked "model-parallel" stream, seeded ``seed + 100 * pp_rank + 2718 + tp_rank``: different
  on each TP rank, so dropout on sharded activations (attention probabilities of this rank's
  heads) draws independent masks, as one device would over all heads.

``RNGStatesTracker.fork()`` swaps the model-parallel state into the device's default generator
for the duration of a ``with`` block. It works on CPU (``torch.default_generator``) and CUDA
(the current device's default generator) alike.

Activation recompute replays the forward, so it must replay the same random draws.
``torch.utils.checkpoint`` and ``deepspeed.checkpointing.checkpoint`` both save and restore the
default CPU and accelerator generators, but neither knows this tracker (DeepSpeed restores only
its own global tracker). ``RNGStatesTracker.checkpoint(function, *args)`` adds the tracker's
states to what is saved before the forward and restored for the recompute; pass it as
``PipelineModule(activation_checkpoint_func=tracker.checkpoint)`` or call it around a block.
With BLOOM's dropouts at 0.0 no mask is drawn and either checkpoint function is exact.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import torch
import torch.utils.checkpoint

MODEL_PARALLEL_RNG = "model-parallel-rng"
_TP_SEED_OFFSET = 2718  # any positive offset works; Megatron's value keeps seeds comparable
_PP_SEED_STRIDE = 100


def model_parallel_seed(seed: int, tp_rank: int, pp_rank: int) -> tuple[int, int]:
    """(default seed, model-parallel seed) of a rank, as Megatron derives them.

    Pipeline stages get different default seeds (their layers are different layers); TP ranks
    share the default seed and differ in the model-parallel one.
    """
    default = seed + _PP_SEED_STRIDE * pp_rank
    return default, default + _TP_SEED_OFFSET + tp_rank


def _default_generator(device: torch.device) -> torch.Generator:
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


class RNGStatesTracker:
    """Named random states for one device type, swapped into its default generator by ``fork``.

    ``device`` is where dropout runs: ``"cpu"`` or ``"cuda"`` (current device) / ``"cuda:N"``.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._states: dict[str, torch.Tensor] = {}
        self._seeds: set[int] = set()

    def reset(self) -> None:
        """Forget every stream."""
        self._states, self._seeds = {}, set()

    def add(self, name: str, seed: int) -> None:
        """Start stream ``name`` from ``seed`` without disturbing the default generator."""
        if name in self._states:
            raise ValueError(f"RNG stream {name!r} already exists")
        if seed in self._seeds:
            raise ValueError(f"seed {seed} is already used by another stream; streams must differ")
        generator = _default_generator(self.device)
        original = generator.get_state()
        generator.manual_seed(seed)
        self._states[name] = generator.get_state()
        generator.set_state(original)
        self._seeds.add(seed)

    def get_states(self) -> dict[str, torch.Tensor]:
        """Copies of every stream's state (for checkpoints and recompute)."""
        return {name: state.clone() for name, state in self._states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        """Replace every stream's state by (copies of) ``states``, e.g. from a checkpoint."""
        self._states = {name: state.clone() for name, state in states.items()}

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        """Draw from stream ``name`` inside the block; the default stream resumes where it was."""
        if name not in self._states:
            raise KeyError(f"RNG stream {name!r} was never added; known: {sorted(self._states)}")
        generator = _default_generator(self.device)
        original = generator.get_state()
        generator.set_state(self._states[name])
        try:
            yield
        finally:
            self._states[name] = generator.get_state()
            generator.set_state(original)

    def checkpoint(self, function: Callable[..., Any], *args: Any) -> Any:
        """``torch.utils.checkpoint`` (non-reentrant) that also replays this tracker's streams.

        The states at the start of the forward are restored for the recompute in the backward,
        then the states reached since are put back, so later layers do not see reused draws.
        """
        saved = self.get_states()

        @contextlib.contextmanager
        def replay() -> Iterator[None]:
            current = self.get_states()
            self.set_states(saved)
            try:
                yield
            finally:
                self.set_states(current)

        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False,
                                                 context_fn=lambda: (contextlib.nullcontext(), replay()))


def model_parallel_region(tracker: Optional[RNGStatesTracker], active: bool = True):
    """The context for random draws on activations that differ across TP ranks: the tracker's
    model-parallel stream when there is a tracker (and ``active``), the default stream otherwise.

    Which activations: attention probabilities (each TP rank holds its own heads) and, under
    sequence parallelism, the hidden states (each rank holds its own tokens). Activations that
    are duplicated across TP ranks draw from the default stream, seeded alike on every TP rank,
    so their dropout masks agree and the duplicates stay identical.
    """
    return tracker.fork() if tracker is not None and active else contextlib.nullcontext()


def dropout(x: torch.Tensor, p: float, training: bool, tracker: Optional[RNGStatesTracker] = None,
            model_parallel: bool = False) -> torch.Tensor:
    """``F.dropout`` drawing its mask from the right stream: the model-parallel one when
    ``model_parallel`` (the activation differs across TP ranks), else the default one."""
    if not training or p == 0.0:
        return x
    with model_parallel_region(tracker, model_parallel):
        return torch.nn.functional.dropout(x, p, True)


def initialize_rng(seed: int, tp_rank: int = 0, pp_rank: int = 0,
                   device: Optional[torch.device | str] = None) -> RNGStatesTracker:
    """Seed the default generators (CPU and all GPUs) and return a tracker with the TP stream.

    Call once per process at start-up, after the parallel state exists and before building the
    model, so that TP layers initialise their master weights from identical default streams.
    """
    default_seed, tp_seed = model_parallel_seed(seed, tp_rank, pp_rank)
    torch.manual_seed(default_seed)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tracker = RNGStatesTracker(device)
    tracker.add(MODEL_PARALLEL_RNG, tp_seed)
    return tracker
