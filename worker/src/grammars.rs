//! Jobs' grammars compiled for this model, on the async side, cached by their text.
//!
//! Compiling a JSON Schema takes milliseconds, and clients send the same few schemas over and over (an
//! extraction pipeline sends one schema a million times), so each compiled grammar is kept (up to
//! [`CACHED_GRAMMARS`], least recently used out first) and a job gets a copy of its fresh state. The
//! compiler itself (the vocabulary's token trie) is built on the first grammar, so a worker that never sees
//! one never pays for it.

use std::sync::OnceLock;

use shared::grammar::{Grammar, GrammarCompiler, GrammarError, Matcher, RecentGrammars};
use tokenizers::Tokenizer;

use crate::decoding::Constraint;

/// Compiled grammars kept at most.
pub const CACHED_GRAMMARS: usize = 256;

/// The compiler for one model's vocabulary, and the grammars it compiled.
pub struct Grammars {
    tokenizer: Tokenizer,
    vocab_size: usize,
    eos: Option<u32>,
    compiler: OnceLock<Result<GrammarCompiler, GrammarError>>,
    /// Each grammar's fresh state, by its text.
    cache: RecentGrammars<Matcher>,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars")
            .field("vocab_size", &self.vocab_size)
            .finish_non_exhaustive()
    }
}

impl Clone for Grammars {
    /// A new cache over the same vocabulary (the compiled grammars are not copied).
    fn clone(&self) -> Self {
        Self::new(self.tokenizer.clone(), self.vocab_size, self.eos)
    }
}

impl Grammars {
    /// For a model of `vocab_size` logits whose text ends with `eos`.
    pub fn new(tokenizer: Tokenizer, vocab_size: usize, eos: Option<u32>) -> Self {
        Self {
            tokenizer,
            vocab_size,
            eos,
            compiler: OnceLock::new(),
            cache: RecentGrammars::new(CACHED_GRAMMARS),
        }
    }

    /// A fresh state of `grammar` for one job, compiled or from the cache.
    pub fn constraint(&self, grammar: &Grammar) -> Result<Constraint, GrammarError> {
        let key = grammar.key();
        if let Some(m) = self.cache.get_with(&key, Matcher::deep_clone) {
            return Ok(Constraint::new(m));
        }
        let compiler = self
            .compiler
            .get_or_init(|| {
                let eos = self.eos.ok_or_else(|| {
                    GrammarError("the model has no end-of-text token to end a grammar".into())
                })?;
                GrammarCompiler::new(&self.tokenizer, self.vocab_size, eos)
            })
            .as_ref()
            .map_err(Clone::clone)?;
        let matcher = compiler.compile(grammar)?;
        self.cache.insert(key, matcher.deep_clone());
        Ok(Constraint::new(matcher))
    }

    /// Grammars in the cache.
    pub fn cached_count(&self) -> usize {
        self.cache.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decoding::allowed;

    fn grammars() -> Grammars {
        #[allow(clippy::unwrap_used)]
        let tokenizer = crate::tokenizer::bundled().unwrap();
        Grammars::new(tokenizer, 50400, Some(50256))
    }

    #[test]
    fn a_grammar_is_compiled_once_and_each_job_gets_a_fresh_state() {
        let g = grammars();
        let yes = i64::from(g.tokenizer.encode("yes", false).unwrap().get_ids()[0]);
        let grammar = Grammar::Choice(vec!["yes".into(), "no".into()]);
        let mut first = g.constraint(&grammar).unwrap();
        first.advance(yes).unwrap();
        first.refresh().unwrap();
        assert_eq!(g.cached_count(), 1);
        let mut second = g.constraint(&grammar).unwrap();
        assert_eq!(g.cached_count(), 1);
        second.refresh().unwrap();
        let mask = second.mask().unwrap();
        assert!(
            allowed(mask, yes as usize),
            "the copy starts fresh, not after `yes`"
        );
    }

    #[test]
    fn a_generated_token_moves_the_grammar_at_the_next_refresh_and_one_outside_it_fails_there() {
        let g = grammars();
        let token = |text: &str| g.tokenizer.encode(text, false).unwrap().get_ids()[0] as usize;
        let (yes, no) = (token("yes"), token("no"));
        let grammar = Grammar::Choice(vec!["yes".into(), "no".into()]);

        let mut c = g.constraint(&grammar).unwrap();
        c.refresh().unwrap();
        assert!(allowed(c.mask().unwrap(), yes) && allowed(c.mask().unwrap(), no));
        c.advance(yes as i64).unwrap();
        assert!(c.mask().is_none(), "the mask of the position before is gone");
        c.refresh().unwrap();
        let mask = c.mask().unwrap();
        assert!(allowed(mask, 50256), "after `yes` the text is complete");
        assert!(!allowed(mask, yes) && !allowed(mask, no));
        c.advance(50256).unwrap();

        let mut outside = g.constraint(&grammar).unwrap();
        outside.advance(token("maybe") as i64).unwrap();
        assert!(outside.refresh().is_err());
    }

    #[test]
    fn a_broken_grammar_is_an_error_and_is_not_cached() {
        let g = grammars();
        assert!(g.constraint(&Grammar::Regex("(".into())).is_err());
        assert_eq!(g.cached_count(), 0);
    }
}
