//! Forwarding a request to the chosen replica and streaming its answer
//! back as it arrives.
//!
//! - The body goes out as the client sent it (the same bytes), with the
//!   client's headers except hop-by-hop ones and `Host`.
//! - The answer's status and headers come back as the replica sent them,
//!   and its body is relayed chunk by chunk (`reqwest`'s byte stream into
//!   an axum streaming body): nothing waits for the whole answer, so
//!   server-sent events reach the client as the replica sends them.
//! - **Retry once, only before the first byte.** A replica that cannot be
//!   reached (refused, reset, timed out before an answer) or that answers
//!   502/503 is replaced by the next choice, once (counted in
//!   `kvserve_router_retries_total`); a failed connection also marks it
//!   down until `/health` says otherwise. Once an answer has started, a
//!   failure ends the client's stream: for server-sent events with a last
//!   `event: error` whose data is an OpenAI-style error, for anything else
//!   by cutting the body short (the client sees an incomplete response,
//!   never a truncated one that looks whole).
//! - An SSE relay forwards whole events: bytes after the last blank line
//!   wait for the rest of their event (a replica writes whole events, so
//!   nothing waits in practice). A failure then never leaves half an
//!   event for the client to parse before the error event.
//! - The request's in-flight ticket rides in the body: the replica's load
//!   goes down when the answer ends, fails or the client goes away.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderName, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, BoxStream, StreamExt};
use server::ApiError;

use crate::index::ReplicaId;
use crate::state::{InFlight, Plan, Shared};

/// Headers that belong to one connection, not to the request.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
];

fn end_to_end(name: &HeaderName) -> bool {
    !HOP_BY_HOP.contains(&name.as_str()) && name != header::HOST && name != header::CONTENT_LENGTH
}

/// The headers to pass on.
pub(crate) fn forwarded(headers: &HeaderMap) -> HeaderMap {
    headers.iter().filter(|(n, _)| end_to_end(n)).map(|(n, v)| (n.clone(), v.clone())).collect()
}

/// 503: no replica can take the request.
pub(crate) fn no_replica() -> Response {
    let mut e = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", "no replica is available; retry later");
    e.code = Some("no_replica");
    e.retry_after = Some(std::time::Duration::from_secs(1));
    e.into_response()
}

/// 502: the replica failed (details go to the log).
pub(crate) fn bad_gateway() -> Response {
    let mut e = ApiError::new(StatusCode::BAD_GATEWAY, "server_error", "the replica did not answer; retry later");
    e.code = Some("replica_failed");
    e.into_response()
}

/// Sends one request to `base`.
pub(crate) async fn send(
    client: &reqwest::Client,
    base: &str,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> reqwest::Result<reqwest::Response> {
    client.request(method.clone(), format!("{base}{path}")).headers(forwarded(headers)).body(body).send().await
}

/// A request on its way out.
pub(crate) struct Outgoing<'a> {
    pub(crate) method: &'a Method,
    /// Path and query.
    pub(crate) path: &'a str,
    pub(crate) headers: &'a HeaderMap,
    pub(crate) body: Bytes,
    /// When it came in: the first decision observes the time spent
    /// routing it.
    pub(crate) arrived: Option<std::time::Instant>,
}

/// Routes `plan`, sends the request, retries once before the first byte,
/// and relays the answer.
pub(crate) async fn forward(
    shared: &Arc<Shared>,
    client: &reqwest::Client,
    plan: &Plan,
    req: Outgoing<'_>,
) -> Response {
    let Outgoing { method, path, headers, body, arrived } = req;
    let mut tried: Vec<ReplicaId> = Vec::new();
    loop {
        let decided = shared.decide(plan, &tried);
        if let (Some(t), true) = (arrived, tried.is_empty()) {
            shared.observe_route_time(t.elapsed().as_secs_f64());
        }
        let Some(d) = decided else {
            return if tried.is_empty() { no_replica() } else { bad_gateway() };
        };
        let last = !tried.is_empty();
        tracing::debug!(replica = %d.url, reason = d.reason.name(), "routed");
        match send(client, &d.url, method, path, headers, body.clone()).await {
            Ok(resp) if !last && matches!(resp.status().as_u16(), 502 | 503) => {
                tracing::info!(replica = %d.url, status = resp.status().as_u16(), "replica refused; retrying on another");
            }
            Ok(resp) => {
                let mut ticket = d.ticket;
                if let (Some(from), true) = (d.moved_from, resp.status().is_success()) {
                    ticket.then = hand_over(client, &from, plan, headers);
                }
                return relay(resp, ticket);
            }
            Err(e) => {
                // Refused, reset or closed before answering: down until
                // its `/health` says otherwise.
                tracing::warn!(replica = %d.url, error = %e, "replica failed before answering");
                shared.mark_down(d.id);
                if last {
                    return bad_gateway();
                }
            }
        }
        tried.push(d.id);
        shared.count_retry();
    }
}

