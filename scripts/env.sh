# Environment shared by the demo, the tests and CI (sourced, not executed).
# DeepSpeed compiles small ops on first use (about a minute on CPU); a fixed cache directory
# keeps that cost to the first run on a machine.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}"
# Two-core machines: one intra-op thread per process keeps multi-process gloo tests from
# oversubscribing the cores.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
# Never reach for the Hugging Face Hub: everything is built or shipped locally.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# torchrun --max-restarts: with the default shared rendezvous store, the ranks of a restarted round
# failed to connect ("Gloo connectFullMesh failed ... Connection refused", torch 2.13); a store per
# round (the workers' own, on a fresh port) restarts cleanly (tests/faults/run_trials.py --kinds restart).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
