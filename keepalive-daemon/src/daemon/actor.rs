//! The state thread: the one owner of the kernel and disk state. It runs the daemon's start,
//! then one command at a time (verifier loads, fsyncs, cgroupfs walks and refreshes happen
//! here, never on the async runtime), and after each command publishes a [`Snapshot`] that reads
//! are answered from without waiting for it.
use std::{path::PathBuf, sync::Arc};

use tokio::sync::{mpsc, oneshot, watch};
use tracing::warn;

use super::{
    settings::{DaemonConfig, DaemonError},
    snapshot::Snapshot,
    state::State,
};
use crate::{
    api::protocol::{Peer, Request, Response},
    containers::{docker::DockerEvent, pods::PodEvent},
    host::watch::Watcher,
    kernel::killlog::KillLog,
    kernel::{CounterReader, Enforcer},
    model::policy::Policy,
};

/// Commands waiting for the state thread; senders wait (in their own tasks) when it is full.
const QUEUE: usize = 64;

type Reply = oneshot::Sender<Response>;
type KillLogger = aya_log::EbpfLogger<KillLog>;

pub(super) enum Command {
    /// `uid` is who asks: root, or a user for a cgroup delegated to them.
    Set {
        cgroup: String,
        policy: Policy,
        container: Option<String>,
        uid: u32,
        reply: Reply,
    },
    /// `uid` as for `Set`: a user's OCI hook (rootless podman) for the policies they set.
    ContainerStopped {
        cgroup: String,
        container: String,
        bundle: String,
        uid: u32,
        reply: Reply,
    },
    /// `peer` is the asking process, as the kernel told it.
    Exec {
        cgroup: String,
        policy: Policy,
        peer: Peer,
        reply: Reply,
    },
    Unset {
        cgroup: String,
        uid: u32,
        reply: Reply,
    },
    SetHost {
        policy: Policy,
        reply: Reply,
    },
    UnsetHost {
        reply: Reply,
    },
    Reload {
        reply: Reply,
    },
    /// Cgroups were created or removed at these paths (from inotify).
    CgroupEvents(Vec<PathBuf>),
    PodEvent(PodEvent),
    DockerEvent(DockerEvent),
    /// Look for `kad exec` runs that are gone.
    CollectAbandoned,
    /// The state directory may have been removed: made again and written whole if so.
    CheckStateDir,
    /// Fold the journal into the state file and stop; the commands queued before it are done
    /// first.
    Stop {
        done: oneshot::Sender<()>,
    },
}

/// The async side's handle on the state thread: commands go to it, reads come from the last
/// snapshot it published and, for what the kernel changes on its own, from the maps.
#[derive(Clone)]
pub(super) struct StateHandle {
    commands: mpsc::Sender<Command>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    reader: Arc<dyn CounterReader>,
    /// The cgroup2 mount point, which the replies' paths start with.
    root: PathBuf,
}

