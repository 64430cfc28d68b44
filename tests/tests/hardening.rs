//! What no user, fault or file can do to kad: the unit's capabilities are enough (and are what
//! the daemon runs with), floods of the control socket and of /metrics cost little and leave
//! root answered, accept errors back off, and no text reaching the log can forge a line.
use std::{
    fs,
    net::TcpStream,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use kad_tests::{
    cgroup_id, connect, daemon_command, free_port, kad_env, scrape, wait_for, Daemon, Env, Process,
    TempDir, TestCgroup,
};

/// Capability numbers, as in linux/capability.h (index = number).
const CAPS: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

fn unit_text() -> String {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/kad.service");
    fs::read_to_string(&unit).unwrap_or_else(|e| panic!("{}: {e}", unit.display()))
}

/// The values of `key=` in the unit, in order.
fn directive(text: &str, key: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().to_string())
        .collect()
}

/// The unit's capability bounding set: names and their mask.
fn unit_caps(text: &str) -> (Vec<String>, u64) {
    let mut names = Vec::new();
    for value in directive(text, "CapabilityBoundingSet") {
        assert!(
            !value.starts_with('~'),
            "an inverted bounding set is not what this test reads: {value}"
        );
        // systemd: an empty assignment resets the list; several lines add up.
        if value.is_empty() {
            names.clear();
        }
        names.extend(value.split_whitespace().map(str::to_string));
    }
    assert!(!names.is_empty(), "the unit sets CapabilityBoundingSet");
    let mask = names.iter().fold(0u64, |mask, name| {
        let number = CAPS
            .iter()
            .position(|c| c == name)
            .unwrap_or_else(|| panic!("unknown capability {name} in the unit"));
        mask | 1 << number
    });
    (names, mask)
}

/// `setpriv` arguments that give a root process exactly `names`, as systemd does for the unit:
/// the bounding set, nothing inheritable or ambient, no new privileges.
fn setpriv_args(names: &[String]) -> Vec<String> {
    let caps: Vec<String> = names
        .iter()
        .map(|n| format!("+{}", n.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    vec![
        "setpriv".into(),
        format!("--bounding-set=-all,{}", caps.join(",")),
        "--inh-caps=-all".into(),
        "--ambient-caps=-all".into(),
        "--no-new-privs".into(),
        "--".into(),
    ]
}

/// A `/proc/PID/status` capability line as a mask.
fn proc_caps(pid: u32, field: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    u64::from_str_radix(line.trim(), 16).expect("hex mask")
}

/// Soft and hard limit on open files of a process.
fn nofile(pid: u32) -> (u64, u64) {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).expect("read limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    let mut values = line["Max open files".len()..]
        .split_whitespace()
        .map(|v| v.parse().expect("a number"));
    (values.next().unwrap(), values.next().unwrap())
}

fn our_hard_nofile() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we own.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0
    );
    limit.rlim_max
}

/// A daemon started as the unit starts it: its capability bounding set (and nothing else),
/// no new privileges, its file and memlock limits (as far as this process may give them).
/// Returns the daemon, the unit's capability names and mask, and the hard file limit.
fn start_as_the_unit(env: &Env) -> (Daemon, Vec<String>, u64, u64) {
    let text = unit_text();
    let (names, mask) = unit_caps(&text);
    assert!(
        directive(&text, "AmbientCapabilities")
            .iter()
            .all(String::is_empty),
        "no ambient capabilities"
    );
    assert_eq!(directive(&text, "NoNewPrivileges"), ["yes"]);
    let unit_nofile: u64 = directive(&text, "LimitNOFILE")
        .last()
        .expect("the unit sets LimitNOFILE")
        .parse()
        .expect("LimitNOFILE is a number");
    // Raising a hard limit takes CAP_SYS_RESOURCE, which containers often lack.
    let hard = unit_nofile.min(our_hard_nofile());

    // A soft limit below the hard one, as a default start would give: the daemon raises it.
    let mut wrapper = vec!["prlimit".to_string(), format!("--nofile=1024:{hard}")];
    // Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK: the unit lifts it, so does this.
    // As far as this process may (raising a hard limit takes CAP_SYS_RESOURCE).
    if directive(&text, "LimitMEMLOCK").last().map(String::as_str) == Some("infinity") {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // With CAP_SYS_RESOURCE (a kernel booted for the matrix) it can be lifted altogether.
        let infinity = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: setrlimit/getrlimit on structs we own.
        unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &infinity) };
        // SAFETY: as above.
        if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } == 0 {
            let hard = if limit.rlim_max == libc::RLIM_INFINITY {
                "unlimited".to_string()
            } else {
                limit.rlim_max.to_string()
            };
            wrapper.push(format!("--memlock={hard}:{hard}"));
        }
    }
    wrapper.push("--".into());
    wrapper.extend(setpriv_args(&names));
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    (Daemon::start_wrapped(env, &wrapper, &[]), names, mask, hard)
}

