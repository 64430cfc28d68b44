//! Naming a cgroup by something other than its path: a systemd unit or a process.
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
}

/// The cgroup path (relative to the cgroup2 root) systemd gives `unit` in `slice`
/// (`system.slice` when not given). A name without a type suffix is a service, as for systemctl.
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
    Ok(format!("{slice}/{unit}"))
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
