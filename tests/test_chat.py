"""The chat CLI (chat.py) and the sampler it uses (model.sample).

A tiny random LLaVA (tiny CLIP + tiny Llama with the real Llama-3 vocabulary and Meta's tokenizer.model from the
llama-models package) is written as a run folder; its lm_head favours a few special tokens, so garbage answers do
hold control tokens and the "never printed" check can fail. The references: a from-scratch greedy decode by full
forwards over the whole history (no KV cache) for the cached multi-turn chat, prompt ids derived by hand from
XTuner's llama3_chat template, transformers' TopK / TopP logits warpers for the sampling filters, and the
tokenizer's own decode of the whole string for the streaming printer.
"""

import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import llama_models
import pytest
import torch
from PIL import Image

import chat
import clip
import llama
import model as llava
from extras.tokenizer_files import load_tokenizer
from extras import loader

ROOT = Path(__file__).resolve().parents[1]
STOP_NAMES = ("<|eot_id|>", "<|end_of_text|>")
# special tokens the tiny model is pushed towards (none of them stops generation)
FAVOURED_SPECIALS = ("<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_3|>", "<|eom_id|>")
FAVOURED_TEXT = ("Hello", " world", " cat", " 的", " red", "!", " blue", " ok")  # and plain text, so answers print


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """-> (model folder, image path, tokenizer): our run folder layout, as train.py writes it."""
    root = tmp_path_factory.mktemp("chat")
    torch.manual_seed(0)
    vcfg = clip.CLIPConfig.from_name("tiny")
    vision = clip.CLIPVisionTower(vcfg)
    clip.save_clip(vision, root / "vision")

    lcfg = llama.LlamaConfig.from_name("tiny")
    llm = llama.Llama(lcfg)
    (root / "llm" / "original").mkdir(parents=True)
    shutil.copyfile(Path(llama_models.__file__).parent / "llama3" / "tokenizer.model",
                    root / "llm" / "original" / "tokenizer.model")
    tok = load_tokenizer(root / "llm")
    with torch.no_grad():
        # unit-size embeddings and projections of a few times 1/sqrt(fan_in) instead of HF's 0.02: sharp attention
        # whose output outweighs the residual, so the answer depends on the whole history, not on the last token
        gain = {"q_proj": 3.0, "k_proj": 3.0, "v_proj": 2.0, "o_proj": 2.0}
        for name, p in llm.named_parameters():
            if name == "embed_tokens.weight":
                p.normal_(0.0, 1.0)
            elif p.dim() == 2 and name != "lm_head.weight":
                p.normal_(0.0, gain.get(name.split(".")[-2], 1.0) * p.shape[1] ** -0.5)
        # the final norm's output has norm ~8, so these rows of norm 8 give logits of ~±8 against ~±0.2 for the
        # 0.02-initialised rows: they win almost every step, and which one wins depends on the context
        favoured = [tok.special(n) for n in FAVOURED_SPECIALS] + [tok.encode(t)[0] for t in FAVOURED_TEXT]
        assert all(len(tok.encode(t)) == 1 for t in FAVOURED_TEXT)
        w = torch.randn(len(favoured), lcfg.hidden_size)
        llm.lm_head.weight[favoured] = 8.0 * w / w.norm(dim=-1, keepdim=True)
        for n in STOP_NAMES:  # never stop early: every answer runs to --max-new-tokens
            llm.lm_head.weight[tok.special(n)] = 0.0
    llama.save_llama(llm, root / "llm", dtype=torch.float32)

    projector = llava.Projector(vcfg.hidden_size, lcfg.hidden_size, lcfg.hidden_size)
    cfg = {"llm": str(root / "llm"), "vision": str(root / "vision"), "template": "llama3_chat", "select_layer": -2,
           "image_mode": "pad", "image_size": vcfg.image_size, "image_tokens": vcfg.num_patches,
           "projector": {"in": vcfg.hidden_size, "hidden": lcfg.hidden_size, "out": lcfg.hidden_size},
           "llm_mode": "frozen", "llm_lora": None, "vision_lora": None, "dtype": "float32"}
    loader.save_model(llava.LLaVA(vision, projector, llm), root / "run" / "model", cfg)

    image = root / "photo.png"
    Image.new("RGB", (80, 50), (200, 30, 40)).save(image)
    return root / "run" / "model", image, tok


