//! What the readers are shown, as the state thread last published it: one row per policy
//! path, in a persistent map (a command updates the rows of the paths it touched, and
//! publishing shares the rest with the previous snapshot, so a change costs the same with 10
//! policies as with 65,536), and the replies built from it at request time.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::{
    api::protocol::{PolicyDetail, PolicyEntry, StatsEntry, StatusReport},
    daemon::metrics,
    daemon::{reconcile::Source, settings::PodSource},
    kernel::{CounterReader, KernelError},
    model::policy::Policy,
};

/// One policy path as the readers see it (the path is its key). Kept small: the replies'
/// strings are made at request time, not held for every path.
pub(super) struct Row {
    pub(super) policy: Policy,
    pub(super) source: Source,
    /// The pod, for a pod policy.
    pub(super) pod: Option<String>,
    /// The container (full id) a policy was set for, and whether it is stopped.
    pub(super) container: Option<(String, bool)>,
    /// The container's name, for a Docker policy.
    pub(super) docker: Option<String>,
    /// The cgroup at the path, and the policy's counters slot, while the cgroup exists.
    pub(super) in_force: Option<(u64, u32)>,
    /// Why the policy is not in force, if applying it failed.
    pub(super) error: Option<String>,
    /// The host policy's row (its path is the cgroup2 root).
    pub(super) host: bool,
}

impl Row {
    fn entry(&self, path: &Path) -> PolicyEntry {
        PolicyEntry {
            pod: self.pod.clone(),
            container: self.container.as_ref().map(|(id, _)| id.clone()),
            stopped: self.container.as_ref().is_some_and(|(_, stopped)| *stopped),
            docker: self.docker.clone(),
            waiting: self.in_force.is_none() && self.error.is_none(),
            host: self.host,
            ..PolicyEntry::new(path.display().to_string(), &self.policy)
        }
    }

    /// Whether the policy is in force, and why not, as `/metrics` labels it.
    fn metrics_state(&self) -> metrics::PolicyState {
        use metrics::PolicyState::*;
        // An error first, as `kad status` shows it: a policy in the map whose programs are not
        // attached (its anchor failed) is not in force.
        if let Some(error) = &self.error {
            if *error == KernelError::Full.to_string() {
                TooManyPolicies
            } else {
                Failed
            }
        } else if self.in_force.is_some() {
            InForce
        } else if self.container.as_ref().is_some_and(|(_, stopped)| *stopped) {
            ContainerStopped
        } else {
            Waiting
        }
    }

    fn slot(&self) -> Option<u32> {
        self.in_force.map(|(_, slot)| slot)
    }
}

/// The rows kept by the state thread, and the paths whose rows are out of date.
#[derive(Default)]
pub(super) struct Rows {
    pub(super) rows: imbl::OrdMap<PathBuf, Arc<Row>>,
    pub(super) dirty: BTreeSet<PathBuf>,
    pub(super) all_dirty: bool,
}

impl Rows {
    /// The row of `path` is to be built again before the next snapshot.
    pub(super) fn touch(&mut self, path: &Path) {
        if !self.all_dirty {
            self.dirty.insert(path.to_path_buf());
        }
    }

    /// Every row is (after a change that concerns the whole table).
    pub(super) fn touch_all(&mut self) {
        self.all_dirty = true;
        self.dirty.clear();
    }
}

/// What the readers need of the state, as it was after the last command.
pub(super) struct Snapshot {
    /// The status report without its per-policy parts and what is read at request time (map
    /// entries, counters, overridden counts).
    pub(super) header: Arc<StatusReport>,
    pub(super) rows: imbl::OrdMap<PathBuf, Arc<Row>>,
    /// How many `kad exec` runs the daemon watches: with none, nothing needs collecting.
    pub(super) exec_runs: usize,
}

impl Snapshot {
    pub(super) fn exec_runs(&self) -> usize {
        self.exec_runs
    }

    pub(super) fn policies(&self) -> Vec<PolicyEntry> {
        self.rows.iter().map(|(path, r)| r.entry(path)).collect()
    }

    /// Counters of every policy whose cgroup exists (a policy waiting for its cgroup has none).
    pub(super) fn stats(&self, reader: &dyn CounterReader) -> Vec<StatsEntry> {
        self.rows
            .iter()
            .filter_map(|(path, r)| Some((path, r.slot()?)))
            .map(|(path, slot)| stats_entry(path.display().to_string(), reader, slot))
            .collect()
    }

    pub(super) fn kills_counted(&self) -> bool {
        self.header.kills_counted
    }

    pub(super) fn status(&self, reader: &dyn CounterReader) -> StatusReport {
        let mut status = (*self.header).clone();
        status.map_entries = reader.map_entries();
        status.policies = self.policies();
        status.details = self
            .rows
            .iter()
            .map(|(path, r)| PolicyDetail {
                cgroup: path.display().to_string(),
                source: match r.source {
                    Source::Set => "set",
                    Source::Config => "config",
                    Source::Pod => "pod",
                    Source::Docker => "docker",
                }
                .to_string(),
                cgroup_id: r.in_force.map(|(id, _)| id),
                error: r.error.clone(),
                pod: r.pod.clone(),
                container: r.container.as_ref().map(|(id, _)| id.clone()),
                stopped: r.container.as_ref().is_some_and(|(_, stopped)| *stopped),
                docker: r.docker.clone(),
                enforce: r.policy.enforce,
                overridden: r.slot().map_or(0, |slot| reader.counters(slot).overridden),
            })
            .collect();
        status.counters = self.stats(reader);
        status
    }

    /// The Prometheus exposition served at /metrics, with per-policy series for the first
    /// `per_policy` policies.
    pub(super) fn metrics(&self, reader: &dyn CounterReader, per_policy: usize) -> String {
        let mut by_state = Vec::new();
        let mut views = Vec::new();
        for (path, row) in self.rows.iter() {
            let state = row.metrics_state();
            match by_state.iter_mut().find(|(s, _)| *s == state) {
                Some((_, n)) => *n += 1,
                None => by_state.push((state, 1)),
            }
            if views.len() < per_policy {
                let cgroup = path.display().to_string();
                let counters = row
                    .slot()
                    .map(|slot| stats_entry(cgroup.clone(), reader, slot));
                views.push(metrics::PolicyView {
                    cgroup,
                    state,
                    counters,
                });
            }
        }
        let mut watchers = Vec::new();
        if let Some(pods) = &self.header.pods {
            watchers.push(metrics::Watcher {
                name: if pods.source.starts_with(PodSource::KUBERNETES) {
                    "kubernetes"
                } else {
                    "pod_events"
                },
                connected: pods.connected,
            });
        }
        if let Some(docker) = &self.header.docker {
            watchers.push(metrics::Watcher {
                name: "docker",
                connected: docker.connected,
            });
        }
        metrics::render(metrics::Exposition {
            by_state,
            omitted: self.rows.len().saturating_sub(views.len()),
            per_policy: views,
            attachments: self.header.attachments,
            watchers,
        })
    }
}

/// The counters of the policy in `slot`, as `kad stats` and `/metrics` show them.
fn stats_entry(cgroup: String, reader: &dyn CounterReader, slot: u32) -> StatsEntry {
    let c = reader.counters(slot);
    StatsEntry {
        cgroup,
        connect: c.active,
        accept: c.passive,
        setsockopt_failures: c.failures,
        keepalive_kills: c.keepalive_kills,
        refreshed: c.refreshed,
        overridden: c.overridden,
    }
}
