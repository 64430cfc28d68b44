//! `kad daemon`: owns the enforcer and the policy table, and serves the control socket.
//!
//! One thread (`kad-state`, `actor.rs`) owns the kernel and disk state and takes commands; the
//! async side (control socket, `/metrics`, signals, inotify, pod and Docker events, ticks) only
//! sends them, and answers reads from the snapshot the thread publishes after its commands.
use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

mod actor;
mod anchoring;
pub mod config;
mod container_policies;
mod docker_policies;
mod exec_runs;
pub mod metrics;
mod pod_policies;
pub mod reconcile;
mod report;
mod saving;
pub mod server;
mod settings;
mod snapshot;
mod state;
pub mod store;
mod sync;
mod table;
#[cfg(test)]
mod tests;

use actor::Command;
use pod_policies::read_pod_events;
pub use settings::{DaemonConfig, DaemonError, PodSource};

use crate::{
    api::protocol::Response, containers::docker::DockerEvent, containers::docker_watch,
    containers::kube_watch, containers::pods::PodEvent, daemon::store::StateLock, host::cgroup,
    host::notify, host::pathio::io_err, host::sys, host::watch::Watcher,
};

/// How often the cgroups of `kad exec` runs are checked for being abandoned (only they: policy
/// paths are followed through inotify, with no periodic scan).
const EXEC_COLLECT_INTERVAL: Duration = Duration::from_secs(1);
/// Runs the daemon until SIGTERM or SIGINT. Enforcement outlives it: links and the map stay
/// pinned, and the next start adopts them.
pub async fn run(config: DaemonConfig) -> Result<(), DaemonError> {
    if !sys::is_root() {
        return Err(DaemonError::NotRoot);
    }
    sys::tune_allocator();
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
    let listeners = server::bind(&config.socket)?;
    let result = run_bound(config.clone(), root, listeners, metrics_listener).await;
    let _ = std::fs::remove_file(&config.socket);
    let _ = std::fs::remove_file(crate::api::protocol::root_socket(&config.socket));
    result
}

