//! The scheduler on the fake model whose logits depend on the whole history: sequences that join a batch
//! already decoding, leave it early, wait for room or fail must leave every other sequence's tokens exactly
//! what they are alone.

use std::collections::HashMap;

use super::*;
use crate::decoding::testing::{HashLm, Letters};
use crate::decoding::{Decoded, generate};
use shared::{FinishReason, GenerationParameters, Strategy};

fn plan(p: GenerationParameters) -> GenerationPlan {
    p.validate().expect("valid parameters")
}

fn alone(lm: &HashLm, prompt: &[i64], p: &GenerationPlan) -> Decoded {
    generate(lm, &[prompt.to_vec()], p, lm.info().eos_token_id, &Letters)
        .expect("generates")
        .results
        .remove(0)
}

/// A mix of every strategy and option, with prompts and lengths that differ.
fn mixed() -> Vec<(Vec<i64>, GenerationPlan)> {
    let p = |strategy, n| GenerationParameters {
        strategy: Some(strategy),
        max_new_tokens: Some(n),
        ..Default::default()
    };
    vec![
        (vec![3, 1, 4, 1, 5], plan(p(Strategy::Greedy, 20))),
        (vec![9], plan(p(Strategy::Contrastive, 14))),
        (
            vec![2, 6, 5, 3, 5, 8, 9, 7, 9],
            plan(GenerationParameters {
                penalty_alpha: Some(0.3),
                top_k: Some(6),
                ..p(Strategy::Contrastive, 11)
            }),
        ),
        (
            vec![7, 7, 1],
            plan(GenerationParameters {
                num_beams: Some(3),
                ..p(Strategy::Beam, 9)
            }),
        ),
        (
            vec![4, 4],
            plan(GenerationParameters {
                num_beams: Some(4),
                length_penalty: Some(0.7),
                early_stopping: Some(true),
                ..p(Strategy::Beam, 8)
            }),
        ),
        (
            vec![5, 3, 8],
            plan(GenerationParameters {
                seed: Some(11),
                temperature: Some(0.8),
                top_p: Some(0.9),
                ..p(Strategy::Sample, 17)
            }),
        ),
        (
            vec![1, 2, 3, 4, 5, 6],
            plan(GenerationParameters {
                repetition_penalty: Some(1.4),
                no_repeat_ngram_size: Some(2),
                ..p(Strategy::Greedy, 25)
            }),
        ),
        (
            vec![8, 1],
            plan(GenerationParameters {
                stop: vec!["ab".into(), "zz".into()],
                min_new_tokens: Some(3),
                ..p(Strategy::Greedy, 30)
            }),
        ),
        (vec![6], plan(p(Strategy::Greedy, 3))),
        (
            vec![2, 2, 9],
            plan(GenerationParameters {
                seed: Some(5),
                min_p: Some(0.3),
                top_k: Some(0),
                ..p(Strategy::Sample, 12)
            }),
        ),
        (
            vec![3, 9],
            plan(GenerationParameters {
                ignore_eos: Some(true),
                ..p(Strategy::Contrastive, 15)
            }),
        ),
    ]
}

/// Job `i` as a request.
fn request(jobs: &[(Vec<i64>, GenerationPlan)], i: usize) -> Request {
    Request {
        id: i as u64,
        prompt: jobs[i].0.clone(),
        plan: jobs[i].1.clone(),
        grammar: None,
        lane: shared::Lane::Interactive,
    }
}

/// Runs `jobs`, job `i` submitted before step `arrivals[i]`; results by job index, and the most sequences
/// that ran at once.
fn staggered(
    lm: &HashLm,
    text: &dyn TextDecoder,
    limits: Limits,
    jobs: &[(Vec<i64>, GenerationPlan)],
    arrivals: &[usize],
) -> (HashMap<u64, Result<FinishedSequence>>, usize) {
    let mut s = Scheduler::new(lm, text, limits);
    let mut results = HashMap::new();
    let mut widest = 0;
    let mut step = 0;
    while results.len() < jobs.len() {
        for i in (0..jobs.len()).filter(|&i| arrivals[i] == step) {
            s.submit(request(jobs, i)).expect("submitted");
        }
        for event in s.step() {
            if let Event::Finished { id, result } = event {
                results.insert(id, result);
            }
        }
        widest = widest.max(s.stats().running);
        step += 1;
        assert!(step < 10_000, "the scheduler stalls");
    }
    (results, widest)
}

