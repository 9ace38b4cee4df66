//! Azure Monitor managed Prometheus: PromQL against an Azure Monitor workspace's query endpoint with a Microsoft
//! Entra ID token (Flagger's `azuremonitor` provider). The token comes from the operator's workload identity (the
//! federated ServiceAccount token AKS projects into the pod, exchanged at Entra ID) or from a client secret in
//! the template's Secret, and is cached until shortly before it expires. Tested against Entra ID's documented
//! token endpoint shapes on a loopback stand-in, in front of a real Prometheus.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::ProviderError;
use super::prometheus::error_chain;

/// Azure clouds by the suffix of their Azure Monitor workspace query hosts: the default Entra ID authority and
/// the token audience of each.
const CLOUDS: [(&str, &str, &str); 3] = [
    (
        ".prometheus.monitor.azure.com",
        "https://login.microsoftonline.com/",
        "https://prometheus.monitor.azure.com",
    ),
    (
        ".prometheus.monitor.azure.us",
        "https://login.microsoftonline.us/",
        "https://prometheus.monitor.azure.us",
    ),
    (
        ".prometheus.monitor.azure.cn",
        "https://login.chinacloudapi.cn/",
        "https://prometheus.monitor.azure.cn",
    ),
];

/// A token is renewed this long before Entra ID says it expires.
const RENEW_BEFORE: Duration = Duration::from_secs(300);

/// The Entra ID authority and token audience for an Azure Monitor workspace query endpoint (an `https://` URL
/// whose host ends in `.prometheus.monitor.azure.com`, `.us` or `.cn`). The error says what is wrong.
pub fn azure_cloud(address: &str) -> Result<(&'static str, &'static str), String> {
    let url = reqwest::Url::parse(address)
        .map_err(|e| format!("address {address:?} is not a URL: {e}"))?;
    if url.scheme() != "https" {
        return Err(format!(
            "address {address:?} must use https: an Entra ID token is sent with every query"
        ));
    }
    let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
    CLOUDS
        .iter()
        .find(|(suffix, _, _)| host.ends_with(suffix))
        .map(|(_, authority, audience)| (*authority, *audience))
        .ok_or_else(|| {
            format!(
                "address {address:?} is not an Azure Monitor workspace query endpoint: its host must end in \
                 .prometheus.monitor.azure.com (or .us, .cn); copy it from the workspace's overview page"
            )
        })
}

/// How Sluice proves who it is to Entra ID.
#[derive(Clone, PartialEq, Eq)]
pub enum EntraSecret {
    /// A client secret (`clientSecret` in the template's Secret).
    ClientSecret(String),
    /// The federated token file of the operator's workload identity (`AZURE_FEDERATED_TOKEN_FILE`), read at every
    /// exchange because the kubelet rotates it.
    FederatedTokenFile(PathBuf),
}

/// An application's credential at an Entra ID tenant.
#[derive(Clone, PartialEq, Eq)]
pub struct EntraCredential {
    /// e.g. `https://login.microsoftonline.com/`.
    pub authority: String,
    pub tenant_id: String,
    pub client_id: String,
    pub secret: EntraSecret,
    /// e.g. `https://prometheus.monitor.azure.com/.default`.
    pub scope: String,
}

impl std::fmt::Debug for EntraSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ClientSecret(_) => f.write_str("ClientSecret(<redacted>)"),
            Self::FederatedTokenFile(path) => write!(f, "FederatedTokenFile({})", path.display()),
        }
    }
}

impl std::fmt::Debug for EntraCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EntraCredential")
            .field("authority", &self.authority)
            .field("tenant_id", &self.tenant_id)
            .field("client_id", &self.client_id)
            .field("secret", &self.secret)
            .field("scope", &self.scope)
            .finish()
    }
}

