"""Tokenizer tests. Every expected id comes from a reference built here independently of tokenizer.py:

* tiktoken's own Encoding over Meta's Llama-3 `tokenizer.model` (shipped in llama-models 0.3.0),
* transformers' fast tokenizer converted offline from the same file (`TikTokenConverter`),
* sentencepiece itself, on a small model trained inside the test.
"""

import json
import random
import re
import shutil
import time
from pathlib import Path

import llama_models
import pytest
import sentencepiece as spm
import tiktoken
from tiktoken.load import load_tiktoken_bpe  # TIKTOKEN_CACHE_DIR="" (tests/conftest.py): no stale cache

from extras.hf_tokenizer import write_hf_tokenizer
from extras.tokenizer_files import SentencePieceTokenizer, from_tokenizer_json, load_tokenizer
from tokenizer import MAX_RUN, TiktokenTokenizer, split_long_runs

LLAMA3_MODEL = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Spelled out here (not imported from tokenizer.py) so a wrong name or id there fails the tests.
NAMES = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
         "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
         "<|eot_id|>", "<|python_tag|>", "<|image|>"]
NAMES += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(NAMES))]


def build_corpus():
    rng = random.Random(1234)
    texts = [
        "",
        "a",
        " ",
        "Hello, world! I'm here; you're there. THEY'LL say we'd've DONE it.",
        "The quick brown fox jumps over the lazy dog.\n",
        "def f(x):\n\tif x > 0:\n\t\treturn x ** 2  # square\n    return -x\n\n\nprint(f(3))\r\n",
        "for (int i = 0; i < n; ++i) { a[i] = b[i] * c[i]; }\n",
        '{"key": [1, 2.5e-3, null], "nested": {"ok": true}}',
        "Emoji: 😀👍🏽👨‍👩‍👧‍👦🇫🇷🏳️‍🌈 ❤️ ✨",
        "中文分词测试：我们今天去公园散步。日本語のテキストです。한국어 문장도 있습니다.",
        "العربية: مرحبا بالعالم، كيف حالك؟",
        "हिन्दी: नमस्ते दुनिया, आप कैसे हैं?",
        "עברית, ไทย ภาษาไทย, Русский язык: съешь же ещё этих мягких французских булок.",
        "Ünïcödé àccénts: naïve café résumé Ångström ß ﬁ",
        "spaces:  two,   three,    four,        eight.",
        "trailing spaces   ",
        "   leading spaces",
        "tabs\tand\t\tmore\t\t\ttabs\t",
        "mixed \t \n \r\n\n\t  \n\n\n   end",
        "\n\n\n\n",
        "12345678901234567890 3.14159265358979 1,000,000 0x1F 2024-06-01 007",
        "9" * 100,
        "<html><body><p class=\"x\">Tag soup &amp; entities &lt;&gt;</p></body></html>",
        "Math: ∑_{i=1}^{n} x_i² ≤ ∞, ∀ε>0 ∃δ … ≠ ≈ √2",
        "URL https://example.com/path?q=1&r=two#frag and e-mail a.b@c.de",
        "Zero\u200bwidth\u00a0nbsp\u2028line-sep",
    ]
    # Runs of one repeated character: the cases where a BPE has several ways to split the same token.
    for ch in [" ", "\n", "\t", "-", "=", "*", "a", "0", ".", "_", "#", "中"]:
        texts += [ch * n for n in (2, 3, 5, 8, 13, 17, 31, 64)]
        texts.append("x" + ch * 9 + "y" + ch * 4 + "z")
    alphabet = "abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 \n\t.,;:!?'\"()[]{}<>|/\\-_=+*&^%$#@~`éüß中文日本한글🙂€"
    texts.append("".join(rng.choice(alphabet) for _ in range(5000)))  # long random-ish string
    return texts


CORPUS = build_corpus()


@pytest.fixture(scope="module")
def ours():
    return TiktokenTokenizer.from_model_file(LLAMA3_MODEL)


