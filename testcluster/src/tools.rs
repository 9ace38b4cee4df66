//! The control-plane binaries: built once per version from the wrapper Go modules under `tools/go/` into a
//! cache directory, then reused.
//!
//! Cache layout: `$SLUICE_TOOLS_CACHE` (default `$XDG_CACHE_HOME/sluice/tools`, else
//! `$HOME/.cache/sluice/tools`) holds `kubernetes-<v>/bin/{kube-apiserver,kube-controller-manager,
//! kube-scheduler,kubectl}`, `etcd-<v>/bin/etcd` and `kwok-<v>/bin/kwok` plus `kwok-<v>/stages/*.yaml` (the
//! kwok module's default Stage definitions, copied from the module cache).
//!
//! Builds run `go build` with `GOTOOLCHAIN=local` (no toolchain download), `CGO_ENABLED=0`, `-trimpath`,
//! `-mod=readonly` (go.mod/go.sum are committed and never rewritten) and the version stamp that
//! `hack/lib/version.sh` of Kubernetes sets, so `kube-apiserver --version` and `kubectl version` report the
//! real release. `SLUICE_GO_BUILD_JOBS` sets `go build -p` (default: the number of CPUs).

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::{Error, Versions};

/// Prints one line of progress (for example to stdout).
pub type Progress<'a> = &'a dyn Fn(&str);

/// Paths of the built binaries.
#[derive(Debug, Clone)]
pub struct Tools {
    /// The versions these binaries were built at.
    pub versions: Versions,
    pub etcd: PathBuf,
    pub kube_apiserver: PathBuf,
    pub kube_controller_manager: PathBuf,
    pub kube_scheduler: PathBuf,
    /// `kubectl` of the same release as the API server.
    pub kubectl: PathBuf,
    pub kwok: PathBuf,
    /// kwok's default Stage definitions (`node-initialize.yaml`, `pod-ready.yaml`, …).
    pub kwok_stages: PathBuf,
}

/// One binary a wrapper module builds.
struct Binary {
    /// Directory under `tools/go/`, also the cache directory's name.
    module: &'static str,
    name: &'static str,
    package: &'static str,
}

const BINARIES: &[Binary] = &[
    Binary {
        module: "etcd",
        name: "etcd",
        package: "go.etcd.io/etcd/server/v3",
    },
    Binary {
        module: "kwok",
        name: "kwok",
        package: "sigs.k8s.io/kwok/cmd/kwok",
    },
    Binary {
        module: "kubernetes",
        name: "kube-apiserver",
        package: "k8s.io/kubernetes/cmd/kube-apiserver",
    },
    Binary {
        module: "kubernetes",
        name: "kube-controller-manager",
        package: "k8s.io/kubernetes/cmd/kube-controller-manager",
    },
    Binary {
        module: "kubernetes",
        name: "kube-scheduler",
        package: "k8s.io/kubernetes/cmd/kube-scheduler",
    },
    Binary {
        module: "kubernetes",
        name: "kubectl",
        package: "k8s.io/kubernetes/cmd/kubectl",
    },
];

/// kwok's default stages, as kwokctl assembles them for its `binary` runtime (paths inside the kwok module).
const KWOK_STAGES: &[&str] = &[
    "kustomize/stage/node/fast/node-initialize.yaml",
    "kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    "kustomize/stage/pod/fast/pod-ready.yaml",
    "kustomize/stage/pod/fast/pod-complete.yaml",
    "kustomize/stage/pod/fast/pod-delete.yaml",
];

/// The root of the binary cache.
pub fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("SLUICE_TOOLS_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("sluice").join("tools")
}

/// The wrapper Go modules (`tools/go/` in this repository; `SLUICE_TOOLS_GO_DIR` overrides).
pub fn modules_dir() -> PathBuf {
    match std::env::var_os("SLUICE_TOOLS_GO_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("tools")
            .join("go"),
    }
}

