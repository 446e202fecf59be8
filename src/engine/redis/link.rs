//! The state of the pub/sub link, shared by the publish path and the bridge: whether it is live, and
//! whether Redis still answers commands while it is not (which decides readiness: see `Reach`).
//!
//! A publish made while the link is not live is delivered locally by the publisher; when the link comes back
//! during such a publish, Redis may also echo it. Both copies carry the message's `seq`, so the ordering rule
//! (`core::position`) gives each subscriber one of them: nothing here keeps track of echoes.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use crate::engine::seam::Reach;

#[derive(Default)]
pub struct Link {
    /// The pub/sub connection is up and subscribed (reported as `pubsub_active`).
    active: AtomicBool,
    /// The link has been live at least once: before that the replica is still starting.
    ever_active: AtomicBool,
    /// A `Reach`, as `reach_code` encodes it.
    reach: AtomicU8,
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
}
