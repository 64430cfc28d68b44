//! The kube-rs glue of `kad daemon --kubernetes`: watches the pods of one node (a
//! `spec.nodeName` field selector, as node agents do) and the namespaces, and turns what it
//! sees into [`PodEvent`]s. Everything else (pod cgroups, defaults, policies) is in `pods`,
//! where the same events can also come from a file.
use futures::{stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    runtime::{watcher, WatchStreamExt},
    Api, Client, ResourceExt,
};
use tokio::sync::mpsc;

use crate::{
    containers::annotation,
    containers::pods::{Kind, PodEvent, Qos},
};

/// Watches until the daemon stops. The client comes from `KUBECONFIG` (or `~/.kube/config`)
/// or, in a pod, the service account. Failures are reported as `Connection` events and
/// retried with kube-rs's backoff (up to about a minute and a half apart); what was applied
/// stays meanwhile.
pub async fn run(node: String, events: mpsc::Sender<PodEvent>) {
    let client = loop {
        match Client::try_default().await {
            Ok(client) => break client,
            Err(e) => {
                let _ = events
                    .send(PodEvent::Connection {
                        ok: false,
                        message: Some(format!("no Kubernetes client: {e}")),
                    })
                    .await;
                tokio::time::sleep(std::time::Duration::from_secs(10)).await;
            }
        }
    };
    let pods = watcher(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().fields(&format!("spec.nodeName={node}")),
    )
    .default_backoff()
    .map(|event| event.map(pod_events));
    let namespaces = watcher(Api::<Namespace>::all(client), watcher::Config::default())
        .default_backoff()
        .map(|event| event.map(namespace_events));
    let mut merged = std::pin::pin!(stream::select(pods, namespaces));
    let mut connected = None;
    while let Some(item) = merged.next().await {
        // A (re)start of a list proves nothing yet: only objects or an error do.
        let (ok, message, batch) = match item {
            Ok(batch) => (
                batch
                    .iter()
                    .any(|e| !matches!(e, PodEvent::ListStart { .. })),
                None,
                batch,
            ),
            Err(e) => (false, Some(e.to_string()), Vec::new()),
        };
        let known = ok || message.is_some();
        if known && (connected != Some(ok) || !ok) {
            connected = Some(ok);
            if events
                .send(PodEvent::Connection { ok, message })
                .await
                .is_err()
            {
                return;
            }
        }
        for event in batch {
            if events.send(event).await.is_err() {
                return;
            }
        }
    }
}

fn annotation_of(meta: &kube::api::ObjectMeta) -> Option<String> {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(annotation::KEY))
        .cloned()
}

fn pod_event(pod: &Pod) -> Option<PodEvent> {
    let qos = match pod.status.as_ref().and_then(|s| s.qos_class.as_deref()) {
        Some("Guaranteed") => Some(Qos::Guaranteed),
        Some("Burstable") => Some(Qos::Burstable),
        Some("BestEffort") => Some(Qos::BestEffort),
        _ => None,
    };
    Some(PodEvent::Pod {
        uid: pod.metadata.uid.clone()?,
        namespace: pod.namespace().unwrap_or_default(),
        name: pod.name_any(),
        qos,
        annotation: annotation_of(&pod.metadata),
    })
}

fn pod_events(event: watcher::Event<Pod>) -> Vec<PodEvent> {
    match event {
        watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => {
            pod_event(&pod).into_iter().collect()
        }
        watcher::Event::Delete(pod) => pod
            .metadata
            .uid
            .map(|uid| PodEvent::PodDeleted { uid })
            .into_iter()
            .collect(),
        watcher::Event::Init => vec![PodEvent::ListStart { kind: Kind::Pods }],
        watcher::Event::InitDone => vec![PodEvent::ListDone { kind: Kind::Pods }],
    }
}

fn namespace_events(event: watcher::Event<Namespace>) -> Vec<PodEvent> {
    match event {
        watcher::Event::Apply(ns) | watcher::Event::InitApply(ns) => vec![PodEvent::Namespace {
            name: ns.name_any(),
            annotation: annotation_of(&ns.metadata),
        }],
        watcher::Event::Delete(ns) => vec![PodEvent::NamespaceDeleted {
            name: ns.name_any(),
        }],
        watcher::Event::Init => vec![PodEvent::ListStart {
            kind: Kind::Namespaces,
        }],
        watcher::Event::InitDone => vec![PodEvent::ListDone {
            kind: Kind::Namespaces,
        }],
    }
}
