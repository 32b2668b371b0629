"""Tokenizers: Llama-3 (tiktoken byte-level BPE) and Llama-2 / Vicuna / InternLM2 (sentencepiece), one interface.

Every tokenizer here answers the same small protocol (`Tokenizer`): `encode(text)` turns *untrusted* text into ids
and never yields a control token, so a user who types `<|eot_id|>` gets the characters `<`, `|`, `eot`, ... and not
the end-of-turn id (SPEC §2, a deliberate difference from HF tokenizers, which match special-token strings anywhere
in the text). Control tokens enter a sequence only by id, through the template code, or through
`encode_with_specials` for *trusted* template strings.

Llama-3 (`TiktokenTokenizer`) is a byte-level BPE: the text is cut by a regex into pieces, each piece's UTF-8 bytes
are merged pairwise, lowest rank first. Meta ships it as `original/tokenizer.model`, one `base64(token) rank` line
per token, plus 256 special tokens with ids 128000..128255 that are not in the file; HF ships the same BPE as
`tokenizer.json`, with each byte spelled as a printable character (GPT-2's `bytes_to_unicode` table) and the merge
list written out. Both load into the same tiktoken `Encoding`; `write_hf_tokenizer` goes the other way, for the HF
LLaVA export.

Llama-2 / Vicuna / InternLM2 (`SentencePieceTokenizer`) use a sentencepiece model (`tokenizer.model`, a protobuf).

References: Meta's llama3 `tokenizer.py` (pattern, special-token names, long-input splitting), llama-models 0.3.0
(`llama_models/llama3/tokenizer.py`), tiktoken's `Encoding`, HF tokenizers' `tokenizer.json` format and
`transformers.convert_slow_tokenizer.TikTokenConverter`, sentencepiece's `sentencepiece_model.proto`.
"""

import base64
import json
import re
from pathlib import Path

import sentencepiece
import tiktoken

# The Llama-3 pre-tokenizer regex: contractions, letter runs (with one leading non-letter), numbers in groups of at
# most 3 digits, punctuation runs, newline runs, and whitespace (a run of spaces gives its last space to the next word).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# GPT-2's regex, used when a tokenizer.json's ByteLevel pre-tokenizer splits by itself (`use_regex: true`).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

LLAMA3_NUM_RANKS = 128_000  # ordinary BPE tokens in Meta's file; the 256 specials follow them


def llama3_special_names():
    """The 256 Llama-3 special tokens in id order (128000..128255), named as llama-models 0.3.0 names them.

    The ids of bos, end_of_text, the header tokens and eot are the same in every Llama-3 release; Llama-3.1 gave
    names to a few tokens that Llama-3.0 called `<|reserved_special_token_N|>` (pad 128004, eom 128008, ...).
    """
    names = [
        "<|begin_of_text|>",  # 128000  bos, once per sequence
        "<|end_of_text|>",  # 128001  eos of a document
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",  # 128004  padding
        "<|step_id|>",
        "<|start_header_id|>",  # 128006  opens a role header
        "<|end_header_id|>",  # 128007  closes it
        "<|eom_id|>",  # 128008  end of message (tool calls)
        "<|eot_id|>",  # 128009  end of turn: the chat stop token
        "<|python_tag|>",
        "<|image|>",  # 128011  Llama-3.2-Vision's image token (LLaVA does not use it)
    ]
    return names + [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - len(names))]


# Meta splits very long inputs before calling tiktoken: old tiktoken releases merge a piece in time quadratic in its
# length, and one regex piece can be a whole 100k-character run with no whitespace. tiktoken >= 0.14 (our pin) is
# fast on such runs (1M characters in about a second), so this only guards against old installs; it changes ids only
# at the cut points inside runs longer than MAX_RUN characters, which ordinary text never has.
MAX_RUN = 25_000
_RUNS = re.compile(r"\s+|\S+")


def split_long_runs(text, max_run=MAX_RUN):
    """Cut `text` so that no piece holds more than `max_run` consecutive space or non-space characters."""
    if len(text) <= max_run:  # fast path: no run can be too long
        return [text]
    cuts = [0]
    for m in _RUNS.finditer(text):
        cuts.extend(range(m.start() + max_run, m.end(), max_run))
    cuts.append(len(text))
    return [text[a:b] for a, b in zip(cuts, cuts[1:])]


