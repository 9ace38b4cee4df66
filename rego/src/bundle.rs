//! OPA-format policy bundles: build from a directory or parts, write deterministic `.tar.gz`, load safely.
//!
//! Layout written (same entry names as `opa build`): `/.manifest`, `/data.json` (the whole merged
//! data tree, canonical compact JSON), one entry per module at `/<module path>`, and
//! `/.signatures.json` when signed. Loading accepts OPA's layout: `.rego` files anywhere,
//! `data.json`/`data.yaml` mounted by directory (`a/b/data.json` → `data.a.b`), a root
//! `.manifest` and a root `.signatures.json`; other files are ignored (but still covered by
//! signature verification, as in OPA).

use std::cell::Cell;
use std::collections::BTreeSet;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use flate2::read::MultiGzDecoder;
use flate2::{Compression, GzBuilder};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::Module;
use super::signing::{
    self, SIGNATURES_FILE, SignaturesConfig, SigningError, VerificationKey, canonical_json_value,
};

pub const MANIFEST_FILE: &str = ".manifest";
pub const DATA_FILE: &str = "data.json";
pub const YAML_DATA_FILE: &str = "data.yaml";
/// `rego_version` value for Rego v1 (OPA 1.x syntax).
pub const REGO_VERSION_V1: u8 = 1;
/// Hex characters kept from the content hash when deriving a revision (80 bits).
pub const REVISION_HEX_LEN: usize = 20;
/// Directory recursion bound for `from_dir` (guards against symlink loops).
const MAX_DIR_DEPTH: usize = 64;

/// Errors from building, writing or loading a bundle. Messages name the file or entry.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{}: {source}", .path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "bundle archive is {size} bytes, over the {limit}-byte limit; shrink the bundle or raise LoadLimits::max_compressed_bytes"
    )]
    CompressedTooLarge { size: u64, limit: u64 },
    #[error(
        "bundle expands to more than {limit} bytes (possible gzip bomb); refusing to read further. Raise LoadLimits::max_uncompressed_bytes if the bundle is legitimate"
    )]
    UncompressedTooLarge { limit: u64 },
    #[error(
        "bundle file '{name}' is {size} bytes, over the per-file limit of {limit} bytes; raise LoadLimits::max_file_bytes if legitimate"
    )]
    FileTooLarge { name: String, size: u64, limit: u64 },
    #[error("bundle has more than {limit} entries; raise LoadLimits::max_entries if legitimate")]
    TooManyEntries { limit: usize },
    #[error(
        "bundle entry '{name}' has an unsafe path ({reason}); bundle paths must be relative, '/'-separated, without '.' or '..' segments"
    )]
    UnsafePath { name: String, reason: &'static str },
    #[error("bundle entry '{name}' is a {kind}; only regular files and directories are allowed")]
    UnsupportedEntryType { name: String, kind: String },
    #[error("bundle file '{0}' appears more than once")]
    DuplicateFile(String),
    #[error("bundle archive is not a valid gzip-compressed tar: {0}")]
    Archive(io::Error),
    #[error("bundle file '{0}' is not valid UTF-8")]
    InvalidUtf8(String),
    #[error("bundle file '{name}' is not valid JSON: {source}")]
    InvalidJson {
        name: String,
        source: serde_json::Error,
    },
    #[error("bundle file '{name}' is not valid YAML: {message}")]
    InvalidYaml { name: String, message: String },
    #[error("bundle file '{name}': {reason}")]
    InvalidManifest { name: String, reason: String },
    #[error(
        "data file '{name}' conflicts with data from '{other}' at data.{path}; a value may only be defined once, so merge the two files or move one"
    )]
    DataConflict {
        name: String,
        other: String,
        path: String,
    },
    #[error("'{0}' must hold a JSON object: data at the bundle root is the top of the data tree")]
    DataNotObject(String),
    #[error("module '{name}': {reason}")]
    InvalidPackage { name: String, reason: String },
    #[error("module path '{path}' is invalid: {reason}")]
    InvalidModulePath { path: String, reason: &'static str },
    #[error("{what} '{key}' contains '/', which OPA bundle roots cannot express; rename it")]
    SlashInRoot { what: &'static str, key: String },
    #[error("manifest roots '{0}' and '{1}' overlap; OPA rejects overlapping roots")]
    RootsOverlap(String, String),
    #[error(
        "{what} is outside the manifest roots {roots:?}; add a root covering it or drop the explicit roots from .manifest"
    )]
    OutsideRoots { what: String, roots: Vec<String> },
    #[error("bundle signature check failed: {0}")]
    Signature(#[from] SigningError),
}

/// The `.manifest` document, serialized with OPA's snake_case keys.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(default)]
    pub revision: String,
    /// Data paths this bundle owns, `/`-separated. A missing `roots` means `[""]` (everything)
    /// in OPA, which is what deserialization yields.
    #[serde(default = "default_roots")]
    pub roots: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rego_version: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
}

fn default_roots() -> Vec<String> {
    vec![String::new()]
}

impl Manifest {
    /// Compact JSON in OPA's field order (`revision`, `roots`, `rego_version`, `metadata`),
    /// with metadata keys sorted so the bytes are canonical.
    pub fn to_json_bytes(&self) -> Vec<u8> {
        let mut out = b"{\"revision\":".to_vec();
        out.extend(canonical_json_value(&Value::String(self.revision.clone())));
        out.extend_from_slice(b",\"roots\":");
        let roots = Value::Array(self.roots.iter().cloned().map(Value::String).collect());
        out.extend(canonical_json_value(&roots));
        if let Some(v) = self.rego_version {
            out.extend_from_slice(format!(",\"rego_version\":{v}").as_bytes());
        }
        if let Some(m) = &self.metadata {
            out.extend_from_slice(b",\"metadata\":");
            out.extend(canonical_json_value(m));
        }
        out.push(b'}');
        out
    }
}

/// Size bounds enforced while loading untrusted bundles.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadLimits {
    /// Checked before decompression starts.
    pub max_compressed_bytes: u64,
    /// Total bytes read out of the gzip stream (tar headers included).
    pub max_uncompressed_bytes: u64,
    pub max_file_bytes: u64,
    pub max_entries: usize,
}

impl Default for LoadLimits {
    fn default() -> Self {
        Self {
            max_compressed_bytes: 16 << 20,
            max_uncompressed_bytes: 64 << 20,
            max_file_bytes: 16 << 20,
            max_entries: 10_000,
        }
    }
}

/// Options for [`Bundle::from_dir`], [`Bundle::from_tar_gz`] and [`Bundle::load`].
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    pub limits: LoadLimits,
    /// When set, the bundle must be signed and verify against this key (checked before any
    /// content is parsed). When unset, a signature is kept but not checked.
    pub verification_key: Option<VerificationKey>,
}

/// An OPA bundle: manifest, Rego modules (sorted by path) and the merged data tree.
#[derive(Clone, Debug, PartialEq)]
pub struct Bundle {
    pub manifest: Manifest,
    pub modules: Vec<Module>,
    pub data: Value,
    signatures: Option<SignaturesConfig>,
}

