//! Prompt processing, as the original pipeline's validator did it: drop characters outside an allowed set,
//! collapse whitespace, then enforce minimum and maximum lengths.
//!
//! Both the gateway and the worker apply these rules (AMQP producers bypass the gateway), so they live here
//! and are configured by one [`PromptRules`] value.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The original deployment's allowed characters: `a-z A-Z 0-9 space ? ' , . -`.
pub const DEFAULT_ALLOWED: &str = "a-zA-Z0-9 ?',.-";
pub const DEFAULT_MIN_CHARS: usize = 1;
pub const DEFAULT_MAX_CHARS: usize = 200;

/// What to do with a prompt that holds characters outside the allowed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DisallowedPolicy {
    /// Remove them (the original's behaviour).
    Clean,
    /// Refuse the prompt, naming the first offending character.
    Reject,
}

impl std::str::FromStr for DisallowedPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "clean" => Ok(Self::Clean),
            "reject" => Ok(Self::Reject),
            other => Err(format!("unknown policy `{other}` (expected clean or reject)")),
        }
    }
}

/// The prompt settings as command-line flags (with environment variables), flattened into the gateway's and
/// the worker's configuration so both sides read the same names.
#[cfg(feature = "cli")]
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct PromptArgs {
    /// Characters a prompt may hold, as a character-class body (`x-y` is a range).
    #[arg(long, env = "PROMPT_ALLOWED_CHARS", default_value = DEFAULT_ALLOWED)]
    pub prompt_allowed_chars: String,
    /// Minimum prompt length in characters, after cleaning.
    #[arg(long, env = "PROMPT_MIN_CHARS", default_value_t = DEFAULT_MIN_CHARS)]
    pub prompt_min_chars: usize,
    /// Maximum prompt length in characters, after cleaning.
    #[arg(long, env = "PROMPT_MAX_CHARS", default_value_t = DEFAULT_MAX_CHARS)]
    pub prompt_max_chars: usize,
    /// `clean` removes disallowed characters (the original's behaviour); `reject` refuses the prompt.
    #[arg(long, env = "PROMPT_DISALLOWED", default_value = "clean")]
    pub prompt_disallowed: DisallowedPolicy,
}

#[cfg(feature = "cli")]
impl PromptArgs {
    pub fn rules(&self) -> Result<PromptRules, String> {
        PromptRules::new(
            &self.prompt_allowed_chars,
            self.prompt_min_chars,
            self.prompt_max_chars,
            self.prompt_disallowed,
        )
    }
}

/// Why a prompt was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PromptError {
    #[error("prompt is empty after cleaning")]
    Empty,
    #[error("prompt has {len} characters after cleaning; the minimum is {min}")]
    TooShort { len: usize, min: usize },
    #[error("prompt has {len} characters after cleaning; the maximum is {max}")]
    TooLong { len: usize, max: usize },
    #[error("prompt contains the disallowed character {0:?}")]
    Disallowed(char),
}

/// The configured rules. Build with [`PromptRules::new`], which parses the allowed-set syntax.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptRules {
    /// Inclusive character ranges; single characters are ranges of one.
    allowed: Vec<(char, char)>,
    pub min_chars: usize,
    pub max_chars: usize,
    pub policy: DisallowedPolicy,
}

impl Default for PromptRules {
    fn default() -> Self {
        Self::new(
            DEFAULT_ALLOWED,
            DEFAULT_MIN_CHARS,
            DEFAULT_MAX_CHARS,
            DisallowedPolicy::Clean,
        )
        .expect("the default rules are valid")
    }
}

