//! The daemon's structure: one thread owns the kernel and disk state and takes changes one at a
//! time; reads (`kad list`, `kad status`, `kad stats`, `/metrics`) are answered from the
//! snapshot it publishes, so they do not wait behind a change stuck on the disk.
//!
//! The change is held for real: the test takes a read lease (`F_SETLEASE`) on the state
//! directory's journal, which the daemon opens for each change, so the daemon's open for writing
//! blocks in the kernel until the lease is given up (or `fs.lease-break-time`, 45 s by default).
use std::{
    fs::File,
    io::Read,
    os::fd::AsRawFd,
    path::Path,
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use kad_tests::{connect, free_port, kad_env, scrape, Daemon, Env, TestCgroup};

/// How long the test holds a change; well under the kernel's lease-break time.
const HELD: Duration = Duration::from_secs(2);
/// A read answered from the snapshot takes milliseconds; this leaves room for a loaded machine
/// and is still far below what waiting for the held change would take.
const PROMPT: Duration = Duration::from_millis(1500);

/// A read lease on a file, given up when dropped: while held, whoever opens the file for
/// writing waits in the kernel.
struct Lease(#[allow(dead_code)] File);

impl Lease {
    fn take(path: &Path) -> Lease {
        // The kernel tells the holder to give the lease up with SIGIO, whose default action would
        // end the test process: ignored, the lease is held until dropped.
        // SAFETY: setting a signal's disposition to SIG_IGN.
        unsafe { libc::signal(libc::SIGIO, libc::SIG_IGN) };
        let file = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        // SAFETY: fcntl on a descriptor we own.
        let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLEASE, libc::F_RDLCK) };
        assert_eq!(
            r,
            0,
            "F_SETLEASE on {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        Lease(file)
    }
}

/// `kad set --cgroup CG --idle IDLE`, started and left running.
struct PendingSet(Child);

impl PendingSet {
    fn start(env: &Env, daemon: &Daemon, cg: &TestCgroup, idle: &str) -> PendingSet {
        let child = Command::new(&env.kad)
            .args(["set", "--cgroup", &cg.relative(), "--idle", idle])
            .env("KAD_SOCKET", &daemon.socket)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kad set");
        PendingSet(child)
    }

    fn pending(&mut self) -> bool {
        self.0.try_wait().expect("wait for kad set").is_none()
    }

    /// Waits (up to 20 s) for it to finish; returns whether it succeeded, and its stderr.
    fn finish(&mut self) -> (bool, String) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.pending() {
            assert!(Instant::now() < deadline, "kad set never finished");
            sleep(Duration::from_millis(20));
        }
        let mut err = String::new();
        if let Some(stderr) = self.0.stderr.as_mut() {
            let _ = stderr.read_to_string(&mut err);
        }
        (self.0.wait().expect("wait").success(), err)
    }
}

impl Drop for PendingSet {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until the daemon's open of the journal is stuck behind the lease: the change has not
/// been answered for a while.
fn assert_held(set: &mut PendingSet) {
    // Long enough for `kad set` to start and send its request, also under emulation.
    let emulated = std::env::var_os("KAD_KERNEL_MATRIX").is_some();
    sleep(Duration::from_millis(if emulated { 2000 } else { 500 }));
    assert!(
        set.pending(),
        "kad set was answered although the journal was leased: nothing held it"
    );
}

fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let began = Instant::now();
    let value = f();
    let took = began.elapsed();
    eprintln!("{what} while a change is held: {took:?}");
    assert!(
        took < PROMPT,
        "{what} took {took:?} while a change was held: it waited for it"
    );
    value
}

fn cgroups(list: &serde_json::Value) -> Vec<String> {
    list.as_array()
        .expect("list is an array")
        .iter()
        .map(|e| e["cgroup"].as_str().expect("cgroup").to_string())
        .collect()
}

/// A connection from `cg` has kad's keepalive with `idle`.
fn assert_in_force(env: &Env, cg: &TestCgroup, idle: i64) {
    let (server, _) = connect(env, Some(&cg.path), None, false);
    assert!(
        server.keepalive && server.idle == idle,
        "policy not in force in {}: {server:?}",
        cg.path.display()
    );
}