impl Bundle {
    /// Builds a bundle for the operator. `data` must be an object (it becomes `/data.json`);
    /// the revision defaults to a content hash and roots are derived from packages and data.
    pub fn from_parts(
        modules: Vec<Module>,
        data: Value,
        revision: Option<String>,
        metadata: Option<Value>,
    ) -> Result<Bundle, BundleError> {
        let modules = normalize_modules(modules)?;
        if !data.is_object() {
            return Err(BundleError::DataNotObject(DATA_FILE.into()));
        }
        let manifest = Manifest {
            revision: revision.unwrap_or_default(),
            roots: Vec::new(),
            rego_version: Some(REGO_VERSION_V1),
            metadata,
        };
        finish(modules, data, manifest, true, None)
    }

    /// Reads an OPA source directory (see module docs). Hidden files and directories are
    /// skipped, except a root `.manifest` / `.signatures.json`; `*_test.rego` files are kept,
    /// as OPA keeps them. Symlinks are followed (Kubernetes ConfigMap mounts use them).
    pub fn from_dir(path: &Path, opts: &LoadOptions) -> Result<Bundle, BundleError> {
        let mut files = Vec::new();
        let mut total = 0u64;
        walk_dir(path, "", 0, &opts.limits, &mut total, &mut files)?;
        from_files(files, opts, true)
    }

    /// Loads a gzip-compressed tarball, enforcing `opts.limits` before and during
    /// decompression, and verifying the signature when a key is configured.
    pub fn from_tar_gz(bytes: &[u8], opts: &LoadOptions) -> Result<Bundle, BundleError> {
        from_files(read_tar_gz(bytes, &opts.limits)?, opts, false)
    }

    /// Loads a directory or a `.tar.gz` file, whichever `path` is.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Bundle, BundleError> {
        let io_err = |source| BundleError::Io {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io_err)?;
        if meta.is_dir() {
            return Bundle::from_dir(path, opts);
        }
        let limit = opts.limits.max_compressed_bytes;
        if meta.len() > limit {
            return Err(BundleError::CompressedTooLarge {
                size: meta.len(),
                limit,
            });
        }
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(limit.saturating_add(1)).read_to_end(&mut bytes))
            .map_err(io_err)?;
        Bundle::from_tar_gz(&bytes, opts)
    }

    /// The signature attached by [`signing::sign`] or read from the archive, if any.
    pub fn signatures(&self) -> Option<&SignaturesConfig> {
        self.signatures.as_ref()
    }

    pub(crate) fn set_signatures(&mut self, signatures: Option<SignaturesConfig>) {
        self.signatures = signatures;
    }

    /// Every file of the bundle except `.signatures.json`, as `(name without leading '/',
    /// bytes)`, sorted by name. The tarball writer and the signer both use this, so signed
    /// digests always cover exactly the archived bytes.
    pub fn files(&self) -> Vec<(String, Vec<u8>)> {
        let mut files = Vec::with_capacity(self.modules.len() + 2);
        files.push((MANIFEST_FILE.to_string(), self.manifest.to_json_bytes()));
        files.push((DATA_FILE.to_string(), canonical_json_value(&self.data)));
        for m in &self.modules {
            files.push((m.path.clone(), m.source.as_bytes().to_vec()));
        }
        files.sort_by(|a, b| a.0.cmp(&b.0));
        files
    }

    /// Writes the bundle as a deterministic `.tar.gz`: sorted entries named `/<path>`, mtime 0,
    /// uid/gid 0, mode 0644, no gzip name/timestamp, fixed compression level. The same bundle
    /// gives byte-identical output (for a given flate2/miniz_oxide version).
    pub fn to_tar_gz(&self) -> Result<Vec<u8>, BundleError> {
        let mut files = self.files();
        // `modules` is public, so re-check what from_parts/loading already guaranteed.
        for pair in files.windows(2) {
            if pair[0].0 == pair[1].0 {
                return Err(BundleError::DuplicateFile(pair[0].0.clone()));
            }
        }
        for (name, _) in &files {
            if let Some(reason) = path_problem(name) {
                return Err(BundleError::InvalidModulePath {
                    path: name.clone(),
                    reason,
                });
            }
        }
        if let Some(sig) = &self.signatures {
            files.push((SIGNATURES_FILE.to_string(), sig.to_json_bytes()));
            files.sort_by(|a, b| a.0.cmp(&b.0));
        }
        write_tar_gz(&files).map_err(BundleError::Archive)
    }
}

/// Content-derived revision: sha256 over modules, data, metadata and rego version.
pub fn content_revision(
    modules: &[Module],
    data: &Value,
    metadata: Option<&Value>,
    rego_version: Option<u8>,
) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    // Length-prefix every field so distinct inputs cannot collide by concatenation.
    let mut field = |bytes: &[u8]| {
        ctx.update(&(bytes.len() as u64).to_be_bytes());
        ctx.update(bytes);
    };
    field(b"sluice-bundle-v1");
    let mut sorted: Vec<&Module> = modules.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    for m in sorted {
        field(m.path.as_bytes());
        field(m.source.as_bytes());
    }
    field(&canonical_json_value(data));
    field(&metadata.map(canonical_json_value).unwrap_or_default());
    field(&[rego_version.unwrap_or(u8::MAX)]);
    let mut hex = signing::hex(ctx.finish().as_ref());
    hex.truncate(REVISION_HEX_LEN);
    hex
}

/// OPA roots for the given modules and data: the minimal set of `/`-joined prefixes covering
/// every package path and every top-level data key (no root is a prefix of another).
pub fn derive_roots(modules: &[Module], data: &Value) -> Result<Vec<String>, BundleError> {
    let mut candidates: BTreeSet<Vec<String>> = BTreeSet::new();
    for m in modules {
        let pkg = package_path(m)?;
        if let Some(seg) = pkg.iter().find(|s| s.contains('/')) {
            return Err(BundleError::SlashInRoot {
                what: "package segment",
                key: seg.clone(),
            });
        }
        candidates.insert(pkg);
    }
    if let Some(obj) = data.as_object() {
        for key in obj.keys() {
            if key.contains('/') {
                return Err(BundleError::SlashInRoot {
                    what: "top-level data key",
                    key: key.clone(),
                });
            }
            if key.is_empty() {
                // data[""] cannot be a root of its own; only "" (everything) covers it.
                return Ok(vec![String::new()]);
            }
            candidates.insert(vec![key.clone()]);
        }
    }
    Ok(minimal_prefixes(candidates))
}

/// Keeps the elements of a sorted set that have no proper prefix in the set. In sorted order
/// everything between a prefix and its extensions also extends it, so checking the last kept
/// element suffices.
fn minimal_prefixes(sorted: BTreeSet<Vec<String>>) -> Vec<String> {
    let mut kept: Vec<Vec<String>> = Vec::new();
    for path in sorted {
        if kept.last().is_some_and(|k| path.starts_with(k)) {
            continue;
        }
        kept.push(path);
    }
    kept.into_iter().map(|p| p.join("/")).collect()
}

/// The package path of a module (`package envoy.authz` → `["envoy", "authz"]`).
pub fn package_path(module: &Module) -> Result<Vec<String>, BundleError> {
    parse_package(&module.source).map_err(|reason| BundleError::InvalidPackage {
        name: module.path.clone(),
        reason,
    })
}

