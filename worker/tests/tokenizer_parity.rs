//! The bundled GPT-J tokenizer tokenizes exactly as transformers' GPT-2 tokenizers do.
//!
//! transformers cannot download GPT-2's files here, so the reference tokenizers (fast and the pure-Python
//! slow one) are built from the vocabulary and merges inside our asset: what this proves is that the asset's
//! pipeline (byte-level pre-tokenization, BPE, the special token) is the one transformers builds for them.

use std::path::{Path, PathBuf};
use std::process::Command;

fn python() -> PathBuf {
    std::env::var_os("GPTJ_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"))
}

#[test]
fn the_bundled_tokenizer_matches_transformers_gpt2_tokenizers() {
    let texts = [
        "Hello world",
        "The quick brown fox jumps over the lazy dog.",
        "  leading spaces, trailing spaces   ",
        "Tabs\tand\nnewlines\n\n\r\nand CRLF",
        "Ünïcödé: café, naïve, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어, emoji 🤖🚀👩‍👩‍👧",
        "numbers 1234567890 3.14159 -42 1e10 0x1F",
        "code: fn main() { println!(\"{}\", x[0] + y->z); } // comment",
        "<|endoftext|>between<|endoftext|> two special tokens",
        "contractions: don't won't it's we'll they're I'd",
        "URLs https://example.com/path?q=1&b=2#frag and e-mail a.b@c.org",
        "",
        " ",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "Mixed CASE WORDS and camelCaseIdentifiers_with_underscores",
    ];
    let asset = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/assets/gptj-tokenizer.json");
    let out = Command::new(python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/tokenizer_reference.py"))
        .arg(&asset)
        .arg(serde_json::to_string(&texts).expect("json"))
        .output()
        .expect("the Python reference runs (set GPTJ_PYTHON)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let reference: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(reference["vocab_size"], 50257);

    // Through the same entry point the worker uses: a directory without tokenizer.json gets the asset.
    let empty = tempfile::tempdir().expect("dir");
    let tok = worker::tokenizer::load(empty.path()).expect("bundled tokenizer");
    for (i, text) in texts.iter().enumerate() {
        let ours: Vec<u64> = tok
            .encode(*text, false)
            .expect("encodes")
            .get_ids()
            .iter()
            .map(|id| *id as u64)
            .collect();
        for impl_name in ["fast", "slow"] {
            let theirs: Vec<u64> = serde_json::from_value(reference[impl_name][i].clone()).expect("ids");
            assert_eq!(ours, theirs, "{impl_name} GPT-2 tokenizer on {text:?}");
        }
        let ids: Vec<u32> = ours.iter().map(|id| *id as u32).collect();
        assert_eq!(
            tok.decode(&ids, false).expect("decodes"),
            *text,
            "round trip of {text:?}"
        );
    }
}

#[test]
fn a_directory_tokenizer_wins_and_a_broken_one_is_an_error() {
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(dir.path().join("tokenizer.json"), "{broken").expect("write");
    let err = worker::tokenizer::load(dir.path()).expect_err("broken tokenizer.json");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
    assert!(worker::tokenizer::load(Path::new("/nonexistent/model")).is_err());
}
