//! The engine: a loaded model and its tokenizer, turning a prompt and a validated plan into text.
//!
//! This is the one API the command line (`worker generate`) and the queue service share, so a job and a
//! command-line run of the same prompt and parameters give the same text. It is synchronous and owns the
//! model; the service moves it to a dedicated thread so inference never blocks the async runtime.
//!
//! Its text side ([`PromptCodec`]: tokenizer, chat template, the context check, the final text) is a value
//! of its own, shared behind an `Arc`, because it needs no model: the service tokenizes and detokenizes on
//! the async side with it, so the engine thread runs nothing but the scheduler.

use crate::decoding::{self, StopChecker};
use crate::device_map::Placement;
use crate::lm::CausalLm;
use crate::load_error::LoadError;
use crate::model::{GptJ, LoadOptions};
use crate::sizing::{self, BatchLimits};
use shared::chat::{ChatMessage, ChatTemplate};
use shared::{FinishReason, GenerationPlan};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tokenizers::Tokenizer;

/// Where the model is and how to load it.
#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    pub model_dir: PathBuf,
    pub load: LoadOptions,
    /// libtorch's intra-op CPU threads (`None`: libtorch's default, one per core).
    pub threads: Option<usize>,
}

/// The model flags of every subcommand that loads a model (`generate`, `serve`, `score`): one set of names
/// and environment variables for the command line, the service and the container images.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct EngineArgs {
    /// Model directory: config.json, safetensors or pytorch_model.bin (single or sharded), tokenizer.json
    /// (the bundled GPT-J tokenizer when absent).
    #[arg(long = "model", env = "MODEL_DIR")]
    pub model_dir: PathBuf,
    /// float32, float16 or bfloat16 (weights converted on load) [default: float32 on the CPU; on a GPU
    /// bfloat16 where it computes in it (compute capability 8.0 or newer), else float16].
    #[arg(long, env = "DTYPE")]
    pub dtype: Option<String>,
    /// Explicit placement, e.g. `cuda:0=0-13,cuda:1=14-27` (parts not named stay on the CPU).
    #[arg(long, env = "DEVICE_MAP")]
    pub device_map: Option<String>,
    /// Automatic placement from memory budgets, e.g. `cuda:0=10GiB,cuda:1=10GiB,cpu=32GiB`.
    #[arg(long, env = "MAX_MEMORY")]
    pub max_memory: Option<String>,
    /// The whole model on one device: `cpu`, `cuda`, `cuda:N` [default: cuda:0 when CUDA is available,
    /// else cpu].
    #[arg(long, env = "DEVICE")]
    pub device: Option<String>,
    /// CPU threads for libtorch [default: one per core].
    #[arg(long, env = "THREADS")]
    pub threads: Option<usize>,
}

impl EngineArgs {
    /// Checks the flags (before anything loads) and turns them into [`EngineOptions`].
    pub fn options(&self) -> Result<EngineOptions, LoadError> {
        // A worker on a GPU machine that was told nothing uses the GPU, not the CPU beside it.
        let device = match (&self.device_map, &self.max_memory, &self.device) {
            (None, None, None) if tch::Cuda::is_available() => Some("cuda:0"),
            _ => self.device.as_deref(),
        };
        let placement = Placement::from_args(self.device_map.as_deref(), self.max_memory.as_deref(), device)?;
        let dtype = match &self.dtype {
            Some(dtype) => dtype.parse()?,
            None => {
                let gpus = placement.gpus();
                let capabilities: Vec<_> = gpus
                    .iter()
                    .map(|d| crate::device_map::compute_capability(*d))
                    .collect();
                let dtype = crate::sizing::default_dtype(&capabilities);
                tracing::info!(%dtype, ?capabilities, "no --dtype given: the devices' default");
                dtype
            }
        };
        Ok(EngineOptions {
            model_dir: self.model_dir.clone(),
            load: LoadOptions { dtype, placement },
            threads: self.threads,
        })
    }
}