@pytest.fixture
def calls(monkeypatch):
    """Every generate() call chat makes: its prompt, keyword arguments and answer."""
    seen = []
    real = chat.generate

    def recording(model, prompts, pixel_values=None, **kw):
        new = real(model, prompts, pixel_values, **kw)
        seen.append({"prompt": list(prompts[0]), "pixels": pixel_values, "answer": new[0], **kw})
        return new

    monkeypatch.setattr(chat, "generate", recording)
    return seen


@pytest.fixture
def conversations(monkeypatch):
    """Every Conversation chat.main makes."""
    made = []

    class Spy(chat.Conversation):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(chat, "Conversation", Spy)
    return made


def talk(model_dir, lines, *flags):
    out = io.StringIO()
    rc = chat.main(["--model", str(model_dir), "--context", "512", *flags], stdin=io.StringIO("".join(
        line + "\n" for line in lines)), out=out)
    return rc, out.getvalue()


def header(tok, role):
    """<|start_header_id|>role<|end_header_id|>: as XTuner encodes llama3_chat, the text between two control tokens
    is one plain encode call."""
    return [tok.special("<|start_header_id|>")] + tok.encode(role) + [tok.special("<|end_header_id|>")]


def user_turn(tok, text, image_tokens=0):
    """The ids of one user turn, by hand from the llama3_chat template (no BOS); with an image, the input is
    "<image>\\n" + text and the image positions cut the plain text around them."""
    if image_tokens:
        body = tok.encode("\n\n") + [llava.IMAGE_TOKEN_INDEX] * image_tokens + tok.encode("\n" + text)
    else:
        body = tok.encode("\n\n" + text)
    return header(tok, "user") + body + [tok.special("<|eot_id|>")] + header(tok, "assistant") + tok.encode("\n\n")


def greedy_full_forward(model, ids, pixels, n, stop_ids):
    """Greedy decoding with a full forward over the whole sequence at every step (no KV cache)."""
    ids, new = list(ids), []
    for _ in range(n):
        with torch.no_grad():
            h = model.llm(inputs_embeds=model.embed(torch.tensor([ids]), pixels))  # (1, T, C), causal, no cache
            t = int(model.llm.lm_head(h[0, -1]).argmax())
        new.append(t)
        ids.append(t)
        if t in stop_ids:
            break
    return new


def assert_no_control_tokens(text, tok):
    leaked = [name for name in tok.special_tokens if name in text]
    assert not leaked, f"control tokens printed: {leaked[:5]}"


# ---- a conversation ---------------------------------------------------------------------------------------------


