//! `kad daemon`: owns the enforcer and the policy table, and serves the control socket.
use std::{
    collections::{BTreeMap, BTreeSet},
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
    enforcer::{self, Enforcer, EnforcerError},
    exec::{self, ExecOwner},
    kube_watch, metrics, notify,
    pathio::{io_err, PathIoError},
    pods::{KubeletLayout, PodEvent, PodTable},
    policy::Policy,
    protocol::{
        AnchorEntry, FeatureEntry, PodsStatus, PolicyDetail, PolicyEntry, Request, Response,
        StatsEntry, StatusReport,
    },
    reconcile::{Reconciler, Source},
    server,
    store::{Change, StateLock, Store, StoreError, StoredPolicy},
    sys,
    watch::Watcher,
};

/// How often the cgroups of `kad exec` runs are checked for being abandoned (only they: policy
/// paths are followed through inotify, with no periodic scan).
const EXEC_COLLECT_INTERVAL: Duration = Duration::from_secs(1);
/// The state file is rewritten whole once its journal has more lines than this, or than the
/// table has entries.
const JOURNAL_COMPACT_MIN: usize = 1024;

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
    fn describe(&self) -> String {
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

struct State {
    config: DaemonConfig,
    root: PathBuf,
    store: Store,
    /// Policies set with `kad set` (and `kad exec`), by path; what the state file holds.
    set: BTreeMap<PathBuf, Policy>,
    /// The `kad exec` run that owns each of the paths in `set` that are its transient cgroups.
    exec_owners: BTreeMap<PathBuf, ExecOwner>,
    /// Policies of the config file, by path.
    from_config: BTreeMap<PathBuf, Policy>,
    /// Policies of pods' annotations, by path, with the pod (`namespace/name`); saved in
    /// pods.json. `kad set` on the same path wins; they win over the config file.
    from_pods: BTreeMap<PathBuf, (Policy, String)>,
    pod_table: PodTable,
    pods_store: Store,
    /// The watcher's state for `kad status`, when there is one.
    pods_status: Option<PodsStatus>,
    /// The kernel side: map entries, anchors, watched directories, refreshes.
    kernel: Reconciler,
    /// inotify on the directories the policies need watched, set before a request is answered.
    watcher: Watcher,
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

/// `--pod-events PATH`: one JSON [`PodEvent`] per line. A FIFO is opened for reading and
/// writing, so that writers may come and go; a bad line is logged and skipped.
async fn read_pod_events(path: PathBuf, events: tokio::sync::mpsc::Sender<PodEvent>) {
    use tokio::io::AsyncBufReadExt as _;
    let is_fifo = std::fs::metadata(&path)
        .map(|m| std::os::unix::fs::FileTypeExt::is_fifo(&m.file_type()))
        .unwrap_or(false);
    let reader: Box<dyn tokio::io::AsyncRead + Unpin + Send> = if is_fifo {
        match tokio::net::unix::pipe::OpenOptions::new()
            .read_write(true)
            .open_receiver(&path)
        {
            Ok(pipe) => Box::new(pipe),
            Err(e) => {
                error!("cannot open the pod events {}: {e}", path.display());
                return;
            }
        }
    } else {
        match tokio::fs::File::open(&path).await {
            Ok(file) => Box::new(file),
            Err(e) => {
                error!("cannot open the pod events {}: {e}", path.display());
                return;
            }
        }
    };
    let _ = events
        .send(PodEvent::Connection {
            ok: true,
            message: None,
        })
        .await;
    let mut lines = tokio::io::BufReader::new(reader).lines();
    loop {
        match lines.next_line().await {
            Ok(Some(line)) if line.trim().is_empty() => {}
            Ok(Some(line)) => match serde_json::from_str::<PodEvent>(&line) {
                Ok(event) => {
                    if events.send(event).await.is_err() {
                        return;
                    }
                }
                Err(e) => warn!("pod events {}: bad line: {e}", path.display()),
            },
            Ok(None) => return,
            Err(e) => {
                error!("pod events {}: {e}", path.display());
                return;
            }
        }
    }
}

/// Opens the enforcer, mapping its errors for the daemon.
fn open_enforcer(bpffs: &Path) -> Result<Enforcer, DaemonError> {
    Ok(Enforcer::open(bpffs)?)
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
            Request::Status => Response::Status(Box::new(self.status())),
            Request::Stats => Response::Stats {
                stats: self.stats(),
                kills_counted: self.kernel.enforcer.counts_kills(),
            },
        }
    }

    /// Counters of every policy whose cgroup exists (a policy waiting for its cgroup has none).
    fn stats(&self) -> Vec<StatsEntry> {
        self.kernel
            .in_force()
            .iter()
            .filter(|(_, e)| e.id.is_some())
            .map(|(path, e)| {
                let c = self.kernel.enforcer.counters(e.slot);
                StatsEntry {
                    cgroup: path.display().to_string(),
                    connect: c.active,
                    accept: c.passive,
                    setsockopt_failures: c.failures,
                    keepalive_kills: c.keepalive_kills,
                    refreshed: c.refreshed,
                    overridden: c.overridden,
                }
            })
            .collect()
    }

    /// The Prometheus exposition served at /metrics.
    pub fn metrics(&self) -> String {
        metrics::render(
            &self.stats(),
            self.effective().len(),
            self.kernel.enforcer.attachments(),
        )
    }

    /// Policies by path: the config file's, overridden by those set with `kad set`.
    fn effective(&self) -> BTreeMap<PathBuf, (Policy, Source)> {
        let mut table: BTreeMap<PathBuf, (Policy, Source)> = self
            .from_config
            .iter()
            .map(|(path, policy)| (path.clone(), (*policy, Source::Config)))
            .collect();
        for (path, (policy, _)) in &self.from_pods {
            table.insert(path.clone(), (*policy, Source::Pod));
        }
        for (path, policy) in &self.set {
            table.insert(path.clone(), (*policy, Source::Set));
        }
        table
    }

    /// How many paths have a policy (without building the table).
    fn policy_count(&self) -> usize {
        self.set.len()
            + self
                .from_config
                .keys()
                .filter(|p| !self.set.contains_key(*p))
                .count()
    }

    fn want(&self, path: &Path) -> Option<(Policy, Source)> {
        if let Some(p) = self.set.get(path) {
            return Some((*p, Source::Set));
        }
        if let Some((p, _)) = self.from_pods.get(path) {
            return Some((*p, Source::Pod));
        }
        self.from_config.get(path).map(|p| (*p, Source::Config))
    }

    fn set(&mut self, input: &str, policy: Policy) -> Response {
        if let Err(e) = policy.validate() {
            return Response::error(e.to_string());
        }
        let path = match cgroup::policy_path(&self.root, input) {
            Ok(path) => path,
            Err(e) => return Response::error(e.to_string()),
        };
        if !self.set.contains_key(&path)
            && !self.from_config.contains_key(&path)
            && self.policy_count() >= keepalive_common::MAX_POLICIES as usize
        {
            return Response::error(EnforcerError::Full.to_string());
        }
        let previous = self.set.insert(path.clone(), policy);
        let undo = |state: &mut State| {
            match previous {
                Some(p) => state.set.insert(path.clone(), p),
                None => state.set.remove(&path),
            };
            let _ = state.sync_path(&path);
        };
        if let Err(e) = self.sync_path(&path) {
            undo(self);
            return Response::error(e.to_string());
        }
        // Not saved means not done: put the kernel and the table back as they were.
        if let Err(e) = self.persist(&path) {
            undo(self);
            return Response::error(e.to_string());
        }
        info!(cgroup = ?path.display().to_string(), %policy, waiting = !path.is_dir(), "policy set");
        Response::Done {
            cgroup: path.display().to_string(),
        }
    }

    fn unset(&mut self, input: &str) -> Response {
        // A cgroup that is gone can still have its policy removed, by the path it had.
        let path = match cgroup::policy_path(&self.root, input) {
            Ok(path) => path,
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
        if let Err(e) = self.persist(&path) {
            self.set.insert(path, previous);
            return Response::error(format!("{e}; the policy stays"));
        }
        self.exec_owners.remove(&path);
        if let Err(e) = self.sync_path(&path) {
            // The config file's policy for this path could not be put back in force.
            error!(cgroup = ?path.display().to_string(), "{e}");
        }
        info!(cgroup = ?path.display().to_string(), "policy removed");
        Response::Done {
            cgroup: path.display().to_string(),
        }
    }

    /// Re-reads the config file; on error the previous config stays in force.
    fn reload(&mut self) -> Response {
        match config_file::load(&self.config.config, &self.root) {
            Ok(from_config) => {
                let before: BTreeSet<PathBuf> = self.from_config.keys().cloned().collect();
                self.from_config = from_config;
                let paths: BTreeSet<PathBuf> = before
                    .into_iter()
                    .chain(self.from_config.keys().cloned())
                    .collect();
                for path in paths {
                    let _ = self.sync_path(&path);
                }
                info!(config = %self.config.config.display(), policies = self.from_config.len(), "config reloaded");
                Response::Reloaded {
                    policies: self.from_config.len(),
                }
            }
            Err(e) => Response::error(e.to_string()),
        }
    }

    /// Brings the kernel in line with the table for one path, then the anchors and watches,
    /// then the existing connections below it.
    fn sync_path(&mut self, path: &Path) -> Result<(), EnforcerError> {
        let want = self.want(path);
        let mut changed = self.kernel.sync(path, want);
        let mut anchor_errors = self.kernel.apply_anchors();
        // A new watch: what happened before it was in place is read now, once more.
        if self.publish_watches() && changed.is_ok() {
            let again = self.kernel.sync(path, want);
            changed = again.map(|c| c || changed.unwrap_or(false));
            anchor_errors.extend(self.kernel.apply_anchors());
            self.publish_watches();
        }
        if let Some(e) = anchor_errors.into_iter().next() {
            return Err(e);
        }
        if changed? {
            self.kernel.refresh(path);
        }
        Ok(())
    }

    /// `sync_path` for every path in the table or in force: at start and after events that
    /// concern a directory the table cannot narrow down.
    fn sync_all(&mut self) {
        let paths: BTreeSet<PathBuf> = self
            .effective()
            .into_keys()
            .chain(self.kernel.in_force().keys().cloned())
            .collect();
        for path in paths {
            let want = self.want(&path);
            let _ = self.kernel.sync(&path, want);
        }
        let _ = self.kernel.apply_anchors(); // logged there
        if self.publish_watches() {
            let paths: Vec<PathBuf> = self.kernel.in_force().keys().cloned().collect();
            for path in paths {
                let want = self.want(&path);
                let _ = self.kernel.sync(&path, want);
            }
            let _ = self.kernel.apply_anchors();
            self.publish_watches();
        }
    }

    /// After a start: the connections that existed before give every policy its due.
    fn refresh_all(&mut self) {
        let tops: Vec<PathBuf> = {
            let in_force = self.kernel.in_force();
            in_force
                .keys()
                .filter(|p| !p.ancestors().skip(1).any(|a| in_force.contains_key(a)))
                .cloned()
                .collect()
        };
        for path in tops {
            self.kernel.refresh(&path);
        }
    }

    /// Cgroups were created or removed at these paths (or the watched directory went away):
    /// re-check the policies at and below them.
    fn on_cgroup_events(&mut self, paths: &[PathBuf]) {
        let mut affected = BTreeSet::new();
        let table: BTreeSet<PathBuf> = self
            .effective()
            .into_keys()
            .chain(self.kernel.in_force().keys().cloned())
            .collect();
        for changed in paths {
            for p in table.range(changed.clone()..) {
                if !p.starts_with(changed) {
                    break;
                }
                affected.insert(p.clone());
            }
        }
        for path in affected {
            let _ = self.sync_path(&path);
        }
    }

    /// Sets the watches the table needs; true if one was added (a directory created before
    /// the watch was in place would then go unseen: the caller looks again).
    fn publish_watches(&mut self) -> bool {
        self.watcher.set(&self.kernel.watch_dirs())
    }

    /// Policies the pinned map holds that neither the state file nor the config file has:
    /// kept and adopted, loudly, never dropped on a guess. A config-file policy that is no
    /// longer in the config file was removed on purpose and is not adopted.
    fn adopt_pinned(&mut self, state_file_exists: bool) {
        let mut adopted = 0;
        for (key, value) in self.kernel.enforcer.pinned_paths() {
            let Some(path) = enforcer::key_path(&self.root, &key) else {
                continue;
            };
            if self.set.contains_key(&path)
                || self.from_config.contains_key(&path)
                || self.from_pods.contains_key(&path)
            {
                continue;
            }
            if value.flags & keepalive_common::FLAG_CONFIG != 0 {
                continue;
            }
            let policy = Policy::from_value(&value);
            warn!(
                cgroup = ?path.display().to_string(),
                %policy,
                state_file = %self.store.path().display(),
                "a pinned policy is missing from the state file: kept and saved again"
            );
            self.set.insert(path, policy);
            adopted += 1;
        }
        if adopted > 0 {
            if !state_file_exists {
                warn!(
                    policies = adopted,
                    "{} is missing (a wrong --state-dir?): the policies pinned in {} were adopted",
                    self.store.path().display(),
                    self.config.bpffs.display()
                );
            }
            if let Err(e) = self.save() {
                error!("cannot save the adopted policies: {e}");
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
                Ok(()) => {
                    info!(cgroup = ?path.display().to_string(), "removed an abandoned kad exec cgroup")
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    info!(cgroup = ?path.display().to_string(), "removed the policy of an abandoned kad exec")
                }
                Err(e) => {
                    warn!(cgroup = ?path.display().to_string(), "cannot remove an abandoned kad exec cgroup: {e}")
                }
            }
        }
        if let Err(e) = self.save() {
            error!("cannot save after removing abandoned kad exec policies: {e}");
        }
    }

    fn entries(&self) -> Vec<PolicyEntry> {
        self.effective()
            .iter()
            .map(|(path, (policy, source))| PolicyEntry {
                pod: self.pod_of(path, *source),
                ..PolicyEntry::new(path.display().to_string(), policy)
            })
            .collect()
    }

    fn pod_of(&self, path: &Path, source: Source) -> Option<String> {
        (source == Source::Pod)
            .then(|| self.from_pods.get(path).map(|(_, pod)| pod.clone()))
            .flatten()
    }

    /// One event from the pod watcher: the pods' policies are worked out again and the
    /// paths whose policy changed are brought in line.
    fn on_pod_event(&mut self, event: PodEvent) {
        if let PodEvent::Connection { ok, message } = &event {
            if let Some(status) = &mut self.pods_status {
                // Once per change: the watcher retries with backoff, and says so each time.
                if !ok && (status.connected || status.error != *message) {
                    warn!(
                        "pod watcher: {}; the pod policies in force stay, retrying",
                        message.as_deref().unwrap_or("disconnected")
                    );
                } else if *ok && !status.connected {
                    info!("pod watcher: connected");
                }
                status.connected = *ok;
                status.error = if *ok { None } else { message.clone() };
            }
            return;
        }
        if !self.pod_table.apply(event) {
            return;
        }
        let mut wanted = BTreeMap::new();
        let mut invalid = Vec::new();
        for (relative, w) in self.pod_table.wanted(&self.config.kubelet) {
            match w.policy {
                Ok(policy) => match cgroup::policy_path(&self.root, &relative) {
                    Ok(path) => {
                        wanted.insert(path, (policy, w.pod));
                    }
                    Err(e) => invalid.push(format!("{}: {e}", w.pod)),
                },
                Err(e) => invalid.push(format!("{}: {e}", w.pod)),
            }
        }
        if let Some(status) = &mut self.pods_status {
            for line in invalid.iter().filter(|l| !status.invalid.contains(l)) {
                warn!("pod without a policy: {line}");
            }
            status.pods = self.pod_table.pods();
            status.invalid = invalid;
        }
        if wanted == self.from_pods {
            return;
        }
        let changed: BTreeSet<PathBuf> = wanted
            .iter()
            .filter(|(path, w)| self.from_pods.get(*path) != Some(*w))
            .map(|(path, _)| path.clone())
            .chain(
                self.from_pods
                    .keys()
                    .filter(|path| !wanted.contains_key(*path))
                    .cloned(),
            )
            .collect();
        self.from_pods = wanted;
        for path in &changed {
            match self.from_pods.get(path) {
                Some((policy, pod)) => {
                    info!(cgroup = ?path.display().to_string(), pod = %pod, %policy, "pod policy")
                }
                None => info!(cgroup = ?path.display().to_string(), "pod policy removed"),
            }
            if let Err(e) = self.sync_path(path) {
                error!(cgroup = ?path.display().to_string(), "{e}");
            }
        }
        self.kernel.drop_stale_ids();
        if let Err(e) = self.save_pods() {
            error!("cannot save the pod policies: {e}");
        }
    }

    fn save_pods(&self) -> Result<(), StoreError> {
        let entries: Vec<StoredPolicy> = self
            .from_pods
            .iter()
            .map(|(path, (policy, pod))| StoredPolicy {
                pod: Some(pod.clone()),
                ..StoredPolicy::new(path.display().to_string(), policy, None)
            })
            .collect();
        self.pods_store.save(&entries)
    }

    /// Makes the table's entry for `path` (or its absence) durable: one journal line, and now
    /// and then the whole table.
    fn persist(&self, path: &Path) -> Result<(), StoreError> {
        let cgroup = path.display().to_string();
        let change = match self.set.get(path) {
            Some(policy) => Change::Set(StoredPolicy::new(
                cgroup,
                policy,
                self.exec_owners.get(path).cloned(),
            )),
            None => Change::Unset(cgroup),
        };
        self.store.record(&change)?;
        if self.store.journal_len() > JOURNAL_COMPACT_MIN.max(self.set.len()) {
            // The change is durable already; a failed compaction is tried again later.
            if let Err(e) = self.save() {
                warn!("cannot rewrite the state file (the journal keeps every change): {e}");
            }
        }
        Ok(())
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

    fn features(&self) -> [(&'static str, Result<(), String>); 4] {
        let f = self.kernel.enforcer.features();
        [
            ("existing connections (iter/tcp)", f.existing.clone()),
            (
                "new cgroups at policy paths (tp_btf/cgroup_mkdir)",
                f.mkdir.clone(),
            ),
            (
                "programs' own keepalive options (cgroup/setsockopt)",
                f.setsockopt.clone(),
            ),
            (
                "keepalive kills (tp_btf/inet_sk_error_report)",
                f.kills.clone(),
            ),
        ]
    }

    fn status(&self) -> StatusReport {
        let table = self.effective();
        let in_force = self.kernel.in_force();
        StatusReport {
            program_loaded: true,
            program: self.kernel.enforcer.program_tag().to_string(),
            kernel: sys::kernel_release(),
            cgroup_root: self.root.display().to_string(),
            bpffs: self.config.bpffs.display().to_string(),
            state_dir: self.config.state_dir.display().to_string(),
            config: self.config.config.display().to_string(),
            attachments: self.kernel.enforcer.attachments(),
            map_entries: self.kernel.enforcer.map_entries(),
            anchors: self
                .kernel
                .enforcer
                .anchors()
                .into_iter()
                .map(|(path, program)| AnchorEntry {
                    cgroup: path.display().to_string(),
                    program,
                })
                .collect(),
            features: self
                .features()
                .into_iter()
                .map(|(what, f)| FeatureEntry {
                    feature: what.to_string(),
                    available: f.is_ok(),
                    reason: f.err(),
                })
                .collect(),
            policies: self.entries(),
            details: table
                .iter()
                .map(|(path, (policy, source))| {
                    let entry = in_force.get(path).filter(|e| e.id.is_some());
                    let cgroup_id = entry.and_then(|e| e.id);
                    PolicyDetail {
                        cgroup: path.display().to_string(),
                        source: match source {
                            Source::Set => "set",
                            Source::Config => "config",
                            Source::Pod => "pod",
                        }
                        .to_string(),
                        cgroup_id,
                        error: self.kernel.failing(path).cloned(),
                        pod: self.pod_of(path, *source),
                        enforce: policy.enforce,
                        overridden: entry
                            .map_or(0, |e| self.kernel.enforcer.counters(e.slot).overridden),
                    }
                })
                .collect(),
            counters: self.stats(),
            kills_counted: self.kernel.enforcer.counts_kills(),
            pods: self.pods_status.clone(),
        }
    }
}