class Tokenizer:
    """The protocol every tokenizer answers; subclasses set the attributes and implement encode / decode.

    Attributes: `special_tokens` {name: id}, `bos_id`, `eos_id`, `pad_id`, `stop_ids` (tuple), `vocab_size`
    (one more than the largest id the tokenizer can produce).
    """

    special_tokens: dict
    bos_id: int
    eos_id: int
    pad_id: int
    stop_ids: tuple
    vocab_size: int

    def encode(self, text):
        """Untrusted text -> ids. Never yields a control token."""
        raise NotImplementedError

    def decode(self, ids, skip_special=True):
        raise NotImplementedError

    def special(self, name):
        """The id of a special token, e.g. `tok.special("<|eot_id|>")` -> 128009."""
        try:
            return self.special_tokens[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a special token of this tokenizer "
                           f"(it has {len(self.special_tokens)}, e.g. {list(self.special_tokens)[:4]})") from None

    def is_special(self, token_id):
        return token_id in self._special_ids

    def encode_with_specials(self, text):
        """TRUSTED template text -> ids: every spelled special-token name becomes its id, the rest goes to `encode`.

        Never call this on user or dataset text; that is what `encode` is for.
        """
        ids = []
        # A capturing split alternates text, name, text, name, ..., text (names longest first, so a name that is
        # a prefix of another never wins).
        for i, part in enumerate(self._special_re.split(text)):
            if i % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.encode(part))
        return ids

    def _set_specials(self, special_tokens):
        self.special_tokens = dict(special_tokens)
        self._special_ids = set(self.special_tokens.values())
        names = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else re.compile("(?!)()")


# ----------------------------------------------------------------------------------------------------------------
# Llama-3: tiktoken


