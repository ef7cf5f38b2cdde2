//! A job's text, on the async side: its input made into the ids the model runs before the job reaches the
//! engine thread, and its generated ids made into the final text after its outcome comes back.
//!
//! Each is a pass of the tokenizer over the whole text (and, for a conversation, the chat template's
//! rendering): a millisecond or more for a long prompt, which on the engine thread would delay the next step
//! of every running job. Here both run on Tokio's blocking pool, as TGI's router tokenizes in its validation
//! workers, so the engine thread runs nothing but the scheduler. A failure is the `job.failed` body the
//! engine gave before: a prompt too long for the context is the client's to fix, and so is a conversation
//! the template refuses.

use std::sync::Arc;

use shared::{ErrorBody, ErrorCode, GenerationPlan};

use super::job::{Input, Outcome, Prompt};
use crate::decoding::StopChecker;
use crate::engine::{EngineError, PromptCodec};

/// A job ready for the engine thread: its prompt, and the conversation as rendered, which its reply reports
/// as the prompt (chat jobs).
#[derive(Debug, Clone)]
pub struct Prepared {
    pub prompt: Prompt,
    pub rendered: Option<String>,
}

/// Renders and tokenizes the job's input with the generator's text side. Without one (a test's stand-in)
/// the prompt goes as text: a conversation as its messages' contents, one a line.
pub async fn prepare(
    codec: Option<Arc<PromptCodec>>,
    input: Input,
    plan: &GenerationPlan,
) -> Result<Prepared, ErrorBody> {
    let Some(codec) = codec else {
        return Ok(verbatim(input));
    };
    let plan = plan.clone();
    tokio::task::spawn_blocking(move || encode(&codec, input, &plan))
        .await
        .unwrap_or_else(|e| Err(panicked(&e)))
}

fn encode(codec: &PromptCodec, input: Input, plan: &GenerationPlan) -> Result<Prepared, ErrorBody> {
    let (text, rendered) = match input {
        Input::Text(prompt) => (prompt, None),
        Input::Chat(messages) => {
            let rendered = codec.render_chat(&messages).map_err(|e| error_body(&e))?;
            (rendered.clone(), Some(rendered))
        }
    };
    let ids = codec.prompt_tokens(&text, plan).map_err(|e| error_body(&e))?;
    let grammar = codec.grammar(plan).map_err(|e| error_body(&e))?;
    Ok(Prepared {
        prompt: Prompt {
            text,
            ids,
            grammar,
            lane: shared::Lane::default(),
        },
        rendered,
    })
}

fn verbatim(input: Input) -> Prepared {
    let text = match input {
        Input::Text(prompt) => prompt,
        Input::Chat(messages) => messages
            .iter()
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
    };
    Prepared {
        prompt: Prompt {
            text,
            ids: Vec::new(),
            grammar: None,
            lane: shared::Lane::default(),
        },
        rendered: None,
    }
}

/// The job's outcome as its reply reports it: the final text decoded from its ids (the continuation, ending
/// before the stop sequence that ended it) and the prompt as rendered. Without a text side the batch's own
/// text stands.
pub async fn finish(
    codec: Option<Arc<PromptCodec>>,
    outcome: Outcome,
    stops: Vec<String>,
    rendered: Option<String>,
) -> Outcome {
    let mut finished = outcome?;
    if rendered.is_some() {
        finished.prompt = rendered;
    }
    let Some(codec) = codec else {
        return Ok(finished);
    };
    tokio::task::spawn_blocking(move || {
        let generation = &mut finished.generation;
        let ids: Vec<i64> = generation.token_ids.iter().map(|&t| i64::from(t)).collect();
        generation.text = codec.final_text(&ids, generation.finish_reason, &StopChecker::new(&stops));
        finished
    })
    .await
    .map_err(|e| panicked(&e))
}

