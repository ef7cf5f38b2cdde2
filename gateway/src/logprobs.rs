//! Log-probabilities in OpenAI's two shapes, from the worker's token ids and scores: completions' parallel
//! lists (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`) and chat's `content` entries (`token`,
//! `logprob`, `bytes`, `top_logprobs`).
//!
//! Token text comes from the vocabulary's bytes, built once from the served model's tokenizer. A byte-level
//! token may hold part of a UTF-8 character: its `token` then shows U+FFFD where the part is, and its `bytes`
//! are exact (OpenAI's reason for `bytes`).
//!
//! The worker's scores are `f32`; these shapes hold them as `f64`, the same value, so that however a body is
//! serialized (a whole answer through `serde_json::Value`, a stream's chunk directly) it prints the value
//! exactly as a client reads it into its doubles, as vLLM's (Python's) floats print: an `f32` serialized
//! directly prints its shortest form, which a client parses to a different double, and the chunks of a
//! stream would not equal the whole answer's.

use serde::Serialize;
use shared::TokenLogprob;
use utoipa::ToSchema;

/// Every token id's bytes, read from the tokenizer with the first answer that needs them (not at startup).
pub struct Vocabulary {
    tokenizer: std::sync::Arc<tokenizers::Tokenizer>,
    bytes: std::sync::OnceLock<Vec<Vec<u8>>>,
}

impl Vocabulary {
    pub fn new(tokenizer: std::sync::Arc<tokenizers::Tokenizer>) -> Self {
        Self {
            tokenizer,
            bytes: std::sync::OnceLock::new(),
        }
    }

    fn all(&self) -> &[Vec<u8>] {
        self.bytes.get_or_init(|| {
            // A vocabulary that cannot be read as bytes names every token by its id's absence: empty text.
            let mut bytes = shared::grammar::token_bytes(&self.tokenizer).unwrap_or_default();
            // A special token (`<|endoftext|>`) is named by its text, without the grammar engine's marker.
            for b in &mut bytes {
                if b.first() == Some(&0xFF) {
                    b.remove(0);
                }
            }
            bytes
        })
    }

    fn bytes(&self, id: u32) -> &[u8] {
        self.all().get(id as usize).map_or(&[], Vec::as_slice)
    }

    fn text(&self, id: u32) -> String {
        String::from_utf8_lossy(self.bytes(id)).into_owned()
    }

    /// Completions' shape, over `tokens` in order (with `echo`, the prompt's then the generated ones):
    /// `text_offset` counts characters of the tokens' texts before each.
    pub fn completion<'a>(&self, tokens: impl IntoIterator<Item = &'a TokenLogprob>) -> CompletionLogprobs {
        self.completion_from(&mut 0, tokens)
    }

    /// [`Vocabulary::completion`] for a piece of a choice (a stream's chunk): `text_offset` counts on from
    /// `offset`, the characters before the piece, which it leaves past the piece's last token, so a stream's
    /// offsets run on across its chunks as one answer's do.
    pub fn completion_from<'a>(
        &self,
        offset: &mut usize,
        tokens: impl IntoIterator<Item = &'a TokenLogprob>,
    ) -> CompletionLogprobs {
        let mut out = CompletionLogprobs::default();
        for t in tokens {
            let text = self.text(t.id);
            out.text_offset.push(*offset);
            *offset += text.chars().count();
            out.tokens.push(text);
            out.token_logprobs.push(t.logprob.map(f64::from));
            out.top_logprobs.push(t.logprob.map(|_| {
                t.top
                    .iter()
                    .map(|a| (self.text(a.id), serde_json::Value::from(a.logprob)))
                    .collect()
            }));
        }
        out
    }

    /// Chat's shape, over the generated tokens.
    pub fn chat(&self, tokens: &[TokenLogprob]) -> ChatLogprobs {
        let content = tokens
            .iter()
            .map(|t| ChatTokenLogprob {
                token: self.text(t.id),
                logprob: f64::from(t.logprob.unwrap_or(f32::MIN)),
                bytes: self.bytes(t.id).to_vec(),
                top_logprobs: t
                    .top
                    .iter()
                    .map(|a| ChatTopLogprob {
                        token: self.text(a.id),
                        logprob: f64::from(a.logprob),
                        bytes: self.bytes(a.id).to_vec(),
                    })
                    .collect(),
            })
            .collect();
        ChatLogprobs {
            content,
            refusal: None,
        }
    }
}

/// A completion choice's `logprobs`: one entry per token in each list. A prompt's first token has no
/// log-probability (`null`, and `null` alternatives), as OpenAI's `echo` gives it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, ToSchema)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<Option<f64>>,
    /// Each position's likeliest tokens as `{token: logprob}`.
    #[schema(value_type = Vec<Option<Object>>)]
    pub top_logprobs: Vec<Option<serde_json::Map<String, serde_json::Value>>>,
    /// Characters of the text before each token.
    pub text_offset: Vec<usize>,
}

