"""InternLM2 as a second LLM family: its checkpoint layout, XTuner adapters on it, its chat tokens, packed samples,
and its text-only chat fine-tuning end to end (train packed, merge back into its own layout, chat).

References: transformers' LlamaForCausalLM (InternLM2 is this architecture; its logits are the reference), the
grouped `wqkv` layout as InternLM2's modeling_internlm2.py reads it (re-implemented here by hand, with loops, and
independently of llama.py), sentencepiece itself, and the internlm2_chat template of reference §3 (structure by hand).
"""
import json
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file

import data
from extras import datasets
import llama
from data import IGNORE_INDEX as IGN

from extras.tokenizer_files import SentencePieceTokenizer, load_tokenizer
from extras import internlm2, loader, packing

H, HKV, D = 6, 2, 16  # GQA with 3 query heads per KV head, so the grouping is visible
C = H * D


def hf_model(**overrides):
    kw = dict(vocab_size=300, hidden_size=C, num_hidden_layers=2, num_attention_heads=H, num_key_value_heads=HKV,
              intermediate_size=128, rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=256)
    kw.update(overrides)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
    with torch.no_grad():  # O(1) activations, so that a wrong row order shows in the logits
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return model


# ---- the InternLM2 layout, written here by hand from modeling_internlm2.py's description -------------------------
# qkv.view(B, T, Hkv, G + 2, D): per KV group g, G query heads (g*G .. g*G+G-1), then key head g, then value head g


def pack_by_hand(q, k, v):
    G = H // HKV
    rows = []
    for g in range(HKV):
        for j in range(G):
            rows.append(q[(g * G + j) * D:(g * G + j + 1) * D])
        rows.append(k[g * D:(g + 1) * D])
        rows.append(v[g * D:(g + 1) * D])
    return torch.cat(rows)


def unpack_by_hand(wqkv):
    G = H // HKV
    q, k, v = [], [], []
    for g in range(HKV):
        block = wqkv[g * (G + 2) * D:(g + 1) * (G + 2) * D]
        q += [block[j * D:(j + 1) * D] for j in range(G)]
        k.append(block[G * D:(G + 1) * D])
        v.append(block[(G + 1) * D:(G + 2) * D])
    return torch.cat(q), torch.cat(k), torch.cat(v)


def internlm2_checkpoint(hf):
    """An HF Llama state dict -> InternLM2's key names and packed wqkv."""
    sd = hf.state_dict()
    out = {"model.tok_embeddings.weight": sd["model.embed_tokens.weight"], "model.norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    for i in range(hf.config.num_hidden_layers):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        out[f"model.layers.{i}.attention.wqkv.weight"] = pack_by_hand(
            sd[a + "q_proj.weight"], sd[a + "k_proj.weight"], sd[a + "v_proj.weight"])
        out[f"model.layers.{i}.attention.wo.weight"] = sd[a + "o_proj.weight"]
        out[f"model.layers.{i}.feed_forward.w1.weight"] = sd[m + "gate_proj.weight"]
        out[f"model.layers.{i}.feed_forward.w3.weight"] = sd[m + "up_proj.weight"]
        out[f"model.layers.{i}.feed_forward.w2.weight"] = sd[m + "down_proj.weight"]
        out[f"model.layers.{i}.attention_norm.weight"] = sd[f"model.layers.{i}.input_layernorm.weight"]
        out[f"model.layers.{i}.ffn_norm.weight"] = sd[f"model.layers.{i}.post_attention_layernorm.weight"]
    return {k: v.contiguous().clone() for k, v in out.items()}


def internlm2_config(hf, rope_scaling=None):
    c = hf.config
    return {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": False,
            "hidden_act": "silu", "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
            "rms_norm_eps": c.rms_norm_eps, "rope_theta": 1e6, "rope_scaling": rope_scaling,
            "max_position_embeddings": c.max_position_embeddings, "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "auto_map": {}}


def write_internlm2(folder, hf, rope_scaling=None):
    folder.mkdir(parents=True, exist_ok=True)
    sd = internlm2_checkpoint(hf)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(internlm2_config(hf, rope_scaling)))
    return sd


IDS = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))


def logits(model, ids, **kw):
    with torch.no_grad():
        return model.lm_head(model(ids, **kw))


