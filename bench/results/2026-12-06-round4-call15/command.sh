# call 15, run from the project root on the GPU machine with .whl carried (OUT: the call's output folder):
# the GPU test of the split-KV decode attention; chat.py, chat.py timed from inside (bench/chat_variant.py probe),
# and chat.py with tokens every 8 steps and the split-KV chunks combined in one kernel, on one random-weight 8B
# folder (what the device time left allows)
export OUT=$OUT/call15; mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH TORCH_CUDA_ARCH_LIST=9.0 OMP_NUM_THREADS=8 PYTHONUNBUFFERED=1
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; nproc;
  lscpu | grep -i "model name"; } > $OUT/machine.txt
timeout 45 python3 -m pytest tests/test_decode_attention.py -p no:cacheprovider -rA > $OUT/pytest.log 2>&1
echo "pytest: rc=$?"; grep -a "passed\|failed\|skipped" $OUT/pytest.log | tail -3
M=/tmp/llava8b; python3 bench/chat_cli.py write $M --tokenizer .whl/llama3_tokenizer.model > $OUT/chat-write.log 2>&1
tail -1 $OUT/chat-write.log
ours() {  # chat.py itself, or a bench/chat_variant.py variant of it
  log=$OUT/chat-ours-$(echo ${1:-chat} | tr + -).log
  CHAT_PROBE=$OUT/probe.txt timeout 90 python3 bench/chat_cli.py ours $M --repeat 6 --warmup 2 ${1:+--variant $1} \
    --out $OUT/chat.jsonl > $log 2>&1; echo "ours ${1:-chat.py}: rc=$?"; tail -1 $log | cut -c1-330; }
ours; ours probe; cat $OUT/probe.txt; ours sync8+onekernel
