//! A policy holds for every connection of its cgroups, from the first to the last: connections
//! that existed before it, cgroups created after it (also at paths that did not exist), other
//! programs on the same cgroups, daemon restarts and upgrades.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use kad_tests::{
    kad_env, untouched, wait_for, Daemon, Env, NetnsPair, Pair, PairReport, Process, TestCgroup,
    Values,
};

#[test]
fn connections_opened_before_a_policy_get_it_in_every_network_namespace() {
    let env = kad_env!();
    if !kad_tests::require_kernel(5, 15, "bpf_setsockopt from iter/tcp (existing connections)") {
        return;
    }
    let mut daemon = Daemon::start(&env);
    let cg = TestCgroup::new(&env, "existing");
    let app = cg.child("app");
    let netns = NetnsPair::new();
    let (mut here, first) = Pair::open(&env, &app, None);
    let (mut there, first_there) = Pair::open(&env, &app, Some(&netns.a));
    let (mut six, first_six) = Pair::open_at(&env, &app, None, "[::1]:0");
    for r in [first, first_there, first_six] {
        assert_eq!(r.client.values(), untouched());
        assert_eq!(r.server.values(), untouched());
    }
    let app_rel = format!("{}/app", cg.relative());
    daemon.kad_ok(&[
        "set", "--cgroup", &app_rel, "--idle", "150", "--intvl", "15", "--cnt", "3",
    ]);
    let want = (true, 150, 15, 3);
    assert_eq!(here.now(), (want, want), "root network namespace");
    assert_eq!(there.now(), (want, want), "network namespace {}", netns.a);
    assert_eq!(six.now(), (want, want), "IPv6");
    // A change of values reaches them too.
    daemon.kad_ok(&[
        "set", "--cgroup", &app_rel, "--idle", "160", "--intvl", "16", "--cnt", "4",
    ]);
    let want = (true, 160, 16, 4);
    assert_eq!(here.now(), (want, want));
    assert_eq!(there.now(), (want, want));
    assert_eq!(six.now(), (want, want));
    let stats: serde_json::Value =
        serde_json::from_str(&daemon.kad_ok(&["stats", "--json"])).expect("stats json");
    let refreshed = stats["cgroups"][0]["refreshed"]
        .as_u64()
        .expect("refreshed");
    assert!(refreshed >= 12, "both rounds counted: {stats}");

    // A config policy that comes with `kad reload` reaches the connections of its cgroup.
    let conf = cg.child("conf");
    let (mut configured, r) = Pair::open(&env, &conf, None);
    assert_eq!(
        (r.client.values(), r.server.values()),
        (untouched(), untouched())
    );
    fs::write(
        &daemon.config,
        format!(
            "[[policy]]\ncgroup = \"{}/conf\"\nidle = 170\nintvl = 17\ncnt = 5\n",
            cg.relative()
        ),
    )
    .expect("write the config");
    daemon.kad_ok(&["reload"]);
    let conf_want = (true, 170, 17, 5);
    assert_eq!(configured.now(), (conf_want, conf_want), "after kad reload");

    // After a reboot (bpffs empty, nothing attached) the daemon's start reaches the connections
    // made while no kad ran.
    daemon.stop();
    fs::remove_dir_all(&daemon.bpffs).expect("empty the bpffs directory");
    let mut meanwhile = Vec::new();
    let detached = wait_for(Duration::from_secs(10), || {
        let (pair, r) = Pair::open(&env, &app, None);
        let (conf_pair, c) = Pair::open(&env, &conf, None);
        let clean = [r.client, r.server, c.client, c.server]
            .iter()
            .all(|side| side.values() == untouched());
        meanwhile = vec![pair, conf_pair];
        clean
    });
    assert!(detached, "the kernel released kad's programs");
    daemon.restart();
    let mut pairs = meanwhile.into_iter();
    let (Some(mut app_pair), Some(mut conf_pair)) = (pairs.next(), pairs.next()) else {
        panic!("two pairs");
    };
    assert_eq!(app_pair.now(), (want, want), "a kad set policy, at start");
    assert_eq!(
        conf_pair.now(),
        (conf_want, conf_want),
        "a config policy, at start"
    );
}

/// A listener held by one process in `cgroup`; each `accept()` makes a new connection to it.
struct Server(Process);

impl Server {
    fn open(env: &Env, cgroup: &Path, own: bool) -> Server {
        Server::open_mode(env, cgroup, if own { "serve-own" } else { "serve" })
    }

    fn open_mode(env: &Env, cgroup: &Path, mode: &str) -> Server {
        let mut c = Command::new(&env.peer);
        c.args([mode, "127.0.0.1:0"]);
        let mut server = Server(Process::spawn(c, Some(cgroup)));
        let line = server.0.line();
        assert!(line.starts_with("LISTENING "), "{line}");
        server
    }

    /// The (keepalive, idle, intvl, cnt) of a connection accepted now.
    fn accept(&mut self) -> Values {
        self.0.write(b"\n");
        let line = self.0.line();
        let r: PairReport =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad report {line:?}: {e}"));
        r.server.values()
    }
}

