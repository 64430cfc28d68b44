//! The control socket's protocol: one JSON request per line, one JSON reply per line.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::policy::Policy;

/// Requests larger than this are refused without being parsed.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// `cgroup` is relative to the cgroup2 root (what the CLI sends since paths mean the same
    /// on both sides of a container's mount), or absolute below the daemon's root (older CLIs).
    Set {
        cgroup: String,
        policy: Policy,
        /// The container (full id) whose cgroup this is, when the policy was set for one (the
        /// OCI hook, `kad set --container`): kept with the policy, so that it can be found by
        /// the id once the container is gone. Not sent when absent, so an older daemon reads
        /// the request.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        container: Option<String>,
    },
    Unset {
        cgroup: String,
    },
    /// The OCI hook at poststop: the container stopped. Its policy (set with `container`) stays,
    /// with its counters, while the container's `bundle` exists (it may start again); the daemon
    /// removes it once the bundle is gone (the container was removed), or now if the daemon
    /// cannot see the bundle. A policy at `cgroup` of another container, or of none, is removed
    /// now, as `unset` does.
    ContainerStopped {
        cgroup: String,
        container: String,
        bundle: String,
    },
    /// `kad set --host`: the host policy, kept by the cgroup2 root: every connection of the
    /// host that no nearer policy decides for.
    SetHost {
        policy: Policy,
    },
    UnsetHost,
    /// `kad exec`: a policy for the transient cgroup the caller made. The daemon records the
    /// caller (from the socket's peer credentials) as its owner, and removes the policy and the
    /// cgroup itself if that process dies before it could.
    Exec {
        cgroup: String,
        policy: Policy,
    },
    /// Re-read the config file.
    Reload,
    List,
    Stats,
    Status,
}

/// Who sent a request, as the kernel says (the control socket's peer credentials).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    /// The peer's process in the daemon's PID namespace, if the kernel could tell.
    pub pid: Option<u32>,
}

impl Request {
    /// Whether only root may ask it: the host policy and the config file. Other changes may
    /// come from a user for the cgroups delegated to them (the daemon checks which).
    pub fn root_only(&self) -> bool {
        matches!(
            self,
            Request::SetHost { .. } | Request::UnsetHost | Request::Reload
        )
    }

    /// Whether the request changes policies.
    pub fn mutates(&self) -> bool {
        matches!(
            self,
            Request::Set { .. }
                | Request::Unset { .. }
                | Request::ContainerStopped { .. }
                | Request::SetHost { .. }
                | Request::UnsetHost
                | Request::Exec { .. }
                | Request::Reload
        )
    }
}

/// One row of `kad list --json`: the policy's fields beside the cgroup's (the same shape as a
/// state file's entry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyEntry {
    pub cgroup: String,
    #[serde(flatten)]
    pub policy: Policy,
    /// The pod (`namespace/name`) whose annotation this is, for pod policies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The container (full id) the policy was set for (OCI hook, `kad set --container`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// The container stopped and may start again: the policy waits for it, counters kept.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stopped: bool,
    /// The Docker container (its name) whose label this is, for Docker policies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker: Option<String>,
    /// The daemon knows no cgroup at the path (yet): the policy applies from the first
    /// connection of one made there. (For a moment after a `mkdir` this is still true while the
    /// kernel already holds the new cgroup's policy.)
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub waiting: bool,
    /// The host policy (`kad set --host`); `cgroup` is then the cgroup2 root.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub host: bool,
}

impl PolicyEntry {
    pub fn new(cgroup: String, policy: &Policy) -> Self {
        PolicyEntry {
            cgroup,
            policy: *policy,
            pod: None,
            container: None,
            stopped: false,
            docker: None,
            waiting: false,
            host: false,
        }
    }
}

/// One row of `kad stats --json`: what the kernel program counted for a policy cgroup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsEntry {
    pub cgroup: String,
    /// Connections that got keepalive on the connecting side.
    pub connect: u64,
    /// Connections that got keepalive on the accepting side.
    pub accept: u64,
    /// `bpf_setsockopt` calls the kernel refused.
    pub setsockopt_failures: u64,
    /// Connections closed because keepalive found the peer dead.
    pub keepalive_kills: u64,
    /// Existing connections that got the policy from a refresh.
    #[serde(default)]
    pub refreshed: u64,
    /// Connections whose program set its own keepalive options after kad (rewritten when
    /// the policy is enforced).
    #[serde(default)]
    pub overridden: u64,
}

/// A cgroup kad's programs are attached to, and the program its links run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnchorEntry {
    pub cgroup: String,
    pub program: String,
}