/// Once a moved agent's turn is answered, asks the replica it left to hand
/// it over (forget it there, keep it in the shared tier), so the agent lives
/// on one replica at a time. Fire and forget: a failure leaves a stale copy
/// there, which costs memory until its retention ends, never an answer.
fn hand_over(
    client: &reqwest::Client,
    from: &str,
    plan: &Plan,
    headers: &HeaderMap,
) -> Option<Box<dyn FnOnce() + Send>> {
    let crate::state::Target::Completion { agent: Some(agent), .. } = &plan.target else { return None };
    // Only ids a replica accepts (1 to 64 of [A-Za-z0-9_.:-]), and never a
    // dot segment of the path.
    let valid = (1..=64).contains(&agent.len())
        && agent.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
        && !agent.bytes().all(|b| b == b'.');
    if !valid {
        return None;
    }
    let rt = tokio::runtime::Handle::try_current().ok()?;
    let url = format!("{from}/v1/agents/{agent}/hand-over");
    let auth = headers.get(header::AUTHORIZATION).cloned();
    let client = client.clone();
    Some(Box::new(move || {
        rt.spawn(async move {
            let mut req = client.post(&url);
            if let Some(a) = auth {
                req = req.header(header::AUTHORIZATION, a);
            }
            match req.send().await {
                Ok(r) if r.status().is_success() => tracing::debug!(%url, "agent handed over"),
                Ok(r) => tracing::info!(%url, status = r.status().as_u16(), "agent not handed over"),
                Err(e) => tracing::info!(%url, error = %e, "agent not handed over"),
            }
        });
    }))
}

/// The client's answer: the replica's status, headers and streamed body.
pub(crate) fn relay(resp: reqwest::Response, ticket: InFlight) -> Response {
    let status = resp.status();
    let headers: HeaderMap = forwarded(resp.headers());
    let sse = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("text/event-stream"));
    let upstream = resp.bytes_stream().boxed();
    let body = if sse {
        Body::from_stream(sse_relay(upstream, ticket))
    } else {
        Body::from_stream(raw_relay(upstream, ticket))
    };
    let mut out = Response::new(body);
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    out
}

type Upstream = BoxStream<'static, reqwest::Result<Bytes>>;

/// Bytes as they come; a failure cuts the body short.
fn raw_relay(upstream: Upstream, ticket: InFlight) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> {
    stream::unfold(Some((upstream, ticket)), |state| async move {
        let (mut up, ticket) = state?;
        match up.next().await {
            Some(Ok(b)) => Some((Ok(b), Some((up, ticket)))),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "replica failed mid-answer");
                Some((Err(std::io::Error::other(e)), None))
            }
            None => None,
        }
    })
}

/// The event a failed stream ends with.
pub(crate) fn error_event() -> Bytes {
    let mut e = ApiError::new(StatusCode::BAD_GATEWAY, "server_error", "the replica failed during the answer");
    e.code = Some("replica_failed");
    Bytes::from(format!("event: error\ndata: {}\n\n", e.body_json()))
}

/// Where the last complete event in `buf` ends (after its blank line).
fn last_boundary(buf: &[u8]) -> Option<usize> {
    let lf = buf.windows(2).rposition(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = buf.windows(4).rposition(|w| w == b"\r\n\r\n").map(|i| i + 4);
    lf.max(crlf)
}

/// Bytes of an SSE body past which a partial event is sent anyway.
const MAX_PARTIAL_EVENT: usize = 1 << 20;

struct Sse {
    up: Upstream,
    /// The start of an event whose end has not arrived.
    partial: Vec<u8>,
    _ticket: InFlight,
}

/// Whole events as they come; a failure drops a partial event and ends
/// with [`error_event`].
fn sse_relay(upstream: Upstream, ticket: InFlight) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> {
    let start = Sse { up: upstream, partial: Vec::new(), _ticket: ticket };
    stream::unfold(Some(start), |state| async move {
        let mut s = state?;
        loop {
            match s.up.next().await {
                Some(Ok(b)) => {
                    s.partial.extend_from_slice(&b);
                    let cut = match last_boundary(&s.partial) {
                        Some(at) => at,
                        None if s.partial.len() > MAX_PARTIAL_EVENT => s.partial.len(),
                        None => continue,
                    };
                    let rest = s.partial.split_off(cut);
                    let ready = std::mem::replace(&mut s.partial, rest);
                    return Some((Ok(Bytes::from(ready)), Some(s)));
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "replica failed mid-stream; ending the client's stream with an error event");
                    return Some((Ok(error_event()), None));
                }
                None if s.partial.is_empty() => return None,
                None => {
                    let rest = std::mem::take(&mut s.partial);
                    return Some((Ok(Bytes::from(rest)), Some(s)));
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundaries_are_found_for_lf_and_crlf_events() {
        assert_eq!(last_boundary(b"data: a\n\ndata: b"), Some(9));
        assert_eq!(last_boundary(b"data: a\r\n\r\ndata: b\r\n\r\n"), Some(22));
        assert_eq!(last_boundary(b"data: a\n"), None);
    }

    #[test]
    fn hop_by_hop_headers_and_host_stay_behind() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "router:8080".parse().unwrap());
        h.insert(header::CONNECTION, "keep-alive".parse().unwrap());
        h.insert(header::AUTHORIZATION, "Bearer k".parse().unwrap());
        h.insert("x-agent-id", "a".parse().unwrap());
        let f = forwarded(&h);
        assert!(f.get(header::HOST).is_none() && f.get(header::CONNECTION).is_none());
        assert!(f.get(header::AUTHORIZATION).is_some() && f.get("x-agent-id").is_some());
    }
}