/// One prompt's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The continuation only (not the prompt), ending before a stop sequence, without special tokens.
    pub text: String,
    /// Generated ids, as transformers' `generate` returns them after the prompt (an ending EOS included).
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    /// Tokenization, the prompt's forward pass and the first token.
    pub prefill_ms: u64,
    /// The remaining tokens and the final decode to text.
    pub decode_ms: u64,
    /// Each generated token's log-probability, when the plan asked for them.
    pub logprobs: Option<Vec<shared::TokenLogprob>>,
    /// The prompt's (the first token's is `None`), when the plan asked for them.
    pub prompt_logprobs: Option<Vec<shared::TokenLogprob>>,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(
        "the prompt has {prompt_tokens} tokens; with max_new_tokens {max_new_tokens} that exceeds the model's \
         context of {n_positions} positions"
    )]
    ContextOverflow {
        prompt_tokens: usize,
        max_new_tokens: usize,
        n_positions: usize,
    },
    #[error("generation failed: {0}")]
    Generation(String),
    #[error("chat template: {0}")]
    Chat(#[from] shared::chat::ChatError),
    #[error("invalid `grammar`: {0}")]
    Grammar(#[from] shared::GrammarError),
}

impl From<decoding::DecodeError> for EngineError {
    fn from(e: decoding::DecodeError) -> Self {
        EngineError::Generation(e.to_string())
    }
}

/// Several prompts' results, and the batch's step times.
#[derive(Debug, Clone)]
pub struct BatchGeneration {
    pub generations: Vec<Generation>,
    /// Each scheduler step's wall time in milliseconds: with every prompt decoding, the inter-token
    /// latency each of them saw.
    pub step_ms: Vec<f64>,
}

/// A loaded model and its text side.
pub struct Engine {
    model: GptJ,
    codec: Arc<PromptCodec>,
    load_ms: u64,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model", &self.model)
            .field("load_ms", &self.load_ms)
            .finish()
    }
}

/// The checkpoint's `tokenizer_config.json` chat template, or the default when it has none (GPT-J has none).
fn chat_template(model_dir: &std::path::Path) -> Result<ChatTemplate, EngineError> {
    let path = model_dir.join("tokenizer_config.json");
    let template = match std::fs::read_to_string(&path) {
        Ok(text) => ChatTemplate::from_tokenizer_config(&text)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(EngineError::Tokenizer(format!("{}: {e}", path.display()))),
    };
    Ok(template.unwrap_or_else(|| ChatTemplate::default_template(None)))
}

/// The engine's text side: a prompt (or a conversation, through the chat template) to the ids the model
/// runs, checked against its context, and generated ids to the client's text. Cheap to share, and safe to
/// use from any thread while the model runs on its own.
#[derive(Clone)]
pub struct PromptCodec {
    tokenizer: Tokenizer,
    /// The checkpoint's chat template, or the documented default.
    chat: ChatTemplate,
    n_positions: usize,
    /// What an empty prompt starts from: BOS, else EOS (as transformers does).
    start: Option<i64>,
    /// Jobs' grammars, compiled for this vocabulary.
    grammars: Arc<crate::grammars::Grammars>,
}

impl std::fmt::Debug for PromptCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptCodec")
            .field("n_positions", &self.n_positions)
            .field("start", &self.start)
            .finish_non_exhaustive()
    }
}

impl PromptCodec {
    /// GPT-J's bundled tokenizer and the default chat template over a context of `n_positions`: what the
    /// tests of the text side use without a model.
    #[cfg(test)]
    pub(crate) fn for_tests(n_positions: usize) -> Self {
        let info = crate::lm::ModelInfo {
            vocab_size: 50400,
            n_positions,
            n_embd: 8,
            n_layer: 1,
            bos_token_id: Some(50256),
            eos_token_id: Some(50256),
        };
        #[allow(clippy::unwrap_used)] // the tokenizer is compiled in
        let tokenizer = crate::tokenizer::bundled().unwrap();
        Self::new(tokenizer, ChatTemplate::default_template(None), &info)
    }

    /// A codec for a model of this context and these special tokens.
    pub fn new(tokenizer: Tokenizer, chat: ChatTemplate, info: &crate::lm::ModelInfo) -> Self {
        let eos = info.eos_token_id.and_then(|e| u32::try_from(e).ok());
        Self {
            grammars: Arc::new(crate::grammars::Grammars::new(
                tokenizer.clone(),
                info.vocab_size,
                eos,
            )),
            tokenizer,
            chat,
            n_positions: info.n_positions,
            start: info.bos_token_id.or(info.eos_token_id),
        }
    }

    /// The plan's grammar, compiled for this vocabulary (or from the cache); `None` without one.
    pub fn grammar(&self, plan: &GenerationPlan) -> Result<Option<decoding::Constraint>, EngineError> {
        Ok(plan
            .grammar
            .as_ref()
            .map(|g| self.grammars.constraint(g))
            .transpose()?)
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// A conversation as the prompt the model continues: rendered with the chat template, the assistant's
    /// turn opened.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, EngineError> {
        Ok(self.chat.render(messages, true)?)
    }

