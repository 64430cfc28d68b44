//! What the kernel really has: real programs that set their own keepalive (a static Go
//! client and server, Debian's redis-server), what kad shows of them, `--enforce`,
//! TCP_USER_TIMEOUT and `kad audit`.
use std::{
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    process::{Command, Output, Stdio},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use kad_tests::{
    kad_env, listen, wait_for, Daemon, Env, GoPeer, NetnsPair, NobodyKad, Process, TempDir,
    TestCgroup,
};
use serde_json::Value;

/// The policy the tests give: far from Go's 15/15 and redis's 300/100/3.
const POLICY: [&str; 6] = ["--idle", "100", "--intvl", "20", "--cnt", "5"];

/// Whether this kernel runs kad's cgroup/setsockopt program as it must (it decides by the
/// calling task's cgroup ancestry). Verified on 6.1 and later; on 5.10 it does not.
fn setsockopt_hook() -> bool {
    kad_tests::require_kernel(6, 1, "cgroup/setsockopt with the caller's cgroup ancestry")
}

fn set(daemon: &Daemon, cg: &TestCgroup, extra: &[&str]) {
    let rel = cg.relative();
    let mut args = vec!["set", "--cgroup", &rel];
    args.extend(POLICY);
    args.extend(extra);
    daemon.kad_ok(&args);
}

fn json(daemon: &Daemon, args: &[&str]) -> Value {
    let out = daemon.kad_ok(args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("kad {args:?}: {e}: {out}"))
}

/// What the kernel counted as overridden for the policy cgroup `cg`.
fn overridden(daemon: &Daemon, cg: &Path) -> u64 {
    let stats = json(daemon, &["stats", "--json"]);
    stats["cgroups"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["cgroup"] == cg.to_str().unwrap()))
        .and_then(|r| r["overridden"].as_u64())
        .unwrap_or_else(|| panic!("no counters for {}: {stats}", cg.display()))
}

/// `kad inspect --json` rows of process `pid`.
fn inspect_pid(daemon: &Daemon, pid: u32) -> Vec<Value> {
    json(daemon, &["inspect", "--json", "--pid", &pid.to_string()])
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r["pid"] == pid)
        .collect()
}

fn values(row: &Value) -> (bool, i64, i64, i64) {
    (
        row["keepalive"].as_bool().expect("keepalive read"),
        row["idle"].as_i64().expect("idle read"),
        row["intvl"].as_i64().expect("intvl read"),
        row["cnt"].as_i64().expect("cnt read"),
    )
}