def bytes_to_unicode():
    """GPT-2's table byte -> printable character, the spelling of bytes in byte-level BPE `tokenizer.json` files.

    Bytes that are printable and not a space keep their own character; the other 68 bytes (controls, space, DEL,
    NBSP, soft hyphen, ...) are moved in order to U+0100 onwards, so the space byte 0x20 is spelled 'Ġ' (U+0120).
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, moved = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + moved)
            moved += 1
    return table


def load_tiktoken_file(path):
    """Parse Meta's `tokenizer.model`: one `base64(token bytes) rank` line per token -> {bytes: rank}.

    Parsed here rather than with `tiktoken.load.load_tiktoken_bpe`, which caches even local files by path and can
    return stale content after the file changes (env_check.md, pitfall 7).
    """
    ranks = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError:
                raise ValueError(f"{path}, line {n}: expected '<base64 token> <rank>', got {line[:60]!r}; "
                                 "this is not a tiktoken BPE file") from None
    return ranks


class TiktokenTokenizer(Tokenizer):
    """Byte-level BPE run by tiktoken: Llama-3 from Meta's `tokenizer.model` or from an HF `tokenizer.json`."""

    def __init__(self, ranks, special_tokens, pattern=LLAMA3_PATTERN, bos="<|begin_of_text|>",
                 eos="<|end_of_text|>", pad=("<|finetune_right_pad_id|>",), stops=("<|eot_id|>", "<|end_of_text|>")):
        """`ranks` {token bytes: id}, `special_tokens` {name: id}; bos / eos / stops are special-token names (a
        missing one gives None / is left out); `pad` lists candidate names, the first present wins, else eos."""
        self.ranks, self.pattern = ranks, pattern
        self._set_specials(special_tokens)
        self.enc = tiktoken.Encoding("bpe", pat_str=pattern, mergeable_ranks=ranks, special_tokens=self.special_tokens)
        self.vocab_size = self.enc.n_vocab  # max id + 1
        self.bos_id = self.special_tokens.get(bos)
        self.eos_id = self.special_tokens.get(eos)
        self.pad_id = next((self.special_tokens[p] for p in pad if p in self.special_tokens), self.eos_id)
        self.stop_ids = tuple(self.special_tokens[s] for s in stops if s in self.special_tokens)

    @classmethod
    def from_model_file(cls, path):
        """Meta's Llama-3 `tokenizer.model` (base64 rank lines) + the 256 Llama-3 specials at ids 128000+."""
        ranks = load_tiktoken_file(path)
        if len(ranks) != LLAMA3_NUM_RANKS:
            raise ValueError(f"{path} has {len(ranks):,} BPE ranks, a Llama-3 tokenizer.model has "
                             f"{LLAMA3_NUM_RANKS:,}; other tiktoken models (Llama-4, GPT) are not supported")
        specials = {name: LLAMA3_NUM_RANKS + i for i, name in enumerate(llama3_special_names())}
        return cls(ranks, specials)

    @classmethod
    def from_tokenizer_json(cls, path, data=None):
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
        _check_merge_order(path, d["model"]["merges"], d["model"]["vocab"])
        pattern = _split_pattern(d["pre_tokenizer"])
        names = {}  # bos / eos / pad names for a tokenizer that is not Llama-3, from its tokenizer_config.json
        if "<|begin_of_text|>" not in added and (path.parent / "tokenizer_config.json").is_file():
            config = json.loads((path.parent / "tokenizer_config.json").read_text(encoding="utf-8"))
            for key in ("bos", "eos", "pad"):
                value = config.get(f"{key}_token")
                names[key] = value.get("content") if isinstance(value, dict) else value
        return cls(ranks, added, pattern, bos=names.get("bos") or "<|begin_of_text|>",
                   eos=names.get("eos") or "<|end_of_text|>",
                   pad=(*([names["pad"]] if names.get("pad") else []), "<|finetune_right_pad_id|>"))

    def encode(self, text):
        """Plain tiktoken encoding: special-token names in `text` stay text (tiktoken's `encode_ordinary`, i.e.
        `encode(text, disallowed_special=())`), and no bos is added."""
        if len(text) <= MAX_RUN:
            return self.enc.encode_ordinary(text)
        return [i for piece in split_long_runs(text) for i in self.enc.encode_ordinary(piece)]

    def decode(self, ids, skip_special=True):
        ids = [int(i) for i in ids]  # accepts tensors and numpy arrays too
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"cannot decode ids {bad[:5]}: outside 0..{self.vocab_size - 1} "
                             "(an image position -200 or a padded label -100 must be removed first)")
        if skip_special:
            ids = [i for i in ids if i not in self._special_ids]
        # Incomplete UTF-8 (a token cut inside a character, e.g. while streaming) shows as U+FFFD.
        return self.enc.decode(ids, errors="replace")

    def token_bytes(self, token_id):
        """The bytes of one token (for showing pieces)."""
        return self.enc.decode_single_token_bytes(token_id)


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


def _check_merge_order(path, merges, vocab):
    made = -1
    for n, merge in enumerate(merges):
        left, right = merge.split(" ") if isinstance(merge, str) else merge  # old files write "a b", new ["a", "b"]
        token_id = vocab.get(left + right)
        if token_id is None or token_id < made:
            raise ValueError(f"{path}: merge {n} ({left!r}, {right!r}) is not ordered by the id of the token it "
                             "makes, so tiktoken (which merges by id) would not reproduce this tokenizer")
        made = token_id


# ----------------------------------------------------------------------------------------------------------------
# Llama-2 / Vicuna / InternLM2: sentencepiece

# sentencepiece_model.proto: ModelProto.pieces = field 1; SentencePiece.type = field 3, an enum.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _varint(buf, pos):
    value, shift = 0, 0
    while True:
        b = buf[pos]
        value |= (b & 0x7F) << shift
        pos += 1
        if b < 0x80:
            return value, pos
        shift += 7


