"""The chat side of the HF LLaVA export (convert.py --to hf): the chat template as Jinja, and the processor and
generation configs, so that transformers builds the prompt and stops the answer as chat.py does:

    processor = AutoProcessor.from_pretrained(folder)
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    LlavaForConditionalGeneration.from_pretrained(folder).generate(**inputs)   # greedy, stops at <|eot_id|>

Files written: `chat_template.jinja` (read by the processor), `chat_template` in `tokenizer_config.json` (read by
the tokenizer), `processor_config.json` (LlavaProcessor: how many `<image>` tokens an image expands to) and
`generation_config.json` (the template's stop tokens, chat.py's 2048 new tokens, greedy). The image processor's
`preprocessor_config.json` is convert.py's.

The Jinja template is generated from the data.py template the model was trained with, so it renders the ids
data.encode_prompt / encode_reply build: BOS, a system message's block in front of the next user turn, the user's
images first as `<image>\\n` each (XTuner's rule, chat.py's too), then the text parts joined by newlines, and each
answer closed by the template's suffix (or EOS) and separator. Our templates' user turn already ends with the
assistant header, so `add_generation_prompt` changes nothing. Two differences stay, both in text transformers
tokenizes as one string: it matches special-token names typed in a message (`<|eot_id|>`, `<image>`) unless called
with `sanitize_control_tokens=True`, where ours never does; and where a turn ends in plain text (vicuna's
"ASSISTANT:"), an earlier answer's first characters can merge with it into one token, where data.py (as XTuner)
encodes the answer apart (llama3_chat's turns end in "\\n\\n", which the Llama-3 split keeps apart from an
answer's first word). The prompt being answered is the same in every template. References: transformers'
`LlavaProcessor` (models/llava/processing_llava.py) and `ProcessorMixin.apply_chat_template`.
"""

import json
import string
from pathlib import Path

import data
from weights import atomic_write, read_json, write_json

IMAGE_TOKEN = "<image>"  # the processor expands it to one token per image position, as transformers' LLaVA does


def _jinja_text(template_str, value):
    """A data.py template string as Jinja output: its text as string literals, its `{field}` as `value`."""
    out = []
    for literal, field, _, _ in string.Formatter().parse(template_str):
        if literal:
            out.append("{{- " + json.dumps(literal, ensure_ascii=False) + " -}}")
        if field is not None:
            out.append("{{- " + value + " -}}")
    return "".join(out)


def chat_template_jinja(template, bos_token="", eos_token=""):
    """The Jinja chat template (transformers' format) that renders `template` (a data.py template or its name),
    with our tokenizer's BOS and EOS names spelled out (transformers' `eos_token` is the end-of-turn token).

    Every literal is a string expression and every tag trims the whitespace around it, so the layout of this
    source never leaks into the rendered text (transformers renders with trim_blocks and lstrip_blocks)."""
    t = data.get_template(template)
    bos = _jinja_text(bos_token, "")
    eos = "" if t.suffix_as_eos else _jinja_text(eos_token, "")  # vicuna-style: EOS closes an answer
    return "\n".join([
        "{%- set ns = namespace(bos=true, content='') -%}",
        "{%- for message in messages -%}",
        "{%- if message['content'] is string -%}{%- set ns.content = message['content'] -%}",
        "{%- else -%}",
        "{%- set ns.content = '' -%}",
        "{%- for part in message['content'] if part['type'] == 'image' -%}"
        "{%- set ns.content = ns.content ~ '" + IMAGE_TOKEN + "\\n' -%}{%- endfor -%}",
        "{%- set ns.content = ns.content ~ (message['content'] | selectattr('type', 'equalto', 'text')"
        " | map(attribute='text') | join('\\n')) -%}",
        "{%- endif -%}",
        "{%- if message['role'] == 'system' -%}",
        "{%- if ns.bos -%}" + bos + "{%- set ns.bos = false -%}{%- endif -%}",
        "{%- if ns.content -%}" + _jinja_text(t.system, "ns.content") + "{%- endif -%}",
        "{%- elif message['role'] == 'user' -%}",
        "{%- if ns.bos -%}" + bos + "{%- set ns.bos = false -%}{%- endif -%}",
        _jinja_text(t.instruction, "ns.content"),
        "{%- elif message['role'] == 'assistant' -%}",
        "{{- ns.content -}}" + _jinja_text(t.suffix, "") + eos + _jinja_text(t.sep, ""),
        "{%- set ns.bos = " + ("false" if t.suffix_as_eos else "true") + " -%}",  # vicuna: BOS opens each turn
        "{%- else -%}{{- raise_exception('unknown role ' ~ message['role'] ~ ': system, user or assistant') -}}",
        "{%- endif -%}",
        "{%- endfor -%}",
    ]) + "\n"


def write_hf_chat_files(folder, tok, template, patch_size, pad_id, max_new_tokens=2048):
    """Write the chat template, processor_config.json and generation_config.json of an HF LLaVA folder whose
    tokenizer files (extras/hf_tokenizer.py) are already there. Greedy by default, stopping where chat.py stops:
    the template's end-of-turn token and the tokenizer's EOS (data.stop_token_ids)."""
    folder = Path(folder)
    name_of = {i: n for n, i in tok.special_tokens.items()}
    jinja = chat_template_jinja(template, name_of.get(tok.bos_id, ""), name_of.get(tok.eos_id, ""))
    with atomic_write(folder / "chat_template.jinja") as tmp:
        tmp.write_text(jinja, encoding="utf-8")
    config = read_json(folder / "tokenizer_config.json")
    write_json(folder / "tokenizer_config.json", {**config, "chat_template": jinja})
    write_json(folder / "processor_config.json", {
        "processor_class": "LlavaProcessor", "image_token": IMAGE_TOKEN, "patch_size": patch_size,
        # CLIP's output holds one CLS position before the patches ("additional"); LLaVA-1.5 drops it ("default"),
        # so an image is (size / patch)^2 positions, as model.LLaVA.encode_images gives them
        "num_additional_image_tokens": 1, "vision_feature_select_strategy": "default"})
    stops = data.stop_token_ids(tok, template)
    write_json(folder / "generation_config.json", {
        "bos_token_id": tok.bos_id, "eos_token_id": stops + [i for i in tok.stop_ids if i not in stops],
        "pad_token_id": pad_id, "max_new_tokens": max_new_tokens})