fn differs(row: &Value) -> Vec<String> {
    row["differs"]
        .as_array()
        .unwrap_or_else(|| panic!("differs in {row}"))
        .iter()
        .map(|v| v.as_str().unwrap_or_default().to_string())
        .collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

fn http_get(addr: &str, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect to metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read metrics");
    response
}

#[test]
fn go_programs_win_without_enforce_visibly_and_lose_with_it() {
    let env = kad_env!();
    if !setsockopt_hook() {
        return;
    }
    let go = GoPeer::build();
    let metrics = format!("127.0.0.1:{}", free_port());
    let daemon = Daemon::start_with(&env, &["--metrics", &metrics]);
    let cg = TestCgroup::new(&env, "go");
    set(&daemon, &cg, &[]);

    // Without --enforce: Go's own 15 s idle and interval replace kad's, on both ends.
    let (server, s, client, c) = go.pair(Some(&cg.path), Some(&cg.path));
    for (end, report) in [("server", s), ("client", c)] {
        assert_eq!(
            (report.keepalive, report.idle, report.intvl),
            (true, 15, 15),
            "{end}: Go's values won: {report:?}"
        );
        // Go before 1.23 leaves the count alone (the policy's 5 stays); 1.23 sets 9.
        assert!(report.cnt == 5 || report.cnt == 9, "{end}: {report:?}");
    }
    let go_sets_count = s.cnt == 9;
    assert_eq!(overridden(&daemon, &cg.path), 2, "each end counted once");

    // inspect flags both ends and names the policy in force.
    for pid in [server.id(), client.id()] {
        let rows = inspect_pid(&daemon, pid);
        assert_eq!(rows.len(), 1, "{rows:?}");
        let mut expected = vec!["idle", "intvl"];
        if go_sets_count {
            expected.push("cnt");
        }
        assert_eq!(differs(&rows[0]), expected, "{}", rows[0]);
        assert_eq!(rows[0]["policy"]["cgroup"], cg.path.to_str().unwrap());
        assert_eq!(rows[0]["policy"]["idle"], 100);
        assert_eq!(rows[0]["cgroup"], cg.path.to_str().unwrap());
    }
    let table = daemon.kad_ok(&["inspect", "--cgroup", &cg.relative()]);
    assert!(
        table.contains("15*") && table.contains("* 2 of 2 connections differ"),
        "{table}"
    );
    let status = daemon.kad_ok(&["status"]);
    assert!(
        status.contains("2 connections overridden: their program set other keepalive values"),
        "{status}"
    );
    let status = json(&daemon, &["status", "--json"]);
    assert_eq!(status["details"][0]["overridden"], 2, "{status}");
    assert_eq!(status["details"][0]["enforce"], false);
    let label = format!("cgroup=\"{}\"", cg.path.display());
    let response = http_get(&metrics, "/metrics");
    assert!(
        response.contains(&format!("kad_overridden_total{{{label}}} 2")),
        "{response}"
    );

    // --enforce: the existing connections get the policy from the refresh that follows the
    // change, and new ones keep it although Go sets its own.
    set(&daemon, &cg, &["--enforce"]);
    assert_eq!(daemon.list()[0]["enforce"], true);
    let mut last = Vec::new();
    assert!(
        wait_for(Duration::from_secs(5), || {
            last = [server.id(), client.id()]
                .iter()
                .flat_map(|pid| inspect_pid(&daemon, *pid))
                .collect();
            last.len() == 2 && last.iter().all(|r| values(r) == (true, 100, 20, 5))
        }),
        "existing connections refreshed: {last:?}"
    );
    let before = overridden(&daemon, &cg.path);
    let (server2, s2, client2, c2) = go.pair(Some(&cg.path), Some(&cg.path));
    assert_eq!(s2.values(), (true, 100, 20, 5), "server under --enforce");
    assert_eq!(c2.values(), (true, 100, 20, 5), "client under --enforce");
    // Each end's TCP_KEEPIDLE and TCP_KEEPINTVL (and count, for newer Go) were rewritten:
    // one connection each; SO_KEEPALIVE=1 is the policy's already.
    assert_eq!(overridden(&daemon, &cg.path) - before, 2);
    for pid in [server2.id(), client2.id()] {
        let rows = inspect_pid(&daemon, pid);
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert!(differs(&rows[0]).is_empty(), "{}", rows[0]);
        assert_eq!(rows[0]["policy"]["enforce"], true);
    }
    assert!(daemon
        .kad_ok(&["status"])
        .contains("connections whose program set other keepalive values, rewritten"));
}

/// Debian's redis-server on 127.0.0.1:`port` in `cgroup`, with its own directory and no
/// persistence; ready when it says so in its log.
fn redis(cgroup: &Path, dir: &TempDir) -> (Process, u16) {
    let port = free_port();
    let log = dir.0.join("redis.log");
    let mut command = Command::new("/usr/bin/redis-server");
    command
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .arg("--dir")
        .arg(&dir.0)
        .arg("--logfile")
        .arg(&log);
    let server = Process::spawn(command, Some(cgroup));
    assert!(
        wait_for(Duration::from_secs(20), || std::fs::read_to_string(&log)
            .is_ok_and(|l| l.contains("Ready to accept connections"))),
        "redis-server did not start: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    (server, port)
}

/// A client (in this test's cgroup, which has no policy) that has had its PONG: redis has
/// set up the connection, its keepalive included.
fn redis_client(port: u16) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to redis");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(b"PING\r\n").unwrap();
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply).expect("PONG");
    assert_eq!(&reply, b"+PONG\r\n");
    stream
}

