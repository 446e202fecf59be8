//! Presence on this replica: which of its connections are members of which channel, the queue that writes
//! their joins and leaves to the engine in order, and the refresh that keeps them alive there.
//!
//! Sessions call [`Presence::join`] and [`Presence::leave`] without waiting: the change is recorded here at
//! once and queued, and one task writes the queue in order, a batch per round trip. The same task refreshes
//! every member of this replica every third of `channels.presence_ttl`, so a shared backend forgets the
//! members of a replica that died, and a change lost on the way (queue full, Redis down) is repaired: a
//! lost join is re-added by the next refresh, a lost leave expires.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::engine::{Engine, Member, PresenceChange};
use crate::stats::Stats;

/// Changes waiting to be written; past it a change is dropped (counted) and the refresh repairs it.
const QUEUE_MAX: usize = 10_000;

/// Changes written per round trip.
const BATCH_MAX: usize = 256;

/// What the writer is asked to do, in order.
enum Work {
    Change(PresenceChange),
    /// Answer once every change queued before is written (a graceful stop's leaves).
    Flush(oneshot::Sender<()>),
}

/// One member of this replica, and whether its leaving is announced.
struct Local {
    member: Member,
    announce: bool,
}

/// Channel -> connection id -> member.
type Members = HashMap<Arc<str>, HashMap<Arc<str>, Local>>;

pub struct Presence {
    engine: Engine,
    stats: Arc<Stats>,
    /// This replica's members.
    local: Mutex<Members>,
    queue: mpsc::Sender<Work>,
    /// Set by a kill: nothing more is written or refreshed, as after a crash.
    halted: AtomicBool,
}

impl Presence {
    /// Builds the tracker and starts its writer, which ends once the tracker is dropped.
    pub fn start(engine: Engine, stats: Arc<Stats>, ttl: Duration) -> Arc<Presence> {
        let (queue, changes) = mpsc::channel(QUEUE_MAX);
        let presence = Arc::new(Presence {
            engine,
            stats,
            local: Mutex::new(HashMap::new()),
            queue,
            halted: AtomicBool::new(false),
        });
        actix::spawn(write(Arc::downgrade(&presence), changes, ttl / 3));
        presence
    }

    fn local(&self) -> std::sync::MutexGuard<'_, Members> {
        self.local.lock().expect("presence lock poisoned")
    }

    fn enqueue(&self, change: PresenceChange) {
        if self.queue.try_send(Work::Change(change)).is_err() {
            Stats::add(&self.stats.presence_dropped, 1);
        }
    }

    /// Waits until the changes queued so far are written (or the writer is gone).
    pub async fn flush(&self) {
        let (done, written) = oneshot::channel();
        if self.queue.send(Work::Flush(done)).await.is_ok() {
            let _ = written.await;
        }
    }

    /// Stops writing and refreshing for good: this replica's members then expire as if it had crashed.
    pub fn halt(&self) {
        self.halted.store(true, Ordering::Relaxed);
    }

    /// A connection of this replica subscribed to `channel`; `announce`: its subscribers hear `join` (and
    /// later `leave`).
    pub fn join(&self, channel: &str, member: Member, announce: bool) {
        let channel: Arc<str> = channel.into();
        self.local().entry(channel.clone()).or_default().insert(
            member.client.clone(),
            Local {
                member: member.clone(),
                announce,
            },
        );
        Stats::add(&self.stats.presence_joins, 1);
        self.enqueue(PresenceChange::Add {
            channel,
            member,
            announce,
        });
    }

    /// The connection `client` left `channel` (nothing when it never joined it).
    pub fn leave(&self, channel: &str, client: &str) {
        let left = {
            let mut local = self.local();
            let Some(members) = local.get_mut(channel) else {
                return;
            };
            let left = members.remove(client);
            if members.is_empty() {
                local.remove(channel);
            }
            left
        };
        let Some(Local { member, announce }) = left else {
            return;
        };
        Stats::add(&self.stats.presence_leaves, 1);
        self.enqueue(PresenceChange::Remove {
            channel: channel.into(),
            member,
            announce,
        });
    }

    /// Every member of this replica, by channel.
    fn snapshot(&self) -> Vec<(Arc<str>, Vec<Member>)> {
        self.local()
            .iter()
            .map(|(channel, members)| {
                (
                    channel.clone(),
                    members.values().map(|l| l.member.clone()).collect(),
                )
            })
            .collect()
    }
}

/// Writes queued changes in order, a batch per round trip, and refreshes this replica's members every
/// `every`. One task does both, so a refresh never overtakes a leave written before it.
async fn write(presence: Weak<Presence>, mut queue: mpsc::Receiver<Work>, every: Duration) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut work = Vec::with_capacity(BATCH_MAX);
    let mut changes = Vec::with_capacity(BATCH_MAX);
    let mut flushed = Vec::new();
    loop {
        tokio::select! {
            received = queue.recv_many(&mut work, BATCH_MAX) => {
                let Some(presence) = presence.upgrade().filter(|_| received > 0) else {
                    return;
                };
                if presence.halted.load(Ordering::Relaxed) {
                    return;
                }
                for item in work.drain(..) {
                    match item {
                        Work::Change(change) => changes.push(change),
                        Work::Flush(done) => flushed.push(done),
                    }
                }
                if !changes.is_empty()
                    && let Err(e) = presence.engine.apply_presence(&changes).await
                {
                    Stats::add(&presence.stats.presence_dropped, changes.len() as u64);
                    log::warn!("writing {} presence changes failed: {e}", changes.len());
                }
                changes.clear();
                for done in flushed.drain(..) {
                    let _ = done.send(());
                }
            }
            _ = tick.tick() => {
                let Some(presence) = presence.upgrade() else {
                    return;
                };
                if presence.halted.load(Ordering::Relaxed) {
                    return;
                }
                if !presence.engine.is_shared() {
                    continue;
                }
                let members = presence.snapshot();
                if members.is_empty() {
                    continue;
                }
                if let Err(e) = presence.engine.refresh_presence(&members).await {
                    log::warn!("refreshing presence failed: {e}");
                }
            }
        }
    }
}