impl Tools {
    /// Where the pinned binaries are (or will be) in the cache; nothing is checked or built.
    pub fn locate() -> Result<Self, Error> {
        let versions = Versions::pinned()?;
        let root = cache_root();
        let k8s = root
            .join(format!("kubernetes-{}", versions.kubernetes))
            .join("bin");
        let kwok_dir = root.join(format!("kwok-{}", versions.kwok));
        Ok(Tools {
            etcd: root
                .join(format!("etcd-{}", versions.etcd))
                .join("bin")
                .join("etcd"),
            kube_apiserver: k8s.join("kube-apiserver"),
            kube_controller_manager: k8s.join("kube-controller-manager"),
            kube_scheduler: k8s.join("kube-scheduler"),
            kubectl: k8s.join("kubectl"),
            kwok: kwok_dir.join("bin").join("kwok"),
            kwok_stages: kwok_dir.join("stages"),
            versions,
        })
    }

    /// The binaries and stage files that are not in the cache yet.
    pub fn missing(&self) -> Vec<PathBuf> {
        let mut paths: Vec<PathBuf> = BINARIES.iter().map(|b| self.path(b)).collect();
        paths.extend(
            KWOK_STAGES
                .iter()
                .map(|s| self.kwok_stages.join(file_name(s))),
        );
        paths.into_iter().filter(|p| !p.is_file()).collect()
    }

    fn path(&self, binary: &Binary) -> PathBuf {
        match binary.name {
            "etcd" => self.etcd.clone(),
            "kwok" => self.kwok.clone(),
            "kube-apiserver" => self.kube_apiserver.clone(),
            "kube-controller-manager" => self.kube_controller_manager.clone(),
            "kube-scheduler" => self.kube_scheduler.clone(),
            _ => self.kubectl.clone(),
        }
    }

    fn version_of(&self, module: &str) -> &str {
        match module {
            "etcd" => &self.versions.etcd,
            "kwok" => &self.versions.kwok,
            _ => &self.versions.kubernetes,
        }
    }

    /// The pinned binaries, building the missing ones first (minutes on a cold machine; `progress` gets a
    /// line at least every 15 seconds while a build runs). Safe to call from several processes at once: a
    /// lock file per component serialises the builds.
    pub fn ensure(progress: Progress<'_>) -> Result<Self, Error> {
        let tools = Self::locate()?;
        if tools.missing().is_empty() {
            return Ok(tools);
        }
        let wanted: Vec<(&Binary, &str, PathBuf)> = BINARIES
            .iter()
            .map(|b| (b, tools.version_of(b.module), tools.path(b)))
            .collect();
        let what = format!(
            "the control plane (Kubernetes {}, etcd {}, kwok {})",
            tools.versions.kubernetes, tools.versions.etcd, tools.versions.kwok
        );
        let go = build_missing(&tools.versions, &what, &wanted, progress)?;
        if tools
            .missing()
            .iter()
            .any(|p| p.starts_with(&tools.kwok_stages))
        {
            let go = match go {
                Some(go) => go,
                None => GoEnv::detect()?,
            };
            copy_kwok_stages(&go, &tools.kwok_stages)?;
        }
        Ok(tools)
    }
}

/// The real policy programs Sluice is compared with: OPA and the ghz gRPC load generator, built from
/// `tools/go/{opa,ghz}` into `opa-<v>/bin/opa` and `ghz-<v>/bin/ghz` under the same cache.
#[derive(Debug, Clone)]
pub struct PolicyTools {
    pub versions: Versions,
    pub opa: PathBuf,
    pub ghz: PathBuf,
}

const OPA: Binary = Binary {
    module: "opa",
    name: "opa",
    package: "github.com/open-policy-agent/opa",
};

const GHZ: Binary = Binary {
    module: "ghz",
    name: "ghz",
    package: "github.com/bojand/ghz/cmd/ghz",
};

impl PolicyTools {
    /// Where the pinned binaries are (or will be) in the cache; nothing is checked or built.
    pub fn locate() -> Result<Self, Error> {
        let versions = Versions::pinned()?;
        let root = cache_root();
        Ok(PolicyTools {
            opa: root
                .join(format!("opa-{}", versions.opa))
                .join("bin")
                .join("opa"),
            ghz: root
                .join(format!("ghz-{}", versions.ghz))
                .join("bin")
                .join("ghz"),
            versions,
        })
    }

