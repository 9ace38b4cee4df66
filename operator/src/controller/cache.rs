//! Watch caches the Rollout controller reads instead of the API server.
//!
//! Each kind a reconcile looks at (target and primary workloads, Services, Namespace labels, the mesh's route)
//! is kept by one cluster-wide watch; a change wakes only the Rollouts it concerns, found through an index by
//! name, so an idle Rollout costs no API request at all. Cached objects are slimmed: no `managedFields`, no
//! last-applied annotation, and workloads without their pod template (its revision is kept instead), which is
//! what keeps the cache of 20,000 Deployments small. Where a write depends on the whole object (the primary is
//! copied from the target's template) or must not repeat on a cache that lags behind Sluice's own last write
//! (a route change, which also resets Consul's sync state), the controller reads the object from the API first.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use futures::channel::mpsc::{UnboundedReceiver, UnboundedSender, unbounded};
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::api::{Api, ApiResource, DynamicObject};
use kube::core::PartialObjectMeta;
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::Value;

use super::workload;
use crate::api::{Rollout, TargetKind};

/// In-memory annotation holding a slimmed workload's template revision (never written to the cluster).
pub const CACHED_REVISION: &str = "cache.sluice.dev/template-revision";
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Drops what the controller never reads from a cached object's metadata.
pub fn slim_meta(meta: &mut kube::core::ObjectMeta) {
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
    }
}

/// A workload as the cache keeps it: metadata, `spec.replicas`, `spec.selector` and `status`, with the pod
/// template replaced by its revision.
pub fn slim_workload(object: &mut DynamicObject) {
    slim_meta(&mut object.metadata);
    let revision = workload::template_revision(&object.data);
    if let Some(spec) = object.data.get_mut("spec").and_then(Value::as_object_mut) {
        spec.retain(|key, _| key == "replicas" || key == "selector");
    }
    if let Some(revision) = revision {
        object
            .metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(CACHED_REVISION.into(), revision);
    }
}

/// What a cached object can tell about the Rollouts that depend on it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    /// A workload of `kind` named `name` (the target, or its `-primary`).
    Workload(String, TargetKind, String),
    /// A Service or a route named `name` (the apex, `-primary`, `-canary`).
    Service(String, String),
    /// Anything in the namespace (its labels).
    Namespace(String),
}

/// Which Rollouts each key concerns, kept from the Rollout watch.
#[derive(Default)]
struct Index {
    rollouts: HashMap<Key, HashSet<ObjectRef<Rollout>>>,
    keys: HashMap<ObjectRef<Rollout>, Vec<Key>>,
}

impl Index {
    fn keys_of(rollout: &Rollout) -> Vec<Key> {
        let names = workload::Names::of(rollout);
        let kind = rollout.spec.target_ref.kind;
        let ns = names.namespace.clone();
        vec![
            Key::Workload(ns.clone(), kind, names.target.clone()),
            Key::Workload(ns.clone(), kind, names.primary.clone()),
            Key::Service(ns.clone(), names.service.clone()),
            Key::Service(ns.clone(), names.service_primary.clone()),
            Key::Service(ns.clone(), names.service_canary.clone()),
            Key::Namespace(ns),
        ]
    }

    fn remove(&mut self, reference: &ObjectRef<Rollout>) {
        for key in self.keys.remove(reference).unwrap_or_default() {
            if let Some(set) = self.rollouts.get_mut(&key) {
                set.remove(reference);
                if set.is_empty() {
                    self.rollouts.remove(&key);
                }
            }
        }
    }

    fn insert(&mut self, rollout: &Rollout) {
        let reference = ObjectRef::from_obj(rollout);
        let keys = Index::keys_of(rollout);
        if self.keys.get(&reference) == Some(&keys) {
            return;
        }
        self.remove(&reference);
        for key in &keys {
            self.rollouts
                .entry(key.clone())
                .or_default()
                .insert(reference.clone());
        }
        self.keys.insert(reference, keys);
    }

    fn apply(&mut self, event: &watcher::Event<Rollout>) {
        match event {
            watcher::Event::Apply(r) | watcher::Event::InitApply(r) => self.insert(r),
            watcher::Event::Delete(r) => self.remove(&ObjectRef::from_obj(r)),
            watcher::Event::Init => *self = Index::default(),
            watcher::Event::InitDone => {}
        }
    }

    fn lookup(&self, key: &Key) -> Vec<ObjectRef<Rollout>> {
        self.rollouts
            .get(key)
            .map(|set| set.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// One watch's store and whether its first list has completed.
struct Watched<K: Resource + 'static>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    store: Store<K>,
    synced: Arc<AtomicBool>,
    /// The watch failed before its first list completed (for a route: its CRD is probably not installed).
    failing: Arc<AtomicBool>,
}

impl<K: Resource + Clone + 'static> Watched<K>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    fn get(&self, reference: &ObjectRef<K>) -> Option<Arc<K>> {
        self.store.get(reference)
    }
}

