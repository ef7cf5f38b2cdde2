//! Generation parameters: the wire form every client sends, and the validated plan the engine runs.
//!
//! The wire names follow Hugging Face TGI where they overlap (`max_new_tokens`, `temperature`, `top_k`,
//! `top_p`, `typical_p`, `repetition_penalty`, `do_sample`, `seed`, `stop`) so that TGI clients feel at
//! home; `strategy`, `penalty_alpha` and `num_beams` add what TGI lacks, and `min_p` and `ignore_eos` are
//! vLLM's. Every field is optional and the defaults are those of transformers' `generate`, so a request
//! gives the text the original deployment gave.
//!
//! Parse, don't validate: [`GenerationParameters::validate`] is the only way to a [`GenerationPlan`], and
//! the plan's [`Decoding`] variants carry exactly the parameters their strategy uses.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::grammar::Grammar;

/// Upper bound on `max_new_tokens` accepted anywhere (GPT-J's context is 2048 positions).
pub const MAX_NEW_TOKENS_LIMIT: u32 = 2048;
/// Default number of new tokens, as the original `/run` generated.
pub const DEFAULT_MAX_NEW_TOKENS: u32 = 50;
/// Contrastive search defaults of the original deployment.
pub const DEFAULT_PENALTY_ALPHA: f64 = 0.6;
pub const DEFAULT_CONTRASTIVE_TOP_K: u32 = 4;
/// transformers' `GenerationConfig.top_k` default, which applies to sampling unless overridden.
pub const DEFAULT_SAMPLE_TOP_K: u32 = 50;
/// Alternatives `logprobs` and `prompt_logprobs` may ask for at most (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: u32 = 20;
/// Beam count used when beam search is asked for without `num_beams` (the original's `/run`).
pub const DEFAULT_NUM_BEAMS: u32 = 4;
pub const MAX_STOP_SEQUENCES: usize = 4;
pub const MAX_STOP_CHARS: usize = 64;
/// The largest sampling `top_k`.
pub const MAX_SAMPLE_TOP_K: u32 = 100_000;
/// Contrastive search's `top_k` range.
pub const CONTRASTIVE_TOP_K: std::ops::RangeInclusive<u32> = 1..=64;
pub const MAX_REPETITION_PENALTY: f64 = 10.0;
pub const MAX_NO_REPEAT_NGRAM_SIZE: u32 = 32;
pub const MAX_NUM_BEAMS: u32 = 16;
/// `length_penalty` lies in `[-MAX_LENGTH_PENALTY, MAX_LENGTH_PENALTY]`.
pub const MAX_LENGTH_PENALTY: f64 = 10.0;

/// The decoding strategy a job asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Contrastive search (`penalty_alpha`, `top_k`); the default.
    Contrastive,
    /// Always the most likely token.
    Greedy,
    /// Multinomial sampling (`temperature`, `top_k`, `top_p`, `min_p`, `typical_p`, `seed`).
    Sample,
    /// Beam search (`num_beams`, `length_penalty`, `early_stopping`).
    Beam,
}

impl std::str::FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "contrastive" => Ok(Self::Contrastive),
            "greedy" => Ok(Self::Greedy),
            "sample" => Ok(Self::Sample),
            "beam" => Ok(Self::Beam),
            other => Err(format!(
                "unknown strategy `{other}` (expected contrastive, greedy, sample or beam)"
            )),
        }
    }
}