def _fields(buf, start, end):
    """(field number, wire type, value or (start, end) of a length-delimited field, offset of the value)."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        at = pos
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = (pos, pos + n), pos + n
        elif wire in (1, 5):  # fixed 64 / 32 bit (the float score)
            value, pos = None, pos + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}: not a sentencepiece model")
        yield field, wire, value, at


def piece_types(proto):
    """[(type, byte offset of the type value or None)] for every piece of a serialized sentencepiece ModelProto.

    The Python API tells control, unknown, byte and unused pieces apart but not user-defined ones, and the
    `sentencepiece_model_pb2` module needs protobuf, which we do not depend on; the wire format is simple enough.
    """
    types = []
    for field, wire, span, _ in _fields(proto, 0, len(proto)):
        if field == 1 and wire == 2:
            piece_type, where = NORMAL, None  # proto2 default: an absent type is NORMAL
            for f, w, value, at in _fields(proto, *span):
                if f == 3 and w == 0:
                    piece_type, where = value, at
            types.append((piece_type, where))
    return types


def _with_unused(proto, piece_ids):
    """A copy of a serialized ModelProto in which the pieces `piece_ids` are UNUSED (never produced by encode).

    Each such piece message gets one more `type = UNUSED` field at its end: protobuf keeps the last value of a
    repeated scalar field, so this overrides a type the piece has, and gives one to a NORMAL piece that has none
    (proto2 does not write the default). Only that piece's length prefix changes; pieces are top-level fields.
    """
    out, pos, n = bytearray(), 0, 0
    for field, wire, span, at in _fields(proto, 0, len(proto)):
        if field == 1 and wire == 2:
            if n in piece_ids:
                body = proto[span[0]:span[1]] + bytes([3 << 3 | 0, UNUSED])  # key (field 3, varint), value
                length = bytearray()
                size = len(body)
                while True:  # varint: 7 bits per byte, high bit = more bytes follow
                    length.append(size & 0x7F | (0x80 if size > 0x7F else 0))
                    size >>= 7
                    if not size:
                        break
                out += proto[pos:at] + length + body
                pos = span[1]
            n += 1
    return bytes(out + proto[pos:])


def added_tokens_decoder(folder):
    """{id: name} of the `added_tokens_decoder` in a folder's tokenizer_config.json ({} when there is none).

    InternLM2 names its chat tokens there: `<|im_start|>` is id 92543, a piece that its tokenizer.model itself may
    spell differently (older files: `[UNUSED_TOKEN_146]`); HF's tokenizer uses the config's names, and so do we."""
    path = Path(folder) / "tokenizer_config.json"
    if not path.is_file():
        return {}
    decoder = json.loads(path.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}
    return {int(i): t["content"] if isinstance(t, dict) else t for i, t in decoder.items()}


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model (`tokenizer.model`): Llama-2, Vicuna, InternLM2.

    Special tokens are the control pieces (`<s>`, `</s>`), the unknown piece, the user-defined pieces
    (InternLM2's `<|im_start|>`, `<|im_end|>`, ...) and the `added_tokens` given by id (from tokenizer_config.json's
    `added_tokens_decoder`: a name for a piece of the model, which then goes by that name, or an id past its end).

    * sentencepiece never matches control pieces in text: typed `</s>` already encodes as ordinary pieces.
    * It does match user-defined pieces anywhere in raw text, so `encode` runs a second copy of the model in which
      every user-defined piece and every added token is marked UNUSED (`_with_unused`): text spelling
      `<|im_end|>` becomes exactly the ids this model would give if `<|im_end|>` were not in its vocabulary, i.e.
      ordinary pieces such as `<`, `|`, `im`, `_`, `end`, `|`, `>` (byte pieces where a character has no piece).
      On text that spells no user-defined piece both copies give the same ids as `sp.encode(text)`.
      (`encode` can still yield the unknown piece, for a character a model without byte fallback cannot spell.)
    * Each `encode` call is one `sp.encode` call, so it gets sentencepiece's dummy prefix (a leading "▁", so
      "Hi" encodes like " Hi") exactly as `sp.encode(text)` does. `encode_with_specials` encodes the text between
      two special names with one call each, so each of those parts gets a dummy prefix, like Meta's Llama-2 code
      and HF's `legacy=True` LlamaTokenizer.
    """

    def __init__(self, path, added_tokens=None):
        self.path = Path(path)
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path} is not a sentencepiece model: {e}") from None
        proto = self.sp.serialized_model_proto()
        types = piece_types(proto)
        if len(types) != self.sp.get_piece_size():
            raise ValueError(f"{path}: read {len(types)} pieces from the model proto, sentencepiece reports "
                             f"{self.sp.get_piece_size()}")
        self.piece_type = [t for t, _ in types]
        added = dict(added_tokens or {})  # {id: name}
        n = self.sp.get_piece_size()
        self._names = {i: self.sp.id_to_piece(i) for i, t in enumerate(self.piece_type) if t == CONTROL}
        self._names.update(added)  # shown by these names when decoding with skip_special=False
        self._set_specials({**{self.sp.id_to_piece(i): i for i, t in enumerate(self.piece_type)
                               if t in (CONTROL, UNKNOWN, USER_DEFINED)}, **{name: i for i, name in added.items()}})
        hide = {i for i, t in enumerate(self.piece_type) if t == USER_DEFINED}
        hide |= {i for i in added if i < n and self.piece_type[i] in (NORMAL, USER_DEFINED)}
        self.plain = sentencepiece.SentencePieceProcessor(model_proto=_with_unused(proto, hide)) if hide else self.sp
        self.vocab_size = max([n, *(i + 1 for i in added)])  # added ids may lie past the model's pieces
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        # Llama-2 has no pad piece (pad_id() is -1); LLaVA-v1.5 pads with unk, XTuner pads input_ids with 0 = unk.
        self.pad_id = next(i for i in (self.sp.pad_id(), self.sp.unk_id(), self.eos_id) if i >= 0)
        self.stop_ids = (self.eos_id,) if self.eos_id >= 0 else ()

    def encode(self, text):
        return self.plain.encode(text)

    def decode(self, ids, skip_special=True):
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"cannot decode ids {bad[:5]}: outside 0..{self.vocab_size - 1} "
                             "(an image position -200 or a padded label -100 must be removed first)")
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


