//! Keepalive set on real connections by the real kernel, checked from inside each process.
use std::time::Duration;

use kad_tests::{connect, kad_env, untouched, wait_for, Daemon, TestCgroup};

#[test]
fn both_ends_in_a_policy_cgroup_get_the_policy_ipv4_and_ipv6() {
    let env = kad_env!();
    let daemon = Daemon::start(&env);
    let cg = TestCgroup::new(&env, "both");
    daemon.kad_ok(&[
        "set",
        "--cgroup",
        &cg.relative(),
        "--idle",
        "180",
        "--intvl",
        "60",
        "--cnt",
        "20",
    ]);
    for ipv6 in [false, true] {
        let (server, client) = connect(&env, Some(&cg.path), Some(&cg.path), ipv6);
        assert_eq!(server.values(), (true, 180, 60, 20), "server, ipv6={ipv6}");
        assert_eq!(client.values(), (true, 180, 60, 20), "client, ipv6={ipv6}");
    }
}

#[test]
fn server_in_a_policy_cgroup_accepting_from_outside_gets_its_own_policy() {
    let env = kad_env!();
    let daemon = Daemon::start(&env);
    let server_cg = TestCgroup::new(&env, "server");
    let client_cg = TestCgroup::new(&env, "client");
    daemon.kad_ok(&[
        "set",
        "--cgroup",
        server_cg.path.to_str().unwrap(),
        "--idle",
        "111",
    ]);

    // Client outside any policy cgroup: only the accepted socket changes.
    for ipv6 in [false, true] {
        let (server, client) = connect(&env, Some(&server_cg.path), None, ipv6);
        assert_eq!(
            server.values(),
            (true, 111, untouched().2, untouched().3),
            "ipv6={ipv6}"
        );
        assert_eq!(client.values(), untouched(), "ipv6={ipv6}");
    }

    // Client under another policy: each end gets its own cgroup's policy, not the other's.
    daemon.kad_ok(&[
        "set",
        "--cgroup",
        &client_cg.relative(),
        "--idle",
        "222",
        "--cnt",
        "5",
    ]);
    let (server, client) = connect(&env, Some(&server_cg.path), Some(&client_cg.path), false);
    assert_eq!(server.idle, 111);
    assert_eq!(client.values(), (true, 222, untouched().2, 5));
}

#[test]
fn the_most_specific_policy_wins_and_off_opts_out() {
    let env = kad_env!();
    let daemon = Daemon::start(&env);
    let top = TestCgroup::new(&env, "nested");
    let child = top.child("child");
    let grand = top.child("child/grand");
    let plain = top.child("plain");
    let off = top.child("off");
    let off_below = top.child("off/below");
    let rel = top.relative();
    daemon.kad_ok(&[
        "set", "--cgroup", &rel, "--idle", "100", "--intvl", "10", "--cnt", "3",
    ]);
    daemon.kad_ok(&["set", "--cgroup", &format!("{rel}/child"), "--idle", "200"]);
    daemon.kad_ok(&["set", "--cgroup", &format!("{rel}/off"), "--off"]);

    let (_, c) = connect(&env, None, Some(&grand), false);
    assert_eq!(
        c.values(),
        (true, 200, untouched().2, untouched().3),
        "grandchild of child: child's policy"
    );
    let (_, c) = connect(&env, None, Some(&child), false);
    assert_eq!(
        c.values(),
        (true, 200, untouched().2, untouched().3),
        "child: its own policy"
    );
    let (_, c) = connect(&env, None, Some(&plain), false);
    assert_eq!(
        c.values(),
        (true, 100, 10, 3),
        "no policy of its own: the ancestor's"
    );
    for cg in [&off, &off_below] {
        let (s, c) = connect(&env, Some(cg), Some(cg), true);
        assert_eq!(c.values(), untouched(), "opt-out {}", cg.display());
        assert_eq!(s.values(), untouched(), "opt-out {}", cg.display());
    }
}

