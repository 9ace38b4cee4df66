//! The bounded fuzz run of `cargo xtask test`: every cargo-fuzz target in fuzz/ for a few seconds,
//! starting from its corpus in the repository. A crash or a broken invariant fails the run.

use std::path::Path;
use std::process::Command;

/// cargo-fuzz release installed when missing (crates.io).
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// Targets in fuzz/Cargo.toml.
const TARGETS: &[&str] = &["check_request_input", "multipart_form", "decision_response"];
/// Seconds each target runs in CI.
const SECONDS_PER_TARGET: u32 = 20;

fn rustup_cargo() -> Command {
    // `+nightly` is understood by rustup's cargo proxy, not by the toolchain's own cargo binary.
    let mut cmd = Command::new("cargo");
    cmd.arg("+nightly");
    cmd
}

fn has_nightly() -> bool {
    Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn has_cargo_fuzz() -> bool {
    Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

pub fn smoke(root: &Path, run: impl Fn(&mut Command) -> Result<(), String>) -> Result<(), String> {
    if !has_nightly() {
        // rustup fetches it from its own distribution server where that is reachable.
        let _ = run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]));
    }
    if !has_nightly() {
        return Err(
            "fuzzing needs a nightly Rust toolchain (libFuzzer instrumentation): rustup toolchain install nightly"
                .into(),
        );
    }
    if !has_cargo_fuzz() {
        run(Command::new("cargo").args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            CARGO_FUZZ_VERSION,
        ]))?;
    }
    let fuzz_dir = root.join("fuzz");
    run(rustup_cargo()
        .args(["fuzz", "build", "--dev", "--fuzz-dir"])
        .arg(&fuzz_dir))?;
    for target in TARGETS {
        // New inputs go to a scratch directory; the committed corpus is only read.
        let scratch = tempfile_dir(target)?;
        let corpus = fuzz_dir.join("corpus").join(target);
        if !corpus.is_dir() {
            return Err(format!(
                "{} is missing: every target keeps its seed corpus in the repository",
                corpus.display()
            ));
        }
        let result = run(rustup_cargo()
            .args(["fuzz", "run", "--dev", "--fuzz-dir"])
            .arg(&fuzz_dir)
            .arg(target)
            .arg(&scratch)
            .arg(&corpus)
            .arg("--")
            .arg(format!("-max_total_time={SECONDS_PER_TARGET}"))
            .arg("-rss_limit_mb=2048")
            .arg("-print_final_stats=1"));
        let _ = std::fs::remove_dir_all(&scratch);
        result?;
    }
    Ok(())
}

fn tempfile_dir(target: &str) -> Result<std::path::PathBuf, String> {
    let dir = std::env::temp_dir().join(format!("sluice-fuzz-{target}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}
