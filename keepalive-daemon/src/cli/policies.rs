//! The commands that read or change the daemon's policies through its control socket: `kad
//! set`, `unset`, `reload`, `list`, `status` and `stats`.
use std::path::Path;

use clap::Args;

use super::{
    args::{JsonFlag, Target, TargetArgs, ValueArgs},
    output,
};
use crate::{
    api::client,
    api::protocol::{PolicyEntry, Request, Response},
    host::cgroup,
    model::policy::Policy,
};

#[derive(Debug, Args)]
pub(super) struct SetArgs {
    #[command(flatten)]
    target: TargetArgs,
    #[command(flatten)]
    values: ValueArgs,
    /// Root only: users may not set policies below this one in the cgroups delegated to them
    /// (by default a user may opt their own programs out, as libkeepalive's KEEPALIVE=off did).
    #[arg(long)]
    lock: bool,
}

#[derive(Debug, Args)]
pub(super) struct StatsArgs {
    /// Only the policies of this running container's cgroup (and below), by id or prefix.
    #[arg(long, value_name = "ID")]
    container: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// `kad set`.
pub(super) fn set(socket: &Path, args: &SetArgs) -> anyhow::Result<()> {
    let values = &args.values;
    let mut policy = if values.off {
        Policy::OFF
    } else {
        Policy::on(values.idle, values.intvl, values.cnt)?
            .with_extras(values.user_timeout, values.enforce)?
    };
    policy.locked = args.lock;
    let request = match args.target.resolve()? {
        Target::Host => Request::SetHost { policy },
        Target::Cgroup(target) => Request::Set {
            cgroup: target.cgroup,
            policy,
            container: target.container,
        },
    };
    if let Response::Done { cgroup, .. } = client::call(socket, &request)? {
        match request {
            Request::SetHost { .. } => println!("host ({cgroup} and below): {policy}"),
            _ => println!("{cgroup}: {policy}"),
        }
    }
    Ok(())
}

/// `kad unset`.
pub(super) fn unset(socket: &Path, target: &TargetArgs) -> anyhow::Result<()> {
    let request = match target.resolve_or_recorded(|| list_policies(socket))? {
        Target::Host => Request::UnsetHost,
        Target::Cgroup(target) => Request::Unset {
            cgroup: target.cgroup,
        },
    };
    if let Response::Done { cgroup, .. } = client::call(socket, &request)? {
        match request {
            Request::UnsetHost => println!("host ({cgroup}): host policy removed"),
            _ => println!("{cgroup}: policy removed"),
        }
    }
    Ok(())
}

/// `kad reload`.
pub(super) fn reload(socket: &Path) -> anyhow::Result<()> {
    if let Response::Reloaded { policies } = client::call(socket, &Request::Reload)? {
        println!("config reloaded: {policies} policies from the config file");
    }
    Ok(())
}

/// `kad list`.
pub(super) fn list(socket: &Path, flag: &JsonFlag) -> anyhow::Result<()> {
    output::policies(&list_policies(socket)?, flag.json)
}

/// The daemon's policies, their paths shown below this side's cgroup2 mount point.
pub(super) fn list_policies(socket: &Path) -> anyhow::Result<Vec<PolicyEntry>> {
    match client::call(socket, &Request::List)? {
        Response::Policies { policies, .. } => Ok(policies),
        other => anyhow::bail!("unexpected reply to list: {other:?}"),
    }
}

/// `kad status`.
pub(super) fn status(socket: &Path, flag: &JsonFlag) -> anyhow::Result<()> {
    match client::call(socket, &Request::Status)? {
        Response::Status(report) => output::status(&report, flag.json),
        other => anyhow::bail!("unexpected reply to status: {other:?}"),
    }
}

/// `kad stats`.
pub(super) fn stats(socket: &Path, args: &StatsArgs) -> anyhow::Result<()> {
    match client::call(socket, &Request::Stats)? {
        Response::Stats {
            mut stats,
            kills_counted,
            ..
        } => {
            if let Some(id) = &args.container {
                let target = TargetArgs::container(id)
                    .resolve_or_recorded(|| list_policies(socket))?
                    .cgroup()?;
                let path = cgroup::find_root()?.join(&target.cgroup);
                stats.retain(|row| Path::new(&row.cgroup).starts_with(&path));
            }
            output::stats(&stats, kills_counted, args.json)
        }
        other => anyhow::bail!("unexpected reply to stats: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{parse, Command};

    #[test]
    fn set_parses_values() {
        let cli = parse(&[
            "set", "--cgroup", "app", "--idle", "180", "--intvl", "60", "--cnt", "20",
        ])
        .unwrap();
        let Command::Set(args) = cli.command else {
            panic!("not set")
        };
        assert_eq!(
            (
                args.values.idle,
                args.values.intvl,
                args.values.cnt,
                args.values.off
            ),
            (Some(180), Some(60), Some(20), false)
        );
    }
}