fn quick() -> Limits {
    Limits {
        max_batch_size: 64,
        max_batch_tokens: 1 << 20,
        join: JoinPolicy {
            max_waiting_steps: 0,
            waiting_served_ratio: 0.0,
            max_prefill_tokens: 4096,
            pause_batch: false,
        },
    }
}

#[test]
fn jobs_joining_a_batch_already_decoding_get_exactly_what_they_get_alone() {
    let mut lm = HashLm::new(40, Some(0));
    lm.eos_bias = 1.0; // some sequences end early and leave mid-way
    let jobs = mixed();
    let arrivals: Vec<usize> = (0..jobs.len()).collect();
    let (results, widest) = staggered(&lm, &Letters, quick(), &jobs, &arrivals);
    assert!(widest >= 4, "the jobs overlapped ({widest} at most)");
    let mut early = false;
    for (i, (prompt, p)) in jobs.iter().enumerate() {
        let got = results[&(i as u64)].as_ref().expect("succeeds");
        assert_eq!(got.decoded, alone(&lm, prompt, p), "job {i}: {p:?}");
        early |= got.decoded.finish_reason == FinishReason::Eos;
        assert!(got.batch_size >= 1);
    }
    assert!(early, "some sequence left the batch early at EOS");
}

#[test]
fn rate_limited_joins_and_a_tight_budget_change_no_token() {
    let lm = HashLm::new(40, Some(0));
    let jobs = mixed();
    let arrivals: Vec<usize> = (0..jobs.len()).map(|i| i % 3).collect();
    let limits = Limits {
        max_batch_size: 3,
        // Room for about two of these jobs at once: the others wait for room.
        max_batch_tokens: 160,
        join: JoinPolicy {
            max_waiting_steps: 3,
            waiting_served_ratio: 2.0,
            // Prefill rounds split: at most two short prompts a round.
            max_prefill_tokens: 12,
            pause_batch: false,
        },
    };
    let (results, widest) = staggered(&lm, &Letters, limits, &jobs, &arrivals);
    assert!(widest <= 3, "max_batch_size holds ({widest})");
    for (i, (prompt, p)) in jobs.iter().enumerate() {
        let got = results[&(i as u64)].as_ref().expect("succeeds");
        assert_eq!(got.decoded, alone(&lm, prompt, p), "job {i}");
    }
}

#[test]
fn a_lone_job_joins_at_once_and_later_arrivals_wait_for_the_join_window() {
    let lm = HashLm::new(40, None);
    let g = plan(GenerationParameters {
        strategy: Some(Strategy::Greedy),
        max_new_tokens: Some(30),
        ..Default::default()
    });
    let limits = Limits {
        join: JoinPolicy {
            max_waiting_steps: 4,
            waiting_served_ratio: 100.0,
            ..quick().join
        },
        ..quick()
    };
    let mut s = Scheduler::new(&lm, &Letters, limits);
    let req = |id| Request {
        id,
        prompt: vec![1, 2, 3],
        plan: g.clone(),
        grammar: None,
        lane: shared::Lane::Interactive,
    };
    s.submit(req(0)).unwrap();
    let first = s.step();
    assert!(
        matches!(first[0], Event::Joined { id: 0, batch_size: 1 }),
        "{first:?}"
    );
    assert!(first.iter().any(|e| matches!(e, Event::Tokens { id: 0, .. })));
    s.submit(req(1)).unwrap();
    let mut joined_after = None;
    for step in 1..10 {
        if s.step().iter().any(|e| matches!(e, Event::Joined { id: 1, .. })) {
            joined_after = Some(step);
            break;
        }
    }
    assert_eq!(
        joined_after,
        Some(4),
        "it joins once the running batch has made 4 steps since its own join"
    );
}

