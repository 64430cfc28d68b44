//! `kad daemon`: owns the enforcer and the policy table, and serves the control socket.
use std::{
    collections::BTreeMap,
    io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{signal, SignalKind},
    sync::Mutex,
};
use tracing::{error, info, warn};

use crate::{
    cgroup::{self, CgroupError},
    enforcer::{Enforcer, EnforcerError},
    policy::Policy,
    protocol::{self, PolicyEntry, Request, Response, StatusReport, MAX_REQUEST_BYTES},
    store::{Store, StoreError},
    sys,
};

/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub bpffs: PathBuf,
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
    #[error("another kad daemon is already serving {0}")]
    SocketInUse(PathBuf),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A policy as the user set it, and the cgroup id it is attached to, if the cgroup exists.
struct Entry {
    policy: Policy,
    attached: Option<u64>,
}

struct State {
    config: DaemonConfig,
    root: PathBuf,
    enforcer: Enforcer,
    store: Store,
    table: BTreeMap<PathBuf, Entry>,
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(config: DaemonConfig) -> Result<(), DaemonError> {
    if !sys::is_root() {
        return Err(DaemonError::NotRoot);
    }
    let root = cgroup::find_root()?;
    let store = Store::new(&config.state_dir);
    // Read the state first: a corrupt file stops us before anything is touched.
    let saved = store.load()?;
    let enforcer = Enforcer::open(&config.bpffs)?;
    let mut state = State {
        config: config.clone(),
        root,
        enforcer,
        store,
        table: BTreeMap::new(),
    };
    for entry in saved {
        state.restore(entry);
    }
    let listener = bind(&config.socket)?;
    info!(
        socket = %config.socket.display(),
        bpffs = %config.bpffs.display(),
        cgroup_root = %state.root.display(),
        policies = state.table.len(),
        "kad daemon ready"
    );

    let shared = Arc::new(Mutex::new(Some(state)));
    let mut term = signal(SignalKind::terminate())
        .map_err(|source| io_error("cannot catch", "SIGTERM", source))?;
    let mut int = signal(SignalKind::interrupt())
        .map_err(|source| io_error("cannot catch", "SIGINT", source))?;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let shared = Arc::clone(&shared);
                    tokio::spawn(async move { serve(stream, shared).await });
                }
                Err(e) => warn!("accept failed: {e}"),
            },
            _ = term.recv() => { info!("SIGTERM: stopping"); break; }
            _ = int.recv() => { info!("SIGINT: stopping"); break; }
        }
    }
    let _ = std::fs::remove_file(&config.socket);
    // Taking the state waits for a request in progress; later ones are told we are stopping.
    if let Some(state) = shared.lock().await.take() {
        state.enforcer.close();
    }
    info!("kad daemon stopped");
    Ok(())
}

fn io_error(what: &'static str, path: impl Into<PathBuf>, source: io::Error) -> DaemonError {
    DaemonError::Io {
        what,
        path: path.into(),
        source,
    }
}

/// Binds the control socket, replacing a stale one but never a live daemon's.
fn bind(path: &Path) -> Result<UnixListener, DaemonError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io_error("cannot create", parent, e))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(DaemonError::SocketInUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(|e| io_error("cannot remove stale socket", path, e))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| io_error("cannot bind", path, e))?;
    // Anyone may list and ask for status; changes are checked against the peer's uid.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .map_err(|e| io_error("cannot set permissions on", path, e))?;
    Ok(listener)
}

async fn serve(stream: UnixStream, shared: Arc<Mutex<Option<State>>>) {
    let uid = stream.peer_cred().map(|c| c.uid()).ok();
    let (read, mut write) = stream.into_split();
    let reply = match tokio::time::timeout(REQUEST_TIMEOUT, read_request(read)).await {
        Err(_) => Response::error("timed out waiting for the request"),
        Ok(Err(message)) => Response::error(message),
        Ok(Ok(request)) => {
            if request.mutates() && uid != Some(0) {
                Response::error("permission denied: only root may change policies")
            } else {
                match shared.lock().await.as_mut() {
                    Some(state) => state.handle(request),
                    None => Response::error("the daemon is stopping"),
                }
            }
        }
    };
    if let Response::Error { message } = &reply {
        warn!("request refused: {message}");
    }
    let _ = write.write_all(&protocol::encode(&reply)).await;
    let _ = write.shutdown().await;
}

/// Reads one line (or everything up to EOF), refusing more than MAX_REQUEST_BYTES.
async fn read_request(read: tokio::net::unix::OwnedReadHalf) -> Result<Request, String> {
    let mut reader = BufReader::new(read.take(MAX_REQUEST_BYTES as u64 + 1));
    let mut line = Vec::new();
    reader
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| format!("cannot read the request: {e}"))?;
    if line.len() > MAX_REQUEST_BYTES {
        return Err(format!(
            "request too large (limit {MAX_REQUEST_BYTES} bytes)"
        ));
    }
    protocol::decode_request(&line)
}

