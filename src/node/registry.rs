//! The channel-registry actor: which local session listens to which channel, the fan-out of each message, and
//! the latest value of every subscribed channel (for snapshots without a Redis round trip).
//!
//! One registry runs on each HTTP worker thread and owns the sessions of that worker, so a delivery is a
//! same-thread queue push; local delivery (`fanout`) sends each message once per registry, not once per subscriber. A new
//! channel first asks the pubsub bridge to listen for it, then reads the cached value, and only then lets its
//! subscribers in: a message published in between is never lost, it becomes the snapshot.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytes::Bytes;

use crate::core::protocol::{Target, close};
use crate::core::publication::Publication;
use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::node::fanout::{Fanout, RegistryInbox};
use crate::node::messages::{
    CatchUp, CloseAll, Connect, Disconnect, Dispatch, ForgetLatest, SessionId, Subscribe,
    Unsubscribe,
};
use crate::node::observer::ChannelObserver;
use crate::stats::Stats;
use crate::transport::{Full, Outbox};

/// Messages kept for subscribers whose snapshot is still being read; past this the oldest are dropped (the
/// snapshot still brings the latest value).
const BACKLOG_MAX: usize = 256;

/// How long subscribers of an uncached job channel wait for the poller's first value before they are let in
/// without a snapshot.
const FILL_WAIT: Duration = Duration::from_secs(10);

/// A local session as the registry sees it.
struct SessionEntry {
    /// The connection's frame queue (bounded): deliveries, acknowledgements, snapshots and the close.
    outbox: Outbox,
    /// Exact channels this session is subscribed to here (also kept by the session; needed to clean up).
    channels: Vec<Arc<str>>,
    /// Pattern prefixes this session is subscribed to.
    patterns: Vec<Arc<str>>,
}

/// Local state of one channel with at least one subscriber.
struct ChannelEntry {
    /// Subscribers receiving messages.
    active: HashMap<SessionId, Outbox>,
    /// Subscribers waiting for the channel's snapshot before they receive anything.
    pending: Vec<SessionId>,
    /// `subscribed` frames not sent yet, by pending subscriber.
    acks: HashMap<SessionId, Bytes>,
    /// The newest message seen on this channel while it had subscribers here.
    latest: Option<Arc<Publication>>,
    /// Messages that arrived while the cache was being read, delivered after the snapshot.
    backlog: Vec<Arc<Publication>>,
    /// Subscribers let in with a snapshot of this `seq`: the echo of that message (or an older one) may still
    /// be on its way from Redis and must not reach them again. Cleared per session by its first newer message.
    floors: HashMap<SessionId, u64>,
    /// Whether the bridge has been asked to listen to this channel.
    watched: bool,
    /// A cache read is in flight.
    filling: bool,
    /// The cache was empty and the poller promised a value: pending subscribers wait for the next message.
    awaiting_publish: bool,
    /// Distinguishes this entry from an earlier one of the same name when an old fill completes late.
    epoch: u64,
}

/// Subscribers of one pattern prefix (`prices:` for `prices:*`).
#[derive(Default)]
struct PatternEntry {
    /// Sessions receiving matching messages.
    subscribers: HashMap<SessionId, Outbox>,
    /// Sessions (with their `subscribed` frame) waiting for the bridge to listen to the pattern.
    waiting: Vec<(SessionId, Bytes)>,
    /// The bridge listens to the pattern (or there is no Redis).
    live: bool,
    /// Distinguishes this entry from an earlier one of the same prefix when an old watch is answered late.
    epoch: u64,
}

pub struct Registry {
    /// Where channels are subscribed and latest values read.
    engine: Engine,
    /// The replica's subscriber counts, shared by every registry.
    fanout: Arc<Fanout>,
    /// Told about first and last subscribers, and asked to fill empty caches.
    observer: Arc<dyn ChannelObserver>,
    stats: Arc<Stats>,
    /// Deliveries by namespace, for `GET /metrics`.
    metrics: Arc<Metrics>,
    /// `channels.max_pattern_snapshots`.
    max_pattern_snapshots: usize,
    sessions: HashMap<SessionId, SessionEntry>,
    channels: HashMap<Arc<str>, ChannelEntry>,
    patterns: HashMap<Arc<str>, PatternEntry>,
    next_epoch: u64,
    /// Reused buffer of sessions found slow during one fan-out.
    slow: Vec<SessionId>,
    /// Reused set of sessions already served by one pattern during one fan-out.
    pattern_sent: HashSet<SessionId>,
}