/// A chat choice's `logprobs`.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
    /// Always `null`: the model does not refuse.
    #[schema(value_type = Option<Object>)]
    pub refusal: Option<()>,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f64,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<ChatTopLogprob>,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ChatTopLogprob {
    pub token: String,
    pub logprob: f64,
    pub bytes: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::TopLogprob;

    fn vocabulary() -> Vocabulary {
        let tokenizer = tokenizers::Tokenizer::from_bytes(shared::tokens::GPTJ_TOKENIZER_JSON).unwrap();
        Vocabulary::new(std::sync::Arc::new(tokenizer))
    }

    fn scored(id: u32, logprob: Option<f32>, top: &[(u32, f32)]) -> TokenLogprob {
        TokenLogprob {
            id,
            logprob,
            top: top
                .iter()
                .map(|&(id, logprob)| TopLogprob { id, logprob })
                .collect(),
        }
    }

    #[test]
    fn completions_get_parallel_lists_with_character_offsets() {
        let v = vocabulary();
        // "Hello" (15496), " world" (995); the prompt's first token has no score.
        let lp = v.completion(&[
            scored(15496, None, &[]),
            scored(995, Some(-1.5), &[(995, -1.5), (11, -2.0)]),
        ]);
        assert_eq!(lp.tokens, ["Hello", " world"]);
        assert_eq!(lp.token_logprobs, [None, Some(-1.5)]);
        assert_eq!(lp.text_offset, [0, 5]);
        assert_eq!(lp.top_logprobs[0], None);
        let top = lp.top_logprobs[1].as_ref().unwrap();
        assert_eq!(top.keys().collect::<Vec<_>>(), [" world", ","]);
    }

    #[test]
    fn a_pieces_offsets_run_on_from_the_characters_before_it() {
        let v = vocabulary();
        let tokens = [
            scored(15496, Some(-0.5), &[]),
            scored(995, Some(-1.5), &[]),
            scored(11, Some(-2.5), &[]),
        ];
        let whole = v.completion(&tokens);
        let mut offset = 0;
        let first = v.completion_from(&mut offset, &tokens[..2]);
        assert_eq!(offset, "Hello world".len(), "left past the piece");
        let second = v.completion_from(&mut offset, &tokens[2..]);
        assert_eq!(
            [first.text_offset, second.text_offset].concat(),
            whole.text_offset
        );
        assert_eq!([first.tokens, second.tokens].concat(), whole.tokens);
    }

    #[test]
    fn a_score_prints_the_same_whole_or_streamed_as_the_exact_value_a_client_reads() {
        let v = vocabulary();
        let tokens = [scored(995, Some(-0.1), &[(995, -0.1)])];
        let whole = |value: serde_json::Value| serde_json::to_string(&value).unwrap();
        for (direct, through_value) in [
            (
                serde_json::to_string(&v.completion(&tokens)).unwrap(),
                whole(serde_json::to_value(v.completion(&tokens)).unwrap()),
            ),
            (
                serde_json::to_string(&v.chat(&tokens)).unwrap(),
                whole(serde_json::to_value(v.chat(&tokens)).unwrap()),
            ),
        ] {
            assert_eq!(direct, through_value);
            assert!(
                direct.contains(&f64::from(-0.1_f32).to_string()),
                "the f32's exact value: {direct}"
            );
        }
    }

    #[test]
    fn special_tokens_are_named_by_their_text() {
        assert_eq!(vocabulary().text(50256), "<|endoftext|>");
    }

    #[test]
    fn chat_entries_carry_exact_bytes() {
        let v = vocabulary();
        // A token holding part of a UTF-8 character (byte-level BPE has many).
        let partial = (0..v.all().len() as u32)
            .find(|&id| std::str::from_utf8(v.bytes(id)).is_err())
            .unwrap();
        let lp = v.chat(&[
            scored(995, Some(-0.25), &[(995, -0.25)]),
            scored(partial, Some(-3.0), &[]),
        ]);
        assert_eq!(lp.content[0].token, " world");
        assert_eq!(lp.content[0].bytes, b" world");
        assert_eq!(lp.content[1].bytes, v.bytes(partial));
        assert!(lp.content[1].token.contains('\u{fffd}'));
        assert_eq!(lp.content[0].top_logprobs[0].logprob, -0.25);
        assert_eq!(
            serde_json::to_value(&lp).unwrap()["refusal"],
            serde_json::Value::Null
        );
    }
}
