//! `worker`: thin command-line face over the library. Each subcommand lives in its own module.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "worker", version, about = "GPT-J inference worker")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text for one prompt and print it (or one JSON object with --json).
    Generate(worker::cli::GenerateArgs),
    /// Write a small random GPT-J checkpoint (sharded safetensors + tokenizer) for tests and demos.
    InitTinyModel(worker::tiny::InitTinyModelArgs),
    /// Consume jobs from RabbitMQ and reply on each job's reply_to queue.
    Serve(worker::service::ServeArgs),
    /// Show the devices this binary can use (CUDA availability, device count, CPU threads).
    Info(worker::diagnostics::InfoArgs),
    /// Write the last position's logits for a prompt as .npy (parity checks against other implementations).
    Score(worker::diagnostics::ScoreArgs),
}

fn main() -> ExitCode {
    worker::logging::init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => worker::cli::run_generate(args),
        Command::InitTinyModel(args) => worker::tiny::run_init(args),
        Command::Serve(args) => worker::service::run_serve(args),
        Command::Info(args) => worker::diagnostics::run_info(args),
        Command::Score(args) => worker::diagnostics::run_score(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
