#!/usr/bin/env bash
# Everything this project checks on a CUDA GPU, in one go (about 5 minutes on one GPU):
#   bash benchmarks/gpu_check.sh 2>&1 | tee gpu_check.log
# Run from the repository root, in a Python environment with a CUDA build of torch and
# requirements-dev.txt installed. Each step runs even when an earlier one failed; the
# exit status says whether all passed.
set -u
cd "$(dirname "$0")/.."
status=0
step() { echo; echo "=== $*"; "$@" || status=1; }

step python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; p = torch.cuda.get_device_properties(0); \
print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, {p.name}, {p.total_memory / 2**30:.1f} GB')"
# fp16 on CUDA, the allocator's meter and budget, a real out-of-memory error (tests/engine/test_cuda.py),
# then the whole engine suite (CPU kernels) as a cross-check on this machine
step timeout 600 python -m pytest -q -p no:cacheprovider tests/engine/test_cuda.py -rs
step timeout 600 python -m pytest -q -p no:cacheprovider -x tests/engine
# memory: CUDA allocator peaks per case, bytes per row, budget-respecting peak/budget
step timeout 900 python benchmarks/bench_memory.py --sizes 32 64 96
# speed: plain vs this engine vs the official schedule, fp16 on the GPU
step timeout 900 python benchmarks/bench_engine.py --device cuda --dtype float16 --sizes 32 64 --steps 20 --runs 3
echo; echo "gpu check: $([ $status = 0 ] && echo passed || echo FAILED)"
exit $status
