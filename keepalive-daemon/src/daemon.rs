//! `kad daemon`: owns the enforcer and the policy table, and serves the control socket.
use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
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

use crate::{
    cgroup::{self, CgroupError},
    config::{self as config_file, ConfigError},
    enforcer::{Enforcer, EnforcerError},
    metrics, notify,
    pathio::{io_err, PathIoError},
    policy::Policy,
    protocol::{PolicyDetail, PolicyEntry, Request, Response, StatsEntry, StatusReport},
    server,
    store::{Store, StoreError},
    sys,
};

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
    /// Policies set with `kad set`, by path; what the state file holds.
    set: BTreeMap<PathBuf, Policy>,
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
    // Pins, links and connections each hold an fd: a low soft limit must not cost policies.
    match sys::raise_nofile_limit() {
        Ok(limit) => info!("open files limit: {limit}"),
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
    let store = Store::new(&config.state_dir);
    // Read both files first: a corrupt one stops us before anything is touched.
    let set = store
        .load()?
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
        move |request| {
            let shared = Arc::clone(&shared);
            async move { shared.lock().await.handle(request) }
        }
    }));
    let mut tick = tokio::time::interval(SYNC_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
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

impl State {
    fn handle(&mut self, request: Request) -> Response {
        match request {
            Request::Set { cgroup, policy } => self.set(&cgroup, policy),
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
        if let Err(e) = self.save() {
            self.set.insert(path, previous);
            return Response::error(e.to_string());
        }
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

    /// Removes the transient cgroups (and policies) of `kad exec` runs that were killed before
    /// they could do it themselves, once their processes are gone.
    fn collect_abandoned(&mut self) {
        let abandoned: Vec<PathBuf> = self
            .set
            .keys()
            .filter(|path| crate::exec::is_abandoned(path))
            .cloned()
            .collect();
        if abandoned.is_empty() {
            return;
        }
        for path in &abandoned {
            self.set.remove(path);
        }
        if let Err(e) = self.save() {
            error!("cannot save after removing abandoned kad exec policies: {e}");
        }
        for path in abandoned {
            let _ = self.sync_path(&path);
            match std::fs::remove_dir(&path) {
                Ok(()) => info!(cgroup = %path.display(), "removed an abandoned kad exec cgroup"),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    warn!(cgroup = %path.display(), "cannot remove an abandoned kad exec cgroup: {e}")
                }
            }
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
        let entries: Vec<PolicyEntry> = self
            .set
            .iter()
            .map(|(path, policy)| PolicyEntry::new(path.display().to_string(), policy))
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
