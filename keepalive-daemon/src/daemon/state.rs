//! The daemon's state: the policy tables, the store and the kernel side, with the dispatch
//! of requests to the roles below.
use std::{collections::BTreeMap, path::PathBuf};

use super::DaemonConfig;
use crate::{
    exec::ExecOwner,
    pods::PodTable,
    policy::Policy,
    protocol::{PodsStatus, Request, Response},
    reconcile::Reconciler,
    store::Store,
    watch::Watcher,
};

pub(super) struct State {
    pub(super) config: DaemonConfig,
    pub(super) root: PathBuf,
    pub(super) store: Store,
    /// Policies set with `kad set` (and `kad exec`), by path; what the state file holds.
    pub(super) set: BTreeMap<PathBuf, Policy>,
    /// The `kad exec` run that owns each of the paths in `set` that are its transient cgroups.
    pub(super) exec_owners: BTreeMap<PathBuf, ExecOwner>,
    /// Policies of the config file, by path.
    pub(super) from_config: BTreeMap<PathBuf, Policy>,
    /// Policies of pods' annotations, by path, with the pod (`namespace/name`); saved in
    /// pods.json. `kad set` on the same path wins; they win over the config file.
    pub(super) from_pods: BTreeMap<PathBuf, (Policy, String)>,
    pub(super) pod_table: PodTable,
    pub(super) pods_store: Store,
    /// The watcher's state for `kad status`, when there is one.
    pub(super) pods_status: Option<PodsStatus>,
    /// The kernel side: map entries, anchors, watched directories, refreshes.
    pub(super) kernel: Reconciler,
    /// inotify on the directories the policies need watched, set before a request is answered.
    pub(super) watcher: Watcher,
}

impl State {
    /// `peer` is the asking process's pid, if the kernel told it.
    pub(super) fn handle(&mut self, request: Request, peer: Option<u32>) -> Response {
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
}
