"""The HF export's chat side (extras/hf_export.py via `convert.py --to hf`): transformers' AutoProcessor builds the
prompt with the exported chat template and LlavaForConditionalGeneration.generate answers and stops, with no
argument beyond the length, exactly as chat.py does.

The model is test_chat.py's tiny random LLaVA (a non-square picture, so the processor's pad-to-square counts). The
references: chat.py's own prompt ids, pixels and greedy tokens (through the same Conversation code), the
llama3_chat history built by hand, and data.py's encoding of a vicuna conversation.
"""

import io

import pytest
import torch
from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

import chat
import convert
import data
import model as llava
from extras import loader
from extras.hf_export import chat_template_jinja
from test_chat import header, run, user_turn  # noqa: F401 (run is a fixture)
from weights import read_json

IMAGE_ID = 128_257  # <image> in the export (xtuner/llava-llama-3-8b-v1_1-transformers' id)
N = 8


@pytest.fixture
def calls(monkeypatch):
    """chat.py's generate() calls: prompt, pixels and new tokens."""
    seen, real = [], chat.generate

    def recording(model, prompts, pixel_values=None, **kw):
        new = real(model, prompts, pixel_values, **kw)
        seen.append({"prompt": list(prompts[0]), "pixels": pixel_values, "answer": new[0]})
        return new

    monkeypatch.setattr(chat, "generate", recording)
    return seen


def export(model_dir, out):
    assert convert.main([str(model_dir), "--to", "hf", "--out", str(out), "--fp32"]) == 0
    return AutoProcessor.from_pretrained(out), LlavaForConditionalGeneration.from_pretrained(out).eval()


def hf_ids(ids):
    return [IMAGE_ID if i == llava.IMAGE_TOKEN_INDEX else i for i in ids]


def ask(processor, messages):
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")


@pytest.fixture(scope="module")
def stopping_run(run, tmp_path_factory):
    """The tiny model with <|eot_id|>'s output row made 1.01 x that of a word its answers use: where that word wins
    with a positive logit, the end of turn wins instead, so answers end there."""
    model_dir, _, tok = run
    model, _, _ = loader.load_model(model_dir, dtype=torch.float32)
    with torch.no_grad():
        w = model.llm.lm_head.weight
        w[tok.special("<|eot_id|>")] = 1.01 * w[tok.encode(" cat")[0]]
    out = tmp_path_factory.mktemp("stopping") / "model"
    loader.save_model(model, out, {**read_json(model_dir / "llava.json"), "llm_mode": "full"})
    return out


def test_processor_template_and_generate_give_chat_py_tokens(run, calls, tmp_path):
    model_dir, image, tok = run
    processor, hf = export(model_dir, tmp_path / "hf")
    assert type(processor).__name__ == "LlavaProcessor"
    assert chat.main(["--model", str(model_dir), "--image", str(image), "--system", "Be brief.", "--temperature",
                      "0", "--max-new-tokens", str(N), "--prompt", "What is in the picture?"], out=io.StringIO()) == 0
    (want,) = calls
    inputs = ask(processor, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [
        {"type": "image", "path": str(image)}, {"type": "text", "text": "What is in the picture?"}]}])
    assert inputs["input_ids"][0].tolist() == hf_ids(want["prompt"])  # BOS, system block, 64 image ids, question
    torch.testing.assert_close(inputs["pixel_values"], want["pixels"], rtol=0, atol=1e-6)  # padded to a square
    with torch.no_grad():
        new = hf.generate(**inputs, max_new_tokens=N)[0, inputs["input_ids"].shape[1]:]
    assert new.tolist() == want["answer"] and len(new) == N


def test_generation_config_stops_at_the_end_of_turn(run, stopping_run, calls, tmp_path):
    _, image, tok = run
    processor, hf = export(stopping_run, tmp_path / "hf")
    assert chat.main(["--model", str(stopping_run), "--image", str(image), "--temperature", "0", "--prompt",
                      "What is in the picture?"], out=io.StringIO()) == 0
    (want,) = calls
    assert want["answer"][-1] == tok.special("<|eot_id|>") and len(want["answer"]) < N  # chat.py stopped early
    inputs = ask(processor, [{"role": "user", "content": [
        {"type": "image", "path": str(image)}, {"type": "text", "text": "What is in the picture?"}]}])
    with torch.no_grad():
        new = hf.generate(**inputs)[0, inputs["input_ids"].shape[1]:]  # no argument: the folder's settings
    assert new.tolist() == want["answer"]


def test_template_renders_the_trained_history(run, tmp_path):
    model_dir, image, tok = run
    out = tmp_path / "hf"
    processor, _ = export(model_dir, out)
    conversation = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "image", "path": str(image)},
                                                 {"type": "text", "text": "What is it?"}]},
                    {"role": "assistant", "content": "A red box."},
                    {"role": "user", "content": [{"type": "text", "text": "And"}, {"type": "text", "text": "then?"}]}]
    eot = tok.special("<|eot_id|>")
    history = [tok.bos_id] + header(tok, "system") + tok.encode("\n\nBe brief.") + [eot] \
        + user_turn(tok, "What is it?", 64) + tok.encode("A red box.") + [eot] + user_turn(tok, "And\nthen?")
    assert ask(processor, conversation)["input_ids"][0].tolist() == hf_ids(history)
    # the files transformers reads: the template for the processor and the tokenizer, the image settings
    assert (out / "chat_template.jinja").read_text() == read_json(out / "tokenizer_config.json")["chat_template"]
    assert AutoTokenizer.from_pretrained(out).chat_template == processor.chat_template
    assert read_json(out / "processor_config.json").items() >= {
        "patch_size": 8, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}.items()
    assert read_json(out / "generation_config.json")["eos_token_id"] == [eot, tok.special("<|end_of_text|>")]

    # another template (vicuna: BOS every turn, EOS and a newline after each answer) renders as data.py encodes it.
    # Its turn ends in text ("ASSISTANT:"), which transformers encodes together with the answer after it and data.py
    # (as XTuner) apart: the answer here starts with a space, which the Llama-3 split keeps apart in both
    hf_tok = AutoTokenizer.from_pretrained(out)
    vicuna = chat_template_jinja("vicuna", "<|begin_of_text|>", "<|end_of_text|>")
    conversation[2]["content"] = " A red box."
    got = hf_tok.apply_chat_template([{**conversation[0], "content": "Be kind."}, *conversation[1:]],
                                     chat_template=vicuna, tokenize=True, return_dict=True)["input_ids"]
    want = data.encode_prompt(tok, "vicuna", "<image>\nWhat is it?", system="Be kind.", image_tokens=1, images=1) \
        + data.encode_reply(tok, "vicuna", " A red box.") \
        + data.encode_prompt(tok, "vicuna", "And\nthen?", first_turn=False, images=0)
    assert got == hf_ids(want)
