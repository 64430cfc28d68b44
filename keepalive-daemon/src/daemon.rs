//! `kad daemon`: owns the enforcer and the policy table, and serves the control socket.
use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
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
    config::{self as config_file, ConfigError},
    enforcer::{Enforcer, EnforcerError},
    exec::{self, ExecOwner},
    metrics, notify,
    pathio::{io_err, PathIoError},
    policy::Policy,
    protocol::{
        self, PolicyDetail, PolicyEntry, Request, Response, StatsEntry, StatusReport,
        MAX_REQUEST_BYTES,
    },
    store::{StateLock, Store, StoreError, StoredPolicy},
    sys,
};

/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// What is read and thrown away after replying to a request that was not read whole.
const DRAIN_LIMIT: u64 = 16 << 20;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
/// How often policies are checked against the cgroups at their paths.
const SYNC_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub bpffs: PathBuf,
    pub config: PathBuf,
    /// Where to serve Prometheus metrics (`/metrics`); off when None.
    pub metrics: Option<std::net::SocketAddr>,
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

/// Where a policy in force comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `kad set`, saved in the state directory; wins over the config file.
    Set,
    /// The config file.
    Config,
}

struct State {
    config: DaemonConfig,
    root: PathBuf,
    enforcer: Enforcer,
    store: Store,
    /// Policies set with `kad set` (and `kad exec`), by path; what the state file holds.
    set: BTreeMap<PathBuf, Policy>,
    /// The `kad exec` run that owns each of the paths in `set` that are its transient cgroups.
    exec_owners: BTreeMap<PathBuf, ExecOwner>,
    /// Policies of the config file, by path.
    from_config: BTreeMap<PathBuf, Policy>,
    /// What is in the kernel now: per path, the cgroup id attached and the policy in its entry.
    in_force: BTreeMap<PathBuf, (u64, Policy)>,
    /// The last error applying a path's policy, logged once rather than every tick.
    failing: BTreeMap<PathBuf, String>,
}

/// Runs the daemon until SIGTERM or SIGINT. Enforcement outlives it: links and the map stay
/// pinned, and the next start adopts them.
pub async fn run(config: DaemonConfig) -> Result<(), DaemonError> {
    if !sys::is_root() {
        return Err(DaemonError::NotRoot);
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
    let listener = bind(&config.socket)?;
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
    let enforcer = Enforcer::open(&config.bpffs)?;
    let mut state = State {
        config: config.clone(),
        root,
        enforcer,
        store,
        set,
        exec_owners,
        from_config,
        in_force: BTreeMap::new(),
        failing: BTreeMap::new(),
    };
    state.sync_all();
    // Pins and map entries an earlier run left for cgroups or policies that are gone.
    state.retain_in_force();
    info!(
        socket = %config.socket.display(),
        bpffs = %config.bpffs.display(),
        cgroup_root = %state.root.display(),
        policies = state.effective().len(),
        attached = state.enforcer.attachments(),
        "kad daemon ready"
    );
    notify::notify("READY=1");

    let shared = Arc::new(Mutex::new(state));
    if let Some(listener) = metrics_listener {
        info!(
            "serving metrics on http://{}/metrics",
            config.metrics.map(|a| a.to_string()).unwrap_or_default()
        );
        let shared = Arc::clone(&shared);
        tokio::spawn(metrics::serve(listener, move || {
            let shared = Arc::clone(&shared);
            async move { shared.lock().await.metrics() }
        }));
    }
    let mut term = signal(SignalKind::terminate()).map_err(io_err("cannot catch", "SIGTERM"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(io_err("cannot catch", "SIGINT"))?;
    let mut hup = signal(SignalKind::hangup()).map_err(io_err("cannot catch", "SIGHUP"))?;
    let mut tick = tokio::time::interval(SYNC_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let shared = Arc::clone(&shared);
                    tokio::spawn(async move { serve(stream, shared).await });
                }
                Err(e) => warn!("accept failed: {e}"),
            },
            _ = tick.tick() => shared.lock().await.sync_all(),
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
    // Wait for a request in progress; the pins keep every policy enforced after we exit.
    drop(shared.lock().await);
    info!("kad daemon stopped; policies stay enforced (kad uninstall removes them)");
    Ok(())
}

/// Binds the control socket, replacing a stale one but never a live daemon's.
fn bind(path: &Path) -> Result<UnixListener, DaemonError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io_err("cannot create", parent))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(DaemonError::SocketInUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(io_err("cannot remove stale socket", path))?;
    }
    let listener = UnixListener::bind(path).map_err(io_err("cannot bind", path))?;
    // Anyone may list and ask for status; changes are checked against the peer's uid.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .map_err(io_err("cannot set permissions on", path))?;
    Ok(listener)
}

