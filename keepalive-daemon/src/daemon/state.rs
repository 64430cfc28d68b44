//! The daemon's state: the policy tables, the store and the kernel side, and the start that
//! builds it. Only the state thread ([`super::actor`]) holds it.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
};

use tracing::{info, warn};

use super::{
    container_policies::Container,
    settings::{DaemonConfig, DaemonError},
    snapshot::Rows,
};
use crate::{
    api::protocol::{DockerStatus, PodsStatus},
    containers::{docker::DockerTable, pods::PodTable},
    daemon::config as config_file,
    daemon::reconcile::Reconciler,
    daemon::store::Store,
    host::process::ExecOwner,
    host::watch::Watcher,
    kernel::{Kernel, KernelError},
    model::policy::Policy,
};

pub(super) struct State {
    pub(super) config: DaemonConfig,
    pub(super) root: PathBuf,
    pub(super) store: Store,
    /// Policies set with `kad set` (and `kad exec`), by path; what the state file holds.
    pub(super) set: BTreeMap<PathBuf, Policy>,
    /// The `kad exec` run that owns each of the paths in `set` that are its transient cgroups.
    pub(super) exec_owners: BTreeMap<PathBuf, ExecOwner>,
    /// The container each of the paths in `set` that were set for one belongs to.
    pub(super) containers: BTreeMap<PathBuf, Container>,
    /// The user who set each of the paths in `set` that a user set (in a cgroup delegated to
    /// them); root's have none.
    pub(super) owners: BTreeMap<PathBuf, u32>,
    /// Policies of the config file, by path.
    pub(super) from_config: BTreeMap<PathBuf, Policy>,
    /// Policies of pods' annotations, by path, with the pod (`namespace/name`); saved in
    /// pods.json. `kad set` on the same path wins; they win over the config file.
    pub(super) from_pods: BTreeMap<PathBuf, (Policy, String)>,
    pub(super) pod_table: PodTable,
    pub(super) pods_store: Store,
    /// The watcher's state for `kad status`, when there is one.
    pub(super) pods_status: Option<PodsStatus>,
    /// Policies of Docker containers' labels, by path, with the container's name; saved in
    /// docker.json. `kad set` and pods win over them; they win over the config file.
    pub(super) from_docker: BTreeMap<PathBuf, (Policy, String)>,
    pub(super) docker_table: DockerTable,
    pub(super) docker_store: Store,
    /// The Docker watcher's state for `kad status`, when there is one.
    pub(super) docker_status: Option<DockerStatus>,
    /// The kernel side: map entries, anchors, watched directories, refreshes.
    pub(super) reconciler: Reconciler,
    /// inotify on the directories the policies need watched, set before a request is answered.
    pub(super) watcher: Watcher,
    /// What the readers are shown, per policy path (see `report`).
    pub(super) rows: Rows,
    /// The state directory's device and inode when last written: one removed (or replaced)
    /// while the daemon runs is made again and written whole (see `ensure_state_dir`).
    pub(super) state_dir_id: std::cell::Cell<Option<(u64, u64)>>,
    /// A state directory that cannot be made again fails every save: said at a bounded rate.
    pub(super) state_dir_log: std::cell::RefCell<crate::host::logging::LogLimiter>,
    pub(super) state_dir_lock: std::cell::RefCell<crate::daemon::store::Relock>,
}

