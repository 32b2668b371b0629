#!/usr/bin/env bash
# train.py itself (not the benchmark harness) at 8B shapes on one GPU, under the deepspeed launcher, through
# bench/train_synthetic.py: random weights (size names for --llm / --vision) and synthetic samples of a fixed length
# (--synthetic), nothing saved, so nothing is downloaded.
#   bash bench/train_runs.sh [pt] [qlora] [lora]      (on the GPU machine, with .whl carried; logs in $OUT)
# The step lines and $OUT/<run>/metrics.jsonl hold tokens/s, samples/s, MFU and peak memory per step.
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH TORCH_CUDA_ARCH_LIST=9.0 OMP_NUM_THREADS=8 PYTHONUNBUFFERED=1
B="--llm llama-3-8b --vision clip-vit-l-14-336 --synthetic 20000 --num-workers 2"
run() { name=$1; shift; start=$(date +%s)
  timeout ${RUN_TIMEOUT:-300} deepspeed --num_gpus 1 bench/train_synthetic.py "$@" $B --out "$OUT/$name" > "$OUT/$name.log" 2>&1
  echo "$name: rc=$? in $(( $(date +%s) - start )) s"; grep -E "^step|^world|^stage|Error" "$OUT/$name.log" | tail -8; }
for job in "${@:-pt qlora}"; do for j in $job; do case $j in
  # the pretrain recipe's per-GPU work: 576 image positions + 64 text, micro-batch 32; compiled blocks and 11 of 32
  # recomputed (what fits at micro-batch 32 with the frozen LLM, as in the benchmark)
  pt) run pt @recipes/pretrain.args --max-length 640 --micro-batch 32 --accumulation 1 --max-steps 30 \
        --compile --checkpoint-layers 11 ;;
  # the single-GPU QLoRA recipe: micro-batch 1 x 2048 positions; accumulation 4 instead of 16 for a short run
  qlora) run qlora @recipes/qlora-finetune-gpu1.args --init-from '' --max-length 2048 --micro-batch 1 \
        --accumulation 4 --max-steps 20 ;;
  # the same with bf16 LoRA (no quantisation)
  lora) run lora @recipes/qlora-finetune-gpu1.args --lora --init-from '' --max-length 2048 --micro-batch 1 \
        --accumulation 4 --max-steps 20 ;;
  # where the LoRA step's time goes: DeepSpeed's ZeRO-2 gradient path (overlap_comm) against ZeRO-0 and no overlap
  lora-z0) run lora-z0 @recipes/qlora-finetune-gpu1.args --lora --init-from '' --max-length 2048 --micro-batch 1 \
        --accumulation 4 --max-steps 12 --deepspeed deepspeed_zero0 ;;
  lora-nooverlap) echo '{"zero_optimization": {"overlap_comm": false}}' > /tmp/no_overlap.json
        run lora-nooverlap @recipes/qlora-finetune-gpu1.args --lora --init-from '' --max-length 2048 \
        --micro-batch 1 --accumulation 4 --max-steps 12 --deepspeed /tmp/no_overlap.json ;;
  # compiled blocks (fewer, fused kernels: the LoRA step is host-bound, see BENCHMARKS.md)
  lora-compile) run lora-compile @recipes/qlora-finetune-gpu1.args --lora --init-from '' --max-length 2048 \
        --micro-batch 1 --accumulation 4 --max-steps 12 --compile ;;
  qlora-compile) run qlora-compile @recipes/qlora-finetune-gpu1.args --init-from '' --max-length 2048 \
        --micro-batch 1 --accumulation 4 --max-steps 12 --compile ;;
  # the same with the optimizer's fp32 master weights and moments in CPU memory (DeepSpeed's CPU Adam)
  qlora-offload) run qlora-offload @recipes/qlora-finetune-gpu1.args --init-from '' --max-length 2048 \
        --micro-batch 1 --accumulation 4 --max-steps 10 --compile --deepspeed deepspeed_zero2_offload ;;
  # the bf16 LoRA run under torch.profiler (plain python: one process)
  lora-profile) timeout 300 python3 bench/profile_train.py @recipes/qlora-finetune-gpu1.args --lora --init-from '' \
        --max-length 2048 --micro-batch 1 --accumulation 4 --max-steps 7 $B --out "$OUT/lora-profile" \
        > "$OUT/lora-profile.log" 2>&1; echo "lora-profile: rc=$?"; grep -A60 "==== profile" "$OUT/lora-profile.log" ;;
esac; done; done