/// A kernel feature kad uses beyond the core, and why it is missing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureEntry {
    pub feature: String,
    pub available: bool,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub program_loaded: bool,
    /// The tag (instruction hash) of the sock_ops program this daemon loaded.
    pub program: String,
    pub kernel: String,
    pub cgroup_root: String,
    /// Where the daemon has the cgroup2 tree mounted, when the client has it elsewhere (set
    /// by the client, [`Response::localize`]: the report's paths are the client's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daemon_cgroup_root: Option<String>,
    pub bpffs: String,
    pub state_dir: String,
    pub config: String,
    /// Cgroups with a kad program attached right now.
    pub attachments: usize,
    /// Entries in the policies map (one per attachment when all is well).
    pub map_entries: usize,
    pub anchors: Vec<AnchorEntry>,
    pub features: Vec<FeatureEntry>,
    pub policies: Vec<PolicyEntry>,
    /// Per policy: where it comes from and whether it is in force.
    pub details: Vec<PolicyDetail>,
    /// What the program counted, per policy in force.
    pub counters: Vec<StatsEntry>,
    /// False when the kernel's BTF lacked what is needed to recognise keepalive kills.
    pub kills_counted: bool,
    /// The pod watcher; absent when the daemon runs none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<PodsStatus>,
    /// The Docker watcher; absent when the daemon runs none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker: Option<DockerStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyDetail {
    pub cgroup: String,
    /// "set" (kad set, saved in the state directory), "config" (the config file), "pod" (a
    /// pod's annotation) or "docker" (a Docker container's label).
    pub source: String,
    /// The id of the cgroup the policy is attached to; null while no cgroup is at the path.
    pub cgroup_id: Option<u64>,
    /// Why the policy is not in force, if applying it failed.
    pub error: Option<String>,
    /// Whether the policy is enforced (programs' own keepalive values are rewritten).
    #[serde(default)]
    pub enforce: bool,
    /// What the kernel counted as overridden for the policy's cgroup: connections whose
    /// program set its own keepalive after kad (their values won), or, when enforced,
    /// `setsockopt` calls rewritten to the policy's values.
    #[serde(default)]
    pub overridden: u64,
    /// For a pod policy ("pod"): the pod, `namespace/name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// For a policy set for a container: its full id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// The container stopped: the policy waits for its next start.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stopped: bool,
    /// For a Docker policy ("docker"): the container's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker: Option<String>,
}

/// The pod watcher, when the daemon runs one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodsStatus {
    /// "kubernetes (node NAME)" or "events from PATH".
    pub source: String,
    /// Whether the last attempt to reach the API server worked.
    pub connected: bool,
    /// The last error, while not connected.
    pub error: Option<String>,
    /// Pods of this node known to kad.
    pub pods: usize,
    /// Pods whose annotation (or namespace's) is invalid, with why: they have no policy.
    pub invalid: Vec<String>,
}

/// The Docker watcher, when the daemon runs one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerStatus {
    /// Docker's socket.
    pub socket: String,
    /// Whether the last attempt to reach Docker worked.
    pub connected: bool,
    /// The last error, while not connected.
    pub error: Option<String>,
    /// While connected: the API version spoken and Docker's cgroup driver.
    pub api: Option<String>,
    pub cgroup_driver: Option<String>,
    /// Containers with the label known to kad.
    pub containers: usize,
    /// Containers whose label is invalid, with why: they have no policy.
    pub invalid: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Response {
    /// `root` (in `done`, `policies` and `stats`): the daemon's cgroup2 mount point, which its
    /// paths start with, so that a client whose mount is elsewhere (the daemon in a container,
    /// a hybrid host) shows them as its own ([`Response::localize`]). Absent from older daemons.
    Done {
        cgroup: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        root: Option<String>,
    },
    Policies {
        policies: Vec<PolicyEntry>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        root: Option<String>,
    },
    Reloaded {
        policies: usize,
    },
    Stats {
        stats: Vec<StatsEntry>,
        /// False when the kernel's BTF lacked what is needed to recognise keepalive kills.
        kills_counted: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        root: Option<String>,
    },
    Status(Box<StatusReport>),
    Error {
        message: String,
    },
}

impl Response {
    pub fn error(message: impl Into<String>) -> Self {
        Response::Error {
            message: message.into(),
        }
    }

    pub fn done(cgroup: impl Into<String>) -> Self {
        Response::Done {
            cgroup: cgroup.into(),
            root: None,
        }
    }

    /// The daemon's side: says where its paths are rooted.
    pub fn with_root(mut self, daemon_root: &Path) -> Self {
        let shown = Some(daemon_root.display().to_string());
        match &mut self {
            Response::Done { root, .. }
            | Response::Policies { root, .. }
            | Response::Stats { root, .. } => *root = shown,
            _ => {}
        }
        self
    }