#[test]
fn a_listener_goes_back_to_its_own_options_when_its_policy_goes() {
    let env = kad_env!();
    if !kad_tests::require_kernel(5, 15, "bpf_setsockopt from iter/tcp (existing connections)") {
        return;
    }
    let daemon = Daemon::start(&env);
    let cg = TestCgroup::new(&env, "listeners");
    let early = cg.child("early");
    let late = cg.child("late");
    // Listening before the policy, with nothing of its own.
    let mut before = Server::open(&env, &early, false);
    assert_eq!(before.accept(), untouched());
    daemon.kad_ok(&[
        "set",
        "--cgroup",
        &cg.relative(),
        "--idle",
        "150",
        "--intvl",
        "15",
        "--cnt",
        "3",
    ]);
    let want = (true, 150, 15, 3);
    assert_eq!(before.accept(), want, "listener from before the policy");
    // Listening under the policy; the program turns keepalive on with its own idle time
    // (after listen(2), so after kad changed the listener).
    let mut after = Server::open(&env, &late, true);
    assert_eq!(after.accept(), want, "kad's values at establishment");

    // An opt-out below the policy: the first listener is as it was before the policy, so
    // what it accepts from now on is too.
    let early_rel = format!("{}/early", cg.relative());
    daemon.kad_ok(&["set", "--cgroup", &early_rel, "--off"]);
    assert_eq!(before.accept(), untouched(), "after --off");
    assert_eq!(after.accept(), want, "the neighbour keeps the policy");

    // No policy at all: the second listener keeps what its program set (keepalive on, idle
    // 77) and the kernel defaults for what it did not (intvl, cnt).
    daemon.kad_ok(&["unset", "--cgroup", &cg.relative()]);
    let (_, _, intvl, cnt) = untouched();
    assert_eq!(after.accept(), (true, 77, intvl, cnt), "after unset");
    // A policy again reaches both (the opt-out still holds for the first).
    daemon.kad_ok(&["set", "--cgroup", &cg.relative(), "--idle", "170"]);
    assert_eq!(after.accept().1, 170);
    assert_eq!(before.accept(), untouched(), "opt-out");
    daemon.kad_ok(&["unset", "--cgroup", &early_rel]);
    assert_eq!(before.accept().1, 170, "the opt-out removed");
}

/// Without a connection to teach the programs anything, and with the daemon restarted in
/// between: the listener's own idle time (77, in the kernel's jiffies) comes back as 77.
#[test]
fn a_listener_goes_back_without_a_connection_and_across_a_restart() {
    let env = kad_env!();
    if !kad_tests::require_kernel(5, 15, "bpf_setsockopt from iter/tcp (existing connections)") {
        return;
    }
    let mut daemon = Daemon::start(&env);
    let cg = TestCgroup::new(&env, "listenback");
    let mut server = Server::open(&env, &cg.child("srv"), true);
    daemon.kad_ok(&["set", "--cgroup", &cg.relative(), "--idle", "150"]);
    daemon.stop();
    daemon.restart();
    daemon.kad_ok(&["unset", "--cgroup", &cg.relative()]);
    let (_, _, intvl, cnt) = untouched();
    assert_eq!(server.accept(), (true, 77, intvl, cnt));
}

/// Under `--enforce` a server's own options set before listen(2) are rewritten, so the
/// listener holds the policy from the start; they still come back when the policy goes.
#[test]
fn under_enforce_a_listener_gets_back_what_its_program_set_before_listening() {
    let env = kad_env!();
    if !kad_tests::require_kernel(6, 1, "cgroup/setsockopt with the caller's cgroup ancestry") {
        return;
    }
    let daemon = Daemon::start(&env);
    let cg = TestCgroup::new(&env, "enforceback");
    daemon.kad_ok(&[
        "set",
        "--cgroup",
        &cg.relative(),
        "--idle",
        "150",
        "--enforce",
    ]);
    let mut server = Server::open_mode(&env, &cg.child("srv"), "serve-early");
    let (on, idle, _, _) = server.accept();
    assert_eq!((on, idle), (true, 150), "enforced");
    daemon.kad_ok(&["unset", "--cgroup", &cg.relative()]);
    let (_, _, intvl, cnt) = untouched();
    assert_eq!(
        server.accept(),
        (false, 66, intvl, cnt),
        "the program's own"
    );
}

