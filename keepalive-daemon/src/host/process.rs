//! A process as one process, not a pid: the `kad exec` run that owns a transient cgroup,
//! recognised across pid reuse and reboots.
use std::{io, path::Path};

use serde::{Deserialize, Serialize};

use super::cgroup;

/// Transient cgroups are named this followed by the pid of the `kad exec` that made them,
/// below its own cgroup. The daemon takes a `kad exec` request only for such a cgroup (so that
/// it never removes one kad did not make), and collects it by the owner it recorded
/// (`ExecOwner`), never by a name.
pub const TRANSIENT_PREFIX: &str = "kad-exec-";

/// The `kad exec` process that owns a transient cgroup, as the daemon sees it (its pid in the
/// daemon's PID namespace, from the control socket's peer credentials). The start time and the
/// boot id make it one process: a reused pid, or the same pid after a reboot, is another one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecOwner {
    pub pid: u32,
    /// Field 22 of /proc/PID/stat: clock ticks after boot.
    pub start_time: u64,
    /// /proc/sys/kernel/random/boot_id.
    pub boot_id: String,
}

impl ExecOwner {
    /// The process `pid` now.
    pub fn of(pid: u32) -> io::Result<ExecOwner> {
        Ok(ExecOwner {
            pid,
            start_time: start_time(pid)?,
            boot_id: boot_id()?,
        })
    }

    /// Whether this very process still runs (a zombie has exited: it is gone).
    pub fn is_alive(&self) -> bool {
        boot_id().is_ok_and(|id| id == self.boot_id)
            && stat_of(self.pid).is_ok_and(|(state, start)| {
                start == self.start_time && state != 'Z' && state != 'X'
            })
    }
}

fn start_time(pid: u32) -> io::Result<u64> {
    stat_of(pid).map(|(_, start)| start)
}

/// The state letter and the start time of process `pid`.
fn stat_of(pid: u32) -> io::Result<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat(&stat).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected /proc/{pid}/stat"),
        )
    })
}

/// The state (field 3) and start time (field 22) in the text of /proc/PID/stat. The command
/// name (field 2) may hold spaces and parentheses: count fields after the last ')'.
fn parse_stat(stat: &str) -> Option<(char, u64)> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // Field 22 is the 19th after the state.
    Some((state, fields.nth(18)?.parse().ok()?))
}

fn boot_id() -> io::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?
        .trim()
        .to_string())
}

/// Whether the transient cgroup at `path` is abandoned: the `kad exec` that owns it is gone
/// (killed before it could clean up) and no process is left in it. The daemon then removes
/// it and its policy.
pub fn is_abandoned(path: &Path, owner: &ExecOwner) -> bool {
    !owner.is_alive() && !cgroup::populated(path)
}

#[cfg(test)]
mod tests {
    use std::{process::Command, time::Duration};

    use super::*;

    #[test]
    fn start_times_come_from_the_right_field() {
        // A command name with spaces and parentheses, as a process may choose.
        let stat = "4242 (a) b (c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 12345 67 18446744073709551615";
        assert_eq!(parse_stat(stat), Some(('S', 987654)));
        assert_eq!(parse_stat("12 (x) S 1"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn an_owner_is_one_process_not_a_pid() {
        let me = ExecOwner::of(std::process::id()).unwrap();
        assert!(me.is_alive());
        assert!(
            !ExecOwner {
                start_time: me.start_time + 1,
                ..me.clone()
            }
            .is_alive(),
            "same pid, another process"
        );
        assert!(
            !ExecOwner {
                boot_id: "another boot".into(),
                ..me.clone()
            }
            .is_alive(),
            "same pid and start time, another boot"
        );
        let mut child = Command::new("sleep").arg("0.2").spawn().unwrap();
        let owner = ExecOwner::of(child.id()).unwrap();
        assert!(owner.is_alive());
        // Exited but not reaped yet: a zombie is gone as far as ownership goes.
        std::thread::sleep(Duration::from_millis(600));
        assert!(!owner.is_alive(), "a zombie");
        child.wait().unwrap();
        assert!(!owner.is_alive(), "exited and reaped");
        // An owner that is gone abandons an empty (or removed) cgroup, a live one does not.
        let gone = Path::new("/nonexistent-kad-cgroup");
        assert!(is_abandoned(gone, &owner));
        assert!(!is_abandoned(gone, &me));
    }
}
