//! Replica health: one task asks every replica's `/health` each interval
//! (all at once, each with a timeout); a replica is up while it answers
//! 200 (`ok` or `degraded`: a degraded replica still serves). A request
//! that cannot connect marks its replica down at once (`proxy.rs`); the
//! next good answer brings it back.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;

use crate::state::Shared;

/// Asks every replica's `/health` every `interval`, for ever (the task is
/// aborted when the router goes).
pub(crate) async fn watch(shared: Arc<Shared>, client: reqwest::Client, interval: Duration, timeout: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let checks = shared.all().into_iter().map(|(id, url)| {
            let client = client.clone();
            async move {
                let answer = client.get(format!("{url}/health")).timeout(timeout).send().await;
                let up = answer.as_ref().is_ok_and(|r| r.status().is_success());
                (id, url, up, answer.err())
            }
        });
        for (id, url, up, err) in join_all(checks).await {
            if shared.set_health(id, up) {
                match (up, err) {
                    (true, _) => tracing::info!(replica = %url, "replica up"),
                    (false, Some(e)) => tracing::warn!(replica = %url, error = %e, "replica down"),
                    (false, None) => tracing::warn!(replica = %url, "replica down (its /health is not 200)"),
                }
            }
        }
    }
}
