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

use crate::core::config::{ChannelPolicy, SlowConsumer};
use crate::core::position::{
    self, Admission, PatternPositions, PatternStep, Position, Step, Verdict, admit,
};
use crate::core::protocol::{self, RequestId, Target, channel_owner, close};
use crate::core::publication::Publication;
use crate::engine::{Engine, EngineError, Window};
use crate::metrics::Metrics;
use crate::node::fanout::{Fanout, RegistryInbox};
use crate::node::messages::{
    Announce, CatchUp, CloseAll, Connect, Disconnect, Dispatch, ForgetLatest, LinkUp, SessionId,
    Subscribe, Unsubscribe,
};
use crate::node::observer::ChannelObserver;
use crate::stats::Stats;
use crate::transport::{Full, Outbox, Pushed};

/// Messages kept for subscribers whose snapshot is still being read; past this the oldest are dropped (the
/// snapshot still brings the latest value).
const BACKLOG_MAX: usize = 256;

/// How often a draining registry closes its next share of connections.
const DRAIN_TICK: Duration = Duration::from_millis(50);

/// Messages of one channel held while a history read fills a gap; past this the held ones go out as they are
/// (the gap stays, counted) and holding starts over, so a slow read never holds more than this.
const HOLD_MAX: usize = 1024;

/// Channels whose epoch a registry remembers for its pattern subscribers; past this the memory is cleared
/// (the next announcement of each reads it again).
const EPOCHS_MAX: usize = 100_000;

/// Channel windows a recovering pattern subscribe reads at once.
const RECOVERY_READS: usize = 4;

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
    /// Where the session stands in each channel its patterns gave it (`channels.max_pattern_positions`).
    positions: PatternPositions<Publication>,
    /// The client sent a pattern subscribe with `since`: it is told the epoch of each channel its patterns
    /// start to deliver (`epoch` frames), to resume them later.
    wants_epochs: bool,
}

/// A subscriber receiving a channel's messages, with its position (the newest seq it was given under the
/// channel's epoch; 0: none yet): the ordering rule of `core::position` runs on it.
struct Subscriber {
    outbox: Outbox,
    seq: u64,
}

/// A subscriber waiting for the channel's window (position, snapshot, history) before it receives anything.
struct Waiting {
    id: SessionId,
    request: RequestId,
    since: Option<Position>,
    /// Acknowledged already (a job channel waiting for its first value).
    acked: bool,
}

/// Local state of one channel with at least one subscriber.
struct ChannelEntry {
    /// Subscribers receiving messages.
    active: HashMap<SessionId, Subscriber>,
    /// Subscribers waiting for the channel's window before they receive anything.
    pending: Vec<Waiting>,
    /// The channel's epoch as last read; `None` until read.
    history_epoch: Option<Arc<str>>,
    /// The pub/sub link went down since `history_epoch` was read: it may be stale (the backend may have
    /// started numbering over) until a history read or the catch-up says which epoch holds.
    epoch_stale: bool,
    /// A history read is in flight (a gap, or a stale epoch, to settle): messages for active subscribers
    /// wait here, in arrival order, and go out behind what the read fills in.
    held: Option<Vec<Arc<Publication>>>,
    /// The channel's settings, from its first subscribe.
    policy: ChannelPolicy,
    /// The newest message seen on this channel while it had subscribers here.
    latest: Option<Arc<Publication>>,
    /// Messages that arrived while the window was being read, delivered after it by the ordering rule.
    backlog: Vec<Arc<Publication>>,
    /// Whether the bridge has been asked to listen to this channel.
    watched: bool,
    /// A cache read is in flight.
    filling: bool,
    /// The cache was empty and the poller promised a value: pending subscribers wait for the next message.
    awaiting_publish: bool,
    /// Distinguishes this entry from an earlier one of the same name when an old fill completes late.
    epoch: u64,
}

/// A session waiting for the bridge to listen to a pattern.
struct PatternWaiting {
    id: SessionId,
    /// The plain `subscribed` frame (a subscribe without `since`).
    ack: Bytes,
    request: RequestId,
    /// A subscribe with `since`: the channels to recover, with where the client stood in each.
    since: Option<Vec<(Arc<str>, Position)>>,
}

/// Subscribers of one pattern prefix (`prices:` for `prices:*`).
#[derive(Default)]
struct PatternEntry {
    /// Sessions receiving matching messages.
    subscribers: HashMap<SessionId, Outbox>,
    /// Sessions waiting for the bridge to listen to the pattern.
    waiting: Vec<PatternWaiting>,
    /// Sessions whose named channels are being read (a `since`), each with the number of its read (a later
    /// subscribe of the same session is another read): matching messages wait here, in order (at most
    /// `HOLD_MAX`), and go out behind the replay.
    recovering: HashMap<SessionId, (u64, Vec<Arc<Publication>>)>,
    /// The namespace's settings (how much history a recovery reads).
    policy: Option<ChannelPolicy>,
    /// The bridge listens to the pattern (or there is no Redis).
    live: bool,
    /// Distinguishes this entry from an earlier one of the same prefix when an old watch is answered late.
    epoch: u64,
}

/// Pattern subscribers' messages of one channel held while its history is read, because one of them missed
/// messages before the newest (a gap): one read per channel, shared by every session that saw the gap.
struct PatternHold {
    /// Sessions whose messages of the channel wait for the read (the others keep receiving them).
    sessions: HashSet<SessionId>,
    /// The channel's messages since the first gap, in arrival order (at most `HOLD_MAX`).
    held: Vec<Arc<Publication>>,
}

/// What the ordering rule made of one message of a replay (a gap's fill or a catch-up) for one subscriber.
#[derive(Debug, Clone, Copy)]
enum Given {
    /// From history, where the subscriber was missing it.
    Replayed,
    /// Given although messages before it are missing and history no longer has them.
    Unfilled,
    /// A held message, in order.
    Delivered,
    /// Given without a position: the connection already tracks its cap of pattern channels.
    Untracked,
    /// A copy of something given already: not delivered.
    Dropped,
}

impl From<Step> for Given {
    fn from(step: Step) -> Given {
        match step {
            Step::Dropped => Given::Dropped,
            Step::Replayed => Given::Replayed,
            Step::Unfilled => Given::Unfilled,
            Step::Delivered => Given::Delivered,
        }
    }
}

/// What one replay gave, over all its subscribers: added to the stats once, at its end.
#[derive(Default)]
struct ReplayTally {
    /// Messages offered to subscribers (`messages_delivered`, counted by the caller with its metrics).
    delivered: u64,
    /// `messages_replayed`.
    replayed: u64,
    /// `gaps_unfilled`.
    unfilled: u64,
    /// `pattern_positions_untracked`.
    untracked: u64,
    /// `duplicates_dropped`.
    dropped: u64,
}

impl ReplayTally {
    fn count(&self, stats: &Stats) {
        Stats::add(&stats.messages_replayed, self.replayed);
        Stats::add(&stats.duplicates_dropped, self.dropped);
        Stats::add(&stats.gaps_unfilled, self.unfilled);
        Stats::add(&stats.pattern_positions_untracked, self.untracked);
    }
}

/// A channel's epoch for pattern subscribers: known, or being read for the sessions waiting to be told.
enum EpochLookup {
    Known(Arc<str>),
    Reading(Vec<SessionId>),
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
    /// `channels.max_pattern_positions`.
    max_pattern_positions: usize,
    /// Epochs of channels pattern subscribers were given, read once per channel and registry.
    epochs: HashMap<Arc<str>, EpochLookup>,
    sessions: HashMap<SessionId, SessionEntry>,
    channels: HashMap<Arc<str>, ChannelEntry>,
    patterns: HashMap<Arc<str>, PatternEntry>,
    next_epoch: u64,
    /// Reused buffer of sessions found slow during one fan-out.
    slow: Vec<SessionId>,
    /// Reused set of sessions already served by one pattern during one fan-out.
    pattern_sent: HashSet<SessionId>,
    /// Pub/sub outages heard of: a history read started before the latest one cannot vouch for the epoch.
    link_downs: u64,
    /// Channels whose pattern subscribers wait for a history read (a gap), by channel.
    pattern_holds: HashMap<Arc<str>, PatternHold>,
}

