//! A job's tokens as `job.token` replies: text deltas that are always safe to show, coalesced so a fast GPU
//! does not flood the broker.
//!
//! Three rules make the streamed text always a prefix of the final text, so the gateway can finish any
//! stream with the rest of the final text and a client never has to take anything back:
//! - a delta never splits a UTF-8 character (a byte-level BPE token can end mid-character; its text is held
//!   until the character is complete, as TGI's `decode_token` does with a prefix and a read offset);
//! - text that may still turn out to be a stop sequence is held: a suffix that begins one of the job's stop
//!   strings, and a stop string completed by the newest token (the job may end on it; if another token comes,
//!   the generation went on and the text is released);
//! - token ids are not held: the final reply's `token_ids` include the stop sequence's tokens too.
//!
//! A job that asked for log-probabilities gets them on its chunks, one per token id, in order: they go
//! with the ids, never with the text (held-back text does not hold them back), as vLLM streams them, so
//! the chunks' log-probabilities concatenated are the final reply's `logprobs`.
//!
//! Coalescing: the first chunk goes at once (time to first token is what a streaming client sees), later
//! ones when `tokens` have gathered or `interval` has passed since the last chunk, whichever comes first.

use std::time::{Duration, Instant};

use shared::reply::Token;
use shared::{JobId, TokenLogprob};

use super::generator::Detokenizer;

/// How tokens are coalesced into replies; `tokens == 0` turns streaming off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamSettings {
    pub tokens: usize,
    pub interval: Duration,
}

impl StreamSettings {
    pub fn enabled(&self) -> bool {
        self.tokens > 0
    }
}

/// One job's generated tokens and what of them has been sent.
pub struct TokenStream {
    decoder: Option<Detokenizer>,
    stops: Vec<String>,
    settings: StreamSettings,
    ids: Vec<u32>,
    /// One per id of `ids` when the job asked for them (they come with its first tokens), else `None`.
    logprobs: Option<Vec<TokenLogprob>>,
    /// The text of every token decoded so far, complete characters only.
    text: String,
    /// TGI's offsets: `ids[prefix..read]` decoded gives the context for decoding the tokens after `read`.
    prefix: usize,
    read: usize,
    /// `text.len()` before the newest token.
    before_newest: usize,
    sent_tokens: usize,
    sent_bytes: usize,
    last_sent: Option<Instant>,
}

impl TokenStream {
    pub fn new(decoder: Option<Detokenizer>, stops: &[String], settings: StreamSettings) -> Self {
        Self {
            decoder,
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            settings,
            ids: Vec::new(),
            logprobs: None,
            text: String::new(),
            prefix: 0,
            read: 0,
            before_newest: 0,
            sent_tokens: 0,
            sent_bytes: 0,
            last_sent: None,
        }
    }

    /// Tokens generated so far.
    pub fn tokens(&self) -> usize {
        self.ids.len()
    }

    /// Takes a step's new tokens, with their log-probabilities (one per id) when the job asked for them.
    pub fn push(&mut self, ids: &[u32], logprobs: Option<&[TokenLogprob]>) {
        if let Some(new) = logprobs {
            debug_assert_eq!(new.len(), ids.len(), "one log-probability per token");
            self.logprobs.get_or_insert_with(Vec::new).extend_from_slice(new);
        }
        for &id in ids {
            self.before_newest = self.text.len();
            self.ids.push(id);
            let Some(decoder) = &self.decoder else {
                continue;
            };
            let before = decoder.decode(&self.ids[self.prefix..self.read]);
            let now = decoder.decode(&self.ids[self.prefix..]);
            // A trailing U+FFFD is a character still incomplete: wait for the token that completes it.
            if now.len() > before.len()
                && !now.ends_with('\u{FFFD}')
                && let Some(added) = now.strip_prefix(before.as_str())
            {
                self.text.push_str(added);
                self.prefix = self.read;
                self.read = self.ids.len();
            }
        }
    }

    /// Where the text safe to send ends (a byte offset into `text`, on a character boundary).
    fn safe_end(&self) -> usize {
        let text = self.text.as_str();
        let mut end = text.len();
        for stop in &self.stops {
            // A stop string the newest token completed: the job may end on it.
            let from = floor_boundary(text, self.before_newest.saturating_sub(stop.len()));
            for (at, _) in text[from..].match_indices(stop.as_str()) {
                let at = from + at;
                if at + stop.len() > self.before_newest {
                    end = end.min(at);
                }
            }
            // A suffix that begins a stop string.
            for (k, _) in stop.char_indices().skip(1).chain([(stop.len(), ' ')]) {
                if text.ends_with(&stop[..k]) {
                    end = end.min(text.len() - k);
                }
            }
        }
        end.max(self.sent_bytes)
    }

