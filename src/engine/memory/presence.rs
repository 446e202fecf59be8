//! Presence for a single instance: the members of each channel in a map, changed in order, with `join` and
//! `leave` handed straight to the node (there is no other replica to tell). Nothing expires: a member is
//! removed when its connection leaves, and the process holding it is the only one that could die with it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use crate::engine::seam::{
    BrokerEventHandler, Member, PresenceChange, PresenceCounts, PresencePage,
};

/// Channel -> connection id -> member; ordered so a capped answer lists the same members each time.
type Members = HashMap<Arc<str>, BTreeMap<Arc<str>, Member>>;

#[derive(Default)]
pub struct MemoryPresence {
    channels: Mutex<Members>,
}

impl MemoryPresence {
    fn lock(&self) -> std::sync::MutexGuard<'_, Members> {
        self.channels.lock().expect("presence lock poisoned")
    }

    pub fn apply(&self, changes: &[PresenceChange], handler: &dyn BrokerEventHandler) {
        for change in changes {
            match change {
                PresenceChange::Add {
                    channel,
                    member,
                    announce,
                } => {
                    self.lock()
                        .entry(channel.clone())
                        .or_default()
                        .insert(member.client.clone(), member.clone());
                    if *announce {
                        handler.on_join(channel, &member.client, &member.json);
                    }
                }
                PresenceChange::Remove {
                    channel,
                    member,
                    announce,
                } => {
                    {
                        let mut channels = self.lock();
                        if let Some(members) = channels.get_mut(channel) {
                            members.remove(&member.client);
                            if members.is_empty() {
                                channels.remove(channel);
                            }
                        }
                    }
                    if *announce {
                        handler.on_leave(channel, &member.client, &member.json);
                    }
                }
            }
        }
    }

    pub fn read(&self, channel: &str, limit: usize) -> PresencePage {
        let channels = self.lock();
        let Some(members) = channels.get(channel) else {
            return PresencePage::default();
        };
        PresencePage {
            members: members
                .values()
                .take(limit)
                .map(|m| m.json.to_string())
                .collect(),
            truncated: members.len() > limit,
        }
    }

    pub fn counts(&self, channel: &str) -> PresenceCounts {
        let channels = self.lock();
        let Some(members) = channels.get(channel) else {
            return PresenceCounts::default();
        };
        let users: HashSet<&str> = members.values().filter_map(|m| m.user.as_deref()).collect();
        PresenceCounts {
            clients: members.len() as u64,
            users: users.len() as u64,
        }
    }
}