/// Generation parameters as sent on the wire. All optional; unknown fields are refused.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerationParameters {
    /// Decoding strategy. Default: `contrastive`, or `sample` when `do_sample` is true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<Strategy>,
    /// TGI's switch for sampling; `true` selects `sample` when `strategy` is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub do_sample: Option<bool>,
    /// Tokens to generate at most (1..=2048). Default 50.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = MAX_NEW_TOKENS_LIMIT))]
    pub max_new_tokens: Option<u32>,
    /// Tokens to generate before EOS or a stop sequence may end the text (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = MAX_NEW_TOKENS_LIMIT))]
    pub min_new_tokens: Option<u32>,
    /// Sampling temperature, > 0 and <= 100 (default 1.0). Sampling only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 100.0), extend("exclusiveMinimum" = 0.0))]
    pub temperature: Option<f64>,
    /// Candidates kept: for sampling the top-k filter (0 disables it, default 50); for contrastive
    /// search the candidate count (1..=64, default 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = MAX_SAMPLE_TOP_K))]
    pub top_k: Option<u32>,
    /// Nucleus sampling mass in (0, 1] (default 1.0, off). Sampling only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 1.0), extend("exclusiveMinimum" = 0.0))]
    pub top_p: Option<f64>,
    /// Typical sampling mass in (0, 1] (default 1.0, off). Sampling only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 1.0), extend("exclusiveMinimum" = 0.0))]
    pub typical_p: Option<f64>,
    /// Min-p sampling in [0, 1] (default 0, off), as vLLM and transformers define it: tokens less likely
    /// than `min_p` times the likeliest one are removed, after temperature, top-k and top-p. Sampling only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub min_p: Option<f64>,
    /// Penalty > 0 on tokens already present, as CTRL defines it (default 1.0, off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = MAX_REPETITION_PENALTY), extend("exclusiveMinimum" = 0.0))]
    pub repetition_penalty: Option<f64>,
    /// Forbid repeating any n-gram of this size (default 0, off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = MAX_NO_REPEAT_NGRAM_SIZE))]
    pub no_repeat_ngram_size: Option<u32>,
    /// Random seed making sampling reproducible.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Up to 4 strings that end generation when produced (not included in the text).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_STOP_SEQUENCES), inner(length(min = 1, max = MAX_STOP_CHARS)))]
    pub stop: Vec<String>,
    /// Contrastive search degeneration penalty in [0, 1] (default 0.6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub penalty_alpha: Option<f64>,
    /// Beam count for beam search, 1..=16 (default 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_NUM_BEAMS))]
    pub num_beams: Option<u32>,
    /// Beam search length penalty exponent (default 1.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = -MAX_LENGTH_PENALTY, max = MAX_LENGTH_PENALTY))]
    pub length_penalty: Option<f64>,
    /// Beam search stops as soon as `num_beams` hypotheses are finished (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub early_stopping: Option<bool>,
    /// The form the text must take (TGI's `grammar`): `{"type": "json", "value": <JSON Schema>}`,
    /// `{"type": "regex", "value": "..."}`, `{"type": "choice", "value": ["...", ...]}` or
    /// `{"type": "lark", "value": "..."}`. Every strategy honours it; the text ends when it is complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grammar: Option<Grammar>,
    /// Return each generated token's log-probability and this many likeliest alternatives (0..=20). Greedy
    /// and sampling only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = MAX_TOP_LOGPROBS))]
    pub logprobs: Option<u32>,
    /// Return each prompt token's log-probability (the first's is null) and this many likeliest
    /// alternatives (0..=20); with it `max_new_tokens` may be 0 (score the prompt, generate nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = MAX_TOP_LOGPROBS))]
    pub prompt_logprobs: Option<u32>,
    /// Generate past the model's end-of-sequence token (vLLM's `ignore_eos`, for benchmarks): the text
    /// ends only at `max_new_tokens` or a stop sequence. Any strategy; default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ignore_eos: Option<bool>,
}

/// A parameter out of range or inconsistent with the strategy; `field` names it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid `{field}`: {message}")]
pub struct InvalidParameter {
    pub field: &'static str,
    pub message: String,
}

fn invalid(field: &'static str, message: impl Into<String>) -> InvalidParameter {
    InvalidParameter {
        field,
        message: message.into(),
    }
}

/// The decoding strategy with exactly the parameters it uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "strategy", rename_all = "snake_case")]
pub enum Decoding {
    Greedy,
    Contrastive {
        penalty_alpha: f64,
        top_k: usize,
    },
    Sample {
        temperature: f64,
        top_k: Option<usize>,
        top_p: Option<f64>,
        /// `None` when off (0).
        #[serde(default)]
        min_p: Option<f64>,
        typical_p: Option<f64>,
        seed: Option<u64>,
    },
    Beam {
        num_beams: usize,
        length_penalty: f64,
        early_stopping: bool,
    },
}