impl Registry {
    pub fn new(
        engine: Engine,
        fanout: Arc<Fanout>,
        observer: Arc<dyn ChannelObserver>,
        stats: Arc<Stats>,
        metrics: Arc<Metrics>,
        (max_pattern_snapshots, max_pattern_positions): (usize, usize),
    ) -> Registry {
        Registry {
            engine,
            fanout,
            observer,
            stats,
            metrics,
            max_pattern_snapshots,
            max_pattern_positions,
            epochs: HashMap::new(),
            sessions: HashMap::new(),
            channels: HashMap::new(),
            patterns: HashMap::new(),
            next_epoch: 0,
            slow: Vec::new(),
            pattern_sent: HashSet::new(),
            link_downs: 0,
            pattern_holds: HashMap::new(),
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
            link_up: addr.clone().recipient(),
            close_all: addr.clone().recipient(),
            announce: addr.clone().recipient(),
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

    /// Hands `frame`, a message of `channel`, to one subscriber (or, to a raw connection, `publication`'s raw
    /// frame, made once for all of them). Past its queue bound it is marked slow, or, where the namespace
    /// conflates, keeps only the channel's newest pending message.
    fn offer(
        stats: &Stats,
        slow: &mut Vec<SessionId>,
        id: SessionId,
        to: &Outbox,
        (channel, mode): (&Arc<str>, SlowConsumer),
        (frame, publication): (&Bytes, &Publication),
    ) {
        let raw;
        let frame = if to.is_raw() {
            raw = publication.raw_wire();
            &raw
        } else {
            frame
        };
        let full = match mode {
            SlowConsumer::Disconnect => to.push(frame.clone()) == Err(Full),
            SlowConsumer::Conflate => match to.push_latest(channel, frame.clone()) {
                Ok(Pushed::Replaced) => {
                    Stats::add(&stats.messages_conflated, 1);
                    false
                }
                Ok(Pushed::Queued | Pushed::Pending) => false,
                Err(Full) => true,
            },
        };
        if full {
            Stats::add(&stats.slow_consumer_drops, 1);
            slow.push(id);
        }
    }

    /// Queues a frame a subscribe owes its client: its answer or an `epoch` frame (`channel` `None`), or its
    /// snapshot or replayed messages. Past the connection's queue bound (pipelined subscribes beyond
    /// `websocket.mailbox_size`, or a full queue) the frame is not dropped unseen: it is that connection's
    /// slow-consumer overflow, counted in `replies_refused`. The connection is closed with 1008 (its session
    /// then leaves the registry), or, where the namespace conflates, the frame waits in a slot (the
    /// connection's own for answers, the channel's for messages) and the connection closes only when none is
    /// left.
    fn owe(
        stats: &Stats,
        outbox: &Outbox,
        mode: SlowConsumer,
        channel: Option<&Arc<str>>,
        frame: Bytes,
    ) {
        let pushed = match channel {
            None => outbox.push_reply(frame.clone()),
            Some(_) => outbox.push(frame.clone()),
        };
        if pushed.is_ok() {
            return;
        }
        Stats::add(&stats.replies_refused, 1);
        let kept = match (mode, channel) {
            (SlowConsumer::Disconnect, _) => false,
            (SlowConsumer::Conflate, None) => outbox.push_owed(frame).is_ok(),
            (SlowConsumer::Conflate, Some(channel)) => outbox.push_latest(channel, frame).is_ok(),
        };
        if !kept {
            Stats::add(&stats.slow_consumer_drops, 1);
            if outbox.close_slow_consumer() {
                Stats::add(&stats.slow_consumer_disconnects, 1);
            }
        }
    }

    fn dispatch(&mut self, publication: Arc<Publication>, ctx: &mut Context<Self>) {
        let stats = &self.stats;
        let mut read_history = false;
        let mut read_pattern_history = false;
        let mut pattern_overflow = None;
        let frame = publication.wire();
        let channel = &publication.channel;
        let mut delivered = 0u64;
        let mut slow = std::mem::take(&mut self.slow);
        let exact = self.channels.get_mut(&publication.channel);
        let mut exact_subscribers = None;
        if let Some(entry) = exact {
            let to_channel = (channel, entry.policy.slow_consumer);
            // The same message again (its copy through a pattern's PSUBSCRIBE beside the channel's own
            // SUBSCRIBE, or an echo of what was delivered here while the link was down): every active
            // subscriber was given it, so the rule drops it without the history read a message everyone is
            // past would otherwise cost.
            let copy = publication.seq.is_some()
                && entry.held.is_none()
                && entry.latest.as_ref().is_some_and(|latest| {
                    latest.seq == publication.seq
                        && latest.ts() == publication.ts()
                        && latest.data() == publication.data()
                })
                && entry
                    .active
                    .values()
                    .all(|to| to.seq >= publication.seq.unwrap_or(0));
            if entry
                .latest
                .as_ref()
                .is_none_or(|latest| latest.seq.is_none() || latest.seq < publication.seq)
            {
                entry.latest = Some(publication.clone());
            }
            if entry.awaiting_publish {
                // The first value of a freshly filled job channel: pending subscribers get it as their
                // snapshot, and their position moves to it, so the same message is not delivered again below.
                entry.awaiting_publish = false;
                let snapshot = publication.snapshot_wire();
                for waiting in std::mem::take(&mut entry.pending) {
                    if let Some(session) = self.sessions.get(&waiting.id) {
                        // A connection without snapshots takes it as the message it is.
                        let first = match session.outbox.snapshot_frame(&publication) {
                            Some(_) => &snapshot,
                            None => &frame,
                        };
                        Self::offer(
                            stats,
                            &mut slow,
                            waiting.id,
                            &session.outbox,
                            to_channel,
                            (first, &publication),
                        );
                        entry.active.insert(
                            waiting.id,
                            Subscriber {
                                outbox: session.outbox.clone(),
                                seq: publication.seq.unwrap_or(0),
                            },
                        );
                    }
                }
            }
            if entry.filling && !entry.pending.is_empty() {
                if entry.backlog.len() == BACKLOG_MAX {
                    entry.backlog.remove(0);
                }
                entry.backlog.push(publication.clone());
            }
            match &mut entry.held {
                Some(held) => {
                    if held.len() == HOLD_MAX {
                        // The read is slow: what is held goes out as it is, holding starts over.
                        let held = std::mem::take(held);
                        delivered += Self::fill(stats, &mut slow, entry, (&[], false), &held);
                    }
                    entry.held.get_or_insert_default().push(publication.clone());
                }
                None if copy => {
                    Stats::add(&stats.duplicates_dropped, entry.active.len() as u64);
                }
                None if publication.seq.is_some()
                    && (entry.epoch_stale
                        || position::needs_read(
                            entry.active.values().map(|to| to.seq),
                            publication.seq,
                        )) =>
                {
                    // A hole before this message (lost on the way), an epoch the link's outage may have
                    // changed, or a message every subscriber is past (a copy, or a sequence that expired
                    // and started over under a new epoch): one history read settles it; this channel's
                    // messages wait for it.
                    entry.held = Some(vec![publication.clone()]);
                    read_history = true;
                }
                None => {
                    let mut dropped = 0u64;
                    for (id, to) in entry.active.iter_mut() {
                        match admit(&mut to.seq, publication.seq) {
                            Verdict::Drop => dropped += 1,
                            Verdict::Deliver | Verdict::Gap { .. } => {
                                let frames = (&frame, &*publication);
                                Self::offer(stats, &mut slow, *id, &to.outbox, to_channel, frames);
                                delivered += 1;
                            }
                        }
                    }
                    Stats::add(&stats.duplicates_dropped, dropped);
                }
            }
            exact_subscribers = Some(&*entry);
        }
        // A user channel (`...#42`) goes to its exact subscribers only: a pattern cannot prove whose it is.
        let mut announce = Vec::new();
        if !self.patterns.is_empty() && channel_owner(&publication.channel).is_none() {
            let cap = self.max_pattern_positions;
            let sessions = &mut self.sessions;
            let (mut dropped, mut untracked) = (0u64, 0u64);
            let mut matching = self
                .patterns
                .iter_mut()
                .filter(|(prefix, _)| publication.channel.starts_with(&***prefix))
                .peekable();
            let first = matching.next();
            // Nested patterns (`a:*` and `a:b:*`) on one session: one look per copy, so remember who had it.
            let several = matching.peek().is_some();
            let sent = &mut self.pattern_sent;
            sent.clear();
            // A read in flight for this channel: the message waits behind it for the sessions that saw the
            // gap (past `HOLD_MAX` the held ones go out as they are first).
            let mut hold = self.pattern_holds.get_mut(channel);
            let mut overflow = Vec::new();
            if let Some(hold) = &mut hold {
                if hold.held.len() == HOLD_MAX {
                    overflow = std::mem::take(&mut hold.held);
                }
                hold.held.push(publication.clone());
            }
            let mut gapped = Vec::new();
            for (_, entry) in first.into_iter().chain(matching) {
                let to_channel = (
                    channel,
                    entry
                        .policy
                        .map_or(SlowConsumer::Disconnect, |p| p.slow_consumer),
                );
                for (_, backlog) in entry.recovering.values_mut() {
                    if backlog.len() == HOLD_MAX {
                        backlog.remove(0);
                        Stats::add(&stats.gaps_unfilled, 1);
                    }
                    backlog.push(publication.clone());
                }
                for (id, to) in &entry.subscribers {
                    // A session subscribed to the channel itself got it (or gets it after its snapshot).
                    if exact_subscribers.is_some_and(|exact| {
                        exact.active.contains_key(id) || exact.pending.iter().any(|w| w.id == *id)
                    }) {
                        continue;
                    }
                    if several && !sent.insert(*id) {
                        continue;
                    }
                    if hold.as_ref().is_some_and(|h| h.sessions.contains(id)) {
                        continue;
                    }
                    let Some(session) = sessions.get_mut(id) else {
                        continue;
                    };
                    match session.positions.admit_live(&publication, cap) {
                        Admission::Drop => {
                            dropped += 1;
                            continue;
                        }
                        Admission::Gap => {
                            gapped.push(*id);
                            continue;
                        }
                        Admission::Untracked => untracked += 1,
                        Admission::First if session.wants_epochs => announce.push((*id, false)),
                        Admission::Restarted if session.wants_epochs => announce.push((*id, true)),
                        Admission::First | Admission::Restarted | Admission::Deliver => {}
                    }
                    Self::offer(
                        stats,
                        &mut slow,
                        *id,
                        to,
                        to_channel,
                        (&frame, &publication),
                    );
                    delivered += 1;
                }
            }
            Stats::add(&stats.duplicates_dropped, dropped);
            Stats::add(&stats.pattern_positions_untracked, untracked);
            if !overflow.is_empty() {
                // The read is slow: what is held goes out as it is (the gap stays, counted).
                let ids: Vec<SessionId> = hold
                    .iter()
                    .flat_map(|h| h.sessions.iter().copied())
                    .collect();
                pattern_overflow = Some((ids, overflow));
            }
            if !gapped.is_empty() {
                match hold {
                    Some(hold) => hold.sessions.extend(gapped),
                    None => {
                        self.pattern_holds.insert(
                            channel.clone(),
                            PatternHold {
                                sessions: gapped.into_iter().collect(),
                                held: vec![publication.clone()],
                            },
                        );
                        read_pattern_history = true;
                    }
                }
            }
        }
        Stats::add(&stats.messages_delivered, delivered);
        self.metrics.delivered(&publication.channel, delivered);
        for id in slow.drain(..) {
            self.drop_slow(id);
        }
        self.slow = slow;
        if read_history {
            self.read_history(publication.channel.clone(), ctx);
        }
        for (id, restarted) in announce {
            self.announce_epoch(&publication.channel, id, restarted, ctx);
        }
        if let Some((ids, overflow)) = pattern_overflow {
            self.fill_patterns(&publication.channel, &ids, &[], &overflow, ctx);
        }
        if read_pattern_history {
            self.read_pattern_history(publication.channel.clone(), ctx);
        }
    }

    /// The namespace settings a pattern covering `channel` was subscribed with.
    fn pattern_policy(&self, channel: &str) -> Option<ChannelPolicy> {
        self.patterns
            .iter()
            .find(|(prefix, _)| channel.starts_with(&***prefix))
            .and_then(|(_, entry)| entry.policy)
    }

    /// Reads a channel's history for the pattern subscribers that saw a gap in it; their newer messages of
    /// the channel wait in its `PatternHold` meanwhile (bounded by `HOLD_MAX`; the read by
    /// `redis.command_timeout`). Held messages younger than the read wait for one more.
    fn read_pattern_history(&mut self, channel: Arc<str>, ctx: &mut Context<Self>) {
        let Some(policy) = self.pattern_policy(&channel) else {
            self.release_pattern_hold(&channel, &[], ctx);
            return;
        };
        self.spawn_window_read(
            channel,
            policy,
            ctx,
            |channel, window, act, ctx| match window {
                Ok(window) => {
                    let history = window.oldest_first();
                    let Some(hold) = act.pattern_holds.get_mut(&channel) else {
                        return;
                    };
                    let settled = position::settled(hold.held.iter().map(|p| p.seq), window.seq);
                    let later = hold.held.split_off(settled);
                    if later.is_empty() {
                        act.release_pattern_hold(&channel, &history, ctx);
                        return;
                    }
                    let now = std::mem::replace(&mut hold.held, later);
                    let ids: Vec<SessionId> = hold.sessions.iter().copied().collect();
                    act.fill_patterns(&channel, &ids, &history, &now, ctx);
                    act.read_pattern_history(channel, ctx);
                }
                Err(e) => {
                    log::warn!("reading the history of `{channel}` for a pattern gap failed: {e}");
                    act.release_pattern_hold(&channel, &[], ctx);
                }
            },
        );
    }

    /// Reads a channel's window (its epoch, newest seq and history) off the actor, then hands it to `then` on
    /// the actor: the registry goes on with its other work while the engine answers.
    fn spawn_window_read(
        &mut self,
        channel: Arc<str>,
        policy: ChannelPolicy,
        ctx: &mut Context<Self>,
        then: impl FnOnce(Arc<str>, Result<Window, EngineError>, &mut Self, &mut Context<Self>)
        + 'static,
    ) {
        let engine = self.engine.clone();
        let read = async move {
            let window = engine.window(&channel, policy).await;
            (channel, window)
        };
        ctx.spawn(
            read.into_actor(self)
                .map(move |(channel, window), act, ctx| then(channel, window, act, ctx)),
        );
    }

    /// Ends a channel's pattern hold: its sessions get what `history` fills and the held messages.
    fn release_pattern_hold(
        &mut self,
        channel: &Arc<str>,
        history: &[Arc<Publication>],
        ctx: &mut Context<Self>,
    ) {
        let Some(hold) = self.pattern_holds.remove(channel) else {
            return;
        };
        let ids: Vec<SessionId> = hold.sessions.into_iter().collect();
        self.fill_patterns(channel, &ids, history, &hold.held, ctx);
    }

    /// The pattern rule's fill for sessions of this registry: for each one still receiving `channel` through
    /// a pattern (not through its own exact subscription, which delivers it), history entries (oldest first)
    /// where it is missing them, merged with the held messages.
    fn fill_patterns(
        &mut self,
        channel: &Arc<str>,
        ids: &[SessionId],
        history_oldest_first: &[Arc<Publication>],
        held: &[Arc<Publication>],
        ctx: &mut Context<Self>,
    ) {
        let mode = self
            .pattern_policy(channel)
            .map_or(SlowConsumer::Disconnect, |p| p.slow_consumer);
        let cap = self.max_pattern_positions;
        let stats = &self.stats;
        let mut slow = std::mem::take(&mut self.slow);
        let mut tally = ReplayTally::default();
        let mut announce = Vec::new();
        let exact = self.channels.get(channel);
        for id in ids {
            let Some(session) = self.sessions.get_mut(id) else {
                continue;
            };
            if !session.patterns.iter().any(|p| channel.starts_with(&**p))
                || exact.is_some_and(|e| {
                    e.active.contains_key(id) || e.pending.iter().any(|w| w.id == *id)
                })
            {
                continue;
            }
            let outbox = session.outbox.clone();
            let wants_epochs = session.wants_epochs;
            let to = (*id, &outbox, mode);
            let restarted = Self::deliver_replay(stats, &mut slow, to, &mut tally, |give| {
                session
                    .positions
                    .fill(channel, history_oldest_first, held, cap, |message, step| {
                        let given = match step {
                            PatternStep::Held(Admission::Drop) => return,
                            PatternStep::Replayed => Given::Replayed,
                            PatternStep::Unfilled => Given::Unfilled,
                            PatternStep::Held(Admission::Untracked) => Given::Untracked,
                            PatternStep::Held(Admission::First) if wants_epochs => {
                                announce.push((*id, false));
                                Given::Delivered
                            }
                            PatternStep::Held(Admission::Restarted) if wants_epochs => {
                                announce.push((*id, true));
                                Given::Delivered
                            }
                            PatternStep::Held(_) => Given::Delivered,
                        };
                        give(message, given);
                    })
            });
            if restarted && wants_epochs {
                // The history showed the numbering started over: the epoch the client holds is stale.
                announce.push((*id, true));
            }
        }
        tally.count(stats);
        self.delivered(channel, tally.delivered, slow);
        for (id, restarted) in announce {
            self.announce_epoch(channel, id, restarted, ctx);
        }
    }

    /// After a pub/sub outage: reads the history of the channels this registry's pattern subscribers have
    /// positions in (at most `channels.max_pattern_positions` channels per catch-up; the rest are counted in
    /// `pattern_catch_ups_truncated`), and gives each subscriber what it missed, through the pattern rule.
    fn catch_up_patterns(&mut self, ctx: &mut Context<Self>) {
        use futures_util::StreamExt;
        let mut wanted: HashMap<Arc<str>, Vec<SessionId>> = HashMap::new();
        for (id, session) in &self.sessions {
            if session.patterns.is_empty() {
                continue;
            }
            for channel in session.positions.channels() {
                wanted.entry(channel.clone()).or_default().push(*id);
            }
        }
        let cap = self.max_pattern_positions;
        if wanted.len() > cap {
            Stats::add(
                &self.stats.pattern_catch_ups_truncated,
                (wanted.len() - cap) as u64,
            );
        }
        let reads: Vec<(Arc<str>, Vec<SessionId>, ChannelPolicy)> = wanted
            .into_iter()
            .filter_map(|(channel, ids)| {
                let policy = self.pattern_policy(&channel)?;
                Some((channel, ids, policy))
            })
            .take(cap)
            .collect();
        if reads.is_empty() {
            return;
        }
        let engine = self.engine.clone();
        let fut = async move {
            futures_util::stream::iter(reads)
                .map(|(channel, ids, policy)| {
                    let engine = engine.clone();
                    async move {
                        let window = engine.window(&channel, policy).await;
                        (channel, ids, window)
                    }
                })
                .buffered(RECOVERY_READS)
                .collect::<Vec<_>>()
                .await
        };
        ctx.spawn(fut.into_actor(self).map(|windows, act, ctx| {
            for (channel, ids, window) in windows {
                let window = match window {
                    Ok(window) => window,
                    Err(e) => {
                        log::warn!(
                            "catching up `{channel}` for pattern subscribers after the pub/sub outage failed: {e}"
                        );
                        continue;
                    }
                };
                let history = window.oldest_first();
                // A session whose messages of the channel are held for a gap read gets the catch-up too: the
                // rule admits only what is above its position, so the held ones follow in order or drop.
                act.fill_patterns(&channel, &ids, &history, &[], ctx);
            }
        }));
    }

    /// Reads a channel's history for the messages held (a gap, or a stale epoch); the registry goes on with
    /// its other work meanwhile, and the channel's newer messages wait in `held` (bounded by `HOLD_MAX`; the
    /// read by `redis.command_timeout`).
    fn read_history(&mut self, channel: Arc<str>, ctx: &mut Context<Self>) {
        let Some(entry) = self.channels.get(&channel) else {
            return;
        };
        let (epoch, policy, link_downs) = (entry.epoch, entry.policy, self.link_downs);
        self.spawn_window_read(channel, policy, ctx, move |channel, window, act, ctx| {
            let Some(entry) = act.channels.get_mut(&channel) else {
                return;
            };
            if entry.epoch != epoch {
                return;
            }
            let mut held = entry.held.take().unwrap_or_default();
            match window {
                Ok(window) => {
                    let later =
                        held.split_off(position::settled(held.iter().map(|p| p.seq), window.seq));
                    act.apply_window(&channel, &window, &held, link_downs);
                    if !later.is_empty()
                        && let Some(entry) = act.channels.get_mut(&channel)
                    {
                        // Younger than the read: they wait, in order, for one more.
                        entry.held = Some(later);
                        act.read_history(channel, ctx);
                    }
                }
                Err(e) => {
                    log::warn!("reading the history of `{channel}` to fill a gap failed: {e}");
                    let mut slow = std::mem::take(&mut act.slow);
                    let delivered = Self::fill(&act.stats, &mut slow, entry, (&[], false), &held);
                    act.delivered(&channel, delivered, slow);
                }
            }
        });
    }

    /// A channel's history as read after a gap, a pub/sub outage or both: each active subscriber gets what it
    /// is missing from it, in order, merged with the messages that were held meanwhile. Under a new epoch
    /// (the backend numbered over) positions start from zero.
    fn apply_window(
        &mut self,
        channel: &Arc<str>,
        window: &Window,
        held: &[Arc<Publication>],
        link_downs: u64,
    ) {
        let Some(entry) = self.channels.get_mut(channel) else {
            return;
        };
        let known = entry.history_epoch.replace(window.epoch.clone());
        let restarted = known.is_some_and(|known| known != window.epoch);
        if restarted {
            for subscriber in entry.active.values_mut() {
                subscriber.seq = 0;
            }
        }
        if link_downs == self.link_downs {
            entry.epoch_stale = false;
        }
        let history = window.oldest_first();
        let mut slow = std::mem::take(&mut self.slow);
        let delivered = Self::fill(&self.stats, &mut slow, entry, (&history, restarted), held);
        self.delivered(channel, delivered, slow);
    }

    /// Counts deliveries made outside a fan-out and drops the subscribers found slow meanwhile.
    fn delivered(&mut self, channel: &str, delivered: u64, mut slow: Vec<SessionId>) {
        Stats::add(&self.stats.messages_delivered, delivered);
        self.metrics.delivered(channel, delivered);
        for id in slow.drain(..) {
            self.drop_slow(id);
        }
        self.slow = slow;
    }

    /// The ordering rule's fill for every active subscriber of a channel: history entries (oldest first)
    /// where each subscriber is missing them, merged with the held messages. `restarted`: the history is of a
    /// numbering that started over (a new epoch), whose start, when history lost it, counts as unfilled.
    /// Returns the frames given.
    fn fill(
        stats: &Stats,
        slow: &mut Vec<SessionId>,
        entry: &mut ChannelEntry,
        (history_oldest_first, restarted): (&[Arc<Publication>], bool),
        held: &[Arc<Publication>],
    ) -> u64 {
        let history: Vec<(u64, &Arc<Publication>)> = history_oldest_first
            .iter()
            .filter_map(|p| p.seq.map(|seq| (seq, p)))
            .collect();
        let held: Vec<(Option<u64>, &Arc<Publication>)> = held.iter().map(|p| (p.seq, p)).collect();
        let mut tally = ReplayTally::default();
        let mode = entry.policy.slow_consumer;
        for (id, subscriber) in entry.active.iter_mut() {
            let to = (*id, &subscriber.outbox, mode);
            Self::deliver_replay(stats, slow, to, &mut tally, |give| {
                position::fill(
                    &mut subscriber.seq,
                    &history,
                    &held,
                    restarted,
                    |message, step| give(message, step.into()),
                )
            });
        }
        tally.count(stats);
        tally.delivered
    }

    /// Delivers one subscriber's share of a replay (a gap's fill or a catch-up after an outage): `admit` runs
    /// the subscriber's kind of ordering rule (exact or pattern positions), handing each message to the sink
    /// it is given with what became of it; every message not dropped is offered to the subscriber, and
    /// `tally` counts them all. Returns what `admit` returns.
    fn deliver_replay<R>(
        stats: &Stats,
        slow: &mut Vec<SessionId>,
        (id, outbox, mode): (SessionId, &Outbox, SlowConsumer),
        tally: &mut ReplayTally,
        admit: impl FnOnce(&mut dyn FnMut(&Arc<Publication>, Given)) -> R,
    ) -> R {
        admit(&mut |message, given| {
            match given {
                Given::Dropped => {
                    tally.dropped += 1;
                    return;
                }
                Given::Replayed => tally.replayed += 1,
                Given::Unfilled => tally.unfilled += 1,
                Given::Untracked => tally.untracked += 1,
                Given::Delivered => {}
            }
            Self::offer(
                stats,
                slow,
                id,
                outbox,
                (&message.channel, mode),
                (&message.wire(), message),
            );
            tally.delivered += 1;
        })
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
        let ended = entry.active.remove(&id);
        let was_active = ended.is_some();
        if let Some(ended) = ended
            && let Some(session) = self.sessions.get_mut(&id)
            && session.patterns.iter().any(|p| channel.starts_with(&**p))
        {
            // The session's patterns deliver the channel from now on, from where the exact subscription was.
            session.positions.set(
                channel,
                ended.seq,
                entry.latest.clone(),
                self.max_pattern_positions,
            );
        }
        let before = entry.pending.len();
        entry.pending.retain(|w| w.id != id);
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
            entry.waiting.retain(|w| w.id != id);
            let recovering = entry.recovering.remove(&id).is_some();
            if entry.subscribers.remove(&id).is_some()
                || entry.waiting.len() != waited
                || recovering
            {
                self.fanout.pattern_subscriber_left(prefix);
            }
            if entry.subscribers.is_empty()
                && entry.waiting.is_empty()
                && entry.recovering.is_empty()
            {
                self.patterns.remove(prefix);
                self.engine.unsubscribe_pattern(prefix.clone());
            }
        }
    }

    fn subscribe_channel(
        &mut self,
        id: SessionId,
        channel: Arc<str>,
        msg: Subscribe,
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
                history_epoch: None,
                epoch_stale: false,
                policy: msg.policy,
                latest: None,
                backlog: Vec::new(),
                watched: false,
                filling: false,
                awaiting_publish: false,
                held: None,
                epoch: self.next_epoch,
            }
        });
        if let (Some(latest), Some(epoch), None, false) = (
            &entry.latest,
            &entry.history_epoch,
            &msg.since,
            entry.epoch_stale,
        ) {
            // The local latest value is current: this registry has been receiving the channel all along.
            Stats::add(&stats.cache_hits, 1);
            self.observer.cache_read(&channel, 1, 0);
            let seq = latest.seq.unwrap_or(0);
            let ack =
                protocol::positioned_subscribed_frame(&msg.request, &channel, epoch, seq, None);
            let mode = entry.policy.slow_consumer;
            Self::owe(
                stats,
                &outbox,
                mode,
                None,
                crate::transport::frame::text(&ack),
            );
            if let Some(snapshot) = outbox.snapshot_frame(latest) {
                Self::owe(stats, &outbox, mode, Some(&channel), snapshot);
            }
            entry.active.insert(id, Subscriber { outbox, seq });
            return;
        }
        let acked = entry.awaiting_publish;
        if acked {
            // Acknowledged now; the job's first value follows as the snapshot.
            let frame =
                crate::transport::frame::text(&protocol::subscribed_frame(&msg.request, &channel));
            Self::owe(stats, &outbox, entry.policy.slow_consumer, None, frame);
        }
        entry.pending.push(Waiting {
            id,
            request: msg.request,
            since: msg.since,
            acked,
        });
        if acked || entry.filling {
            return;
        }
        entry.filling = true;
        let watch = !entry.watched;
        entry.watched = true;
        let epoch = entry.epoch;
        let policy = entry.policy;
        let link_downs = self.link_downs;
        let engine = self.engine.clone();
        // Sent now, not from the future: an unsubscribe right behind this subscribe must reach the bridge after
        // the watch, or the bridge would keep a Redis subscription nobody needs.
        let confirmed = watch.then(|| engine.subscribe(channel.clone()));
        let fill = async move {
            if let Some(confirmed) = confirmed {
                confirmed.await;
            }
            let read_at = Instant::now();
            let window = match engine.window(&channel, policy).await {
                Ok(window) => Some(window),
                Err(e) => {
                    log::warn!("reading the position of `{channel}` failed: {e}");
                    None
                }
            };
            (channel, window, read_at)
        };
        ctx.spawn(
            fill.into_actor(self)
                .map(move |(channel, window, read_at), act, ctx| {
                    act.filled(channel, (epoch, link_downs), window, read_at, ctx);
                }),
        );
    }

    /// The window read of a channel finished: let its pending subscribers in. A subscriber whose `since` the
    /// history still covers gets every message after it, in order; any other gets the newest value as its
    /// snapshot. Messages that arrived meanwhile follow, through the ordering rule. The channel's active
    /// subscribers (when it had some) take the read like any history read: under a new epoch their positions
    /// start over.
    fn filled(
        &mut self,
        channel: Arc<str>,
        (epoch, link_downs): (u64, u64),
        window: Option<Window>,
        read_at: Instant,
        ctx: &mut Context<Self>,
    ) {
        let Some(entry) = self.channels.get_mut(&channel) else {
            return;
        };
        if entry.epoch != epoch {
            return;
        }
        if let Some(window) = &window
            && !window.epoch.is_empty()
            && !entry.active.is_empty()
        {
            self.apply_window(&channel, window, &[], link_downs);
        }
        let Some(entry) = self.channels.get_mut(&channel) else {
            return;
        };
        entry.filling = false;
        let stats = &self.stats;
        let backlog = std::mem::take(&mut entry.backlog);
        // A failed read: no position to offer, the subscription still starts (as with an empty channel).
        let window = window.unwrap_or_else(|| Window {
            epoch: "".into(),
            seq: 0,
            latest: None,
            history: Vec::new(),
        });
        if !window.epoch.is_empty() {
            entry.history_epoch = Some(window.epoch.clone());
            if link_downs == self.link_downs {
                entry.epoch_stale = false;
            }
        }
        let cached = window.latest.clone().or_else(|| entry.latest.clone());
        if entry.latest.is_none() {
            entry.latest = cached.clone();
        }
        let ack = |w: &Waiting, recovered: Option<bool>| {
            crate::transport::frame::text(&protocol::positioned_subscribed_frame(
                &w.request,
                &channel,
                &window.epoch,
                window.seq,
                recovered,
            ))
        };
        let recovering = entry.pending.iter().any(|w| w.since.is_some());
        if cached.is_none() && backlog.is_empty() && !recovering {
            Stats::add(&stats.cache_misses, entry.pending.len() as u64);
            self.observer
                .cache_read(&channel, 0, entry.pending.len() as u64);
            let awaiting = self.observer.request_fill(&channel, read_at);
            for waiting in &mut entry.pending {
                if let Some(session) = self.sessions.get(&waiting.id) {
                    let mode = entry.policy.slow_consumer;
                    Self::owe(stats, &session.outbox, mode, None, ack(waiting, None));
                    waiting.acked = true;
                }
            }
            if awaiting {
                // The poller fetches the value now; subscribers get it as their snapshot.
                entry.awaiting_publish = true;
                ctx.run_later(FILL_WAIT, move |act, _| act.stop_waiting(&channel, epoch));
            } else {
                for waiting in std::mem::take(&mut entry.pending) {
                    if let Some(session) = self.sessions.get(&waiting.id) {
                        entry.active.insert(
                            waiting.id,
                            Subscriber {
                                outbox: session.outbox.clone(),
                                seq: window.seq,
                            },
                        );
                    }
                }
            }
            return;
        }
        let (counter, read) = if cached.is_some() {
            (&stats.cache_hits, (entry.pending.len() as u64, 0))
        } else {
            (&stats.cache_misses, (0, entry.pending.len() as u64))
        };
        Stats::add(counter, entry.pending.len() as u64);
        self.observer.cache_read(&channel, read.0, read.1);
        // With no cached value, the first message that arrived meanwhile is the value the subscription starts from.
        let (snapshot, backlog) = match cached {
            Some(cached) => (Some(cached), backlog),
            None => {
                let mut backlog = backlog.into_iter();
                (backlog.next(), backlog.collect())
            }
        };
        let mode = entry.policy.slow_consumer;
        for waiting in std::mem::take(&mut entry.pending) {
            let Some(session) = self.sessions.get(&waiting.id) else {
                continue;
            };
            let outbox = &session.outbox;
            let replay = waiting
                .since
                .as_ref()
                .and_then(|since| window.replay_after(since));
            let mut seq = window.seq;
            match (&waiting.since, replay) {
                (Some(since), Some(missed)) => {
                    Stats::add(&stats.subscribes_recovered, 1);
                    Stats::add(&stats.messages_replayed, missed.len() as u64);
                    Self::owe(stats, outbox, mode, None, ack(&waiting, Some(true)));
                    for message in &missed {
                        Self::owe(
                            stats,
                            outbox,
                            mode,
                            Some(&channel),
                            outbox.message_frame(message),
                        );
                    }
                    seq = seq.max(since.seq);
                }
                (since, _) => {
                    if since.is_some() {
                        Stats::add(&stats.subscribes_unrecovered, 1);
                    }
                    let frame = ack(&waiting, since.as_ref().map(|_| false));
                    Self::owe(stats, outbox, mode, None, frame);
                    if let Some(snapshot) = &snapshot {
                        if let Some(frame) = outbox.snapshot_frame(snapshot) {
                            Self::owe(stats, outbox, mode, Some(&channel), frame);
                        }
                        seq = seq.max(snapshot.seq.unwrap_or(0));
                    }
                }
            }
            for message in &backlog {
                if admit(&mut seq, message.seq) != Verdict::Drop {
                    Self::owe(
                        stats,
                        outbox,
                        mode,
                        Some(&channel),
                        outbox.message_frame(message),
                    );
                }
            }
            entry.active.insert(
                waiting.id,
                Subscriber {
                    outbox: outbox.clone(),
                    seq,
                },
            );
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
        for waiting in std::mem::take(&mut entry.pending) {
            if let Some(session) = self.sessions.get(&waiting.id) {
                entry.active.insert(
                    waiting.id,
                    Subscriber {
                        outbox: session.outbox.clone(),
                        seq: 0,
                    },
                );
            }
        }
    }

    fn subscribe_pattern(
        &mut self,
        id: SessionId,
        prefix: Arc<str>,
        msg: Subscribe,
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
        entry.policy = Some(msg.policy);
        let waiting = PatternWaiting {
            id,
            ack: msg.ack,
            request: msg.request,
            since: msg.since_channels,
        };
        if entry.live {
            self.let_in_pattern(prefix, vec![waiting], ctx);
            return;
        }
        entry.waiting.push(waiting);
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
            let waiting = std::mem::take(&mut entry.waiting);
            act.let_in_pattern(prefix, waiting, ctx);
        }));
    }

    /// Lets sessions into a live pattern: a plain subscribe at once (acknowledged, then the matching
    /// snapshots); one with `since` once its named channels are read (see `recover_pattern`).
    fn let_in_pattern(
        &mut self,
        prefix: Arc<str>,
        waiting: Vec<PatternWaiting>,
        ctx: &mut Context<Self>,
    ) {
        let Some(entry) = self.patterns.get_mut(&prefix) else {
            return;
        };
        let mut ids = Vec::new();
        let mut recovering = Vec::new();
        for waiting in waiting {
            let Some(session) = self.sessions.get(&waiting.id) else {
                continue;
            };
            if waiting.since.is_none() {
                let mode = entry
                    .policy
                    .map_or(SlowConsumer::Disconnect, |p| p.slow_consumer);
                Self::owe(&self.stats, &session.outbox, mode, None, waiting.ack);
                entry.subscribers.insert(waiting.id, session.outbox.clone());
                ids.push(waiting.id);
            } else {
                // Matching messages wait for the replay from now on: the reads start after the pattern is
                // live, so whatever they miss is held here.
                self.next_epoch += 1;
                entry
                    .recovering
                    .insert(waiting.id, (self.next_epoch, Vec::new()));
                recovering.push((waiting, self.next_epoch));
            }
        }
        let policy = entry.policy;
        self.send_pattern_snapshots(prefix.clone(), ids, ctx);
        for (waiting, read) in recovering {
            self.recover_pattern(prefix.clone(), (waiting, read), policy, ctx);
        }
    }

    /// Reads the window of every channel a pattern subscribe's `since` names, then acknowledges with what was
    /// recovered, replays (or sends the snapshot of) each, and lets the session in behind that, through the
    /// ordering rule, with the messages held meanwhile.
    fn recover_pattern(
        &mut self,
        prefix: Arc<str>,
        (waiting, read): (PatternWaiting, u64),
        policy: Option<ChannelPolicy>,
        ctx: &mut Context<Self>,
    ) {
        use futures_util::StreamExt;
        let Some(policy) = policy else {
            return;
        };
        let engine = self.engine.clone();
        let channels: Vec<Arc<str>> = waiting
            .since
            .iter()
            .flatten()
            .map(|(c, _)| c.clone())
            .collect();
        let reads = async move {
            futures_util::stream::iter(channels)
                .map(|channel| {
                    let engine = engine.clone();
                    async move { engine.window(&channel, policy).await }
                })
                .buffered(RECOVERY_READS)
                .collect::<Vec<_>>()
                .await
        };
        ctx.spawn(reads.into_actor(self).map(move |windows, act, ctx| {
            act.recovered_pattern(prefix, (waiting, read), windows, ctx);
        }));
    }

    fn recovered_pattern(
        &mut self,
        prefix: Arc<str>,
        (waiting, read): (PatternWaiting, u64),
        windows: Vec<Result<Window, EngineError>>,
        ctx: &mut Context<Self>,
    ) {
        let Some(entry) = self.patterns.get_mut(&prefix) else {
            return;
        };
        // Gone meanwhile (unsubscribed, disconnected, or the entry was made anew), or subscribed again
        // since: that later read answers instead.
        if entry
            .recovering
            .get(&waiting.id)
            .is_none_or(|(r, _)| *r != read)
        {
            return;
        }
        let Some((_, backlog)) = entry.recovering.remove(&waiting.id) else {
            return;
        };
        let Some(session) = self.sessions.get_mut(&waiting.id) else {
            return;
        };
        session.wants_epochs = true;
        let stats = &self.stats;
        let cap = self.max_pattern_positions;
        let outbox = session.outbox.clone();
        let mut answers = Vec::with_capacity(windows.len());
        let mut frames: Vec<(Arc<str>, Bytes)> = Vec::new();
        let mode = entry
            .policy
            .map_or(SlowConsumer::Disconnect, |p| p.slow_consumer);
        for ((channel, since), window) in waiting.since.iter().flatten().zip(windows) {
            let window = match window {
                Ok(window) => window,
                Err(e) => {
                    log::warn!(
                        "reading the history of `{channel}` for a pattern recovery failed: {e}"
                    );
                    Stats::add(&stats.subscribes_unrecovered, 1);
                    answers.push((channel.clone(), false, None));
                    continue;
                }
            };
            // A channel the session also holds exactly is delivered by that subscription.
            let exact = self.channels.get(channel).is_some_and(|e| {
                e.active.contains_key(&waiting.id) || e.pending.iter().any(|w| w.id == waiting.id)
            });
            let latest = window
                .latest
                .clone()
                .filter(|latest| latest.seq.is_some() && latest.seq == Some(window.seq));
            let recovered = match window.replay_after(since) {
                Some(missed) => {
                    Stats::add(&stats.subscribes_recovered, 1);
                    if !exact {
                        Stats::add(&stats.messages_replayed, missed.len() as u64);
                        frames.extend(
                            missed
                                .iter()
                                .map(|m| (channel.clone(), outbox.message_frame(m))),
                        );
                        let newest = missed.last().cloned().or(latest);
                        session
                            .positions
                            .set(channel, window.seq.max(since.seq), newest, cap);
                    }
                    true
                }
                None => {
                    Stats::add(&stats.subscribes_unrecovered, 1);
                    if !exact {
                        let mut seq = window.seq;
                        if let Some(snapshot) = &window.latest {
                            if let Some(frame) = outbox.snapshot_frame(snapshot) {
                                frames.push((channel.clone(), frame));
                            }
                            seq = seq.max(snapshot.seq.unwrap_or(0));
                        }
                        session.positions.set(channel, seq, latest, cap);
                    }
                    false
                }
            };
            answers.push((
                channel.clone(),
                recovered,
                Some((window.epoch.clone(), window.seq)),
            ));
        }
        let name = format!("{prefix}*");
        let ack = protocol::pattern_subscribed_frame(&waiting.request, &name, &answers);
        Self::owe(
            stats,
            &outbox,
            mode,
            None,
            crate::transport::frame::text(&ack),
        );
        let mut delivered = frames.len() as u64;
        for (channel, frame) in frames {
            Self::owe(stats, &outbox, mode, Some(&channel), frame);
        }
        let mut announce = Vec::new();
        for message in &backlog {
            let exact = self.channels.get(&message.channel).is_some_and(|e| {
                e.active.contains_key(&waiting.id) || e.pending.iter().any(|w| w.id == waiting.id)
            });
            if exact {
                continue;
            }
            match session.positions.admit(message, cap) {
                Admission::Drop => {
                    Stats::add(&stats.duplicates_dropped, 1);
                    continue;
                }
                Admission::Untracked => Stats::add(&stats.pattern_positions_untracked, 1),
                Admission::First => announce.push((message.channel.clone(), false)),
                Admission::Restarted => announce.push((message.channel.clone(), true)),
                Admission::Deliver | Admission::Gap => {}
            }
            let frame = outbox.message_frame(message);
            Self::owe(stats, &outbox, mode, Some(&message.channel), frame);
            delivered += 1;
        }
        Stats::add(&stats.messages_delivered, delivered);
        if let Some(entry) = self.patterns.get_mut(&prefix) {
            entry.subscribers.insert(waiting.id, outbox);
        }
        for (channel, restarted) in announce {
            self.announce_epoch(&channel, waiting.id, restarted, ctx);
        }
        self.send_pattern_snapshots(prefix, vec![waiting.id], ctx);
    }

    /// Tells a pattern subscriber the epoch of a channel it has started to receive (or whose numbering started
    /// over), so it can resume it with `since`. One read per channel and registry, shared by every session
    /// waiting for it; an exact subscription's current epoch needs none.
    fn announce_epoch(
        &mut self,
        channel: &Arc<str>,
        id: SessionId,
        restarted: bool,
        ctx: &mut Context<Self>,
    ) {
        if restarted {
            self.epochs.remove(channel);
        }
        let known = self
            .channels
            .get(channel)
            .filter(|e| !e.epoch_stale && e.held.is_none() && !restarted)
            .and_then(|e| e.history_epoch.clone());
        let known = known.or_else(|| match self.epochs.get(channel) {
            Some(EpochLookup::Known(epoch)) => Some(epoch.clone()),
            _ => None,
        });
        if let Some(epoch) = known {
            if let Some(session) = self.sessions.get(&id) {
                let frame = crate::transport::frame::text(&protocol::epoch_frame(channel, &epoch));
                let mode = self
                    .pattern_policy(channel)
                    .map_or(SlowConsumer::Disconnect, |p| p.slow_consumer);
                Self::owe(&self.stats, &session.outbox, mode, None, frame);
            }
            return;
        }
        if let Some(EpochLookup::Reading(waiting)) = self.epochs.get_mut(channel) {
            if !waiting.contains(&id) {
                waiting.push(id);
            }
            return;
        }
        let Some(policy) = self
            .patterns
            .iter()
            .find(|(prefix, _)| channel.starts_with(&***prefix))
            .and_then(|(_, entry)| entry.policy)
        else {
            return;
        };
        if self.epochs.len() >= EPOCHS_MAX {
            self.epochs
                .retain(|_, lookup| matches!(lookup, EpochLookup::Reading(_)));
        }
        self.epochs
            .insert(channel.clone(), EpochLookup::Reading(vec![id]));
        let link_downs = self.link_downs;
        self.spawn_window_read(
            channel.clone(),
            policy,
            ctx,
            move |channel, window, act, ctx| {
                let Some(EpochLookup::Reading(waiting)) = act.epochs.remove(&channel) else {
                    return;
                };
                let epoch = match window {
                    Ok(window) if !window.epoch.is_empty() => window.epoch,
                    Ok(_) => return,
                    Err(e) => {
                        log::warn!(
                            "reading the epoch of `{channel}` for pattern subscribers failed: {e}"
                        );
                        return;
                    }
                };
                if link_downs != act.link_downs {
                    // The link dropped meanwhile: the epoch read may predate a restart; read it again.
                    for id in waiting {
                        act.announce_epoch(&channel, id, false, ctx);
                    }
                    return;
                }
                let frame = crate::transport::frame::text(&protocol::epoch_frame(&channel, &epoch));
                let mode = act
                    .pattern_policy(&channel)
                    .map_or(SlowConsumer::Disconnect, |p| p.slow_consumer);
                for id in waiting {
                    if let Some(session) = act.sessions.get(&id) {
                        Self::owe(&act.stats, &session.outbox, mode, None, frame.clone());
                    }
                }
                act.epochs.insert(channel, EpochLookup::Known(epoch));
            },
        );
    }

    /// Sends the latest values of channels matching a pattern (bounded by configuration) to new subscribers:
    /// a channel the session already has a position in (a live message came first, or it was recovered) gets
    /// none, since the snapshot could only be older.
    fn send_pattern_snapshots(
        &mut self,
        prefix: Arc<str>,
        ids: Vec<SessionId>,
        ctx: &mut Context<Self>,
    ) {
        if ids.is_empty() {
            return;
        }
        let (engine, limit) = (self.engine.clone(), self.max_pattern_snapshots);
        let read = prefix.clone();
        let fut = async move { engine.latest_matching(&read, limit).await };
        ctx.spawn(fut.into_actor(self).map(move |snapshots, act, ctx| {
            let shown: Vec<_> = snapshots
                .iter()
                .filter(|p| channel_owner(&p.channel).is_none())
                .collect();
            let cap = act.max_pattern_positions;
            let mode = act
                .patterns
                .get(&prefix)
                .and_then(|entry| entry.policy)
                .map_or(SlowConsumer::Disconnect, |p| p.slow_consumer);
            let mut announce = Vec::new();
            for id in ids {
                let Some(session) = act.sessions.get_mut(&id) else {
                    continue;
                };
                for snapshot in &shown {
                    if session.positions.get(&snapshot.channel).is_some() {
                        continue;
                    }
                    // Each publication frames its snapshot (envelope or raw) once, for every session.
                    let Some(frame) = session.outbox.snapshot_frame(snapshot) else {
                        continue;
                    };
                    Self::owe(
                        &act.stats,
                        &session.outbox,
                        mode,
                        Some(&snapshot.channel),
                        frame,
                    );
                    if let Some(seq) = snapshot.seq
                        && session.positions.set(
                            &snapshot.channel,
                            seq,
                            Some((*snapshot).clone()),
                            cap,
                        )
                        && session.wants_epochs
                    {
                        announce.push((id, snapshot.channel.clone()));
                    }
                }
            }
            for (id, channel) in announce {
                act.announce_epoch(&channel, id, false, ctx);
            }
        }));
    }
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
                positions: PatternPositions::default(),
                wants_epochs: false,
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
            Target::Channel(ref channel) => {
                let channel: Arc<str> = channel.as_str().into();
                self.subscribe_channel(msg.id, channel, msg, ctx)
            }
            Target::Pattern(ref prefix) => {
                let prefix: Arc<str> = prefix.as_str().into();
                self.subscribe_pattern(msg.id, prefix, msg, ctx)
            }
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
                // Positions of channels no remaining pattern covers go with it: a later subscribe starts
                // from their snapshots again.
                let patterns = &session.patterns;
                session
                    .positions
                    .retain(|channel| patterns.iter().any(|p| channel.starts_with(&**p)));
                self.remove_from_pattern(msg.id, &prefix);
            }
        }
    }
}

