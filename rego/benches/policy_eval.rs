//! Decision latency/throughput of the OPA-Envoy example policy on each regorus evaluation path.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::{EncodingKey, Header, encode};
use regorus::languages::rego::compiler::Compiler;
use regorus::rvm::vm::RegoVM;
use regorus::{Rc, Value};
use serde_json::json;
use sluice_rego::Module;
use sluice_rego::engine::{Limits, PolicyEngine};

const POLICY: &str = r#"package envoy.authz

import input.attributes.request.http as http_request

default allow := false

allow if {
    is_token_valid
    action_allowed
}

is_token_valid if {
    now := time.now_ns() / 1000000000
    token.payload.nbf <= now
    now < token.payload.exp
}

action_allowed if {
    http_request.method == "GET"
    token.payload.role == "guest"
    glob.match("/people/*", ["/"], http_request.path)
}

action_allowed if {
    http_request.method == "GET"
    token.payload.role == "admin"
    glob.match("/people/*", ["/"], http_request.path)
}

action_allowed if {
    http_request.method == "POST"
    token.payload.role == "admin"
    glob.match("/people", ["/"], http_request.path)
    lower(input.parsed_body.firstname) != base64url.decode(token.payload.sub)
}

token := {"payload": payload} if {
    [_, encoded] := split(http_request.headers.authorization, " ")
    [_, payload, _] := io.jwt.decode(encoded)
}
"#;

/// Same decision logic with the role taken from a header (no extension), to let the RVM run.
const POLICY_NO_JWT: &str = r#"package envoy.authz

import input.attributes.request.http as http_request

default allow := false

allow if {
    action_allowed
}

action_allowed if {
    http_request.method == "GET"
    http_request.headers["x-role"] == "guest"
    glob.match("/people/*", ["/"], http_request.path)
}

action_allowed if {
    http_request.method == "GET"
    http_request.headers["x-role"] == "admin"
    glob.match("/people/*", ["/"], http_request.path)
}
"#;

fn input() -> serde_json::Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let claims = json!({"sub": "YWxpY2U=", "role": "guest", "nbf": now - 60, "exp": now + 3600, "iss": "idp"});
    let jwt = encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(b"secret"),
    )
    .unwrap_or_default();
    json!({
        "attributes": {
            "source": {"address": {"socketAddress": {"address": "10.0.3.17", "portValue": 43102}},
                       "principal": "spiffe://cluster.local/ns/default/sa/frontend"},
            "destination": {"address": {"socketAddress": {"address": "10.0.5.2", "portValue": 8080}},
                            "principal": "spiffe://cluster.local/ns/default/sa/people"},
            "request": {"time": "2024-05-01T10:00:00Z", "http": {
                "id": "1386745463939425", "method": "GET", "path": "/people/alice?verbose=true",
                "host": "people.default.svc:8080", "scheme": "http", "protocol": "HTTP/1.1",
                "headers": {
                    ":authority": "people.default.svc:8080", ":method": "GET", ":path": "/people/alice?verbose=true",
                    "accept": "application/json", "authorization": format!("Bearer {jwt}"),
                    "user-agent": "curl/8.5.0", "x-request-id": "0b7e6c0c-6a57-4b0f-9d2a-4b2a1f1c7d3e",
                    "x-forwarded-proto": "http", "x-role": "guest", "x-b3-traceid": "80f198ee56343ba864fe8b2a57d3eff7"
                }
            }}
        },
        "parsed_path": ["people", "alice"],
        "parsed_query": {"verbose": ["true"]},
        "parsed_body": null,
        "truncated_body": false
    })
}

const ITERS: u32 = 20_000;

/// Run `f` ITERS times on each of `threads` threads (each with its own state); print figures.
fn measure<S: Send>(
    label: &str,
    threads: usize,
    mk: impl Fn() -> S + Sync,
    f: impl Fn(&mut S) + Sync,
) {
    let start = Instant::now();
    let per_thread: Vec<Duration> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut state = mk();
                    for _ in 0..500 {
                        f(&mut state); // warm-up
                    }
                    let t = Instant::now();
                    for _ in 0..ITERS {
                        f(&mut state);
                    }
                    t.elapsed()
                })
            })
            .collect();
        hs.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    let _ = start;
    let avg = per_thread.iter().sum::<Duration>() / threads as u32;
    let us = avg.as_secs_f64() * 1e6 / f64::from(ITERS);
    let total = threads as f64 * f64::from(ITERS)
        / per_thread
            .iter()
            .max()
            .copied()
            .unwrap_or(avg)
            .as_secs_f64();
    println!("{label:<48} {threads} thr  {us:>8.2} µs/decision  {total:>10.0} decisions/s");
}