    /// Whether a chunk should go now.
    pub fn due(&self, now: Instant) -> bool {
        let unsent = self.ids.len() - self.sent_tokens;
        if !self.settings.enabled() || unsent == 0 {
            return false;
        }
        match self.last_sent {
            None => true,
            Some(at) => unsent >= self.settings.tokens || now >= at + self.settings.interval,
        }
    }

    /// When the tokens not yet sent become due by time (`None` when nothing waits).
    pub fn deadline(&self) -> Option<Instant> {
        if !self.settings.enabled() || self.ids.len() == self.sent_tokens {
            return None;
        }
        Some(
            self.last_sent
                .map_or_else(Instant::now, |at| at + self.settings.interval),
        )
    }

    /// The chunk of everything not yet sent, marked as sent. Give it back with [`TokenStream::unsend`]
    /// if the broker refused it, so the next chunk carries it.
    pub fn take(&mut self, job_id: JobId) -> Option<Token> {
        let end = self.safe_end();
        if self.ids.len() == self.sent_tokens && end == self.sent_bytes {
            return None;
        }
        let chunk = Token {
            job_id,
            index: self.sent_tokens as u32,
            token_ids: self.ids[self.sent_tokens..].to_vec(),
            text_offset: self.sent_bytes as u32,
            text: self.text[self.sent_bytes..end].to_owned(),
            logprobs: self
                .logprobs
                .as_ref()
                .map(|all| all.get(self.sent_tokens..).unwrap_or_default().to_vec()),
        };
        self.sent_tokens = self.ids.len();
        self.sent_bytes = end;
        self.last_sent = Some(Instant::now());
        Some(chunk)
    }

    pub fn unsend(&mut self, chunk: &Token) {
        self.sent_tokens = chunk.index as usize;
        self.sent_bytes = chunk.text_offset as usize;
    }
}

