"""transformers' GPT-2 tokenizers, built from the vocabulary and merges inside a tokenizer.json, encode texts.

    python tokenizer_reference.py TOKENIZER_JSON TEXTS_JSON

prints {"fast": [[ids]...], "slow": [[ids]...]}: GPT2TokenizerFast (Rust tokenizers under the hood) and the
pure-Python GPT2Tokenizer (an independent BPE implementation), both built from vocab.json + merges.txt as
transformers does for GPT-2 and GPT-J.
"""

import json
import os
import sys
import tempfile

from transformers import GPT2Tokenizer, GPT2TokenizerFast

spec = json.load(open(sys.argv[1], encoding="utf-8"))
texts = json.loads(sys.argv[2])
vocab = {k: v for k, v in spec["model"]["vocab"].items()}
merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
with tempfile.TemporaryDirectory() as d:
    vf, mf = os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt")
    json.dump(vocab, open(vf, "w", encoding="utf-8"), ensure_ascii=False)
    with open(mf, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    fast = GPT2TokenizerFast(vocab_file=vf, merges_file=mf)
    slow = GPT2Tokenizer(vocab_file=vf, merges_file=mf)
    print(json.dumps({
        "fast": [fast.encode(t) for t in texts],
        "slow": [slow.encode(t) for t in texts],
        "vocab_size": len(fast),
    }))
