//! The arguments several commands share: which cgroup (`set`, `unset`, `inspect`), the
//! policy's values (`set`, `exec`) and `--json` (`list`, `status`, `probe`).
use std::path::Path;

use anyhow::Context as _;
use clap::Args;

use super::exec;
use crate::{
    api::protocol::PolicyEntry,
    host::{cgroup, target},
    model::policy::{self, CNT_RANGE, SECS_RANGE, USER_TIMEOUT_RANGE},
};

/// Which cgroup: exactly one of --host, --cgroup, --unit, --pid, --container.
#[derive(Debug, Args)]
#[group(skip)]
#[command(group(clap::ArgGroup::new("target").required(true).multiple(false).args(["host", "cgroup", "unit", "pid", "container"])))]
pub(super) struct TargetArgs {
    /// The host policy: every TCP connection of the host (the cgroup2 root and every cgroup
    /// below it) that no nearer policy decides for, like FreeBSD's always_keepalive.
    #[arg(long)]
    host: bool,
    /// A cgroup: an absolute path on the cgroup2 filesystem, or a path relative to its root.
    #[arg(long, value_name = "CG")]
    cgroup: Option<String>,
    /// A systemd unit's cgroup (SLICE/NAME; a name without suffix is a .service).
    #[arg(long, value_name = "NAME")]
    unit: Option<String>,
    /// The slice of --unit.
    #[arg(long, value_name = "SLICE", conflicts_with_all = ["host", "cgroup", "pid", "container"])]
    slice: Option<String>,
    /// The cgroup process N is in now (the policy stays with that cgroup's path).
    #[arg(long, value_name = "N")]
    pid: Option<u32>,
    /// A running container's cgroup, by its id or a unique prefix (podman, docker,
    /// containerd, CRI-O; cgroupfs or systemd driver).
    #[arg(long, value_name = "ID")]
    container: Option<String>,
}

/// What a command names: the whole host, or a cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Target {
    /// The host policy: the daemon keeps it by its own cgroup2 root, so no path is sent.
    Host,
    Cgroup(Resolved),
}

impl Target {
    /// The cgroup named, for the commands that need one (`inspect`).
    pub(super) fn cgroup(self) -> anyhow::Result<Resolved> {
        match self {
            Target::Host => anyhow::bail!(
                "--host names no one cgroup here: name a cgroup, or use kad audit for the whole host"
            ),
            Target::Cgroup(resolved) => Ok(resolved),
        }
    }
}

/// A target as the daemon is sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Resolved {
    /// Relative to the cgroup2 root, resolved on this side, so that a daemon whose cgroup2
    /// mount is elsewhere (in a container, on a hybrid host) applies it to the same cgroup. An
    /// absolute path that is not below this side's root is sent as given.
    pub(super) cgroup: String,
    /// For `--container`: the container's full id.
    pub(super) container: Option<String>,
}

impl TargetArgs {
    /// What was named, with units, processes and running containers resolved to their
    /// cgroup's path (`set`).
    pub(super) fn resolve(&self) -> anyhow::Result<Target> {
        if self.host {
            return Ok(Target::Host);
        }
        self.resolve_cgroup().map(Target::Cgroup)
    }

    /// The cgroup as the daemon takes it, for a running container.
    fn resolve_cgroup(&self) -> anyhow::Result<Resolved> {
        if self.host {
            return Target::Host.cgroup();
        }
        if let Some(cgroup) = &self.cgroup {
            if !cgroup.starts_with('/') {
                return Ok(Resolved::path(cgroup.clone()));
            }
            let root = cgroup::find_root()?;
            let path = cgroup::lexical_path(&root, cgroup)?;
            return Ok(Resolved::path(
                below_root(&root, &path)?.unwrap_or_else(|| cgroup.clone()),
            ));
        }
        if let Some(unit) = &self.unit {
            return Ok(Resolved::path(target::unit_path(
                unit,
                self.slice.as_deref(),
            )?));
        }
        let root = cgroup::find_root()?;
        if let Some(id) = &self.container {
            let path = target::container_path(&root, id)?;
            let container = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(target::container_id_of)
                .map(str::to_string);
            return Ok(Resolved {
                cgroup: below_root(&root, &path)?.unwrap_or_else(|| path.display().to_string()),
                container,
            });
        }
        let pid = self
            .pid
            .context("one of --host, --cgroup, --unit, --pid, --container is required")?;
        let path = target::pid_path(&root, pid)?;
        Ok(Resolved::path(
            below_root(&root, &path)?.unwrap_or_else(|| path.display().to_string()),
        ))
    }

