"""LLaVA: a CLIP vision tower, a two-layer MLP projector, and a Llama decoder, glued at the image positions.

    pixels (N, 3, 336, 336) --CLIP, penultimate layer, CLS dropped--> (N, 576, 1024)
                            --projector: Linear, GELU, Linear------> (N, 576, 4096)
    input_ids (B, T) holding 576 x IMAGE_TOKEN_INDEX per image  --embed, then splice the image features in-->
    inputs_embeds (B, T, 4096) --Llama--> hidden (B, T, 4096) --lm_head over supervised positions--> loss

References: Liu et al., "Visual Instruction Tuning" (LLaVA, 2023) and "Improved Baselines with Visual Instruction
Tuning" (LLaVA-1.5, the mlp2x_gelu projector); HF transformers `modeling_llava.py` for the layout of the exported
folder; XTuner `xtuner/model/llava.py` for the training recipe we reproduce.

This file also holds generation (prefill, then one token at a time from the KV cache; greedy or sampled; left-padded
batches) and the run folder `model/` that training writes and chat / eval / convert read (SPEC §6).
"""

import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import clip
import llama
import lora
from tokenizer import load_tokenizer
from weights import CheckpointReader, load_with_table, read_json, save_safetensors, write_json

IMAGE_TOKEN_INDEX = -200  # XTuner's (and LLaVA's) placeholder id for an image position; never a vocabulary id
IGNORE_INDEX = -100       # label of a position that is not supervised (F.cross_entropy's default ignore_index)


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
        self.loss_chunk = 4096            # supervised positions per lm_head chunk (bounds the fp32 logits' memory)

    # ---- images ------------------------------------------------------------------------------------------------

    def encode_images(self, pixel_values):
        """(N, 3, S, S) -> (N, P, C_llm). A vision tower with nothing to train runs without a graph: there is no
        gradient to compute through it (XTuner builds one anyway; SPEC §3)."""
        vision_trains = self.training and any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and vision_trains):
            dtype = self.vision.embeddings.patch_embedding.weight.dtype
            feats = self.vision(pixel_values.to(dtype), select_layer=self.select_layer)  # (N, P, C_vis)
        return self.projector(feats.to(self.projector.linear_1.weight.dtype))            # (N, P, C_llm)

    def embed(self, input_ids, pixel_values=None):
        """Token embeddings with the image features written over the image positions, in order.

        input_ids (B, T) holds IMAGE_TOKEN_INDEX at every image position (P per image, images in reading order);
        the batch builder (data.collate) has already checked that the counts agree with pixel_values.
        """
        is_image = input_ids == IMAGE_TOKEN_INDEX
        embeds = self.llm.embed_tokens(input_ids.clamp(min=0))  # (B, T, C); image positions embed id 0, then are overwritten
        if pixel_values is not None and pixel_values.shape[0] > 0:
            feats = self.encode_images(pixel_values)            # (N, P, C)
            embeds = embeds.masked_scatter(is_image.unsqueeze(-1), feats.to(embeds.dtype))  # one vectorised splice
        return embeds

    # ---- training ----------------------------------------------------------------------------------------------

    def forward(self, input_ids, labels, pixel_values=None, position_ids=None, segment_ids=None):
        """Summed next-token cross-entropy over the supervised positions, and their count.

        Returning the sum (not the mean) lets train.py divide by the token count of the whole optimizer step, so
        every supervised token weighs the same whatever the micro-batch and accumulation split (SPEC §3).
        Packed rows (data.collate_packed) also give position_ids and segment_ids (B, T): each sample then restarts
        its RoPE positions at 0 and attends only to itself (Llama.forward)."""
        hidden = self.llm(inputs_embeds=self.embed(input_ids, pixel_values), positions=position_ids,
                          segment_ids=segment_ids)  # (B, T, C)
        return chunked_cross_entropy(hidden, labels, self.llm.lm_head, self.loss_chunk)

    @torch.no_grad()
    def logits(self, input_ids, pixel_values=None):
        """Full logits (B, T, V): for tests and probes only (training never materialises them)."""
        return self.llm.lm_head(self.llm(inputs_embeds=self.embed(input_ids, pixel_values))).float()