impl EntraCredential {
    /// The credential for a template: `clientSecret` (with `clientId` and `tenantId`) from its Secret, else the
    /// operator's workload identity, from `env` (`AZURE_CLIENT_ID`, `AZURE_TENANT_ID`,
    /// `AZURE_FEDERATED_TOKEN_FILE`, which AKS's workload identity webhook sets; `clientId`/`tenantId` in the
    /// Secret pick another identity federated with the same ServiceAccount). `AZURE_AUTHORITY_HOST` overrides the
    /// cloud's authority, as in Azure's SDKs. Flagger's Secret keys.
    pub fn resolve(
        secret: impl Fn(&str) -> Option<String>,
        env: impl Fn(&str) -> Option<String>,
        (authority, audience): (&str, &str),
    ) -> Result<Self, String> {
        let authority = env("AZURE_AUTHORITY_HOST").unwrap_or_else(|| authority.to_owned());
        let authority = format!("{}/", authority.trim_end_matches('/'));
        let scope = format!("{audience}/.default");
        let (client_id, tenant_id) = (secret("clientId"), secret("tenantId"));
        if let Some(client_secret) = secret("clientSecret") {
            let missing = |key: &str| {
                format!(
                    "the Secret has clientSecret but no {key}: a client secret needs clientId and tenantId"
                )
            };
            return Ok(Self {
                authority,
                tenant_id: tenant_id.ok_or_else(|| missing("tenantId"))?,
                client_id: client_id.ok_or_else(|| missing("clientId"))?,
                secret: EntraSecret::ClientSecret(client_secret),
                scope,
            });
        }
        let not_configured = |what: &str| {
            format!(
                "no Entra ID credential: the Secret has no clientSecret, and the operator has no workload identity \
                 ({what} is not set; label the operator's pods azure.workload.identity/use: \"true\" and annotate \
                 its ServiceAccount with azure.workload.identity/client-id)"
            )
        };
        let token_file = env("AZURE_FEDERATED_TOKEN_FILE")
            .ok_or_else(|| not_configured("AZURE_FEDERATED_TOKEN_FILE"))?;
        Ok(Self {
            authority,
            tenant_id: tenant_id
                .or_else(|| env("AZURE_TENANT_ID"))
                .ok_or_else(|| not_configured("AZURE_TENANT_ID"))?,
            client_id: client_id
                .or_else(|| env("AZURE_CLIENT_ID"))
                .ok_or_else(|| not_configured("AZURE_CLIENT_ID"))?,
            secret: EntraSecret::FederatedTokenFile(PathBuf::from(token_file)),
            scope,
        })
    }
}

/// Entra ID's token response (the fields Sluice reads).
#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    expires_in: u64,
}

/// Entra ID's error response.
#[derive(Deserialize)]
struct TokenError {
    error: String,
    #[serde(default)]
    error_description: String,
}

/// Access tokens for one credential, fetched when needed and cached until shortly before they expire.
pub struct EntraToken {
    http: reqwest::Client,
    credential: EntraCredential,
    cached: tokio::sync::Mutex<Option<(String, Instant)>>,
}

impl std::fmt::Debug for EntraToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EntraToken")
            .field("credential", &self.credential)
            .finish_non_exhaustive()
    }
}

