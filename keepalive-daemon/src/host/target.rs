//! Naming a cgroup by something other than its path: a systemd unit or slice, a process, a
//! container.
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("invalid unit name '{0}': give a unit such as nginx.service")]
    BadUnit(String),
    #[error("invalid slice '{0}': give a slice such as system.slice")]
    BadSlice(String),
    #[error("no process {0}")]
    NoProcess(u32),
    #[error("cannot read /proc/{pid}/cgroup: {source}")]
    Proc {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("process {0} has no cgroup v2 membership in /proc/{0}/cgroup")]
    NoCgroup2(u32),
    #[error("invalid container id '{0}': give the container's id or a prefix of it (hex), e.g. from `podman ps` or `docker ps`, not its name")]
    BadContainerId(String),
    #[error("no running container with an id starting with '{id}' under {root} (a stopped container has no cgroup)")]
    NoContainer { id: String, root: PathBuf },
    #[error("the id prefix '{id}' matches {count} containers ({examples}): give more of the id")]
    AmbiguousContainer {
        id: String,
        count: usize,
        examples: String,
    },
}

/// The most cgroup directories a container lookup reads (a host has a few thousand).
const MAX_CGROUP_DIRS: usize = 500_000;

/// The cgroup of a running container, from its id or a unique prefix of it, under `root`.
///
/// Runtimes name a container's cgroup after its 64-hex id, by cgroup driver:
/// - podman: `libpod-ID` (cgroupfs, below `--cgroup-parent`), `libpod-ID.scope` (systemd);
/// - docker: `docker/ID` (cgroupfs), `docker-ID.scope` (systemd);
/// - containerd: `ID` (cgroupfs, below the pod's cgroup or the namespace),
///   `cri-containerd-ID.scope` (systemd);
/// - CRI-O: `crio-ID` (cgroupfs), `crio-ID.scope` (systemd).
///
/// Monitors (`libpod-conmon-ID.scope`, `crio-conmon-ID.scope`) are not the container.
pub fn container_path(root: &Path, id: &str) -> Result<PathBuf, TargetError> {
    let id = id.trim();
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(TargetError::BadContainerId(id.chars().take(80).collect()));
    }
    let id = id.to_ascii_lowercase();
    let mut found: Vec<(String, PathBuf)> = Vec::new();
    let mut queue = std::collections::VecDeque::from([root.to_path_buf()]);
    let mut seen = 0;
    while let Some(dir) = queue.pop_front() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            seen += 1;
            if seen > MAX_CGROUP_DIRS {
                break;
            }
            let path = entry.path();
            let name = entry.file_name();
            match name.to_str().and_then(container_id_of) {
                // Below a container's cgroup are its own cgroups, not other containers.
                Some(found_id) if found_id.starts_with(&id) => {
                    found.push((found_id.to_string(), path))
                }
                Some(_) => {}
                None => queue.push_back(path),
            }
        }
    }
    match found.len() {
        0 => Err(TargetError::NoContainer {
            id,
            root: root.to_path_buf(),
        }),
        1 => Ok(found.remove(0).1),
        count => {
            found.sort();
            let examples = found
                .iter()
                .take(3)
                .map(|(_, path)| path.display().to_string())
                .collect::<Vec<_>>()
                .join(", ");
            Err(TargetError::AmbiguousContainer {
                id,
                count,
                examples,
            })
        }
    }
}

/// The container id a cgroup directory's name carries, if it is a container's cgroup.
pub fn container_id_of(name: &str) -> Option<&str> {
    let stem = name.strip_suffix(".scope").unwrap_or(name);
    let id = ["libpod-", "docker-", "cri-containerd-", "crio-"]
        .iter()
        .find_map(|prefix| stem.strip_prefix(prefix))
        .unwrap_or(stem);
    (id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))).then_some(id)
}

/// The cgroup path (relative to the cgroup2 root) systemd gives `unit` in `slice`
/// (`system.slice` when not given). A name without a type suffix is a service, as for systemctl.
/// The slice is a slice's name, placed by [`slice_path`] (`a-b.slice` is `a.slice/a-b.slice`,
/// `-.slice` the root), or a path below the root (`a.slice/a-b.slice`), taken as given.
pub fn unit_path(unit: &str, slice: Option<&str>) -> Result<String, TargetError> {
    let unit = unit.trim();
    if unit.is_empty()
        || unit.contains('/')
        || unit.starts_with('.')
        || unit.contains(char::is_whitespace)
    {
        return Err(TargetError::BadUnit(unit.to_string()));
    }
    let unit = if unit.contains('.') {
        unit.to_string()
    } else {
        format!("{unit}.service")
    };
    let slice = slice.unwrap_or("system.slice").trim().trim_matches('/');
    if slice.is_empty()
        || slice
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err(TargetError::BadSlice(slice.to_string()));
    }
    // A single name that is not a slice's (`--slice app`) stays a path, as it always was.
    let slice = if slice.contains('/') {
        None
    } else {
        slice_path(slice)
    }
    .unwrap_or_else(|| slice.to_string());
    if slice.is_empty() {
        return Ok(unit);
    }
    Ok(format!("{slice}/{unit}"))
}