/// The caches, the index from cached objects to Rollouts, and the channel that wakes those Rollouts.
pub struct Caches {
    client: Client,
    deployments: Watched<DynamicObject>,
    statefulsets: Watched<DynamicObject>,
    services: Watched<Service>,
    namespaces: Watched<PartialObjectMeta<Namespace>>,
    /// Route caches by resource (`group/version/plural`), started on first use: a mesh that no Rollout uses is
    /// never watched, and one whose CRD is missing stays unsynced (reads fall back to the API).
    routes: Mutex<HashMap<String, Arc<Watched<DynamicObject>>>>,
    index: Arc<RwLock<Index>>,
    wake: UnboundedSender<ObjectRef<Rollout>>,
    /// Resource versions of Rollouts that Sluice's own writes replaced: a cached copy still at one of them is
    /// older than what Sluice last wrote, and is not planned from.
    superseded: Mutex<HashMap<ObjectRef<Rollout>, Vec<String>>>,
}

fn watch_config() -> watcher::Config {
    // Lists come from the API server's watch cache, not etcd; large lists are paged.
    watcher::Config::default().any_semantic().page_size(500)
}

impl Caches {
    /// Starts the watches (as background tasks on the current runtime) and returns the caches with the
    /// stream of Rollouts to wake, for `Controller::reconcile_on`.
    pub fn start(client: Client) -> (Arc<Caches>, UnboundedReceiver<ObjectRef<Rollout>>) {
        let (wake, woken) = unbounded();
        let index = Arc::new(RwLock::new(Index::default()));
        let deployments = watch_workloads(&client, TargetKind::Deployment, &index, &wake);
        let statefulsets = watch_workloads(&client, TargetKind::StatefulSet, &index, &wake);
        let services = {
            let api: Api<Service> = Api::all(client.clone());
            let index = index.clone();
            let wake = wake.clone();
            spawn_watch(
                watcher::watcher(api, watch_config()),
                (),
                |s: &mut Service| slim_meta(&mut s.metadata),
                move |s: &Service| Key::Service(s.namespace().unwrap_or_default(), s.name_any()),
                index,
                wake,
            )
        };
        let namespaces = {
            // Metadata only: the labels are all a reconcile reads.
            let api: Api<PartialObjectMeta<Namespace>> = Api::all(client.clone());
            spawn_watch(
                watcher::watcher(api, watch_config()),
                (),
                |n: &mut PartialObjectMeta<Namespace>| slim_meta(&mut n.metadata),
                |n: &PartialObjectMeta<Namespace>| Key::Namespace(n.name_any()),
                index.clone(),
                wake.clone(),
            )
        };
        let caches = Caches {
            client,
            deployments,
            statefulsets,
            services,
            namespaces,
            routes: Default::default(),
            index,
            wake,
            superseded: Default::default(),
        };
        (Arc::new(caches), woken)
    }

    /// Keeps the index in step with the Rollout watch (call for each of its events).
    pub fn index_rollout_event(&self, event: &watcher::Event<Rollout>) {
        self.index
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .apply(event);
    }

    /// Whether every cache has completed its first list (routes excepted: they fall back to the API).
    pub fn synced(&self) -> bool {
        [
            &self.deployments.synced,
            &self.statefulsets.synced,
            &self.services.synced,
            &self.namespaces.synced,
        ]
        .iter()
        .all(|s| s.load(Ordering::Acquire))
    }

    /// The cached (slimmed) workload, as JSON.
    pub fn workload(&self, kind: TargetKind, namespace: &str, name: &str) -> Option<Value> {
        let cache = match kind {
            TargetKind::Deployment => &self.deployments,
            TargetKind::StatefulSet => &self.statefulsets,
        };
        let reference = ObjectRef::new_with(name, workload::api_resource(kind)).within(namespace);
        cache
            .get(&reference)
            .and_then(|o| serde_json::to_value(&*o).ok())
    }

    pub fn service(&self, namespace: &str, name: &str) -> Option<Arc<Service>> {
        self.services.get(&ObjectRef::new(name).within(namespace))
    }

    pub fn namespace_labels(&self, namespace: &str) -> std::collections::BTreeMap<String, String> {
        self.namespaces
            .get(&ObjectRef::new(namespace))
            .map(|n| n.labels().clone())
            .unwrap_or_default()
    }

    /// Whether a reconcile should wait for the route's cache: it is still listing for the first time (and
    /// has not failed, as it does when the route's CRD is missing). Waiting half a second then saves one
    /// API read per Rollout when thousands start at once.
    pub fn route_starting(&self, resource: &ApiResource) -> bool {
        let cache = self.route_cache(resource);
        !cache.synced.load(Ordering::Acquire) && !cache.failing.load(Ordering::Acquire)
    }

