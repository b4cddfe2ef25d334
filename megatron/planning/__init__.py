"""The planner: memory per GPU and time per iteration of a layout, before launching it.

    hardware.py   every constant that is not arithmetic (devices, networks, kernel efficiency,
                  buffer sizes, fragmentation), each with its source
    timing.py     time per iteration: compute, pipeline bubble, TP/PP/DP communication, optimizer
    plan.py       a whole plan (memory from megatron/training/memory.py + time), JSON, search

``tools/plan.py`` is its command line; ``pretrain_bloom.py --dry-run`` prints the same plan.
"""
