"""InternLM2 checkpoints (`InternLM2ForCausalLM`, e.g. internlm/internlm2-chat-1_8b) for llama.py's decoder.

InternLM2 is the Llama decoder (RMSNorm, rotate-half RoPE, GQA, SwiGLU, no biases) under other names, with q, k and
v packed into one matrix `wqkv`. `LlamaConfig.from_hf_config` sets layout="internlm2" from the config's
`model_type`; `load_internlm2` reads such a checkpoint through the key table and the unpacking below, and
`save_internlm2` writes it back in the same layout, so a finetuned or merged InternLM2 is again an InternLM2 folder.
Module names stay ours (q_proj ... down_proj), so LoRA, training and generation need nothing special.

The rows of `wqkv` (out = (H + 2 Hkv) D), per KV group g = 0 .. Hkv-1, G = H / Hkv query heads per group:

    [ q heads gG .. gG+G-1 | k head g | v head g ]      each head D rows

which is how InternLM2's modeling_internlm2.py reads it: qkv.view(B, T, Hkv, G + 2, D), q = [..., :G, :] (query
head gG + j is then head number gG + j, served by KV head g, as in our GQA), k = [..., -2, :], v = [..., -1, :].
"""

import torch

import llama
import lora
import weights

INTERNLM2_KEYS = {
    "model.tok_embeddings.weight": "embed_tokens.weight",
    "model.norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
    "model.layers.{}.attention_norm.weight": "layers.{}.input_layernorm.weight",
    "model.layers.{}.ffn_norm.weight": "layers.{}.post_attention_layernorm.weight",
    # wq / wk / wv are the three parts of `attention.wqkv.weight` as InternLM2Reader presents them
    "model.layers.{}.attention.wq.weight": "layers.{}.self_attn.q_proj.weight",
    "model.layers.{}.attention.wk.weight": "layers.{}.self_attn.k_proj.weight",
    "model.layers.{}.attention.wv.weight": "layers.{}.self_attn.v_proj.weight",
    "model.layers.{}.attention.wo.weight": "layers.{}.self_attn.o_proj.weight",
    "model.layers.{}.feed_forward.w1.weight": "layers.{}.mlp.gate_proj.weight",  # w2(silu(w1 x) * w3 x)
    "model.layers.{}.feed_forward.w3.weight": "layers.{}.mlp.up_proj.weight",
    "model.layers.{}.feed_forward.w2.weight": "layers.{}.mlp.down_proj.weight",
    "model.layers.{}.attention.rotary_emb.inv_freq": None,  # a buffer some exports saved; we recompute it
}
WQKV_PARTS = ("wq", "wk", "wv")


def unpack_wqkv(wqkv, cfg):
    """(rows of wqkv, ...) -> q (H*D, ...), k (Hkv*D, ...), v (Hkv*D, ...); works for weights and LoRA B alike."""
    G, D = cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    w = wqkv.reshape(cfg.num_kv_heads, G + 2, D, *wqkv.shape[1:])  # (Hkv, G + 2, D, ...)
    return (w[:, :G].reshape(cfg.num_heads * D, *wqkv.shape[1:]),
            w[:, G].reshape(cfg.num_kv_heads * D, *wqkv.shape[1:]),
            w[:, G + 1].reshape(cfg.num_kv_heads * D, *wqkv.shape[1:]))


def pack_wqkv(q, k, v, cfg):
    """The inverse of unpack_wqkv: ((H + 2 Hkv) * D, ...) in InternLM2's grouped order."""
    G, D, Hkv, rest = cfg.num_heads // cfg.num_kv_heads, cfg.head_dim, cfg.num_kv_heads, q.shape[1:]
    parts = (q.reshape(Hkv, G, D, *rest), k.reshape(Hkv, 1, D, *rest), v.reshape(Hkv, 1, D, *rest))
    return torch.cat(parts, dim=1).reshape((cfg.num_heads + 2 * Hkv) * D, *rest)