#[test]
fn the_unit_s_capabilities_run_the_daemon_and_enforce_a_policy() {
    let env = kad_env!();
    let (daemon, names, mask, hard) = start_as_the_unit(&env);
    let pid = daemon.pid();
    for field in ["CapBnd", "CapPrm", "CapEff"] {
        assert_eq!(
            proc_caps(pid, field),
            mask,
            "{field} of the daemon is the unit's set {names:?}"
        );
    }
    assert_eq!(proc_caps(pid, "CapAmb"), 0);
    assert_eq!(
        nofile(pid),
        (hard, hard),
        "soft limit raised to the hard one"
    );

    let cg = TestCgroup::new(&env, "unitcaps");
    let child = cg.child("opted-out");
    daemon.kad_ok(&["set", "--cgroup", &cg.relative(), "--idle", "211"]);
    daemon.kad_ok(&["set", "--cgroup", child.to_str().unwrap(), "--off"]);
    let (server, client) = connect(&env, Some(&cg.path), Some(&cg.path), false);
    assert_eq!((server.keepalive, server.idle), (true, 211));
    assert_eq!((client.keepalive, client.idle), (true, 211));
    let (_, c) = connect(&env, None, Some(&child), false);
    assert!(!c.keepalive, "opt-out below the policy");

    // Without CAP_PERFMON (nor CAP_SYS_ADMIN, which implies it) the program does not load:
    // the test can tell a set that is too small.
    let fewer: Vec<String> = names
        .iter()
        .filter(|n| *n != "CAP_PERFMON" && *n != "CAP_SYS_ADMIN")
        .cloned()
        .collect();
    assert!(names.iter().any(|n| n == "CAP_PERFMON"), "{names:?}");
    let dir = TempDir::new("noperfmon");
    let bpffs = Path::new("/sys/fs/bpf").join(kad_tests::unique("noperfmon"));
    let args = setpriv_args(&fewer);
    let mut child = Command::new(&args[0])
        .args(&args[1..])
        .arg(&env.kad)
        .args(
            daemon_command(
                &env.kad,
                &dir.0.join("kad.sock"),
                &dir.0.join("state"),
                &bpffs,
                &dir.0.join("none.toml"),
            )
            .get_args(),
        )
        .stdin(Stdio::null())
        .stderr(fs::File::create(dir.0.join("log")).unwrap())
        .spawn()
        .expect("run setpriv");
    let mut status = None;
    wait_for(Duration::from_secs(20), || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = fs::remove_dir_all(&bpffs);
    let log = fs::read_to_string(dir.0.join("log")).unwrap_or_default();
    assert!(
        status.is_some_and(|s| !s.success()) && log.contains("cannot load"),
        "without CAP_PERFMON the program must not load ({status:?}): {log}"
    );
}

/// The connections a unit-started daemon must reach when a policy comes: those of a process of
/// another user (its /proc/PID/ns/net takes CAP_SYS_PTRACE) in a network namespace of its own
/// (entering it takes CAP_SYS_ADMIN, and `RestrictNamespaces=` must allow `net`).
#[test]
fn the_unit_s_capabilities_reach_another_user_s_connections_in_another_namespace() {
    let env = kad_env!();
    if !kad_tests::require_kernel(5, 15, "bpf_setsockopt from iter/tcp (existing connections)") {
        return;
    }
    let restrict = directive(&unit_text(), "RestrictNamespaces");
    assert_eq!(
        restrict.last().map(String::as_str),
        Some("net"),
        "the unit lets the daemon enter network namespaces, and only those"
    );
    let (daemon, _, _, _) = start_as_the_unit(&env);
    let cg = TestCgroup::new(&env, "unitns");
    let netns = kad_tests::NetnsPair::new();
    let mut command = Command::new("ip");
    command
        .args([
            "netns",
            "exec",
            &netns.a,
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
        ])
        .args(["--clear-groups", "--"])
        .arg(&env.peer)
        .args(["pair", "127.0.0.1:0"]);
    let mut pair = Process::spawn(command, Some(&cg.path));
    let ends = |line: String| {
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad report {line:?}: {e}"));
        ["client", "server"].map(|end| (v[end]["keepalive"].as_bool(), v[end]["idle"].as_i64()))
    };
    let before = ends(pair.line());
    assert!(before.iter().all(|e| e.0 == Some(false)), "{before:?}");
    daemon.kad_ok(&["set", "--cgroup", &cg.relative(), "--idle", "213"]);
    pair.write(b"\n");
    let after = ends(pair.line());
    assert_eq!(
        after,
        [(Some(true), Some(213)); 2],
        "both ends, nobody's, in {}",
        netns.a
    );
}

/// CPU time (user + system) a process has used, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// The share of one core a process used while `work` ran, and what `work` returned.
fn cpu_share<T>(pid: u32, work: impl FnOnce() -> T) -> (f64, T) {
    let (cpu, start) = (cpu_seconds(pid), Instant::now());
    let out = work();
    let share = (cpu_seconds(pid) - cpu) / start.elapsed().as_secs_f64();
    (share, out)
}

fn fd_count(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read fds")
        .count()
}

/// A kad-test-peer mode run as another user (uid = gid = `uid`, no groups).
fn peer_as(env: &Env, uid: u32, args: &[&str]) -> Process {
    let mut command = Command::new("setpriv");
    command
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .arg("--clear-groups")
        .arg("--")
        .arg(&env.peer)
        .args(args);
    Process::spawn(command, None)
}

/// The first lines of a log that may be huge, for a failure message.
fn head(log: &str) -> String {
    log.lines().take(40).collect::<Vec<_>>().join("\n")
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[test]
fn an_unprivileged_flood_leaves_root_answered_at_little_cost() {
    let env = kad_env!();
    if !kad_tests::host_only("CPU shares and latencies under a flood (meaningless under emulation)")
    {
        return;
    }
    let mut daemon = Daemon::start(&env);
    let top = TestCgroup::new(&env, "flood");
    let svc = top.child("svc");
    // 4,000 policies waiting for their cgroups: a status of about a megabyte.
    with_waiting_policies(&mut daemon, &top, 4000);
    let pid = daemon.pid();
    let status_size = daemon.kad_ok(&["status", "--json"]).len();
    assert!(status_size > 500_000, "status is {status_size} bytes");
    let (idle_cpu, ()) = cpu_share(pid, || std::thread::sleep(Duration::from_secs(3)));

    // One user holds 1,200 connections; another asks for status in 20 loops.
    let mut holder = peer_as(
        &env,
        65534,
        &["hold", daemon.socket.to_str().unwrap(), "1200"],
    );
    let held = holder.line();
    let refused: usize = held
        .strip_prefix("HELD 1200 REFUSED ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected {held:?}"));
    assert!(
        refused >= 1100,
        "the connections over the limit are refused at once: {held}"
    );
    let mut readers = peer_as(
        &env,
        65533,
        &["readers", daemon.socket.to_str().unwrap(), "20"],
    );
    std::thread::sleep(Duration::from_millis(500));

    let (flood_cpu, (sets, lists)) = cpu_share(pid, || {
        let (mut sets, mut lists) = (Vec::new(), Vec::new());
        for i in 0..10 {
            let start = Instant::now();
            daemon.kad_ok(&[
                "set",
                "--cgroup",
                svc.to_str().unwrap(),
                "--idle",
                &(300 + i).to_string(),
            ]);
            sets.push(start.elapsed());
            let start = Instant::now();
            daemon.kad_ok(&["list", "--json"]);
            lists.push(start.elapsed());
            std::thread::sleep(Duration::from_millis(300));
        }
        (sets, lists)
    });
    // A re-created cgroup is followed meanwhile.
    fs::remove_dir(&svc).unwrap();
    fs::create_dir(&svc).unwrap();
    let new_id = cgroup_id(&svc);
    let recorded = || -> serde_json::Value {
        serde_json::from_str::<serde_json::Value>(&daemon.kad_ok(&["status", "--json"]))
            .map(|s| s["details"][0]["cgroup_id"].clone())
            .unwrap_or_default()
    };
    assert!(
        wait_for(Duration::from_secs(5), || recorded() == new_id),
        "re-created cgroup recorded during the flood: {:?}",
        recorded()
    );
    let (_, c) = connect(&env, None, Some(&svc), false);
    assert_eq!((c.keepalive, c.idle), (true, 309));

    drop(holder);
    // Closing stdin ends the readers, which then say how much they got.
    readers.close_stdin();
    let read = readers.line();
    let replies: u64 = read
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected {read:?}"));
    let log = daemon.log();
    eprintln!(
        "status {status_size} B; cpu idle {:.1}% flood {:.1}%; root set median {:?} max {:?}; \
         list median {:?} max {:?}; {replies} status replies to the readers; log {} B",
        idle_cpu * 100.0,
        flood_cpu * 100.0,
        median(sets.clone()),
        sets.iter().max().unwrap(),
        median(lists.clone()),
        lists.iter().max().unwrap(),
        log.len()
    );
    assert!(replies > 0, "the readers were answered: {read}");
    assert!(
        flood_cpu < 0.5,
        "the daemon used {:.0}% of a core during the flood",
        flood_cpu * 100.0
    );
    for (what, times) in [("set", &sets), ("list", &lists)] {
        assert!(
            times.iter().all(|t| *t < Duration::from_secs(3)),
            "root's {what} took {times:?}"
        );
    }
    assert!(
        log.len() < 64 * 1024,
        "log of {} bytes:\n{}",
        log.len(),
        head(&log)
    );
}

/// What a forged line would look like in the daemon's log.
const FORGED: &str =
    "2026-01-01T00:00:00.000000Z  INFO keepalive_daemon::daemon: policy removed cgroup=/forged";

#[test]
fn no_request_or_path_can_forge_a_log_line() {
    let env = kad_env!();
    let daemon = Daemon::start(&env);
    let socket = daemon.socket.to_str().unwrap();
    let cg = TestCgroup::new(&env, "inject");
    let escaped_json = serde_json::to_string(&format!("x\n{FORGED}")).unwrap();

    // A malformed request from a user: the parser quotes it in its message.
    let mut nobody = peer_as(
        &env,
        65534,
        &["request", socket, &format!("{{\"cmd\":{escaped_json}}}")],
    );
    let reply = nobody.line();
    assert!(reply.contains("malformed request"), "{reply}");
    // Root's requests name paths that are logged: one that does not exist...
    let out = daemon.kad(&[
        "set",
        "--cgroup",
        &format!("{}/missing\n{FORGED}", cg.path.display()),
    ]);
    assert!(!out.status.success());
    // ...and a real cgroup whose name holds a carriage return, which on a terminal puts the
    // text after it over the line (cgroup names may not hold a newline; any owner of a
    // delegated cgroup can make this one), set and unset.
    let odd = cg.child(&format!("odd\r{}", FORGED.replace('/', "")));
    daemon.kad_ok(&["set", "--cgroup", odd.to_str().unwrap(), "--idle", "212"]);
    let (_, c) = connect(&env, None, Some(&odd), false);
    assert_eq!((c.keepalive, c.idle), (true, 212));
    daemon.kad_ok(&["unset", "--cgroup", odd.to_str().unwrap()]);

    let log = daemon.log();
    let (newline, cr) = (
        format!("\\n{FORGED}"),
        format!("odd\\r{}", FORGED.replace('/', "")),
    );
    for (what, marker, escaped) in [
        ("the malformed request", "malformed request", &newline),
        ("the missing path", "/missing\\n", &newline),
        ("the policy set", "policy set", &cr),
        ("the policy removed", "policy removed cgroup=", &cr),
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains(marker) && l.contains(escaped.as_str())),
            "{what} is logged, escaped:\n{log}"
        );
    }
    assert!(!log.contains('\r'), "{log:?}");
    for line in log.lines() {
        assert!(
            !line.starts_with("2026-01-01T00:00:00") && starts_with_timestamp(line),
            "a line that the daemon did not start:\n{line}\n\nin:\n{log}"
        );
    }
}