impl Registry {
    pub fn new(
        engine: Engine,
        fanout: Arc<Fanout>,
        observer: Arc<dyn ChannelObserver>,
        stats: Arc<Stats>,
        metrics: Arc<Metrics>,
        max_pattern_snapshots: usize,
    ) -> Registry {
        Registry {
            engine,
            fanout,
            observer,
            stats,
            metrics,
            max_pattern_snapshots,
            sessions: HashMap::new(),
            channels: HashMap::new(),
            patterns: HashMap::new(),
            next_epoch: 0,
            slow: Vec::new(),
            pattern_sent: HashSet::new(),
        }
    }

    /// Starts a registry on the calling (worker) thread and adds it to the replica's local delivery.
    pub fn start_here(self) -> Addr<Registry> {
        let fanout = self.fanout.clone();
        let addr = self.start();
        fanout.add_registry(RegistryInbox {
            dispatch: addr.clone().recipient(),
            forget: addr.clone().recipient(),
            catch_up: addr.clone().recipient(),
            close_all: addr.clone().recipient(),
        });
        addr
    }

    /// Counts a subscriber in; the observer hears of a channel's first one.
    fn subscriber_joined(fanout: &Fanout, observer: &dyn ChannelObserver, channel: &Arc<str>) {
        if fanout.subscriber_joined(channel) == 1 {
            observer.subscribers_changed(channel, 1);
        }
    }

    /// Counts a subscriber out; the observer hears of a channel's last one.
    fn subscriber_left(fanout: &Fanout, observer: &dyn ChannelObserver, channel: &Arc<str>) {
        if fanout.subscriber_left(channel) == 0 {
            observer.subscribers_changed(channel, 0);
        }
    }

    /// Hands `frame` to one subscriber; a full mailbox marks it slow.
    fn offer(stats: &Stats, slow: &mut Vec<SessionId>, id: SessionId, to: &Outbox, frame: &Bytes) {
        if to.push(frame.clone()) == Err(Full) {
            Stats::add(&stats.slow_consumer_drops, 1);
            slow.push(id);
        }
    }

    fn dispatch(&mut self, publication: Arc<Publication>) {
        let stats = &self.stats;
        let frame = publication.wire();
        let mut delivered = 0u64;
        let mut slow = std::mem::take(&mut self.slow);
        let exact = self.channels.get_mut(&publication.channel);
        let mut exact_subscribers = None;
        if let Some(entry) = exact {
            if entry
                .latest
                .as_ref()
                .is_some_and(|latest| same_message(latest, &publication))
            {
                // The same message a second time in a row: after a pub/sub outage the catch-up can deliver
                // a channel's latest value just before that message's own echo (or local delivery) arrives.
                return;
            }
            entry.latest = Some(publication.clone());
            if entry.awaiting_publish {
                // The first value of a freshly filled job channel: pending subscribers get it as their snapshot.
                entry.awaiting_publish = false;
                let snapshot = publication.snapshot_wire();
                for id in std::mem::take(&mut entry.pending) {
                    if let Some(session) = self.sessions.get(&id) {
                        Self::offer(stats, &mut slow, id, &session.outbox, &snapshot);
                        entry.active.insert(id, session.outbox.clone());
                    }
                }
            }
            if entry.filling && !entry.pending.is_empty() {
                if entry.backlog.len() == BACKLOG_MAX {
                    entry.backlog.remove(0);
                }
                entry.backlog.push(publication.clone());
            }
            if entry.floors.is_empty() {
                for (id, to) in &entry.active {
                    Self::offer(stats, &mut slow, *id, to, &frame);
                }
            } else {
                let seq = publication.seq;
                for (id, to) in &entry.active {
                    match (entry.floors.get(id), seq) {
                        (Some(&floor), Some(seq)) if seq <= floor => continue,
                        _ => Self::offer(stats, &mut slow, *id, to, &frame),
                    }
                }
                if let Some(seq) = seq {
                    entry.floors.retain(|_, floor| *floor >= seq);
                }
            }
            delivered += entry.active.len() as u64;
            exact_subscribers = Some(&*entry);
        }
        if !self.patterns.is_empty() {
            let mut matching = self
                .patterns
                .iter()
                .filter(|(prefix, _)| publication.channel.starts_with(&***prefix))
                .peekable();
            let first = matching.next();
            // Nested patterns (`a:*` and `a:b:*`) on one session: one copy, so remember who got it.
            let several = matching.peek().is_some();
            let sent = &mut self.pattern_sent;
            sent.clear();
            for (_, entry) in first.into_iter().chain(matching) {
                for (id, to) in &entry.subscribers {
                    // A session subscribed to the channel itself got it (or gets it after its snapshot).
                    if exact_subscribers.is_some_and(|exact| {
                        exact.active.contains_key(id) || exact.pending.contains(id)
                    }) {
                        continue;
                    }
                    if several && !sent.insert(*id) {
                        continue;
                    }
                    Self::offer(stats, &mut slow, *id, to, &frame);
                    delivered += 1;
                }
            }
        }
        Stats::add(&stats.messages_delivered, delivered);
        self.metrics.delivered(&publication.channel, delivered);
        for id in slow.drain(..) {
            self.drop_slow(id);
        }
        self.slow = slow;
    }

