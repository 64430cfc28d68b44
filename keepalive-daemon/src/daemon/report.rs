//! What `kad status`, `kad stats` and `/metrics` report.
use super::state::State;
use crate::{
    metrics,
    protocol::{AnchorEntry, FeatureEntry, PolicyDetail, StatsEntry, StatusReport},
    reconcile::Source,
    sys,
};

impl State {
    /// Counters of every policy whose cgroup exists (a policy waiting for its cgroup has none).
    pub(super) fn stats(&self) -> Vec<StatsEntry> {
        self.kernel
            .in_force()
            .iter()
            .filter_map(|(path, e)| Some((path, e.id?)))
            .map(|(path, id)| {
                let c = self.kernel.enforcer.counters(id);
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
    pub(super) fn metrics(&self) -> String {
        metrics::render(
            &self.stats(),
            self.effective().len(),
            self.kernel.enforcer.attachments(),
        )
    }

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

    pub(super) fn status(&self) -> StatusReport {
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
                    let cgroup_id = in_force.get(path).and_then(|e| e.id);
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
                        overridden: cgroup_id
                            .map_or(0, |id| self.kernel.enforcer.counters(id).overridden),
                    }
                })
                .collect(),
            counters: self.stats(),
            kills_counted: self.kernel.enforcer.counts_kills(),
            pods: self.pods_status.clone(),
        }
    }
}
