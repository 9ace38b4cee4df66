//! The operator's one way to the API server: every request of every controller passes one client-side rate
//! limit, which serves the writes that move a release (status, route weights, scale) before everything else.
//!
//! Without it, 10,000 Rollouts starting at once queue their status writes behind each other's Service
//! applies and cache fallbacks, and the API server sees a burst it may throttle (APF) in arbitrary order.
//! Watches are long-running and never limited; Lease renewals neither (a throttled renewal would lose the
//! leadership).

use std::task::{Context, Poll};
use std::time::Duration;

use http::{Method, Request};
use kube::client::Body;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tower::buffer::Buffer;
use tower::{BoxError, Layer, Service, ServiceExt};

/// How a request is queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    /// Status, route and scale writes: what moves (or stops) a release.
    Urgent,
    /// Everything else that is not a watch: reads the caches cannot answer, Services, primaries, Events.
    Normal,
    /// Watches and Leases.
    Unlimited,
}

/// Route resources whose writes shift traffic.
const ROUTES: [&str; 4] = [
    "virtualservices",
    "httproutes",
    "trafficsplits",
    "servicesplitters",
];

/// The priority of a request, from its method and URL alone.
pub fn priority(method: &Method, path: &str, query: Option<&str>) -> Priority {
    let watch = query.is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    if watch || segments.contains(&"leases") {
        return Priority::Unlimited;
    }
    let write = !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    let subresource = segments.last().copied();
    let moves_traffic = matches!(subresource, Some("status" | "scale"))
        || segments.iter().any(|s| ROUTES.contains(s));
    if write && moves_traffic {
        Priority::Urgent
    } else {
        Priority::Normal
    }
}

/// A token bucket (`qps`, up to `burst` at once) that hands its tokens to urgent requests first.
#[derive(Clone)]
pub struct Limiter {
    urgent: mpsc::UnboundedSender<oneshot::Sender<()>>,
    normal: mpsc::UnboundedSender<oneshot::Sender<()>>,
}

impl Limiter {
    /// Starts the bucket's dispatcher on the current runtime.
    pub fn new(qps: f64, burst: u32) -> Limiter {
        let (urgent, urgent_rx) = mpsc::unbounded_channel();
        let (normal, normal_rx) = mpsc::unbounded_channel();
        tokio::spawn(dispatch(qps.max(0.1), burst.max(1), urgent_rx, normal_rx));
        Limiter { urgent, normal }
    }

    /// Waits for a token; `Unlimited` returns at once.
    pub async fn acquire(&self, priority: Priority) {
        let queue = match priority {
            Priority::Unlimited => return,
            Priority::Urgent => &self.urgent,
            Priority::Normal => &self.normal,
        };
        let (granted, wait) = oneshot::channel();
        // The dispatcher is gone only when the runtime shuts down: nothing to limit any more.
        if queue.send(granted).is_ok() {
            let _ = wait.await;
        }
    }
}

async fn dispatch(
    qps: f64,
    burst: u32,
    mut urgent: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
    mut normal: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
) {
    let burst = f64::from(burst);
    let mut tokens = burst;
    let mut last = Instant::now();
    loop {
        let now = Instant::now();
        tokens = (tokens + now.duration_since(last).as_secs_f64() * qps).min(burst);
        last = now;
        if tokens < 1.0 {
            tokio::time::sleep(Duration::from_secs_f64((1.0 - tokens) / qps)).await;
            continue;
        }
        // A token is ready: the first urgent waiter takes it, else the first normal one.
        let waiter = tokio::select! {
            biased;
            Some(waiter) = urgent.recv() => waiter,
            Some(waiter) = normal.recv() => waiter,
            else => return,
        };
        // A waiter that gave up (its request was dropped) does not spend the token.
        if waiter.send(()).is_ok() {
            tokens -= 1.0;
        }
    }
}

/// [`Layer`] putting [`Limiter`] in front of the client's stack.
#[derive(Clone)]
pub struct LimitLayer {
    limiter: Limiter,
}

impl LimitLayer {
    pub fn new(limiter: Limiter) -> Self {
        LimitLayer { limiter }
    }
}

impl<S> Layer<S> for LimitLayer
where
    S: Service<Request<Body>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send + Sync,
    S::Response: Send + 'static,
{
    type Service = Limited<S>;

    fn layer(&self, inner: S) -> Limited<S> {
        Limited {
            // The buffer makes the stack cloneable, so a request can wait for its token before it claims the
            // inner service.
            inner: Buffer::new(inner, 1024),
            limiter: self.limiter.clone(),
        }
    }
}

