//! Child processes, each in its own process group so that stopping one stops everything it started, and so
//! that a terminal's Ctrl-C (sent to the foreground group) does not reach a detached cluster.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};
use serde::{Deserialize, Serialize};

use crate::Error;

/// What is needed to find and stop a process later, also from another process (`cargo xtask cluster down`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcessRecord {
    pub name: String,
    pub pid: i32,
    /// The executable, to tell our process from an unrelated one that reused the pid.
    pub binary: PathBuf,
    pub log: PathBuf,
}

/// A started component.
pub struct Process {
    pub record: ProcessRecord,
    child: Option<Child>,
}

impl Process {
    /// Starts `binary args…` in a new process group, stdin from /dev/null, stdout and stderr appended to `log`.
    /// With `stop_with_parent`, the kernel kills it when the calling thread ends.
    pub fn spawn(
        name: &str,
        binary: &Path,
        args: &[String],
        log: &Path,
        stop_with_parent: bool,
    ) -> Result<Self, Error> {
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| Error::io(log, e))?;
        let err = out.try_clone().map_err(|e| Error::io(log, e))?;
        let mut command = Command::new(binary);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        if stop_with_parent {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: the closure runs between fork and exec and only makes one prctl system call,
            // which is async-signal-safe.
            unsafe {
                command.pre_exec(|| {
                    rustix::process::set_parent_process_death_signal(Some(
                        rustix::process::Signal::KILL,
                    ))
                    .map_err(std::io::Error::from)
                });
            }
        }
        let child = command.spawn().map_err(|e| {
            Error::Start(format!("cannot start {name} ({}): {e}", binary.display()))
        })?;
        let pid = i32::try_from(child.id())
            .map_err(|_| Error::Start(format!("{name}: pid out of range")))?;
        Ok(Process {
            record: ProcessRecord {
                name: name.into(),
                pid,
                binary: binary.to_path_buf(),
                log: log.to_path_buf(),
            },
            child: Some(child),
        })
    }

    /// `Some(status)` if the process has exited.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(Some(status))) => Some(status.to_string()),
            Some(Err(e)) => Some(format!("unknown state: {e}")),
            _ => None,
        }
    }

    /// Forgets the child handle: the process keeps running after we exit (detached cluster).
    pub fn detach(&mut self) {
        self.child = None;
    }

    /// Stops the process group: SIGTERM, then SIGKILL after `grace`, and reaps the child.
    pub fn stop(&mut self, grace: Duration) {
        match self.child.take() {
            Some(mut child) => {
                signal_group(self.record.pid, Signal::TERM);
                let deadline = Instant::now() + grace;
                while Instant::now() < deadline {
                    if matches!(child.try_wait(), Ok(Some(_))) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                // The leader may be gone while members remain: kill the whole group regardless.
                signal_group(self.record.pid, Signal::KILL);
                let _ = child.wait();
            }
            None => stop_record(&self.record, grace),
        }
    }
}

fn signal_group(pid: i32, signal: Signal) {
    if let Some(pid) = Pid::from_raw(pid) {
        let _ = rustix::process::kill_process_group(pid, signal);
    }
}

/// Whether a process with this pid exists and runs this record's binary.
pub fn is_running(record: &ProcessRecord) -> bool {
    let Ok(exe) = fs::read_link(format!("/proc/{}/exe", record.pid)) else {
        return false;
    };
    // A deleted-and-replaced binary shows as "<path> (deleted)".
    let exe = exe
        .to_string_lossy()
        .trim_end_matches(" (deleted)")
        .to_string();
    let expected = fs::canonicalize(&record.binary).unwrap_or_else(|_| record.binary.clone());
    Path::new(&exe) == expected || Path::new(&exe) == record.binary
}

/// Whether any process is still in the process group `pgid`.
pub fn group_alive(pgid: i32) -> bool {
    Pid::from_raw(pgid).is_some_and(|pid| rustix::process::test_kill_process_group(pid).is_ok())
}

/// Stops a process that is not our child (one from a detached cluster): SIGTERM to its group, wait, SIGKILL.
/// Does nothing if the pid now belongs to another program.
pub fn stop_record(record: &ProcessRecord, grace: Duration) {
    if !is_running(record) {
        // The leader is gone; members of its group (there are none for these binaries) would keep the pgid.
        if group_alive(record.pid) && !pid_exists(record.pid) {
            signal_group(record.pid, Signal::KILL);
        }
        return;
    }
    signal_group(record.pid, Signal::TERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && is_running(record) {
        std::thread::sleep(Duration::from_millis(50));
    }
    signal_group(record.pid, Signal::KILL);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && is_running(record) {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether the pid is in the process table at all (running, or a zombie not yet reaped).
pub fn pid_exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The last `lines` lines of a log file, for error messages.
pub fn log_tail(log: &Path, lines: usize) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
