//! The strategies on a fake model whose logits depend on the whole history: the cache, masks, positions and
//! batch bookkeeping must be right for the tokens to come out as the plain definitions say.

use super::testing::{HashLm, Letters};
use super::*;
use shared::{FinishReason, GenerationParameters, Strategy};

fn plan(p: GenerationParameters) -> GenerationPlan {
    p.validate().expect("valid parameters")
}

fn params(strategy: Strategy, max_new_tokens: u32) -> GenerationParameters {
    GenerationParameters {
        strategy: Some(strategy),
        max_new_tokens: Some(max_new_tokens),
        ..Default::default()
    }
}

fn run(lm: &HashLm, prompts: &[Vec<i64>], p: GenerationParameters) -> Vec<Decoded> {
    generate(lm, prompts, &plan(p), lm.info().eos_token_id, &Letters)
        .expect("generates")
        .results
}

fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}

const PROMPTS: [&[i64]; 3] = [&[3, 1, 4, 1, 5], &[9], &[2, 6, 5, 3, 5, 8, 9, 7, 9]];

fn prompts() -> Vec<Vec<i64>> {
    PROMPTS.iter().map(|p| p.to_vec()).collect()
}

#[test]
fn greedy_picks_the_argmax_of_the_full_history_every_step() {
    let lm = HashLm::new(40, None);
    for prompt in PROMPTS {
        let got = run(&lm, &[prompt.to_vec()], params(Strategy::Greedy, 12)).remove(0);
        let mut history = prompt.to_vec();
        for _ in 0..12 {
            history.push(argmax(&lm.logits_for(&history)) as i64);
        }
        assert_eq!(got.tokens, history[prompt.len()..]);
        assert_eq!(got.finish_reason, FinishReason::Length);
    }
}

/// Contrastive search as the paper defines it, without caches or batches.
fn contrastive_reference(lm: &HashLm, prompt: &[i64], alpha: f64, k: usize, n: usize) -> Vec<i64> {
    let unit = |v: Vec<f32>| {
        let norm = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        v.into_iter().map(|x| x as f64 / norm).collect::<Vec<f64>>()
    };
    let mut history = prompt.to_vec();
    let mut context: Vec<Vec<f64>> = (1..=prompt.len())
        .map(|i| unit(lm.hidden_for(&prompt[..i])))
        .collect();
    for _ in 0..n {
        let logits = lm.logits_for(&history);
        let max = logits.iter().cloned().fold(f32::MIN, f32::max) as f64;
        let z: f64 = logits.iter().map(|l| (*l as f64 - max).exp()).sum();
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|a, b| logits[*b].total_cmp(&logits[*a]));
        let mut best = (f64::MIN, 0, vec![]);
        for &c in &order[..k] {
            let p = (logits[c] as f64 - max).exp() / z;
            let mut h = history.clone();
            h.push(c as i64);
            let hidden = unit(lm.hidden_for(&h));
            let penalty = context
                .iter()
                .map(|ctx| ctx.iter().zip(&hidden).map(|(a, b)| a * b).sum::<f64>())
                .fold(f64::MIN, f64::max);
            let score = (1.0 - alpha) * p - alpha * penalty;
            if score > best.0 {
                best = (score, c, hidden);
            }
        }
        history.push(best.1 as i64);
        context.push(best.2);
    }
    history[prompt.len()..].to_vec()
}

#[test]
fn contrastive_search_trades_probability_against_similarity_to_the_context() {
    let lm = HashLm::new(40, None);
    for (alpha, k) in [(0.6, 4), (0.3, 6), (0.9, 2)] {
        for prompt in PROMPTS {
            let p = GenerationParameters {
                penalty_alpha: Some(alpha),
                top_k: Some(k as u32),
                ..params(Strategy::Contrastive, 10)
            };
            let got = run(&lm, &[prompt.to_vec()], p).remove(0);
            assert_eq!(
                got.tokens,
                contrastive_reference(&lm, prompt, alpha, k, 10),
                "alpha {alpha}, k {k}"
            );
        }
    }
}

#[test]
fn contrastive_search_without_penalty_is_greedy() {
    let lm = HashLm::new(40, None);
    let greedy = run(&lm, &prompts(), params(Strategy::Greedy, 10));
    let p = GenerationParameters {
        penalty_alpha: Some(0.0),
        ..params(Strategy::Contrastive, 10)
    };
    assert_eq!(run(&lm, &prompts(), p), greedy);
}

