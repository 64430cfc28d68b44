//! What no user, fault or typo may do to kad: a cgroup merely named like a `kad exec` one is
//! never collected (nor one a `kad exec` request names that kad exec did not make), paths
//! through symbolic links are refused, a full disk refuses new policies but not removals and
//! leaves no junk, a missing config file drops nothing, two daemons never share a state
//! directory, `kad exec` keeps its command's status when the daemon dies, state files with a
//! path twice, an unknown field, a link or a FIFO are refused by name, a state directory
//! removed while running loses nothing, and a config written in place during reloads never
//! drops an unchanged policy.
use std::{
    fs,
    io::Read,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use kad_tests::{
    connect, daemon_command, in_cgroup, kad_attachments, kad_env, unique, untouched, wait_for,
    Daemon, Env, TempDir, TestCgroup, TmpfsMount,
};

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts that `out` failed with one line on stderr containing every one of `expected`.
fn assert_one_line_error(out: &Output, expected: &[&str]) {
    let err = stderr_of(out);
    assert!(!out.status.success(), "should fail: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err:?}");
    for e in expected {
        assert!(err.contains(e), "expected {e:?} in {err:?}");
    }
}

/// `kad exec ARGS` against `daemon`, started in the background with stderr piped, from a test
/// cgroup of its own: its transient cgroup is made below that one, and goes with it whatever
/// happens.
fn spawn_exec(env: &Env, daemon: &Daemon, args: &[&str]) -> (std::process::Child, TestCgroup) {
    let parent = TestCgroup::new(env, "exec-parent");
    let mut command = Command::new(&env.kad);
    command
        .arg("exec")
        .args(args)
        .env("KAD_SOCKET", &daemon.socket)
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    let _procs = in_cgroup(&mut command, &parent.path);
    let child = command.spawn().expect("run kad exec");
    (child, parent)
}

/// Waits for `daemon` to list exactly one policy and returns its cgroup.
fn the_one_policy(daemon: &Daemon) -> PathBuf {
    let mut list = serde_json::Value::Null;
    let one = wait_for(Duration::from_secs(10), || {
        list = daemon.list();
        list.as_array().is_some_and(|a| a.len() == 1)
    });
    assert!(one, "one policy expected: {list}");
    PathBuf::from(list[0]["cgroup"].as_str().expect("cgroup path"))
}

fn idle_in(env: &Env, cg: &Path) -> (bool, i64) {
    let (_, client) = connect(env, None, Some(cg), false);
    (client.keepalive, client.idle)
}

#[test]
fn a_cgroup_named_like_a_kad_exec_one_is_the_users() {
    let env = kad_env!();
    let mut daemon = Daemon::start(&env);
    let cg = TestCgroup::new(&env, "named");
    // No process 4000000 exists (pid_max is lower): by name, its `kad exec` would be gone.
    let named = cg.child("kad-exec-4000000");
    daemon.kad_ok(&["set", "--cgroup", named.to_str().unwrap(), "--idle", "300"]);
    let before = daemon.list();
    for round in 0..2 {
        // Eight ticks of the daemon's 250 ms loop, checked as they pass.
        for _ in 0..8 {
            std::thread::sleep(Duration::from_millis(250));
            assert!(named.is_dir(), "round {round}: the directory is kept");
            assert_eq!(daemon.list(), before, "round {round}: the policy is kept");
        }
        assert_eq!(idle_in(&env, &named), (true, 300), "round {round}");
        // The same after a restart, from policies.json.
        daemon.stop();
        daemon.restart();
    }
    // Nor can a `kad exec` request claim it.
    let request = format!(
        "{{\"cmd\":\"exec\",\"cgroup\":\"{}\",\"policy\":{{\"mode\":\"on\",\"idle\":5,\"intvl\":null,\"cnt\":null}}}}\n",
        named.display()
    );
    let mut stream = std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap();
    std::io::Write::write_all(&mut stream, request.as_bytes()).unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    assert!(
        reply.contains("\"error\"") && reply.contains("has a policy set with kad set"),
        "{reply}"
    );
    assert_eq!(daemon.list(), before);
    let state = kad_tests::saved_table(&daemon.state_dir).to_string();
    assert!(!state.contains("exec_owner"), "{state}");
}

#[test]
fn a_killed_kad_exec_is_collected_across_a_restart() {
    let env = kad_env!();
    let mut daemon = Daemon::start(&env);
    let (mut kad, _parent) = spawn_exec(&env, &daemon, &["--idle", "96", "--", "sleep", "60"]);
    let cgroup = the_one_policy(&daemon);
    // The owner is recorded, in the daemon's table and on disk.
    let saved = kad_tests::saved_table(&daemon.state_dir);
    assert_eq!(saved[0]["exec_owner"]["pid"], kad.id(), "{saved}");

    // The daemon dies, then kad exec and its command: nobody is left to clean up.
    daemon.kill();
    kad.kill().unwrap();
    kad.wait().unwrap();
    kad_tests::kill_cgroup(&cgroup);
    assert!(wait_for(Duration::from_secs(5), || !fs::read_to_string(
        cgroup.join("cgroup.events")
    )
    .unwrap_or_default()
    .contains("populated 1")));
    assert!(cgroup.is_dir(), "still there while no daemon runs");

    daemon.restart();
    assert!(
        wait_for(Duration::from_secs(10), || !cgroup.exists()
            && daemon.list() == serde_json::json!([])),
        "collected after the restart: {} {}",
        daemon.list(),
        daemon.log()
    );
    let state = kad_tests::saved_table(&daemon.state_dir).to_string();
    assert!(!state.contains("exec_owner"), "{state}");
}

#[test]
fn a_kad_exec_from_another_pid_namespace_is_kept_while_it_runs_then_collected() {
    let env = kad_env!();
    let daemon = Daemon::start(&env);
    // kad exec is pid 1 of a new PID namespace: its cgroup is named kad-exec-1, and the
    // daemon's /proc/1 is another process altogether.
    let parent = TestCgroup::new(&env, "pidns-parent");
    let mut command = Command::new("unshare");
    command
        .args(["--pid", "--fork", "--kill-child"])
        .arg(&env.kad)
        .args(["exec", "--idle", "95", "--", "sleep", "60"])
        .env("KAD_SOCKET", &daemon.socket)
        .stdin(Stdio::null());
    let procs = in_cgroup(&mut command, &parent.path);
    let mut unshare = command.spawn().expect("run unshare (util-linux)");
    drop(procs);
    let cgroup = the_one_policy(&daemon);
    assert_eq!(
        cgroup.file_name().and_then(|n| n.to_str()),
        Some("kad-exec-1")
    );
    let sleeping = wait_for(Duration::from_secs(5), || {
        fs::read_to_string(cgroup.join("cgroup.procs")).is_ok_and(|t| !t.trim().is_empty())
    });
    assert!(sleeping, "the command runs in its cgroup");
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(250));
        assert!(cgroup.is_dir(), "kept while its kad exec runs");
        assert_eq!(daemon.list().as_array().map(Vec::len), Some(1));
    }
    // unshare dies, kad exec (the namespace's init) with it, and the sleep with the namespace.
    unshare.kill().unwrap();
    unshare.wait().unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || !cgroup.exists()
            && daemon.list() == serde_json::json!([])),
        "collected once its kad exec is gone: {} {}",
        daemon.list(),
        daemon.log()
    );
}

