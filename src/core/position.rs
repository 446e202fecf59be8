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
}
