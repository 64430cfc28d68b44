//! Docker containers' policies: a container's `kad.dev/keepalive` label is a policy on the
//! container's cgroup, put there when Docker creates the container (before it starts) and
//! removed when Docker destroys it (`docker rm`). This module knows nothing of Docker's API: it
//! takes [`DockerEvent`]s from the watcher of `kad daemon --docker` (docker_watch.rs) and says
//! which policies the containers want.
use std::collections::{BTreeMap, BTreeSet};

use crate::{
    containers::annotation::{self, AnnotationError},
    model::policy::Policy,
};

/// Where Docker asks not to look for it: its default socket.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

/// Docker's cgroup driver (`docker info`: `CgroupDriver`), which decides where a container's
/// cgroup is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    Cgroupfs,
    Systemd,
}

impl Driver {
    pub fn from_info(name: &str) -> Option<Driver> {
        match name {
            "cgroupfs" => Some(Driver::Cgroupfs),
            "systemd" => Some(Driver::Systemd),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Driver::Cgroupfs => "cgroupfs",
            Driver::Systemd => "systemd",
        }
    }

    /// The container's cgroup, relative to the cgroup2 root, as dockerd asks runc for it:
    /// with cgroupfs `PARENT/ID` (PARENT `/docker` unless the container's `--cgroup-parent`
    /// says otherwise), with systemd `PARENT/docker-ID.scope` (PARENT `system.slice`, or the
    /// container's slice, expanded as systemd nests slices: `a-b.slice` is
    /// `a.slice/a-b.slice`). None for an id or parent that cannot be a path.
    pub fn container_path(self, id: &str, cgroup_parent: &str) -> Option<String> {
        // A container id is 64 hex digits; anything else must not become a path.
        if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        if cgroup_parent.split('/').any(|c| c == "..") {
            return None;
        }
        match self {
            Driver::Cgroupfs => {
                let parent = match cgroup_parent.trim_matches('/') {
                    "" if cgroup_parent.is_empty() => "docker",
                    p => p,
                };
                Some(if parent.is_empty() {
                    id.to_string()
                } else {
                    format!("{parent}/{id}")
                })
            }
            Driver::Systemd => {
                let slice = if cgroup_parent.is_empty() {
                    "system.slice"
                } else {
                    cgroup_parent
                };
                let parent = expand_slice(slice)?;
                Some(if parent.is_empty() {
                    format!("docker-{id}.scope")
                } else {
                    format!("{parent}/docker-{id}.scope")
                })
            }
        }
    }
}

/// systemd's path for a slice: `a-b-c.slice` is `a.slice/a-b.slice/a-b-c.slice`; `-.slice`
/// is the root (empty).
fn expand_slice(slice: &str) -> Option<String> {
    let name = slice.strip_suffix(".slice")?;
    if name == "-" {
        return Some(String::new());
    }
    if name.is_empty() || name.contains('/') || name.starts_with('-') || name.ends_with('-') {
        return None;
    }
    let mut path = Vec::new();
    let mut prefix = String::new();
    for part in name.split('-') {
        if part.is_empty() {
            return None; // "a--b.slice" is not a valid slice
        }
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        path.push(format!("{prefix}.slice"));
    }
    Some(path.join("/"))
}

/// What the watcher saw, one change at a time. A full list (at start and after each
/// reconnection) is `ListStart`, the labelled containers, `ListDone`: what the list did not
/// name is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DockerEvent {
    /// A container with the label was created (or is named by a list).
    Container {
        /// The full id (64 hex digits).
        id: String,
        /// Its name, without Docker's leading `/`.
        name: String,
        /// Its cgroup, relative to the cgroup2 root ([`Driver::container_path`]); None when
        /// its id or parent cannot be one.
        cgroup: Option<String>,
        /// The value of the `kad.dev/keepalive` label.
        label: String,
    },
    /// `docker rm`: the container is destroyed.
    Removed {
        id: String,
    },
    ListStart,
    ListDone,
    /// Docker answered (again), or could not be reached: for `kad status`.
    Connection {
        ok: bool,
        message: Option<String>,
        /// When connected: the API version spoken and the cgroup driver.
        api: Option<String>,
        driver: Option<Driver>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Container {
    name: String,
    cgroup: Option<String>,
    label: String,
}

/// A policy a container wants, or why it has none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// The container's name.
    pub container: String,
    pub policy: Result<Policy, String>,
}

/// The labelled containers as the events described them.
#[derive(Debug, Default)]
pub struct DockerTable {
    containers: BTreeMap<String, Container>,
    /// During a list: what was there before and has not been named again yet.
    stale: Option<BTreeSet<String>>,
}

impl DockerTable {
    /// Applies one event; false if it cannot change any container's policy.
    pub fn apply(&mut self, event: DockerEvent) -> bool {
        match event {
            DockerEvent::Container {
                id,
                name,
                cgroup,
                label,
            } => {
                if let Some(stale) = &mut self.stale {
                    stale.remove(&id);
                }
                let container = Container {
                    name,
                    cgroup,
                    label,
                };
                self.containers.insert(id, container.clone()) != Some(container)
            }
            DockerEvent::Removed { id } => {
                if let Some(stale) = &mut self.stale {
                    stale.remove(&id);
                }
                self.containers.remove(&id).is_some()
            }
            DockerEvent::ListStart => {
                self.stale = Some(self.containers.keys().cloned().collect());
                false
            }
            DockerEvent::ListDone => {
                let stale = self.stale.take().unwrap_or_default();
                for id in &stale {
                    self.containers.remove(id);
                }
                !stale.is_empty()
            }
            DockerEvent::Connection { .. } => false,
        }
    }