def test_packer_by_hand_is_the_documented_view():
    # the hand packer agrees with the rearrange InternLM2's attention does (guards the reference itself)
    q, k, v = torch.randn(H * D, 5), torch.randn(HKV * D, 5), torch.randn(HKV * D, 5)
    w = pack_by_hand(q, k, v).view(HKV, H // HKV + 2, D, 5)
    assert torch.equal(w[:, :H // HKV].reshape(H * D, 5), q)
    assert torch.equal(w[:, -2].reshape(HKV * D, 5), k) and torch.equal(w[:, -1].reshape(HKV * D, 5), v)


def test_load_internlm2_equals_transformers_llama(tmp_path):
    hf = hf_model()
    write_internlm2(tmp_path, hf, rope_scaling={"type": "dynamic", "factor": 2.0})
    ours = loader.load_llm(tmp_path, dtype=torch.float32)
    assert ours.cfg.layout == "internlm2" and ours.cfg.rope_scaling["rope_type"] == "dynamic"
    with torch.no_grad():
        want = hf(IDS).logits
    assert want.abs().max() > 1
    assert (logits(ours, IDS) - want).abs().max() <= 1e-5
    # dynamic NTK scaling starts past max_position_embeddings: a cache that long is refused, not silently wrong
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ours.setup_cache(1, 257)


def test_linear_rope_scaling_equals_transformers(tmp_path):
    hf = hf_model(rope_scaling={"rope_type": "linear", "factor": 2.0})
    write_internlm2(tmp_path, hf, rope_scaling={"type": "linear", "factor": 2.0})
    ours = loader.load_llm(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        want = hf(IDS).logits
        plain = hf_model()(IDS).logits
    assert (want - plain).abs().max() > 1e-2  # the scaling matters at this length
    assert (logits(ours, IDS) - want).abs().max() <= 1e-5


def test_save_writes_the_same_packed_tensors(tmp_path):
    hf = hf_model()
    packed = write_internlm2(tmp_path / "base", hf)
    ours = loader.load_llm(tmp_path / "base", dtype=torch.float32)
    loader.save_llm(ours, tmp_path / "out", dtype=torch.float32)
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(written) == sorted(packed)
    for k in packed:
        assert torch.equal(written[k], packed[k]), k  # bit for bit
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "internlm2" and config["architectures"] == ["InternLM2ForCausalLM"]
    assert (config["num_key_value_heads"], config["bias"]) == (HKV, False)
    again = loader.load_llm(tmp_path / "out", dtype=torch.float32)
    assert torch.equal(logits(again, IDS), logits(ours, IDS))


def test_wrong_wqkv_rows_name_the_key(tmp_path):
    hf = hf_model()
    write_internlm2(tmp_path, hf)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 3}))
    with pytest.raises(Exception, match=r"model\.layers\.0\.attention\.wqkv\.weight"):
        loader.load_llm(tmp_path, dtype=torch.float32)


def xtuner_adapter(base, r, alpha, std=0.3):
    """An XTuner / PEFT adapter on InternLM2's modules (wqkv wo w1 w2 w3 and the `output` head) of checkpoint `base`,
    and the reference: transformers' Llama run on W + alpha/r B A, computed in InternLM2's own (packed) layout and
    unpacked by hand. -> (adapter state dict, module names, reference logits of IDS)."""
    g = torch.Generator().manual_seed(3)
    adapter, merged = {}, dict(base)
    modules = [f"model.layers.{i}.{m}" for i in range(2)
               for m in ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")]
    for name in modules + ["output"]:
        w = base[name + ".weight"]
        a = std * torch.randn(r, w.shape[1], generator=g)
        b = std * torch.randn(w.shape[0], r, generator=g)
        adapter[f"base_model.model.{name}.lora_A.weight"] = a
        adapter[f"base_model.model.{name}.lora_B.weight"] = b
        merged[name + ".weight"] = w + alpha / r * b @ a
    ref = hf_model()
    sd = ref.state_dict()
    with torch.no_grad():
        sd["lm_head.weight"].copy_(merged["output.weight"])
        for i in range(2):
            q, k, v = unpack_by_hand(merged[f"model.layers.{i}.attention.wqkv.weight"])
            a = f"model.layers.{i}.self_attn."
            for name, t in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                sd[a + name + ".weight"].copy_(t)
            sd[a + "o_proj.weight"].copy_(merged[f"model.layers.{i}.attention.wo.weight"])
            for ours_name, theirs in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")):
                w = merged[f"model.layers.{i}.feed_forward.{theirs}.weight"]
                sd[f"model.layers.{i}.mlp.{ours_name}.weight"].copy_(w)
        want = ref(IDS).logits
    return adapter, sorted(modules + ["output"]), want


def write_peft(folder, adapter, r, alpha):
    folder.mkdir(parents=True)
    save_file(adapter, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": alpha,
         "target_modules": ["wqkv", "wo", "w1", "w2", "w3", "output"]}))


