//! The policy tables and how they merge: `kad set` (and `kad exec`) wins over pods' annotations,
//! which win over the config file.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use tracing::{error, info};

use super::state::State;
use crate::{
    cgroup::{self, CgroupError},
    config as config_file,
    enforcer::EnforcerError,
    policy::Policy,
    protocol::{PolicyEntry, Response},
    reconcile::Source,
};

impl State {
    /// Policies by path: the config file's, overridden by those set with `kad set`.
    pub(super) fn effective(&self) -> BTreeMap<PathBuf, (Policy, Source)> {
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
    pub(super) fn policy_count(&self) -> usize {
        self.set.len()
            + self
                .from_config
                .keys()
                .filter(|p| !self.set.contains_key(*p))
                .count()
    }

    pub(super) fn want(&self, path: &Path) -> Option<(Policy, Source)> {
        if let Some(p) = self.set.get(path) {
            return Some((*p, Source::Set));
        }
        if let Some((p, _)) = self.from_pods.get(path) {
            return Some((*p, Source::Pod));
        }
        self.from_config.get(path).map(|p| (*p, Source::Config))
    }

    pub(super) fn entries(&self) -> Vec<PolicyEntry> {
        self.effective()
            .iter()
            .map(|(path, (policy, source))| PolicyEntry {
                pod: self.pod_of(path, *source),
                ..PolicyEntry::new(path.display().to_string(), policy)
            })
            .collect()
    }

    pub(super) fn pod_of(&self, path: &Path, source: Source) -> Option<String> {
        (source == Source::Pod)
            .then(|| self.from_pods.get(path).map(|(_, pod)| pod.clone()))
            .flatten()
    }

    pub(super) fn set(&mut self, input: &str, policy: Policy) -> Response {
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

    pub(super) fn unset(&mut self, input: &str) -> Response {
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
    pub(super) fn reload(&mut self) -> Response {
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
}
