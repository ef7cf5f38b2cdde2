//! A batch file's lines, in and out: reading an input file a line at a time from any byte offset, what
//! one input line asks for (as the jobs the synchronous route would make of it), the ids its jobs get, and
//! the output and error lines in OpenAI's format.
//!
//! Why apart from the driver ([`crate::batch_driver`]): this is the format, the driver the process. A job's
//! id and `Idempotency-Key` derive from the batch's id, the line and the choice, so a driver that submits a
//! line again (after a crash between submitting it and recording that it did) names the same jobs, and the
//! admission answers the first ones back instead of queueing new ones.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shared::{JobId, PromptRules};
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

use crate::error::{ApiError, parse_value};
use crate::openai::{self, ChatCompletionRequest, CompletionRequest};
use crate::openai_jobs::Plan;

/// The two endpoints a batch may target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub enum Endpoint {
    #[serde(rename = "/v1/completions")]
    Completions,
    #[serde(rename = "/v1/chat/completions")]
    ChatCompletions,
}

impl Endpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Completions => "/v1/completions",
            Endpoint::ChatCompletions => "/v1/chat/completions",
        }
    }

    /// The jobs `body` makes at this endpoint, as the synchronous route makes them; a streamed request is
    /// refused (a batch's answers are lines of a file).
    pub fn plan(self, served_model: &str, body: serde_json::Value) -> Result<Plan, ApiError> {
        let (plan, stream) = match self {
            Endpoint::Completions => {
                let req: CompletionRequest = parse_value(body)?;
                (Plan::completion(served_model, &req)?, req.stream())
            }
            Endpoint::ChatCompletions => {
                let req: ChatCompletionRequest = parse_value(body)?;
                (Plan::chat(served_model, &req)?, req.stream())
            }
        };
        if stream {
            return Err(ApiError::InvalidField {
                field: "stream".into(),
                message: "a batch's requests are answered in its output file, not streamed".into(),
            });
        }
        Ok(plan)
    }
}

/// One line of an input file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputLine {
    pub custom_id: String,
    pub method: String,
    pub url: String,
    pub body: serde_json::Value,
}

/// A line that cannot be run, named by its number (from 1), as OpenAI lists them in a batch's `errors`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LineError {
    /// A code: `invalid_json`, `invalid_request`, `invalid_url`, `invalid_method`, `duplicate_custom_id`,
    /// `empty_file`, `too_many_requests`, `line_too_long`, `invalid_file`.
    pub code: String,
    pub message: String,
    /// The field to blame, when one is.
    pub param: Option<String>,
    /// The line (from 1), when one is to blame.
    pub line: Option<u64>,
}

impl LineError {
    pub fn new(code: &str, message: impl Into<String>, param: Option<String>, line: Option<u64>) -> Self {
        Self {
            code: code.to_owned(),
            message: message.into(),
            param,
            line,
        }
    }
}

/// Parses line `number`'s text as a request to `endpoint` and its jobs, each checked against the job
/// contract as admission will check it.
pub fn parse_line(
    text: &str,
    number: u64,
    endpoint: Endpoint,
    served_model: &str,
    rules: &PromptRules,
) -> Result<(InputLine, Plan), LineError> {
    let line: InputLine = serde_json::from_str(text).map_err(|e| {
        LineError::new(
            "invalid_json",
            format!("line {number} is not a request object ({{custom_id, method, url, body}}): {e}"),
            None,
            Some(number),
        )
    })?;
    if line.method != "POST" {
        return Err(LineError::new(
            "invalid_method",
            format!("line {number}: method must be POST, got {:?}", line.method),
            Some("method".into()),
            Some(number),
        ));
    }
    if line.url != endpoint.as_str() {
        return Err(LineError::new(
            "invalid_url",
            format!(
                "line {number}: url must be the batch's endpoint {}, got {:?}",
                endpoint.as_str(),
                line.url
            ),
            Some("url".into()),
            Some(number),
        ));
    }
    let invalid = |e: ApiError| {
        let param = e
            .param()
            .map(|p| openai::param_name(p.strip_prefix("parameters.").unwrap_or(&p)).to_owned());
        LineError::new(
            "invalid_request",
            format!("line {number}: {}", openai::in_openai_terms(&e.to_string())),
            param.map(|p| format!("body.{p}")),
            Some(number),
        )
    };
    let plan = endpoint.plan(served_model, line.body.clone()).map_err(invalid)?;
    for job in &plan.jobs {
        job.clone()
            .into_valid(rules)
            .map_err(|e| invalid(ApiError::InvalidJob(e)))?;
    }
    Ok((line, plan))
}