def test_xtuner_adapter_merges(tmp_path):
    """An XTuner / PEFT adapter on InternLM2's modules merged at load equals the base checkpoint with W + alpha/r B A
    computed in InternLM2's own (packed) layout, run by transformers."""
    hf = hf_model()
    base = write_internlm2(tmp_path / "base", hf)
    r, alpha = 4, 8
    adapter, modules, want = xtuner_adapter(base, r, alpha)
    write_peft(tmp_path / "adapter", adapter, r, alpha)
    ours = loader.load_llm(tmp_path / "base", dtype=torch.float32)
    assert (logits(ours, IDS) - want).abs().max() > 1e-2  # the adapter matters
    names = internlm2.merge_internlm2_adapter(ours, tmp_path / "adapter")
    assert names == modules
    assert (logits(ours, IDS) - want).abs().max() <= 1e-4
    # an XTuner .pth state dict: "llm." prefix and ".default" in the names
    pth = {"llm." + k.replace(".weight", ".default.weight"): v for k, v in adapter.items()}
    again = loader.load_llm(tmp_path / "base", dtype=torch.float32)
    internlm2.merge_internlm2_adapter(again, pth, prefix="llm.", config={"r": r, "lora_alpha": alpha})
    assert torch.allclose(logits(again, IDS), logits(ours, IDS), atol=1e-5)
    # a key that names no InternLM2 module is an error that names it
    bad = {**adapter, "base_model.model.model.layers.0.attention.wz.lora_A.weight": adapter[
        "base_model.model.output.lora_A.weight"], "base_model.model.model.layers.0.attention.wz.lora_B.weight":
        adapter["base_model.model.output.lora_B.weight"]}
    with pytest.raises(Exception, match="attention.wz"):
        internlm2.merge_internlm2_adapter(again, bad, config={"r": r, "lora_alpha": alpha})


def test_convert_merges_xtuner_internlm2_adapters(tmp_path, sp_model):
    """XTuner's LLaVA-InternLM2 outputs, its folder (projector/ + llm_adapter/) and its iter_N.pth (whose LoRA alpha is
    not stored: XTuner's InternLM2 recipes use 256), read by convert.py with the wqkv adapter merged into the LLM;
    `--to llm` then writes that LLM as an InternLM2 folder."""
    import shutil

    import clip
    import convert
    import lora

    base = write_internlm2(tmp_path / "base", hf_model())
    shutil.copy(sp_model, tmp_path / "base" / "tokenizer.model")
    vcfg = clip.CLIPConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    clip.save_clip(clip.CLIPVisionTower(vcfg), tmp_path / "vision")
    bases = dict(llm=tmp_path / "base", vision=tmp_path / "vision", template="internlm2_chat")
    g = torch.Generator().manual_seed(5)
    projector = {"model.0.weight": torch.randn(C, 32, generator=g), "model.0.bias": torch.randn(C, generator=g),
                 "model.2.weight": torch.randn(C, C, generator=g), "model.2.bias": torch.randn(C, generator=g)}
    folder = tmp_path / "xtuner"
    (folder / "projector").mkdir(parents=True)
    save_file(projector, folder / "projector" / "model.safetensors")
    (folder / "projector" / "config.json").write_text(json.dumps({"model_type": "projector"}))
    r, alpha = 4, 8
    adapter, _, want = xtuner_adapter(base, r, alpha)
    write_peft(folder / "llm_adapter", adapter, r, alpha)
    m, _, cfg = loader.load_model(folder, dtype=torch.float32, **bases)
    assert cfg["llm_mode"] == "full" and not any(isinstance(x, lora.LoRALinear) for x in m.llm.modules())
    assert (logits(m.llm, IDS) - want).abs().max() <= 1e-4
    assert torch.equal(m.projector.linear_2.weight, projector["model.2.weight"])
    assert convert.main([str(folder), "--llm", str(tmp_path / "base"), "--vision", str(tmp_path / "vision"),
                         "--to", "llm", "--out", str(tmp_path / "merged"), "--fp32"]) == 0
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["model_type"] == "internlm2"
    assert (logits(loader.load_llm(tmp_path / "merged", dtype=torch.float32), IDS) - want).abs().max() <= 1e-4

    # iter_N.pth: trainable keys only, "llm." / "projector." prefixes, ".default" names, alpha 256 not written
    adapter, _, want = xtuner_adapter(base, r, 256, std=0.3 * (alpha / 256) ** 0.5)  # updates of the same size
    state = {"llm." + k.replace(".weight", ".default.weight"): v for k, v in adapter.items()}
    state.update({"projector." + k: v for k, v in projector.items()})
    torch.save({"meta": {"epoch": 1}, "state_dict": state}, tmp_path / "iter_1.pth")
    m, _, _ = loader.load_model(tmp_path / "iter_1.pth", dtype=torch.float32, **bases)
    assert (logits(m.llm, IDS) - want).abs().max() <= 1e-4
    m, _, _ = loader.load_model(tmp_path / "iter_1.pth", dtype=torch.float32, lora_alpha=16, **bases)
    assert (logits(m.llm, IDS) - want).abs().max() > 1e-2  # so the default alpha is what made it right

    # a text-only iter_N.pth (XTuner's InternLM2 LLM SFT: `llm.*` only, no projector), as a file and as the
    # DeepSpeed folder XTuner writes under that name: converted --to llm with the base named, the adapter merged
    text = {k: v for k, v in state.items() if k.startswith("llm.")}
    torch.save({"meta": {"epoch": 1}, "state_dict": text}, tmp_path / "iter_2.pth")
    (tmp_path / "iter_3.pth").mkdir()
    torch.save({"module": text}, tmp_path / "iter_3.pth" / "mp_rank_00_model_states.pt")
    for name in ("iter_2.pth", "iter_3.pth"):
        out = tmp_path / f"merged-{name}"
        assert convert.main([str(tmp_path / name), "--llm", str(tmp_path / "base"), "--template", "internlm2_chat",
                             "--to", "llm", "--out", str(out), "--fp32"]) == 0
        assert json.loads((out / "config.json").read_text())["model_type"] == "internlm2"
        assert (logits(loader.load_llm(out, dtype=torch.float32), IDS) - want).abs().max() <= 1e-4


