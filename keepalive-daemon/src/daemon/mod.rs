//! `kad daemon`: owns the enforcer and the policy table, and serves the control socket.
use std::{
    io,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    net::UnixListener,
    signal::unix::{signal, SignalKind},
    sync::Mutex,
};
use tracing::{error, info, warn};

mod exec_runs;
mod pod_policies;
mod report;
mod saving;
mod state;
mod sync;
mod table;

use pod_policies::read_pod_events;
use state::State;

use crate::{
    cgroup::{self, CgroupError},
    config::{self as config_file, ConfigError},
    enforcer::{Enforcer, EnforcerError},
    kube_watch, metrics, notify,
    pathio::{io_err, PathIoError},
    pods::{KubeletLayout, PodEvent, PodTable},
    protocol::{PodsStatus, Response},
    reconcile::Reconciler,
    server,
    store::{StateLock, Store, StoreError},
    sys,
    watch::Watcher,
};

/// How often the cgroups of `kad exec` runs are checked for being abandoned (only they: policy
/// paths are followed through inotify, with no periodic scan).
const EXEC_COLLECT_INTERVAL: Duration = Duration::from_secs(1);
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub bpffs: PathBuf,
    pub config: PathBuf,
    /// Where to serve Prometheus metrics (`/metrics`); off when None.
    pub metrics: Option<std::net::SocketAddr>,
    /// Where pod events come from, if pod annotations are policies.
    pub pods: Option<PodSource>,
    /// Where the kubelet puts pod cgroups.
    pub kubelet: KubeletLayout,
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
    pub(super) fn describe(&self) -> String {
        match self {
            PodSource::Kubernetes { node } => format!("kubernetes (node {node})"),
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
    Enforcer(#[from] EnforcerError),
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
    #[error("another kad daemon is already serving {0}")]
    SocketInUse(PathBuf),
    #[error(transparent)]
    Io(#[from] PathIoError),
}

/// Runs the daemon until SIGTERM or SIGINT. Enforcement outlives it: links and the map stay
/// pinned, and the next start adopts them.
pub async fn run(config: DaemonConfig) -> Result<(), DaemonError> {
    if !sys::is_root() {
        return Err(DaemonError::NotRoot);
    }
    // Pins, links and connections each hold an fd: a low soft limit must not cost policies.
    match sys::raise_nofile_limit() {
        // Debug only: a start refused right after must stay one line on stderr.
        Ok(limit) => tracing::debug!("open files limit: {limit}"),
        Err(e) => warn!("cannot raise the open files limit: {e}"),
    }
    let root = cgroup::find_root()?;
    // Bind first: a bad address fails the start before anything is touched.
    let metrics_listener = match config.metrics {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| DaemonError::Metrics { addr, source })?,
        ),
        None => None,
    };
    // Bound early, so that a live daemon on the socket stops us before anything is touched;
    // clients that connect meanwhile wait until we serve.
    let listener = server::bind(&config.socket)?;
    let result = run_bound(config.clone(), root, listener, metrics_listener).await;
    let _ = std::fs::remove_file(&config.socket);
    result
}

async fn run_bound(
    config: DaemonConfig,
    root: PathBuf,
    listener: UnixListener,
    metrics_listener: Option<tokio::net::TcpListener>,
) -> Result<(), DaemonError> {
    // One daemon per state directory, held until we exit.
    let _state_lock = StateLock::acquire(&config.state_dir)?;
    let store = Store::new(&config.state_dir);
    // Read both files first: a corrupt one stops us before anything is touched.
    let saved = store.load(&root)?;
    let exec_owners = saved
        .iter()
        .filter_map(|e| Some((PathBuf::from(&e.cgroup), e.exec_owner.clone()?)))
        .collect();
    let set = saved
        .into_iter()
        .map(|e| (PathBuf::from(&e.cgroup), e.policy()))
        .collect();
    let from_config = config_file::load(&config.config, &root)?;
    let pods_store = Store::pods(&config.state_dir);
    // Kept (and enforced) until the watcher's first full list says otherwise.
    let from_pods = pods_store
        .load(&root)?
        .into_iter()
        .map(|e| {
            let pod = e.pod.clone().unwrap_or_default();
            (PathBuf::from(&e.cgroup), (e.policy(), pod))
        })
        .collect();
    let pods_status = config.pods.as_ref().map(|source| PodsStatus {
        source: source.describe(),
        connected: false,
        error: Some("not connected yet".into()),
        pods: 0,
        invalid: Vec::new(),
    });
    let state_file_exists = store.exists();
    let enforcer = open_enforcer(&config.bpffs)?;
    let watcher = Watcher::new().map_err(io_err("cannot start", "inotify"))?;
    let mut state = State {
        config: config.clone(),
        kernel: Reconciler::new(root.clone(), enforcer),
        root,
        store,
        set,
        exec_owners,
        from_config,
        from_pods,
        pod_table: PodTable::default(),
        pods_store,
        pods_status,
        watcher: watcher.clone(),
    };
    state.adopt_pinned(state_file_exists);
    if state.store.journal_len() > 0 {
        // Fold the journal into the table now, so that it starts short.
        if let Err(e) = state.save() {
            warn!("cannot rewrite the state file (the journal keeps every change): {e}");
        }
    }
    state.sync_all();
    // Map entries an earlier run left for cgroups or policies that are gone, and what the
    // first design of kad pinned, once this design's anchors are in place.
    state.kernel.drop_stale_ids();
    let retired = state.kernel.enforcer.retire_legacy();
    if retired > 0 {
        info!(links = retired, "replaced the links of an older kad");
    }
    state.refresh_all();
    for (what, feature) in state.features() {
        if let Err(reason) = feature {
            warn!("{what}: not available on this kernel ({reason})");
        }
    }
    info!(
        socket = %config.socket.display(),
        bpffs = %config.bpffs.display(),
        cgroup_root = %state.root.display(),
        policies = state.effective().len(),
        anchors = state.kernel.enforcer.attachments(),
        program = state.kernel.enforcer.program_tag(),
        "kad daemon ready"
    );
    notify::notify("READY=1");

    if let Some(logger) = state.kernel.enforcer.take_kill_log() {
        crate::killlog::spawn(logger);
    }
    let shared = Arc::new(Mutex::new(state));
    if let Some(listener) = metrics_listener {
        info!(
            "serving metrics on http://{}/metrics",
            config.metrics.map(|a| a.to_string()).unwrap_or_default()
        );
        let shared = Arc::clone(&shared);
        tokio::spawn(metrics::serve(listener, metrics::LIMITS, move || {
            let shared = Arc::clone(&shared);
            async move { shared.lock().await.metrics() }
        }));
    }
    let mut term = signal(SignalKind::terminate()).map_err(io_err("cannot catch", "SIGTERM"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(io_err("cannot catch", "SIGINT"))?;
    let mut hup = signal(SignalKind::hangup()).map_err(io_err("cannot catch", "SIGHUP"))?;
    tokio::spawn(server::serve(listener, server::LIMITS, {
        let shared = Arc::clone(&shared);
        move |request, pid| {
            let shared = Arc::clone(&shared);
            async move { shared.lock().await.handle(request, pid) }
        }
    }));
    let (pods_tx, mut pod_events) = tokio::sync::mpsc::channel::<PodEvent>(256);
    match config.pods.clone() {
        Some(PodSource::Kubernetes { node }) => {
            info!(node = %node, "watching the node's pods");
            tokio::spawn(kube_watch::run(node, pods_tx));
        }
        Some(PodSource::Events(path)) => {
            tokio::spawn(read_pod_events(path, pods_tx));
        }
        None => drop(pods_tx),
    }
    let mut tick = tokio::time::interval(EXEC_COLLECT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // inotify: cgroups created or removed at (or on the way to) policy paths. The kernel's
    // mkdir hook already gave a new cgroup its policy; the daemon records it and cleans up.
    let (events_tx, mut events) = tokio::sync::mpsc::channel::<Vec<PathBuf>>(64);
    tokio::spawn(async move {
        loop {
            match watcher.next().await {
                Ok(paths) => {
                    if events_tx.send(paths).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    error!("inotify: {e}");
                    break;
                }
            }
        }
    });
    loop {
        tokio::select! {
            _ = tick.tick() => shared.lock().await.collect_abandoned(),
            Some(paths) = events.recv() => shared.lock().await.on_cgroup_events(&paths),
            Some(event) = pod_events.recv() => shared.lock().await.on_pod_event(event),
            _ = hup.recv() => {
                info!("SIGHUP: reloading {}", config.config.display());
                if let Response::Error { message } = shared.lock().await.reload() {
                    error!("reload failed, keeping the previous config: {message}");
                }
            }
            _ = term.recv() => { info!("SIGTERM: stopping"); break; }
            _ = int.recv() => { info!("SIGINT: stopping"); break; }
        }
    }
    notify::notify("STOPPING=1");
    // Wait for a request in progress; the pins keep every policy enforced after we exit. A
    // clean stop leaves the whole table in policies.json (the journal folded in).
    {
        let state = shared.lock().await;
        if state.store.journal_len() > 0 {
            if let Err(e) = state.save() {
                warn!("cannot rewrite the state file (the journal keeps every change): {e}");
            }
        }
    }
    info!("kad daemon stopped; policies stay enforced (kad uninstall removes them)");
    Ok(())
}

/// Opens the enforcer, mapping its errors for the daemon.
fn open_enforcer(bpffs: &Path) -> Result<Enforcer, DaemonError> {
    Ok(Enforcer::open(bpffs)?)
}
