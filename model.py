"""LLaVA: a CLIP vision tower, a two-layer MLP projector, and a Llama decoder, glued at the image positions.

    pixels (N, 3, 336, 336) --CLIP, penultimate layer, CLS dropped--> (N, 576, 1024)
                            --projector: Linear, GELU, Linear------> (N, 576, 4096)
    input_ids (B, T) holding 576 x IMAGE_TOKEN_INDEX per image  --embed, then splice the image features in-->
    inputs_embeds (B, T, 4096) --Llama--> hidden (B, T, 4096) --lm_head over supervised positions--> loss

References: Liu et al., "Visual Instruction Tuning" (LLaVA, 2023) and "Improved Baselines with Visual Instruction
Tuning" (LLaVA-1.5, the mlp2x_gelu projector); HF transformers `modeling_llava.py` for the layout of the exported
folder; XTuner `xtuner/model/llava.py` for the training recipe we reproduce.

This file also holds generation: prefill, then one token at a time from the KV cache; greedy or sampled; left-padded
batches. Loading and saving whole models (every folder layout) is extras/loader.py.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tokenizer import IGNORE_INDEX, IMAGE_TOKEN_INDEX


class Projector(nn.Module):
    """LLaVA-1.5's `mlp2x_gelu`: vision width -> LLM width, exact (erf) GELU, LLM width -> LLM width."""

    def __init__(self, vision_dim, llm_dim, hidden_dim=None):
        super().__init__()
        hidden_dim = hidden_dim or llm_dim
        self.linear_1 = nn.Linear(vision_dim, hidden_dim, bias=True)
        self.linear_2 = nn.Linear(hidden_dim, llm_dim, bias=True)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(x)))  # approximate="none": the erf GELU, as HF's "gelu"


class LLaVA(nn.Module):
    """vision and projector may both be None: a text-only model (an LLM fine-tuned alone, `train.py --stage sft`),
    which trains, generates and saves through the same code, with no image ever spliced in."""

    def __init__(self, vision, projector, llm, select_layer=-2):
        super().__init__()
        self.vision, self.projector, self.llm = vision, projector, llm
        self.select_layer = select_layer  # -2: the penultimate CLIP layer, as LLaVA-1.5 and XTuner use
        self.loss_chunk = 512             # supervised positions per lm_head chunk (chunked_cross_entropy)

    def encode_images(self, pixel_values):
        """(N, 3, S, S) -> (N, P, C_llm). A frozen tower builds no graph by itself: none of its inputs or
        weights require a gradient, so autograd records nothing until the projector."""
        feats = self.vision(pixel_values.to(self.vision.embeddings.patch_embedding.weight.dtype),
                            select_layer=self.select_layer)                              # (N, P, C_vis)
        return self.projector(feats.to(self.projector.linear_1.weight.dtype))            # (N, P, C_llm)

    def embed(self, input_ids, pixel_values=None):
        """Token embeddings with the image features written over the image positions, in order. input_ids (B, T)
        holds IMAGE_TOKEN_INDEX at every image position (P per image, images in reading order); data.collate has
        already checked that the counts agree with pixel_values."""
        is_image = input_ids == IMAGE_TOKEN_INDEX
        embeds = self.llm.embed(input_ids.clamp(min=0))  # (B, T, C); image positions embed id 0 for now
        if pixel_values is not None and pixel_values.shape[0] > 0:
            feats = self.encode_images(pixel_values)            # (N, P, C)
            embeds = embeds.masked_scatter(is_image.unsqueeze(-1), feats.to(embeds.dtype))  # one vectorised splice
        return embeds

    def forward(self, input_ids, labels, pixel_values=None, position_ids=None, segment_ids=None):
        """Summed next-token cross-entropy over the supervised positions, and their count. Returning the sum (not the
        mean) lets train.py divide by the token count of the whole optimizer step (see train.py's docstring). Packed
        rows (extras/packing.py) also give position_ids and segment_ids (B, T): each sample then restarts its RoPE
        positions at 0 and attends only to itself (Llama.forward)."""
        hidden = self.llm(inputs_embeds=self.embed(input_ids, pixel_values), positions=position_ids,
                          segment_ids=segment_ids)  # (B, T, C)
        return chunked_cross_entropy(hidden, labels, self.llm.lm_head, self.loss_chunk)

    @torch.no_grad()
    def logits(self, input_ids, pixel_values=None):
        """Full logits (B, T, V): for tests and probes only (training never materialises them)."""
        return self.llm.lm_head(self.llm(inputs_embeds=self.embed(input_ids, pixel_values))).float()


