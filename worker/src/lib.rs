//! The GPT-J worker: an inference engine (model, checkpoint loading, device placement, decoding) and the
//! queue service that feeds it jobs from RabbitMQ.
//!
//! Dependencies point one way. At the bottom, what a GPT-J is and how loading one fails (`config`,
//! `weights`, `load_error`) and the language-model interface (`lm`); above them the checkpoint reader
//! (`checkpoint`), the placement planner (`device_map`) and decoding (`decoding`, which knows only `lm`);
//! then the model (`model`), the engine (`engine`, whose defaults for dtype and batch come from
//! `sizing`, a policy of plain numbers), and at the top the commands (`cli`, `diagnostics`, `tiny`) and the
//! queue service (`service`).

pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod decoding;
pub mod device_map;
pub mod diagnostics;
pub mod engine;
pub mod grammars;
pub mod lm;
pub mod load_error;
pub mod logging;
pub mod model;
pub mod service;
pub mod sizing;
pub mod tiny;
pub mod tokenizer;
pub mod weights;
