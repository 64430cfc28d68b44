//! Bringing the kernel in line with the tables: per path, all at once, after cgroup events, and
//! what an earlier run left pinned.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use tracing::{error, warn};

use super::state::State;
use crate::{
    kernel::{keys, KernelError},
    model::policy::Policy,
};

impl State {
    /// Brings the kernel in line with the table for one path, then the anchors and watches,
    /// then the existing connections below it.
    pub(super) fn sync_path(&mut self, path: &Path) -> Result<(), KernelError> {
        self.rows.touch(path);
        let want = self.want(path);
        let mut changed = self.reconciler.sync(path, want);
        self.reconciler.recheck_anchor_of(path);
        let mut anchor_errors = self.reconciler.apply_anchors();
        // A new watch: what happened before it was in place is read now, once more.
        if self.publish_watches() && changed.is_ok() {
            let again = self.reconciler.sync(path, want);
            changed = again.map(|c| c || changed.unwrap_or(false));
            anchor_errors.extend(self.reconciler.apply_anchors());
            self.publish_watches();
        }
        if self.reconciler.take_anchor_news() {
            self.rows.touch_all();
        }
        if let Some(e) = anchor_errors.into_iter().next() {
            return Err(e);
        }
        if changed? {
            self.reconciler.refresh(path);
        }
        Ok(())
    }

    /// `sync_path` for every path in the table or in force: at start and after events that
    /// concern a directory the table cannot narrow down.
    pub(super) fn sync_all(&mut self) {
        self.rows.touch_all();
        let paths: BTreeSet<PathBuf> = self
            .effective()
            .into_keys()
            .chain(self.reconciler.in_force().keys().cloned())
            .collect();
        for path in paths {
            let want = self.want(&path);
            let _ = self.reconciler.sync(&path, want);
        }
        let _ = self.reconciler.apply_anchors(); // logged there
        if self.publish_watches() {
            let paths: Vec<PathBuf> = self.reconciler.in_force().keys().cloned().collect();
            for path in paths {
                let want = self.want(&path);
                let _ = self.reconciler.sync(&path, want);
            }
            let _ = self.reconciler.apply_anchors();
            self.publish_watches();
        }
        self.reconciler.take_anchor_news();
    }

    /// After a start: the connections that existed before give every policy its due.
    pub(super) fn refresh_all(&mut self) {
        let tops: Vec<PathBuf> = {
            let in_force = self.reconciler.in_force();
            in_force
                .keys()
                .filter(|p| !p.ancestors().skip(1).any(|a| in_force.contains_key(a)))
                .cloned()
                .collect()
        };
        for path in tops {
            self.reconciler.refresh(&path);
        }
    }

    /// Cgroups were created or removed at these paths (or the watched directory went away):
    /// re-check the policies at and below them.
    pub(super) fn on_cgroup_events(&mut self, paths: &[PathBuf]) {
        let mut affected = BTreeSet::new();
        let table: BTreeSet<PathBuf> = self
            .effective()
            .into_keys()
            .chain(self.reconciler.in_force().keys().cloned())
            .collect();
        for changed in paths {
            self.reconciler.recheck_anchors_at(changed);
            self.watcher.forget_below(changed);
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
    pub(super) fn publish_watches(&mut self) -> bool {
        self.watcher.set(&self.reconciler.watch_dirs())
    }

    /// Policies the pinned map holds that neither the state file nor the config file has:
    /// kept and adopted, loudly, never dropped on a guess. A config-file policy that is no
    /// longer in the config file was removed on purpose and is not adopted, unless the config
    /// file is missing altogether (a wrong `--config`, a lost file): then it is kept as a
    /// config policy until a config file says otherwise.
    pub(super) fn adopt_pinned(&mut self, state_file_exists: bool, config_missing: bool) {
        let mut adopted = 0;
        for (key, value) in self.reconciler.kernel.pinned_paths() {
            let Some(path) = keys::key_path(&self.root, &key) else {
                continue;
            };
            if self.set.contains_key(&path)
                || self.from_config.contains_key(&path)
                || self.from_pods.contains_key(&path)
                || self.from_docker.contains_key(&path)
            {
                continue;
            }
            if value.flags & keepalive_common::FLAG_CONFIG != 0 {
                if config_missing {
                    let policy = Policy::from_value(&value);
                    warn!(
                        cgroup = ?path.display().to_string(),
                        %policy,
                        "a pinned config-file policy is kept: the config file is missing"
                    );
                    self.from_config.insert(path, policy);
                }
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
}