/// The path below the cgroup2 root of the systemd slice named `slice`, which systemd derives
/// from the name alone: each `-` starts a child of the slice named by what precedes it, so
/// `a-b-c.slice` is `a.slice/a-b.slice/a-b-c.slice`, and `-.slice` is the root itself (""). `None`
/// for a name that is not a slice's (no `.slice` suffix, a `/`, an empty part between dashes).
pub fn slice_path(slice: &str) -> Option<String> {
    if slice == "-.slice" {
        return Some(String::new());
    }
    let stem = slice.strip_suffix(".slice")?;
    if stem.is_empty() || stem.contains('/') || stem.starts_with('-') || stem.ends_with('-') {
        return None;
    }
    let mut path = Vec::new();
    let mut prefix = String::new();
    for part in stem.split('-') {
        if part.is_empty() {
            return None;
        }
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        path.push(format!("{prefix}.slice"));
    }
    Some(path.join("/"))
}

/// The absolute cgroup path of process `pid`, from the `0::` line of `/proc/PID/cgroup`.
pub fn pid_path(root: &Path, pid: u32) -> Result<PathBuf, TargetError> {
    let text = match std::fs::read_to_string(format!("/proc/{pid}/cgroup")) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(TargetError::NoProcess(pid))
        }
        Err(source) => return Err(TargetError::Proc { pid, source }),
    };
    let relative = cgroup_from_proc(&text).ok_or(TargetError::NoCgroup2(pid))?;
    Ok(root.join(relative.trim_start_matches('/')))
}

/// The unified-hierarchy path in the text of `/proc/PID/cgroup`.
pub fn cgroup_from_proc(text: &str) -> Option<&str> {
    text.lines().find_map(|line| line.strip_prefix("0::"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_map_to_their_slice() {
        assert_eq!(
            unit_path("nginx.service", None).unwrap(),
            "system.slice/nginx.service"
        );
        assert_eq!(
            unit_path("nginx", None).unwrap(),
            "system.slice/nginx.service"
        );
        assert_eq!(
            unit_path("app.scope", Some("user.slice")).unwrap(),
            "user.slice/app.scope"
        );
        assert_eq!(
            unit_path("x.service", Some("/a.slice/a-b.slice/")).unwrap(),
            "a.slice/a-b.slice/x.service"
        );
        for bad in ["", "a/b", "../x", ".hidden", "two words"] {
            assert!(unit_path(bad, None).is_err(), "{bad}");
        }
        assert!(unit_path("x", Some("../etc")).is_err());
        assert!(unit_path("x", Some("")).is_err());
        // A slice's name is placed as systemd places it; other names and paths as given.
        assert_eq!(
            unit_path("x", Some("a-b.slice")).unwrap(),
            "a.slice/a-b.slice/x.service"
        );
        assert_eq!(
            unit_path("init.scope", Some("-.slice")).unwrap(),
            "init.scope"
        );
        assert_eq!(unit_path("x", Some("app")).unwrap(), "app/x.service");
    }

    /// systemd's rules (systemd.slice(5)): a slice's parents are named by the prefixes of its
    /// name up to each dash, and `-.slice` is the root slice.
    #[test]
    fn slices_are_placed_by_their_names() {
        assert_eq!(
            slice_path("a-b-c.slice").as_deref(),
            Some("a.slice/a-b.slice/a-b-c.slice")
        );
        assert_eq!(slice_path("system.slice").as_deref(), Some("system.slice"));
        assert_eq!(
            slice_path("kubepods-besteffort-pod1_2.slice").as_deref(),
            Some("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1_2.slice")
        );
        assert_eq!(slice_path("-.slice").as_deref(), Some(""));
        for bad in [
            "",
            "a",
            "a.service",
            ".slice",
            "-a.slice",
            "a-.slice",
            "a--b.slice",
            "a/b.slice",
            "a.slice/b.slice",
        ] {
            assert_eq!(slice_path(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn container_cgroup_names() {
        let id = "8d2c46a4838bdc0bba93a66adc9c1aa38ceb04e3cd55daafe93e8ce991cd6618";
        for name in [
            format!("libpod-{id}"),
            format!("libpod-{id}.scope"),
            format!("docker-{id}.scope"),
            id.to_string(),
            format!("cri-containerd-{id}.scope"),
            format!("crio-{id}"),
            format!("crio-{id}.scope"),
        ] {
            assert_eq!(container_id_of(&name), Some(id), "{name}");
        }
        for name in [
            format!("libpod-conmon-{id}.scope"),
            format!("crio-conmon-{id}.scope"),
            "system.slice".to_string(),
            format!("kubepods-besteffort-pod{}.slice", &id[..32]),
            id[..63].to_string(),
            id.to_uppercase(),
        ] {
            assert_eq!(container_id_of(&name), None, "{name}");
        }
        for bad in ["", "my-container", "abc/def", &format!("{id}0")] {
            assert!(matches!(
                container_path(Path::new("/nonexistent"), bad),
                Err(TargetError::BadContainerId(_))
            ));
        }
    }

    #[test]
    fn proc_cgroup_lines() {
        let hybrid = "12:memory:/user.slice\n0::/system.slice/nginx.service\n";
        assert_eq!(
            cgroup_from_proc(hybrid),
            Some("/system.slice/nginx.service")
        );
        assert_eq!(cgroup_from_proc("1:name=systemd:/\n"), None);
        assert!(matches!(
            pid_path(Path::new("/sys/fs/cgroup"), u32::MAX),
            Err(TargetError::NoProcess(_))
        ));
        let me = pid_path(Path::new("/cg"), std::process::id()).unwrap();
        assert!(me.starts_with("/cg"));
    }
}