#[test]
fn kad_exec_keeps_the_commands_status_when_the_daemon_dies() {
    let env = kad_env!();
    let mut daemon = Daemon::start(&env);
    let dir = TempDir::new("exec-go");
    let go = dir.0.join("go");
    let script = format!(
        "while [ ! -e {} ]; do sleep 0.05; done; exit 7",
        go.display()
    );
    let (mut kad, _parent) =
        spawn_exec(&env, &daemon, &["--idle", "94", "--", "sh", "-c", &script]);
    let cgroup = the_one_policy(&daemon);
    daemon.kill();
    fs::write(&go, "").unwrap();
    let mut status = None;
    assert!(wait_for(Duration::from_secs(10), || {
        status = kad.try_wait().unwrap();
        status.is_some()
    }));
    let mut err = String::new();
    kad.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert_eq!(
        status.unwrap().code(),
        Some(7),
        "the command's status: {err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("warning") && err.contains("could not be removed"),
        "{err}"
    );
    assert!(!cgroup.exists(), "kad exec removed its cgroup itself");
    // The daemon recorded the run: once back, it removes the policy that is left.
    daemon.restart();
    assert!(
        wait_for(Duration::from_secs(10), || daemon.list()
            == serde_json::json!([])),
        "{}",
        daemon.list()
    );
}

