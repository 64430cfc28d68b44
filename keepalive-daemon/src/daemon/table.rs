//! The policy tables and how they merge: `kad set` (and `kad exec`) wins over pods' annotations,
//! which win over Docker containers' labels, which win over the config file.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use tracing::{error, info};

use super::{container_policies::Container, state::State};
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
    /// Pods' annotations, then Docker containers' labels, win over the config file.
    pub(super) fn effective(&self) -> BTreeMap<PathBuf, (Policy, Source)> {
        // Built in one pass over sorted rows rather than by inserts: it is rebuilt after every
        // command (for the snapshot), and comparing paths is what costs.
        let mut rows: Vec<(&PathBuf, (Policy, Source))> = self
            .from_config
            .iter()
            .map(|(path, policy)| (path, (*policy, Source::Config)))
            .chain(
                self.from_docker
                    .iter()
                    .map(|(path, (policy, _))| (path, (*policy, Source::Docker))),
            )
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
        if let Some((p, _)) = self.from_docker.get(path) {
            return Some((*p, Source::Docker));
        }
        self.from_config.get(path).map(|p| (*p, Source::Config))
    }

    pub(super) fn pod_of(&self, path: &Path, source: Source) -> Option<String> {
        (source == Source::Pod)
            .then(|| self.from_pods.get(path).map(|(_, pod)| pod.clone()))
            .flatten()
    }

    pub(super) fn docker_of(&self, path: &Path, source: Source) -> Option<String> {
        (source == Source::Docker)
            .then(|| self.from_docker.get(path).map(|(_, name)| name.clone()))
            .flatten()
    }

    /// `kad set` from `uid`: root anywhere, a user in the cgroups delegated to them.
    pub(super) fn set(&mut self, input: &str, policy: Policy, uid: u32) -> Response {
        self.set_for(input, policy, None, uid)
    }

    /// `kad set` from `uid`, recording the container the policy is for (the OCI hook, `kad set
    /// --container`) or, without one, that it is for none: a `kad set --cgroup` on a
    /// container's path makes the policy the user's. `input` is relative to the daemon's
    /// cgroup2 root (or absolute below it): resolved first, so that a user's permission is
    /// checked on the path the policy would be kept by.
    pub(super) fn set_for(
        &mut self,
        input: &str,
        policy: Policy,
        container: Option<String>,
        uid: u32,
    ) -> Response {
        let path = match cgroup::policy_path(&self.root, input) {
            Ok(path) => path,
            Err(e) => return Response::error(e.to_string()),
        };
        if uid != 0 {
            if let Err(message) = self.user_may_set(&path, &policy, uid) {
                return Response::error(message);
            }
        }
        // Recorded before the policy is saved, so that its entry holds them.
        let previous_owner = if uid != 0 {
            self.owners.insert(path.clone(), uid)
        } else {
            self.owners.remove(&path)
        };
        let previous_container = match container {
            Some(id) => self.containers.insert(
                path.clone(),
                Container {
                    id,
                    stopped_bundle: None,
                },
            ),
            None => self.containers.remove(&path),
        };
        let reply = self.set_path(path.clone(), policy);
        if let Response::Error { .. } = reply {
            match previous_owner {
                Some(owner) => self.owners.insert(path.clone(), owner),
                None => self.owners.remove(&path),
            };
            match previous_container {
                Some(c) => self.containers.insert(path, c),
                None => self.containers.remove(&path),
            };
        }
        reply
    }

    /// Why user `uid` may not set `policy` at `path`, if they may not.
    fn user_may_set(&self, path: &Path, policy: &Policy, uid: u32) -> Result<(), String> {
        if cgroup::delegated_to(&self.root, path, uid).is_none() {
            return Err(format!(
                "permission denied: {} is not in a cgroup delegated to uid {uid} (one that it \
                 and its cgroup.procs are owned by, as systemd's Delegate= makes them); only \
                 root may change policies elsewhere",
                path.display()
            ));
        }
        if policy.locked {
            return Err("permission denied: only root may set a locked policy".into());
        }
        if let Some((_, source)) = self.want(path) {
            if self.owners.get(path) != Some(&uid) {
                return Err(format!(
                    "permission denied: the policy for {} is not yours (it comes from {}); \
                     only root may replace it",
                    path.display(),
                    source.describe()
                ));
            }
        }
        for above in path.ancestors().skip(1) {
            if let Some((p, _)) = self.want(above).filter(|(p, _)| p.locked) {
                return Err(format!(
                    "permission denied: the policy for {} ({p}) is locked by root: users may \
                     not set policies below it",
                    above.display()
                ));
            }
            if above == self.root {
                break;
            }
        }
        let held = self.owners.values().filter(|&&o| o == uid).count();
        let limit = self.config.user_policy_limit;
        if !self.owners.contains_key(path) && held >= limit {
            return Err(format!(
                "uid {uid} has {held} policies, the most a user may have (kad daemon \
                 --user-policy-limit {limit}): unset one first"
            ));
        }
        Ok(())
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

    /// `kad unset` from `uid`: root any policy, a user only their own.
    pub(super) fn unset(&mut self, input: &str, uid: u32) -> Response {
        // A cgroup that is gone can still have its policy removed, by the path it had.
        let path = match cgroup::policy_path(&self.root, input) {
            Ok(path) => path,
            Err(CgroupError::NotFound(_)) => match cgroup::lexical_path(&self.root, input) {
                Ok(path) => path,
                Err(e) => return Response::error(e.to_string()),
            },
            Err(e) => return Response::error(e.to_string()),
        };
        if uid != 0 && self.owners.get(&path) != Some(&uid) {
            return Response::error(format!(
                "permission denied: uid {uid} set no policy for {}; a user may remove only \
                 their own",
                path.display()
            ));
        }
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
            if path == self.root {
                return Response::error("no host policy (kad set --host sets one)");
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
        self.owners.remove(&path);
        if let Err(e) = self.sync_path(&path) {
            // The config file's policy for this path could not be put back in force.
            error!(cgroup = ?path.display().to_string(), "{e}");
        }
        info!(cgroup = ?path.display().to_string(), "policy removed");
        Response::done(path.display().to_string())
    }

    /// Re-reads the config file; on error the previous config stays in force. A missing file
    /// removes nothing: a config that had policies is emptied by an empty file, not by a lost
    /// one. A config the kernel cannot hold whole (more policies than the map takes, or a
    /// policy the kernel refuses) is refused and the previous one put back: a reload is done
    /// all at once or not at all.
    pub(super) fn reload(&mut self) -> Response {
        let had_policies = !self.from_config.is_empty();
        let from_config = match config_file::load(&self.config.config, &self.root, had_policies) {
            Ok(None) if !self.from_config.is_empty() => {
                return Response::error(format!(
                    "{} does not exist: its {} policies stay in force (to remove them, make the file empty)",
                    self.config.config.display(),
                    self.from_config.len()
                ))
            }
            Ok(loaded) => loaded.unwrap_or_default(),
            Err(e) => return Response::error(format!("{e}; the previous config stays in force")),
        };
        // Every path the kernel would hold: refused before anything changes if too many.
        let paths: BTreeSet<&PathBuf> = self
            .set
            .keys()
            .chain(self.from_pods.keys())
            .chain(self.from_docker.keys())
            .chain(from_config.keys())
            .collect();
        let max = keepalive_common::MAX_POLICIES as usize;
        if paths.len() > max {
            return Response::error(format!(
                "{} has {} policies, {} with the others in force: more than the kernel's map \
                 holds (at most {max}); nothing was changed, the previous config stays in force",
                self.config.config.display(),
                from_config.len(),
                paths.len()
            ));
        }
        let previous = std::mem::replace(&mut self.from_config, from_config);
        let changed: BTreeSet<PathBuf> = previous
            .iter()
            .filter(|(path, policy)| self.from_config.get(*path) != Some(*policy))
            .map(|(path, _)| path.clone())
            .chain(
                self.from_config
                    .iter()
                    .filter(|(path, policy)| previous.get(*path) != Some(*policy))
                    .map(|(path, _)| path.clone()),
            )
            .collect();
        // Only the paths whose entry changed are touched: the others keep their map entries
        // as they are, with no moment without them.
        let mut refused = None;
        for path in &changed {
            if let Err(e) = self.sync_path(path) {
                refused = Some((path.clone(), e));
                break;
            }
        }
        if let Some((path, e)) = refused {
            self.from_config = previous;
            let mut not_back = Vec::new();
            for path in &changed {
                if let Err(e) = self.sync_path(path) {
                    error!(cgroup = ?path.display().to_string(), "cannot put the previous config's policy back: {e}");
                    not_back.push(format!("{} ({e})", path.display()));
                }
            }
            let outcome = if not_back.is_empty() {
                "nothing was changed, the previous config stays in force".to_string()
            } else {
                format!(
                    "the previous config was put back, except for {} path(s) not in force now \
                     (kad status shows them): {}",
                    not_back.len(),
                    not_back.join(", ")
                )
            };
            return Response::error(format!(
                "{}: the policy for {} cannot be put in force ({e}); {outcome}",
                self.config.config.display(),
                path.display()
            ));
        }
        super::state::save_config_copy(
            &super::store::Store::config_copy(&self.config.state_dir),
            &self.from_config,
            &self.root,
        );
        // Unchanged policies that were not in force (refused before): tried again.
        let failing: Vec<PathBuf> = self
            .from_config
            .keys()
            .filter(|path| !changed.contains(*path) && self.reconciler.failing(path).is_some())
            .cloned()
            .collect();
        for path in failing {
            let _ = self.sync_path(&path); // logged there
        }
        info!(config = %self.config.config.display(), policies = self.from_config.len(), "config reloaded");
        Response::Reloaded {
            policies: self.from_config.len(),
        }
    }
}
