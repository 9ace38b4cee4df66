//! The gRPC front end: `envoy.service.auth.v3.Authorization/Check`, as OPA-Envoy serves it.

use std::sync::Arc;

use envoy_types::ext_authz::v3::pb::{Authorization, CheckRequest, CheckResponse};
use tonic::{Request, Response, Status};

use super::input::policy_input;
use super::response::{
    ResponseOptions, check_response, error_check_response, input_error_response,
};
use super::{Authorizer, Verdict};

/// Envoy's Authorization service backed by an [`Authorizer`].
pub struct CheckService {
    pub authorizer: Arc<Authorizer>,
}

/// The CheckResponse for a verdict.
pub fn grpc_response(verdict: Verdict) -> Result<CheckResponse, Status> {
    match verdict {
        // An RPC error lets Envoy's failure_mode_allow / status_on_error decide, as for a down server.
        Verdict::NotReady => Err(Status::unavailable("no policy bundle is active yet")),
        Verdict::BadRequest(err) => Ok(input_error_response(&err)),
        Verdict::Decided {
            decision,
            dry_run,
            decision_id,
        } => Ok(check_response(
            &decision,
            &ResponseOptions {
                dry_run,
                decision_id: Some(&decision_id),
            },
        )),
        Verdict::Failed {
            error, fail_open, ..
        } => Ok(error_check_response(&error, fail_open)),
    }
}

#[tonic::async_trait]
impl Authorization for CheckService {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let request = request.into_inner();
        let path = request
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref())
            .map(|h| h.path.as_str())
            .unwrap_or_default();
        let verdict = self
            .authorizer
            .check(path, |options| policy_input(&request, options));
        grpc_response(verdict).map(Response::new)
    }
}