/// `YYYY-MM-DDTHH:MM:SS`, as tracing begins each line.
fn starts_with_timestamp(line: &str) -> bool {
    let b = line.as_bytes();
    b.len() > 19
        && b[..19].iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            _ => c.is_ascii_digit(),
        })
}

#[test]
fn idle_metrics_clients_hold_few_fds_and_keep_no_scraper_out() {
    let env = kad_env!();
    let addr = free_port();
    let daemon = Daemon::start_with(&env, &["--metrics", &addr]);
    let pid = daemon.pid();
    assert!(scrape(&addr).starts_with("HTTP/1.1 200 OK"));
    let base = fd_count(pid);
    let idle: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect(&addr).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    // What the idle connections cost while they sit there (accepting them is real work, which
    // under emulation is slow; spinning on them would show here).
    let (cpu, fds) = cpu_share(pid, || {
        std::thread::sleep(Duration::from_secs(2));
        fd_count(pid)
    });
    let start = Instant::now();
    let response = scrape(&addr);
    let took = start.elapsed();
    eprintln!(
        "metrics: {} idle connections, daemon fds {base} -> {fds}, scrape in {took:?}, cpu {:.1}%",
        idle.len(),
        cpu * 100.0
    );
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    assert!(response.contains("kad_policies 0"), "{response}");
    assert!(took < Duration::from_secs(3), "the scrape took {took:?}");
    assert!(
        fds <= base + 16,
        "300 idle connections hold {} fds in the daemon",
        fds - base
    );
    assert!(cpu < 0.3, "{:.0}% of a core", cpu * 100.0);
}

