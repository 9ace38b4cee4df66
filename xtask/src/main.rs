//! Project commands behind the README's two commands:
//!   cargo xtask test   installs what the tests need, then runs fmt, clippy and every test
//!   cargo xtask demo   starts the Kubernetes-API sandbox, applies the CRDs and samples, and shows them

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::Instant;

/// Debian packages the end-to-end tests run for real.
const PACKAGES: &[(&str, &str)] = &[
    ("prometheus", "prometheus"),
    ("prometheus-alertmanager", "prometheus-alertmanager"),
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(),
        Some("demo") => demo(args.iter().any(|a| a == "--keep")),
        _ => {
            eprintln!("usage: cargo xtask test | cargo xtask demo [--keep]");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err}");
            ExitCode::FAILURE
        }
    }
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
        println!("prometheus and prometheus-alertmanager are installed");
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
    let kubectl = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    if !(Path::new(&kubectl).is_file() || on_path(&kubectl)) {
        return Err("kubectl is not on PATH; the conformance tests drive the real kubectl (set KUBECTL=/path/to/kubectl)".into());
    }
    ensure_packages()?;
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
    println!("\nall checks passed in {:.0?}", started.elapsed());
    Ok(())
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn kubectl(kubeconfig: &Path, args: &[&str]) -> Result<(), String> {
    println!("$ kubectl {}", args.join(" "));
    run(Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args))
}

fn demo(keep: bool) -> Result<(), String> {
    let started = Instant::now();
    step("building sluice and sluice-sandbox");
    run(Command::new(cargo()).args(["build", "--quiet", "-p", "sluice", "-p", "sluice-e2e"]))?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    let kubeconfig = root().join(".sandbox/kubeconfig");

    step("starting the Kubernetes-API sandbox");
    let mut sandbox = KillOnDrop(
        Command::new(target.join("debug/sluice-sandbox"))
            .args(["--listen", "127.0.0.1:0", "--kubeconfig"])
            .arg(&kubeconfig)
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start sluice-sandbox: {e}"))?,
    );
    let stdout = sandbox
        .0
        .stdout
        .take()
        .ok_or("sluice-sandbox has no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| format!("sluice-sandbox did not start: {e}"))?;
    println!("{}", line.trim());
    println!("kubeconfig: {}", kubeconfig.display());

    step("installing the CRDs (generated by `sluice crd`) and the samples");
    kubectl(&kubeconfig, &["apply", "-f", "crds/"])?;
    kubectl(&kubeconfig, &["apply", "-f", "config/samples/"])?;

    step("waiting for the sample Deployment (the sandbox plays the kubelet)");
    kubectl(
        &kubeconfig,
        &["rollout", "status", "deployment/podinfo", "--timeout=30s"],
    )?;

    step("what is in the sandbox");
    kubectl(
        &kubeconfig,
        &["get", "rollouts,authorizationpolicies,deployments,services"],
    )?;

    step("the API server validates Rollouts against the CRD schema and its CEL rules");
    let invalid = "apiVersion: sluice.dev/v1alpha1\nkind: Rollout\nmetadata: {name: too-far}\nspec:\n  targetRef: {kind: Deployment, name: podinfo}\n  service: {port: 9898}\n  analysis: {interval: 30s, stepWeight: 60, maxWeight: 50}\n";
    println!("$ kubectl apply -f - <<< 'a Rollout with stepWeight 60 > maxWeight 50'");
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["apply", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run kubectl: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        stdin
            .write_all(invalid.as_bytes())
            .map_err(|e| e.to_string())?;
    }
    let refused = child.wait().map_err(|e| e.to_string())?;
    if refused.success() {
        return Err("the sandbox accepted an invalid Rollout".into());
    }

    println!("\ndemo finished in {:.1?}", started.elapsed());
    if keep {
        println!(
            "\nThe sandbox keeps running. In another shell:\n  export KUBECONFIG={}\n  kubectl get rollouts\nPress Ctrl-C to stop it.",
            kubeconfig.display()
        );
        let _ = sandbox.0.wait();
    }
    Ok(())
}
