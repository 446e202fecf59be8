//! What the broker seam speaks, shared by every engine and by the layers above: the callback interface the
//! node implements to hear what the backend relays, the error type, and the values the seam's operations
//! return (publish results, job storage and leases). Kept apart from the `Engine` dispatch so the engines
//! depend on this file and never on each other or on the dispatch.
//!
//! Presence (add, remove, refresh, list, count) is a method group of the same seam; what other replicas
//! announce comes back through `on_join` and `on_leave`.

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
    /// The link is back after an outage: the history windows of channels this replica carries, to replay
    /// where subscribers have not seen them.
    fn on_catch_up(&self, windows: Arc<Vec<(Arc<str>, Window)>>);
    /// The link is back after an outage and every channel and pattern subscription is confirmed again: the
    /// node catches up what only it knows it carries (the channels its pattern subscribers are positioned in).
    fn on_link_up(&self);
    /// A client of some replica subscribed to `channel` in a namespace with `join_leave`: `member` is its
    /// presence entry as JSON, `client` its id (the same as in `member`).
    fn on_join(&self, channel: &str, client: &str, member: &str);
    /// A client of some replica left `channel` (unsubscribed or disconnected).
    fn on_leave(&self, channel: &str, client: &str, member: &str);
}

/// One subscriber of a channel as presence lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The connection's id, unique across the fleet: `<instance id>-<connection number>`.
    pub client: Arc<str>,
    /// The connection's user (its token's `sub`), counted by presence stats; `None`: anonymous.
    pub user: Option<Arc<str>>,
    /// `{"client","user","info"}`, encoded once: stored as is and sent as is.
    pub json: Arc<str>,
}

/// One change of a channel's presence, applied in the order given.
#[derive(Debug, Clone)]
pub enum PresenceChange {
    /// The member subscribed; `announce`: tell the channel's subscribers (`join`).
    Add {
        channel: Arc<str>,
        member: Member,
        announce: bool,
    },
    /// The member left; `announce`: tell the channel's subscribers (`leave`).
    Remove {
        channel: Arc<str>,
        member: Member,
        announce: bool,
    },
}

/// A channel's members, at most the limit asked for.
#[derive(Debug, Clone, Default)]
pub struct PresencePage {
    /// Each member's JSON.
    pub members: Vec<String>,
    /// Whether the channel has more members than were listed.
    pub truncated: bool,
}

/// How many members a channel has: connections, and distinct users among them (anonymous ones not counted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PresenceCounts {
    pub clients: u64,
    pub users: u64,
}

/// Why a backend operation failed, as text for logs and error replies.
#[derive(Debug, Clone)]
pub struct EngineError(pub String);

impl std::fmt::Display for EngineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A channel's state read in one atomic step: where its numbering stands and what history it still holds.
/// Subscribes start from it (the position in `subscribed`, the snapshot, the replay of a recovering client).
#[derive(Debug, Clone)]
pub struct Window {
    /// The channel's epoch (created by this read when the channel had none yet).
    pub epoch: Arc<str>,
    /// The newest sequence number (0 when nothing was published under this epoch).
    pub seq: u64,
    /// The latest value, if any (a value an outside producer SET directly has no seq).
    pub latest: Option<Arc<Publication>>,
    /// The history younger than `history_ttl`, newest first (sequenced messages only).
    pub history: Vec<Arc<Publication>>,
}

impl Window {
    /// The history oldest first, the order replays and fills give it in.
    pub fn oldest_first(&self) -> Vec<Arc<Publication>> {
        self.history.iter().rev().cloned().collect()
    }

    /// The messages after `since`, oldest first, when the history still holds every one of them.
    pub fn replay_after(
        &self,
        since: &crate::core::position::Position,
    ) -> Option<Vec<Arc<Publication>>> {
        crate::core::position::replay_after(
            since,
            &self.epoch,
            self.seq,
            self.history
                .iter()
                .filter_map(|p| p.seq.map(|seq| (seq, p.clone()))),
        )
    }
}

/// Whether a stored message's `ts` is recent enough to count as history (unparsable or missing: not).
pub fn within(ts: Option<&str>, cutoff: chrono::DateTime<chrono::Utc>) -> bool {
    ts.and_then(|ts| chrono::DateTime::parse_from_rfc3339(ts).ok())
        .is_some_and(|t| t >= cutoff)
}

/// The oldest publish time still inside `history_ttl`.
pub fn history_cutoff(history_ttl: std::time::Duration) -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now() - chrono::Duration::from_std(history_ttl).unwrap_or(chrono::Duration::MAX)
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
    /// The channel it publishes to (a split job's holds `*`): whose subscribers are its demand.
    fn channel(&self) -> &str;
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
    /// For every job: the subscribers of its channel (exact and pattern) on every replica, as last reported.
    pub demand: HashMap<String, usize>,
    /// Jobs this replica runs that another replica asked to fetch at once.
    pub refresh: Vec<String>,
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
    /// The subscribers of the job's channel on every replica, as the owner's last scan counted them.
    pub subscribers: usize,
    /// When the current owner took the job (the start of `stale` when nothing succeeded yet).
    #[serde(default)]
    pub since: Option<String>,
    /// When the job last published a changed value.
    #[serde(default)]
    pub last_change: Option<String>,
    /// Fetches answered 304 Not Modified (nothing published).
    #[serde(default)]
    pub not_modified: u64,
    /// Fetches whose value equalled the last one published (`publish = "on_change"`: nothing published).
    #[serde(default)]
    pub unchanged: u64,
    /// The upstream asked (`Retry-After`) not to be fetched before this time.
    #[serde(default)]
    pub retry_at: Option<String>,
    /// A split job: the channels its last successful fetch covered.
    #[serde(default)]
    pub split_channels: usize,
    /// A split job: elements its last successful fetch dropped (over `max_split_elements`, or without a
    /// usable key).
    #[serde(default)]
    pub split_dropped: usize,
}

/// Whether Redis answers commands, as last probed while the pub/sub link was down. A dead link with Redis
/// answering is this replica's own fault (taking it out of the balancer helps); with Redis unreachable every
/// replica is equally affected, so taking any out helps nobody.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// The link is live, or it went down and no probe has answered since.
    Unknown,
    Answering,
    Unreachable,
}

/// How a shared backend's connections stand, for `/ready`, `/health`, stats and metrics.
#[derive(Debug, Clone, Copy)]
pub struct LinkHealth {
    /// The pub/sub link is live.
    pub linked: bool,
    /// It has been live at least once (before that the replica is starting).
    pub ever_linked: bool,
    /// While it is not live: whether Redis answers commands.
    pub reach: Reach,
}