#[test]
fn a_cgroup_created_and_used_at_once_has_the_policy_every_time() {
    let env = kad_env!();
    let daemon = Daemon::start(&env);
    let cg = TestCgroup::new(&env, "recreate");
    let svc = cg.path.join("svc");
    // Set before the cgroup exists: accepted, and listed as waiting.
    daemon.kad_ok(&[
        "set",
        "--cgroup",
        &format!("{}/svc", cg.relative()),
        "--idle",
        "222",
    ]);
    let status = daemon.kad_ok(&["status"]);
    assert!(
        status.contains("waiting for the cgroup to exist"),
        "{status}"
    );
    assert_eq!(daemon.list()[0]["waiting"], true);
    let table = daemon.kad_ok(&["list"]);
    assert!(
        table.contains("(waiting for the cgroup to exist)"),
        "{table}"
    );
    for round in 0..10 {
        fs::create_dir(&svc).expect("mkdir svc");
        // The first connection, right after the mkdir.
        let (_pair, r) = Pair::open(&env, &svc, None);
        assert!(r.client.keepalive && r.server.keepalive, "round {round}");
        assert_eq!(r.client.idle, 222, "round {round}: client");
        assert_eq!(r.server.idle, 222, "round {round}: server");
        if round == 0 {
            // Listed as waiting no more once the daemon has seen the cgroup (inotify).
            let seen = wait_for(Duration::from_secs(10), || {
                daemon.list()[0].get("waiting").is_none()
            });
            assert!(seen, "{}", daemon.list());
        }
        drop(_pair);
        kad_tests::remove_cgroup_tree(&svc);
    }
    // Deeper: two levels that do not exist yet.
    daemon.kad_ok(&[
        "set",
        "--cgroup",
        &format!("{}/later/deep", cg.relative()),
        "--idle",
        "333",
    ]);
    let deep = cg.child("later/deep");
    let (_pair, r) = Pair::open(&env, &deep, None);
    assert_eq!((r.client.idle, r.server.idle), (333, 333));
}

/// (connect, accept) counted for `cgroup` by `kad stats`; None without a row (no cgroup).
fn sides(daemon: &Daemon, cgroup: &Path) -> Option<(u64, u64)> {
    let stats: serde_json::Value =
        serde_json::from_str(&daemon.kad_ok(&["stats", "--json"])).expect("stats json");
    let row = stats["cgroups"]
        .as_array()
        .expect("stats rows")
        .iter()
        .find(|r| r["cgroup"] == *cgroup.to_string_lossy())?
        .clone();
    Some((
        row["connect"].as_u64().expect("connect"),
        row["accept"].as_u64().expect("accept"),
    ))
}

#[test]
fn counters_belong_to_the_policy_path_across_re_creation_and_restarts() {
    let env = kad_env!();
    let mut daemon = Daemon::start(&env);
    let cg = TestCgroup::new(&env, "counted");
    let svc = cg.path.join("svc");
    let rel = format!("{}/svc", cg.relative());
    daemon.kad_ok(&["set", "--cgroup", &rel, "--idle", "222"]);
    for round in 0..3 {
        fs::create_dir(&svc).expect("mkdir svc");
        let (pair, r) = Pair::open(&env, &svc, None);
        assert_eq!((r.client.idle, r.server.idle), (222, 222), "round {round}");
        // The daemon shows the row once it has seen the new cgroup (inotify).
        let want = Some((round + 1, round + 1));
        wait_for(Duration::from_secs(5), || sides(&daemon, &svc) == want);
        assert_eq!(sides(&daemon, &svc), want, "round {round}");
        drop(pair);
        kad_tests::remove_cgroup_tree(&svc);
    }
    // Gone with its cgroup from `kad stats`, back with the next one, still counting.
    assert!(
        wait_for(Duration::from_secs(5), || sides(&daemon, &svc).is_none()),
        "a row for a removed cgroup"
    );
    fs::create_dir(&svc).expect("mkdir svc");
    assert!(
        wait_for(Duration::from_secs(5), || sides(&daemon, &svc).is_some()),
        "no row for the re-created cgroup"
    );
    assert_eq!(sides(&daemon, &svc), Some((3, 3)));
    daemon.stop();
    daemon.restart();
    assert_eq!(sides(&daemon, &svc), Some((3, 3)), "kept across a restart");
    // A new policy on the path starts from zero.
    daemon.kad_ok(&["unset", "--cgroup", &rel]);
    daemon.kad_ok(&["set", "--cgroup", &rel, "--idle", "223"]);
    assert_eq!(sides(&daemon, &svc), Some((0, 0)));
    let (_pair, r) = Pair::open(&env, &svc, None);
    assert_eq!((r.client.idle, r.server.idle), (223, 223));
    assert_eq!(sides(&daemon, &svc), Some((1, 1)));
}

#[test]
fn an_accepted_socket_gets_the_policy_its_listener_no_longer_holds() {
    let env = kad_env!();
    let daemon = Daemon::start(&env);
    let cg = TestCgroup::new(&env, "lost");
    daemon.kad_ok(&["set", "--cgroup", &cg.relative(), "--idle", "140"]);
    // The program sets idle 7 on its listener after kad did (and it wins there); the socket
    // it accepts inherits 7, which is not the policy: kad sets it at establishment.
    let mut command = Command::new(&env.peer);
    command.args(["listen-own-listener", "127.0.0.1:0"]);
    let mut server = Process::spawn(command, Some(&cg.path));
    let line = server.line();
    let port = line.trim_start_matches("LISTENING ");
    let mut command = Command::new(&env.peer);
    command.args(["connect", &format!("127.0.0.1:{port}")]);
    let mut client = Process::spawn(command, None);
    client.report();
    let report = server.report();
    assert_eq!((report.keepalive, report.idle), (true, 140), "{report:?}");
    // And one whose listener holds the policy inherits it, counted like any other.
    let (server, _) = kad_tests::connect(&env, Some(&cg.path), None, false);
    assert_eq!((server.keepalive, server.idle), (true, 140));
    assert_eq!(sides(&daemon, &cg.path), Some((0, 2)));
}

