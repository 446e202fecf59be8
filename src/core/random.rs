//! The one source of randomness: jitter for retries and reconnects, and instance ids. Not cryptographic;
//! nothing here guards a secret.

/// A random number.
pub fn u64() -> u64 {
    fastrand::u64(..)
}

/// A random number in [0, 1).
pub fn fraction() -> f64 {
    fastrand::f64()
}