fn floor_boundary(text: &str, mut at: usize) -> usize {
    while at > 0 && !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decoding::TextDecoder;
    use std::sync::Arc;

    /// Token `t` is the byte `t`; bytes are decoded as UTF-8 with U+FFFD for what is incomplete, as a
    /// byte-level BPE decoder does.
    struct Bytes;
    impl TextDecoder for Bytes {
        fn decode(&self, ids: &[u32]) -> String {
            let bytes: Vec<u8> = ids.iter().map(|&i| i as u8).collect();
            String::from_utf8_lossy(&bytes).into_owned()
        }
    }

    fn stream(stops: &[&str]) -> TokenStream {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let settings = StreamSettings {
            tokens: 4,
            interval: Duration::from_millis(50),
        };
        TokenStream::new(Some(Arc::new(Bytes)), &stops, settings)
    }

    fn ids(s: &str) -> Vec<u32> {
        s.bytes().map(u32::from).collect()
    }

    /// A log-probability for each byte of `s`, told apart by its value.
    fn scores(s: &str) -> Vec<TokenLogprob> {
        s.bytes()
            .map(|b| TokenLogprob {
                id: u32::from(b),
                logprob: Some(-f32::from(b) / 100.0),
                top: Vec::new(),
            })
            .collect()
    }

    /// Pushes `s`'s tokens with their log-probabilities, as a job that asked for them gets them.
    fn push_scored(stream: &mut TokenStream, s: &str) {
        stream.push(&ids(s), Some(&scores(s)));
    }

    fn sent(s: &mut TokenStream) -> String {
        s.take(JobId::new_random()).map(|c| c.text).unwrap_or_default()
    }

    #[test]
    fn a_character_split_over_tokens_is_sent_whole() {
        let mut s = stream(&[]);
        let euro = "€".as_bytes();
        s.push(&ids("a"), None);
        s.push(&[u32::from(euro[0]), u32::from(euro[1])], None);
        assert_eq!(sent(&mut s), "a");
        s.push(&[u32::from(euro[2])], None);
        assert_eq!(sent(&mut s), "€");
    }

    #[test]
    fn text_that_may_begin_a_stop_sequence_is_held_until_it_cannot() {
        let mut s = stream(&["\nUser:"]);
        s.push(&ids("Hi there\nUs"), None);
        assert_eq!(sent(&mut s), "Hi there");
        s.push(&ids("ually"), None);
        assert_eq!(sent(&mut s), "\nUsually");
    }

    #[test]
    fn a_stop_completed_by_the_newest_token_is_held_and_released_when_generation_goes_on() {
        let mut s = stream(&["END"]);
        s.push(&ids("answer E"), None);
        assert_eq!(sent(&mut s), "answer ");
        s.push(&[u32::from(b'N'), u32::from(b'D')], None);
        s.push(&ids("x"), None);
        // "x" is a later token: the generation went on past END (min_new_tokens), so it is released.
        assert_eq!(sent(&mut s), "ENDx");
        let mut s = stream(&["END"]);
        s.push(&ids("answer EN"), None);
        s.push(&ids("D"), None);
        assert_eq!(sent(&mut s), "answer ");
    }

    #[test]
    fn chunks_carry_cursors_and_ids_are_never_held() {
        let mut s = stream(&["\n\n"]);
        s.push(&ids("ab\n"), None);
        let first = s.take(JobId::new_random()).unwrap();
        assert_eq!(
            (first.index, first.text_offset, first.text.as_str()),
            (0, 0, "ab")
        );
        assert_eq!(first.token_ids.len(), 3);
        s.push(&ids("c"), None);
        let second = s.take(JobId::new_random()).unwrap();
        assert_eq!(
            (second.index, second.text_offset, second.text.as_str()),
            (3, 2, "\nc")
        );
        assert!(s.take(JobId::new_random()).is_none(), "nothing new, no chunk");
        assert!(
            first.logprobs.is_none() && second.logprobs.is_none(),
            "not asked for, none"
        );
        s.push(&ids("d"), None);
        let job = JobId::new_random();
        let refused = s.take(job).unwrap();
        s.unsend(&refused);
        assert_eq!(s.take(job).unwrap(), refused, "a refused chunk is sent again");
    }

    #[test]
    fn log_probabilities_go_with_their_ids_whatever_text_is_held() {
        let mut s = stream(&["\n\n"]);
        push_scored(&mut s, "ab\n");
        let first = s.take(JobId::new_random()).unwrap();
        assert_eq!(first.text, "ab", "the newline may begin the stop sequence");
        assert_eq!(
            first.logprobs,
            Some(scores("ab\n")),
            "its token's score is not held"
        );
        push_scored(&mut s, "c");
        push_scored(&mut s, "de");
        let second = s.take(JobId::new_random()).unwrap();
        assert_eq!((second.index, second.text.as_str()), (3, "\ncde"));
        assert_eq!(second.logprobs, Some(scores("cde")));
        push_scored(&mut s, "\n\n");
        let held = s.take(JobId::new_random()).unwrap();
        assert_eq!(held.text, "", "a whole stop sequence is held");
        assert_eq!(held.logprobs, Some(scores("\n\n")));
        let streamed: Vec<TokenLogprob> = [first, second, held]
            .into_iter()
            .flat_map(|c| c.logprobs.unwrap())
            .collect();
        assert_eq!(
            streamed,
            scores("ab\ncde\n\n"),
            "concatenated, one per token in order"
        );
    }

    #[test]
    fn a_refused_chunks_log_probabilities_come_again_with_its_ids() {
        let mut s = stream(&[]);
        push_scored(&mut s, "ab");
        let job = JobId::new_random();
        s.take(job).unwrap();
        push_scored(&mut s, "cd");
        let refused = s.take(job).unwrap();
        s.unsend(&refused);
        push_scored(&mut s, "e");
        let again = s.take(job).unwrap();
        assert_eq!((again.index, again.text_offset), (2, 2));
        assert_eq!(again.token_ids, ids("cde"));
        assert_eq!(again.logprobs, Some(scores("cde")));
    }

    #[test]
    fn the_first_chunk_goes_at_once_and_later_ones_by_count_or_time() {
        let mut s = stream(&[]);
        let t0 = Instant::now();
        assert!(!s.due(t0));
        s.push(&ids("a"), None);
        assert!(s.due(t0), "the first token goes at once");
        s.take(JobId::new_random());
        s.push(&ids("bc"), None);
        assert!(!s.due(Instant::now()));
        assert!(
            s.due(Instant::now() + Duration::from_millis(60)),
            "the interval passed"
        );
        s.push(&ids("de"), None);
        assert!(s.due(Instant::now()), "four tokens gathered");
        let off = TokenStream::new(
            None,
            &[],
            StreamSettings {
                tokens: 0,
                interval: Duration::ZERO,
            },
        );
        assert!(!off.due(t0) && off.deadline().is_none());
    }
}
