//! The real engine behind the service's [`Generator`] seam: model flags to [`EngineOptions`], jobs into the
//! engine's continuous-batching [`Scheduler`], and scheduler errors to the `{code, message}` a `job.failed`
//! reply carries. Jobs arrive tokenized and leave as ids: the engine's text side runs on the async side
//! (`text`).

use std::sync::Arc;

use shared::{ErrorBody, ErrorCode, GenerationPlan};

use super::args::ServeArgs;
use super::error::ServeError;
use super::generator::{Batcher, Generator, JobEvent, NewTokens};
use super::job::{Completion, Prompt};
use crate::decoding::{DecodeError, Event, Limits, Request, Scheduler, Stats, StepProfile};
use crate::engine::{Engine, EngineOptions, Generation, PromptCodec};
use crate::sizing::BatchLimits;

/// The engine options the flags describe; bad values are reported before anything loads.
pub fn engine_options(args: &ServeArgs) -> Result<EngineOptions, ServeError> {
    args.engine
        .options()
        .map_err(|e| ServeError::Config(e.to_string()))
}

impl Generator for Engine {
    fn bounds(&self, max_batch_size: Option<usize>, max_batch_tokens: Option<usize>) -> BatchLimits {
        self.batch_limits(max_batch_size, max_batch_tokens)
    }

    fn batcher(&self, limits: &Limits) -> Box<dyn Batcher + '_> {
        Box::new(EngineBatch {
            scheduler: self.scheduler(limits.clone()),
        })
    }

    fn codec(&self) -> Option<Arc<PromptCodec>> {
        Some(Engine::codec(self).clone())
    }
}

/// The engine's running batch.
struct EngineBatch<'a> {
    scheduler: Scheduler<'a>,
}

impl Batcher for EngineBatch<'_> {
    fn submit(&mut self, key: u64, prompt: Prompt, plan: &GenerationPlan) -> Result<(), ErrorBody> {
        let request = Request {
            id: key,
            prompt: prompt.ids,
            plan: plan.clone(),
            grammar: prompt.grammar,
            lane: prompt.lane,
        };
        self.scheduler.submit(request).map_err(|e| decode_error_body(&e))
    }

    fn step(&mut self) -> Vec<JobEvent> {
        self.scheduler
            .step()
            .into_iter()
            .map(|event| match event {
                Event::Joined { id, batch_size } => JobEvent::Joined { key: id, batch_size },
                Event::Tokens { id, tokens, logprobs } => JobEvent::Tokens {
                    key: id,
                    tokens: NewTokens {
                        ids: tokens.iter().map(|&t| t as u32).collect(),
                        logprobs,
                    },
                },
                Event::Finished { id, result } => {
                    let result = match result {
                        Ok(mut f) => {
                            let prompt_logprobs = f.prompt_logprobs.take();
                            let d = &mut f.decoded;
                            let ttft = f.time_to_first_token.saturating_sub(f.queued);
                            Ok(Completion {
                                // The async side writes both from the ids (`text`), off this thread.
                                prompt: None,
                                generation: Generation {
                                    text: String::new(),
                                    token_ids: d.tokens.iter().map(|&t| t as u32).collect(),
                                    finish_reason: d.finish_reason,
                                    prompt_tokens: f.prompt_tokens,
                                    prefill_ms: ttft.as_millis() as u64,
                                    decode_ms: f.inference.saturating_sub(ttft).as_millis() as u64,
                                    logprobs: d.logprobs.take(),
                                    prompt_logprobs,
                                },
                                time_to_first_token_ms: f.time_to_first_token.as_millis() as u64,
                                batch_size: f.batch_size,
                                inference_ms: (f.queued + f.inference).as_millis() as u64,
                            })
                        }
                        Err(e) => Err(decode_error_body(&e)),
                    };
                    JobEvent::Done { key: id, result }
                }
            })
            .collect()
    }

    fn has_work(&self) -> bool {
        self.scheduler.has_work()
    }

    fn cancel(&mut self, key: u64) -> bool {
        self.scheduler.cancel(key)
    }

    fn stats(&self) -> Stats {
        self.scheduler.stats()
    }

    fn profile(&self) -> Option<StepProfile> {
        Some(self.scheduler.profile())
    }
}

/// A job too big for the batch budget is the client's to shrink, like a context overflow.
fn decode_error_body(e: &DecodeError) -> ErrorBody {
    match e {
        DecodeError::TooLarge(_) => ErrorBody::new(ErrorCode::ContextOverflow, e.to_string()),
        other => {
            tracing::error!(error = %other, "generation failed");
            ErrorBody::new(ErrorCode::GenerationFailed, format!("generation failed: {other}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dtype;
    use crate::device_map::Placement;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    #[test]
    fn model_flags_become_engine_options_and_bad_ones_are_named() {
        let cli = Cli::try_parse_from(["w", "--model", "/m", "--dtype", "bf16", "--threads", "2"]).unwrap();
        let opts = engine_options(&cli.serve).unwrap();
        assert_eq!(opts.load.dtype, Dtype::BFloat16);
        assert_eq!(opts.load.placement, Placement::default());
        assert_eq!(opts.threads, Some(2));

        let cli = Cli::try_parse_from(["w", "--model", "/m", "--dtype", "int8"]).unwrap();
        let err = engine_options(&cli.serve).unwrap_err().to_string();
        assert!(err.contains("int8"), "{err}");
        let cli = Cli::try_parse_from([
            "w",
            "--model",
            "/m",
            "--device",
            "cpu",
            "--max-memory",
            "cpu=1GiB",
        ])
        .unwrap();
        assert!(engine_options(&cli.serve).is_err());
    }

    #[test]
    fn a_job_too_big_for_the_batch_is_the_clients_to_fix() {
        assert_eq!(
            decode_error_body(&DecodeError::TooLarge("x".into())).code,
            ErrorCode::ContextOverflow
        );
    }
}
