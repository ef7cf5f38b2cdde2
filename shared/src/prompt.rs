//! How a route takes a prompt's text: as written, or cleaned as the original demo cleaned it.
//!
//! The original pipeline's validator dropped characters outside an allowed set (`a-zA-Z0-9 ?',.-`), collapsed
//! whitespace and capped a prompt at 200 characters. `/run` keeps that ([`PromptRules::Cleaned`]): its clients
//! were written against it. An OpenAI-compatible API cannot: code, newlines, quotes and every language other
//! than English would be silently changed, and an ordinary system prompt refused. So the OpenAI routes, and
//! `/v1/jobs` unless configured otherwise, take the text as written ([`PromptRules::AsWritten`]), bounded not
//! in characters but in tokens against the model's context (the gateway counts them with the model's
//! tokenizer; the worker, which alone renders chat templates, checks every prompt again).
//!
//! Either way, control characters (C0 and C1) other than tab, newline and carriage return are removed: no
//! client means them as text, and a NUL must never reach the tokenizer. Removing them rather than refusing
//! the prompt keeps the promise of taking what other OpenAI-compatible servers take. Both rules are
//! idempotent, so text cleaned by the gateway passes the worker's rules unchanged.
//!
//! Both the gateway and the worker apply these rules (AMQP producers bypass the gateway), so they live here,
//! with the flags that configure them ([`PromptArgs`]), which both read under the same names.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The original deployment's allowed characters: `a-z A-Z 0-9 space ? ' , . -`.
pub const DEFAULT_ALLOWED: &str = "a-zA-Z0-9 ?',.-";
pub const DEFAULT_MIN_CHARS: usize = 1;
pub const DEFAULT_MAX_CHARS: usize = 200;

/// Whether `c` is removed from every prompt: a C0 or C1 control character other than tab, newline and
/// carriage return (DEL included).
pub fn is_unsafe_control(c: char) -> bool {
    c.is_control() && !matches!(c, '\t' | '\n' | '\r')
}

/// `raw` without its unsafe control characters ([`is_unsafe_control`]); otherwise exactly as written.
pub fn without_controls(raw: &str) -> String {
    raw.chars().filter(|&c| !is_unsafe_control(c)).collect()
}

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

/// Which rules a job's prompt gets: the `--prompt-policy` flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PromptPolicy {
    /// [`PromptRules::AsWritten`].
    #[default]
    AsWritten,
    /// [`PromptRules::Cleaned`], with the cleaning the flags configure.
    Clean,
}

impl std::str::FromStr for PromptPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "as-written" => Ok(Self::AsWritten),
            "clean" => Ok(Self::Clean),
            other => Err(format!(
                "unknown prompt policy `{other}` (expected as-written or clean)"
            )),
        }
    }
}

/// The prompt settings as command-line flags (with environment variables), flattened into the gateway's and
/// the worker's configuration so both sides read the same names.
#[cfg(feature = "cli")]
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct PromptArgs {
    /// How a job's prompt is taken: `as-written` keeps the text (less control characters other than tab,
    /// newline and carriage return), bounded in tokens by the model's context; `clean` applies the cleaning
    /// below. The gateway applies it to `/v1/jobs` (`/run` always cleans; the OpenAI routes always take text
    /// as written), a worker to every job it takes, whichever route it came from.
    #[arg(long, env = "PROMPT_POLICY", default_value = "as-written")]
    pub prompt_policy: PromptPolicy,
    /// Characters a cleaned prompt may hold, as a character-class body (`x-y` is a range).
    #[arg(long, env = "PROMPT_ALLOWED_CHARS", default_value = DEFAULT_ALLOWED)]
    pub prompt_allowed_chars: String,
    /// Minimum length of a cleaned prompt in characters, after cleaning.
    #[arg(long, env = "PROMPT_MIN_CHARS", default_value_t = DEFAULT_MIN_CHARS)]
    pub prompt_min_chars: usize,
    /// Maximum length of a cleaned prompt in characters, after cleaning.
    #[arg(long, env = "PROMPT_MAX_CHARS", default_value_t = DEFAULT_MAX_CHARS)]
    pub prompt_max_chars: usize,
    /// When cleaning: `clean` removes disallowed characters (the original's behaviour); `reject` refuses the
    /// prompt.
    #[arg(long, env = "PROMPT_DISALLOWED", default_value = "clean")]
    pub prompt_disallowed: DisallowedPolicy,
}

#[cfg(feature = "cli")]
impl PromptArgs {
    /// The cleaning the flags configure, which `/run` applies whatever the policy.
    pub fn cleaning(&self) -> Result<PromptRules, String> {
        Cleaning::new(
            &self.prompt_allowed_chars,
            self.prompt_min_chars,
            self.prompt_max_chars,
            self.prompt_disallowed,
        )
        .map(PromptRules::Cleaned)
    }

