"""The tokenizer files of a model folder, and `load_tokenizer(folder)`, which finds the one a folder holds.

- HF's byte-level BPE `tokenizer.json` (the Llama-3 HF repos, our HF LLaVA export): each byte is spelled as a
  printable character (GPT-2's `bytes_to_unicode`) and the merge list is written out; it loads into the same tiktoken
  tokenizer as Meta's file (`from_tokenizer_json`). extras/hf_tokenizer.py writes such files.
- Llama-2 / Vicuna / InternLM2 use a sentencepiece model (`tokenizer.model`, a protobuf): `SentencePieceTokenizer`.

References: HF tokenizers' `tokenizer.json` format, sentencepiece's `sentencepiece_model.proto`.
"""

import json
import re
from pathlib import Path

import sentencepiece

from tokenizer import Tokenizer, TiktokenTokenizer

# GPT-2's regex, used when a tokenizer.json's ByteLevel pre-tokenizer splits by itself (`use_regex: true`).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def bytes_to_unicode():
    """GPT-2's table byte -> printable character, the spelling of bytes in byte-level BPE `tokenizer.json` files.

    Bytes that are printable and not a space keep their own character; the other 68 bytes (controls, space, DEL,
    NBSP, soft hyphen, ...) are moved in order to U+0100 onwards, so the space byte 0x20 is spelled 'Ġ' (U+0120).
    """
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    moved = [b for b in range(256) if b not in keep]
    return {b: chr(b) if b in keep else chr(256 + moved.index(b)) for b in range(256)}


def from_tokenizer_json(path, data=None):
    """An HF byte-level BPE `tokenizer.json` (the Llama-3 HF repos, our own HF export).

    The ranks are the vocabulary ids with each token's characters mapped back to bytes (undoing
    `bytes_to_unicode`); the specials are the `added_tokens`; the split regex is the pre-tokenizer's.
    tiktoken merges by the rank of the merged token, so this is exact only when the merge list is ordered by
    the ids of the tokens it makes; that is checked. `data` is the already parsed json, if at hand.
    """
    path = Path(path)
    d = data if data is not None else json.loads(path.read_text(encoding="utf-8"))
    problem = _byte_level_problem(d)
    if problem:
        raise ValueError(f"{path}: {problem}; only byte-level BPE tokenizer.json files (Llama-3 style) are "
                         "supported, a sentencepiece model needs its tokenizer.model")
    added = {t["content"]: t["id"] for t in d.get("added_tokens", [])}
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {}
    for token, i in d["model"]["vocab"].items():
        if token in added:  # some files list added tokens in the vocabulary too; they are specials here
            continue
        try:
            ranks[bytes(to_byte[c] for c in token)] = i
        except KeyError:
            raise ValueError(f"{path}: vocabulary token {token!r} (id {i}) is not byte-level "
                             "(a character outside GPT-2's bytes_to_unicode table)") from None
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{path}: the vocabulary lacks {len(missing)} single bytes (e.g. {missing[:4]}), "
                         "so some text could not be encoded")
    made = -1  # the id of the token the previous merge makes
    for n, merge in enumerate(d["model"]["merges"]):
        left, right = merge.split(" ") if isinstance(merge, str) else merge  # old files write "a b", new [a, b]
        token_id = d["model"]["vocab"].get(left + right)
        if token_id is None or token_id < made:
            raise ValueError(f"{path}: merge {n} ({left!r}, {right!r}) is not ordered by the id of the token it "
                             "makes, so tiktoken (which merges by id) would not reproduce this tokenizer")
        made = token_id
    names = {}  # bos / eos / pad names for a tokenizer that is not Llama-3, from its tokenizer_config.json
    if "<|begin_of_text|>" not in added and (path.parent / "tokenizer_config.json").is_file():
        config = json.loads((path.parent / "tokenizer_config.json").read_text(encoding="utf-8"))
        for key in ("bos", "eos", "pad"):
            value = config.get(f"{key}_token")
            names[key] = value.get("content") if isinstance(value, dict) else value
    return TiktokenTokenizer(ranks, added, _split_pattern(d["pre_tokenizer"]), bos=names.get("bos") or "<|begin_of_text|>",
               eos=names.get("eos") or "<|end_of_text|>",
               pad=(*([names["pad"]] if names.get("pad") else []), "<|finetune_right_pad_id|>"))


def _byte_level_problem(d):
    """Why a parsed tokenizer.json is not a byte-level BPE that tiktoken can run, or None if it is."""
    model = d.get("model") or {}
    if model.get("type") != "BPE":
        return f"model type is {model.get('type')!r}, not BPE"
    if model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return "the BPE uses byte_fallback / subword prefixes (a sentencepiece-style BPE)"
    if d.get("normalizer") is not None:
        return f"it has a normalizer ({d['normalizer'].get('type')}), which tiktoken cannot apply"
    try:
        _split_pattern(d.get("pre_tokenizer"))
    except ValueError as e:
        return str(e)
    return None


