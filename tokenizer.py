"""The Llama-3 tokenizer: a byte-level BPE run by tiktoken, behind the interface every tokenizer here answers.

`encode(text)` turns *untrusted* text into ids and never yields a control token: a user who types `<|eot_id|>`
gets the characters `<`, `|`, `eot`, ... and not the end-of-turn id, so typed text can neither end a turn nor forge
one (HF tokenizers match special-token names anywhere in the text). Control tokens enter a sequence only by id, from
the template code, or through `encode_with_specials` for *trusted* template strings.

A byte-level BPE cuts the text into pieces with a regex, and merges each piece's UTF-8 bytes pairwise, lowest rank
first. Meta ships Llama-3's as `original/tokenizer.model`, one `base64(token) rank` line per token, plus 256 special
tokens (ids 128000..128255) that are not in the file. The other tokenizer files a model folder may hold (HF's
`tokenizer.json`, the sentencepiece models of Llama-2, Vicuna and InternLM2) are read by extras/tokenizer_files.py,
whose `load_tokenizer(folder)` finds the tokenizer of a model folder, whichever kind it is.

References: Meta's llama3 `tokenizer.py` (pattern, special-token names, long-input splitting), llama-models 0.3.0
(`llama_models/llama3/tokenizer.py`), tiktoken's `Encoding`.
"""

import base64
import re

import tiktoken

# The Llama-3 pre-tokenizer regex: contractions, letter runs (with one leading non-letter), numbers in groups of at
# most 3 digits, punctuation runs, newline runs, and whitespace (a run of spaces gives its last space to the next word).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Ids that are not vocabulary entries, shared by data.py (which writes them) and model.py (which reads them)
IMAGE_TOKEN_INDEX = -200  # XTuner's (and LLaVA's) placeholder id for one image position
IGNORE_INDEX = -100       # label of a position the loss skips (F.cross_entropy's default ignore_index)

LLAMA3_NUM_RANKS = 128_000  # ordinary BPE tokens in Meta's file; the 256 specials follow them


def llama3_special_names():
    """The 256 Llama-3 special tokens in id order (128000..128255), named as llama-models 0.3.0 names them.

    The ids of bos, end_of_text, the header tokens and eot are the same in every Llama-3 release; Llama-3.1 gave
    names to a few tokens that Llama-3.0 called `<|reserved_special_token_N|>` (pad 128004, eom 128008, ...).
    """
    names = ["<|begin_of_text|>", "<|end_of_text|>",  # 128000 bos (once per sequence), 128001 eos of a document
             "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|finetune_right_pad_id|>", "<|step_id|>",  # 128004 padding
             "<|start_header_id|>", "<|end_header_id|>",  # 128006, 128007 around a role name
             "<|eom_id|>", "<|eot_id|>",  # 128008 end of message (tool calls), 128009 end of turn: the chat stop token
             "<|python_tag|>", "<|image|>"]  # 128011 Llama-3.2-Vision's image token (LLaVA does not use it)
    return names + [f"<|reserved_special_token_{i}|>" for i in range(2, 2 + 256 - len(names))]


# Meta splits very long inputs before calling tiktoken: old tiktoken releases merge a piece in time quadratic in its
# length, and one regex piece can be a whole 100k-character run with no whitespace. tiktoken >= 0.14 (our pin) is
# fast on such runs, so this only guards against old installs; it changes ids only at the cut points inside runs
# longer than MAX_RUN characters, which ordinary text never has.
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

    def _checked(self, ids):
        """`ids` as a list of ints (tensors and numpy arrays welcome), every one a real token id."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"cannot decode ids {bad[:5]}: outside 0..{self.vocab_size - 1} "
                             "(an image position -200 or a padded label -100 must be removed first)")
        return ids


# ----------------------------------------------------------------------------------------------------------------
# Llama-3: tiktoken


def load_tiktoken_file(path):
    """Parse Meta's `tokenizer.model`: one `base64(token bytes) rank` line per token -> {bytes: rank}.

    Parsed here rather than with `tiktoken.load.load_tiktoken_bpe`, which caches even local files by their path and
    can return stale content after the file changes.
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
    """Byte-level BPE run by tiktoken: Llama-3 from Meta's `tokenizer.model` (`from_model_file`), or any byte-level
    BPE given its ranks (extras/tokenizer_files.py builds one from an HF `tokenizer.json`)."""

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

    def encode(self, text):
        """Plain tiktoken encoding: special-token names in `text` stay text (tiktoken's `encode_ordinary`, i.e.
        `encode(text, disallowed_special=())`), and no bos is added."""
        return [i for piece in split_long_runs(text) for i in self.enc.encode_ordinary(piece)]

    def decode(self, ids, skip_special=True):
        ids = self._checked(ids)
        if skip_special:
            ids = [i for i in ids if i not in self._special_ids]
        # Incomplete UTF-8 (a token cut inside a character, e.g. while streaming) shows as U+FFFD.
        return self.enc.decode(ids, errors="replace")
