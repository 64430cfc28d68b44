//! What `kad list`, `kad status`, `kad stats` and `/metrics` report: a snapshot of the state,
//! published by the state thread after each command, with the counters and map entries the
//! kernel changes on its own read at request time.
use super::state::State;
use crate::{
    enforcer::Reader,
    metrics,
    protocol::{AnchorEntry, FeatureEntry, PolicyDetail, PolicyEntry, StatsEntry, StatusReport},
    reconcile::Source,
    sys,
};

/// What the readers need of the state, as it was after the last command.
pub(super) struct Snapshot {
    /// The status report without what is read at request time (map entries, counters,
    /// overridden counts).
    status: StatusReport,
    /// Policies in force with a cgroup, by path: whose counters there are.
    ids: Vec<(String, u64)>,
}

impl Snapshot {
    pub(super) fn policies(&self) -> Vec<PolicyEntry> {
        self.status.policies.clone()
    }

    /// Counters of every policy whose cgroup exists (a policy waiting for its cgroup has none).
    pub(super) fn stats(&self, reader: &Reader) -> Vec<StatsEntry> {
        self.ids
            .iter()
            .map(|(cgroup, id)| {
                let c = reader.counters(*id);
                StatsEntry {
                    cgroup: cgroup.clone(),
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
        self.status.kills_counted
    }

    pub(super) fn status(&self, reader: &Reader) -> StatusReport {
        let mut status = self.status.clone();
        status.map_entries = reader.map_entries();
        for detail in &mut status.details {
            detail.overridden = detail
                .cgroup_id
                .map_or(0, |id| reader.counters(id).overridden);
        }
        status.counters = self.stats(reader);
        status
    }

    /// The Prometheus exposition served at /metrics.
    pub(super) fn metrics(&self, reader: &Reader) -> String {
        metrics::render(
            &self.stats(reader),
            self.status.policies.len(),
            self.status.attachments,
        )
    }
}

impl State {
    pub(super) fn features(&self) -> [(&'static str, Result<(), String>); 4] {
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

    pub(super) fn snapshot(&self) -> Snapshot {
        let table = self.effective();
        let in_force = self.kernel.in_force();
        let mut in_force_rows = in_force.iter().peekable();
        let status = StatusReport {
            program_loaded: true,
            program: self.kernel.enforcer.program_tag().to_string(),
            kernel: sys::kernel_release(),
            cgroup_root: self.root.display().to_string(),
            bpffs: self.config.bpffs.display().to_string(),
            state_dir: self.config.state_dir.display().to_string(),
            config: self.config.config.display().to_string(),
            attachments: self.kernel.enforcer.attachments(),
            // Read at request time: the kernel's mkdir/rmdir hooks change them.
            map_entries: 0,
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
            policies: table
                .iter()
                .map(|(path, (policy, source))| PolicyEntry {
                    pod: self.pod_of(path, *source),
                    ..PolicyEntry::new(path.display().to_string(), policy)
                })
                .collect(),
            details: table
                .iter()
                .map(|(path, (policy, source))| {
                    // Both are sorted by path: walked together, without a lookup per row.
                    while in_force_rows.next_if(|(p, _)| *p < path).is_some() {}
                    let cgroup_id = in_force_rows
                        .peek()
                        .filter(|(p, _)| *p == path)
                        .and_then(|(_, e)| e.id);
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
                        overridden: 0,
                    }
                })
                .collect(),
            counters: Vec::new(),
            kills_counted: self.kernel.enforcer.counts_kills(),
            pods: self.pods_status.clone(),
        };
        let ids = in_force
            .iter()
            .filter_map(|(path, e)| Some((path.display().to_string(), e.id?)))
            .collect();
        Snapshot { status, ids }
    }
}