def chunked_cross_entropy(hidden, labels, lm_head, chunk=512):
    """Sum of CE over supervised positions, computed on `chunk` positions at a time. Only positions whose *next*
    label is supervised reach the lm_head (a pretrain sample supervises ~40 of 640 positions). A chunk's logits are
    recomputed in backward, never stored; its backward holds ~13 bytes per logit (16-bit logits, fp32 log-softmax,
    two gradients): 0.85 GB at 512 x 128,256, and 512 rows keep the GEMM efficient."""
    targets = labels[:, 1:]                        # (B, T-1): position t predicts token t+1
    keep = targets != IGNORE_INDEX
    h = hidden[:, :-1][keep]                       # (N, C) supervised positions only
    y = targets[keep]                              # (N,)
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, h.shape[0], chunk):
        hi, yi = h[i:i + chunk], y[i:i + chunk]
        if torch.is_grad_enabled():
            total = total + checkpoint(_ce_sum, hi, yi, lm_head.weight, use_reentrant=False)
        else:
            total = total + _ce_sum(hi, yi, lm_head.weight)
    return total, keep.sum()


def _ce_sum(h, y, weight):
    return F.cross_entropy(F.linear(h, weight).float(), y, reduction="sum")


# ----------------------------------------------------------------------------------------------------------------
# Generation


