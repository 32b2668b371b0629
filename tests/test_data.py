"""data.py tests (and tools/check_data.py's). Every expected id comes from a reference built here, independently
of data.py:

* Llama-3: the sequence structure (control tokens, image runs, label masks) is written by hand from XTuner's
  llama3_chat template and encode_fn (BOS once, prompt -100, answer + <|eot_id|> supervised), with each control id
  a commented constant; the ids of each text piece come from tiktoken's own Encoding over Meta's tokenizer.model
  (llama-models 0.3.0), plain encoding.
* vicuna / internlm2: sentencepiece itself, on a tiny model trained here.
* the length-grouped sampler: a small case worked out by hand from XTuner's get_length_grouped_indices.
"""

import json
import pickle
import random
import shutil
from functools import partial
from pathlib import Path

import llama_models
import numpy as np
import pytest
import sentencepiece as spm
import tiktoken
import torch
from PIL import Image
from tiktoken.load import load_tiktoken_bpe  # TIKTOKEN_CACHE_DIR="" (tests/conftest.py): no stale cache

import data
from extras import datasets
from data import Turn
from extras.tokenizer_files import SentencePieceTokenizer
from tokenizer import IGNORE_INDEX as IGN, IMAGE_TOKEN_INDEX as IMG, TiktokenTokenizer
from tools import check_data
from extras import samplers

LLAMA3_MODEL = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
BOS = 128000  # <|begin_of_text|>
START = 128006  # <|start_header_id|>
END = 128007  # <|end_header_id|>
EOT = 128009  # <|eot_id|>
K = 4  # image positions per image in most tests (576 for ViT-L/14-336; a tiny CLIP has fewer)


@pytest.fixture(scope="module")
def tok():
    return TiktokenTokenizer.from_model_file(LLAMA3_MODEL)


@pytest.fixture(scope="module")
def ref():
    """tiktoken's Encoding built the way llama-models builds it (only the 4 specials these tests decode)."""
    ranks = load_tiktoken_bpe(str(LLAMA3_MODEL))
    pat = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
           r"\s*[\r\n]+|\s+(?!\S)|\s+")
    specials = {"<|begin_of_text|>": BOS, "<|start_header_id|>": START, "<|end_header_id|>": END, "<|eot_id|>": EOT}
    return tiktoken.Encoding("ref", pat_str=pat, mergeable_ranks=ranks, special_tokens=specials)


def encode(tok, record, image_tokens=K, template="llama3_chat"):
    return data.encode_conversation(tok, template, data.parse_record(record).turns, image_tokens)


def llama3_turn(ref, question, answer, bos=False):
    """Hand-derived: [BOS] <|start_header_id|>user<|end_header_id|> "\\n\\n{q}" <|eot_id|>
    <|start_header_id|>assistant<|end_header_id|> "\\n\\n" (label -100) | "{a}" <|eot_id|> (supervised).
    `question` is a list of text pieces and IMG markers; the text between two cuts is one plain encoding."""
    P = ref.encode_ordinary
    prompt = ([BOS] if bos else []) + [START, *P("user"), END]
    text = "\n\n"
    for piece in question:
        if piece == IMG:
            prompt += P(text) + [IMG] * K
            text = ""
        else:
            text += piece
    prompt += P(text) + [EOT, START, *P("assistant"), END, *P("\n\n")]
    ans = P(answer) + [EOT]
    return prompt + ans, [IGN] * len(prompt) + ans


def join(*turns):
    return [i for t in turns for i in t[0]], [i for t in turns for i in t[1]]


def human(v):
    return {"from": "human", "value": v}


def gpt(v):
    return {"from": "gpt", "value": v}


def test_reference_ids(ref):
    # the Llama-3 ids of the template's text pieces: "\n\n" = 271, "user" = 882, "assistant" = 78191
    assert ref.encode_ordinary("\n\n") == [271]
    assert ref.encode_ordinary("user") == [882] and ref.encode_ordinary("assistant") == [78191]


