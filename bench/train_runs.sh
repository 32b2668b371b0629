#!/usr/bin/env bash
# train.py itself (not the benchmark harness) at 8B shapes on one GPU, under the deepspeed launcher, through
# bench/train_synthetic.py: random weights (size names for --llm / --vision) and synthetic samples of a fixed length
# (--synthetic), nothing saved, so nothing is downloaded.
#   bash bench/train_runs.sh ["JOB JOB ..."]     (on the GPU machine, with .whl carried; logs in $OUT)
# With no job named it runs round 4's: qlora quant-pt pt qlora-fp16. Each job prints its step lines and a summary:
# the medians of steps 5 onwards (tok/s, samples/s, MFU), the peak memory of training, and the compile estimate.
# The flags are the recipes' (compiled blocks are on by default on a GPU); what a job adds is said above it.
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH TORCH_CUDA_ARCH_LIST=9.0 OMP_NUM_THREADS=8 PYTHONUNBUFFERED=1
B="--llm llama-3-8b --vision clip-vit-l-14-336 --synthetic 20000 --num-workers 2"
summary() {  # medians over steps >= 5 of $OUT/$1/metrics.jsonl
  python3 - "$OUT/$1/metrics.jsonl" <<'EOF'
import json, math, statistics, sys
recs = [json.loads(line) for line in open(sys.argv[1])]
late = [r for r in recs if r["step"] >= 5] or recs
med = lambda k: statistics.median(r[k] for r in late) if all(k in r for r in late) else float("nan")
compile_s = next((r["compile_s"] for r in recs if "compile_s" in r), float("nan"))
finite = all(math.isfinite(r["loss"]) for r in recs)
scales = sorted({r["loss_scale"] for r in recs if "loss_scale" in r})
print(f"  steps {len(recs)} | median {med('tok_s'):,.0f} tok/s, {med('samples_s'):.2f} samples/s, "
      f"mfu {med('mfu'):.3f} | peak {max(r.get('mem_gb', 0) for r in recs):.2f} GB | compile ~{compile_s:.0f} s | "
      f"losses finite: {finite} | skipped {sum(r.get('skipped', False) for r in recs)}"
      + (f" | loss scales {scales}" if scales else ""))
EOF
}
run() { name=$1; shift; start=$(date +%s)
  timeout ${RUN_TIMEOUT:-150} deepspeed --num_gpus 1 bench/train_synthetic.py "$@" $B --out "$OUT/$name" > "$OUT/$name.log" 2>&1
  echo "$name: rc=$? in $(( $(date +%s) - start )) s"
  grep -E "^step|^stage|^compiling|Error" "$OUT/$name.log" | tail -6
  [ -s "$OUT/$name/metrics.jsonl" ] && summary "$name"; }
memory() { name=$1; shift  # step 3's memory (bench/profile_train.py stopped before its time profile)
  timeout ${RUN_TIMEOUT:-150} python3 bench/profile_train.py "$@" --max-steps 3 $B --out "$OUT/$name" > "$OUT/$name.log" 2>&1
  echo "$name: rc=$?"; grep -a -A2 "==== memory" "$OUT/$name.log"; }
