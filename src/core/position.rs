//! Positions in a channel's history and the one ordering rule every delivery goes through.
//!
//! A channel's messages are numbered by `seq` within an `epoch`: a short string the engine chooses when the
//! channel's numbering starts, and changes whenever numbering may have restarted (a Redis that lost its data,
//! a memory-mode restart). A subscriber's position is the newest `seq` it has been given. Whatever path a
//! message takes to a subscriber (its own echo from Redis, a local delivery while the link was down, a
//! catch-up after an outage, a history replay on resubscribe, a pattern copy beside an exact one), it is
//! delivered only when its `seq` is above the position, which then moves to it; at or below, it is a copy
//! and is dropped. Messages without a `seq` (raw PUBLISHes of outside producers) are delivered as they come:
//! at most once, never deduplicated.
//!
//! A message whose `seq` jumps past the position (the ones between were lost on the way, for example on a
//! pub/sub link that dropped) is a gap: the node holds it, reads the channel's history once, and [`fill`]
//! gives each subscriber the missing messages before the held ones, or the held ones alone when history no
//! longer has what is missing.

use std::collections::HashMap;
use std::sync::Arc;

/// Where a client (or a subscriber) stands in a channel: the newest `seq` it saw under `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub epoch: String,
    pub seq: u64,
}

/// What the ordering rule says about one message for one subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Deliver it.
    Deliver,
    /// A copy of something delivered already (or older): drop it.
    Drop,
    /// Deliver it, but the subscriber missed `seq`s between its position and this one.
    Gap { after: u64 },
}

/// Applies the ordering rule to a subscriber at `position` (0: nothing seen yet under the channel's epoch)
/// for a message numbered `seq`, moving the position when the message is delivered.
pub fn admit(position: &mut u64, seq: Option<u64>) -> Verdict {
    let Some(seq) = seq else {
        return Verdict::Deliver;
    };
    if seq <= *position {
        return Verdict::Drop;
    }
    let before = *position;
    *position = seq;
    if before != 0 && seq > before + 1 {
        Verdict::Gap { after: before }
    } else {
        Verdict::Deliver
    }
}

/// Whether a message numbered `seq` would leave a hole for a subscriber at `position` (0: nothing seen, so
/// nothing to be missing).
pub fn is_gap(position: u64, seq: Option<u64>) -> bool {
    seq.is_some_and(|seq| position != 0 && seq > position + 1)
}

/// As [`is_gap`], where `from_start` makes position 0 a real one (a numbering that started over, of which
/// nothing was given yet: seq 1 is next).
fn leaves_hole(position: u64, seq: Option<u64>, from_start: bool) -> bool {
    if from_start && position == 0 {
        return seq.is_some_and(|seq| seq > 1);
    }
    is_gap(position, seq)
}

/// Whether a message numbered `seq` needs the channel's history read before it goes to subscribers at
/// `positions`: a gap for any of them, or every one of them (with a known position; at least one) already at
/// or past it: a copy, or the first message of a numbering that started over under a new epoch (the message
/// does not say which; a read of the channel's epoch does). One pass, on every message.
pub fn needs_read(positions: impl Iterator<Item = u64>, seq: Option<u64>) -> bool {
    let Some(seq) = seq else {
        return false;
    };
    let (mut any, mut all_past) = (false, true);
    for position in positions {
        if is_gap(position, Some(seq)) {
            return true;
        }
        any = true;
        all_past &= position != 0 && seq <= position;
    }
    any && all_past
}

/// How many of the held messages (in arrival order) a history read that saw the channel up to `top` can
/// settle. A held message numbered above `top + 1` that does not follow the held one before it may be
/// preceded by messages published after the read: it and those behind it wait for another read, so a message
/// is never called lost because it was younger than the read.
pub fn settled(held: impl IntoIterator<Item = Option<u64>>, top: u64) -> usize {
    let mut previous = None;
    let mut count = 0;
    for seq in held {
        if let Some(seq) = seq {
            if seq > top + 1 && previous != Some(seq - 1) {
                return count;
            }
            previous = Some(seq);
        }
        count += 1;
    }
    count
}

/// What [`fill`] does with one message for one subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A missing message from history, given before the held one that revealed the gap.
    Replayed,
    /// A held message, given in order.
    Delivered,
    /// A held message given although messages before it are missing and history no longer has them.
    Unfilled,
    /// A copy of something given already: dropped.
    Dropped,
}

