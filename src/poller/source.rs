//! A configured source, compiled once at start: URL and channel templates, transforms, expanded headers.
//! Jobs are a source plus parameter values; this file turns parameters into a job's URL, channel and id.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::core::config::{Config, PublishMode, SourceConfig, SourceKind, format_duration};
use crate::poller::derive::Derived;
use crate::poller::template::{Encoding, Template, expand_env};
use crate::poller::transform::{Transform, parse_all};

/// Why a job could not be made from a source and parameters: the polling API answers 400 with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamError(pub String);

pub struct Source {
    pub name: String,
    pub kind: SourceKind,
    pub url: Option<Template>,
    pub channel: Template,
    pub interval: Duration,
    pub ttl: Option<Duration>,
    pub timeout: Duration,
    pub headers: Vec<(String, String)>,
    pub transforms: Vec<Transform>,
    /// `redis` sources: (field name, command, key).
    pub fields: Vec<(String, String, String)>,
    /// Publish only a value that differs from the last one published (`publish = "on_change"`).
    pub only_on_change: bool,
    /// Requests spaced at least this far apart fleet-wide (`max_requests_per_minute`), if limited.
    pub request_spacing: Option<Duration>,
    pub max_retry_after: Duration,
    pub stale_after: Duration,
    pub auto_stop: bool,
    pub auto_start: bool,
    pub idle_grace: Duration,
    pub max_body_bytes: usize,
    /// One fetch published as many channels (`split`), if set.
    pub split: Option<Split>,
    /// Fields computed into each value (`derive`), after the pointers and before `diff`.
    pub derive: Vec<Derived>,
    /// Frames carry `fetched_at` (`meta = true`).
    pub meta: bool,
}

/// The placeholder of a split source's channel template that each element's key fills.
pub const SPLIT_PARAM: &str = "key";

/// How one fetched document becomes many channels: the array at `pointer`, one channel per element, named
/// by the element's `key` field.
pub struct Split {
    /// JSON Pointer to the array (`""`: the document itself).
    pub pointer: String,
    /// The element field whose value fills `{key}`.
    pub key: String,
    /// Most elements one fetch publishes.
    pub max: usize,
}

/// What a job is: which source, with which parameters, publishing where.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JobSpec {
    pub id: String,
    pub source: String,
    pub params: BTreeMap<String, String>,
    pub channel: String,
}

/// The read commands a `redis` source may use.
pub const REDIS_READS: &[&str] = &["GET", "LLEN", "HGETALL", "ZCARD", "SCARD", "HLEN", "STRLEN"];