impl Decoding {
    pub fn strategy(&self) -> Strategy {
        match self {
            Self::Greedy => Strategy::Greedy,
            Self::Contrastive { .. } => Strategy::Contrastive,
            Self::Sample { .. } => Strategy::Sample,
            Self::Beam { .. } => Strategy::Beam,
        }
    }

    /// Sequences decoded side by side: the beams of beam search, else 1. A job's cost scales with it.
    pub fn beams(&self) -> usize {
        match self {
            Self::Beam { num_beams, .. } => *num_beams,
            _ => 1,
        }
    }
}

/// Validated generation parameters: the only form the engine accepts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationPlan {
    pub decoding: Decoding,
    pub max_new_tokens: usize,
    pub min_new_tokens: usize,
    /// `None` when off (1.0).
    pub repetition_penalty: Option<f64>,
    /// `None` when off (0).
    pub no_repeat_ngram_size: Option<usize>,
    pub stop: Vec<String>,
    /// The form the text must take, checked for size (compiling it needs the model's vocabulary).
    pub grammar: Option<Grammar>,
    /// Alternatives to report with each generated token's log-probability; `None`: no log-probabilities.
    pub logprobs: Option<usize>,
    /// Alternatives to report with each prompt token's log-probability; `None`: none.
    pub prompt_logprobs: Option<usize>,
    /// The end-of-sequence token does not end the text.
    #[serde(default)]
    pub ignore_eos: bool,
}

fn check_range(
    field: &'static str,
    v: f64,
    lo_exclusive: bool,
    lo: f64,
    hi: f64,
) -> Result<f64, InvalidParameter> {
    let low_ok = if lo_exclusive { v > lo } else { v >= lo };
    if v.is_finite() && low_ok && v <= hi {
        Ok(v)
    } else {
        let open = if lo_exclusive { "(" } else { "[" };
        Err(invalid(field, format!("must be in {open}{lo}, {hi}], got {v}")))
    }
}

impl GenerationParameters {
    /// The strategy this request resolves to.
    pub fn resolved_strategy(&self) -> Strategy {
        match (self.strategy, self.do_sample) {
            (Some(s), _) => s,
            (None, Some(true)) => Strategy::Sample,
            (None, _) => Strategy::Contrastive,
        }
    }