    /// The client's side: the daemon's paths as paths below `local_root`, the client's cgroup2
    /// mount point. A reply without the daemon's root (an older daemon) is taken as it is.
    pub fn localize(&mut self, local_root: &Path) {
        let map = |daemon_root: &Path, path: &mut String| {
            if let Some(local) = rebase(daemon_root, local_root, path) {
                *path = local;
            }
        };
        match self {
            Response::Done {
                cgroup,
                root: Some(root),
            } => map(Path::new(&root.clone()), cgroup),
            Response::Policies {
                policies,
                root: Some(root),
            } => {
                let root = PathBuf::from(&*root);
                policies.iter_mut().for_each(|p| map(&root, &mut p.cgroup));
            }
            Response::Stats {
                stats,
                root: Some(root),
                ..
            } => {
                let root = PathBuf::from(&*root);
                stats.iter_mut().for_each(|s| map(&root, &mut s.cgroup));
            }
            Response::Status(report) => {
                let root = PathBuf::from(&report.cgroup_root);
                let report = &mut **report;
                report
                    .policies
                    .iter_mut()
                    .for_each(|p| map(&root, &mut p.cgroup));
                report
                    .details
                    .iter_mut()
                    .for_each(|d| map(&root, &mut d.cgroup));
                report
                    .counters
                    .iter_mut()
                    .for_each(|c| map(&root, &mut c.cgroup));
                report
                    .anchors
                    .iter_mut()
                    .for_each(|a| map(&root, &mut a.cgroup));
                if root != local_root {
                    report.cgroup_root = local_root.display().to_string();
                    report.daemon_cgroup_root = Some(root.display().to_string());
                }
            }
            _ => {}
        }
    }
}

/// `path` (below `from`) as the same path below `to`; `None` when it is not below `from` or
/// the roots are the same.
pub fn rebase(from: &Path, to: &Path, path: &str) -> Option<String> {
    if from == to {
        return None;
    }
    let rest = Path::new(path).strip_prefix(from).ok()?;
    if rest.as_os_str().is_empty() {
        // The root itself (the host policy's path), without the trailing slash a join adds.
        return Some(to.display().to_string());
    }
    Some(to.join(rest).display().to_string())
}

/// Encodes one message as a single line.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    // Serializing these plain types cannot fail: no maps with non-string keys, no custom impls.
    let mut line = serde_json::to_vec(message).unwrap_or_else(|_| b"{}".to_vec());
    line.push(b'\n');
    line
}