#[test]
fn every_strategy_gives_a_batched_prompt_what_it_gets_alone() {
    let mut lm = HashLm::new(40, Some(0));
    lm.eos_bias = 2.5; // some prompts stop early, so the batch shrinks mid-way
    let all = [
        params(Strategy::Greedy, 15),
        GenerationParameters {
            max_new_tokens: Some(15),
            ..Default::default()
        },
        GenerationParameters {
            seed: Some(3),
            ..params(Strategy::Sample, 15)
        },
        GenerationParameters {
            num_beams: Some(3),
            ..params(Strategy::Beam, 15)
        },
        GenerationParameters {
            repetition_penalty: Some(1.5),
            no_repeat_ngram_size: Some(2),
            ..Default::default()
        },
        GenerationParameters {
            min_new_tokens: Some(5),
            ..params(Strategy::Greedy, 15)
        },
    ];
    let mut eos_seen = false;
    for p in all {
        let batch = run(&lm, &prompts(), p.clone());
        for (prompt, got) in prompts().into_iter().zip(&batch) {
            let alone = run(&lm, std::slice::from_ref(&prompt), p.clone()).remove(0);
            assert_eq!(got, &alone, "{prompt:?} with {p:?}");
            eos_seen |= got.finish_reason == FinishReason::Eos;
        }
    }
    assert!(eos_seen, "some prompt ended early");
}

#[test]
fn sampling_with_top_k_one_is_greedy_whatever_the_seed() {
    let lm = HashLm::new(40, None);
    let greedy = run(&lm, &prompts(), params(Strategy::Greedy, 10));
    for seed in 0..5 {
        let p = GenerationParameters {
            seed: Some(seed),
            top_k: Some(1),
            ..params(Strategy::Sample, 10)
        };
        assert_eq!(run(&lm, &prompts(), p), greedy);
    }
}

#[test]
fn seeds_reproduce_samples_and_different_seeds_differ() {
    let lm = HashLm::new(40, None);
    let sample = |seed| {
        run(
            &lm,
            &prompts(),
            GenerationParameters {
                seed: Some(seed),
                ..params(Strategy::Sample, 20)
            },
        )
    };
    assert_eq!(sample(1), sample(1));
    assert_ne!(sample(1), sample(2));
}

#[test]
fn min_new_tokens_holds_off_eos_for_every_strategy() {
    let mut lm = HashLm::new(40, Some(0));
    lm.eos_bias = 100.0; // EOS always wins when allowed (contrastive search may still prefer a token unlike
    // the context, so only the others must stop right at min_new_tokens)
    for (p, stops_at_once) in [
        (params(Strategy::Greedy, 10), true),
        (
            GenerationParameters {
                seed: Some(1),
                ..params(Strategy::Sample, 10)
            },
            true,
        ),
        (
            GenerationParameters {
                num_beams: Some(2),
                ..params(Strategy::Beam, 10)
            },
            true,
        ),
        (
            GenerationParameters {
                max_new_tokens: Some(10),
                ..Default::default()
            },
            false,
        ),
    ] {
        if stops_at_once {
            let free = run(&lm, &prompts(), p.clone());
            assert!(
                free.iter()
                    .all(|d| d.tokens == [0] && d.finish_reason == FinishReason::Eos),
                "{free:?}"
            );
        }
        let held = run(
            &lm,
            &prompts(),
            GenerationParameters {
                min_new_tokens: Some(4),
                ..p.clone()
            },
        );
        for d in held {
            assert!(d.tokens.len() >= 5, "{p:?}: {d:?}");
            assert!(!d.tokens[..4].contains(&0), "{p:?}: {d:?}");
            if stops_at_once {
                assert_eq!(d.tokens.len(), 5, "{p:?}: {d:?}");
                assert_eq!(d.tokens[4], 0);
                assert_eq!(d.finish_reason, FinishReason::Eos);
            }
        }
    }
}

#[test]
fn ignore_eos_runs_every_strategy_through_eos_to_max_new_tokens() {
    let mut lm = HashLm::new(40, Some(0));
    lm.eos_bias = 100.0; // EOS always wins when allowed: every sequence would end at its first token
    for p in [
        params(Strategy::Greedy, 10),
        GenerationParameters {
            seed: Some(1),
            ..params(Strategy::Sample, 10)
        },
        GenerationParameters {
            num_beams: Some(2),
            ..params(Strategy::Beam, 10)
        },
        GenerationParameters {
            max_new_tokens: Some(10),
            ..Default::default()
        },
        // EOS is not masked before min_new_tokens either: it ends nothing, as in vLLM.
        GenerationParameters {
            min_new_tokens: Some(4),
            ..params(Strategy::Greedy, 10)
        },
    ] {
        let ignoring = GenerationParameters {
            ignore_eos: Some(true),
            ..p.clone()
        };
        for d in run(&lm, &prompts(), ignoring) {
            assert_eq!(d.tokens.len(), 10, "{p:?}: {d:?}");
            assert_eq!(d.finish_reason, FinishReason::Length, "{p:?}: {d:?}");
            if p.strategy == Some(Strategy::Greedy) {
                assert!(
                    d.tokens.iter().all(|&t| t == 0),
                    "EOS is generated and passed: {d:?}"
                );
            }
        }
    }
}