def test_two_turns_continue_the_cache_and_equal_a_from_scratch_decode(run, calls, conversations):
    model_dir, image, tok = run
    n = 10
    rc, out = talk(model_dir, ["What is in the picture?", "And what colour is it?"],
                   "--image", str(image), "--temperature", "0", "--max-new-tokens", str(n))
    assert rc == 0
    (first, second), conv = calls, conversations[0]
    eot, bos = tok.special("<|eot_id|>"), tok.bos_id
    stops = {eot, tok.special("<|end_of_text|>")}

    # turn 1: BOS, the image's 64 positions after the user header, the question; answered without stopping
    P = 64  # tiny CLIP: (64 / 8) ** 2 patches
    assert first["prompt"] == [bos] + user_turn(tok, "What is in the picture?", image_tokens=P)
    assert first["pixels"] is not None and first["cache_offset"] == 0 and len(first["answer"]) == n
    # the answers hold control tokens (so the next check can fail), and none of them was printed
    assert any(tok.is_special(t) and t not in stops for t in first["answer"] + second["answer"])
    assert_no_control_tokens(out, tok)
    for c in (first, second):
        assert tok.decode(c["answer"]) in out

    # turn 2 prefills only its own tokens on top of the cache: the whole history would be far more
    history = [bos] + user_turn(tok, "What is in the picture?", P) + first["answer"] + [eot] \
        + user_turn(tok, "And what colour is it?")
    assert conv.prefilled == [len(first["prompt"]), len(second["prompt"])]
    assert conv.prefilled[1] < len(history) - P
    assert second["cache_offset"] == len(first["prompt"]) + n - 1
    assert second["pixels"] is None and llava.IMAGE_TOKEN_INDEX not in second["prompt"]
    assert first["prompt"] + first["answer"][:-1] + second["prompt"] == history

    # ... and answers exactly what greedy decoding of the whole history from scratch answers
    pixels = clip.preprocess(clip.load_image(image), 64, pad_to_square=True)[None]
    model, _, _ = loader.load_model(model_dir, dtype=torch.float32)
    assert second["answer"] == greedy_full_forward(model, history, pixels, n, stops)
    # that reference can tell a broken continuation: a cache that lost turn 1, held another question, or missed
    # the <|eot_id|> that closed answer 1 would answer differently
    turn2 = user_turn(tok, "And what colour is it?")
    for wrong, px in [([bos] + turn2, None),
                      ([bos] + user_turn(tok, "Who is in the picture?", P) + first["answer"] + [eot] + turn2, pixels),
                      ([bos] + user_turn(tok, "What is in the picture?", P) + first["answer"] + turn2, pixels)]:
        assert greedy_full_forward(model, wrong, px, n, stops) != second["answer"]


def test_a_conversation_that_outgrows_its_cache_keeps_its_history(run, calls, conversations):
    """The KV cache is a power of two from 1,024 slots up to --context (each decode step reads all of it); a turn
    that no longer fits gets a cache twice as long holding the same history, and answers as a from-scratch decode of
    the whole history does."""
    model_dir, image, tok = run
    n, long_question = 6, " ".join(["Tell me more about it."] * 170)  # ~1,000 tokens: turn 2 needs > 1,024 slots
    rc, _ = talk(model_dir, ["What is in the picture?", long_question], "--context", "8192", "--image", str(image),
                 "--temperature", "0", "--max-new-tokens", str(n))
    assert rc == 0
    (first, second), conv = calls, conversations[0]
    assert first["max_cache_len"] == 1024 and second["cache_offset"] > 0
    need = second["cache_offset"] + len(second["prompt"]) + n
    assert 1024 < need <= 2048 and second["max_cache_len"] == 2048 == llava.cache_size(conv.model.llm)
    assert chat.cache_length(need, 1500) == 1500  # never past the context

    eot, stops = tok.special("<|eot_id|>"), {tok.special("<|eot_id|>"), tok.special("<|end_of_text|>")}
    history = first["prompt"] + first["answer"] + [eot] + user_turn(tok, long_question)
    assert first["prompt"] + first["answer"][:-1] + second["prompt"] == history
    pixels = clip.preprocess(clip.load_image(image), 64, pad_to_square=True)[None]
    model, _, _ = loader.load_model(model_dir, dtype=torch.float32)
    assert second["answer"] == greedy_full_forward(model, history, pixels, n, stops)
    # the reference tells a grown cache that lost the first turn
    assert greedy_full_forward(model, [tok.bos_id] + user_turn(tok, long_question), None, n, stops) != second["answer"]