@pytest.fixture(scope="module")
def ref():
    """tiktoken's Encoding built the way llama-models builds it."""
    ranks = load_tiktoken_bpe(str(LLAMA3_MODEL))
    return tiktoken.Encoding("ref", pat_str=PATTERN, mergeable_ranks=ranks,
                             special_tokens={s: len(ranks) + i for i, s in enumerate(NAMES)})


@pytest.fixture(scope="module")
def hf():
    """transformers' fast tokenizer, converted offline from the same tokenizer.model."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converted = TikTokenConverter(vocab_file=str(LLAMA3_MODEL), pattern=PATTERN, extra_special_tokens=NAMES).converted()
    return PreTrainedTokenizerFast(tokenizer_object=converted, bos_token="<|begin_of_text|>",
                                   eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>")


@pytest.fixture(scope="module")
def hf_folder(hf, tmp_path_factory):
    """The reference saved as an HF repo saves it: tokenizer.json + tokenizer_config.json."""
    folder = tmp_path_factory.mktemp("hf_saved")
    hf.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def export(ours, tmp_path_factory):
    """Our HF export with the LLaVA extra tokens at the ids xtuner's published HF model has."""
    folder = tmp_path_factory.mktemp("hf_export")
    write_hf_tokenizer(ours, folder, added={"<image>": 128257, "<pad>": 128258})
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Llama-3 (tiktoken)


def test_llama3_special_ids(ours):
    assert ours.bos_id == 128000  # <|begin_of_text|>
    assert ours.eos_id == 128001  # <|end_of_text|>
    assert ours.pad_id == 128004  # <|finetune_right_pad_id|>
    assert ours.special("<|start_header_id|>") == 128006
    assert ours.special("<|end_header_id|>") == 128007
    assert ours.special("<|eom_id|>") == 128008
    assert ours.special("<|eot_id|>") == 128009  # end of turn: the chat stop token
    assert ours.special("<|python_tag|>") == 128010
    assert ours.special("<|image|>") == 128011
    assert ours.special("<|reserved_special_token_245|>") == 128255  # the last one (12 named, then 2..245)
    assert ours.stop_ids == (128009, 128001)
    assert ours.vocab_size == 128256
    assert len(ours.special_tokens) == 256
    assert ours.is_special(128000) and ours.is_special(128255) and not ours.is_special(127999)
    with pytest.raises(KeyError, match="<image>"):
        ours.special("<image>")


def test_encode_equals_tiktoken_and_hf(ours, ref, hf):
    for text in CORPUS:
        ids = ours.encode(text)
        assert ids == ref.encode(text, disallowed_special=()), text[:50]
        assert ids == hf.encode(text, add_special_tokens=False), text[:50]


def test_spelled_special_token_stays_text(ours, ref, hf):
    for text in ["<|eot_id|>", "I typed <|eot_id|> and <|begin_of_text|> here", "<|start_header_id|>user"]:
        ids = ours.encode(text)
        assert ids == ref.encode(text, disallowed_special=())
        assert not any(ours.is_special(i) for i in ids)
        assert ours.decode(ids) == text
    # The difference we make on purpose: HF (and tiktoken with specials allowed) turn the spelling into the control id.
    assert hf.encode("<|eot_id|>", add_special_tokens=False) == [128009]
    assert ref.encode("<|eot_id|>", allowed_special="all") == [128009]
    assert ours.encode("<|eot_id|>") != [128009]


def test_encode_with_specials_on_template(ours, ref):
    template = "<|start_header_id|>user<|end_header_id|>\n\nWhat is in the image?<|eot_id|>" \
               "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ids = ours.encode_with_specials(template)
    assert ids == ref.encode(template, allowed_special="all")
    # start_header, "user", end_header, "\n\n" (XTuner's llama3_chat golden ids), ..., eot, start_header, "assistant"
    assert ids[:4] == [128006, 882, 128007, 271]
    assert ids[-5:] == [128009, 128006, 78191, 128007, 271]
    assert ours.encode_with_specials("<|begin_of_text|>") == [128000]
    assert ours.encode_with_specials("plain") == ours.encode("plain")