#[test]
fn one_beam_is_greedy() {
    let lm = HashLm::new(40, None);
    let greedy = run(&lm, &prompts(), params(Strategy::Greedy, 10));
    let p = GenerationParameters {
        num_beams: Some(1),
        ..params(Strategy::Beam, 10)
    };
    assert_eq!(run(&lm, &prompts(), p), greedy);
}

fn log_prob_sum(lm: &HashLm, prompt: &[i64], tokens: &[i64]) -> f64 {
    let mut history = prompt.to_vec();
    let mut total = 0.0;
    for &t in tokens {
        let logits = lm.logits_for(&history);
        let max = logits.iter().cloned().fold(f32::MIN, f32::max) as f64;
        let z: f64 = logits.iter().map(|l| (*l as f64 - max).exp()).sum::<f64>().ln() + max;
        total += logits[t as usize] as f64 - z;
        history.push(t);
    }
    total
}

#[test]
fn wide_beams_find_sequences_at_least_as_likely_as_greedy() {
    // Without EOS every hypothesis has the same length, so the best finished one maximises the log-prob sum
    // over what the beams explored, which always includes the greedy path when the beams are wide enough.
    let lm = HashLm::new(12, None);
    for prompt in PROMPTS {
        let greedy = run(&lm, &[prompt.to_vec()], params(Strategy::Greedy, 4)).remove(0);
        let p = GenerationParameters {
            num_beams: Some(12),
            ..params(Strategy::Beam, 4)
        };
        let beam = run(&lm, &[prompt.to_vec()], p).remove(0);
        assert_eq!(beam.tokens.len(), 4);
        let (b, g) = (
            log_prob_sum(&lm, prompt, &beam.tokens),
            log_prob_sum(&lm, prompt, &greedy.tokens),
        );
        assert!(b >= g - 1e-5, "beam {b} < greedy {g}");
    }
}

#[test]
fn a_stop_sequence_ends_generation_for_every_strategy() {
    let lm = HashLm::new(26, None);
    let prompt = vec![PROMPTS[0].to_vec()];
    for p in [
        params(Strategy::Greedy, 30),
        GenerationParameters {
            max_new_tokens: Some(30),
            ..Default::default()
        },
        GenerationParameters {
            seed: Some(4),
            ..params(Strategy::Sample, 30)
        },
    ] {
        let free = run(&lm, &prompt, p.clone()).remove(0);
        let text = StopChecker::default().final_text(&Letters, &free.tokens, false);
        let stop = text[10..12].to_string();
        let at = text.find(&stop).expect("occurs");
        let stopped = run(
            &lm,
            &prompt,
            GenerationParameters {
                stop: vec![stop.clone()],
                ..p.clone()
            },
        )
        .remove(0);
        assert_eq!(stopped.finish_reason, FinishReason::Stop, "{p:?}");
        assert_eq!(stopped.stop.as_deref(), Some(stop.as_str()));
        let checker = StopChecker::new(std::slice::from_ref(&stop));
        assert_eq!(
            checker.final_text(&Letters, &stopped.tokens, true),
            text[..at],
            "{p:?}"
        );
    }
}

#[test]
fn beam_hypotheses_that_produce_a_stop_sequence_finish_there() {
    let lm = HashLm::new(26, None);
    let prompt = vec![PROMPTS[0].to_vec()];
    let p = GenerationParameters {
        num_beams: Some(2),
        ..params(Strategy::Beam, 30)
    };
    let free = run(&lm, &prompt, p.clone()).remove(0);
    let text = StopChecker::default().final_text(&Letters, &free.tokens, false);
    let stop = text[10..12].to_string();
    let stopped = run(
        &lm,
        &prompt,
        GenerationParameters {
            stop: vec![stop.clone()],
            ..p
        },
    )
    .remove(0);
    // Finishing at the stop sequence makes that hypothesis shorter; it may or may not win, but when it does
    // the text ends right before the stop string.
    let full = StopChecker::default().final_text(&Letters, &stopped.tokens, false);
    match stopped.finish_reason {
        FinishReason::Stop => {
            assert!(full.ends_with(&stop), "{full:?}");
            let checker = StopChecker::new(std::slice::from_ref(&stop));
            assert_eq!(
                checker.final_text(&Letters, &stopped.tokens, true),
                full[..full.len() - stop.len()]
            );
        }
        other => {
            assert_eq!(other, FinishReason::Length);
            assert_eq!(stopped.tokens.len(), 30);
        }
    }
}