def chunked_cross_entropy(hidden, labels, lm_head, chunk=4096):
    """Sum of CE over supervised positions, computed on `chunk` positions at a time.

    Only positions whose *next* label is supervised reach the lm_head (a pretrain sample supervises ~40 of 640
    positions), and each chunk's fp32 logits (chunk x 128,256 x 4 bytes = 2 GB at 4096) are recomputed in backward
    instead of stored, so the full (B, T, 128k) fp32 logits of a long batch never exist."""
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
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def decode_step(llm, token, position, cache_pos, key_valid):
    """One decode step for every row: token (B,), position (B,), cache_pos (1,) -> logits (B, V).
    Static shapes and no Python branches on data, so `torch.compile(decode_step)` captures it whole."""
    h = llm(input_ids=token[:, None], positions=position[:, None], cache_pos=cache_pos, key_valid=key_valid)
    return llm.lm_head(h[:, -1]).float()


class GraphedDecodeStep:
    """decode_step replayed from a CUDA graph: `generate(..., step_fn=GraphedDecodeStep())` on a GPU.

    An eager decode step of an 8B Llama launches about a thousand small kernels and the GPU waits on Python between
    them; a graph launches them all at once, so a step costs about its kernels' own time (batch 1 on an H100: 30
    tok/s eager, 100 tok/s replayed; bench/chat_bench.py). After `llm.compile_blocks()` the graph replays the
    compiled blocks, whose fused kernels are fewer still. The graph is captured on the first call and again
    whenever the KV cache was rebuilt (another batch or length): it reads and writes the cache buffers it was
    captured on, and its inputs are copied into its own static tensors before each replay. It also reads the
    weights it was captured on: after `llm.fuse_projections()`, use a new GraphedDecodeStep."""

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
                    decode_step(llm, *self.inputs)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = decode_step(llm, *self.inputs)  # (B, V), rewritten by every replay
            self.key = key
        for buf, a in zip(self.inputs, args):
            buf.copy_(a)
        self.graph.replay()
        return self.logits


def cache_size(llm):
    cache = llm.layers[0].self_attn.cache
    return 0 if cache is None else cache.k.shape[2]