#[test]
fn a_cancelled_sequence_leaves_and_the_others_keep_their_tokens() {
    let lm = HashLm::new(40, None);
    let jobs = mixed();
    let mut s = Scheduler::new(&lm, &Letters, quick());
    for i in 0..jobs.len() {
        s.submit(request(&jobs, i)).unwrap();
    }
    let mut results = HashMap::new();
    let mut steps = 0;
    while s.has_work() {
        for event in s.step() {
            if let Event::Finished { id, result } = event {
                results.insert(id, result.expect("succeeds").decoded);
            }
        }
        steps += 1;
        if steps == 3 {
            // The contrastive job (a middle row) and the first beam search leave mid-way.
            assert!(s.cancel(1) && s.cancel(3));
            assert!(!s.cancel(1), "already gone");
        }
    }
    assert!(!results.contains_key(&1) && !results.contains_key(&3));
    for (i, (prompt, p)) in jobs.iter().enumerate().filter(|(i, _)| *i != 1 && *i != 3) {
        assert_eq!(results[&(i as u64)], alone(&lm, prompt, p), "job {i}");
    }
}

/// Decodes like [`Letters`], but panics on any call: only sequences with stop strings decode text.
struct Exploding;

impl TextDecoder for Exploding {
    fn decode(&self, _: &[u32]) -> String {
        panic!("the decoder broke")
    }
}

#[test]
fn a_failing_sequence_fails_alone() {
    let lm = HashLm::new(40, None);
    let jobs = mixed();
    let arrivals = vec![0; jobs.len()];
    let (results, _) = staggered(&lm, &Exploding, quick(), &jobs, &arrivals);
    for (i, (prompt, p)) in jobs.iter().enumerate() {
        match &results[&(i as u64)] {
            Err(e) if !p.stop.is_empty() => assert!(e.to_string().contains("the decoder broke"), "{e}"),
            Err(e) => panic!("job {i} failed: {e}"),
            Ok(f) => {
                assert!(p.stop.is_empty(), "job {i} with stop strings should have failed");
                assert_eq!(f.decoded, alone(&lm, prompt, p), "job {i}");
            }
        }
    }
}

#[test]
fn a_job_that_can_never_fit_the_budget_is_refused_at_once() {
    let lm = HashLm::new(40, None);
    let limits = Limits {
        max_batch_tokens: 100,
        ..quick()
    };
    let mut s = Scheduler::new(&lm, &Letters, limits);
    let big = plan(GenerationParameters {
        strategy: Some(Strategy::Beam),
        num_beams: Some(4),
        max_new_tokens: Some(40),
        ..Default::default()
    });
    let err = s
        .submit(Request {
            id: 0,
            prompt: vec![1, 2],
            plan: big,
            grammar: None,
            lane: shared::Lane::Interactive,
        })
        .unwrap_err();
    assert!(matches!(err, DecodeError::TooLarge(_)), "{err}");
    assert!(err.to_string().contains("--max-batch-tokens"), "{err}");
    assert!(!s.has_work());
    let too_long = plan(GenerationParameters {
        max_new_tokens: Some(600),
        ..Default::default()
    });
    let err = s
        .submit(Request {
            id: 1,
            prompt: vec![1],
            plan: too_long,
            grammar: None,
            lane: shared::Lane::Interactive,
        })
        .unwrap_err();
    assert!(err.to_string().contains("context"), "{err}");
}

#[test]
fn the_cache_allocation_only_changes_when_sequences_join_and_is_released_when_the_batch_empties() {
    let lm = HashLm::new(40, None);
    let jobs = mixed();
    let mut s = Scheduler::new(&lm, &Letters, quick());
    for i in 0..jobs.len() {
        s.submit(request(&jobs, i)).unwrap();
    }
    let mut allocated = None;
    while s.has_work() {
        let events = s.step();
        let now = s.stats();
        let joined = events.iter().any(|e| matches!(e, Event::Joined { .. }));
        if let Some(before) = allocated
            && !joined
            && now.running > 0
        {
            assert_eq!(
                now.kv_allocated, before,
                "a step without joins reallocated the cache"
            );
        }
        assert!(now.kv_used <= now.kv_allocated);
        allocated = Some(now.kv_allocated);
    }
    assert_eq!(s.stats().kv_allocated, 0);
}

/// Applies moves to spans and checks the rows in use are `0..n` with no overlap.
fn after(spans: &[(usize, usize)], moves: &[(usize, usize)]) -> Vec<(usize, usize)> {
    let mut spans = spans.to_vec();
    for &(i, to) in moves {
        spans[i].0 = to;
    }
    let total: usize = spans.iter().map(|s| s.1).sum();
    let mut used = vec![false; total];
    for &(row0, rows) in &spans {
        assert!(row0 + rows <= total, "{spans:?}");
        assert!(used[row0..row0 + rows].iter().all(|u| !u), "{spans:?}");
        used[row0..row0 + rows].fill(true);
    }
    spans
}

