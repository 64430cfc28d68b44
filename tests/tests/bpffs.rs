//! kad's directory on bpffs holds every policy after the daemon is gone: kad refuses a place
//! where it could not (the root of a bpf filesystem, a bpf filesystem that only the daemon's
//! mount namespace has) unless told that enforcement ends with it, and refuses to attach where
//! another daemon's programs already run.
use std::{
    fs,
    process::{Command, Stdio},
    time::Duration,
};

use kad_tests::{
    connect, daemon_command, kad_env, unique, untouched, wait_for, Daemon, TempDir, TestCgroup,
};

/// Hides the host's /sys/fs/bpf in a new mount namespace (private: nothing propagates back to
/// the host), then runs the rest of the command line.
const PRIVATE_NS: [&str; 7] = [
    "unshare",
    "--mount",
    "--propagation",
    "private",
    "sh",
    "-c",
    "umount -l /sys/fs/bpf && exec \"$0\" \"$@\"",
];

/// A bpf filesystem of the test's own (a new instance per mount), unmounted when dropped.
struct BpfMount(TempDir);

impl BpfMount {
    fn new() -> BpfMount {
        let dir = TempDir::new("bpffs-mount");
        let out = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&dir.0)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount bpf: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        BpfMount(dir)
    }
}

impl Drop for BpfMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0 .0).status();
    }
}

/// Runs a command that must be refused: its stderr, once it has exited unsuccessfully
/// (killed, and the test failed, if it is still running after 30 s).
fn refused(command: &mut Command) -> String {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let exited = wait_for(Duration::from_secs(30), || {
        child.try_wait().ok().flatten().is_some()
    });
    if !exited {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    }
    let output = child.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(exited, "still running after 30 s, not refused: {stderr}");
    assert!(!output.status.success(), "{stderr}");
    stderr
}

#[test]
fn the_root_of_a_bpf_filesystem_is_refused_as_kad_s_directory() {
    let env = kad_env!();
    let mount = BpfMount::new();
    let root = &mount.0 .0;
    let listing = || {
        let mut names: Vec<_> = fs::read_dir(root)
            .expect("read")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        names.sort();
        names
    };
    // A new bpf filesystem may hold the kernel's own iterators (maps.debug, progs.debug).
    let before = listing();
    let dir = TempDir::new("bpffs-root");
    let stderr = refused(&mut daemon_command(
        &env.kad,
        &dir.0.join("kad.sock"),
        &dir.0.join("state"),
        root,
        &dir.0.join("kad.toml"),
    ));
    let message = format!("{} is the root of a bpf filesystem", root.display());
    assert!(stderr.contains(&message), "{stderr}");
    assert_eq!(listing(), before, "nothing pinned");
    let stderr = refused(
        Command::new(&env.kad)
            .args(["uninstall", "--state-dir"])
            .arg(dir.0.join("state"))
            .arg("--bpffs")
            .arg(root),
    );
    assert!(stderr.contains(&message), "{stderr}");
}

#[test]
fn a_bpf_filesystem_private_to_the_daemon_is_refused_unless_enforcement_may_end_with_it() {
    let env = kad_env!();
    if Command::new("unshare").arg("--help").output().is_err() {
        panic!("unshare (util-linux) is missing");
    }
    let dir = TempDir::new("bpffs-private");
    let bpffs = std::path::Path::new("/sys/fs/bpf").join(unique("private"));
    let mut command = Command::new(PRIVATE_NS[0]);
    command.args(&PRIVATE_NS[1..]);
    let daemon = daemon_command(
        &env.kad,
        &dir.0.join("kad.sock"),
        &dir.0.join("state"),
        &bpffs,
        &dir.0.join("kad.toml"),
    );
    command.arg(daemon.get_program()).args(daemon.get_args());
    // Refused, saying why and how, with nothing made on the host's bpffs.
    let refused_as_private = |command: &mut Command| {
        let stderr = refused(command);
        assert!(
            stderr.contains("only this daemon's namespaces would have")
                && stderr.contains("--private-bpffs"),
            "{stderr}"
        );
        assert!(!bpffs.exists(), "nothing made on the host's bpffs");
    };
    refused_as_private(&mut command);

    // The same in a PID namespace of its own as well, where the daemon is pid 1: /proc/1 is
    // then the daemon itself, not the host's init, and proves nothing.
    let mut command = Command::new("unshare");
    command
        .args(["--pid", "--fork", "--mount-proc"])
        .args(&PRIVATE_NS[1..]);
    command.arg(daemon.get_program()).args(daemon.get_args());
    refused_as_private(&mut command);

    // Told that enforcement ends with it: it runs, and says so at start and at stop.
    let mut daemon = Daemon::start_wrapped(&env, &PRIVATE_NS, &["--private-bpffs"]);
    let cg = TestCgroup::new(&env, "private-bpffs");
    daemon.kad_ok(&["set", "--cgroup", &cg.relative(), "--idle", "123"]);
    assert_eq!(connect(&env, None, Some(&cg.path), false).1.idle, 123);
    assert!(
        daemon
            .log()
            .contains("every policy ends when the namespace goes"),
        "{}",
        daemon.log()
    );
    daemon.stop();
    let log = daemon.log();
    assert!(!log.contains("stay enforced"), "{log}");
    assert!(
        log.contains("its policies end when this mount namespace"),
        "{log}"
    );
    // And that is what happens: the namespace went with the daemon, and so did the policy.
    assert!(
        wait_for(Duration::from_secs(10), || connect(
            &env,
            None,
            Some(&cg.path),
            false
        )
        .1
        .values()
            == untouched()),
        "the policy ended with the namespace"
    );
    assert_eq!(kad_tests::kad_attachments(&cg.path), 0);
    let _ = fs::remove_dir_all(&daemon.dir);
}

#[test]
fn a_second_daemon_with_its_own_bpffs_refuses_a_cgroup_the_first_one_holds() {
    let env = kad_env!();
    let first = Daemon::start(&env);
    let second = Daemon::start(&env);
    let cg = TestCgroup::new(&env, "two-daemons");
    let app = cg.child("app");
    first.kad_ok(&["set", "--cgroup", &cg.relative(), "--idle", "150"]);
    // The same cgroup, and one below it: both under the first daemon's programs.
    for path in [cg.relative(), format!("{}/app", cg.relative())] {
        let out = second.kad(&["set", "--cgroup", &path, "--idle", "250"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{path}: {stderr}");
        assert!(
            stderr.contains("another kad daemon's program"),
            "{path}: {stderr}"
        );
    }
    assert_eq!(second.list(), serde_json::json!([]), "nothing kept");
    assert_eq!(
        kad_tests::kad_attachments(&cg.path),
        1,
        "the first daemon's"
    );
    assert_eq!(connect(&env, None, Some(&app), false).1.idle, 150);
}