/// Gives a subscriber at `position` the messages held while the channel's history was read: before each held
/// message, the history entries between the position and it (oldest first, as `(seq, item)`), then the held
/// message itself, everything through [`admit`]. With nothing held (a catch-up after an outage), every history
/// entry above the position. Each message goes to `give` with what became of it.
///
/// `from_start`: the channel's numbering started over (a new epoch) and `position` is 0 of the new one, so
/// seq 1 is next and a first message above it leaves a hole (`Unfilled`) rather than starting the position.
pub fn fill<'a, T>(
    position: &mut u64,
    history_oldest_first: &'a [(u64, T)],
    held: &'a [(Option<u64>, T)],
    from_start: bool,
    mut give: impl FnMut(&'a T, Step),
) {
    let mut next = 0;
    for (seq, item) in held {
        if let Some(seq) = seq {
            next = replay_below(
                position,
                history_oldest_first,
                (next, *seq),
                from_start,
                &mut give,
            );
        }
        match admit_from(position, *seq, from_start) {
            Verdict::Drop => give(item, Step::Dropped),
            Verdict::Deliver => give(item, Step::Delivered),
            Verdict::Gap { .. } => give(item, Step::Unfilled),
        }
    }
    replay_below(
        position,
        history_oldest_first,
        (next, u64::MAX),
        from_start,
        &mut give,
    );
}

/// [`admit`], where `from_start` makes position 0 a real one (see [`leaves_hole`]).
fn admit_from(position: &mut u64, seq: Option<u64>, from_start: bool) -> Verdict {
    if from_start && *position == 0 && leaves_hole(0, seq, true) {
        admit(position, seq);
        return Verdict::Gap { after: 0 };
    }
    admit(position, seq)
}

/// Gives the history entries from index `next` numbered below `below`; returns the index of the first one left.
fn replay_below<'a, T>(
    position: &mut u64,
    history_oldest_first: &'a [(u64, T)],
    (mut next, below): (usize, u64),
    from_start: bool,
    give: &mut impl FnMut(&'a T, Step),
) -> usize {
    while let Some((seq, item)) = history_oldest_first.get(next) {
        if *seq >= below {
            break;
        }
        next += 1;
        match admit_from(position, Some(*seq), from_start) {
            Verdict::Drop => {}
            Verdict::Deliver => give(item, Step::Replayed),
            Verdict::Gap { .. } => give(item, Step::Unfilled),
        }
    }
    next
}

/// What the history still holds after a position, newest first as the engines keep it: the messages to
/// replay (oldest first) when every one after `since` is there, `None` when any is missing (trimmed by
/// `history_size`, older than `history_ttl`, or `since` is from another epoch or ahead of the channel).
pub fn replay_after<T>(
    since: &Position,
    epoch: &str,
    top: u64,
    newest_first: impl IntoIterator<Item = (u64, T)>,
) -> Option<Vec<T>> {
    if since.epoch != epoch || since.seq > top {
        return None;
    }
    let mut missed = Vec::new();
    let mut want = top;
    for (seq, item) in newest_first {
        if want == since.seq {
            break;
        }
        if seq > want {
            continue;
        }
        if seq != want {
            return None;
        }
        missed.push(item);
        want -= 1;
    }
    if want != since.seq {
        return None;
    }
    missed.reverse();
    Some(missed)
}

/// What the ordering rule says about one message for a pattern subscription (see [`PatternPositions`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Deliver it.
    Deliver,
    /// Deliver it; the channel's first message for this connection: it is told the channel's epoch.
    First,
    /// Deliver it; the first of a numbering that started over: the epoch the connection knows is stale.
    Restarted,
    /// A copy of something delivered already: drop it.
    Drop,
    /// Deliver it without a position: the connection already tracks its cap of channels.
    Untracked,
    /// Not delivered yet: the connection misses messages between its position and this one (or the first
    /// ones of a numbering that started over), which the channel's history may still hold (only from
    /// [`PatternPositions::admit_live`]; the position stays).
    Gap,
}

/// What [`PatternPositions::fill`] did with one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatternStep {
    /// A missing message from history (given before the held one that revealed the gap, or in a catch-up).
    Replayed,
    /// Given although messages before it are missing and history no longer has them.
    Unfilled,
    /// A held message, through the rule of [`PatternPositions::admit`].
    Held(Admission),
}

/// Where one connection stands in each concrete channel its pattern subscriptions have given it: the newest
/// message given per channel, at most `cap` channels. One map per connection, whichever of its patterns a
/// copy came through, so nested patterns and copies from several Redis subscriptions share one position.
///
/// A pattern subscriber does not read a channel's epoch before its messages, so a message at or below the
/// position is told apart by its `ts`: a copy is never younger than the newest message given (it is one of
/// them), while the first message of a numbering that started over (the sequence expired after the
/// channel's whole `ttl` without a publish, or Redis lost its data) is. A jump past the next `seq` of a tracked
/// channel is a gap, filled from the channel's history as for exact subscribers ([`PatternPositions::fill`]),
/// and a history younger than the position at or below it shows a numbering that started over while the
/// connection heard nothing (a pub/sub outage): the new numbering is given from its start.
#[derive(Debug)]
pub struct PatternPositions<M> {
    channels: HashMap<Arc<str>, Tracked<M>>,
}

impl<M> Default for PatternPositions<M> {
    fn default() -> Self {
        PatternPositions {
            channels: HashMap::new(),
        }
    }
}