/// The row of redis's side of `client`'s connection.
fn redis_row(daemon: &Daemon, redis: &Process, client: &TcpStream) -> Value {
    let remote = client.local_addr().unwrap().to_string();
    let rows = inspect_pid(daemon, redis.id());
    rows.into_iter()
        .find(|r| r["remote"] == remote.as_str())
        .unwrap_or_else(|| panic!("redis's end of {remote} not listed"))
}

#[test]
fn redis_server_wins_without_enforce_visibly_and_loses_with_it() {
    let env = kad_env!();
    if !setsockopt_hook() {
        return;
    }
    assert!(
        Path::new("/usr/bin/redis-server").is_file(),
        "redis-server is missing (cargo xtask test installs it)"
    );
    let daemon = Daemon::start(&env);
    let cg = TestCgroup::new(&env, "redis");
    set(&daemon, &cg, &[]);
    let dir = TempDir::new("redis");
    let (redis, port) = redis(&cg.path, &dir);

    // redis's `tcp-keepalive 300`: idle 300, interval 300/3, count 3, set after accept.
    let first = redis_client(port);
    let row = redis_row(&daemon, &redis, &first);
    assert_eq!(values(&row), (true, 300, 100, 3), "{row}");
    assert_eq!(differs(&row), ["idle", "intvl", "cnt"]);
    assert_eq!(row["policy"]["cgroup"], cg.path.to_str().unwrap());
    assert_eq!(overridden(&daemon, &cg.path), 1);

    set(&daemon, &cg, &["--enforce"]);
    let second = redis_client(port);
    let row = redis_row(&daemon, &redis, &second);
    assert_eq!(values(&row), (true, 100, 20, 5), "{row}");
    assert!(differs(&row).is_empty(), "{row}");
    // Its TCP_KEEPIDLE, TCP_KEEPINTVL and TCP_KEEPCNT were rewritten: one connection.
    assert_eq!(overridden(&daemon, &cg.path), 1 + 1);
    // The first connection got the policy from the refresh that followed the change.
    assert_eq!(
        values(&redis_row(&daemon, &redis, &first)),
        (true, 100, 20, 5)
    );
}

#[test]
fn a_program_that_turns_keepalive_off_keeps_it_under_enforce_and_is_told_success() {
    let env = kad_env!();
    if !setsockopt_hook() {
        return;
    }
    let daemon = Daemon::start(&env);
    let cg = TestCgroup::new(&env, "keep-off");
    let connect_off = |cg: &Path| {
        let (_server, port) = listen(&env, "127.0.0.1:0", None);
        let mut command = Command::new(&env.peer);
        command.args(["connect-off", &format!("127.0.0.1:{port}")]);
        let mut client = Process::spawn(command, Some(cg));
        client.report()
    };

    // Not enforced: the program's choice wins, and is counted.
    set(&daemon, &cg, &[]);
    let report = connect_off(&cg.path);
    assert_eq!(report.setsockopt, Some(0));
    assert_eq!((report.keepalive, report.idle), (false, 5), "{report:?}");
    assert_eq!(overridden(&daemon, &cg.path), 1);

    // Enforced: the same calls succeed, and change nothing.
    set(&daemon, &cg, &["--enforce"]);
    let report = connect_off(&cg.path);
    assert_eq!(report.setsockopt, Some(0), "the program is told success");
    assert_eq!(report.values(), (true, 100, 20, 5), "{report:?}");
    assert_eq!(
        overridden(&daemon, &cg.path),
        1 + 1,
        "both calls rewritten, one connection"
    );

    // Nesting: the most specific policy decides whether it is enforced; --off opts out.
    let off = cg.child("off");
    let loose = cg.child("loose");
    let rel = cg.relative();
    daemon.kad_ok(&["set", "--cgroup", &format!("{rel}/off"), "--off"]);
    daemon.kad_ok(&["set", "--cgroup", &format!("{rel}/loose"), "--idle", "300"]);
    for child in [&off, &loose] {
        let report = connect_off(child);
        assert_eq!(report.setsockopt, Some(0));
        assert_eq!(
            (report.keepalive, report.idle),
            (false, 5),
            "{}: the program's choice: {report:?}",
            child.display()
        );
    }
    let report = connect_off(&cg.child("enforced-below"));
    assert_eq!(
        report.values(),
        (true, 100, 20, 5),
        "the parent's enforced policy"
    );
}