    /// The cached route, or `None` when the route's cache has not listed yet (the caller reads the API).
    /// `Some(None)`: the route does not exist.
    pub fn route(
        &self,
        resource: &ApiResource,
        namespace: &str,
        name: &str,
    ) -> Option<Option<Value>> {
        let cache = self.route_cache(resource);
        if !cache.synced.load(Ordering::Acquire) {
            return None;
        }
        let reference = ObjectRef::new_with(name, resource.clone()).within(namespace);
        Some(
            cache
                .get(&reference)
                .and_then(|o| serde_json::to_value(&*o).ok()),
        )
    }

    fn route_cache(&self, resource: &ApiResource) -> Arc<Watched<DynamicObject>> {
        let key = format!(
            "{}/{}/{}",
            resource.group, resource.version, resource.plural
        );
        let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        routes
            .entry(key)
            .or_insert_with(|| {
                let api: Api<DynamicObject> = Api::all_with(self.client.clone(), resource);
                Arc::new(spawn_watch(
                    watcher::watcher(api, watch_config()),
                    resource.clone(),
                    |o: &mut DynamicObject| slim_meta(&mut o.metadata),
                    |o: &DynamicObject| {
                        Key::Service(o.namespace().unwrap_or_default(), o.name_any())
                    },
                    self.index.clone(),
                    self.wake.clone(),
                ))
            })
            .clone()
    }

    /// Whether the cached Rollout is older than Sluice's own last write to it (plan only from newer copies).
    pub fn is_stale(&self, rollout: &Rollout) -> bool {
        let reference = ObjectRef::from_obj(rollout);
        let mut superseded = self
            .superseded
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(versions) = superseded.get(&reference) else {
            return false;
        };
        let version = rollout.resource_version().unwrap_or_default();
        if versions.contains(&version) {
            return true;
        }
        // The cache has caught up with every write: forget them.
        superseded.remove(&reference);
        false
    }

    /// Records that a write replaced `version` of the Rollout.
    pub fn wrote_over(&self, rollout: &Rollout, version: Option<String>) {
        let Some(version) = version else { return };
        self.superseded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(ObjectRef::from_obj(rollout))
            .or_default()
            .push(version);
    }

    /// Forgets a deleted Rollout's write history.
    pub fn forget(&self, rollout: &Rollout) {
        self.superseded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&ObjectRef::from_obj(rollout));
    }
}

fn watch_workloads(
    client: &Client,
    kind: TargetKind,
    index: &Arc<RwLock<Index>>,
    wake: &UnboundedSender<ObjectRef<Rollout>>,
) -> Watched<DynamicObject> {
    let resource = workload::api_resource(kind);
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
    spawn_watch(
        watcher::watcher(api, watch_config()),
        resource,
        slim_workload,
        move |o: &DynamicObject| {
            Key::Workload(o.namespace().unwrap_or_default(), kind, o.name_any())
        },
        index.clone(),
        wake.clone(),
    )
}