def _is_tiktoken_file(path):
    """Meta's tiktoken file is text (`base64 rank` lines); a sentencepiece model is a binary protobuf."""
    with open(path, "rb") as f:
        head = f.read(256)
    return re.match(rb"[A-Za-z0-9+/]+=*[ \t]+\d+\r?\n", head) is not None


def load_model_file(path):
    """A `tokenizer.model` of either kind, told apart by content (a sentencepiece model also takes the added tokens
    of the tokenizer_config.json next to it)."""
    if _is_tiktoken_file(path):
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
            return TiktokenTokenizer.from_tokenizer_json(folder / "tokenizer.json", data)
    if (folder / "tokenizer.model").is_file():
        return load_model_file(folder / "tokenizer.model")
    if problem:
        raise ValueError(f"{folder}/tokenizer.json cannot be used ({problem}) and there is no tokenizer.model "
                         "next to it; copy the model's sentencepiece tokenizer.model into the folder")
    raise FileNotFoundError(f"no tokenizer in {folder}: expected original/tokenizer.model, tokenizer.json or "
                            "tokenizer.model (copy the base model's tokenizer files into the folder)")


# ----------------------------------------------------------------------------------------------------------------
# Writing an HF tokenizer (for the HF LLaVA export)


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
    export passes {"<image>": 128257, "<pad>": 128258}, the ids of xtuner/llava-llama-3-8b-v1_1-transformers
    (SPEC §6); ids left free below them are filled with `<|unused_{id}|>`. `<pad>`, when added, becomes the pad
    token. `eos_token` defaults to `<|eot_id|>` when the tokenizer has it (the Llama-3-Instruct convention), else
    its eos. Like HF's Llama-3 tokenizer, the written one adds
    `<|begin_of_text|>` when called with `add_special_tokens=True`; unlike ours, HF's matches special-token names
    inside text.
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
        tmp = folder / (name + ".tmp")
        tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=None if name == "tokenizer.json" else 2),
                       encoding="utf-8")
        tmp.replace(folder / name)  # atomic: a kill never leaves a half-written file under the real name


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: python tokenizer.py MODEL_FOLDER_OR_TOKENIZER_FILE 'some text'")
    where, sample = Path(sys.argv[1]), sys.argv[2]
    if where.is_dir():
        t = load_tokenizer(where)
    elif where.name.endswith(".json"):
        t = TiktokenTokenizer.from_tokenizer_json(where)
    else:
        t = load_model_file(where)
    ids = t.encode(sample)
    print(f"{type(t).__name__}: vocab {t.vocab_size:,}, bos {t.bos_id}, eos {t.eos_id}, pad {t.pad_id}, "
          f"stops {t.stop_ids}")
    print(ids)
    if isinstance(t, TiktokenTokenizer):
        print([t.token_bytes(i) for i in ids])
    else:
        print([t.sp.id_to_piece(i) for i in ids])
    print(repr(t.decode(ids)))