pub struct Limited<S: Service<Request<Body>>> {
    inner: Buffer<Request<Body>, S::Future>,
    limiter: Limiter,
}

impl<S> Service<Request<Body>> for Limited<S>
where
    S: Service<Request<Body>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send + Sync,
    S::Response: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = futures::future::BoxFuture<'static, Result<S::Response, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Readiness is awaited per request, after its token.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let priority = priority(
            request.method(),
            request.uri().path(),
            request.uri().query(),
        );
        let limiter = self.limiter.clone();
        let inner = self.inner.clone();
        Box::pin(async move {
            limiter.acquire(priority).await;
            inner.oneshot(request).await
        })
    }
}

/// A client for `config` whose requests pass `limiter`.
pub fn limited_client(config: kube::Config, limiter: Limiter) -> Result<kube::Client, kube::Error> {
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&LimitLayer::new(limiter))
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_that_move_a_release_are_urgent_and_watches_and_leases_unlimited() {
        let p = |method: Method, path: &str, query: Option<&str>| priority(&method, path, query);
        let status = "/apis/sluice.dev/v1alpha1/namespaces/a/rollouts/web/status";
        assert_eq!(p(Method::PATCH, status, None), Priority::Urgent);
        assert_eq!(p(Method::GET, status, None), Priority::Normal);
        let route = "/apis/networking.istio.io/v1/namespaces/a/virtualservices/web";
        assert_eq!(
            p(Method::PATCH, route, Some("fieldManager=sluice")),
            Priority::Urgent
        );
        assert_eq!(p(Method::GET, route, None), Priority::Normal);
        assert_eq!(
            p(
                Method::PATCH,
                "/apis/apps/v1/namespaces/a/deployments/web/scale",
                None
            ),
            Priority::Urgent
        );
        assert_eq!(
            p(
                Method::PATCH,
                "/api/v1/namespaces/a/services/web-canary",
                None
            ),
            Priority::Normal
        );
        assert_eq!(
            p(
                Method::GET,
                "/apis/apps/v1/deployments",
                Some("watch=true&resourceVersion=1")
            ),
            Priority::Unlimited
        );
        assert_eq!(
            p(Method::GET, "/apis/apps/v1/deployments", Some("limit=500")),
            Priority::Normal
        );
        assert_eq!(
            p(
                Method::PATCH,
                "/apis/coordination.k8s.io/v1/namespaces/sluice-system/leases/sluice-operator",
                None
            ),
            Priority::Unlimited
        );
        // A Service named like a route kind is not a route.
        assert_eq!(
            p(
                Method::PATCH,
                "/api/v1/namespaces/a/services/httproutes-demo",
                None
            ),
            Priority::Normal
        );
    }

    #[tokio::test(start_paused = true)]
    async fn urgent_requests_take_the_tokens_first_and_the_rate_holds() {
        let limiter = Limiter::new(10.0, 1);
        // The burst token goes at once.
        limiter.acquire(Priority::Normal).await;
        let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for (i, priority) in [
            Priority::Normal,
            Priority::Normal,
            Priority::Urgent,
            Priority::Urgent,
        ]
        .into_iter()
        .enumerate()
        {
            let limiter = limiter.clone();
            let order = order.clone();
            tasks.push(tokio::spawn(async move {
                limiter.acquire(priority).await;
                order.lock().unwrap().push((i, priority, started.elapsed()));
            }));
            // Queue them in this order before any token is free.
            tokio::task::yield_now().await;
        }
        for task in tasks {
            task.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        let priorities: Vec<Priority> = order.iter().map(|(_, p, _)| *p).collect();
        assert_eq!(
            priorities,
            vec![
                Priority::Urgent,
                Priority::Urgent,
                Priority::Normal,
                Priority::Normal
            ],
            "{order:?}"
        );
        // Four tokens at 10 per second after the burst: 0.4 s.
        let last = order.last().unwrap().2;
        assert!(
            last >= Duration::from_millis(390) && last <= Duration::from_millis(450),
            "{last:?}"
        );
        let unlimited = Instant::now();
        limiter.acquire(Priority::Unlimited).await;
        assert_eq!(unlimited.elapsed(), Duration::ZERO);
    }
}
