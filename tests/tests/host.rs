//! The host policy (`kad set --host`): every connection of the host without a nearer policy,
//! like FreeBSD's always_keepalive. It attaches kad's programs to the cgroup2 root, which acts
//! on every process of the machine: those tests are `#[ignore]`d on the host and run only in
//! the guests of `cargo xtask test-kernels` (which pass `--include-ignored`), where the root is
//! the test's own. What can be checked without touching the root runs everywhere.
use std::{
    fs,
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use kad_tests::{
    cgroup2_root, kad_attachments, kad_env, kad_programs_on, untouched, wait_for, Daemon,
    NetnsPair, Pair, TestCgroup, Values,
};

/// One daemon at a time may own the root: tests of this file take turns.
static ROOT: Mutex<()> = Mutex::new(());

fn root() -> PathBuf {
    cgroup2_root().expect("cgroup2 is mounted")
}

/// Nothing of kad on the root. A daemon the tests drop (also when one fails half-way) removes
/// its bpffs directory and with it the pins of its links; the kernel then detaches them a
/// moment later, so this waits for it.
fn assert_root_clean() {
    let clean = wait_for(Duration::from_secs(10), || {
        kad_programs_on(&root()).is_empty()
    });
    assert!(
        clean,
        "kad programs left on the root: {:?}",
        kad_programs_on(&root())
    );
}

#[test]
#[ignore = "attaches to the cgroup2 root: runs inside cargo xtask test-kernels"]
fn the_host_policy_reaches_every_connection_without_a_nearer_policy() {
    let env = kad_env!();
    let _turn = ROOT.lock().unwrap_or_else(|e| e.into_inner());
    let mut daemon = Daemon::start(&env);
    let cg = TestCgroup::new(&env, "host");
    let plain = cg.child("plain");
    let near = cg.child("near");
    let out = cg.child("out");
    let existing = kad_tests::require_kernel(5, 15, "existing connections (iter/tcp)");
    // Opened before the host policy exists.
    let (mut before, first) = Pair::open(&env, &plain, None);
    assert_eq!(first.client.values(), untouched());
    assert_root_clean();

    daemon.kad_ok(&[
        "set", "--host", "--idle", "300", "--intvl", "30", "--cnt", "5",
    ]);
    let host: Values = (true, 300, 30, 5);
    assert_eq!(kad_attachments(&root()), 1, "attached to the root, once");
    if existing {
        assert_eq!(
            before.now(),
            (host, host),
            "a connection opened before --host"
        );
    }

    let near_rel = format!("{}/near", cg.relative());
    let out_rel = format!("{}/out", cg.relative());
    daemon.kad_ok(&[
        "set", "--cgroup", &near_rel, "--idle", "100", "--intvl", "10", "--cnt", "2",
    ]);
    daemon.kad_ok(&["set", "--cgroup", &out_rel, "--off"]);
    assert_eq!(
        kad_attachments(&cg.path),
        0,
        "no anchor below the root: a socket runs kad's programs once"
    );

    let check = |what: &str, cgroup: &Path, netns: Option<&str>, addr: &str, want: Values| {
        let (_pair, r) = Pair::open_at(&env, cgroup, netns, addr);
        assert_eq!(
            (r.client.values(), r.server.values()),
            (want, want),
            "{what}"
        );
    };
    check("the root cgroup itself", &root(), None, "127.0.0.1:0", host);
    check(
        "a child without a policy",
        &plain,
        None,
        "127.0.0.1:0",
        host,
    );
    check("IPv6", &plain, None, "[::1]:0", host);
    let netns = NetnsPair::new();
    check(
        "another network namespace",
        &plain,
        Some(&netns.a),
        "127.0.0.1:0",
        host,
    );
    check(
        "a nearer policy wins",
        &near,
        None,
        "127.0.0.1:0",
        (true, 100, 10, 2),
    );
    check(
        "--off below opts out",
        &out,
        None,
        "127.0.0.1:0",
        untouched(),
    );

    let list = daemon.list();
    let hosts: Vec<&serde_json::Value> = list
        .as_array()
        .expect("list is an array")
        .iter()
        .filter(|e| e["host"] == true)
        .collect();
    assert_eq!(hosts.len(), 1, "list shows the host policy: {list}");
    assert_eq!(hosts[0]["cgroup"], root().display().to_string());
    let table = daemon.kad_ok(&["list"]);
    assert!(table.contains("host policy"), "{table}");

    // Killed, the daemon leaves the policy enforced; restarted, it takes it back.
    daemon.kill();
    check(
        "while the daemon is down",
        &plain,
        None,
        "127.0.0.1:0",
        host,
    );
    daemon.restart();
    check("after a restart", &plain, None, "127.0.0.1:0", host);
    assert_eq!(kad_attachments(&root()), 1, "still once");

    daemon.kad_ok(&["unset", "--host"]);
    assert_root_clean();
    check(
        "after unset --host",
        &plain,
        None,
        "127.0.0.1:0",
        untouched(),
    );
    check(
        "the nearer policy stays",
        &near,
        None,
        "127.0.0.1:0",
        (true, 100, 10, 2),
    );
    let err = daemon.kad(&["unset", "--host"]);
    assert!(!err.status.success());
    assert!(
        String::from_utf8_lossy(&err.stderr).contains("no host policy"),
        "{err:?}"
    );
}

#[test]
#[ignore = "attaches to the cgroup2 root: runs inside cargo xtask test-kernels"]
fn the_host_policy_comes_from_the_config_file_and_survives_a_reboot() {
    let env = kad_env!();
    let _turn = ROOT.lock().unwrap_or_else(|e| e.into_inner());
    let cg = TestCgroup::new(&env, "host-conf");
    let app = cg.child("app");
    let mut daemon = Daemon::start(&env);
    fs::write(
        &daemon.config,
        "[[policy]]\nhost = true\nidle = 250\nintvl = 25\ncnt = 4\n",
    )
    .expect("write the config");
    daemon.kad_ok(&["reload"]);
    let host: Values = (true, 250, 25, 4);
    let (_pair, r) = Pair::open(&env, &app, None);
    assert_eq!((r.client.values(), r.server.values()), (host, host));
    let refused = daemon.kad(&["unset", "--host"]);
    assert!(!refused.status.success(), "a config policy is not unset");

    // A reboot: bpffs emptied, nothing attached; the start puts it back, existing
    // connections included.
    daemon.stop();
    fs::remove_dir_all(&daemon.bpffs).expect("empty the bpffs directory");
    let mut meanwhile = None;
    let released = wait_for(Duration::from_secs(10), || {
        let (pair, r) = Pair::open(&env, &app, None);
        meanwhile = Some(pair);
        r.client.values() == untouched()
    });
    assert!(released, "the kernel released kad's programs");
    daemon.restart();
    let (_pair, r) = Pair::open(&env, &app, None);
    assert_eq!(r.client.values(), host, "after the reboot");
    if kad_tests::require_kernel(5, 15, "existing connections (iter/tcp)") {
        let mut pair = meanwhile.expect("a connection made while no kad ran");
        assert_eq!(pair.now(), (host, host), "made while no kad ran");
    }

    fs::write(&daemon.config, "").expect("empty the config");
    daemon.kad_ok(&["reload"]);
    assert_root_clean();
}

/// Runs on every machine: it attaches nothing to the root, it checks that nothing is.
#[test]
fn the_root_is_touched_only_for_the_host_policy() {
    let env = kad_env!();
    let _turn = ROOT.lock().unwrap_or_else(|e| e.into_inner());
    let daemon = Daemon::start(&env);
    let cg = TestCgroup::new(&env, "host-never");
    daemon.kad_ok(&["set", "--cgroup", &cg.relative(), "--idle", "200"]);
    assert_eq!(
        kad_attachments(&root()),
        0,
        "a policy on a child of the root"
    );
    let refused = daemon.kad(&[
        "set",
        "--cgroup",
        &root().display().to_string(),
        "--idle",
        "200",
    ]);
    assert!(!refused.status.success(), "the root by path is refused");
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        message.contains("--host"),
        "the message points at --host: {message}"
    );
    let conflict = daemon.kad(&["set", "--host", "--cgroup", "x", "--idle", "200"]);
    assert!(!conflict.status.success(), "--host names no cgroup");
    assert_eq!(kad_attachments(&root()), 0);
}
