//! The `sluice-sandbox` binary as users and scripts run it: it prints its address once listening, writes a
//! kubeconfig that kubectl accepts, and serves until killed.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use sluice_e2e::harness::Kubectl;

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn binary_prints_its_address_and_writes_a_working_kubeconfig() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("nested/kubeconfig");
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_sluice-sandbox"))
            .args(["--listen", "127.0.0.1:0", "--kubeconfig"])
            .arg(&kubeconfig)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("sluice-sandbox starts"),
    );
    let stdout = child.0.stdout.take().expect("stdout is piped");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("reads the first line");
    let url = line
        .trim()
        .strip_prefix("sluice-sandbox listening on ")
        .expect("address line")
        .to_owned();
    assert!(
        url.starts_with("http://127.0.0.1:") && !url.ends_with(":0"),
        "{url}"
    );

    let written = std::fs::read_to_string(&kubeconfig)
        .expect("kubeconfig written before the address is printed");
    assert!(written.contains(&url), "{written}");
    let k = Kubectl::new(dir.path(), &written).expect("kubectl env");
    let version = k.ok(&["version", "-o", "json"]);
    assert!(version.contains("sluice-sandbox"), "{version}");
    let namespaces = k.ok(&["get", "namespaces", "-o", "name"]);
    assert!(namespaces.contains("namespace/default"), "{namespaces}");
}

#[test]
fn a_busy_port_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let out = Command::new(env!("CARGO_BIN_EXE_sluice-sandbox"))
        .args(["--listen", &addr.to_string()])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")),
        "{stderr}"
    );
}