@torch.no_grad()
def generate(model, prompts, pixel_values=None, max_new_tokens=256, temperature=0.0, top_k=0, top_p=1.0,
             stop_ids=(), on_token=None, cache_offset=0, max_cache_len=None, step_fn=None, generator=None,
             sync_every=1):
    """Generate continuations of a batch of prompts with the KV cache.

    prompts: list of id lists (image positions as IMAGE_TOKEN_INDEX runs); rows are left-padded to a common
    length, so every row's last prompt token sits in the same cache slot and one decode step serves them all.
    cache_offset > 0 continues a conversation (batch of one) whose first `cache_offset` tokens are already in the
    cache. Returns the new tokens of each row; a row stops at its first stop id (kept in its list) or after
    max_new_tokens. The last token of each row is not fed back, so a follow-up turn starts with it.
    on_token(row, token_id) is called as tokens are produced (for streaming).
    sync_every: decode steps between trips of the new tokens to the host. At 1 each token is streamed as soon as it
    exists, but the GPU idles while Python looks at it; at k the host queues k steps back to back and hears of
    their tokens (and of stop tokens) together. The tokens returned are the same; up to k - 1 steps may be computed
    after every row stopped (their tokens are dropped, and their cache slots lie past what the next turn keeps).
    """
    llm = model.llm
    device = llm.embed_tokens.weight.device
    B, T = len(prompts), max(len(p) for p in prompts)
    if cache_offset and B != 1:
        raise ValueError("continuing from a cache is for a single conversation (batch of one)")
    need = cache_offset + T + max_new_tokens
    cache_len = max(need, max_cache_len or 0)
    if cache_offset and cache_size(llm) < need:
        raise ValueError(f"the KV cache holds {cache_size(llm)} positions, {need} are needed")
    if cache_offset == 0:
        cache = llm.layers[0].self_attn.cache
        if cache is not None and tuple(cache.k.shape[::2]) == (B, cache_len):
            llm.reset_cache()  # same shape: reuse the buffers (a GraphedDecodeStep captured on them stays valid)
        else:
            llm.setup_cache(B, cache_len, dtype=llm.embed_tokens.weight.dtype, device=device)
    S = cache_size(llm)

    ids = torch.zeros(B, T, dtype=torch.long)
    valid = torch.zeros(B, T, dtype=torch.bool)
    for i, p in enumerate(prompts):  # left padding, built on the host and copied once
        ids[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
        valid[i, T - len(p):] = True
    ids, valid = ids.to(device), valid.to(device)
    key_valid = torch.zeros(B, S, dtype=torch.bool, device=device)
    key_valid[:, :cache_offset] = True
    key_valid[:, cache_offset:cache_offset + T] = valid
    # rope positions count real tokens only, so a left-padded row is positioned exactly as if it were alone
    positions = cache_offset + (valid.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)

    embeds = model.embed(ids, pixel_values)  # (B, T, C)
    h = llm(inputs_embeds=embeds, positions=positions,
            cache_pos=torch.arange(cache_offset, cache_offset + T, device=device), key_valid=key_valid)
    logits = llm.lm_head(h[:, -1]).float()   # (B, V)

    step = step_fn or decode_step
    stops = set(stop_ids)
    finished = [False] * B
    out = [[] for _ in range(B)]
    pending = []  # tokens (B,) sampled since the last sync, still on the device
    pos = positions[:, -1]
    slot = cache_offset + T
    cache_pos = torch.full((1,), slot, device=device)  # advanced on the device: a host tensor per step would sync
    for n in range(max_new_tokens):
        token = sample(logits, temperature, top_k, top_p, generator)  # (B,)
        pending.append(token)
        last = n == max_new_tokens - 1
        if n % sync_every == 0 or last:  # the first token at once (time to first token), then every sync_every
            for step_tokens in torch.stack(pending).tolist():  # (k, B): the one host sync of these k steps
                for i, t in enumerate(step_tokens):
                    if not finished[i]:
                        out[i].append(t)
                        if on_token is not None:
                            on_token(i, t)
                        finished[i] = t in stops
            pending = []
            if all(finished) or last:
                break
        key_valid[:, slot] = True
        pos = pos + 1
        logits = step(llm, token, pos, cache_pos, key_valid)
        slot += 1
        cache_pos = cache_pos + 1
    return out


# ----------------------------------------------------------------------------------------------------------------
# The run folder: model/ = llava.json + projector.safetensors + adapters or a full LLM (SPEC §6)

LLM_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VISION_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
          "float16": torch.float16, "fp16": torch.float16}


def save_model(model, folder, cfg):
    """Write the trainable part of `model` and the config that names everything else.

    cfg (llava.json) names the base LLM and vision folders, template, select layer, image mode and size, projector
    sizes, the LLM mode (frozen | frozen-nf4 | full | lora | qlora) with its LoRA settings, and the vision LoRA."""
    if model.llm.fused:
        raise ValueError("save_model: the LLM's projections were fused for inference (Llama.fuse_projections); "
                         "save the model before fusing it")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if model.projector is not None:  # a text-only model (cfg "vision": None) has none
        save_safetensors(model.projector.state_dict(), folder, basename="projector")
    to_llm_hf, _ = lora.hf_name_mapper(llama.HF_KEYS)
    to_vis_hf, _ = lora.hf_name_mapper(clip.HF_KEYS)
    if cfg.get("llm_lora"):
        c = cfg["llm_lora"]
        lora.save_adapter(model.llm, folder / "llm_adapter", to_llm_hf, c["r"], c["alpha"], c["dropout"],
                          c["targets"], task_type="CAUSAL_LM", base_model=cfg["llm"])
    if cfg.get("llm_mode") == "full":
        llama.save_llama(model.llm, folder / "llm", dtype=DTYPES[cfg.get("dtype", "bfloat16")])
        _copy_tokenizer(cfg["llm"], folder / "llm")
    if cfg.get("vision_lora"):
        c = cfg["vision_lora"]
        lora.save_adapter(model.vision, folder / "vision_adapter", to_vis_hf, c["r"], c["alpha"], c["dropout"],
                          c["targets"], base_model=cfg["vision"])
    write_json(folder / "llava.json", cfg)