/// What the pattern rule reads of a message (a `Publication`, kept apart so this file needs no frame type).
pub trait Sequenced {
    fn channel(&self) -> &Arc<str>;
    fn seq(&self) -> Option<u64>;
    /// When it was published (RFC 3339, UTC, milliseconds: later times compare greater as strings).
    fn ts(&self) -> Option<&str>;
}

/// One channel's position for a pattern subscriber.
#[derive(Debug)]
struct Tracked<M> {
    seq: u64,
    /// The newest message given (its `ts` tells a copy from a restarted numbering); `None` when the position
    /// came from a recovery whose newest message is not at hand.
    newest: Option<Arc<M>>,
}

impl<M: Sequenced> PatternPositions<M> {
    /// Applies the rule to `publication` for a connection tracking at most `cap` channels.
    pub fn admit(&mut self, publication: &Arc<M>, cap: usize) -> Admission {
        self.admit_or_hold(publication, cap, false)
    }

    /// As [`PatternPositions::admit`], but a message past the next `seq` of a tracked channel is answered
    /// [`Admission::Gap`] and not admitted: the caller holds it until the channel's history is read.
    pub fn admit_live(&mut self, publication: &Arc<M>, cap: usize) -> Admission {
        self.admit_or_hold(publication, cap, true)
    }

    fn admit_or_hold(&mut self, publication: &Arc<M>, cap: usize, hold_gaps: bool) -> Admission {
        let Some(seq) = publication.seq() else {
            return Admission::Deliver;
        };
        if let Some(tracked) = self.channels.get_mut(publication.channel()) {
            if hold_gaps && is_gap(tracked.seq, Some(seq)) {
                return Admission::Gap;
            }
            if seq > tracked.seq {
                tracked.seq = seq;
                tracked.newest = Some(publication.clone());
                return Admission::Deliver;
            }
            let younger = match (&tracked.newest, publication.ts()) {
                (Some(newest), Some(ts)) => newest.ts().is_some_and(|newest| ts > newest),
                _ => false,
            };
            if !younger {
                return Admission::Drop;
            }
            if hold_gaps && seq > 1 {
                // A numbering that started over, whose start this connection missed: held like any gap, the
                // history read gives the new numbering from its start (see `fill`).
                return Admission::Gap;
            }
            // A numbering that started over: the position follows it, and the epoch the client holds is stale.
            tracked.seq = seq;
            tracked.newest = Some(publication.clone());
            return Admission::Restarted;
        }
        if self.channels.len() >= cap {
            return Admission::Untracked;
        }
        self.channels.insert(
            publication.channel().clone(),
            Tracked {
                seq,
                newest: Some(publication.clone()),
            },
        );
        Admission::First
    }

    /// Sets the position of `channel` (a recovery, a snapshot, an exact subscription that ended), when it is
    /// tracked or there is room; returns whether it is tracked.
    pub fn set(
        &mut self,
        channel: &Arc<str>,
        seq: u64,
        newest: Option<Arc<M>>,
        cap: usize,
    ) -> bool {
        if let Some(tracked) = self.channels.get_mut(channel) {
            if seq >= tracked.seq {
                tracked.seq = seq;
                if newest.is_some() {
                    tracked.newest = newest;
                }
            }
            return true;
        }
        if self.channels.len() >= cap {
            return false;
        }
        self.channels
            .insert(channel.clone(), Tracked { seq, newest });
        true
    }

    /// Gives one connection the messages of `channel` held while its history was read: before each held
    /// message, the history entries (oldest first) between its position and that message, then the held
    /// message itself through [`PatternPositions::admit`]; with nothing held (a catch-up after an outage),
    /// every history entry above the position. An untracked channel has no position to fill from: its held
    /// messages are admitted as they come. Each message given goes to `give` with what became of it.
    ///
    /// When the history shows that the channel's numbering started over since the position (see
    /// [`PatternPositions::restart_in`]), the position is of the old numbering: the new one is given from its
    /// start, which history holds from seq 1 (every message `Replayed`) or has lost (the first one given is
    /// `Unfilled`, as for any gap history cannot fill). Returns whether it started over, so the connection can
    /// be told the channel's new epoch.
    pub fn fill<'a>(
        &mut self,
        channel: &Arc<str>,
        history_oldest_first: &'a [Arc<M>],
        held: &'a [Arc<M>],
        cap: usize,
        mut give: impl FnMut(&'a Arc<M>, PatternStep),
    ) -> bool {
        let restart = self.restart_in(channel, history_oldest_first);
        let history = match restart {
            Some(start) => {
                if let Some(tracked) = self.channels.get_mut(channel) {
                    tracked.seq = 0;
                    tracked.newest = None;
                }
                &history_oldest_first[start..]
            }
            None => history_oldest_first,
        };
        // After a restart 0 is a position like any other (nothing of the new numbering given yet): a first
        // message above seq 1 leaves a hole.
        let from_start = restart.is_some();
        let mut next = 0;
        for message in held {
            if let Some(seq) = message.seq() {
                next = self.replay_below(channel, history, next, seq, from_start, &mut give);
            }
            let after_replay = self.get(channel);
            let step = match self.admit(message, cap) {
                Admission::Drop => PatternStep::Held(Admission::Drop),
                Admission::Deliver
                    if after_replay.is_some_and(|p| leaves_hole(p, message.seq(), from_start)) =>
                {
                    PatternStep::Unfilled
                }
                admission => PatternStep::Held(admission),
            };
            give(message, step);
        }
        self.replay_below(channel, history, next, u64::MAX, from_start, &mut give);
        restart.is_some()
    }