impl EntraToken {
    pub fn new(credential: EntraCredential, timeout: Duration) -> Result<Self, ProviderError> {
        super::install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|e| ProviderError::HttpClient {
                reason: error_chain(&e),
            })?;
        Ok(Self {
            http,
            credential,
            cached: tokio::sync::Mutex::new(None),
        })
    }

    /// A valid access token, from the cache or a new exchange.
    pub async fn access_token(&self) -> Result<String, ProviderError> {
        let mut cached = self.cached.lock().await;
        if let Some((token, renew_at)) = cached.as_ref()
            && Instant::now() < *renew_at
        {
            return Ok(token.clone());
        }
        let (token, lifetime) = self.exchange().await?;
        let renew_at = Instant::now() + lifetime.saturating_sub(RENEW_BEFORE).max(lifetime / 2);
        *cached = Some((token.clone(), renew_at));
        Ok(token)
    }

    /// Forgets the cached token (the server refused it: revoked, or its role assignment changed).
    pub async fn forget(&self) {
        *self.cached.lock().await = None;
    }

    async fn exchange(&self) -> Result<(String, Duration), ProviderError> {
        let credential = &self.credential;
        let url = format!(
            "{}{}/oauth2/v2.0/token",
            credential.authority, credential.tenant_id
        );
        let failed = |reason: String| ProviderError::Token {
            url: url.clone(),
            reason,
        };
        let mut form = vec![
            ("grant_type", "client_credentials".to_owned()),
            ("client_id", credential.client_id.clone()),
            ("scope", credential.scope.clone()),
        ];
        match &credential.secret {
            EntraSecret::ClientSecret(secret) => form.push(("client_secret", secret.clone())),
            EntraSecret::FederatedTokenFile(path) => {
                let assertion = std::fs::read_to_string(path).map_err(|e| {
                    failed(format!(
                        "cannot read the federated token {}: {e}",
                        path.display()
                    ))
                })?;
                form.push((
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".to_owned(),
                ));
                form.push(("client_assertion", assertion.trim().to_owned()));
            }
        }
        let body = reqwest::Url::parse_with_params("http://form.invalid/", &form)
            .map_err(|e| failed(e.to_string()))?
            .query()
            .unwrap_or_default()
            .to_owned();
        let response = self
            .http
            .post(&url)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body)
            .send()
            .await
            .map_err(|e| failed(error_chain(&e)))?;
        let status = response.status();
        let text = response.text().await.map_err(|e| failed(error_chain(&e)))?;
        if !status.is_success() {
            let reason = serde_json::from_str::<TokenError>(&text).map_or_else(
                |_| {
                    format!(
                        "HTTP {status}: {}",
                        text.chars().take(300).collect::<String>()
                    )
                },
                |e| format!("{}: {}", e.error, e.error_description),
            );
            return Err(failed(reason));
        }
        let token: TokenResponse = serde_json::from_str(&text)
            .map_err(|e| failed(format!("not a token response: {e}")))?;
        Ok((token.access_token, Duration::from_secs(token.expires_in)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const PUBLIC: (&str, &str) = (
        "https://login.microsoftonline.com/",
        "https://prometheus.monitor.azure.com",
    );

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |key| map.get(key).cloned()
    }

    #[test]
    fn debug_output_hides_secrets() {
        let credential = EntraCredential {
            authority: "https://login.microsoftonline.com/".into(),
            tenant_id: "t".into(),
            client_id: "c".into(),
            secret: EntraSecret::ClientSecret("hunter2".into()),
            scope: "s".into(),
        };
        let token = EntraToken::new(credential, Duration::from_secs(1));
        let shown = format!("{token:?}");
        assert!(
            shown.contains("<redacted>") && !shown.contains("hunter2"),
            "{shown}"
        );
    }

    #[test]
    fn the_cloud_follows_the_workspace_host() {
        assert_eq!(
            azure_cloud("https://ws-1a2b.eastus.prometheus.monitor.azure.com"),
            Ok(PUBLIC)
        );
        assert_eq!(
            azure_cloud("https://ws.usgovvirginia.prometheus.monitor.azure.us/").map(|c| c.1),
            Ok("https://prometheus.monitor.azure.us")
        );
        assert_eq!(
            azure_cloud("https://WS.chinanorth3.prometheus.monitor.azure.cn").map(|c| c.0),
            Ok("https://login.chinacloudapi.cn/")
        );
        assert!(
            azure_cloud("http://ws.eastus.prometheus.monitor.azure.com")
                .is_err_and(|e| e.contains("https"))
        );
        assert!(
            azure_cloud("https://prometheus.example.com")
                .is_err_and(|e| e.contains("not an Azure Monitor workspace"))
        );
        assert!(azure_cloud("https://evil.com/.prometheus.monitor.azure.com").is_err());
    }

    #[test]
    fn a_client_secret_wins_and_needs_its_ids() {
        let workload = lookup(&[
            ("AZURE_FEDERATED_TOKEN_FILE", "/var/run/token"),
            ("AZURE_CLIENT_ID", "pod-client"),
            ("AZURE_TENANT_ID", "pod-tenant"),
        ]);
        let secret = lookup(&[("clientId", "c"), ("tenantId", "t"), ("clientSecret", "s")]);
        assert_eq!(
            EntraCredential::resolve(secret, &workload, PUBLIC),
            Ok(EntraCredential {
                authority: "https://login.microsoftonline.com/".into(),
                tenant_id: "t".into(),
                client_id: "c".into(),
                secret: EntraSecret::ClientSecret("s".into()),
                scope: "https://prometheus.monitor.azure.com/.default".into(),
            })
        );
        let no_tenant = lookup(&[("clientId", "c"), ("clientSecret", "s")]);
        assert!(
            EntraCredential::resolve(no_tenant, &workload, PUBLIC)
                .is_err_and(|e| e.contains("no tenantId"))
        );
    }

    #[test]
    fn the_workload_identity_comes_from_the_pod_unless_the_secret_names_another() {
        let workload = lookup(&[
            ("AZURE_FEDERATED_TOKEN_FILE", "/var/run/token"),
            ("AZURE_CLIENT_ID", "pod-client"),
            ("AZURE_TENANT_ID", "pod-tenant"),
            ("AZURE_AUTHORITY_HOST", "https://login.example.net"),
        ]);
        let pod = EntraCredential::resolve(lookup(&[]), &workload, PUBLIC);
        assert!(pod.as_ref().is_ok_and(|c| c.client_id == "pod-client"
            && c.tenant_id == "pod-tenant"
            && c.authority == "https://login.example.net/"
            && c.secret == EntraSecret::FederatedTokenFile("/var/run/token".into())));
        let other = EntraCredential::resolve(lookup(&[("clientId", "other")]), &workload, PUBLIC);
        assert!(other.is_ok_and(|c| c.client_id == "other" && c.tenant_id == "pod-tenant"));
        let nothing = EntraCredential::resolve(lookup(&[]), lookup(&[]), PUBLIC);
        assert!(
            nothing.is_err_and(|e| e.contains("AZURE_FEDERATED_TOKEN_FILE is not set")
                && e.contains("azure.workload.identity/use"))
        );
    }
}
