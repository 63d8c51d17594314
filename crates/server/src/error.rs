//! Errors as OpenAI-style JSON bodies with the right status.
//!
//! `{"error": {"message", "type", "param", "code"}}`. Every engine error maps
//! to one status; a 5xx body says only that something failed inside (the
//! details go to the log), so internals never reach a client.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// An error on its way to a client.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable message.
    pub message: String,
    /// OpenAI's `type`.
    pub kind: &'static str,
    /// The offending parameter, if one.
    pub param: Option<&'static str>,
    /// OpenAI's `code`.
    pub code: Option<&'static str>,
    /// Seconds for `Retry-After`, if retrying later may help.
    pub retry_after: Option<Duration>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    /// An error of this status, OpenAI type and message.
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), kind, param: None, code: None, retry_after: None }
    }

    /// 400 for a bad parameter.
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self { param: Some(param), ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message) }
    }

    /// 400 for malformed JSON or a body of the wrong shape.
    pub fn bad_json(detail: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", format!("the request body is not valid: {detail}"))
    }

    /// 400 for a model this server does not serve.
    pub fn model_not_found(asked: &str, served: &[String]) -> Self {
        let asked: String = asked.chars().take(100).collect();
        let served = served.join("\", \"");
        Self {
            param: Some("model"),
            code: Some("model_not_found"),
            ..Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!("the model {asked:?} does not exist; this server serves \"{served}\""),
            )
        }
    }

    /// 401 for a missing or unknown API key.
    pub fn unauthorized() -> Self {
        Self {
            code: Some("invalid_api_key"),
            ..Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", "missing or invalid API key")
        }
    }

    /// 404.
    pub fn not_found(what: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found_error", what)
    }

    /// 413.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the request body is larger than {limit} bytes"),
        )
    }

    /// 415: a JSON endpoint got a body that does not say it is JSON.
    pub fn unsupported_media_type() -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            "the request body must be JSON, sent with Content-Type: application/json",
        )
    }

    /// 408: the body did not arrive in time.
    pub fn body_timeout() -> Self {
        Self::new(StatusCode::REQUEST_TIMEOUT, "invalid_request_error", "the request body did not arrive in time")
    }

    /// 405.
    pub fn method_not_allowed() -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error", "this method is not allowed on this path")
    }

    /// 500 that says nothing about the cause (which is logged).
    pub fn internal() -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "the server failed to process the request")
    }

    /// The JSON body alone (also sent as a stream's last event).
    pub fn body_json(&self) -> String {
        let body =
            Body { error: Inner { message: &self.message, kind: self.kind, param: self.param, code: self.code } };
        serde_json::to_string(&body).unwrap_or_else(|_| String::from("{\"error\":{\"message\":\"error\"}}"))
    }
}

impl From<engine::Error> for ApiError {
    fn from(e: engine::Error) -> Self {
        use engine::Error as E;
        let message = e.to_string();
        match e {
            E::InvalidRequest { field, .. } => Self::invalid(field, message),
            E::ContextExceeded { prompt, limit, .. } => Self {
                code: Some("context_length_exceeded"),
                // The prompt alone too long: shortening max_tokens will not help.
                ..Self::invalid(if prompt >= limit { "messages" } else { "max_tokens" }, message)
            },
            E::PromptTooLong { .. } => {
                Self { code: Some("context_length_exceeded"), ..Self::invalid("messages", message) }
            }
            E::InvalidId { what, .. } => Self::invalid(if what == "agent" { "agent_id" } else { "tenant" }, message),
            E::Prompt(_) => Self::invalid("messages", message),
            E::UnknownAgent(_) => Self::not_found(message),
            E::Overloaded { .. } => Self {
                retry_after: Some(Duration::from_secs(1)),
                code: Some("overloaded"),
                ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
            },
            // The engine says this only when the request cannot fit the
            // quota even alone: retrying (as clients do on 429) cannot help.
            E::QuotaExceeded { .. } => {
                Self { code: Some("quota_exceeded"), ..Self::new(StatusCode::FORBIDDEN, "insufficient_quota", message) }
            }
            E::TooManyAgents { .. } => Self {
                code: Some("agent_limit_reached"),
                ..Self::new(StatusCode::FORBIDDEN, "invalid_request_error", message)
            },
            E::PinLimit { .. } => Self {
                code: Some("pin_limit_reached"),
                ..Self::new(StatusCode::FORBIDDEN, "invalid_request_error", message)
            },
            E::CacheFull { .. } => Self {
                retry_after: Some(Duration::from_secs(5)),
                ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
            },
            E::EngineStopped => Self {
                retry_after: Some(Duration::from_secs(5)),
                ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", "the server is shutting down")
            },
            E::Timeout(_) => Self::new(StatusCode::GATEWAY_TIMEOUT, "timeout_error", message),
            // The request's own grammar failed mid-answer (its per-token
            // budget ran out): the request's fault, not the server's.
            E::Grammar(_) => Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message),
            E::Model(_) => {
                tracing::error!(error = %message, "request failed inside the model");
                Self::internal()
            }
            other => {
                tracing::error!(error = %other, "unexpected engine error");
                Self::internal()
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut res = (self.status, [(header::CONTENT_TYPE, "application/json")], self.body_json()).into_response();
        if let Some(after) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&after.as_secs().max(1).to_string()) {
                res.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        res
    }
}