#[test]
fn a_leaver_is_replaced_by_the_last_sequence_in_one_move() {
    // Ten one-row sequences; the one in row 1 left.
    let spans: Vec<(usize, usize)> = (0..10).filter(|&r| r != 1).map(|r| (r, 1)).collect();
    let moves = plan_moves(&spans).expect("a hole of one row takes a one-row sequence");
    assert_eq!(moves, vec![(8, 1)], "only the sequence in the last row moves");
    after(&spans, &moves);
}

#[test]
fn leavers_cost_one_move_each_whatever_the_batch_size() {
    for batch in [8usize, 64, 512] {
        let leaving = [0, batch / 3, batch / 2];
        let spans: Vec<(usize, usize)> = (0..batch)
            .filter(|r| !leaving.contains(r))
            .map(|r| (r, 1))
            .collect();
        let moves = plan_moves(&spans).expect("one-row holes");
        assert!(
            moves.len() <= leaving.len(),
            "{} moves at batch {batch}",
            moves.len()
        );
        after(&spans, &moves);
    }
}

#[test]
fn beams_fill_a_hole_wide_enough_and_fragmented_holes_fall_back_to_packing() {
    // A 3-beam sequence at rows 7..10 fills the 3-row hole at 2..5.
    let spans = vec![(0, 2), (5, 2), (7, 3)];
    let moves = plan_moves(&spans).expect("the hole is wide enough");
    assert_eq!(moves, vec![(2, 2)]);
    after(&spans, &moves);
    // Two one-row holes (rows 1 and 3) cannot take a 2-row sequence: pack in order instead.
    let spans = vec![(0, 1), (2, 1), (4, 1), (5, 2)];
    assert_eq!(plan_moves(&spans), None);
    let moves = pack_moves(&spans);
    after(&spans, &moves);
}

#[test]
fn prompts_longer_than_the_prefill_budget_are_prefilled_in_chunks_and_get_what_they_get_alone() {
    let mut lm = HashLm::new(40, Some(0));
    lm.eos_bias = 1.0;
    let jobs = mixed();
    let arrivals: Vec<usize> = (0..jobs.len()).collect();
    // Every strategy's prompt of more than 4 tokens is prefilled 4 tokens a step.
    let limits = Limits {
        join: JoinPolicy {
            max_prefill_tokens: 4,
            ..quick().join
        },
        ..quick()
    };
    assert!(jobs.iter().filter(|(p, _)| p.len() > 4).count() >= 2);
    let (results, _) = staggered(&lm, &Letters, limits, &jobs, &arrivals);
    for (i, (prompt, p)) in jobs.iter().enumerate() {
        let got = results[&(i as u64)].as_ref().expect("succeeds");
        assert_eq!(got.decoded, alone(&lm, prompt, p), "job {i}: {p:?}");
    }
}

#[test]
fn a_long_prompt_joining_never_stalls_the_running_sequences() {
    let lm = HashLm::new(40, None);
    let greedy = |n| {
        plan(GenerationParameters {
            strategy: Some(Strategy::Greedy),
            max_new_tokens: Some(n),
            ..Default::default()
        })
    };
    let limits = Limits {
        join: JoinPolicy {
            max_prefill_tokens: 4,
            ..quick().join
        },
        ..quick()
    };
    let mut s = Scheduler::new(&lm, &Letters, limits);
    for id in 0..2 {
        s.submit(Request {
            id,
            prompt: vec![1, 2, 3],
            plan: greedy(40),
            grammar: None,
            lane: shared::Lane::Interactive,
        })
        .unwrap();
    }
    while s.stats().running < 2 {
        s.step();
    }
    let long: Vec<i64> = (0..30).map(|t| t % 37 + 1).collect();
    s.submit(Request {
        id: 9,
        prompt: long.clone(),
        plan: greedy(5),
        grammar: None,
        lane: shared::Lane::Interactive,
    })
    .unwrap();
    // 30 tokens at 4 a step: 8 steps of prefill, and every one of them still decodes the others.
    let mut joined_at = None;
    for step in 0..8 {
        let events = s.step();
        for id in 0..2 {
            let tokens: usize = events
                .iter()
                .map(|e| match e {
                    Event::Tokens { id: i, tokens, .. } if *i == id => tokens.len(),
                    _ => 0,
                })
                .sum();
            assert_eq!(tokens, 1, "sequence {id} decodes at step {step}");
        }
        if events.iter().any(|e| matches!(e, Event::Joined { id: 9, .. })) {
            joined_at = Some(step);
        }
    }
    assert_eq!(joined_at, Some(7), "the long prompt joins with its last chunk");
    let mut done = None;
    while done.is_none() {
        for e in s.step() {
            if let Event::Finished { id: 9, result } = e {
                done = Some(result.expect("succeeds").decoded);
            }
        }
    }
    assert_eq!(done.unwrap(), alone(&lm, &long, &greedy(5)));
}

