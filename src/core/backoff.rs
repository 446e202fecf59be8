//! How long to wait before trying again: the poller's retries of a failing source, and the reconnects of a
//! lost backend link. Exponential backoff capped, plus jitter so many clients that fail together do not retry
//! in lockstep.

use std::time::Duration;

/// The longest wait before retrying a failed source, whatever its interval.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// A failing source never waits more than this many intervals.
const MAX_INTERVALS: u32 = 10;

/// The delay before the next fetch of a source polled every `interval` after `consecutive_failures`
/// failures in a row.
///
/// - No failure: `interval`.
/// - `n` failures: `interval * 2^n`, capped at `min(10 * interval, 30 s)`.
/// - The cap also applies when it is below the interval itself: a source polled every 5 minutes that fails
///   is retried after 30 s, sooner than its next regular fetch, so a passing upstream fault does not leave
///   its data stale for a whole interval. Once it succeeds, it is back to its interval.
///
/// A zero interval gives zero. Large `consecutive_failures` and huge intervals saturate; nothing overflows.
pub fn retry_delay(interval: Duration, consecutive_failures: u32) -> Duration {
    if consecutive_failures == 0 {
        return interval;
    }
    let cap = interval
        .checked_mul(MAX_INTERVALS)
        .unwrap_or(Duration::MAX)
        .min(MAX_RETRY_DELAY);
    2u32.checked_pow(consecutive_failures)
        .and_then(|factor| interval.checked_mul(factor))
        .map_or(cap, |delay| delay.min(cap))
}

/// `d` scaled by a random factor in `[1 - fraction, 1 + fraction]`; `fraction` is clamped to `[0, 1]` (NaN
/// counts as 0).
pub fn jitter(d: Duration, fraction: f64) -> Duration {
    let fraction = if fraction.is_nan() {
        0.0
    } else {
        fraction.clamp(0.0, 1.0)
    };
    let factor = 1.0 + fraction * (2.0 * crate::core::random::fraction() - 1.0);
    Duration::try_from_secs_f64(d.as_secs_f64() * factor).unwrap_or(Duration::MAX)
}

/// A reconnect delay after `attempts` failures in a row: between half and all of `min * 2^attempts`, capped
/// at `max`. Never zero for a nonzero `min`, so a link that fails at once does not spin.
pub fn reconnect_delay(attempts: u32, min: Duration, max: Duration) -> Duration {
    let ceiling = min.saturating_mul(1u32 << attempts.min(16)).min(max);
    let half = ceiling / 2;
    half + half.mul_f64(crate::core::random::fraction())
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    const fn ms(m: u64) -> Duration {
        Duration::from_millis(m)
    }

    #[test]
    fn fast_source_doubles_up_to_ten_intervals() {
        let interval = secs(1);
        let delays: Vec<_> = (0..6).map(|n| retry_delay(interval, n)).collect();
        assert_eq!(
            delays,
            [secs(1), secs(2), secs(4), secs(8), secs(10), secs(10)]
        );
        assert_eq!(retry_delay(ms(250), 1), ms(500));
        assert_eq!(retry_delay(ms(250), 3), ms(2000));
        assert_eq!(retry_delay(ms(250), 4), ms(2500));
    }

    #[test]
    fn medium_source_is_capped_at_thirty_seconds() {
        assert_eq!(retry_delay(secs(5), 1), secs(10));
        assert_eq!(retry_delay(secs(5), 2), secs(20));
        assert_eq!(retry_delay(secs(5), 3), secs(30));
        assert_eq!(retry_delay(secs(20), 1), secs(30));
    }

    #[test]
    fn slow_source_retries_sooner_than_its_interval() {
        let interval = secs(300);
        assert_eq!(retry_delay(interval, 0), interval);
        for n in [1, 2, 7, 100] {
            assert_eq!(retry_delay(interval, n), MAX_RETRY_DELAY);
        }
    }

    #[test]
    fn no_overflow() {
        for n in [31, 32, 33, 64, 1000, u32::MAX] {
            assert_eq!(retry_delay(secs(1), n), secs(10));
        }
        assert_eq!(retry_delay(Duration::MAX, 1), MAX_RETRY_DELAY);
        assert_eq!(retry_delay(Duration::MAX, 0), Duration::MAX);
        assert_eq!(retry_delay(Duration::ZERO, 5), Duration::ZERO);
        assert_eq!(
            retry_delay(Duration::from_nanos(1), 40),
            Duration::from_nanos(10)
        );
    }

    #[test]
    fn jitter_stays_in_range_and_varies() {
        let d = secs(10);
        let samples: Vec<Duration> = (0..200).map(|_| jitter(d, 0.2)).collect();
        for s in &samples {
            assert!(*s >= secs(8) && *s <= secs(12), "{s:?}");
        }
        let distinct: std::collections::HashSet<_> = samples.iter().collect();
        assert!(
            distinct.len() > 150,
            "only {} distinct values",
            distinct.len()
        );
        // Both halves of the range are used.
        assert!(samples.iter().any(|s| *s < d) && samples.iter().any(|s| *s > d));
    }

    #[test]
    fn jitter_edge_cases() {
        assert_eq!(jitter(secs(3), 0.0), secs(3));
        assert_eq!(jitter(secs(3), -1.0), secs(3));
        assert_eq!(jitter(secs(3), f64::NAN), secs(3));
        assert_eq!(jitter(Duration::ZERO, 0.5), Duration::ZERO);
        for _ in 0..50 {
            assert!(jitter(secs(3), 7.0) <= secs(6));
        }
        // Saturates instead of panicking.
        let _ = jitter(Duration::MAX, 1.0);
    }

    #[test]
    fn random_fraction_is_in_range() {
        for _ in 0..1000 {
            let u = crate::core::random::fraction();
            assert!((0.0..1.0).contains(&u), "{u}");
        }
    }
}