def test_an_answer_that_stopped_is_closed_once(run, calls, monkeypatch):
    """An answer that ended at <|eot_id|> goes into the history as is; one cut by --max-new-tokens gets one."""
    model_dir, _, tok = run
    eot, hello = tok.special("<|eot_id|>"), tok.encode("Hello")[0]
    answers = iter([[hello, eot], [hello, hello], [hello, eot]])

    def scripted(model, prompts, pixel_values=None, on_token=None, **kw):
        new = next(answers)
        for t in new:
            on_token(0, t)
        calls.append({"prompt": list(prompts[0]), "answer": new, **kw})
        return [new]

    monkeypatch.setattr(chat, "generate", scripted)
    rc, out = talk(model_dir, ["one", "two", "three"], "--temperature", "0", "--max-new-tokens", "2")
    assert rc == 0 and out == "Hello\nHelloHello\nHello\n"
    assert calls[1]["prompt"] == [eot] + user_turn(tok, "two")            # not eot, eot
    assert calls[2]["prompt"] == [hello, eot] + user_turn(tok, "three")   # cut off: closed by the template
    assert calls[1]["cache_offset"] == len(calls[0]["prompt"]) + 1
    assert calls[2]["cache_offset"] == calls[1]["cache_offset"] + len(calls[1]["prompt"]) + 1


def test_reset_starts_over_and_exit_stops_reading(run, calls):
    model_dir, image, tok = run
    rc, out = talk(model_dir, ["Describe it.", "RESET", "Describe it.", "EXIT", "never read"],
                   "--image", str(image), "--temperature", "0", "--max-new-tokens", "6")
    assert rc == 0 and "[new conversation]" in out
    assert len(calls) == 2  # the line after EXIT was not answered
    for c in calls:  # after RESET: a new cache, BOS again, the image again
        assert c["cache_offset"] == 0 and c["prompt"][0] == tok.bos_id and c["pixels"] is not None
        assert c["prompt"].count(llava.IMAGE_TOKEN_INDEX) == 64
    assert calls[0]["answer"] == calls[1]["answer"]
    assert_no_control_tokens(out, tok)


def test_missing_image_is_reported_and_the_chat_goes_on(run, calls, tmp_path):
    model_dir, image, tok = run
    missing = tmp_path / "nope.jpg"
    rc, out = talk(model_dir, ["hello", f"IMAGE {tmp_path / 'gone.png'}", "still there?", f"IMAGE {image}", "and now?"],
                   "--image", str(missing), "--temperature", "0", "--max-new-tokens", "3")
    assert rc == 0
    assert f"cannot use image {missing}" in out and f"cannot use image {tmp_path / 'gone.png'}" in out
    assert len(calls) == 3
    # text-only until a readable image comes; the failed IMAGE kept the conversation going
    assert calls[0]["pixels"] is None and llava.IMAGE_TOKEN_INDEX not in calls[0]["prompt"]
    assert calls[1]["pixels"] is None and calls[1]["cache_offset"] > 0
    # a readable IMAGE starts a new conversation about it
    assert f"[new conversation about {image}]" in out
    assert calls[2]["cache_offset"] == 0 and calls[2]["prompt"].count(llava.IMAGE_TOKEN_INDEX) == 64


def test_text_only_with_system_prompt_in_the_first_turn_only(run, calls):
    model_dir, _, tok = run
    rc, out = talk(model_dir, ["hi", "how are you?"], "--system", "Be brief.", "--temperature", "0",
                   "--max-new-tokens", "4")
    assert rc == 0 and len(calls) == 2
    eot = tok.special("<|eot_id|>")
    system = header(tok, "system") + tok.encode("\n\nBe brief.") + [eot]
    assert calls[0]["prompt"] == [tok.bos_id] + system + user_turn(tok, "hi")
    assert calls[0]["pixels"] is None
    # turn 2: the previous answer's last token, its <|eot_id|>, the user turn; no BOS, no system block
    assert calls[1]["prompt"] == [calls[0]["answer"][-1], eot] + user_turn(tok, "how are you?")
    assert_no_control_tokens(out, tok)


