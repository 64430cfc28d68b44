//! Docker containers' labels as policies: the events that change them, and docker.json.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
};

use tracing::{error, info, warn};

use super::state::State;
use crate::{
    containers::docker::DockerEvent,
    daemon::store::{StoreError, StoredPolicy},
    host::cgroup,
};

impl State {
    /// One event from the Docker watcher: the containers' policies are worked out again and
    /// the paths whose policy changed are brought in line.
    pub(super) fn on_docker_event(&mut self, event: DockerEvent) {
        if let DockerEvent::Connection {
            ok,
            message,
            api,
            driver,
        } = &event
        {
            if let Some(status) = &mut self.docker_status {
                if !ok {
                    warn!(
                        "docker watcher: {}; the Docker policies in force stay, retrying",
                        message.as_deref().unwrap_or("disconnected")
                    );
                } else if !status.connected {
                    info!(
                        api = api.as_deref().unwrap_or("?"),
                        cgroup_driver = driver.map(|d| d.name()).unwrap_or("?"),
                        "docker watcher: connected"
                    );
                }
                status.connected = *ok;
                status.error = if *ok { None } else { message.clone() };
                status.api = if *ok { api.clone() } else { None };
                status.cgroup_driver = driver.filter(|_| *ok).map(|d| d.name().to_string());
            }
            return;
        }
        if !self.docker_table.apply(event) {
            return;
        }
        let (by_relative, mut invalid) = self.docker_table.wanted();
        let mut wanted = BTreeMap::new();
        for (relative, w) in by_relative {
            let policy = match w.policy {
                Ok(policy) => policy,
                Err(e) => {
                    invalid.push(format!("container {}: {e}", w.container));
                    continue;
                }
            };
            // The path as `kad set` would take it: below the root, and not the root itself.
            match cgroup::policy_path(&self.root, &relative) {
                Ok(path) => {
                    wanted.insert(path, (policy, w.container));
                }
                Err(e) => invalid.push(format!("container {}: {e}", w.container)),
            }
        }
        if let Some(status) = &mut self.docker_status {
            for line in invalid.iter().filter(|l| !status.invalid.contains(l)) {
                warn!(
                    "docker {line}; it runs without a policy (Docker cannot be stopped from \
                     starting it)"
                );
            }
            status.containers = self.docker_table.containers();
            status.invalid = invalid;
        }
        if wanted == self.from_docker {
            return;
        }
        let changed: BTreeSet<PathBuf> = wanted
            .iter()
            .filter(|(path, w)| self.from_docker.get(*path) != Some(*w))
            .map(|(path, _)| path.clone())
            .chain(
                self.from_docker
                    .keys()
                    .filter(|path| !wanted.contains_key(*path))
                    .cloned(),
            )
            .collect();
        self.from_docker = wanted;
        for path in &changed {
            match self.from_docker.get(path) {
                Some((policy, name)) => {
                    info!(cgroup = ?path.display().to_string(), container = %name, %policy, "docker policy")
                }
                None => info!(cgroup = ?path.display().to_string(), "docker policy removed"),
            }
            if let Err(e) = self.sync_path(path) {
                error!(cgroup = ?path.display().to_string(), "{e}");
            }
        }
        let wanted: Vec<PathBuf> = self.effective().into_keys().collect();
        self.reconciler.drop_stale_ids(&wanted);
        if let Err(e) = self.save_docker() {
            error!("cannot save the Docker policies: {e}");
        }
    }

    pub(super) fn save_docker(&self) -> Result<(), StoreError> {
        self.ensure_state_dir();
        let entries: Vec<StoredPolicy> = self
            .from_docker
            .iter()
            .map(|(path, (policy, name))| StoredPolicy {
                docker: Some(name.clone()),
                ..StoredPolicy::new(path.display().to_string(), policy, None)
            })
            .collect();
        self.docker_store.save(&entries)
    }
}
