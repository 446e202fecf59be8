//! Every Redis key and pub/sub channel name relayhub uses, built from the configured prefix in this one place.
//! The `ch:` and `cache:` names are a public contract: outside producers PUBLISH and SET them directly.

/// Builds key and channel names under one prefix (`relayhub:` by default).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_string(),
        }
    }

    /// Pub/sub channel carrying a relayhub channel's messages: `<prefix>ch:<channel>`.
    pub fn pubsub_channel(&self, channel: &str) -> String {
        format!("{}ch:{channel}", self.prefix)
    }

    /// The relayhub channel a pub/sub channel name carries, if it is one of ours.
    pub fn channel_of<'a>(&self, pubsub_channel: &'a str) -> Option<&'a str> {
        pubsub_channel
            .strip_prefix(&self.prefix)?
            .strip_prefix("ch:")
    }

    /// Latest value (raw JSON string, with a TTL): `<prefix>cache:<channel>`.
    pub fn cache(&self, channel: &str) -> String {
        format!("{}cache:{channel}", self.prefix)
    }

    /// Last N snapshots, newest first (list of `{"seq","ts","data"}`): `<prefix>snap:<channel>`.
    pub fn snapshots(&self, channel: &str) -> String {
        format!("{}snap:{channel}", self.prefix)
    }

    /// The epoch of a channel's sequence numbers, living exactly as long as the counter:
    /// `<prefix>epoch:<channel>`.
    pub fn epoch(&self, channel: &str) -> String {
        format!("{}epoch:{channel}", self.prefix)
    }

    /// Per-channel sequence counter: `<prefix>seq:<channel>`.
    pub fn seq(&self, channel: &str) -> String {
        format!("{}seq:{channel}", self.prefix)
    }

    /// One replica's probe channel, proving its pub/sub connection alive: `<prefix>probe:<instance>`.
    pub fn probe(&self, instance_id: &str) -> String {
        format!("{}probe:{instance_id}", self.prefix)
    }

    /// Hash of every polling job's definition, by job id: `<prefix>jobs`.
    pub fn jobs(&self) -> String {
        format!("{}jobs", self.prefix)
    }

    /// A job's lease, held by the owning replica: `<prefix>lease:<job>`.
    pub fn lease(&self, job: &str) -> String {
        format!("{}lease:{job}", self.prefix)
    }

    /// A job's status, written by its owner: `<prefix>jobstatus:<job>`.
    pub fn job_status(&self, job: &str) -> String {
        format!("{}jobstatus:{job}", self.prefix)
    }

    /// The lease of an `[[ingest]]` route, held by the replica that takes its messages into the sequenced
    /// path: `<prefix>ingestlease:<redis_channel>`.
    pub fn ingest_lease(&self, redis_channel: &str) -> String {
        format!("{}ingestlease:{redis_channel}", self.prefix)
    }

    /// A polling source's fleet-wide request budget (when its next request may go): `<prefix>ratelimit:<source>`.
    pub fn rate_limit(&self, source: &str) -> String {
        format!("{}ratelimit:{source}", self.prefix)
    }

    /// A request that a job's owner fetch at once, taken by its next scan: `<prefix>refresh:<job>`.
    pub fn refresh(&self, job: &str) -> String {
        format!("{}refresh:{job}", self.prefix)
    }

    /// A channel's presence members, by connection id (their JSON): `<prefix>presence:<channel>`.
    pub fn presence(&self, channel: &str) -> String {
        format!("{}presence:{channel}", self.prefix)
    }

    /// When each member of a channel's presence expires unless its replica refreshes it (sorted set of
    /// connection ids scored by expiry, ms since the Unix epoch): `<prefix>presence_exp:<channel>`.
    pub fn presence_expiry(&self, channel: &str) -> String {
        format!("{}presence_exp:{channel}", self.prefix)
    }

    /// How many members of a channel's presence each user has (anonymous members not counted):
    /// `<prefix>presence_users:<channel>`.
    pub fn presence_users(&self, channel: &str) -> String {
        format!("{}presence_users:{channel}", self.prefix)
    }

    /// Subscribers of a job's channel per replica (field: instance id, value: `<expiry ms> <count>`), written
    /// by every replica's scan: `<prefix>demand:<job>`.
    pub fn demand(&self, job: &str) -> String {
        format!("{}demand:{job}", self.prefix)
    }

    /// A polling source's cache-aside reads summed over the fleet (fields `hits`, `misses`), added to by every
    /// replica's scan: `<prefix>cachereads:<source>`.
    pub fn cache_reads(&self, source: &str) -> String {
        format!("{}cachereads:{source}", self.prefix)
    }

    /// Short lock making one cache fill per channel fleet-wide: `<prefix>fill:<channel>`.
    pub fn fill_lock(&self, channel: &str) -> String {
        format!("{}fill:{channel}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let k = Keys::new("t1:");
        assert_eq!(k.pubsub_channel("prices:BTC"), "t1:ch:prices:BTC");
        assert_eq!(k.channel_of("t1:ch:prices:BTC"), Some("prices:BTC"));
        assert_eq!(k.channel_of("other:ch:x"), None);
        assert_eq!(k.cache("a"), "t1:cache:a");
    }
}
