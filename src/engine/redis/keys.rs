//! Every Redis key and pub/sub channel name relayhub uses, built from the configured prefix in this one place.
//! The `ch:` and `cache:` names are a public contract: outside producers PUBLISH and SET them directly.
//!
//! Two layouts. With one Redis the names are plain (`relayhub:cache:prices:BTC`), as outside producers know
//! them. In cluster mode every name carries a hash tag, so the keys one script touches sit in one slot: the
//! keys (and the sharded pub/sub channel) of one relayhub channel carry the channel as their tag
//! (`relayhub:cache:{prices:BTC}`, `relayhub:ch:{prices:BTC}`), and the fleet-wide keys (jobs, leases, job
//! statuses, refresh requests, rate budgets, job demand, ingest leases) share the tag `{fleet}`
//! (`relayhub:{fleet}:lease:<job>`). Every builder goes through [`Keys::of_channel`] or [`Keys::of_fleet`],
//! which apply the layout: a new key follows the pattern and gets its tag.

/// The hash tag of the fleet-wide keys in cluster mode: one slot, so scripts over them never cross slots.
const FLEET_TAG: &str = "{fleet}";

/// Builds key and channel names under one prefix (`relayhub:` by default).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    /// Cluster mode: names carry hash tags.
    cluster: bool,
}

impl Keys {
    /// The layout for one Redis (`cluster` false) or a Redis Cluster (hash tags). The prefix has no `{` or `}`
    /// in cluster mode (the configuration refuses it), so the tag placed here is the name's first.
    pub fn with_layout(prefix: &str, cluster: bool) -> Keys {
        Keys {
            prefix: prefix.to_string(),
            cluster,
        }
    }

    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// A key (or pub/sub channel) of one relayhub channel: `<prefix><kind>:<channel>`, or
    /// `<prefix><kind>:{<channel>}` in cluster mode, so all of a channel's names share its slot.
    fn of_channel(&self, kind: &str, channel: &str) -> String {
        if self.cluster {
            format!("{}{kind}:{{{channel}}}", self.prefix)
        } else {
            format!("{}{kind}:{channel}", self.prefix)
        }
    }

    /// A fleet-wide key: `<prefix><kind>` + `:<rest>` when given, or `<prefix>{fleet}:<kind>...` in cluster
    /// mode, so every fleet-wide key shares one slot.
    fn of_fleet(&self, kind: &str, rest: Option<&str>) -> String {
        let tag = if self.cluster { FLEET_TAG } else { "" };
        let sep = if self.cluster { ":" } else { "" };
        match rest {
            Some(rest) => format!("{}{tag}{sep}{kind}:{rest}", self.prefix),
            None => format!("{}{tag}{sep}{kind}", self.prefix),
        }
    }

    /// Pub/sub channel carrying a relayhub channel's messages: `<prefix>ch:<channel>` (a sharded channel,
    /// `<prefix>ch:{<channel>}`, in cluster mode).
    pub fn pubsub_channel(&self, channel: &str) -> String {
        self.of_channel("ch", channel)
    }

