//! Pod policies: a pod's `kad.dev/keepalive` annotation (or else its namespace's) is a policy
//! on the pod's cgroup. This module knows nothing of the API server: it takes [`PodEvent`]s,
//! from the kube-rs watcher of `kad daemon --kubernetes` (kube_watch.rs) or from a stream of
//! JSON lines (`--pod-events`), and says which policies the pods want.
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::{containers::annotation, model::policy::Policy};

/// A pod's QoS class (`status.qosClass`): where the kubelet puts its cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

/// What the watcher saw, one change at a time. A full list (at start and after each
/// reconnection) is `ListStart`, the objects, `ListDone`: what the list did not name is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case", deny_unknown_fields)]
pub enum PodEvent {
    /// A pod of this node was added or changed.
    Pod {
        uid: String,
        namespace: String,
        name: String,
        /// None until the API server has set it (it does so at creation).
        qos: Option<Qos>,
        /// The value of the pod's `kad.dev/keepalive` annotation.
        annotation: Option<String>,
    },
    PodDeleted {
        uid: String,
    },
    Namespace {
        name: String,
        annotation: Option<String>,
    },
    NamespaceDeleted {
        name: String,
    },
    ListStart {
        kind: Kind,
    },
    ListDone {
        kind: Kind,
    },
    /// The API server answered (again), or could not be reached: for `kad status`.
    Connection {
        ok: bool,
        message: Option<String>,
    },
    /// A line of `--pod-events` that was refused, and why: for `kad status`. Never read from
    /// the stream itself.
    #[serde(skip)]
    Refused {
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Pods,
    Namespaces,
}

/// How the kubelet lays out pod cgroups: its `--cgroup-driver` and `--cgroup-root`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeletLayout {
    pub systemd: bool,
    /// Relative to the cgroup2 root; empty for the root itself (the kubelet's default "/").
    pub cgroup_root: String,
}