def _copy_tokenizer(src, dst):
    import shutil
    src, dst = Path(src), Path(dst)
    for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                 "generation_config.json", "original/tokenizer.model"]:
        if (src / name).exists():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / name, dst / name)


def build_model(cfg, dtype=torch.bfloat16, device="cpu", llm_path=None):
    """Base CLIP + base (or finetuned) Llama + a fresh projector, as llava.json describes them (no adapters yet);
    the Llama alone when cfg["vision"] is None (a text-only run)."""
    llm = llama.load_llama(llm_path or cfg["llm"], dtype=dtype, device=device)
    if cfg.get("vision") is None:
        return LLaVA(None, None, llm)
    vision = clip.load_clip(cfg["vision"], dtype=dtype, device=device)
    p = cfg["projector"]
    projector = Projector(p["in"], p["out"], p["hidden"]).to(device=device, dtype=dtype)
    return LLaVA(vision, projector, llm, cfg.get("select_layer", -2))


def latest_model_dir(runs="runs"):
    link = Path(runs) / "latest"
    if not link.exists():
        raise FileNotFoundError(
            f"no trained model found at {link}. Train one first (e.g. `make demo`, or `python train.py @recipes/...`), "
            f"or pass --model DIR (a run's model/ folder, an HF LLaVA folder, or an XTuner / official LLaVA export).")
    return link.resolve()


def load_model(folder=None, dtype=torch.bfloat16, device="cpu"):
    """Load a trained LLaVA for inference: (model, tokenizer, cfg). `folder` defaults to runs/latest.

    Reads our run folder (llava.json), the HF transformers LLaVA folder and a plain LLM folder (Llama or InternLM2:
    a text-only model, e.g. `convert.py --to llm`'s merged output, whose cfg names no template); convert.py reads the
    other layouts."""
    folder = Path(folder) if folder else latest_model_dir()
    if (folder / "model" / "llava.json").exists():  # a run folder was given instead of its model/
        folder = folder / "model"
    if (folder / "llava.json").exists():
        return _load_run_model(folder, dtype, device)
    kind = read_json(folder / "config.json").get("model_type") if (folder / "config.json").exists() else None
    if kind == "llava":
        return load_hf_llava(folder, dtype, device)
    if kind in LLM_MODEL_TYPES and not (folder / "projector").is_dir():  # (XTuner puts a full LLM next to one)
        return load_llm(folder, dtype, device)
    import convert  # XTuner and official LLaVA layouts
    return convert.load_any(folder, dtype=dtype, device=device)


def _load_run_model(folder, dtype, device):
    cfg = read_json(folder / "llava.json")
    full = cfg.get("llm_mode") == "full"
    model = build_model(cfg, dtype, device, llm_path=folder / "llm" if full else None)
    if model.projector is not None:
        load_with_table(model.projector, CheckpointReader(folder / "projector.safetensors"), PROJECTOR_KEYS, dtype)
    if cfg.get("llm_lora"):
        c = cfg["llm_lora"]
        lora.inject_lora(model.llm, c["targets"], c["r"], c["alpha"], 0.0, nf4=cfg.get("llm_mode") == "qlora")
        lora.load_adapter(model.llm, folder / "llm_adapter", lora.hf_name_mapper(llama.HF_KEYS)[0])
    elif cfg.get("llm_mode") == "frozen-nf4":
        lora.quantize_nf4(model.llm, LLM_LORA_TARGETS)
    if cfg.get("vision_lora"):
        c = cfg["vision_lora"]
        lora.inject_lora(model.vision, c["targets"], c["r"], c["alpha"], 0.0)
        lora.load_adapter(model.vision, folder / "vision_adapter", lora.hf_name_mapper(clip.HF_KEYS)[0])
    model.to(device).eval()
    tok = load_tokenizer(folder / "llm" if full else cfg["llm"])
    return model, tok, cfg


