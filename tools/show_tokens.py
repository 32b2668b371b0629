"""The ids and pieces of a text under a model's tokenizer.

    python tools/show_tokens.py MODEL_FOLDER_OR_TOKENIZER_FILE 'some text'
"""

import sys
from pathlib import Path

# run as a script, Python puts tools/ on sys.path, not the project root that holds the modules imported below
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from extras.tokenizer_files import from_tokenizer_json, load_model_file, load_tokenizer  # noqa: E402
from tokenizer import TiktokenTokenizer  # noqa: E402


if len(sys.argv) != 3:
    sys.exit("usage: python tools/show_tokens.py MODEL_FOLDER_OR_TOKENIZER_FILE 'some text'")
where = Path(sys.argv[1])
t = (load_tokenizer(where) if where.is_dir() else from_tokenizer_json(where)
     if where.name.endswith(".json") else load_model_file(where))
ids = t.encode(sys.argv[2])
print(f"{type(t).__name__}: vocab {t.vocab_size:,}, bos {t.bos_id}, eos {t.eos_id}, pad {t.pad_id}, "
      f"stops {t.stop_ids}")
print(ids)
print([t.enc.decode_single_token_bytes(i) if isinstance(t, TiktokenTokenizer) else t.sp.id_to_piece(i)
       for i in ids])
print(repr(t.decode(ids)))