    /// Where the numbering that started over begins in `history_oldest_first`, when the history shows that
    /// the channel's numbering started over since this connection's position: it holds an entry at or below
    /// the position that is younger (`ts`) than the newest message given, which a copy never is (the test of
    /// [`PatternPositions::admit`]). The new numbering is what follows the history's last step down in `seq`
    /// (entries of the old one may be kept before it). A position without its newest message at hand, or a
    /// history that kept nothing at or below the position, cannot tell.
    fn restart_in(&self, channel: &str, history_oldest_first: &[Arc<M>]) -> Option<usize> {
        let tracked = self.channels.get(channel)?;
        let newest = tracked.newest.as_ref()?.ts()?;
        let restarted = history_oldest_first.iter().any(|entry| {
            entry.seq().is_some_and(|seq| seq <= tracked.seq)
                && entry.ts().is_some_and(|ts| ts > newest)
        });
        if !restarted {
            return None;
        }
        let last_step_down = history_oldest_first
            .windows(2)
            .rposition(|pair| pair[1].seq() <= pair[0].seq());
        Some(last_step_down.map_or(0, |i| i + 1))
    }

    /// Gives the history entries from index `next` numbered below `below` that are above the channel's
    /// position; returns the index of the first one left.
    fn replay_below<'a>(
        &mut self,
        channel: &Arc<str>,
        history_oldest_first: &'a [Arc<M>],
        mut next: usize,
        below: u64,
        from_start: bool,
        give: &mut impl FnMut(&'a Arc<M>, PatternStep),
    ) -> usize {
        while let Some(entry) = history_oldest_first.get(next) {
            let Some(seq) = entry.seq() else {
                next += 1;
                continue;
            };
            if seq >= below {
                break;
            }
            next += 1;
            let Some(tracked) = self.channels.get_mut(channel) else {
                continue;
            };
            if seq <= tracked.seq {
                continue;
            }
            let step = if leaves_hole(tracked.seq, Some(seq), from_start) {
                PatternStep::Unfilled
            } else {
                PatternStep::Replayed
            };
            tracked.seq = seq;
            tracked.newest = Some(entry.clone());
            give(entry, step);
        }
        next
    }

    /// The channels this connection has a position in.
    pub fn channels(&self) -> impl Iterator<Item = &Arc<str>> {
        self.channels.keys()
    }

    /// The position of `channel`, when tracked.
    pub fn get(&self, channel: &str) -> Option<u64> {
        self.channels.get(channel).map(|t| t.seq)
    }

    /// Forgets the channels no remaining pattern covers.
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.channels.retain(|channel, _| keep(channel));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.channels.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(start: u64, seqs: &[Option<u64>]) -> (Vec<Verdict>, u64) {
        let mut position = start;
        let verdicts = seqs.iter().map(|s| admit(&mut position, *s)).collect();
        (verdicts, position)
    }

    use Verdict::*;

    #[test]
    fn local_then_echo_and_echo_then_local_deliver_once() {
        // Delivered locally while the link was down, then its echo from Redis.
        assert_eq!(run(4, &[Some(5), Some(5)]), (vec![Deliver, Drop], 5));
        // The echo first, then the local copy of the same message.
        assert_eq!(
            run(4, &[Some(5), Some(6), Some(5)]),
            (vec![Deliver, Deliver, Drop], 6)
        );
    }

    #[test]
    fn catch_up_then_echo_and_snapshot_then_message_deliver_once() {
        // A catch-up after an outage brings 9; the echo of 9 (and of older ones) follows.
        assert_eq!(
            run(7, &[Some(9), Some(8), Some(9), Some(10)]),
            (vec![Gap { after: 7 }, Drop, Drop, Deliver], 10)
        );
        // A subscriber let in with the snapshot of seq 1 (an auto_start job's first value): the message 1
        // itself is not delivered again.
        assert_eq!(run(1, &[Some(1), Some(2)]), (vec![Drop, Deliver], 2));
    }

    #[test]
    fn exact_plus_pattern_copies_deliver_once() {
        // One position per subscriber and channel, whichever subscription a copy arrived through.
        assert_eq!(
            run(0, &[Some(3), Some(3), Some(4), Some(4)]),
            (vec![Deliver, Drop, Deliver, Drop], 4)
        );
    }

    #[test]
    fn unsequenced_messages_always_pass_and_do_not_move_the_position() {
        assert_eq!(
            run(3, &[None, None, Some(3), Some(4)]),
            (vec![Deliver, Deliver, Drop, Deliver], 4)
        );
    }