async fn serve(stream: UnixStream, shared: Arc<Mutex<State>>) {
    let cred = stream.peer_cred().ok();
    let uid = cred.map(|c| c.uid());
    // In our PID namespace (the kernel translates it); `kad exec` is recorded by it.
    let pid = cred
        .and_then(|c| c.pid())
        .and_then(|p| u32::try_from(p).ok());
    let (mut read, mut write) = stream.into_split();
    let reply = match tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut read)).await {
        Err(_) => Response::error("timed out waiting for the request"),
        Ok(Err(message)) => Response::error(message),
        Ok(Ok(request)) => {
            if request.mutates() && uid != Some(0) {
                Response::error("permission denied: only root may change policies")
            } else {
                shared.lock().await.handle(request, pid)
            }
        }
    };
    if let Response::Error { message } = &reply {
        warn!("request refused: {message}");
    }
    let _ = write.write_all(&protocol::encode(&reply)).await;
    let _ = write.shutdown().await;
    // Closing with unread input would reset the connection before the client reads the reply
    // (an oversized request): discard what is left, within limits.
    let mut rest = (&mut read).take(DRAIN_LIMIT);
    let _ = tokio::time::timeout(
        DRAIN_TIMEOUT,
        tokio::io::copy(&mut rest, &mut tokio::io::sink()),
    )
    .await;
}

