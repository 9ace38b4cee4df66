//! The demo (README command 1) runs to the end on this machine and its summary says what happened.

use std::process::Command;

#[test]
fn the_demo_plays_every_act_and_summarises_it() {
    let output = Command::new(env!("CARGO_BIN_EXE_sluice-demo"))
        .output()
        .expect("the demo runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary = stdout
        .split("\nSUMMARY\n")
        .nth(1)
        .unwrap_or_else(|| panic!("no summary:\n{stdout}"));
    assert!(
        summary.contains("healthy release: promoted in")
            && summary.contains("through 20% -> 40% -> 60%"),
        "{summary}"
    );
    assert!(
        summary.contains("bad release: rolled back in")
            && summary.contains("Alertmanager got SluiceRolloutRolledBack"),
        "{summary}"
    );
    assert!(
        summary.contains("GET /api/info 200, DELETE /admin 403"),
        "{summary}"
    );
    let total: f64 = summary
        .lines()
        .find_map(|l| l.strip_prefix("total: "))
        .and_then(|t| t.trim_end_matches('s').parse().ok())
        .unwrap_or(f64::MAX);
    assert!(total < 180.0, "the demo took {total}s");
}
