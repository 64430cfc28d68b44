//! What `kad daemon` is started with ([`DaemonConfig`]) and what can stop its start
//! ([`DaemonError`]); shared by the daemon's modules, which import it from here rather than
//! from the folder's root.
use std::{io, path::PathBuf};

use super::{config::ConfigError, server, store::StoreError};
use crate::{
    containers::pods::KubeletLayout, host::cgroup::CgroupError, host::pathio::PathIoError,
    kernel::KernelError,
};

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub bpffs: PathBuf,
    /// A bpf filesystem private to the daemon's mount namespace is accepted: enforcement then
    /// ends with the namespace.
    pub private_bpffs: bool,
    pub config: PathBuf,
    /// Where to serve Prometheus metrics (`/metrics`); off when None.
    pub metrics: Option<std::net::SocketAddr>,
    /// At most this many policies get series of their own at `/metrics`.
    pub metrics_policies: usize,
    /// Where pod events come from, if pod annotations are policies.
    pub pods: Option<PodSource>,
    /// Where the kubelet puts pod cgroups.
    pub kubelet: KubeletLayout,
    /// How many policies one user may hold in the cgroups delegated to them.
    pub user_policy_limit: usize,
    /// Docker's socket, if Docker containers' labels are policies.
    pub docker: Option<PathBuf>,
}

/// The source of pod events.
#[derive(Debug, Clone)]
pub enum PodSource {
    /// The API server (kube-rs), watching the pods of this node.
    Kubernetes { node: String },
    /// JSON lines ([`PodEvent`]) read from a file or FIFO: another watcher, or a replay.
    Events(PathBuf),
}

impl PodSource {
    /// How [`PodSource::describe`] begins for the API server.
    pub(super) const KUBERNETES: &'static str = "kubernetes (";

    pub(super) fn describe(&self) -> String {
        match self {
            PodSource::Kubernetes { node } => format!("{}node {node})", Self::KUBERNETES),
            PodSource::Events(path) => format!("events from {}", path.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("kad daemon must run as root (it loads BPF programs)")]
    NotRoot,
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Enforcer(#[from] KernelError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Socket(#[from] server::BindError),
    #[error(transparent)]
    Io(#[from] PathIoError),
    #[error("cannot start the state thread: {0}")]
    Thread(io::Error),
    #[error("the state thread stopped unexpectedly (see the log above)")]
    StateThread,
}