#[test]
fn overrides_on_a_listener_and_on_its_connections_are_each_counted() {
    let env = kad_env!();
    if !setsockopt_hook() {
        return;
    }
    let daemon = Daemon::start(&env);
    let cg = TestCgroup::new(&env, "listener-own");
    set(&daemon, &cg, &[]);
    // The program sets its own idle on the listener after listen(2) (after kad's), then on
    // the connection it accepts: two overrides. The connection must not pass for counted
    // because its listener was.
    let mut command = Command::new(&env.peer);
    command.args(["listen-own", "127.0.0.1:0"]);
    let mut server = Process::spawn(command, Some(&cg.path));
    let line = server.line();
    let port = line.trim_start_matches("LISTENING ");
    let mut command = Command::new(&env.peer);
    command.args(["connect", &format!("127.0.0.1:{port}")]);
    let mut client = Process::spawn(command, None);
    client.report();
    let report = server.report();
    assert_eq!((report.keepalive, report.idle), (true, 8), "{report:?}");
    assert_eq!(overridden(&daemon, &cg.path), 2);
}

/// `kad exec ARGS` against `daemon`, with libkeepalive's variables cleared and `envs` set.
fn exec(env: &Env, daemon: &Daemon, envs: &[(&str, &str)], args: &[&str]) -> Output {
    let mut command = Command::new(&env.kad);
    command
        .arg("exec")
        .args(args)
        .env("KAD_SOCKET", &daemon.socket)
        .env_remove("KEEPALIVE")
        .env_remove("KEEPIDLE")
        .env_remove("KEEPINTVL")
        .env_remove("KEEPCNT")
        .env_remove("TCP_USER_TIMEOUT")
        .envs(envs.iter().copied())
        .stdin(Stdio::null());
    command.output().expect("run kad exec")
}