/// One line as read: its index (from 0, blank lines counted), its text without the line break, and the byte
/// offset just past it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawLine {
    pub index: u64,
    pub text: String,
    pub end: u64,
}

impl RawLine {
    /// Its number as a person counts lines (from 1).
    pub fn number(&self) -> u64 {
        self.index + 1
    }
}

/// Reads a file's lines from a byte offset on, one at a time, each at most `max_line` bytes, so a file
/// of any size is never held whole.
pub struct LineReader<R> {
    reader: R,
    index: u64,
    offset: u64,
    max_line: usize,
}

/// Why a line could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("line {number} is longer than {max} bytes")]
    TooLong { number: u64, max: usize },
    #[error("line {number} is not UTF-8")]
    NotUtf8 { number: u64 },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl<R: AsyncBufRead + Unpin> LineReader<R> {
    /// A reader positioned at line `index`, which starts at byte `offset`.
    pub fn new(reader: R, index: u64, offset: u64, max_line: usize) -> Self {
        Self {
            reader,
            index,
            offset,
            max_line,
        }
    }

    /// The next line that is not blank, or `None` at the end of the file.
    pub async fn next(&mut self) -> Result<Option<RawLine>, ReadError> {
        loop {
            let mut bytes = Vec::new();
            let number = self.index + 1;
            loop {
                let available = self.reader.fill_buf().await?;
                if available.is_empty() {
                    break;
                }
                let (take, done) = match available.iter().position(|&b| b == b'\n') {
                    Some(i) => (i + 1, true),
                    None => (available.len(), false),
                };
                if bytes.len() + take > self.max_line + 2 {
                    return Err(ReadError::TooLong {
                        number,
                        max: self.max_line,
                    });
                }
                bytes.extend_from_slice(&available[..take]);
                self.reader.consume(take);
                if done {
                    break;
                }
            }
            if bytes.is_empty() {
                return Ok(None);
            }
            let index = self.index;
            self.index += 1;
            self.offset += bytes.len() as u64;
            while matches!(bytes.last(), Some(b'\n' | b'\r')) {
                bytes.pop();
            }
            if bytes.len() > self.max_line {
                return Err(ReadError::TooLong {
                    number,
                    max: self.max_line,
                });
            }
            let text = String::from_utf8(bytes).map_err(|_| ReadError::NotUtf8 { number })?;
            if text.trim().is_empty() {
                continue;
            }
            return Ok(Some(RawLine {
                index,
                text,
                end: self.offset,
            }));
        }
    }
}