#[test]
fn a_deep_cgroup_follows_every_change_of_the_policies_above_it() {
    let env = kad_env!();
    let daemon = Daemon::start(&env);
    let cg = TestCgroup::new(&env, "deep");
    let deep = cg.child("a/b/c/d/e/f");
    let at = |rel: &str| format!("{}/{rel}", cg.relative());
    // Both ends 7 levels below the cgroup deciding for them: (keepalive, idle) of each.
    let now = || {
        let (server, client) = kad_tests::connect(&env, Some(&deep), Some(&deep), false);
        (
            (server.keepalive, server.idle),
            (client.keepalive, client.idle),
        )
    };
    let off = now().0;
    assert!(!off.0, "no policy yet: {off:?}");
    daemon.kad_ok(&["set", "--cgroup", &cg.relative(), "--idle", "100"]);
    // Twice each time: the second connection may use what the first one's lookup remembered.
    for _ in 0..2 {
        assert_eq!(now(), ((true, 100), (true, 100)), "the top policy");
    }
    daemon.kad_ok(&["set", "--cgroup", &at("a/b/c"), "--idle", "150"]);
    for _ in 0..2 {
        assert_eq!(now(), ((true, 150), (true, 150)), "a nearer policy set");
    }
    daemon.kad_ok(&["set", "--cgroup", &at("a/b/c"), "--idle", "160"]);
    assert_eq!(now(), ((true, 160), (true, 160)), "its values changed");
    daemon.kad_ok(&["set", "--cgroup", &at("a/b/c/d/e"), "--off"]);
    for _ in 0..2 {
        assert_eq!(now(), (off, off), "an opt-out nearer still");
    }
    daemon.kad_ok(&["unset", "--cgroup", &at("a/b/c/d/e")]);
    daemon.kad_ok(&["unset", "--cgroup", &at("a/b/c")]);
    for _ in 0..2 {
        assert_eq!(now(), ((true, 100), (true, 100)), "back to the top policy");
    }
    daemon.kad_ok(&["unset", "--cgroup", &cg.relative()]);
    for _ in 0..2 {
        assert_eq!(now(), (off, off), "no policy left");
    }
    daemon.kad_ok(&["set", "--cgroup", &at("a"), "--idle", "170"]);
    assert_eq!(
        now(),
        ((true, 170), (true, 170)),
        "a policy again, where none was"
    );
}

#[test]
fn a_config_policy_removed_while_no_daemon_ran_does_not_come_back_with_its_cgroup() {
    let env = kad_env!();
    let mut daemon = Daemon::start(&env);
    let cg = TestCgroup::new(&env, "config-gone");
    let svc = cg.path.join("svc");
    daemon.stop();
    fs::write(
        &daemon.config,
        format!("[[policy]]\ncgroup = \"{}\"\nidle = 111\n", svc.display()),
    )
    .expect("write the config");
    daemon.restart();
    assert_eq!(daemon.list().as_array().map(Vec::len), Some(1));
    assert_eq!(
        kad_tests::kad_attachments(&cg.path),
        1,
        "anchored for the waiting path"
    );
    // Removed from the file while no daemon runs: the next one has no policy for the path.
    daemon.stop();
    fs::write(&daemon.config, "").expect("empty the config");
    daemon.restart();
    assert_eq!(daemon.list().as_array().map(Vec::len), Some(0));
    fs::create_dir(&svc).expect("mkdir svc");
    let (server, client) = kad_tests::connect(&env, Some(&svc), Some(&svc), false);
    assert_eq!(
        (server.keepalive, client.keepalive),
        (false, false),
        "the removed policy came back with its cgroup"
    );
    assert!(
        wait_for(Duration::from_secs(5), || kad_tests::kad_attachments(
            &cg.path
        ) == 0),
        "kad's programs are still attached where no policy needs them"
    );
}