    /// The stop sequence chat jobs get, when the template is our default (a base model would otherwise go
    /// on to write the user's next turn).
    pub fn chat_stop(&self) -> Option<&'static str> {
        self.chat.is_default().then_some(shared::chat::DEFAULT_CHAT_STOP)
    }

    /// A prompt's token ids as the model runs them: an empty prompt starts from BOS (as transformers does),
    /// and the prompt plus the new tokens must fit the context.
    pub fn prompt_tokens(&self, prompt: &str, plan: &GenerationPlan) -> Result<Vec<i64>, EngineError> {
        let enc = self
            .tokenizer
            .encode(prompt, false)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        let ids: Vec<i64> = enc.get_ids().iter().map(|&t| t as i64).collect();
        let ids = if ids.is_empty() {
            let start = self.start.ok_or_else(|| {
                EngineError::Tokenizer(
                    "the prompt is empty and the model has no BOS token to start from".into(),
                )
            })?;
            vec![start]
        } else {
            ids
        };
        if ids.len() + plan.max_new_tokens > self.n_positions {
            return Err(EngineError::ContextOverflow {
                prompt_tokens: ids.len(),
                max_new_tokens: plan.max_new_tokens,
                n_positions: self.n_positions,
            });
        }
        Ok(ids)
    }

    /// A result's text for the client: the continuation, ending before the stop sequence that ended it.
    pub fn final_text(&self, generated: &[i64], finish_reason: FinishReason, stop: &StopChecker) -> String {
        stop.final_text(&self.tokenizer, generated, finish_reason == FinishReason::Stop)
    }
}

impl decoding::TextDecoder for PromptCodec {
    fn decode(&self, ids: &[u32]) -> String {
        decoding::TextDecoder::decode(&self.tokenizer, ids)
    }
}

impl Engine {
    /// Loads the model and tokenizer from `opts.model_dir` (and sets libtorch's thread count).
    pub fn load(opts: &EngineOptions) -> Result<Self, EngineError> {
        let start = Instant::now();
        if let Some(n) = opts.threads {
            tch::set_num_threads(n.max(1) as i32);
        }
        // The text side first: a bad tokenizer or template fails before gigabytes of weights load.
        let tokenizer = crate::tokenizer::load(&opts.model_dir)?;
        let chat = chat_template(&opts.model_dir)?;
        let model = GptJ::load(&opts.model_dir, &opts.load)?;
        let codec = Arc::new(PromptCodec::new(tokenizer, chat, model.info()));
        Ok(Self {
            model,
            codec,
            load_ms: start.elapsed().as_millis() as u64,
        })
    }

    /// An engine over an already loaded model and tokenizer, with the default chat template.
    pub fn from_parts(model: GptJ, tokenizer: Tokenizer) -> Self {
        let codec = PromptCodec::new(tokenizer, ChatTemplate::default_template(None), model.info());
        Self {
            model,
            codec: Arc::new(codec),
            load_ms: 0,
        }
    }

    /// The engine's text side, to share with other threads.
    pub fn codec(&self) -> &Arc<PromptCodec> {
        &self.codec
    }

    /// See [`PromptCodec::render_chat`].
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, EngineError> {
        self.codec.render_chat(messages)
    }