# ---- packing -------------------------------------------------------------------------------------------------


def per_token_loss(model, ids, labels, **kw):
    with torch.no_grad():
        out = model.lm_head(model(ids, **kw))  # (B, T, V)
    y = labels[:, 1:]
    loss = F.cross_entropy(out[:, :-1].transpose(1, 2), y.clamp(min=0), reduction="none")  # (B, T-1)
    return torch.where(y == IGN, torch.zeros_like(loss), loss)


def test_segment_mask_equals_separate_sequences():
    model = llama.Llama(llama.LlamaConfig(vocab_size=300, hidden_size=C, num_layers=2, num_heads=H, num_kv_heads=HKV,
                                          intermediate_size=128)).eval()
    lengths = [5, 9, 7]
    seqs = [torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(n)) for n in lengths]
    row = torch.cat(seqs)[None]  # (1, 21)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    segments = torch.cat([torch.full((n,), k) for k, n in enumerate(lengths)])[None]
    packed = logits(model, row, positions=positions, segment_ids=segments)[0]
    alone = torch.cat([logits(model, s[None])[0] for s in seqs])
    assert (packed - alone).abs().max() <= 1e-5
    # without the segments the later samples see the earlier ones (XTuner's default), which we do not copy
    assert (logits(model, row, positions=positions)[0] - alone).abs().max() > 1e-3


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    words = ("the a cat dog sat on mat what is this hello world answer question user assistant system color red "
             "blue green you are helpful one two three").split()
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[i] for i in torch.randint(0, len(words), (10,), generator=g).tolist()) + "."
             for _ in range(300)]
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    with open(path, "wb") as f:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=f, model_type="bpe",
                                       vocab_size=300, user_defined_symbols=["<|im_start|>", "<|im_end|>"],
                                       byte_fallback=True, character_coverage=1.0, minloglevel=2,
                                       normalization_rule_name="identity", remove_extra_whitespaces=False)
    return path


