//! Where latest values, snapshots and sequence numbers live: Redis when configured and reachable, memory
//! otherwise. One enum rather than a trait object: two known backends, no boxing on the publish path.

pub mod memory;
pub mod redis;

pub use self::memory::MemoryStore;
pub use self::redis::{RedisError, RedisStore};

/// The backend chosen at start.
pub enum Store {
    Memory(MemoryStore),
    Redis(RedisStore),
}

impl Store {
    /// `memory` or `redis`, as stats report it.
    pub fn mode(&self) -> &'static str {
        match self {
            Store::Memory(_) => "memory",
            Store::Redis(_) => "redis",
        }
    }

    pub fn redis(&self) -> Option<&RedisStore> {
        match self {
            Store::Redis(r) => Some(r),
            Store::Memory(_) => None,
        }
    }
}
