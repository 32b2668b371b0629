"""The split-KV decode attention (extras/decode_attention.py) against F.scaled_dot_product_attention.

On the CPU its Triton kernels run in Triton's interpreter, in a child process: TRITON_INTERPRET=1 must be set before
Triton itself is imported, and this process has imported it already (torch.compile). The interpreter's tl.dot
mishandles bf16 (it multiplies the raw bits), so the CPU cases are fp16, whose code path is the same. On a GPU the
compiled, graphed decode step is checked in bf16, as chat.py runs it."""

import copy
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from extras import fast_inference
from extras.fast_inference import GraphedDecodeStep, compile_for_decoding
import llama
import model

pytest.importorskip("triton")
SOURCE = Path(__file__).resolve().parent.parent / "extras" / "decode_attention.py"
CHILD = """
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("decode_attention", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
results = {}
for name, (q, k, v, keep) in torch.load(sys.argv[2]).items():
    try:
        results[name] = module.split_kv_attention(q, k, v, keep)
    except ValueError as e:
        results[name] = str(e)
torch.save(results, sys.argv[3])
"""


def inputs(B, H, Hkv, S, D, seed=0, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for shape in ((B, H, 1, D), (B, Hkv, S, D), (B, Hkv, S, D))]


def decode_mask(B, S, padded):
    keep = (torch.arange(S) <= S - 7).expand(B, 1, 1, S).clone()  # slots past the current one are still empty
    for row, n in padded.items():
        keep[row, ..., :n] = False  # left padding
    return keep


CASES = {
    # 4 splits of one tile, the last one partial; row 0's padding fills its first split and part of the second
    "grouped": (*inputs(2, 8, 2, 200, 32), decode_mask(2, 200, {0: 100, 1: 3})),
    "long": (*inputs(1, 4, 1, 2100, 16, seed=1), decode_mask(1, 2100, {})),  # 33 tiles: 17 splits of two tiles
    "ungrouped": (*inputs(3, 4, 4, 64, 32, seed=2), decode_mask(3, 64, {2: 10})),  # H == Hkv, one split
    "shared_mask": (*inputs(2, 4, 2, 130, 32, seed=3), (torch.arange(130) < 90).view(1, 1, 1, 130)),  # stride 0
    "keeps_nothing": (*inputs(2, 4, 2, 130, 32, seed=3), torch.zeros(1, 1, 1, 130, dtype=torch.bool)),
    "prefill": (inputs(1, 4, 2, 64, 16)[0].expand(1, 4, 3, 16), *inputs(1, 4, 2, 64, 16)[1:],
                torch.ones(1, 1, 3, 64, dtype=torch.bool)),
    "float_mask": (*inputs(1, 4, 2, 64, 16), torch.zeros(1, 1, 1, 64)),
}


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """{case: split_kv_attention(*CASES[case]) or its ValueError's message}, computed by the interpreter."""
    folder = tmp_path_factory.mktemp("interpreted")
    torch.save(CASES, folder / "cases.pt")
    child = subprocess.run([sys.executable, "-c", CHILD, str(SOURCE), str(folder / "cases.pt"), str(folder / "out.pt")],
                           env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, f"the interpreted kernels failed:\n{child.stderr[-3000:]}"
    return torch.load(folder / "out.pt")


def reference(q, k, v, keep):
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=keep,
                                          enable_gqa=k.shape[1] != q.shape[1])


@pytest.mark.parametrize("case", ["grouped", "long", "ungrouped", "shared_mask"])
def test_split_kv_attention_matches_sdpa(interpreted, case):
    q = CASES[case][0]
    assert interpreted[case].shape == q.shape and interpreted[case].dtype == q.dtype
    torch.testing.assert_close(interpreted[case].float(), reference(*CASES[case]), atol=2e-3, rtol=2e-3)


def test_a_row_that_keeps_no_slot_gives_zeros(interpreted):
    # SDPA's kernels disagree on such a row (NaN, zeros, or an unmasked average); the decode mask never makes one
    assert torch.equal(interpreted["keeps_nothing"], torch.zeros_like(CASES["keeps_nothing"][0]))


def test_split_kv_attention_refuses_a_prefill_or_a_float_mask(interpreted):
    assert "one query per row" in interpreted["prefill"] and "(1, 4, 3, 16)" in interpreted["prefill"]
    assert "bool mask" in interpreted["float_mask"] and "torch.float32" in interpreted["float_mask"]


def test_decode_sdpa_keeps_sdpa_on_the_cpu_and_for_other_models():
    """Everything the kernels do not take goes to F.scaled_dot_product_attention unchanged."""
    q, k, v = inputs(1, 4, 2, 64, 16, dtype=torch.float32)
    keep = torch.arange(64).view(1, 1, 1, 64) < 40
    assert torch.equal(fast_inference.decode_sdpa(q, k, v, attn_mask=keep, enable_gqa=True),
                       F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True))
    net = fast_inference.use_split_kv_attention(llama.Llama(llama.LlamaConfig(
        vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)))
    assert all(layer.self_attn.sdpa is fast_inference.decode_sdpa for layer in net.layers)
    assert llama.Attention.sdpa is F.scaled_dot_product_attention  # other models keep SDPA


