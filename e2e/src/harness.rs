//! Helpers for scenario tests: run the machine's real `kubectl` against a sandbox, with its own kubeconfig and
//! discovery cache so tests never touch the user's files or each other.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Where the repository's files (`crds/`, `config/`) are.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// What one kubectl invocation returned.
#[derive(Debug)]
pub struct KubectlOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl KubectlOutput {
    fn from_output(output: Output) -> KubectlOutput {
        KubectlOutput {
            success: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

/// `kubectl` bound to one sandbox.
pub struct Kubectl {
    dir: PathBuf,
    kubeconfig: PathBuf,
}

impl Kubectl {
    /// Writes `kubeconfig` into `dir` (a per-test temporary directory) and uses `dir/cache` for discovery.
    pub fn new(dir: &Path, kubeconfig: &str) -> std::io::Result<Kubectl> {
        let path = dir.join("kubeconfig");
        std::fs::write(&path, kubeconfig)?;
        Ok(Kubectl {
            dir: dir.to_owned(),
            kubeconfig: path,
        })
    }

    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(kubectl_binary());
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.join("cache"))
            .args(args)
            .env_remove("KUBECONFIG")
            .current_dir(repo_root());
        cmd
    }

    /// Runs kubectl to completion (bounded by its own `--request-timeout`).
    pub fn run(&self, args: &[&str]) -> KubectlOutput {
        let mut all = vec!["--request-timeout=20s"];
        all.extend_from_slice(args);
        match self.command(&all).output() {
            Ok(output) => KubectlOutput::from_output(output),
            Err(err) => KubectlOutput {
                success: false,
                stdout: String::new(),
                stderr: format!("could not run {}: {err}", kubectl_binary()),
            },
        }
    }

    /// Runs kubectl with `stdin` as its standard input.
    pub fn run_with_stdin(&self, args: &[&str], stdin: &str) -> KubectlOutput {
        use std::io::Write;
        let spawned = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(err) => {
                return KubectlOutput {
                    success: false,
                    stdout: String::new(),
                    stderr: err.to_string(),
                };
            }
        };
        if let Some(mut input) = child.stdin.take() {
            let _ = input.write_all(stdin.as_bytes());
        }
        match child.wait_with_output() {
            Ok(output) => KubectlOutput::from_output(output),
            Err(err) => KubectlOutput {
                success: false,
                stdout: String::new(),
                stderr: err.to_string(),
            },
        }
    }

    /// Runs kubectl and fails the test with its output when it does not succeed.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.success,
            "kubectl {} failed:\nstdout: {}\nstderr: {}",
            args.join(" "),
            out.stdout,
            out.stderr
        );
        out.stdout
    }

    /// Starts a long-running kubectl (e.g. `get -w`) whose output lines can be awaited.
    pub fn spawn_lines(&self, args: &[&str]) -> std::io::Result<LineStream> {
        let mut child = self
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("kubectl has no stdout"))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Ok(LineStream { child, lines: rx })
    }
}

/// Output lines of a running process; the process is killed on drop.
pub struct LineStream {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl LineStream {
    /// Waits up to `timeout` for a line containing `needle`; returns every line read meanwhile on failure.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<String, Vec<String>> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Ok(line),
                Ok(line) => seen.push(line),
                Err(_) => break,
            }
        }
        Err(seen)
    }
}

impl Drop for LineStream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The kubectl to test with: `$KUBECTL` or the one on `PATH`.
pub fn kubectl_binary() -> String {
    std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".to_owned())
}

/// Polls `check` every 50ms until it returns `Some`, for at most `timeout`.
pub fn eventually<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `sluice` binary of this workspace, rebuilt once per test process so a stale binary is never tested
/// (`cargo test -p sluice-e2e` alone does not rebuild other packages' binaries).
pub fn sluice_binary() -> std::io::Result<PathBuf> {
    static BUILT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            // Test executables live in target/<profile>/deps, binaries (the demo) in target/<profile>.
            let exe = std::env::current_exe().map_err(|e| e.to_string())?;
            let parent = exe
                .parent()
                .ok_or_else(|| "cannot locate the target directory".to_owned())?;
            let profile_dir = if parent.ends_with("deps") {
                parent.parent().unwrap_or(parent)
            } else {
                parent
            };
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .args(["build", "--quiet", "-p", "sluice", "--bins"])
                .current_dir(repo_root())
                .status()
                .map_err(|e| format!("cannot run cargo: {e}"))?;
            if !status.success() {
                return Err("cargo build -p sluice failed".to_owned());
            }
            Ok(profile_dir.join("sluice"))
        })
        .clone()
        .map_err(std::io::Error::other)
}

/// A running `sluice operator`; killed (SIGKILL) on drop. Its log goes to `log_path`.
pub struct OperatorProcess {
    child: Child,
    log_path: PathBuf,
    /// Base URL of its bundle server, e.g. `http://127.0.0.1:41234`.
    pub bundle_url: String,
}

impl OperatorProcess {
    pub fn start(
        kubeconfig: &Path,
        prometheus_url: &str,
        log_path: &Path,
    ) -> std::io::Result<OperatorProcess> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)?;
        let bundle_port = crate::prometheus::free_port().map_err(std::io::Error::other)?;
        let bundle_addr = format!("127.0.0.1:{bundle_port}");
        let child = Command::new(sluice_binary()?)
            .args([
                "operator",
                "--metrics-addr",
                "127.0.0.1:0",
                "--bundle-addr",
                &bundle_addr,
                "--prometheus-url",
                prometheus_url,
            ])
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,kube=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        Ok(OperatorProcess {
            child,
            log_path: log_path.to_owned(),
            bundle_url: format!("http://{bundle_addr}"),
        })
    }

    /// SIGKILL, like a node dying: no cleanup runs.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running sandbox with CRDs installed, a kube client and a kubeconfig file for it (in `dir`).
pub struct Cluster {
    pub sandbox: crate::Sandbox,
    pub client: kube::Client,
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
}

/// The stand-in mesh CRDs of `e2e/fixtures/mesh-crds.yaml` (Istio, Gateway API).
pub fn mesh_crds() -> Result<
    Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>,
    Box<dyn std::error::Error + Send + Sync>,
>{
    let fixture = std::fs::read_to_string(repo_root().join("e2e/fixtures/mesh-crds.yaml"))?;
    Ok(serde_saphyr::from_multiple(&fixture)?)
}

/// Starts a sandbox on a free loopback port whose workloads become ready after `ready_delay`, and
/// installs `crds` in it.
pub async fn start_cluster(
    ready_delay: Duration,
    crds: Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>,
) -> Result<Cluster, Box<dyn std::error::Error + Send + Sync>> {
    let config = crate::SandboxConfig {
        ready_delay,
        ..crate::SandboxConfig::default()
    };
    let sandbox =
        crate::Sandbox::start(std::net::SocketAddr::from(([127, 0, 0, 1], 0)), config).await?;
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    sandbox.write_kubeconfig(&kubeconfig)?;
    let parsed: kube::config::Kubeconfig = serde_saphyr::from_str(&sandbox.kubeconfig())?;
    let client = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(parsed, &Default::default()).await?,
    )?;
    let api: kube::Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        kube::Api::all(client.clone());
    for crd in crds {
        api.create(&Default::default(), &crd).await?;
    }
    Ok(Cluster {
        sandbox,
        client,
        dir,
        kubeconfig,
    })
}