fn parse_package(source: &str) -> Result<Vec<String>, String> {
    let src = source.strip_prefix('\u{feff}').unwrap_or(source);
    let b = src.as_bytes();
    let mut i = 0;
    // Skip whitespace and comments (including `# METADATA` blocks) before `package`.
    loop {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if i < b.len() && b[i] == b'#' {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else {
            break;
        }
    }
    let rest = &b[i..];
    let after_kw = rest.get(7).copied();
    if !rest.starts_with(b"package") || !after_kw.is_some_and(|c| c.is_ascii_whitespace()) {
        return Err("the first statement must be `package <path>`".into());
    }
    i += 7;
    while i < b.len() && (b[i] == b' ' || b[i] == b'\t') {
        i += 1;
    }
    let ident = |i: &mut usize| -> Option<String> {
        let start = *i;
        if *i < b.len() && (b[*i].is_ascii_alphabetic() || b[*i] == b'_') {
            *i += 1;
            while *i < b.len() && (b[*i].is_ascii_alphanumeric() || b[*i] == b'_') {
                *i += 1;
            }
            Some(src[start..*i].to_string())
        } else {
            None
        }
    };
    let mut path = vec![ident(&mut i).ok_or("`package` must be followed by a name")?];
    loop {
        match b.get(i) {
            Some(b'.') => {
                i += 1;
                path.push(ident(&mut i).ok_or("expected a name after '.' in the package path")?);
            }
            Some(b'[') => {
                i += 1;
                let (seg, next) = bracket_string(src, i)?;
                path.push(seg);
                i = next;
            }
            _ => break,
        }
    }
    Ok(path)
}

/// Parses `"..."]` or `` `...`] `` starting at `i`; returns the segment and the index after `]`.
fn bracket_string(src: &str, mut i: usize) -> Result<(String, usize), String> {
    let b = src.as_bytes();
    let bad = || "package path brackets must hold a string, e.g. foo[\"bar-baz\"]".to_string();
    let seg = match b.get(i) {
        Some(b'"') => {
            let start = i;
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            let lit = src.get(start..=i).ok_or_else(bad)?;
            i += 1;
            serde_json::from_str::<String>(lit).map_err(|_| bad())?
        }
        Some(b'`') => {
            let start = i + 1;
            let end = src[start..].find('`').ok_or_else(bad)? + start;
            i = end + 1;
            src[start..end].to_string()
        }
        _ => return Err(bad()),
    };
    if b.get(i) != Some(&b']') {
        return Err(bad());
    }
    Ok((seg, i + 1))
}

/// Root strings → segment lists; `""` (everything) becomes the empty list.
fn root_segments(root: &str) -> Vec<String> {
    let trimmed = root.trim_matches('/');
    if trimmed.is_empty() {
        Vec::new()
    } else {
        trimmed.split('/').map(str::to_string).collect()
    }
}

/// OPA's manifest checks: roots must not overlap; packages and data must be inside a root.
fn validate_roots(
    manifest: &Manifest,
    modules: &[Module],
    data: &Value,
) -> Result<(), BundleError> {
    let roots: Vec<Vec<String>> = manifest.roots.iter().map(|r| root_segments(r)).collect();
    for (i, a) in roots.iter().enumerate() {
        for (j, b) in roots.iter().enumerate().skip(i + 1) {
            if a.starts_with(b) || b.starts_with(a) {
                return Err(BundleError::RootsOverlap(
                    manifest.roots[i].clone(),
                    manifest.roots[j].clone(),
                ));
            }
        }
    }
    let outside = |what: String| BundleError::OutsideRoots {
        what,
        roots: manifest.roots.clone(),
    };
    for m in modules {
        let pkg = package_path(m)?;
        if !roots.iter().any(|r| pkg.starts_with(r)) {
            return Err(outside(format!(
                "package {} (module '{}')",
                pkg.join("."),
                m.path
            )));
        }
    }
    let mut path = Vec::new();
    check_data_roots(data, &mut path, &roots).map_err(|p| outside(format!("data.{}", p.join("."))))
}

fn check_data_roots(
    value: &Value,
    path: &mut Vec<String>,
    roots: &[Vec<String>],
) -> Result<(), Vec<String>> {
    if roots.iter().any(|r| path.starts_with(r)) {
        return Ok(());
    }
    // An object on the way to a root is fine as long as its children are; an empty object
    // holds no data at all.
    match value {
        Value::Object(map) if map.is_empty() || roots.iter().any(|r| r.starts_with(path)) => {
            for (k, v) in map {
                path.push(k.clone());
                check_data_roots(v, path, roots)?;
                path.pop();
            }
            Ok(())
        }
        _ => Err(path.clone()),
    }
}

fn normalize_modules(modules: Vec<Module>) -> Result<Vec<Module>, BundleError> {
    let mut out = Vec::with_capacity(modules.len());
    for mut m in modules {
        let path = m.path.trim_start_matches('/');
        let reason = if !path.ends_with(".rego") {
            Some("it must end in .rego")
        } else {
            path_problem(path)
        };
        if let Some(reason) = reason {
            return Err(BundleError::InvalidModulePath {
                path: m.path,
                reason,
            });
        }
        m.path = path.to_string();
        out.push(m);
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    if let Some(w) = out.windows(2).find(|w| w[0].path == w[1].path) {
        return Err(BundleError::DuplicateFile(w[0].path.clone()));
    }
    Ok(out)
}

/// Why a relative `/`-separated path is unsafe, if it is.
fn path_problem(path: &str) -> Option<&'static str> {
    if path.is_empty() {
        return Some("empty path");
    }
    if path.contains('\0') {
        return Some("contains a NUL byte");
    }
    if path.contains('\\') {
        return Some("contains a backslash");
    }
    if path.starts_with('/') {
        return Some("absolute path");
    }
    for seg in path.split('/') {
        match seg {
            "" => return Some("empty path segment"),
            "." | ".." => return Some("'.' or '..' segment (path traversal)"),
            _ => {}
        }
    }
    None
}

/// Turns a raw tar entry name into a bundle-relative path (`/a/b.rego` and `./a/b.rego` →
/// `a/b.rego`), rejecting anything that could escape the bundle.
fn normalize_entry_name(raw: &[u8], is_dir: bool) -> Result<String, BundleError> {
    let lossy = String::from_utf8_lossy(raw).into_owned();
    let unsafe_path = |reason| BundleError::UnsafePath {
        name: lossy.clone(),
        reason,
    };
    let s = std::str::from_utf8(raw).map_err(|_| unsafe_path("not valid UTF-8"))?;
    let s = s
        .strip_prefix("./")
        .or_else(|| s.strip_prefix('/'))
        .unwrap_or(s);
    let s = if is_dir { s.trim_end_matches('/') } else { s };
    if is_dir && s.is_empty() {
        return Ok(String::new());
    }
    match path_problem(s) {
        Some(reason) => Err(unsafe_path(reason)),
        None => Ok(s.to_string()),
    }
}

/// Counts bytes pulled out of the decompressor and fails once `remaining` is exhausted, so a
/// gzip bomb is cut off after `limit` bytes instead of being expanded.
struct LimitedReader<R> {
    inner: R,
    remaining: u64,
    exceeded: Rc<Cell<bool>>,
}

impl<R: Read> Read for LimitedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            // Probe one byte: EOF exactly at the limit is fine.
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => {
                    self.exceeded.set(true);
                    Err(io::Error::other("uncompressed size limit exceeded"))
                }
            };
        }
        let max = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..max])?;
        self.remaining -= n as u64;
        Ok(n)
    }
}

