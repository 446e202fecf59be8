//! The `relayhub` binary as an operator runs it, for tests of what only a real process shows: exit codes,
//! signals, its output. Its environment is cleared of every variable it reads, so the machine running the
//! tests cannot steer it (or point it at a real Redis).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{eventually, free_port, get_json};

/// Variables the binary reads; cleared so the environment running the tests cannot steer it (or point it at
/// a real Redis).
pub const ENV_VARS: &[&str] = &[
    "PORT",
    "HOST",
    "REDIS_URL",
    "REDIS_HOST",
    "REDIS_PORT",
    "REDIS_PASSWORD",
    "REDIS_CLUSTER_NODES",
    "RELAYHUB_CONFIG",
    "RELAYHUB_API_KEY",
    "RELAYHUB_ADMIN_TOKEN",
    "RELAYHUB_INSTANCE_ID",
    "UPSTREAM_TOKEN",
    "RELAYHUB_LOG_FORMAT",
    "RELAYHUB_URL",
    "RELAYHUB_REDIS_REQUIRED",
    "RELAYHUB_JWT_SECRET",
];

/// How long a process that should exit by itself may take (generous: a loaded machine).
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

pub fn relayhub(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_relayhub"));
    command.args(args).current_dir(env!("CARGO_MANIFEST_DIR"));
    for var in ENV_VARS {
        command.env_remove(var);
    }
    command.env("RUST_LOG", "info");
    for (k, v) in env {
        command.env(k, v);
    }
    command
}

/// A config file in the temp directory, removed on drop.
pub struct ConfigFile(PathBuf);

impl ConfigFile {
    pub fn new(text: &str) -> ConfigFile {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("relayhub-cli-{}-{n}.toml", std::process::id()));
        std::fs::write(&path, text).expect("write config");
        ConfigFile(path)
    }

    pub fn path(&self) -> &str {
        self.0.to_str().expect("a UTF-8 temp path")
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A running `relayhub` whose stdout and stderr are collected; killed on drop if still running.
pub struct Process {
    child: Child,
    output: Arc<Mutex<String>>,
}

impl Process {
    pub fn spawn(mut command: Command) -> Process {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the relayhub binary runs");
        let output = Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        for pipe in [
            Box::new(stdout) as Box<dyn std::io::Read + Send>,
            Box::new(stderr),
        ] {
            let output = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let mut output = output.lock().expect("output lock");
                    output.push_str(&line);
                    output.push('\n');
                }
            });
        }
        Process { child, output }
    }

    pub fn output(&self) -> String {
        self.output.lock().expect("output lock").clone()
    }

    /// Waits for the process to exit by itself within `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // Let the reader threads drain the pipes.
                std::thread::sleep(Duration::from_millis(50));
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn exit_code(&mut self) -> i32 {
        let status = self
            .wait(EXIT_TIMEOUT)
            .unwrap_or_else(|| panic!("relayhub did not exit; output:\n{}", self.output()));
        status
            .code()
            .unwrap_or_else(|| panic!("killed by a signal: {status}\n{}", self.output()))
    }

    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -TERM failed");
    }
}

impl Process {
    /// SIGTERM, then the exit code must be 0.
    pub fn stop_gracefully(&mut self) {
        self.terminate();
        let code = self.wait(EXIT_TIMEOUT).and_then(|s| s.code());
        assert_eq!(code, Some(0), "{}", self.output());
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts the binary on a free loopback port with `config`; returns it once `/health` answers.
pub async fn start_binary(config: &ConfigFile) -> (Process, String) {
    start_binary_with(config, &[]).await
}

/// [`start_binary`] with more environment variables.
pub async fn start_binary_with(config: &ConfigFile, extra: &[(&str, &str)]) -> (Process, String) {
    start_binary_in(config, extra, None).await
}

/// [`start_binary_with`], in the working directory `cwd` when given (else the repository).
pub async fn start_binary_in(
    config: &ConfigFile,
    extra: &[(&str, &str)],
    cwd: Option<&std::path::Path>,
) -> (Process, String) {
    let port = free_port().to_string();
    let mut env = vec![("PORT", port.as_str()), ("HOST", "127.0.0.1")];
    env.extend_from_slice(extra);
    let mut command = relayhub(&["--config", config.path()], &env);
    if let Some(dir) = cwd {
        command.current_dir(dir);
    }
    let process = Process::spawn(command);
    let base = format!("127.0.0.1:{port}");
    let health = format!("http://{base}/health");
    eventually(
        Duration::from_secs(30),
        "the binary answers /health",
        || async {
            // A log line after start, so the health check cannot race the listener being set up.
            process.output().contains("listening on")
                && tokio::time::timeout(Duration::from_secs(2), get_json(&health))
                    .await
                    .is_ok_and(|(status, _)| status == 200)
        },
    )
    .await;
    (process, base)
}