    fn run_fill(start: u64, history: &[u64], held: &[Option<u64>]) -> (Vec<(u64, Step)>, u64) {
        run_fill_from(start, history, held, false)
    }

    fn run_fill_from(
        start: u64,
        history: &[u64],
        held: &[Option<u64>],
        from_start: bool,
    ) -> (Vec<(u64, Step)>, u64) {
        let history: Vec<(u64, u64)> = history.iter().map(|s| (*s, *s)).collect();
        let held: Vec<(Option<u64>, u64)> = held.iter().map(|s| (*s, s.unwrap_or(0))).collect();
        let mut position = start;
        let mut given = Vec::new();
        fill(&mut position, &history, &held, from_start, |item, step| {
            given.push((*item, step))
        });
        (given, position)
    }

    #[test]
    fn a_numbering_that_started_over_is_given_from_seq_1_or_its_lost_start_is_unfilled() {
        use Step::*;
        // History kept the new numbering from its start: all of it, replayed.
        assert_eq!(
            run_fill_from(0, &[1, 2, 3], &[], true),
            (vec![(1, Replayed), (2, Replayed), (3, Replayed)], 3)
        );
        // History lost 1 and 2: the first one given is past a hole.
        assert_eq!(
            run_fill_from(0, &[3, 4], &[Some(5)], true),
            (vec![(3, Unfilled), (4, Replayed), (5, Delivered)], 5)
        );
        // Nothing in history, a held message past the start: unfilled too.
        assert_eq!(
            run_fill_from(0, &[], &[Some(4)], true),
            (vec![(4, Unfilled)], 4)
        );
        // Without a restart, position 0 is "nothing seen yet": no hole to count.
        assert_eq!(
            run_fill_from(0, &[3, 4], &[], false),
            (vec![(3, Replayed), (4, Replayed)], 4)
        );
    }

    #[test]
    fn a_gap_is_a_jump_past_the_next_seq_of_a_known_position() {
        assert!(!is_gap(4, Some(5)));
        assert!(is_gap(4, Some(6)));
        assert!(!is_gap(4, Some(4)), "a copy, not a gap");
        assert!(!is_gap(0, Some(9)), "nothing seen yet");
        assert!(!is_gap(4, None), "unsequenced");
    }

    #[test]
    fn a_gap_or_a_message_every_subscriber_is_past_needs_a_read() {
        let needs = |positions: &[u64], seq| needs_read(positions.iter().copied(), seq);
        assert!(needs(&[5, 7], Some(5)), "everyone is past it");
        assert!(
            needs(&[5], Some(1)),
            "a numbering that started over, or an old copy"
        );
        assert!(needs(&[4, 4], Some(6)), "a gap");
        assert!(needs(&[4, 0], Some(9)), "a gap for one of them");
        assert!(!needs(&[5, 4], Some(5)), "new to one of them");
        assert!(!needs(&[5, 0], Some(5)), "one has seen nothing");
        assert!(!needs(&[4, 4], Some(5)), "the next one");
        assert!(!needs(&[], Some(5)), "nobody to give it to");
        assert!(!needs(&[5], None), "unsequenced");
    }

    #[test]
    fn a_gap_is_filled_from_history_before_the_newer_message() {
        use Step::*;
        // At 4; 5 and 6 were lost, 7 arrived and was held; history holds 3..7.
        assert_eq!(
            run_fill(4, &[3, 4, 5, 6, 7], &[Some(7)]),
            (vec![(5, Replayed), (6, Replayed), (7, Delivered)], 7)
        );
        // Two holes between held messages, and history newer than the last held one.
        assert_eq!(
            run_fill(4, &[5, 6, 7, 8, 9], &[Some(6), Some(8), Some(9)]),
            (
                vec![
                    (5, Replayed),
                    (6, Delivered),
                    (7, Replayed),
                    (8, Delivered),
                    (9, Delivered)
                ],
                9
            )
        );
        assert_eq!(
            run_fill(4, &[5, 6, 7, 8], &[Some(6)]),
            (
                vec![(5, Replayed), (6, Delivered), (7, Replayed), (8, Replayed)],
                8
            )
        );
    }

    #[test]
    fn a_gap_history_no_longer_holds_delivers_the_newer_message_once() {
        use Step::*;
        // History was trimmed to 9..10: 5..8 are gone; 10 goes out after 9, which is counted as unfilled.
        assert_eq!(
            run_fill(4, &[9, 10], &[Some(10)]),
            (vec![(9, Unfilled), (10, Delivered)], 10)
        );
        // Nothing in history at all: the held message itself is the unfilled one.
        assert_eq!(run_fill(4, &[], &[Some(10)]), (vec![(10, Unfilled)], 10));
    }

