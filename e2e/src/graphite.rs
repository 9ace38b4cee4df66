//! A real Graphite for tests: Debian's `graphite-web` serving its render API from whisper files in a temporary
//! directory, on a free loopback port. Points are written with the `whisper` library (the storage carbon writes),
//! at one-second resolution, so a test controls exactly what each second holds.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::prometheus::{HarnessError, free_port, http_get};

/// Debian's Python, which has graphite-web, Django and whisper (a pyenv `python3` earlier on PATH does not).
pub const DEFAULT_PYTHON: &str = "/usr/bin/python3";
/// How long [`GraphiteServer::start`] waits for the render API.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// graphite-web's own settings are read from `/etc/graphite`; this module (picked by
/// `GRAPHITE_SETTINGS_MODULE`) moves everything it writes into the test's directory.
const SETTINGS: &str = r#"import os
_root = os.path.dirname(os.path.abspath(__file__))
GRAPHITE_ROOT = '/usr/share/graphite-web'
STORAGE_DIR = _root
WHISPER_DIR = os.path.join(_root, 'whisper')
LOG_DIR = _root
INDEX_FILE = os.path.join(_root, 'index')
SECRET_KEY = 'sluice-test'
DATABASES = {'default': {'NAME': os.path.join(_root, 'graphite.db'), 'ENGINE': 'django.db.backends.sqlite3'}}
DEFAULT_XFILES_FACTOR = 0
"#;

/// Reads `path value time` lines and writes them into one-second whisper files (an hour of them).
const WRITER: &str = r#"import os, sys, whisper
root = sys.argv[1]
points = {}
for line in sys.stdin:
    path, value, at = line.split()
    points.setdefault(path, []).append((int(at), float(value)))
for path, series in points.items():
    file = os.path.join(root, *path.split('.')) + '.wsp'
    os.makedirs(os.path.dirname(file), exist_ok=True)
    if not os.path.exists(file):
        whisper.create(file, [(1, 3600)], xFilesFactor=0)
    whisper.update_many(file, series)
"#;

/// A running graphite-web, killed (and waited for) on drop.
#[derive(Debug)]
pub struct GraphiteServer {
    python: PathBuf,
    dir: TempDir,
    port: u16,
    child: Option<Child>,
}

impl GraphiteServer {
    /// Starts graphite-web with an empty store and waits until its render API answers. `$GRAPHITE_PYTHON`
    /// overrides the Python that runs it.
    pub async fn start() -> Result<Self, HarnessError> {
        let python = std::env::var_os("GRAPHITE_PYTHON")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_PYTHON));
        let dir = tempfile::Builder::new()
            .prefix("sluice-graphite-")
            .tempdir()
            .map_err(io_error("creating Graphite's temporary directory"))?;
        std::fs::write(dir.path().join("sluice_graphite_settings.py"), SETTINGS)
            .map_err(io_error("writing Graphite's settings"))?;
        std::fs::create_dir_all(dir.path().join("whisper"))
            .map_err(io_error("creating Graphite's whisper directory"))?;
        let mut server = Self {
            python,
            dir,
            port: 0,
            child: None,
        };
        // graphite-web's tables (it refuses to render without them).
        let migrate = server
            .django(&["migrate", "--run-syncdb"])
            .output()
            .map_err(|source| server.spawn_error(source))?;
        if !migrate.status.success() {
            return Err(HarnessError::Exited {
                status: format!("graphite-web migrate: {}", migrate.status),
                log: String::from_utf8_lossy(&migrate.stderr).into_owned(),
            });
        }
        // The free port can be taken before the server binds it; a few tries make that race harmless.
        let mut last = None;
        for _ in 0..3 {
            server.port = free_port()?;
            match server.spawn_and_wait().await {
                Ok(()) => return Ok(server),
                Err(HarnessError::Exited { status, log }) if log.contains("already in use") => {
                    last = Some(HarnessError::Exited { status, log });
                }
                Err(other) => return Err(other),
            }
        }
        Err(last.unwrap_or(HarnessError::Timeout {
            what: "a free port for Graphite".into(),
            waited: Duration::ZERO,
        }))
    }

    /// Base URL, e.g. `http://127.0.0.1:40123`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Writes `(unix seconds, value)` points into the series at the dotted `path` (created on first use).
    pub fn write(&self, path: &str, points: &[(i64, f64)]) -> Result<(), HarnessError> {
        let mut child = Command::new(&self.python)
            .arg("-c")
            .arg(WRITER)
            .arg(self.dir.path().join("whisper"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| self.spawn_error(source))?;
        let mut lines = String::new();
        for (at, value) in points {
            lines.push_str(&format!("{path} {value} {at}\n"));
        }
        child
            .stdin
            .take()
            .map(|mut stdin| stdin.write_all(lines.as_bytes()))
            .transpose()
            .map_err(io_error("sending points to the whisper writer"))?;
        let output = child
            .wait_with_output()
            .map_err(io_error("waiting for the whisper writer"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(HarnessError::Exited {
                status: format!("whisper writer: {}", output.status),
                log: String::from_utf8_lossy(&output.stderr).into_owned(),
            })
        }
    }

    /// Kills graphite-web and waits for it; the URL stops answering.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn django(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.python);
        command
            .args(["-m", "django"])
            .args(args)
            .current_dir(self.dir.path())
            .env("PYTHONPATH", self.dir.path())
            .env("GRAPHITE_SETTINGS_MODULE", "sluice_graphite_settings")
            .env("DJANGO_SETTINGS_MODULE", "graphite.settings")
            .stdin(Stdio::null());
        command
    }

    fn spawn_error(&self, source: std::io::Error) -> HarnessError {
        HarnessError::Spawn {
            binary: format!(
                "{} (graphite-web; install Debian's graphite-web and python3-whisper, or set $GRAPHITE_PYTHON)",
                self.python.display()
            ),
            source,
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    async fn spawn_and_wait(&mut self) -> Result<(), HarnessError> {
        let log = std::fs::File::create(self.log_path()).map_err(io_error("opening server.log"))?;
        let stderr = log.try_clone().map_err(io_error("opening server.log"))?;
        let child = self
            .django(&[
                "runserver",
                &format!("127.0.0.1:{}", self.port),
                "--noreload",
            ])
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr))
            .spawn()
            .map_err(|source| self.spawn_error(source))?;
        self.child = Some(child);
        let started = Instant::now();
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(HarnessError::Exited {
                    status: status.to_string(),
                    log: tail(&self.log_path()),
                });
            }
            if let Ok((200, _)) = http_get(addr, "/render?target=none&format=json").await {
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                self.stop();
                return Err(HarnessError::NotReady {
                    url: self.url(),
                    waited: READY_TIMEOUT,
                    log: tail(&self.log_path()),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for GraphiteServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

fn io_error(context: &str) -> impl FnOnce(std::io::Error) -> HarnessError {
    let context = context.to_owned();
    move |source| HarnessError::Io { context, source }
}
