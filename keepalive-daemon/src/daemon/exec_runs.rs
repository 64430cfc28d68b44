//! The policies of `kad exec` runs: recorded with their owner, collected once it is gone.
use std::{
    io,
    path::{Path, PathBuf},
};

use tracing::{error, info, warn};

use super::state::State;
use crate::{
    api::protocol::{Peer, Response},
    host::cgroup,
    host::process::{self, ExecOwner, TRANSIENT_PREFIX},
    host::target,
    model::policy::Policy,
};

impl State {
    /// `kad exec`: a policy for the caller's transient cgroup, recorded as owned by the caller
    /// so that it is collected if the caller dies first. Only a cgroup kad recorded this way is
    /// ever removed by the daemon.
    pub(super) fn exec(&mut self, input: &str, policy: Policy, peer: Peer) -> Response {
        let Some(pid) = peer.pid.filter(|&pid| pid != 0) else {
            return Response::error(
                "kad exec: the kernel did not say which process is asking (its PID namespace is not below the daemon's)",
            );
        };
        let owner = match ExecOwner::of(pid) {
            Ok(owner) => owner,
            Err(e) => {
                return Response::error(format!("kad exec: cannot identify process {pid}: {e}"))
            }
        };
        let path = match cgroup::resolve(&self.root, input) {
            Ok(cgroup) => cgroup.path,
            Err(e) => return Response::error(e.to_string()),
        };
        if self.set.contains_key(&path) && !self.exec_owners.contains_key(&path) {
            return Response::error(format!(
                "{} has a policy set with kad set: kad exec needs a cgroup of its own",
                path.display()
            ));
        }
        // The daemon removes the cgroup once the run is gone: only one `kad exec` made.
        if let Err(message) = self.made_by_exec(&path, pid) {
            return Response::error(format!(
                "kad exec: {} {message}: the daemon removes the cgroup of a kad exec run when \
                 it ends, so it takes only the one kad exec makes (a new {TRANSIENT_PREFIX}PID \
                 below the caller's own cgroup); for an existing cgroup use kad set",
                path.display()
            ));
        }
        let previous = self.exec_owners.insert(path.clone(), owner);
        let reply = self.set(input, policy, peer.uid);
        if let Response::Error { .. } = reply {
            match previous {
                Some(owner) => self.exec_owners.insert(path, owner),
                None => self.exec_owners.remove(&path),
            };
        }
        reply
    }

    /// Why `path` is not a transient cgroup that the `kad exec` process `pid` made, if it is
    /// not: one named `kad-exec-*` right below the process's own cgroup, with no process in it
    /// yet and no policy of another kind.
    fn made_by_exec(&self, path: &Path, pid: u32) -> Result<(), &'static str> {
        let named = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(TRANSIENT_PREFIX));
        if !named {
            return Err("is not named as kad exec names its cgroups");
        }
        let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .ok()
            .and_then(|t| {
                target::cgroup_from_proc(&t).map(|c| self.root.join(c.trim_start_matches('/')))
            });
        if own.as_deref() != path.parent() {
            return Err("is not below the caller's own cgroup");
        }
        if self.exec_owners.contains_key(path) {
            return Ok(()); // the same run asking again
        }
        if self.want(path).is_some() {
            return Err("has a policy already");
        }
        if cgroup::populated(path) {
            return Err("has processes in it already");
        }
        Ok(())
    }

    /// Removes the transient cgroups (and policies) of `kad exec` runs that were killed before
    /// they could do it themselves, once their processes are gone. Only paths recorded as a
    /// `kad exec`'s: a cgroup merely named like one is the user's.
    /// Returns whether anything was collected.
    pub(super) fn collect_abandoned(&mut self) -> bool {
        let abandoned: Vec<PathBuf> = self
            .exec_owners
            .iter()
            .filter(|(path, owner)| {
                !self.set.contains_key(*path) || process::is_abandoned(path, owner)
            })
            .map(|(path, _)| path.clone())
            .collect();
        if abandoned.is_empty() {
            return false;
        }
        for path in &abandoned {
            self.exec_owners.remove(path);
            if self.set.remove(path).is_none() {
                continue;
            }
            let _ = self.sync_path(path);
            match std::fs::remove_dir(path) {
                Ok(()) => {
                    info!(cgroup = ?path.display().to_string(), "removed an abandoned kad exec cgroup")
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    info!(cgroup = ?path.display().to_string(), "removed the policy of an abandoned kad exec")
                }
                Err(e) => {
                    warn!(cgroup = ?path.display().to_string(), "cannot remove an abandoned kad exec cgroup: {e}")
                }
            }
        }
        // One journal line per removal, as `kad unset` does (it may use the journal's reserve
        // on a full disk).
        for path in &abandoned {
            if let Err(e) = self.persist(path) {
                error!(cgroup = ?path.display().to_string(), "cannot save the removal of an abandoned kad exec policy: {e}");
            }
        }
        true
    }
}