LLM_MODEL_TYPES = ("llama", "internlm2")  # config.json model_type of the LLM folders llama.load_llama reads


def load_llm(folder, dtype=torch.bfloat16, device="cpu"):
    """A plain LLM folder as a text-only model: (LLaVA with no vision, tokenizer, cfg). The folder does not say
    which chat template it was trained with, so cfg["template"] is None: the caller must be told (chat.py
    --template), never guess."""
    llm = llama.load_llama(folder, dtype=dtype, device=device)
    cfg = {"llm": str(folder), "vision": None, "template": None, "llm_mode": "full", "llm_lora": None,
           "vision_lora": None, "image_tokens": 0}
    return LLaVA(None, None, llm).eval(), load_tokenizer(folder), cfg


# projector.safetensors holds our own names (the key table is the identity)
PROJECTOR_KEYS = {f"linear_{i}.{p}": f"linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}


# ---- the HF transformers LlavaForConditionalGeneration folder ------------------------------------------------------


def hf_llava_keys(new_layout=False, vision_table=clip.HF_KEYS):
    """Key table of an HF LLaVA folder. `save_pretrained` writes the pre-4.52 layout (`language_model.model.*`,
    `vision_tower.*`); transformers >= 4.52 holds `model.language_model.*` in memory and some repos store that.
    Inside the tower, checkpoints written by transformers < 5.23 say `vision_model.*`, newer ones drop that level
    (`vision_table=clip.HF_KEYS_UNPREFIXED`); we write the older spelling, which every version reads."""
    if new_layout:
        text = {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v
                for k, v in llama.HF_KEYS.items()}
        vis, proj = "model.vision_tower.", "model.multi_modal_projector."
    else:
        text = {"language_model." + k: v for k, v in llama.HF_KEYS.items()}
        vis, proj = "vision_tower.", "multi_modal_projector."
    table = {k: (None if v is None else "llm." + v) for k, v in text.items()}
    table.update({vis + k: (None if v is None else "vision." + v) for k, v in vision_table.items()})
    for i in (1, 2):
        for p in ("weight", "bias"):
            table[f"{proj}linear_{i}.{p}"] = f"projector.linear_{i}.{p}"
    return table


def load_hf_llava(folder, dtype=torch.bfloat16, device="cpu"):
    folder = Path(folder)
    hf = read_json(folder / "config.json")
    vcfg = clip.CLIPConfig.from_hf_config(hf["vision_config"])
    tcfg = llama.LlamaConfig.from_hf_config(hf["text_config"])
    select = hf.get("vision_feature_layer", -2)
    if hf.get("vision_feature_select_strategy", "default") != "default":
        raise ValueError(f"{folder}: vision_feature_select_strategy {hf['vision_feature_select_strategy']!r} is not "
                         "supported (LLaVA-1.5 drops CLS: 'default')")
    with torch.device("meta"):
        model = LLaVA(clip.CLIPVisionTower(vcfg), Projector(vcfg.hidden_size, tcfg.hidden_size),
                      llama.Llama(tcfg), select)
    reader = CheckpointReader(folder)
    keys = reader.keys()
    new = any(k.startswith("model.language_model.") for k in keys)
    vis = "model.vision_tower." if new else "vision_tower."
    vision_table = clip.table_for([k[len(vis):] for k in keys if k.startswith(vis)])
    table = hf_llava_keys(new, vision_table)
    if tcfg.tie_word_embeddings:  # one shared matrix, stored as the embedding (as llama.load_llama does)
        del model.llm.lm_head.weight
        table = {k: (None if v == "llm.lm_head.weight" else v) for k, v in table.items()}
    load_with_table(model, reader, table, dtype=dtype, device=device)
    if tcfg.tie_word_embeddings:
        model.llm.lm_head.weight = model.llm.embed_tokens.weight
    model.llm.init_rope(device)
    model.eval()
    tok = load_tokenizer(folder)
    cfg = {"layout": "hf", "template": "llama3_chat", "select_layer": select, "image_mode": "pad",
           "image_size": vcfg.image_size, "image_tokens": vcfg.num_patches,
           "image_token_index": hf.get("image_token_index")}
    return model, tok, cfg