    /// The rules `--prompt-policy` gives jobs: as written, or [`PromptArgs::cleaning`]. The cleaning flags
    /// are checked either way, so a typo stops start-up rather than the first `/run` request.
    pub fn job_rules(&self) -> Result<PromptRules, String> {
        let cleaning = self.cleaning()?;
        Ok(match self.prompt_policy {
            PromptPolicy::AsWritten => PromptRules::AsWritten,
            PromptPolicy::Clean => cleaning,
        })
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

/// The rules a prompt's text goes through. The default, [`PromptRules::AsWritten`], is what a worker applies
/// unless configured otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PromptRules {
    /// The text as written, less unsafe control characters ([`without_controls`]). Only an empty prompt is
    /// refused; its length is bounded in tokens, against the context, by whoever tokenizes it.
    #[default]
    AsWritten,
    /// The original demo's cleaning.
    Cleaned(Cleaning),
}

impl PromptRules {
    /// The original deployment's cleaning, with its defaults.
    pub fn original() -> Self {
        Self::Cleaned(Cleaning::default())
    }

    /// Applies the rules to `raw` without the length limits. The result may be empty. Chat messages use it,
    /// because the limits apply to the conversation as a whole, not to each message.
    pub fn clean_text(&self, raw: &str) -> Result<String, PromptError> {
        match self {
            Self::AsWritten => Ok(without_controls(raw)),
            Self::Cleaned(cleaning) => cleaning.clean_text(raw),
        }
    }

    /// Checks a text of `len` characters, once through [`PromptRules::clean_text`], against the limits: an
    /// empty text is refused by both rules; a cleaned one must also be within its character bounds.
    pub fn check_length(&self, len: usize) -> Result<(), PromptError> {
        if len == 0 {
            return Err(PromptError::Empty);
        }
        let Self::Cleaned(cleaning) = self else {
            return Ok(());
        };
        if len < cleaning.min_chars {
            return Err(PromptError::TooShort {
                len,
                min: cleaning.min_chars,
            });
        }
        if len > cleaning.max_chars {
            return Err(PromptError::TooLong {
                len,
                max: cleaning.max_chars,
            });
        }
        Ok(())
    }

    /// Applies the rules to `raw` and checks its length.
    pub fn clean(&self, raw: &str) -> Result<String, PromptError> {
        let out = self.clean_text(raw)?;
        self.check_length(out.chars().count())?;
        Ok(out)
    }
}

/// The original demo's cleaning, as configured. Build with [`Cleaning::new`], which parses the allowed-set
/// syntax.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cleaning {
    /// Inclusive character ranges; single characters are ranges of one.
    allowed: Vec<(char, char)>,
    pub min_chars: usize,
    pub max_chars: usize,
    pub policy: DisallowedPolicy,
}

impl Default for Cleaning {
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

impl Cleaning {
    /// `allowed` is a character-class body such as `a-zA-Z0-9 ?',.-`: `x-y` is a range, a `-` first or last
    /// is literal. Whitespace in prompts is always collapsed to single spaces, so list a space to keep it.
    /// Unsafe control characters ([`is_unsafe_control`]) are never allowed, whatever the set says.
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
        !is_unsafe_control(c) && self.allowed.iter().any(|&(lo, hi)| lo <= c && c <= hi)
    }