#[test]
fn reads_are_answered_while_a_change_waits_for_the_disk() {
    let env = kad_env!();
    let addr = free_port();
    let daemon = Daemon::start_with(&env, &["--metrics", &addr]);
    let first = TestCgroup::new(&env, "read-first");
    let held = TestCgroup::new(&env, "read-held");
    daemon.kad_ok(&["set", "--cgroup", &first.relative(), "--idle", "100"]);
    let lease = Lease::take(&daemon.state_dir.join("policies.journal"));
    let mut set = PendingSet::start(&env, &daemon, &held, "77");
    assert_held(&mut set);

    let list = timed("kad list", || daemon.list());
    // The snapshot is the state before the held change.
    assert_eq!(cgroups(&list), vec![first.path.display().to_string()]);
    let status = timed("kad status", || daemon.kad_ok(&["status", "--json"]));
    let status: serde_json::Value = serde_json::from_str(&status).expect("status --json");
    assert_eq!(
        status["policies"].as_array().map(Vec::len),
        Some(1),
        "{status}"
    );
    timed("kad stats", || daemon.kad_ok(&["stats"]));
    let metrics = timed("/metrics", || scrape(&addr));
    assert!(
        metrics.starts_with("HTTP/1.1 200") && metrics.contains("\nkad_policies 1\n"),
        "{metrics}"
    );
    assert!(set.pending(), "the change was not held while reading");

    sleep(HELD.saturating_sub(Duration::from_millis(500)));
    drop(lease);
    let (ok, err) = set.finish();
    assert!(ok, "kad set failed once the journal was free: {err}");
    assert_eq!(
        cgroups(&daemon.list()),
        vec![
            first.path.display().to_string(),
            held.path.display().to_string()
        ]
    );
    assert_in_force(&env, &held, 77);
    let journal = std::fs::read_to_string(daemon.state_dir.join("policies.journal")).unwrap();
    assert!(
        journal.contains(&held.path.display().to_string()),
        "the change is not in the journal: {journal}"
    );
}

/// SIGTERM while a change is held: the daemon finishes the change (its client gets its answer),
/// folds the journal into the state file and only then exits; the next start has the policy.
#[test]
fn sigterm_during_a_held_change_keeps_the_change() {
    let env = kad_env!();
    let mut daemon = Daemon::start(&env);
    let first = TestCgroup::new(&env, "term-first");
    let held = TestCgroup::new(&env, "term-held");
    daemon.kad_ok(&["set", "--cgroup", &first.relative(), "--idle", "100"]);
    let lease = Lease::take(&daemon.state_dir.join("policies.journal"));
    let mut set = PendingSet::start(&env, &daemon, &held, "78");
    assert_held(&mut set);

    daemon.signal(libc::SIGTERM);
    assert!(
        kad_tests::wait_for(Duration::from_secs(10), || daemon
            .log()
            .contains("SIGTERM: stopping")),
        "{}",
        daemon.log()
    );
    sleep(Duration::from_millis(300));
    // Stopping waits for the state thread, which waits for the journal; reads still work.
    let log = daemon.log();
    assert!(
        !log.contains("kad daemon stopped"),
        "stopped with a change held: {log}"
    );
    assert!(set.pending(), "the change was answered while held");
    timed("kad list after SIGTERM", || daemon.list());

    drop(lease);
    let (ok, err) = set.finish();
    assert!(ok, "the held change failed on SIGTERM: {err}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !daemon.log().contains("kad daemon stopped") {
        assert!(
            Instant::now() < deadline,
            "the daemon did not stop: {}",
            daemon.log()
        );
        sleep(Duration::from_millis(20));
    }
    daemon.stop();
    // A clean stop folds the journal into policies.json.
    let saved = std::fs::read_to_string(daemon.state_dir.join("policies.json")).unwrap();
    let saved: serde_json::Value = serde_json::from_str(&saved).expect("policies.json");
    let saved = cgroups(&saved);
    assert!(
        saved.contains(&held.path.display().to_string()),
        "the held change is not in policies.json: {saved:?}"
    );
    let journal = std::fs::read_to_string(daemon.state_dir.join("policies.journal")).unwrap();
    assert!(journal.is_empty(), "journal not folded: {journal}");

    daemon.restart();
    assert!(cgroups(&daemon.list()).contains(&held.path.display().to_string()));
    assert_in_force(&env, &held, 78);
}