def test_compile_for_decoding_compiles_the_blocks_tuned_with_the_split_kv_attention(monkeypatch):
    """chat.py's setting on a GPU, wired on any device: every block's attention goes through decode_sdpa, and the
    blocks are compiled (llama.Llama.compile_blocks, tested in test_llama.py) with the decode options."""
    calls = []
    monkeypatch.setattr(llama.Llama, "compile_blocks", lambda self, **kw: calls.append(kw) or self)
    net = compile_for_decoding(llama.Llama(llama.LlamaConfig(
        vocab_size=64, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=64)))
    assert all(layer.self_attn.sdpa is fast_inference.decode_sdpa for layer in net.layers)
    assert calls == [{"options": {"coordinate_descent_tuning": True}}]


@pytest.mark.parametrize("capability,installed", [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_gpus_older_than_ampere_keep_sdpa(monkeypatch, capability, installed):
    """A T4 or V100 keeps SDPA (the kernels' bf16 tl.dot needs Ampere); the GPU is faked: only its capability counts."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    attn = types.SimpleNamespace(sdpa=F.scaled_dot_product_attention)
    weight = types.SimpleNamespace(device=torch.device("cuda", 0))
    llm = types.SimpleNamespace(norm=types.SimpleNamespace(weight=weight),
                                layers=[types.SimpleNamespace(self_attn=attn)])
    fast_inference.use_split_kv_attention(llm)
    assert (attn.sdpa is fast_inference.decode_sdpa) is installed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU path: compiled blocks replayed from a CUDA graph")
def test_compiled_graphed_decode_steps_match_sdpa_on_a_gpu():
    """chat.py's decode on a GPU (compile_for_decoding + GraphedDecodeStep, bf16, 8B head sizes) against eager SDPA
    steps fed the same tokens, over a 1,024-slot cache with a left-padded row."""
    torch.manual_seed(0)
    cfg = llama.LlamaConfig(vocab_size=512, hidden_size=1024, num_layers=2, num_heads=8, num_kv_heads=2,
                            intermediate_size=2048)
    eager = llama.Llama(cfg).to("cuda", torch.bfloat16).eval()
    fast = compile_for_decoding(copy.deepcopy(eager))
    ids = torch.randint(0, 512, (2, 300), device="cuda")
    key_valid = torch.ones(2, 1024, dtype=torch.bool, device="cuda")
    key_valid[1, :50] = False  # row 1 left-padded
    tokens = torch.randint(0, 512, (10, 2), device="cuda")
    step, logits = GraphedDecodeStep(), {}
    for name, net in (("eager", eager), ("fast", fast)):
        net.setup_cache(2, 1024)
        with torch.no_grad():
            net(input_ids=ids, cache_pos=torch.arange(300, device="cuda"), key_valid=key_valid)
            out = []
            for i, t in enumerate(range(300, 310)):
                args = (tokens[i], torch.full((2,), t, device="cuda"), torch.tensor([t], device="cuda"), key_valid)
                out.append((step if net is fast else model.decode_step)(net, *args).clone())
        logits[name] = torch.stack(out)
    torch.testing.assert_close(logits["fast"], logits["eager"], atol=3e-2, rtol=3e-2)
    q, k, v = (t.to("cuda", torch.bfloat16) for t in inputs(2, 32, 8, 1024, 128))  # the 8B model's heads
    keep = key_valid[:, None, None] & (torch.arange(1024, device="cuda") <= 700)
    y = fast_inference.decode_sdpa(q, k, v, attn_mask=keep, enable_gqa=True)
    assert torch.equal(y, fast_inference.decode_attention.split_kv_attention(q, k, v, keep))  # the kernels ran
    torch.testing.assert_close(y.float(), reference(q, k, v, keep), atol=1e-2, rtol=1e-2)
    # model.generate as chat.py calls it: tokens fetched every 4 steps, each fetch read once the next step is queued
    # (model.to_host), against a fetch after every step; the same compiled model, so the same tokens
    lm = model.LLaVA(None, None, fast)
    prompts = [ids[0, :40].tolist(), ids[1, :25].tolist()]
    with torch.no_grad():
        got = [model.generate(lm, prompts, max_new_tokens=30, max_cache_len=1024, step_fn=GraphedDecodeStep(),
                              sync_every=k) for k in (1, 4)]
    assert got[0] == got[1] and all(len(row) == 30 for row in got[0])
    tokens, copied = model.to_host(torch.arange(5, device="cuda"))
    copied.synchronize()
    assert tokens.device.type == "cpu" and tokens.is_pinned() and tokens.tolist() == list(range(5))