impl Handler<Dispatch> for Registry {
    type Result = ();

    fn handle(&mut self, msg: Dispatch, ctx: &mut Context<Self>) {
        self.dispatch(msg.0, ctx);
    }
}

impl Handler<Announce> for Registry {
    type Result = ();

    /// `join` and `leave` go to the channel's live exact subscribers that speak the protocol; they are not
    /// messages (no seq, no slot of their own). Over its bound a subscriber is the usual slow consumer, or,
    /// in a conflating namespace, just misses the announcement.
    fn handle(&mut self, msg: Announce, _: &mut Context<Self>) {
        let Some(entry) = self.channels.get(&msg.channel) else {
            return;
        };
        let conflate = entry.policy.slow_consumer == SlowConsumer::Conflate;
        let mut slow = std::mem::take(&mut self.slow);
        for (id, subscriber) in &entry.active {
            if Some(*id) != msg.skip
                && subscriber.outbox.push_reply(msg.frame.clone()).is_err()
                && !conflate
            {
                slow.push(*id);
            }
        }
        for id in slow.drain(..) {
            self.drop_slow(id);
        }
        self.slow = slow;
    }
}

impl Handler<ForgetLatest> for Registry {
    type Result = ();

    fn handle(&mut self, _: ForgetLatest, _: &mut Context<Self>) {
        // Positions are kept: if the backend kept its numbering, the next message or the catch-up fills what
        // was missed; if it started over, the history read that the stale epoch forces says so.
        self.link_downs += 1;
        for entry in self.channels.values_mut() {
            entry.epoch_stale = true;
        }
        // Pattern subscribers' positions are kept (a copy is still a copy, and a numbering that started over
        // shows itself by its younger messages); the epochs they were told are read again when announced.
        self.epochs.clear();
    }
}