#[test]
fn a_prompt_cancelled_while_it_is_prefilled_in_chunks_leaves_nothing_behind() {
    let lm = HashLm::new(40, None);
    let limits = Limits {
        join: JoinPolicy {
            max_prefill_tokens: 4,
            ..quick().join
        },
        ..quick()
    };
    let mut s = Scheduler::new(&lm, &Letters, limits);
    let p = plan(GenerationParameters {
        strategy: Some(Strategy::Greedy),
        max_new_tokens: Some(5),
        ..Default::default()
    });
    s.submit(Request {
        id: 1,
        prompt: (1..20).collect(),
        plan: p,
        grammar: None,
        lane: shared::Lane::Interactive,
    })
    .unwrap();
    s.step();
    assert!(s.has_work());
    assert_eq!(
        s.stats().waiting,
        1,
        "the prompt being prefilled counts as waiting"
    );
    assert!(s.cancel(1));
    assert!(!s.has_work());
    assert!(s.step().is_empty());
}

#[test]
fn tokens_events_carry_the_log_probabilities_the_finished_sequence_reports_one_per_token() {
    let lm = HashLm::new(40, None);
    let scored = |strategy, logprobs| GenerationParameters {
        strategy: Some(strategy),
        max_new_tokens: Some(9),
        logprobs,
        ..Default::default()
    };
    let jobs = vec![
        (vec![3, 1, 4], plan(scored(Strategy::Greedy, Some(2)))),
        (
            vec![2, 7],
            plan(GenerationParameters {
                seed: Some(5),
                ..scored(Strategy::Sample, Some(0))
            }),
        ),
        (vec![5, 5, 1], plan(scored(Strategy::Greedy, None))),
    ];
    let mut s = Scheduler::new(&lm, &Letters, quick());
    for i in 0..jobs.len() {
        s.submit(request(&jobs, i)).unwrap();
    }
    let mut streamed: HashMap<u64, (Vec<i64>, Option<Vec<shared::TokenLogprob>>)> = HashMap::new();
    let mut finished = HashMap::new();
    while s.has_work() {
        for event in s.step() {
            match event {
                Event::Tokens { id, tokens, logprobs } => {
                    if let Some(l) = &logprobs {
                        assert_eq!(l.len(), tokens.len(), "one log-probability per new token");
                    }
                    let (ids, scores) = streamed.entry(id).or_default();
                    ids.extend(tokens);
                    if let Some(l) = logprobs {
                        scores.get_or_insert_with(Vec::new).extend(l);
                    }
                }
                Event::Finished { id, result } => {
                    finished.insert(id, result.expect("succeeds").decoded);
                }
                Event::Joined { .. } => {}
            }
        }
    }
    for (id, decoded) in finished {
        let (ids, scores) = &streamed[&id];
        assert_eq!(ids, &decoded.tokens, "job {id}");
        assert_eq!(
            scores, &decoded.logprobs,
            "job {id}: streamed as the result reports them"
        );
    }
}

#[test]
fn interactive_sequences_join_ahead_of_batch_ones_that_waited_longer() {
    let lm = HashLm::new(40, None);
    let g = plan(GenerationParameters {
        strategy: Some(Strategy::Greedy),
        max_new_tokens: Some(3),
        ..Default::default()
    });
    let limits = Limits {
        max_batch_size: 1,
        ..quick()
    };
    let mut s = Scheduler::new(&lm, &Letters, limits);
    let req = |id, lane| Request {
        id,
        prompt: vec![1, 2, 3],
        plan: g.clone(),
        grammar: None,
        lane,
    };
    s.submit(req(0, Lane::Batch)).unwrap();
    s.submit(req(1, Lane::Batch)).unwrap();
    s.submit(req(2, Lane::Interactive)).unwrap();
    s.submit(req(3, Lane::Interactive)).unwrap();
    let mut joined = Vec::new();
    while s.has_work() {
        for event in s.step() {
            if let Event::Joined { id, .. } = event {
                joined.push(id);
            }
        }
    }
    assert_eq!(joined, [2, 3, 0, 1], "interactive first, each lane in its order");
}

