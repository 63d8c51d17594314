//! The engine thread's loop: take commands (a bounded number between two
//! steps), step, publish the snapshot; and what each command does.

#[allow(clippy::wildcard_imports)]
use super::*;

/// Sets the engine's `stopped` flag when dropped.
pub(super) struct StopOnExit(pub(super) Arc<AtomicBool>);

impl Drop for StopOnExit {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A shutdown under way: when in-flight work is cut off, and every caller
/// waiting for the engine to stop.
pub(super) struct Stopping {
    pub(super) deadline: Instant,
    pub(super) waiters: Vec<oneshot::Sender<()>>,
}

pub(super) fn run_loop(
    mut core: EngineCore,
    rx: &mpsc::Receiver<Command>,
    published: &Mutex<EngineStats>,
    stopped: &AtomicBool,
) {
    let mut shutdown: Option<Stopping> = None;
    let mut waiters = Vec::new();
    let mut stalled = false;
    let mut disconnected = false;
    loop {
        let wait = if !core.has_work() {
            let now = Instant::now();
            core.next_wakeup().map_or(IDLE_TICK, |t| t.saturating_duration_since(now).min(IDLE_TICK))
        } else if stalled {
            STALL_TICK
        } else {
            Duration::ZERO
        };
        let first = if wait.is_zero() {
            rx.try_recv().map_err(|e| matches!(e, TryRecvError::Disconnected))
        } else if disconnected {
            // No handle can send any more; wait without spinning, then take
            // what the tier threads reported meanwhile.
            std::thread::sleep(wait);
            rx.try_recv().map_err(|_| true)
        } else {
            rx.recv_timeout(wait).map_err(|e| matches!(e, RecvTimeoutError::Disconnected))
        };
        let mut next = first;
        for handled in 1.. {
            match next {
                Ok(Command::HandlesGone) => disconnected = true,
                Ok(Command::Publish(reply)) => {
                    let snapshot = core.snapshot(Instant::now());
                    if let Ok(mut s) = published.lock() {
                        *s = snapshot;
                    }
                    let _ = reply.send(());
                }
                Ok(cmd) => handle(&mut core, cmd, &mut shutdown),
                Err(gone) => {
                    disconnected |= gone;
                    break;
                }
            }
            if handled == COMMANDS_PER_STEP {
                break;
            }
            next = rx.try_recv().map_err(|e| matches!(e, TryRecvError::Disconnected));
        }
        let now = Instant::now();
        core.housekeeping(now);
        stalled = core.has_work() && !core.step();
        core.flush_kv_events();
        let snapshot = core.snapshot(Instant::now());
        if let Ok(mut s) = published.lock() {
            *s = snapshot;
        }
        if let Some(stopping) = &shutdown {
            if !core.has_work() || Instant::now() >= stopping.deadline {
                stopped.store(true, Ordering::SeqCst);
                core.abort_all(&Error::EngineStopped);
                waiters = shutdown.take().map(|s| s.waiters).unwrap_or_default();
                break;
            }
        }
        if disconnected && !core.has_work() {
            break;
        }
    }
    stopped.store(true, Ordering::SeqCst);
    let snapshot = core.snapshot(Instant::now());
    if let Ok(mut s) = published.lock() {
        *s = snapshot;
    }
    // The tiers finish their queued writes and release the cache directory
    // before `shutdown` returns, so a new engine can open it at once.
    drop(core);
    for done in waiters {
        let _ = done.send(());
    }
    tracing::info!("engine stopped");
}

pub(super) fn handle(core: &mut EngineCore, cmd: Command, shutdown: &mut Option<Stopping>) {
    match cmd {
        Command::Submit(s) if shutdown.is_some() => {
            let _ = s.events.send(Event::Error(Error::EngineStopped));
        }
        Command::Submit(s) => {
            tracing::trace!(request = s.id.0, "submitted");
            core.submit(*s)
        }
        Command::Cancel(id) => core.cancel(id),
        Command::Agents(tenant, reply) => {
            let _ = reply.send(core.agent_infos(&tenant));
        }
        Command::PrefixTree(tenant, reply) => {
            let _ = reply.send(core.prefix_tree(&tenant));
        }
        Command::Agent(tenant, id, reply) => {
            let key = AgentKey::new(tenant, id.clone());
            let _ = reply.send(core.agent_info(&key).ok_or_else(|| Error::UnknownAgent(id.to_string())));
        }
        Command::DeleteAgent(tenant, id, reply) => core.delete_agent(&AgentKey::new(tenant, id), reply),
        Command::HandOverAgent(tenant, id, reply) => core.hand_over_agent(&AgentKey::new(tenant, id), reply),
        Command::Offload(tenant, id, to, reply) => {
            let _ = reply.send(core.offload_agent(&AgentKey::new(tenant, id), to));
        }
        Command::Flusher(reply) => {
            let _ = reply.send(core.disk_flusher());
        }
        Command::ForgetDiskCache(reply) => {
            core.forget_disk_cache();
            let _ = reply.send(());
        }
        Command::Tier(tier, ev) => core.on_tier_event(tier, ev),
        Command::KvSnapshot(reply) => {
            let _ = reply.send(core.kv_snapshot());
        }
        Command::HandlesGone | Command::Publish(_) => {} // run_loop handles these
        Command::UpdateAgent(tenant, id, update, reply) => {
            let _ = reply.send(core.update_agent(&AgentKey::new(tenant, id), update));
        }
        Command::SetQuota(tenant, quota, reply) => {
            let _ = reply.send(core.set_quota(&tenant, quota));
        }
        Command::CheckInvariants(reply) => {
            let _ = reply.send(core.check_invariants());
        }
        Command::Shutdown(grace, done) => {
            // A later call may shorten the grace, never lengthen it; every
            // caller is answered when the engine has stopped.
            let now = Instant::now();
            let deadline = now.checked_add(grace.min(MAX_GRACE)).unwrap_or(now);
            let stopping = shutdown.get_or_insert_with(|| Stopping { deadline, waiters: Vec::new() });
            stopping.deadline = stopping.deadline.min(deadline);
            stopping.waiters.push(done);
        }
    }
}