    /// The relayhub channel a pub/sub channel name carries, if it is one of ours.
    pub fn channel_of<'a>(&self, pubsub_channel: &'a str) -> Option<&'a str> {
        let rest = pubsub_channel
            .strip_prefix(&self.prefix)?
            .strip_prefix("ch:")?;
        if self.cluster {
            rest.strip_prefix('{')?.strip_suffix('}')
        } else {
            Some(rest)
        }
    }

    /// Latest value (raw JSON string, with a TTL): `<prefix>cache:<channel>`.
    pub fn cache(&self, channel: &str) -> String {
        self.of_channel("cache", channel)
    }

    /// The start of every cache key whose channel starts with `channel_prefix` (for SCAN MATCH). Only the
    /// plain layout is scanned: cluster mode has no pattern subscriptions.
    pub fn cache_prefix(&self, channel_prefix: &str) -> String {
        format!("{}cache:{channel_prefix}", self.prefix)
    }

    /// Last N snapshots, newest first (list of `{"seq","ts","data"}`): `<prefix>snap:<channel>`.
    pub fn snapshots(&self, channel: &str) -> String {
        self.of_channel("snap", channel)
    }

    /// The epoch of a channel's sequence numbers, living exactly as long as the counter:
    /// `<prefix>epoch:<channel>`.
    pub fn epoch(&self, channel: &str) -> String {
        self.of_channel("epoch", channel)
    }

    /// Per-channel sequence counter: `<prefix>seq:<channel>`.
    pub fn seq(&self, channel: &str) -> String {
        self.of_channel("seq", channel)
    }

    /// One replica's probe channel, proving its pub/sub connection alive: `<prefix>probe:<instance>` (a
    /// sharded channel in cluster mode, on the shard its tag picks).
    pub fn probe(&self, instance_id: &str) -> String {
        self.of_channel("probe", instance_id)
    }

    /// Hash of every polling job's definition, by job id: `<prefix>jobs`.
    pub fn jobs(&self) -> String {
        self.of_fleet("jobs", None)
    }

    /// A job's lease, held by the owning replica: `<prefix>lease:<job>`.
    pub fn lease(&self, job: &str) -> String {
        self.of_fleet("lease", Some(job))
    }

    /// A job's status, written by its owner: `<prefix>jobstatus:<job>`.
    pub fn job_status(&self, job: &str) -> String {
        self.of_fleet("jobstatus", Some(job))
    }

    /// The lease of an `[[ingest]]` route, held by the replica that takes its messages into the sequenced
    /// path: `<prefix>ingestlease:<redis_channel>`.
    pub fn ingest_lease(&self, redis_channel: &str) -> String {
        self.of_fleet("ingestlease", Some(redis_channel))
    }

    /// A polling source's fleet-wide request budget (when its next request may go): `<prefix>ratelimit:<source>`.
    pub fn rate_limit(&self, source: &str) -> String {
        self.of_fleet("ratelimit", Some(source))
    }

    /// A request that a job's owner fetch at once, taken by its next scan: `<prefix>refresh:<job>`.
    pub fn refresh(&self, job: &str) -> String {
        self.of_fleet("refresh", Some(job))
    }

    /// A channel's presence members, by connection id (their JSON): `<prefix>presence:<channel>`.
    pub fn presence(&self, channel: &str) -> String {
        self.of_channel("presence", channel)
    }

    /// When each member of a channel's presence expires unless its replica refreshes it (sorted set of
    /// connection ids scored by expiry, ms since the Unix epoch): `<prefix>presence_exp:<channel>`.
    pub fn presence_expiry(&self, channel: &str) -> String {
        self.of_channel("presence_exp", channel)
    }

    /// How many members of a channel's presence each user has (anonymous members not counted):
    /// `<prefix>presence_users:<channel>`.
    pub fn presence_users(&self, channel: &str) -> String {
        self.of_channel("presence_users", channel)
    }

    /// Subscribers of a job's channel per replica (field: instance id, value: `<expiry ms> <count>`), written
    /// by every replica's scan: `<prefix>demand:<job>`.
    pub fn demand(&self, job: &str) -> String {
        self.of_fleet("demand", Some(job))
    }

    /// A polling source's cache-aside reads summed over the fleet (fields `hits`, `misses`), added to by every
    /// replica's scan: `<prefix>cachereads:<source>`.
    pub fn cache_reads(&self, source: &str) -> String {
        self.of_fleet("cachereads", Some(source))
    }

    /// Short lock making one cache fill per channel fleet-wide: `<prefix>fill:<channel>`.
    pub fn fill_lock(&self, channel: &str) -> String {
        self.of_channel("fill", channel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let k = Keys::with_layout("t1:", false);
        assert_eq!(k.pubsub_channel("prices:BTC"), "t1:ch:prices:BTC");
        assert_eq!(k.channel_of("t1:ch:prices:BTC"), Some("prices:BTC"));
        assert_eq!(k.channel_of("other:ch:x"), None);
        assert_eq!(k.cache("a"), "t1:cache:a");
        assert_eq!(k.lease("j"), "t1:lease:j");
        assert_eq!(k.jobs(), "t1:jobs");
        assert_eq!(k.presence("a"), "t1:presence:a");
    }

    /// The hash tag Redis Cluster hashes: the part between the first `{` and the next `}`, when not empty.
    fn tag(key: &str) -> &str {
        if let Some(open) = key.find('{')
            && let Some(len) = key[open + 1..].find('}')
            && len > 0
        {
            return &key[open + 1..open + 1 + len];
        }
        key
    }

    #[test]
    fn cluster_names_share_a_tag() {
        let k = Keys::with_layout("t1:", true);
        assert_eq!(k.pubsub_channel("prices:BTC"), "t1:ch:{prices:BTC}");
        assert_eq!(k.channel_of("t1:ch:{prices:BTC}"), Some("prices:BTC"));
        assert_eq!(k.channel_of("t1:ch:prices:BTC"), None);
        for channel in ["prices:BTC", "a{b}c", "x}y", "{"] {
            let names = [
                k.pubsub_channel(channel),
                k.cache(channel),
                k.snapshots(channel),
                k.epoch(channel),
                k.seq(channel),
                k.presence(channel),
                k.presence_expiry(channel),
                k.presence_users(channel),
                k.fill_lock(channel),
            ];
            assert!(names.iter().all(|n| tag(n) == tag(&names[0])), "{names:?}");
            assert_eq!(k.channel_of(&names[0]), Some(channel));
        }
        let fleet = [
            k.jobs(),
            k.lease("j{1}"),
            k.job_status("j"),
            k.refresh("j"),
            k.rate_limit("s"),
            k.demand("j"),
            k.cache_reads("s"),
            k.ingest_lease("feed:x"),
        ];
        assert!(fleet.iter().all(|n| tag(n) == "fleet"), "{fleet:?}");
    }
}