#[test]
fn partial_values_keep_kernel_defaults_and_no_values_means_defaults() {
    let env = kad_env!();
    let daemon = Daemon::start(&env);
    let cg = TestCgroup::new(&env, "partial");
    let defaults = untouched();

    daemon.kad_ok(&["set", "--cgroup", &cg.relative()]);
    let (s, c) = connect(&env, Some(&cg.path), Some(&cg.path), false);
    assert_eq!(c.values(), (true, defaults.1, defaults.2, defaults.3));
    assert_eq!(s.values(), (true, defaults.1, defaults.2, defaults.3));

    daemon.kad_ok(&["set", "--cgroup", &cg.relative(), "--intvl", "33"]);
    let (_, c) = connect(&env, None, Some(&cg.path), false);
    assert_eq!(c.values(), (true, defaults.1, 33, defaults.3));
}

#[test]
fn changes_take_effect_for_the_next_connection_and_unset_restores() {
    let env = kad_env!();
    let daemon = Daemon::start(&env);
    let cg = TestCgroup::new(&env, "hot");
    let rel = cg.relative();

    let (_, before) = connect(&env, None, Some(&cg.path), false);
    assert_eq!(before.values(), untouched(), "no policy yet");

    daemon.kad_ok(&["set", "--cgroup", &rel, "--idle", "100"]);
    let (_, c) = connect(&env, None, Some(&cg.path), false);
    assert_eq!(c.idle, 100);

    daemon.kad_ok(&["set", "--cgroup", &rel, "--idle", "300", "--cnt", "9"]);
    let (_, c) = connect(&env, None, Some(&cg.path), false);
    assert_eq!((c.keepalive, c.idle, c.cnt), (true, 300, 9));

    daemon.kad_ok(&["set", "--cgroup", &rel, "--off"]);
    let (_, c) = connect(&env, None, Some(&cg.path), false);
    assert_eq!(c.values(), untouched(), "off");

    daemon.kad_ok(&["set", "--cgroup", &rel, "--idle", "400"]);
    daemon.kad_ok(&["unset", "--cgroup", &rel]);
    let (_, c) = connect(&env, None, Some(&cg.path), false);
    assert_eq!(c.values(), untouched(), "after unset");
    assert_eq!(daemon.list(), serde_json::json!([]));
    let status: serde_json::Value =
        serde_json::from_str(&daemon.kad_ok(&["status", "--json"])).unwrap();
    assert_eq!(status["attachments"], 0, "unset detaches");
}

#[test]
fn two_daemons_do_not_see_or_disturb_each_other() {
    let env = kad_env!();
    let a = Daemon::start(&env);
    let b = Daemon::start(&env);
    let cg_a = TestCgroup::new(&env, "daemon-a");
    let cg_b = TestCgroup::new(&env, "daemon-b");
    a.kad_ok(&["set", "--cgroup", &cg_a.relative(), "--idle", "150"]);
    b.kad_ok(&["set", "--cgroup", &cg_b.relative(), "--idle", "250"]);
    assert_eq!(a.list().as_array().unwrap().len(), 1);
    assert_eq!(b.list()[0]["cgroup"], cg_b.path.to_str().unwrap());
    assert_eq!(connect(&env, None, Some(&cg_a.path), false).1.idle, 150);
    assert_eq!(connect(&env, None, Some(&cg_b.path), false).1.idle, 250);
    drop(b);
    // Its pins are gone; the kernel releases the links from a work queue, shortly after.
    assert!(
        wait_for(Duration::from_secs(5), || {
            kad_tests::kad_attachments(&cg_b.path) == 0
        }),
        "b's links released"
    );
    assert_eq!(
        connect(&env, None, Some(&cg_a.path), false).1.idle,
        150,
        "a unaffected by b stopping"
    );
    assert_eq!(
        connect(&env, None, Some(&cg_b.path), false).1.values(),
        untouched()
    );
}