#[test]
fn the_place_in_line_is_behind_the_own_lane_and_ahead_of_lower_ones() {
    use Lane::{Batch, Interactive};
    assert_eq!(place_in_line([].into_iter(), Batch), 0);
    assert_eq!(
        place_in_line([Interactive, Batch, Batch].into_iter(), Interactive),
        1
    );
    assert_eq!(place_in_line([Interactive, Batch].into_iter(), Batch), 2);
    assert_eq!(place_in_line([Batch, Batch].into_iter(), Interactive), 0);
}

#[test]
fn batch_sequences_pause_while_an_interactive_one_runs_and_resume_with_the_tokens_they_get_alone() {
    let lm = HashLm::new(40, None);
    let jobs = mixed();
    let limits = Limits {
        join: JoinPolicy {
            pause_batch: true,
            ..quick().join
        },
        ..quick()
    };
    let mut s = Scheduler::new(&lm, &Letters, limits);
    let lane = |i: usize, lane| Request {
        lane,
        ..request(&jobs, i)
    };
    // Every strategy on the batch lane, decoding for a few steps.
    let batch: Vec<usize> = (1..jobs.len()).collect();
    for &i in &batch {
        s.submit(lane(i, Lane::Batch)).unwrap();
    }
    let mut results = HashMap::new();
    let record = |events: Vec<Event>, results: &mut HashMap<u64, _>| -> Vec<u64> {
        let mut tokens = Vec::new();
        for event in events {
            match event {
                Event::Tokens { id, .. } => tokens.push(id),
                Event::Finished { id, result } => {
                    results.insert(id, result);
                }
                Event::Joined { .. } => {}
            }
        }
        tokens
    };
    for _ in 0..3 {
        record(s.step(), &mut results);
    }
    // An interactive job arrives: from the step it joins until it leaves, no batch sequence advances, and
    // a batch job arriving meanwhile waits.
    s.submit(lane(0, Lane::Interactive)).unwrap();
    let mut late = Some(lane(8, Lane::Batch));
    let (interactive_steps, mut step) = (jobs[0].1.max_new_tokens, 0);
    while !results.contains_key(&0) {
        let advanced = record(s.step(), &mut results);
        assert!(
            advanced.iter().all(|&id| id == 0),
            "only the interactive job advances while it runs: {advanced:?}"
        );
        if let Some(r) = late.take() {
            // Job 8 is already running on the batch lane; a fresh copy under another id arrives late.
            s.submit(Request { id: 100, ..r }).unwrap();
        }
        if !results.contains_key(&0) {
            assert_eq!(
                s.stats().rows,
                1,
                "the batch's rows hold the interactive job alone"
            );
        }
        step += 1;
        assert!(
            step <= interactive_steps + 1,
            "the interactive job ran at one token a step"
        );
    }
    // Then the batch lane resumes, and the latecomer joins.
    while s.has_work() {
        record(s.step(), &mut results);
    }
    let expected = |i: usize| alone(&lm, &jobs[i].0, &jobs[i].1);
    for i in std::iter::once(0).chain(batch) {
        let got = results[&(i as u64)].as_ref().expect("succeeds");
        assert_eq!(got.decoded, expected(i), "job {i}: {:?}", jobs[i].1);
    }
    assert_eq!(results[&100].as_ref().expect("succeeds").decoded, expected(8));
}

#[test]
fn without_pausing_the_lanes_share_every_step() {
    let lm = HashLm::new(40, None);
    let jobs = mixed();
    let mut s = Scheduler::new(&lm, &Letters, quick());
    s.submit(Request {
        lane: Lane::Batch,
        ..request(&jobs, 0)
    })
    .unwrap();
    s.step();
    s.submit(request(&jobs, 6)).unwrap();
    let events = s.step();
    for id in [0, 6] {
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Event::Tokens { id: i, .. } if *i == id)),
            "job {id} advances in the shared step: {events:?}"
        );
    }
}