def test_decode(ours, hf):
    for text in CORPUS:
        ids = ours.encode(text)
        assert ours.decode(ids) == text
        assert hf.decode(ids) == text  # the reference agrees on what the ids mean
    ids = [128000] + ours.encode("hi there") + [128009]
    assert ours.decode(ids) == "hi there"
    assert ours.decode(ids, skip_special=False) == "<|begin_of_text|>hi there<|eot_id|>"
    with pytest.raises(ValueError, match="-200"):
        ours.decode([1, -200, 2])


def test_long_inputs(ours, ref):
    # Long, but no run of one character class over MAX_RUN: exactly tiktoken's ids.
    text = " ".join(CORPUS) * 40
    assert len(text) > 10 * MAX_RUN
    assert ours.encode(text) == ref.encode(text, disallowed_special=())
    # Very long runs with no whitespace (tiktoken's old quadratic case) and a very long whitespace run.
    for text in ["a" * 1_000_000, "xyz!" * 100_000 + " " * 60_000 + "中文" * 40_000]:
        start = time.perf_counter()
        ids = ours.encode(text)
        assert time.perf_counter() - start < 30
        assert ours.decode(ids) == text
        pieces = split_long_runs(text)
        assert "".join(pieces) == text
        assert max(len(run) for p in pieces for run in re.findall(r"\s+|\S+", p)) <= MAX_RUN


def test_from_tokenizer_json(hf_folder, ours):
    tj = from_tokenizer_json(hf_folder / "tokenizer.json")
    assert tj.special_tokens == ours.special_tokens
    assert (tj.bos_id, tj.eos_id, tj.pad_id, tj.stop_ids, tj.vocab_size) == \
           (ours.bos_id, ours.eos_id, ours.pad_id, ours.stop_ids, ours.vocab_size)
    for text in CORPUS:
        assert tj.encode(text) == ours.encode(text), text[:50]


def test_from_tokenizer_json_rejects_other_models(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"model": {"type": "Unigram", "vocab": []}, "normalizer": None}))
    with pytest.raises(ValueError, match="Unigram"):
        from_tokenizer_json(path)


def test_write_hf_tokenizer(export, hf_folder, ours):
    from transformers import AutoTokenizer

    assert {p.name for p in export.iterdir()} == {"tokenizer.json", "tokenizer_config.json",
                                                   "special_tokens_map.json"}
    # Our vocabulary and merge list are the ones transformers derives from the same ranks.
    ref_json = json.loads((hf_folder / "tokenizer.json").read_text())
    ours_json = json.loads((export / "tokenizer.json").read_text())
    assert ours_json["model"]["vocab"] == ref_json["model"]["vocab"]
    assert [tuple(m) for m in ours_json["model"]["merges"]] == [tuple(m) for m in ref_json["model"]["merges"]]

    back = AutoTokenizer.from_pretrained(export, local_files_only=True)
    for text in CORPUS:
        ids = ours.encode(text)
        assert back.encode(text, add_special_tokens=False) == ids, text[:50]
        assert back.encode(text) == [128000] + ids  # bos from the post-processor, like HF's Llama-3 tokenizer
        assert back.decode(ids) == text
    assert back.convert_tokens_to_ids("<image>") == 128257
    assert back.convert_tokens_to_ids("<pad>") == 128258
    assert back.convert_ids_to_tokens(128256) == "<|unused_128256|>"  # the free id below them, filled
    assert back.encode("<image>", add_special_tokens=False) == [128257]
    assert (back.bos_token_id, back.eos_token_id, back.pad_token_id) == (128000, 128009, 128258)
    assert back.convert_tokens_to_ids("<|eot_id|>") == 128009

    # Reading the export back with our loader: same ids, the added tokens become specials.
    again = load_tokenizer(export)
    assert isinstance(again, TiktokenTokenizer)
    assert again.special("<image>") == 128257 and again.special("<pad>") == 128258
    assert again.encode(CORPUS[-1]) == ours.encode(CORPUS[-1])


