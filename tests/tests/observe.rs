//! kad exec, kad probe, kad inspect, kad stats and /metrics, against the real kernel.
use std::{
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use kad_tests::{
    busybox, kad_env, listen, ss_to_port, untouched, wait_for, Daemon, Env, NetnsPair, NobodyKad,
    Process, Report, TestCgroup,
};

/// `kad exec ARGS` with `envs`, against `daemon`, stdin closed.
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
        .envs(envs.iter().copied())
        .stdin(Stdio::null());
    command.output().expect("run kad exec")
}

/// Runs the test peer under `kad exec`, connecting to a listener outside; returns the report
/// and the transient cgroup the child was in.
fn exec_peer(
    env: &Env,
    daemon: &Daemon,
    envs: &[(&str, &str)],
    flags: &[&str],
) -> (Report, PathBuf) {
    let (_server, port) = listen(env, "127.0.0.1:0", None);
    let script = format!(
        "grep '^0::' /proc/self/cgroup; exec {} connect 127.0.0.1:{port}",
        env.peer.display()
    );
    let mut args: Vec<&str> = flags.to_vec();
    args.extend(["--", "sh", "-c", &script]);
    let out = exec(env, daemon, envs, &args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "kad exec: {} {stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines = stdout.lines();
    let cgroup = lines
        .next()
        .and_then(|l| l.strip_prefix("0::"))
        .expect("cgroup line")
        .to_string();
    let report = serde_json::from_str(lines.next().expect("report line")).expect("report JSON");
    (report, env.root.join(cgroup.trim_start_matches('/')))
}

#[test]
fn exec_takes_values_from_flags_and_libkeepalive_variables() {
    let env = kad_env!();
    let daemon = Daemon::start(&env);
    let vars = [("KEEPIDLE", "111"), ("KEEPINTVL", "22"), ("KEEPCNT", "3")];

    let (report, cgroup) = exec_peer(&env, &daemon, &vars, &[]);
    assert_eq!(report.values(), (true, 111, 22, 3), "from the environment");
    assert!(
        cgroup
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("kad-exec-"),
        "{}",
        cgroup.display()
    );
    assert!(
        !cgroup.exists(),
        "transient cgroup removed: {}",
        cgroup.display()
    );
    assert_eq!(
        daemon.list(),
        serde_json::json!([]),
        "transient policy removed"
    );

    let (report, _) = exec_peer(&env, &daemon, &vars, &["--idle", "121", "--cnt", "4"]);
    assert_eq!(report.values(), (true, 121, 22, 4), "flags win");

    let (report, _) = exec_peer(
        &env,
        &daemon,
        &[("KEEPALIVE", "off"), ("KEEPIDLE", "50")],
        &[],
    );
    assert_eq!(report.values(), untouched(), "KEEPALIVE=off");

    let (report, _) = exec_peer(&env, &daemon, &[], &["--off"]);
    assert!(!report.keepalive);

    // The statically linked busybox nc gets it too (checked with ss from outside).
    let (_server, port) = listen(&env, "127.0.0.1:0", None);
    let mut command = Command::new(&env.kad);
    command
        .args(["exec", "--idle", "240", "--"])
        .arg(busybox())
        .args(["nc", "127.0.0.1", &port.to_string()])
        .env("KAD_SOCKET", &daemon.socket);
    let mut nc = Process::spawn(command, None);
    let mut seen = String::new();
    let ok = wait_for(Duration::from_secs(5), || {
        seen = ss_to_port(port);
        seen.contains("timer:(keepalive,3min") || seen.contains("timer:(keepalive,4min")
    });
    assert!(ok, "busybox nc under kad exec: {seen:?}");
    let policy = daemon.list()[0]["cgroup"]
        .as_str()
        .map(PathBuf::from)
        .expect("transient policy");
    assert_eq!(nc.terminate(), Some(143), "SIGTERM passed on to busybox nc");
    assert!(!policy.exists(), "transient cgroup removed after a signal");
}

#[test]
fn exec_refuses_bad_input_and_leaves_nothing() {
    let env = kad_env!();
    let daemon = Daemon::start(&env);
    for (vars, args, expected) in [
        (vec![("KEEPCNT", "500")], vec!["--", "true"], "KEEPCNT=500"),
        (
            vec![("KEEPIDLE", "soon")],
            vec!["--", "true"],
            "KEEPIDLE=soon",
        ),
        (
            vec![("KEEPALIVE", "maybe")],
            vec!["--", "true"],
            "KEEPALIVE=maybe",
        ),
        (
            vec![("KEEPALIVE", "off")],
            vec!["--idle", "5", "--", "true"],
            "KEEPALIVE=off conflicts",
        ),
        (vec![], vec!["--off", "--idle", "5", "--", "true"], "--off"),
        (
            vec![],
            vec!["--idle", "0", "--", "true"],
            "between 1 and 32767",
        ),
        (vec![], vec![], "CMD"),
        (vec![], vec!["true"], "unexpected argument"),
    ] {
        let out = exec(&env, &daemon, &vars, &args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{vars:?} {args:?}");
        assert!(err.contains(expected), "{vars:?} {args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    }
    let out = exec(&env, &daemon, &[], &["--", "/nonexistent/command"]);
    assert_eq!(out.status.code(), Some(127), "like a shell");
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/command"));
    assert_eq!(daemon.list(), serde_json::json!([]));

    let nowhere = std::env::temp_dir()
        .join(kad_tests::unique("none"))
        .join("kad.sock");
    let out = Command::new(&env.kad)
        .args(["exec", "--", "true"])
        .env("KAD_SOCKET", &nowhere)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("kad daemon"));
}

#[test]
fn exec_passes_on_exit_status_and_signals() {
    let env = kad_env!();
    let daemon = Daemon::start(&env);
    assert_eq!(
        exec(&env, &daemon, &[], &["--", "sh", "-c", "exit 7"])
            .status
            .code(),
        Some(7)
    );
    assert_eq!(
        exec(&env, &daemon, &[], &["--", "sh", "-c", "kill -KILL $$"])
            .status
            .code(),
        Some(137)
    );

    // SIGTERM sent to kad reaches the command, which dies of it: 128 + 15.
    let mut kad = Command::new(&env.kad)
        .args(["exec", "--idle", "99", "--", "sleep", "30"])
        .env("KAD_SOCKET", &daemon.socket)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let started = wait_for(Duration::from_secs(5), || {
        let list = daemon.list();
        list.as_array().is_some_and(|a| a.len() == 1)
            && a_pid_in(&PathBuf::from(
                list[0]["cgroup"].as_str().unwrap_or("/nonexistent"),
            ))
    });
    assert!(started, "the command runs in its transient cgroup");
    let cgroup = PathBuf::from(daemon.list()[0]["cgroup"].as_str().unwrap());
    // SAFETY: signalling our own child.
    unsafe { libc::kill(kad.id() as i32, libc::SIGTERM) };
    let mut status = None;
    assert!(wait_for(Duration::from_secs(10), || {
        status = kad.try_wait().unwrap();
        status.is_some()
    }));
    assert_eq!(status.unwrap().code(), Some(143));
    assert!(!cgroup.exists(), "cgroup removed");
    assert_eq!(daemon.list(), serde_json::json!([]));
}

#[test]
fn the_daemon_cleans_up_after_a_killed_kad_exec() {
    let env = kad_env!();
    let daemon = Daemon::start(&env);
    let mut kad = Command::new(&env.kad)
        .args(["exec", "--idle", "98", "--", "sleep", "1"])
        .env("KAD_SOCKET", &daemon.socket)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_for(Duration::from_secs(5), || daemon
        .list()
        .as_array()
        .is_some_and(|a| a.len() == 1)));
    let cgroup = PathBuf::from(daemon.list()[0]["cgroup"].as_str().unwrap());
    kad.kill().unwrap();
    kad.wait().unwrap();
    // Once `sleep` is gone too, the daemon removes the cgroup and the policy.
    assert!(
        wait_for(Duration::from_secs(10), || !cgroup.exists()
            && daemon.list() == serde_json::json!([])),
        "abandoned transient cgroup collected: {}",
        daemon.list()
    );
}

fn a_pid_in(cgroup: &Path) -> bool {
    std::fs::read_to_string(cgroup.join("cgroup.procs")).is_ok_and(|t| !t.trim().is_empty())
}

#[test]
fn probe_prints_the_classic_format_both_ways() {
    let env = kad_env!();
    let daemon = Daemon::start(&env);
    let out = Command::new(&env.kad).arg("probe").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "SO_KEEPALIVE is OFF\n"
    );

    let kad = env.kad.to_str().unwrap();
    let out = exec(
        &env,
        &daemon,
        &[],
        &[
            "--idle", "180", "--intvl", "60", "--cnt", "20", "--", kad, "probe",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "SO_KEEPALIVE is ON\nTCP_KEEPCNT   = 20\nTCP_KEEPIDLE  = 180\nTCP_KEEPINTVL = 60\n"
    );
    let out = exec(
        &env,
        &daemon,
        &[("KEEPIDLE", "170")],
        &["--", kad, "probe", "--json"],
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("probe --json");
    assert_eq!(json["keepalive"], true);
    assert_eq!(json["idle"], 170);
}

#[test]
fn inspect_shows_the_real_state_of_live_connections() {
    let env = kad_env!();
    let daemon = Daemon::start(&env);
    let with = TestCgroup::new(&env, "inspect-on");
    let without = TestCgroup::new(&env, "inspect-off");
    daemon.kad_ok(&[
        "set",
        "--cgroup",
        &with.relative(),
        "--idle",
        "180",
        "--intvl",
        "60",
        "--cnt",
        "20",
    ]);
    let (_server, port) = listen(&env, "127.0.0.1:0", None);
    let client = |cg: &Path| {
        let mut command = Command::new(busybox());
        command
            .args(["nc", "127.0.0.1", &port.to_string()])
            .stderr(Stdio::null());
        Process::spawn(command, Some(cg))
    };
    // The listener accepts one connection: a second listener for the second client.
    let with_client = client(&with.path);
    let (_server2, port2) = listen(&env, "[::1]:0", None);
    let mut command = Command::new(&env.peer);
    command.args(["connect", &format!("[::1]:{port2}")]);
    let mut without_client = Process::spawn(command, Some(&without.path));
    without_client.report();
    // A second process in that cgroup, with a connection of its own.
    let (_server3, port3) = listen(&env, "127.0.0.1:0", None);
    let mut command = Command::new(&env.peer);
    command.args(["connect", &format!("127.0.0.1:{port3}")]);
    let mut neighbour = Process::spawn(command, Some(&without.path));
    neighbour.report();

    let inspect = |args: &[&str]| -> serde_json::Value {
        let mut all = vec!["inspect", "--json"];
        all.extend_from_slice(args);
        serde_json::from_str(&daemon.kad_ok(&all)).expect("inspect --json")
    };
    let mut on = serde_json::Value::Null;
    assert!(
        wait_for(Duration::from_secs(5), || {
            on = inspect(&["--cgroup", &with.relative()]);
            on.as_array().is_some_and(|a| a.len() == 1)
        }),
        "one connection in the policy cgroup: {on}"
    );
    let c = &on[0];
    assert_eq!(c["pid"], with_client.id());
    assert_eq!(c["remote"], format!("127.0.0.1:{port}"));
    assert_eq!(
        (
            c["keepalive"].clone(),
            c["idle"].clone(),
            c["intvl"].clone(),
            c["cnt"].clone()
        ),
        (true.into(), 180.into(), 60.into(), 20.into())
    );
    assert_eq!(c["timer"], "keepalive");
    let left = c["timer_left_ms"].as_u64().unwrap();
    assert!(left <= 180_000 && left > 170_000, "timer left {left}");
    assert_eq!(c["probes"], 0);

    // --pid N: the cgroup N is in, so its neighbour's connection too (sorted by pid).
    let off = inspect(&["--pid", &without_client.id().to_string()]);
    assert_eq!(off.as_array().map(Vec::len), Some(2), "{off}");
    let mut expected = [
        (without_client.id(), format!("[::1]:{port2}")),
        (neighbour.id(), format!("127.0.0.1:{port3}")),
    ];
    expected.sort();
    for (row, (pid, remote)) in expected.iter().enumerate() {
        assert_eq!(off[row]["pid"], *pid, "{off}");
        assert_eq!(off[row]["remote"], *remote, "{off}");
        assert_eq!(off[row]["keepalive"], false);
        assert_eq!(off[row]["idle"], untouched().1);
    }
    assert_eq!(
        inspect(&["--cgroup", &without.relative()]),
        off,
        "the same as naming the cgroup"
    );

    let table = daemon.kad_ok(&["inspect", "--cgroup", with.path.to_str().unwrap()]);
    assert!(
        table.contains("keepalive,2min") || table.contains("keepalive,3min"),
        "{table}"
    );
    for (args, expected) in [
        (vec!["inspect", "--pid", "999999999"], "no process"),
        (vec!["inspect", "--cgroup", "/tmp"], "not on the cgroup2"),
        (vec!["inspect"], "required"),
    ] {
        let out = daemon.kad(&args);
        assert!(
            !out.status.success() && String::from_utf8_lossy(&out.stderr).contains(expected),
            "{args:?}"
        );
    }
}

#[test]
fn counters_move_and_a_keepalive_kill_is_counted() {
    let env = kad_env!();
    if !kad_tests::require_kernel(
        5,
        14,
        "the inet_sk_error_report tracepoint (keepalive kills)",
    ) {
        return;
    }
    if !Path::new("/usr/sbin/ip").exists() && !Path::new("/sbin/ip").exists() {
        panic!("iproute2 missing (cargo xtask test installs it)");
    }
    let daemon = Daemon::start(&env);
    let cg = TestCgroup::new(&env, "stats");
    daemon.kad_ok(&[
        "set",
        "--cgroup",
        &cg.relative(),
        "--idle",
        "1",
        "--intvl",
        "1",
        "--cnt",
        "2",
    ]);
    kad_tests::connect(&env, Some(&cg.path), Some(&cg.path), false);
    kad_tests::connect(&env, None, Some(&cg.path), true);
    let stats = || -> serde_json::Value {
        serde_json::from_str(&daemon.kad_ok(&["stats", "--json"])).expect("stats --json")
    };
    let s = stats();
    assert_eq!(s["kills_counted"], true, "this kernel has BTF");
    let row = &s["cgroups"][0];
    assert_eq!(row["cgroup"], cg.path.to_str().unwrap());
    assert_eq!(
        (row["connect"].clone(), row["accept"].clone()),
        (2.into(), 1.into())
    );
    assert_eq!(row["setsockopt_failures"], 0);
    assert_eq!(row["keepalive_kills"], 0);

    // A peer that stops answering: keepalive gives up after 1 + 2 × 1 s.
    let net = NetnsPair::new();
    let mut server = Process::spawn(
        NetnsPair::command(&net.b, &env.peer, &["listen", "192.0.2.2:0"]),
        None,
    );
    let port = server.line().trim_start_matches("LISTENING ").to_string();
    let mut client = Process::spawn(
        NetnsPair::command(
            &net.a,
            &env.peer,
            &["connect", &format!("192.0.2.2:{port}")],
        ),
        Some(&cg.path),
    );
    let report = client.report();
    assert!(report.keepalive);
    net.silence_b();
    let mut last = serde_json::Value::Null;
    let killed = wait_for(Duration::from_secs(15), || {
        last = stats();
        last["cgroups"][0]["keepalive_kills"] == 1
    });
    assert!(killed, "keepalive kill counted: {last}");
    assert_eq!(last["cgroups"][0]["connect"], 3);
    // And logged by the daemon, with the connection (its true local port: the kernel clears
    // its own copy before the report) and its policy cgroup (aya-log event).
    let event = format!(
        "keepalive kill: policy cgroup {} local 192.0.2.1:{} remote 192.0.2.2:{port}",
        kad_tests::cgroup_id(&cg.path),
        report.local_port
    );
    assert!(
        wait_for(Duration::from_secs(5), || daemon.log().contains(&event)),
        "{event:?} in the log: {}",
        daemon.log()
    );
    drop(server);
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
fn metrics_are_served_over_http_and_a_bad_address_fails_cleanly() {
    let env = kad_env!();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let daemon = Daemon::start_with(&env, &["--metrics", &addr]);
    let cg = TestCgroup::new(&env, "metrics");
    daemon.kad_ok(&["set", "--cgroup", &cg.relative(), "--idle", "60"]);
    kad_tests::connect(&env, Some(&cg.path), Some(&cg.path), false);

    let response = http_get(&addr, "/metrics");
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    assert!(response.contains("text/plain; version=0.0.4"));
    let label = format!("cgroup=\"{}\"", cg.path.display());
    assert!(
        response.contains(&format!(
            "kad_connections_configured_total{{{label},side=\"connect\"}} 1"
        )),
        "{response}"
    );
    assert!(response.contains(&format!(
        "kad_connections_configured_total{{{label},side=\"accept\"}} 1"
    )));
    assert!(response.contains(&format!("kad_keepalive_kills_total{{{label}}} 0")));
    assert!(response.contains("kad_policies 1"));
    assert!(http_get(&addr, "/").starts_with("HTTP/1.1 404"));

    // The same address again: the second daemon says why and leaves nothing behind.
    let other = std::env::temp_dir().join(kad_tests::unique("busy-metrics"));
    let bpffs = PathBuf::from("/sys/fs/bpf").join(kad_tests::unique("busy-metrics"));
    let (socket, state, config) = (
        other.join("kad.sock"),
        other.join("state"),
        other.join("kad.toml"),
    );
    let out = kad_tests::daemon_command(&env.kad, &socket, &state, &bpffs, &config)
        .args(["--metrics", &addr])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("cannot serve metrics on {addr}")),
        "{err}"
    );
    assert!(!bpffs.exists() && !other.exists(), "nothing created");
}

#[test]
fn inspect_of_someone_elses_process_is_a_permission_error() {
    let env = kad_env!();
    let daemon = Daemon::start(&env);
    let cg = TestCgroup::new(&env, "inspect-perm");
    let (_server, port) = listen(&env, "127.0.0.1:0", None);
    let mut command = Command::new(&env.peer);
    command.args(["connect", &format!("127.0.0.1:{port}")]);
    let mut client = Process::spawn(command, Some(&cg.path));
    client.report();
    let pid = client.id().to_string();
    // Root sees it; user nobody may not read root's sockets: that is what it is told.
    let rows: serde_json::Value =
        serde_json::from_str(&daemon.kad_ok(&["inspect", "--json", "--pid", &pid])).unwrap();
    assert_eq!(rows.as_array().map(Vec::len), Some(1), "{rows}");
    let nobody = NobodyKad::new(&env);
    for args in [
        &["inspect", "--pid", &pid][..],
        &["inspect", "--cgroup", &cg.relative()],
    ] {
        let out = nobody.run(&daemon.socket, args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{args:?}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(
            err.contains(&format!(
                "permission denied reading the sockets of process {pid}"
            )),
            "{args:?}: {err}"
        );
        assert!(!err.contains("no process"), "{err}");
    }
}