impl Source {
    /// Compiles one source; `self_base` (`http://127.0.0.1:<port>`) replaces `{self}` in its URL.
    pub fn compile(index: usize, config: &SourceConfig, self_base: &str) -> Result<Source, String> {
        let key = |field: &str| format!("sources[{index}].{field}");
        let channel =
            Template::parse(&config.channel).map_err(|e| format!("{}: {e}", key("channel")))?;
        let url = match config.kind {
            SourceKind::Http => {
                let url = config.url.replace("{self}", self_base);
                let template = Template::parse(&url).map_err(|e| format!("{}: {e}", key("url")))?;
                let mut url_params = template.params().to_vec();
                let mut channel_params = channel.params().to_vec();
                url_params.sort();
                channel_params.sort();
                if url_params.iter().any(|p| !channel_params.contains(p)) {
                    return Err(format!(
                        "{}: every URL placeholder must also be in the channel template, so each job has its own channel",
                        key("channel")
                    ));
                }
                Some(template)
            }
            SourceKind::Redis => None,
        };
        let headers = config
            .headers
            .iter()
            .map(|(name, value)| {
                expand_env(value)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| format!("{}: {e}", key(&format!("headers.{name}"))))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let transforms =
            parse_all(&config.transform).map_err(|e| format!("{}: {e}", key("transform")))?;
        let derive = crate::poller::derive::parse_all(&config.derive)
            .map_err(|e| format!("{}: {e}", key("derive")))?;
        let split = match &config.split {
            None => None,
            Some(pointer) => {
                if !channel.params().iter().any(|p| p == SPLIT_PARAM) {
                    return Err(format!(
                        "{}: a split source's channel needs `{{{SPLIT_PARAM}}}`, filled from each element",
                        key("channel")
                    ));
                }
                if url
                    .as_ref()
                    .is_some_and(|u| u.params().iter().any(|p| p == SPLIT_PARAM))
                {
                    return Err(format!(
                        "{}: `{{{SPLIT_PARAM}}}` comes from each element of the response, so the URL cannot use it",
                        key("url")
                    ));
                }
                if !pointer.is_empty() && !pointer.starts_with('/') {
                    return Err(format!(
                        "{}: `{pointer}` is not a JSON Pointer (`/data/items`, or \"\" for the document)",
                        key("split")
                    ));
                }
                Some(Split {
                    pointer: pointer.clone(),
                    key: config.split_key.clone(),
                    max: config.max_split_elements,
                })
            }
        };
        let mut fields = Vec::new();
        for (name, command) in &config.fields {
            let mut words = command.split_whitespace();
            let (Some(cmd), Some(redis_key), None) = (words.next(), words.next(), words.next())
            else {
                return Err(format!(
                    "{}: `{command}` must be `<COMMAND> <key>`",
                    key(&format!("fields.{name}"))
                ));
            };
            let cmd = cmd.to_ascii_uppercase();
            if !REDIS_READS.contains(&cmd.as_str()) {
                return Err(format!(
                    "{}: `{cmd}` is not one of {}",
                    key(&format!("fields.{name}")),
                    REDIS_READS.join(", ")
                ));
            }
            fields.push((name.clone(), cmd, redis_key.to_string()));
        }
        Ok(Source {
            name: config.name.clone(),
            kind: config.kind,
            url,
            channel,
            interval: config.interval,
            ttl: config.ttl,
            timeout: config.timeout,
            headers,
            transforms,
            fields,
            only_on_change: config.only_on_change && config.publish == PublishMode::OnChange,
            request_spacing: (config.max_requests_per_minute > 0)
                .then(|| Duration::from_secs(60) / config.max_requests_per_minute),
            max_retry_after: config.max_retry_after,
            stale_after: config.stale_after.unwrap_or(config.interval * 3),
            auto_stop: config.auto_stop,
            auto_start: config.auto_start,
            idle_grace: config.idle_grace,
            max_body_bytes: config.max_body_bytes,
            split,
            derive,
            meta: config.meta,
        })
    }

    /// The job this source makes with `params`; a missing or extra parameter is an error naming it. A split
    /// source's job has every parameter but `{key}`; its channel shows `*` there (`prices:*`).
    pub fn job(&self, params: BTreeMap<String, String>) -> Result<JobSpec, ParamError> {
        let channel = if self.split.is_some() {
            if params.contains_key(SPLIT_PARAM) {
                return Err(ParamError(format!(
                    "`{SPLIT_PARAM}` is filled from each element of the response, not given"
                )));
            }
            let mut with_key = params.clone();
            with_key.insert(SPLIT_PARAM.into(), "x".into());
            let sample = self
                .channel
                .render(&with_key, Encoding::Raw)
                .map_err(|e| ParamError(e.to_string()))?;
            crate::core::protocol::validate_channel(&sample).map_err(|e| {
                ParamError(format!(
                    "the job's channels `{sample}` are invalid: {}",
                    e.message
                ))
            })?;
            with_key.insert(SPLIT_PARAM.into(), "*".into());
            self.channel
                .render(&with_key, Encoding::Raw)
                .map_err(|e| ParamError(e.to_string()))?
        } else {
            self.channel
                .render(&params, Encoding::Raw)
                .map_err(|e| ParamError(e.to_string()))?
        };
        if self.split.is_none() {
            crate::core::protocol::validate_channel(&channel).map_err(|e| {
                ParamError(format!(
                    "the job's channel `{channel}` is invalid: {}",
                    e.message
                ))
            })?;
        }
        if let Some(url) = &self.url {
            url.render(&params, Encoding::Url)
                .map_err(|e| ParamError(e.to_string()))?;
        }
        Ok(JobSpec {
            id: format!("{}@{channel}", self.name),
            source: self.name.clone(),
            params,
            channel,
        })
    }

    /// The channel of one element of a split job: the job's parameters with `{key}` = `element_key`.
    pub fn element_channel(&self, job: &JobSpec, element_key: &str) -> Result<String, String> {
        let mut params = job.params.clone();
        params.insert(SPLIT_PARAM.into(), element_key.into());
        let channel = self
            .channel
            .render(&params, Encoding::Raw)
            .map_err(|e| e.to_string())?;
        crate::core::protocol::validate_channel(&channel).map_err(|e| e.message)?;
        Ok(channel)
    }

    /// The parameters of the job that publishes `channel`, if this source's template matches it (a split
    /// source's job leaves `{key}` out).
    pub fn params_for_channel(&self, channel: &str) -> Option<BTreeMap<String, String>> {
        let mut params = self.channel.match_channel(channel)?;
        if self.split.is_some() {
            params.remove(SPLIT_PARAM);
        }
        Some(params)
    }

    /// The channel of the job that publishes `channel`: itself, or for a split source the job's `prices:*`.
    pub fn job_channel_for(&self, channel: &str) -> Option<String> {
        self.split.as_ref()?;
        let params = self.params_for_channel(channel)?;
        self.job(params).ok().map(|job| job.channel)
    }

    /// The URL of a job (its parameters were validated when it was made).
    pub fn url_for(&self, job: &JobSpec) -> Option<String> {
        self.url
            .as_ref()
            .and_then(|u| u.render(&job.params, Encoding::Url).ok())
    }

    /// For the sources listing: name, parameters, channel template, interval.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "kind": match self.kind { SourceKind::Http => "http", SourceKind::Redis => "redis" },
            "params": self.channel.params(),
            "channel": self.channel.as_str(),
            "interval": format_duration(self.interval),
            "auto_start": self.auto_start,
            "auto_stop": self.auto_stop,
        })
    }
}