def test_write_hf_tokenizer_tiny_bpe_and_added_names(tmp_path, ours):
    from transformers import AutoTokenizer

    # A tiny byte-level BPE: the 256 bytes, then "he", "ll", "hell", "hello", " w", then two specials.
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({t: 256 + i for i, t in enumerate([b"he", b"ll", b"hell", b"hello", b" w"])})
    tiny = TiktokenTokenizer(ranks, {"<|begin_of_text|>": 261, "<|end_of_text|>": 262})
    write_hf_tokenizer(tiny, tmp_path, added=("<image>", "<pad>"))  # names: the next free ids
    back = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert back.convert_tokens_to_ids(["<image>", "<pad>"]) == [263, 264]
    assert tiny.encode("hello world, hell yeah") == [259, 260, 111, 114, 108, 100, 44, 32, 258, 32, 121, 101, 97, 104]
    for text in ["hello world, hell yeah", "shell hello\n\n  hehe llama"] + CORPUS[:12]:
        assert back.encode(text, add_special_tokens=False) == tiny.encode(text)
    assert back.encode("hello") == [261, 259]
    with pytest.raises(ValueError, match="reuse"):
        write_hf_tokenizer(tiny, tmp_path / "x", added={"<image>": 262})  # the id of <|end_of_text|>
    with pytest.raises(ValueError, match="reuse"):
        write_hf_tokenizer(tiny, tmp_path / "x", added={"<|end_of_text|>": 300})
    with pytest.raises(TypeError, match="SentencePieceTokenizer"):
        write_hf_tokenizer(object.__new__(SentencePieceTokenizer), tmp_path / "x")
    with pytest.raises(ValueError, match="reuse"):
        write_hf_tokenizer(ours, tmp_path / "x", added={"<image>": 128009})
    with pytest.raises(ValueError, match="reuse"):
        write_hf_tokenizer(ours, tmp_path / "x", added={"<|eot_id|>": 130000})


# ----------------------------------------------------------------------------------------------------------------
# sentencepiece


def sp_training_lines():
    rng = random.Random(7)
    words = ("the a an image shows two three cats dogs on sofa table red blue green small large person holding "
             "umbrella street car bus train what is in picture describe color of and with near under over "
             "question answer assistant user system hello world").split()
    lines = []
    for i in range(400):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 14)))
        lines.append(f"{sentence.capitalize()}{rng.choice('.?!')} {rng.randint(0, 9999)} café 中文")
    return lines


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    with open(path, "wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sp_training_lines()), model_writer=f, model_type="bpe", vocab_size=400,
            user_defined_symbols=["<|im_start|>", "<|im_end|>"], byte_fallback=True, character_coverage=1.0,
            minloglevel=2)
    return path


SP_TEXTS = ["Hello world", "What is in the image?", "  two leading spaces", "trailing ", "a\nb\n\nc",
            "unseen Zebra ✓ 🙂 words", "typed </s> and <s> and <unk>", "", "中文 café 1234"]


def test_sentencepiece_plain_text_matches(sp_model):
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = SentencePieceTokenizer(sp_model)
    for text in SP_TEXTS + sp_training_lines()[:50]:
        assert tok.encode(text) == sp.encode(text), text
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text))
    assert tok.encode("typed </s>") == sp.encode("typed </s>")  # sentencepiece never matches control pieces
    assert sp.eos_id() not in tok.encode("typed </s>")