#[test]
fn accept_errors_back_off_instead_of_spinning() {
    let env = kad_env!();
    // How many fds a daemon holds at rest, then one with little room above that.
    let addr = free_port();
    let probe = Daemon::start_with(&env, &["--metrics", &addr]);
    let room = fd_count(probe.pid()) + 6;
    drop(probe);
    let limit = format!("--nofile={room}:{room}");
    let addr = free_port();
    let daemon = Daemon::start_wrapped(&env, &["prlimit", &limit, "--"], &["--metrics", &addr]);
    let pid = daemon.pid();
    assert_eq!(nofile(pid), (room as u64, room as u64));

    // Root's 200 silent connections and 100 to /metrics use up the fds: accept fails.
    let mut holder = Process::spawn(
        {
            let mut c = Command::new(&env.peer);
            c.args(["hold", daemon.socket.to_str().unwrap(), "200"]);
            c
        },
        None,
    );
    let held = holder.line();
    assert!(held.starts_with("HELD 200 "), "{held}");
    let tcp: Vec<TcpStream> = (0..100)
        .map(|_| TcpStream::connect(&addr).expect("connect"))
        .collect();
    // Settled: what is measured is the daemon waiting on full fd tables, not the connections
    // arriving (slow under emulation).
    std::thread::sleep(Duration::from_millis(500));
    let (cpu, ()) = cpu_share(pid, || std::thread::sleep(Duration::from_secs(4)));
    let log = daemon.log();
    eprintln!(
        "fd limit {room}: cpu {:.1}% over 4 s, log {} lines, {} B",
        cpu * 100.0,
        log.lines().count(),
        log.len()
    );
    assert!(
        // EMFILE by its number: the words are the libc's (musl: "No file descriptors available").
        log.contains("accept on the control socket failed:")
            && log.contains("metrics accept failed:")
            && log.matches("(os error 24)").count() >= 2,
        "both sockets ran out of fds:\n{}",
        head(&log)
    );
    assert!(cpu < 0.2, "{:.0}% of a core", cpu * 100.0);
    assert!(log.lines().count() < 40, "{}", head(&log));

    // Once the flood is gone, both are served again.
    drop(holder);
    drop(tcp);
    assert!(
        wait_for(Duration::from_secs(20), || daemon
            .kad(&["list"])
            .status
            .success()),
        "{}",
        daemon.log()
    );
    assert!(scrape(&addr).starts_with("HTTP/1.1 200 OK"));
}