impl Handler<CatchUp> for Registry {
    type Result = ();

    fn handle(&mut self, msg: CatchUp, _: &mut Context<Self>) {
        for (channel, window) in msg.0.iter() {
            if self.channels.contains_key(channel) {
                // Messages held for a read in flight stay held; they go out when it answers, behind these.
                self.apply_window(channel, window, &[], self.link_downs);
            }
        }
    }
}

impl Handler<LinkUp> for Registry {
    type Result = ();

    fn handle(&mut self, _: LinkUp, ctx: &mut Context<Self>) {
        self.catch_up_patterns(ctx);
    }
}

impl Handler<CloseAll> for Registry {
    type Result = ();

    fn handle(&mut self, msg: CloseAll, ctx: &mut Context<Self>) {
        let pending: Vec<SessionId> = self.sessions.keys().copied().collect();
        let drain = Drain {
            total: pending.len(),
            pending,
            started: Instant::now(),
            period: msg.over,
        };
        self.drain(drain, ctx);
    }
}

/// A registry's closes still to make during a graceful shutdown.
struct Drain {
    pending: Vec<SessionId>,
    total: usize,
    started: Instant,
    period: Duration,
}

impl Registry {
    /// Closes what is due by now, so that the k-th of n closes falls at k/n of the period, and comes back on
    /// the next tick for the rest: clients leave a draining replica a few at a time, and the survivors see
    /// no herd.
    fn drain(&mut self, mut drain: Drain, ctx: &mut Context<Self>) {
        let elapsed = drain.started.elapsed();
        let due = if elapsed >= drain.period {
            drain.total
        } else {
            // ceil(total * elapsed / period), in whole microseconds.
            let period = drain.period.as_micros().max(1);
            usize::try_from((drain.total as u128 * elapsed.as_micros()).div_ceil(period))
                .unwrap_or(drain.total)
        };
        let closed = drain.total - drain.pending.len();
        let now = due.saturating_sub(closed).min(drain.pending.len());
        for id in drain.pending.split_off(drain.pending.len() - now) {
            if let Some(session) = self.sessions.get(&id) {
                session
                    .outbox
                    .close(close::GOING_AWAY, "server shutting down");
            }
        }
        if !drain.pending.is_empty() {
            ctx.run_later(DRAIN_TICK, move |act, ctx| act.drain(drain, ctx));
        }
    }
}