LLAMA3_CASES = {
    "single turn": (
        {"conversations": [human("What is in the picture?"), gpt("A red bus.")]},
        [(["What is in the picture?"], "A red bus.")]),
    "image at the end of the question": (  # XTuner moves it to the front: "<image>\n" + stripped text
        {"image": "a.jpg", "conversations": [human("What is this?\n<image>"), gpt("A cat.")]},
        [([IMG, "\nWhat is this?"], "A cat.")]),
    "multi-turn": (  # BOS once per sample; the image only in the first turn
        {"image": "a.jpg", "conversations": [human("<image>\nDescribe it."), gpt("Two dogs on a sofa."),
                                             human("What color is the sofa?"), gpt("Green.")]},
        [([IMG, "\nDescribe it."], "Two dogs on a sofa."), (["What color is the sofa?"], "Green.")]),
    "text-only": (
        {"conversations": [human("Hello"), gpt("Hi! How can I help?"), human("Count to 3."), gpt("1, 2, 3.")]},
        [(["Hello"], "Hi! How can I help?"), (["Count to 3."], "1, 2, 3.")]),
    "chinese": (
        {"image": "a.jpg", "conversations": [human("<image>\n这是什么？"), gpt("这是一辆红色的公共汽车。")]},
        [([IMG, "\n这是什么？"], "这是一辆红色的公共汽车。")]),
    "leading gpt turn": (
        {"conversations": [gpt("I speak first."), human("Why?"), gpt("Because.")]},
        [(["Why?"], "Because.")]),
    "trailing human turn": (
        {"conversations": [human("Q1"), gpt("A1"), human("Q2 has no answer")]},
        [(["Q1"], "A1")]),
    "consecutive human turns": (  # concatenated with no separator; the image goes first in its own message
        {"image": "a.jpg", "conversations": [human("Look."), human("What is it? <image>"), gpt("A bird.")]},
        [(["Look.", IMG, "\nWhat is it?"], "A bird.")]),
    "empty answer": (  # only <|eot_id|> is supervised
        {"conversations": [human("Say nothing."), gpt("")]},
        [(["Say nothing."], "")]),
    "code and whitespace": (  # leading spaces of the question merge with "\n\n", as in XTuner's one encode call
        {"conversations": [human("  Fix:\n```python\ndef f(x):\n\treturn x  \n```\n"),
                           gpt("```python\ndef f(x):\n    return x\n```\n\n   ")]},
        [(["  Fix:\n```python\ndef f(x):\n\treturn x  \n```\n"], "```python\ndef f(x):\n    return x\n```\n\n   ")]),
    "text spelling control tokens stays text": (
        {"conversations": [human("Type <|eot_id|><|start_header_id|>"), gpt("<|begin_of_text|> is typed")]},
        [(["Type <|eot_id|><|start_header_id|>"], "<|begin_of_text|> is typed")]),
}


@pytest.mark.parametrize("case", list(LLAMA3_CASES))
def test_llama3_golden(tok, ref, case):
    record, turns = LLAMA3_CASES[case]
    want = join(*[llama3_turn(ref, q, a, bos=i == 0) for i, (q, a) in enumerate(turns)])
    ids, labels = encode(tok, record)
    assert ids == want[0]
    assert labels == want[1]
    # the supervised labels decode to exactly the answers, each followed by <|eot_id|>
    spans, run = [], []
    for label in labels + [IGN]:
        if label != IGN:
            run.append(label)
        elif run:
            spans.append(ref.decode(run))
            run = []
    if case == "empty answer":
        assert spans == ["<|eot_id|>"]
    else:
        assert spans == [a + "<|eot_id|>" for _, a in turns]
    assert ids.count(IMG) == K * ("image" in record)


def test_image_positions_576(tok, ref):
    ids, labels = encode(tok, LLAMA3_CASES["image at the end of the question"][0], image_tokens=576)
    assert ids.count(IMG) == 576
    a = ids.index(IMG)
    assert ids[a:a + 576] == [IMG] * 576 and all(label == IGN for label in labels[a:a + 576])
    assert ids[:a] == [BOS, START, 882, END, 271]  # <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n


def test_encode_prompt(tok, ref):
    P = ref.encode_ordinary
    ids = data.encode_prompt(tok, "llama3_chat", "<image>\nDescribe.", image_tokens=K)
    assert ids == [BOS, START, *P("user"), END, *P("\n\n"), *[IMG] * K, *P("\nDescribe."), EOT,
                   START, *P("assistant"), END, *P("\n\n")]
    # the prompt of a training sample's first turn is the same sequence
    train_ids, labels = data.encode_conversation(tok, "llama3_chat", [Turn("<image>\nDescribe.", "x")], K)
    assert train_ids[:len(ids)] == ids and labels.index(P("x")[0]) == len(ids)
    later = data.encode_prompt(tok, "llama3_chat", "And?", first_turn=False)
    assert later == [START, *P("user"), END, *P("\n\nAnd?"), EOT, START, *P("assistant"), END, *P("\n\n")]
    system = data.encode_prompt(tok, "llama3_chat", "Hi", system="Be brief.")
    hi = data.encode_prompt(tok, "llama3_chat", "Hi", first_turn=False)
    assert system == [BOS, START, *P("system"), END, *P("\n\nBe brief."), EOT] + hi
    assert data.stop_token_ids(tok, "llama3_chat")[0] == EOT
    assert data.encode_reply(tok, "llama3_chat", "Fine.") == P("Fine.") + [EOT]