/// `kad daemon` with its own socket and these paths, which must refuse to start; returns its
/// output. Its --bpffs is not on a bpf filesystem: were the check under test gone, the start
/// would still fail (with another message) before anything is attached, so that a symbolic
/// link to the cgroup2 root can never lead to an attachment there.
fn start_refused(env: &Env, dir: &Path, config: &Path, state_dir: &Path) -> Output {
    let bpffs = dir.join(unique("not-bpffs"));
    let mut daemon = daemon_command(&env.kad, &dir.join("kad.sock"), state_dir, &bpffs, config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kad daemon");
    let exited = wait_for(Duration::from_secs(15), || {
        daemon.try_wait().ok().flatten().is_some()
    });
    if !exited {
        let _ = daemon.kill();
    }
    let out = daemon.wait_with_output().expect("wait for kad daemon");
    assert!(exited, "the daemon started: {}", stderr_of(&out));
    assert!(
        !bpffs.exists(),
        "refused before its bpffs directory was made"
    );
    out
}

#[test]
fn paths_through_symbolic_links_in_the_config_or_the_state_file_are_refused() {
    let env = kad_env!();
    let cg = TestCgroup::new(&env, "linked");
    let dir = TempDir::new("links");
    let to_cg = dir.0.join("to-cgroup");
    std::os::unix::fs::symlink(&cg.path, &to_cg).unwrap();
    let to_root = dir.0.join("to-root");
    std::os::unix::fs::symlink(&env.root, &to_root).unwrap();
    let config = dir.0.join("kad.toml");
    let state_dir = dir.0.join("state");

    for (link, note) in [(&to_cg, ""), (&to_root, "the cgroup2 root")] {
        fs::write(
            &config,
            format!(
                "[[policy]]\ncgroup = \"{}\"\nidle = 50\n\n[[policy]]\ncgroup = \"{}\"\nidle = 51\n",
                cg.relative(),
                link.display()
            ),
        )
        .unwrap();
        let out = start_refused(&env, &dir.0, &config, &state_dir);
        assert_one_line_error(
            &out,
            &[
                &format!("{}:5:", config.display()),
                "symbolic link",
                &link.display().to_string(),
                note,
            ],
        );
    }
    fs::remove_file(&config).unwrap();

    for (link, note) in [(&to_cg, ""), (&to_root, "the cgroup2 root")] {
        fs::create_dir_all(&state_dir).unwrap();
        let state = state_dir.join("policies.json");
        let text = format!(
            "[\n  {{\"cgroup\": \"{}\", \"mode\": \"on\", \"idle\": 52, \"intvl\": null, \"cnt\": null}},\n  {{\"cgroup\": \"{}\", \"mode\": \"on\", \"idle\": 53, \"intvl\": null, \"cnt\": null}}\n]\n",
            cg.path.display(),
            link.display()
        );
        fs::write(&state, &text).unwrap();
        let out = start_refused(&env, &dir.0, &config, &state_dir);
        assert_one_line_error(
            &out,
            &[
                &format!("{}:3:", state.display()),
                "symbolic link",
                &link.display().to_string(),
                note,
            ],
        );
        assert_eq!(fs::read_to_string(&state).unwrap(), text, "left as it was");
    }
    assert_eq!(kad_attachments(&cg.path), 0, "nothing attached");
    assert_eq!(
        kad_tests::kad_programs_on(&env.root),
        Vec::<String>::new(),
        "nothing on the root"
    );

    // On reload, the previous config stays. (A link to the cgroup, not the root: this daemon
    // can attach.)
    let daemon = Daemon::start(&env);
    fs::write(
        &daemon.config,
        format!("[[policy]]\ncgroup = \"{}\"\nidle = 54\n", cg.relative()),
    )
    .unwrap();
    daemon.kad_ok(&["reload"]);
    let before = daemon.list();
    fs::write(
        &daemon.config,
        format!("[[policy]]\ncgroup = \"{}\"\nidle = 55\n", to_cg.display()),
    )
    .unwrap();
    let out = daemon.kad(&["reload"]);
    assert_one_line_error(
        &out,
        &[&format!("{}:1:", daemon.config.display()), "symbolic link"],
    );
    assert_eq!(daemon.list(), before);
    assert_eq!(idle_in(&env, &cg.path), (true, 54));
    assert_eq!(
        kad_tests::kad_programs_on(&env.root),
        Vec::<String>::new(),
        "nothing on the root"
    );
}

/// A config file that is gone (a wrong `--config`, a lost file) is not an empty one: what it set
/// stays in force, loudly, across restarts, a reboot, and the removal of a `kad set` that
/// overrode it, until a file says otherwise.
#[test]
fn a_missing_config_file_drops_nothing() {
    let env = kad_env!();
    let cg = TestCgroup::new(&env, "config-missing");
    let over = cg.child("over");
    let mut daemon = Daemon::start(&env);
    fs::write(
        &daemon.config,
        format!(
            "[[policy]]\ncgroup = \"{0}\"\nidle = 61\nenforce = true\n\n\
             [[policy]]\ncgroup = \"{0}/over\"\nidle = 62\n",
            cg.relative()
        ),
    )
    .unwrap();
    daemon.kad_ok(&["reload"]);
    let configured = daemon.list();
    daemon.kad_ok(&["set", "--cgroup", over.to_str().unwrap(), "--idle", "63"]);
    let before = daemon.list();
    assert_eq!(idle_in(&env, &cg.path), (true, 61));
    assert_eq!(idle_in(&env, &over), (true, 63));

    // Gone while no daemon ran.
    daemon.stop();
    fs::remove_file(&daemon.config).unwrap();
    daemon.restart();
    assert_eq!(daemon.list(), before, "kept, with its values and enforce");
    assert_eq!(idle_in(&env, &cg.path), (true, 61));
    let log = daemon.log();
    assert!(
        log.contains("WARN") && log.contains("is missing (a wrong --config?)"),
        "{log}"
    );
    assert!(!log.contains("no longer has"), "nothing removed: {log}");
    let out = daemon.kad(&["unset", "--cgroup", &cg.relative()]);
    assert_one_line_error(&out, &["comes from", "the file is missing"]);
    // The config file's policy for a path a `kad set` overrode is back when that one goes.
    daemon.kad_ok(&["unset", "--cgroup", over.to_str().unwrap()]);
    assert_eq!(daemon.list(), configured);
    assert_eq!(idle_in(&env, &over), (true, 62));

    // A reboot: nothing pinned is left, the copy kept in the state directory still knows.
    daemon.stop();
    fs::remove_dir_all(&daemon.bpffs).expect("empty the bpffs directory");
    assert!(
        wait_for(Duration::from_secs(10), || idle_in(&env, &cg.path).0
            == untouched().0),
        "nothing enforced once the pins are gone"
    );
    daemon.restart();
    assert_eq!(daemon.list(), configured, "kept after a reboot");
    assert_eq!(idle_in(&env, &cg.path), (true, 61));

    // A reload of a missing file refuses and changes nothing.
    let out = daemon.kad(&["reload"]);
    assert_one_line_error(
        &out,
        &[
            &daemon.config.display().to_string(),
            "does not exist",
            "make the file empty",
        ],
    );
    assert_eq!(daemon.list(), configured);

    // An empty file says "none", on reload and across a restart.
    fs::write(&daemon.config, "").unwrap();
    daemon.kad_ok(&["reload"]);
    assert_eq!(cgroups(&daemon.list()), Vec::<String>::new());
    assert_eq!(idle_in(&env, &cg.path), (false, untouched().1));
    daemon.stop();
    fs::remove_file(&daemon.config).unwrap();
    daemon.restart();
    assert_eq!(
        cgroups(&daemon.list()),
        Vec::<String>::new(),
        "nothing comes back"
    );
}

/// The cgroups of a policy table (from `kad list --json` or the state file), in order.
fn cgroups(table: &serde_json::Value) -> Vec<String> {
    let mut paths: Vec<String> = table
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .filter_map(|e| e["cgroup"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    paths.sort();
    paths
}

#[test]
fn a_full_state_disk_refuses_sets_still_takes_unsets_and_leaves_no_junk() {
    let env = kad_env!();
    let mut daemon = Daemon::start(&env);
    let kept = TestCgroup::new(&env, "full-kept");
    let refused = TestCgroup::new(&env, "full-refused");
    daemon.stop();
    // Dropped before the daemon's guard: unmounted, then the daemon's directory removed.
    let disk = TmpfsMount::new(&daemon.state_dir, "256k");
    daemon.restart();
    daemon.kad_ok(&["set", "--cgroup", &kept.relative(), "--idle", "201"]);
    let tmp = daemon.state_dir.join("policies.json.tmp");
    let filler = disk.fill();
    // A set needs room for its line and the journal's reserve: the page the journal's reserve
    // ends in may still take a few lines. Each one that is accepted is saved; the first that
    // finds no room is refused.
    let mut refused_out = None;
    let mut accepted = Vec::new();
    for i in 0..500 {
        let waiting = format!("{}/w{i}", refused.relative());
        let out = daemon.kad(&["set", "--cgroup", &waiting, "--idle", "202"]);
        if !out.status.success() {
            refused_out = Some((out, waiting));
            break;
        }
        accepted.push(waiting);
    }
    let (out, waiting) = refused_out.expect("a set on a full disk is refused at last");
    eprintln!(
        "{} sets accepted on the full disk before one was refused",
        accepted.len()
    );
    assert_one_line_error(&out, &["No space left on device"]);
    let before = daemon.list();
    assert_eq!(
        cgroups(&kad_tests::saved_table(&daemon.state_dir)),
        cgroups(&before),
        "what is listed is saved"
    );
    assert!(
        !before.to_string().contains(&format!("{waiting}\"")),
        "{before}"
    );
    assert!(!tmp.exists(), "after the refused set: no temporary file");

    // A stop folds the journal into policies.json, which needs room it does not find: no
    // temporary file is left, and the journal still holds every change.
    daemon.stop();
    assert!(!tmp.exists(), "after a failed rewrite: no temporary file");
    daemon.restart();
    assert_eq!(daemon.list(), before, "nothing lost across the restart");
    assert!(!tmp.exists());
    assert_eq!(idle_in(&env, &kept.path), (true, 201));

    // Unsets use the journal's reserve: on the full disk every policy can still be removed,
    // and each removal is saved.
    for waiting in &accepted {
        daemon.kad_ok(&["unset", "--cgroup", waiting]);
    }
    daemon.kad_ok(&["unset", "--cgroup", &kept.relative()]);
    let after = daemon.list();
    assert_eq!(cgroups(&after), Vec::<String>::new(), "all removed");
    assert_eq!(
        cgroups(&kad_tests::saved_table(&daemon.state_dir)),
        cgroups(&after),
        "the removals are saved"
    );
    assert_eq!(idle_in(&env, &kept.path), (false, untouched().1));

    // With room again, the next stop writes the table whole and empties the journal.
    fs::remove_file(filler).unwrap();
    daemon.stop();
    let journal = daemon.state_dir.join("policies.journal");
    assert_eq!(fs::read_to_string(&journal).unwrap_or_default(), "");
    assert_eq!(
        fs::read_to_string(daemon.state_dir.join("policies.json"))
            .unwrap_or_default()
            .trim(),
        "[]"
    );
    assert!(!tmp.exists());
    daemon.restart();
    daemon.kad_ok(&["set", "--cgroup", &kept.relative(), "--idle", "204"]);
    assert_eq!(idle_in(&env, &kept.path), (true, 204));
}

#[test]
fn two_daemons_never_share_a_state_directory() {
    let env = kad_env!();
    let daemon = Daemon::start(&env);
    let cg = TestCgroup::new(&env, "shared-state");
    daemon.kad_ok(&["set", "--cgroup", &cg.relative(), "--idle", "203"]);
    let saved = kad_tests::saved_table(&daemon.state_dir);
    let dir = TempDir::new("second");
    let out = start_refused(&env, &dir.0, &dir.0.join("none.toml"), &daemon.state_dir);
    assert_one_line_error(
        &out,
        &[
            "another kad daemon is using the state directory",
            &daemon.state_dir.display().to_string(),
            "--state-dir",
        ],
    );
    assert_eq!(kad_tests::saved_table(&daemon.state_dir), saved);
    daemon.kad_ok(&["set", "--cgroup", &cg.relative(), "--idle", "204"]);
    assert_eq!(
        idle_in(&env, &cg.path),
        (true, 204),
        "the first one still works"
    );
}

/// The state files are read strictly: a path twice, a field kad does not know, a symbolic link
/// (even a dangling one, which must not be created) or a FIFO in a file's place each stop the
/// start with the file's name, at once, and nothing is written through them.
#[test]
fn state_files_refuse_duplicates_unknown_fields_links_and_fifos() {
    let env = kad_env!();
    let cg = TestCgroup::new(&env, "strict");
    let dir = TempDir::new("strict");
    let config = dir.0.join("kad.toml");
    let state_dir = dir.0.join("state");
    fs::create_dir_all(&state_dir).unwrap();
    let state = state_dir.join("policies.json");
    let journal = state_dir.join("policies.journal");
    let entry = |idle: u32, extra: &str| {
        format!(
            "  {{\"cgroup\": \"{}\", \"mode\": \"on\", \"idle\": {idle}, \"intvl\": null, \"cnt\": null{extra}}}",
            cg.path.display()
        )
    };

    fs::write(
        &state,
        format!("[\n{},\n{}\n]\n", entry(52, ""), entry(53, "")),
    )
    .unwrap();
    let out = start_refused(&env, &dir.0, &config, &state_dir);
    assert_one_line_error(&out, &[&format!("{}:3:", state.display()), "two entries"]);

    fs::write(&state, format!("[\n{}\n]\n", entry(52, ", \"colour\": 1"))).unwrap();
    let out = start_refused(&env, &dir.0, &config, &state_dir);
    assert_one_line_error(
        &out,
        &[&format!("{}:2:", state.display()), "unknown field `colour`"],
    );

    fs::remove_file(&state).unwrap();
    fs::write(
        &journal,
        format!("{{\"set\": {}}}\n", entry(52, ", \"colour\": 1").trim()),
    )
    .unwrap();
    let out = start_refused(&env, &dir.0, &config, &state_dir);
    assert_one_line_error(
        &out,
        &[
            &format!("{}:1:", journal.display()),
            "unknown field `colour`",
        ],
    );

    fs::remove_file(&journal).unwrap();
    let target = dir.0.join("elsewhere");
    std::os::unix::fs::symlink(&target, &journal).unwrap();
    let out = start_refused(&env, &dir.0, &config, &state_dir);
    assert_one_line_error(&out, &[&journal.display().to_string(), "symbolic link"]);
    assert!(!target.exists(), "nothing was made through the link");

    fs::remove_file(&journal).unwrap();
    let c = std::ffi::CString::new(journal.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    // start_refused fails the test if the daemon is still waiting after 15 s.
    let out = start_refused(&env, &dir.0, &config, &state_dir);
    assert_one_line_error(
        &out,
        &[&journal.display().to_string(), "a FIFO, not a regular file"],
    );
}

/// A state directory removed while the daemon runs: the next change writes every policy again
/// into a new one, so that a crash and a reboot (pins gone) lose nothing.
#[test]
fn a_state_directory_removed_while_running_loses_nothing_at_the_next_start() {
    let env = kad_env!();
    let top = TestCgroup::new(&env, "lost-dir");
    let mut daemon = Daemon::start(&env);
    for i in 0..4 {
        fs::create_dir_all(top.child(&format!("p{i}"))).unwrap();
        daemon.kad_ok(&[
            "set",
            "--cgroup",
            &format!("{}/p{i}", top.relative()),
            "--idle",
            &format!("{}", 140 + i),
        ]);
    }
    fs::remove_dir_all(&daemon.state_dir).unwrap();
    daemon.kad_ok(&[
        "set",
        "--cgroup",
        &format!("{}/p4", top.relative()),
        "--idle",
        "144",
    ]);
    let log = daemon.log();
    assert!(
        log.contains("the state directory was removed or replaced"),
        "said loudly: {log}"
    );
    // A crash, then a reboot: the pins go, only the state directory is left.
    daemon.kill();
    let mut uninstall = vec!["uninstall".to_string()];
    uninstall.extend(daemon.dir_args());
    let args: Vec<&str> = uninstall.iter().map(String::as_str).collect();
    let out = env.kad(&daemon.socket, &args);
    assert!(out.status.success(), "{}", stderr_of(&out));
    daemon.restart();
    let list = daemon.list();
    assert_eq!(list.as_array().map(Vec::len), Some(5), "{list}");
    let cg = top.child("p0");
    assert_eq!(idle_in(&env, &cg), (true, 140));
}

/// The config file rewritten in place (truncated, then written in small pieces) again and
/// again while reloads are asked for (SIGHUP and `kad reload`): the policy of a cgroup whose
/// entry never changes is never missing, for any connection made meanwhile.
#[test]
fn reloads_during_in_place_writes_never_drop_an_unchanged_policy() {
    let env = kad_env!();
    let top = TestCgroup::new(&env, "torn");
    let keep = top.child("keep");
    fs::create_dir_all(&keep).unwrap();
    let daemon = Daemon::start(&env);
    // The unchanged entry last, so that a file cut short loses it first.
    let text = |other: u32| {
        format!(
            "[[policy]]\ncgroup = \"{0}/other\"\nidle = {other}\n\n[[policy]]\ncgroup = \"{0}/keep\"\nidle = 133\nintvl = 13\ncnt = 3\n",
            top.relative()
        )
    };
    fs::write(&daemon.config, text(100)).unwrap();
    daemon.kad_ok(&["reload"]);
    assert_eq!(idle_in(&env, &keep), (true, 133));

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (config, stop) = (daemon.config.clone(), stop.clone());
        let texts: Vec<String> = (0..10).map(|i| text(100 + i)).collect();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut file = fs::File::create(&config).expect("truncate the config");
                for chunk in texts[n % texts.len()].as_bytes().chunks(7) {
                    file.write_all(chunk).expect("write the config");
                    std::thread::sleep(Duration::from_millis(2));
                }
                drop(file);
                std::thread::sleep(Duration::from_millis(60));
                n += 1;
            }
        })
    };
    let signaller = {
        let (stop, pid) = (stop.clone(), daemon.pid() as i32);
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // SAFETY: signalling the test's own daemon.
                unsafe { libc::kill(pid, libc::SIGHUP) };
                std::thread::sleep(Duration::from_millis(7));
            }
        })
    };
    let reloader = {
        let (stop, kad, socket) = (stop.clone(), env.kad.clone(), daemon.socket.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Refused when the file keeps changing: the previous config stays either way.
                let _ = Command::new(&kad)
                    .arg("reload")
                    .env("KAD_SOCKET", &socket)
                    .stdin(Stdio::null())
                    .output();
            }
        })
    };
    let (mut total, mut without) = (0, 0);
    let start = std::time::Instant::now();
    // At least 6 s and 21 connections (a connection is slow under emulation), at most 60 s.
    while (start.elapsed() < Duration::from_secs(6) || total <= 20)
        && start.elapsed() < Duration::from_secs(60)
    {
        if idle_in(&env, &keep) != (true, 133) {
            without += 1;
        }
        total += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    eprintln!("{total} connections in {:?}", start.elapsed());
    writer.join().unwrap();
    signaller.join().unwrap();
    reloader.join().unwrap();
    eprintln!("threads stopped after {:?}", start.elapsed());
    assert!(total > 20, "connections made: {total}");
    assert_eq!(
        without, 0,
        "{without} of {total} connections lacked the policy"
    );
    // The daemon is still there and answers.
    daemon.kad_ok(&["status"]);
}

