//! A response body that runs a callback once, when it has been sent to its
//! end or dropped (the client went away, the connection closed): how the
//! connection watchdog learns a response is done (`conn.rs`) and how the
//! request log writes its line once a stream is over (`access_log.rs`).
//! The body is passed through frame by frame, its size hint included, so
//! wrapping it changes nothing on the wire.

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;

/// What to run at the end; `true` when the body was sent whole.
type OnEnd = Box<dyn FnOnce(bool) + Send>;

/// See the module doc.
pub(crate) struct EndBody {
    inner: Body,
    on_end: Option<OnEnd>,
}

impl EndBody {
    /// `inner`, running `on_end` once it ends or is dropped.
    pub(crate) fn new(inner: Body, on_end: impl FnOnce(bool) + Send + 'static) -> Self {
        Self { inner, on_end: Some(Box::new(on_end)) }
    }
}

impl http_body::Body for EndBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(r, Poll::Ready(None)) {
            if let Some(f) = self.on_end.take() {
                f(true);
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for EndBody {
    fn drop(&mut self) {
        if let Some(f) = self.on_end.take() {
            // A body hyper never polled to its end because it knew it was
            // complete (a full body with a size) was sent whole.
            f(http_body::Body::is_end_stream(&self.inner));
        }
    }
}