# the single-GPU QLoRA recipe at its real shape, 1 x 2048 positions (576 image + 1,472 text); accumulation 4 instead
# of 128 for a short run (memory does not depend on it). The synthetic sample supervises 736 positions, more than one
# 512-position loss chunk, so the loss's memory is already at its bound for any sample.
QLORA="@recipes/qlora-finetune-gpu1.args --init-from= --max-length 2048 --accumulation 4"
# the stage-1 recipe on one GPU (frozen NF4 LLM, projector trained) at its longest sample: 1 x 2048
QPT="@recipes/quant-pretrain-gpu1.args --max-length 2048 --accumulation 4"
# the 8-GPU pretrain recipe's per-GPU work: 576 image positions + 64 text, 2 micro-batches of 16 (PT32: XTuner's
# one micro-batch of 32 with every block recomputed, the recipe until round 4's call 9)
PT="@recipes/pretrain.args --max-length 640 --accumulation 2 --max-steps 15"
PT32="@recipes/pretrain.args --max-length 640 --micro-batch 32 --accumulation 1 --activation-checkpointing --max-steps 20"
for job in ${@:-qlora quant-pt pt qlora-fp16}; do case $job in
  # ---- round 4
  qlora) run qlora $QLORA --max-steps 10 ;;
  qlora-nocompile) run qlora-nocompile $QLORA --max-steps 8 --no-compile ;;
  quant-pt) run quant-pt $QPT --max-steps 10 ;;
  # fp16 (dynamic loss scaling) at 8B shapes: the loss must stay finite; early steps may overflow and be skipped
  qlora-fp16) run qlora-fp16 $QLORA --max-steps 8 --dtype fp16 ;;
  # the single-GPU recipe's memory levers, one at a time: the embedding table on the GPU, 512-position loss chunks
  qlora-gpuemb) run qlora-gpuemb $QLORA --max-steps 10 --no-cpu-embeddings ;;
  qlora-chunk512) run qlora-chunk512 $QLORA --max-steps 10 --loss-chunk 512 ;;
  # the adapters' dropout left to nn.Dropout (bool mask + dropped copy of x kept for each of the 7 adapters), and the
  # previous one-GPU bucket of 5e7 elements (train.py now gives 1e7)
  qlora-plaindrop) run qlora-plaindrop $QLORA --max-steps 10 --plain-lora-dropout ;;
  qlora-b5e7) echo '{"zero_optimization": {"reduce_bucket_size": 50000000}}' > /tmp/b5e7.json
        run qlora-b5e7 $QLORA --max-steps 10 --deepspeed /tmp/b5e7.json ;;
  # calls 1-4 of round 4: DeepSpeed overlapping the gradient copies in two buckets as large as the 188,751,872
  # trainable parameters (train.py now gives one GPU one 5e7 bucket), the table on the GPU, 512-position chunks
  qlora-prev) echo '{"zero_optimization": {"overlap_comm": true, "reduce_bucket_size": 188751872}}' > /tmp/prev.json
        run qlora-prev $QLORA --max-steps 10 --deepspeed /tmp/prev.json --no-cpu-embeddings --loss-chunk 512 ;;
  # where the QLoRA step's memory and time go: step 3's peak in each phase, steps 4-6 under torch.profiler
  qlora-profile) timeout ${RUN_TIMEOUT:-150} python3 bench/profile_train.py $QLORA --max-steps 7 $B \
        --out "$OUT/qlora-profile" > "$OUT/qlora-profile.log" 2>&1; echo "qlora-profile: rc=$?"
        grep -a -A1 "==== memory" "$OUT/qlora-profile.log"; grep -a -A30 "==== profile" "$OUT/qlora-profile.log" ;;
  # DeepSpeed's bf16 master weights and Adam moments (a user JSON; not exact: small updates round away in bf16)
  qlora-bf16states) echo '{"bf16": {"bf16_master_weights_and_grads": true, "bf16_optimizer_states": true}}' \
        > /tmp/bf16_states.json; run qlora-bf16states $QLORA --max-steps 8 --deepspeed /tmp/bf16_states.json ;;
  # pretrain MFU. The LLM is frozen, so a block's backward is only its input gradient (as much work as its forward)
  # and recomputing a block adds half of its work: 11 of 32 recomputed (round 3's setting) is 17% more work than
  # none. Fewer recomputed blocks at micro-batch 32 (each keeps its activations), or a smaller micro-batch with
  # fewer or none (the recipe's global batch stays; a GEMM still has 16 x 640 rows)
  pt) run pt $PT ;;  # the recipe as typed: micro-batch 16, nothing recomputed
  pt-c11) run pt-c11 $PT32 --checkpoint-layers 11 ;;
  pt-all) run pt-all $PT32 ;;
  pt-c8) run pt-c8 $PT32 --checkpoint-layers 8 ;;
  pt-c5) run pt-c5 $PT32 --checkpoint-layers 5 ;;
  pt-mb24) run pt-mb24 $PT32 --micro-batch 24 --checkpoint-layers 4 --max-steps 25 ;;
  pt-mb16) run pt-mb16 $PT32 --micro-batch 16 --no-activation-checkpointing --max-steps 30 ;;
  # ---- round 3's jobs (BENCHMARKS.md); --compile is now the default on a GPU, --no-compile gives round 3's plain runs
  lora) run lora $QLORA --lora --max-steps 20 --no-compile ;;
  lora-compile) run lora-compile $QLORA --lora --max-steps 12 --compile ;;
  qlora-compile) run qlora-compile $QLORA --max-steps 12 --compile ;;
  # where the LoRA step's time goes: DeepSpeed's ZeRO-2 gradient path (overlap_comm) against ZeRO-0 and no overlap
  lora-z0) run lora-z0 $QLORA --lora --max-steps 12 --no-compile --deepspeed deepspeed_zero0 ;;
  lora-nooverlap) echo '{"zero_optimization": {"overlap_comm": false}}' > /tmp/no_overlap.json
        run lora-nooverlap $QLORA --lora --max-steps 12 --no-compile --deepspeed /tmp/no_overlap.json ;;
  # the optimizer's fp32 master weights and moments in CPU memory (DeepSpeed's CPU Adam)
  qlora-offload) run qlora-offload $QLORA --max-steps 10 --deepspeed deepspeed_zero2_offload ;;
  # step 3's memory only (no torch.profiler): each phase's peak, and what is alive at the step's highest point
  qlora-mem) memory qlora-mem $QLORA ;;
  qlora-mem-plain) memory qlora-mem-plain $QLORA --plain-lora-dropout ;;
  # DeepSpeed's gradient staging on one GPU: with its contiguous gradient buffer (train.py turns it off on one GPU
  # since round 4's call 9), and ZeRO-1
  qlora-contig) echo '{"zero_optimization": {"contiguous_gradients": true}}' > /tmp/contig.json
        run qlora-contig $QLORA --max-steps 10 --deepspeed /tmp/contig.json ;;
  qlora-z1) run qlora-z1 $QLORA --max-steps 10 --deepspeed deepspeed_zero1 ;;
  # the bf16 LoRA run under torch.profiler (plain python: one process)
  lora-profile) timeout 300 python3 bench/profile_train.py $QLORA --lora --no-compile --max-steps 7 $B \
        --out "$OUT/lora-profile" > "$OUT/lora-profile.log" 2>&1; echo "lora-profile: rc=$?"
        grep -A60 "==== profile" "$OUT/lora-profile.log" ;;
  *) echo "unknown job $job" ;;
esac; done