    /// OPA and ghz, building the missing ones first (about 4 minutes on 2 cores; then cached by version).
    pub fn ensure(progress: Progress<'_>) -> Result<Self, Error> {
        let tools = Self::locate()?;
        let wanted = [
            (&OPA, tools.versions.opa.as_str(), tools.opa.clone()),
            (&GHZ, tools.versions.ghz.as_str(), tools.ghz.clone()),
        ];
        let what = format!("OPA {} and ghz {}", tools.versions.opa, tools.versions.ghz);
        build_missing(&tools.versions, &what, &wanted, progress)?;
        Ok(tools)
    }
}

/// The rival the scale benchmark runs beside Sluice: Flagger, built from `tools/go/flagger` into
/// `flagger-<v>/bin/flagger`, with its CRDs (`artifacts/flagger/crd.yaml` of the same module) beside it.
#[derive(Debug, Clone)]
pub struct RivalTools {
    pub versions: Versions,
    pub flagger: PathBuf,
    /// Flagger's CustomResourceDefinitions (Canary, MetricTemplate, AlertProvider).
    pub flagger_crds: PathBuf,
}

const FLAGGER: Binary = Binary {
    module: "flagger",
    name: "flagger",
    package: "github.com/fluxcd/flagger/cmd/flagger",
};

impl RivalTools {
    pub fn locate() -> Result<Self, Error> {
        let versions = Versions::pinned()?;
        let dir = cache_root().join(format!("flagger-{}", versions.flagger));
        Ok(RivalTools {
            flagger: dir.join("bin").join("flagger"),
            flagger_crds: dir.join("crd.yaml"),
            versions,
        })
    }

    /// Flagger and its CRDs, building them first if missing (about 75 s on 2 cores; then cached by version).
    pub fn ensure(progress: Progress<'_>) -> Result<Self, Error> {
        let tools = Self::locate()?;
        let wanted = [(
            &FLAGGER,
            tools.versions.flagger.as_str(),
            tools.flagger.clone(),
        )];
        let what = format!("Flagger {}", tools.versions.flagger);
        build_missing(&tools.versions, &what, &wanted, progress)?;
        if !tools.flagger_crds.is_file() {
            let go = GoEnv::detect()?;
            let dir = go.output(
                &modules_dir().join("flagger"),
                &["list", "-m", "-f", "{{.Dir}}", "github.com/fluxcd/flagger"],
            )?;
            let from = PathBuf::from(dir.trim())
                .join("artifacts")
                .join("flagger")
                .join("crd.yaml");
            let tmp = tools.flagger_crds.with_extension("yaml.tmp");
            fs::copy(&from, &tmp).map_err(|e| Error::io(&from, e))?;
            fs::rename(&tmp, &tools.flagger_crds).map_err(|e| Error::io(&tools.flagger_crds, e))?;
        }
        Ok(tools)
    }
}

