#!/usr/bin/env bash
# Round 4 on one GPU, in two calls of at most 10 minutes. Carry .whl, built by the GPU wheels script, with Meta's
# Llama-3 tokenizer.model copied in for the chat folder (from the llama-models package of requirements-test.txt):
#   cp $(python -c 'import models, os; print(os.path.dirname(models.__file__))')/llama3/tokenizer.model \
#      .whl/llama3_tokenizer.model
# and openpyxl for eval_mmbench.py: pip download --no-deps -d .whl openpyxl et-xmlfile
#   OUT=... bash bench/round4.sh train    # train.py jobs (bench/train_runs.sh) + HF's QLoRA step, as XTuner sets it up
#                                         # and without kbit preparation; HF="..." picks HF's runs among pretrain,
#                                         # qlora, qlora-nokbit, quant_pretrain (HF_PT=1: pretrain added)
#   OUT=... bash bench/round4.sh decode   # chat.py itself, chat.py compiled as before (bench/chat_variant.py), HF's
#                                         # static-cache + compile and eager chat, then a profile of the decode step
#   OUT=... bash bench/round4.sh eval     # eval_mmbench.py, then the same questions through transformers
#                                         # (bench/eval_hf.py): one at a time as XTuner asks them, and batched;
#                                         # EVAL_VARIANTS="..." adds bench/eval_variant.py runs
#   OUT=... bash bench/round4.sh diagnose # where chat.py's time goes: the split-KV GPU test, chat.py, chat.py with
#                                         # each sync read before the next step is queued (chat_variant.py
#                                         # readfirst), chat.py timed from inside (probe), HF's fastest chat;
#                                         # SWEEP=1 adds the split-KV tile sweep; DIAG_VARIANTS="..." other variants
#   OUT=... bash bench/round4.sh verify   # chat.py, chat.py reading each sync's tokens first (readfirst), HF's
#                                         # fastest chat, then the GPU test: the shortest call that decides chat
#   OUT=... bash bench/round4.sh chat     # eval_mmbench.py, then chat.py itself vs transformers, on one random-weight
#                                         # 8B folder; PRE_CHAT="JOB ..." runs train_runs.sh jobs between the two,
#                                         # NO_HF_EAGER=1 leaves out HF's eager chat
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH TORCH_CUDA_ARCH_LIST=9.0 OMP_NUM_THREADS=8 PYTHONUNBUFFERED=1
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; } > "$OUT/machine.txt"
M=/tmp/llava8b
folder() {  # the random-weight 8B LLaVA folder (HF layout) that chat, eval and HF all read, written once per machine
  [ -d $M ] || { python3 bench/chat_cli.py write $M --tokenizer .whl/llama3_tokenizer.model > "$OUT/chat-write.log" 2>&1
    tail -1 "$OUT/chat-write.log"; }; }
ours_chat() {  # chat.py on the folder (timeout $1), or the bench/chat_variant.py variant $2; OURS_EXTRA: more flags
  local log="$OUT/chat-ours$(echo ${2:+-$2} | tr + -).log"
  CHAT_PROBE="$OUT/probe.txt" timeout $1 python3 bench/chat_cli.py ours $M --repeat 6 --warmup 2 ${2:+--variant $2} \
    --extra "${OURS_EXTRA:-}" --out "$OUT/chat.jsonl" > "$log" 2>&1; echo "ours ${2:-chat.py}: rc=$?"
  tail -1 "$log" | cut -c1-330; }
hf_chat() {  # transformers on the folder (timeout $1): mode $2 (static-compile or eager), $3 answers after $4
  local log="$OUT/chat-hf-${2%%-*}.log"
  timeout $1 python3 bench/chat_cli.py hf $M --mode $2 --repeat $3 --warmup $4 --out "$OUT/chat.jsonl" > "$log" 2>&1
  echo "hf $2: rc=$?"; tail -1 "$log" | cut -c1-330; }
gpu_test() {  # the GPU test of the compiled, graphed decode step and the split-KV kernels (timeout $1)
  timeout $1 python3 -m pytest tests/test_decode_attention.py -k on_a_gpu -p no:cacheprovider -rA > "$OUT/pytest.log" 2>&1
  echo "pytest: rc=$?"; grep -a "passed\|failed\|skipped\|Error" "$OUT/pytest.log" | tail -8; }
