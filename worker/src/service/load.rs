//! The real engine behind the service's [`Generator`] seam: model flags to [`EngineOptions`], and engine
//! errors to the `{code, message}` a `job.failed` reply carries.

use shared::{ErrorBody, ErrorCode, GenerationPlan};

use super::ServeError;
use super::args::ServeArgs;
use super::generator::{Completion, Generator};
use crate::engine::{Engine, EngineError, EngineOptions};

/// The engine options the flags describe; bad values are reported before anything loads.
pub fn engine_options(args: &ServeArgs) -> Result<EngineOptions, ServeError> {
    args.engine
        .options()
        .map_err(|e| ServeError::Config(e.to_string()))
}

impl Generator for Engine {
    fn generate(&self, prompt: &str, plan: &GenerationPlan) -> Result<Completion, ErrorBody> {
        let g = Engine::generate(self, prompt, plan).map_err(|e| error_body(&e))?;
        Ok(Completion {
            text: g.text,
            token_ids: g.token_ids,
            finish_reason: g.finish_reason,
            prompt_tokens: g.prompt_tokens,
            prefill_ms: g.prefill_ms,
            decode_ms: g.decode_ms,
        })
    }
}

/// The client can fix a context overflow (shorter prompt, fewer tokens); anything else is ours.
fn error_body(e: &EngineError) -> ErrorBody {
    match e {
        EngineError::ContextOverflow { .. } => ErrorBody::new(ErrorCode::ContextOverflow, e.to_string()),
        EngineError::Tokenizer(_) | EngineError::Generation(_) | EngineError::Load(_) => {
            tracing::error!(error = %e, "generation failed");
            ErrorBody::new(ErrorCode::GenerationFailed, e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device_map::Placement;
    use crate::model::Dtype;
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
    fn a_context_overflow_is_the_clients_to_fix() {
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
    }
}