    /// A subscriber whose queue is full: it has stopped reading. It loses its subscriptions and is told to
    /// close (1008); reconnecting gives it a fresh snapshot, which is the honest recovery for a latest-value feed.
    fn drop_slow(&mut self, id: SessionId) {
        if let Some(session) = self.sessions.get(&id) {
            Stats::add(&self.stats.slow_consumer_disconnects, 1);
            // The close frame goes behind the full queue: it is written if the client reads again, and the
            // transport drops the socket after its linger either way.
            session.outbox.close_slow_consumer();
        }
        self.remove_session(id);
    }

    fn remove_session(&mut self, id: SessionId) {
        let Some(session) = self.sessions.remove(&id) else {
            return;
        };
        for channel in session.channels {
            self.remove_from_channel(id, &channel);
        }
        for prefix in session.patterns {
            self.remove_from_pattern(id, &prefix);
        }
    }

    fn remove_from_channel(&mut self, id: SessionId, channel: &Arc<str>) {
        let Some(entry) = self.channels.get_mut(channel) else {
            return;
        };
        let was_active = entry.active.remove(&id).is_some();
        let before = entry.pending.len();
        entry.pending.retain(|p| *p != id);
        entry.acks.remove(&id);
        entry.floors.remove(&id);
        if !was_active && before == entry.pending.len() {
            return;
        }
        Self::subscriber_left(&self.fanout, &*self.observer, channel);
        if entry.active.is_empty() && entry.pending.is_empty() {
            let entry = self.channels.remove(channel).expect("looked up above");
            if entry.watched {
                self.engine.unsubscribe(channel.clone());
            }
        }
    }

    fn remove_from_pattern(&mut self, id: SessionId, prefix: &Arc<str>) {
        if let Some(entry) = self.patterns.get_mut(prefix) {
            let waited = entry.waiting.len();
            entry.waiting.retain(|(w, _)| *w != id);
            if entry.subscribers.remove(&id).is_some() || entry.waiting.len() != waited {
                self.fanout.pattern_subscriber_left(prefix);
            }
            if entry.subscribers.is_empty() && entry.waiting.is_empty() {
                self.patterns.remove(prefix);
                self.engine.unsubscribe_pattern(prefix.clone());
            }
        }
    }

