//! kubeconfig files with embedded credentials (a client certificate or a bearer token).

use std::fs;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::Error;

/// How a kubeconfig authenticates.
pub enum Credentials<'a> {
    /// A client certificate and key, PEM.
    Certificate { cert_pem: &'a str, key_pem: &'a str },
    /// A bearer token (e.g. a ServiceAccount token from the TokenRequest API).
    Token(&'a str),
}

/// The text of a kubeconfig with one cluster, one user and one current context, all named `name`.
pub fn render(
    name: &str,
    server: &str,
    ca_pem: &str,
    credentials: &Credentials<'_>,
    namespace: Option<&str>,
) -> String {
    let user = match credentials {
        Credentials::Certificate { cert_pem, key_pem } => format!(
            "    client-certificate-data: {}\n    client-key-data: {}\n",
            STANDARD.encode(cert_pem),
            STANDARD.encode(key_pem)
        ),
        Credentials::Token(token) => format!("    token: {token}\n"),
    };
    let namespace = namespace
        .map(|ns| format!("    namespace: {ns}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: {name}\n  cluster:\n    server: {server}\n    \
         certificate-authority-data: {ca}\nusers:\n- name: {name}\n  user:\n{user}contexts:\n- name: {name}\n  \
         context:\n    cluster: {name}\n    user: {name}\n{namespace}current-context: {name}\npreferences: {{}}\n",
        ca = STANDARD.encode(ca_pem),
    )
}

/// Writes a kubeconfig readable by its owner only (it holds credentials), creating parent directories.
pub fn write(path: &Path, contents: &str) -> Result<(), Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let tmp = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| Error::io(&tmp, e))?;
    file.write_all(contents.as_bytes())
        .map_err(|e| Error::io(&tmp, e))?;
    drop(file);
    fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_kubeconfig_parses_as_kube_config() {
        let text = render(
            "sa",
            "https://127.0.0.1:6443",
            "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",
            &Credentials::Token("abc.def.ghi"),
            Some("sluice-system"),
        );
        let config = kube::config::Kubeconfig::from_yaml(&text).expect("valid kubeconfig");
        assert_eq!(config.current_context.as_deref(), Some("sa"));
        let auth = &config.auth_infos[0];
        assert!(
            auth.auth_info
                .as_ref()
                .and_then(|a| a.token.as_ref())
                .is_some(),
            "token"
        );
        let context = config.contexts[0].context.as_ref().expect("context");
        assert_eq!(context.namespace.as_deref(), Some("sluice-system"));
    }

    #[test]
    fn certificate_kubeconfig_embeds_base64() {
        let text = render(
            "admin",
            "https://127.0.0.1:1",
            "CA",
            &Credentials::Certificate {
                cert_pem: "CERT",
                key_pem: "KEY",
            },
            None,
        );
        assert!(text.contains(&format!(
            "client-certificate-data: {}",
            STANDARD.encode("CERT")
        )));
        assert!(text.contains(&format!("client-key-data: {}", STANDARD.encode("KEY"))));
        kube::config::Kubeconfig::from_yaml(&text).expect("valid kubeconfig");
    }
}