fn read_tar_gz(bytes: &[u8], limits: &LoadLimits) -> Result<Vec<(String, Vec<u8>)>, BundleError> {
    let size = bytes.len() as u64;
    if size > limits.max_compressed_bytes {
        return Err(BundleError::CompressedTooLarge {
            size,
            limit: limits.max_compressed_bytes,
        });
    }
    let exceeded = Rc::new(Cell::new(false));
    // Multi-member gzip, like Go's gzip.Reader which OPA uses.
    let reader = LimitedReader {
        inner: MultiGzDecoder::new(bytes),
        remaining: limits.max_uncompressed_bytes,
        exceeded: Rc::clone(&exceeded),
    };
    let mut archive = tar::Archive::new(reader);
    let fail = |e: io::Error| {
        if exceeded.get() {
            BundleError::UncompressedTooLarge {
                limit: limits.max_uncompressed_bytes,
            }
        } else {
            BundleError::Archive(e)
        }
    };
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let mut seen = BTreeSet::new();
    let mut count = 0usize;
    for entry in archive.entries().map_err(fail)? {
        let mut entry = entry.map_err(fail)?;
        count += 1;
        if count > limits.max_entries {
            return Err(BundleError::TooManyEntries {
                limit: limits.max_entries,
            });
        }
        let raw_name = entry.path_bytes().into_owned();
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            continue;
        }
        if kind.is_dir() {
            normalize_entry_name(&raw_name, true)?;
            continue;
        }
        if !kind.is_file() {
            return Err(BundleError::UnsupportedEntryType {
                name: String::from_utf8_lossy(&raw_name).into_owned(),
                kind: entry_kind_name(kind),
            });
        }
        let name = normalize_entry_name(&raw_name, false)?;
        let size = entry.size();
        if size > limits.max_file_bytes {
            return Err(BundleError::FileTooLarge {
                name,
                size,
                limit: limits.max_file_bytes,
            });
        }
        if !seen.insert(name.clone()) {
            return Err(BundleError::DuplicateFile(name));
        }
        // The header size is trusted only up to the per-file limit; `take` enforces it anyway.
        let mut buf = Vec::with_capacity(usize::try_from(size.min(64 << 10)).unwrap_or(0));
        (&mut entry)
            .take(limits.max_file_bytes.saturating_add(1))
            .read_to_end(&mut buf)
            .map_err(fail)?;
        if buf.len() as u64 > limits.max_file_bytes {
            return Err(BundleError::FileTooLarge {
                name,
                size: buf.len() as u64,
                limit: limits.max_file_bytes,
            });
        }
        files.push((name, buf));
    }
    Ok(files)
}

fn entry_kind_name(kind: tar::EntryType) -> String {
    match kind {
        tar::EntryType::Symlink => "symlink".into(),
        tar::EntryType::Link => "hard link".into(),
        tar::EntryType::Char => "character device".into(),
        tar::EntryType::Block => "block device".into(),
        tar::EntryType::Fifo => "FIFO".into(),
        other => format!("non-regular entry (type {:?})", other.as_byte() as char),
    }
}

fn walk_dir(
    dir: &Path,
    rel: &str,
    depth: usize,
    limits: &LoadLimits,
    total: &mut u64,
    files: &mut Vec<(String, Vec<u8>)>,
) -> Result<(), BundleError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BundleError::Io { path, source }
    };
    if depth > MAX_DIR_DEPTH {
        return Err(BundleError::Io {
            path: dir.to_path_buf(),
            source: io::Error::other(format!(
                "directory nesting deeper than {MAX_DIR_DEPTH} (symlink loop?)"
            )),
        });
    }
    let mut entries = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(io_err(dir))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            return Err(BundleError::InvalidUtf8(path.display().to_string()));
        };
        let at_root = rel.is_empty();
        let keep_hidden = at_root && (name == MANIFEST_FILE || name == SIGNATURES_FILE);
        // Skips `.git`, editor files and Kubernetes' `..data` ConfigMap internals.
        if name.starts_with('.') && !keep_hidden {
            continue;
        }
        let rel_path = if at_root {
            name
        } else {
            format!("{rel}/{name}")
        };
        let meta = std::fs::metadata(&path).map_err(io_err(&path))?;
        if meta.is_dir() {
            walk_dir(&path, &rel_path, depth + 1, limits, total, files)?;
            continue;
        }
        if !meta.is_file() {
            continue;
        }
        if files.len() >= limits.max_entries {
            return Err(BundleError::TooManyEntries {
                limit: limits.max_entries,
            });
        }
        if meta.len() > limits.max_file_bytes {
            return Err(BundleError::FileTooLarge {
                name: rel_path,
                size: meta.len(),
                limit: limits.max_file_bytes,
            });
        }
        let mut buf = Vec::new();
        std::fs::File::open(&path)
            .and_then(|f| {
                f.take(limits.max_file_bytes.saturating_add(1))
                    .read_to_end(&mut buf)
            })
            .map_err(io_err(&path))?;
        if buf.len() as u64 > limits.max_file_bytes {
            return Err(BundleError::FileTooLarge {
                name: rel_path,
                size: buf.len() as u64,
                limit: limits.max_file_bytes,
            });
        }
        *total += buf.len() as u64;
        if *total > limits.max_uncompressed_bytes {
            return Err(BundleError::UncompressedTooLarge {
                limit: limits.max_uncompressed_bytes,
            });
        }
        files.push((rel_path, buf));
    }
    Ok(())
}

