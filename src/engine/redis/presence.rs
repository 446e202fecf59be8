//! Presence in Redis, shared by every replica: per channel a hash of members (connection id -> member JSON), a
//! sorted set of their expiry times and a hash of members per user, changed and read by one Lua script per
//! operation. Each replica refreshes its own members' expiry (batched, one pipeline per batch), so the members
//! of a replica that died are pruned once `presence_ttl` has passed, by the next script to touch the channel
//! (a read, or a live replica's refresh), which also announces their `leave` where the namespace has
//! `join_leave`.
//!
//! `join` and `leave` travel on the channel's own pub/sub channel, published by the same script that changes
//! the presence: they reach exactly the replicas with subscribers of the channel. Their payload is byte 0x1D,
//! `j` or `l`, the connection id, a space, then the member JSON; raw JSON never starts with 0x1D, and neither
//! does a relayhub envelope.

use std::sync::Arc;
use std::time::Duration;

use deadpool_redis::redis;

use super::store::RedisStore;
use crate::engine::seam::{EngineError, Member, PresenceChange, PresenceCounts, PresencePage};

/// Marks a presence announcement on a channel's pub/sub channel.
pub const PRESENCE_MARK: u8 = 0x1d;

/// Members refreshed per pipeline: one round trip each, small enough that Redis never stalls on one.
const REFRESH_BATCH: usize = 500;

const ADD: &str = concat!(
    include_str!("presence_common.lua"),
    include_str!("presence_add.lua")
);
const REMOVE: &str = concat!(
    include_str!("presence_common.lua"),
    include_str!("presence_remove.lua")
);
const READ: &str = concat!(
    include_str!("presence_common.lua"),
    include_str!("presence_read.lua")
);
const STATS: &str = concat!(
    include_str!("presence_common.lua"),
    include_str!("presence_stats.lua")
);

/// What an announcement of another replica says.
pub struct Announcement<'a> {
    pub join: bool,
    pub client: &'a str,
    pub member: &'a str,
}

/// Reads a presence announcement (`None` when the payload is not one).
pub fn decode_announcement(payload: &[u8]) -> Option<Announcement<'_>> {
    let (&mark, rest) = payload.split_first()?;
    if mark != PRESENCE_MARK {
        return None;
    }
    let (&kind, rest) = rest.split_first()?;
    let rest = std::str::from_utf8(rest).ok()?;
    let (client, member) = rest.split_once(' ')?;
    Some(Announcement {
        join: kind == b'j',
        client,
        member,
    })
}

/// Where the pruned members' leaves go: the channel's pub/sub channel, or nowhere ('').
/// Items grouped by channel, channels in the order first seen and each group in the order given.
fn by_channel<T: Clone>(items: &[T], channel: impl Fn(&T) -> &str) -> Vec<Vec<T>> {
    let mut groups: Vec<(String, Vec<T>)> = Vec::new();
    for item in items {
        let name = channel(item);
        match groups.iter_mut().find(|(c, _)| c == name) {
            Some((_, group)) => group.push(item.clone()),
            None => groups.push((name.to_string(), vec![item.clone()])),
        }
    }
    groups.into_iter().map(|(_, group)| group).collect()
}

fn leaves_to(r: &RedisStore, channel: &str, announce: bool) -> String {
    if announce {
        r.keys().pubsub_channel(channel)
    } else {
        String::new()
    }
}

fn announcement(join: bool, member: &Member) -> Vec<u8> {
    let mut payload = Vec::with_capacity(3 + member.client.len() + member.json.len());
    payload.push(PRESENCE_MARK);
    payload.push(if join { b'j' } else { b'l' });
    payload.extend_from_slice(member.client.as_bytes());
    payload.push(b' ');
    payload.extend_from_slice(member.json.as_bytes());
    payload
}

pub struct RedisPresence {
    add: redis::Script,
    remove: redis::Script,
    read: redis::Script,
    stats: redis::Script,
    /// Cluster mode: a pipeline holds the calls of one channel only (one slot).
    cluster: bool,
}

impl RedisPresence {
    /// The scripts announce with PUBLISH, or SPUBLISH in cluster mode (the channel's pub/sub channel is then
    /// a sharded one, in the slot of the presence keys).
    pub fn new(cluster: bool) -> RedisPresence {
        let publish = if cluster { "SPUBLISH" } else { "PUBLISH" };
        let script =
            |body: &str| redis::Script::new(&format!("local PUBLISH = '{publish}'\n{body}"));
        RedisPresence {
            add: script(ADD),
            remove: script(REMOVE),
            read: script(READ),
            stats: script(STATS),
            cluster,
        }
    }

