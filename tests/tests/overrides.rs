//! What `overridden` counts, in both modes: connections on which a program set a keepalive
//! option to a value other than the policy's (after kad gave them the policy), once per
//! connection however many calls it made. Setting what the policy has already is no override.
use std::{path::Path, process::Command};

use kad_tests::{kad_env, listen, Daemon, Env, Process, Report, TestCgroup};

const IDLE: i32 = 100;

/// Whether this kernel runs kad's cgroup/setsockopt program as it must (see truth.rs).
fn setsockopt_hook() -> bool {
    kad_tests::require_kernel(6, 1, "cgroup/setsockopt with the caller's cgroup ancestry")
}

fn overridden(daemon: &Daemon, cg: &Path) -> u64 {
    let stats: serde_json::Value =
        serde_json::from_str(&daemon.kad_ok(&["stats", "--json"])).expect("stats json");
    stats["cgroups"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["cgroup"] == cg.to_str().unwrap()))
        .and_then(|r| r["overridden"].as_u64())
        .unwrap_or_else(|| panic!("no counters for {}: {stats}", cg.display()))
}

/// A client in `cg` that sets SO_KEEPALIVE=1 and TCP_KEEPIDLE=`idle` twice each after
/// connecting to a server outside any policy.
fn connect_set(env: &Env, cg: &Path, idle: i32) -> Report {
    let (_server, port) = listen(env, "127.0.0.1:0", None);
    let mut command = Command::new(&env.peer);
    command.args([&format!("connect-set={idle}"), &format!("127.0.0.1:{port}")]);
    let mut client = Process::spawn(command, Some(cg));
    client.report()
}

#[test]
fn only_a_different_value_is_an_override_counted_once_per_connection_in_both_modes() {
    let env = kad_env!();
    if !setsockopt_hook() {
        return;
    }
    let daemon = Daemon::start(&env);
    let cg = TestCgroup::new(&env, "overrides");
    let idle = IDLE.to_string();
    daemon.kad_ok(&["set", "--cgroup", &cg.relative(), "--idle", &idle]);

    // The policy's own values (what postgres, sshd and ssh do): nothing overridden.
    let r = connect_set(&env, &cg.path, IDLE);
    assert_eq!((r.keepalive, r.idle), (true, i64::from(IDLE)));
    assert_eq!(
        overridden(&daemon, &cg.path),
        0,
        "same values are no override"
    );
    // Another idle, set twice: the program's value stands, one connection counted.
    let r = connect_set(&env, &cg.path, 33);
    assert_eq!((r.keepalive, r.idle), (true, 33));
    assert_eq!(overridden(&daemon, &cg.path), 1, "once per connection");
    let status = daemon.kad_ok(&["status"]);
    assert!(status.contains("1 connections overridden"), "{status}");

    // --enforce: the same meaning; the value is rewritten.
    daemon.kad_ok(&[
        "set",
        "--cgroup",
        &cg.relative(),
        "--idle",
        &idle,
        "--enforce",
    ]);
    let before = overridden(&daemon, &cg.path);
    let r = connect_set(&env, &cg.path, IDLE);
    assert_eq!((r.keepalive, r.idle), (true, i64::from(IDLE)));
    assert_eq!(
        overridden(&daemon, &cg.path),
        before,
        "same values, enforced"
    );
    let r = connect_set(&env, &cg.path, 33);
    assert_eq!((r.keepalive, r.idle), (true, i64::from(IDLE)), "rewritten");
    assert_eq!(
        overridden(&daemon, &cg.path),
        before + 1,
        "once per connection, enforced"
    );
}