/// The sources of a config, including the built-in demo source when `[demo] enabled = true`.
pub fn compile_sources(config: &Config, self_base: &str) -> Result<Vec<Source>, String> {
    let mut sources = Vec::new();
    for (i, source) in config.sources.iter().enumerate() {
        sources.push(Source::compile(i, source, self_base)?);
    }
    if config.demo.enabled && !config.sources.iter().any(|s| s.name == "demo") {
        let demo = SourceConfig {
            name: "demo".into(),
            url: "{self}/demo/prices/{symbol}".into(),
            channel: "demo:{symbol}".into(),
            interval: config.demo.interval,
            transform: vec!["diff".into()],
            auto_start: true,
            auto_stop: true,
            ..SourceConfig::default()
        };
        sources.push(Source::compile(config.sources.len(), &demo, self_base)?);
    }
    Ok(sources)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(url: &str, channel: &str) -> Result<Source, String> {
        let config = SourceConfig {
            name: "s".into(),
            url: url.into(),
            channel: channel.into(),
            ..SourceConfig::default()
        };
        Source::compile(0, &config, "http://127.0.0.1:1")
    }

    #[test]
    fn jobs_from_parameters() {
        let s = source(
            "{self}/chain?symbol={symbol}&expiry={expiry}",
            "option-chain:{symbol}:{expiry}",
        )
        .unwrap();
        let params: BTreeMap<String, String> = [
            ("symbol".to_string(), "NIFTY 50".to_string()),
            ("expiry".to_string(), "2025-11-28".to_string()),
        ]
        .into();
        let e = s.job(params.clone()).unwrap_err();
        assert!(e.0.contains("invalid"), "{e:?}");
        let mut ok = params.clone();
        ok.insert("symbol".into(), "NIFTY".into());
        let job = s.job(ok.clone()).unwrap();
        assert_eq!(job.channel, "option-chain:NIFTY:2025-11-28");
        assert_eq!(job.id, "s@option-chain:NIFTY:2025-11-28");
        assert_eq!(
            s.url_for(&job).unwrap(),
            "http://127.0.0.1:1/chain?symbol=NIFTY&expiry=2025-11-28"
        );
        let mut missing = ok.clone();
        missing.remove("expiry");
        assert!(s.job(missing).unwrap_err().0.contains("expiry"));
        let mut extra = ok;
        extra.insert("strike".into(), "1".into());
        assert!(s.job(extra).unwrap_err().0.contains("strike"));
    }

    fn split_source(channel: &str, edit: impl FnOnce(&mut SourceConfig)) -> Result<Source, String> {
        let mut config = SourceConfig {
            name: "t".into(),
            url: "http://x/tickers?venue={venue}".into(),
            channel: channel.into(),
            split: Some("/data".into()),
            split_key: "s".into(),
            ..SourceConfig::default()
        };
        edit(&mut config);
        Source::compile(0, &config, "http://127.0.0.1:1")
    }

    #[test]
    fn split_jobs_leave_the_key_to_each_element() {
        let s = split_source("prices:{venue}:{key}", |_| {}).unwrap();
        let params: BTreeMap<String, String> = [("venue".to_string(), "x".to_string())].into();
        let job = s.job(params.clone()).unwrap();
        assert_eq!(job.channel, "prices:x:*");
        assert_eq!(job.id, "t@prices:x:*");
        assert_eq!(s.element_channel(&job, "BTC").unwrap(), "prices:x:BTC");
        assert!(s.element_channel(&job, "no spaces").is_err());
        assert_eq!(
            s.job_channel_for("prices:x:BTC").as_deref(),
            Some("prices:x:*")
        );
        let mut with_key = params;
        with_key.insert("key".into(), "BTC".into());
        assert!(s.job(with_key).unwrap_err().0.contains("key"));
    }

    #[test]
    fn split_and_derive_mistakes_name_the_key() {
        let e = split_source("prices:{venue}", |_| {}).err().unwrap();
        assert!(e.starts_with("sources[0].channel"), "{e}");
        let e = split_source("prices:{venue}:{key}", |c| {
            c.url = "http://x/{key}?v={venue}".into()
        })
        .err()
        .unwrap();
        assert!(e.starts_with("sources[0].url"), "{e}");
        let e = split_source("prices:{venue}:{key}", |c| c.split = Some("data".into()))
            .err()
            .unwrap();
        assert!(e.starts_with("sources[0].split"), "{e}");
        let e = split_source("prices:{venue}:{key}", |c| {
            c.derive = vec!["mid = (bid + ask) / 2".into(), "bad = (bid +".into()]
        })
        .err()
        .unwrap();
        assert!(e.starts_with("sources[0].derive: `bad = (bid +`"), "{e}");
    }

    #[test]
    fn url_params_must_be_in_the_channel() {
        assert!(source("http://x/{a}/{b}", "c:{a}").is_err());
    }
}