class InternLM2Reader(weights.DictReader):
    """A lazy checkpoint view in which each `...attention.wqkv.weight` reads as three tensors `...attention.wq.weight`,
    `wk`, `wv`, so weights.load_with_table loads InternLM2 through a plain key table (with all its checks).
    (A DictReader subclass, so that weights.as_reader takes it as it is.)"""

    def __init__(self, src, cfg):
        self.reader, self.cfg = weights.as_reader(src), cfg
        self.path = getattr(self.reader, "path", "<state dict>")
        rows = [cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim]
        self.parts = {}  # virtual key -> (wqkv key, 0 | 1 | 2 for q | k | v, rows)
        for key in self.reader.keys():
            if key.endswith("attention.wqkv.weight"):
                if self.reader.shape(key)[0] != sum(rows):
                    raise weights.CheckpointError(
                        f"{self.path}: {key} has {self.reader.shape(key)[0]} rows, config.json says (heads "
                        f"{cfg.num_heads} + 2 x kv heads {cfg.num_kv_heads}) x head_dim {cfg.head_dim} = {sum(rows)}")
                for i, name in enumerate(WQKV_PARTS):
                    self.parts[key.replace("wqkv", name)] = (key, i, rows[i])
        self._last = (None, None)  # the last wqkv read: its three parts are asked for one after the other

    def keys(self):
        return [k for k in self.reader.keys() if not k.endswith("attention.wqkv.weight")] + list(self.parts)

    def __contains__(self, key):
        return key in self.parts or key in self.reader

    def shape(self, key):
        if key not in self.parts:
            return self.reader.shape(key)
        src, _, rows = self.parts[key]
        return (rows, *self.reader.shape(src)[1:])

    def get(self, key):
        if key not in self.parts:
            return self.reader.get(key)
        src, i, _ = self.parts[key]
        if self._last[0] != src:
            self._last = (src, unpack_wqkv(self.reader.get(src), self.cfg))
        return self._last[1][i].clone()  # a copy: the view would keep the whole wqkv alive

    def items(self):
        return ((k, self.get(k)) for k in self.keys())


def pack_internlm2_state(state, cfg):
    """An InternLM2-named state dict with wq / wk / wv (INTERNLM2_KEYS' names) -> the checkpoint's, with wqkv."""
    out = {}
    for key, t in state.items():
        if key.endswith("attention.wq.weight"):
            q, k, v = (state[key.replace(".wq.", f".{p}.")] for p in WQKV_PARTS)
            out[key.replace(".wq.", ".wqkv.")] = pack_wqkv(q, k, v, cfg)
        elif not key.endswith(("attention.wk.weight", "attention.wv.weight")):
            out[key] = t
    return out


