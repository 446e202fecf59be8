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
    /// nginx proxying everything to `upstream` the way `deploy/`'s example does: WebSocket upgrades passed
    /// through, `X-Forwarded-For` extended with the client's address, `X-Forwarded-Host` set.
    pub fn start(upstream: SocketAddr) -> Nginx {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("relayhub-nginx-{}-{port}", std::process::id()));
        std::fs::create_dir_all(dir.join("logs")).expect("nginx dir");
        // Worker processes may run as another user: let them write their temp files.
        let tmp = dir.join("tmp");
        std::fs::create_dir_all(&tmp).expect("nginx tmp dir");
        let _ = Command::new("chmod").arg("1777").arg(&tmp).status();
        let config = format!(
            r#"worker_processes 1;
error_log {dir}/logs/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://{upstream};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Host $host;
            proxy_read_timeout 120s;
        }}
    }}
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

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