    fn subscribe_channel(
        &mut self,
        id: SessionId,
        channel: Arc<str>,
        ack: Bytes,
        ctx: &mut Context<Self>,
    ) {
        let Some(session) = self.sessions.get_mut(&id) else {
            return;
        };
        if session.channels.contains(&channel) {
            return;
        }
        session.channels.push(channel.clone());
        let outbox = session.outbox.clone();
        Self::subscriber_joined(&self.fanout, &*self.observer, &channel);
        let stats = &self.stats;
        let entry = self.channels.entry(channel.clone()).or_insert_with(|| {
            self.next_epoch += 1;
            ChannelEntry {
                active: HashMap::new(),
                pending: Vec::new(),
                acks: HashMap::new(),
                latest: None,
                backlog: Vec::new(),
                floors: HashMap::new(),
                watched: false,
                filling: false,
                awaiting_publish: false,
                epoch: self.next_epoch,
            }
        });
        if let Some(latest) = &entry.latest {
            // The local latest value is current: this registry has been receiving the channel all along.
            Stats::add(&stats.cache_hits, 1);
            let _ = outbox.push(ack);
            let _ = outbox.push(latest.snapshot_wire());
            entry.active.insert(id, outbox);
            return;
        }
        entry.pending.push(id);
        if entry.awaiting_publish {
            // Acknowledged now; the job's first value follows as the snapshot.
            let _ = outbox.push(ack);
            return;
        }
        entry.acks.insert(id, ack);
        if entry.filling {
            return;
        }
        entry.filling = true;
        let watch = !entry.watched;
        entry.watched = true;
        let epoch = entry.epoch;
        let engine = self.engine.clone();
        // Sent now, not from the future: an unsubscribe right behind this subscribe must reach the bridge after
        // the watch, or the bridge would keep a Redis subscription nobody needs.
        let confirmed = watch.then(|| engine.subscribe(channel.clone()));
        let fill = async move {
            if let Some(confirmed) = confirmed {
                confirmed.await;
            }
            let read_at = Instant::now();
            let latest = engine.latest(&channel).await;
            (channel, latest, read_at)
        };
        ctx.spawn(
            fill.into_actor(self)
                .map(move |(channel, latest, read_at), act, ctx| {
                    act.filled(channel, epoch, latest, read_at, ctx);
                }),
        );
    }

    /// The cache read of a channel finished: let its pending subscribers in, with the newest value known.
    fn filled(
        &mut self,
        channel: Arc<str>,
        epoch: u64,
        cached: Option<Arc<Publication>>,
        read_at: Instant,
        ctx: &mut Context<Self>,
    ) {
        let Some(entry) = self.channels.get_mut(&channel) else {
            return;
        };
        if entry.epoch != epoch {
            return;
        }
        entry.filling = false;
        let stats = &self.stats;
        let backlog = std::mem::take(&mut entry.backlog);
        if entry.latest.is_none() {
            entry.latest = cached.clone();
        }
        let mut acks = std::mem::take(&mut entry.acks);
        if cached.is_none() && backlog.is_empty() {
            Stats::add(&stats.cache_misses, entry.pending.len() as u64);
            let awaiting = self.observer.request_fill(&channel, read_at);
            for id in &entry.pending {
                if let (Some(session), Some(ack)) = (self.sessions.get(id), acks.remove(id)) {
                    let _ = session.outbox.push(ack);
                }
            }
            if awaiting {
                // The poller fetches the value now; subscribers get it as their snapshot.
                entry.awaiting_publish = true;
                ctx.run_later(FILL_WAIT, move |act, _| act.stop_waiting(&channel, epoch));
            } else {
                for id in std::mem::take(&mut entry.pending) {
                    if let Some(session) = self.sessions.get(&id) {
                        entry.active.insert(id, session.outbox.clone());
                    }
                }
            }
            return;
        }
        // The cached value as the snapshot, then every message that arrived while it was read and is newer.
        let counter = if cached.is_some() {
            &stats.cache_hits
        } else {
            &stats.cache_misses
        };
        Stats::add(counter, entry.pending.len() as u64);
        // With no cached value, the first message that arrived meanwhile is the value the subscription starts from.
        let (cached, backlog) = match cached {
            Some(cached) => (Some(cached), backlog),
            None => {
                let mut backlog = backlog.into_iter();
                (backlog.next(), backlog.collect())
            }
        };
        let snapshot = cached.as_ref().map(|c| c.snapshot_wire());
        let snapshot_seq = cached.as_ref().and_then(|c| c.seq);
        let newer: Vec<_> = backlog
            .iter()
            .filter(|m| match (snapshot_seq, m.seq) {
                (Some(s), Some(m)) => m > s,
                _ => true,
            })
            .map(|m| m.wire())
            .collect();
        // What the new subscribers have now seen: later echoes up to it are not theirs to receive again.
        let floor = newer_seq_max(snapshot_seq, &backlog);
        for id in std::mem::take(&mut entry.pending) {
            if let Some(floor) = floor {
                entry.floors.insert(id, floor);
            }
            if let Some(session) = self.sessions.get(&id) {
                for frame in acks.remove(&id).iter().chain(&snapshot).chain(&newer) {
                    let _ = session.outbox.push(frame.clone());
                }
                entry.active.insert(id, session.outbox.clone());
            }
        }
    }