def sample(logits, temperature=0.0, top_k=0, top_p=1.0, generator=None):
    """Next token ids (B,) from logits (B, V): greedy at temperature 0, else temperature / top-k / top-p sampling
    (the order HF applies them: scale, keep the k best, keep the smallest set whose probability reaches p)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens strictly before it already reach top_p (the best token always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def decode_step(llm, token, position, cache_pos, key_valid):
    """One decode step for every row: token (B,), position (B,), cache_pos (1,) -> logits (B, V).
    Static shapes and no Python branches on data, so `torch.compile(decode_step)` captures it whole."""
    h = llm(input_ids=token[:, None], positions=position[:, None], cache_pos=cache_pos, key_valid=key_valid)
    return llm.lm_head(h[:, -1]).float()


def to_host(tokens):
    """tokens on the host, and None; from a GPU, a copy queued like a kernel, and the event that says it is done."""
    if not tokens.is_cuda:
        return tokens, None
    return tokens.to("cpu", non_blocking=True), torch.cuda.current_stream(tokens.device).record_event()


def cache_size(llm):
    cache = llm.layers[0].self_attn.cache
    return 0 if cache is None else cache.k.shape[2]


@torch.no_grad()
def generate(model, prompts, pixel_values=None, max_new_tokens=256, temperature=0.0, top_k=0, top_p=1.0,
             stop_ids=(), on_token=None, cache_offset=0, max_cache_len=None, step_fn=None, generator=None,
             sync_every=1):
    """Generate continuations of a batch of prompts with the KV cache.
    prompts: list of id lists (image positions as IMAGE_TOKEN_INDEX runs); rows are left-padded to a common length,
    so every row's last prompt token sits in the same cache slot and one decode step serves them all.
    cache_offset > 0 continues a conversation (batch of one) whose first `cache_offset` tokens are already in the
    cache (which grows, history kept, when this turn does not fit). The cache has max(need, max_cache_len) slots:
    every decode step attends over all of them, so a cache far longer than the conversation costs time; a fixed
    length reuses buffers and a captured graph across calls. Returns the new tokens of each row; a row stops at its
    first stop id (kept in its list) or after max_new_tokens. The last token of each row is not fed back, so a
    follow-up turn starts with it.
    on_token(row, token_id) is called as tokens are produced (for streaming). sync_every=k: the host hears of new
    tokens (and stops) k steps at a time, the first token at once; on a GPU it queues the next step before it waits
    (to_host), so the GPU computes while Python streams. The tokens are the same for any k; up to k steps may run
    after every row stopped (their tokens are dropped, their cache slots lie past what the next turn keeps)."""
    llm, device = model.llm, model.llm.norm.weight.device
    B, T = len(prompts), max(len(p) for p in prompts)
    if cache_offset and B != 1:
        raise ValueError("continuing from a cache is for a single conversation (batch of one)")
    need = cache_offset + T + max_new_tokens
    cache_len = max(need, max_cache_len or 0)
    if cache_offset and cache_size(llm) < need:
        llm.grow_cache(cache_len)  # the conversation outgrew its cache: a longer one with the same history
    if cache_offset == 0:
        cache = llm.layers[0].self_attn.cache
        if cache is not None and tuple(cache.k.shape[::2]) == (B, cache_len):
            llm.reset_cache()  # same shape: reuse the buffers (a CUDA graph captured on them stays valid)
        else:
            llm.setup_cache(B, cache_len, dtype=llm.embed_tokens.weight.dtype, device=device)

    ids = torch.tensor([[0] * (T - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)  # left-padded
    valid = torch.tensor([[False] * (T - len(p)) + [True] * len(p) for p in prompts], device=device)
    key_valid = torch.zeros(B, cache_size(llm), dtype=torch.bool, device=device)
    key_valid[:, :cache_offset] = True
    key_valid[:, cache_offset:cache_offset + T] = valid
    # rope positions count real tokens only, so a left-padded row is positioned exactly as if it were alone
    positions = cache_offset + (valid.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)

    h = llm(inputs_embeds=model.embed(ids, pixel_values), positions=positions,
            cache_pos=torch.arange(cache_offset, cache_offset + T, device=device), key_valid=key_valid)
    logits = llm.lm_head(h[:, -1]).float()   # (B, V)

    stops, finished, out = set(stop_ids), [False] * B, [[] for _ in range(B)]
    pending = []  # tokens (B,) sampled since the last sync, still on the device

    def read(tokens):  # (k, B) tokens on the host: streamed, stops noted; True once every row has stopped
        for step_tokens in tokens.tolist():
            for i, t in enumerate(step_tokens):
                if not finished[i]:
                    out[i].append(t)
                    if on_token is not None:
                        on_token(i, t)
                    finished[i] = t in stops
        return all(finished)

    pos, slot = positions[:, -1], cache_offset + T
    cache_pos = torch.full((1,), slot, device=device)  # advanced on the device: a host tensor per step would sync
    for n in range(max_new_tokens):
        token = sample(logits, temperature, top_k, top_p, generator)  # (B,)
        pending.append(token)
        last = n == max_new_tokens - 1
        sync = n % sync_every == 0 or last  # the first token at once (time to first token), then every k
        if sync:  # the one host sync of these k steps
            (tokens, copied), pending = to_host(torch.stack(pending)), []
            if copied is None and (read(tokens) or last):
                break
        if not last:
            key_valid[:, slot] = True
            pos = pos + 1
            logits = (step_fn or decode_step)(llm, token, pos, cache_pos, key_valid)
            slot, cache_pos = slot + 1, cache_pos + 1
        if sync and copied is not None:  # the next step is queued: now wait for the copy
            copied.synchronize()
            if read(tokens) or last:
                break
    return out


# ----------------------------------------------------------------------------------------------------------------
# LoRA targets: every linear of a decoder block, every linear of a CLIP layer (XTuner's find_all_linear_names)

LLM_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VISION_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