def test_messages_records(tok, ref):
    P = ref.encode_ordinary
    record = {"messages": [
        {"role": "assistant", "content": "a leading answer is dropped"},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "user", "content": " there"},  # consecutive user messages are concatenated
        {"role": "assistant", "content": "Hello", "loss": "False"},  # not supervised (XTuner reads str(loss))
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Ciao"},  # the system text applied to the previous answer only
    ]}
    turns = data.parse_record(record).turns
    assert turns == [Turn("Hi there", "Hello", "Be brief.", False), Turn("Bye", "Ciao", "", True)]
    ids, labels = encode(tok, record)
    turn1 = [BOS, START, *P("system"), END, *P("\n\nBe brief."), EOT, START, *P("user"), END, *P("\n\nHi there"),
             EOT, START, *P("assistant"), END, *P("\n\n"), *P("Hello"), EOT]
    prompt2 = [START, *P("user"), END, *P("\n\nBye"), EOT, START, *P("assistant"), END, *P("\n\n")]
    answer2 = P("Ciao") + [EOT]
    assert ids == turn1 + prompt2 + answer2
    assert labels == [IGN] * (len(turn1) + len(prompt2)) + answer2
    with pytest.raises(data.RecordError, match="unknown 'role' 'tool'"):
        data.parse_record({"id": 7, "messages": [{"role": "tool", "content": "x"}]})


def test_record_rules():
    s = data.parse_record({"id": 3, "image": ["a.png", "b.png"], "conversations": [
        human("first <image> then"), gpt("ok"), human("<image>second"), gpt("ok")]})
    assert s.id == "3" and s.images == ["a.png", "b.png"]
    assert [t.input for t in s.turns] == ["<image>\nfirst  then", "<image>\nsecond"]
    assert data.parse_record({"conversations": [human("<image>"), gpt("x")], "image": "a"}).turns[0].input == "<image>"
    two = data.parse_record({"conversations": [human("<image> and <image>"), gpt("x")], "image": ["a", "b"]})
    assert two.turns[0].input == "<image>\n<image>\nand"
    bad = {
        "no conversations": ({"id": "r1"}, "neither 'conversations' nor 'messages'"),
        "unknown from": ({"id": "r2", "conversations": [human("q"), {"from": "bot", "value": "a"}]},
                         "unknown 'from' 'bot'"),
        "image placeholder without image": ({"id": "r3", "conversations": [human("<image>\nq"), gpt("a")]},
                                            "no 'image'"),
        "more placeholders than images": ({"id": "r4", "image": "a", "conversations": [
            human("<image>\nq"), gpt("a"), human("<image>\nq2"), gpt("a2")]}, "2 <image> placeholders but only 1"),
        "image without placeholder": ({"id": "r5", "image": "a", "conversations": [human("q"), gpt("a")]},
                                      "1 image"),
        "placeholder only in a dropped trailing turn": (
            {"id": "r6", "image": "a", "conversations": [human("q"), gpt("a"), human("<image>")]}, "1 image"),
        "no complete turn": ({"id": "r7", "conversations": [gpt("a"), human("q")]}, "no complete turn"),
    }
    for name, (record, reason) in bad.items():
        with pytest.raises(data.RecordError, match=reason) as e:
            data.parse_record(record)
        assert str(e.value).startswith(f"record {record['id']}: "), name


def test_json_list_line_numbers(tmp_path):
    records = [{"id": "a", "conversations": [human("q"), gpt("a")]}, {"id": "b"},
               {"id": "c", "conversations": [human("q"), gpt("a")]}]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(records, indent=1))
    text = path.read_text().splitlines()
    out = list(datasets.iter_samples(path))
    assert [type(x).__name__ for x in out] == ["Sample", "Problem", "Sample"]
    for x, rid in zip(out, "abc"):
        assert '"id": "%s"' % rid in text[x.line]  # the record's first line is x.line; its "id" is on the next
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in records[:1]) + "\n\n{not json\n")
    out = list(datasets.iter_samples(tmp_path / "r.jsonl"))
    assert out[1].line == 3 and "invalid JSON" in out[1].reason
    (tmp_path / "broken.json").write_text('[{"id": 1},\n {"id": ')
    with pytest.raises(data.DataError, match="broken.json: invalid JSON at line 2"):
        list(datasets.iter_samples(tmp_path / "broken.json"))


# ---------------------------------------------------------------------------------------------------------------
# vicuna and internlm2 with a tiny sentencepiece model


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    rng = random.Random(0)
    words = "the a image shows two cats dogs red blue what is in picture color and USER ASSISTANT question".split()
    lines = [" ".join(rng.choice(words) for _ in range(12)) + rng.choice([".", "?", ":", "\n"]) for _ in range(300)]
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    with open(path, "wb") as f:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=f, model_type="bpe",
                                       vocab_size=400, user_defined_symbols=["<|im_start|>", "<|im_end|>"],
                                       byte_fallback=True, character_coverage=1.0, minloglevel=2)
    return path


