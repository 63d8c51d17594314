//! Serving connections with limits, so that clients that stall cannot hold
//! the server: every connection's state is watched and it is closed when a
//! client takes too long at any stage.
//!
//! | stage | limit (default, flag) | then |
//! |---|---|---|
//! | a request's headers, from their first byte (on a new connection, from the accept) | 10 s, `--header-timeout` | closed |
//! | a request's body | 60 s, `--body-timeout` | 408 |
//! | idle between requests on a kept-alive connection | 75 s, `--idle-timeout` | closed |
//! | a response the client stops reading (SSE) | 30 s of blocked writes, `--write-timeout` | closed: the request is cancelled and its blocks freed |
//! | open connections | 512, `--max-connections` | past it, a 503 and close, at once |
//!
//! At shutdown the listener stops, every connection is asked to finish
//! (idle ones close at once), in-flight requests get the grace period, and
//! then whatever is left is closed: shutdown ends within the grace (plus a
//! second) whatever clients do.
//!
//! How: each accepted socket is wrapped to note when bytes arrive and when
//! writes block; the service notes when a request reaches it and when its
//! response body ends; one watchdog per connection compares the stage's
//! start with its limit every 100 ms and drops the connection (closing the
//! socket, and the response with it) when one is passed. hyper's own header
//! timer is not used: it also runs while a kept-alive connection waits for
//! its next request, which would make the idle limit the header limit.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use axum::Router;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpListener;

use crate::end_body::EndBody;
use tower::ServiceExt;

/// Connection limits (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest a request's headers may take, from their first byte.
    pub header_timeout: Duration,
    /// Longest a request's body may take.
    pub body_timeout: Duration,
    /// Longest a kept-alive connection may sit idle.
    pub idle_timeout: Duration,
    /// Longest writes to a client may stay blocked.
    pub write_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(75),
            write_timeout: Duration::from_secs(30),
            max_connections: 512,
        }
    }
}

/// Where a connection is.
#[derive(Clone, Copy, Debug)]
enum Stage {
    /// Waiting for a request since then.
    Idle(Instant),
    /// A request's first bytes came then; its headers are not complete.
    Head(Instant),
    /// A request is being served (body read, response written).
    Serving,
}

#[derive(Debug)]
struct State {
    stage: Stage,
    /// Writes have been blocked since then.
    blocked: Option<Instant>,
}

/// One connection's stage, shared by its socket, its service and its
/// watchdog.
#[derive(Debug)]
struct Watch(Mutex<State>);

impl Watch {
    fn new() -> Arc<Self> {
        // A new connection owes its first request's headers: one that
        // connects and stays silent gets the header limit, not the idle one.
        Arc::new(Self(Mutex::new(State { stage: Stage::Head(Instant::now()), blocked: None })))
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    fn bytes_read(&self) {
        self.with(|s| {
            if let Stage::Idle(_) = s.stage {
                s.stage = Stage::Head(Instant::now());
            }
        });
    }

    fn request_started(&self) {
        self.with(|s| s.stage = Stage::Serving);
    }

    fn response_done(&self) {
        self.with(|s| s.stage = Stage::Idle(Instant::now()));
    }

    fn write_blocked(&self, blocked: bool) {
        self.with(|s| match (blocked, s.blocked) {
            (true, None) => s.blocked = Some(Instant::now()),
            (false, Some(_)) => s.blocked = None,
            _ => {}
        });
    }

    /// Why the connection must close now, if it must.
    fn expired(&self, limits: &Limits, now: Instant) -> Option<&'static str> {
        self.with(|s| {
            if s.blocked.is_some_and(|t| now - t > limits.write_timeout) {
                return Some("the client stopped reading");
            }
            match s.stage {
                Stage::Idle(t) if now - t > limits.idle_timeout => Some("idle"),
                Stage::Head(t) if now - t > limits.header_timeout => Some("headers too slow"),
                _ => None,
            }
        })
    }
}