    /// Labelled containers known to kad.
    pub fn containers(&self) -> usize {
        self.containers.len()
    }

    /// The policy each labelled container wants, by its cgroup path (relative to the cgroup2
    /// root). A container whose cgroup cannot be known wants nothing, with why.
    pub fn wanted(&self) -> (BTreeMap<String, Wanted>, Vec<String>) {
        let mut out = BTreeMap::new();
        let mut invalid = Vec::new();
        for (id, c) in &self.containers {
            let short = &id[..id.len().min(12)];
            let who = format!("container {} ({short})", c.name);
            let Some(path) = &c.cgroup else {
                invalid.push(format!(
                    "{who}: its id or --cgroup-parent is not a cgroup path"
                ));
                continue;
            };
            match annotation::parse(&c.label) {
                Ok(policy) => {
                    out.insert(
                        path.clone(),
                        Wanted {
                            container: c.name.clone(),
                            policy: Ok(policy),
                        },
                    );
                }
                Err(e) => invalid.push(format!("{who}: {}", label_error(&e))),
            }
        }
        (out, invalid)
    }
}

/// The annotation's error, said of a label.
pub fn label_error(e: &AnnotationError) -> String {
    match e {
        AnnotationError::Invalid { value, problem } => {
            format!("label {}={value:?}: {problem}", annotation::KEY)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "7c65eae03a553b023b6b50b2184db6aedd37dfd5a7412156137c430e7f8e44d4";

    #[test]
    fn container_paths_for_both_drivers() {
        let c = Driver::Cgroupfs;
        assert_eq!(c.container_path(ID, "").unwrap(), format!("docker/{ID}"));
        assert_eq!(
            c.container_path(ID, "/kad-test/x").unwrap(),
            format!("kad-test/x/{ID}")
        );
        assert_eq!(c.container_path(ID, "/").unwrap(), ID);
        let s = Driver::Systemd;
        assert_eq!(
            s.container_path(ID, "").unwrap(),
            format!("system.slice/docker-{ID}.scope")
        );
        assert_eq!(
            s.container_path(ID, "app-web.slice").unwrap(),
            format!("app.slice/app-web.slice/docker-{ID}.scope")
        );
        assert_eq!(
            s.container_path(ID, "-.slice").unwrap(),
            format!("docker-{ID}.scope")
        );
        for (id, parent) in [
            ("abc", ""),
            (&ID.replace('7', "/"), ""),
            (ID, "/a/../b"),
            (ID, "app"),
            (ID, "a--b.slice"),
        ] {
            let driver = if parent.ends_with(".slice") || parent == "app" {
                Driver::Systemd
            } else {
                Driver::Cgroupfs
            };
            assert_eq!(driver.container_path(id, parent), None, "{id} {parent}");
        }
        assert_eq!(Driver::from_info("systemd"), Some(Driver::Systemd));
        assert_eq!(Driver::from_info("none"), None);
    }

    fn container(c: &str, label: &str) -> DockerEvent {
        let id = c.repeat(64);
        DockerEvent::Container {
            cgroup: Driver::Cgroupfs.container_path(&id, ""),
            id,
            name: format!("n-{c}"),
            label: label.into(),
        }
    }

    #[test]
    fn creates_removes_lists_and_bad_labels() {
        let mut t = DockerTable::default();
        assert!(t.apply(container("a", "idle=200")));
        assert!(!t.apply(container("a", "idle=200")), "unchanged");
        let (w, invalid) = t.wanted();
        assert!(invalid.is_empty());
        let (path, wanted) = w.iter().next().unwrap();
        assert_eq!(path, &format!("docker/{}", "a".repeat(64)));
        assert_eq!(wanted.container, "n-a");
        assert_eq!(wanted.policy.as_ref().unwrap().idle, Some(200));

        // A bad label: no policy, and why, naming the container and the label.
        t.apply(container("b", "idle=0"));
        let (w, invalid) = t.wanted();
        assert_eq!(w.len(), 1);
        assert_eq!(invalid.len(), 1);
        assert!(
            invalid[0].starts_with(
                "container n-b (bbbbbbbbbbbb): label kad.dev/keepalive=\"idle=0\": idle must"
            ),
            "{}",
            invalid[0]
        );

        assert!(t.apply(DockerEvent::Removed { id: "b".repeat(64) }));
        assert!(!t.apply(DockerEvent::Removed { id: "b".repeat(64) }));
        // A list that no longer names a drops it; one created meanwhile is added.
        t.apply(DockerEvent::ListStart);
        t.apply(container("c", "off"));
        assert!(t.apply(DockerEvent::ListDone));
        let (w, _) = t.wanted();
        assert_eq!(
            w.values().map(|w| w.container.as_str()).collect::<Vec<_>>(),
            ["n-c"]
        );
        assert_eq!(t.containers(), 1);
    }
}
