# call 14, run from the project root on the GPU machine with .whl carried (OUT: the call's output folder):
# the GPU test of the split-KV decode attention, then chat.py and eval_mmbench.py with it and without it (SDPA),
# and HF's fastest chat and batched eval on the same random-weight 8B folder
export OUT=$OUT/call14; mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH TORCH_CUDA_ARCH_LIST=9.0 OMP_NUM_THREADS=8 PYTHONUNBUFFERED=1
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; } > $OUT/machine.txt
timeout 100 python3 -m pytest tests/test_decode_attention.py -p no:cacheprovider -rA > $OUT/pytest.log 2>&1
echo "pytest: rc=$?"; grep -a "passed\|failed\|skipped" $OUT/pytest.log | tail -3
M=/tmp/llava8b; python3 bench/chat_cli.py write $M --tokenizer .whl/llama3_tokenizer.model > $OUT/chat-write.log 2>&1
tail -1 $OUT/chat-write.log
for v in "" sdpa; do
  timeout 120 python3 bench/chat_cli.py ours $M --repeat 6 --warmup 2 ${v:+--variant $v} --out $OUT/chat.jsonl \
    > $OUT/chat-ours-${v:-chat}.log 2>&1; echo "ours ${v:-chat.py}: rc=$?"; tail -1 $OUT/chat-ours-${v:-chat}.log
done
timeout 120 python3 bench/chat_cli.py hf $M --mode static-compile --repeat 4 --warmup 2 --out $OUT/chat.jsonl \
  > $OUT/chat-hf-static.log 2>&1; echo "hf static: rc=$?"; tail -1 $OUT/chat-hf-static.log
timeout 100 python3 bench/chat_bench.py --side ours --variants compiled_fused_sync8 --profile --eval-batches "" \
  > $OUT/chat-profile.log 2>&1; echo "profile: rc=$?"; grep -a -A18 "==== decode profile" $OUT/chat-profile.log
python3 demo.py data /tmp/dd --n-pretrain 8 --n-finetune 8 --n-eval 160 --image-size 336 | tail -1
E="--model $M --data /tmp/dd/eval.tsv --data /tmp/dd/eval_yesno.tsv --max-new-tokens 8 --batch-size 32"
timeout 70 python3 eval_mmbench.py $E --out $OUT/eval > $OUT/eval.log 2>&1; echo "eval: rc=$?"; grep -a answered $OUT/eval.log
timeout 70 python3 bench/eval_variant.py sdpa $E --out $OUT/eval-sdpa > $OUT/eval-sdpa.log 2>&1
echo "eval sdpa: rc=$?"; grep -a answered $OUT/eval-sdpa.log
timeout 80 python3 bench/eval_hf.py $E --out $OUT/eval-hf32 > $OUT/eval-hf32.log 2>&1; echo "eval hf: rc=$?"
grep -a answered $OUT/eval-hf32.log
