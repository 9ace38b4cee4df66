//! Project commands behind the README's two commands:
//!   cargo xtask test   installs what the tests need, then runs fmt, clippy and every test
//!   cargo xtask demo   plays the demo (a promoted and a rolled-back canary, a policy) on a local control plane
//! and the local control plane (see testcluster/):
//!   cargo xtask cluster up [--kubeconfig PATH] | down | status
//! and the benchmarks that need built third-party programs:
//!   cargo xtask bench scale --rollouts N [--no-flagger] [--idle-secs S]

mod cluster;
mod fuzz;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use clap::{Parser, Subcommand};

/// Debian packages the end-to-end tests run for real.
const PACKAGES: &[(&str, &str)] = &[
    ("prometheus", "prometheus"),
    ("prometheus-alertmanager", "prometheus-alertmanager"),
    // The Graphite provider's tests run graphite-web and write whisper files.
    ("graphite-manage", "graphite-web"),
    ("whisper-create", "python3-whisper"),
    // The InfluxDB provider's InfluxQL tests run influxd 1.x.
    ("influxd", "influxdb"),
];

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Sluice's project commands"
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the tests need, then run fmt, clippy and every test.
    Test,
    /// Run the demo: everything Sluice does, end to end.
    Demo,
    /// A real local Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager,
    /// kube-scheduler, kwok), built from the Go module proxy on first use.
    Cluster {
        #[command(subcommand)]
        command: cluster::ClusterCommand,
    },
    /// Benchmarks on a real control plane, with their rivals built first.
    Bench {
        #[command(subcommand)]
        bench: Bench,
    },
}

#[derive(Subcommand)]
enum Bench {
    /// N Rollouts on one operator and N Flagger Canaries on the same control plane, in the same run:
    /// memory, CPU, API requests by verb, time to initialize, idle requests, time to the first canary traffic.
    Scale {
        /// Number of Deployments with a Rollout (and as many with a Flagger Canary).
        #[arg(long, default_value_t = 1000)]
        rollouts: usize,
        /// Measure Sluice alone.
        #[arg(long)]
        no_flagger: bool,
        /// Length of the idle window, in seconds.
        #[arg(long, default_value_t = 120)]
        idle_secs: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Test => test(),
        Task::Demo => demo(),
        Task::Cluster { command } => cluster::run(command),
        Task::Bench {
            bench:
                Bench::Scale {
                    rollouts,
                    no_flagger,
                    idle_secs,
                },
        } => bench_scale(rollouts, no_flagger, idle_secs),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err}");
            ExitCode::FAILURE
        }
    }
}

fn bench_scale(rollouts: usize, no_flagger: bool, idle_secs: u64) -> Result<(), String> {
    let progress = |line: &str| println!("{line}");
    step("building the control plane");
    sluice_testcluster::Tools::ensure(&progress).map_err(|e| e.to_string())?;
    if !no_flagger {
        step("building Flagger");
        sluice_testcluster::RivalTools::ensure(&progress).map_err(|e| e.to_string())?;
    }
    step(&format!("scale benchmark: {rollouts} Rollouts"));
    let rollouts = rollouts.to_string();
    let idle_secs = idle_secs.to_string();
    let mut args = vec![
        "bench",
        "-p",
        "sluice-e2e",
        "--bench",
        "scale",
        "--",
        "--rollouts",
        &rollouts,
        "--idle-secs",
        &idle_secs,
    ];
    if no_flagger {
        args.push("--no-flagger");
    }
    run(Command::new(cargo()).args(args))
}

fn root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    root.canonicalize().unwrap_or(root)
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

fn step(title: &str) {
    println!("\n==> {title}");
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let shown = format!("{cmd:?}");
    let status = cmd
        .current_dir(root())
        .status()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{shown} failed ({status})"))
    }
}

fn on_path(binary: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(binary).is_file()))
}

/// Installs missing Debian packages with apt-get (as root, or through passwordless sudo).
fn ensure_packages() -> Result<(), String> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(bin, _)| !on_path(bin))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        let installed: Vec<&str> = PACKAGES.iter().map(|(_, pkg)| *pkg).collect();
        println!("{} are installed", installed.join(", "));
        return Ok(());
    }
    if !on_path("apt-get") {
        return Err(format!(
            "missing {} and there is no apt-get to install them; install them and retry",
            missing.join(", ")
        ));
    }
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let apt = |args: &[&str]| -> Command {
        let mut cmd = if is_root {
            Command::new("apt-get")
        } else {
            let mut sudo = Command::new("sudo");
            sudo.args(["-n", "apt-get"]);
            sudo
        };
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    println!("installing {}", missing.join(", "));
    let mut install_args = vec!["install", "-y", "--no-install-recommends"];
    install_args.extend(missing.iter().copied());
    if run(&mut apt(&install_args)).is_err() {
        // A fresh machine may have no package lists yet.
        run(&mut apt(&["update"]))?;
        run(&mut apt(&install_args))?;
    }
    Ok(())
}

fn test() -> Result<(), String> {
    let started = Instant::now();
    step("checking the machine");
    ensure_packages()?;
    step("building the local control plane (first run on a new machine: about 13 minutes)");
    cluster::build()?;
    step("building OPA and ghz (first run on a new machine: about 4 minutes)");
    cluster::build_policy_tools()?;
    step("cargo fmt --check");
    run(Command::new(cargo()).args(["fmt", "--all", "--", "--check"]))?;
    step("cargo clippy");
    run(Command::new(cargo()).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--locked",
        "--",
        "-D",
        "warnings",
    ]))?;
    step("cargo test");
    run(Command::new(cargo()).args(["test", "--workspace", "--locked"]))?;
    step("fuzzing the ext_authz input and response mappings (bounded)");
    fuzz::smoke(&root(), run)?;
    println!("\nall checks passed in {:.0?}", started.elapsed());
    Ok(())
}

/// The demo: everything Sluice does, end to end, in about a minute (see e2e/src/bin/sluice-demo.rs).
fn demo() -> Result<(), String> {
    ensure_packages()?;
    step("building and running the demo");
    run(Command::new(cargo()).args([
        "run",
        "--quiet",
        "--locked",
        "-p",
        "sluice-e2e",
        "--bin",
        "sluice-demo",
    ]))
}