/// Starts the state thread and waits for the daemon's start to be done there. Returns the
/// handle and the kernel's kill events, for the runtime to read.
pub(super) async fn start(
    config: DaemonConfig,
    root: PathBuf,
    watcher: Watcher,
) -> Result<(StateHandle, Option<KillLogger>), DaemonError> {
    let daemon_root = root.clone();
    let (ready_tx, ready) = oneshot::channel();
    let (commands, queue) = mpsc::channel(QUEUE);
    std::thread::Builder::new()
        .name("kad-state".into())
        .spawn(move || {
            let mut state = match State::start(config, root, watcher, |config| {
                Ok(Box::new(Enforcer::open(
                    &config.bpffs,
                    config.private_bpffs,
                )?))
            }) {
                Ok(state) => state,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            crate::host::sys::release_free_memory();
            let kill_log = state.reconciler.kernel.take_kill_log();
            let reader = state.reconciler.kernel.reader();
            let (publish, snapshot) = watch::channel(Arc::new(state.snapshot()));
            if ready_tx.send(Ok((snapshot, reader, kill_log))).is_ok() {
                run(state, queue, publish);
            }
        })
        .map_err(DaemonError::Thread)?;
    let (snapshot, reader, kill_log) = ready.await.map_err(|_| DaemonError::StateThread)??;
    Ok((
        StateHandle {
            commands,
            snapshot,
            reader,
            root: daemon_root,
        },
        kill_log,
    ))
}

/// The thread's loop: one command at a time; after each, the snapshot, then the reply (so that
/// a client reading after its change sees it). A snapshot rebuilds only the rows the command
/// touched.
fn run(
    mut state: State,
    mut queue: mpsc::Receiver<Command>,
    publish: watch::Sender<Arc<Snapshot>>,
) {
    while let Some(command) = queue.blocking_recv() {
        let (reply, response) = match command {
            Command::Set {
                cgroup,
                policy,
                container,
                uid,
                reply,
            } => (
                Some(reply),
                Some(state.set_for(&cgroup, policy, container, uid)),
            ),
            Command::ContainerStopped {
                cgroup,
                container,
                bundle,
                uid,
                reply,
            } => (
                Some(reply),
                Some(state.container_stopped(&cgroup, &container, &bundle, uid)),
            ),
            Command::Exec {
                cgroup,
                policy,
                peer,
                reply,
            } => (Some(reply), Some(state.exec(&cgroup, policy, peer))),
            Command::Unset { cgroup, uid, reply } => (Some(reply), Some(state.unset(&cgroup, uid))),
            Command::SetHost { policy, reply } => {
                let root = state.root.clone();
                (Some(reply), Some(state.set_path(root, policy)))
            }
            Command::UnsetHost { reply } => {
                let root = state.root.clone();
                (Some(reply), Some(state.unset_path(root)))
            }
            Command::Reload { reply } => (Some(reply), Some(state.reload())),
            Command::CgroupEvents(paths) => {
                state.on_cgroup_events(&paths);
                (None, None)
            }
            Command::PodEvent(event) => {
                state.on_pod_event(event);
                (None, None)
            }
            Command::DockerEvent(event) => {
                state.on_docker_event(event);
                (None, None)
            }
            Command::CheckStateDir => {
                state.ensure_state_dir();
                continue; // no policy changed
            }
            Command::CollectAbandoned => {
                let exec = state.collect_abandoned();
                if !(state.collect_removed_containers() || exec) {
                    continue; // nothing changed
                }
                (None, None)
            }
            Command::Stop { done } => {
                // A clean stop leaves the whole table in policies.json.
                if state.store.journal_len() > 0 {
                    if let Err(e) = state.save() {
                        warn!(
                            "cannot rewrite the state file (the journal keeps every change): {e}"
                        );
                    }
                }
                drop(state);
                let _ = done.send(());
                return;
            }
        };
        publish.send_replace(Arc::new(state.snapshot()));
        if let (Some(reply), Some(response)) = (reply, response) {
            let _ = reply.send(response);
        }
    }
}

impl StateHandle {
    /// Answers a request: reads from the snapshot, changes through the state thread.
    /// Replies with paths say which cgroup2 mount point they are below.
    pub(super) async fn handle(&self, request: Request, peer: Peer) -> Response {
        self.answer(request, peer).await.with_root(&self.root)
    }

    async fn answer(&self, request: Request, peer: Peer) -> Response {
        match request {
            Request::Set {
                cgroup,
                policy,
                container,
            } => {
                self.ask(|reply| Command::Set {
                    cgroup,
                    policy,
                    container,
                    uid: peer.uid,
                    reply,
                })
                .await
            }
            Request::ContainerStopped {
                cgroup,
                container,
                bundle,
            } => {
                self.ask(|reply| Command::ContainerStopped {
                    cgroup,
                    container,
                    bundle,
                    uid: peer.uid,
                    reply,
                })
                .await
            }
            Request::Exec { cgroup, policy } => {
                self.ask(|reply| Command::Exec {
                    cgroup,
                    policy,
                    peer,
                    reply,
                })
                .await
            }
            Request::Unset { cgroup } => {
                self.ask(|reply| Command::Unset {
                    cgroup,
                    uid: peer.uid,
                    reply,
                })
                .await
            }
            Request::SetHost { policy } => {
                self.ask(|reply| Command::SetHost { policy, reply }).await
            }
            Request::UnsetHost => self.ask(|reply| Command::UnsetHost { reply }).await,
            Request::Reload => self.ask(|reply| Command::Reload { reply }).await,
            Request::List => Response::Policies {
                policies: self.snapshot().policies(),
                root: None,
            },
            Request::Status => Response::Status(Box::new(self.snapshot().status(&*self.reader))),
            Request::Stats => {
                let snapshot = self.snapshot();
                Response::Stats {
                    stats: snapshot.stats(&*self.reader),
                    kills_counted: snapshot.kills_counted(),
                    root: None,
                }
            }
        }
    }

    /// The Prometheus exposition served at /metrics, with per-policy series for the first
    /// `per_policy` policies.
    pub(super) fn metrics(&self, per_policy: usize) -> String {
        self.snapshot().metrics(&*self.reader, per_policy)
    }

    /// Whether there are `kad exec` runs to collect when their owners are gone.
    /// Returns once the state has a `kad exec` run to watch (at once if it has one now); false
    /// if the state thread is gone.
    pub(super) async fn exec_runs(&self) -> bool {
        let mut snapshot = self.snapshot.clone();
        let found = snapshot.wait_for(|s| s.exec_runs() > 0).await.is_ok();
        found
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&self.snapshot.borrow())
    }

    /// Sends a command and waits for its reply.
    pub(super) async fn ask(&self, command: impl FnOnce(Reply) -> Command) -> Response {
        let (reply, response) = oneshot::channel();
        if self.commands.send(command(reply)).await.is_err() {
            return stopping();
        }
        response.await.unwrap_or_else(|_| stopping())
    }

    /// Sends a command that has no reply, waiting while the queue is full.
    pub(super) async fn send(&self, command: Command) {
        let _ = self.commands.send(command).await;
    }

    /// Sends a command unless the queue is full: for a periodic nudge, which the next one
    /// replaces.
    pub(super) fn nudge(&self, command: Command) {
        let _ = self.commands.try_send(command);
    }

    /// Resolves when the state thread is gone (a clean stop, or a panic).
    pub(super) async fn stopped(&self) {
        self.commands.closed().await
    }

    /// Stops the state thread once the commands queued before are done.
    pub(super) async fn stop(&self) {
        let (done, stopped) = oneshot::channel();
        if self.commands.send(Command::Stop { done }).await.is_ok() {
            let _ = stopped.await;
        }
    }
}

fn stopping() -> Response {
    Response::error("the daemon is stopping: try again once it is back")
}
