#!/usr/bin/env bash
# All benchmarks on the GPU machine in one go: install the wheels the image lacks (bitsandbytes, carried in .whl by
# ../shared/gpu/wheels.sh), record the machine, run bench/run_all.py. Results: $OUT/results.jsonl, log.txt, summary.txt.
#   bash bench/run_all.sh [extra run_all.py arguments]
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/bitsandbytes-*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; uname -r;
  python3 -c 'import torch, transformers, peft, bitsandbytes as b; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "peft", peft.__version__, "bitsandbytes", b.__version__)'; } 2>&1 | tee "$OUT/machine.txt"
python3 bench/run_all.py --out "$OUT" "$@"