def test_packed_dataset_losses_equal_one_by_one(tmp_path, sp_model):
    tok = SentencePieceTokenizer(sp_model)
    records = [{"id": f"r{i}", "messages": [{"role": "user", "content": "what is this " * (i % 4 + 1)},
                                             {"role": "assistant", "content": "a cat sat on the mat " * (i % 3 + 1)}]}
               for i in range(7)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    ds = datasets.LLaVADataset(tmp_path / "sft.jsonl", None, tok, "internlm2_chat", max_length=96, log=lambda m: None)
    packed = packing.PackedDataset(ds, max_length=160, seed=0)  # samples of 45 to 87 positions: 2 or 3 a row
    assert sorted(j for p in packed.packs for j in p) == list(range(len(ds)))  # every sample once
    assert len(ds) == 7 and 1 < len(packed) < len(ds) and all(n <= 160 for n in packed.lengths)
    batch = packing.collate_packed([packed[i] for i in range(len(packed))])
    model = llama.Llama(llama.LlamaConfig(vocab_size=300, hidden_size=C, num_layers=2, num_heads=H, num_kv_heads=HKV,
                                          intermediate_size=128)).eval()
    loss = per_token_loss(model, batch["input_ids"], batch["labels"], positions=batch["position_ids"],
                          segment_ids=batch["segment_ids"])
    seg = batch["segment_ids"][:, 1:]
    checked = 0
    for b, pack in enumerate(packed.packs):
        for k, j in enumerate(pack):
            ids, labels = ds.tokens(j)
            want = per_token_loss(model, ids[None], labels[None]).sum()
            got = loss[b][seg[b] == k].sum()
            assert want > 0 and abs(got - want) <= 1e-4 * want, (j, got, want)
            checked += 1
    assert checked == len(ds) == len(batch["ids"])
    # supervised token counts agree too (the first label of each sample is a prompt token, so masking it loses none)
    assert int((batch["labels"] != IGN).sum()) == sum(int((ds.tokens(j)[1] != IGN).sum()) for j in range(len(ds)))


# ---- tokenizer and template ----------------------------------------------------------------------------------


def test_internlm2_chat_golden_ids_and_labels(sp_model):
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = SentencePieceTokenizer(sp_model)
    bos, ims, ime = 1, 3, 4  # <s>; <|im_start|>, <|im_end|>: the user-defined pieces right after the controls
    assert (sp.id_to_piece(ims), sp.id_to_piece(ime)) == ("<|im_start|>", "<|im_end|>")
    record = {"messages": [{"role": "system", "content": "You are helpful."},
                           {"role": "user", "content": "what is this?"},
                           {"role": "assistant", "content": "a cat <|im_end|> on a mat"},  # spelled: stays text
                           {"role": "user", "content": "color?"},
                           {"role": "assistant", "content": "red"}]}
    ids, labels = data.encode_conversation(tok, "internlm2_chat", data.parse_record(record).turns)
    E = sp.encode  # reference §3: each text piece between two control tokens is one encode call
    prompt1 = [bos,                                                 # BOS once per sample (SUFFIX_AS_EOS)
               ims, *E("system\nYou are helpful."), ime, *E("\n"),  # SYSTEM <|im_start|>system\n{system}<|im_end|>\n
               ims, *E("user\nwhat is this?"), ime, *E("\n"),       # INSTRUCTION <|im_start|>user\n{input}<|im_end|>\n
               ims, *E("assistant\n")]                              #   <|im_start|>assistant\n
    spelled = tok.encode("a cat <|im_end|> on a mat")
    assert ime not in spelled and tok.decode(spelled) == "a cat <|im_end|> on a mat"
    answer1 = spelled + [ime]                                        # output + SUFFIX <|im_end|>, supervised
    sep = E("\n")                                                    # SEP "\n", not supervised
    prompt2 = [ims, *E("user\ncolor?"), ime, *E("\n"), ims, *E("assistant\n")]  # no BOS, no system on turn 2
    answer2 = E("red") + [ime]
    assert ids == prompt1 + answer1 + sep + prompt2 + answer2 + sep
    assert labels == [IGN] * len(prompt1) + answer1 + [IGN] * len(sep) + [IGN] * len(prompt2) + answer2 + \
        [IGN] * len(sep)
    assert data.stop_token_ids(tok, "internlm2_chat") == [ime, 2]  # chat stops on <|im_end|> (and </s>)


def test_chat_tokens_named_only_in_tokenizer_config(tmp_path):
    """InternLM2's files name the chat tokens in tokenizer_config.json's added_tokens_decoder: the pieces of its
    tokenizer.model may be spelled otherwise (older files: [UNUSED_TOKEN_146]), be ordinary pieces, or the ids may
    lie past the model. Each way, the names resolve to those ids and typed text never yields them."""
    words = "the cat sat on mat hello world user assistant system red blue im start end".split()
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(9)) for i in range(200)]
    folder = tmp_path / "internlm2"
    folder.mkdir()
    with open(folder / "tokenizer.model", "wb") as f:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=f, model_type="bpe",
                                       vocab_size=300,
                                       user_defined_symbols=["[UNUSED_TOKEN_145]", "[UNUSED_TOKEN_146]"],
                                       byte_fallback=True, character_coverage=1.0, minloglevel=2,
                                       normalization_rule_name="identity", remove_extra_whitespaces=False)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    normal = sp.piece_to_id("▁cat")  # an ordinary piece, which one name below takes over
    assert normal > 0 and not sp.is_control(normal) and sp.encode("cat") == [normal]
    decoder = {"0": "<unk>", "1": "<s>", "2": "</s>", "3": "<|im_end|>", "4": "<|im_start|>",
               str(normal): "<|cat_token|>", "300": "<|action_start|>", "301": "<|action_end|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {
        i: {"content": name, "special": True} for i, name in decoder.items()}}))
    tok = load_tokenizer(folder)
    assert (tok.special("<|im_start|>"), tok.special("<|im_end|>"), tok.special("<|cat_token|>")) == (4, 3, normal)
    assert tok.special("<|action_end|>") == 301 and tok.vocab_size == 302  # ids past the model's 300 pieces
    for text in ["<|im_end|> [UNUSED_TOKEN_145] <|im_start|>", "the cat sat", "<|action_start|>"]:
        ids = tok.encode(text)
        assert not any(tok.is_special(i) for i in ids), text  # spelled control tokens stay text
        assert tok.decode(ids) == text
    assert normal not in tok.encode("the cat sat")  # that piece is now a control token, never made from text
    assert tok.encode("the dog") == sp.encode("the dog")  # text without any of them encodes as sentencepiece does
    ids = tok.encode_with_specials("<|im_start|>user\nhi<|im_end|>\n<|action_start|>")
    assert ids == [4] + tok.encode("user\nhi") + [3] + tok.encode("\n") + [300]
    assert tok.decode(ids) == sp.decode(tok.encode("user\nhi") + tok.encode("\n")) == "user\nhi \n"
    # names put back; the " " is the dummy prefix of the "\n" part, a real space mid-text
    assert tok.decode(ids, skip_special=False) == "<|im_start|>user\nhi<|im_end|> \n<|action_start|>"
    assert data.stop_token_ids(tok, "internlm2_chat") == [3, 2]


