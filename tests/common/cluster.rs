//! A real Redis Cluster for tests: six `redis-server` processes in cluster mode (three masters, one replica
//! each) on free loopback ports in a temp directory, joined by `redis-cli --cluster create`, all killed on
//! drop. Nodes can be killed one by one, so a replica takes its master's place.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, redis_server_binary};

/// Milliseconds a node may be silent before the cluster counts it as failed (and a replica takes over).
pub const NODE_TIMEOUT_MS: u64 = 2000;

struct Node {
    port: u16,
    child: Option<Child>,
}

pub struct RedisCluster {
    nodes: Vec<Node>,
    dir: PathBuf,
}

impl RedisCluster {
    /// Starts six nodes, creates the cluster and waits until every node reports `cluster_state:ok`.
    pub fn start() -> RedisCluster {
        let first = free_port();
        let dir = std::env::temp_dir().join(format!(
            "relayhub-test-cluster-{first}-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut nodes = Vec::new();
        for i in 0..6 {
            let port = if i == 0 { first } else { free_port() };
            let bus = free_port();
            let node_dir = dir.join(port.to_string());
            std::fs::create_dir_all(&node_dir).expect("node dir");
            let child = spawn_node(port, bus, &node_dir);
            nodes.push(Node {
                port,
                child: Some(child),
            });
        }
        let cluster = RedisCluster { nodes, dir };
        for node in &cluster.nodes {
            wait_for(
                Duration::from_secs(10),
                "a cluster node answers PING",
                || command(node.port, &["PING"]).is_ok_and(|r| r.contains("PONG")),
            );
        }
        let addresses: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let output = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli runs (install redis-tools)");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        cluster.wait_ok();
        cluster.wait_replicas_synced();
        cluster
    }

    /// Waits until every replica has synced with its master, so each can take over when its master dies.
    fn wait_replicas_synced(&self) {
        wait_for(Duration::from_secs(30), "every replica in sync", || {
            let replicas: Vec<String> = self
                .live_ports()
                .filter_map(|port| command(port, &["INFO", "replication"]).ok())
                .filter(|info| info.contains("role:slave"))
                .collect();
            replicas.len() == 3
                && replicas
                    .iter()
                    .all(|info| info.contains("master_link_status:up"))
        });
    }

    /// Waits until the replica of a killed master has taken its slots: every live node reports
    /// `cluster_state:ok` and `key`'s slot is served by a live master.
    pub fn wait_failover(&self, key: &str) {
        wait_for(Duration::from_secs(30), "a replica took over", || {
            let any = self.live_ports().next().expect("a live node");
            let slot = self.cmd(any, &["CLUSTER", "KEYSLOT", key]);
            let slot = slot.trim().trim_start_matches(':').to_string();
            let owner_alive = self.live_ports().any(|port| {
                command(port, &["CLUSTER", "COUNTKEYSINSLOT", &slot]).is_ok()
                    && command(port, &["ROLE"]).is_ok_and(|r| r.contains("master"))
                    && self.owns(port, &slot)
            });
            owner_alive
                && self.live_ports().all(|port| {
                    command(port, &["CLUSTER", "INFO"])
                        .is_ok_and(|info| info.contains("cluster_state:ok"))
                })
        });
    }

    /// Whether the node on `port` says it serves `slot` itself.
    fn owns(&self, port: u16, slot: &str) -> bool {
        let Ok(nodes) = command(port, &["CLUSTER", "NODES"]) else {
            return false;
        };
        let slot: u16 = slot.parse().unwrap_or(u16::MAX);
        nodes.lines().any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() > 8
                && fields[2].contains("myself")
                && fields[2].contains("master")
                && fields[8..].iter().any(|range| {
                    let mut b = range.split('-').map(|x| x.parse::<u16>().ok());
                    match (b.next().flatten(), b.next().flatten()) {
                        (Some(lo), Some(hi)) => (lo..=hi).contains(&slot),
                        (Some(one), None) => one == slot,
                        _ => false,
                    }
                })
        })
    }

