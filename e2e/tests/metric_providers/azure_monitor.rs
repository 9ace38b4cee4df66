//! Sluice's Azure Monitor provider: Entra ID tokens (client secret, or workload identity's federated token file)
//! on PromQL queries. Entra ID's token endpoint is played by a loopback stand-in following its documented
//! request and response shapes (`POST /{tenant}/oauth2/v2.0/token`, form-encoded, `{"access_token",
//! "expires_in"}` back, `{"error", "error_description"}` on refusal); the workspace is a real Prometheus behind a
//! loopback proxy that wants the token. There is no Entra ID or Azure Monitor to run here, and the check that
//! only Azure Monitor hosts get a token (`azure_cloud`) is unit-tested, since these endpoints are loopback.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};
use sluice::metrics::{
    EntraCredential, EntraSecret, EntraToken, Prometheus, ProviderError, ServerAccess,
};
use sluice_e2e::prometheus::PrometheusServer;

const TENANT: &str = "72f988bf-0000-0000-0000-2d7cd011db47";
const CLIENT: &str = "sluice-app";
const SCOPE: &str = "https://prometheus.monitor.azure.com/.default";

#[derive(Default)]
struct Entra {
    /// The client secret or federated token Entra ID accepts now.
    accepted: Mutex<String>,
    /// Tokens issued, the last one the only valid one.
    issued: Mutex<Vec<String>>,
    revoked: Mutex<bool>,
    prometheus: Mutex<String>,
}

async fn token(
    State(entra): State<Arc<Entra>>,
    Path(tenant): Path<String>,
    body: String,
) -> (StatusCode, axum::Json<Value>) {
    let form: BTreeMap<String, String> = reqwest::Url::parse(&format!("http://x/?{body}"))
        .map(|u| u.query_pairs().into_owned().collect())
        .unwrap_or_default();
    let field = |name: &str| form.get(name).cloned().unwrap_or_default();
    let accepted = entra.accepted.lock().map(|a| a.clone()).unwrap_or_default();
    let proof = if form.contains_key("client_secret") {
        field("client_secret")
    } else if field("client_assertion_type")
        == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    {
        field("client_assertion")
    } else {
        String::new()
    };
    if tenant != TENANT
        || field("grant_type") != "client_credentials"
        || field("client_id") != CLIENT
        || field("scope") != SCOPE
        || proof != accepted
    {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"error": "invalid_client",
                "error_description": "AADSTS7000215: Invalid client secret provided."})),
        );
    }
    let mut issued = entra.issued.lock().unwrap_or_else(|e| e.into_inner());
    let access_token = format!("eyJ0eXAi.token-{}", issued.len() + 1);
    issued.push(access_token.clone());
    if let Ok(mut revoked) = entra.revoked.lock() {
        *revoked = false;
    }
    (
        StatusCode::OK,
        axum::Json(
            json!({"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599,
                          "access_token": access_token}),
        ),
    )
}