impl State {
    /// Loads the saved tables and the config file, opens the kernel side and brings it in line
    /// with them: the daemon's start, run by the thread that owns the state from then on.
    /// `open_kernel` is called once the saved tables and the config file were read (a corrupt
    /// one stops the start before the kernel is touched): [`crate::kernel::Enforcer::open`] in
    /// the daemon, a fake in unit tests.
    pub(super) fn start(
        config: DaemonConfig,
        root: PathBuf,
        watcher: Watcher,
        open_kernel: impl FnOnce(&DaemonConfig) -> Result<Box<dyn Kernel>, KernelError>,
    ) -> Result<State, DaemonError> {
        let store = Store::new(&config.state_dir);
        // Read both files first: a corrupt one stops us before anything is touched.
        let saved = store.load(&root)?;
        let exec_owners = saved
            .iter()
            .filter_map(|e| Some((PathBuf::from(&e.cgroup), e.exec_owner.clone()?)))
            .collect();
        let containers = saved
            .iter()
            .filter_map(|e| {
                Some((
                    PathBuf::from(&e.cgroup),
                    Container {
                        id: e.container.clone()?,
                        stopped_bundle: e.bundle.as_ref().map(PathBuf::from),
                    },
                ))
            })
            .collect();
        let owners = saved
            .iter()
            .filter_map(|e| Some((PathBuf::from(&e.cgroup), e.uid?)))
            .collect();
        let set = policies_of(saved);
        let config_copy = Store::config_copy(&config.state_dir);
        let loaded_config = config_file::load(&config.config, &root, false)?;
        let config_missing = loaded_config.is_none();
        let from_config = match loaded_config {
            Some(table) => table,
            // A file that went missing is not an empty one: its policies as last read stay
            // (and those pinned by a kad that kept no copy, see `adopt_pinned`).
            None => policies_of(config_copy.load(&root)?),
        };
        let pods_store = Store::pods(&config.state_dir);
        // Kept (and enforced) until the watcher's first full list says otherwise.
        let from_pods = pods_store
            .load(&root)?
            .into_iter()
            .map(|e| {
                let pod = e.pod.clone().unwrap_or_default();
                (PathBuf::from(&e.cgroup), (e.policy, pod))
            })
            .collect();
        let pods_status = config.pods.as_ref().map(|source| PodsStatus {
            source: source.describe(),
            connected: false,
            error: Some("not connected yet".into()),
            pods: 0,
            invalid: Vec::new(),
            refused: None,
        });
        let docker_store = Store::docker(&config.state_dir);
        // Kept (and enforced) until the Docker watcher's first full list says otherwise.
        let from_docker = docker_store
            .load(&root)?
            .into_iter()
            .map(|e| {
                let name = e.docker.clone().unwrap_or_default();
                (PathBuf::from(&e.cgroup), (e.policy, name))
            })
            .collect();
        let docker_status = config.docker.as_ref().map(|socket| DockerStatus {
            socket: socket.display().to_string(),
            connected: false,
            error: Some("not connected yet".into()),
            api: None,
            cgroup_driver: None,
            containers: 0,
            invalid: Vec::new(),
        });
        let state_file_exists = store.exists();
        let kernel = open_kernel(&config)?;
        let mut state = State {
            config: config.clone(),
            reconciler: Reconciler::new(root.clone(), kernel),
            root,
            store,
            set,
            exec_owners,
            containers,
            owners,
            from_config,
            from_pods,
            pod_table: PodTable::default(),
            pods_store,
            pods_status,
            from_docker,
            docker_table: DockerTable::default(),
            docker_store,
            docker_status,
            watcher,
            rows: Rows::default(),
            state_dir_id: std::cell::Cell::new(super::saving::dir_id(&config.state_dir)),
            state_dir_lock: Default::default(),
            state_dir_log: std::cell::RefCell::new(crate::host::logging::LogLimiter::new(
                std::time::Duration::from_secs(60),
                5,
            )),
        };
        state.adopt_pinned(state_file_exists, config_missing);
        if config_missing && !state.from_config.is_empty() {
            warn!(
                policies = state.from_config.len(),
                "{} is missing (a wrong --config?): the policies it had when last read ({}) \
                 stay in force; to remove them, write the file (empty for none) and run \
                 `kad reload`",
                config.config.display(),
                config_copy.path().display()
            );
        }
        if state.docker_status.is_none() && !state.from_docker.is_empty() {
            warn!(
                policies = state.from_docker.len(),
                "{} holds Docker containers' policies, which stay in force, but no Docker \
                 watcher runs to keep them up to date: start the daemon with --docker [SOCKET]",
                state.docker_store.path().display()
            );
        }
        if state.store.journal_len() > 0 {
            // Fold the journal into the table now, so that it starts short.
            if let Err(e) = state.save() {
                warn!("cannot rewrite the state file (the journal keeps every change): {e}");
            }
        }
        state.sync_all();
        // Map entries an earlier run left for cgroups or policies that are gone, and what the
        // first design of kad pinned, once this design's anchors are in place.
        let wanted: BTreeSet<PathBuf> = state.effective().into_keys().collect();
        state.reconciler.drop_stale_ids(&wanted);
        for path in state.reconciler.drop_stale_paths(&wanted) {
            // Only a config-file policy can be here: the state file's were adopted.
            warn!(
                cgroup = ?path.display().to_string(),
                config = %config.config.display(),
                "removed a pinned policy that the config file no longer has"
            );
            // Its listeners go back to what they held, as after an unset.
            state.reconciler.refresh(&path);
        }
        let retired = state.reconciler.kernel.retire_legacy();
        if retired > 0 {
            info!(links = retired, "replaced the links of an older kad");
        }
        state.refresh_all();
        for (what, feature) in state.features() {
            if let Err(reason) = feature {
                warn!("{what}: not available on this kernel ({reason})");
            }
        }
        if !config_missing {
            // Once the start went through: a daemon that fails to start leaves nothing new.
            save_config_copy(&config_copy, &state.from_config, &state.root);
        }
        info!(
            socket = %config.socket.display(),
            bpffs = %config.bpffs.display(),
            cgroup_root = %state.root.display(),
            policies = state.effective().len(),
            anchors = state.reconciler.kernel.attachments(),
            program = state.reconciler.kernel.program_tag(),
            "kad daemon ready"
        );
        Ok(state)
    }
}

/// The table of a saved list of policies.
pub(super) fn policies_of(entries: Vec<super::store::StoredPolicy>) -> BTreeMap<PathBuf, Policy> {
    entries
        .into_iter()
        .map(|e| (PathBuf::from(&e.cgroup), e.policy))
        .collect()
}

/// Keeps a copy of the config file's policies as just read, if it differs from the one kept
/// (a start with an unchanged config writes nothing). A copy that cannot be written is a
/// warning: the file itself is the source.
pub(super) fn save_config_copy(
    copy: &Store,
    from_config: &BTreeMap<PathBuf, Policy>,
    root: &std::path::Path,
) {
    let same = copy
        .load(root)
        .map(|kept| policies_of(kept) == *from_config)
        .unwrap_or(false);
    if same || (from_config.is_empty() && !copy.exists()) {
        return;
    }
    let entries: Vec<super::store::StoredPolicy> = from_config
        .iter()
        .map(|(path, policy)| {
            super::store::StoredPolicy::new(path.display().to_string(), policy, None)
        })
        .collect();
    if let Err(e) = copy.save(&entries) {
        warn!("cannot keep a copy of the config file's policies: {e}");
    }
}