    /// Checks every parameter and builds the plan; the error names the first offending field.
    pub fn validate(&self) -> Result<GenerationPlan, InvalidParameter> {
        let strategy = self.resolved_strategy();
        if self.do_sample == Some(true) && strategy != Strategy::Sample {
            return Err(invalid(
                "do_sample",
                format!("true conflicts with strategy `{}`", strategy_name(strategy)),
            ));
        }
        let max_new_tokens = self.max_new_tokens.unwrap_or(DEFAULT_MAX_NEW_TOKENS);
        // Scoring a prompt (its log-probabilities) may generate nothing.
        let least = if self.prompt_logprobs.is_some() { 0 } else { 1 };
        if max_new_tokens < least || max_new_tokens > MAX_NEW_TOKENS_LIMIT {
            return Err(invalid(
                "max_new_tokens",
                format!("must be in [{least}, {MAX_NEW_TOKENS_LIMIT}], got {max_new_tokens}"),
            ));
        }
        for (field, n) in [
            ("logprobs", self.logprobs),
            ("prompt_logprobs", self.prompt_logprobs),
        ] {
            if let Some(n) = n
                && n > MAX_TOP_LOGPROBS
            {
                return Err(invalid(
                    field,
                    format!("must be in [0, {MAX_TOP_LOGPROBS}], got {n}"),
                ));
            }
        }
        if self.logprobs.is_some() && !matches!(strategy, Strategy::Greedy | Strategy::Sample) {
            return Err(invalid(
                "logprobs",
                format!(
                    "is given for greedy decoding and sampling, not strategy `{}`",
                    strategy_name(strategy)
                ),
            ));
        }
        let min_new_tokens = self.min_new_tokens.unwrap_or(0);
        if min_new_tokens > max_new_tokens {
            return Err(invalid(
                "min_new_tokens",
                format!("must not exceed max_new_tokens ({max_new_tokens}), got {min_new_tokens}"),
            ));
        }
        let repetition_penalty = match self.repetition_penalty {
            None => None,
            Some(p) => Some(check_range(
                "repetition_penalty",
                p,
                true,
                0.0,
                MAX_REPETITION_PENALTY,
            )?)
            .filter(|p| *p != 1.0),
        };
        let no_repeat_ngram_size = match self.no_repeat_ngram_size {
            None | Some(0) => None,
            Some(n) if n <= MAX_NO_REPEAT_NGRAM_SIZE => Some(n as usize),
            Some(n) => {
                return Err(invalid(
                    "no_repeat_ngram_size",
                    format!("must be in [0, {MAX_NO_REPEAT_NGRAM_SIZE}], got {n}"),
                ));
            }
        };
        if self.stop.len() > MAX_STOP_SEQUENCES {
            return Err(invalid(
                "stop",
                format!("at most {MAX_STOP_SEQUENCES} sequences, got {}", self.stop.len()),
            ));
        }
        for s in &self.stop {
            if s.is_empty() || s.chars().count() > MAX_STOP_CHARS {
                return Err(invalid(
                    "stop",
                    format!("each sequence must have 1 to {MAX_STOP_CHARS} characters"),
                ));
            }
        }

        // Parameters that only one strategy reads are refused elsewhere, so a client learns that its
        // `temperature` did nothing instead of silently getting greedy text.
        let only = |field: &'static str, present: bool, owner: &str| -> Result<(), InvalidParameter> {
            if present {
                Err(invalid(
                    field,
                    format!(
                        "applies only to strategy `{owner}`, not `{}`",
                        strategy_name(strategy)
                    ),
                ))
            } else {
                Ok(())
            }
        };
        if strategy != Strategy::Sample {
            only("temperature", self.temperature.is_some(), "sample")?;
            only("top_p", self.top_p.is_some(), "sample")?;
            only("typical_p", self.typical_p.is_some(), "sample")?;
            only("min_p", self.min_p.is_some(), "sample")?;
            only("seed", self.seed.is_some(), "sample")?;
        }
        if strategy != Strategy::Contrastive {
            only("penalty_alpha", self.penalty_alpha.is_some(), "contrastive")?;
        }
        if strategy != Strategy::Beam {
            only("num_beams", self.num_beams.is_some(), "beam")?;
            only("length_penalty", self.length_penalty.is_some(), "beam")?;
            only("early_stopping", self.early_stopping.is_some(), "beam")?;
        }
        if matches!(strategy, Strategy::Greedy | Strategy::Beam) {
            only("top_k", self.top_k.is_some(), "sample` or `contrastive")?;
        }

        if let Some(g) = &self.grammar {
            g.check().map_err(|e| invalid("grammar", e.to_string()))?;
            if min_new_tokens > 0 {
                return Err(invalid(
                    "min_new_tokens",
                    "cannot be combined with a grammar, which decides where the text ends",
                ));
            }
        }

