//! A request's events: the engine's sender and the caller's
//! [`EventStream`].

#[allow(clippy::wildcard_imports)]
use super::*;

/// What the engine sends a request's stream: its events, and the moment it
/// was admitted (which [`EventStream::admitted`] waits for).
#[derive(Debug)]
pub(crate) enum StreamMsg {
    Admitted,
    Event(Event),
}

/// The engine's end of one request's stream.
#[derive(Debug)]
pub(crate) struct EventSender(pub(crate) tmpsc::UnboundedSender<StreamMsg>);

impl EventSender {
    /// Sends an event; an error if the stream was dropped (cancelled).
    pub(crate) fn send(&self, ev: Event) -> std::result::Result<(), ()> {
        self.0.send(StreamMsg::Event(ev)).map_err(|_| ())
    }

    /// Tells the stream its request was admitted.
    pub(crate) fn admitted(&self) {
        let _ = self.0.send(StreamMsg::Admitted);
    }

    /// Whether the stream was dropped.
    pub(crate) fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

/// The events of one request, in order, ending with `Finished` or `Error`.
/// Dropping it cancels the request (the engine notices and frees its blocks).
#[derive(Debug)]
pub struct EventStream {
    pub(super) id: RequestId,
    pub(super) rx: tmpsc::UnboundedReceiver<StreamMsg>,
    /// An event read while waiting for admission, returned next.
    pub(super) held: Option<Event>,
    pub(super) done: bool,
}

impl EventStream {
    /// The request's id (for [`EngineHandle::cancel`]).
    pub fn id(&self) -> RequestId {
        self.id
    }

    /// Waits until the request is admitted (it runs, or loads its cached
    /// prefix), so that what could refuse it on the way in (the agent
    /// limit, the tenant's quota, a full cache) has been decided. A
    /// streaming response sends its headers after this.
    ///
    /// # Errors
    /// The request's error if it ended first (then the stream is over).
    pub async fn admitted(&mut self) -> Result<()> {
        while !self.done && self.held.is_none() {
            match self.rx.recv().await {
                Some(StreamMsg::Admitted) => return Ok(()),
                Some(StreamMsg::Event(Event::Error(e))) => {
                    self.done = true;
                    return Err(e);
                }
                Some(StreamMsg::Event(ev)) => self.held = Some(ev),
                None => {
                    self.done = true;
                    return Err(Error::EngineStopped);
                }
            }
        }
        Ok(())
    }

    /// The next event; `None` after the last. If the engine dies first, one
    /// `Error(EngineStopped)` is returned instead of silence.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(ev) = self.held.take() {
                return self.settle(Some(ev));
            }
            if self.done {
                return None;
            }
            match self.rx.recv().await {
                Some(StreamMsg::Admitted) => {}
                Some(StreamMsg::Event(ev)) => return self.settle(Some(ev)),
                None => return self.settle(None),
            }
        }
    }

    /// [`EventStream::next`] for a plain thread.
    ///
    /// # Panics
    /// If called from inside an async runtime (tokio forbids blocking there).
    pub fn blocking_next(&mut self) -> Option<Event> {
        loop {
            if let Some(ev) = self.held.take() {
                return self.settle(Some(ev));
            }
            if self.done {
                return None;
            }
            match self.rx.blocking_recv() {
                Some(StreamMsg::Admitted) => {}
                Some(StreamMsg::Event(ev)) => return self.settle(Some(ev)),
                None => return self.settle(None),
            }
        }
    }

    fn settle(&mut self, ev: Option<Event>) -> Option<Event> {
        match ev {
            Some(ev @ (Event::Finished { .. } | Event::Error(_))) => {
                self.done = true;
                Some(ev)
            }
            Some(ev) => Some(ev),
            None => {
                self.done = true;
                Some(Event::Error(Error::EngineStopped))
            }
        }
    }
}