#[test]
fn tcp_user_timeout_reaches_both_ends_and_is_shown() {
    let env = kad_env!();
    let daemon = Daemon::start(&env);
    let cg = TestCgroup::new(&env, "user-timeout");
    daemon.kad_ok(&[
        "set",
        "--cgroup",
        &cg.relative(),
        "--idle",
        "60",
        "--user-timeout",
        "4321",
    ]);
    let list = daemon.list();
    assert_eq!(
        (list[0]["user_timeout"].clone(), list[0]["enforce"].clone()),
        (4321.into(), false.into())
    );
    assert!(daemon.kad_ok(&["list"]).contains("4321ms"));

    // Read back with getsockopt inside each process, on both ends of one connection.
    let (server, client) = kad_tests::connect(&env, Some(&cg.path), Some(&cg.path), false);
    assert_eq!((server.user_timeout, client.user_timeout), (4321, 4321));
    assert_eq!((server.idle, client.idle), (60, 60));
    // And from outside.
    let (_holder, port) = listen(&env, "127.0.0.1:0", None);
    let mut command = Command::new(&env.peer);
    command.args(["connect", &format!("127.0.0.1:{port}")]);
    let mut held = Process::spawn(command, Some(&cg.path));
    assert_eq!(held.report().user_timeout, 4321);
    let rows = inspect_pid(&daemon, held.id());
    assert_eq!(rows[0]["user_timeout"], 4321, "{rows:?}");
    assert!(differs(&rows[0]).is_empty());

    // kad exec: the flag, and libkeepalive's TCP_USER_TIMEOUT variable.
    let kad = env.kad.to_str().unwrap();
    let out = exec(
        &env,
        &daemon,
        &[],
        &["--user-timeout", "1234", "--", kad, "probe", "--json"],
    );
    let probe: Value = serde_json::from_slice(&out.stdout).expect("probe --json");
    assert_eq!(
        (probe["keepalive"].clone(), probe["user_timeout"].clone()),
        (true.into(), 1234.into())
    );
    let out = exec(
        &env,
        &daemon,
        &[("TCP_USER_TIMEOUT", "2345")],
        &["--", kad, "probe"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.ends_with("TCP_USER_TIMEOUT = 2345 ms\n"), "{text}");
    let out = exec(
        &env,
        &daemon,
        &[("TCP_USER_TIMEOUT", "2345")],
        &["--user-timeout", "99", "--", kad, "probe", "--json"],
    );
    let probe: Value = serde_json::from_slice(&out.stdout).expect("probe --json");
    assert_eq!(probe["user_timeout"], 99, "the flag wins over the variable");
}

/// Milliseconds since the epoch.
fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis()
}

/// When the Go client's read failed, from its "CLOSED <ms> <error>" line.
fn closed_at(client: &mut Process) -> (u128, String) {
    let line = client.line();
    let mut parts = line.splitn(3, ' ');
    assert_eq!(parts.next(), Some("CLOSED"), "{line}");
    let at = parts.next().and_then(|t| t.parse().ok()).expect("a time");
    (at, parts.next().unwrap_or_default().to_string())
}

#[test]
fn under_enforce_a_go_client_finds_a_dead_peer_by_the_policy_and_user_timeout_caps_cnt() {
    let env = kad_env!();
    if !setsockopt_hook() {
        return;
    }
    let go = GoPeer::build();
    let daemon = Daemon::start(&env);
    // Probes after 1 s, every 1 s: 2 unanswered probes end the connection after ~3 s.
    let by_cnt = TestCgroup::new(&env, "dead-cnt");
    // 30 probes would take 31 s; TCP_USER_TIMEOUT ends it once 2.5 s passed without answer.
    let by_timeout = TestCgroup::new(&env, "dead-uto");
    for (cg, cnt, extra) in [(&by_cnt, "2", None), (&by_timeout, "30", Some("2500"))] {
        let rel = cg.relative();
        let mut args = vec![
            "set",
            "--cgroup",
            &rel,
            "--idle",
            "1",
            "--intvl",
            "1",
            "--cnt",
            cnt,
            "--enforce",
        ];
        if let Some(ms) = extra {
            args.extend(["--user-timeout", ms]);
        }
        daemon.kad_ok(&args);
    }
    let net = NetnsPair::new();
    let mut clients = Vec::new();
    let mut servers = Vec::new();
    for cg in [&by_cnt, &by_timeout] {
        let mut server = Process::spawn(
            NetnsPair::command(&net.b, &go.bin, &["listen", "192.0.2.2:0"]),
            None,
        );
        let port = server.line().trim_start_matches("LISTENING ").to_string();
        let mut client = Process::spawn(
            NetnsPair::command(&net.a, &go.bin, &["connect", &format!("192.0.2.2:{port}")]),
            Some(&cg.path),
        );
        let report = client.report();
        assert_eq!(
            (report.idle, report.intvl),
            (1, 1),
            "Go's 15 s rewritten: {report:?}"
        );
        servers.push(server);
        clients.push(client);
    }
    let silenced = now_ms();
    net.silence_b();
    // Go's own 15 s would take 15 + 2 × 15 = 45 s, and 31 s without the user timeout.
    for (client, name) in clients.iter_mut().zip(["cnt 2", "user_timeout 2500"]) {
        let (at, error) = closed_at(client);
        let after = at.saturating_sub(silenced);
        eprintln!("{name}: dead peer found after {after} ms ({error})");
        assert!(error.contains("timed out"), "{name}: {error}");
        assert!((2_000..10_000).contains(&after), "{name}: after {after} ms");
    }
    drop(servers);
}