    fn stop_waiting(&mut self, channel: &Arc<str>, epoch: u64) {
        let Some(entry) = self.channels.get_mut(channel) else {
            return;
        };
        if entry.epoch != epoch || !entry.awaiting_publish {
            return;
        }
        entry.awaiting_publish = false;
        for id in std::mem::take(&mut entry.pending) {
            if let Some(session) = self.sessions.get(&id) {
                entry.active.insert(id, session.outbox.clone());
            }
        }
    }

    fn subscribe_pattern(
        &mut self,
        id: SessionId,
        prefix: Arc<str>,
        ack: Bytes,
        ctx: &mut Context<Self>,
    ) {
        let Some(session) = self.sessions.get_mut(&id) else {
            return;
        };
        if session.patterns.contains(&prefix) {
            return;
        }
        session.patterns.push(prefix.clone());
        self.fanout.pattern_subscriber_joined(&prefix);
        let entry = self.patterns.entry(prefix.clone()).or_default();
        if entry.live {
            let outbox = session.outbox.clone();
            let _ = outbox.push(ack);
            entry.subscribers.insert(id, outbox);
            self.send_pattern_snapshots(prefix, vec![id], ctx);
            return;
        }
        entry.waiting.push((id, ack));
        if entry.waiting.len() > 1 {
            return;
        }
        // The first subscriber here: the bridge listens to the pattern in Redis before anyone is told
        // `subscribed`, so nothing published after the acknowledgement is missed.
        // Sent now (see `subscribe_channel`); the entry's epoch tells this watch's answer from a later one's.
        self.next_epoch += 1;
        let epoch = self.next_epoch;
        entry.epoch = epoch;
        let fut = self.engine.subscribe_pattern(prefix.clone());
        ctx.spawn(fut.into_actor(self).map(move |_, act, ctx| {
            let Some(entry) = act.patterns.get_mut(&prefix) else {
                return;
            };
            if entry.epoch != epoch {
                return;
            }
            entry.live = true;
            let mut ids = Vec::new();
            for (id, ack) in std::mem::take(&mut entry.waiting) {
                if let Some(session) = act.sessions.get(&id) {
                    let _ = session.outbox.push(ack);
                    entry.subscribers.insert(id, session.outbox.clone());
                    ids.push(id);
                }
            }
            act.send_pattern_snapshots(prefix, ids, ctx);
        }));
    }

    /// Sends the latest values of channels matching a pattern (bounded by configuration) to new subscribers.
    fn send_pattern_snapshots(
        &mut self,
        prefix: Arc<str>,
        ids: Vec<SessionId>,
        ctx: &mut Context<Self>,
    ) {
        let (engine, limit) = (self.engine.clone(), self.max_pattern_snapshots);
        let fut = async move { engine.latest_matching(&prefix, limit).await };
        ctx.spawn(fut.into_actor(self).map(move |snapshots, act, _| {
            let frames: Vec<Bytes> = snapshots.iter().map(|p| p.snapshot_wire()).collect();
            for id in ids {
                if let Some(session) = act.sessions.get(&id) {
                    for frame in &frames {
                        let _ = session.outbox.push(frame.clone());
                    }
                }
            }
        }));
    }
}

/// Whether two publications are one message: same sequence number, publish time and data. A sequence number
/// alone is not enough, since a Redis restarted without persistence starts its sequences over.
fn same_message(a: &Publication, b: &Publication) -> bool {
    a.seq.is_some() && a.seq == b.seq && a.ts() == b.ts() && a.data() == b.data()
}

/// The highest sequence number among a snapshot and the backlog delivered after it.
fn newer_seq_max(snapshot: Option<u64>, backlog: &[Arc<Publication>]) -> Option<u64> {
    backlog.iter().filter_map(|p| p.seq).chain(snapshot).max()
}