    /// As [`TargetArgs::resolve`], and for a container that is gone (`unset`, `inspect`,
    /// `stats`): the policy the daemon recorded for that id. `policies` asks the daemon.
    pub(super) fn resolve_or_recorded(
        &self,
        policies: impl FnOnce() -> anyhow::Result<Vec<PolicyEntry>>,
    ) -> anyhow::Result<Target> {
        let Some(id) = &self.container else {
            return self.resolve();
        };
        let missing = match self.resolve() {
            Err(e) => match e.downcast::<target::TargetError>() {
                Ok(missing @ target::TargetError::NoContainer { .. }) => missing,
                Ok(other) => return Err(other.into()),
                Err(e) => return Err(e),
            },
            found => return found,
        };
        let prefix = id.trim().to_ascii_lowercase();
        let Ok(policies) = policies() else {
            return Err(missing.into());
        };
        let mut found: Vec<&PolicyEntry> = policies
            .iter()
            .filter(|p| {
                p.container
                    .as_deref()
                    .is_some_and(|c| c.starts_with(&prefix))
            })
            .collect();
        match found.len() {
            0 => anyhow::bail!(
                "{missing}, and the daemon has no policy set for a container with that id: `kad list` shows the policies, `kad unset --cgroup PATH` removes one by its path"
            ),
            1 => {
                let entry = found.remove(0);
                let root = cgroup::find_root()?;
                let cgroup = below_root(&root, Path::new(&entry.cgroup))?
                    .unwrap_or_else(|| entry.cgroup.clone());
                Ok(Target::Cgroup(Resolved {
                    cgroup,
                    container: entry.container.clone(),
                }))
            }
            count => anyhow::bail!(
                "the id prefix '{prefix}' matches the policies of {count} containers that are gone ({}): give more of the id",
                found
                    .iter()
                    .take(3)
                    .map(|p| p.cgroup.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

impl TargetArgs {
    /// Whether `--host` was given.
    pub(super) fn host(&self) -> bool {
        self.host
    }

    /// `--container ID` alone (for `stats`, whose --container is its own flag).
    pub(super) fn container(id: &str) -> TargetArgs {
        TargetArgs {
            host: false,
            cgroup: None,
            unit: None,
            slice: None,
            pid: None,
            container: Some(id.to_string()),
        }
    }
}

impl Resolved {
    fn path(cgroup: String) -> Resolved {
        Resolved {
            cgroup,
            container: None,
        }
    }
}

/// `path` relative to the cgroup2 root `root`; `None` when it is not below it. The root itself
/// is refused, as the daemon would.
fn below_root(root: &Path, path: &Path) -> Result<Option<String>, cgroup::CgroupError> {
    match path.strip_prefix(root) {
        Ok(rest) if rest.as_os_str().is_empty() => {
            Err(cgroup::CgroupError::Root(root.to_path_buf()))
        }
        Ok(rest) => Ok(Some(rest.display().to_string())),
        Err(_) => Ok(None),
    }
}

/// The policy's values, for `set` and `exec` (where libkeepalive's variables fill in the rest).
#[derive(Debug, Args)]
pub(super) struct ValueArgs {
    /// Seconds of idle before the first probe (TCP_KEEPIDLE, 1..32767).
    #[arg(long, value_name = "SECS", value_parser = parse_idle, allow_negative_numbers = true)]
    pub(super) idle: Option<u32>,
    /// Seconds between probes (TCP_KEEPINTVL, 1..32767).
    #[arg(long, value_name = "SECS", value_parser = parse_intvl, allow_negative_numbers = true)]
    pub(super) intvl: Option<u32>,
    /// Unanswered probes before the connection is dropped (TCP_KEEPCNT, 1..127; ignored by
    /// the kernel when --user-timeout is set).
    #[arg(long, value_name = "N", value_parser = parse_cnt, allow_negative_numbers = true)]
    pub(super) cnt: Option<u32>,
    /// Milliseconds unacknowledged data or unanswered probes may last before the connection
    /// is dropped (TCP_USER_TIMEOUT, 1..2147483647).
    #[arg(long, value_name = "MS", value_parser = parse_user_timeout, allow_negative_numbers = true)]
    pub(super) user_timeout: Option<u32>,
    /// The policy wins: a program's own setsockopt of these options is rewritten to the
    /// policy's values (and succeeds).
    #[arg(long)]
    pub(super) enforce: bool,
    /// Opt out: leave sockets as the application made them, even under a policy cgroup.
    #[arg(long, conflicts_with_all = ["idle", "intvl", "cnt", "user_timeout", "enforce"])]
    pub(super) off: bool,
}

impl ValueArgs {
    pub(super) fn flags(&self) -> exec::Flags {
        exec::Flags {
            idle: self.idle,
            intvl: self.intvl,
            cnt: self.cnt,
            user_timeout: self.user_timeout,
            enforce: self.enforce,
            off: self.off,
        }
    }
}

#[derive(Debug, Args)]
pub(super) struct JsonFlag {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub(super) json: bool,
}

fn parse_idle(text: &str) -> Result<u32, policy::PolicyError> {
    policy::parse_value("--idle", text, SECS_RANGE)
}
fn parse_intvl(text: &str) -> Result<u32, policy::PolicyError> {
    policy::parse_value("--intvl", text, SECS_RANGE)
}
fn parse_cnt(text: &str) -> Result<u32, policy::PolicyError> {
    policy::parse_value("--cnt", text, CNT_RANGE)
}
fn parse_user_timeout(text: &str) -> Result<u32, policy::PolicyError> {
    policy::parse_value("--user-timeout", text, USER_TIMEOUT_RANGE)
}

#[cfg(test)]
mod tests {
    use super::super::{clap_error_line, parse, Command};

    #[test]
    fn exactly_one_target() {
        assert!(parse(&["set", "--unit", "nginx"]).is_ok());
        assert!(parse(&["set", "--pid", "1"]).is_ok());
        assert!(parse(&["set", "--unit", "x", "--slice", "user.slice"]).is_ok());
        let err = parse(&["set", "--cgroup", "a", "--pid", "1"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
        assert!(parse(&["set", "--slice", "user.slice", "--cgroup", "a"]).is_err());
        assert!(parse(&["set", "--pid", "abc"]).is_err());
        assert!(parse(&["unset", "--container", "8d2c46a4"]).is_ok());
        assert!(parse(&["inspect", "--container", "8d2c46a4", "--json"]).is_ok());
        assert!(parse(&["set", "--container", "8d2c", "--pid", "1"]).is_err());
        assert!(parse(&["set", "--container", "8d2c", "--slice", "x.slice"]).is_err());
        assert!(parse(&["stats", "--container", "8d2c", "--json"]).is_ok());
    }

    #[test]
    fn set_rejects_bad_values_with_the_range() {
        let err = parse(&["set", "--cgroup", "app", "--idle", "0"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("between 1 and 32767"), "{err}");
        let err = parse(&["set", "--cgroup", "app", "--cnt", "x"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("between 1 and 127"), "{err}");
    }

    #[test]
    fn off_conflicts_with_values() {
        let err = parse(&["set", "--cgroup", "app", "--off", "--idle", "5"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
        assert!(parse(&["set", "--cgroup", "app", "--off"]).is_ok());
        for (extra, name) in [
            (&["--enforce"][..], "--enforce"),
            (&["--user-timeout", "5"], "--user-timeout"),
        ] {
            for command in ["set", "exec"] {
                let mut args = vec![command];
                if command == "set" {
                    args.extend(["--cgroup", "app"]);
                }
                args.push("--off");
                args.extend(extra);
                if command == "exec" {
                    args.extend(["--", "true"]);
                }
                let err = parse(&args).unwrap_err();
                assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
                let line = clap_error_line(&err.render().to_string());
                assert!(line.contains("--off") && line.contains(name), "{line}");
            }
        }
    }

    #[test]
    fn user_timeout_and_enforce_flags() {
        let cli = parse(&[
            "exec",
            "--user-timeout",
            "2147483647",
            "--enforce",
            "--",
            "true",
        ])
        .unwrap();
        let Command::Exec(args) = cli.command else {
            panic!("not exec")
        };
        let flags = args.values.flags();
        assert_eq!(
            (flags.user_timeout, flags.enforce),
            (Some(2_147_483_647), true)
        );
        for bad in ["0", "-5", "abc", "2147483648", "1.5"] {
            let err = parse(&["set", "--cgroup", "app", "--user-timeout", bad]).unwrap_err();
            let line = clap_error_line(&err.render().to_string());
            assert!(
                line.contains("--user-timeout") && line.contains("between 1 and 2147483647"),
                "{bad}: {line}"
            );
        }
    }
}