/// A socket that reports reads and blocked writes to its [`Watch`].
struct Watched<S> {
    inner: S,
    watch: Arc<Watch>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.watch.bytes_read();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch.write_blocked(r.is_pending());
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch.write_blocked(r.is_pending());
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch.write_blocked(r.is_pending());
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\nRetry-After: 1\r\nContent-Length: 109\r\n\r\n{\"error\":{\"message\":\"too many open connections; retry later\",\"type\":\"server_error\",\"param\":null,\"code\":null}}";

/// Serves `app` on `listener` with `limits` until `signal` resolves; then
/// stops accepting, lets in-flight requests finish for `grace` (calling
/// `on_stop` once, e.g. to stop the engine with the same grace), closes
/// what is left, and returns.
///
/// # Errors
/// An I/O error from the listener.
pub async fn serve_with_limits(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    signal: impl std::future::Future<Output = ()> + Send + 'static,
    grace: Duration,
    on_stop: impl FnOnce() + Send + 'static,
) -> std::io::Result<()> {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            () = &mut signal => break,
            accepted = listener.accept() => {
                let (mut stream, _peer) = match accepted {
                    Ok(x) => x,
                    // Out of descriptors and the like: keep serving.
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                    tokio::spawn(async move {
                        // The 503, a FIN, then what the client sent is read
                        // and dropped: closing with unread data would reset
                        // the connection and could lose the answer.
                        let refuse = async {
                            stream.write_all(BUSY).await?;
                            stream.shutdown().await?;
                            let mut sink = [0u8; 4096];
                            let mut drained = 0;
                            while drained < 1 << 16 {
                                match stream.read(&mut sink).await? {
                                    0 => break,
                                    n => drained += n,
                                }
                            }
                            Ok::<_, std::io::Error>(())
                        };
                        let _ = tokio::time::timeout(Duration::from_secs(1), refuse).await;
                    });
                    continue;
                };
                let _ = stream.set_nodelay(true);
                conns.spawn(connection(stream, app.clone(), limits, stop_rx.clone(), slot));
            }
            // Reap finished connections as they go.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    tracing::info!(grace_ms = grace.as_millis() as u64, "shutting down: no new connections");
    drop(listener);
    let _ = stop_tx.send(true);
    on_stop();
    let deadline = tokio::time::Instant::now() + grace + Duration::from_secs(1);
    while !conns.is_empty() {
        if tokio::time::timeout_at(deadline, conns.join_next()).await.is_err() {
            tracing::warn!(open = conns.len(), "closing connections still open after the grace period");
            conns.abort_all();
            while conns.join_next().await.is_some() {}
            break;
        }
    }
    Ok(())
}

async fn connection(
    stream: tokio::net::TcpStream,
    app: Router,
    limits: Limits,
    mut stop: tokio::sync::watch::Receiver<bool>,
    _slot: tokio::sync::OwnedSemaphorePermit,
) {
    let watch = Watch::new();
    let io = TokioIo::new(Watched { inner: stream, watch: Arc::clone(&watch) });
    let service_watch = Arc::clone(&watch);
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let app = app.clone();
        let watch = Arc::clone(&service_watch);
        async move {
            watch.request_started();
            let resp = app.oneshot(req.map(Body::new)).await.unwrap_or_else(|e| match e {});
            Ok::<_, std::convert::Infallible>(resp.map(|b| EndBody::new(b, move |_| watch.response_done())))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new().keep_alive(true).serve_connection(io, service);
    tokio::pin!(conn);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut stopping = false;
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = tick.tick() => {
                if let Some(why) = watch.expired(&limits, Instant::now()) {
                    tracing::debug!(reason = why, "closing a connection");
                    return;
                }
            }
            changed = stop.changed(), if !stopping => {
                stopping = true;
                if changed.is_ok() {
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// The 503 sent past `--max-connections` (tests check its shape).
#[doc(hidden)]
pub fn busy_response() -> &'static [u8] {
    BUSY
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_busy_response_has_the_right_length() {
        let text = std::str::from_utf8(BUSY).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())), "{head}");
        assert!(serde_json::from_str::<serde_json::Value>(body).is_ok());
    }

    #[test]
    fn a_stage_expires_only_past_its_own_limit() {
        let limits = Limits {
            header_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(2),
            ..Limits::default()
        };
        let w = Watch::new();
        // A new connection that sends nothing owes its headers.
        assert_eq!(w.expired(&limits, Instant::now() + Duration::from_secs(2)), Some("headers too slow"));
        w.request_started();
        w.response_done();
        let t0 = Instant::now();
        assert_eq!(w.expired(&limits, t0 + Duration::from_secs(3)), None, "idle for 3 s of 5");
        w.bytes_read();
        assert_eq!(w.expired(&limits, Instant::now() + Duration::from_secs(2)), Some("headers too slow"));
        w.request_started();
        assert_eq!(
            w.expired(&limits, Instant::now() + Duration::from_secs(100)),
            None,
            "serving: the body has its own timer"
        );
        w.write_blocked(true);
        assert_eq!(w.expired(&limits, Instant::now() + Duration::from_secs(3)), Some("the client stopped reading"));
        w.write_blocked(false);
        w.response_done();
        assert_eq!(w.expired(&limits, Instant::now() + Duration::from_secs(6)), Some("idle"));
    }
}