/// The workspace: the real Prometheus, for a request bearing the last token issued (unless revoked).
async fn workspace(
    State(entra): State<Arc<Entra>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> (
    StatusCode,
    [(axum::http::header::HeaderName, &'static str); 1],
    String,
) {
    let json = [(axum::http::header::CONTENT_TYPE, "application/json")];
    let last = entra.issued.lock().ok().and_then(|i| i.last().cloned());
    let revoked = entra.revoked.lock().map(|r| *r).unwrap_or(true);
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if revoked || last.is_none() || bearer != last.map(|t| format!("Bearer {t}")) {
        return (
            StatusCode::UNAUTHORIZED,
            json,
            "{\"error\":\"InvalidToken\"}".into(),
        );
    }
    let prometheus = entra
        .prometheus
        .lock()
        .map(|p| p.clone())
        .unwrap_or_default();
    let url = format!("{prometheus}/api/v1/query?{}", query.unwrap_or_default());
    match reqwest::get(url).await {
        Ok(response) => (
            StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY),
            json,
            response.text().await.unwrap_or_default(),
        ),
        Err(e) => (StatusCode::BAD_GATEWAY, json, e.to_string()),
    }
}

async fn start(entra: Arc<Entra>) -> SocketAddr {
    let app = axum::Router::new()
        .route("/{tenant}/oauth2/v2.0/token", axum::routing::post(token))
        .route(
            "/api/v1/query",
            axum::routing::get(workspace).post(workspace),
        )
        .with_state(entra);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a free loopback port");
    let addr = listener.local_addr().expect("bound address");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

fn workspace_client(addr: SocketAddr, secret: EntraSecret) -> Prometheus {
    let credential = EntraCredential {
        authority: format!("http://{addr}/"),
        tenant_id: TENANT.into(),
        client_id: CLIENT.into(),
        secret,
        scope: SCOPE.into(),
    };
    let token = EntraToken::new(credential, Duration::from_secs(5)).expect("a token source");
    Prometheus::with_entra_token(
        &format!("http://{addr}"),
        Duration::from_secs(5),
        &ServerAccess::default(),
        token,
    )
    .expect("a workspace client")
}

async fn setup() -> (PrometheusServer, Arc<Entra>, SocketAddr) {
    let prometheus = PrometheusServer::start(&[])
        .await
        .expect("Prometheus starts");
    let entra = Arc::new(Entra::default());
    if let Ok(mut url) = entra.prometheus.lock() {
        *url = prometheus.url();
    }
    let addr = start(entra.clone()).await;
    (prometheus, entra, addr)
}

fn issued(entra: &Entra) -> usize {
    entra.issued.lock().map(|i| i.len()).unwrap_or_default()
}

#[tokio::test]
async fn a_client_secret_token_is_cached_and_renewed_when_refused() {
    let (_prometheus, entra, addr) = setup().await;
    if let Ok(mut accepted) = entra.accepted.lock() {
        *accepted = "s3cret".into();
    }
    let workspace = workspace_client(addr, EntraSecret::ClientSecret("s3cret".into()));
    for _ in 0..3 {
        let first = workspace.instant("vector(42)").await;
        assert!(matches!(first, Ok(Some(42.0))), "{first:?}");
    }
    assert_eq!(issued(&entra), 1, "one token for three queries");

    // Revoked (or its role removed): that check fails as a credentials problem, the next gets a new token.
    if let Ok(mut revoked) = entra.revoked.lock() {
        *revoked = true;
    }
    let refused = workspace.instant("vector(42)").await;
    assert!(
        matches!(
            refused,
            Err(ProviderError::Unauthorized { status: 401, .. })
        ),
        "{refused:?}"
    );
    assert_eq!(workspace.instant("vector(42)").await.ok(), Some(Some(42.0)));
    assert_eq!(issued(&entra), 2);

    let wrong = workspace_client(addr, EntraSecret::ClientSecret("old".into()))
        .instant("vector(42)")
        .await;
    assert!(
        matches!(&wrong, Err(ProviderError::Token { reason, .. })
            if reason.contains("invalid_client") && reason.contains("AADSTS7000215")),
        "{wrong:?}"
    );
    let message = wrong.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("Monitoring Data Reader"), "{message}");
}

#[tokio::test]
async fn a_workload_identity_reads_its_rotated_token_file_at_each_exchange() {
    let (_prometheus, entra, addr) = setup().await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let file = dir.path().join("azure-identity-token");
    std::fs::write(&file, "jwt-from-kubelet-1\n").expect("token file written");
    if let Ok(mut accepted) = entra.accepted.lock() {
        *accepted = "jwt-from-kubelet-1".into();
    }
    let workspace = workspace_client(addr, EntraSecret::FederatedTokenFile(file.clone()));
    assert_eq!(workspace.instant("vector(7)").await.ok(), Some(Some(7.0)));

    // The kubelet rotates the projected token; Entra ID accepts only the new one from now on.
    std::fs::write(&file, "jwt-from-kubelet-2\n").expect("token file rotated");
    if let Ok(mut accepted) = entra.accepted.lock() {
        *accepted = "jwt-from-kubelet-2".into();
    }
    if let Ok(mut revoked) = entra.revoked.lock() {
        *revoked = true;
    }
    assert!(workspace.instant("vector(7)").await.is_err());
    assert_eq!(workspace.instant("vector(7)").await.ok(), Some(Some(7.0)));
    assert_eq!(issued(&entra), 2);

    std::fs::remove_file(&file).expect("token file removed");
    if let Ok(mut revoked) = entra.revoked.lock() {
        *revoked = true;
    }
    let _ = workspace.instant("vector(7)").await;
    let missing = workspace.instant("vector(7)").await;
    assert!(
        matches!(&missing, Err(ProviderError::Token { reason, .. }) if reason.contains("cannot read the federated token")),
        "{missing:?}"
    );
}
