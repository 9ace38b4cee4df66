//! The pinned versions in `tools/versions.env`, compiled in so a build of this crate always asks for the
//! versions its wrapper modules were written for.

use crate::Error;

/// The text of `tools/versions.env`.
pub const VERSIONS_ENV: &str = include_str!("../../tools/versions.env");

/// The versions of the control-plane components.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versions {
    /// `k8s.io/kubernetes` release, e.g. `v1.37.2`.
    pub kubernetes: String,
    /// `go.etcd.io/etcd/server/v3` release, e.g. `v3.7.4`.
    pub etcd: String,
    /// `sigs.k8s.io/kwok` release, e.g. `v0.8.0`.
    pub kwok: String,
    /// `github.com/open-policy-agent/opa` release, e.g. `v1.22.4` (interop tests and benchmarks).
    pub opa: String,
    /// `github.com/bojand/ghz` release, e.g. `v0.121.0` (ext_authz benchmarks).
    pub ghz: String,
    /// `github.com/fluxcd/flagger` release, e.g. `v1.36.1` (the scale benchmark's rival).
    pub flagger: String,
    /// The oldest Go that builds them (the highest `go` line of the modules), e.g. `1.26.0`.
    pub go_min: String,
}

impl Versions {
    /// The versions pinned in this repository.
    pub fn pinned() -> Result<Self, Error> {
        Self::parse(VERSIONS_ENV)
    }

    /// Parses `KEY=VALUE` lines; `#` starts a comment line.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let get = |key: &str| -> Result<String, Error> {
            lookup(text, key).ok_or_else(|| Error::Versions(format!("{key} is not set")))
        };
        let versions = Versions {
            kubernetes: get("KUBERNETES_VERSION")?,
            etcd: get("ETCD_VERSION")?,
            kwok: get("KWOK_VERSION")?,
            opa: get("OPA_VERSION")?,
            ghz: get("GHZ_VERSION")?,
            flagger: get("FLAGGER_VERSION")?,
            go_min: get("GO_MIN_VERSION")?,
        };
        versions.kubernetes_minor()?;
        Ok(versions)
    }

    /// `(major, minor)` of the Kubernetes release, for the version stamp (`gitMajor`, `gitMinor`).
    pub fn kubernetes_minor(&self) -> Result<(u32, u32), Error> {
        let bad = || {
            Error::Versions(format!(
                "KUBERNETES_VERSION {:?} is not vX.Y.Z",
                self.kubernetes
            ))
        };
        let rest = self.kubernetes.strip_prefix('v').ok_or_else(bad)?;
        let mut parts = rest.split('.');
        let major = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let minor = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        Ok((major, minor))
    }

    /// Whether `go_version` (as `go env GOVERSION` prints it, e.g. `go1.26.8`) is at least `go_min`.
    pub fn go_is_new_enough(&self, go_version: &str) -> bool {
        let parse = |v: &str| -> Vec<u32> {
            v.trim_start_matches("go")
                .split(|c: char| !c.is_ascii_digit())
                .take(3)
                .map(|p| p.parse().unwrap_or(0))
                .collect()
        };
        parse(go_version) >= parse(&self.go_min)
    }

    /// The version the staging modules (`k8s.io/api`, `k8s.io/client-go`, …) are published at: v1.37.2 → v0.37.2.
    pub fn staging(&self) -> String {
        match self.kubernetes.strip_prefix("v1.") {
            Some(rest) => format!("v0.{rest}"),
            None => self.kubernetes.clone(),
        }
    }
}

/// The value of `key` in a `KEY=VALUE` file.
pub fn lookup(text: &str, key: &str) -> Option<String> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split_once('='))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_versions_parse() {
        let v = Versions::pinned().expect("tools/versions.env parses");
        assert!(v.kubernetes.starts_with("v1."));
        assert!(v.etcd.starts_with("v3."));
        assert_eq!(v.staging(), v.kubernetes.replacen("v1.", "v0.", 1));
    }

    #[test]
    fn comments_and_blanks_are_ignored() {
        let v = Versions::parse(
            "# c\n\nKUBERNETES_VERSION=v1.2.3\nETCD_VERSION = v3.0.0\nKWOK_VERSION=v0.1.0\nOPA_VERSION=v1.0.0\nGHZ_VERSION=v0.1.0\nFLAGGER_VERSION=v1.0.0\nGO_MIN_VERSION=1.26.0\n",
        )
        .expect("parses");
        assert!(v.go_is_new_enough("go1.26.8"));
        assert!(v.go_is_new_enough("go1.27"));
        assert!(!v.go_is_new_enough("go1.25.9"));
        assert_eq!(v.kubernetes_minor().expect("minor"), (1, 2));
        assert_eq!(v.etcd, "v3.0.0");
    }

    #[test]
    fn wrapper_modules_require_the_pinned_versions() {
        let v = Versions::pinned().expect("parses");
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/go");
        let read = |m: &str| {
            std::fs::read_to_string(root.join(m).join("go.mod")).expect("go.mod readable")
        };
        let k8s = read("kubernetes");
        assert!(
            k8s.contains(&format!("k8s.io/kubernetes {}", v.kubernetes)),
            "kubernetes go.mod"
        );
        let staging = format!("k8s.io/client-go => k8s.io/client-go {}", v.staging());
        assert!(
            k8s.contains(&staging),
            "kubernetes go.mod replaces staging modules with {}",
            v.staging()
        );
        assert!(
            read("etcd").contains(&format!("go.etcd.io/etcd/server/v3 {}", v.etcd)),
            "etcd go.mod"
        );
        assert!(
            read("kwok").contains(&format!("sigs.k8s.io/kwok {}", v.kwok)),
            "kwok go.mod"
        );
        assert!(
            read("opa").contains(&format!("github.com/open-policy-agent/opa {}", v.opa)),
            "opa go.mod"
        );
        assert!(
            read("ghz").contains(&format!("github.com/bojand/ghz {}", v.ghz)),
            "ghz go.mod"
        );
        assert!(
            read("flagger").contains(&format!("github.com/fluxcd/flagger {}", v.flagger)),
            "flagger go.mod"
        );
    }
}
