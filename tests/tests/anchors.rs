//! kad's programs hang from anchor cgroups (the parent of a policy's cgroup, or the cgroup
//! itself below the root). Removed and made again, as fast as a user who owns the cgroup can,
//! an anchor is a new cgroup with nothing attached: the daemon attaches to it, and every
//! connection made once it has (within a second) gets the policy, however many times it
//! happened before.
use std::{fs, path::Path, time::Duration};

use kad_tests::{kad_attachments, kad_env, wait_for, Daemon, Env, Pair, TestCgroup};

const ROUNDS: usize = 60;
const IDLE: i64 = 244;

/// Whether both ends of a connection made now in `cgroup` have the policy.
fn has_policy(env: &Env, cgroup: &Path) -> bool {
    let (_pair, r) = Pair::open(env, cgroup, None);
    [r.client, r.server]
        .iter()
        .all(|side| side.keepalive && side.idle == IDLE)
}

/// Within a second of a re-creation the policy holds, and then for every new connection.
fn settles(env: &Env, daemon: &Daemon, cgroup: &Path, round: usize) {
    assert!(
        wait_for(Duration::from_secs(1), || has_policy(env, cgroup)),
        "round {round}: no connection in {} got the policy within a second; status {}, log:\n{}",
        cgroup.display(),
        daemon.kad_ok(&["status"]),
        daemon.log()
    );
    for n in 0..3 {
        assert!(
            has_policy(env, cgroup),
            "round {round}: connection {n} after the first one without the policy"
        );
    }
}

/// `kad status` for the one policy: its cgroup id and its error.
fn status_of(daemon: &Daemon) -> (Option<u64>, Option<String>) {
    let status: serde_json::Value =
        serde_json::from_str(&daemon.kad_ok(&["status", "--json"])).expect("status json");
    let detail = &status["details"][0];
    (
        detail["cgroup_id"].as_u64(),
        detail["error"].as_str().map(str::to_string),
    )
}

/// Re-creates the cgroups `dirs` (outermost first) `times` times back to back.
fn recreate(dirs: &[&Path], times: usize) {
    for _ in 0..times {
        for dir in dirs.iter().rev() {
            fs::remove_dir(dir).unwrap_or_else(|e| panic!("rmdir {}: {e}", dir.display()));
        }
        for dir in dirs {
            fs::create_dir(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        }
    }
}

#[test]
fn a_re_created_parent_of_a_policy_cgroup_is_anchored_again_every_time() {
    let env = kad_env!();
    let daemon = Daemon::start(&env);
    let cg = TestCgroup::new(&env, "anchor-parent");
    let app = cg.child("mid/app");
    let mid = cg.path.join("mid");
    let rel = format!("{}/mid/app", cg.relative());
    daemon.kad_ok(&["set", "--cgroup", &rel, "--idle", &IDLE.to_string()]);
    settles(&env, &daemon, &app, 0);
    assert_eq!(kad_attachments(&mid), 1, "anchored on the parent");
    for round in 1..=ROUNDS {
        // Once, or several times without a pause: the daemon may see the events at any point.
        recreate(&[&mid, &app], 1 + round % 3);
        settles(&env, &daemon, &app, round);
    }
    assert_eq!(kad_attachments(&mid), 1, "anchored on the parent made last");
    assert!(
        wait_for(Duration::from_secs(1), || status_of(&daemon)
            == (Some(kad_tests::cgroup_id(&app)), None)),
        "status names the cgroup there now, without error: {:?}",
        status_of(&daemon)
    );
    assert_eq!(
        daemon.pinned_links(),
        vec![kad_tests::cgroup_id(&mid)],
        "one anchor pinned, the one alive"
    );
    // A second policy below the same anchor is in force when `kad set` answers.
    let other = cg.child("mid/other");
    daemon.kad_ok(&[
        "set",
        "--cgroup",
        &format!("{}/mid/other", cg.relative()),
        "--idle",
        &IDLE.to_string(),
    ]);
    assert!(
        has_policy(&env, &other),
        "a set below the re-created anchor"
    );
}

#[test]
fn a_re_created_policy_cgroup_below_the_root_is_anchored_again_every_time() {
    let env = kad_env!();
    let daemon = Daemon::start(&env);
    // The test cgroup is a direct child of the cgroup2 root: its programs hang from itself.
    let cg = TestCgroup::new(&env, "anchor-self");
    daemon.kad_ok(&[
        "set",
        "--cgroup",
        &cg.relative(),
        "--idle",
        &IDLE.to_string(),
    ]);
    settles(&env, &daemon, &cg.path, 0);
    for round in 1..=ROUNDS {
        recreate(&[&cg.path], 1 + round % 3);
        settles(&env, &daemon, &cg.path, round);
    }
    assert_eq!(kad_attachments(&cg.path), 1);
    assert_eq!(daemon.pinned_links(), vec![kad_tests::cgroup_id(&cg.path)]);
    // Each re-creation logs, but a flood of them is held back.
    let before = daemon.log().lines().count();
    for _ in 0..300 {
        // Apart enough for the daemon to see each one on its own.
        recreate(&[&cg.path], 1);
        std::thread::sleep(Duration::from_millis(3));
    }
    settles(&env, &daemon, &cg.path, ROUNDS + 1);
    let log = daemon.log();
    let added: Vec<&str> = log.lines().skip(before).collect();
    assert!(
        added.len() < 50,
        "{} lines for 300 re-creations:\n{}",
        added.len(),
        added.join("\n")
    );
}