    #[test]
    fn held_copies_and_unsequenced_messages_keep_the_rule() {
        use Step::*;
        // A held copy of something history already gave is dropped; unsequenced ones pass where they were.
        assert_eq!(
            run_fill(4, &[5, 6], &[None, Some(6), Some(5), None]),
            (
                vec![
                    (0, Delivered),
                    (5, Replayed),
                    (6, Delivered),
                    (5, Dropped),
                    (0, Delivered)
                ],
                6
            )
        );
        // A subscriber further on (it recovered meanwhile) gets only what is above its position.
        assert_eq!(
            run_fill(8, &[5, 6, 7, 8], &[Some(9)]),
            (vec![(9, Delivered)], 9)
        );
    }

    #[test]
    fn replay_is_all_or_nothing() {
        let at = |seq: u64| Position {
            epoch: "E".into(),
            seq,
        };
        let history = |seqs: &[u64]| seqs.iter().map(|s| (*s, *s)).collect::<Vec<_>>();
        assert_eq!(
            replay_after(&at(41), "E", 44, history(&[44, 43, 42, 41, 40])),
            Some(vec![42, 43, 44])
        );
        assert_eq!(replay_after(&at(44), "E", 44, history(&[44])), Some(vec![]));
        assert_eq!(replay_after(&at(0), "E", 0, history(&[])), Some(vec![]));
        // 42 was trimmed away.
        assert_eq!(replay_after(&at(41), "E", 44, history(&[44, 43])), None);
        // Another epoch, or a position ahead of the channel.
        assert_eq!(replay_after(&at(41), "F", 44, history(&[44, 43, 42])), None);
        assert_eq!(replay_after(&at(45), "E", 44, history(&[44])), None);
        // A hole in the middle.
        assert_eq!(replay_after(&at(41), "E", 44, history(&[44, 42])), None);
        // Newer entries than the top read are skipped (published between the two reads).
        assert_eq!(
            replay_after(&at(42), "E", 43, history(&[45, 44, 43])),
            Some(vec![43])
        );
    }

    use crate::core::publication::Publication;

    fn message(channel: &str, seq: Option<u64>, ts: &str) -> Arc<Publication> {
        Arc::new(Publication::new(channel.into(), "1", seq, Some(ts)))
    }

    fn admit_all(
        positions: &mut PatternPositions<Publication>,
        cap: usize,
        messages: &[&Arc<Publication>],
    ) -> Vec<Admission> {
        messages.iter().map(|m| positions.admit(m, cap)).collect()
    }

    const T1: &str = "2026-11-22T01:00:00.001Z";
    const T2: &str = "2026-11-22T01:00:00.002Z";
    const T3: &str = "2026-11-23T01:00:00.000Z";

    #[test]
    fn a_pattern_subscriber_gets_local_then_echo_and_echo_then_local_once() {
        use Admission::*;
        let (five, six) = (message("p:a", Some(5), T1), message("p:a", Some(6), T2));
        // Delivered locally while the link was down, then the echoes from Redis (copies of the same messages).
        let mut at = PatternPositions::<Publication>::default();
        assert_eq!(
            admit_all(&mut at, 8, &[&five, &six, &five.clone(), &six]),
            vec![First, Deliver, Drop, Drop]
        );
        // The echo first, then the publisher's own local copy.
        let mut at = PatternPositions::<Publication>::default();
        assert_eq!(admit_all(&mut at, 8, &[&five, &five]), vec![First, Drop]);
        assert_eq!(at.get("p:a"), Some(5));
    }

    #[test]
    fn a_pattern_subscriber_gets_catch_up_then_echo_once() {
        use Admission::*;
        let mut at = PatternPositions::<Publication>::default();
        // Recovered up to 7 (a `since` replay), then the echoes of 6 and 7 and the next message.
        assert!(at.set(&"p:a".into(), 7, Some(message("p:a", Some(7), T2)), 8));
        assert_eq!(
            admit_all(
                &mut at,
                8,
                &[
                    &message("p:a", Some(6), T1),
                    &message("p:a", Some(7), T2),
                    &message("p:a", Some(8), T3)
                ]
            ),
            vec![Drop, Drop, Deliver]
        );
    }

    #[test]
    fn exact_plus_pattern_and_nested_pattern_copies_deliver_once_per_connection() {
        use Admission::*;
        let mut at = PatternPositions::<Publication>::default();
        let three = message("p:a", Some(3), T1);
        let four = message("p:a", Some(4), T2);
        // The channel's own SUBSCRIBE and the PSUBSCRIBE (or two nested patterns) each bring a copy.
        assert_eq!(
            admit_all(&mut at, 8, &[&three, &three, &four, &four]),
            vec![First, Drop, Deliver, Drop]
        );
    }

    #[test]
    fn a_pattern_subscriber_follows_a_numbering_that_started_over() {
        use Admission::*;
        let mut at = PatternPositions::<Publication>::default();
        at.admit(&message("p:a", Some(40), T2), 8);
        // Seq 1 again, younger than anything given: a new numbering, announced (the client needs the epoch).
        let restarted = message("p:a", Some(1), T3);
        assert_eq!(at.admit(&restarted, 8), Restarted);
        assert_eq!(at.admit(&restarted, 8), Drop, "and its copy is a copy");
        assert_eq!(at.admit(&message("p:a", Some(2), T3), 8), Deliver);
        // An old copy (not younger) at or below the position stays a copy.
        assert_eq!(at.admit(&message("p:a", Some(1), T1), 8), Drop);
    }

