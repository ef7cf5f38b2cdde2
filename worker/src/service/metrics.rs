//! The worker's Prometheus metrics: the names in one place, what the engine thread records after each
//! step and each job, and the exporter served on `--metrics-listen`.
//!
//! Names follow vLLM's `vllm:*` and TGI's `tgi_batch_*` in meaning (docs/deployment.md maps them), under
//! the `worker_` prefix the gateway's `gateway_` mirrors. Without `--metrics-listen` no recorder is
//! installed and every call here is a no-op.

use std::net::SocketAddr;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

use super::job::Completion;
use crate::decoding::{Stats, StepProfile};

/// Sequences in the running batch (vLLM `num_requests_running`, TGI `tgi_batch_current_size`).
pub const RUNNING: &str = "worker_num_requests_running";
/// Sequences waiting for a place in the batch (vLLM `num_requests_waiting`, TGI `tgi_queue_size`).
pub const WAITING: &str = "worker_num_requests_waiting";
/// Sequences in the batch at each step (TGI `tgi_batch_next_size`).
pub const BATCH_SIZE: &str = "worker_batch_size";
/// KV-cache positions holding keys, allocated, and the budget (`--max-batch-tokens`; TGI
/// `tgi_batch_current_max_tokens`, vLLM `kv_cache_usage_perc` as used / budget).
pub const KV_USED: &str = "worker_kv_cache_positions_used";
pub const KV_ALLOCATED: &str = "worker_kv_cache_positions_allocated";
pub const KV_BUDGET: &str = "worker_kv_cache_positions_budget";
/// Wall time of one scheduler step: admission, prefills and the decode pass (TGI
/// `tgi_batch_forward_duration`).
pub const STEP_DURATION: &str = "worker_step_duration_seconds";
/// Where a step's time went, labelled `phase`: `prefill` (admitting newcomers), `select` (choosing every
/// sequence's next token), `forward` (the decode pass), `maintenance` (closing the holes leavers made); the
/// scheduler's own split (`StepProfile`), host time: on a GPU a phase that reads a result back also waits
/// for the kernels queued before it.
pub const STEP_PHASE: &str = "worker_step_phase_seconds";
/// Arrival at the engine to the first token (vLLM `time_to_first_token_seconds`).
pub const TIME_TO_FIRST_TOKEN: &str = "worker_time_to_first_token_seconds";
/// Mean time between a job's tokens after the first (vLLM `inter_token_latency_seconds`).
pub const INTER_TOKEN: &str = "worker_inter_token_latency_seconds";
/// Tokens generated (vLLM `generation_tokens_total`) and prompt tokens prefilled (`prompt_tokens_total`).
pub const GENERATION_TOKENS: &str = "worker_generation_tokens_total";
pub const PROMPT_TOKENS: &str = "worker_prompt_tokens_total";
/// Jobs finished, labelled `finish_reason` (`length`, `eos`, `stop`, `cancelled`, and `deadline_exceeded`
/// for a job whose deadline passed before it could start: it never ran).
pub const JOBS_FINISHED: &str = "worker_jobs_finished_total";
/// Jobs the engine failed (`generation_failed`: the engine or the device, not the input), and how many of
/// them in a row since the last success: `--max-engine-failures` in a row make the worker give up.
pub const ENGINE_FAILURES: &str = "worker_engine_failures_total";
pub const ENGINE_FAILURES_IN_A_ROW: &str = "worker_engine_consecutive_failures";
/// Times the worker gave up on its engine, labelled `reason` (`step_timeout`, `engine_failures`); the
/// worker exits right after, so the series is mostly seen as the reason in its last scrape.
pub const ENGINE_UNHEALTHY: &str = "worker_engine_unhealthy_total";
/// 1 while the broker blocks the worker's publishing connection (a memory or disk alarm): replies wait.
pub const PUBLISH_BLOCKED: &str = "worker_amqp_publish_blocked";
/// Replies whose confirm did not come within `--publish-timeout-ms`.
pub const PUBLISH_TIMEOUTS: &str = "worker_reply_publish_timeouts_total";

