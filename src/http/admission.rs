//! Who is on the other end of a request, and whether one more WebSocket may come in. Shared by the admin
//! API (a request through a proxy is never "loopback") and the WebSocket upgrade (connection budgets per
//! replica and per client address, released by a guard whatever way the connection ends).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use actix_web::http::header::{self, HeaderMap, HeaderName};
use ipnet::IpNet;

use crate::core::config::{Config, parse_proxy};
use crate::stats::Stats;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The edge's view of clients: which peers are proxies, and the open-connection budgets.
pub struct Admission {
    /// `server.trusted_proxies`, parsed once.
    proxies: Vec<IpNet>,
    max_total: usize,
    max_per_ip: usize,
    /// Open connections in all and per client address; one lock, so both limits are checked together.
    open: Mutex<OpenConnections>,
}

#[derive(Default)]
struct OpenConnections {
    total: usize,
    /// Addresses with no open connection are removed, so the map is as large as the set of connected clients.
    per_ip: HashMap<IpAddr, usize>,
}

/// Why a handshake was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `server.max_connections` connections are open.
    Replica,
    /// The client address holds `server.max_connections_per_ip` connections.
    Address,
}

impl Refusal {
    pub fn message(self) -> &'static str {
        match self {
            Refusal::Replica => {
                "this replica has as many connections as it accepts; try again later"
            }
            Refusal::Address => "too many connections from this address",
        }
    }
}

/// One admitted connection's share of the budgets; given back when dropped. It lives inside the session, so
/// however the connection ends (close, reset, panic, shutdown) the slot is released with it.
pub struct ConnectionPermit {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut open = self.admission.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.per_ip.remove(&self.ip);
            }
        }
    }
}

impl Admission {
    /// From a validated config (an unparsable proxy entry was refused by validation and is skipped here).
    pub fn new(config: &Config) -> Arc<Admission> {
        let server = &config.server;
        Arc::new(Admission {
            proxies: server
                .trusted_proxies
                .iter()
                .filter_map(|p| parse_proxy(p).ok())
                .collect(),
            max_total: server.max_connections,
            max_per_ip: server.max_connections_per_ip,
            open: Mutex::new(OpenConnections::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OpenConnections> {
        // The counts stay consistent even if a holder panicked: every update is a single step.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_trusted_proxy(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.proxies.iter().any(|net| net.contains(&peer))
    }

    /// Whether a request came through a proxy: from a trusted proxy, or carrying forwarding headers (a proxy
    /// on the same host makes every client look like loopback; one that is not configured still says so).
    pub fn via_proxy(&self, peer: Option<IpAddr>, headers: &HeaderMap) -> bool {
        peer.is_some_and(|p| self.is_trusted_proxy(p))
            || headers.contains_key(X_FORWARDED_FOR)
            || headers.contains_key(header::FORWARDED)
    }

    /// The address a connection is budgeted under: the socket's peer, or, when that peer is a trusted proxy,
    /// the last `X-Forwarded-For` hop (the one the proxy added; earlier hops are the client's to invent).
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.is_trusted_proxy(peer) {
            return peer;
        }
        headers
            .get_all(X_FORWARDED_FOR)
            .filter_map(|value| value.to_str().ok())
            .next_back()
            .and_then(|value| value.rsplit(',').next())
            .and_then(|hop| hop.trim().parse::<IpAddr>().ok())
            .map(|ip| ip.to_canonical())
            .unwrap_or(peer)
    }

    /// Takes one connection slot for `ip`, or says which budget is spent (counted in `connections_refused`).
    pub fn admit(self: &Arc<Self>, ip: IpAddr, stats: &Stats) -> Result<ConnectionPermit, Refusal> {
        let mut open = self.lock();
        let refusal = if open.total >= self.max_total {
            Some(Refusal::Replica)
        } else if open.per_ip.get(&ip).copied().unwrap_or(0) >= self.max_per_ip {
            Some(Refusal::Address)
        } else {
            None
        };
        if let Some(refusal) = refusal {
            drop(open);
            Stats::add(&stats.connections_refused, 1);
            return Err(refusal);
        }
        open.total += 1;
        *open.per_ip.entry(ip).or_insert(0) += 1;
        Ok(ConnectionPermit {
            admission: self.clone(),
            ip,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::HeaderValue;

    fn admission(toml: &str) -> Arc<Admission> {
        Admission::new(&Config::from_toml(toml).unwrap())
    }

    #[test]
    fn the_last_forwarded_hop_counts_only_from_a_trusted_proxy() {
        let a = admission("[server]\ntrusted_proxies = [\"10.0.0.0/8\", \"::1\"]\n");
        let mut headers = HeaderMap::new();
        headers.append(
            X_FORWARDED_FOR,
            HeaderValue::from_static("1.1.1.1, 2.2.2.2"),
        );
        headers.append(
            X_FORWARDED_FOR,
            HeaderValue::from_static("3.3.3.3 , 4.4.4.4"),
        );
        let proxy: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(
            a.client_ip(proxy, &headers),
            "4.4.4.4".parse::<IpAddr>().unwrap()
        );
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(
            a.client_ip(mapped, &headers),
            "4.4.4.4".parse::<IpAddr>().unwrap()
        );
        let stranger: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(a.client_ip(stranger, &headers), stranger);
        // A hop that is not an address leaves the proxy itself as the client.
        let mut junk = HeaderMap::new();
        junk.insert(X_FORWARDED_FOR, HeaderValue::from_static("unknown"));
        assert_eq!(a.client_ip(proxy, &junk), proxy);
        assert!(a.via_proxy(Some(proxy), &HeaderMap::new()));
        assert!(a.via_proxy(Some(stranger), &junk));
        assert!(!a.via_proxy(Some(stranger), &HeaderMap::new()));
    }

    #[test]
    fn permits_are_given_back_when_dropped() {
        let a = admission("[server]\nmax_connections = 3\nmax_connections_per_ip = 2\n");
        let stats = Stats::default();
        let one: IpAddr = "192.0.2.1".parse().unwrap();
        let two: IpAddr = "192.0.2.2".parse().unwrap();
        let p1 = a.admit(one, &stats).unwrap();
        let _p2 = a.admit(one, &stats).unwrap();
        assert_eq!(a.admit(one, &stats).err(), Some(Refusal::Address));
        let _p3 = a.admit(two, &stats).unwrap();
        assert_eq!(a.admit(two, &stats).err(), Some(Refusal::Replica));
        drop(p1);
        assert!(a.admit(one, &stats).is_ok());
        assert_eq!(Stats::get(&stats.connections_refused), 2);
        assert_eq!(a.lock().per_ip.len(), 1 + 1);
    }
}