impl Actor for Registry {
    type Context = Context<Self>;
}

impl Handler<Connect> for Registry {
    type Result = ();

    fn handle(&mut self, msg: Connect, _: &mut Context<Self>) {
        self.sessions.insert(
            msg.id,
            SessionEntry {
                outbox: msg.outbox,
                channels: Vec::new(),
                patterns: Vec::new(),
            },
        );
    }
}

impl Handler<Disconnect> for Registry {
    type Result = ();

    fn handle(&mut self, msg: Disconnect, _: &mut Context<Self>) {
        self.remove_session(msg.id);
    }
}

impl Handler<Subscribe> for Registry {
    type Result = ();

    fn handle(&mut self, msg: Subscribe, ctx: &mut Context<Self>) {
        match msg.target {
            Target::Channel(channel) => {
                self.subscribe_channel(msg.id, channel.into(), msg.ack, ctx)
            }
            Target::Pattern(prefix) => self.subscribe_pattern(msg.id, prefix.into(), msg.ack, ctx),
        }
    }
}

impl Handler<Unsubscribe> for Registry {
    type Result = ();

    fn handle(&mut self, msg: Unsubscribe, _: &mut Context<Self>) {
        let Some(session) = self.sessions.get_mut(&msg.id) else {
            return;
        };
        match msg.target {
            Target::Channel(channel) => {
                let Some(pos) = session.channels.iter().position(|c| **c == *channel) else {
                    return;
                };
                let channel = session.channels.swap_remove(pos);
                self.remove_from_channel(msg.id, &channel);
            }
            Target::Pattern(prefix) => {
                let Some(pos) = session.patterns.iter().position(|p| **p == *prefix) else {
                    return;
                };
                let prefix = session.patterns.swap_remove(pos);
                self.remove_from_pattern(msg.id, &prefix);
            }
        }
    }
}

impl Handler<Dispatch> for Registry {
    type Result = ();

    fn handle(&mut self, msg: Dispatch, _: &mut Context<Self>) {
        self.dispatch(msg.0);
    }
}

impl Handler<ForgetLatest> for Registry {
    type Result = ();

    fn handle(&mut self, _: ForgetLatest, _: &mut Context<Self>) {
        for entry in self.channels.values_mut() {
            entry.floors.clear();
        }
    }
}

impl Handler<CatchUp> for Registry {
    type Result = ();

    fn handle(&mut self, msg: CatchUp, _: &mut Context<Self>) {
        for publication in msg.0.iter() {
            let Some(entry) = self.channels.get(&publication.channel) else {
                continue;
            };
            let newer = match (&entry.latest, publication.seq) {
                (None, _) => true,
                (Some(latest), Some(seq)) => latest.seq.is_none_or(|l| seq > l),
                (Some(latest), None) => latest.data() != publication.data(),
            };
            if newer {
                self.dispatch(publication.clone());
            }
        }
    }
}

impl Handler<CloseAll> for Registry {
    type Result = ();

    fn handle(&mut self, _: CloseAll, _: &mut Context<Self>) {
        for session in self.sessions.values() {
            session
                .outbox
                .close(close::GOING_AWAY, "server shutting down");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_its_seq_time_and_data() {
        let at = |seq, ts, data| Publication::new("c".into(), data, seq, ts);
        let one = at(Some(7), Some("2026-01-01T00:00:00.000Z"), "1");
        assert!(same_message(
            &one,
            &at(Some(7), Some("2026-01-01T00:00:00.000Z"), "1")
        ));
        // Sequences restart with a Redis that lost its data: the same seq is then another message.
        assert!(!same_message(
            &one,
            &at(Some(7), Some("2026-01-01T00:00:05.000Z"), "1")
        ));
        assert!(!same_message(
            &one,
            &at(Some(7), Some("2026-01-01T00:00:00.000Z"), "2")
        ));
        assert!(!same_message(
            &one,
            &at(Some(8), Some("2026-01-01T00:00:00.000Z"), "1")
        ));
        // Raw messages (no seq) are never taken for repeats.
        assert!(!same_message(&at(None, None, "1"), &at(None, None, "1")));
    }
}