/// Context switches of every thread of `pid` (each time a thread went to sleep or was put off
/// the CPU), by thread id.
fn switches(pid: u32) -> std::collections::BTreeMap<String, u64> {
    let mut all = std::collections::BTreeMap::new();
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return all;
    };
    for task in tasks.flatten() {
        let Ok(status) = fs::read_to_string(task.path().join("status")) else {
            continue; // the thread just exited
        };
        let n: u64 = status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        all.insert(task.file_name().to_string_lossy().into_owned(), n);
    }
    all
}

/// How often the daemon's threads woke while `secs` seconds passed.
fn wakeups(pid: u32, secs: f64) -> u64 {
    let before = switches(pid);
    std::thread::sleep(Duration::from_secs_f64(secs));
    switches(pid)
        .iter()
        .map(|(tid, n)| n.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum()
}

/// Event-driven: with policies in force and waiting and nothing happening, no thread of the
/// daemon wakes (no poll, no timer); while a `kad exec` run exists it looks once a second for
/// an abandoned one (which shows that this measure sees a timer), and stops when the run ends.
#[test]
fn an_idle_daemon_does_not_wake() {
    let env = kad_env!();
    let daemon = Daemon::start(&env);
    let pid = daemon.pid();
    let cg = TestCgroup::new(&env, "idle");
    // One level down: an anchor directly below the root has the root watched (its removal is
    // seen only there), and the other tests' cgroups made there would wake the daemon.
    cg.child("inner/svc");
    for (path, idle) in [("inner/svc", "101"), ("inner/later", "102")] {
        let path = format!("{}/{path}", cg.relative());
        daemon.kad_ok(&["set", "--cgroup", &path, "--idle", idle]);
    }
    let (_, c) = connect(&env, None, Some(&cg.path.join("inner/svc")), false);
    assert_eq!((c.keepalive, c.idle), (true, 101));
    // Settled: the replies and log lines of the commands are out.
    std::thread::sleep(Duration::from_secs(2));
    let idle = wakeups(pid, 4.0);

    let exec_parent = TestCgroup::new(&env, "idle-exec");
    let mut exec = Command::new(&env.kad);
    exec.args(["exec", "--idle", "103", "--", "sleep", "6"])
        .env("KAD_SOCKET", &daemon.socket)
        .stdin(Stdio::null());
    let _procs = kad_tests::in_cgroup(&mut exec, &exec_parent.path);
    let mut exec = exec.spawn().expect("run kad exec");
    let listed = |n: usize| {
        wait_for(Duration::from_secs(10), || {
            daemon.list().as_array().is_some_and(|a| a.len() == n)
        })
    };
    assert!(listed(3), "the kad exec run is listed: {}", daemon.list());
    std::thread::sleep(Duration::from_millis(500));
    let watching = wakeups(pid, 3.0);
    let status = exec.wait().expect("wait for kad exec");
    assert!(status.success(), "kad exec: {status}");
    assert!(listed(2), "the run's policy is gone: {}", daemon.list());
    std::thread::sleep(Duration::from_secs(2));
    let after = wakeups(pid, 4.0);
    eprintln!("daemon wakeups: idle {idle} in 4 s, with a kad exec run {watching} in 3 s, after it {after} in 4 s");
    assert!(
        watching >= 3,
        "a run is watched once a second: {watching} wakeups in 3 s"
    );
    assert!(idle <= 1, "an idle daemon woke {idle} times in 4 s");
    assert!(
        after <= 1,
        "after the run, the daemon woke {after} times in 4 s"
    );
}

/// Writes `total` bytes of one request line (no newline) until the daemon closes; returns the
/// bytes the socket took, the write's error, and the reply read after it.
fn send_oversized(socket: &Path, total: usize) -> (usize, std::io::Error, String) {
    use std::io::{Read as _, Write as _};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).expect("connect");
    stream
        .set_write_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let chunk = vec![b'x'; 64 * 1024];
    let mut written = 0;
    let error = loop {
        if written >= total {
            panic!("the daemon took all {total} bytes of one request");
        }
        match stream.write(&chunk) {
            Ok(n) => written += n,
            Err(e) => break e,
        }
    };
    let mut reply = Vec::new();
    // The reply comes first; the connection's reset after it is expected.
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&buf[..n]);
    }
    (written, error, String::from_utf8_lossy(&reply).into_owned())
}

