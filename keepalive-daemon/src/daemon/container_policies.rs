//! Policies set for a container (the OCI hook, `kad set --container`): recorded with the
//! container's id, so that they can be found by it once the container is gone, shown with it,
//! and kept with their counters while a stopped container may start again. A policy is set
//! for a container by `State::set_for` (table.rs), with the checks of a user's `kad set`.
use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use tracing::{error, info};

use super::state::State;
use crate::{api::protocol::Response, host::cgroup};

/// The container a policy of the `kad set` table was set for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Container {
    /// Its full id.
    pub(super) id: String,
    /// While it is stopped: its bundle (the runtime's directory for it, kept until the
    /// container is removed). The policy stays while the bundle exists.
    pub(super) stopped_bundle: Option<PathBuf>,
}

impl State {
    /// The OCI hook's poststop: the container's policy stays, counters and all, while its bundle
    /// exists (a stop, after which it may start again); it goes once the bundle is gone (see
    /// [`State::collect_removed_containers`]), or now when this daemon cannot see the bundle or
    /// the policy is not this container's. From a user (the hook of rootless podman runs as
    /// them), only for a policy they set, as `kad unset`, and with a bundle of theirs.
    pub(super) fn container_stopped(
        &mut self,
        input: &str,
        id: &str,
        bundle: &str,
        uid: u32,
    ) -> Response {
        let path = match cgroup::policy_path(&self.root, input) {
            Ok(path) => path,
            Err(cgroup::CgroupError::NotFound(_)) => {
                match cgroup::lexical_path(&self.root, input) {
                    Ok(path) => path,
                    Err(e) => return Response::error(e.to_string()),
                }
            }
            Err(e) => return Response::error(e.to_string()),
        };
        if uid != 0 && self.set.contains_key(&path) && self.owners.get(&path) != Some(&uid) {
            return Response::error(format!(
                "permission denied: uid {uid} set no policy for {}; a user may remove only \
                 their own",
                path.display()
            ));
        }
        let bundle = PathBuf::from(bundle);
        let ours =
            self.set.contains_key(&path) && self.containers.get(&path).is_some_and(|c| c.id == id);
        let seen = bundle.is_absolute()
            && std::fs::metadata(&bundle).is_ok_and(|m| m.is_dir() && (uid == 0 || m.uid() == uid));
        if !ours || !seen {
            return self.unset_path(path);
        }
        if let Some(c) = self.containers.get_mut(&path) {
            c.stopped_bundle = Some(bundle);
        }
        if let Err(e) = self.persist(&path) {
            // Not saved: the policy goes now, as before there was a stopped state.
            error!(cgroup = ?path.display().to_string(), "{e}");
            return self.unset_path(path);
        }
        self.rows.touch(&path);
        info!(cgroup = ?path.display().to_string(), container = id, "container stopped: its policy waits for its next start");
        Response::done(path.display().to_string())
    }

    /// How many policies wait for a stopped container (their bundles are looked at each tick).
    pub(super) fn stopped_containers(&self) -> usize {
        self.containers
            .values()
            .filter(|c| c.stopped_bundle.is_some())
            .count()
    }

    /// Removes the policies of stopped containers whose bundle is gone: the container was
    /// removed. Returns whether anything was.
    pub(super) fn collect_removed_containers(&mut self) -> bool {
        let removed: Vec<PathBuf> = self
            .containers
            .iter()
            .filter(|(_, c)| c.stopped_bundle.as_deref().is_some_and(|b| !b.exists()))
            .map(|(path, _)| path.clone())
            .collect();
        for path in &removed {
            if let Some(c) = self.containers.get(path) {
                info!(cgroup = ?path.display().to_string(), container = c.id, "container removed: its policy goes");
            }
            if let Response::Error { message } = self.unset_path(path.clone()) {
                error!(cgroup = ?path.display().to_string(), "{message}");
            }
        }
        !removed.is_empty()
    }

    /// The container a path's policy was set for, and whether it is stopped.
    pub(super) fn container_of(&self, path: &Path) -> Option<(String, bool)> {
        self.containers
            .get(path)
            .map(|c| (c.id.clone(), c.stopped_bundle.is_some()))
    }
}
