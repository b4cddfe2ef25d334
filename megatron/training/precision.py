"""Which floating-point format a run trains in, chosen for the hardware it runs on.

``training.bf16`` keeps Megatron's meaning (``true``: bf16 with fp32 master weights) and also
accepts ``auto``: bf16 where the device computes it natively, fp32 otherwise. The reason is
speed, not accuracy. On a CPU without AVX-512 BF16 or AMX, PyTorch emulates bf16 matrix
products: a 2048x512 @ 512x2048 product takes seconds in bf16 and tens of milliseconds in fp32
(about 250x), so a bf16 run there is unusably slow. ``get_cpu_capability()`` is not the test:
it says ``AVX512`` on CPUs whose AVX-512 has no bf16 instructions.

The choice is made once, at start-up, and the config the rest of the run sees holds a plain
``true``/``false``: every other module keeps reading ``cfg.training.bf16`` as a bool.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Optional

import torch

from megatron.config import Config

logger = logging.getLogger(__name__)

AUTO = "auto"


@dataclass(frozen=True)
class CpuBf16Support:
    """What the CPU offers for bf16 arithmetic (injectable, so tests cover every branch)."""

    capability: Optional[str]  # torch.backends.cpu.get_cpu_capability(): AVX2, AVX512, ...
    avx512_bf16: bool
    amx_tile: bool

    @property
    def native(self) -> bool:
        """bf16 matrix products run in hardware (oneDNN uses AVX-512 BF16 or AMX tiles)."""
        return self.avx512_bf16 or self.amx_tile

    @classmethod
    def detect(cls) -> "CpuBf16Support":
        """Ask PyTorch (its private probes are the ones oneDNN's dispatch agrees with); a probe a
        later PyTorch drops counts as "no"."""
        def probe(owner, name):
            try:
                return getattr(owner, name)()
            except Exception:  # noqa: BLE001 - private API: missing or broken means unknown
                return None

        return cls(probe(torch.backends.cpu, "get_cpu_capability"), bool(probe(torch.cpu, "_is_avx512_bf16_supported")),
                   bool(probe(torch.cpu, "_is_amx_tile_supported")))

    def describe(self) -> str:
        """For the start-up line: what was found."""
        found = [name for name, ok in (("AVX-512 BF16", self.avx512_bf16), ("AMX", self.amx_tile)) if ok]
        return f"CPU capability {self.capability}, " + (f"native bf16 ({', '.join(found)})" if found
                                                       else "no native bf16 (no AVX-512 BF16, no AMX)")


@dataclass(frozen=True)
class Precision:
    """The chosen format, why, and a warning when an explicit choice will be slow here."""

    name: str  # "bf16", "fp16" or "fp32"
    reason: str
    slow_warning: Optional[str] = None

    @property
    def bf16(self) -> bool:
        """Whether the run trains in bf16."""
        return self.name == "bf16"


def choose_precision(bf16: bool | str, fp16: bool, device: torch.device,
                     cpu: Optional[CpuBf16Support] = None,
                     cuda_bf16: Optional[bool] = None) -> Precision:
    """Resolve ``training.bf16`` / ``training.fp16`` for ``device``.

    ``cpu`` and ``cuda_bf16`` default to probing this machine; tests inject them.
    """
    if fp16:
        return Precision("fp16", "training.fp16 is true")
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported() if cuda_bf16 is None else cuda_bf16
        where = "this GPU"
        if bf16 == AUTO:
            return Precision("bf16", f"training.bf16=auto and {where} computes bf16") if supported else \
                Precision("fp32", f"training.bf16=auto and {where} has no bf16 (pre-Ampere): fp32")
        if bf16 and not supported:
            return Precision("bf16", "training.bf16 is true",
                             f"training.bf16 is true but {where} has no native bf16: expect it to be slow or "
                             "to fail; set training.bf16: auto or false")
        return Precision("bf16", "training.bf16 is true") if bf16 else Precision("fp32", "training.bf16 is false")
    cpu = cpu or CpuBf16Support.detect()
    if bf16 == AUTO:
        if cpu.native:
            return Precision("bf16", f"training.bf16=auto and {cpu.describe()}")
        return Precision("fp32", f"training.bf16=auto and {cpu.describe()}: bf16 matmuls would be emulated, "
                                 "about 250x slower than fp32")
    if bf16:
        warning = None if cpu.native else (
            f"training.bf16 is true but this CPU has {cpu.describe().split(', ', 1)[1]}: bf16 matrix products are "
            "emulated, about 250x slower than fp32; set training.bf16: auto to train in fp32 here")
        return Precision("bf16", "training.bf16 is true", warning)
    return Precision("fp32", "training.bf16 is false")


def resolve_precision(cfg: Config, device: torch.device, **probes) -> tuple[Config, Precision]:
    """The config with ``training.bf16`` made a plain bool for ``device``, and the choice.

    Logs one line saying which precision was chosen and why, and warns (once per process)
    when an explicit bf16 will be slow on this hardware.
    """
    t = cfg.training
    choice = choose_precision(t.bf16, t.fp16, device, **probes)
    resolved = dataclasses.replace(cfg, training=dataclasses.replace(t, bf16=choice.bf16))
    return resolved, choice


def announce(choice: Precision, rank: int) -> None:
    """The start-up line (rank 0) and the slowness warning (once, rank 0)."""
    if rank != 0:
        return
    logger.info("precision: %s (%s)", choice.name, choice.reason)
    if choice.slow_warning:
        logger.warning("warning: %s", choice.slow_warning)