        let decoding = match strategy {
            Strategy::Greedy => Decoding::Greedy,
            Strategy::Contrastive => {
                let penalty_alpha = check_range(
                    "penalty_alpha",
                    self.penalty_alpha.unwrap_or(DEFAULT_PENALTY_ALPHA),
                    false,
                    0.0,
                    1.0,
                )?;
                let top_k = self.top_k.unwrap_or(DEFAULT_CONTRASTIVE_TOP_K);
                if !CONTRASTIVE_TOP_K.contains(&top_k) {
                    let (lo, hi) = (CONTRASTIVE_TOP_K.start(), CONTRASTIVE_TOP_K.end());
                    return Err(invalid(
                        "top_k",
                        format!("must be in [{lo}, {hi}] for contrastive search, got {top_k}"),
                    ));
                }
                Decoding::Contrastive {
                    penalty_alpha,
                    top_k: top_k as usize,
                }
            }
            Strategy::Sample => {
                let temperature =
                    check_range("temperature", self.temperature.unwrap_or(1.0), true, 0.0, 100.0)?;
                let top_k = self.top_k.unwrap_or(DEFAULT_SAMPLE_TOP_K);
                if top_k > MAX_SAMPLE_TOP_K {
                    return Err(invalid(
                        "top_k",
                        format!("must be in [0, {MAX_SAMPLE_TOP_K}], got {top_k}"),
                    ));
                }
                let top_p = self
                    .top_p
                    .map(|p| check_range("top_p", p, true, 0.0, 1.0))
                    .transpose()?;
                let typical_p = self
                    .typical_p
                    .map(|p| check_range("typical_p", p, true, 0.0, 1.0))
                    .transpose()?;
                let min_p = self
                    .min_p
                    .map(|p| check_range("min_p", p, false, 0.0, 1.0))
                    .transpose()?;
                Decoding::Sample {
                    temperature,
                    top_k: (top_k > 0).then_some(top_k as usize),
                    top_p: top_p.filter(|p| *p < 1.0),
                    min_p: min_p.filter(|p| *p > 0.0),
                    typical_p: typical_p.filter(|p| *p < 1.0),
                    seed: self.seed,
                }
            }
            Strategy::Beam => {
                let num_beams = self.num_beams.unwrap_or(DEFAULT_NUM_BEAMS);
                if !(1..=MAX_NUM_BEAMS).contains(&num_beams) {
                    return Err(invalid(
                        "num_beams",
                        format!("must be in [1, {MAX_NUM_BEAMS}], got {num_beams}"),
                    ));
                }
                let length_penalty = self.length_penalty.unwrap_or(1.0);
                if !length_penalty.is_finite() || length_penalty.abs() > MAX_LENGTH_PENALTY {
                    return Err(invalid(
                        "length_penalty",
                        format!(
                            "must be in [-{MAX_LENGTH_PENALTY}, {MAX_LENGTH_PENALTY}], got {length_penalty}"
                        ),
                    ));
                }
                Decoding::Beam {
                    num_beams: num_beams as usize,
                    length_penalty,
                    early_stopping: self.early_stopping.unwrap_or(false),
                }
            }
        };
        Ok(GenerationPlan {
            decoding,
            max_new_tokens: max_new_tokens as usize,
            min_new_tokens: min_new_tokens as usize,
            repetition_penalty,
            no_repeat_ngram_size,
            stop: self.stop.clone(),
            grammar: self.grammar.clone(),
            logprobs: self.logprobs.map(|n| n as usize),
            prompt_logprobs: self.prompt_logprobs.map(|n| n as usize),
            ignore_eos: self.ignore_eos.unwrap_or(false),
        })
    }
}

