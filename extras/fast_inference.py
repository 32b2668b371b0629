"""Fast inference on a GPU, for chat.py and eval_mmbench.py: fewer, larger matrices and a decode step replayed
from a CUDA graph. Neither changes an output beyond float rounding; neither is for training or saving.

    fuse_projections(llm)   q/k/v and gate/up of every block stacked into one matrix each (Llama.forward then
                            takes one GEMM for each group; gpt-fast's `wqkv`, vLLM's `qkv_proj` / `gate_up_proj`)
    compile_for_decoding(llm)  the blocks compiled, their batch-1 products as tuned Triton reductions, and
                            decode attention as split-KV Triton kernels (use_split_kv_attention)
    GraphedDecodeStep()     `generate(..., step_fn=GraphedDecodeStep())`: model.decode_step as one CUDA graph
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import model
from extras import decode_attention


def stack_linears(*linears):
    """One bias-free nn.Linear whose output is the outputs of `linears` side by side: their weights stacked by rows
    (a new tensor; the caller drops the old layers, so the memory is not doubled). Inference only: frozen."""
    w = torch.cat([m.weight.detach() for m in linears])  # (sum of out_features, in_features)
    fused = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    fused.weight = nn.Parameter(w, requires_grad=False)
    return fused


def unfusable_projections(llm):
    """The q/k/v and gate/up projections fuse_projections cannot stack, as "name (type)": anything but a plain
    bias-free nn.Linear, i.e. LoRA layers and NF4-quantized ones (lora.LoRALinear). Empty: fusion can go ahead."""
    return [f"{name} ({type(m).__name__})" for name, m in llm.named_modules()
            if name.rpartition(".")[2] in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
            and (type(m) is not nn.Linear or m.bias is not None)]


def fuse_projections(llm):
    """Inference only: in every block, stack q_proj, k_proj, v_proj into one `qkv_proj` and gate_proj, up_proj
    into one `gate_up_proj`, in place; returns llm. Same outputs (each output row is the same dot product).

    Batch-1 decode reads every weight once per token, so its speed is the GEMVs' memory bandwidth, and a small
    GEMV streams worse than a large one (BENCHMARKS.md measures the 1024-row k_proj / v_proj). Two GEMVs per
    block instead of five, and fewer kernel launches. The old weights are freed. Parameter names change (no
    checkpoint has these keys), so a fused model is not for saving (save_llama refuses it) or training (train()
    refuses it): load the model again for that.
    LoRA and NF4 layers cannot be stacked (see unfusable_projections); merge them first (lora.merge_lora).
    Compiled blocks retrace by themselves (dynamo guards on the layers); a CUDA graph captured before fusing
    would replay on the freed weights, so capture after it (a new GraphedDecodeStep)."""
    if llm.fused:
        return llm
    blocked = unfusable_projections(llm)
    if blocked:
        raise ValueError(f"fuse_projections: {len(blocked)} projections are not plain bias-free nn.Linear layers "
                         f"(e.g. {', '.join(blocked[:3])}); a LoRA adapter or an NF4 weight belongs to its own "
                         "matrix and cannot be stacked. Merge the adapters into the weights first "
                         "(lora.merge_lora, which also dequantizes NF4), or leave the projections unfused")
    for layer in llm.layers:
        a, m = layer.self_attn, layer.mlp
        a.qkv_proj = stack_linears(a.q_proj, a.k_proj, a.v_proj)  # (H + 2 Hkv) D rows: [q | k | v]
        del a.q_proj, a.k_proj, a.v_proj
        m.gate_up_proj = stack_linears(m.gate_proj, m.up_proj)  # 2 x intermediate rows: [gate | up]
        del m.gate_proj, m.up_proj
    llm.fused = True
    return llm


# Inductor's settings for generation. With coordinate_descent_tuning, a matmul whose input has one row (every
# projection of a batch-1 decode step: a matrix-vector product, bound by reading the weight) is written as inductor's
# own Triton reduction, fused with the RMSNorm or SwiGLU before it, and its tile sizes are tuned by coordinate
# descent on this GPU, instead of calling cuBLAS, whose small GEMVs stream the weights more slowly (BENCHMARKS.md,
# round 4, call 11, measures chat.py both ways). Larger inputs (prefill, batched eval) still go to cuBLAS. The tuning
# lengthens the first answer's compilation; inductor caches its results on disk for the next run.
DECODE_OPTIONS = {"coordinate_descent_tuning": True}


def compile_for_decoding(llm):
    """torch.compile every decoder block in place with DECODE_OPTIONS, attention of a decode step by
    use_split_kv_attention; returns llm. Outputs match eager to bf16 rounding (the reductions accumulate in fp32).
    The LM head is left to cuBLAS: its one large GEMV already streams about as fast as the best compiled product
    (the profile in BENCHMARKS.md)."""
    return use_split_kv_attention(llm).compile_blocks(options=DECODE_OPTIONS)


@torch.library.custom_op("llava::split_kv_attention", mutates_args=())
def split_kv_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """decode_attention.split_kv_attention as an operator torch.compile calls as it is (it does not trace Triton
    launches) and a CUDA graph records like any other kernel."""
    return decode_attention.split_kv_attention(q, k, v, keep)


@split_kv_attention_op.register_fake
def _(q, k, v, keep):
    return q.new_empty(q.shape)  # (B, H, 1, D)


def decode_sdpa(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False):
    """F.scaled_dot_product_attention, except that a decode step (one query per row, a boolean mask over the cache
    slots) in bf16 / fp16 on a GPU with Triton goes to the split-KV kernels (extras/decode_attention.py)."""
    D = q.shape[-1]
    if (decode_attention.triton is not None and q.is_cuda and q.shape[2] == 1 and D >= 16 and D & (D - 1) == 0
            and q.dtype in (torch.bfloat16, torch.float16) and k.dtype == q.dtype and attn_mask is not None
            and attn_mask.dtype == torch.bool and attn_mask.dim() == 4 and attn_mask.shape[1:3] == (1, 1)):
        return torch.ops.llava.split_kv_attention(q, k, v, attn_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa)


def use_split_kv_attention(llm):
    """Every attention layer of llm calls decode_sdpa instead of F.scaled_dot_product_attention; returns llm.

    In a batch-1 decode step with a 1,024-slot cache, SDPA's kernels give the 32 query heads (or their 8 K/V heads)
    a program each, and most of the GPU waits; the split-KV kernels spread the slots over it (BENCHMARKS.md
    profiles both). Prefill, training and the CPU keep SDPA, and so do GPUs older than Ampere, where Triton's bf16
    products do not run. eval_mmbench.py keeps SDPA too: at batch 32 its rows already fill the GPU."""
    device = llm.norm.weight.device
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return llm
    for layer in llm.layers:
        layer.self_attn.sdpa = decode_sdpa
    return llm


class GraphedDecodeStep:
    """decode_step replayed from a CUDA graph: `generate(..., step_fn=GraphedDecodeStep())` on a GPU.

    An eager decode step of an 8B Llama launches about a thousand small kernels and the GPU waits on Python between
    them; a graph launches them all at once, so a step costs about its kernels' own time (BENCHMARKS.md compares the
    two). After `llm.compile_blocks()` the graph replays the compiled blocks, whose fused kernels are fewer still.
    The graph is captured on the first call and again whenever the KV cache was rebuilt (another batch or length):
    it reads and writes the cache buffers it was captured on, and its inputs are copied into its own static tensors
    before each replay. It also reads the weights it was captured on: after fuse_projections, use a new
    GraphedDecodeStep."""

    def __init__(self):
        self.graph, self.key = None, None

    def __call__(self, llm, token, position, cache_pos, key_valid):
        args = (token, position, cache_pos, key_valid)
        key = (llm.layers[0].self_attn.cache.k.data_ptr(), tuple(key_valid.shape))
        if key != self.key:
            self.inputs = [a.clone() for a in args]
            side = torch.cuda.Stream()  # warm up off the capture (cuBLAS and SDPA pick their kernels here)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # writes this step's keys/values into their slot: the replay rewrites the same
                    model.decode_step(llm, *self.inputs)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = model.decode_step(llm, *self.inputs)  # (B, V), rewritten by every replay
            self.key = key
        for buf, a in zip(self.inputs, args):
            buf.copy_(a)
        self.graph.replay()
        return self.logits