#[test]
fn an_oversized_request_is_refused_after_a_bounded_read() {
    let env = kad_env!();
    let daemon = Daemon::start(&env);
    let pid = daemon.pid();
    let (cpu, (written, error, reply)) =
        cpu_share(pid, || send_oversized(&daemon.socket, 100 << 20));
    eprintln!("oversized request: {written} bytes taken, then {error}; daemon cpu {cpu:.3}");
    assert!(
        reply.contains("request too large (limit 65536 bytes)"),
        "the daemon's message: {reply:?}"
    );
    assert!(
        matches!(
            error.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        ),
        "the connection is closed: {error}"
    );
    // The limit, and what the socket buffers hold: not megabytes read and thrown away.
    assert!(
        written < 2 << 20,
        "the daemon read {written} bytes of a refused request"
    );
    // The CLI reports the daemon's message (the longest argument a process may be given).
    let out = daemon.kad(&["set", "--cgroup", &"x".repeat(120_000)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("request too large"), "{stderr}");
    // And the daemon answers the next one.
    daemon.kad_ok(&["list"]);
}

#[test]
fn root_clients_over_the_limit_wait_for_a_slot() {
    let env = kad_env!();
    let daemon = Daemon::start(&env);
    // Root's 64 slots, held by connections that send nothing.
    let idle: Vec<_> = (0..64)
        .map(|_| std::os::unix::net::UnixStream::connect(&daemon.socket).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let (kad, socket) = (env.kad.clone(), daemon.socket.clone());
    let clients: Vec<_> = (0..20)
        .map(|_| {
            let (kad, socket) = (kad.clone(), socket.clone());
            std::thread::spawn(move || {
                Command::new(&kad)
                    .args(["list", "--json"])
                    .env("KAD_SOCKET", &socket)
                    .output()
                    .expect("run kad list")
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    drop(idle);
    for client in clients {
        let out = client.join().unwrap();
        assert!(
            out.status.success(),
            "root queued, not refused: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_second_daemon_s_probe_leaves_no_warning_in_the_first() {
    let env = kad_env!();
    let daemon = Daemon::start(&env);
    // Only what comes after the probe: an old kernel's start-up warnings are not about it.
    daemon.kad_ok(&["list"]);
    let before = daemon.log().len();
    let other = TempDir::new("second");
    let other_bpffs = Path::new("/sys/fs/bpf").join(kad_tests::unique("second"));
    let out = daemon_command(
        &env.kad,
        &daemon.socket,
        &other.0.join("state"),
        &other_bpffs,
        &daemon.config,
    )
    .output()
    .unwrap();
    let _ = fs::remove_dir_all(&other_bpffs);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already serving"));
    // Whatever the first daemon would log for the probe is there by now.
    daemon.kad_ok(&["list"]);
    let log = daemon.log();
    let warnings: Vec<&str> = log[before..]
        .lines()
        .filter(|l| l.contains(" WARN "))
        .collect();
    assert!(warnings.is_empty(), "{warnings:#?}");
}

/// Restarts `daemon` with `count` policies in its config file, waiting for cgroups below `top`
/// that do not exist: a large status to answer.
fn with_waiting_policies(daemon: &mut Daemon, top: &TestCgroup, count: usize) {
    daemon.stop();
    let mut config = String::new();
    for i in 0..count {
        config += &format!(
            "[[policy]]\ncgroup = \"{}/waiting-{i}\"\nidle = 100\n",
            top.path.display()
        );
    }
    fs::write(&daemon.config, config).unwrap();
    daemon.restart();
}

fn rss_kb(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("read status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

#[test]
fn readers_that_do_not_read_hold_bounded_memory() {
    let env = kad_env!();
    let mut daemon = Daemon::start(&env);
    let top = TestCgroup::new(&env, "stalled");
    with_waiting_policies(&mut daemon, &top, 4000);
    let pid = daemon.pid();
    let status_size = daemon.kad_ok(&["status", "--json"]).len() as u64;
    let before = rss_kb(pid);
    // 30 connections of one user ask for status, 300 ms apart, and never read.
    let mut readers = peer_as(
        &env,
        65533,
        &["stalled-readers", daemon.socket.to_str().unwrap(), "30"],
    );
    assert_eq!(readers.line(), "STARTED");
    let mut peak = before;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(12) {
        peak = peak.max(rss_kb(pid));
        std::thread::sleep(Duration::from_millis(100));
    }
    // Root is answered meanwhile.
    daemon.kad_ok(&["status", "--json"]);
    readers.close_stdin();
    let grown = (peak.saturating_sub(before)) * 1024;
    eprintln!(
        "status {status_size} B; daemon RSS {before} kB, peak {peak} kB during the stalled readers"
    );
    assert!(
        grown < 8 * status_size,
        "RSS grew by {grown} B ({} replies of {status_size} B)",
        grown / status_size
    );
}

#[test]
fn root_has_a_socket_of_its_own_that_no_user_reaches() {
    use std::os::unix::fs::PermissionsExt as _;
    let env = kad_env!();
    let daemon = Daemon::start(&env);
    let root_socket = daemon.socket.with_file_name(format!(
        "{}.root.sock",
        daemon
            .socket
            .file_name()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches(".sock")
    ));
    let mode = fs::metadata(&root_socket)
        .unwrap_or_else(|e| panic!("{}: {e}", root_socket.display()))
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{}", root_socket.display());
    // Another user cannot connect to it.
    let mut nobody = peer_as(
        &env,
        65534,
        &[
            "request",
            root_socket.to_str().unwrap(),
            "{\"cmd\":\"list\"}",
        ],
    );
    let mut status = None;
    assert!(wait_for(Duration::from_secs(10), || {
        status = nobody.try_wait();
        status.is_some()
    }));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(1),
        "nobody reached root's socket"
    );
    // Root's CLI talks over it: it answers with the shared socket gone.
    let shared = daemon.socket.with_extension("moved");
    fs::rename(&daemon.socket, &shared).unwrap();
    let out = daemon.kad(&["list", "--json"]);
    fs::rename(&shared, &daemon.socket).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The daemon removes it when it stops.
    let mut daemon = daemon;
    daemon.stop();
    assert!(!root_socket.exists());
}
