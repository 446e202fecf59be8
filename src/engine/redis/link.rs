//! The state of the pub/sub link, shared by the publish path and the bridge: whether it is live, whether
//! Redis still answers commands while it is not (which decides readiness: see `Reach`), and the exactly-once
//! bookkeeping for publishes made while it was not.
//!
//! A publish made while the link is not live is delivered locally by the publisher; when the link comes back
//! during such a publish, Redis may also echo it. `Link` tracks both sides so each message is delivered once.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use crate::core::publication::Publication;
use crate::engine::seam::Reach;

/// Most echoes tracked at once (a bound, not an expected size: entries live for one reconnect).
const MAX_TRACKED_ECHOES: usize = 10_000;

#[derive(Default)]
struct Echoes {
    /// Publishes in flight that began while the link was not live, by channel.
    intents: HashMap<Arc<str>, usize>,
    /// Delivered locally by the publisher; the echo, if it comes, is dropped.
    delivered_locally: HashSet<(Arc<str>, u64)>,
    /// Relayed by the bridge while a publish of the channel was in flight; the publisher skips delivering it.
    relayed: HashSet<(Arc<str>, u64)>,
}

impl Echoes {
    fn is_empty(&self) -> bool {
        self.intents.is_empty() && self.delivered_locally.is_empty() && self.relayed.is_empty()
    }
}

#[derive(Default)]
pub struct Link {
    /// The pub/sub connection is up and subscribed (reported as `pubsub_active`).
    active: AtomicBool,
    /// The link has been live at least once: before that the replica is still starting.
    ever_active: AtomicBool,
    /// A `Reach`, as `reach_code` encodes it.
    reach: AtomicU8,
    echoes: Mutex<Echoes>,
    /// Whether `echoes` holds anything (read on every relayed message, so kept lock-free).
    echoes_active: AtomicBool,
}

fn reach_code(reach: Reach) -> u8 {
    match reach {
        Reach::Unknown => 0,
        Reach::Answering => 1,
        Reach::Unreachable => 2,
    }
}

impl Link {
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::SeqCst)
    }

    pub fn set_active(&self, active: bool) {
        self.active.store(active, Ordering::SeqCst);
        if active {
            self.ever_active.store(true, Ordering::SeqCst);
        }
        // Whatever was probed before this change says nothing about the link's new state.
        self.reach
            .store(reach_code(Reach::Unknown), Ordering::SeqCst);
    }

    pub fn was_ever_active(&self) -> bool {
        self.ever_active.load(Ordering::SeqCst)
    }

    pub fn reach(&self) -> Reach {
        match self.reach.load(Ordering::SeqCst) {
            1 => Reach::Answering,
            2 => Reach::Unreachable,
            _ => Reach::Unknown,
        }
    }

    /// Records a probe's answer, unless the link came back meanwhile (then there is nothing to report).
    pub fn set_reach(&self, reach: Reach) {
        if !self.is_active() {
            self.reach.store(reach_code(reach), Ordering::SeqCst);
        }
    }

    fn echoes(&self) -> std::sync::MutexGuard<'_, Echoes> {
        self.echoes.lock().expect("echo bookkeeping poisoned")
    }

    fn update_echoes_active(&self, echoes: &Echoes) {
        self.echoes_active
            .store(!echoes.is_empty(), Ordering::SeqCst);
    }

    /// A publish starts while the link is not live: its echo, if one comes, must be told apart.
    pub fn begin_unlinked_publish(&self, channel: &Arc<str>) {
        let mut echoes = self.echoes();
        *echoes.intents.entry(channel.clone()).or_insert(0) += 1;
        self.update_echoes_active(&echoes);
    }

    /// The script ran: deliver here unless the bridge already relayed its echo, and remember that it was
    /// delivered so a later echo is dropped. Done under the lock the bridge checks, so the two cannot cross.
    pub fn finish_unlinked_publish(
        &self,
        publication: Publication,
        intent: bool,
        deliver: impl FnOnce(Arc<Publication>),
    ) {
        let mut echoes = self.echoes();
        let channel = publication.channel.clone();
        if intent && let Some(open) = echoes.intents.get_mut(&channel) {
            *open -= 1;
            if *open == 0 {
                echoes.intents.remove(&channel);
            }
        }
        let key = (channel, publication.seq.unwrap_or(0));
        if !echoes.relayed.remove(&key) {
            if echoes.delivered_locally.len() < MAX_TRACKED_ECHOES {
                echoes.delivered_locally.insert(key);
            }
            deliver(Arc::new(publication));
        }
        self.update_echoes_active(&echoes);
    }

    pub fn cancel_unlinked_publish(&self, channel: &Arc<str>) {
        let mut echoes = self.echoes();
        if let Some(open) = echoes.intents.get_mut(channel) {
            *open -= 1;
            if *open == 0 {
                echoes.intents.remove(channel);
            }
        }
        self.update_echoes_active(&echoes);
    }

    /// Whether a message relayed from Redis was already delivered here by its publisher (then drop it).
    pub fn take_local_echo(&self, channel: &Arc<str>, seq: Option<u64>) -> bool {
        let Some(seq) = seq else {
            return false;
        };
        if !self.echoes_active.load(Ordering::SeqCst) {
            return false;
        }
        let mut echoes = self.echoes();
        let key = (channel.clone(), seq);
        let duplicate = echoes.delivered_locally.remove(&key);
        if !duplicate
            && echoes.intents.contains_key(channel)
            && echoes.relayed.len() < MAX_TRACKED_ECHOES
        {
            echoes.relayed.insert(key);
        }
        self.update_echoes_active(&echoes);
        duplicate
    }

    /// The link went down again: echoes of what was delivered before can no longer come.
    pub fn clear_local_echoes(&self) {
        let mut echoes = self.echoes();
        echoes.delivered_locally.clear();
        echoes.relayed.clear();
        self.update_echoes_active(&echoes);
    }
}