    /// Cleans `raw` without the length limits: drops (or, under [`DisallowedPolicy::Reject`], refuses)
    /// characters outside the allowed set and collapses whitespace of any kind to single spaces.
    fn clean_text(&self, raw: &str) -> Result<String, PromptError> {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cleaned(min: usize, max: usize, policy: DisallowedPolicy) -> PromptRules {
        PromptRules::Cleaned(Cleaning::new(DEFAULT_ALLOWED, min, max, policy).unwrap())
    }

    #[test]
    fn a_prompt_as_written_keeps_every_character_but_unsafe_controls() {
        let text = "Résumé:\n\tdef f(x): return x + 1  # \"quoted\" 日本語 \u{1F600}\r\n";
        assert_eq!(PromptRules::AsWritten.clean(text).unwrap(), text);
        assert_eq!(
            PromptRules::AsWritten
                .clean("a\u{0}b\u{7}c\u{1b}[0m\u{7f}d\u{85}e\u{9f}")
                .unwrap(),
            "abc[0mde"
        );
    }

    #[test]
    fn a_prompt_as_written_has_no_length_limit_in_characters_but_may_not_be_empty() {
        let long = "word ".repeat(10_000);
        assert_eq!(PromptRules::AsWritten.clean(&long).unwrap(), long);
        assert_eq!(PromptRules::AsWritten.clean("").unwrap_err(), PromptError::Empty);
        assert_eq!(
            PromptRules::AsWritten.clean("\u{0}\u{1}").unwrap_err(),
            PromptError::Empty
        );
        assert_eq!(PromptRules::AsWritten.clean(" ").unwrap(), " ");
    }

    #[test]
    fn workers_take_prompts_as_written_unless_configured() {
        assert_eq!(PromptRules::default(), PromptRules::AsWritten);
    }

    #[test]
    fn special_characters_are_removed_and_whitespace_collapsed() {
        let rules = PromptRules::original();
        assert_eq!(
            rules.clean("  Hello,\t$world*!  How's   it going?\n").unwrap(),
            "Hello, world How's it going?"
        );
    }

    #[test]
    fn a_prompt_of_only_special_characters_is_empty() {
        assert_eq!(
            PromptRules::original().clean("$$ ** @@").unwrap_err(),
            PromptError::Empty
        );
    }

    #[test]
    fn length_limits_apply_after_cleaning() {
        let rules = cleaned(5, 10, DisallowedPolicy::Clean);
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
        let rules = cleaned(5, 10, DisallowedPolicy::Clean);
        assert_eq!(rules.clean_text(" $$ ").unwrap(), "");
        assert_eq!(rules.clean_text("abcdefghijk  l*").unwrap(), "abcdefghijk l");
    }

    #[test]
    fn reject_policy_names_the_character() {
        let rules = cleaned(1, 200, DisallowedPolicy::Reject);
        assert_eq!(
            rules.clean("hi $there").unwrap_err(),
            PromptError::Disallowed('$')
        );
    }

    #[test]
    fn an_allowed_set_never_lets_an_unsafe_control_through() {
        let rules =
            PromptRules::Cleaned(Cleaning::new("\u{0}-\u{7f}", 1, 200, DisallowedPolicy::Clean).unwrap());
        assert_eq!(rules.clean("a\u{0}b\u{1}c").unwrap(), "abc");
    }

    #[test]
    fn trailing_dash_in_the_set_is_literal() {
        let rules = PromptRules::original();
        assert_eq!(rules.clean("well-known").unwrap(), "well-known");
    }

    #[cfg(feature = "cli")]
    #[test]
    fn the_policy_flag_picks_the_rules_of_jobs_and_run_always_cleans() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            prompt: PromptArgs,
        }
        let defaults = Cli::try_parse_from(["x"]).unwrap().prompt;
        assert_eq!(defaults.job_rules().unwrap(), PromptRules::AsWritten);
        assert_eq!(defaults.cleaning().unwrap(), PromptRules::original());
        let clean = Cli::try_parse_from(["x", "--prompt-policy", "clean", "--prompt-max-chars", "5"])
            .unwrap()
            .prompt;
        assert_eq!(clean.job_rules().unwrap(), clean.cleaning().unwrap());
        assert!(clean.job_rules().unwrap().clean("abcdef").is_err());
        assert!(Cli::try_parse_from(["x", "--prompt-policy", "raw"]).is_err());
        let bad = Cli::try_parse_from(["x", "--prompt-min-chars", "9", "--prompt-max-chars", "5"])
            .unwrap()
            .prompt;
        assert!(
            bad.job_rules().is_err(),
            "the cleaning flags are checked whatever the policy"
        );
    }

    proptest! {
        #[test]
        fn cleaned_prompts_hold_only_allowed_characters_and_no_double_spaces(raw in ".{0,300}") {
            let rules = PromptRules::original();
            let PromptRules::Cleaned(cleaning) = &rules else { unreachable!() };
            if let Ok(clean) = rules.clean(&raw) {
                prop_assert!(clean.chars().all(|c| cleaning.allows(c)));
                prop_assert!(!clean.contains("  "));
                prop_assert!(!clean.starts_with(' ') && !clean.ends_with(' '));
                prop_assert!(clean.chars().count() <= DEFAULT_MAX_CHARS);
                prop_assert_eq!(rules.clean(&clean), Ok(clean.clone()));
            }
        }

        #[test]
        fn as_written_only_removes_unsafe_controls_and_is_idempotent(raw in "\\PC{0,100}|[\\x00-\\x{a0}]{0,100}") {
            let out = PromptRules::AsWritten.clean_text(&raw).unwrap();
            prop_assert!(!out.chars().any(is_unsafe_control));
            prop_assert_eq!(out.clone(), raw.chars().filter(|&c| !is_unsafe_control(c)).collect::<String>());
            prop_assert_eq!(PromptRules::AsWritten.clean_text(&out).unwrap(), out.clone());
            // What /run's cleaning leaves passes the as-written rules unchanged: a worker never re-cleans it.
            if let Ok(clean) = PromptRules::original().clean(&raw) {
                prop_assert_eq!(PromptRules::AsWritten.clean(&clean), Ok(clean.clone()));
            }
        }
    }
}