/// A root `kad exec` request naming a cgroup that kad exec did not make (an existing empty one)
/// is refused: the daemon would remove that cgroup once the requester is gone.
#[test]
fn a_kad_exec_request_for_a_cgroup_kad_did_not_make_is_refused() {
    let env = kad_env!();
    let daemon = Daemon::start(&env);
    let cg = TestCgroup::new(&env, "not-exec");
    let existing = cg.child("app");
    let named = cg.child("kad-exec-12345");
    for path in [&existing, &named] {
        fs::create_dir_all(path).unwrap();
        // From a process that exits at once: its run is then gone, and its cgroup collected.
        let request = format!(
            "{{\"cmd\":\"exec\",\"cgroup\":\"{}\",\"policy\":{{\"mode\":\"on\",\"idle\":5,\"intvl\":null,\"cnt\":null}}}}\n",
            path.display()
        );
        let script = "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\ns.sendall(sys.argv[2].encode())\nprint(s.makefile().read())";
        let out = Command::new("/usr/bin/python3")
            .args(["-c", script])
            .arg(&daemon.socket)
            .arg(&request)
            .output()
            .expect("run python3");
        let reply = String::from_utf8_lossy(&out.stdout);
        assert!(
            reply.contains("\"error\"") && reply.contains("use kad set"),
            "{}: {reply}",
            path.display()
        );
    }
    // Longer than two of the collector's rounds (1 s), which would have removed them.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(existing.is_dir(), "the existing cgroup is kept");
    assert!(
        named.is_dir(),
        "a cgroup merely named like kad exec's is kept"
    );
    assert_eq!(daemon.list(), serde_json::json!([]));
}

