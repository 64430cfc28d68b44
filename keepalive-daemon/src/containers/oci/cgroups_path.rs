//! Which cgroup is the container's: `linux.cgroupsPath` in the bundle's `config.json`, in
//! either cgroup driver's form, or else the cgroup of the container's process.
use std::{
    fs,
    io::Read,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use super::{OciError, State};
use crate::host::target;

const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// The cgroup by the container's config, when poststop has no record; `None` if it cannot tell.
pub(super) fn fallback_cgroup(state: &State) -> Option<String> {
    let config = config_path(state)?;
    cgroups_path_of(&config)
        .ok()
        .flatten()
        .and_then(|p| cgroup_from_cgroups_path(&p).ok())
}

fn config_path(state: &State) -> Option<PathBuf> {
    state.bundle.as_ref().map(|b| b.join("config.json"))
}

/// The container's cgroup, relative to the cgroup2 root: from `linux.cgroupsPath` in the
/// bundle's config.json, or else from the container's process.
pub fn container_cgroup(state: &State) -> Result<String, OciError> {
    let config = config_path(state).ok_or_else(|| OciError::BadState("no bundle".into()))?;
    if let Some(path) = cgroups_path_of(&config)? {
        return cgroup_from_cgroups_path(&path);
    }
    let pid = state
        .pid
        .and_then(|p| u32::try_from(p).ok())
        .filter(|&p| p > 0)
        .ok_or_else(|| OciError::NoCgroup {
            id: state.id.clone(),
            config: config.clone(),
        })?;
    let text =
        fs::read_to_string(format!("/proc/{pid}/cgroup")).map_err(|source| OciError::Pid {
            id: state.id.clone(),
            pid,
            source: target::TargetError::Proc { pid, source },
        })?;
    let path = target::cgroup_from_proc(&text).ok_or_else(|| OciError::Pid {
        id: state.id.clone(),
        pid,
        source: target::TargetError::NoCgroup2(pid),
    })?;
    cgroup_from_cgroups_path(path)
}

/// `linux.cgroupsPath` of an OCI config file, if it has one.
fn cgroups_path_of(config: &Path) -> Result<Option<String>, OciError> {
    #[derive(Deserialize)]
    struct Config {
        #[serde(default)]
        linux: Option<Linux>,
    }
    #[derive(Deserialize)]
    struct Linux {
        #[serde(default, rename = "cgroupsPath")]
        cgroups_path: Option<String>,
    }
    let io_err = |source| OciError::Config {
        path: config.to_path_buf(),
        source,
    };
    let mut bytes = Vec::new();
    fs::File::open(config)
        .map_err(io_err)?
        .take(MAX_CONFIG_BYTES)
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    let parsed: Config = serde_json::from_slice(&bytes).map_err(|e| OciError::BadConfig {
        path: config.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok(parsed
        .linux
        .and_then(|l| l.cgroups_path)
        .filter(|p| !p.is_empty()))
}

/// The cgroup a runtime makes for `linux.cgroupsPath`, relative to the cgroup2 root:
/// - cgroupfs driver, a path: `/libpod_parent/libpod-ID` (podman),
///   `/kubepods/besteffort/podUID/crio-ID` (CRI-O);
/// - systemd driver, `SLICE:PREFIX:NAME`: the scope `PREFIX-NAME.scope` in the slice, whose
///   path systemd derives from its name ([`target::slice_path`]):
///   `machine.slice:libpod:ID` is `machine.slice/libpod-ID.scope`,
///   `kubepods-besteffort-podUID.slice:crio:ID` is
///   `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podUID.slice/crio-ID.scope`.
pub fn cgroup_from_cgroups_path(path: &str) -> Result<String, OciError> {
    let bad = |why| OciError::BadCgroupsPath(path.to_string(), why);
    if path.contains('\0') || path.contains('\n') {
        return Err(bad("a control character in it"));
    }
    let parts: Vec<&str> = path.split(':').collect();
    let relative = match parts.as_slice() {
        [single] => single.trim_matches('/').to_string(),
        [slice, prefix, name] => {
            if name.is_empty() || name.contains('/') || prefix.contains('/') {
                return Err(bad(
                    "systemd form SLICE:PREFIX:NAME with an empty or nested name",
                ));
            }
            let slice = if slice.is_empty() {
                "system.slice"
            } else {
                slice
            };
            let slice_path =
                target::slice_path(slice).ok_or_else(|| bad("not a systemd slice name"))?;
            let unit = if name.ends_with(".slice") {
                // A slice's place follows from its name alone, whatever the parent given.
                return target::slice_path(name)
                    .filter(|p| !p.is_empty())
                    .ok_or_else(|| bad("not a systemd slice name"));
            } else if prefix.is_empty() {
                format!("{name}.scope")
            } else {
                format!("{prefix}-{name}.scope")
            };
            if slice_path.is_empty() {
                unit
            } else {
                format!("{slice_path}/{unit}")
            }
        }
        _ => return Err(bad("neither a path nor SLICE:PREFIX:NAME")),
    };
    if relative.is_empty() {
        return Err(bad("the cgroup2 root"));
    }
    if relative
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(bad("an empty, '.' or '..' component"));
    }
    Ok(relative)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroupfs_paths_are_relative_to_the_root() {
        assert_eq!(
            cgroup_from_cgroups_path("/libpod_parent/libpod-abc").unwrap(),
            "libpod_parent/libpod-abc"
        );
        assert_eq!(
            cgroup_from_cgroups_path("/kubepods/besteffort/pod1-2/crio-abc").unwrap(),
            "kubepods/besteffort/pod1-2/crio-abc"
        );
        for bad in ["/", "", "/a/../b", "/a//b", "a:b", "/x\n"] {
            assert!(cgroup_from_cgroups_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn systemd_paths_expand_their_slice() {
        assert_eq!(
            cgroup_from_cgroups_path("machine.slice:libpod:abc").unwrap(),
            "machine.slice/libpod-abc.scope"
        );
        assert_eq!(
            cgroup_from_cgroups_path("kubepods-besteffort-pod1_2.slice:crio:abc").unwrap(),
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1_2.slice/crio-abc.scope"
        );
        assert_eq!(
            cgroup_from_cgroups_path("system.slice:docker:abc").unwrap(),
            "system.slice/docker-abc.scope"
        );
        assert_eq!(
            cgroup_from_cgroups_path(":runc:abc").unwrap(),
            "system.slice/runc-abc.scope"
        );
        assert_eq!(
            cgroup_from_cgroups_path("-.slice:x:abc").unwrap(),
            "x-abc.scope"
        );
        assert_eq!(
            cgroup_from_cgroups_path("machine.slice:libpod:pod-x.slice").unwrap(),
            "pod.slice/pod-x.slice"
        );
        for bad in [
            "machine:libpod:abc",
            "a--b.slice:x:abc",
            "machine.slice:libpod:",
            "machine.slice:libpod:a/b",
            "a:b:c:d",
        ] {
            assert!(cgroup_from_cgroups_path(bad).is_err(), "{bad:?}");
        }
    }
}
