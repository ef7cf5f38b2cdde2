//! The batch engine's mechanics on a CPU that behaves like a GPU host: a deep, narrow GPT-J (GPT-J-6B's 28
//! layers at width 32) on one libtorch thread, so a step costs mostly per-operation host work, as it does
//! when a GPU runs the arithmetic. The batch is kept full while jobs of staggered lengths and mixed
//! strategies join and leave, against equal-length greedy jobs in the same run (the same total of new
//! tokens each way). What scales with the batch rather than with the model shows here.
//!
//! Two more scenarios run the equal-length greedy jobs again, with a JSON Schema each (constrained decoding:
//! a grammar mask a row every step) and with log-probabilities (each token's and its 5 likeliest
//! alternatives), so their ratios are what structured output and logprobs cost.
//!
//! A second table: a long prompt (2,000 tokens) joins a batch of 32 decoding jobs, prefilled at most
//! `--join-chunk` tokens a step and then all in one step; it prints the running jobs' inter-token latency
//! (one decode step each) before the join and during it, so the cost of the bounded chunk shows.
//!
//! `cargo run --release -p worker --example bench_engine -- [--jobs 256] [--batch 64] [--tokens 64]`
//! (scripts/bench-engine.sh runs it three times). Prints one table: tokens per second and the ratio to equal
//! lengths; the median decode step split into prefill, selection, forward and cache maintenance; cache
//! copies and device→host readbacks per decode step.

use std::time::{Duration, Instant};

use clap::Parser;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shared::{GenerationParameters, Grammar, Strategy};
use worker::decoding::{JoinPolicy, Limits, Request, Scheduler, StepProfile, TextDecoder, readbacks};
use worker::device_map::Placement;
use worker::grammars::Grammars;
use worker::lm::CausalLm;
use worker::model::{Dtype, GptJ, LoadOptions};
use worker::tiny::{TinyConfig, write_tiny_model};

#[derive(Parser)]
struct Args {
    /// Jobs per scenario.
    #[arg(long, default_value_t = 256)]
    jobs: usize,
    /// The running batch's size (`--max-batch-size`).
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Mean new tokens a job (staggered jobs range from a quarter to 1.75 times it).
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    #[arg(long, default_value_t = 28)]
    layers: usize,
    #[arg(long, default_value_t = 32)]
    width: usize,
    /// libtorch's intra-op threads (1: per-operation host cost dominates, as on a GPU).
    #[arg(long, default_value_t = 1)]
    threads: i32,
    /// The long-prompt join: a prompt of this many tokens joins a batch of `--join-running` decoding jobs...
    #[arg(long, default_value_t = 2000)]
    join_prompt: usize,
    #[arg(long, default_value_t = 32)]
    join_running: usize,
    /// ... prefilled at most this many tokens a step (`--max-prefill-tokens`), against all at once.
    #[arg(long, default_value_t = 256)]
    join_chunk: usize,
    /// Only the scenarios whose name contains this (the first one run is what the ratios divide by), or
    /// only "a long-prompt join".
    #[arg(long)]
    only: Option<String>,
}

/// Stop strings are not used: no text is needed.
struct NoText;
impl TextDecoder for NoText {
    fn decode(&self, _: &[u32]) -> String {
        String::new()
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Scenario {
    EqualGreedy,
    StaggeredGreedy,
    StaggeredMixed,
    EqualJson,
    EqualLogprobs,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::EqualGreedy => "equal lengths, greedy",
            Scenario::StaggeredGreedy => "staggered, greedy",
            Scenario::StaggeredMixed => "staggered, 6 greedy : 3 sample : 1 contrastive",
            Scenario::EqualJson => "equal lengths, greedy, a JSON Schema each",
            Scenario::EqualLogprobs => "equal lengths, greedy, logprobs with 5 alternatives",
        }
    }

