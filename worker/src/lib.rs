//! The GPT-J worker: an inference engine (model, checkpoint loading, device placement, decoding) and the
//! queue service that feeds it jobs from RabbitMQ.

pub mod lm;
pub mod cli;
pub mod diagnostics;
pub mod logging;
pub mod service;
pub mod tiny;