/// The client can fix a context overflow (shorter prompt, fewer tokens) or a conversation the template
/// refuses; anything else is ours.
fn error_body(e: &EngineError) -> ErrorBody {
    match e {
        EngineError::ContextOverflow { .. } => ErrorBody::new(ErrorCode::ContextOverflow, e.to_string()),
        // A template may refuse a conversation (`raise_exception`, e.g. roles that do not alternate); a
        // grammar that does not compile is the producer's to fix.
        EngineError::Chat(_) | EngineError::Grammar(_) => {
            ErrorBody::new(ErrorCode::InvalidParameter, e.to_string())
        }
        EngineError::Tokenizer(_) | EngineError::Generation(_) | EngineError::Load(_) => {
            tracing::error!(error = %e, "generation failed");
            ErrorBody::new(ErrorCode::GenerationFailed, e.to_string())
        }
    }
}

/// A tokenizer that panicked (it should not) fails its job, not the worker.
fn panicked(e: &tokio::task::JoinError) -> ErrorBody {
    tracing::error!(error = %e, "the tokenizer panicked");
    ErrorBody::new(ErrorCode::GenerationFailed, "generation failed in the tokenizer")
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::FinishReason;
    use shared::chat::ChatMessage;

    fn codec(n_positions: usize) -> Arc<PromptCodec> {
        Arc::new(PromptCodec::for_tests(n_positions))
    }

    fn plan(max_new_tokens: u32) -> GenerationPlan {
        shared::GenerationParameters {
            max_new_tokens: Some(max_new_tokens),
            ..Default::default()
        }
        .validate()
        .unwrap()
    }

    fn user(content: &str) -> ChatMessage {
        ChatMessage::new(shared::chat::Role::User, content)
    }

    #[tokio::test]
    async fn a_prompt_reaches_the_engine_as_its_ids_and_a_conversation_as_its_rendering() {
        let text = prepare(Some(codec(64)), Input::Text("Hello world".into()), &plan(4))
            .await
            .unwrap();
        assert_eq!(text.prompt.ids, [15496, 995]);
        assert_eq!(text.rendered, None);

        let chat = prepare(Some(codec(64)), Input::Chat(vec![user("Hi")]), &plan(4))
            .await
            .unwrap();
        let rendered = chat.rendered.expect("a conversation is rendered");
        assert!(rendered.contains("Hi"), "{rendered}");
        assert_eq!(chat.prompt.text, rendered);
        let ids = codec(64).prompt_tokens(&rendered, &plan(4)).unwrap();
        assert_eq!(chat.prompt.ids, ids);
    }

    #[tokio::test]
    async fn a_prompt_too_long_for_the_context_is_refused_as_the_clients_to_fix() {
        let err = prepare(Some(codec(8)), Input::Text("Hello world".into()), &plan(7))
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::ContextOverflow);
        assert!(err.message.contains("context of 8 positions"), "{}", err.message);
    }

    #[tokio::test]
    async fn without_a_text_side_the_prompt_goes_as_text() {
        let chat = Input::Chat(vec![user("a"), user("b")]);
        let prepared = prepare(None, chat, &plan(4)).await.unwrap();
        assert_eq!(prepared.prompt.text, "a\nb");
        assert!(prepared.prompt.ids.is_empty() && prepared.rendered.is_none());
    }

    fn finished(token_ids: Vec<u32>, finish_reason: FinishReason) -> Outcome {
        let mut c = crate::service::generator::solo::completion(String::new(), 0);
        c.generation.token_ids = token_ids;
        c.generation.finish_reason = finish_reason;
        Ok(c)
    }

    #[tokio::test]
    async fn a_finished_job_gets_its_text_ending_before_its_stop_and_its_rendered_prompt() {
        // " one, two. three": the generation stopped on "." after " one, two.".
        let outcome = finished(vec![530, 11, 734, 13], FinishReason::Stop);
        let rendered = Some("the rendered conversation".to_string());
        let done = finish(Some(codec(64)), outcome, vec![".".into()], rendered.clone())
            .await
            .unwrap();
        assert_eq!(done.generation.text, " one, two");
        assert_eq!(done.prompt, rendered);

        let failed = Err(ErrorBody::new(ErrorCode::Cancelled, "x"));
        assert_eq!(
            finish(Some(codec(64)), failed.clone(), vec![], None).await,
            failed
        );
    }
}
