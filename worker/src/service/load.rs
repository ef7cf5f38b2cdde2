//! The real engine behind the service's [`Generator`] seam: model flags to [`EngineOptions`], jobs into the
//! engine's continuous-batching [`Scheduler`], and engine errors to the `{code, message}` a `job.failed`
//! reply carries.

use std::collections::HashMap;

use shared::{ErrorBody, ErrorCode, GenerationPlan};

use super::args::ServeArgs;
use super::error::ServeError;
use super::generator::{BatchSettings, Batcher, Detokenizer, Generator, JobEvent};
use super::job::{Completion, Input};
use crate::decoding::{DecodeError, Event, Limits, Request, Scheduler, Stats, StopChecker};
use crate::engine::{Engine, EngineError, EngineOptions, Generation};

/// The engine options the flags describe; bad values are reported before anything loads.
pub fn engine_options(args: &ServeArgs) -> Result<EngineOptions, ServeError> {
    args.engine
        .options()
        .map_err(|e| ServeError::Config(e.to_string()))
}

impl Generator for Engine {
    fn batcher(&self, settings: &BatchSettings) -> Box<dyn Batcher + '_> {
        let limits = Limits {
            max_batch_size: settings.max_batch_size.max(1),
            max_batch_tokens: settings
                .max_batch_tokens
                .unwrap_or_else(|| self.default_batch_tokens(settings.max_batch_size)),
            max_waiting_steps: settings.max_waiting_steps,
            waiting_served_ratio: settings.waiting_served_ratio,
            max_prefill_tokens: settings.max_prefill_tokens.max(1),
        };
        tracing::info!(
            max_batch_size = limits.max_batch_size,
            max_batch_tokens = limits.max_batch_tokens,
            max_waiting_steps = limits.max_waiting_steps,
            waiting_served_ratio = limits.waiting_served_ratio,
            "continuous batching"
        );
        Box::new(EngineBatch {
            engine: self,
            scheduler: self.scheduler(limits),
            stops: HashMap::new(),
        })
    }

    fn detokenizer(&self) -> Option<Detokenizer> {
        Some(std::sync::Arc::new(self.tokenizer().clone()))
    }

    fn chat_stop(&self) -> Option<String> {
        Engine::chat_stop(self).map(str::to_owned)
    }
}

/// The engine's running batch, and each job's stop sequences for its final text (and, for a chat job, the
/// prompt it rendered).
struct EngineBatch<'a> {
    engine: &'a Engine,
    scheduler: Scheduler<'a>,
    stops: HashMap<u64, (StopChecker, Option<String>)>,
}

impl Batcher for EngineBatch<'_> {
    fn submit(&mut self, key: u64, input: &Input, plan: &GenerationPlan) -> Result<(), ErrorBody> {
        let rendered = match input {
            Input::Text(_) => None,
            Input::Chat(messages) => Some(self.engine.render_chat(messages).map_err(|e| error_body(&e))?),
        };
        let prompt = match (input, &rendered) {
            (_, Some(r)) => r.as_str(),
            (Input::Text(p), None) => p.as_str(),
            (Input::Chat(_), None) => "",
        };
        let ids = self
            .engine
            .prompt_tokens(prompt, plan)
            .map_err(|e| error_body(&e))?;
        let request = Request {
            id: key,
            prompt: ids,
            plan: plan.clone(),
        };
        self.scheduler
            .submit(request)
            .map_err(|e| decode_error_body(&e))?;
        self.stops.insert(key, (StopChecker::new(&plan.stop), rendered));
        Ok(())
    }

    fn step(&mut self) -> Vec<JobEvent> {
        self.scheduler
            .step()
            .into_iter()
            .map(|event| match event {
                Event::Joined { id, batch_size } => JobEvent::Joined { key: id, batch_size },
                Event::Tokens { id, tokens } => JobEvent::Tokens {
                    key: id,
                    ids: tokens.iter().map(|&t| t as u32).collect(),
                },
                Event::Finished { id, result } => {
                    let (stop, prompt) = self.stops.remove(&id).unwrap_or_default();
                    let result = match result {
                        Ok(f) => {
                            let d = &f.decoded;
                            let text = self.engine.text(d, &stop);
                            let ttft = f.time_to_first_token.saturating_sub(f.queued);
                            Ok(Completion {
                                prompt,
                                generation: Generation {
                                    text,
                                    token_ids: d.tokens.iter().map(|&t| t as u32).collect(),
                                    finish_reason: d.finish_reason,
                                    prompt_tokens: f.prompt_tokens,
                                    prefill_ms: ttft.as_millis() as u64,
                                    decode_ms: f.inference.saturating_sub(ttft).as_millis() as u64,
                                },
                                time_to_first_token_ms: f.time_to_first_token.as_millis() as u64,
                                batch_size: f.batch_size,
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
        self.stops.remove(&key);
        self.scheduler.cancel(key)
    }

    fn stats(&self) -> Stats {
        self.scheduler.stats()
    }
}

/// The client can fix a context overflow (shorter prompt, fewer tokens); anything else is ours.
fn error_body(e: &EngineError) -> ErrorBody {
    match e {
        EngineError::ContextOverflow { .. } => ErrorBody::new(ErrorCode::ContextOverflow, e.to_string()),
        // A template may refuse a conversation (`raise_exception`, e.g. roles that do not alternate).
        EngineError::Chat(_) => ErrorBody::new(ErrorCode::InvalidParameter, e.to_string()),
        EngineError::Tokenizer(_) | EngineError::Generation(_) | EngineError::Load(_) => {
            tracing::error!(error = %e, "generation failed");
            ErrorBody::new(ErrorCode::GenerationFailed, e.to_string())
        }
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
    fn a_context_overflow_or_a_job_too_big_for_the_batch_is_the_clients_to_fix() {
        let e = EngineError::ContextOverflow {
            prompt_tokens: 10,
            max_new_tokens: 2048,
            n_positions: 2048,
        };
        assert_eq!(error_body(&e).code, ErrorCode::ContextOverflow);
        assert_eq!(
            error_body(&EngineError::Generation("x".into())).code,
            ErrorCode::GenerationFailed
        );
        assert_eq!(
            decode_error_body(&DecodeError::TooLarge("x".into())).code,
            ErrorCode::ContextOverflow
        );
    }
}
