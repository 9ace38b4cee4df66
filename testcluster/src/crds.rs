//! The published CRDs of the meshes Sluice writes to, taken from the Go modules that publish them at the
//! versions pinned in `tools/versions.env` (downloaded once into the Go module cache).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Error, VERSIONS_ENV, versions::lookup};

/// One module's CRD files.
struct Published {
    module: &'static str,
    version_key: &'static str,
    /// Files (or directories, every `*.yaml` in them) inside the module.
    paths: &'static [&'static str],
}

const PUBLISHED: &[Published] = &[
    Published {
        module: "sigs.k8s.io/gateway-api",
        version_key: "GATEWAY_API_VERSION",
        paths: &["config/crd/standard"],
    },
    Published {
        module: "istio.io/api",
        version_key: "ISTIO_API_VERSION",
        paths: &["kubernetes/customresourcedefinitions.gen.yaml"],
    },
];

/// The CRD manifests of Gateway API (standard channel) and Istio, as files in the Go module cache.
/// Gateway API's standard channel also ships a ValidatingAdmissionPolicy (and its binding) guarding
/// the experimental channel; it is applied too, as a real installation has it.
pub fn mesh_crd_files() -> Result<Vec<PathBuf>, Error> {
    let mut files = Vec::new();
    for published in PUBLISHED {
        let version = lookup(VERSIONS_ENV, published.version_key)
            .ok_or_else(|| Error::Versions(format!("{} is not set", published.version_key)))?;
        let dir = module_dir(published.module, &version)?;
        for path in published.paths {
            let path = dir.join(path);
            if path.is_dir() {
                let mut yamls: Vec<PathBuf> = std::fs::read_dir(&path)
                    .map_err(|e| Error::io(&path, e))?
                    .filter_map(|entry| entry.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
                    .collect();
                yamls.sort();
                files.extend(yamls);
            } else if path.is_file() {
                files.push(path);
            } else {
                return Err(Error::Build(format!(
                    "{}@{version} has no {}",
                    published.module,
                    path.display()
                )));
            }
        }
    }
    Ok(files)
}

/// `go mod download -json MODULE@VERSION` → the module's directory in the module cache.
fn module_dir(module: &str, version: &str) -> Result<PathBuf, Error> {
    let go = std::env::var_os("GO").map_or_else(|| PathBuf::from("go"), PathBuf::from);
    let target = format!("{module}@{version}");
    let output = Command::new(&go)
        .args(["mod", "download", "-json", &target])
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "-mod=mod")
        .current_dir(std::env::temp_dir())
        .output()
        .map_err(|e| Error::Build(format!("cannot run {}: {e}", go.display())))?;
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).map_err(|e| {
        Error::Build(format!(
            "go mod download {target}: {e}: {}",
            String::from_utf8_lossy(&output.stderr)
        ))
    })?;
    if let Some(err) = json.get("Error").and_then(|e| e.as_str()) {
        return Err(Error::Build(format!("go mod download {target}: {err}")));
    }
    json.get("Dir")
        .and_then(|d| d.as_str())
        .map(|d| Path::new(d).to_owned())
        .ok_or_else(|| Error::Build(format!("go mod download {target} printed no Dir")))
}