/// Shared by `from_dir` and `from_tar_gz`: verifies (if asked), then parses raw files.
fn from_files(
    files: Vec<(String, Vec<u8>)>,
    opts: &LoadOptions,
    from_source_dir: bool,
) -> Result<Bundle, BundleError> {
    let signatures = match files.iter().find(|(n, _)| n == SIGNATURES_FILE) {
        Some((name, bytes)) => Some(serde_json::from_slice::<SignaturesConfig>(bytes).map_err(
            |source| BundleError::InvalidJson {
                name: name.clone(),
                source,
            },
        )?),
        None => None,
    };
    // Verify before parsing anything else, so untrusted content is never interpreted.
    if let Some(key) = &opts.verification_key {
        let sigs = signatures.as_ref().ok_or(SigningError::Unsigned)?;
        signing::verify_files(&files, sigs, key)?;
    }
    let mut manifest = None;
    let mut modules = Vec::new();
    let mut data_files: Vec<(String, Vec<String>, Value)> = Vec::new();
    for (name, bytes) in files {
        let (dir, base) = match name.rsplit_once('/') {
            Some((d, b)) => (d, b),
            None => ("", name.as_str()),
        };
        if name == MANIFEST_FILE {
            let m: Manifest =
                serde_json::from_slice(&bytes).map_err(|source| BundleError::InvalidJson {
                    name: name.clone(),
                    source,
                })?;
            if m.metadata.as_ref().is_some_and(|v| !v.is_object()) {
                return Err(BundleError::InvalidManifest {
                    name,
                    reason: "metadata must be a JSON object".into(),
                });
            }
            manifest = Some(m);
        } else if base == DATA_FILE || base == YAML_DATA_FILE {
            let value: Value = if base == DATA_FILE {
                serde_json::from_slice(&bytes).map_err(|source| BundleError::InvalidJson {
                    name: name.clone(),
                    source,
                })?
            } else {
                let text = std::str::from_utf8(&bytes)
                    .map_err(|_| BundleError::InvalidUtf8(name.clone()))?;
                serde_saphyr::from_str(text).map_err(|e| BundleError::InvalidYaml {
                    name: name.clone(),
                    message: e.to_string(),
                })?
            };
            let mount = if dir.is_empty() {
                Vec::new()
            } else {
                dir.split('/').map(str::to_string).collect()
            };
            data_files.push((name, mount, value));
        } else if base.ends_with(".rego") {
            let source =
                String::from_utf8(bytes).map_err(|_| BundleError::InvalidUtf8(name.clone()))?;
            modules.push(Module { path: name, source });
        }
    }
    let data = merge_data(data_files)?;
    let modules = normalize_modules(modules)?;
    let (manifest, derive) = match manifest {
        Some(m) => (m, false),
        // A source tree without a manifest gets Sluice's defaults (derived roots, Rego v1)...
        None if from_source_dir => (
            Manifest {
                revision: String::new(),
                roots: Vec::new(),
                rego_version: Some(REGO_VERSION_V1),
                metadata: None,
            },
            true,
        ),
        // ...while a manifest-less tarball keeps OPA's meaning: it owns everything.
        None => (
            Manifest {
                revision: String::new(),
                roots: default_roots(),
                rego_version: None,
                metadata: None,
            },
            false,
        ),
    };
    finish(modules, data, manifest, derive, signatures)
}

/// Fills in revision/roots as needed and validates the manifest against the content.
fn finish(
    modules: Vec<Module>,
    data: Value,
    mut manifest: Manifest,
    derive_roots_from_content: bool,
    signatures: Option<SignaturesConfig>,
) -> Result<Bundle, BundleError> {
    if let Some(meta) = &manifest.metadata
        && !meta.is_object()
    {
        return Err(BundleError::InvalidManifest {
            name: MANIFEST_FILE.into(),
            reason: "metadata must be a JSON object".into(),
        });
    }
    if derive_roots_from_content {
        manifest.roots = derive_roots(&modules, &data)?;
    }
    validate_roots(&manifest, &modules, &data)?;
    if manifest.revision.is_empty() {
        manifest.revision = content_revision(
            &modules,
            &data,
            manifest.metadata.as_ref(),
            manifest.rego_version,
        );
    }
    Ok(Bundle {
        manifest,
        modules,
        data,
        signatures,
    })
}

/// Merges data files into one tree like OPA: objects merge recursively, any other overlap is
/// a conflict. Files are merged in name order so errors are deterministic.
fn merge_data(mut files: Vec<(String, Vec<String>, Value)>) -> Result<Value, BundleError> {
    files.sort_by(|a, b| a.0.cmp(&b.0));
    let mut root = Map::new();
    let mut sources: Vec<(Vec<String>, String)> = Vec::new();
    for (name, mount, value) in files {
        let tree = match (mount.split_first(), value) {
            (None, Value::Object(obj)) => obj,
            (None, _) => return Err(BundleError::DataNotObject(name)),
            (Some((first, rest)), value) => {
                // Wrap the value in one object per directory segment, innermost first.
                let mut v = value;
                for seg in rest.iter().rev() {
                    let mut m = Map::new();
                    m.insert(seg.clone(), v);
                    v = Value::Object(m);
                }
                let mut obj = Map::new();
                obj.insert(first.clone(), v);
                obj
            }
        };
        let mut path = Vec::new();
        if let Err(conflict) = merge_objects(&mut root, tree, &mut path) {
            let other = sources
                .iter()
                .find(|(m, _)| conflict.starts_with(m) || m.starts_with(&conflict))
                .map(|(_, n)| n.clone())
                .unwrap_or_else(|| "another data file".into());
            return Err(BundleError::DataConflict {
                name,
                other,
                path: conflict.join("."),
            });
        }
        sources.push((mount, name));
    }
    Ok(Value::Object(root))
}

/// Merges `src` into `dst` like OPA merges data documents: objects recursively, any other overlap is a
/// conflict, returned as the path where it happened.
pub fn merge_objects(
    dst: &mut Map<String, Value>,
    src: Map<String, Value>,
    path: &mut Vec<String>,
) -> Result<(), Vec<String>> {
    for (k, v) in src {
        path.push(k.clone());
        match (dst.get_mut(&k), v) {
            (None, v) => {
                dst.insert(k, v);
            }
            (Some(Value::Object(existing)), Value::Object(incoming)) => {
                merge_objects(existing, incoming, path)?;
            }
            (Some(_), _) => return Err(path.clone()),
        }
        path.pop();
    }
    Ok(())
}

fn write_tar_gz(files: &[(String, Vec<u8>)]) -> io::Result<Vec<u8>> {
    let gz = GzBuilder::new().write(Vec::new(), Compression::new(6));
    let mut tar = tar::Builder::new(gz);
    for (name, bytes) in files {
        append_entry(&mut tar, &format!("/{name}"), bytes)?;
    }
    tar.into_inner()?.finish()
}

/// Appends a regular file whose name keeps OPA's leading `/` (the `tar` crate's path setters
/// refuse absolute paths, so the name bytes are written directly).
fn append_entry<W: Write>(tar: &mut tar::Builder<W>, name: &str, bytes: &[u8]) -> io::Result<()> {
    const NAME_FIELD: usize = 100;
    let name_bytes = name.as_bytes();
    if name_bytes.len() > NAME_FIELD {
        // GNU long-name extension (Go's archive/tar and the `tar` crate both read it).
        let mut long = name_bytes.to_vec();
        long.push(0);
        let header = fixed_header(tar::EntryType::GNULongName, b"././@LongLink", long.len())?;
        tar.append(&header, long.as_slice())?;
    }
    let header = fixed_header(
        tar::EntryType::Regular,
        &name_bytes[..name_bytes.len().min(NAME_FIELD)],
        bytes.len(),
    )?;
    tar.append(&header, bytes)
}