/// A state directory removed while nothing changes: the daemon sees it go (inotify), makes it
/// again and writes every policy to it at once, so a crash and a reboot right after lose none.
#[test]
fn a_state_directory_removed_while_idle_is_written_again_at_once() {
    let env = kad_env!();
    let top = TestCgroup::new(&env, "lost-idle");
    let mut daemon = Daemon::start(&env);
    for i in 0..3 {
        daemon.kad_ok(&[
            "set",
            "--cgroup",
            &format!("{}/p{i}", top.relative()),
            "--idle",
            &format!("{}", 150 + i),
        ]);
    }
    fs::remove_dir_all(&daemon.state_dir).unwrap();
    let written = wait_for(Duration::from_secs(10), || {
        kad_tests::saved_table(&daemon.state_dir)
            .as_array()
            .is_some_and(|t| t.len() == 3)
    });
    assert!(written, "written again: {}", daemon.log());
    // A crash, then a reboot: the pins go, only the state directory is left.
    daemon.kill();
    let mut uninstall = vec!["uninstall".to_string()];
    uninstall.extend(daemon.dir_args());
    let args: Vec<&str> = uninstall.iter().map(String::as_str).collect();
    let out = env.kad(&daemon.socket, &args);
    assert!(out.status.success(), "{}", stderr_of(&out));
    daemon.restart();
    assert_eq!(daemon.list().as_array().map(Vec::len), Some(3));
    let cg = top.child("p2");
    fs::create_dir_all(&cg).unwrap();
    assert_eq!(idle_in(&env, &cg), (true, 152));
}

