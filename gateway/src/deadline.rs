//! Deadlines: a request's `timeout_s` (body) or `X-Request-Timeout` (header, seconds) becomes the job's
//! `deadline_ms`, and a job whose estimated start is already past it is refused at submission instead of
//! queued to fail later.
//!
//! The estimate is the one `Retry-After` uses ([`crate::drain`]): the jobs ahead of the new one in its lane
//! (an interactive job waits behind the interactive queue, a batch job behind both), at the rate the
//! workers have been taking jobs. Without a measured rate there is no estimate, and nothing is refused on a
//! guess; a rate of zero (nothing left the queue lately) with jobs ahead is no start in sight. The workers
//! check the deadline again when they take the job (`deadline_exceeded`): this check only spares a client
//! the wait for a failure it can know now.

use std::time::Duration;

use axum::http::HeaderMap;
use shared::Lane;

use crate::error::ApiError;

/// The header a client may give its timeout in, in seconds (a number, fractions allowed).
pub const TIMEOUT_HEADER: &str = "x-request-timeout";
/// The longest timeout taken: a job's record outlives it by far, and a longer wait is no deadline.
pub const MAX_TIMEOUT_S: f64 = 7.0 * 24.0 * 3600.0;

/// The request's timeout in seconds: the body's `timeout_s`, the header's, or the shorter of the two.
pub fn timeout(body: Option<f64>, headers: &HeaderMap) -> Result<Option<f64>, ApiError> {
    let header = match headers.get(TIMEOUT_HEADER) {
        Some(value) => {
            let text = value
                .to_str()
                .map_err(|_| invalid("X-Request-Timeout", "must be a number"))?;
            let seconds = text
                .trim()
                .parse::<f64>()
                .map_err(|_| invalid("X-Request-Timeout", "must be a number of seconds"))?;
            Some(check("X-Request-Timeout", seconds)?)
        }
        None => None,
    };
    let body = body.map(|s| check("timeout_s", s)).transpose()?;
    Ok(match (body, header) {
        (Some(b), Some(h)) => Some(b.min(h)),
        (b, h) => b.or(h),
    })
}

fn check(field: &str, seconds: f64) -> Result<f64, ApiError> {
    if seconds.is_finite() && seconds > 0.0 && seconds <= MAX_TIMEOUT_S {
        Ok(seconds)
    } else {
        Err(invalid(
            field,
            &format!("must be a number of seconds in (0, {MAX_TIMEOUT_S}], got {seconds}"),
        ))
    }
}

fn invalid(field: &str, message: &str) -> ApiError {
    ApiError::InvalidField {
        field: field.to_owned(),
        message: message.to_owned(),
    }
}

/// The deadline of a job submitted at `now_ms` with `timeout_s`.
pub fn deadline_ms(now_ms: u64, timeout_s: f64) -> u64 {
    now_ms + (timeout_s * 1000.0).ceil() as u64
}

/// Jobs waiting ahead of a new job of `lane`: its own lane's, and every higher lane's.
pub fn ahead(lane: Lane, interactive_depth: u32, batch_depth: u32) -> u64 {
    match lane {
        Lane::Interactive => u64::from(interactive_depth),
        Lane::Batch => u64::from(interactive_depth) + u64::from(batch_depth),
    }
}

/// When a new job with `ahead` jobs before it may start, from the workers' recent rate (jobs a second):
/// `Some(ZERO)` with nothing ahead, `None` without a measured rate (no estimate), `Some(MAX)` when nothing
/// drains.
pub fn estimated_start(ahead: u64, rate: Option<f64>) -> Option<Duration> {
    if ahead == 0 {
        return Some(Duration::ZERO);
    }
    match rate {
        None => None,
        Some(r) if r > 0.0 => Some(Duration::from_secs_f64(ahead as f64 / r)),
        Some(_) => Some(Duration::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(timeout: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(t) = timeout {
            h.insert(TIMEOUT_HEADER, HeaderValue::from_str(t).unwrap());
        }
        h
    }

    #[test]
    fn the_shorter_of_the_body_and_the_header_wins() {
        assert_eq!(timeout(None, &headers(None)).unwrap(), None);
        assert_eq!(timeout(Some(30.0), &headers(None)).unwrap(), Some(30.0));
        assert_eq!(timeout(None, &headers(Some(" 2.5 "))).unwrap(), Some(2.5));
        assert_eq!(timeout(Some(30.0), &headers(Some("10"))).unwrap(), Some(10.0));
        assert_eq!(timeout(Some(3.0), &headers(Some("10"))).unwrap(), Some(3.0));
    }

    #[test]
    fn a_timeout_that_is_not_a_positive_number_is_refused_naming_where_it_came_from() {
        for (body, header, field) in [
            (Some(0.0), None, "timeout_s"),
            (Some(-1.0), None, "timeout_s"),
            (Some(1e9), None, "timeout_s"),
            (None, Some("soon"), "X-Request-Timeout"),
            (None, Some("0"), "X-Request-Timeout"),
        ] {
            let e = timeout(body, &headers(header)).unwrap_err();
            assert!(
                matches!(&e, ApiError::InvalidField { field: f, .. } if f == field),
                "{e:?}"
            );
        }
    }

    #[test]
    fn a_batch_job_waits_behind_both_lanes_and_an_interactive_one_behind_its_own() {
        assert_eq!(ahead(Lane::Interactive, 3, 100), 3);
        assert_eq!(ahead(Lane::Batch, 3, 100), 103);
    }

    #[test]
    fn the_start_is_estimated_from_the_drain_rate_and_never_guessed() {
        assert_eq!(estimated_start(0, None), Some(Duration::ZERO));
        assert_eq!(estimated_start(10, Some(5.0)), Some(Duration::from_secs(2)));
        assert_eq!(estimated_start(10, None), None, "no rate measured: no estimate");
        assert_eq!(
            estimated_start(10, Some(0.0)),
            Some(Duration::MAX),
            "nothing drains"
        );
        assert_eq!(deadline_ms(1_000, 1.5), 2_500);
    }
}