impl State {
    fn handle(&mut self, request: Request) -> Response {
        match request {
            Request::Set { cgroup, policy } => self.set(&cgroup, policy),
            Request::Unset { cgroup } => self.unset(&cgroup),
            Request::List => Response::Policies {
                policies: self.entries(),
            },
            Request::Status => Response::Status(self.status()),
        }
    }

    fn set(&mut self, input: &str, policy: Policy) -> Response {
        if let Err(e) = policy.validate() {
            return Response::error(e.to_string());
        }
        let cgroup = match cgroup::resolve(&self.root, input) {
            Ok(cgroup) => cgroup,
            Err(e) => return Response::error(e.to_string()),
        };
        let previous = self.table.get(&cgroup.path).map(|e| (e.policy, e.attached));
        // Same path, new cgroup (it was removed and created again): drop the dead attachment.
        if let Some((_, Some(old_id))) = previous {
            if old_id != cgroup.id {
                self.enforcer.remove(old_id);
            }
        }
        if let Err(e) = self.enforcer.apply(&cgroup, &policy) {
            self.revert(&cgroup.path, previous);
            return Response::error(e.to_string());
        }
        self.table.insert(
            cgroup.path.clone(),
            Entry {
                policy,
                attached: Some(cgroup.id),
            },
        );
        if let Err(e) = self.save() {
            // Not saved means not done: put the kernel and the table back as they were.
            if previous.is_none() {
                self.enforcer.remove(cgroup.id);
            }
            self.revert(&cgroup.path, previous);
            return Response::error(e.to_string());
        }
        info!(cgroup = %cgroup.path.display(), %policy, "policy set");
        Response::Done {
            cgroup: cgroup.path.display().to_string(),
        }
    }

    /// Restores the table entry and kernel state that `path` had before a failed change.
    fn revert(&mut self, path: &Path, previous: Option<(Policy, Option<u64>)>) {
        match previous {
            None => {
                self.table.remove(path);
            }
            Some((policy, attached)) => {
                let current = cgroup::id_of(path).ok();
                let attached = match (attached, current) {
                    (Some(id), Some(now)) if id == now => {
                        let cg = cgroup::Cgroup {
                            path: path.to_path_buf(),
                            id,
                        };
                        self.enforcer.apply(&cg, &policy).ok().map(|()| id)
                    }
                    _ => None,
                };
                self.table
                    .insert(path.to_path_buf(), Entry { policy, attached });
            }
        }
    }

    fn unset(&mut self, input: &str) -> Response {
        // A cgroup that is gone can still have its policy removed, by the path it had.
        let path = match cgroup::resolve(&self.root, input) {
            Ok(cgroup) => cgroup.path,
            Err(CgroupError::NotFound(_)) => match cgroup::lexical_path(&self.root, input) {
                Ok(path) => path,
                Err(e) => return Response::error(e.to_string()),
            },
            Err(e) => return Response::error(e.to_string()),
        };
        let Some(entry) = self.table.remove(&path) else {
            return Response::error(format!("no policy for {}", path.display()));
        };
        if let Err(e) = self.save() {
            self.table.insert(path, entry);
            return Response::error(e.to_string());
        }
        if let Some(id) = entry.attached {
            self.enforcer.remove(id);
        }
        info!(cgroup = %path.display(), "policy removed");
        Response::Done {
            cgroup: path.display().to_string(),
        }
    }

    /// Re-applies a saved policy at start-up; a cgroup that does not exist now keeps its policy
    /// in the table (it is listed, and applied when set again).
    fn restore(&mut self, saved: PolicyEntry) {
        let policy = saved.policy();
        let path = PathBuf::from(&saved.cgroup);
        let attached = match cgroup::resolve(&self.root, &saved.cgroup) {
            Ok(cg) => match self.enforcer.apply(&cg, &policy) {
                Ok(()) => Some(cg.id),
                Err(e) => {
                    error!(cgroup = %saved.cgroup, "cannot apply saved policy: {e}");
                    None
                }
            },
            Err(e) => {
                warn!(cgroup = %saved.cgroup, "saved policy not applied: {e}");
                None
            }
        };
        self.table.insert(path, Entry { policy, attached });
    }

    fn entries(&self) -> Vec<PolicyEntry> {
        self.table
            .iter()
            .map(|(path, e)| PolicyEntry::new(path.display().to_string(), &e.policy))
            .collect()
    }

    fn save(&self) -> Result<(), StoreError> {
        self.store.save(&self.entries())
    }

    fn status(&self) -> StatusReport {
        StatusReport {
            program_loaded: true,
            kernel: sys::kernel_release(),
            cgroup_root: self.root.display().to_string(),
            bpffs: self.config.bpffs.display().to_string(),
            state_dir: self.config.state_dir.display().to_string(),
            attachments: self.enforcer.attachments(),
            policies: self.entries(),
        }
    }
}