fn strategy_name(s: Strategy) -> &'static str {
    match s {
        Strategy::Contrastive => "contrastive",
        Strategy::Greedy => "greedy",
        Strategy::Sample => "sample",
        Strategy::Beam => "beam",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Validates `{"strategy": strategy, field: value}` plus `extra`.
    fn accepts(strategy: &str, field: &str, value: &serde_json::Value, extra: serde_json::Value) -> bool {
        let mut body = serde_json::json!({ "strategy": strategy });
        body[field] = value.clone();
        if let (serde_json::Value::Object(more), Some(b)) = (extra, body.as_object_mut()) {
            b.extend(more);
        }
        serde_json::from_value::<GenerationParameters>(body).is_ok_and(|p| p.validate().is_ok())
    }

    #[test]
    fn the_schema_states_the_ranges_the_validation_enforces() {
        let schema = serde_json::to_value(schemars::schema_for!(GenerationParameters)).unwrap();
        // Each bounded field, the strategy that reads it, and what its bounds need beside it.
        let fields = [
            (
                "max_new_tokens",
                "greedy",
                serde_json::json!({ "prompt_logprobs": 0 }),
            ),
            (
                "min_new_tokens",
                "greedy",
                serde_json::json!({ "max_new_tokens": MAX_NEW_TOKENS_LIMIT }),
            ),
            ("temperature", "sample", serde_json::json!({})),
            ("top_k", "sample", serde_json::json!({})),
            ("top_p", "sample", serde_json::json!({})),
            ("typical_p", "sample", serde_json::json!({})),
            ("min_p", "sample", serde_json::json!({})),
            ("repetition_penalty", "greedy", serde_json::json!({})),
            ("no_repeat_ngram_size", "greedy", serde_json::json!({})),
            ("penalty_alpha", "contrastive", serde_json::json!({})),
            ("num_beams", "beam", serde_json::json!({})),
            ("length_penalty", "beam", serde_json::json!({})),
            ("logprobs", "greedy", serde_json::json!({})),
            ("prompt_logprobs", "greedy", serde_json::json!({})),
        ];
        for (field, strategy, extra) in fields {
            let bounds = &schema["properties"][field];
            let integer = bounds["format"].as_str().is_some_and(|f| f.starts_with("uint"));
            let step = if integer { 1.0 } else { 1e-9 };
            let number = |v: f64| {
                if integer {
                    serde_json::json!(v as i64)
                } else {
                    serde_json::json!(v)
                }
            };
            let max = bounds["maximum"]
                .as_f64()
                .unwrap_or_else(|| panic!("{field} has a maximum"));
            assert!(
                accepts(strategy, field, &number(max), extra.clone()),
                "{field} at its maximum {max}"
            );
            assert!(
                !accepts(strategy, field, &number(max + step), extra.clone()),
                "{field} past its maximum"
            );
            if let Some(min) = bounds["minimum"].as_f64() {
                assert!(
                    accepts(strategy, field, &number(min), extra.clone()),
                    "{field} at its minimum {min}"
                );
                if min > 0.0 || !integer {
                    assert!(
                        !accepts(strategy, field, &number(min - step), extra.clone()),
                        "{field} below its minimum"
                    );
                }
            }
            if let Some(min) = bounds["exclusiveMinimum"].as_f64() {
                assert!(
                    !accepts(strategy, field, &number(min), extra.clone()),
                    "{field} at its exclusive minimum"
                );
                assert!(
                    accepts(strategy, field, &number(min + step), extra.clone()),
                    "{field} just above it"
                );
            }
            assert!(
                bounds["minimum"].is_number() || bounds["exclusiveMinimum"].is_number(),
                "{field} has a lower bound"
            );
        }
        let stop = &schema["properties"]["stop"];
        assert_eq!(stop["maxItems"], MAX_STOP_SEQUENCES);
        assert_eq!(stop["items"]["maxLength"], MAX_STOP_CHARS);
        let stops = |n: usize, len: usize| serde_json::json!(vec!["x".repeat(len); n]);
        assert!(accepts(
            "greedy",
            "stop",
            &stops(MAX_STOP_SEQUENCES, MAX_STOP_CHARS),
            serde_json::json!({})
        ));
        assert!(!accepts(
            "greedy",
            "stop",
            &stops(MAX_STOP_SEQUENCES + 1, 1),
            serde_json::json!({})
        ));
        assert!(!accepts(
            "greedy",
            "stop",
            &stops(1, MAX_STOP_CHARS + 1),
            serde_json::json!({})
        ));
        assert!(!accepts("greedy", "stop", &stops(1, 0), serde_json::json!({})));
    }

    #[test]
    fn empty_parameters_mean_contrastive_search_as_the_original_deployed_it() {
        let plan = GenerationParameters::default().validate().unwrap();
        assert_eq!(
            plan.decoding,
            Decoding::Contrastive {
                penalty_alpha: 0.6,
                top_k: 4
            }
        );
        assert_eq!(plan.max_new_tokens, 50);
        assert_eq!(plan.repetition_penalty, None);
        assert_eq!(plan.no_repeat_ngram_size, None);
    }

    #[test]
    fn do_sample_selects_sampling_with_transformers_defaults() {
        let p = GenerationParameters {
            do_sample: Some(true),
            ..Default::default()
        };
        let plan = p.validate().unwrap();
        assert_eq!(
            plan.decoding,
            Decoding::Sample {
                temperature: 1.0,
                top_k: Some(50),
                top_p: None,
                min_p: None,
                typical_p: None,
                seed: None
            }
        );
    }

    #[test]
    fn out_of_range_values_name_their_field() {
        let cases: Vec<(GenerationParameters, &str)> = vec![
            (
                GenerationParameters {
                    max_new_tokens: Some(0),
                    ..Default::default()
                },
                "max_new_tokens",
            ),
            (
                GenerationParameters {
                    max_new_tokens: Some(5000),
                    ..Default::default()
                },
                "max_new_tokens",
            ),
            (
                GenerationParameters {
                    strategy: Some(Strategy::Sample),
                    temperature: Some(0.0),
                    ..Default::default()
                },
                "temperature",
            ),
            (
                GenerationParameters {
                    strategy: Some(Strategy::Sample),
                    top_p: Some(1.5),
                    ..Default::default()
                },
                "top_p",
            ),
            (
                GenerationParameters {
                    strategy: Some(Strategy::Sample),
                    temperature: Some(f64::NAN),
                    ..Default::default()
                },
                "temperature",
            ),
            (
                GenerationParameters {
                    penalty_alpha: Some(-0.1),
                    ..Default::default()
                },
                "penalty_alpha",
            ),
            (
                GenerationParameters {
                    top_k: Some(0),
                    ..Default::default()
                },
                "top_k",
            ),
            (
                GenerationParameters {
                    strategy: Some(Strategy::Beam),
                    num_beams: Some(40),
                    ..Default::default()
                },
                "num_beams",
            ),
            (
                GenerationParameters {
                    repetition_penalty: Some(0.0),
                    ..Default::default()
                },
                "repetition_penalty",
            ),
            (
                GenerationParameters {
                    min_new_tokens: Some(60),
                    ..Default::default()
                },
                "min_new_tokens",
            ),
            (
                GenerationParameters {
                    stop: vec![String::new()],
                    ..Default::default()
                },
                "stop",
            ),
            (
                GenerationParameters {
                    strategy: Some(Strategy::Greedy),
                    temperature: Some(0.7),
                    ..Default::default()
                },
                "temperature",
            ),
            (
                GenerationParameters {
                    strategy: Some(Strategy::Greedy),
                    do_sample: Some(true),
                    ..Default::default()
                },
                "do_sample",
            ),
            (
                GenerationParameters {
                    strategy: Some(Strategy::Sample),
                    min_p: Some(1.5),
                    ..Default::default()
                },
                "min_p",
            ),
            (
                GenerationParameters {
                    strategy: Some(Strategy::Greedy),
                    min_p: Some(0.1),
                    ..Default::default()
                },
                "min_p",
            ),
        ];
        for (params, field) in cases {
            let err = params.validate().unwrap_err();
            assert_eq!(err.field, field, "{params:?} -> {err}");
        }
    }

    #[test]
    fn unknown_fields_are_refused_on_the_wire() {
        let err = serde_json::from_str::<GenerationParameters>(r#"{"max_tokens": 5}"#).unwrap_err();
        assert!(err.to_string().contains("max_tokens"), "{err}");
    }

    #[test]
    fn min_p_is_a_sampling_parameter_and_zero_turns_it_off() {
        let sample = |min_p| GenerationParameters {
            strategy: Some(Strategy::Sample),
            min_p: Some(min_p),
            ..Default::default()
        };
        let min_p = |p: GenerationParameters| match p.validate().unwrap().decoding {
            Decoding::Sample { min_p, .. } => min_p,
            other => panic!("{other:?}"),
        };
        assert_eq!(min_p(sample(0.05)), Some(0.05));
        assert_eq!(min_p(sample(1.0)), Some(1.0));
        assert_eq!(min_p(sample(0.0)), None);
        assert!(sample(-0.1).validate().is_err());
    }

    #[test]
    fn ignore_eos_is_carried_by_the_plan_for_any_strategy() {
        assert!(!GenerationParameters::default().validate().unwrap().ignore_eos);
        for strategy in [
            Strategy::Greedy,
            Strategy::Contrastive,
            Strategy::Sample,
            Strategy::Beam,
        ] {
            let p = GenerationParameters {
                strategy: Some(strategy),
                ignore_eos: Some(true),
                ..Default::default()
            };
            assert!(p.validate().unwrap().ignore_eos, "{strategy:?}");
        }
    }

    #[test]
    fn beam_defaults_to_four_beams() {
        let p = GenerationParameters {
            strategy: Some(Strategy::Beam),
            ..Default::default()
        };
        assert_eq!(
            p.validate().unwrap().decoding,
            Decoding::Beam {
                num_beams: 4,
                length_penalty: 1.0,
                early_stopping: false
            }
        );
    }
}
