"""The data side of LLaVA: records -> conversations -> token ids and label masks -> batches.

    record (LLaVA json / jsonl, or OpenAI `messages`)
      -> parse_record        XTuner's conversation rules                      -> Sample(turns, images)
      -> encode_conversation the chat template, built one message at a time  -> input_ids, labels
      -> fit_length          the length policy (image positions count)       -> kept / truncated / dropped
      -> LLaVADataset[i]     + pixel_values (n_images, 3, S, S) from clip.preprocess
      -> ShuffleSampler (pretrain) / LengthGroupedSampler (finetune) -> collate -> (B, T) batch for model.LLaVA
      (text-only SFT may pack: PackedDataset rows of several samples -> collate_packed adds position_ids and
      segment_ids, so that each sample attends only to itself)

Token-for-token equal to XTuner v0.2.0 (`xtuner/dataset/map_fns/dataset_map_fns/{llava,openai}_map_fn.py`,
`xtuner/dataset/map_fns/template_map_fn.py`, `encode_fn` in `xtuner/dataset/utils.py`, `xtuner/utils/templates.py`,
`xtuner/dataset/samplers/length_grouped.py`; ../shared/reference/xtuner_llava_behaviour.md §2-3), except where
SPEC §2 asks for a deliberate difference:

* Text that spells a control token (`<|eot_id|>` typed by a user) stays text: data text goes through the plain
  `tok.encode`; only the template's own `<|...|>` pieces become control ids (`tok.special`).
  Like XTuner's one `tokenizer.encode(SYSTEM + INSTRUCTION.format(input=...))` call per message, the plain text
  between two control tokens / images is encoded in one call, template text and user text together, so BPE (or
  sentencepiece's leading space) merges across that boundary exactly as XTuner's tokenizer does ("USER: What").
* Every image is `image_tokens` (576) consecutive IMAGE_TOKEN_INDEX positions in `input_ids`, and `max_length`
  counts them. Length policy (XTuner cuts text tokens blindly): a too-long sample keeps its longest prefix of whole
  turns that fits (answers stay terminated); if not even its first turn fits, it is cut inside that turn's answer
  (the answer then has no end token); if that would leave no supervised token, or cut into an image, it is dropped.
  Truncated and dropped samples are counted and reported by the dataset, never silently lost.
* Several images per record (`"image": [a, b]`): each human message holding k placeholders becomes
  `"<image>\n" * k + stripped text` (XTuner's rule for k = 1), placeholders and images pair up in order, and the
  counts must agree. A record whose counts disagree is bad.
* Bad data never crashes an epoch. Text-level problems (unreadable line, no conversations, unknown `from`, an
  `<image>` without an image, more placeholders than images, too long, nothing supervised) drop the record at build
  time, counted, with file, line and id. An image that fails to load at `__getitem__` (missing, truncated, not an
  image) is reported with a warning naming the record and file, and the next sample (in dataset order) that loads
  is returned instead, so batch sizes never change; the item says which records it replaced (`"replaced"`).
  `python data.py check` finds all of them up front.
* Samplers count image positions in lengths, never repeat samples to round up (the last `n % world_size` samples
  of an epoch's order are left out, at most world_size - 1, reported as `sampler.n_left_out`), and resume by skipping
  indices (`set_epoch(epoch, start_index)`) instead of replaying the loader.

Data specs (`--data`, repeatable; each spec is one source, sources are concatenated in order like XTuner's
InternVL-SFT `ConcatDataset`): `records.json[:IMAGE_FOLDER]` or `records.jsonl[:IMAGE_FOLDER]` (a .json file
holding a list of records), or a mix file `mix.json` holding `{"datasets": [{"path": ..., "image_folder": ...}]}`
(paths relative to the mix file). A source without an image folder uses `--image-folder`, else its own directory.

CLI:  python data.py check DATA... [--image-folder DIR] [--tokenizer FOLDER] [--template T] [--max-length N]
      python data.py show DATA... --tokenizer FOLDER [--n N] [--jsonl]
"""

import argparse
import json
import os
import re
import string
import sys
import warnings
from array import array
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import clip

IMAGE_TOKEN_INDEX = -200  # XTuner's placeholder id for one image position; never a vocabulary id
IGNORE_INDEX = -100  # label of a position the loss skips (torch cross_entropy's default ignore_index)
IMAGE_PLACEHOLDER = "<image>"