#[test]
fn paths_the_policy_cannot_name_are_refused() {
    let env = kad_env!();
    let daemon = Daemon::start(&env);
    for bad in ["/tmp/kad-not-a-cgroup/x", "/", "a/../../etc"] {
        let out = daemon.kad(&["set", "--cgroup", bad, "--idle", "5"]);
        assert!(!out.status.success(), "{bad} accepted");
    }
    let out = daemon.kad(&[
        "set",
        "--cgroup",
        &env.root.display().to_string(),
        "--idle",
        "5",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing the cgroup2 root"));
    assert_eq!(daemon.list().as_array().map(Vec::len), Some(0));
}

/// A C sock_ops program of another vendor, on the same cgroup as kad's anchor, that asks for
/// state callbacks and counts in map `seen` (key 0) the callbacks whose arguments are a valid
/// TCP state transition and (key 1) those that are not.
const OTHER_VENDOR: &str = r#"
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 2); __type(key, __u32); __type(value, __u64); } seen SEC(".maps");
SEC("sockops")
int other_vendor(struct bpf_sock_ops *skops) {
    __u32 op = skops->op;
    if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB || op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB) {
        bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
    } else if (op == BPF_SOCK_OPS_STATE_CB) {
        __u32 old = skops->args[0], new = skops->args[1];
        __u32 key = (old >= 1 && old <= 12 && new >= 1 && new <= 12 && old != new) ? 0 : 1;
        __u64 *v = bpf_map_lookup_elem(&seen, &key);
        if (v) __sync_fetch_and_add(v, 1);
    }
    return 1;
}
char _license[] SEC("license") = "GPL";
"#;

/// Runs a command that must succeed; its stdout.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds a C sock_ops program with clang and loads it with bpftool, pinned at `dir/prog`
/// (its maps in `dir`).
fn load_c_sockops(source: &str, dir: &Path) {
    let src = std::env::temp_dir().join(format!(
        "{}.c",
        dir.file_name().expect("name").to_string_lossy()
    ));
    let obj = src.with_extension("o");
    fs::write(&src, source).expect("write C source");
    // asm/types.h lives in the multiarch include directory, which -target bpf does not search.
    let multiarch = format!("-I/usr/include/{}-linux-gnu", std::env::consts::ARCH);
    run(Command::new("clang")
        .args(["-O2", "-g", "-target", "bpf", &multiarch, "-c"])
        .arg(&src)
        .arg("-o")
        .arg(&obj));
    let _ = fs::remove_file(&src);
    run(Command::new("bpftool")
        .args(["prog", "load"])
        .arg(&obj)
        .arg(dir.join("prog"))
        .args(["type", "sockops", "pinmaps"])
        .arg(dir));
    let _ = fs::remove_file(&obj);
}

/// The other vendor's program, pinned in a directory of its own, removed when dropped.
struct OtherVendor {
    dir: PathBuf,
}

impl OtherVendor {
    fn attach(cgroup: &Path) -> OtherVendor {
        let dir = PathBuf::from("/sys/fs/bpf").join(kad_tests::unique("vendor"));
        fs::create_dir(&dir).expect("mkdir vendor pin dir");
        let vendor = OtherVendor { dir };
        load_c_sockops(OTHER_VENDOR, &vendor.dir);
        run(Command::new("bpftool")
            .args(["cgroup", "attach"])
            .arg(cgroup)
            .args(["sock_ops", "pinned"])
            .arg(vendor.dir.join("prog"))
            .arg("multi"));
        vendor
    }

    /// (valid, corrupted) state callbacks seen.
    fn seen(&self) -> (u64, u64) {
        let out = Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(self.dir.join("seen"))
            .output()
            .expect("bpftool map dump");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("map json");
        let value = |k: usize| {
            let bytes = v[k]["value"].as_array().cloned().unwrap_or_default();
            bytes.iter().rev().fold(0u64, |acc, b| {
                let byte = b
                    .as_str()
                    .and_then(|s| u8::from_str_radix(s.trim_start_matches("0x"), 16).ok())
                    .or_else(|| b.as_u64().map(|n| n as u8))
                    .unwrap_or(0);
                (acc << 8) | u64::from(byte)
            })
        };
        (value(0), value(1))
    }
}

