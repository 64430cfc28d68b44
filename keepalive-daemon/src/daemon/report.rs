//! What `kad list`, `kad status`, `kad stats` and `/metrics` report: a snapshot of the state,
//! published by the state thread after each command, with the counters and map entries the
//! kernel changes on its own read at request time.
//!
//! The rows (one per policy path) are a persistent map: a command updates the rows of the
//! paths it touched, and publishing shares the rest with the previous snapshot, so a change
//! costs the same with 10 policies as with 65,536.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::Arc,
};

use super::state::State;
use crate::{
    api::protocol::{
        AnchorEntry, FeatureEntry, PolicyDetail, PolicyEntry, StatsEntry, StatusReport,
    },
    daemon::metrics,
    daemon::reconcile::Source,
    host::sys,
    kernel::CounterReader,
    model::policy::Policy,
};

/// One policy path as the readers see it (the path is its key). Kept small: the replies'
/// strings are made at request time, not held for every path.
pub(super) struct Row {
    policy: Policy,
    source: Source,
    /// The pod, for a pod policy.
    pod: Option<String>,
    /// The cgroup at the path, and the policy's counters slot, while the cgroup exists.
    in_force: Option<(u64, u32)>,
    /// Why the policy is not in force, if applying it failed.
    error: Option<String>,
}

impl Row {
    fn entry(&self, path: &Path) -> PolicyEntry {
        PolicyEntry {
            pod: self.pod.clone(),
            waiting: self.in_force.is_none() && self.error.is_none(),
            ..PolicyEntry::new(path.display().to_string(), &self.policy)
        }
    }

    fn slot(&self) -> Option<u32> {
        self.in_force.map(|(_, slot)| slot)
    }
}

/// The rows kept by the state thread, and the paths whose rows are out of date.
#[derive(Default)]
pub(super) struct Rows {
    rows: imbl::OrdMap<PathBuf, Arc<Row>>,
    dirty: BTreeSet<PathBuf>,
    all_dirty: bool,
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
    header: Arc<StatusReport>,
    rows: imbl::OrdMap<PathBuf, Arc<Row>>,
    /// How many `kad exec` runs the daemon watches: with none, nothing needs collecting.
    exec_runs: usize,
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
            .map(|(path, slot)| {
                let c = reader.counters(slot);
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
                }
                .to_string(),
                cgroup_id: r.in_force.map(|(id, _)| id),
                error: r.error.clone(),
                pod: r.pod.clone(),
                enforce: r.policy.enforce,
                overridden: r.slot().map_or(0, |slot| reader.counters(slot).overridden),
            })
            .collect();
        status.counters = self.stats(reader);
        status
    }

    /// The Prometheus exposition served at /metrics.
    pub(super) fn metrics(&self, reader: &dyn CounterReader) -> String {
        metrics::render(
            &self.stats(reader),
            self.rows.len(),
            self.header.attachments,
        )
    }
}

impl State {
    pub(super) fn features(&self) -> [(&'static str, Result<(), String>); 4] {
        let f = self.reconciler.kernel.features();
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

    /// The snapshot after a command: the rows it touched built again, the rest shared.
    pub(super) fn snapshot(&mut self) -> Snapshot {
        let mut rows = std::mem::take(&mut self.rows);
        if rows.all_dirty {
            rows.rows = self
                .effective()
                .keys()
                .filter_map(|path| Some((path.clone(), Arc::new(self.row(path)?))))
                .collect();
        } else {
            for path in &rows.dirty {
                match self.row(path) {
                    Some(row) => rows.rows.insert(path.clone(), Arc::new(row)),
                    None => rows.rows.remove(path),
                };
            }
        }
        rows.dirty.clear();
        rows.all_dirty = false;
        let snapshot = Snapshot {
            header: Arc::new(self.header()),
            rows: rows.rows.clone(),
            exec_runs: self.exec_owners.len(),
        };
        self.rows = rows;
        snapshot
    }

    /// The row of a path in the table; None when it has no policy.
    fn row(&self, path: &Path) -> Option<Row> {
        let (policy, source) = self.want(path)?;
        Some(Row {
            policy,
            source,
            pod: self.pod_of(path, source),
            in_force: self
                .reconciler
                .in_force()
                .get(path)
                .and_then(|e| Some((e.id?, e.slot))),
            error: self.reconciler.failing(path).cloned(),
        })
    }

    /// The status report's parts that are not per policy.
    fn header(&self) -> StatusReport {
        StatusReport {
            program_loaded: true,
            program: self.reconciler.kernel.program_tag().to_string(),
            kernel: sys::kernel_release(),
            cgroup_root: self.root.display().to_string(),
            bpffs: self.config.bpffs.display().to_string(),
            state_dir: self.config.state_dir.display().to_string(),
            config: self.config.config.display().to_string(),
            attachments: self.reconciler.kernel.attachments(),
            // Read at request time: the kernel's mkdir/rmdir hooks change them.
            map_entries: 0,
            anchors: self
                .reconciler
                .kernel
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
            policies: Vec::new(),
            details: Vec::new(),
            counters: Vec::new(),
            kills_counted: self.reconciler.kernel.counts_kills(),
            pods: self.pods_status.clone(),
        }
    }
}
