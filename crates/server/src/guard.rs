//! What a web page must not be able to do to a server on the same machine,
//! and the extractors that make every refusal an OpenAI-style error.
//!
//! * **JSON bodies must say so.** A browser sends `Content-Type: text/plain`
//!   cross-origin without a CORS preflight; requiring `application/json`
//!   (415 otherwise) means a page cannot post to the API unasked.
//! * **Host names.** Without API keys, only requests addressed to a loopback
//!   name (`localhost`, `127.x.x.x`, `[::1]`), the `--host` address or a name
//!   given with `--allowed-host` are served (403 otherwise): DNS rebinding
//!   lets a page reach `127.0.0.1` under its own name (the class of Ollama's
//!   CVE-2024-28224), and it cannot forge the `Host` header. With keys, the
//!   keys guard the API and any name is served. A request without `Host`
//!   (not a browser) passes.
//! * **CORS** is off unless `--cors-origin` names origins (`*`: any).
//! * **Origins.** A request that changes something (any method but GET,
//!   HEAD, OPTIONS) and carries an `Origin` not named by `--cors-origin` is
//!   refused (403): browsers send `Origin` on cross-origin requests, and a
//!   body-less POST (`/v1/agents/{id}/pin`) needs no preflight, so neither
//!   the JSON rule nor CORS would stop a page from sending it. Clients that
//!   are not browsers send no `Origin`. The one exception is the server's
//!   own origin: an `Origin` of `http://` or `https://` followed by the
//!   request's own `Host` (what a browser sends from kvserve's own page,
//!   `ui.rs`). A page elsewhere cannot claim it: its browser writes the
//!   `Origin`, and a page that reaches this server under its own name (DNS
//!   rebinding) fails the Host rule below without API keys.
//! * Path parameters that do not decode (`/v1/agents/%FF`) are a 400 in
//!   the OpenAI error shape, like everything else.

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use engine::TenantId;
use serde::de::DeserializeOwned;
use std::collections::HashMap;

use crate::error::ApiError;
use crate::AppState;

/// A JSON body: `application/json` (415 otherwise), within the body limit
/// (413) and the body timeout (408), well-formed for `T` (400).
pub(crate) struct JsonBody<T>(pub(crate) T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request<Body>, state: &AppState) -> Result<Self, ApiError> {
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|v| v.trim().to_ascii_lowercase())
            .is_some_and(|v| v == "application/json" || (v.starts_with("application/") && v.ends_with("+json")));
        if !json {
            return Err(ApiError::unsupported_media_type());
        }
        let body = match tokio::time::timeout(state.body_timeout, Bytes::from_request(req, state)).await {
            Ok(body) => body,
            Err(_) => return Err(ApiError::body_timeout()),
        };
        crate::parse_json(body, state.max_body_bytes).map(Self)
    }
}

/// An agent id from the path, decoded (400 if it does not decode).
pub(crate) struct AgentPath(pub(crate) String);

impl FromRequestParts<AppState> for AgentPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(id)) => Ok(Self(id)),
            Err(_) => Err(ApiError::invalid("agent_id", "the agent id in the path does not decode (UTF-8)")),
        }
    }
}

/// The host part of a `Host` header value, lowercase, without its port.
fn host_name(value: &str) -> String {
    let v = value.trim().to_ascii_lowercase();
    if let Some(rest) = v.strip_prefix('[') {
        // [v6]:port
        return format!("[{}]", rest.split(']').next().unwrap_or(""));
    }
    v.rsplit_once(':').filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit())).map_or(v.clone(), |(h, _)| h.into())
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host.ends_with(".localhost")
        || host == "[::1]"
        || host.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
}

/// The rules of the module doc and the API keys, for whatever fronts the
/// API: `kvserve serve`, and a router in front of replicas, which must
/// answer the same requests the same way.
#[derive(Clone, Debug, Default)]
pub struct Guard {
    /// API key to tenant; empty: open, one default tenant.
    keys: HashMap<String, TenantId>,
    /// The key `/metrics` wants; `None` with keys: any API key.
    metrics_key: Option<String>,
    /// Host names served without keys besides loopback ones (lowercase).
    allowed_hosts: Vec<String>,
    /// Origins allowed by `--cors-origin`, and whether `*` was given.
    cors_origins: Vec<String>,
    cors_any: bool,
}

impl Guard {
    /// The guard of these keys (key to tenant; none: open), metrics key,
    /// extra host names and CORS origins.
    pub fn new(
        keys: HashMap<String, TenantId>,
        metrics_key: Option<String>,
        allowed_hosts: &[String],
        cors_origins: &[String],
    ) -> Self {
        Self {
            keys,
            metrics_key,
            allowed_hosts: allowed_hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
            cors_origins: cors_origins.to_vec(),
            cors_any: cors_origins.iter().any(|o| o == "*"),
        }
    }

