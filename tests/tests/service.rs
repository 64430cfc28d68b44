//! kad as a host service: enforcement that outlives the daemon, adoption on restart, cgroups
//! that come and go, the config file, uninstall, a corrupt state file, the unit file.
use std::{fs, path::Path, process::Command, time::Duration};

use kad_tests::{
    cgroup_id, connect, daemon_command, kad_attachments, kad_env, untouched, wait_for, Daemon,
    Process, TestCgroup,
};

fn idle_in(env: &kad_tests::Env, cg: &Path) -> (bool, i64) {
    let (_, c) = connect(env, None, Some(cg), false);
    (c.keepalive, c.idle)
}

#[test]
fn sigkill_and_sigterm_leave_enforcement_and_restarts_adopt_it() {
    let env = kad_env!();
    let mut daemon = Daemon::start(&env);
    let cg = TestCgroup::new(&env, "crash");
    daemon.kad_ok(&["set", "--cgroup", &cg.relative(), "--idle", "181"]);
    let before = daemon.list();

    daemon.kill();
    assert_eq!(
        idle_in(&env, &cg.path),
        (true, 181),
        "enforced with the daemon killed"
    );
    for round in 0..3 {
        daemon.restart();
        assert_eq!(daemon.list(), before, "round {round}: same policies");
        assert_eq!(
            kad_attachments(&cg.path),
            1,
            "round {round}: one attachment, adopted"
        );
        assert_eq!(daemon.pinned_links(), vec![cgroup_id(&cg.path)]);
        daemon.stop();
        assert_eq!(
            idle_in(&env, &cg.path),
            (true, 181),
            "round {round}: enforced after SIGTERM"
        );
    }
    daemon.restart();
    daemon.kad_ok(&["set", "--cgroup", &cg.relative(), "--idle", "182"]);
    assert_eq!(
        idle_in(&env, &cg.path),
        (true, 182),
        "changeable right after a restart"
    );
    assert_eq!(kad_attachments(&cg.path), 1);
}

#[test]
fn an_open_connection_keeps_enforcement_through_a_crash_with_no_gap() {
    let env = kad_env!();
    let mut daemon = Daemon::start(&env);
    let cg = TestCgroup::new(&env, "nogap");
    daemon.kad_ok(&["set", "--cgroup", &cg.relative(), "--idle", "190"]);
    // Connections opened while the daemon dies and comes back all get the policy.
    daemon.kill();
    let mut restarted = false;
    for _ in 0..20 {
        assert_eq!(idle_in(&env, &cg.path), (true, 190));
        if !restarted {
            daemon.restart();
            restarted = true;
        }
    }
}

#[test]
fn a_reboot_rebuilds_everything_from_the_state_directory() {
    let env = kad_env!();
    let mut daemon = Daemon::start(&env);
    let cg = TestCgroup::new(&env, "reboot");
    let off = cg.child("off");
    daemon.kad_ok(&[
        "set",
        "--cgroup",
        &cg.relative(),
        "--idle",
        "191",
        "--cnt",
        "4",
    ]);
    daemon.kad_ok(&["set", "--cgroup", off.to_str().unwrap(), "--off"]);
    let before = daemon.list();
    daemon.kill();
    // A reboot empties bpffs: removing the pins detaches the programs.
    fs::remove_dir_all(&daemon.bpffs).expect("remove the pins");
    // The kernel releases a link whose last pin is gone from a work queue: shortly after.
    assert!(
        wait_for(Duration::from_secs(5), || kad_attachments(&cg.path) == 0),
        "the kernel released the links once their pins were gone"
    );
    assert_eq!(
        idle_in(&env, &cg.path),
        (false, untouched().1),
        "nothing enforced without pins"
    );
    daemon.restart();
    assert_eq!(daemon.list(), before);
    assert_eq!(idle_in(&env, &cg.path), (true, 191));
    assert_eq!(idle_in(&env, &off), (false, untouched().1));
    // The opt-out child is decided by the programs anchored on its parent.
    assert_eq!(kad_attachments(&cg.path), 1);
    assert_eq!(kad_attachments(&off), 0);
}