    #[test]
    fn pattern_positions_are_capped_and_unsequenced_messages_pass() {
        use Admission::*;
        let mut at = PatternPositions::<Publication>::default();
        assert_eq!(at.admit(&message("p:a", Some(1), T1), 2), First);
        assert_eq!(at.admit(&message("p:b", Some(1), T1), 2), First);
        let c = message("p:c", Some(1), T1);
        // Past the cap: delivered, not deduplicated, never tracked.
        assert_eq!(admit_all(&mut at, 2, &[&c, &c]), vec![Untracked, Untracked]);
        assert_eq!(at.len(), 2);
        let raw = Arc::new(Publication::new("p:a".into(), "1", None, None));
        assert_eq!(admit_all(&mut at, 2, &[&raw, &raw]), vec![Deliver; 2]);
        assert_eq!(
            at.get("p:a"),
            Some(1),
            "an unsequenced message does not move the position"
        );
        assert!(!at.set(&"p:d".into(), 4, None, 2), "no room");
    }

    fn fill_pattern(
        at: &mut PatternPositions<Publication>,
        history: &[u64],
        held: &[u64],
    ) -> Vec<(u64, PatternStep)> {
        let history: Vec<_> = history.iter().map(|s| (*s, T1)).collect();
        let held: Vec<_> = held.iter().map(|s| (*s, T2)).collect();
        fill_timed(at, &history, &held).0
    }

    #[test]
    fn a_pattern_subscribers_gap_is_held_and_filled_from_history() {
        use PatternStep::*;
        let mut at = PatternPositions::<Publication>::default();
        at.admit(&message("p:a", Some(4), T1), 8);
        // 5 and 6 were lost: 7 is not admitted live, and the position stays.
        assert_eq!(
            at.admit_live(&message("p:a", Some(7), T2), 8),
            Admission::Gap
        );
        assert_eq!(at.get("p:a"), Some(4));
        assert_eq!(
            at.admit_live(&message("p:a", Some(5), T2), 8),
            Admission::Deliver
        );
        let mut at = PatternPositions::<Publication>::default();
        at.admit(&message("p:a", Some(4), T1), 8);
        assert_eq!(
            fill_pattern(&mut at, &[3, 4, 5, 6, 7, 8], &[7, 7]),
            vec![
                (5, Replayed),
                (6, Replayed),
                (7, Held(Admission::Deliver)),
                (7, Held(Admission::Drop)),
                (8, Replayed)
            ]
        );
        assert_eq!(at.get("p:a"), Some(8));
    }

    #[test]
    fn a_pattern_gap_history_no_longer_holds_is_delivered_once_and_counted() {
        use PatternStep::*;
        let mut at = PatternPositions::<Publication>::default();
        at.admit(&message("p:a", Some(4), T1), 8);
        assert_eq!(
            fill_pattern(&mut at, &[9, 10], &[10]),
            vec![(9, Unfilled), (10, Held(Admission::Deliver))]
        );
        let mut at = PatternPositions::<Publication>::default();
        at.admit(&message("p:a", Some(4), T1), 8);
        assert_eq!(fill_pattern(&mut at, &[], &[10]), vec![(10, Unfilled)]);
    }

    #[test]
    fn a_pattern_catch_up_gives_what_is_above_the_position_and_untracked_channels_nothing() {
        use PatternStep::*;
        let mut at = PatternPositions::<Publication>::default();
        at.admit(&message("p:a", Some(4), T1), 8);
        assert_eq!(
            fill_pattern(&mut at, &[3, 4, 5, 6], &[]),
            vec![(5, Replayed), (6, Replayed)]
        );
        assert_eq!(fill_pattern(&mut at, &[5, 6], &[]), vec![], "nothing twice");
        let mut fresh = PatternPositions::<Publication>::default();
        assert_eq!(fill_pattern(&mut fresh, &[5, 6], &[]), vec![]);
        // Held messages of a channel without a position are admitted as they come.
        assert_eq!(
            fill_pattern(&mut fresh, &[5, 6, 7], &[6, 7]),
            vec![(6, Held(Admission::First)), (7, Held(Admission::Deliver))]
        );
    }

    /// Fills `p:a` from `history` and `held`, each `(seq, ts)`: what was given, and whether the numbering
    /// started over.
    fn fill_timed(
        at: &mut PatternPositions<Publication>,
        history: &[(u64, &str)],
        held: &[(u64, &str)],
    ) -> (Vec<(u64, PatternStep)>, bool) {
        let timed = |list: &[(u64, &str)]| -> Vec<_> {
            list.iter()
                .map(|(seq, ts)| message("p:a", Some(*seq), ts))
                .collect()
        };
        let (history, held) = (timed(history), timed(held));
        let mut given = Vec::new();
        let restarted = at.fill(&"p:a".into(), &history, &held, 8, |m, step| {
            given.push((m.seq.unwrap(), step))
        });
        (given, restarted)
    }

