//! What the broker seam speaks, shared by every engine and by the layers above: the callback interface the
//! node implements to hear what the backend relays, the error type, and the values the seam's operations
//! return (publish results, job storage and leases). Kept apart from the `Engine` dispatch so the engines
//! depend on this file and never on each other or on the dispatch.
//!
//! Built to grow: history is read by channel and newest-first today, and positions are `(seq)` per channel;
//! recovery by position (epoch, seq) and presence (add, remove, list, count) are further methods of the same
//! seam, with further callbacks here (`on_join`, `on_leave`) when they come.

use std::collections::HashMap;
use std::sync::Arc;

use crate::core::publication::Publication;

/// Told by the engine about what it hears from the shared backend. The node implements it; the engine holds
/// it from construction and never knows the node's types.
pub trait BrokerEventHandler: Send + Sync + 'static {
    /// A message to deliver to this replica's subscribers of its channel (relayed from the backend, or
    /// published here while the backend link was down).
    fn on_publication(&self, publication: Arc<Publication>);
    /// The link to the backend went down: what it numbered may restart (a Redis restart starts sequences
    /// over), so positions remembered per channel are forgotten.
    fn on_link_down(&self);
    /// The link is back after an outage: the latest values of channels this replica carries, to deliver
    /// where subscribers have not seen them.
    fn on_catch_up(&self, latest: Arc<Vec<Arc<Publication>>>);
}

/// Why a backend operation failed, as text for logs and error replies.
#[derive(Debug, Clone)]
pub struct EngineError(pub String);

impl std::fmt::Display for EngineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What one publish did.
#[derive(Debug, Clone, Copy)]
pub struct Published {
    /// The channel's sequence number for this message; `None` when it could only be delivered locally.
    pub seq: Option<u64>,
    /// Replicas that received it from the backend; `None` when only this replica's subscribers got it.
    pub receivers: Option<u64>,
    /// Whether the message went through the shared backend (false: it was down, local subscribers only).
    pub relayed: bool,
}

/// What an in-memory backend holds and reclaimed (a shared backend reports its own).
pub struct MemoryUsage {
    pub channels: usize,
    pub bytes: usize,
    pub evictions: u64,
    pub expired: u64,
}

/// A stored job definition: whatever the poller keeps, with its id.
pub trait Job: serde::Serialize + serde::de::DeserializeOwned + Clone + Send + Sync {
    fn id(&self) -> &str;
}

/// What recording a job did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    /// A new job.
    Created,
    /// The job was there already (from any replica); nothing changed.
    Existed,
    /// `poller.max_jobs` jobs are stored: not recorded.
    Full,
}

/// A job this replica runs, as a scan sees it.
pub struct Held {
    pub id: String,
    pub channel: String,
    /// Whether the job stops when nobody listens (only then are its listeners counted).
    pub auto_stop: bool,
}

/// What one scan found.
pub struct ScanReport<J> {
    /// Every job of the fleet.
    pub jobs: Vec<J>,
    /// Jobs this replica ran and lost (stopped, or the lease expired and another replica took it).
    pub lost: Vec<String>,
    /// Free jobs this replica took.
    pub acquired: Vec<String>,
    /// For each kept `auto_stop` job: whether any replica has a subscriber of its channel (exact or pattern).
    pub listening: HashMap<String, bool>,
}

/// What the owner reports about a job.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct JobStatus {
    /// `running` (fetching on its interval) or `backoff` (retrying after failures).
    pub state: String,
    pub interval: String,
    pub last_success: Option<String>,
    pub last_error: Option<String>,
    pub consecutive_failures: u32,
    pub next_run: Option<String>,
    pub fetches: u64,
    /// The owner's local subscribers of the job's channel.
    pub subscribers: usize,
}