impl KubeletLayout {
    /// The pod's cgroup, relative to the cgroup2 root:
    /// systemd `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid with _>.slice`
    /// (guaranteed: `kubepods.slice/kubepods-pod<uid>.slice`), cgroupfs
    /// `kubepods/<qos>/pod<uid>` (guaranteed: `kubepods/pod<uid>`).
    pub fn pod_path(&self, uid: &str, qos: Qos) -> Option<String> {
        // A UID is a UUID; anything else must not become a path.
        if uid.is_empty()
            || uid.len() > 64
            || !uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return None;
        }
        let qos_name = match qos {
            Qos::Guaranteed => None,
            Qos::Burstable => Some("burstable"),
            Qos::BestEffort => Some("besteffort"),
        };
        let pod = if self.systemd {
            let uid = uid.replace('-', "_");
            match qos_name {
                None => format!("kubepods.slice/kubepods-pod{uid}.slice"),
                Some(q) => {
                    format!("kubepods.slice/kubepods-{q}.slice/kubepods-{q}-pod{uid}.slice")
                }
            }
        } else {
            match qos_name {
                None => format!("kubepods/pod{uid}"),
                Some(q) => format!("kubepods/{q}/pod{uid}"),
            }
        };
        let root = self.cgroup_root.trim_matches('/');
        Some(if root.is_empty() {
            pod
        } else {
            format!("{root}/{pod}")
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Pod {
    namespace: String,
    name: String,
    qos: Option<Qos>,
    annotation: Option<String>,
}

/// A policy a pod wants, or why it has none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// `namespace/name`.
    pub pod: String,
    pub policy: Result<Policy, String>,
}

/// The pods and namespaces as the events described them.
#[derive(Debug, Default)]
pub struct PodTable {
    pods: BTreeMap<String, Pod>,
    namespaces: BTreeMap<String, Option<String>>,
    /// During a list: what was there before and has not been named again yet.
    stale_pods: Option<BTreeSet<String>>,
    stale_namespaces: Option<BTreeSet<String>>,
}

impl PodTable {
    /// Applies one event; false if it cannot change any pod's policy.
    pub fn apply(&mut self, event: PodEvent) -> bool {
        match event {
            PodEvent::Pod {
                uid,
                namespace,
                name,
                qos,
                annotation,
            } => {
                if let Some(stale) = &mut self.stale_pods {
                    stale.remove(&uid);
                }
                let pod = Pod {
                    namespace,
                    name,
                    qos,
                    annotation,
                };
                self.pods.insert(uid, pod.clone()) != Some(pod)
            }
            PodEvent::PodDeleted { uid } => self.pods.remove(&uid).is_some(),
            PodEvent::Namespace { name, annotation } => {
                if let Some(stale) = &mut self.stale_namespaces {
                    stale.remove(&name);
                }
                self.namespaces.insert(name, annotation.clone()) != Some(annotation)
            }
            PodEvent::NamespaceDeleted { name } => self.namespaces.remove(&name).is_some(),
            PodEvent::ListStart { kind: Kind::Pods } => {
                self.stale_pods = Some(self.pods.keys().cloned().collect());
                false
            }
            PodEvent::ListStart {
                kind: Kind::Namespaces,
            } => {
                self.stale_namespaces = Some(self.namespaces.keys().cloned().collect());
                false
            }
            PodEvent::ListDone { kind: Kind::Pods } => {
                let stale = self.stale_pods.take().unwrap_or_default();
                for uid in &stale {
                    self.pods.remove(uid);
                }
                !stale.is_empty()
            }
            PodEvent::ListDone {
                kind: Kind::Namespaces,
            } => {
                let stale = self.stale_namespaces.take().unwrap_or_default();
                for name in &stale {
                    self.namespaces.remove(name);
                }
                !stale.is_empty()
            }
            PodEvent::Connection { .. } | PodEvent::Refused { .. } => false,
        }
    }

    pub fn pods(&self) -> usize {
        self.pods.len()
    }

    /// The policy each pod wants, by its cgroup path (relative to the cgroup2 root): the pod's
    /// own annotation, or else its namespace's. Pods without either, or whose QoS class is
    /// not known yet, want nothing.
    pub fn wanted(&self, layout: &KubeletLayout) -> BTreeMap<String, Wanted> {
        let mut out = BTreeMap::new();
        for (uid, pod) in &self.pods {
            let (value, from) = match (&pod.annotation, self.namespaces.get(&pod.namespace)) {
                (Some(value), _) => (value, "pod"),
                (None, Some(Some(value))) => (value, "namespace"),
                _ => continue,
            };
            let Some(path) = pod.qos.and_then(|qos| layout.pod_path(uid, qos)) else {
                continue;
            };
            let policy = annotation::parse(value).map_err(|e| match from {
                "pod" => e.to_string(),
                _ => format!("namespace {}: {e}", pod.namespace),
            });
            out.insert(
                path,
                Wanted {
                    pod: format!("{}/{}", pod.namespace, pod.name),
                    policy,
                },
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0d7e5c3a-1b2c-4d5e-8f90-123456789abc";

    fn layout(systemd: bool) -> KubeletLayout {
        KubeletLayout {
            systemd,
            cgroup_root: String::new(),
        }
    }

    #[test]
    fn pod_paths_for_both_drivers() {
        let s = layout(true);
        assert_eq!(
            s.pod_path(UID, Qos::BestEffort).unwrap(),
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0d7e5c3a_1b2c_4d5e_8f90_123456789abc.slice"
        );
        assert_eq!(
            s.pod_path(UID, Qos::Guaranteed).unwrap(),
            "kubepods.slice/kubepods-pod0d7e5c3a_1b2c_4d5e_8f90_123456789abc.slice"
        );
        let c = KubeletLayout {
            systemd: false,
            cgroup_root: "/kube/".into(),
        };
        assert_eq!(
            c.pod_path(UID, Qos::Burstable).unwrap(),
            format!("kube/kubepods/burstable/pod{UID}")
        );
        assert_eq!(
            layout(false).pod_path(UID, Qos::Guaranteed).unwrap(),
            format!("kubepods/pod{UID}")
        );
        for bad in ["", "../x", "a/b", "a.b"] {
            assert_eq!(s.pod_path(bad, Qos::BestEffort), None, "{bad}");
        }
    }

    fn pod(uid: &str, ns: &str, annotation: Option<&str>) -> PodEvent {
        PodEvent::Pod {
            uid: uid.into(),
            namespace: ns.into(),
            name: format!("p-{uid}"),
            qos: Some(Qos::BestEffort),
            annotation: annotation.map(Into::into),
        }
    }

    #[test]
    fn namespace_defaults_edits_deletes_and_lists() {
        let l = layout(true);
        let mut t = PodTable::default();
        assert!(t.apply(pod("a", "team", None)));
        assert!(t.wanted(&l).is_empty());
        assert!(t.apply(PodEvent::Namespace {
            name: "team".into(),
            annotation: Some("idle=200".into())
        }));
        let w = t.wanted(&l);
        assert_eq!(w.len(), 1);
        let (path, wanted) = w.iter().next().unwrap();
        assert!(path.ends_with("kubepods-besteffort-poda.slice"), "{path}");
        assert_eq!(wanted.pod, "team/p-a");
        assert_eq!(wanted.policy.as_ref().unwrap().idle, Some(200));
        // The pod's own annotation wins; an unchanged event changes nothing.
        assert!(t.apply(pod("a", "team", Some("off"))));
        assert!(!t.apply(pod("a", "team", Some("off"))));
        assert_eq!(
            t.wanted(&l).values().next().unwrap().policy,
            Ok(Policy::OFF)
        );
        // A bad value is an error naming the annotation, not a policy.
        t.apply(pod("b", "other", Some("idle=0")));
        let bad = t
            .wanted(&l)
            .into_values()
            .find(|w| w.pod == "other/p-b")
            .unwrap();
        assert!(bad.policy.unwrap_err().contains("kad.dev/keepalive"));
        assert!(t.apply(PodEvent::PodDeleted { uid: "b".into() }));
        // A list that no longer names pod a removes it.
        t.apply(PodEvent::ListStart { kind: Kind::Pods });
        t.apply(pod("c", "team", None));
        assert!(t.apply(PodEvent::ListDone { kind: Kind::Pods }));
        let w = t.wanted(&l);
        assert_eq!(
            w.values().map(|w| w.pod.as_str()).collect::<Vec<_>>(),
            ["team/p-c"]
        );
        t.apply(PodEvent::ListStart {
            kind: Kind::Namespaces,
        });
        assert!(t.apply(PodEvent::ListDone {
            kind: Kind::Namespaces
        }));
        assert!(t.wanted(&l).is_empty());
    }

    #[test]
    fn events_are_json_lines() {
        let line = r#"{"event":"pod","uid":"u","namespace":"n","name":"p","qos":"BestEffort","annotation":"idle=5"}"#;
        let event: PodEvent = serde_json::from_str(line).unwrap();
        assert_eq!(
            event,
            PodEvent::Pod {
                uid: "u".into(),
                namespace: "n".into(),
                name: "p".into(),
                qos: Some(Qos::BestEffort),
                annotation: Some("idle=5".into())
            }
        );
        assert!(
            serde_json::from_str::<PodEvent>(r#"{"event":"pod_deleted","uid":"u","x":1}"#).is_err()
        );
        let list: PodEvent =
            serde_json::from_str(r#"{"event":"list_start","kind":"pods"}"#).unwrap();
        assert_eq!(list, PodEvent::ListStart { kind: Kind::Pods });
    }
}
