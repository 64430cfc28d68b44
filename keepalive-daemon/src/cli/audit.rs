//! `kad audit`: per cgroup with established TCP connections, how many have keepalive off and
//! how many differ from the policy in force. Read from the kernel with the `inspect`
//! machinery; kad's table only says which policy applies.
use std::{
    collections::{BTreeMap, HashSet},
    path::Path,
};

use anyhow::Context as _;
use clap::Args;
use serde::Serialize;

use super::{
    inspect::{self, Connection, InspectError},
    output,
};
use crate::{
    api::client,
    api::protocol::{PolicyEntry, Request, Response},
    host::cgroup,
};

#[derive(Debug, Args)]
pub(super) struct AuditArgs {
    /// Only this cgroup and the cgroups below it (default: the whole cgroup2 tree).
    #[arg(long, value_name = "CG")]
    cgroup: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// `kad audit`: needs the daemon, unlike `kad inspect`, since the policies in force are the
/// point of the report.
pub(super) fn command(socket: &Path, args: &AuditArgs) -> anyhow::Result<()> {
    let root = cgroup::find_root()?;
    let top = match &args.cgroup {
        None => root.clone(),
        Some(input) => match cgroup::resolve(&root, input) {
            // The root is the default: naming it is allowed here, nothing is set.
            Err(cgroup::CgroupError::Root(root)) => root,
            other => other?.path,
        },
    };
    let policies = match client::call(socket, &Request::List)
        .context("kad audit compares connections with the daemon's policies")?
    {
        Response::Policies { policies, .. } => policies,
        other => anyhow::bail!("unexpected reply to list: {other:?}"),
    };
    output::audit(&audit(&root, &top, &policies)?, args.json)
}

/// One cgroup's connections, summed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditRow {
    pub cgroup: String,
    /// Established TCP connections whose socket belongs to this cgroup (each socket once).
    pub connections: usize,
    /// Of these, how many have SO_KEEPALIVE off.
    pub keepalive_off: usize,
    /// How many have values that differ from the policy in force (0 without a policy, or
    /// under `--off`, which sets nothing).
    pub differ: usize,
    /// How many could not be read (the process exited meanwhile).
    pub unknown: usize,
    /// The policy in force for the cgroup (its own or its nearest ancestor's); null: none.
    pub policy: Option<PolicyEntry>,
}

/// What an audit found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Audit {
    pub cgroups: Vec<AuditRow>,
    /// Processes whose sockets this user may not read (not root), left out of the counts.
    pub unreadable_processes: Vec<u32>,
}

/// Audits the processes of the cgroup tree at `top` (the whole tree from the cgroup2 `root`
/// by default) against `policies`, the daemon's table.
pub fn audit(root: &Path, top: &Path, policies: &[PolicyEntry]) -> Result<Audit, InspectError> {
    let pids = inspect::cgroup_pids(top);
    let scan = inspect::scan(&pids, true)?;
    let mut connections = scan.connections;
    inspect::annotate(&mut connections, root, Some(policies));
    Ok(Audit {
        cgroups: summarise(&connections),
        unreadable_processes: scan.unreadable,
    })
}

/// Rows by cgroup path, each socket counted once however many processes hold it.
pub fn summarise(connections: &[Connection]) -> Vec<AuditRow> {
    let mut seen = HashSet::new();
    let mut rows: BTreeMap<String, AuditRow> = BTreeMap::new();
    for c in connections {
        if !seen.insert((c.netns.as_str(), c.inode)) {
            continue;
        }
        let cgroup = c.cgroup.clone().unwrap_or_else(|| "?".into());
        let row = rows.entry(cgroup.clone()).or_insert_with(|| AuditRow {
            cgroup,
            connections: 0,
            keepalive_off: 0,
            differ: 0,
            unknown: 0,
            policy: c.policy.clone(),
        });
        row.connections += 1;
        match c.keepalive {
            None => row.unknown += 1,
            Some(false) => row.keepalive_off += 1,
            Some(true) => {}
        }
        if !c.differs.is_empty() {
            row.differ += 1;
        }
    }
    rows.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::policy::Policy;

    fn connection(cgroup: &str, inode: u64, keepalive: Option<bool>, idle: i32) -> Connection {
        Connection {
            pid: 1,
            command: "x".into(),
            fd: 3,
            local: String::new(),
            remote: String::new(),
            keepalive,
            idle: keepalive.map(|_| idle),
            intvl: keepalive.map(|_| 75),
            cnt: keepalive.map(|_| 9),
            user_timeout: keepalive.map(|_| 0),
            timer: "off".into(),
            timer_left_ms: 0,
            probes: 0,
            inode,
            cgroup: Some(cgroup.into()),
            policy: None,
            policy_known: true,
            differs: Vec::new(),
            netns: "net:[1]".into(),
            cgroup_id: None,
        }
    }

    #[test]
    fn counts_each_socket_once_per_cgroup() {
        let policy = PolicyEntry::new("/cg/a".into(), &Policy::on(Some(100), None, None).unwrap());
        let mut rows = vec![
            connection("/cg/a", 10, Some(true), 100),
            connection("/cg/a", 11, Some(true), 15),
            connection("/cg/a", 11, Some(true), 15), // the same socket in a second process
            connection("/cg/a", 12, None, 0),
            connection("/cg/b", 13, Some(false), 7200),
        ];
        for c in &mut rows[..4] {
            c.policy = Some(policy.clone());
            if let Some(state) = c.state() {
                c.differs = policy.policy.differences(&state);
            }
        }
        let summary = summarise(&rows);
        assert_eq!(summary.len(), 2);
        let a = &summary[0];
        assert_eq!(
            (
                a.cgroup.as_str(),
                a.connections,
                a.keepalive_off,
                a.differ,
                a.unknown
            ),
            ("/cg/a", 3, 0, 1, 1)
        );
        assert_eq!(a.policy.as_ref(), Some(&policy));
        let b = &summary[1];
        assert_eq!((b.connections, b.keepalive_off, b.differ), (1, 1, 0));
        assert_eq!(b.policy, None);
    }
}