#[test]
fn a_state_directory_that_cannot_be_made_again_is_said_at_a_bounded_rate() {
    let env = kad_env!();
    let top = TestCgroup::new(&env, "lost-file");
    let daemon = Daemon::start(&env);
    daemon.kad_ok(&["set", "--cgroup", &top.relative(), "--idle", "150"]);
    // A file where the state directory was: it cannot be made again, and every change fails
    // to save (said to its client), however many come.
    let gone = daemon.state_dir.with_extension("gone");
    fs::rename(&daemon.state_dir, &gone).unwrap();
    let placed = wait_for(Duration::from_secs(10), || {
        let _ = fs::remove_dir_all(&daemon.state_dir);
        fs::write(&daemon.state_dir, "not a directory").is_ok() && daemon.state_dir.is_file()
    });
    assert!(placed, "a file in the state directory's place");
    let mut refused = 0;
    for i in 0..40 {
        let out = daemon.kad(&[
            "set",
            "--cgroup",
            &format!("{}/c{i}", top.relative()),
            "--idle",
            "160",
        ]);
        if !out.status.success() {
            refused += 1;
        }
    }
    assert_eq!(refused, 40, "a change that cannot be saved is refused");
    let log = daemon.log();
    let said = log
        .matches("the state directory was removed or replaced")
        .count();
    assert!((1..=10).contains(&said), "{said} lines:\n{log}");
    let _ = fs::remove_file(&daemon.state_dir);
    let _ = fs::rename(&gone, &daemon.state_dir);
}