case ${1:-train} in
  train)
    RUN_TIMEOUT=${RUN_TIMEOUT:-130} bash bench/train_runs.sh "${JOBS:-qlora quant-pt pt qlora-fp16}" 2>&1 | tee "$OUT/train_runs.txt"
    for run in ${HF_PT:+pretrain} ${HF:-qlora qlora-nokbit}; do  # pretrain: micro-batch 32, as XTuner
      case $run in qlora-nokbit) w="qlora --no-kbit-prep" ;; *) w=$run ;; esac
      timeout 150 python3 bench/train_bench.py --side hf --workload $w --steps 5 --out "$OUT/train_bench.jsonl" \
        > "$OUT/hf-$run.log" 2>&1; echo "hf $run: rc=$?"; tail -1 "$OUT/hf-$run.log"
    done ;;
  decode)  # chat.py as users run it, against its earlier compilation and HF, on one random-weight 8B folder
    folder
    for v in "" ${VARIANTS:-before}; do ours_chat 150 $v; done
    hf_chat 130 static-compile 4 2
    # the decode step's kernels, compiled as chat.py compiles it (the CLIP layers compiled too: prefill only)
    timeout 150 python3 bench/chat_bench.py --side ours --variants compiled_fused_sync8 --profile --eval-batches "" \
      > "$OUT/chat-profile.log" 2>&1; echo "profile: rc=$?"; grep -a -A14 "==== decode profile" "$OUT/chat-profile.log"
    hf_chat 90 eager 2 1 ;;
  diagnose)  # where chat.py's time goes, against HF's fastest; SWEEP=1: the split-KV kernels' tile settings too
    gpu_test 150
    folder; rm -f "$OUT/chat-write.log"  # at most 8 files come back from a call
    for v in "" ${DIAG_VARIANTS-readfirst probe}; do ours_chat 90 $v; done  # probe: token bursts, gc pauses, a profile
    [ -f "$OUT/probe.txt" ] && cat "$OUT/probe.txt"
    hf_chat 80 static-compile 4 2
    [ -n "${SWEEP:-}" ] && { timeout 45 python3 bench/decode_attention_sweep.py --slots 1024 --quick \
      > "$OUT/attention-sweep.log" 2>&1; echo "sweep: rc=$?"; cut -c1-200 "$OUT/attention-sweep.log"; } ;;
  verify)  # chat.py against its previous sync order and HF's fastest, then the GPU test (the measurements first)
    folder; rm -f "$OUT/chat-write.log"
    for v in "" readfirst; do ours_chat 90 $v; done
    hf_chat 80 static-compile 4 2
    gpu_test 120 ;;
  eval)  # questions/s of eval_mmbench.py and of transformers on the same questions, prompts and pictures
    folder
    python3 demo.py data /tmp/dd --n-pretrain 8 --n-finetune 8 --n-eval 160 --image-size 336 | tail -1
    D="--data /tmp/dd/eval.tsv --data /tmp/dd/eval_yesno.tsv --max-new-tokens 8"
    timeout 80 python3 eval_mmbench.py --model $M $D --batch-size 32 --out "$OUT/eval" > "$OUT/eval.log" 2>&1
    echo "eval ours, batch 32: rc=$?"; grep -a "answered" "$OUT/eval.log"
    for v in ${EVAL_VARIANTS:-}; do  # bench/eval_variant.py: eval_mmbench.py with one setting changed
      timeout 80 python3 bench/eval_variant.py $v --model $M $D --batch-size 32 --out "$OUT/eval-$v" > "$OUT/eval-$v.log" 2>&1
      echo "eval ours $v, batch 32: rc=$?"; grep -a "answered" "$OUT/eval-$v.log"
    done
    timeout 90 python3 bench/eval_hf.py --model $M $D --batch-size 32 --out "$OUT/eval-hf32" > "$OUT/eval-hf32.log" 2>&1
    echo "eval hf, batch 32: rc=$?"; grep -a "answered" "$OUT/eval-hf32.log"
    timeout 100 python3 bench/eval_hf.py --model $M --data /tmp/dd/eval.tsv --max-new-tokens 8 --batch-size 1 \
      --out "$OUT/eval-hf1" > "$OUT/eval-hf1.log" 2>&1; echo "eval hf, batch 1 (eval.tsv): rc=$?"; grep -a "answered" "$OUT/eval-hf1.log" ;;
  chat)  # eval_mmbench.py's questions/s (an MMBench-format and a yes/no set, 8 new tokens), then chat, on one folder
    folder
    python3 demo.py data /tmp/dd --n-pretrain 8 --n-finetune 8 --n-eval 160 --image-size 336 | tail -1
    timeout 80 python3 eval_mmbench.py --model $M --data /tmp/dd/eval.tsv --data /tmp/dd/eval_yesno.tsv --batch-size 32 \
      --max-new-tokens 8 --out "$OUT/eval" > "$OUT/eval.log" 2>&1; echo "eval: rc=$?"; grep -a "answered\|q/s\|questions/s" "$OUT/eval.log" | tail -4
    [ -n "${PRE_CHAT:-}" ] && RUN_TIMEOUT=140 bash bench/train_runs.sh "$PRE_CHAT" 2>&1 | tee "$OUT/train_runs.txt"
    ours_chat 120
    hf_chat 130 static-compile 4 2
    [ -z "${NO_HF_EAGER:-}" ] && hf_chat 90 eager 2 1 ;;
esac