class DataError(ValueError):
    """A data file (not one record) cannot be read; the message names the file and what to do."""


class DataWarning(UserWarning):
    """A sample was replaced at load time because its image could not be read."""


# ----------------------------------------------------------------------------------------------------------------
# Chat templates, as data (XTuner's PROMPT_TEMPLATE, ../shared/reference/xtuner_llava_behaviour.md §3)


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
        suffix="<|eot_id|>",
        suffix_as_eos=True,
        stop_words=("<|eot_id|>",),
    ),
    "internlm2_chat": Template(
        system="<|im_start|>system\n{system}<|im_end|>\n",
        instruction="<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
        suffix="<|im_end|>",
        suffix_as_eos=True,
        sep="\n",
        stop_words=("<|im_end|>",),
    ),
    # XTuner's vicuna, not LLaVA-v1.5's own: no system prompt unless one is given, "\n" after each answer's EOS
    "vicuna": Template(
        system="A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. {system}\n ",
        instruction="USER: {input} ASSISTANT:",
        sep="\n",
    ),
}


def get_template(template):
    if isinstance(template, Template):
        return template
    if template not in TEMPLATES:
        raise KeyError(f"unknown template {template!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[template]


# ----------------------------------------------------------------------------------------------------------------
# Records -> conversations (XTuner's llava_map_fn and openai_map_fn, §2.2)


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


@dataclass
class Problem:
    """One bad record, for reports: where it is and why it was dropped."""

    file: str
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
    # XTuner: every `<image>` is removed and one "<image>\n" goes in front of the stripped text; we keep one
    # placeholder per image so several images pair up with the record's `image` list, in order.
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


def parse_record(record, line=0):
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
    return Sample(rid, turns, images, line)


_WS = re.compile(r"[ \t\n\r]*")


def _json_list(text, path):
    # raw_decode one element at a time (instead of json.loads) so every record knows its line number
    decoder, pos = json.JSONDecoder(), _WS.match(text, 0).end()
    if text[pos : pos + 1] != "[":
        raise DataError(f"{path}: a .json records file must hold a list of records (use .jsonl for one per line)")
    pos = _WS.match(text, pos + 1).end()
    line, counted = 1 + text.count("\n", 0, pos), pos
    if text[pos : pos + 1] == "]":
        return
    while True:
        line, counted = line + text.count("\n", counted, pos), pos
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        yield line, obj
        pos = _WS.match(text, pos).end()
        if text[pos : pos + 1] == "]":
            return
        if text[pos : pos + 1] != ",":
            raise DataError(f"{path}: expected ',' or ']' at line {1 + text.count(chr(10), 0, pos)}")
        pos = _WS.match(text, pos + 1).end()


def read_records(path):
    """Yield (line, record, error) for every record of a .json list or a .jsonl file; error is a string or None.

    A bad .jsonl line is one bad record; a .json list that does not parse is a DataError (it cannot be resynced).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no records file at {path}")
    with open(path, encoding="utf-8") as f:
        if path.suffix == ".jsonl":
            for line, text in enumerate(f, 1):
                if text.strip():
                    try:
                        yield line, json.loads(text), None
                    except json.JSONDecodeError as e:
                        yield line, None, f"invalid JSON: {e.msg} (column {e.colno})"
        else:
            for line, record in _json_list(f.read(), path):
                yield line, record, None


def iter_samples(path):
    """Yield a Sample for every good record of a file and a Problem for every bad one."""
    for line, record, error in read_records(path):
        rid = str(record.get("id")) if isinstance(record, dict) and record.get("id") is not None else "?"
        if error is not None:
            yield Problem(str(path), line, rid, error)
            continue
        try:
            yield parse_record(record, line)
        except RecordError as e:
            yield Problem(str(path), line, rid, e.reason)


# ----------------------------------------------------------------------------------------------------------------
# Conversations -> token ids and labels, one message at a time (XTuner's template_map_fn + encode_fn, §2.3-2.4)

_CONTROL = re.compile(r"(<\|[^|\s]+\|>)")  # a control token spelled in a template: <|eot_id|>, <|im_start|>
TEMPLATE, TEXT, IMAGE = "template", "text", "image"  # kinds of parts of one encoded unit


def _fill(template_str, **values):
    """Split a template string into parts: its own text (TEMPLATE) and the filled-in values (TEXT, IMAGE)."""
    parts = []
    for literal, name, _, _ in string.Formatter().parse(template_str):
        if literal:
            parts.append((TEMPLATE, literal))
        if name is None:
            continue
        if name not in values:
            raise KeyError(f"template field {{{name}}} is not one of {sorted(values)}")
        pieces = values[name].split(IMAGE_PLACEHOLDER) if name == "input" else [values[name]]
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
    """Turns (Turn or {"input", "output", ...} dicts) -> (input_ids, labels), lists of equal length.

    Each `<image>` in a turn's input becomes `image_tokens` IMAGE_TOKEN_INDEX positions; prompts are labelled
    IGNORE_INDEX, answers (with the template's suffix / EOS) by their own ids unless the turn has loss=False.
    """
    ids, labels, _ = _encode(tok, template, turns, image_tokens)
    return ids, labels


def encode_prompt(tok, template, text, system=None, first_turn=True, image_tokens=576):
    """Ids of one user turn for generation, ending with the assistant header (chat.py, eval_mmbench.py).

    `text` is used as given (put "<image>\\n" in front yourself, as XTuner's chat and MMBench do). BOS comes on the
    first turn, and on every turn for templates whose training samples have one per turn (vicuna).
    """
    template = get_template(template)
    parts = _fill(template.system, system=system) if system else []
    ids = _encode_unit(tok, parts + _fill(template.instruction, input=text), image_tokens)
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
# Length policy (SPEC §2: max_length counts the image positions)


def fit_length(ids, labels, ends, max_length, image_tokens):
    """Where to cut a sample given in compact form (one IMAGE_TOKEN_INDEX per image) -> (cut or None, status).

    status: "kept", "truncated_at_turn" (longest prefix of whole turns that fits), "truncated_in_answer" (no whole
    turn fits: cut at max_length, which lands after the first supervised token), "too_long" (dropped: any cut
    leaves no supervised token) or "no_supervised" (dropped: nothing to learn from). Images are single compact
    positions here, so a cut can never fall inside one.
    """
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


# ----------------------------------------------------------------------------------------------------------------
# Datasets


def _log_stderr(msg):
    print(msg, file=sys.stderr)


class LLaVADataset(torch.utils.data.Dataset):
    """One records file + its image folder, tokenized up front, images loaded per item.

    Item: {"id", "input_ids" (T,) long, "labels" (T,) long, "pixel_values" (n_images, 3, S, S) float32 or None
    (text-only: no dummy image), "replaced": [records skipped because their image failed]}.
    Token ids are kept compactly (one IMAGE_TOKEN_INDEX per image, numpy arrays), so the dataset is small, shares
    well with forked DataLoader workers and pickles (it keeps no tokenizer).
    """

    def __init__(self, records_path, image_folder, tok, template="llama3_chat", image_tokens=576, image_size=336,
                 image_mode="pad", max_length=2048, progress=True, log=_log_stderr):
        if image_mode not in ("pad", "crop"):
            raise ValueError(f"image_mode must be 'pad' (finetune) or 'crop' (pretrain), not {image_mode!r}")
        self.records_path = Path(records_path)
        if not self.records_path.is_file():
            raise DataError(f"no records file at {self.records_path} (a --data spec is RECORDS.json[:IMAGE_FOLDER])")
        self.image_folder = Path(image_folder) if image_folder else self.records_path.parent
        self.image_tokens, self.image_size, self.image_mode = image_tokens, image_size, image_mode
        template = get_template(template)
        ids, supervised, offsets = array("i"), array("b"), [0]
        self.record_ids, self.lines, self.image_paths = [], [], []
        self.stats, self.problems = Counter(), []
        big = progress and self.records_path.stat().st_size > 20_000_000
        for s in tqdm(iter_samples(self.records_path), desc=f"tokenizing {self.records_path.name}",
                      unit=" records", disable=not big, mininterval=2):
            self.stats["records"] += 1
            if isinstance(s, Problem):
                self.stats["bad_record"] += 1
                self.problems.append(s)
                continue
            sample_ids, labels, ends = _encode(tok, template, s.turns, 1)
            cut, status = fit_length(sample_ids, labels, ends, max_length, image_tokens)
            self.stats[status] += 1
            if cut is None:
                reason = {"too_long": f"longer than max_length {max_length} before its first supervised token",
                          "no_supervised": "has no supervised token"}[status]
                self.problems.append(Problem(str(self.records_path), s.line, s.id, reason))
                continue
            ids.extend(sample_ids[:cut])
            supervised.extend(label != IGNORE_INDEX for label in labels[:cut])
            offsets.append(len(ids))
            n_images = sample_ids[:cut].count(IMAGE_TOKEN_INDEX)  # a turn cut off takes its images with it
            self.record_ids.append(s.id)
            self.lines.append(s.line)
            self.image_paths.append(tuple(s.images[:n_images]))
        self.ids = np.frombuffer(ids, dtype=np.int32) if ids else np.zeros(0, np.int32)
        self.supervised = np.frombuffer(supervised, dtype=np.int8).astype(bool) if ids else np.zeros(0, bool)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        n_images = np.asarray([len(p) for p in self.image_paths], dtype=np.int64)
        lengths = np.diff(self.offsets) + n_images * (image_tokens - 1)  # image positions count
        self.modality_lengths = np.where(n_images > 0, lengths, -lengths)  # XTuner's sign: negative = text-only
        self.n_replaced = 0
        log(self.summary())

    def __len__(self):
        return len(self.offsets) - 1

    @property
    def lengths(self):
        return np.abs(self.modality_lengths)

    def summary(self):
        st = self.stats
        dropped = st["bad_record"] + st["too_long"] + st["no_supervised"]
        text = (f"data {self.records_path}: {st['records']:,} records -> {len(self):,} samples"
                f" | truncated {st['truncated_at_turn']:,} at a turn end, {st['truncated_in_answer']:,} inside an"
                f" answer | dropped {dropped:,} ({st['bad_record']:,} bad, {st['too_long']:,} too long,"
                f" {st['no_supervised']:,} with nothing supervised)")
        for p in self.problems[:5]:
            text += f"\n  {p}"
        if len(self.problems) > 5:
            text += f"\n  ... and {len(self.problems) - 5:,} more (python data.py check lists them all)"
        return text

    def compact(self, i):
        """(ids, labels) of sample i as int64 numpy arrays, one IMAGE_TOKEN_INDEX per image."""
        a, b = self.offsets[i], self.offsets[i + 1]
        ids = self.ids[a:b].astype(np.int64)
        return ids, np.where(self.supervised[a:b], ids, IGNORE_INDEX)

    def tokens(self, i):
        """(input_ids, labels) of sample i as (T,) long tensors, each image expanded to image_tokens positions."""
        ids, labels = self.compact(i)
        repeats = np.where(ids == IMAGE_TOKEN_INDEX, self.image_tokens, 1)
        return torch.from_numpy(np.repeat(ids, repeats)), torch.from_numpy(np.repeat(labels, repeats))

    def load_images(self, i):
        """(n_images, 3, S, S) float32 for sample i, or None; raises clip.ImageError / OSError on a bad file."""
        if not self.image_paths[i]:
            return None
        pad = self.image_mode == "pad"
        images = [clip.load_image(self.image_folder / p) for p in self.image_paths[i]]
        return torch.stack([clip.preprocess(img, self.image_size, pad_to_square=pad) for img in images])

    def __getitem__(self, i):
        replaced = []
        # 1000 failures in a row is not bad data but a wrong image folder: that one is an error worth stopping for
        for step in range(min(len(self), 1000)):
            j = (i + step) % len(self)
            try:
                pixel_values = self.load_images(j)
            except (clip.ImageError, OSError, ValueError) as e:
                where = f"{self.records_path}:{self.lines[j]}"
                replaced.append({"id": self.record_ids[j], "file": where, "reason": str(e)})
                self.n_replaced += 1
                warnings.warn(f"record {self.record_ids[j]} ({where}): cannot load its image: {e}; using the next"
                              " sample instead (python data.py check lists every bad image)", DataWarning)
                continue
            input_ids, labels = self.tokens(j)
            return {"id": self.record_ids[j], "input_ids": input_ids, "labels": labels,
                    "pixel_values": pixel_values, "replaced": replaced}
        raise DataError(f"{len(replaced)} samples in a row from sample {i} of {self.records_path} could not load "
                        f"their image (last: {replaced[-1]['reason']}); is the image folder {self.image_folder} right?")


class LLaVAMix(torch.utils.data.ConcatDataset):
    """Several LLaVADatasets one after the other (XTuner's InternVL-SFT recipe): every sample once per epoch."""

    @property
    def modality_lengths(self):
        return np.concatenate([d.modality_lengths for d in self.datasets])

    @property
    def lengths(self):
        return np.abs(self.modality_lengths)

    @property
    def stats(self):
        return sum((d.stats for d in self.datasets), Counter())

    @property
    def problems(self):
        return [p for d in self.datasets for p in d.problems]


def parse_data_spec(spec, image_folder=None):
    """`records.json[:FOLDER]`, `records.jsonl[:FOLDER]` or a mix file -> [(records_path, image_folder), ...]."""
    m = re.fullmatch(r"(.+?\.jsonl?)(?::(.+))?", spec)
    if not m:
        raise DataError(f"data spec {spec!r}: expected RECORDS.json[:IMAGE_FOLDER] or RECORDS.jsonl[:IMAGE_FOLDER]")
    path, folder = Path(m.group(1)), m.group(2) or image_folder
    if path.suffix == ".json" and path.is_file():
        with open(path, encoding="utf-8") as f:
            head = f.read(4096).lstrip()
        if head.startswith("{"):  # a mix file, not a list of records
            if m.group(2):
                raise DataError(f"data spec {spec!r}: a mix file lists its own image folders")
            mix = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(mix, dict) or not isinstance(mix.get("datasets"), list):
                raise DataError(f"{path}: a mix file holds {{\"datasets\": [{{\"path\", \"image_folder\"}}, ...]}}")
            root = path.parent
            return [(root / d["path"], root / d["image_folder"] if d.get("image_folder") else None)
                    for d in mix["datasets"]]
    return [(path, Path(folder) if folder else None)]


def open_data(specs, tok, template="llama3_chat", image_folder=None, **kwargs):
    """One dataset (LLaVADataset) or a concatenation (LLaVAMix) from `--data` specs; kwargs go to LLaVADataset."""
    specs = [specs] if isinstance(specs, str) else specs
    sources = [s for spec in specs for s in parse_data_spec(spec, image_folder)]
    datasets = [LLaVADataset(path, folder, tok, template, **kwargs) for path, folder in sources]
    return datasets[0] if len(datasets) == 1 else LLaVAMix(datasets)


# ----------------------------------------------------------------------------------------------------------------
# Samplers (§2.7): one epoch's order, each rank's share, resumable


class EpochSampler(torch.utils.data.Sampler):
    """Base: a global order per epoch (seeded by seed + epoch), rank r takes order[r::world_size].

    No round-up: the last n % world_size entries of the order are left out (so every rank runs the same number of
    steps; `n_left_out` reports them). `start_index` skips this rank's first k samples without loading them, so a
    resumed run continues mid-epoch: set_epoch(epoch, start_index=micro_steps_done * micro_batch).
    """

    def __init__(self, n, seed=0, world_size=1, rank=0):
        self.n, self.seed, self.world_size, self.rank = n, seed, world_size, rank
        self.num_samples = n // world_size  # per rank, per epoch
        self.n_left_out = n % world_size
        self.epoch, self.start_index = 0, 0

    def set_epoch(self, epoch, start_index=0):
        self.epoch, self.start_index = epoch, start_index

    def generator(self):
        return torch.Generator().manual_seed(self.seed + self.epoch)

    def order(self):
        raise NotImplementedError

    def __iter__(self):
        order = self.order()[: self.num_samples * self.world_size]
        return iter(order[self.rank :: self.world_size][self.start_index :])

    def __len__(self):
        return max(self.num_samples - self.start_index, 0)


class ShuffleSampler(EpochSampler):
    """Pretrain: a seeded random permutation per epoch (mmengine's DefaultSampler, without its round-up)."""

    def order(self):
        return torch.randperm(self.n, generator=self.generator()).tolist()


def length_grouped_order(lengths, group_size, generator):
    """XTuner's get_length_grouped_indices. `lengths` are signed: > 0 multimodal, < 0 text-only.

    Each modality: a random permutation cut into megabatches of group_size, each sorted by length, longest first.
    With both modalities, the two last (partial) megabatches merge into one final megabatch and the others are
    shuffled; then the longest sample is swapped to the very front, so an out-of-memory shows at step 1.
    Draws randperm(n_multimodal), randperm(n_text), randperm(n_megabatches) from `generator`, in that order.
    (XTuner sorts an all-text-only dataset by its negative lengths, shortest first; we sort by |length|.)
    """
    size = [abs(int(x)) for x in lengths]

    def megabatches(indices):
        perm = torch.randperm(len(indices), generator=generator).tolist()
        shuffled = [indices[p] for p in perm]
        chunks = [shuffled[a : a + group_size] for a in range(0, len(shuffled), group_size)]
        return [sorted(c, key=lambda i: size[i], reverse=True) for c in chunks]  # stable: ties keep their order

    multimodal = [i for i, x in enumerate(lengths) if x > 0]
    text_only = [i for i, x in enumerate(lengths) if x < 0]
    if not multimodal or not text_only:
        batches = megabatches(multimodal or text_only)
    else:
        mm, text = megabatches(multimodal), megabatches(text_only)
        rest = mm[:-1] + text[:-1]
        batches = [rest[p] for p in torch.randperm(len(rest), generator=generator).tolist()]
        batches.append(sorted(mm[-1] + text[-1], key=lambda i: size[i], reverse=True))
    if batches:
        k = max(range(len(batches)), key=lambda b: (size[batches[b][0]], -b))  # the first of the longest
        batches[0][0], batches[k][0] = batches[k][0], batches[0][0]
    return [i for b in batches for i in b]


class LengthGroupedSampler(EpochSampler):
    """Finetune: XTuner's LengthGroupedSampler. Lengths count image positions (XTuner counts an image as 1 token).

    per_device_batch_size = micro batch x gradient accumulation (what one rank consumes per optimizer step);
    megabatch = min(n // (total_batch * 4), 50) (at least 1) x total_batch, total_batch = per_device x world_size.
    Rank r takes order[r::world_size], so each rank's consecutive micro-batches have similar lengths.
    """

    def __init__(self, modality_lengths, per_device_batch_size, seed=0, world_size=1, rank=0, mega_batch_mult=None):
        super().__init__(len(modality_lengths), seed, world_size, rank)
        self.modality_lengths = np.asarray(modality_lengths)
        total_batch = per_device_batch_size * world_size
        if mega_batch_mult is None:
            mega_batch_mult = max(min(self.n // (total_batch * 4), 50), 1)  # 50, or 4 megabatches on tiny data
        self.group_size = mega_batch_mult * total_batch

    def order(self):
        return length_grouped_order(self.modality_lengths.tolist(), self.group_size, self.generator())


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


# ----------------------------------------------------------------------------------------------------------------
# Packing text samples into rows of max_length (InternLM2 text SFT; XTuner's `pack_to_max_length=True`)
#
# Several short samples share one row, so a batch holds few padding positions. Unlike XTuner, whose packed samples
# attend to one another and are cut at row ends, a sample here is never cut, attends only to itself (the model gets
# `segment_ids`, a block-diagonal causal mask) and sees positions 0, 1, ... as if it were alone (`position_ids`).


def pack_order(lengths, max_length, order):
    """Next-fit packing: walk `order`, closing the current pack when the next sample does not fit.
    -> [[sample indices of pack 0], [pack 1], ...], every pack at most max_length positions, order kept."""
    packs, current, used = [], [], 0
    for i in order:
        n = int(lengths[i])
        if n > max_length:
            raise DataError(f"sample {i} has {n} positions, more than the pack length {max_length}: build the dataset "
                            "with the same max_length")
        if current and used + n > max_length:
            packs.append(current)
            current, used = [], 0
        current.append(int(i))
        used += n
    return packs + ([current] if current else [])


class PackedDataset(torch.utils.data.Dataset):
    """Text-only samples of `ds` (an LLaVADataset or LLaVAMix) packed into rows of at most max_length positions.

    The samples are shuffled once with `seed` before packing (XTuner's shuffle_before_pack), then packed in that
    order; a sampler then shuffles the packs each epoch. Item: {"id": [record ids], "input_ids" (L,), "labels" (L,),
    "position_ids" (L,) restarting at 0 for each sample, "segment_ids" (L,) 0, 0, ..., 1, 1, ... (the sample number
    in the pack), "pixel_values": None, "replaced": []}. Each sample's first label is IGNORE_INDEX: it would be
    predicted from the previous sample's last token (it is a prompt token anyway, so nothing supervised is lost).
    """

    def __init__(self, ds, max_length, seed=0):
        self.ds, self.max_length = ds, max_length
        with_images = np.flatnonzero(np.asarray(ds.modality_lengths) > 0)
        if len(with_images):
            raise DataError(f"packing is for text-only data, but {len(with_images):,} samples have images (e.g. "
                            f"sample {with_images[0]}); train multimodal data without packing")
        lengths = np.asarray(ds.lengths)
        order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
        self.packs = pack_order(lengths, max_length, order)
        used = np.asarray([lengths[p].sum() for p in self.packs], dtype=np.int64)
        self.modality_lengths = -used  # negative = text-only, as LLaVADataset's (for LengthGroupedSampler)
        self.fill = float(used.sum()) / max(len(self.packs) * max_length, 1)  # real positions / row positions

    def __len__(self):
        return len(self.packs)

    @property
    def lengths(self):
        return np.abs(self.modality_lengths)

    @property
    def stats(self):
        return self.ds.stats

    @property
    def problems(self):
        return self.ds.problems

    def summary(self):
        return (f"packed {len(self.ds):,} samples into {len(self):,} rows of at most {self.max_length} positions "
                f"({self.fill:.0%} filled)")

    def __getitem__(self, i):
        items = [self.ds[j] for j in self.packs[i]]  # text-only: no image to load, so nothing is ever replaced
        labels = [x["labels"].clone() for x in items]
        for y in labels:
            y[0] = IGNORE_INDEX
        return {"id": [x["id"] for x in items], "input_ids": torch.cat([x["input_ids"] for x in items]),
                "labels": torch.cat(labels),
                "position_ids": torch.cat([torch.arange(len(x["input_ids"])) for x in items]),
                "segment_ids": torch.cat([torch.full((len(x["input_ids"]),), k) for k, x in enumerate(items)]),
                "pixel_values": None, "replaced": []}


def collate_packed(batch, pad_id=0):
    """`collate` for PackedDataset items, plus "position_ids" and "segment_ids" (B, T) long for the model; padding
    gets position 0 and segment -1 (a block of its own, which no real token attends to)."""
    out = collate(batch, pad_id)
    T = out["input_ids"].shape[1]
    out["position_ids"] = torch.zeros(len(batch), T, dtype=torch.long)
    out["segment_ids"] = torch.full((len(batch), T), -1, dtype=torch.long)
    for b, x in enumerate(batch):
        t = len(x["input_ids"])
        out["position_ids"][b, :t], out["segment_ids"][b, :t] = x["position_ids"], x["segment_ids"]
    out["ids"] = [i for x in batch for i in x["id"]]
    return out

# ----------------------------------------------------------------------------------------------------------------
# CLI: check every record and image up front; show samples as the model sees them


def _check_image(folder, path):
    try:
        img = clip.load_image(folder / path)
        clip.preprocess(img, 32, pad_to_square=True)  # decodes every pixel; a tiny size keeps it cheap
        return None
    except (clip.ImageError, OSError, ValueError) as e:
        return str(e) or type(e).__name__


def check(specs, image_folder=None, tok=None, template="llama3_chat", max_length=2048, image_tokens=576,
          workers=8, out=None):
    """Every bad record and image of the data, printed one per line. Returns the list of Problems."""
    problems, stats = [], Counter()
    for path, folder in [s for spec in specs for s in parse_data_spec(spec, image_folder)]:
        folder = folder or path.parent
        jobs = []  # (sample, image path) to open
        try:
            samples = list(tqdm(iter_samples(path), desc=f"reading {path.name}", unit=" records", mininterval=2,
                                disable=path.stat().st_size < 20_000_000 if path.is_file() else True))
        except DataError as e:  # the whole file is unreadable: one problem, and on to the next file
            problems.append(Problem(str(path), 0, "-", str(e)))
            continue
        for s in samples:
            stats["records"] += 1
            if isinstance(s, Problem):
                problems.append(s)
                continue
            if tok is not None:
                ids, labels, ends = _encode(tok, template, s.turns, 1)
                cut, status = fit_length(ids, labels, ends, max_length, image_tokens)
                stats[status] += 1
                if cut is None:
                    problems.append(Problem(str(path), s.line, s.id, {
                        "too_long": f"longer than max_length {max_length} before its first supervised token",
                        "no_supervised": "has no supervised token"}[status]))
                    continue
            jobs += [(s, p) for p in s.images]
        stats["images"] += len(jobs)
        with ThreadPoolExecutor(max(workers, 1)) as pool:  # PIL decodes outside the GIL
            errors = pool.map(lambda job: _check_image(folder, job[1]), jobs, chunksize=64)
            for (s, image), err in tqdm(zip(jobs, errors), total=len(jobs), desc=f"opening images of {path.name}",
                                        unit=" images", mininterval=2, disable=len(jobs) < 2000):
                if err is not None:
                    problems.append(Problem(str(path), s.line, s.id, err, image=str(folder / image)))
    out = out or sys.stdout
    problems.sort(key=lambda p: (p.file, p.line))
    for p in problems:
        print(p, file=out)
    truncated = stats["truncated_at_turn"] + stats["truncated_in_answer"]
    print(f"checked {stats['records']:,} records and {stats['images']:,} images: {len(problems):,} bad"
          + (f", {truncated:,} would be truncated to {max_length} positions" if tok is not None else ""), file=out)
    return problems


def _show(ds, i, tok, color):
    ids, labels = ds.compact(i)
    runs, start = [], 0
    for k in range(1, len(ids) + 1):  # split into runs of (image | supervised text | prompt text)
        if k == len(ids) or ids[k] == IMAGE_TOKEN_INDEX or ids[k - 1] == IMAGE_TOKEN_INDEX or \
                (labels[k] != IGNORE_INDEX) != (labels[k - 1] != IGNORE_INDEX):
            runs.append((start, k))
            start = k
    text = ""
    for a, b in runs:
        if ids[a] == IMAGE_TOKEN_INDEX:
            text += f"<image x{ds.image_tokens}>"
            continue
        piece = tok.decode(ids[a:b].tolist(), skip_special=False)
        if labels[a] != IGNORE_INDEX:
            piece = f"\x1b[32m{piece}\x1b[0m" if color else f"⟦{piece}⟧"
        text += piece
    length = abs(int(ds.modality_lengths[i]))
    return f"--- {ds.record_ids[i]} ({ds.records_path}:{ds.lines[i]}, {length} positions)\n{text}"


def main(argv=None):
    p = argparse.ArgumentParser(description="Check LLaVA data, or show samples as the model sees them.")
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("check", "show"):
        q = sub.add_parser(name)
        q.add_argument("data", nargs="+", help="RECORDS.json[:IMAGE_FOLDER], RECORDS.jsonl[:IMAGE_FOLDER], a mix file")
        q.add_argument("--image-folder", help="image folder of sources that name none (default: the records' folder)")
        q.add_argument("--tokenizer", required=name == "show", help="folder with the tokenizer (check: length checks)")
        q.add_argument("--template", default="llama3_chat", choices=sorted(TEMPLATES))
        q.add_argument("--max-length", type=int, default=2048, help="positions, images included")
        q.add_argument("--image-tokens", type=int, default=576, help="positions per image (576 for ViT-L/14-336)")
    sub.choices["check"].add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    sub.choices["show"].add_argument("--n", type=int, default=None, help="how many (default 3; all with --jsonl)")
    sub.choices["show"].add_argument("--jsonl", action="store_true",
                                     help='one {"id", "input_ids", "labels"} per sample, each image as one -200')
    args = p.parse_args(argv)
    tok = None
    if args.tokenizer:
        from tokenizer import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
    if args.command == "check":
        problems = check(args.data, args.image_folder, tok, args.template, args.max_length, args.image_tokens,
                         args.workers)
        return 1 if problems else 0
    ds = open_data(args.data, tok, args.template, args.image_folder, image_tokens=args.image_tokens,
                   max_length=args.max_length)
    n = len(ds) if args.n is None and args.jsonl else min(args.n or 3, len(ds))
    parts = ds.datasets if isinstance(ds, LLaVAMix) else [ds]
    shown = 0
    for d in parts:
        for i in range(len(d)):
            if shown == n:
                return 0
            if args.jsonl:
                ids, labels = d.compact(i)
                print(json.dumps({"id": d.record_ids[i], "input_ids": ids.tolist(), "labels": labels.tolist()}))
            else:
                print(_show(d, i, tok, sys.stdout.isatty()))
            shown += 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