    #[test]
    fn a_catch_up_gives_a_numbering_that_started_over_from_its_start() {
        use PatternStep::*;
        let mut at = PatternPositions::<Publication>::default();
        at.admit(&message("p:a", Some(50), T1), 8);
        // Numbering started over during the outage: 1..3 of the new one, younger than anything given.
        assert_eq!(
            fill_timed(&mut at, &[(1, T2), (2, T2), (3, T3)], &[]),
            (vec![(1, Replayed), (2, Replayed), (3, Replayed)], true)
        );
        assert_eq!(at.get("p:a"), Some(3));
        // The echo of 3 is a copy, 4 the next one, and the same read again gives nothing twice.
        assert_eq!(at.admit(&message("p:a", Some(3), T3), 8), Admission::Drop);
        assert_eq!(
            fill_timed(&mut at, &[(1, T2), (2, T2), (3, T3)], &[]),
            (vec![], false)
        );
        assert_eq!(
            at.admit(&message("p:a", Some(4), T3), 8),
            Admission::Deliver
        );
        // A new numbering that has gone past the old position is not taken for the old one's continuation.
        let mut at = PatternPositions::<Publication>::default();
        at.admit(&message("p:a", Some(2), T1), 8);
        assert_eq!(
            fill_timed(&mut at, &[(1, T2), (2, T2), (3, T2), (4, T3)], &[]),
            (
                vec![(1, Replayed), (2, Replayed), (3, Replayed), (4, Replayed)],
                true
            )
        );
    }

    #[test]
    fn a_live_restart_past_its_start_is_held_and_filled_from_the_new_numbering_s_start() {
        use PatternStep::*;
        let mut at = PatternPositions::<Publication>::default();
        at.admit(&message("p:a", Some(50), T1), 8);
        // 3 of a new numbering arrives live, 1 and 2 never came: held for a history read, position kept.
        let three = message("p:a", Some(3), T3);
        assert_eq!(at.admit_live(&three, 8), Admission::Gap);
        assert_eq!(at.get("p:a"), Some(50));
        assert_eq!(
            fill_timed(&mut at, &[(1, T2), (2, T2), (3, T3)], &[(3, T3)]),
            (
                vec![(1, Replayed), (2, Replayed), (3, Held(Admission::Deliver))],
                true
            )
        );
        // The first of a new numbering, live, is delivered at once as before.
        let mut at = PatternPositions::<Publication>::default();
        at.admit(&message("p:a", Some(50), T1), 8);
        assert_eq!(
            at.admit_live(&message("p:a", Some(1), T2), 8),
            Admission::Restarted
        );
    }

    #[test]
    fn a_numbering_that_started_over_whose_start_history_lost_is_counted_unfilled() {
        use PatternStep::*;
        let mut at = PatternPositions::<Publication>::default();
        at.admit(&message("p:a", Some(50), T1), 8);
        // 1 and 2 of the new numbering are gone (trimmed or expired): never a replay that looks complete.
        assert_eq!(
            fill_timed(&mut at, &[(3, T2), (4, T3)], &[]),
            (vec![(3, Unfilled), (4, Replayed)], true)
        );
        // 3 is gone between what history kept of the new numbering and a held message: the held one is the
        // unfilled one.
        let mut at = PatternPositions::<Publication>::default();
        at.admit(&message("p:a", Some(50), T1), 8);
        assert_eq!(
            fill_timed(&mut at, &[(1, T2), (2, T2)], &[(4, T3)]),
            (vec![(1, Replayed), (2, Replayed), (4, Unfilled)], true)
        );
    }

    #[test]
    fn a_restart_is_told_from_copies_by_ts_and_from_the_old_numbering_kept_before_it() {
        use PatternStep::*;
        // The old numbering still kept in history before the new one: only the new one is given.
        let mut at = PatternPositions::<Publication>::default();
        at.admit(&message("p:a", Some(50), T1), 8);
        assert_eq!(
            fill_timed(&mut at, &[(49, T1), (50, T1), (1, T2), (2, T3)], &[(3, T3)]),
            (
                vec![(1, Replayed), (2, Replayed), (3, Held(Admission::Deliver))],
                true
            )
        );
        // History at or below the position that is not younger: copies of what was given, no restart.
        let mut at = PatternPositions::<Publication>::default();
        at.admit(&message("p:a", Some(50), T2), 8);
        assert_eq!(
            fill_timed(&mut at, &[(49, T1), (50, T2), (51, T3)], &[]),
            (vec![(51, Replayed)], false)
        );
        // A position without its newest message at hand (a recovery) cannot tell a restart: nothing is given.
        let mut at = PatternPositions::<Publication>::default();
        assert!(at.set(&"p:a".into(), 50, None, 8));
        assert_eq!(
            fill_timed(&mut at, &[(1, T2), (2, T3)], &[]),
            (vec![], false)
        );
    }
}