#[test]
fn a_cgroup_removed_and_created_again_gets_its_policy_back() {
    let env = kad_env!();
    let daemon = Daemon::start(&env);
    let top = TestCgroup::new(&env, "recreate");
    let svc = top.child("svc.service");
    daemon.kad_ok(&["set", "--cgroup", svc.to_str().unwrap(), "--idle", "192"]);
    let old_id = cgroup_id(&svc);
    // kad's programs hang from the parent, which outlives the service's cgroup.
    let top_id = cgroup_id(&top.path);
    assert_eq!(daemon.pinned_links(), vec![top_id]);
    let status = |daemon: &Daemon| -> serde_json::Value {
        serde_json::from_str(&daemon.kad_ok(&["status", "--json"])).unwrap()
    };

    fs::remove_dir(&svc).expect("rmdir the service cgroup");
    // The kernel drops the map entry inside rmdir; the daemon forgets the cgroup when its
    // inotify event arrives.
    assert!(
        wait_for(Duration::from_secs(5), || {
            let s = status(&daemon);
            s["map_entries"] == 0 && s["details"][0]["cgroup_id"].is_null()
        }),
        "no map entry nor cgroup left for the removed cgroup: {}",
        status(&daemon)
    );
    let s = status(&daemon);
    assert_eq!(s["attachments"], 1);
    assert_eq!(daemon.list()[0]["idle"], 192, "the policy is kept by path");

    fs::create_dir(&svc).expect("mkdir the service cgroup again");
    let new_id = cgroup_id(&svc);
    assert_ne!(old_id, new_id);
    // No waiting: the policy is in force from the cgroup's first connection.
    assert_eq!(idle_in(&env, &svc), (true, 192));
    assert!(
        wait_for(Duration::from_secs(3), || status(&daemon)["details"][0]
            ["cgroup_id"]
            == new_id),
        "the daemon records the new cgroup: {}",
        status(&daemon)
    );
    let s = status(&daemon);
    assert_eq!(
        (s["attachments"].clone(), s["map_entries"].clone()),
        (1.into(), 1.into())
    );
    assert_eq!(daemon.pinned_links(), vec![top_id]);
    assert!(
        daemon.log().contains("policy in force"),
        "the daemon logs the re-creation"
    );
}

#[test]
fn the_config_file_is_read_at_start_and_on_reload_and_sighup() {
    let env = kad_env!();
    let mut daemon = Daemon::start(&env);
    let cg = TestCgroup::new(&env, "config");
    let a = cg.child("a");
    let b = cg.child("b.service");
    daemon.stop();
    let config = daemon.config.clone();
    let write_config = |text: String| fs::write(&config, text).expect("write config");
    write_config(format!(
        "[[policy]]\ncgroup = \"{}\"\nidle = 201\n",
        a.display()
    ));
    daemon.restart();
    assert_eq!(idle_in(&env, &a), (true, 201), "config read at start");

    // kad reload: a changed value, and a policy by unit name (slice = the test cgroup).
    write_config(format!(
        "[[policy]]\ncgroup = \"{}\"\nidle = 202\n\n[[policy]]\nunit = \"b\"\nslice = \"{}\"\ncnt = 7\n",
        a.display(),
        cg.relative()
    ));
    daemon.kad_ok(&["reload"]);
    assert_eq!(idle_in(&env, &a), (true, 202));
    let (_, c) = connect(&env, None, Some(&b), false);
    assert_eq!((c.keepalive, c.cnt), (true, 7));

    // kad set wins over the config file; unset brings the config's policy back.
    daemon.kad_ok(&["set", "--cgroup", a.to_str().unwrap(), "--idle", "303"]);
    daemon.kad_ok(&["reload"]);
    assert_eq!(idle_in(&env, &a), (true, 303));
    daemon.kad_ok(&["unset", "--cgroup", a.to_str().unwrap()]);
    assert_eq!(idle_in(&env, &a), (true, 202));
    let out = daemon.kad(&["unset", "--cgroup", a.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("kad reload"),
        "config policies are not unset"
    );

    // A broken config: reload says which file and line, and the old config stays.
    write_config(format!(
        "[[policy]]\ncgroup = \"{}\"\nidle = 0\n",
        a.display()
    ));
    let out = daemon.kad(&["reload"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("{}:1:", daemon.config.display())) && err.contains("--idle"),
        "{err}"
    );
    assert_eq!(idle_in(&env, &a), (true, 202));

    // SIGHUP re-reads it too.
    write_config(format!(
        "[[policy]]\ncgroup = \"{}\"\nidle = 204\n",
        a.display()
    ));
    daemon.signal(libc::SIGHUP);
    assert!(
        wait_for(Duration::from_secs(3), || idle_in(&env, &a) == (true, 204)),
        "SIGHUP reload"
    );
    assert!(
        wait_for(Duration::from_secs(3), || kad_attachments(&b) == 0),
        "b left the config: detached"
    );
}

#[test]
fn a_broken_config_or_state_file_stops_the_start_with_file_and_line() {
    let env = kad_env!();
    let mut daemon = Daemon::start(&env);
    let cg = TestCgroup::new(&env, "corrupt");
    daemon.kad_ok(&["set", "--cgroup", &cg.relative(), "--idle", "205"]);
    daemon.stop();
    let state = daemon.state_dir.join("policies.json");
    let good = fs::read_to_string(&state).expect("state saved");
    let truncated = &good[..good.len() / 2];
    fs::write(&state, truncated).unwrap();
    let run = |daemon: &Daemon| {
        daemon_command(
            &env.kad,
            &daemon.socket,
            &daemon.state_dir,
            &daemon.bpffs,
            &daemon.config,
        )
        .output()
        .expect("run kad daemon")
    };
    let out = run(&daemon);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "refuses to start");
    assert!(
        err.contains(&format!("{}:", state.display()))
            && err.contains("refuses to start rather than drop"),
        "{err}"
    );
    assert_eq!(
        fs::read_to_string(&state).unwrap(),
        truncated,
        "the file is left for the operator"
    );
    assert_eq!(
        idle_in(&env, &cg.path),
        (true, 205),
        "pinned enforcement untouched"
    );

    fs::write(&state, &good).unwrap();
    fs::write(&daemon.config, "[[policy]]\ncgroup = \"x\"\n\nbogus = 1\n").unwrap();
    let out = run(&daemon);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("{}:4:", daemon.config.display())),
        "{err}"
    );
    fs::remove_file(&daemon.config).unwrap();
    daemon.restart();
    assert_eq!(daemon.list()[0]["idle"], 205);
}

