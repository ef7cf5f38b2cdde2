//! `worker generate`: one prompt through the engine from the command line.
//!
//! The flags build a [`shared::GenerationParameters`] and go through the same `validate()` as a job, so a
//! bad value gets the service's message naming the parameter, and a command-line run gives the same text
//! as a job with the same parameters.

use crate::engine::{Engine, EngineArgs};
use anyhow::Context;
use serde::Serialize;
use shared::{FinishReason, GenerationParameters, Strategy};

#[derive(Debug, Clone, clap::Args)]
pub struct GenerateArgs {
    /// The prompt.
    #[arg(long)]
    pub prompt: String,
    /// contrastive (default), greedy, sample or beam.
    #[arg(long)]
    pub strategy: Option<Strategy>,
    #[arg(long)]
    pub max_new_tokens: Option<u32>,
    #[arg(long)]
    pub min_new_tokens: Option<u32>,
    #[arg(long, allow_negative_numbers = true)]
    pub temperature: Option<f64>,
    #[arg(long)]
    pub top_k: Option<u32>,
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f64>,
    #[arg(long, allow_negative_numbers = true)]
    pub min_p: Option<f64>,
    #[arg(long, allow_negative_numbers = true)]
    pub typical_p: Option<f64>,
    #[arg(long, allow_negative_numbers = true)]
    pub repetition_penalty: Option<f64>,
    #[arg(long)]
    pub no_repeat_ngram_size: Option<u32>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// A stop sequence (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    #[arg(long, allow_negative_numbers = true)]
    pub penalty_alpha: Option<f64>,
    #[arg(long)]
    pub num_beams: Option<u32>,
    #[arg(long, allow_negative_numbers = true)]
    pub length_penalty: Option<f64>,
    /// Beam search ends once num_beams hypotheses are finished.
    #[arg(long)]
    pub early_stopping: bool,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Print one JSON object instead of the text.
    #[arg(long)]
    pub json: bool,
    /// Run this many copies of the prompt as one running batch (continuous batching); the JSON reports
    /// aggregate tokens/s and the median step time (the inter-token latency each copy saw).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub batch: u32,
    /// Generate this many times and report the fastest run (for benchmarks: the first run pays libtorch's
    /// warm-up).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub repeat: u32,
    /// The end-of-sequence token does not end a sequence (the job parameter `ignore_eos`): every copy runs
    /// to --max-new-tokens (for benchmarks of decoding speed; --min-new-tokens gets there too, but masks
    /// EOS in every row each step).
    #[arg(long)]
    pub ignore_eos: bool,
}

impl GenerateArgs {
    /// The wire parameters these flags stand for.
    pub fn parameters(&self) -> GenerationParameters {
        GenerationParameters {
            strategy: self.strategy,
            do_sample: None,
            max_new_tokens: self.max_new_tokens,
            min_new_tokens: self.min_new_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            typical_p: self.typical_p,
            repetition_penalty: self.repetition_penalty,
            no_repeat_ngram_size: self.no_repeat_ngram_size,
            seed: self.seed,
            stop: self.stop.clone(),
            penalty_alpha: self.penalty_alpha,
            num_beams: self.num_beams,
            length_penalty: self.length_penalty,
            early_stopping: self.early_stopping.then_some(true),
            grammar: None,
            logprobs: None,
            prompt_logprobs: None,
            ignore_eos: self.ignore_eos.then_some(true),
        }
    }
}

#[derive(Debug, Serialize)]
struct JsonOutput {
    /// Copies of the prompt run together (`--batch`).
    batch: u32,
    text: String,
    token_ids: Vec<u32>,
    finish_reason: FinishReason,
    prompt_tokens: usize,
    timings: JsonTimings,
}

#[derive(Debug, Serialize)]
struct JsonTimings {
    load_ms: u64,
    prefill_ms: u64,
    decode_ms: u64,
    new_tokens: usize,
    /// New tokens over the whole generate call (tokenization to text), all copies together.
    tokens_per_s: f64,
    /// Median scheduler step: the time between two tokens of one sequence.
    inter_token_ms_p50: f64,
}

pub fn run_generate(args: GenerateArgs) -> anyhow::Result<()> {
    // Parameters first: a typo should not wait for a model to load.
    let plan = args.parameters().validate()?;
    let options = args.engine.options()?;
    let engine =
        Engine::load(&options).with_context(|| format!("loading {}", options.model_dir.display()))?;
    let prompts = vec![args.prompt.as_str(); args.batch as usize];
    let mut fastest: Option<(f64, crate::engine::BatchGeneration)> = None;
    for _ in 0..args.repeat {
        let start = std::time::Instant::now();
        let out = engine.generate_batch(&prompts, &plan)?;
        let took = start.elapsed().as_secs_f64();
        if fastest.as_ref().is_none_or(|(best, _)| took < *best) {
            fastest = Some((took, out));
        }
    }
    let (total_s, mut out) = fastest.ok_or_else(|| anyhow::anyhow!("no generation ran"))?;
    let new_tokens: usize = out.generations.iter().map(|g| g.token_ids.len()).sum();
    let mut steps = std::mem::take(&mut out.step_ms);
    steps.sort_by(f64::total_cmp);
    let inter_token_ms_p50 = steps.get(steps.len() / 2).copied().unwrap_or(0.0);
    let g = out
        .generations
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no generation ran"))?;
    if args.json {
        let out = JsonOutput {
            batch: args.batch,
            text: g.text,
            finish_reason: g.finish_reason,
            prompt_tokens: g.prompt_tokens,
            timings: JsonTimings {
                load_ms: engine.load_ms(),
                prefill_ms: g.prefill_ms,
                decode_ms: g.decode_ms,
                new_tokens: g.token_ids.len(),
                tokens_per_s: if total_s > 0.0 {
                    new_tokens as f64 / total_s
                } else {
                    0.0
                },
                inter_token_ms_p50,
            },
            token_ids: g.token_ids,
        };
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!("{}", g.text);
    }
    Ok(())
}