def test_vicuna_structure(sp_model):
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = SentencePieceTokenizer(sp_model)
    bos, eos = 1, 2  # <s>, </s> (sentencepiece's default ids)
    turns = [Turn("<image>\nWhat is in the picture?", "two cats"), Turn("and the color?", "red")]
    ids, labels = data.encode_conversation(tok, "vicuna", turns, K)
    # per turn: BOS, instruction (-100) | answer, EOS (supervised) | SEP "\n" (-100); BOS again every turn;
    # "USER: " and the question are one encode call in XTuner, cut only at the image
    p1 = [bos, *sp.encode("USER: "), *[IMG] * K, *sp.encode("\nWhat is in the picture? ASSISTANT:")]
    a1 = sp.encode("two cats") + [eos]
    p2 = [bos, *sp.encode("USER: and the color? ASSISTANT:")]
    a2 = sp.encode("red") + [eos]
    sep = sp.encode("\n")
    assert ids == p1 + a1 + sep + p2 + a2 + sep
    assert labels == [IGN] * len(p1) + a1 + [IGN] * len(sep) + [IGN] * len(p2) + a2 + [IGN] * len(sep)
    # a chat turn after the first still gets its BOS, as in training
    assert data.encode_prompt(tok, "vicuna", "and the color?", first_turn=False) == p2
    assert data.stop_token_ids(tok, "vicuna") == [eos]


def test_internlm2_structure(sp_model):
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = SentencePieceTokenizer(sp_model)
    bos, ims, ime = 1, 3, 4  # <s>, <|im_start|>, <|im_end|> (user-defined pieces 3 and 4)
    assert sp.piece_to_id("<|im_start|>") == ims and sp.piece_to_id("<|im_end|>") == ime
    turns = [Turn("what is in the picture?", "two dogs"), Turn("color?", "blue")]
    ids, labels = data.encode_conversation(tok, "internlm2_chat", turns, K)
    E = sp.encode  # one encode call per text piece between control tokens

    def prompt(q):
        return [ims, *E("user\n" + q), ime, *E("\n"), ims, *E("assistant\n")]

    # SUFFIX <|im_end|> is the EOS (BOS once), SEP "\n" after each answer, not supervised
    a1, a2 = E("two dogs") + [ime], E("blue") + [ime]
    want = [bos] + prompt("what is in the picture?") + a1 + E("\n") + prompt("color?") + a2 + E("\n")
    assert ids == want
    assert [i for i, label in zip(ids, labels) if label != IGN] == a1 + a2


# ---------------------------------------------------------------------------------------------------------------
# Length policy


def test_fit_length():
    # compact ids: BOS, image, prompt, prompt | ans, ans | prompt, prompt | ans, ans ; an image is 5 positions
    ids = [1, IMG, 2, 3, 10, 11, 4, 5, 12, 13]
    labels = [IGN, IGN, IGN, IGN, 10, 11, IGN, IGN, 12, 13]
    ends = [6, 10]  # full length of ids[:6] = 10, of ids[:10] = 14
    fit = partial(data.fit_length, ids, labels, ends, image_tokens=5)
    assert fit(max_length=14) == (10, "kept")
    assert fit(max_length=13) == (6, "truncated_at_turn")
    assert fit(max_length=9) == (5, "truncated_in_answer")  # 9 positions, one supervised token kept
    assert fit(max_length=8) == (None, "too_long")  # a cut before the first supervised token: dropped
    assert fit(max_length=5) == (None, "too_long")  # never inside the image
    assert data.fit_length(ids, [IGN] * 10, ends, 100, 5) == (None, "no_supervised")


def write_image(path, size=(40, 30), color=(200, 30, 30), fmt=None):
    Image.new("RGB", size, color).save(path, fmt)
    return path.name


