//! The pinger thread: the remote tier's health check.
//!
//! Every `ping` interval, idle or not, it sends `PING` on a connection of
//! its own. A failure marks the tier degraded (within one interval plus one
//! call timeout of the store going away: 2 s with the defaults); a success
//! clears it, and lets the other threads' connections skip their backoff.
//! While the store is down the pinger's own connects back off (up to twice
//! the interval), so a dead store costs a connect attempt every few seconds
//! at most. It sleeps on the tier's condition variable, so dropping the
//! tier wakes and stops it at once.

use std::time::Instant;

use super::conn::Conn;
use super::Shared;

/// The thread's loop: a check every interval until the tier stops.
pub(super) fn run(shared: &Shared, mut conn: Conn) {
    loop {
        let deadline = Instant::now() + shared.limits.ping;
        {
            let mut s = shared.state();
            loop {
                if s.stopping.is_some() {
                    return;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                s = match shared.wake.wait_timeout(s, left) {
                    Ok((g, _)) => g,
                    Err(poisoned) => poisoned.into_inner().0,
                };
            }
        }
        check(shared, &mut conn);
    }
}

/// One health check: `PING`, then degraded or healthy.
pub(super) fn check(shared: &Shared, conn: &mut Conn) {
    match conn.call(shared, false, |con| redis::cmd("PING").query::<redis::Value>(con)) {
        Ok(_) => shared.healthy(),
        Err(reason) => shared.degrade(&reason),
    }
}
