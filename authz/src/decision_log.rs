//! Decision logs of `sluice authz`: one JSON line per decision, with sensitive headers masked, rate-limited
//! and handed to a writer task through a bounded queue so logging can never slow the request path.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use serde_json::Value;
use tokio::sync::mpsc;

/// Headers masked by default: credentials that must not reach logs.
pub const DEFAULT_MASKED_HEADERS: &[&str] = &["authorization", "proxy-authorization", "cookie"];

/// Replacement for masked values.
pub const MASK: &str = "***";

/// Replaces the values of `masked` headers (lower-case names) in an OPA-Envoy input, in place.
pub fn mask_headers(input: &mut Value, masked: &[String]) {
    if let Some(headers) = input
        .pointer_mut("/attributes/request/http/headers")
        .and_then(Value::as_object_mut)
    {
        for (name, value) in headers.iter_mut() {
            if masked.iter().any(|m| m.eq_ignore_ascii_case(name)) {
                *value = Value::String(MASK.to_owned());
            }
        }
    }
}

/// A token bucket: at most `per_second` decisions logged per second, with bursts up to that many.
pub struct RateLimiter {
    per_second: f64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    pub fn new(per_second: u32) -> Self {
        let per_second = f64::from(per_second);
        RateLimiter {
            per_second,
            state: Mutex::new((per_second, Instant::now())),
        }
    }

    /// Takes a token if one is available at `now`.
    pub fn allow_at(&self, now: Instant) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, last) = &mut *state;
        let refill = now.saturating_duration_since(*last).as_secs_f64() * self.per_second;
        *tokens = (*tokens + refill).min(self.per_second);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// One decision, as logged.
#[derive(Debug)]
pub struct DecisionRecord {
    pub decision_id: String,
    pub revision: String,
    pub query: String,
    pub path: String,
    pub input: Value,
    pub result: Option<Value>,
    pub allowed: bool,
    pub dry_run: bool,
    pub error: Option<String>,
    pub latency: Duration,
}

impl DecisionRecord {
    pub fn to_json_line(&self, timestamp: jiff::Timestamp) -> String {
        let mut line = serde_json::json!({
            "timestamp": timestamp.to_string(),
            "decision_id": self.decision_id,
            "revision": self.revision,
            "query": self.query,
            "path": self.path,
            "input": self.input,
            "result": self.result,
            "allowed": self.allowed,
            "dry_run": self.dry_run,
            "latency_us": u64::try_from(self.latency.as_micros()).unwrap_or(u64::MAX),
        });
        if let (Some(error), Some(object)) = (&self.error, line.as_object_mut()) {
            object.insert("error".into(), Value::String(error.clone()));
        }
        line.to_string()
    }
}

/// Where decision records go: sampled by the rate limiter, queued without blocking, written by a task.
pub struct DecisionLog {
    limiter: RateLimiter,
    masked: Vec<String>,
    queue: mpsc::Sender<DecisionRecord>,
    dropped: Counter,
}

impl DecisionLog {
    /// A log that writes lines to `sink` from its own task, at most `per_second` lines per second;
    /// decisions left out are counted in `dropped`.
    pub fn spawn<W>(per_second: u32, masked: Vec<String>, mut sink: W, dropped: Counter) -> Self
    where
        W: std::io::Write + Send + 'static,
    {
        let (queue, mut records) = mpsc::channel::<DecisionRecord>(1024);
        tokio::task::spawn_blocking(move || {
            while let Some(record) = records.blocking_recv() {
                let line = record.to_json_line(jiff::Timestamp::now());
                if writeln!(sink, "{line}").is_err() {
                    break;
                }
            }
        });
        DecisionLog {
            limiter: RateLimiter::new(per_second),
            masked: masked.into_iter().map(|m| m.to_ascii_lowercase()).collect(),
            queue,
            dropped,
        }
    }

    /// Whether the next decision should be logged; call before building its record.
    pub fn sample(&self) -> bool {
        let sampled = self.limiter.allow_at(Instant::now());
        if !sampled {
            self.dropped.inc();
        }
        sampled
    }

    /// Queues a sampled record; a full queue drops it (counted) rather than waiting.
    pub fn record(&self, mut record: DecisionRecord) {
        mask_headers(&mut record.input, &self.masked);
        if self.queue.try_send(record).is_err() {
            self.dropped.inc();
        }
    }

    /// Decisions not logged because of the rate limit or a full queue.
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn masks_configured_headers_case_insensitively() {
        let mut input = json!({"attributes": {"request": {"http": {"headers": {
            "authorization": "Bearer secret",
            "cookie": "session=1",
            "x-user": "alice",
        }}}}});
        mask_headers(&mut input, &["Authorization".into(), "cookie".into()]);
        let headers = &input["attributes"]["request"]["http"]["headers"];
        assert_eq!(headers["authorization"], MASK);
        assert_eq!(headers["cookie"], MASK);
        assert_eq!(headers["x-user"], "alice");
        // Inputs without headers are left alone.
        let mut bare = json!({"attributes": {}});
        mask_headers(&mut bare, &["authorization".into()]);
        assert_eq!(bare, json!({"attributes": {}}));
    }

    #[test]
    fn rate_limiter_allows_a_burst_then_refills() {
        let limiter = RateLimiter::new(3);
        let start = Instant::now();
        let allowed = (0..10).filter(|_| limiter.allow_at(start)).count();
        assert_eq!(allowed, 3);
        assert!(!limiter.allow_at(start + Duration::from_millis(100)));
        assert!(limiter.allow_at(start + Duration::from_millis(400)));
        // Refill never exceeds the burst.
        let later = start + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| limiter.allow_at(later)).count(), 3);
    }

    #[test]
    fn a_record_is_one_json_line_with_latency_in_microseconds() {
        let record = DecisionRecord {
            decision_id: "d-1".into(),
            revision: "r1".into(),
            query: "data.envoy.authz.allow".into(),
            path: "/api?x=1".into(),
            input: json!({"a": 1}),
            result: Some(json!(true)),
            allowed: true,
            dry_run: false,
            error: None,
            latency: Duration::from_micros(42),
        };
        let line = record.to_json_line(jiff::Timestamp::UNIX_EPOCH);
        assert!(!line.contains('\n'));
        let parsed: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(parsed["latency_us"], 42);
        assert_eq!(parsed["revision"], "r1");
        assert_eq!(parsed["result"], true);
        assert!(parsed.get("error").is_none());
    }

    #[tokio::test]
    async fn records_are_masked_written_and_overflow_is_counted() {
        #[derive(Clone, Default)]
        struct Shared(std::sync::Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Shared {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Shared::default();
        let log = DecisionLog::spawn(
            2,
            vec!["authorization".into()],
            sink.clone(),
            Counter::default(),
        );
        for i in 0..5 {
            if log.sample() {
                log.record(DecisionRecord {
                    decision_id: format!("d-{i}"),
                    revision: "r1".into(),
                    query: "q".into(),
                    path: "/".into(),
                    input: json!({"attributes": {"request": {"http": {"headers": {"authorization": "Bearer x"}}}}}),
                    result: None,
                    allowed: false,
                    dry_run: false,
                    error: None,
                    latency: Duration::ZERO,
                });
            }
        }
        assert_eq!(log.dropped(), 3);
        let mut text = String::new();
        for _ in 0..100 {
            text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
            if text.lines().count() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(!text.contains("Bearer"), "{text}");
    }
}
