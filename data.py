"""The data side of LLaVA: records -> conversations -> token ids and label masks -> batches.

    record (LLaVA json / jsonl, or OpenAI `messages`)
      -> parse_record         XTuner's conversation rules                      -> Sample(turns, images)
      -> encode_conversation  the chat template, built one message at a time  -> input_ids, labels
      -> fit_length           the length policy (image positions count)       -> kept / truncated / dropped
      -> collate              a (B, T) batch for model.LLaVA, images checked against their positions

extras/datasets.py reads records files (json / jsonl) and holds the datasets built from these steps (images loaded per
item by clip.preprocess); extras/samplers.py the epoch orders, extras/packing.py the packing of text samples.

Token-for-token equal to XTuner v0.2.0 (`xtuner/dataset/map_fns/dataset_map_fns/{llava,openai}_map_fn.py`,
`.../template_map_fn.py`, `encode_fn` in `xtuner/dataset/utils.py`, `xtuner/utils/templates.py`,
`xtuner/dataset/samplers/length_grouped.py`), but for these deliberate differences:

* Text spelling a control token (`<|eot_id|>` typed by a user) stays text: only the template's own `<|...|>` pieces
  become control ids. As XTuner encodes each message in one call, the plain text between two control tokens or
  images (template and user text together) is one `tok.encode` call, so BPE merges across that boundary alike.
* Every image is `image_tokens` (576) IMAGE_TOKEN_INDEX positions and `max_length` counts them. A too-long sample
  keeps its longest prefix of whole turns that fits; if no whole turn fits it is cut inside the first answer; if
  that leaves nothing supervised (or cuts into an image) it is dropped (XTuner cuts text tokens blindly).
* Several images per record: a message with k placeholders becomes `"<image>\n" * k + stripped text` (XTuner's
  rule for k = 1); placeholders and images pair up in order, and their counts must agree.
* Bad data never crashes an epoch: a bad record is dropped at build time, counted and listed by `problems()`; an
  image that fails to load is reported with a warning and a sample drawn at random is trained instead (batch sizes
  never change). `python tools/check_data.py check DATA...` finds them all up front.
"""
import json
import re
import string
from dataclasses import dataclass

import numpy as np
import torch

from tokenizer import IGNORE_INDEX, IMAGE_TOKEN_INDEX

IMAGE_PLACEHOLDER = "<image>"


class DataError(ValueError):
    """A data file (not one record) cannot be read; the message names the file and what to do."""


class DataWarning(UserWarning):
    """A sample was replaced at load time because its image could not be read."""


# ----------------------------------------------------------------------------------------------------------------
# Chat templates, as data (XTuner's PROMPT_TEMPLATE)


@dataclass(frozen=True)
class Template:
    """One chat template. `{system}` and `{input}` are filled in; `<|name|>` pieces are control tokens."""

    system: str  # put before a turn's instruction only when that turn has a system text
    instruction: str  # the user's turn, up to and including the assistant header; label -100
    suffix: str = ""  # appended to every answer, supervised (llama3: <|eot_id|>)
    suffix_as_eos: bool = False  # the suffix ends an answer: no EOS token, and BOS only once per sample
    sep: str = ""  # after each answer (and its EOS), label -100
    stop_words: tuple = ()  # generation stops on these, besides the tokenizer's EOS