async fn run_bound(
    config: DaemonConfig,
    root: PathBuf,
    listeners: server::Listeners,
    metrics_listener: Option<tokio::net::TcpListener>,
) -> Result<(), DaemonError> {
    // One daemon per state directory, held until we exit.
    let _state_lock = StateLock::acquire(&config.state_dir)?;
    // Registered with this runtime, which reads its events; the state thread sets its watches.
    let watcher = Watcher::new().map_err(io_err("cannot start", "inotify"))?;
    // The start runs on the state thread, which owns the kernel and disk state from then on.
    let (state, kill_log) = actor::start(config.clone(), root, watcher.clone()).await?;
    notify::notify("READY=1");

    if let Some(logger) = kill_log {
        crate::kernel::killlog::spawn(logger);
    }
    if let Some(listener) = metrics_listener {
        info!(
            "serving metrics on http://{}/metrics",
            config.metrics.map(|a| a.to_string()).unwrap_or_default()
        );
        let (state, per_policy) = (state.clone(), config.metrics_policies);
        // Built on a blocking thread: a scrape reads a counter per policy, and the runtime's
        // one thread also serves root's socket.
        tokio::spawn(metrics::serve(listener, metrics::LIMITS, move || {
            let state = state.clone();
            async move {
                tokio::task::spawn_blocking(move || state.metrics(per_policy))
                    .await
                    .map_err(|e| format!("the metrics could not be built: {e}"))
            }
        }));
    }
    let mut term = signal(SignalKind::terminate()).map_err(io_err("cannot catch", "SIGTERM"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(io_err("cannot catch", "SIGINT"))?;
    let mut hup = signal(SignalKind::hangup()).map_err(io_err("cannot catch", "SIGHUP"))?;
    tokio::spawn(server::serve(listeners, server::LIMITS, {
        let state = state.clone();
        move |request, peer| {
            let state = state.clone();
            async move { state.handle(request, peer).await }
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
    tokio::spawn({
        let state = state.clone();
        async move {
            while let Some(event) = pod_events.recv().await {
                state.send(Command::PodEvent(event)).await;
            }
        }
    });
    if let Some(socket) = config.docker.clone() {
        info!(socket = %socket.display(), "watching Docker's containers");
        let (docker_tx, mut docker_events) = tokio::sync::mpsc::channel::<DockerEvent>(256);
        tokio::spawn(docker_watch::run(socket.display().to_string(), docker_tx));
        let state = state.clone();
        tokio::spawn(async move {
            while let Some(event) = docker_events.recv().await {
                state.send(Command::DockerEvent(event)).await;
            }
        });
    }
    tokio::spawn({
        let state = state.clone();
        async move {
            // Asleep until there is a `kad exec` run to watch: an idle daemon has no timer.
            while state.exec_runs().await {
                tokio::time::sleep(EXEC_COLLECT_INTERVAL).await;
                state.nudge(Command::CollectAbandoned);
            }
        }
    });
    // inotify: cgroups created or removed at (or on the way to) policy paths. The kernel's
    // mkdir hook already gave a new cgroup its policy; the daemon records it and cleans up.
    tokio::spawn({
        let state = state.clone();
        async move {
            loop {
                match watcher.next().await {
                    Ok(paths) => state.send(Command::CgroupEvents(paths)).await,
                    Err(e) => {
                        error!("inotify: {e}");
                        break;
                    }
                }
            }
        }
    });
    // inotify on the state directory's parent: the directory removed (or replaced) while the
    // daemon runs is made again and written whole at once, not only at the next save. (Its own
    // IN_DELETE_SELF would wait for the lock's descriptor to close.)
    let parent = config.state_dir.parent().map(std::path::Path::to_path_buf);
    match (Watcher::new(), parent) {
        (Ok(state_dir_watch), Some(parent)) => {
            let state = state.clone();
            let dir = config.state_dir.clone();
            tokio::spawn(async move {
                state_dir_watch.set(&std::collections::BTreeSet::from([parent]));
                while let Ok(paths) = state_dir_watch.next().await {
                    if paths.contains(&dir) {
                        state.nudge(Command::CheckStateDir);
                    }
                }
            });
        }
        (Err(e), _) => warn!("inotify on the state directory: {e} (checked at each save only)"),
        (_, None) => {}
    }
    let reloads = Arc::new(AtomicUsize::new(0));
    loop {
        tokio::select! {
            _ = hup.recv() => {
                // One reload running and one waiting are enough: the waiting one reads the
                // file after every signal so far. A storm of signals queues no more.
                if reloads.load(Ordering::Relaxed) >= 2 {
                    continue;
                }
                reloads.fetch_add(1, Ordering::Relaxed);
                info!("SIGHUP: reloading {}", config.config.display());
                let (state, reloads) = (state.clone(), reloads.clone());
                tokio::spawn(async move {
                    if let Response::Error { message } = state.ask(|reply| Command::Reload { reply }).await {
                        error!("reload failed: {message}");
                    }
                    reloads.fetch_sub(1, Ordering::Relaxed);
                });
            }
            _ = term.recv() => { info!("SIGTERM: stopping"); break; }
            _ = int.recv() => { info!("SIGINT: stopping"); break; }
            _ = state.stopped() => return Err(DaemonError::StateThread),
        }
    }
    notify::notify("STOPPING=1");
    // The state thread finishes the commands before this one (a change in progress is not
    // lost); the pins keep every policy enforced after we exit. A clean stop leaves the whole
    // table in policies.json (the journal folded in).
    state.stop().await;
    if crate::kernel::bpffs::outlives_daemon(&config.bpffs) {
        info!("kad daemon stopped; policies stay enforced (kad uninstall removes them)");
    } else {
        warn!(
            "kad daemon stopped; its policies end when this mount namespace goes: only its bpf \
             filesystem holds them (--private-bpffs)"
        );
    }
    Ok(())
}