@pytest.fixture()
def bad_folder(tmp_path):
    """A records file with one of every kind of bad record, and its image folder."""
    img = tmp_path / "images"
    img.mkdir()
    write_image(img / "good.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(img / "full.jpg", quality=95)
    raw = (img / "full.jpg").read_bytes()
    (img / "truncated.jpg").write_bytes(raw[: len(raw) // 2])
    (img / "not_an_image.jpg").write_bytes(b"these bytes are not an image\n" * 10)
    write_image(img / "one.png", (1, 1))
    write_image(img / "strip.png", (300, 1))

    def rec(rid, image=None, q="<image>\nWhat is it?", a="A thing."):
        r = {"id": rid, "conversations": [human(q), gpt(a)]}
        return r if image is None else {**r, "image": image}

    records = [
        rec("good", "good.png"),
        rec("missing", "missing.png"),
        rec("truncated", "truncated.jpg"),
        rec("not_an_image", "not_an_image.jpg"),
        {"id": "no_conversations", "image": "good.png"},
        {"id": "unknown_from", "conversations": [human("q"), {"from": "robot", "value": "a"}]},
        rec("placeholder_without_image"),
        {"id": "more_placeholders", "image": "good.png", "conversations": [
            human("<image>\nq"), gpt("a"), human("<image>\nq2"), gpt("a2")]},
        rec("too_long", "good.png", q="<image>\n" + "word " * 200),
        rec("text_only", q="Just text?"),
        rec("one_pixel", "one.png"),
        rec("strip", "strip.png"),
        {"id": "nothing_supervised", "messages": [{"role": "user", "content": "q"},
                                                  {"role": "assistant", "content": "a", "loss": False}]},
    ]
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, img


DROPPED = {"no_conversations": "neither", "unknown_from": "unknown 'from'", "placeholder_without_image": "no 'image'",
           "more_placeholders": "placeholders but only", "too_long": "longer than max_length",
           "nothing_supervised": "no supervised token"}
FAILS_TO_LOAD = ["missing", "truncated", "not_an_image"]


def test_dataset_bad_data(tok, bad_folder):
    path, img = bad_folder
    logged = []
    ds = datasets.LLaVADataset(path, img, tok, "llama3_chat", image_tokens=K, image_size=28, max_length=64,
                           log=logged.append)
    assert ds.record_ids == ["good", *FAILS_TO_LOAD, "text_only", "one_pixel", "strip"]
    lines = {json.loads(line)["id"]: i + 1 for i, line in enumerate(path.read_text().splitlines())}
    # every dropped record is kept, with its 0-based index in the file (one record a line here) and its line
    assert {p.id: (p.index, p.line) for p in ds.problems()} == {rid: (lines[rid] - 1, lines[rid]) for rid in DROPPED}
    for p in ds.problems():
        assert DROPPED[p.id] in p.reason and p.file == str(path)
    st = ds.stats
    assert (st["records"], st["bad_record"], st["too_long"], st["no_supervised"], st["kept"]) == (13, 4, 1, 1, 7)
    assert "13 records -> 7 samples" in logged[0] and "dropped 6" in logged[0]  # reported, not silent
    # the log names the first 5 and the total; problems() has them all
    first5 = [f"  {p}" for p in ds.problems()[:5]]
    assert logged[0].splitlines()[1:] == first5 + ["  ... and 1 more (6 bad records in all)"]

    item = ds[0]
    assert item["id"] == "good" and item["pixel_values"].shape == (1, 3, 28, 28) and item["replaced"] == []
    assert item["input_ids"].dtype == torch.long and (item["input_ids"] == IMG).sum() == K
    # an image that fails at load time: a warning naming the record, file and image, then a sample drawn at random
    # (a draw may hit another bad image, which is then reported too and replaced in turn)
    for i, rid, image in zip([1, 2, 3], FAILS_TO_LOAD, ["missing.png", "truncated.jpg", "not_an_image.jpg"]):
        with pytest.warns(data.DataWarning) as caught:
            item = ds[i]
        assert item["id"] in {"good", "text_only", "one_pixel", "strip"}
        assert (item["pixel_values"] is None) == (item["id"] == "text_only")
        assert item["replaced"][0]["id"] == rid and {r["id"] for r in item["replaced"]} <= set(FAILS_TO_LOAD)
        messages = [str(w.message) for w in caught]
        assert len(messages) == len(item["replaced"])
        assert f"record {rid} ({path}:{lines[rid]}): cannot load its image" in messages[0] and image in messages[0]
    assert ds.unloadable == {1, 2, 3}
    # degenerate but valid images load
    assert ds[5]["pixel_values"].shape == (1, 3, 28, 28) and ds[6]["pixel_values"].shape == (1, 3, 28, 28)
    # the length counts the image positions; text-only lengths are negative (XTuner's modality_length)
    ids, _ = ds.compact(0)
    assert ds.modality_lengths[0] == len(ids) - 1 + K and ds.modality_lengths[4] < 0


def test_truncation_drops_the_images_of_cut_turns(tok, tmp_path):
    img = tmp_path
    write_image(img / "a.png")
    write_image(img / "b.png")
    record = {"id": "two", "image": ["a.png", "b.png"], "conversations": [
        human("<image>\nFirst?"), gpt("One."), human("<image>\nSecond?"), gpt("Two " * 50)]}
    (tmp_path / "r.jsonl").write_text(json.dumps(record) + "\n")
    ds = datasets.LLaVADataset(tmp_path / "r.jsonl", img, tok, image_tokens=K, image_size=28, max_length=60, log=print)
    assert ds.stats["truncated_at_turn"] == 1 and ds.image_paths == [("a.png",)]
    item = ds[0]
    assert item["pixel_values"].shape[0] == 1 and (item["input_ids"] == IMG).sum() == K
    assert len(item["input_ids"]) <= 60 and item["labels"][-1] == EOT  # the kept answer ends with <|eot_id|>


@pytest.mark.filterwarnings("ignore::data.DataWarning")
def test_dataloader_workers_and_mix(tok, bad_folder, tmp_path):
    path, img = bad_folder
    other = tmp_path / "other"
    other.mkdir()
    write_image(other / "good.png", color=(0, 0, 255))
    (other / "o.json").write_text(json.dumps([{"id": "blue", "image": "good.png",
                                               "conversations": [human("<image>\nColor?"), gpt("Blue.")]}]))
    mix = datasets.open_data([f"{path}:{img}", f"{other / 'o.json'}"], tok, image_tokens=K, image_size=28,
                         max_length=64, log=lambda m: None)
    assert isinstance(mix, datasets.LLaVAMix) and len(mix) == 8
    assert len(mix.modality_lengths) == 8 and mix.stats["bad_record"] == 4
    assert mix[7]["id"] == "blue" and mix[7]["pixel_values"][0, 2].mean() > 1  # its own image folder (blue)
    pickle.loads(pickle.dumps(mix))  # spawn-safe
    loader = torch.utils.data.DataLoader(mix, batch_size=3, num_workers=2,
                                         collate_fn=partial(data.collate, pad_id=tok.pad_id, image_tokens=K))
    batches = list(loader)  # (the workers' warnings go to their own stderr)
    assert sum(len(b["ids"]) for b in batches) == 8
    # items 1, 2, 3 fail to load and are replaced: the replaced records reach the main process through the batches
    # (a worker's counters and warnings do not)
    assert {r["id"] for b in batches for r in b["replaced"]} == set(FAILS_TO_LOAD)
    # and the replacements are those this process draws: they depend on the seed and the index, not the worker
    fresh = datasets.open_data([f"{path}:{img}", f"{other / 'o.json'}"], tok, image_tokens=K, image_size=28,
                           max_length=64, log=lambda m: None)
    assert [i for b in batches for i in b["ids"]] == [fresh[i]["id"] for i in range(8)]


@pytest.mark.filterwarnings("ignore::data.DataWarning")
def test_bad_images_replaced_at_random(tok, tmp_path):
    """Five bad images in a row: each is replaced by a sample drawn at random, never a known-bad one, the same for
    a given seed and index whatever was loaded before (DataLoader workers, a resumed run); not by its neighbour."""
    write_image(tmp_path / "good.png")
    bad = range(3, 8)
    records = [{"id": f"r{i}", "image": f"missing{i}.png" if i in bad else "good.png",
                "conversations": [human("<image>\nWhat is it?"), gpt("A thing.")]} for i in range(20)]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    def replacements(seed=0, order=bad):
        ds = datasets.LLaVADataset(tmp_path / "r.jsonl", tmp_path, tok, image_tokens=K, image_size=28, max_length=64,
                               seed=seed, log=lambda m: None)
        items = {i: ds[i] for i in order}
        assert all(items[i]["replaced"][0]["id"] == f"r{i}" for i in order)
        return [items[i]["id"] for i in bad]

    picks = replacements()
    assert not {f"r{i}" for i in bad} & set(picks)  # every pick loads
    assert len(set(picks)) > 1  # not one sample trained five more times
    assert all(pick != f"r{i + 1}" for i, pick in zip(bad, picks))  # not simply the next sample
    assert replacements(order=reversed(bad)) == picks  # reproducible, whatever failed before
    assert replacements(seed=1) != picks


def test_data_specs(tmp_path):
    assert datasets.parse_data_spec("a.json:imgs") == [(Path("a.json"), Path("imgs"))]
    assert datasets.parse_data_spec("d/a.jsonl", "default") == [(Path("d/a.jsonl"), Path("default"))]
    assert datasets.parse_data_spec("C:/d/a.jsonl:C:/imgs") == [(Path("C:/d/a.jsonl"), Path("C:/imgs"))]
    (tmp_path / "mix.json").write_text(json.dumps({"datasets": [
        {"path": "x.jsonl", "image_folder": "data/x"}, {"path": "y.jsonl"}]}))
    assert datasets.parse_data_spec(str(tmp_path / "mix.json")) == [
        (tmp_path / "x.jsonl", tmp_path / "data/x"), (tmp_path / "y.jsonl", None)]
    with pytest.raises(data.DataError, match="expected RECORDS.json"):
        datasets.parse_data_spec("records.txt")


# ---------------------------------------------------------------------------------------------------------------
# Samplers


def test_length_grouped_hand_computed():
    # multimodal (> 0): indices 0 2 4 5 7 with lengths 5 9 2 8 6; text-only (< 0): indices 1 3 6 with lengths 3 7 4
    lengths = [5, -3, 9, -7, 2, 8, -4, 6]
    g = torch.Generator().manual_seed(1)
    # the three draws the algorithm makes, in order (checked here so a change in torch's RNG shows up clearly)
    assert torch.randperm(5, generator=g).tolist() == [0, 4, 2, 3, 1]
    assert torch.randperm(3, generator=g).tolist() == [1, 2, 0]
    assert torch.randperm(3, generator=g).tolist() == [2, 0, 1]
    # by hand, megabatches of 2:
    #   multimodal shuffled [0 7 4 5 2] -> [0 7] [4 5] [2] -> sorted [7 0] [5 4] [2]
    #   text-only shuffled [3 6 1]      -> [3 6] [1]       -> sorted [3 6] [1]
    #   the others [7 0] [5 4] [3 6] shuffled by [2 0 1] -> [3 6] [7 0] [5 4]; last = [2] + [1] sorted -> [2 1]
    #   longest first: the heads are 3 (7), 7 (6), 5 (8), 2 (9) -> swap 3 and 2
    want = [2, 6, 7, 0, 5, 4, 3, 1]
    assert samplers.length_grouped_order(lengths, 2, torch.Generator().manual_seed(1)) == want
    s = samplers.LengthGroupedSampler(lengths, per_device_batch_size=2, seed=1, mega_batch_mult=1)
    assert list(s) == want and len(s) == 8
    s2 = samplers.LengthGroupedSampler(lengths, per_device_batch_size=1, seed=0, world_size=2, rank=1, mega_batch_mult=1)
    s2.set_epoch(1)  # seed 0 + epoch 1 = the case above; rank 1 of 2 takes every second index from the second
    assert list(s2) == want[1::2]
    s2.set_epoch(1, start_index=3)  # resume: skip this rank's first 3 samples without touching them
    assert list(s2) == want[1::2][3:] and len(s2) == 1


def test_length_grouped_invariants():
    rng = random.Random(0)
    lengths = [rng.randint(1, 3000) * rng.choice([1, -1]) for _ in range(1003)]
    assert samplers.LengthGroupedSampler(lengths, 4, world_size=2).group_size == 8 * min(1003 // 32, 50)
    assert samplers.LengthGroupedSampler(lengths * 50, 4, world_size=2).group_size == 8 * 50
    assert samplers.LengthGroupedSampler(lengths[:10], 4, world_size=2).group_size == 8
    s = samplers.LengthGroupedSampler(lengths, per_device_batch_size=4, seed=5)
    g = s.group_size
    for epoch in range(2):
        s.set_epoch(epoch)
        order = list(s)
        assert sorted(order) == list(range(1003))  # every index exactly once
        size = [abs(lengths[i]) for i in order]
        assert size[0] == max(size)  # the longest first
        n_full = (sum(x > 0 for x in lengths) // g + sum(x < 0 for x in lengths) // g) * g
        for a in range(0, n_full, g):  # full megabatches: one modality, sorted longest first (but for the swap)
            chunk = order[a:a + g]
            assert len({lengths[i] > 0 for i in chunk[1:]}) == 1
            assert [abs(lengths[i]) for i in chunk[1:]] == sorted((abs(lengths[i]) for i in chunk[1:]), reverse=True)
        tail = size[n_full:]
        assert tail[1:] == sorted(tail[1:], reverse=True)
    assert list(s) != (s.set_epoch(0) or list(s))  # epochs differ
    # distributed: 3 ranks share 1003 samples, 1 left out (no duplicates), each rank the same count
    shares = [list(samplers.LengthGroupedSampler(lengths, 4, seed=5, world_size=3, rank=r)) for r in range(3)]
    assert [len(x) for x in shares] == [334] * 3
    assert len(set().union(*shares)) == 1002
    assert samplers.LengthGroupedSampler(lengths, 4, world_size=3).n_left_out == 1


def test_shuffle_sampler():
    s = samplers.ShuffleSampler(10, seed=3)
    first = list(s)
    assert sorted(first) == list(range(10)) and list(s) == first
    assert first == torch.randperm(10, generator=torch.Generator().manual_seed(3)).tolist()
    s.set_epoch(1)
    assert list(s) != first
    s.set_epoch(0, start_index=4)
    assert list(s) == first[4:] and len(s) == 6
    ranks = [list(samplers.ShuffleSampler(10, seed=3, world_size=4, rank=r)) for r in range(4)]
    assert ranks[1] == first[1:8:4] and sum(map(len, ranks)) == 8


# ---------------------------------------------------------------------------------------------------------------
# Collate


def test_collate():
    def item(ids, labels, n_img, value):
        px = torch.full((n_img, 3, 2, 2), float(value)) if n_img else None
        return {"id": str(value), "input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "pixel_values": px}

    batch = [item([1, IMG, IMG, 2], [IGN, IGN, IGN, 2], 1, 1), item([5, 6], [IGN, 6], 0, 2),
             item([1, IMG, IMG, 3, IMG, IMG, 4], [IGN] * 6 + [4], 2, 3)]
    out = data.collate(batch, pad_id=9, image_tokens=2)
    assert out["input_ids"].shape == (3, 7) and out["input_ids"].dtype == torch.long
    assert out["input_ids"][1].tolist() == [5, 6, 9, 9, 9, 9, 9]
    assert out["labels"][1].tolist() == [IGN, 6, IGN, IGN, IGN, IGN, IGN]
    assert out["labels"][0].tolist() == [IGN, IGN, IGN, 2, IGN, IGN, IGN]
    assert out["n_images"].tolist() == [1, 0, 2]
    assert out["pixel_values"].shape == (3, 3, 2, 2)
    assert out["pixel_values"][:, 0, 0, 0].tolist() == [1, 3, 3]  # in sample order
    assert data.collate(batch[1:2])["pixel_values"] is None
    with pytest.raises(ValueError, match="sample 1: 2 image positions but 1 image"):
        data.collate(batch[:1], image_tokens=576)
    with pytest.raises(ValueError, match="sample 2"):
        data.collate([item([5, IMG], [IGN, IGN], 0, 2)])


# ---------------------------------------------------------------------------------------------------------------
# CLI


def test_check_cli(bad_folder, tmp_path, capsys):
    path, img = bad_folder
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    shutil.copy(LLAMA3_MODEL, tok_dir / "tokenizer.model")
    code = check_data.main(["check", f"{path}:{img}", "--tokenizer", str(tok_dir), "--max-length", "64",
                      "--image-tokens", str(K), "--workers", "2"])
    out = capsys.readouterr().out.splitlines()
    assert code == 1
    lines = {json.loads(line)["id"]: i + 1 for i, line in enumerate(path.read_text().splitlines())}
    reported = out[:-1]
    assert [int(r.split(":")[1]) for r in reported] == sorted(lines[rid] for rid in [*DROPPED, *FAILS_TO_LOAD])
    assert len(reported) == len(DROPPED) + len(FAILS_TO_LOAD)
    for rid in [*DROPPED, *FAILS_TO_LOAD]:
        hits = [r for r in reported if f"{path}:{lines[rid]}: record {rid}:" in r]
        assert len(hits) == 1, rid
        if rid in FAILS_TO_LOAD:
            assert f"image {img}/" in hits[0]
    assert out[-1].startswith("checked 13 records and 6 images: 9 bad")
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"id": "g", "image": "good.png", "conversations": [human("<image>\nq"), gpt("a")]}))
    assert check_data.main(["check", f"{good}:{img}"]) == 0


def test_show_cli(tok, ref, tmp_path, capsys):
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    shutil.copy(LLAMA3_MODEL, tok_dir / "tokenizer.model")
    records = [LLAMA3_CASES["multi-turn"][0], LLAMA3_CASES["text-only"][0]]
    path = tmp_path / "r.json"
    path.write_text(json.dumps([{"id": f"s{i}", **r} for i, r in enumerate(records)]))
    assert check_data.main(["show", str(path), "--tokenizer", str(tok_dir), "--jsonl"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [set(r) for r in rows] == [{"id", "input_ids", "labels"}] * 2 and rows[0]["id"] == "s0"
    # XTuner's convention: each image's run of positions is written as a single -200
    turns = LLAMA3_CASES["multi-turn"][1]
    want = join(*[llama3_turn(ref, q, a, bos=i == 0) for i, (q, a) in enumerate(turns)])
    squeeze = [j for j, x in enumerate(want[0]) if not (x == IMG and want[0][j - 1] == IMG)]
    assert rows[0]["input_ids"] == [want[0][j] for j in squeeze] and rows[0]["input_ids"].count(IMG) == 1
    assert rows[0]["labels"] == [want[1][j] for j in squeeze]
    assert check_data.main(["show", str(path), "--tokenizer", str(tok_dir), "--n", "1"]) == 0
    text = capsys.readouterr().out
    assert "<image x576>" in text and "⟦Two dogs on a sofa.<|eot_id|>⟧" in text and "s1" not in text
    # a file or image folder that is not there: one line naming it, no traceback
    with pytest.raises(SystemExit, match=r"^check_data.py show: no records file at .*nope.json"):
        check_data.main(["show", str(tmp_path / "nope.json"), "--tokenizer", str(tok_dir)])
    with pytest.raises(SystemExit, match=r"^check_data.py show: image folder .*nope \(for .*r.json\): no such folder"):
        check_data.main(["show", f"{path}:{tmp_path / 'nope'}", "--tokenizer", str(tok_dir)])


def xtuner_encode(hf, turns, image_tokens):
    """XTuner's template_map_fn + encode_fn for llama3_chat, as XTuner v0.2.0 writes them: one HF `encode` of the
    whole formatted question (split only at "<image>"), one of answer + SUFFIX; BOS once (SUFFIX_AS_EOS)."""
    ids, labels = [hf.bos_token_id], [IGN]
    for q, a in turns:
        text = ("<|start_header_id|>user<|end_header_id|>\n\n" + q +
                "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
        chunks = [hf.encode(c, add_special_tokens=False) for c in text.split("<image>")]
        prompt = [i for j, c in enumerate(chunks) for i in ([IMG] * image_tokens if j else []) + c]
        answer = hf.encode(a + "<|eot_id|>", add_special_tokens=False)
        ids += prompt + answer
        labels += [IGN] * len(prompt) + answer
    return ids, labels


def test_llama3_equals_xtuner_encode_fn(tok):
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from tokenizer import LLAMA3_PATTERN, llama3_special_names

    hf = PreTrainedTokenizerFast(
        tokenizer_object=TikTokenConverter(vocab_file=str(LLAMA3_MODEL), pattern=LLAMA3_PATTERN,
                                           extra_special_tokens=llama3_special_names()).converted(),
        bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    records = [r for name, (r, _) in LLAMA3_CASES.items() if "control" not in name]  # there XTuner differs
    records.append({"conversations": [human("\n\nleading newlines\n"), gpt("\nand a leading newline")]})
    records.append({"image": "a", "conversations": [human("<image>"), gpt(" ok"), human("  two spaces"), gpt("x")]})
    for record in records:
        turns = data.parse_record(record).turns
        assert encode(tok, record) == xtuner_encode(hf, [(t.input, t.output) for t in turns], K), record
