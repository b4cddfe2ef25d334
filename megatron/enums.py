"""Megatron-DeepSpeed's enums, under the module name its checkpoints pickle them with.

Megatron-DeepSpeed stores its whole ``argparse.Namespace`` in every ``mp_rank_XX_model_states.pt``
(client state ``args``), and BLOOM's ``args.position_embedding_type`` is a
``megatron.enums.PositionEmbeddingType``. Unpickling such a file (DeepSpeed's loader does,
with ``weights_only=False``) imports that name, so it must exist here, with the same members
and values, or BLOOM's own training checkpoints cannot be resumed. The checkpoint scan
(megatron/checkpoint/pickle_scan.py) allows exactly these classes.
"""

from __future__ import annotations

import enum


class LayerType(enum.Enum):
    """Megatron's transformer layer kinds."""

    encoder = 1
    decoder = 2


class AttnType(enum.Enum):
    """Megatron's attention kinds."""

    self_attn = 1
    cross_attn = 2


class AttnMaskType(enum.Enum):
    """Megatron's attention masks (BLOOM: causal)."""

    padding = 1
    causal = 2
    prefix = 3
    custom = 4


class PositionEmbeddingType(enum.Enum):
    """Megatron-DeepSpeed's position embeddings (BLOOM: alibi)."""

    rotary = 1
    absolute = 2
    alibi = 3
