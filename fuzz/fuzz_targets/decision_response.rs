//! Policy result → gRPC CheckResponse and HTTP verdict. Invariants: no panic; the gRPC code is OK
//! exactly when the request is allowed; an HTTP-mode denial is never answered 200, 1xx or 5xx; an
//! HTTP-mode allow is always 200; dry-run allows everything.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use sluice_authz::response::{
    Decision, GRPC_OK, GRPC_PERMISSION_DENIED, ResponseOptions, check_response, http_verdict,
};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, json)) = data.split_first() else {
        return;
    };
    let Ok(result) = serde_json::from_slice::<Value>(json) else {
        return;
    };
    let Ok(decision) = Decision::from_result(Some(&result)) else {
        return;
    };
    let options = ResponseOptions {
        dry_run: flags & 1 == 1,
        decision_id: (flags & 2 == 2).then_some("fuzz"),
    };
    let allowed = decision.allowed() || options.dry_run;
    let grpc = check_response(&decision, &options);
    let code = grpc.status.as_ref().map(|s| s.code);
    assert_eq!(
        code,
        Some(if allowed { GRPC_OK } else { GRPC_PERMISSION_DENIED })
    );
    let http = http_verdict(&decision, &options);
    assert_eq!(http.allowed, allowed);
    if allowed {
        assert_eq!(http.status, 200);
    } else {
        assert!(
            http.status != 200 && !(100..200).contains(&http.status) && http.status < 500,
            "denial answered {}",
            http.status
        );
    }
});