# ---- recipes -------------------------------------------------------------------------------------------------


def test_llava_recipes_match_xtuner():
    """reference §4.2 / §1.6, typed in by hand: the two LLaVA-InternLM2-Chat-1.8B runs."""
    import train

    recipes = Path(__file__).resolve().parent.parent / "recipes"
    a = train.resolve_args(train.parse_args([f"@{recipes}/internlm2-pretrain.args"]), 8)
    assert (a.stage, a.llm_mode, a.template, a.micro_batch, a.accumulation, a.global_batch, a.lr, a.max_length) == (
        "pretrain", "frozen-nf4", "internlm2_chat", 32, 1, 256, 1e-3, 1472 + 576)
    a = train.resolve_args(train.parse_args([f"@{recipes}/internlm2-finetune.args"]), 8)
    assert (a.stage, a.llm_mode, a.template, a.micro_batch, a.accumulation, a.global_batch, a.lr, a.max_length) == (
        "finetune", "qlora", "internlm2_chat", 16, 1, 128, 2e-4, 1472 + 576)
    assert (a.lora_r, a.lora_alpha, a.lora_dropout) == (512, 256, 0.05)
    assert (a.vision_lora, a.vision_lora_r, a.vision_lora_alpha, a.vision_lora_dropout) == (True, 64, 16, 0.05)
    assert (a.save_steps, a.eval_every, a.image_mode, a.init_from) == (
        500, 500, "pad", "runs/llava-internlm2-pretrain/model")


def test_llava_finetune_recipe_runs_on_an_internlm2_checkpoint(tmp_path, sp_model):
    """The QLoRA + ViT-LoRA recipe, with a tiny InternLM2-layout LLM (and its sentencepiece chat tokens), trains one
    step; the run folder then loads for chat with the answers stopping on <|im_end|>."""
    import shutil

    import clip
    import model as llava
    from test_train import run_inprocess, write_records

    llm = tmp_path / "llm"
    write_internlm2(llm, hf_model())
    shutil.copy(sp_model, llm / "tokenizer.model")  # 300 pieces, the model's vocabulary size
    vcfg = clip.CLIPConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    clip.save_clip(clip.CLIPVisionTower(vcfg), tmp_path / "vision")
    records = write_records(tmp_path, 4, size=(32, 32))
    init = tmp_path / "pretrain" / "model"
    init.mkdir(parents=True)
    save_file({"linear_1.weight": 0.1 * torch.randn(C, 32), "linear_1.bias": torch.zeros(C),
               "linear_2.weight": 0.1 * torch.randn(C, C), "linear_2.bias": torch.zeros(C)},
              init / "projector.safetensors")
    (init / "llava.json").write_text(json.dumps({"llm_mode": "frozen-nf4"}))
    recipes = Path(__file__).resolve().parent.parent / "recipes"
    run_inprocess([f"@{recipes}/internlm2-finetune.args", "--llm", str(llm), "--vision", str(tmp_path / "vision"),
                   "--data", str(records), "--image-folder", str(tmp_path / "images"), "--init-from", str(init),
                   "--micro-batch", "2", "--global-batch", "2", "--max-steps", "1", "--num-workers", "0",
                   "--out", str(tmp_path / "run")])
    m, tok, cfg = loader.load_model(tmp_path / "run" / "model", dtype=torch.float32)
    assert cfg["template"] == "internlm2_chat" and cfg["llm_lora"]["r"] == 512 and m.llm.cfg.layout == "internlm2"
    assert data.stop_token_ids(tok, cfg["template"]) == [4, 2]  # <|im_end|>, </s>
    ids = data.encode_prompt(tok, cfg["template"], "<image>\nwhat is this?", image_tokens=cfg["image_tokens"])
    pixels = clip.preprocess(clip.load_image(tmp_path / "images" / "0.png"), 32)[None]
    out = llava.generate(m, [ids], pixels, max_new_tokens=4, stop_ids=data.stop_token_ids(tok, cfg["template"]))
    assert 1 <= len(out[0]) <= 4 and all(0 <= i < 300 for i in out[0])