def _split_pattern(pre):
    """The split regex of a byte-level pre-tokenizer: Sequence[Split(regex), ByteLevel(use_regex=False)] as in
    Llama-3's tokenizer.json, or a lone ByteLevel(use_regex=True), which means GPT-2's regex."""
    steps = (pre or {}).get("pretokenizers", [pre]) if (pre or {}).get("type") == "Sequence" else [pre or {}]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return GPT2_PATTERN
    if (kinds == ["Split", "ByteLevel"] and "Regex" in steps[0].get("pattern", {})
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
            and not steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space")):
        return steps[0]["pattern"]["Regex"]
    raise ValueError(f"pre-tokenizer {kinds} is not a plain byte-level split (Split(regex) + ByteLevel)")


# ----------------------------------------------------------------------------------------------------------------
# Llama-2 / Vicuna / InternLM2: sentencepiece
#
# sentencepiece's Python API does not tell user-defined pieces apart and cannot hide them from `encode`, and its
# `sentencepiece_model_pb2` needs protobuf, which we do not depend on; so the model's protobuf is read and edited
# here: ModelProto.pieces is field 1 (a repeated message), a piece's `type` is its field 3 (an enum).

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED = 1, 2, 3, 4, 5  # SentencePiece.Type


def _varint(buf, pos):
    """The protobuf varint at buf[pos:] (7 bits a byte, low first; a high bit means more follow) -> (value, end)."""
    value, shift = 0, 0
    while True:
        value |= (buf[pos] & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if buf[pos - 1] < 0x80:
            return value, pos


def _varint_bytes(n):
    """The protobuf varint of `n` (the inverse of _varint)."""
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def _fields(buf, start, end):
    """(field number, wire type, value, offset of the value) of each field of the message buf[start:end]; the value
    of a length-delimited field (a string, a sub-message) is its (start, end)."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        wire, at = key & 7, pos
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = (pos, pos + n), pos + n
        elif wire in (1, 5):  # fixed 64 / 32 bit (a piece's float score)
            value, pos = None, pos + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}: not a sentencepiece model")
        yield key >> 3, wire, value, at


def _pieces(proto):
    """(type, offset of the length prefix, (start, end) of the body) of every piece of a serialized ModelProto."""
    for field, wire, span, at in _fields(proto, 0, len(proto)):
        if field == 1 and wire == 2:
            types = [value for f, w, value, _ in _fields(proto, *span) if f == 3 and w == 0]
            yield (types[-1] if types else NORMAL), at, span  # the last value wins; proto2 omits the default NORMAL


def _with_unused(proto, piece_ids):
    """A copy of a serialized ModelProto in which the pieces `piece_ids` are UNUSED (never produced by encode).

    Each such piece gets one more `type = UNUSED` field at its end: protobuf keeps the last value of a repeated
    scalar field, so this overrides the type the piece has, or gives one to a NORMAL piece that has none. Only that
    piece's length prefix changes; pieces are top-level fields.
    """
    out, pos = bytearray(), 0
    for n, (_, at, (start, end)) in enumerate(_pieces(proto)):
        if n in piece_ids:
            body = proto[start:end] + bytes([3 << 3 | 0, UNUSED])  # key (field 3, wire type varint), value
            out += proto[pos:at] + _varint_bytes(len(body)) + body
            pos = end
    return bytes(out + proto[pos:])


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model (`tokenizer.model`): Llama-2, Vicuna, InternLM2.

    Special tokens are the control pieces (`<s>`, `</s>`), the unknown piece, the user-defined pieces (InternLM2's
    `<|im_start|>`, ...) and the `added_tokens` given by id (tokenizer_config.json's `added_tokens_decoder`: a new
    name for a piece of the model, or an id past its end).

    sentencepiece never matches control pieces in text, but it does match user-defined ones, so `encode` runs a
    copy of the model in which every user-defined piece and added token is UNUSED: typed `<|im_end|>` becomes the
    ids this model would give if the piece were not in its vocabulary (`<`, `|`, `im`, ..., or byte pieces), and
    any other text the ids of `sp.encode(text)`, dummy prefix (the leading "▁" that makes "Hi" encode like " Hi")
    included. (The unknown piece can still come out, for a character a model without byte fallback cannot spell.)
    `encode_with_specials` encodes each text part between two special names with its own call, so each
    part gets a dummy prefix, like Meta's Llama-2 code and HF's `legacy=True` LlamaTokenizer.
    """

    def __init__(self, path, added_tokens=None):
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path} is not a sentencepiece model: {e}") from None
        proto = self.sp.serialized_model_proto()
        types = [t for t, _, _ in _pieces(proto)]
        n = self.sp.get_piece_size()
        if len(types) != n:
            raise ValueError(f"{path}: read {len(types)} pieces from the model proto, sentencepiece reports {n}")
        added = dict(added_tokens or {})  # {id: name}
        self._names = {i: self.sp.id_to_piece(i) for i, t in enumerate(types) if t == CONTROL}
        self._names.update(added)  # shown by these names when decoding with skip_special=False
        self._set_specials({**{self.sp.id_to_piece(i): i for i, t in enumerate(types)
                               if t in (CONTROL, UNKNOWN, USER_DEFINED)}, **{name: i for i, name in added.items()}})
        hide = {i for i, t in enumerate(types) if t == USER_DEFINED}
        hide |= {i for i in added if i < n and types[i] in (NORMAL, USER_DEFINED)}
        self.plain = sentencepiece.SentencePieceProcessor(model_proto=_with_unused(proto, hide)) if hide else self.sp
        self.vocab_size = max([n, *(i + 1 for i in added)])  # added ids may lie past the model's pieces
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        # Llama-2 has no pad piece (pad_id() is -1); LLaVA-v1.5 pads with unk, XTuner pads input_ids with 0 = unk.
        self.pad_id = next(i for i in (self.sp.pad_id(), self.sp.unk_id(), self.eos_id) if i >= 0)
        self.stop_ids = (self.eos_id,) if self.eos_id >= 0 else ()

    def encode(self, text):
        return self.plain.encode(text)

    def decode(self, ids, skip_special=True):
        ids = self._checked(ids)
        if skip_special:
            return self.sp.decode([i for i in ids if i not in self._special_ids])
        # sentencepiece drops control pieces when decoding; to show them, decode the runs between them and put the
        # names back. sentencepiece strips a run's leading "▁", taking it for the dummy prefix; that is right for
        # the first run with text, but a later run starts mid-sentence, so there the "▁" is a real space.
        out, run, seen_text = [], [], False
        for i in [*ids, None]:
            if i is None or i in self._names:
                if run:
                    text = self.sp.decode(run)
                    space = seen_text and self.sp.id_to_piece(run[0]).startswith("▁")
                    out.append(" " + text if space else text)
                    run, seen_text = [], True
                if i is not None:
                    out.append(self._names[i])
            else:
                run.append(i)
        return "".join(out)


# ----------------------------------------------------------------------------------------------------------------
# Finding the tokenizer of a model folder


def added_tokens_decoder(folder):
    """{id: name} of the `added_tokens_decoder` in a folder's tokenizer_config.json ({} when there is none).

    InternLM2 names its chat tokens there: `<|im_start|>` is id 92543, a piece that its tokenizer.model itself may
    spell differently (older files: `[UNUSED_TOKEN_146]`); HF's tokenizer uses the config's names, and so do we."""
    path = Path(folder) / "tokenizer_config.json"
    if not path.is_file():
        return {}
    decoder = json.loads(path.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}
    return {int(i): t["content"] if isinstance(t, dict) else t for i, t in decoder.items()}


def load_model_file(path):
    """A `tokenizer.model` of either kind, told apart by content: Meta's tiktoken file is text (`base64 rank`
    lines), a sentencepiece model a binary protobuf (which also takes the added tokens of the tokenizer_config.json
    next to it)."""
    with open(path, "rb") as f:
        head = f.read(256)
    if re.match(rb"[A-Za-z0-9+/]+=*[ \t]+\d+\r?\n", head):
        return TiktokenTokenizer.from_model_file(path)
    return SentencePieceTokenizer(path, added_tokens_decoder(Path(path).parent))


def load_tokenizer(folder):
    """The tokenizer of a model folder, looked for in this order:

    1. `original/tokenizer.model` (Meta's files inside an HF Llama-3 repo),
    2. `tokenizer.json` if it is a byte-level BPE (HF Llama-3 repos, our HF LLaVA export),
    3. `tokenizer.model` (tiktoken text or sentencepiece protobuf, by content: Llama-2, Vicuna, InternLM2).
    """
    folder = Path(folder)
    if (folder / "original" / "tokenizer.model").is_file():
        return load_model_file(folder / "original" / "tokenizer.model")
    problem = None
    if (folder / "tokenizer.json").is_file():
        data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        problem = _byte_level_problem(data)
        if problem is None:
            return from_tokenizer_json(folder / "tokenizer.json", data)
    if (folder / "tokenizer.model").is_file():
        return load_model_file(folder / "tokenizer.model")
    if problem:
        raise ValueError(f"{folder}/tokenizer.json cannot be used ({problem}) and there is no tokenizer.model "
                         "next to it; copy the model's sentencepiece tokenizer.model into the folder")
    raise FileNotFoundError(f"no tokenizer in {folder}: expected original/tokenizer.model, tokenizer.json or "
                            "tokenizer.model (copy the base model's tokenizer files into the folder)")
