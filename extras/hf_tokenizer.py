"""Writing a Llama-3 tokenizer as HF files (tokenizer.json, tokenizer_config.json, special_tokens_map.json), for
the HF LLaVA export; extras/tokenizer_files.py reads them back (`from_tokenizer_json`).

The written `tokenizer.json` is a byte-level BPE in HF tokenizers' format: the vocabulary spelled with GPT-2's
`bytes_to_unicode`, the merge list derived from the ranks (`bpe_merges`), the Llama-3 split regex as pre-tokenizer.
Reference: HF tokenizers' `tokenizer.json` format and `transformers.convert_slow_tokenizer.TikTokenConverter`.
"""

import json
from pathlib import Path

from extras.tokenizer_files import bytes_to_unicode
from tokenizer import TiktokenTokenizer
from weights import atomic_write


def bpe_merges(ranks):
    """The merge list of a byte-level BPE given by its ranks, in the order HF's BPE applies them.

    tiktoken merges whichever adjacent pair makes the lowest-ranked token, so every split of a token into two
    tokens is a merge, ordered by the rank of the token it makes (then by the ranks of its halves).
    """
    merges = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort(key=lambda m: m[:3])
    return [(left, right) for _, _, _, left, right in merges]


def write_hf_tokenizer(tok, folder, added=(), eos_token=None):
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json that transformers'
    `PreTrainedTokenizerFast` / `AutoTokenizer` loads offline and that encode plain text exactly as `tok` does.

    `added`: extra special tokens, names (given the ids after the tokenizer's last id) or {name: id}; the HF LLaVA
    export passes {"<image>": 128257, "<pad>": 128258}, the ids of xtuner/llava-llama-3-8b-v1_1-transformers;
    ids left free below them are filled with `<|unused_{id}|>`. `<pad>`, when added, becomes the pad token.
    `eos_token` defaults to `<|eot_id|>` when the tokenizer has it (the Llama-3-Instruct convention), else its eos.
    Like HF's Llama-3 tokenizer, the written one adds `<|begin_of_text|>` when called with
    `add_special_tokens=True`; unlike ours, HF's matches special-token names inside text.
    """
    if not isinstance(tok, TiktokenTokenizer):
        raise TypeError(f"write_hf_tokenizer writes byte-level BPE (tiktoken) tokenizers, not {type(tok).__name__}; "
                        "copy a sentencepiece model's tokenizer files instead")
    if not isinstance(added, dict):
        added = {name: tok.vocab_size + i for i, name in enumerate(added)}
    clash = {n: i for n, i in added.items() if n in tok.special_tokens or i < tok.vocab_size}
    if clash or len(set(added.values())) != len(added):
        raise ValueError(f"added tokens {clash or added} reuse a name or an id of the tokenizer "
                         f"(its ids end at {tok.vocab_size - 1}) or of each other")
    specials = {**tok.special_tokens, **added}
    # HF tokenizers renumbers added tokens to close gaps in the ids, so an id left free (128256 when `<image>` is
    # asked for at 128257) gets an inert placeholder token that nothing ever produces from text.
    taken = set(specials.values())
    specials.update({f"<|unused_{i}|>": i for i in range(len(tok.ranks), max(taken, default=0) + 1) if i not in taken})
    name_of = {i: n for n, i in tok.special_tokens.items()}
    bos = name_of.get(tok.bos_id)
    eos = eos_token or ("<|eot_id|>" if "<|eot_id|>" in specials else name_of.get(tok.eos_id))
    pad = "<pad>" if "<pad>" in added else name_of.get(tok.pad_id)

    spell = bytes_to_unicode()

    def text(b):
        return "".join(spell[x] for x in b)

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    post = byte_level  # offsets only; ByteLevel adds no tokens
    if bos is not None:  # HF's Llama-3 tokenizer prepends bos when add_special_tokens=True
        bos_step = {"SpecialToken": {"id": bos, "type_id": 0}}
        post = {"type": "Sequence", "processors": [byte_level, {
            "type": "TemplateProcessing",
            "single": [bos_step, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos_step, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [specials[bos]], "tokens": [bos]}},
        }]}
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": i, "content": n, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}
                         for n, i in sorted(specials.items(), key=lambda x: x[1])],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tok.pattern}, "behavior": "Isolated", "invert": False},
            {**byte_level, "trim_offsets": True},
        ]},
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": True,  # a piece that is a whole token is taken as is, as tiktoken does
                  "vocab": {text(b): i for b, i in sorted(tok.ranks.items(), key=lambda x: x[1])},
                  "merges": [[text(a), text(b)] for a, b in bpe_merges(tok.ranks)]},
    }
    roles = {"bos_token": bos, "eos_token": eos, "pad_token": pad}
    roles = {k: v for k, v in roles.items() if v is not None}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **roles,
        "clean_up_tokenization_spaces": False,  # HF's cleanup would turn " ." into "." and break round trips
        "model_input_names": ["input_ids", "attention_mask"],
        "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"}
                                 for t in tokenizer_json["added_tokens"]},
    }
    special_map = {**roles, **({"additional_special_tokens": list(added)} if added else {})}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, obj in [("tokenizer.json", tokenizer_json), ("tokenizer_config.json", config),
                      ("special_tokens_map.json", special_map)]:
        with atomic_write(folder / name) as tmp:
            tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=None if name == "tokenizer.json" else 2),
                           encoding="utf-8")