    /// Seed node URLs for `redis.cluster_nodes`.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect()
    }

    /// The seeds as a TOML array.
    pub fn seeds_toml(&self) -> String {
        let quoted: Vec<String> = self.seeds().iter().map(|s| format!("\"{s}\"")).collect();
        format!("[{}]", quoted.join(", "))
    }

    fn live_ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.port)
    }

    /// Runs a command on a node.
    pub fn cmd(&self, port: u16, args: &[&str]) -> String {
        command(port, args).unwrap_or_else(|e| panic!("node {port}: {e}"))
    }

    /// Runs a command on the master serving `key`'s slot (`SET`, `SPUBLISH`, `GET` of tagged names).
    pub fn cmd_for_key(&self, key: &str, args: &[&str]) -> String {
        let port = self.master_of(key);
        self.cmd(port, args)
    }

    /// The port of the live master serving `key`'s slot.
    pub fn master_of(&self, key: &str) -> u16 {
        let any = self.live_ports().next().expect("a live node");
        let slot: u16 = self
            .cmd(any, &["CLUSTER", "KEYSLOT", key])
            .trim()
            .trim_start_matches(':')
            .parse()
            .expect("slot number");
        for port in self.live_ports().collect::<Vec<_>>() {
            let nodes = self.cmd(port, &["CLUSTER", "NODES"]);
            for line in nodes.lines() {
                let fields: Vec<&str> = line.split_whitespace().collect();
                if fields.len() < 8 || !fields[2].contains("master") || fields[2].contains("fail") {
                    continue;
                }
                let owns = fields[8..].iter().any(|range| {
                    let mut bounds = range.split('-');
                    match (
                        bounds.next().and_then(|b| b.parse::<u16>().ok()),
                        bounds.next().and_then(|b| b.parse::<u16>().ok()),
                    ) {
                        (Some(lo), Some(hi)) => (lo..=hi).contains(&slot),
                        (Some(one), None) => one == slot,
                        _ => false,
                    }
                });
                if owns {
                    let address = fields[1].split('@').next().unwrap_or_default();
                    let port: u16 = address
                        .rsplit(':')
                        .next()
                        .and_then(|p| p.parse().ok())
                        .expect("node port");
                    if self.live_ports().any(|p| p == port) {
                        return port;
                    }
                }
            }
        }
        panic!("no live master serves slot {slot}");
    }

    /// Moves `key`'s slot, with its keys, from its master to another master (a resharding step, as
    /// `redis-cli --cluster reshard` does it); returns the new owner's port.
    pub fn move_slot_of(&self, key: &str) -> u16 {
        let from = self.master_of(key);
        let any = from;
        let slot = self.cmd(any, &["CLUSTER", "KEYSLOT", key]);
        let slot = slot.trim().trim_start_matches(':').to_string();
        let to = self
            .live_ports()
            .filter(|p| *p != from)
            .find(|p| command(*p, &["ROLE"]).is_ok_and(|r| r.contains("master")))
            .expect("another master");
        let id = |port: u16| -> String {
            let reply = self.cmd(port, &["CLUSTER", "MYID"]);
            reply.lines().nth(1).unwrap_or_default().trim().to_string()
        };
        let (from_id, to_id) = (id(from), id(to));
        self.cmd(to, &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id]);
        self.cmd(from, &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id]);
        let keys = self.cmd(from, &["CLUSTER", "GETKEYSINSLOT", &slot, "1000"]);
        let keys: Vec<&str> = keys
            .lines()
            .filter(|l| !l.starts_with('*') && !l.starts_with('$'))
            .collect();
        if !keys.is_empty() {
            let port = to.to_string();
            let mut migrate = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
            migrate.extend(keys.iter().copied());
            let reply = self.cmd(from, &migrate);
            assert!(reply.contains("OK"), "MIGRATE: {reply}");
        }
        for port in self.live_ports().collect::<Vec<_>>() {
            if command(port, &["ROLE"]).is_ok_and(|r| r.contains("master")) {
                self.cmd(port, &["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]);
            }
        }
        to
    }

    /// Waits until the replica of the master on `port` has acknowledged everything the master had written
    /// when this was called (replication is asynchronous: a master killed before that takes those writes
    /// with it).
    pub fn wait_replicated(&self, port: u16) {
        let field = |info: &str, name: &str| -> Option<u64> {
            info.split(['\r', '\n', ','])
                .find_map(|part| part.trim().strip_prefix(name)?.parse().ok())
        };
        let info = self.cmd(port, &["INFO", "replication"]);
        let written = field(&info, "master_repl_offset:").expect("master_repl_offset");
        wait_for(
            Duration::from_secs(10),
            "the replica acknowledged the writes",
            || {
                command(port, &["INFO", "replication"])
                    .is_ok_and(|info| field(&info, "offset=").is_some_and(|acked| acked >= written))
            },
        );
    }

    /// Kills a node (SIGKILL): a crash.
    pub fn kill(&mut self, port: u16) {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("a node of this cluster");
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits until every live node reports `cluster_state:ok`.
    pub fn wait_ok(&self) {
        wait_for(
            Duration::from_secs(30),
            "cluster_state:ok on every node",
            || {
                self.live_ports().all(|port| {
                    command(port, &["CLUSTER", "INFO"])
                        .is_ok_and(|info| info.contains("cluster_state:ok"))
                })
            },
        );
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn spawn_node(port: u16, bus: u16, dir: &Path) -> Child {
    Command::new(redis_server_binary())
        .args([
            "--port",
            &port.to_string(),
            "--cluster-port",
            &bus.to_string(),
            "--bind",
            "127.0.0.1",
            "--cluster-enabled",
            "yes",
            "--cluster-node-timeout",
            &NODE_TIMEOUT_MS.to_string(),
            "--cluster-config-file",
            "nodes.conf",
            "--save",
            "",
            "--appendonly",
            "no",
            // Replicas sync at once (the default waits 5 s for more replicas): a replica that never synced
            // cannot take over.
            "--repl-diskless-sync-delay",
            "0",
        ])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server starts")
}

fn wait_for(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One command to a node, as `redis_command` sends it.
pub use super::redis_command as command;