    /// Whether API keys are configured.
    pub fn has_keys(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The tenant a request's `Authorization: Bearer KEY` names; the
    /// default tenant when the server is open.
    ///
    /// # Errors
    /// 401 with keys configured and none of them given.
    pub fn tenant(&self, headers: &HeaderMap) -> Result<TenantId, ApiError> {
        if self.keys.is_empty() {
            return Ok(TenantId::default_tenant());
        }
        bearer(headers).and_then(|k| self.keys.get(k)).cloned().ok_or_else(ApiError::unauthorized)
    }

    /// With API keys (or a metrics key), `/metrics` wants the metrics key,
    /// or any API key if none is set: the numbers describe every tenant's
    /// traffic.
    ///
    /// # Errors
    /// 401 otherwise.
    pub fn check_metrics(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if self.keys.is_empty() && self.metrics_key.is_none() {
            return Ok(());
        }
        let ok = match (&self.metrics_key, bearer(headers)) {
            (Some(k), Some(g)) => constant_time_eq(k.as_bytes(), g.as_bytes()),
            (None, Some(g)) => self.keys.contains_key(g),
            (_, None) => false,
        };
        if ok {
            Ok(())
        } else {
            Err(ApiError::unauthorized())
        }
    }

    /// The `Host` and `Origin` rules of the module doc.
    ///
    /// # Errors
    /// 403 for a request they refuse.
    pub fn check_host(&self, method: &Method, headers: &HeaderMap) -> Result<(), ApiError> {
        let safe = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
        if !safe {
            if let Some(origin) = headers.get(header::ORIGIN) {
                let allowed = self.cors_any
                    || origin.to_str().is_ok_and(|o| {
                        self.cors_origins.iter().any(|c| c.eq_ignore_ascii_case(o)) || same_origin(o, headers)
                    });
                if !allowed {
                    return Err(ApiError::new(
                        StatusCode::FORBIDDEN,
                        "permission_error",
                        "requests from web pages need their origin named with --cors-origin",
                    ));
                }
            }
        }
        if self.keys.is_empty() {
            if let Some(value) = headers.get(header::HOST) {
                let host = value.to_str().map(host_name).unwrap_or_default();
                if !(is_loopback(&host) || self.allowed_hosts.contains(&host)) {
                    return Err(ApiError::new(
                        StatusCode::FORBIDDEN,
                        "permission_error",
                        "this server answers only to loopback host names, its --host and --allowed-host names",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Whether `origin` is the request's own: `http://` or `https://` and
/// exactly its `Host` header (name and port), ignoring case.
fn same_origin(origin: &str, headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(str::trim) else { return false };
    let rest = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://"));
    !host.is_empty() && rest.is_some_and(|r| r.eq_ignore_ascii_case(host))
}

/// The key of `Authorization: Bearer KEY`, if given.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Compares secrets without stopping at the first difference (the length
/// is not secret).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Middleware: the `Host` and `Origin` rules of the module doc.
pub(crate) async fn check_host(State(state): State<AppState>, req: Request<Body>, next: Next) -> Response {
    if let Err(e) = state.guard.check_host(req.method(), req.headers()) {
        return axum::response::IntoResponse::into_response(e);
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_requests_own_host_is_its_origin() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "127.0.0.1:8080".parse().unwrap());
        assert!(same_origin("http://127.0.0.1:8080", &h));
        assert!(same_origin("https://127.0.0.1:8080", &h));
        assert!(!same_origin("http://127.0.0.1:8081", &h), "another port is another origin");
        assert!(!same_origin("http://127.0.0.1", &h));
        assert!(!same_origin("http://evil.com", &h));
        assert!(!same_origin("ftp://127.0.0.1:8080", &h));
        assert!(!same_origin("http://127.0.0.1:8080/", &h));
        assert!(!same_origin("null", &h));
        assert!(!same_origin("http://", &HeaderMap::new()), "no Host, no own origin");
    }

    #[test]
    fn host_names_lose_their_port_and_case() {
        assert_eq!(host_name("LocalHost:8080"), "localhost");
        assert_eq!(host_name("[::1]:8080"), "[::1]");
        assert_eq!(host_name("example.com"), "example.com");
        assert!(is_loopback("127.0.0.1") && is_loopback("127.8.9.1") && is_loopback("[::1]"));
        assert!(is_loopback("app.localhost"));
        assert!(!is_loopback("127.0.0.1.evil.com") && !is_loopback("localhost.evil.com"));
    }
}
