//! Local delivery: the registries of this replica's worker threads and the subscriber counts across them.
//! It is the node's side of the broker seam: the engine hands every message to deliver here, and link events,
//! through [`BrokerEventHandler`]. Registries are held as recipients of their messages, so this file does not
//! depend on the registry actor (which depends on it for the counts).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use actix::Recipient;

use crate::core::protocol;
use crate::core::publication::Publication;
use crate::engine::{BrokerEventHandler, Window};
use crate::node::messages::{
    Announce, CatchUp, CloseAll, Dispatch, ForgetLatest, LinkUp, SessionId,
};
use crate::transport::frame;

/// Subscriber counts by channel (or pattern).
pub type Counts = Vec<(String, usize)>;

/// One registry, as the messages it takes from here.
pub struct RegistryInbox {
    pub dispatch: Recipient<Dispatch>,
    pub forget: Recipient<ForgetLatest>,
    pub catch_up: Recipient<CatchUp>,
    pub link_up: Recipient<LinkUp>,
    pub close_all: Recipient<CloseAll>,
    pub announce: Recipient<Announce>,
}

/// Adds or removes one subscriber of `key` in a count index and returns the new count (a key at zero is
/// removed; removing from a missing key changes nothing and returns `usize::MAX`, which no caller acts on).
fn count_change(index: &Mutex<HashMap<Arc<str>, usize>>, key: &Arc<str>, join: bool) -> usize {
    let mut map = index.lock().expect("subscriber index poisoned");
    if join {
        let count = map.entry(key.clone()).or_insert(0);
        *count += 1;
        return *count;
    }
    let Some(count) = map.get_mut(key) else {
        return usize::MAX;
    };
    *count -= 1;
    let count = *count;
    if count == 0 {
        map.remove(key);
    }
    count
}

#[derive(Default)]
pub struct Fanout {
    /// This replica's id: a connection id under it is one of this replica's connections.
    instance_id: String,
    /// One registry per HTTP worker thread, added as the workers start.
    registries: RwLock<Vec<RegistryInbox>>,
    /// Local subscribers per exact channel, across all registries.
    subscribers: Mutex<HashMap<Arc<str>, usize>>,
    /// Local subscribers per pattern prefix.
    pattern_subscribers: Mutex<HashMap<Arc<str>, usize>>,
}

impl Fanout {
    pub fn new(instance_id: &str) -> Fanout {
        Fanout {
            instance_id: instance_id.to_string(),
            ..Fanout::default()
        }
    }

    /// The id presence gives a connection of this replica: unique across the fleet.
    pub fn client_id(&self, session: SessionId) -> String {
        format!("{}-{session}", self.instance_id)
    }

    /// The local connection a connection id names, if it is one of this replica's.
    fn local_session(&self, client: &str) -> Option<SessionId> {
        client
            .strip_prefix(self.instance_id.as_str())?
            .strip_prefix('-')?
            .parse()
            .ok()
    }

    /// Hands a `join` or `leave` to every registry, encoded once.
    fn announce(&self, join: bool, channel: &str, client: &str, member: &str) {
        let frame = frame::text(&protocol::presence_event_frame(join, channel, member));
        let channel: Arc<str> = channel.into();
        let skip = self.local_session(client);
        for registry in self.registries().iter() {
            registry.announce.do_send(Announce {
                channel: channel.clone(),
                frame: frame.clone(),
                skip,
            });
        }
    }

    pub fn add_registry(&self, inbox: RegistryInbox) {
        self.registries
            .write()
            .expect("registry list lock poisoned")
            .push(inbox);
    }

    fn registries(&self) -> std::sync::RwLockReadGuard<'_, Vec<RegistryInbox>> {
        self.registries.read().expect("registry list lock poisoned")
    }

    /// Closes every WebSocket with 1001, spread evenly over `over` (all at once when it is zero).
    pub fn close_all(&self, over: Duration) {
        for registry in self.registries().iter() {
            registry.close_all.do_send(CloseAll { over });
        }
    }

    /// One more local subscriber of `channel`; returns the new count.
    pub fn subscriber_joined(&self, channel: &Arc<str>) -> usize {
        count_change(&self.subscribers, channel, true)
    }

    /// One less local subscriber of `channel`; returns the new count.
    pub fn subscriber_left(&self, channel: &Arc<str>) -> usize {
        count_change(&self.subscribers, channel, false)
    }

    pub fn pattern_subscriber_joined(&self, prefix: &Arc<str>) {
        count_change(&self.pattern_subscribers, prefix, true);
    }

    pub fn pattern_subscriber_left(&self, prefix: &Arc<str>) {
        count_change(&self.pattern_subscribers, prefix, false);
    }

    /// Local subscribers of a channel: exact subscriptions plus patterns that match it.
    pub fn local_subscribers(&self, channel: &str) -> usize {
        let exact = self
            .subscribers
            .lock()
            .expect("subscriber index poisoned")
            .get(channel)
            .copied()
            .unwrap_or(0);
        let patterns: usize = self
            .pattern_subscribers
            .lock()
            .expect("pattern index poisoned")
            .iter()
            .filter(|(prefix, _)| channel.starts_with(&***prefix))
            .map(|(_, n)| *n)
            .sum();
        exact + patterns
    }

    /// Subscriber counts per channel, and per pattern (`prices:*`), for stats.
    pub fn subscriber_counts(&self) -> (Counts, Counts) {
        let exact = self
            .subscribers
            .lock()
            .expect("subscriber index poisoned")
            .iter()
            .map(|(c, n)| (c.to_string(), *n))
            .collect();
        let patterns = self
            .pattern_subscribers
            .lock()
            .expect("pattern index poisoned")
            .iter()
            .map(|(p, n)| (format!("{p}*"), *n))
            .collect();
        (exact, patterns)
    }
}

impl BrokerEventHandler for Fanout {
    /// Hands a message to every local registry: one mailbox push per worker, not per subscriber.
    fn on_publication(&self, publication: Arc<Publication>) {
        for registry in self.registries().iter() {
            registry.dispatch.do_send(Dispatch(publication.clone()));
        }
    }

    fn on_link_down(&self) {
        for registry in self.registries().iter() {
            registry.forget.do_send(ForgetLatest);
        }
    }

    fn on_catch_up(&self, windows: Arc<Vec<(Arc<str>, Window)>>) {
        for registry in self.registries().iter() {
            registry.catch_up.do_send(CatchUp(windows.clone()));
        }
    }

    fn on_link_up(&self) {
        for registry in self.registries().iter() {
            registry.link_up.do_send(LinkUp);
        }
    }

    fn on_join(&self, channel: &str, client: &str, member: &str) {
        self.announce(true, channel, client, member);
    }

    fn on_leave(&self, channel: &str, client: &str, member: &str) {
        self.announce(false, channel, client, member);
    }
}