    /// Job `i`'s parameters; every scenario's lengths add up to `jobs × tokens`.
    fn parameters(self, i: usize, jobs: usize, tokens: usize) -> GenerationParameters {
        let staggered = !matches!(
            self,
            Scenario::EqualGreedy | Scenario::EqualJson | Scenario::EqualLogprobs
        );
        // Lengths spread evenly over [tokens/4, 7·tokens/4), in an order that mixes short and long.
        let n = if staggered {
            let k = (i * 37) % jobs;
            tokens / 4 + (k * 3 * tokens / 2) / jobs.max(1)
        } else {
            tokens
        };
        let base = GenerationParameters {
            max_new_tokens: Some(n.max(1) as u32),
            ..Default::default()
        };
        match (self, i % 10) {
            (Scenario::StaggeredMixed, 6..=8) => GenerationParameters {
                strategy: Some(Strategy::Sample),
                seed: Some(i as u64),
                top_k: Some(50),
                temperature: Some(0.8),
                ..base
            },
            (Scenario::StaggeredMixed, 9) => GenerationParameters {
                strategy: Some(Strategy::Contrastive),
                ..base
            },
            (Scenario::EqualJson, _) => GenerationParameters {
                strategy: Some(Strategy::Greedy),
                // An array of short strings: it never completes, so every job runs to its length.
                grammar: Some(Grammar::Json(serde_json::json!({
                    "type": "array",
                    "items": {"type": "string", "maxLength": 8}
                }))),
                ..base
            },
            (Scenario::EqualLogprobs, _) => GenerationParameters {
                strategy: Some(Strategy::Greedy),
                logprobs: Some(5),
                ..base
            },
            _ => GenerationParameters {
                strategy: Some(Strategy::Greedy),
                ..base
            },
        }
    }
}

struct Measured {
    tokens: usize,
    wall: Duration,
    steps: Vec<StepProfile>,
    readbacks: u64,
}