/// Decodes a request line, with a message fit to send back when it is malformed.
pub fn decode_request(line: &[u8]) -> Result<Request, String> {
    if line.len() > MAX_REQUEST_BYTES {
        return Err(format!(
            "request too large (limit {MAX_REQUEST_BYTES} bytes)"
        ));
    }
    serde_json::from_slice(line).map_err(|e| format!("malformed request: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let requests = [
            Request::Set {
                cgroup: "app".into(),
                policy: Policy::on(Some(180), None, Some(20)).unwrap(),
                container: None,
            },
            Request::Set {
                cgroup: "/sys/fs/cgroup/x".into(),
                policy: Policy::OFF,
                container: Some("ab".repeat(32)),
            },
            Request::ContainerStopped {
                cgroup: "p/libpod-ab".into(),
                container: "ab".repeat(32),
                bundle: "/var/lib/containers/storage/overlay-containers/ab/userdata".into(),
            },
            Request::Unset {
                cgroup: "app".into(),
            },
            Request::SetHost {
                policy: Policy::on(Some(300), None, None).unwrap(),
            },
            Request::UnsetHost,
            Request::Exec {
                cgroup: "/sys/fs/cgroup/kad-exec-7".into(),
                policy: Policy::on(Some(5), None, None).unwrap(),
            },
            Request::Reload,
            Request::List,
            Request::Stats,
            Request::Status,
        ];
        for request in requests {
            let line = encode(&request);
            assert_eq!(line.last(), Some(&b'\n'));
            assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
            assert_eq!(decode_request(&line).unwrap(), request);
        }
    }

    #[test]
    fn only_reads_are_open_to_everyone() {
        let policy = Policy::OFF;
        let cgroup = String::from("x");
        for request in [
            Request::Set {
                cgroup: cgroup.clone(),
                policy,
                container: None,
            },
            Request::ContainerStopped {
                cgroup: cgroup.clone(),
                container: "a".into(),
                bundle: "/b".into(),
            },
            Request::Unset {
                cgroup: cgroup.clone(),
            },
            Request::SetHost { policy },
            Request::UnsetHost,
            Request::Exec { cgroup, policy },
            Request::Reload,
        ] {
            assert!(request.mutates(), "{request:?}");
            // A user may ask these for the cgroups delegated to them (the hook of rootless
            // podman sends set and container_stopped); the host and the config are root's.
            let root_only = matches!(
                request,
                Request::SetHost { .. } | Request::UnsetHost | Request::Reload
            );
            assert_eq!(request.root_only(), root_only, "{request:?}");
        }
        for request in [Request::List, Request::Stats, Request::Status] {
            assert!(!request.mutates(), "{request:?}");
        }
    }

    /// What the previous release sends and reads: a set without a container is the same line,
    /// and its replies without a root are taken as they are.
    #[test]
    fn the_previous_release_reads_and_is_read() {
        let set = Request::Set {
            cgroup: "app".into(),
            policy: Policy::OFF,
            container: None,
        };
        let line = String::from_utf8(encode(&set)).unwrap();
        assert!(!line.contains("container"), "{line}");
        assert_eq!(
            decode_request(br#"{"cmd":"set","cgroup":"/sys/fs/cgroup/a","policy":{"mode":"off","idle":null,"intvl":null,"cnt":null}}"#)
                .unwrap(),
            Request::Set {
                cgroup: "/sys/fs/cgroup/a".into(),
                policy: Policy::OFF,
                container: None
            }
        );
        let mut old: Response =
            serde_json::from_str(r#"{"reply":"done","cgroup":"/sys/fs/cgroup/a"}"#).unwrap();
        old.localize(Path::new("/sys/fs/cgroup/unified"));
        assert_eq!(old, Response::done("/sys/fs/cgroup/a"));
    }

    /// A daemon in a container sees the host's cgroup2 tree at /sys/fs/cgroup; the host's CLI
    /// (a hybrid host) at /sys/fs/cgroup/unified.
    #[test]
    fn replies_are_shown_in_the_clients_mount() {
        let daemon = Path::new("/sys/fs/cgroup");
        let local = Path::new("/sys/fs/cgroup/unified");
        let mut done = Response::done("/sys/fs/cgroup/app/x").with_root(daemon);
        let line = encode(&done);
        assert!(String::from_utf8_lossy(&line).contains(r#""root":"/sys/fs/cgroup""#));
        done.localize(local);
        assert!(
            matches!(&done, Response::Done { cgroup, .. } if cgroup == "/sys/fs/cgroup/unified/app/x")
        );
        let mut list = Response::Policies {
            policies: vec![PolicyEntry::new("/sys/fs/cgroup/a".into(), &Policy::OFF)],
            root: None,
        }
        .with_root(daemon);
        list.localize(local);
        let Response::Policies { policies, .. } = list else {
            panic!()
        };
        assert_eq!(policies[0].cgroup, "/sys/fs/cgroup/unified/a");
        // The host policy's path is the root itself.
        let mut host = Response::done("/sys/fs/cgroup").with_root(daemon);
        host.localize(local);
        assert_eq!(
            host,
            Response::Done {
                cgroup: "/sys/fs/cgroup/unified".into(),
                root: Some("/sys/fs/cgroup".into())
            }
        );
        // The same mount on both sides: nothing changes.
        assert_eq!(rebase(daemon, daemon, "/sys/fs/cgroup/a"), None);
        assert_eq!(rebase(local, daemon, "/elsewhere/a"), None);
    }

    #[test]
    fn malformed_requests_are_errors() {
        assert!(decode_request(b"not json")
            .unwrap_err()
            .starts_with("malformed request"));
        assert!(decode_request(br#"{"cmd":"explode"}"#).is_err());
        assert!(decode_request(br#"{"cmd":"set","cgroup":"a"}"#).is_err());
        assert!(decode_request(br#"{"cmd":"unset","cgroup":"a","extra":1}"#).is_err());
        let big = vec![b' '; MAX_REQUEST_BYTES + 1];
        assert!(decode_request(&big).unwrap_err().contains("too large"));
    }

    #[test]
    fn policy_entry_json_has_the_documented_shape() {
        let entry = PolicyEntry::new(
            "/sys/fs/cgroup/app".into(),
            &Policy::on(Some(180), None, None).unwrap(),
        );
        let v: serde_json::Value = serde_json::to_value(&entry).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"cgroup": "/sys/fs/cgroup/app", "mode": "on", "idle": 180, "intvl": null, "cnt": null, "user_timeout": null, "enforce": false})
        );
        let off = serde_json::to_value(PolicyEntry::new("/x".into(), &Policy::OFF)).unwrap();
        assert_eq!(off["mode"], "off");
        let strict = Policy::on(None, None, Some(5))
            .unwrap()
            .with_extras(Some(9000), true)
            .unwrap();
        let v = serde_json::to_value(PolicyEntry::new("/y".into(), &strict)).unwrap();
        assert_eq!(
            (v["user_timeout"].clone(), v["enforce"].clone()),
            (9000.into(), true.into())
        );
        // A reply from a daemon that predates the fields still reads.
        let old: PolicyEntry =
            serde_json::from_str(r#"{"cgroup":"/z","mode":"on","idle":1,"intvl":null,"cnt":null}"#)
                .unwrap();
        assert_eq!(old.policy, Policy::on(Some(1), None, None).unwrap());
    }
}