/// Reads one line (or everything up to EOF), refusing more than MAX_REQUEST_BYTES.
async fn read_request(read: &mut tokio::net::unix::OwnedReadHalf) -> Result<Request, String> {
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
    /// `peer` is the asking process's pid, if the kernel told it.
    fn handle(&mut self, request: Request, peer: Option<u32>) -> Response {
        match request {
            Request::Set { cgroup, policy } => self.set(&cgroup, policy),
            Request::Exec { cgroup, policy } => self.exec(&cgroup, policy, peer),
            Request::Unset { cgroup } => self.unset(&cgroup),
            Request::Reload => self.reload(),
            Request::List => Response::Policies {
                policies: self.entries(),
            },
            Request::Status => Response::Status(self.status()),
            Request::Stats => Response::Stats {
                stats: self.stats(),
                kills_counted: self.enforcer.counts_kills(),
            },
        }
    }

    /// Counters of every policy in force (a policy waiting for its cgroup has none).
    fn stats(&self) -> Vec<StatsEntry> {
        self.in_force
            .iter()
            .map(|(path, (id, _))| {
                let c = self.enforcer.counters(*id);
                StatsEntry {
                    cgroup: path.display().to_string(),
                    connect: c.active,
                    accept: c.passive,
                    setsockopt_failures: c.failures,
                    keepalive_kills: c.keepalive_kills,
                }
            })
            .collect()
    }

    /// The Prometheus exposition served at /metrics.
    pub fn metrics(&self) -> String {
        metrics::render(
            &self.stats(),
            self.effective().len(),
            self.enforcer.attachments(),
        )
    }

    /// Policies by path: the config file's, overridden by those set with `kad set`.
    fn effective(&self) -> BTreeMap<PathBuf, (Policy, Source)> {
        let mut table: BTreeMap<PathBuf, (Policy, Source)> = self
            .from_config
            .iter()
            .map(|(path, policy)| (path.clone(), (*policy, Source::Config)))
            .collect();
        for (path, policy) in &self.set {
            table.insert(path.clone(), (*policy, Source::Set));
        }
        table
    }

    fn set(&mut self, input: &str, policy: Policy) -> Response {
        if let Err(e) = policy.validate() {
            return Response::error(e.to_string());
        }
        let cgroup = match cgroup::resolve(&self.root, input) {
            Ok(cgroup) => cgroup,
            Err(e) => return Response::error(e.to_string()),
        };
        let previous = self.set.insert(cgroup.path.clone(), policy);
        let undo = |state: &mut State| {
            match previous {
                Some(p) => state.set.insert(cgroup.path.clone(), p),
                None => state.set.remove(&cgroup.path),
            };
            let _ = state.sync_path(&cgroup.path);
        };
        if let Err(e) = self.sync_path(&cgroup.path) {
            undo(self);
            return Response::error(e.to_string());
        }
        // Not saved means not done: put the kernel and the table back as they were.
        if let Err(e) = self.save() {
            undo(self);
            return Response::error(e.to_string());
        }
        info!(cgroup = %cgroup.path.display(), %policy, "policy set");
        Response::Done {
            cgroup: cgroup.path.display().to_string(),
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
        let Some(previous) = self.set.remove(&path) else {
            if self.from_config.contains_key(&path) {
                return Response::error(format!(
                    "the policy for {} comes from {}: remove it there and run `kad reload`",
                    path.display(),
                    self.config.config.display()
                ));
            }
            return Response::error(format!("no policy for {}", path.display()));
        };
        // A full disk: the policy stays, in force and in the file, and the error says why.
        if let Err(e) = self.save() {
            self.set.insert(path, previous);
            return Response::error(format!("{e}; the policy stays"));
        }
        self.exec_owners.remove(&path);
        if let Err(e) = self.sync_path(&path) {
            // The config file's policy for this path could not be put back in force.
            error!(cgroup = %path.display(), "{e}");
        }
        info!(cgroup = %path.display(), "policy removed");
        Response::Done {
            cgroup: path.display().to_string(),
        }
    }

    /// Re-reads the config file; on error the previous config stays in force.
    fn reload(&mut self) -> Response {
        match config_file::load(&self.config.config, &self.root) {
            Ok(from_config) => {
                self.from_config = from_config;
                self.sync_all();
                self.retain_in_force();
                info!(config = %self.config.config.display(), policies = self.from_config.len(), "config reloaded");
                Response::Reloaded {
                    policies: self.from_config.len(),
                }
            }
            Err(e) => Response::error(e.to_string()),
        }
    }

    /// Brings the kernel in line with the table for one path: attaches to the cgroup now at
    /// that path (a cgroup re-created there has a new id), updates the map, or detaches.
    fn sync_path(&mut self, path: &Path) -> Result<(), EnforcerError> {
        let want = self
            .set
            .get(path)
            .or_else(|| self.from_config.get(path))
            .copied();
        let have = self.in_force.get(path).copied();
        let current = cgroup::id_of(path).ok();
        match (want, current) {
            (Some(policy), Some(id)) => {
                if have == Some((id, policy)) {
                    return Ok(());
                }
                if let Some((old, _)) = have.filter(|(old, _)| *old != id) {
                    self.enforcer.remove(old);
                    self.in_force.remove(path);
                }
                let cg = cgroup::Cgroup {
                    path: path.to_path_buf(),
                    id,
                };
                self.enforcer.apply(&cg, &policy)?;
                self.in_force.insert(path.to_path_buf(), (id, policy));
            }
            _ => {
                if let Some((old, _)) = have {
                    self.enforcer.remove(old);
                    self.in_force.remove(path);
                }
            }
        }
        Ok(())
    }

    /// `sync_path` for every path in the table or in force; run at start, on reload and every
    /// SYNC_INTERVAL, so policies follow cgroups that are removed and created again.
    fn sync_all(&mut self) {
        self.collect_abandoned();
        let paths: BTreeSet<PathBuf> = self
            .effective()
            .into_keys()
            .chain(self.in_force.keys().cloned())
            .collect();
        for path in paths {
            match self.sync_path(&path) {
                Ok(()) => {
                    if self.failing.remove(&path).is_some() {
                        info!(cgroup = %path.display(), "policy applied");
                    }
                }
                Err(e) => {
                    let message = e.to_string();
                    if self.failing.get(&path) != Some(&message) {
                        error!(cgroup = %path.display(), "cannot apply policy: {message}");
                        self.failing.insert(path, message);
                    }
                }
            }
        }
    }

    /// `kad exec`: a policy for the caller's transient cgroup, recorded as owned by the caller
    /// so that it is collected if the caller dies first. Only a cgroup kad recorded this way is
    /// ever removed by the daemon.
    fn exec(&mut self, input: &str, policy: Policy, peer: Option<u32>) -> Response {
        let Some(pid) = peer.filter(|&pid| pid != 0) else {
            return Response::error(
                "kad exec: the kernel did not say which process is asking (its PID namespace is not below the daemon's)",
            );
        };
        let owner = match ExecOwner::of(pid) {
            Ok(owner) => owner,
            Err(e) => {
                return Response::error(format!("kad exec: cannot identify process {pid}: {e}"))
            }
        };
        let path = match cgroup::resolve(&self.root, input) {
            Ok(cgroup) => cgroup.path,
            Err(e) => return Response::error(e.to_string()),
        };
        if self.set.contains_key(&path) && !self.exec_owners.contains_key(&path) {
            return Response::error(format!(
                "{} has a policy set with kad set: kad exec needs a cgroup of its own",
                path.display()
            ));
        }
        let previous = self.exec_owners.insert(path.clone(), owner);
        let reply = self.set(input, policy);
        if let Response::Error { .. } = reply {
            match previous {
                Some(owner) => self.exec_owners.insert(path, owner),
                None => self.exec_owners.remove(&path),
            };
        }
        reply
    }

    /// Removes the transient cgroups (and policies) of `kad exec` runs that were killed before
    /// they could do it themselves, once their processes are gone. Only paths recorded as a
    /// `kad exec`'s: a cgroup merely named like one is the user's.
    fn collect_abandoned(&mut self) {
        let abandoned: Vec<PathBuf> = self
            .exec_owners
            .iter()
            .filter(|(path, owner)| {
                !self.set.contains_key(*path) || exec::is_abandoned(path, owner)
            })
            .map(|(path, _)| path.clone())
            .collect();
        if abandoned.is_empty() {
            return;
        }
        for path in &abandoned {
            self.exec_owners.remove(path);
            if self.set.remove(path).is_none() {
                continue;
            }
            let _ = self.sync_path(path);
            match std::fs::remove_dir(path) {
                Ok(()) => info!(cgroup = %path.display(), "removed an abandoned kad exec cgroup"),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    info!(cgroup = %path.display(), "removed the policy of an abandoned kad exec")
                }
                Err(e) => {
                    warn!(cgroup = %path.display(), "cannot remove an abandoned kad exec cgroup: {e}")
                }
            }
        }
        if let Err(e) = self.save() {
            error!("cannot save after removing abandoned kad exec policies: {e}");
        }
    }

    fn retain_in_force(&mut self) {
        let keep: HashSet<u64> = self.in_force.values().map(|(id, _)| *id).collect();
        self.enforcer.retain(&keep);
    }

    fn entries(&self) -> Vec<PolicyEntry> {
        self.effective()
            .iter()
            .map(|(path, (policy, _))| PolicyEntry::new(path.display().to_string(), policy))
            .collect()
    }

    fn save(&self) -> Result<(), StoreError> {
        let entries: Vec<StoredPolicy> = self
            .set
            .iter()
            .map(|(path, policy)| {
                let owner = self.exec_owners.get(path).cloned();
                StoredPolicy::new(path.display().to_string(), policy, owner)
            })
            .collect();
        self.store.save(&entries)
    }

    fn status(&self) -> StatusReport {
        let table = self.effective();
        StatusReport {
            program_loaded: true,
            kernel: sys::kernel_release(),
            cgroup_root: self.root.display().to_string(),
            bpffs: self.config.bpffs.display().to_string(),
            state_dir: self.config.state_dir.display().to_string(),
            config: self.config.config.display().to_string(),
            attachments: self.enforcer.attachments(),
            map_entries: self.enforcer.map_entries(),
            policies: self.entries(),
            details: table
                .iter()
                .map(|(path, (_, source))| PolicyDetail {
                    cgroup: path.display().to_string(),
                    source: match source {
                        Source::Set => "set",
                        Source::Config => "config",
                    }
                    .to_string(),
                    cgroup_id: self.in_force.get(path).map(|(id, _)| *id),
                    error: self.failing.get(path).cloned(),
                })
                .collect(),
            counters: self.stats(),
            kills_counted: self.enforcer.counts_kills(),
        }
    }
}