def test_a_full_context_starts_a_new_conversation(run, calls):
    model_dir, _, tok = run
    # each text-only turn is 12-14 prompt tokens + 8 answer tokens: the third no longer fits in 48 slots
    rc, out = talk(model_dir, ["hi", "and?", "more?"], "--context", "48", "--temperature", "0", "--max-new-tokens", "8")
    assert rc == 0 and "starting a new one" in out
    assert [c["cache_offset"] > 0 for c in calls] == [False, True, False]
    assert calls[2]["prompt"] == [tok.bos_id] + user_turn(tok, "more?")
    rc, out = talk(model_dir, ["hi"], "--context", "16", "--max-new-tokens", "8")  # not even one turn fits
    assert rc == 0 and "raise --context or lower --max-new-tokens" in out and len(calls) == 3


def test_sampling_flags_reach_the_sampler(run, calls):
    model_dir, _, _ = run
    rc, _ = talk(model_dir, ["hi"], "--temperature", "0.7", "--top-k", "5", "--top-p", "0.9", "--max-new-tokens",
                 "3")
    assert rc == 0
    c = calls[0]
    assert (c["temperature"], c["top_k"], c["top_p"], c["max_new_tokens"]) == (0.7, 5, 0.9, 3)
    assert c["generator"] is not None


def test_prompt_flags_answer_and_exit_without_reading_stdin(run, calls):
    model_dir, _, tok = run
    out = io.StringIO()
    rc = chat.main(["--model", str(model_dir), "--prompt", "hi", "--prompt", "and?", "--max-new-tokens", "2",
                    "--temperature", "0"], stdin=io.StringIO("never read\n"), out=out)
    assert rc == 0 and len(calls) == 2 and calls[1]["cache_offset"] > 0  # one conversation of two turns


def test_defaults_are_xtuners():
    a = chat.parse_args([])
    assert (a.temperature, a.top_k, a.top_p, a.max_new_tokens) == (0.1, 40, 0.75, 2048)
    for bad in (["--max-new-tokens", "0"], ["--top-p", "0"], ["--top-k", "-1"]):
        with pytest.raises(SystemExit):
            chat.parse_args(bad)


def test_stats_print_time_to_first_token_and_rate(run):
    model_dir, _, _ = run
    rc, out = talk(model_dir, ["hi"], "--stats", "--compile", "--temperature", "0", "--max-new-tokens", "5")
    assert rc == 0 and "running eager on CPU" in out
    assert re.search(r"time to first token \d+ ms", out), out
    assert re.search(r"5 tokens \| [\d.]+ tok/s", out), out
    # compiling is the default on a GPU only: on the CPU no flag means eager without a word; --no-compile parses
    rc, out = talk(model_dir, ["hi"], "--temperature", "0", "--max-new-tokens", "2")
    assert rc == 0 and "eager" not in out
    assert chat.parse_args([]).compile is None and chat.parse_args(["--no-compile"]).compile is False


def test_no_model_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no runs/latest here
    rc = chat.main([], stdin=io.StringIO("hi\n"), out=io.StringIO())
    err = capsys.readouterr().err
    assert rc != 0
    assert "runs/latest" in err and "--model" in err and "train" in err.lower()
    rc = chat.main(["--model", str(tmp_path / "missing")], stdin=io.StringIO("hi\n"), out=io.StringIO())
    err = capsys.readouterr().err
    assert rc != 0 and str(tmp_path / "missing") in err and "--model" in err