    fn keyed<'a>(
        &'a self,
        script: &'a redis::Script,
        r: &RedisStore,
        channel: &str,
    ) -> redis::ScriptInvocation<'a> {
        let keys = r.keys();
        let mut call = script.prepare_invoke();
        call.key(keys.presence(channel))
            .key(keys.presence_expiry(channel))
            .key(keys.presence_users(channel));
        call
    }

    /// Applies changes in order, in one round trip (one script call each).
    pub async fn apply(
        &self,
        r: &RedisStore,
        changes: &[PresenceChange],
        ttl: Duration,
    ) -> Result<(), EngineError> {
        if changes.is_empty() {
            return Ok(());
        }
        if self.cluster {
            // One pipeline per channel (each in its channel's slot), the changes of each in order.
            for run in by_channel(changes, |c| match c {
                PresenceChange::Add { channel, .. } | PresenceChange::Remove { channel, .. } => {
                    channel
                }
            }) {
                self.apply_one_slot(r, &run, ttl).await?;
            }
            return Ok(());
        }
        self.apply_one_slot(r, changes, ttl).await
    }

    async fn apply_one_slot(
        &self,
        r: &RedisStore,
        changes: &[PresenceChange],
        ttl: Duration,
    ) -> Result<(), EngineError> {
        let ttl_ms = ttl.as_millis().max(1) as u64;
        let mut pipe = redis::pipe();
        pipe.load_script(&self.add)
            .ignore()
            .load_script(&self.remove)
            .ignore();
        for change in changes {
            let call = match change {
                PresenceChange::Add {
                    channel,
                    member,
                    announce,
                } => {
                    let mut call = self.keyed(&self.add, r, channel);
                    call.arg(ttl_ms)
                        .arg(r.keys().pubsub_channel(channel))
                        .arg(if *announce { "1" } else { "0" })
                        .arg(&*member.client)
                        .arg(member.user.as_deref().unwrap_or(""))
                        .arg(&*member.json)
                        .arg(if *announce {
                            announcement(true, member)
                        } else {
                            Vec::new()
                        });
                    call
                }
                PresenceChange::Remove {
                    channel,
                    member,
                    announce,
                } => {
                    let mut call = self.keyed(&self.remove, r, channel);
                    call.arg(r.keys().pubsub_channel(channel))
                        .arg(&*member.client)
                        .arg(if *announce {
                            announcement(false, member)
                        } else {
                            Vec::new()
                        });
                    call
                }
            };
            pipe.invoke_script(&call).ignore();
        }
        r.with_conn(|mut c| async move { pipe.query_async::<()>(&mut c).await })
            .await
    }

    /// Pushes back the expiry of this replica's members (and re-adds any that Redis lost), a batch of
    /// members per round trip. `announces`: whether a channel's namespace has `join_leave` (the members of
    /// others that expired are pruned, and their leaving announced, on the way).
    pub async fn refresh(
        &self,
        r: &RedisStore,
        members: &[(Arc<str>, Vec<Member>)],
        ttl: Duration,
        announces: impl Fn(&str) -> bool,
    ) -> Result<(), EngineError> {
        let ttl_ms = ttl.as_millis().max(1) as u64;
        let mut pending: Vec<(&str, bool, &[Member])> = Vec::new();
        let mut in_batch = 0;
        for (channel, list) in members {
            let announce = announces(channel);
            for chunk in list.chunks(REFRESH_BATCH) {
                pending.push((channel, announce, chunk));
                in_batch += chunk.len();
                if in_batch >= REFRESH_BATCH {
                    self.refresh_batch(r, &pending, ttl_ms).await?;
                    pending.clear();
                    in_batch = 0;
                }
            }
        }
        self.refresh_batch(r, &pending, ttl_ms).await
    }

    async fn refresh_batch(
        &self,
        r: &RedisStore,
        batch: &[(&str, bool, &[Member])],
        ttl_ms: u64,
    ) -> Result<(), EngineError> {
        if batch.is_empty() {
            return Ok(());
        }
        if self.cluster {
            // One pipeline per channel (each in its channel's slot).
            for run in by_channel(batch, |(channel, _, _)| channel) {
                self.refresh_one_slot(r, &run, ttl_ms).await?;
            }
            return Ok(());
        }
        self.refresh_one_slot(r, batch, ttl_ms).await
    }

    async fn refresh_one_slot(
        &self,
        r: &RedisStore,
        batch: &[(&str, bool, &[Member])],
        ttl_ms: u64,
    ) -> Result<(), EngineError> {
        let mut pipe = redis::pipe();
        pipe.load_script(&self.add).ignore();
        for (channel, announce, members) in batch {
            let mut call = self.keyed(&self.add, r, channel);
            call.arg(ttl_ms)
                .arg(r.keys().pubsub_channel(channel))
                .arg(if *announce { "1" } else { "0" });
            for member in *members {
                call.arg(&*member.client)
                    .arg(member.user.as_deref().unwrap_or(""))
                    .arg(&*member.json)
                    .arg("");
            }
            pipe.invoke_script(&call).ignore();
        }
        r.with_conn(|mut c| async move { pipe.query_async::<()>(&mut c).await })
            .await
    }

    /// `announce`: the namespace has `join_leave` (expired members pruned here get their `leave`).
    pub async fn read(
        &self,
        r: &RedisStore,
        channel: &str,
        limit: usize,
        announce: bool,
    ) -> Result<PresencePage, EngineError> {
        let mut call = self.keyed(&self.read, r, channel);
        call.arg(limit).arg(leaves_to(r, channel, announce));
        let (total, members): (usize, Vec<String>) = r
            .with_conn(|mut c| async move { call.invoke_async(&mut c).await })
            .await?;
        Ok(PresencePage {
            truncated: total > members.len(),
            members,
        })
    }

    pub async fn counts(
        &self,
        r: &RedisStore,
        channel: &str,
        announce: bool,
    ) -> Result<PresenceCounts, EngineError> {
        let mut call = self.keyed(&self.stats, r, channel);
        call.arg(leaves_to(r, channel, announce));
        let (clients, users): (u64, u64) = r
            .with_conn(|mut c| async move { call.invoke_async(&mut c).await })
            .await?;
        Ok(PresenceCounts { clients, users })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_round_trip() {
        let member = Member {
            client: "i-1".into(),
            user: None,
            json: r#"{"client":"i-1","user":null,"info":null}"#.into(),
        };
        let payload = announcement(false, &member);
        let read = decode_announcement(&payload).expect("an announcement");
        assert!(!read.join);
        assert_eq!(read.client, "i-1");
        assert_eq!(read.member, &*member.json);
        assert!(decode_announcement(b"{\"a\":1}").is_none());
        assert!(decode_announcement(b"\x1ej1 2").is_none());
    }
}
