//! The tokenizer for a model directory: its own `tokenizer.json` when it has one, else GPT-J's.
//!
//! GPT-J uses GPT-2's byte-level BPE. Checkpoints converted by hand often ship without a tokenizer, and the
//! worker cannot download one, so the vocabulary is bundled (in `shared`, which the gateway counts prompt
//! tokens with too).

use crate::load_error::LoadError;
use std::path::Path;
use tokenizers::Tokenizer;

pub use shared::tokens::GPTJ_TOKENIZER_JSON;

/// `<|endoftext|>`, GPT-J's BOS and EOS token.
pub const END_OF_TEXT: u32 = 50256;

/// The directory's `tokenizer.json`, or the bundled GPT-J tokenizer when there is none.
pub fn load(dir: &Path) -> Result<Tokenizer, LoadError> {
    if !dir.is_dir() {
        return Err(LoadError::DirNotFound(dir.to_path_buf()));
    }
    let path = dir.join("tokenizer.json");
    if path.is_file() {
        return Tokenizer::from_file(&path).map_err(|e| LoadError::Tokenizer {
            path: path.clone(),
            message: e.to_string(),
        });
    }
    tracing::info!(dir = %dir.display(), "no tokenizer.json: using the bundled GPT-J tokenizer");
    bundled()
}

/// The bundled GPT-J tokenizer.
pub fn bundled() -> Result<Tokenizer, LoadError> {
    Tokenizer::from_bytes(GPTJ_TOKENIZER_JSON).map_err(|e| LoadError::Tokenizer {
        path: "<bundled gptj-tokenizer.json>".into(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_tokenizer_has_gpt2_vocabulary_and_round_trips() {
        let tok = bundled().expect("bundled tokenizer loads");
        assert_eq!(tok.get_vocab_size(true), 50257);
        assert_eq!(tok.token_to_id("<|endoftext|>"), Some(END_OF_TEXT));
        let enc = tok.encode("Hello world", false).expect("encodes");
        // GPT-2: "Hello" = 15496, " world" = 995.
        assert_eq!(enc.get_ids(), &[15496, 995]);
        let text = "  Ünïcödé, tabs\tand\nnewlines — 123 <|endoftext|>";
        let ids = tok.encode(text, false).expect("encodes").get_ids().to_vec();
        assert!(ids.contains(&END_OF_TEXT), "the special token is one id: {ids:?}");
        assert_eq!(tok.decode(&ids, false).expect("decodes"), text);
    }
}