def test_cli_end_to_end(run):
    model_dir, image, tok = run
    p = subprocess.run([sys.executable, "chat.py", "--model", str(model_dir), "--image", str(image),
                        "--temperature", "0", "--max-new-tokens", "8"],
                       input="What is this?\nAnd this?\nEXIT\n", capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    answers = p.stdout.strip("\n").split("\n")
    assert len(answers) >= 2 and any(a.strip() for a in answers), p.stdout
    assert_no_control_tokens(p.stdout, tok)


# ---- the streaming printer ----------------------------------------------------------------------------------------


def test_streamer_prints_multibyte_characters_split_across_tokens_once(run):
    _, _, tok = run
    text = "你好，世界！猫は🐈です。Ünïcödé 😀👍🏽 끝"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([t]) for t in ids), "no token splits a character: the test would prove nothing"
    out = io.StringIO()
    eot = tok.special("<|eot_id|>")
    printer = chat._Streamer(tok, out, [eot])
    for i, t in enumerate(ids):
        printer.push(t)
        if i == len(ids) // 2:
            printer.push(tok.special("<|start_header_id|>"))  # a control token in the middle is skipped
    printer.push(eot)
    printer.flush()
    assert out.getvalue() == text


# ---- model.sample -------------------------------------------------------------------------------------------------


def test_sample_greedy_limits():
    torch.manual_seed(0)
    logits = torch.randn(16, 1000) * 3
    greedy = logits.argmax(-1)
    assert torch.equal(llava.sample(logits, temperature=0.0), greedy)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(llava.sample(logits, temperature=1.0, top_k=1, generator=g), greedy)
    assert torch.equal(llava.sample(logits, temperature=1.0, top_p=1e-6, generator=g), greedy)
    assert torch.equal(llava.sample(logits, temperature=5.0, top_k=40, top_p=1e-6, generator=g), greedy)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, 1.0), (0.7, 0, 0.75), (1.3, 8, 0.6), (0.5, 40, 0.9)])
def test_sample_draws_follow_hf_filters(temperature, top_k, top_p):
    """Draws only from the tokens transformers' warpers keep, with their renormalised probabilities."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    torch.manual_seed(1)
    V, N = 50, 20000
    logits = torch.randn(1, V) * 2
    ref = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1.0:
        ref = TopPLogitsWarper(top_p)(None, ref)
    p_ref = ref.softmax(-1)[0]
    kept = set(torch.nonzero(p_ref > 0).flatten().tolist())
    assert 1 < len(kept) < V  # the filters cut something and leave a choice

    g = torch.Generator().manual_seed(0)
    draws = llava.sample(logits.expand(N, V), temperature, top_k, top_p, generator=g)
    assert set(draws.tolist()) <= kept
    freq = torch.bincount(draws, minlength=V).float() / N
    assert (freq - p_ref).abs().max() < 0.02  # 20k draws: one standard deviation is at most 0.0035
    again = llava.sample(logits.expand(N, V), temperature, top_k, top_p, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)  # a fixed generator repeats


def test_typed_image_placeholder_stays_text(run, calls):
    """`<image>` typed in a message is text, on the first turn with an image as on any other: the prompt holds exactly
    one image's positions per attached image, and the typed placeholder is encoded as the user typed it."""
    model_dir, image, tok = run
    typed = "What does <image> mean here?"
    rc, out = talk(model_dir, [typed, "and <image><image> now?"], "--image", str(image), "--temperature", "0",
                   "--max-new-tokens", "4")
    assert rc == 0 and len(calls) == 2
    assert calls[0]["prompt"] == [tok.bos_id] + user_turn(tok, typed, 64)  # one image; the typed one is text
    assert calls[0]["prompt"].count(llava.IMAGE_TOKEN_INDEX) == 64
    assert llava.IMAGE_TOKEN_INDEX not in calls[1]["prompt"]
    assert calls[1]["prompt"][-len(user_turn(tok, "and <image><image> now?")):] == user_turn(tok, "and <image><image> now?")
    # text-only: every typed placeholder stays text too
    calls.clear()
    rc, _ = talk(model_dir, [typed], "--temperature", "0", "--max-new-tokens", "2")
    assert rc == 0 and calls[0]["prompt"] == [tok.bos_id] + user_turn(tok, typed)
