//! The policy tables and how they merge: `kad set` (and `kad exec`) wins over pods' annotations,
//! which win over the config file.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use tracing::{error, info};

use super::state::State;
use crate::{
    api::protocol::Response,
    daemon::config as config_file,
    daemon::reconcile::Source,
    host::cgroup::{self, CgroupError},
    kernel::KernelError,
    model::policy::Policy,
};

impl State {
    /// Policies by path: the config file's, overridden by those set with `kad set`.
    /// Pods' annotations win over the config file.
    pub(super) fn effective(&self) -> BTreeMap<PathBuf, (Policy, Source)> {
        // Built in one pass over sorted rows rather than by inserts: it is rebuilt after every
        // command (for the snapshot), and comparing paths is what costs.
        let mut rows: Vec<(&PathBuf, (Policy, Source))> = self
            .from_config
            .iter()
            .map(|(path, policy)| (path, (*policy, Source::Config)))
            .chain(
                self.from_pods
                    .iter()
                    .map(|(path, (policy, _))| (path, (*policy, Source::Pod))),
            )
            .chain(
                self.set
                    .iter()
                    .map(|(path, policy)| (path, (*policy, Source::Set))),
            )
            .collect();
        // Stable: of rows for one path, the one that wins stays last.
        rows.sort_by(|a, b| a.0.cmp(b.0));
        let mut table: Vec<(&PathBuf, (Policy, Source))> = Vec::with_capacity(rows.len());
        for (path, want) in rows {
            match table.last_mut() {
                Some((last, w)) if *last == path => *w = want,
                _ => table.push((path, want)),
            }
        }
        table
            .into_iter()
            .map(|(path, want)| (path.clone(), want))
            .collect()
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

    pub(super) fn pod_of(&self, path: &Path, source: Source) -> Option<String> {
        (source == Source::Pod)
            .then(|| self.from_pods.get(path).map(|(_, pod)| pod.clone()))
            .flatten()
    }

    pub(super) fn set(&mut self, input: &str, policy: Policy) -> Response {
        self.set_for(input, policy, None)
    }

    /// `kad set` on a path already resolved below the cgroup2 root: in force, then saved, or
    /// neither.
    pub(super) fn set_path(&mut self, path: PathBuf, policy: Policy) -> Response {
        if let Err(e) = policy.validate() {
            return Response::error(e.to_string());
        }
        if !self.set.contains_key(&path)
            && !self.from_config.contains_key(&path)
            && self.policy_count() >= keepalive_common::MAX_POLICIES as usize
        {
            return Response::error(KernelError::Full.to_string());
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
        Response::done(path.display().to_string())
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
        self.unset_path(path)
    }

    /// `kad unset` on a path already resolved: removed, then saved, or neither.
    pub(super) fn unset_path(&mut self, path: PathBuf) -> Response {
        let Some(previous) = self.set.remove(&path) else {
            if self.from_config.contains_key(&path) {
                let how = if self.config.config.exists() {
                    "remove it there and run `kad reload`"
                } else {
                    "the file is missing and its policies as last read stay: write it and run `kad reload`"
                };
                return Response::error(format!(
                    "the policy for {} comes from {}: {how}",
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
        self.containers.remove(&path);
        if let Err(e) = self.sync_path(&path) {
            // The config file's policy for this path could not be put back in force.
            error!(cgroup = ?path.display().to_string(), "{e}");
        }
        info!(cgroup = ?path.display().to_string(), "policy removed");
        Response::done(path.display().to_string())
    }

    /// Re-reads the config file; on error the previous config stays in force. A missing file
    /// removes nothing: a config that had policies is emptied by an empty file, not by a lost
    /// one.
    pub(super) fn reload(&mut self) -> Response {
        match config_file::load(&self.config.config, &self.root) {
            Ok(None) if !self.from_config.is_empty() => Response::error(format!(
                "{} does not exist: its {} policies stay in force (to remove them, make the file empty)",
                self.config.config.display(),
                self.from_config.len()
            )),
            Ok(loaded) => {
                let from_config = loaded.unwrap_or_default();
                super::state::save_config_copy(
                    &super::store::Store::config_copy(&self.config.state_dir),
                    &from_config,
                    &self.root,
                );
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