impl Drop for OtherVendor {
    fn drop(&mut self) {
        // The cgroup's removal detaches the program; the pins go here.
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn another_vendors_sock_ops_program_sees_true_arguments_and_changes_nothing() {
    let env = kad_env!();
    let daemon = Daemon::start(&env);
    let cg = TestCgroup::new(&env, "vendor");
    let app = cg.child("app");
    daemon.kad_ok(&[
        "set",
        "--cgroup",
        &format!("{}/app", cg.relative()),
        "--idle",
        "140",
        "--cnt",
        "6",
    ]);
    // Attached after kad, on the parent: wherever kad's anchor is (app or cg), this program runs
    // after kad's for each callback (a descendant's programs first, then in attach order), so
    // anything kad wrote into `args` or `reply` would be what it reads.
    let vendor = OtherVendor::attach(&cg.path);
    let anchors: serde_json::Value =
        serde_json::from_str(&daemon.kad_ok(&["status", "--json"])).unwrap();
    assert!(
        anchors["anchors"].as_array().is_some_and(|a| a
            .iter()
            .any(|x| x["cgroup"] == app.display().to_string()
                || x["cgroup"] == cg.path.display().to_string())),
        "kad anchored at app or cg: {anchors}"
    );
    for ipv6 in [false, true] {
        let (server, client) = kad_tests::connect(&env, Some(&app), Some(&app), ipv6);
        assert_eq!((server.keepalive, server.idle, server.cnt), (true, 140, 6));
        assert_eq!((client.keepalive, client.idle, client.cnt), (true, 140, 6));
    }
    // The connections closed: every state callback carried a real transition.
    assert!(
        wait_for(Duration::from_secs(5), || vendor.seen().0 >= 8),
        "state callbacks seen: {:?}",
        vendor.seen()
    );
    assert_eq!(vendor.seen().1, 0, "callbacks with corrupted arguments");
}

#[test]
fn nesting_holds_after_a_restart_with_the_bpffs_path_spelled_differently() {
    let env = kad_env!();
    let mut daemon = Daemon::start(&env);
    let cg = TestCgroup::new(&env, "spelling");
    let child = cg.child("child");
    daemon.kad_ok(&["set", "--cgroup", &cg.relative(), "--idle", "100"]);
    daemon.kad_ok(&[
        "set",
        "--cgroup",
        &format!("{}/child", cg.relative()),
        "--idle",
        "200",
    ]);
    daemon.stop();
    daemon.bpffs = PathBuf::from(format!("{}/", daemon.bpffs.display()));
    daemon.restart();
    let (server, client) = kad_tests::connect(&env, Some(&child), Some(&child), false);
    assert_eq!((server.idle, client.idle), (200, 200));
    let (server, client) = kad_tests::connect(&env, Some(&cg.path), Some(&cg.path), false);
    assert_eq!((server.idle, client.idle), (100, 100));
}

/// The program id behind a pinned link, from bpftool.
fn link_prog_id(pin: &Path) -> u64 {
    let out = Command::new("bpftool")
        .args(["-j", "link", "show", "pinned"])
        .arg(pin)
        .output()
        .expect("bpftool link show");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bpftool link show {}: {e}", pin.display()));
    v["prog_id"].as_u64().expect("prog_id")
}

/// What an older kad's sock_ops program did for the upgrade test's policy (idle 177 below its
/// anchor): the same decision, by other instructions, so another program tag.
const OLDER_KAD: &str = r#"
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
SEC("sockops")
int older_kad(struct bpf_sock_ops *skops) {
    __u32 op = skops->op;
    if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB || op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB ||
        op == BPF_SOCK_OPS_TCP_LISTEN_CB) {
        int idle = 177, on = 1;
        bpf_setsockopt(skops, 6 /* IPPROTO_TCP */, 4 /* TCP_KEEPIDLE */, &idle, sizeof(idle));
        bpf_setsockopt(skops, 1 /* SOL_SOCKET */, 9 /* SO_KEEPALIVE */, &on, sizeof(on));
    }
    return 1;
}
char _license[] SEC("license") = "GPL";
"#;

/// A program pinned in a directory of its own, removed when dropped.
struct PinnedProgram {
    dir: PathBuf,
}

impl PinnedProgram {
    /// `OLDER_KAD`, loaded and pinned in a new directory named after `name`.
    fn older_kad(name: &str) -> PinnedProgram {
        let older = PinnedProgram {
            dir: PathBuf::from("/sys/fs/bpf").join(kad_tests::unique(name)),
        };
        fs::create_dir(&older.dir).expect("mkdir the older program's pin dir");
        load_c_sockops(OLDER_KAD, &older.dir);
        older
    }

    fn prog(&self) -> PathBuf {
        self.dir.join("prog")
    }
}

impl Drop for PinnedProgram {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A daemon with the upgrade tests' policy (idle 177) on `CG/app` of a new test cgroup.
fn upgrade_setup(env: &Env, name: &str) -> (Daemon, TestCgroup, PathBuf) {
    let daemon = Daemon::start(env);
    let cg = TestCgroup::new(env, name);
    let app = cg.child("app");
    daemon.kad_ok(&[
        "set",
        "--cgroup",
        &format!("{}/app", cg.relative()),
        "--idle",
        "177",
    ]);
    (daemon, cg, app)
}

/// A process in `app` connecting in a loop and checking each connection for idle 177.
struct Checker(Process);

impl Checker {
    fn start(env: &Env, app: &Path) -> Checker {
        let mut command = Command::new(&env.peer);
        command.args(["check", "177"]);
        let checker = Checker(Process::spawn(command, Some(app)));
        std::thread::sleep(Duration::from_millis(300));
        checker
    }