/// Serves `/metrics` on `listen` (installs the process's recorder; needs a Tokio runtime).
pub fn install(listen: SocketAddr) -> Result<(), String> {
    let buckets = [
        0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0,
    ];
    PrometheusBuilder::new()
        .with_http_listener(listen)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(BATCH_SIZE.into()),
                &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0],
            )
        })
        .and_then(|b| b.install())
        .map_err(|e| format!("cannot serve metrics on {listen}: {e}"))
}

/// After each step, with the batch's split of it when it gives one.
pub fn step(stats: &Stats, took: Duration, profile: Option<StepProfile>) {
    gauge!(RUNNING).set(stats.running as f64);
    gauge!(WAITING).set(stats.waiting as f64);
    gauge!(KV_USED).set(stats.kv_used as f64);
    gauge!(KV_ALLOCATED).set(stats.kv_allocated as f64);
    if stats.max_batch_tokens != usize::MAX {
        gauge!(KV_BUDGET).set(stats.max_batch_tokens as f64);
    }
    if stats.running > 0 {
        histogram!(BATCH_SIZE).record(stats.running as f64);
    }
    histogram!(STEP_DURATION).record(took.as_secs_f64());
    if let Some(p) = profile {
        for (phase, d) in [
            ("prefill", p.prefill),
            ("select", p.select),
            ("forward", p.forward),
            ("maintenance", p.maintenance),
        ] {
            histogram!(STEP_PHASE, "phase" => phase).record(d.as_secs_f64());
        }
    }
}

/// Tokens as they are generated, so the counter's rate is the worker's token rate.
pub fn tokens(n: usize) {
    counter!(GENERATION_TOKENS).increment(n as u64);
}

/// A job cancelled out of the batch.
pub fn job_cancelled() {
    counter!(JOBS_FINISHED, "finish_reason" => "cancelled").increment(1);
}

/// A job not run: its deadline passed before it could start.
pub fn deadline_exceeded() {
    counter!(JOBS_FINISHED, "finish_reason" => "deadline_exceeded").increment(1);
}

/// After each successful job.
pub fn job_finished(c: &Completion) {
    histogram!(TIME_TO_FIRST_TOKEN).record(c.time_to_first_token_ms as f64 / 1e3);
    let g = &c.generation;
    if g.token_ids.len() > 1 {
        let per_token = g.decode_ms as f64 / 1e3 / (g.token_ids.len() - 1) as f64;
        histogram!(INTER_TOKEN).record(per_token);
    }
    counter!(PROMPT_TOKENS).increment(g.prompt_tokens as u64);
    let reason = match g.finish_reason {
        shared::FinishReason::Length => "length",
        shared::FinishReason::Eos => "eos",
        shared::FinishReason::Stop => "stop",
    };
    counter!(JOBS_FINISHED, "finish_reason" => reason).increment(1);
}

/// A job failed by the engine, `in_a_row` since the last success.
pub fn engine_failure(in_a_row: u32) {
    counter!(ENGINE_FAILURES).increment(1);
    engine_failures_in_a_row(in_a_row);
}

pub fn engine_failures_in_a_row(n: u32) {
    gauge!(ENGINE_FAILURES_IN_A_ROW).set(f64::from(n));
}

/// The worker gave up on its engine.
pub fn engine_unhealthy(reason: &'static str) {
    counter!(ENGINE_UNHEALTHY, "reason" => reason).increment(1);
}

/// The broker blocked (`true`) or unblocked the publishing connection.
pub fn publish_blocked(blocked: bool) {
    gauge!(PUBLISH_BLOCKED).set(if blocked { 1.0 } else { 0.0 });
}

/// A reply's confirm did not come in time.
pub fn publish_timeout() {
    counter!(PUBLISH_TIMEOUTS).increment(1);
}