impl PromptRules {
    /// `allowed` is a character-class body such as `a-zA-Z0-9 ?',.-`: `x-y` is a range, a `-` first or last
    /// is literal. Whitespace in prompts is always collapsed to single spaces, so list a space to keep it.
    pub fn new(
        allowed: &str,
        min_chars: usize,
        max_chars: usize,
        policy: DisallowedPolicy,
    ) -> Result<Self, String> {
        if min_chars > max_chars {
            return Err(format!(
                "minimum prompt length {min_chars} exceeds maximum {max_chars}"
            ));
        }
        let chars: Vec<char> = allowed.chars().collect();
        if chars.is_empty() {
            return Err("the allowed character set is empty".into());
        }
        let mut ranges = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            if i + 2 < chars.len() && chars[i + 1] == '-' {
                let (lo, hi) = (chars[i], chars[i + 2]);
                if lo > hi {
                    return Err(format!("bad range {lo}-{hi} in allowed characters"));
                }
                ranges.push((lo, hi));
                i += 3;
            } else {
                ranges.push((chars[i], chars[i]));
                i += 1;
            }
        }
        Ok(Self {
            allowed: ranges,
            min_chars,
            max_chars,
            policy,
        })
    }

    fn allows(&self, c: char) -> bool {
        self.allowed.iter().any(|&(lo, hi)| lo <= c && c <= hi)
    }

    /// Cleans `raw` without the length limits: drops (or, under [`DisallowedPolicy::Reject`], refuses)
    /// characters outside the allowed set and collapses whitespace. The result may be empty. Chat messages
    /// use it, because their length limit applies to the conversation as a whole, not to each message.
    pub fn clean_text(&self, raw: &str) -> Result<String, PromptError> {
        let mut out = String::with_capacity(raw.len());
        let mut pending_space = false;
        for c in raw.chars() {
            if c.is_whitespace() {
                pending_space = !out.is_empty();
                continue;
            }
            if !self.allows(c) {
                match self.policy {
                    DisallowedPolicy::Clean => continue,
                    DisallowedPolicy::Reject => return Err(PromptError::Disallowed(c)),
                }
            }
            if pending_space && self.allows(' ') {
                out.push(' ');
            }
            pending_space = false;
            out.push(c);
        }
        Ok(out)
    }

    /// Cleans `raw` and checks its length. Whitespace of any kind counts as a space for the allowed set.
    pub fn clean(&self, raw: &str) -> Result<String, PromptError> {
        let out = self.clean_text(raw)?;
        let len = out.chars().count();
        if len == 0 {
            return Err(PromptError::Empty);
        }
        if len < self.min_chars {
            return Err(PromptError::TooShort {
                len,
                min: self.min_chars,
            });
        }
        if len > self.max_chars {
            return Err(PromptError::TooLong {
                len,
                max: self.max_chars,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn special_characters_are_removed_and_whitespace_collapsed() {
        let rules = PromptRules::default();
        assert_eq!(
            rules.clean("  Hello,\t$world*!  How's   it going?\n").unwrap(),
            "Hello, world How's it going?"
        );
    }

    #[test]
    fn a_prompt_of_only_special_characters_is_empty() {
        assert_eq!(
            PromptRules::default().clean("$$ ** @@").unwrap_err(),
            PromptError::Empty
        );
    }

    #[test]
    fn length_limits_apply_after_cleaning() {
        let rules = PromptRules::new(DEFAULT_ALLOWED, 5, 10, DisallowedPolicy::Clean).unwrap();
        assert_eq!(
            rules.clean("ab$$$$$$").unwrap_err(),
            PromptError::TooShort { len: 2, min: 5 }
        );
        assert_eq!(
            rules.clean("abcdefghijk").unwrap_err(),
            PromptError::TooLong { len: 11, max: 10 }
        );
        assert_eq!(rules.clean("abcde#######").unwrap(), "abcde");
    }

    #[test]
    fn clean_text_cleans_as_clean_does_but_leaves_length_to_the_caller() {
        let rules = PromptRules::new(DEFAULT_ALLOWED, 5, 10, DisallowedPolicy::Clean).unwrap();
        assert_eq!(rules.clean_text(" $$ ").unwrap(), "");
        assert_eq!(rules.clean_text("abcdefghijk  l*").unwrap(), "abcdefghijk l");
    }

    #[test]
    fn reject_policy_names_the_character() {
        let rules = PromptRules::new(DEFAULT_ALLOWED, 1, 200, DisallowedPolicy::Reject).unwrap();
        assert_eq!(
            rules.clean("hi $there").unwrap_err(),
            PromptError::Disallowed('$')
        );
    }

    #[test]
    fn trailing_dash_in_the_set_is_literal() {
        let rules = PromptRules::default();
        assert_eq!(rules.clean("well-known").unwrap(), "well-known");
    }

    proptest! {
        #[test]
        fn cleaned_prompts_hold_only_allowed_characters_and_no_double_spaces(raw in ".{0,300}") {
            let rules = PromptRules::default();
            if let Ok(clean) = rules.clean(&raw) {
                prop_assert!(clean.chars().all(|c| rules.allows(c)));
                prop_assert!(!clean.contains("  "));
                prop_assert!(!clean.starts_with(' ') && !clean.ends_with(' '));
                prop_assert!(clean.chars().count() <= DEFAULT_MAX_CHARS);
                prop_assert_eq!(rules.clean(&clean), Ok(clean.clone()));
            }
        }
    }
}