/// Runs `watch` into a store (slimming each object), waking the Rollouts each changed object concerns.
fn spawn_watch<K, S>(
    watch: S,
    dyntype: K::DynamicType,
    slim: impl Fn(&mut K) + Send + 'static,
    key_of: impl Fn(&K) -> Key + Send + 'static,
    index: Arc<RwLock<Index>>,
    wake: UnboundedSender<ObjectRef<Rollout>>,
) -> Watched<K>
where
    K: Resource + Clone + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
{
    let writer = reflector::store::Writer::new(dyntype);
    let store = writer.as_reader();
    let synced = Arc::new(AtomicBool::new(false));
    let done = synced.clone();
    let failing = Arc::new(AtomicBool::new(false));
    let failed = failing.clone();
    let stream = watch
        .default_backoff()
        .modify(slim)
        .reflect(writer)
        .inspect(move |event| match event {
            Ok(watcher::Event::InitDone) => {
                done.store(true, Ordering::Release);
                failed.store(false, Ordering::Release);
            }
            Err(_) => failed.store(true, Ordering::Release),
            Ok(_) => {}
        })
        .touched_objects();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(object) = stream.next().await {
            let object = match object {
                Ok(object) => object,
                Err(err) => {
                    tracing::debug!(error = %err, "watch failed; retrying");
                    continue;
                }
            };
            let rollouts = index
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .lookup(&key_of(&object));
            for rollout in rollouts {
                if wake.unbounded_send(rollout).is_err() {
                    return;
                }
            }
        }
    });
    Watched {
        store,
        synced,
        failing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_slimmed_workload_keeps_what_reconcile_reads_and_its_template_revision() {
        let full = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {
                "name": "podinfo", "namespace": "test", "generation": 3,
                "annotations": {LAST_APPLIED: "{…}", "team": "a"},
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}],
            },
            "spec": {
                "replicas": 2, "selector": {"matchLabels": {"app": "podinfo"}},
                "strategy": {"type": "RollingUpdate"},
                "template": {"metadata": {"labels": {"app": "podinfo"}},
                             "spec": {"containers": [{"name": "app", "image": "podinfo:1"}]}},
            },
            "status": {"observedGeneration": 3, "replicas": 2, "readyReplicas": 2,
                       "updatedReplicas": 2, "availableReplicas": 2},
        });
        let mut object: DynamicObject = serde_json::from_value(full.clone()).unwrap();
        slim_workload(&mut object);
        let slim = serde_json::to_value(&object).unwrap();
        assert_eq!(slim.pointer("/spec/template"), None);
        assert_eq!(slim.pointer("/spec/strategy"), None);
        assert_eq!(slim.pointer("/metadata/managedFields"), None);
        assert_eq!(
            slim.pointer("/metadata/annotations/team"),
            Some(&json!("a"))
        );
        assert!(
            slim.pointer("/metadata/annotations")
                .unwrap()
                .get(LAST_APPLIED)
                .is_none()
        );
        assert_eq!(
            workload::revision_of(&slim),
            workload::template_revision(&full)
        );
        assert!(workload::revision_of(&slim).is_some());
        assert_eq!(workload::is_ready(&slim), workload::is_ready(&full));
        assert_eq!(workload::replicas(&slim), 2);
        assert_eq!(
            workload::selector_labels(&slim),
            workload::selector_labels(&full)
        );
    }

    #[test]
    fn a_revision_annotation_is_trusted_only_on_a_slimmed_copy() {
        let forged = json!({
            "metadata": {"annotations": {CACHED_REVISION: "0000000000"}},
            "spec": {"template": {"spec": {"containers": [{"name": "app", "image": "x"}]}}},
        });
        assert_ne!(
            workload::revision_of(&forged).as_deref(),
            Some("0000000000")
        );
    }

    fn rollout(ns: &str, name: &str, target: &str) -> Rollout {
        serde_json::from_value(json!({
            "apiVersion": "sluice.dev/v1alpha1", "kind": "Rollout",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"targetRef": {"kind": "Deployment", "name": target},
                     "service": {"port": 80}, "analysis": {"interval": "1m"}},
        }))
        .unwrap()
    }

    #[test]
    fn the_index_finds_the_rollouts_of_a_workload_or_service_and_follows_changes() {
        let mut index = Index::default();
        let a = rollout("test", "a", "podinfo");
        let b = rollout("test", "b", "other");
        index.apply(&watcher::Event::InitApply(a.clone()));
        index.apply(&watcher::Event::InitApply(b.clone()));
        let workload =
            |name: &str| Key::Workload("test".into(), TargetKind::Deployment, name.into());
        assert_eq!(
            index.lookup(&workload("podinfo")),
            vec![ObjectRef::from_obj(&a)]
        );
        assert_eq!(
            index.lookup(&workload("podinfo-primary")),
            vec![ObjectRef::from_obj(&a)]
        );
        assert_eq!(
            index.lookup(&Key::Service("test".into(), "other-canary".into())),
            vec![ObjectRef::from_obj(&b)]
        );
        assert_eq!(index.lookup(&Key::Namespace("test".into())).len(), 2);
        assert!(index.lookup(&workload("podinfo")).len() == 1);
        assert!(
            index
                .lookup(&Key::Workload(
                    "prod".into(),
                    TargetKind::Deployment,
                    "podinfo".into()
                ))
                .is_empty()
        );
        assert!(
            index
                .lookup(&Key::Workload(
                    "test".into(),
                    TargetKind::StatefulSet,
                    "podinfo".into()
                ))
                .is_empty()
        );

        // The Rollout is pointed at another target: the old keys no longer wake it.
        let moved = rollout("test", "a", "moved");
        index.apply(&watcher::Event::Apply(moved.clone()));
        assert!(index.lookup(&workload("podinfo")).is_empty());
        assert_eq!(
            index.lookup(&workload("moved")),
            vec![ObjectRef::from_obj(&moved)]
        );

        index.apply(&watcher::Event::Delete(moved));
        assert!(index.lookup(&workload("moved")).is_empty());
        assert_eq!(index.lookup(&Key::Namespace("test".into())).len(), 1);
        assert_eq!(index.keys.len(), 1);

        // A relist starts over.
        index.apply(&watcher::Event::Init);
        assert!(index.lookup(&Key::Namespace("test".into())).is_empty());
    }
}
