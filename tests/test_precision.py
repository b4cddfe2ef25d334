"""Precision follows the hardware: ``training.bf16: auto`` is bf16 only where the device computes
it natively (AVX-512 BF16 or AMX on CPU, a bf16-capable GPU), fp32 elsewhere; an explicit
``bf16: true`` is honoured and warns where it will be emulated. The probes are injected, so
both branches run on every machine."""

from __future__ import annotations

import pytest
import torch

from megatron.config import ConfigError, config_from_dict
from megatron.training.precision import CpuBf16Support, choose_precision, resolve_precision

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)
AVX2 = CpuBf16Support("AVX2", avx512_bf16=False, amx_tile=False)
# get_cpu_capability() says AVX512 on CPUs whose AVX-512 lacks the bf16 instructions.
AVX512_NO_BF16 = CpuBf16Support("AVX512", avx512_bf16=False, amx_tile=False)
AVX512_BF16 = CpuBf16Support("AVX512", avx512_bf16=True, amx_tile=False)
AMX = CpuBf16Support("AVX512", avx512_bf16=False, amx_tile=True)


@pytest.mark.parametrize("cpu, expected", [(AVX2, "fp32"), (AVX512_NO_BF16, "fp32"), (AVX512_BF16, "bf16"),
                                           (AMX, "bf16")])
def test_auto_on_cpu_follows_native_bf16(cpu, expected):
    choice = choose_precision("auto", False, CPU, cpu=cpu)
    assert choice.name == expected and choice.slow_warning is None
    assert cpu.capability in choice.reason  # the start-up line says what was found


def test_explicit_bf16_is_kept_and_warns_only_where_emulated():
    slow = choose_precision(True, False, CPU, cpu=AVX2)
    assert slow.name == "bf16" and "emulated" in slow.slow_warning and "training.bf16: auto" in slow.slow_warning
    assert choose_precision(True, False, CPU, cpu=AVX512_BF16).slow_warning is None


@pytest.mark.parametrize("bf16, fp16, cuda_bf16, expected", [
    ("auto", False, True, "bf16"), ("auto", False, False, "fp32"), (False, False, True, "fp32"),
    (True, False, True, "bf16"), (False, True, True, "fp16"),
])
def test_gpu_choices(bf16, fp16, cuda_bf16, expected):
    assert choose_precision(bf16, fp16, CUDA, cuda_bf16=cuda_bf16).name == expected


def test_resolved_config_holds_a_plain_bool():
    cfg = config_from_dict({"training": {"bf16": "auto", "train_iters": 1}}).validate()
    fp32_cfg, choice = resolve_precision(cfg, CPU, cpu=AVX2)
    assert fp32_cfg.training.bf16 is False and choice.name == "fp32"
    bf16_cfg, _ = resolve_precision(cfg, CPU, cpu=AMX)
    assert bf16_cfg.training.bf16 is True
    assert cfg.training.bf16 == "auto"  # the caller's config is not changed


def test_config_accepts_auto_and_refuses_other_words():
    assert config_from_dict({"training": {"bf16": "auto", "train_iters": 1}}).validate().training.bf16 == "auto"
    with pytest.raises(ConfigError, match="training.bf16 must be true, false or auto"):
        config_from_dict({"training": {"bf16": "fast", "train_iters": 1}}).validate()