#[test]
fn audit_counts_per_cgroup_what_the_kernel_has() {
    let env = kad_env!();
    let go = GoPeer::build();
    let daemon = Daemon::start(&env);
    let top = TestCgroup::new(&env, "audit");
    let svc = top.child("svc");
    let inherit = top.child("svc/inherit");
    let opted = top.child("svc/opted");
    let plain = top.child("plain");
    let rel = top.relative();
    let svc_rel = format!("{rel}/svc");
    let mut args = vec!["set", "--cgroup", &svc_rel];
    args.extend(POLICY);
    daemon.kad_ok(&args);
    daemon.kad_ok(&["set", "--cgroup", &format!("{rel}/svc/opted"), "--off"]);

    // A pair of sockets held by one process (`pair`): both ends in the same cgroup.
    let pair = |cg: &Path| {
        let mut command = Command::new(&env.peer);
        command.args(["pair", "127.0.0.1:0"]);
        let mut p = Process::spawn(command, Some(cg));
        p.line();
        p
    };
    let _svc_pair = pair(&svc);
    let _go = go.pair(Some(&svc), Some(&svc)); // overrides kad's values
    let _inherit_pair = pair(&inherit);
    let _opted_pair = pair(&opted);
    let _plain_pair = pair(&plain);

    let audit = json(&daemon, &["audit", "--cgroup", &rel, "--json"]);
    let rows = audit["cgroups"].as_array().expect("rows").clone();
    let summary: Vec<(String, u64, u64, u64, Value)> = rows
        .iter()
        .map(|r| {
            (
                r["cgroup"].as_str().unwrap_or_default().to_string(),
                r["connections"].as_u64().unwrap_or(99),
                r["keepalive_off"].as_u64().unwrap_or(99),
                r["differ"].as_u64().unwrap_or(99),
                r["policy"]["cgroup"].clone(),
            )
        })
        .collect();
    let p = |path: &Path| path.to_str().unwrap().to_string();
    let svc_policy = Value::from(p(&svc));
    assert_eq!(
        summary,
        vec![
            (p(&plain), 2, 2, 0, Value::Null),
            (p(&svc), 4, 0, 2, svc_policy.clone()),
            (p(&inherit), 2, 0, 0, svc_policy),
            (p(&opted), 2, 2, 0, Value::from(p(&opted))),
        ],
        "{audit}"
    );
    assert_eq!(rows[3]["policy"]["mode"], "off");
    assert_eq!(audit["unreadable_processes"], serde_json::json!([]));

    // The whole tree (the default) has the same rows for these cgroups.
    let all = json(&daemon, &["audit", "--json"]);
    for row in &rows {
        let same = all["cgroups"]
            .as_array()
            .and_then(|a| a.iter().find(|r| r["cgroup"] == row["cgroup"]));
        assert_eq!(same, Some(row), "{}", row["cgroup"]);
    }
    let table = daemon.kad_ok(&["audit", "--cgroup", &rel]);
    let svc_line = table
        .lines()
        .find(|l| l.starts_with(&format!("{} ", p(&svc))))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        svc_line.contains("on idle=100 intvl=20 cnt=5"),
        "{svc_line}"
    );

    // A user who may not read root's processes is told so, and sees no counts.
    let nobody = NobodyKad::new(&env);
    let out = nobody.run(&daemon.socket, &["audit", "--cgroup", &rel, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let audit: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(audit["cgroups"], serde_json::json!([]));
    assert_eq!(
        audit["unreadable_processes"].as_array().map(Vec::len),
        Some(6)
    );
}

#[test]
fn bad_input_is_one_line_and_changes_nothing() {
    let env = kad_env!();
    let daemon = Daemon::start(&env);
    let cg = TestCgroup::new(&env, "bad");
    set(&daemon, &cg, &[]);
    let before = daemon.list();
    let rel = cg.relative();
    let one_line_error = |out: &Output, what: &[&str]| {
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{what:?} accepted");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        for w in what {
            assert!(err.contains(w), "{w:?} not in {err}");
        }
    };
    one_line_error(
        &daemon.kad(&["set", "--cgroup", &rel, "--off", "--enforce"]),
        &["--off", "--enforce"],
    );
    for bad in ["0", "-5", "abc", "2147483648", ""] {
        one_line_error(
            &daemon.kad(&["set", "--cgroup", &rel, "--user-timeout", bad]),
            &["--user-timeout", "between 1 and 2147483647"],
        );
    }
    let kad = env.kad.to_str().unwrap();
    let exec_parent = TestCgroup::new(&env, "bad-exec");
    let run_exec = |envs: &[(&str, &str)], args: &[&str]| {
        // From a test cgroup, so that a transient cgroup would be made there.
        let mut command = Command::new(&env.kad);
        command
            .arg("exec")
            .args(args)
            .env("KAD_SOCKET", &daemon.socket)
            .env_remove("TCP_USER_TIMEOUT")
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let _procs = kad_tests::in_cgroup(&mut command, &exec_parent.path);
        command.output().expect("run kad exec")
    };
    one_line_error(
        &run_exec(&[("TCP_USER_TIMEOUT", "abc")], &["--", kad, "probe"]),
        &["TCP_USER_TIMEOUT=abc", "between 1 and 2147483647"],
    );
    one_line_error(
        &run_exec(&[], &["--off", "--enforce", "--", kad, "probe"]),
        &["--off", "--enforce"],
    );
    let children: Vec<_> = std::fs::read_dir(&exec_parent.path)
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name())
        .collect();
    assert!(
        children.is_empty(),
        "no transient cgroup was made: {children:?}"
    );
    // The daemon checks what reaches it, whatever sent it.
    let out = Command::new(&env.peer)
        .args([
            "request",
            daemon.socket.to_str().unwrap(),
            &format!(
                r#"{{"cmd":"set","cgroup":"{rel}","policy":{{"mode":"off","idle":null,"intvl":null,"cnt":null,"enforce":true}}}}"#
            ),
        ])
        .output()
        .unwrap();
    let reply = String::from_utf8_lossy(&out.stdout);
    assert!(
        reply.contains("\"error\"") && reply.contains("--enforce"),
        "{reply}"
    );
    let out = Command::new(&env.peer)
        .args([
            "request",
            daemon.socket.to_str().unwrap(),
            &format!(
                r#"{{"cmd":"set","cgroup":"{rel}","policy":{{"mode":"on","idle":null,"intvl":null,"cnt":null,"user_timeout":0}}}}"#
            ),
        ])
        .output()
        .unwrap();
    let reply = String::from_utf8_lossy(&out.stdout);
    assert!(reply.contains("between 1 and 2147483647"), "{reply}");
    // A bad config file on reload names the file and line; the config in force stays.
    std::fs::write(
        &daemon.config,
        format!("[[policy]]\ncgroup = \"{rel}/c\"\nuser_timeout = 0\n"),
    )
    .unwrap();
    one_line_error(
        &daemon.kad(&["reload"]),
        &["kad.toml:1", "--user-timeout", "between 1 and 2147483647"],
    );
    assert_eq!(daemon.list(), before, "nothing changed");
}
