//! Constrained decoding in the running batch, on a real (tiny, random) GPT-J: whatever its strategy, a job
//! with a grammar ends with text its grammar accepts, though the model's own output is noise; jobs without
//! one, in the same batch, get exactly the tokens they get alone.

mod common;

use serde_json::{Value, json};
use shared::{FinishReason, GenerationParameters, GenerationPlan, Grammar, Strategy};
use worker::decoding::{FinishedSequence, Request, StopChecker};
use worker::engine::Engine;

struct Job {
    prompt: &'static str,
    params: GenerationParameters,
}

/// Runs every job in one batch (all submitted before the first step) and returns each one's text and result.
fn run(engine: &Engine, jobs: &[Job]) -> Vec<(String, FinishedSequence)> {
    let codec = engine.codec();
    let plans: Vec<GenerationPlan> = jobs.iter().map(|j| j.params.validate().expect("valid")).collect();
    let requests = jobs
        .iter()
        .zip(&plans)
        .enumerate()
        .map(|(i, (job, plan))| Request {
            id: i as u64,
            prompt: codec.prompt_tokens(job.prompt, plan).expect("tokenizes"),
            plan: plan.clone(),
            grammar: codec.grammar(plan).expect("compiles"),
            lane: shared::Lane::Interactive,
        })
        .collect();
    common::run_batch(engine, requests)
        .into_iter()
        .zip(&plans)
        .map(|(f, plan)| {
            let text = codec.final_text(
                &f.decoded.tokens,
                f.decoded.finish_reason,
                &StopChecker::new(&plan.stop),
            );
            (text, f)
        })
        .collect()
}

fn params(strategy: Strategy, grammar: Option<Grammar>, max_new_tokens: u32) -> GenerationParameters {
    GenerationParameters {
        strategy: Some(strategy),
        max_new_tokens: Some(max_new_tokens),
        seed: (strategy == Strategy::Sample).then_some(3),
        grammar,
        ..Default::default()
    }
}

fn person() -> Grammar {
    Grammar::Json(json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 130},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
            "ok": {"type": "boolean"}
        },
        "required": ["name", "age", "tags", "ok"],
        "additionalProperties": false
    }))
}

fn check_person(text: &str) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
    let o = v.as_object().expect("an object");
    assert_eq!(o.len(), 4, "{text}");
    assert!(
        o["name"].as_str().is_some_and(|s| s.chars().count() <= 12),
        "{text}"
    );
    assert!(
        o["age"].as_i64().is_some_and(|a| (0..=130).contains(&a)),
        "{text}"
    );
    let tags = o["tags"].as_array().expect("tags");
    assert!(
        tags.len() <= 3
            && tags
                .iter()
                .all(|t| ["a", "b", "c"].contains(&t.as_str().unwrap_or("")))
    );
    assert!(o["ok"].is_boolean(), "{text}");
}

#[test]
fn every_strategy_ends_with_text_its_grammar_accepts() {
    let t = common::tiny_engine();
    let strategies = [
        Strategy::Greedy,
        Strategy::Sample,
        Strategy::Contrastive,
        Strategy::Beam,
    ];
    let mut jobs = Vec::new();
    for s in strategies {
        jobs.push(Job {
            prompt: "Describe a person as JSON:",
            params: params(s, Some(person()), 120),
        });
        jobs.push(Job {
            prompt: "A date:",
            params: params(
                s,
                Some(Grammar::Regex(r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]".into())),
                30,
            ),
        });
        jobs.push(Job {
            prompt: "Is it raining?",
            params: params(
                s,
                Some(Grammar::Choice(vec![
                    "yes".into(),
                    "no".into(),
                    "it depends".into(),
                ])),
                30,
            ),
        });
    }
    let results = run(&t, &jobs);
    let date = regex::Regex::new(r"^20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]$").expect("a pattern");
    for (i, (text, f)) in results.iter().enumerate() {
        assert_eq!(
            f.decoded.finish_reason,
            FinishReason::Eos,
            "job {i} completes its grammar: {text:?}"
        );
        match i % 3 {
            0 => check_person(text),
            1 => assert!(date.is_match(text), "job {i}: {text:?}"),
            _ => assert!(
                ["yes", "no", "it depends"].contains(&text.as_str()),
                "job {i}: {text:?}"
            ),
        }
    }
}

#[test]
fn the_model_alone_does_not_write_json_so_the_grammar_is_what_makes_it_valid() {
    let t = common::tiny_engine();
    let results = run(
        &t,
        &[Job {
            prompt: "Describe a person as JSON:",
            params: params(Strategy::Greedy, None, 40),
        }],
    );
    assert!(
        serde_json::from_str::<Value>(&results[0].0).is_err(),
        "{:?}",
        results[0].0
    );
}

#[test]
fn jobs_without_a_grammar_keep_their_tokens_beside_constrained_ones() {
    let t = common::tiny_engine();
    let free = |s| Job {
        prompt: "The quick brown fox",
        params: params(s, None, 16),
    };
    let alone: Vec<Vec<i64>> = [Strategy::Greedy, Strategy::Sample, Strategy::Contrastive]
        .into_iter()
        .map(|s| run(&t, &[free(s)]).remove(0).1.decoded.tokens)
        .collect();
    let mixed = run(
        &t,
        &[
            free(Strategy::Greedy),
            Job {
                prompt: "JSON:",
                params: params(Strategy::Greedy, Some(person()), 60),
            },
            free(Strategy::Sample),
            Job {
                prompt: "Pick:",
                params: params(
                    Strategy::Contrastive,
                    Some(Grammar::Choice(vec!["x".into(), "y".into()])),
                    8,
                ),
            },
            free(Strategy::Contrastive),
        ],
    );
    assert_eq!(mixed[0].1.decoded.tokens, alone[0]);
    assert_eq!(mixed[2].1.decoded.tokens, alone[1]);
    assert_eq!(mixed[4].1.decoded.tokens, alone[2]);
}

#[test]
fn a_grammar_cut_short_by_the_length_limit_says_length() {
    let t = common::tiny_engine();
    let grammar = Grammar::Json(json!({"type": "object", "properties": {"s": {"type": "string"}},
        "required": ["s"], "additionalProperties": false}));
    let results = run(
        &t,
        &[Job {
            prompt: "JSON:",
            params: params(Strategy::Greedy, Some(grammar), 6),
        }],
    );
    let (text, f) = &results[0];
    assert_eq!(f.decoded.finish_reason, FinishReason::Length);
    assert_eq!(f.decoded.tokens.len(), 6);
    assert!(text.starts_with("{\"s\":\""), "{text:?}");
}

#[test]
fn a_pattern_of_characters_outside_the_basic_plane_is_written_byte_by_byte() {
    let t = common::tiny_engine();
    // What schemathesis sent as a `guided_regex`: characters of four bytes each and a C1 control, which
    // only byte tokens can write; after a character's first bytes the grammar forces the rest.
    let pattern = "o\u{76BDD}\u{0096}\u{A243C}\u{4707D}";
    let mut jobs = vec![Job {
        prompt: "__main__",
        params: params(Strategy::Greedy, Some(Grammar::Regex(pattern.into())), 30),
    }];
    for seed in 0..3 {
        let mut p = params(Strategy::Sample, Some(Grammar::Regex(pattern.into())), 30);
        p.seed = Some(seed);
        p.top_k = Some(0);
        jobs.push(Job {
            prompt: "__main__",
            params: p,
        });
    }
    for (text, f) in run(&t, &jobs) {
        assert_eq!(f.decoded.finish_reason, FinishReason::Eos, "{text:?}");
        assert_eq!(text, pattern);
    }
}
