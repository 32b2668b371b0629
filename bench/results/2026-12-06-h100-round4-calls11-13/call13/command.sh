# call 13, run from the project root on the GPU machine with .whl carried (OUT: the call's output folder)
export OUT=$OUT/callC; mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH TORCH_CUDA_ARCH_LIST=9.0 OMP_NUM_THREADS=8 PYTHONUNBUFFERED=1
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; } > $OUT/machine.txt
M=/tmp/llava8b; python3 bench/chat_cli.py write $M --tokenizer .whl/llama3_tokenizer.model | tail -1
for v in "" before ""; do
  timeout 150 python3 bench/chat_cli.py ours $M --repeat 6 --warmup 2 ${v:+--variant $v} --out $OUT/chat.jsonl \
    > $OUT/chat-ours-${v:-chat}.log 2>&1; echo "ours ${v:-chat.py}: rc=$?"; tail -1 $OUT/chat-ours-${v:-chat}.log
done
timeout 130 python3 bench/chat_cli.py hf $M --mode static-compile --repeat 4 --warmup 2 --out $OUT/chat.jsonl \
  > $OUT/chat-hf-static.log 2>&1; echo "hf static: rc=$?"; tail -1 $OUT/chat-hf-static.log
