# call 15: why the interpreted kernel tests failed on the GPU machine (call 14), then chat.py against chat.py with
# its tokens brought to the host every 8 steps instead of 4 (bench/chat_variant.py sync8), on one 8B folder
export OUT=$OUT/call15; mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH TORCH_CUDA_ARCH_LIST=9.0 OMP_NUM_THREADS=8 PYTHONUNBUFFERED=1
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; } > $OUT/machine.txt
timeout 40 python3 -m pytest tests/test_decode_attention.py -p no:cacheprovider -x -k "not gpu" 2>&1 | tail -30 > $OUT/pytest.log
M=/tmp/llava8b; python3 bench/chat_cli.py write $M --tokenizer .whl/llama3_tokenizer.model > $OUT/chat-write.log 2>&1
for v in "" sync8; do
  timeout 100 python3 bench/chat_cli.py ours $M --repeat 6 --warmup 2 ${v:+--variant $v} --out $OUT/chat.jsonl \
    > $OUT/chat-ours-${v:-chat}.log 2>&1; echo "ours ${v:-chat.py}: rc=$?"; tail -1 $OUT/chat-ours-${v:-chat}.log
done
tail -12 $OUT/pytest.log