/// The id of the job for choice `choice` of line `line` of batch `batch`: the same every time it is asked.
pub fn job_id(batch: &str, line: u64, choice: usize) -> JobId {
    let digest = Sha256::digest(format!("{batch}/{line}/{choice}").as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    JobId(uuid::Builder::from_random_bytes(bytes).into_uuid())
}

/// The `Idempotency-Key` that job is submitted under.
pub fn idempotency_key(batch: &str, line: u64, choice: usize) -> String {
    format!("{batch}/{line}/{choice}")
}

/// One line of a batch's output or error file, as OpenAI writes them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputLine {
    /// `batch_req_…`.
    pub id: String,
    pub custom_id: String,
    /// What the endpoint answered (its error too, with its status), when the request ran or was refused.
    pub response: Option<LineResponse>,
    /// Why the request never ran (`batch_expired`, `batch_cancelled`), when it did not.
    pub error: Option<LineFailure>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LineResponse {
    pub status_code: u16,
    pub request_id: String,
    pub body: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LineFailure {
    pub code: String,
    pub message: String,
}

impl OutputLine {
    /// The line for an answered (or refused) request: `status` and `body` as the endpoint answered.
    pub fn answered(batch: &str, line: u64, custom_id: String, status: u16, body: serde_json::Value) -> Self {
        let request = job_id(batch, line, 0);
        Self {
            id: format!("batch_req_{}", request.0.simple()),
            custom_id,
            response: Some(LineResponse {
                status_code: status,
                request_id: request.to_string(),
                body,
            }),
            error: None,
        }
    }

    /// The line for a request that never ran.
    pub fn never_ran(batch: &str, line: u64, custom_id: String, code: &str, message: &str) -> Self {
        Self {
            id: format!("batch_req_{}", job_id(batch, line, 0).0.simple()),
            custom_id,
            response: None,
            error: Some(LineFailure {
                code: code.to_owned(),
                message: message.to_owned(),
            }),
        }
    }
}

/// An error as the endpoint would have answered it: its status and OpenAI's body.
pub fn error_response(e: &ApiError) -> (u16, serde_json::Value) {
    let (status, code) = e.status_and_code();
    let status = openai::status(status);
    let param = e
        .param()
        .map(|p| openai::param_name(p.strip_prefix("parameters.").unwrap_or(&p)).to_owned());
    let body = openai::error_body(
        status,
        code,
        &openai::in_openai_terms(&e.to_string()),
        param.as_deref(),
    );
    (
        status.as_u16(),
        serde_json::to_value(body).unwrap_or(serde_json::Value::Null),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines(text: &str, max: usize) -> Vec<Result<RawLine, String>> {
        let mut reader = LineReader::new(text.as_bytes(), 0, 0, max);
        let mut out = Vec::new();
        loop {
            match reader.next().await {
                Ok(Some(line)) => out.push(Ok(line)),
                Ok(None) => return out,
                Err(e) => {
                    out.push(Err(e.to_string()));
                    return out;
                }
            }
        }
    }

    #[tokio::test]
    async fn lines_are_read_one_by_one_skipping_blank_ones_with_their_offsets() {
        let got = lines("a\n\r\nbc\r\nd", 10).await;
        let want = [(0, "a", 2), (2, "bc", 8), (3, "d", 9)];
        assert_eq!(got.len(), want.len());
        for (got, (index, text, end)) in got.iter().zip(want) {
            let got = got.as_ref().unwrap();
            assert_eq!((got.index, got.text.as_str(), got.end), (index, text, end));
        }
    }

    #[tokio::test]
    async fn a_reader_started_at_an_offset_goes_on_from_that_line() {
        let text = "one\ntwo\nthree\n";
        let mut reader = LineReader::new(&text.as_bytes()[4..], 1, 4, 10);
        let line = reader.next().await.unwrap().unwrap();
        assert_eq!((line.index, line.text.as_str(), line.end), (1, "two", 8));
    }

    #[tokio::test]
    async fn a_line_over_the_bound_is_named() {
        let got = lines("ok\n0123456789A\n", 10).await;
        assert_eq!(got[1], Err("line 2 is longer than 10 bytes".to_owned()));
    }

    #[test]
    fn a_lines_jobs_have_the_same_ids_every_time_and_differ_between_lines_and_choices() {
        assert_eq!(job_id("batch_a", 3, 0), job_id("batch_a", 3, 0));
        assert_ne!(job_id("batch_a", 3, 0), job_id("batch_a", 3, 1));
        assert_ne!(job_id("batch_a", 3, 0), job_id("batch_a", 4, 0));
        assert_ne!(job_id("batch_a", 3, 0), job_id("batch_b", 3, 0));
    }

    #[test]
    fn a_line_is_refused_naming_its_number_and_what_is_wrong() {
        let rules = PromptRules::default();
        let check = |text: &str| {
            parse_line(text, 7, Endpoint::ChatCompletions, "m", &rules)
                .map(|(line, plan)| (line.custom_id, plan.jobs.len()))
                .map_err(|e| (e.code, e.line, e.param))
        };
        let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"n":2}"#;
        let ok = format!(r#"{{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{body}}}"#);
        assert_eq!(check(&ok), Ok(("a".into(), 2)));
        assert_eq!(check("{"), Err(("invalid_json".into(), Some(7), None)));
        let get = ok.replace("POST", "GET");
        assert_eq!(
            check(&get),
            Err(("invalid_method".into(), Some(7), Some("method".into())))
        );
        let url = ok.replace("/v1/chat/completions", "/v1/completions");
        assert_eq!(
            check(&url),
            Err(("invalid_url".into(), Some(7), Some("url".into())))
        );
        let temperature = ok.replace(r#""n":2"#, r#""temperature":-1"#);
        assert_eq!(
            check(&temperature).map_err(|e| (e.0, e.2)),
            Err(("invalid_request".into(), Some("body.temperature".into())))
        );
        let streamed = ok.replace(r#""n":2"#, r#""stream":true"#);
        assert_eq!(
            check(&streamed).map_err(|e| (e.0, e.2)),
            Err(("invalid_request".into(), Some("body.stream".into())))
        );
    }
}