/// Builds each `(binary, version, output path)` whose output is missing. Returns the Go environment when
/// anything had to be built.
fn build_missing(
    versions: &Versions,
    what: &str,
    wanted: &[(&Binary, &str, PathBuf)],
    progress: Progress<'_>,
) -> Result<Option<GoEnv>, Error> {
    if wanted.iter().all(|(_, _, out)| out.is_file()) {
        return Ok(None);
    }
    let go = GoEnv::detect()?;
    if !versions.go_is_new_enough(&go.version) {
        return Err(Error::Build(format!(
            "{} is too old: the pinned modules need Go {} or newer (builds run with GOTOOLCHAIN=local)",
            go.version, versions.go_min
        )));
    }
    progress(&format!(
        "building {what} from the Go module proxy with {} into {}",
        go.version,
        cache_root().display()
    ));
    let started = Instant::now();
    for (binary, version, out) in wanted {
        if out.is_file() {
            continue;
        }
        let cache_dir = cache_root().join(format!("{}-{version}", binary.module));
        fs::create_dir_all(cache_dir.join("bin")).map_err(|e| Error::io(&cache_dir, e))?;
        let _lock = FileLock::acquire(&cache_dir.join(".lock"))?;
        if out.is_file() {
            continue; // another process built it while we waited for the lock
        }
        let module_dir = modules_dir().join(binary.module);
        let ldflags = go.ldflags(binary.module, versions, &module_dir)?;
        go.build(&module_dir, binary, &ldflags, out, progress)?;
    }
    progress(&format!("{what}: ready in {:.0?}", started.elapsed()));
    Ok(Some(go))
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Copies kwok's default Stage files out of the module cache (the module was downloaded by the build).
fn copy_kwok_stages(go: &GoEnv, dest: &Path) -> Result<(), Error> {
    let module_dir = modules_dir().join("kwok");
    let dir = go.output(
        &module_dir,
        &["list", "-m", "-f", "{{.Dir}}", "sigs.k8s.io/kwok"],
    )?;
    let src = PathBuf::from(dir.trim());
    fs::create_dir_all(dest).map_err(|e| Error::io(dest, e))?;
    for stage in KWOK_STAGES {
        let from = src.join(stage);
        let to = dest.join(file_name(stage));
        let tmp = dest.join(format!(".{}.tmp", file_name(stage)));
        fs::copy(&from, &tmp).map_err(|e| Error::io(&from, e))?;
        fs::rename(&tmp, &to).map_err(|e| Error::io(&to, e))?;
    }
    Ok(())
}

/// The `go` command and the environment every build runs with.
struct GoEnv {
    go: PathBuf,
    version: String,
    jobs: usize,
}

impl GoEnv {
    fn detect() -> Result<Self, Error> {
        let go = std::env::var_os("GO")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("go"));
        let jobs = std::env::var("SLUICE_GO_BUILD_JOBS")
            .ok()
            .and_then(|j| j.parse().ok())
            .filter(|j| *j > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let mut env = GoEnv {
            go,
            version: String::new(),
            jobs,
        };
        let version = env.output(Path::new("."), &["env", "GOVERSION"]).map_err(|e| {
            Error::Build(format!(
                "the Go toolchain (go 1.26 or newer) is needed to build the control plane once: {e}"
            ))
        })?;
        env.version = version.trim().to_string();
        Ok(env)
    }

    fn command(&self, dir: &Path) -> Command {
        let mut cmd = Command::new(&self.go);
        let inherited = std::env::var("GOFLAGS").unwrap_or_default();
        cmd.current_dir(dir)
            .env("GOTOOLCHAIN", "local")
            .env("CGO_ENABLED", "0")
            .env(
                "GOFLAGS",
                format!("{inherited} -mod=readonly -trimpath -buildvcs=false").trim(),
            );
        cmd
    }

    fn output(&self, dir: &Path, args: &[&str]) -> Result<String, Error> {
        let shown = format!("go {}", args.join(" "));
        let out = self
            .command(dir)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| Error::Build(format!("cannot run {shown} in {}: {e}", dir.display())))?;
        if !out.status.success() {
            return Err(Error::Build(format!(
                "{shown} in {} failed: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Linker flags: stripped, and for Kubernetes the version stamp of `hack/lib/version.sh`.
    fn ldflags(
        &self,
        module: &str,
        versions: &Versions,
        module_dir: &Path,
    ) -> Result<String, Error> {
        let mut flags = String::from("-s -w");
        match module {
            "etcd" => flags.push_str(&format!(
                " -X go.etcd.io/etcd/api/v3/version.GitSHA={}",
                versions.etcd
            )),
            // ghz reports `dev` otherwise.
            "ghz" => flags.push_str(&format!(" -X main.version={}", versions.ghz)),
            "kubernetes" => {
                let (major, minor) = versions.kubernetes_minor()?;
                // The release's publication time on the module proxy, so rebuilds are reproducible.
                let date = self
                    .output(
                        module_dir,
                        &[
                            "list",
                            "-m",
                            "-f",
                            "{{with .Time}}{{.UTC.Format \"2006-01-02T15:04:05Z\"}}{{end}}",
                            "k8s.io/kubernetes",
                        ],
                    )
                    .map(|d| d.trim().to_string())
                    .ok()
                    .filter(|d| !d.is_empty())
                    .unwrap_or_else(|| "1970-01-01T00:00:00Z".into());
                for pkg in [
                    "k8s.io/component-base/version",
                    "k8s.io/client-go/pkg/version",
                ] {
                    flags.push_str(&format!(
                        " -X {pkg}.gitVersion={v} -X {pkg}.gitMajor={major} -X {pkg}.gitMinor={minor} \
                         -X {pkg}.gitCommit= -X {pkg}.gitTreeState=clean -X {pkg}.buildDate={date}",
                        v = versions.kubernetes
                    ));
                }
            }
            _ => {}
        }
        Ok(flags)
    }

    /// `go build -v` with a progress line every 15 s: packages compiled so far out of the dependency count.
    fn build(
        &self,
        module_dir: &Path,
        binary: &Binary,
        ldflags: &str,
        out: &Path,
        progress: Progress<'_>,
    ) -> Result<(), Error> {
        let started = Instant::now();
        let total = self
            .output(module_dir, &["list", "-deps", binary.package])
            .map(|s| s.lines().count())
            .unwrap_or(0);
        progress(&format!(
            "building {} ({} packages at most)",
            binary.name, total
        ));
        let tmp = out.with_file_name(format!(".{}.tmp", binary.name));
        let mut child = self
            .command(module_dir)
            .args([
                "build",
                "-v",
                "-p",
                &self.jobs.to_string(),
                "-ldflags",
                ldflags,
                "-o",
            ])
            .arg(&tmp)
            .arg(binary.package)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                Error::Build(format!(
                    "cannot run go build in {}: {e}",
                    module_dir.display()
                ))
            })?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| Error::Build("go build has no stderr".into()))?;
        let (tx, rx) = mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut compiled = 0usize;
        let mut last_package = String::new();
        let mut messages: Vec<String> = Vec::new();
        let mut last_report = Instant::now();
        let mut last_compiled = Instant::now();
        let mut downloading = false;
        loop {
            match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(line) => {
                    if is_package_line(&line) {
                        compiled += 1;
                        last_package = line;
                        last_compiled = Instant::now();
                        downloading = false;
                    } else {
                        downloading = line.starts_with("go: downloading");
                        messages.push(line);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if last_report.elapsed() >= Duration::from_secs(15) {
                last_report = Instant::now();
                // `go build -v` names each package it compiles; a long silence is the link step.
                let stage = if downloading {
                    "downloading modules".to_string()
                } else if last_compiled.elapsed() >= Duration::from_secs(10) {
                    "linking".to_string()
                } else {
                    format!("compiling {last_package}")
                };
                progress(&format!(
                    "  {}: {compiled} of at most {total} packages compiled, {:.0?} elapsed, {stage}",
                    binary.name,
                    Duration::from_secs(started.elapsed().as_secs())
                ));
            }
        }
        let _ = reader.join();
        let status = child
            .wait()
            .map_err(|e| Error::Build(format!("waiting for go build: {e}")))?;
        if !status.success() {
            let _ = fs::remove_file(&tmp);
            let tail: Vec<&str> = messages
                .iter()
                .rev()
                .take(40)
                .rev()
                .map(String::as_str)
                .collect();
            return Err(Error::Build(format!(
                "go build {} in {} failed ({status}):\n{}",
                binary.package,
                module_dir.display(),
                tail.join("\n")
            )));
        }
        fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
        progress(&format!(
            "built {} in {:.0?}",
            binary.name,
            Duration::from_secs(started.elapsed().as_secs())
        ));
        Ok(())
    }
}

/// `go build -v` prints one import path a line; everything else is a diagnostic.
fn is_package_line(line: &str) -> bool {
    !line.is_empty() && !line.contains(' ') && !line.contains(':')
}

/// An exclusive advisory lock on a file, released on drop.
struct FileLock {
    _file: fs::File,
}

impl FileLock {
    fn acquire(path: &Path) -> Result<Self, Error> {
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| Error::io(path, e.into()))?;
        Ok(FileLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_lines_are_told_from_diagnostics() {
        assert!(is_package_line("k8s.io/apimachinery/pkg/util/runtime"));
        assert!(is_package_line("internal/goarch"));
        assert!(!is_package_line("go: downloading k8s.io/api v0.37.2"));
        assert!(!is_package_line("# k8s.io/kubernetes/cmd/kube-apiserver"));
        assert!(!is_package_line(""));
    }

    #[test]
    fn cache_paths_are_keyed_by_version() {
        let tools = Tools::locate().expect("versions parse");
        let k8s = format!("kubernetes-{}", tools.versions.kubernetes);
        assert!(tools.kube_apiserver.to_string_lossy().contains(&k8s));
        assert!(
            tools
                .etcd
                .to_string_lossy()
                .contains(&format!("etcd-{}", tools.versions.etcd))
        );
        assert!(tools.kwok_stages.ends_with("stages"));
    }
}