# ---- text-only SFT: the recipe end to end (train packed, merge, chat) -----------------------------------------

QUESTIONS = ["what is this?", "hello, what is on the mat?", "what color is the cat?", "what sat on the mat?",
             "say one two three.", "what is the answer?"]
ANSWER = "the cat sat on the mat."


def write_messages(path, n):
    """OpenAI `messages` records: varied questions, one answer (so a tiny model learns it, and its end, quickly)."""
    recs = []
    for i in range(n):
        messages = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]},
                    {"role": "assistant", "content": ANSWER}]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "You are helpful."})
        recs.append({"id": f"m{i}", "messages": messages})
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


@pytest.fixture
def one_thread():
    """Tiny matrices on a shared CPU: one thread is 10x faster than several that wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_sft_qlora_recipe_trains_packed_merges_and_chats(tmp_path, sp_model, one_thread):
    """recipes/internlm2-sft-qlora.args with a tiny InternLM2-layout LLM (its own chat tokens): text-only QLoRA on
    OpenAI messages, packed rows; the loss goes down; `convert.py --to llm` writes an InternLM2 folder whose logits,
    run by transformers after unpacking wqkv by hand, equal the unmerged NF4 + LoRA model's; the checkpoint gives the
    same folder; chat answers lines from stdin and stops on <|im_end|>."""
    import io
    import shutil

    import chat
    import convert
    import train
    from test_train import run_inprocess

    base = tmp_path / "internlm2"
    write_internlm2(base, hf_model())
    shutil.copy(sp_model, base / "tokenizer.model")
    (base / "modeling_internlm2.py").write_text("# stands for InternLM2's remote code, copied with the weights\n")
    msgs = write_messages(tmp_path / "messages.jsonl", 24)
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "internlm2-sft-qlora.args"
    a = train.resolve_args(train.parse_args([f"@{recipe}"]), 1)
    assert (a.stage, a.vision, a.llm_mode, a.template, a.pack, a.max_length) == (
        "sft", None, "qlora", "internlm2_chat", True, 1024)
    assert (a.lora_r, a.lora_alpha, a.lora_dropout, a.micro_batch, a.accumulation, a.lr, a.epochs) == (
        64, 16, 0.1, 1, 16, 2e-4, 2)
    # a faster schedule for the tiny model; ZeRO-0 writes mp_rank_00_model_states.pt, the file an XTuner
    # iter_N.pth folder also has: convert.py must still see our checkpoint below
    run = tmp_path / "run"
    result = run_inprocess([f"@{recipe}", "--llm", str(base), "--data", str(msgs), "--max-length", "128",
                            "--global-batch", "2", "--epochs", "3", "--lr", "1e-2", "--deepspeed", "deepspeed_zero0", "--out", str(run)])
    losses = result["losses"]
    assert "24 samples in" in result["report"] and "packed rows" in result["report"]  # 2 to 4 samples a row
    assert len(losses) == 21 and sum(losses[-3:]) / 3 < 0.2 * losses[0]  # 13 rows, 2 a step: 7 steps per epoch

    # the stage output: the adapter alone, marked text-only; runs/latest points at it
    cfg = json.loads((run / "model" / "llava.json").read_text())
    assert (cfg["vision"], cfg["projector"], cfg["llm_mode"], cfg["llm_lora"]["r"]) == (None, None, "qlora", 64)
    assert sorted(p.name for p in (run / "model").iterdir()) == ["llava.json", "llm_adapter"]
    assert (tmp_path / "latest").resolve() == (run / "model").resolve()

    # LLaVA.forward passes the packing on: a packed row's loss is the sum of its samples' losses computed alone
    m, tok, cfg = loader.load_model(run / "model", dtype=torch.float32)
    assert m.vision is None and m.projector is None and m.llm.cfg.layout == "internlm2"
    ds = datasets.LLaVADataset(msgs, None, tok, "internlm2_chat", max_length=128, log=lambda msg: None)
    packed = packing.PackedDataset(ds, 128, seed=0)
    b = packing.collate_packed([packed[0]])
    with torch.no_grad():
        row, n_row = m(b["input_ids"], b["labels"], position_ids=b["position_ids"], segment_ids=b["segment_ids"])
        alone = [m(*(t[None] for t in ds.tokens(j))) for j in packed.packs[0]]
    assert len(alone) > 1 and int(n_row) == sum(int(n) for _, n in alone)
    assert abs(row - sum(s for s, _ in alone)) <= 1e-4 * row

    # merge: an InternLM2 folder again (packed wqkv, its remote code, its tokenizer)
    assert convert.main([str(run / "model"), "--to", "llm", "--out", str(tmp_path / "merged"), "--fp32",
                         "--verify"]) == 0
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert sorted(merged) == sorted(load_file(base / "model.safetensors"))
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["model_type"] == "internlm2" and config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_")
    assert all((tmp_path / "merged" / f).exists() for f in ("modeling_internlm2.py", "tokenizer.model"))
    # ... whose logits, run by transformers on wqkv unpacked by hand, are the unmerged NF4 + LoRA model's
    ref = hf_model()
    sd = ref.state_dict()
    with torch.no_grad():
        sd["model.embed_tokens.weight"].copy_(merged["model.tok_embeddings.weight"])
        sd["lm_head.weight"].copy_(merged["output.weight"])
        sd["model.norm.weight"].copy_(merged["model.norm.weight"])
        for i in range(2):
            L = f"model.layers.{i}."
            for name, t in zip(("q_proj", "k_proj", "v_proj"), unpack_by_hand(merged[L + "attention.wqkv.weight"])):
                sd[L + "self_attn." + name + ".weight"].copy_(t)
            for ours_name, theirs in (("self_attn.o_proj", "attention.wo"), ("mlp.gate_proj", "feed_forward.w1"),
                                      ("mlp.down_proj", "feed_forward.w2"), ("mlp.up_proj", "feed_forward.w3"),
                                      ("input_layernorm", "attention_norm"), ("post_attention_layernorm", "ffn_norm")):
                sd[L + ours_name + ".weight"].copy_(merged[L + theirs + ".weight"])
        want = ref(IDS).logits
    got = logits(m.llm, IDS)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert (got - hf_model()(IDS).logits).abs().max() > 1e-2  # the adapter (and NF4) changed the model
    # the last checkpoint (train.py export, then the same merge) gives the same folder
    step = run / "checkpoints" / "step_21"
    assert (step / "mp_rank_00_model_states.pt").exists()
    assert convert.main([str(step), "--to", "llm", "--out", str(tmp_path / "merged2"), "--fp32"]) == 0
    again = load_file(tmp_path / "merged2" / "model.safetensors")
    assert all(torch.equal(again[k], merged[k]) for k in merged)

    # chat: over the merged folder (a plain LLM: the template is named) and over the run (its template)
    def talk(*argv):
        out = io.StringIO()
        code = chat.main([*argv, "--temperature", "0", "--max-new-tokens", "24", "--stats"],
                         stdin=io.StringIO("what is this?\nwhat color is the cat?\nEXIT\nnever read\n"), out=out)
        return code, out.getvalue()

    # convert.py's llava.json names the template; a plain LLM folder without it does not, so it must be said
    assert json.loads((tmp_path / "merged" / "llava.json").read_text())["template"] == "internlm2_chat"
    assert talk("--model", str(tmp_path / "merged"), "--template", "llama3_chat")[0] == 2
    (tmp_path / "merged" / "llava.json").unlink()
    assert talk("--model", str(tmp_path / "merged"))[0] == 2  # which template? it must be said
    code, text = talk("--model", str(tmp_path / "merged"), "--template", "internlm2_chat")
    answers = [ln for ln in text.splitlines() if ln and not ln.startswith("[")]
    counts = [int(ln.split(" | ")[2].split()[0]) for ln in text.splitlines() if ln.startswith("[prefill")]
    assert code == 0 and len(answers) == len(counts) == 2 and "<|im_end|>" not in text, text
    words = lambda t: set(t.replace(".", " ").split())  # noqa: E731
    assert all(a and words(a) <= words(ANSWER) for a in answers), text  # learnt words, spaced as text
    assert all(c < 24 for c in counts), text  # each answer stopped on <|im_end|>, not at the limit
    code, unmerged = talk("--model", str(run))  # the run folder: NF4 + LoRA, its own template
    assert code == 0 and [ln for ln in unmerged.splitlines() if ln and not ln.startswith("[")] == answers
    assert talk("--model", str(run), "--template", "llama3_chat")[0] == 2  # not the run's template
