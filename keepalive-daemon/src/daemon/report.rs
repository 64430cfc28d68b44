//! Building what `kad list`, `kad status`, `kad stats` and `/metrics` report: the state
//! thread rebuilds the rows of the paths a command touched and publishes a new [`Snapshot`];
//! the counters and map entries the kernel changes on its own are read at request time.
use std::{path::Path, sync::Arc};

use super::{
    snapshot::{Row, Snapshot},
    state::State,
};
use crate::{
    api::protocol::{AnchorEntry, FeatureEntry, StatusReport},
    daemon::reconcile::Source,
    host::sys,
};

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
            exec_runs: self.exec_owners.len() + self.stopped_containers(),
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
            container: (source == Source::Set)
                .then(|| self.container_of(path))
                .flatten(),
            docker: self.docker_of(path, source),
            in_force: self
                .reconciler
                .in_force()
                .get(path)
                .and_then(|e| Some((e.id?, e.slot))),
            error: self.reconciler.failing(path),
            host: path == self.root,
        })
    }

    /// The status report's parts that are not per policy.
    fn header(&self) -> StatusReport {
        StatusReport {
            program_loaded: true,
            program: self.reconciler.kernel.program_tag().to_string(),
            kernel: sys::kernel_release(),
            cgroup_root: self.root.display().to_string(),
            daemon_cgroup_root: None,
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
            docker: self.docker_status.clone(),
        }
    }
}
