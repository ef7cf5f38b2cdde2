//! `GET /`: the playground, one self-contained page (HTML, CSS and script inline, in the binary) for people
//! who would rather watch a job than curl it: a prompt and its strategy's parameters, the text streaming in
//! (the job's event stream, read with `fetch` so an API key can go along), the place in line while queued,
//! a cancel button, the live queue, and this browser's recent jobs.
//!
//! Its content security policy allows nothing from another host, so the page works offline and cannot be
//! made to load what it does not carry.

use axum::http::header;
use axum::response::IntoResponse;

const PAGE: &str = include_str!("../playground.html");

/// Everything from this origin, inline scripts and styles (the page is one file), nothing else.
const CSP: &str = "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; \
                   img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; \
                   form-action 'self'";

pub async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_page_references_no_other_host() {
        for needle in ["http://", "https://", "//cdn", "src=\"//"] {
            assert!(
                !super::PAGE.contains(needle),
                "the playground references {needle}"
            );
        }
        assert!(super::CSP.contains("default-src 'self'"));
    }
}