def internlm2_hf_config(cfg):
    """config.json of an InternLM2ForCausalLM. transformers runs it with trust_remote_code, from the base model's
    configuration_internlm2.py and modeling_internlm2.py (copy them next to it; `auto_map` names them)."""
    scaling = None
    if cfg.rope_scaling:  # InternLM2's code reads the old spelling {"type": ..., "factor": ...}
        scaling = {"type": cfg.rope_scaling["rope_type"], "factor": cfg.rope_scaling["factor"]}
    return {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "hidden_act": "silu", "bias": False,
            "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                         "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                         "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
            "intermediate_size": cfg.intermediate_size, "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
            "rope_scaling": scaling, "max_position_embeddings": cfg.max_position_embeddings,
            "tie_word_embeddings": cfg.tie_word_embeddings, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def merge_internlm2_adapter(model, src, prefix="", config=None):
    """Merge an XTuner / PEFT LoRA adapter made for InternLM2 (targets `wqkv wo w1 w2 w3`, and `output`, the head
    XTuner's find_all_linear_names does not exclude) into the plain weights of `model`, in place.

    Our model has separate q/k/v projections while the adapter has one `wqkv` LoRA, whose update B @ A has wqkv's
    packed rows: it is unpacked exactly like the weight, then added to q_proj / k_proj / v_proj. Merging at load is
    exact and keeps one code path; to keep training such an adapter, train our own on q_proj ... instead.
    src: a PEFT folder, or a state dict (XTuner's .pth: pass prefix="llm." and config={"r", "lora_alpha"}).
    Returns the adapter's module names. Raises CheckpointError naming every key it cannot place.
    """
    where = "<state dict>" if isinstance(src, dict) else str(src)
    tensors, config = lora.read_adapter(src, config)
    config = config or {}
    unsupported = {k: config[k] for k in ("use_dora", "use_rslora", "fan_in_fan_out", "rank_pattern", "alpha_pattern")
                   if config.get(k)}
    if unsupported or "lora_alpha" not in config:
        raise weights.CheckpointError(f"adapter {where}: needs lora_alpha and no {unsupported or 'special options'}")
    pairs, problems = {}, []
    for key, t in tensors.items():
        m = lora.PEFT_KEY.match(key[len(prefix):]) if key.startswith(prefix) else None
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = t
        elif key.startswith(prefix):
            problems.append(f"{key}: not a LoRA A/B weight")
    params = dict(model.named_parameters())
    updates = []  # (our parameter name, update in fp32)
    for name, ab in sorted(pairs.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            problems.append(f"{name}: has {sorted(ab)}, needs lora_A and lora_B")
            continue
        delta = (config["lora_alpha"] / ab["lora_A"].shape[0]) * (ab["lora_B"].float() @ ab["lora_A"].float())
        try:  # the adapter's module path (HF InternLM2 names) -> our parameter
            if name.endswith("attention.wqkv"):
                ours = [weights.map_key(f"{name[:-4]}{p}.weight", INTERNLM2_KEYS) for p in WQKV_PARTS]
                updates += zip(ours, unpack_wqkv(delta, model.cfg))
            else:
                updates.append((weights.map_key(name + ".weight", INTERNLM2_KEYS), delta))
        except KeyError:
            problems.append(f"{name}: no such InternLM2 module")
    for ours, delta in updates:
        p = params.get(ours)
        if p is None or tuple(p.shape) != tuple(delta.shape) or not p.is_floating_point():
            problems.append(f"{ours}: update {list(delta.shape)} does not fit "
                            f"{'nothing' if p is None else f'{list(p.shape)} {p.dtype}'} (merge before quantizing)")
    if model.cfg.tie_word_embeddings and any(o == "lm_head.weight" for o, _ in updates):
        problems.append("output: the head is tied to the embeddings here; its update would change both")
    if problems:
        raise weights.CheckpointError(f"adapter {where} does not fit this InternLM2 model:\n  "
                                      + "\n  ".join(problems[:20]))
    with torch.no_grad():  # W + (alpha / r) B @ A, summed in fp32 (a bf16 sum would round small updates away)
        for ours, delta in updates:
            p = params[ours]
            p.copy_((p.float() + delta.to(p.device)).to(p.dtype))
    return sorted(pairs)


def load_internlm2(path, dtype=torch.bfloat16, device="cpu"):
    return llama.load_llama(path, dtype, device, table=INTERNLM2_KEYS, reader=InternLM2Reader)


def save_internlm2(model, folder, dtype=torch.bfloat16, max_shard_bytes=5_000_000_000):
    llama.save_llama(model, folder, dtype, max_shard_bytes, table=INTERNLM2_KEYS,
                     pack=lambda state: pack_internlm2_state(state, model.cfg), hf_config=internlm2_hf_config(model.cfg))


OUR_TO_INTERNLM2 = {"o_proj": "attention.wo", "gate_proj": "feed_forward.w1", "up_proj": "feed_forward.w3",
                    "down_proj": "feed_forward.w2"}


def to_internlm2_adapter(llm, r, alpha):
    """Our LoRA on an InternLM2 LLM (adapters on q/k/v/o/gate/up/down, rank r) as an adapter on InternLM2's own
    modules (`wqkv wo w1 w2 w3`), the form XTuner writes and merge_internlm2_adapter reads -> (tensors, r', alpha').

    Exact: wqkv's update must be q's, k's and v's updates in wqkv's packed row order. A rank-3r adapter holds that:
    its A stacks the three A's, its B puts each B in that projection's rows and its own r columns, then packs the
    rows like the weight. The other modules' adapters are padded to rank 3r with zeros (PEFT keeps one rank per
    file), and alpha is tripled so that alpha / r, the update's scale, is unchanged."""
    R = 3 * r
    tensors = {}
    for i, layer in enumerate(llm.layers):
        at = f"base_model.model.model.layers.{i}."
        attn, mlp = layer.self_attn, layer.mlp
        parts = [getattr(attn, n) for n in ("q_proj", "k_proj", "v_proj")]
        if any(getattr(p, "r", 0) for p in parts):
            A = torch.zeros(R, parts[0].in_features)
            Bs = []
            for j, p in enumerate(parts):
                B = torch.zeros(p.out_features, R)
                if getattr(p, "r", 0):
                    A[j * r:(j + 1) * r] = p.lora_A.weight.detach().float()
                    B[:, j * r:(j + 1) * r] = p.lora_B.weight.detach().float()
                Bs.append(B)
            tensors[at + "attention.wqkv.lora_A.weight"] = A
            tensors[at + "attention.wqkv.lora_B.weight"] = pack_wqkv(*Bs, llm.cfg)
        for ours, theirs in OUR_TO_INTERNLM2.items():
            m = getattr(attn if ours == "o_proj" else mlp, ours)
            if getattr(m, "r", 0):
                tensors[at + theirs + ".lora_A.weight"] = torch.cat(
                    [m.lora_A.weight.detach().float(), torch.zeros(R - r, m.in_features)])
                tensors[at + theirs + ".lora_B.weight"] = torch.cat(
                    [m.lora_B.weight.detach().float(), torch.zeros(m.out_features, R - r)], dim=1)
    return tensors, R, 3 * alpha
