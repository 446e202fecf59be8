//! A real nginx in front of a hub, on a free loopback port, for tests of what a reverse proxy changes: the
//! client address the hub sees, forwarded headers, WebSocket upgrades through it. Started with its own prefix
//! directory and `daemon off`, stopped (and its directory removed) on drop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

pub struct Nginx {
    pub port: u16,
    child: Child,
    dir: PathBuf,
}

fn nginx_binary() -> PathBuf {
    for candidate in [
        "/usr/sbin/nginx",
        "/usr/local/sbin/nginx",
        "/usr/local/bin/nginx",
    ] {
        if std::path::Path::new(candidate).exists() {
            return candidate.into();
        }
    }
    which("nginx").unwrap_or_else(|| {
        panic!(
            "nginx is not installed: install it (Debian: apt-get install nginx-light) or run scripts/test.sh, which does"
        )
    })
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|path| path.exists())
    })
}

impl Nginx {
    /// nginx in front of one hub, configured by `deploy/nginx.conf` itself.
    pub fn start(upstream: SocketAddr) -> Nginx {
        Nginx::start_fleet(&[upstream])
    }

    /// nginx in front of `replicas`, configured by `deploy/nginx.conf` as shipped: only its replica lines and
    /// its listen line are replaced, and the file is wrapped in the main context a test needs (its own prefix
    /// directory, pid file and temp paths).
    pub fn start_fleet(replicas: &[SocketAddr]) -> Nginx {
        Nginx::start_fleet_with(replicas, true)
    }

    /// As [`Nginx::start_fleet`], but with the `hash` line taken out: requests go round robin, each new
    /// connection to the next replica (what a balancer without sticky sessions does).
    pub fn start_round_robin(replicas: &[SocketAddr]) -> Nginx {
        Nginx::start_fleet_with(replicas, false)
    }

    fn start_fleet_with(replicas: &[SocketAddr], sticky: bool) -> Nginx {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("relayhub-nginx-{}-{port}", std::process::id()));
        std::fs::create_dir_all(dir.join("logs")).expect("nginx dir");
        // Worker processes may run as another user: let them write their temp files.
        let tmp = dir.join("tmp");
        std::fs::create_dir_all(&tmp).expect("nginx tmp dir");
        let _ = Command::new("chmod").arg("1777").arg(&tmp).status();
        let shipped =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/nginx.conf"))
                .expect("deploy/nginx.conf");
        let servers: String = replicas
            .iter()
            .map(|addr| format!("    server {addr} max_fails=1 fail_timeout=10s;\n"))
            .collect();
        let mut site = replace_between(&shipped, "replicas", &servers);
        if !sticky {
            let hash = "    hash $remote_addr consistent;\n";
            assert!(
                site.contains(hash),
                "deploy/nginx.conf routes by client address"
            );
            site = site.replace(hash, "");
        }
        let site = replace_between(&site, "listen", &format!("    listen 127.0.0.1:{port};\n"));
        let config = format!(
            r#"worker_processes 1;
error_log {dir}/logs/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
{site}
}}
"#,
            dir = dir.display(),
            tmp = tmp.display(),
        );
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config).expect("nginx.conf");
        let child = Command::new(nginx_binary())
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf)
            .arg("-g")
            .arg("daemon off;")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("nginx starts");
        let nginx = Nginx { port, child, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nginx did not listen on {port}: {}",
                std::fs::read_to_string(nginx.dir.join("logs/error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        nginx
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }
}

/// Replaces the lines between `# <marker> begin` and `# <marker> end` (markers kept out) with `with`.
fn replace_between(text: &str, marker: &str, with: &str) -> String {
    let begin = format!("# {marker} begin");
    let end = format!("# {marker} end");
    let from = text
        .find(&begin)
        .unwrap_or_else(|| panic!("deploy/nginx.conf has no `{begin}` line"));
    let from = text[..from].rfind('\n').map_or(0, |i| i + 1);
    let to = text
        .find(&end)
        .unwrap_or_else(|| panic!("deploy/nginx.conf has no `{end}` line"));
    let to = text[to..].find('\n').map_or(text.len(), |i| to + i + 1);
    format!("{}{with}{}", &text[..from], &text[to..])
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