TEMPLATES = {
    "llama3_chat": Template(
        system="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
        instruction="<|start_header_id|>user<|end_header_id|>\n\n{input}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        suffix="<|eot_id|>", suffix_as_eos=True, stop_words=("<|eot_id|>",)),
    "internlm2_chat": Template(
        system="<|im_start|>system\n{system}<|im_end|>\n",
        instruction="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
        suffix="<|im_end|>", suffix_as_eos=True, sep="\n", stop_words=("<|im_end|>",)),
    # XTuner's vicuna, not LLaVA-v1.5's own: no system prompt unless one is given, "\n" after each answer's EOS
    "vicuna": Template(
        system="A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. {system}\n ",
        instruction="USER: {input} ASSISTANT:", sep="\n"),
}


def get_template(template):
    if isinstance(template, Template):
        return template
    if template not in TEMPLATES:
        raise KeyError(f"unknown template {template!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[template]


# ----------------------------------------------------------------------------------------------------------------
# Records -> conversations (XTuner's llava_map_fn and openai_map_fn)


@dataclass
class Turn:
    input: str  # the user's text; each `<image>` marks where one image goes
    output: str  # the answer
    system: str = ""  # a system text for this turn (OpenAI `messages` records only)
    loss: bool = True  # whether the answer is supervised


@dataclass
class Sample:
    id: str
    turns: list
    images: list  # image paths relative to the image folder, one per `<image>`, in order
    line: int = 0  # 1-based line where the record starts in its file
    index: int = 0  # 0-based number of the record in its file


@dataclass
class Problem:
    """One bad record: where it is (file, 0-based record index, 1-based line, id) and why it was dropped."""

    file: str
    index: int
    line: int
    id: str
    reason: str
    image: str = ""

    def __str__(self):
        image = f" image {self.image}:" if self.image else ""
        return f"{self.file}:{self.line}: record {self.id}:{image} {self.reason}"


class RecordError(ValueError):
    """A record breaks the conversation rules; `reason` says how."""

    def __init__(self, reason, record_id=None):
        super().__init__(reason if record_id is None else f"record {record_id}: {reason}")
        self.reason, self.record_id = reason, record_id


def _image_first(text):
    # XTuner puts one "<image>\n" before the stripped text; we put one per image, to pair with the record's `image`
    k = text.count(IMAGE_PLACEHOLDER)
    if k == 0:
        return text
    return ((IMAGE_PLACEHOLDER + "\n") * k + text.replace(IMAGE_PLACEHOLDER, "").strip()).strip()


def _llava_turns(messages):
    if not isinstance(messages, list):
        raise RecordError("'conversations' must be a list of {'from', 'value'} objects")
    turns, question, started = [], "", False
    for i, m in enumerate(messages):
        sender = m.get("from") if isinstance(m, dict) else None
        if sender not in ("human", "gpt"):
            raise RecordError(f"conversations[{i}] has unknown 'from' {sender!r} (expected 'human' or 'gpt')")
        if sender == "gpt" and not started:
            continue  # a leading answer has no question: dropped, as XTuner does
        started = True
        value = m.get("value")
        if not isinstance(value, str):
            raise RecordError(f"conversations[{i}] has no string 'value'")
        if sender == "human":
            question += _image_first(value)  # consecutive human messages are concatenated with no separator
        else:
            turns.append(Turn(question, value))
            question = ""
    return turns  # a trailing question without an answer is dropped


def _openai_turns(messages):
    if not isinstance(messages, list):
        raise RecordError("'messages' must be a list of {'role', 'content'} objects")
    turns, question, system, started = [], "", "", False
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "user", "assistant"):
            raise RecordError(f"messages[{i}] has unknown 'role' {role!r} (expected system, user or assistant)")
        if role == "assistant" and not started:
            continue  # leading assistant messages are dropped
        started = True
        content = m.get("content")
        if not isinstance(content, str):
            raise RecordError(f"messages[{i}] has no string 'content' (lists of content parts are not supported)")
        if role == "system":
            system = content  # applies to the next answer
        elif role == "user":
            question += _image_first(content)
        else:
            loss = str(m.get("loss", True)).lower() == "true"  # XTuner's reading: true, "true", "True"
            turns.append(Turn(question, content, system, loss))
            question, system = "", ""
    return turns


def parse_record(record, line=0, index=0):
    """One LLaVA or OpenAI-messages record -> Sample. Raises RecordError (naming the record) if it is bad."""
    if not isinstance(record, dict):
        raise RecordError("a record must be a JSON object", f"at line {line}")
    rid = str(record["id"]) if record.get("id") is not None else f"at line {line}"
    try:
        images = record.get("image")
        if images is None:
            images = []
        elif isinstance(images, str) and images:
            images = [images]
        elif not (isinstance(images, list) and all(isinstance(p, str) and p for p in images)):
            raise RecordError(f"'image' must be a path or a list of paths, not {json.dumps(images)[:80]}")
        if "conversations" in record:
            turns = _llava_turns(record["conversations"])
        elif "messages" in record:
            turns = _openai_turns(record["messages"])
        else:
            raise RecordError("has neither 'conversations' nor 'messages'")
        if not turns:
            raise RecordError("has no complete turn (a question followed by an answer)")
        n = sum(t.input.count(IMAGE_PLACEHOLDER) for t in turns)
        if n and not images:
            raise RecordError(f"has {n} <image> placeholder(s) but no 'image'")
        if n > len(images):
            raise RecordError(f"has {n} <image> placeholders but only {len(images)} image(s)")
        if n < len(images):
            raise RecordError(f"has {len(images)} image(s) but {n} <image> placeholder(s) in its questions")
    except RecordError as e:
        raise RecordError(e.reason, rid) from None
    return Sample(rid, turns, images, line, index)


# ----------------------------------------------------------------------------------------------------------------
# Conversations -> token ids and labels, one message at a time (XTuner's template_map_fn + encode_fn)

_CONTROL = re.compile(r"(<\|[^|\s]+\|>)")  # a control token spelled in a template: <|eot_id|>, <|im_start|>
TEMPLATE, TEXT, IMAGE = "template", "text", "image"  # kinds of parts of one encoded unit


def _fill(template_str, images=-1, **values):
    """Split a template string into parts: its own text (TEMPLATE) and the filled-in values (TEXT, IMAGE). Only the
    first `images` placeholders of the input become images (-1: all); later ones stay text."""
    parts = []
    for literal, name, _, _ in string.Formatter().parse(template_str):
        if literal:
            parts.append((TEMPLATE, literal))
        if name is None:
            continue
        if name not in values:
            raise KeyError(f"template field {{{name}}} is not one of {sorted(values)}")
        pieces = values[name].split(IMAGE_PLACEHOLDER, images) if name == "input" else [values[name]]
        for j, piece in enumerate(pieces):
            if j:
                parts.append((IMAGE, None))  # only the user's input holds images
            parts.append((TEXT, piece))
    return parts


def _encode_unit(tok, parts, image_tokens):
    """Encode parts the way XTuner encodes one string: control tokens and images cut it; the plain text between
    two cuts (template text and data text together) is one plain `tok.encode` call."""
    ids, buffer = [], []

    def flush():
        text = "".join(buffer)
        if text:
            ids.extend(tok.encode(text))
        buffer.clear()

    for kind, value in parts:
        if kind == IMAGE:
            flush()
            ids.extend([IMAGE_TOKEN_INDEX] * image_tokens)
        elif kind == TEXT:
            buffer.append(value)  # data text: never looked at for control tokens
        else:
            for j, piece in enumerate(_CONTROL.split(value)):  # odd pieces are the control token names
                if j % 2:
                    flush()
                    ids.append(tok.special(piece))
                else:
                    buffer.append(piece)
    flush()
    return ids


def _encode(tok, template, turns, image_tokens):
    """-> input_ids, labels, ends (index after each turn). BOS / EOS / SEP rules of XTuner's encode_fn."""
    template = get_template(template)
    ids, labels, ends, need_bos = [], [], [], True
    for t in turns:
        t = t if isinstance(t, Turn) else Turn(**t)
        parts = _fill(template.system, system=t.system) if t.system else []
        prompt = _encode_unit(tok, parts + _fill(template.instruction, input=t.input), image_tokens)
        if need_bos and tok.bos_id is not None:
            prompt = [tok.bos_id] + prompt
        answer = _encode_unit(tok, [(TEXT, t.output), (TEMPLATE, template.suffix)], image_tokens)
        if not template.suffix_as_eos:
            answer.append(tok.eos_id)  # vicuna-style: EOS closes the answer (supervised), next turn gets a BOS
        need_bos = not template.suffix_as_eos
        sep = _encode_unit(tok, [(TEMPLATE, template.sep)], image_tokens)
        ids += prompt + answer + sep
        labels += [IGNORE_INDEX] * len(prompt)
        labels += answer if t.loss else [IGNORE_INDEX] * len(answer)
        labels += [IGNORE_INDEX] * len(sep)
        ends.append(len(ids))
    return ids, labels, ends


def encode_conversation(tok, template, turns, image_tokens=576):
    """Turns (Turn or {"input", "output", ...} dicts) -> (input_ids, labels), lists of equal length. Each `<image>`
    in a turn's input becomes `image_tokens` IMAGE_TOKEN_INDEX positions; prompts are labelled IGNORE_INDEX, answers
    (with the template's suffix / EOS) by their own ids unless the turn has loss=False."""
    return _encode(tok, template, turns, image_tokens)[:2]


def encode_prompt(tok, template, text, system=None, first_turn=True, image_tokens=576, images=-1):
    """Ids of one user turn for generation, ending with the assistant header (chat.py, eval_mmbench.py).
    `text` is used as given (put "<image>\\n" in front yourself, as XTuner's chat and MMBench do). Only its first
    `images` placeholders become image positions (-1: all): with images=1 for the one attached picture, a `<image>`
    the user typed stays text. BOS comes on the first turn, and on every turn for templates whose training samples
    have one per turn (vicuna)."""
    template = get_template(template)
    parts = _fill(template.system, system=system) if system else []
    ids = _encode_unit(tok, parts + _fill(template.instruction, images=images, input=text), image_tokens)
    bos = first_turn or not template.suffix_as_eos
    return ([tok.bos_id] if bos and tok.bos_id is not None else []) + ids


def encode_reply(tok, template, text):
    """Ids of an answer as it sits in the history before the next turn: text + suffix or EOS, then SEP."""
    template = get_template(template)
    ids = _encode_unit(tok, [(TEXT, text), (TEMPLATE, template.suffix)], 0)
    if not template.suffix_as_eos:
        ids.append(tok.eos_id)
    return ids + _encode_unit(tok, [(TEMPLATE, template.sep)], 0)


def stop_token_ids(tok, template):
    """Token ids that end a generated answer: the template's stop words and the tokenizer's EOS."""
    ids = [tok.special(w) for w in get_template(template).stop_words]
    return ids + [i for i in [tok.eos_id] if i is not None and i not in ids]


# ----------------------------------------------------------------------------------------------------------------
# The length policy: max_length counts the image positions


def fit_length(ids, labels, ends, max_length, image_tokens):
    """Where to cut a sample given in compact form (one IMAGE_TOKEN_INDEX per image) -> (cut or None, status).
    status: "kept", "truncated_at_turn" (longest prefix of whole turns that fits), "truncated_in_answer" (no whole
    turn fits: cut at max_length, which lands after the first supervised token), "too_long" (dropped: any cut leaves
    no supervised token) or "no_supervised" (dropped: nothing to learn from). Images are single compact positions
    here, so a cut can never fall inside one."""
    ids, supervised = np.asarray(ids), np.asarray(labels) != IGNORE_INDEX
    if not supervised.any():
        return None, "no_supervised"
    # full[c] = length of ids[:c] once every image becomes image_tokens positions
    full = np.concatenate([[0], np.cumsum(np.where(ids == IMAGE_TOKEN_INDEX, image_tokens, 1))])
    if full[-1] <= max_length:
        return len(ids), "kept"
    need = int(np.argmax(supervised)) + 1  # a prefix must reach past the first supervised token
    fits = [e for e in ends if e >= need and full[e] <= max_length]
    if fits:
        return fits[-1], "truncated_at_turn"
    cut = int(np.searchsorted(full, max_length, side="right")) - 1  # longest prefix that fits
    if cut >= need:
        return cut, "truncated_in_answer"
    return None, "too_long"


def encode_sample(tok, template, sample, max_length, image_tokens):
    """A Sample -> (ids, labels, status, reason): compact ids and labels (one IMAGE_TOKEN_INDEX per image) cut by
    fit_length, or None, None and the reason it is dropped."""
    ids, labels, ends = _encode(tok, template, sample.turns, 1)
    cut, status = fit_length(ids, labels, ends, max_length, image_tokens)
    if cut is None:
        reason = {"too_long": f"longer than max_length {max_length} before its first supervised token",
                  "no_supervised": "has no supervised token"}[status]
        return None, None, status, reason
    return ids[:cut], labels[:cut], status, None


# ----------------------------------------------------------------------------------------------------------------
# Collate


def collate(batch, pad_id=0, image_tokens=None):
    """Right-pad a list of items -> {"input_ids" (B, T) long, "labels" (B, T) long, "pixel_values" (N_img, 3, S, S)
    in sample order or None, "n_images" (B,) long, "ids", "replaced"}. Padding is never attended to by a real
    token (causal attention, padding on the right) and its label is IGNORE_INDEX."""
    T = max(len(x["input_ids"]) for x in batch)
    input_ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
    n_images = torch.zeros(len(batch), dtype=torch.long)
    pixel_values = []
    for b, x in enumerate(batch):
        t = len(x["input_ids"])
        input_ids[b, :t], labels[b, :t] = x["input_ids"], x["labels"]
        if x.get("pixel_values") is not None:
            pixel_values.append(x["pixel_values"])
            n_images[b] = len(x["pixel_values"])
        # the model splices images in order over the whole batch: a count mismatch would shift every later image
        positions = int((x["input_ids"] == IMAGE_TOKEN_INDEX).sum())
        per_image = image_tokens or (positions // int(n_images[b]) if n_images[b] else 0)
        if positions != int(n_images[b]) * per_image or (positions > 0) != (n_images[b] > 0):
            raise ValueError(f"sample {x.get('id')}: {positions} image positions but {int(n_images[b])} image(s)"
                             f" of {image_tokens or 'equal'} positions each")
    return {"input_ids": input_ids, "labels": labels, "n_images": n_images,
            "pixel_values": torch.cat(pixel_values) if pixel_values else None,
            "ids": [x.get("id") for x in batch], "replaced": [r for x in batch for r in x.get("replaced", [])]}