#[test]
fn uninstall_leaves_nothing_behind() {
    let env = kad_env!();
    let mut daemon = Daemon::start(&env);
    let cg = TestCgroup::new(&env, "uninstall");
    let child = cg.child("child");
    daemon.kad_ok(&["set", "--cgroup", &cg.relative(), "--idle", "206"]);
    daemon.kad_ok(&["set", "--cgroup", child.to_str().unwrap(), "--off"]);

    let dir_args = daemon.dir_args();
    let uninstall = |purge: bool| {
        let mut args = vec!["uninstall".to_string()];
        args.extend(dir_args.iter().cloned());
        if purge {
            args.push("--purge".into());
        }
        Command::new(&env.kad)
            .args(&args)
            .output()
            .expect("run kad uninstall")
    };
    let out = uninstall(true);
    assert!(!out.status.success(), "refused while the daemon runs");
    assert!(String::from_utf8_lossy(&out.stderr).contains("stop it first"));
    assert_eq!(kad_attachments(&cg.path), 1);

    daemon.stop();
    let out = uninstall(true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The kernel releases a link whose last pin is removed from a work queue: shortly after.
    assert!(
        wait_for(Duration::from_secs(3), || kad_attachments(&cg.path) == 0),
        "detached"
    );
    assert_eq!(kad_attachments(&child), 0);
    assert!(!daemon.bpffs.exists(), "pins removed");
    assert!(
        !daemon.state_dir.join("policies.json").exists(),
        "state purged"
    );
    assert_eq!(idle_in(&env, &cg.path), (false, untouched().1));
    let out = uninstall(false);
    assert!(out.status.success(), "uninstall twice is fine");
}

#[test]
fn unit_and_pid_targets() {
    let env = kad_env!();
    let daemon = Daemon::start(&env);
    let slice = TestCgroup::new(&env, "slice");
    let svc = slice.child("web.service");
    daemon.kad_ok(&[
        "set",
        "--unit",
        "web",
        "--slice",
        &slice.relative(),
        "--idle",
        "207",
    ]);
    assert_eq!(daemon.list()[0]["cgroup"], svc.to_str().unwrap());
    assert_eq!(idle_in(&env, &svc), (true, 207));
    daemon.kad_ok(&[
        "unset",
        "--unit",
        "web.service",
        "--slice",
        &slice.relative(),
    ]);

    let pid_cg = slice.child("by-pid");
    let mut sleeper = Command::new("sleep");
    sleeper.arg("60");
    let process = Process::spawn(sleeper, Some(&pid_cg));
    let pid = process.id();
    daemon.kad_ok(&["set", "--pid", &pid.to_string(), "--idle", "208"]);
    assert_eq!(daemon.list()[0]["cgroup"], pid_cg.to_str().unwrap());
    assert_eq!(idle_in(&env, &pid_cg), (true, 208));

    let before = daemon.list();
    for (args, expected) in [
        (vec!["set", "--pid", "999999999"], "no process 999999999"),
        (vec!["set", "--unit", "a/b"], "invalid unit name"),
        (
            vec!["set", "--pid", "1", "--cgroup", "x"],
            "cannot be used with",
        ),
    ] {
        let out = daemon.kad(&args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success() && err.contains(expected),
            "{args:?}: {err}"
        );
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    }
    assert_eq!(daemon.list(), before);
    // A unit that has not started yet: its policy waits for its cgroup.
    daemon.kad_ok(&[
        "set",
        "--unit",
        "later",
        "--slice",
        &slice.relative(),
        "--idle",
        "9",
    ]);
    let status = daemon.kad_ok(&["status"]);
    assert!(
        status.contains("later.service") && status.contains("waiting"),
        "{status}"
    );
    daemon.kad_ok(&["unset", "--unit", "later", "--slice", &slice.relative()]);
    assert_eq!(daemon.list(), before);
}

#[test]
fn the_unit_file_verifies() {
    let Some(_env) = kad_tests::Env::require(env!("CARGO_BIN_EXE_kad-test-peer")) else {
        return;
    };
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/kad.service");
    let text = fs::read_to_string(&unit).expect("dist/kad.service");
    assert!(text.contains("Type=notify") && text.contains("Restart=on-failure"));
    // systemd-analyze checks that ExecStart exists: point it at the built binary.
    let dir = kad_tests::TempDir::new("unit");
    let kad = kad_tests::kad_bin().canonicalize().expect("kad binary");
    let patched = text.replace("/usr/bin/kad ", &format!("{} ", kad.display()));
    assert_ne!(
        patched, text,
        "ExecStart names /usr/bin/kad (the package's path)"
    );
    let path = dir.0.join("kad.service");
    fs::write(&path, patched).unwrap();
    // --man=no: the man pages Documentation= names are installed by the package, not here
    // (tests/tests/package.rs checks the package holds them).
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("run systemd-analyze (cargo xtask test installs systemd)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {err}");
    assert!(
        !err.contains("kad.service"),
        "warnings about the unit: {err}"
    );
}

#[test]
fn without_bpffs_the_daemon_mounts_it_or_says_how() {
    let env = kad_env!();
    // A --bpffs directory where no bpffs can be: the daemon says how, and creates nothing.
    let dir = kad_tests::TempDir::new("nobpffs");
    let (socket, state, config) = (
        dir.0.join("kad.sock"),
        dir.0.join("state"),
        dir.0.join("none.toml"),
    );
    let out = daemon_command(&env.kad, &socket, &state, &dir.0.join("bpf"), &config)
        .output()
        .expect("run kad daemon");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(
        err.contains("bpffs is not mounted") && err.contains("mount -t bpf bpf"),
        "{err}"
    );
    assert!(!dir.0.join("bpf").exists() && !dir.0.join("state").exists());

    // /sys/fs/bpf unmounted (in a private mount namespace), and the operator has said that
    // enforcement may end with that namespace: the daemon mounts it and works (without
    // --private-bpffs it refuses: tests/tests/bpffs.rs).
    let socket = dir.0.join("ns.sock");
    let log = dir.0.join("ns.log");
    let script = format!(
        "umount /sys/fs/bpf && exec {} daemon --socket {} --state-dir {} --config {} --bpffs /sys/fs/bpf/kad-ns --private-bpffs 2>{}",
        env.kad.display(),
        socket.display(),
        dir.0.join("ns-state").display(),
        dir.0.join("none.toml").display(),
        log.display()
    );
    let mut command = Command::new("unshare");
    command.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
    let mut daemon = Process::spawn(command, None);
    let ready = wait_for(Duration::from_secs(20), || {
        env.kad(&socket, &["status"]).status.success()
    });
    assert!(
        ready,
        "daemon in its own mount namespace: {}",
        fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("mounted bpffs at /sys/fs/bpf"));
    let cg = TestCgroup::new(&env, "nsbpffs");
    let set = env.kad(
        &socket,
        &["set", "--cgroup", &cg.relative(), "--idle", "209"],
    );
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    assert_eq!(idle_in(&env, &cg.path), (true, 209));
    assert_eq!(daemon.terminate(), Some(0));
    // Its bpffs went with its mount namespace, and the pins with it: nothing stays attached.
    assert!(
        wait_for(Duration::from_secs(10), || kad_attachments(&cg.path) == 0),
        "detached once the namespace's bpffs is gone"
    );
}