    /// Stops it; asserts that it connected throughout and that no socket missed the policy.
    fn finish(mut self) {
        self.0.close_stdin();
        let line = self.0.line();
        let counts: Vec<u64> = line
            .split_whitespace()
            .filter_map(|n| n.parse().ok())
            .collect();
        assert_eq!(counts.len(), 2, "checker said {line:?}");
        assert!(
            counts[0] > 10,
            "connections made across the upgrade: {line}"
        );
        assert_eq!(
            counts[1], 0,
            "sockets without the policy across the upgrade: {line}"
        );
    }
}

/// The id and tag of a loaded program, from bpftool (None once it is unloaded).
fn prog_show(args: &[&str]) -> Option<(u64, String)> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .args(args)
        .output()
        .expect("bpftool prog show");
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool json");
    Some((v["id"].as_u64()?, v["tag"].as_str()?.to_string()))
}

/// The first design of kad pinned one link per policy cgroup under `links/`, attached to the
/// cgroup itself, and maps named `KAD_POLICIES`, `KAD_STATS`, `KAD_SOCK`, `KAD_COUNTERS`. A daemon
/// of this design retires them once its own anchors are in place: no connection misses the
/// policy meanwhile, and nothing of the old layout is left attached or pinned.
#[test]
fn the_first_design_s_links_are_retired_without_a_gap() {
    let env = kad_env!();
    let (mut daemon, cg, app) = upgrade_setup(&env, "legacy");
    daemon.stop();
    let older = PinnedProgram::older_kad("legacy");
    let links = daemon.bpffs.join("links");
    fs::create_dir(&links).expect("mkdir links");
    let legacy_link = links.join(kad_tests::cgroup_id(&app).to_string());
    kad_tests::link_cgroup(
        &app,
        kad_tests::ATTACH_SOCK_OPS,
        &older.prog(),
        &legacy_link,
    );
    let legacy_map = daemon.bpffs.join("KAD_POLICIES");
    run(Command::new("bpftool")
        .args(["map", "create"])
        .arg(&legacy_map)
        .args([
            "type",
            "hash",
            "key",
            "8",
            "value",
            "8",
            "entries",
            "1",
            "name",
            "KAD_POLICIES",
        ]));
    assert!(
        kad_tests::cgroup_programs(&app, kad_tests::ATTACH_SOCK_OPS).contains(&"older_kad".into()),
        "the legacy link is attached"
    );

    // A daemon of the first design left no anchors: until the new daemon's are in place, only
    // the legacy link gives the policy.
    fs::remove_dir_all(daemon.bpffs.join("anchors")).expect("remove this design's anchors");
    assert!(
        wait_for(Duration::from_secs(10), || kad_tests::kad_attachments(
            &cg.path
        ) == 0
            && kad_tests::kad_attachments(&app) == 0),
        "the anchors' links released"
    );
    let checker = Checker::start(&env, &app);
    daemon.restart();
    assert!(
        wait_for(Duration::from_secs(10), || !kad_tests::cgroup_programs(
            &app,
            kad_tests::ATTACH_SOCK_OPS
        )
        .contains(&"older_kad".into())),
        "the legacy link is detached"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(!links.exists(), "links/ removed");
    assert!(!legacy_map.exists(), "the legacy map's pin removed");
    let log = daemon.log();
    assert!(log.contains("replaced the links of an older kad"), "{log}");
    checker.finish();
    let (server, client) = kad_tests::connect(&env, Some(&app), Some(&app), false);
    assert_eq!((server.idle, client.idle), (177, 177));
}

#[test]
fn a_new_daemon_replaces_the_program_behind_its_links_without_a_gap() {
    let env = kad_env!();
    let (mut daemon, cg, app) = upgrade_setup(&env, "upgrade");
    let anchor = kad_tests::cgroup_id(&cg.path);
    let pin = daemon.bpffs.join(format!("anchors/{anchor}/sock_ops"));
    let first = link_prog_id(&pin);
    daemon.stop();
    // The links now run what an older kad left behind: another program that decides alike.
    let older = PinnedProgram::older_kad("older");
    let prog = older.prog();
    let (older_id, older_tag) =
        prog_show(&["pinned", prog.to_str().expect("utf-8")]).expect("older program loaded");
    kad_tests::update_link(&pin, &prog);
    assert_eq!(
        link_prog_id(&pin),
        older_id,
        "the link runs the older program"
    );
    assert!(
        prog_show(&["id", &first.to_string()]).is_none(),
        "the first daemon's program {first} is unloaded once its link let go of it"
    );

    let checker = Checker::start(&env, &app);
    daemon.restart();
    std::thread::sleep(Duration::from_millis(300));
    let after = link_prog_id(&pin);
    assert_ne!(after, older_id, "the link runs the new daemon's program");
    let status: serde_json::Value =
        serde_json::from_str(&daemon.kad_ok(&["status", "--json"])).expect("status json");
    let program = status["program"].as_str().expect("program tag").to_string();
    assert_ne!(program, older_tag, "the older program's tag differs");
    assert_eq!(
        status["anchors"][0]["program"].as_str(),
        Some(program.as_str()),
        "status shows the new program in force at the anchor: {status}"
    );
    assert_eq!(
        prog_show(&["id", &after.to_string()]).map(|(_, tag)| tag),
        Some(program)
    );
    // Nothing but its own pin holds the older program any more.
    drop(older);
    assert!(
        wait_for(Duration::from_secs(5), || prog_show(&[
            "id",
            &older_id.to_string()
        ])
        .is_none()),
        "older program {older_id} still loaded"
    );
    checker.finish();
}

#[test]
fn a_start_without_enough_file_descriptors_fails_and_removes_nothing() {
    let env = kad_env!();
    let mut daemon = Daemon::start(&env);
    let cgroups: Vec<TestCgroup> = (0..3)
        .map(|i| TestCgroup::new(&env, &format!("fds{i}")))
        .collect();
    for (i, cg) in cgroups.iter().enumerate() {
        daemon.kad_ok(&[
            "set",
            "--cgroup",
            &cg.relative(),
            "--idle",
            &format!("{}", 150 + i),
        ]);
    }
    let pins = daemon.pinned_links();
    assert_eq!(pins.len(), 3);
    daemon.stop();
    let command = kad_tests::daemon_command(
        &env.kad,
        &daemon.socket,
        &daemon.state_dir,
        &daemon.bpffs,
        &daemon.config,
    );
    let out = Command::new("prlimit")
        .arg("--nofile=16:16")
        .arg("--")
        .arg(command.get_program())
        .args(command.get_args())
        .output()
        .expect("run prlimit");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started with 16 descriptors: {err}");
    assert!(
        err.contains("os error 24") || err.contains("Too many open files"),
        "{err}"
    );
    // Nothing was removed: the pins hold, and so does enforcement.
    assert_eq!(daemon.pinned_links(), pins);
    assert!(daemon.bpffs.join("KAD_POLICY").exists());
    for (i, cg) in cgroups.iter().enumerate() {
        let (server, client) = kad_tests::connect(&env, Some(&cg.path), Some(&cg.path), false);
        assert_eq!((server.idle, client.idle), (150 + i as i64, 150 + i as i64));
    }
    daemon.restart();
    assert_eq!(daemon.list().as_array().map(Vec::len), Some(3));
    assert_eq!(daemon.pinned_links(), pins);
}

#[test]
fn a_policy_map_removed_by_hand_is_refused_not_reported_done() {
    let env = kad_env!();
    let mut daemon = Daemon::start(&env);
    let cg = TestCgroup::new(&env, "gone-map");
    daemon.kad_ok(&["set", "--cgroup", &cg.relative(), "--idle", "161"]);
    fs::remove_file(daemon.bpffs.join("KAD_POLICY")).expect("remove the pinned map");
    let out = daemon.kad(&["set", "--cgroup", &cg.relative(), "--idle", "162"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "kad set reported done: {err}");
    assert!(
        err.contains("KAD_POLICY is gone") && err.contains("restart"),
        "{err}"
    );
    // The kernel still holds what was last reported done.
    let (server, client) = kad_tests::connect(&env, Some(&cg.path), Some(&cg.path), false);
    assert_eq!((server.idle, client.idle), (161, 161));
    assert_eq!(daemon.list()[0]["idle"], 161);

    // A restart rebuilds the map, and the links made before it take its values: the policy
    // can be changed again, and new ones apply.
    daemon.stop();
    daemon.restart();
    assert!(daemon.bpffs.join("KAD_POLICY").exists(), "rebuilt");
    let (server, client) = kad_tests::connect(&env, Some(&cg.path), Some(&cg.path), false);
    assert_eq!(
        (server.idle, client.idle),
        (161, 161),
        "in force across the restart"
    );
    daemon.kad_ok(&["set", "--cgroup", &cg.relative(), "--idle", "163"]);
    let (server, client) = kad_tests::connect(&env, Some(&cg.path), Some(&cg.path), false);
    assert_eq!(
        (server.idle, client.idle),
        (163, 163),
        "changed after the restart"
    );
    let child = cg.child("svc");
    daemon.kad_ok(&["set", "--cgroup", child.to_str().unwrap(), "--off"]);
    let (server, client) = kad_tests::connect(&env, Some(&child), Some(&child), false);
    assert_eq!(
        (server.keepalive, client.keepalive),
        (false, false),
        "a new policy"
    );
}

#[test]
fn pinned_policies_missing_from_the_state_file_are_adopted_not_dropped() {
    let env = kad_env!();
    let mut daemon = Daemon::start(&env);
    let cg = TestCgroup::new(&env, "adopt");
    let child = cg.child("svc");
    daemon.kad_ok(&[
        "set",
        "--cgroup",
        &format!("{}/svc", cg.relative()),
        "--idle",
        "171",
    ]);
    daemon.stop();
    // The state directory is lost (or --state-dir is wrong): only the pins know the policy.
    fs::remove_dir_all(&daemon.state_dir).expect("remove the state directory");
    daemon.restart();
    assert_eq!(daemon.list()[0]["idle"], 171, "adopted from the pinned map");
    assert!(
        daemon.log().contains("missing from the state file"),
        "{}",
        daemon.log()
    );
    let (server, client) = kad_tests::connect(&env, Some(&child), Some(&child), false);
    assert_eq!((server.idle, client.idle), (171, 171));
    // And saved again.
    let saved = kad_tests::saved_table(&daemon.state_dir).to_string();
    assert!(saved.contains("171"), "{saved}");
}