    /// See [`PromptCodec::chat_stop`].
    pub fn chat_stop(&self) -> Option<&'static str> {
        self.codec.chat_stop()
    }

    /// How long [`Engine::load`] took.
    pub fn load_ms(&self) -> u64 {
        self.load_ms
    }

    pub fn model(&self) -> &GptJ {
        &self.model
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        self.codec.tokenizer()
    }

    /// Generates a continuation of `prompt`.
    pub fn generate(&self, prompt: &str, plan: &GenerationPlan) -> Result<Generation, EngineError> {
        let mut out = self.generate_batch(&[prompt], plan)?;
        out.generations
            .pop()
            .ok_or_else(|| EngineError::Generation("no result".into()))
    }

    /// Generates for several prompts at once, as one running batch; each gets the text it would get alone.
    pub fn generate_batch(
        &self,
        prompts: &[&str],
        plan: &GenerationPlan,
    ) -> Result<BatchGeneration, EngineError> {
        let start = Instant::now();
        let ids = prompts
            .iter()
            .map(|p| self.prompt_tokens(p, plan))
            .collect::<Result<Vec<_>, _>>()?;
        let prompt_lens: Vec<usize> = ids.iter().map(Vec::len).collect();
        let tokenize = start.elapsed();

        let eos = self.model.info().eos_token_id;
        let out = decoding::generate(&self.model, &ids, plan, eos, self.tokenizer())?;

        let decode_start = Instant::now();
        let stop = StopChecker::new(&plan.stop);
        let generations = out
            .results
            .into_iter()
            .zip(prompt_lens)
            .map(|(d, prompt_tokens)| Generation {
                text: self.text(&d, &stop),
                token_ids: d.tokens.iter().map(|&t| t as u32).collect(),
                finish_reason: d.finish_reason,
                prompt_tokens,
                prefill_ms: 0,
                decode_ms: 0,
                logprobs: d.logprobs.clone(),
                prompt_logprobs: None,
            })
            .collect::<Vec<_>>();
        let prefill_ms = tokenize.as_millis() as u64 + out.prefill_ms;
        let decode_ms = out.decode_ms + decode_start.elapsed().as_millis() as u64;
        Ok(BatchGeneration {
            generations: generations
                .into_iter()
                .map(|g| Generation {
                    prefill_ms,
                    decode_ms,
                    ..g
                })
                .collect(),
            step_ms: out.step_ms,
        })
    }

    /// A result's text for the client (see [`PromptCodec::final_text`]).
    pub fn text(&self, decoded: &decoding::Decoded, stop: &StopChecker) -> String {
        self.codec
            .final_text(&decoded.tokens, decoded.finish_reason, stop)
    }

    /// See [`PromptCodec::prompt_tokens`].
    pub fn prompt_tokens(&self, prompt: &str, plan: &GenerationPlan) -> Result<Vec<i64>, EngineError> {
        self.codec.prompt_tokens(prompt, plan)
    }

    /// A continuous-batching scheduler over this engine's model.
    pub fn scheduler(&self, limits: decoding::Limits) -> decoding::Scheduler<'_> {
        decoding::Scheduler::new(&self.model, self.tokenizer(), limits)
    }

    /// The running batch's bounds: those given, and for those not given what the memory left beside the
    /// weights affords on every device that holds layers (the policy: [`sizing::batch_limits`]).
    pub fn batch_limits(
        &self,
        max_batch_size: Option<usize>,
        max_batch_tokens: Option<usize>,
    ) -> BatchLimits {
        let cfg = self.model.config();
        let elt = self.model.dtype().kind().elt_size_in_bytes() as u64;
        let mut devices: Vec<(tch::Device, usize)> = Vec::new();
        for d in &self.model.device_map().layers {
            match devices.iter_mut().find(|(dd, _)| dd == d) {
                Some((_, n)) => *n += 1,
                None => devices.push((*d, 1)),
            }
        }
        let memory = sizing::Memory {
            devices: devices
                .into_iter()
                .map(|(device, layers)| {
                    let free_bytes = crate::device_map::free_bytes(device);
                    if free_bytes.is_none() {
                        tracing::warn!(?device, "free memory unknown; budgeting 16 contexts of KV cache");
                    }
                    sizing::LayerDevice {
                        gpu: device.is_cuda(),
                        free_bytes,
                        layers,
                    }
                })
                .collect(),
            kv_bytes_per_layer_position: 2 * cfg.n_embd as u64 * elt,
            n_positions: cfg.n_positions,
        };
        sizing::batch_limits(&memory, max_batch_size, max_batch_tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engine_can_move_to_its_own_thread_and_its_text_side_is_shared_with_any() {
        fn send<T: Send>() {}
        fn shared<T: Send + Sync + 'static>() {}
        send::<Engine>();
        shared::<PromptCodec>();
    }

    fn codec(n_positions: usize) -> PromptCodec {
        PromptCodec::for_tests(n_positions)
    }

    fn plan(max_new_tokens: u32) -> GenerationPlan {
        shared::GenerationParameters {
            max_new_tokens: Some(max_new_tokens),
            ..Default::default()
        }
        .validate()
        .unwrap()
    }

    #[test]
    fn a_prompt_becomes_its_ids_an_empty_one_starts_from_bos_and_it_must_fit_the_context() {
        let codec = codec(8);
        assert_eq!(
            codec.prompt_tokens("Hello world", &plan(2)).unwrap(),
            [15496, 995]
        );
        assert_eq!(codec.prompt_tokens("", &plan(2)).unwrap(), [50256]);
        let err = codec.prompt_tokens("Hello world", &plan(7)).unwrap_err();
        assert!(matches!(
            err,
            EngineError::ContextOverflow {
                prompt_tokens: 2,
                max_new_tokens: 7,
                n_positions: 8
            }
        ));
    }

    #[test]
    fn the_final_text_ends_before_the_stop_sequence_that_ended_the_generation() {
        let codec = codec(64);
        let ids: Vec<i64> = codec.prompt_tokens(" one, two. three", &plan(1)).unwrap();
        let stop = StopChecker::new(&[".".to_string()]);
        let stopped = codec.final_text(&ids[..4], FinishReason::Stop, &stop);
        assert_eq!(stopped, " one, two");
        assert_eq!(
            codec.final_text(&ids, FinishReason::Length, &stop),
            " one, two. three"
        );
    }
}