fn main() {
    let json_input = input();
    let value_input = Value::from(json_input.clone());
    let query = "data.envoy.authz.allow";
    let modules = [Module {
        path: "envoy/authz.rego".into(),
        source: POLICY.into(),
    }];
    let engine = match PolicyEngine::compile(&modules, &json!({}), Limits::default()) {
        Ok(e) => e,
        Err(e) => return eprintln!("compile failed: {e}"),
    };
    {
        let mut e = engine.clone();
        assert_eq!(
            e.eval_value(query, value_input.clone()).ok().flatten(),
            Some(Value::from(true)),
            "policy must allow"
        );
        assert_eq!(e.eval(query, &json_input).ok().flatten(), Some(json!(true)));
    }

    for threads in [1, 2] {
        measure(
            "PolicyEngine::eval_value (eval_rule, Value in)",
            threads,
            || engine.clone(),
            |e| {
                black_box(e.eval_value(query, black_box(value_input.clone())).ok());
            },
        );
        measure(
            "PolicyEngine::eval (eval_query, serde in/out)",
            threads,
            || engine.clone(),
            |e| {
                black_box(e.eval(query, black_box(&json_input)).ok());
            },
        );
        measure(
            "regorus eval_query (Value in)",
            threads,
            || engine.clone(),
            |e| {
                let raw = e.raw_engine();
                raw.set_input(black_box(value_input.clone()));
                black_box(raw.eval_query(query.to_string(), false).ok());
            },
        );
        measure(
            "serde_json -> regorus::Value input conversion",
            threads,
            || (),
            |_| {
                black_box(Value::from(black_box(json_input.clone())));
            },
        );
    }

    // CompiledPolicy: regorus' "compile once, eval_with_input" path (builds an Engine per call).
    let compiled = engine
        .clone()
        .raw_engine()
        .compile_with_entrypoint(&Rc::from(query));
    match compiled {
        Ok(policy) => {
            let ok = policy.eval_with_input(value_input.clone());
            println!("CompiledPolicy result: {ok:?}");
            for threads in [1, 2] {
                measure(
                    "CompiledPolicy::eval_with_input",
                    threads,
                    || policy.clone(),
                    |p| {
                        black_box(p.eval_with_input(black_box(value_input.clone())).ok());
                    },
                );
            }
            match Compiler::compile_from_policy(&policy, &[query]) {
                Ok(_) => println!("RVM accepted the JWT policy (unexpected)"),
                Err(e) => println!("RVM rejects the JWT policy: {e}"),
            }
        }
        Err(e) => println!("CompiledPolicy rejected: {e}"),
    }

    // RVM on the extension-free variant (regorus' RVM cannot call host extensions).
    let modules = [Module {
        path: "envoy/authz.rego".into(),
        source: POLICY_NO_JWT.into(),
    }];
    let Ok(plain) = PolicyEngine::compile(&modules, &json!({}), Limits::default()) else {
        return;
    };
    for threads in [1, 2] {
        measure(
            "no-JWT variant: PolicyEngine::eval_value",
            threads,
            || plain.clone(),
            |e| {
                black_box(e.eval_value(query, black_box(value_input.clone())).ok());
            },
        );
    }
    let program = plain
        .clone()
        .raw_engine()
        .compile_with_entrypoint(&Rc::from(query))
        .map_err(|e| e.to_string())
        .and_then(|p| Compiler::compile_from_policy(&p, &[query]).map_err(|e| e.to_string()));
    match program {
        Ok(program) => {
            let mk = || {
                let mut vm = RegoVM::new();
                vm.load_program(Arc::clone(&program));
                vm.set_strict_builtin_errors(false);
                vm.set_max_instructions(1_000_000);
                vm
            };
            let mut vm = mk();
            vm.set_input(value_input.clone());
            println!("RVM result (no-JWT variant): {:?}", vm.execute());
            for threads in [1, 2] {
                measure("no-JWT variant: RVM execute", threads, mk, |vm| {
                    vm.set_input(black_box(value_input.clone()));
                    black_box(vm.execute().ok());
                });
            }
        }
        Err(e) => println!("RVM rejects the no-JWT variant: {e}"),
    }
}