fn fixed_header(kind: tar::EntryType, name: &[u8], size: usize) -> io::Result<tar::Header> {
    let mut header = tar::Header::new_gnu();
    {
        let gnu = header
            .as_gnu_mut()
            .ok_or_else(|| io::Error::other("GNU tar header expected"))?;
        gnu.name = [0; 100];
        gnu.name[..name.len()].copy_from_slice(name);
    }
    header.set_entry_type(kind);
    header.set_size(size as u64);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_cksum();
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use serde_json::json;

    fn module(path: &str, package: &str) -> Module {
        Module {
            path: path.into(),
            source: format!("package {package}\n\nallow if true\n"),
        }
    }

    fn sample() -> Bundle {
        Bundle::from_parts(
            vec![
                module("envoy/authz/util.rego", "envoy.authz.util"),
                module("envoy/authz.rego", "envoy.authz"),
            ],
            json!({"roles": {"admin": ["alice"]}}),
            None,
            None,
        )
        .expect("sample bundle")
    }

    fn gz(bytes: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::fast());
        e.write_all(bytes).expect("gzip");
        e.finish().expect("gzip")
    }

    /// A tarball with arbitrary raw entries (the `tar` crate's safe setters would refuse them).
    fn raw_tar(entries: &[(tar::EntryType, &[u8], &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (kind, name, data) in entries {
            let mut h = fixed_header(*kind, name, data.len()).expect("header");
            if *kind == tar::EntryType::Symlink || *kind == tar::EntryType::Link {
                h.set_link_name("target").expect("link name");
                h.set_cksum();
            }
            b.append(&h, *data).expect("append");
        }
        gz(&b.into_inner().expect("tar"))
    }

    fn entries(tgz: &[u8]) -> Vec<(String, u32, u64, u64, Vec<u8>)> {
        let mut a = tar::Archive::new(MultiGzDecoder::new(tgz));
        a.entries()
            .expect("entries")
            .map(|e| {
                let mut e = e.expect("entry");
                let h = e.header().clone();
                let mut data = Vec::new();
                e.read_to_end(&mut data).expect("read");
                (
                    String::from_utf8(e.path_bytes().into_owned()).expect("utf8"),
                    h.mode().expect("mode"),
                    h.mtime().expect("mtime"),
                    h.uid().expect("uid"),
                    data,
                )
            })
            .collect()
    }

    fn opts() -> LoadOptions {
        LoadOptions::default()
    }

    #[test]
    fn tarball_layout_matches_opa_build() {
        let tgz = sample().to_tar_gz().expect("tgz");
        // gzip header: no FNAME/FEXTRA flags, mtime 0, OS "unknown".
        assert_eq!(&tgz[..4], &[0x1f, 0x8b, 8, 0]);
        assert_eq!(&tgz[4..8], &[0, 0, 0, 0]);
        assert_eq!(tgz[9], 255);
        let e = entries(&tgz);
        let names: Vec<&str> = e.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "/.manifest",
                "/data.json",
                "/envoy/authz.rego",
                "/envoy/authz/util.rego"
            ]
        );
        for (_, mode, mtime, uid, _) in &e {
            assert_eq!((*mode, *mtime, *uid), (0o644, 0, 0));
        }
        assert_eq!(e[1].4, br#"{"roles":{"admin":["alice"]}}"#);
    }

    #[test]
    fn manifest_json_is_opa_shaped() {
        let m = Manifest {
            revision: "r1".into(),
            roots: vec!["envoy/authz".into(), "roles".into()],
            rego_version: Some(1),
            metadata: Some(json!({"b": "x", "a": 1})),
        };
        assert_eq!(
            String::from_utf8(m.to_json_bytes()).expect("utf8"),
            r#"{"revision":"r1","roots":["envoy/authz","roles"],"rego_version":1,"metadata":{"a":1,"b":"x"}}"#
        );
        let minimal = Manifest {
            revision: "r".into(),
            roots: vec![],
            rego_version: None,
            metadata: None,
        };
        assert_eq!(minimal.to_json_bytes(), br#"{"revision":"r","roots":[]}"#);
        // serde agrees with the hand-written form, and OPA's "no roots" means everything.
        let parsed: Manifest = serde_json::from_slice(&m.to_json_bytes()).expect("parse");
        assert_eq!(parsed, m);
        let opa: Manifest = serde_json::from_str(r#"{"revision":"x"}"#).expect("parse");
        assert_eq!(opa.roots, [""]);
        assert_eq!(opa.rego_version, None);
    }

    #[test]
    fn sample_manifest_has_derived_roots_and_hash_revision() {
        let b = sample();
        assert_eq!(b.manifest.roots, ["envoy/authz", "roles"]);
        assert_eq!(b.manifest.rego_version, Some(1));
        assert_eq!(b.manifest.revision.len(), REVISION_HEX_LEN);
        assert!(b.manifest.revision.bytes().all(|c| c.is_ascii_hexdigit()));
        let given = Bundle::from_parts(vec![], json!({}), Some("v7".into()), None).expect("b");
        assert_eq!(given.manifest.revision, "v7");
        assert!(given.manifest.roots.is_empty());
    }

    fn roots(pkgs: &[&str], data: Value) -> Vec<String> {
        let modules: Vec<Module> = pkgs
            .iter()
            .enumerate()
            .map(|(i, p)| module(&format!("m{i}.rego"), p))
            .collect();
        derive_roots(&modules, &data).expect("roots")
    }

    #[test]
    fn roots_derivation() {
        assert_eq!(
            roots(&["envoy.authz", "envoy.authz.util"], json!({"roles": 1})),
            ["envoy/authz", "roles"]
        );
        // Segment prefixes only: `a.b` does not cover `a.bc`.
        assert_eq!(roots(&["a.b", "a.bc", "a.b.c"], json!({})), ["a/b", "a/bc"]);
        // A data key covers packages under it.
        assert_eq!(roots(&["envoy.authz"], json!({"envoy": {}})), ["envoy"]);
        assert_eq!(roots(&["x.y", "x.z"], json!({})), ["x/y", "x/z"]);
        assert_eq!(roots(&[r#"x["y-z"].w"#], json!({})), ["x/y-z/w"]);
        assert!(roots(&[], json!({})).is_empty());
        assert_eq!(roots(&["a"], json!({"": 1})), [""]);
        let err = derive_roots(&[], &json!({"a/b": 1})).expect_err("slash");
        assert!(err.to_string().contains("a/b"), "{err}");
    }

    #[test]
    fn package_parsing() {
        let p = |s: &str| parse_package(s);
        assert_eq!(p("package a.b").expect("p"), ["a", "b"]);
        assert_eq!(
            p("# METADATA\n# title: x\n\n  package  a_1.b2 # c\nimport rego.v1").expect("p"),
            ["a_1", "b2"]
        );
        assert_eq!(p("package a[\"b.c\"].d").expect("p"), ["a", "b.c", "d"]);
        assert_eq!(p("package a[`raw`]").expect("p"), ["a", "raw"]);
        assert!(p("import rego.v1\npackage a").is_err());
        assert!(p("packagea").is_err());
        assert!(p("package 1a").is_err());
        assert!(p("package a.").is_err());
        assert!(p("package a[b]").is_err());
        assert!(p("").is_err());
    }

    #[test]
    fn deterministic_output() {
        let a = sample().to_tar_gz().expect("tgz");
        assert_eq!(a, sample().to_tar_gz().expect("tgz"));
        // Different module order and map insertion order: same bytes.
        let mut data = Map::new();
        data.insert("zeta".into(), json!(1));
        data.insert("alpha".into(), json!({"y": 2, "x": 1}));
        let mut data2 = Map::new();
        data2.insert("alpha".into(), json!({"x": 1, "y": 2}));
        data2.insert("zeta".into(), json!(1));
        let m1 = vec![module("b.rego", "b"), module("a.rego", "a")];
        let m2 = vec![module("a.rego", "a"), module("/b.rego", "b")];
        let x = Bundle::from_parts(m1, Value::Object(data), None, None).expect("x");
        let y = Bundle::from_parts(m2, Value::Object(data2), None, None).expect("y");
        assert_eq!(x.manifest.revision, y.manifest.revision);
        assert_eq!(x.to_tar_gz().expect("x"), y.to_tar_gz().expect("y"));
        // And content changes move the revision.
        let z = Bundle::from_parts(vec![module("a.rego", "a")], json!({}), None, None).expect("z");
        assert_ne!(x.manifest.revision, z.manifest.revision);
    }

    #[test]
    fn long_names_round_trip() {
        let long = format!("{}/policy.rego", "d".repeat(150));
        let b = Bundle::from_parts(vec![module(&long, "d")], json!({}), None, None).expect("b");
        let back = Bundle::from_tar_gz(&b.to_tar_gz().expect("tgz"), &opts()).expect("load");
        assert_eq!(back.modules[0].path, long);
    }

    fn write(root: &Path, rel: &str, content: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, content).expect("write");
    }

    #[test]
    fn from_dir_round_trip() {
        let dir = tempfile::tempdir().expect("tmp");
        let root = dir.path();
        write(
            root,
            "envoy/authz.rego",
            "package envoy.authz\nallow := true\n",
        );
        write(
            root,
            "envoy/authz_test.rego",
            "package envoy.authz\ntest_x if allow\n",
        );
        write(root, "envoy/util/u.rego", "package envoy.authz.util\n");
        write(root, "data.json", r#"{"roles": {"admin": ["alice"]}}"#);
        write(root, "envoy/authz/data.yaml", "limits:\n  max: 3\n");
        write(root, "a/b/data.json", r#"[1, 2]"#);
        write(root, ".git/x.rego", "package ignored\n");
        write(root, "README.md", "ignored");
        let b = Bundle::from_dir(root, &opts()).expect("from_dir");
        let paths: Vec<&str> = b.modules.iter().map(|m| m.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "envoy/authz.rego",
                "envoy/authz_test.rego",
                "envoy/util/u.rego"
            ]
        );
        assert_eq!(
            b.data,
            json!({
                "roles": {"admin": ["alice"]},
                "envoy": {"authz": {"limits": {"max": 3}}},
                "a": {"b": [1, 2]}
            })
        );
        assert_eq!(b.manifest.roots, ["a", "envoy", "roles"]);
        let tgz = b.to_tar_gz().expect("tgz");
        let back = Bundle::from_tar_gz(&tgz, &opts()).expect("load");
        assert_eq!(back, b);
        assert_eq!(back.to_tar_gz().expect("tgz"), tgz);
        // load() picks the right reader.
        let file = root.join("bundle.tar.gz");
        std::fs::write(&file, &tgz).expect("write");
        assert_eq!(Bundle::load(&file, &opts()).expect("load file"), b);
        std::fs::remove_file(&file).expect("rm");
        assert_eq!(Bundle::load(root, &opts()).expect("load dir"), b);
    }

    #[test]
    fn from_dir_with_manifest_keeps_it_and_checks_roots() {
        let dir = tempfile::tempdir().expect("tmp");
        let root = dir.path();
        write(root, "p.rego", "package team.p\n");
        write(
            root,
            ".manifest",
            r#"{"revision":"rev-1","roots":["team"],"metadata":{"k":"v"}}"#,
        );
        let b = Bundle::from_dir(root, &opts()).expect("from_dir");
        assert_eq!(b.manifest.revision, "rev-1");
        assert_eq!(b.manifest.roots, ["team"]);
        assert_eq!(b.manifest.rego_version, None);

        write(root, "data.json", r#"{"other": 1}"#);
        let err = Bundle::from_dir(root, &opts()).expect_err("outside roots");
        assert!(err.to_string().contains("data.other"), "{err}");

        std::fs::remove_file(root.join("data.json")).expect("rm");
        write(
            root,
            ".manifest",
            r#"{"revision":"r","roots":["team","team/x"]}"#,
        );
        let err = Bundle::from_dir(root, &opts()).expect_err("overlap");
        assert!(matches!(err, BundleError::RootsOverlap(..)), "{err}");

        write(root, ".manifest", r#"{"revision":"r","roots":["other"]}"#);
        let err = Bundle::from_dir(root, &opts()).expect_err("package outside");
        assert!(err.to_string().contains("team.p"), "{err}");
    }

    #[test]
    fn conflicting_data_is_rejected_with_both_files_named() {
        let dir = tempfile::tempdir().expect("tmp");
        write(dir.path(), "a/data.json", r#"{"b": 1}"#);
        write(dir.path(), "a/b/data.json", r#"{"c": 2}"#);
        let err = Bundle::from_dir(dir.path(), &opts()).expect_err("conflict");
        let msg = err.to_string();
        assert!(
            msg.contains("a/data.json") && msg.contains("a/b/data.json"),
            "{msg}"
        );
        assert!(msg.contains("data.a.b"), "{msg}");

        let dir = tempfile::tempdir().expect("tmp");
        write(dir.path(), "x/data.json", r#"{"k": 1}"#);
        write(dir.path(), "x/data.yaml", "k: 2\n");
        assert!(matches!(
            Bundle::from_dir(dir.path(), &opts()),
            Err(BundleError::DataConflict { .. })
        ));

        // Objects merge across files.
        let dir = tempfile::tempdir().expect("tmp");
        write(dir.path(), "x/data.json", r#"{"k": 1}"#);
        write(dir.path(), "x/y/data.json", r#"{"j": 2}"#);
        let b = Bundle::from_dir(dir.path(), &opts()).expect("merge");
        assert_eq!(b.data, json!({"x": {"k": 1, "y": {"j": 2}}}));
    }

    #[test]
    fn to_tar_gz_rechecks_public_fields() {
        let mut b = sample();
        b.modules.push(module("../evil.rego", "evil"));
        assert!(matches!(
            b.to_tar_gz(),
            Err(BundleError::InvalidModulePath { .. })
        ));
        let mut b = sample();
        b.modules.push(b.modules[0].clone());
        assert!(matches!(b.to_tar_gz(), Err(BundleError::DuplicateFile(_))));
    }

    #[test]
    fn from_parts_validates_input() {
        let bad =
            |p: &str| Bundle::from_parts(vec![module(p, "a")], json!({}), None, None).expect_err(p);
        assert!(matches!(
            bad("a.txt"),
            BundleError::InvalidModulePath { .. }
        ));
        assert!(matches!(
            bad("../a.rego"),
            BundleError::InvalidModulePath { .. }
        ));
        assert!(matches!(
            bad("a//b.rego"),
            BundleError::InvalidModulePath { .. }
        ));
        let dup = Bundle::from_parts(
            vec![module("a.rego", "a"), module("/a.rego", "a")],
            json!({}),
            None,
            None,
        );
        assert!(matches!(dup, Err(BundleError::DuplicateFile(_))));
        assert!(matches!(
            Bundle::from_parts(vec![], json!([1]), None, None),
            Err(BundleError::DataNotObject(_))
        ));
        let no_pkg = Module {
            path: "x.rego".into(),
            source: "allow := true".into(),
        };
        let err = Bundle::from_parts(vec![no_pkg], json!({}), None, None).expect_err("pkg");
        assert!(err.to_string().contains("x.rego"), "{err}");
        assert!(matches!(
            Bundle::from_parts(vec![], json!({}), None, Some(json!([]))),
            Err(BundleError::InvalidManifest { .. })
        ));
    }

    #[test]
    fn accepts_opa_style_tarballs() {
        // Relative and `./` names, directory entries, nested data, no manifest.
        let tgz = raw_tar(&[
            (tar::EntryType::Directory, b"./", b""),
            (tar::EntryType::Directory, b"./x/", b""),
            (tar::EntryType::Regular, b"./x/p.rego", b"package x\n"),
            (tar::EntryType::Regular, b"x/y/data.json", br#"{"a":1}"#),
            (tar::EntryType::Regular, b"/z/data.yaml", b"b: 2\n"),
        ]);
        let b = Bundle::from_tar_gz(&tgz, &opts()).expect("load");
        assert_eq!(b.modules[0].path, "x/p.rego");
        assert_eq!(b.data, json!({"x": {"y": {"a": 1}}, "z": {"b": 2}}));
        assert_eq!(b.manifest.roots, [""]);
        assert!(!b.manifest.revision.is_empty());
    }

    fn load_err(tgz: &[u8]) -> BundleError {
        Bundle::from_tar_gz(tgz, &opts()).expect_err("must be refused")
    }

    #[test]
    fn path_traversal_and_special_entries_are_refused() {
        use tar::EntryType::{Block, Char, Fifo, Link, Regular, Symlink};
        for name in [
            &b"../x.rego"[..],
            b"/../../etc/passwd",
            b"a/../../x.rego",
            b"./../x.rego",
            b"//etc/x.rego",
            b"a\\..\\x.rego",
            b"\xff.rego",
        ] {
            let err = load_err(&raw_tar(&[(Regular, name, b"package x")]));
            assert!(matches!(err, BundleError::UnsafePath { .. }), "{err}");
            assert!(
                err.to_string()
                    .contains(String::from_utf8_lossy(name).as_ref()),
                "{err}"
            );
        }
        let err = load_err(&raw_tar(&[(tar::EntryType::Directory, b"../d/", b"")]));
        assert!(matches!(err, BundleError::UnsafePath { .. }), "{err}");
        for kind in [Symlink, Link, Char, Block, Fifo] {
            let err = load_err(&raw_tar(&[(kind, b"/x.rego", b"")]));
            assert!(
                matches!(err, BundleError::UnsupportedEntryType { ref name, .. } if name == "/x.rego"),
                "{err}"
            );
        }
        let err = load_err(&raw_tar(&[
            (Regular, b"/x.rego", b"package x"),
            (Regular, b"x.rego", b"package x"),
        ]));
        assert!(
            matches!(err, BundleError::DuplicateFile(ref n) if n == "x.rego"),
            "{err}"
        );
        assert!(matches!(load_err(b"not gzip"), BundleError::Archive(_)));
    }

    #[test]
    fn gzip_bomb_is_refused_quickly() {
        // 1024 entries of 1 MiB zeros (1 GiB expanded, ~1 MiB compressed): each header is its
        // own gzip member followed by one shared precompressed member of zeros.
        let mut z = GzEncoder::new(Vec::new(), Compression::best());
        z.write_all(&vec![0u8; 1 << 20]).expect("gzip");
        let zeros = z.finish().expect("gzip");
        let mut bomb = Vec::new();
        for i in 0..1024 {
            let name = format!("/f{i}.rego");
            let h = fixed_header(tar::EntryType::Regular, name.as_bytes(), 1 << 20).expect("h");
            bomb.extend(gz(h.as_bytes()));
            bomb.extend_from_slice(&zeros);
        }
        assert!(bomb.len() < 2 << 20, "bomb is {} bytes", bomb.len());
        let limits = LoadLimits {
            max_uncompressed_bytes: 8 << 20,
            ..LoadLimits::default()
        };
        let err = Bundle::from_tar_gz(
            &bomb,
            &LoadOptions {
                limits,
                verification_key: None,
            },
        )
        .expect_err("bomb");
        assert!(
            matches!(err, BundleError::UncompressedTooLarge { limit } if limit == 8 << 20),
            "{err}"
        );
        // A single header claiming 1 GiB is refused before any content is read.
        let h = fixed_header(tar::EntryType::Regular, b"/big.rego", 1 << 30).expect("h");
        let err = load_err(&gz(h.as_bytes()));
        assert!(
            matches!(err, BundleError::FileTooLarge { ref name, size, .. } if name == "big.rego" && size == 1 << 30),
            "{err}"
        );
    }

    #[test]
    fn entry_count_and_compressed_size_limits() {
        let modules: Vec<Module> = (0..11)
            .map(|i| module(&format!("m{i}.rego"), "m"))
            .collect();
        let tgz = Bundle::from_parts(modules, json!({}), None, None)
            .expect("b")
            .to_tar_gz()
            .expect("tgz");
        let limited = |limits| LoadOptions {
            limits,
            verification_key: None,
        };
        let err = Bundle::from_tar_gz(
            &tgz,
            &limited(LoadLimits {
                max_entries: 10,
                ..LoadLimits::default()
            }),
        )
        .expect_err("entries");
        assert!(
            matches!(err, BundleError::TooManyEntries { limit: 10 }),
            "{err}"
        );
        let err = Bundle::from_tar_gz(
            &tgz,
            &limited(LoadLimits {
                max_compressed_bytes: 100,
                ..LoadLimits::default()
            }),
        )
        .expect_err("compressed");
        assert!(
            matches!(err, BundleError::CompressedTooLarge { limit: 100, .. }),
            "{err}"
        );
        let err = Bundle::from_tar_gz(
            &tgz,
            &limited(LoadLimits {
                max_file_bytes: 10,
                ..LoadLimits::default()
            }),
        )
        .expect_err("file");
        assert!(matches!(err, BundleError::FileTooLarge { .. }), "{err}");
    }

    mod proptests {
        use super::*;
        use proptest::prelude::*;

        fn seg() -> impl Strategy<Value = String> {
            proptest::sample::select(vec!["a", "b", "ab", "c"]).prop_map(str::to_string)
        }

        proptest! {
            #[test]
            fn roots_cover_everything_exactly_once(
                pkgs in proptest::collection::vec(proptest::collection::vec(seg(), 1..4), 0..8),
                keys in proptest::collection::vec(seg(), 0..3),
            ) {
                let modules: Vec<Module> = pkgs.iter().enumerate()
                    .map(|(i, p)| module(&format!("m{i}.rego"), &p.join(".")))
                    .collect();
                let data = Value::Object(keys.iter().map(|k| (k.clone(), json!(1))).collect());
                let roots: Vec<Vec<String>> = derive_roots(&modules, &data)
                    .expect("roots").iter().map(|r| root_segments(r)).collect();
                let mut paths: Vec<Vec<String>> = pkgs.clone();
                paths.extend(keys.iter().map(|k| vec![k.clone()]));
                for p in &paths {
                    let covering = roots.iter().filter(|r| p.starts_with(r)).count();
                    prop_assert_eq!(covering, 1, "{:?} covered by {} roots", p, covering);
                }
                for (i, a) in roots.iter().enumerate() {
                    // Minimal: every root is itself one of the paths.
                    prop_assert!(paths.contains(a));
                    for b in roots.iter().skip(i + 1) {
                        prop_assert!(!a.starts_with(b) && !b.starts_with(a));
                    }
                }
            }
        }
    }
}
