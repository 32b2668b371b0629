#!/usr/bin/env bash
# Round 4 on one GPU, in two calls of at most 10 minutes. Carry .whl, built by the GPU wheels script, with Meta's
# Llama-3 tokenizer.model copied in for the chat folder (from the llama-models package of requirements-test.txt):
#   cp $(python -c 'import models, os; print(os.path.dirname(models.__file__))')/llama3/tokenizer.model \
#      .whl/llama3_tokenizer.model
# and openpyxl for eval_mmbench.py: pip download --no-deps -d .whl openpyxl et-xmlfile
#   OUT=... bash bench/round4.sh train    # train.py jobs (bench/train_runs.sh) + HF's QLoRA step, as XTuner sets it up
#                                         # (HF_PT=1: HF's pretrain step too, micro-batch 32 as XTuner)
#   OUT=... bash bench/round4.sh chat     # eval_mmbench.py, then chat.py itself vs transformers, on one random-weight
#                                         # 8B folder; PRE_CHAT="JOB ..." runs train_runs.sh jobs between the two,
#                                         # NO_HF_EAGER=1 leaves out HF's eager chat
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH TORCH_CUDA_ARCH_LIST=9.0 OMP_NUM_THREADS=8 PYTHONUNBUFFERED=1
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; } > "$OUT/machine.txt"
case ${1:-train} in
  train)
    RUN_TIMEOUT=${RUN_TIMEOUT:-130} bash bench/train_runs.sh "${JOBS:-qlora quant-pt pt qlora-fp16}" 2>&1 | tee "$OUT/train_runs.txt"
    [ -n "${HF_PT:-}" ] && { timeout 150 python3 bench/train_bench.py --side hf --workload pretrain --steps 5 \
      --out "$OUT/train_bench.jsonl" > "$OUT/hf-pretrain.log" 2>&1; echo "hf pretrain: rc=$?"; tail -1 "$OUT/hf-pretrain.log"; }
    for v in "" "--no-kbit-prep"; do
      timeout 150 python3 bench/train_bench.py --side hf --workload qlora --steps 5 $v --out "$OUT/train_bench.jsonl" \
        > "$OUT/hf-qlora$v.log" 2>&1; echo "hf qlora $v: rc=$?"; tail -3 "$OUT/hf-qlora$v.log"
    done ;;
  chat)  # eval_mmbench.py's questions/s (an MMBench-format and a yes/no set, 8 new tokens), then chat, on one folder
    M=/tmp/llava8b
    python3 bench/chat_cli.py write $M --tokenizer .whl/llama3_tokenizer.model > "$OUT/chat-write.log" 2>&1; tail -2 "$OUT/chat-write.log"
    python3 demo.py data /tmp/dd --n-pretrain 8 --n-finetune 8 --n-eval 160 --image-size 336 | tail -1
    timeout 80 python3 eval_mmbench.py --model $M --data /tmp/dd/eval.tsv --data /tmp/dd/eval_yesno.tsv --batch-size 32 \
      --max-new-tokens 8 --out "$OUT/eval" > "$OUT/eval.log" 2>&1; echo "eval: rc=$?"; grep -a "answered\|q/s\|questions/s" "$OUT/eval.log" | tail -4
    [ -n "${PRE_CHAT:-}" ] && RUN_TIMEOUT=140 bash bench/train_runs.sh "$PRE_CHAT" 2>&1 | tee "$OUT/train_runs.txt"
    timeout 120 python3 bench/chat_cli.py ours $M --repeat 6 --warmup 2 --extra "${OURS_EXTRA:-}" --out "$OUT/chat.jsonl" \
      > "$OUT/chat-ours.log" 2>&1; echo "ours: rc=$?"; tail -3 "$OUT/chat-ours.log"
    timeout 130 python3 bench/chat_cli.py hf $M --mode static-compile --repeat 4 --warmup 2 --out "$OUT/chat.jsonl" \
      > "$OUT/chat-hf-static.log" 2>&1; echo "hf static-compile: rc=$?"; tail -2 "$OUT/chat-hf-static.log"
    [ -z "${NO_HF_EAGER:-}" ] && { timeout 90 python3 bench/chat_cli.py hf $M --mode eager --repeat 2 --warmup 1 \
      --out "$OUT/chat.jsonl" > "$OUT/chat-hf-eager.log" 2>&1; echo "hf eager: rc=$?"; tail -2 "$OUT/chat-hf-eager.log"; } ;;
esac
