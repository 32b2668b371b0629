# call 14, run from the project root on the GPU machine with .whl carried (OUT: the call's output folder)
export OUT=$OUT/call14; mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
PYTHONPATH=/tmp/site TORCH_CUDA_ARCH_LIST=9.0 timeout 120 python3 -m pytest tests/test_decode_attention.py -q \
  -p no:cacheprovider > $OUT/pytest.log 2>&1; echo "pytest: rc=$?"; tail -2 $OUT/pytest.log
VARIANTS="sdpa wide" timeout 440 bash bench/round4.sh decode
