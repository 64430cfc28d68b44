//! `kad daemon`: its arguments, checked and made into the [`DaemonConfig`] that
//! [`crate::daemon::run`] takes, on a single-threaded async runtime.
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;

use super::{DEFAULT_BPFFS, DEFAULT_STATE_DIR};
use crate::{
    containers::{docker, pods::KubeletLayout},
    daemon::{self, DaemonConfig},
    host::{logging, sys},
};

#[derive(Debug, Args)]
pub(super) struct DaemonArgs {
    /// Where the policy table is saved.
    #[arg(long, default_value = DEFAULT_STATE_DIR, value_name = "DIR")]
    state_dir: PathBuf,
    /// The daemon's directory on the bpf filesystem (one per daemon).
    #[arg(long, default_value = DEFAULT_BPFFS, value_name = "DIR")]
    bpffs: PathBuf,
    /// Accept a bpf filesystem that only this daemon's namespaces have (one it mounts itself
    /// outside the host's mount and PID namespaces, or one pid 1 does not see): every policy
    /// then ends when they go. Refused without it.
    #[arg(long)]
    private_bpffs: bool,
    /// Policies by path, in TOML; a missing file is an empty config.
    #[arg(long, default_value = "/etc/kad/kad.toml", value_name = "FILE")]
    config: PathBuf,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9977); off by default.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// At most this many policies (the first in path order) get series of their own at
    /// /metrics (one per family each; a container's id is in its path); the counts by state
    /// cover every policy. 0: none.
    #[arg(long, value_name = "N", default_value_t = daemon::metrics::DEFAULT_POLICY_SERIES)]
    metrics_policies: usize,
    /// Pods' kad.dev/keepalive annotations (or their namespace's) are policies on the pods'
    /// cgroups: watch this node's pods (kubeconfig from KUBECONFIG, or the service account).
    #[arg(long, conflicts_with = "pod_events")]
    kubernetes: bool,
    /// The node whose pods to watch.
    #[arg(long, env = "NODE_NAME", value_name = "NAME")]
    node_name: Option<String>,
    /// Read pod events (JSON lines, as the watcher makes them) from a file or FIFO instead.
    #[arg(long, value_name = "PATH")]
    pod_events: Option<PathBuf>,
    /// The kubelet's --cgroup-driver: where pod cgroups are.
    #[arg(long, value_name = "DRIVER", default_value = "systemd", value_parser = ["systemd", "cgroupfs"])]
    kubelet_cgroup_driver: String,
    /// The kubelet's --cgroup-root, relative to the cgroup2 root.
    #[arg(long, value_name = "PATH", default_value = "/")]
    kubelet_cgroup_root: String,
    /// How many policies one user may set in the cgroups delegated to them.
    #[arg(long, value_name = "N", default_value_t = 256)]
    user_policy_limit: usize,
    /// Docker containers' kad.dev/keepalive labels are policies on their cgroups: watch Docker
    /// at SOCKET (default /var/run/docker.sock). On by default when that socket exists at start.
    #[arg(long, value_name = "SOCKET", num_args = 0..=1, default_missing_value = docker::DEFAULT_SOCKET, overrides_with = "no_docker")]
    docker: Option<PathBuf>,
    /// Do not watch Docker, even if its socket exists.
    #[arg(long, overrides_with = "docker")]
    no_docker: bool,
}

/// `kad daemon`: runs until the daemon stops, serving `socket`.
pub(super) fn command(socket: PathBuf, args: DaemonArgs) -> anyhow::Result<()> {
    let pods = match (args.kubernetes, args.pod_events) {
        (true, _) => {
            let node = args
                .node_name
                .filter(|n| !n.trim().is_empty())
                .context("--kubernetes needs the node's name: --node-name NAME or NODE_NAME")?;
            Some(daemon::PodSource::Kubernetes { node })
        }
        (false, Some(path)) => Some(daemon::PodSource::Events(path)),
        (false, None) => None,
    };
    let kubelet_root = &args.kubelet_cgroup_root;
    if kubelet_root.split('/').any(|c| c == "..") {
        anyhow::bail!("--kubelet-cgroup-root '{kubelet_root}' contains '..'");
    }
    let docker = match (args.docker, args.no_docker) {
        (_, true) => None,
        (Some(socket), false) => Some(socket),
        (None, false) => {
            let default = PathBuf::from(docker::DEFAULT_SOCKET);
            default.exists().then_some(default)
        }
    };
    run(DaemonConfig {
        socket,
        state_dir: args.state_dir,
        bpffs: args.bpffs,
        private_bpffs: args.private_bpffs,
        config: args.config,
        metrics: args.metrics,
        metrics_policies: args.metrics_policies,
        pods,
        kubelet: KubeletLayout {
            systemd: args.kubelet_cgroup_driver == "systemd",
            cgroup_root: kubelet_root.trim_matches('/').to_string(),
        },
        user_policy_limit: args.user_policy_limit,
        docker,
    })
}

fn run(config: DaemonConfig) -> anyhow::Result<()> {
    // Before anything is touched: on an older kernel every connection would fail to be set.
    sys::check_kernel(&sys::kernel_release())?;
    logging::init();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(daemon::run(config))?;
    Ok(())
}