def test_sentencepiece_specials(sp_model):
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = SentencePieceTokenizer(sp_model)
    assert (tok.bos_id, tok.eos_id) == (sp.bos_id(), sp.eos_id()) == (1, 2)
    assert tok.pad_id == sp.unk_id() == 0  # the model has no pad piece (pad_id -1): unk, as LLaVA pads Llama-2
    assert tok.stop_ids == (2,)
    assert tok.vocab_size == sp.get_piece_size() == 400
    # The trainer puts user-defined symbols right after the control pieces.
    assert sp.id_to_piece(3) == "<|im_start|>" and sp.id_to_piece(4) == "<|im_end|>"
    assert tok.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2, "<|im_start|>": 3, "<|im_end|>": 4}
    assert tok.special("<|im_end|>") == sp.piece_to_id("<|im_end|>") == 4
    with pytest.raises(KeyError, match="<\\|eot_id\\|>"):
        tok.special("<|eot_id|>")


def test_sentencepiece_user_defined_symbol_stays_text(sp_model):
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = SentencePieceTokenizer(sp_model)
    text = "hello <|im_end|> world<|im_start|>user"
    assert 4 in sp.encode(text) and 3 in sp.encode(text)  # sentencepiece itself matches them in raw text
    ids = tok.encode(text)
    assert not any(tok.is_special(i) for i in ids)
    assert tok.decode(ids) == text
    # The spelled symbol becomes ordinary pieces: characters the model knows, byte pieces for the others.
    spelled = tok.encode("<|im_end|>")
    assert all(not (sp.is_control(i) or sp.is_unused(i) or sp.is_unknown(i)) for i in spelled)
    assert "".join(sp.id_to_piece(i) for i in spelled if not sp.is_byte(i)) == "▁im" + "end"
    # Trusted template text: the names become their ids; each text part is one sentencepiece call.
    assert tok.encode_with_specials("<|im_start|>user\nhi<|im_end|>\n") == \
           [3] + sp.encode("user\nhi") + [4] + sp.encode("\n")
    assert tok.encode_with_specials("<s>hello</s>") == [1] + sp.encode("hello") + [2]


def test_sentencepiece_decode_specials(sp_model):
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = SentencePieceTokenizer(sp_model)
    ids = [1] + sp.encode("hello world") + [4] + sp.encode("the cat") + [2]
    assert tok.decode(ids) == "hello world the cat"
    assert tok.decode(ids, skip_special=False) == "<s>hello world<|im_end|> the cat</s>"


# ----------------------------------------------------------------------------------------------------------------
# Finding the tokenizer of a folder


def test_load_tokenizer_layouts(tmp_path, hf_folder, sp_model):
    meta = tmp_path / "hf_llama3_repo"
    (meta / "original").mkdir(parents=True)
    shutil.copy(LLAMA3_MODEL, meta / "original" / "tokenizer.model")
    assert isinstance(load_tokenizer(meta), TiktokenTokenizer)

    tok = load_tokenizer(hf_folder)  # tokenizer.json only
    assert isinstance(tok, TiktokenTokenizer) and tok.special("<|eot_id|>") == 128009

    tiktoken_root = tmp_path / "tiktoken_at_root"
    tiktoken_root.mkdir()
    shutil.copy(LLAMA3_MODEL, tiktoken_root / "tokenizer.model")
    assert isinstance(load_tokenizer(tiktoken_root), TiktokenTokenizer)

    sp_root = tmp_path / "llama2_repo"  # a sentencepiece model next to a tokenizer.json that is not byte-level
    sp_root.mkdir()
    shutil.copy(sp_model, sp_root / "tokenizer.model")
    assert isinstance(load_tokenizer(sp_root), SentencePieceTokenizer)
    (sp_root / "tokenizer.json").write_text(json.dumps(
        {"model": {"type": "BPE", "byte_fallback": True, "vocab": {}, "merges": []}, "normalizer": None}))
    assert isinstance(load_tokenizer(sp_root), SentencePieceTokenizer)

    empty = tmp_path / "no_tokenizer"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no_tokenizer"):
        load_tokenizer(empty)
    (empty / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece"}, "normalizer": None}))
    with pytest.raises(ValueError, match="WordPiece"):
        load_tokenizer(empty)