fn run(model: &GptJ, grammars: &Grammars, args: &Args, scenario: Scenario) -> anyhow::Result<Measured> {
    let limits = Limits {
        max_batch_size: args.batch,
        max_batch_tokens: usize::MAX,
        // Joins batched as the worker batched them until issue 16 (8 steps or 0.3 of the running jobs): the
        // figures in docs/benchmarks.md were measured so.
        join: JoinPolicy {
            max_waiting_steps: 8,
            ..JoinPolicy::default()
        },
    };
    let mut scheduler = Scheduler::new(model, &NoText, limits);
    // Lengths are exact: no job ends early on EOS.
    scheduler.set_eos(None);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let vocab = model.info().vocab_size as i64 - 400;
    for i in 0..args.jobs {
        let prompt: Vec<i64> = (0..rng.random_range(8..32))
            .map(|_| rng.random_range(0..vocab))
            .collect();
        let plan = scenario
            .parameters(i, args.jobs, args.tokens)
            .validate()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let grammar = plan
            .grammar
            .as_ref()
            .map(|g| grammars.constraint(g))
            .transpose()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        scheduler
            .submit(Request {
                id: i as u64,
                prompt,
                plan,
                grammar,
                lane: shared::Lane::Interactive,
            })
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let (mut tokens, mut steps) = (0, Vec::new());
    let mut decode_readbacks = 0;
    let started = Instant::now();
    tch::no_grad(|| {
        while scheduler.has_work() {
            let before = readbacks();
            for event in scheduler.step() {
                match event {
                    worker::decoding::Event::Finished { result: Ok(f), .. } => {
                        tokens += f.decoded.tokens.len()
                    }
                    worker::decoding::Event::Finished { result: Err(e), .. } => {
                        return Err(anyhow::anyhow!("a job failed: {e}"));
                    }
                    _ => {}
                }
            }
            let profile = scheduler.profile();
            if profile.decoded {
                decode_readbacks += readbacks() - before;
                steps.push(profile);
            }
        }
        Ok(())
    })?;
    Ok(Measured {
        tokens,
        wall: started.elapsed(),
        steps,
        readbacks: decode_readbacks,
    })
}

/// The running jobs' inter-token latency (a decode step emits one token for each) before and while a long
/// prompt joins: the steps from its submission to its first token.
struct JoinLatency {
    before: Vec<f64>,
    /// Each step's milliseconds and split.
    during: Vec<(f64, StepProfile)>,
}

/// `running` greedy jobs decode; after 24 steps a prompt of `prompt` tokens joins, prefilled at most `chunk`
/// tokens a step.
fn long_join(model: &GptJ, running: usize, prompt: usize, chunk: usize) -> anyhow::Result<JoinLatency> {
    let limits = Limits {
        max_batch_size: running + 1,
        max_batch_tokens: usize::MAX,
        join: JoinPolicy {
            max_prefill_tokens: chunk,
            ..JoinPolicy::default()
        },
    };
    let mut scheduler = Scheduler::new(model, &NoText, limits);
    scheduler.set_eos(None);
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let vocab = model.info().vocab_size as i64 - 400;
    let mut request = |id: u64, len: usize, new: u32| -> anyhow::Result<Request> {
        let plan = GenerationParameters {
            strategy: Some(Strategy::Greedy),
            max_new_tokens: Some(new),
            ..Default::default()
        }
        .validate()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        Ok(Request {
            id,
            prompt: (0..len).map(|_| rng.random_range(0..vocab)).collect(),
            plan,
            grammar: None,
            lane: shared::Lane::Interactive,
        })
    };
    for id in 0..running as u64 {
        scheduler
            .submit(request(id, 16, 1_000)?)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let long = running as u64;
    let (mut before, mut during) = (Vec::new(), Vec::new());
    let mut steps = 0;
    tch::no_grad(|| -> anyhow::Result<()> {
        loop {
            if steps == 24 {
                scheduler
                    .submit(request(long, prompt, 4)?)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            let started = Instant::now();
            let events = scheduler.step();
            let took = ms(started.elapsed());
            let decoded = scheduler.profile().decoded;
            steps += 1;
            let first = events
                .iter()
                .any(|e| matches!(e, worker::decoding::Event::Tokens { id, .. } if *id == long));
            // Steps after every running job joined (the first steps prefill them).
            if decoded && (4..=24).contains(&steps) {
                before.push(took);
            } else if steps > 24 {
                during.push((took, scheduler.profile()));
            }
            if first || steps > 24 + 4 * prompt {
                return Ok(());
            }
        }
    })?;
    Ok(JoinLatency { before, during })
}

fn median(v: Vec<f64>) -> f64 {
    quantile(v, 0.5)
}

fn quantile(mut v: Vec<f64>, q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tch::set_num_threads(args.threads);
    let dir = tempfile::tempdir()?;
    let cfg = TinyConfig {
        n_layer: args.layers,
        n_embd: args.width,
        n_head: 4,
        rotary_dim: 4,
        n_inner: 4 * args.width,
        ..TinyConfig::tiny()
    };
    write_tiny_model(dir.path(), &cfg, 0)?;
    let model = GptJ::load(
        dir.path(),
        &LoadOptions {
            dtype: Dtype::Float32,
            placement: Placement::default(),
        },
    )?;
    println!(
        "engine mechanics: GPT-J {} layers × {} wide, {} libtorch thread(s), {} jobs a scenario, batch {}, {} new tokens a job on average",
        args.layers, args.width, args.threads, args.jobs, args.batch, args.tokens
    );
    println!(
        "| scenario | tokens | tok/s | × equal | median step ms | prefill | select | forward | maintenance | cache copies/step | readbacks/step |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let grammars = Grammars::new(
        worker::tokenizer::bundled()?,
        model.info().vocab_size,
        Some(50256),
    );
    let mut reference = None;
    for scenario in [
        Scenario::EqualGreedy,
        Scenario::StaggeredGreedy,
        Scenario::StaggeredMixed,
        Scenario::EqualJson,
        Scenario::EqualLogprobs,
    ] {
        if args
            .only
            .as_ref()
            .is_some_and(|o| !scenario.name().contains(o.as_str()))
        {
            continue;
        }
        let m = run(&model, &grammars, &args, scenario)?;
        let rate = m.tokens as f64 / m.wall.as_secs_f64();
        let base = *reference.get_or_insert(rate);
        let n = m.steps.len().max(1) as f64;
        let part = |f: fn(&StepProfile) -> Duration| median(m.steps.iter().map(|s| ms(f(s))).collect());
        println!(
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {:.2} |",
            scenario.name(),
            m.tokens,
            rate,
            rate / base,
            part(|s| s.prefill + s.select + s.forward + s.maintenance),
            part(|s| s.prefill),
            part(|s| s.select),
            part(|s| s.forward),
            part(|s| s.maintenance),
            m.steps.iter().map(|s| s.cache_copies).sum::<usize>() as f64 / n,
            m.readbacks as f64 / n,
        );
    }
    if args
        .only
        .as_ref()
        .is_some_and(|o| !"a long-prompt join".contains(o.as_str()))
    {
        return Ok(());
    }
    println!();
    println!(
        "a {}-token prompt joins {} decoding greedy jobs: their inter-token latency (one decode step) before it and until its first token",
        args.join_prompt, args.join_running
    );
    println!(
        "| max prefill tokens a step | steps to its first token | before p50 ms | before p99 ms | during p50 ms | during max ms | max − before p99 | the max step's prefill ms | its forward ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for chunk in [args.join_chunk, args.join_prompt] {
        let j = long_join(&model, args.join_running, args.join_prompt, chunk)?;
        let p99 = quantile(j.before.clone(), 0.99);
        let (max, split) = j
            .during
            .iter()
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .map_or((0.0, (0.0, 0.0)), |(t, p)| (*t, (ms(p.prefill), ms(p.forward))));
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            chunk,
            j.during.len(),
            median(j.before),
            p99,
            median(j.during.iter().map(|d| d.0).collect()),
            max,
            max - p99,
            split.0,
            split.1,
        );
    }
    Ok(())
}
