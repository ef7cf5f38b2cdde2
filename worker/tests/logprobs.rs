//! Log-probabilities against transformers on the same checkpoint: each generated token's (greedy and sampled,
//! in one batch) and each prompt token's, with their likeliest alternatives, are the raw log-softmax of
//! GPTJForCausalLM's logits at that position, within float tolerance.

mod common;

use std::path::Path;
use std::process::Command;

use serde::Deserialize;
use shared::{GenerationParameters, Strategy, TokenLogprob};
use worker::decoding::Request;

const TOP: usize = 5;
const TOLERANCE: f32 = 2e-4;

#[derive(Deserialize)]
struct Reference {
    logprob: f32,
    top: Vec<(u32, f32)>,
}

/// transformers' log-probabilities of each sequence's tokens from the second on.
fn reference(model_dir: &Path, sequences: &[Vec<i64>]) -> Vec<Vec<Reference>> {
    let work = tempfile::tempdir().expect("temp dir");
    let out = work.path().join("hf_logprobs.json");
    let python =
        std::env::var_os("GPTJ_PYTHON").expect("GPTJ_PYTHON is set (scripts/test.sh provisions the venv)");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/hf_logprobs.py");
    let status = Command::new(python)
        .arg(script)
        .arg(model_dir)
        .arg(serde_json::to_string(sequences).unwrap_or_default())
        .arg(TOP.to_string())
        .arg(&out)
        .status()
        .expect("the Python reference runs");
    assert!(status.success());
    serde_json::from_str(&std::fs::read_to_string(out).expect("written")).expect("json")
}

fn assert_matches(ours: &TokenLogprob, theirs: &Reference, what: &str) {
    let logprob = ours.logprob.expect("a logprob");
    assert!(
        (logprob - theirs.logprob).abs() < TOLERANCE,
        "{what}: {} vs transformers' {}",
        logprob,
        theirs.logprob
    );
    assert_eq!(ours.top.len(), TOP, "{what}");
    for (k, (o, (id, lp))) in ours.top.iter().zip(&theirs.top).enumerate() {
        assert!(
            (o.logprob - lp).abs() < TOLERANCE,
            "{what}, alternative {k}: {o:?} vs ({id}, {lp})"
        );
        // Ties aside, the same tokens in the same order.
        if k + 1 < TOP && (theirs.top[k + 1].1 - lp).abs() > TOLERANCE {
            assert_eq!(o.id, *id, "{what}, alternative {k}");
        }
    }
}

#[test]
fn generated_and_prompt_logprobs_equal_transformers() {
    let engine = common::tiny_engine();
    let scored = |strategy, n| GenerationParameters {
        strategy: Some(strategy),
        max_new_tokens: Some(n),
        seed: (strategy == Strategy::Sample).then_some(4),
        // The raw distribution is reported whatever the warpers do.
        temperature: (strategy == Strategy::Sample).then_some(0.7),
        repetition_penalty: Some(1.3),
        logprobs: Some(TOP as u32),
        prompt_logprobs: Some(TOP as u32),
        ..Default::default()
    };
    let jobs = [
        (vec![464, 2068, 7586, 21831], scored(Strategy::Greedy, 12)),
        (vec![15496, 995, 11, 616, 318, 257], scored(Strategy::Sample, 9)),
        // Scoring a prompt only: nothing generated.
        (
            vec![40, 1842, 284, 9280, 13],
            GenerationParameters {
                max_new_tokens: Some(0),
                logprobs: None,
                ..scored(Strategy::Greedy, 0)
            },
        ),
    ];
    let requests = jobs
        .iter()
        .enumerate()
        .map(|(i, (prompt, params))| Request {
            id: i as u64,
            prompt: prompt.clone(),
            plan: params.validate().expect("valid"),
            grammar: None,
            lane: shared::Lane::Interactive,
        })
        .collect();
    let results = common::run_batch(&engine, requests);
    let sequences: Vec<Vec<i64>> = jobs
        .iter()
        .zip(&results)
        .map(|((prompt, _), f)| [prompt.as_slice(), &f.decoded.tokens].concat())
        .collect();
    let theirs = reference(common::tiny_model(), &sequences);
    for (j, ((prompt, _), f)) in jobs.iter().zip(&results).enumerate() {
        let p = prompt.len();
        let prompt_lp = f.prompt_logprobs.as_ref().expect("prompt logprobs");
        assert_eq!(prompt_lp.len(), p);
        assert_eq!((prompt_lp[0].id as i64, prompt_lp[0].logprob), (prompt[0], None));
        for (t, lp) in prompt_lp[1..].iter().enumerate() {
            assert_eq!(lp.id as i64, prompt[t + 1]);
            assert_matches(lp, &theirs[j][t], &format!("job {j} prompt token {}", t + 1));
        }
        if j == 2 {
            assert!(f.decoded.tokens.is_empty(), "max_new_tokens 0 generates nothing");
            assert!(f.decoded.logprobs.is_none());
            continue;
        }
        let generated = f.decoded.logprobs.as_ref().expect("logprobs");
        assert_eq!(generated.len(), f.decoded.tokens.len());
        for (t, lp) in generated.iter().enumerate() {
            assert_eq!(lp.id as i64, f.decoded.tokens[t]);
            assert_matches(lp, &theirs[j][p - 1 + t], &format!("job {j} generated token {t}"));
        }
    }
}
