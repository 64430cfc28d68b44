//! The control socket's protocol: one JSON request per line, one JSON reply per line.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::policy::Policy;

/// Requests larger than this are refused without being parsed.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Root's own control socket, next to `socket` (`kad.sock`: `kad.root.sock`): mode 0600, so
/// that no other user's connections queue before root's.
pub fn root_socket(socket: &Path) -> PathBuf {
    let name = socket
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let root = match name.strip_suffix(".sock") {
        Some(stem) => format!("{stem}.root.sock"),
        None => format!("{name}.root"),
    };
    socket.with_file_name(root)
}

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
    /// What the kernel counted as overridden for the policy's cgroup: connections on which a
    /// program set a keepalive option to a value other than the policy's after kad, once each
    /// (their values won; when enforced, they were rewritten to the policy's).
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
    /// The last line of `--pod-events` that was refused, with why (escaped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
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
mod tests;
