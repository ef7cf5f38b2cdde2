//! The GPT-J worker: an inference engine (model, checkpoint loading, device placement, decoding) and the
//! queue service that feeds it jobs from RabbitMQ.

pub mod checkpoint;
pub mod cli;
pub mod decoding;
pub mod device_map;
pub mod diagnostics;
pub mod engine;
pub mod lm;
pub mod logging;
pub mod model;
pub mod service;
pub mod tiny;
pub mod tokenizer;
