//! Containers: podman with runc (Debian's, installed by `cargo xtask test`) runs the hook of
//! dist/oci-hooks.d/kad.json, pointed at the test's kad binary and daemon. Each test uses its own
//! podman storage (--root, --runroot, --tmpdir in a temp dir) and a --cgroup-parent that is a
//! test cgroup, so the host's podman state and the cgroup2 root are never touched.
use std::{
    fs::{self, File},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use kad_tests::{
    busybox, connect, kad_env, remove_cgroup_tree, unique, wait_for, Daemon, Env, Process, TempDir,
    TestCgroup,
};

const ANNOTATION: &str = "kad.dev/keepalive";

/// podman with storage of its own, the hooks directory of the test, and runc.
struct Podman {
    dir: TempDir,
    rootfs: PathBuf,
    hooks: PathBuf,
    run_dir: PathBuf,
    parent: TestCgroup,
    containers: Vec<String>,
}

fn podman_available() -> bool {
    let found = ["/usr/bin/podman", "/usr/sbin/runc"]
        .iter()
        .all(|p| Path::new(p).is_file());
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "podman and runc are missing under CI (cargo xtask setup installs them)"
        );
        eprintln!("SKIPPED: podman or runc is missing (cargo xtask test installs them)");
    }
    found
}

impl Podman {
    /// A podman whose hooks directory holds the shipped hook, run as `env.kad` against `socket`.
    fn new(env: &Env, socket: &Path) -> Podman {
        let dir = TempDir::new("podman");
        let rootfs = dir.0.join("rootfs");
        let bin = rootfs.join("bin");
        fs::create_dir_all(&bin).expect("mkdir rootfs/bin");
        // busybox-static and a relative link per applet: the container needs nothing else.
        fs::copy(busybox(), bin.join("busybox")).expect("copy busybox");
        let list = Command::new(busybox())
            .arg("--list")
            .output()
            .expect("busybox --list");
        for applet in String::from_utf8_lossy(&list.stdout).lines() {
            if applet != "busybox" && !applet.contains('/') {
                std::os::unix::fs::symlink("busybox", bin.join(applet)).expect("link applet");
            }
        }
        let hooks = dir.0.join("hooks.d");
        fs::create_dir_all(&hooks).expect("mkdir hooks.d");
        let run_dir = dir.0.join("hook-records");
        write_hook(&hooks, env, socket, &run_dir);
        let podman = Podman {
            rootfs,
            hooks,
            run_dir,
            parent: TestCgroup::new(env, "podman"),
            containers: Vec::new(),
            dir,
        };
        podman.first_run();
        podman
    }

    /// Every podman root of the machine shares one lock segment (`/dev/shm/libpod_lock`),
    /// which the first podman to find none creates: two fresh roots starting at once on a
    /// fresh machine (CI, a test VM) both try, and one fails with "file exists". The first
    /// command of each test's podman runs alone, under a lock file.
    fn first_run(&self) {
        let lock = File::create(std::env::temp_dir().join("kad-tests-podman.lock"))
            .expect("create the podman lock file");
        // SAFETY: flock on a descriptor we own; released when `lock` is closed.
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock: {}", std::io::Error::last_os_error());
        let out = self.run(&["info", "--format", "{{.Host.OCIRuntime.Name}}"]);
        assert!(
            out.status.success(),
            "podman info: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn command(&self) -> Command {
        let mut command = Command::new("podman");
        command
            .arg("--root")
            .arg(self.dir.0.join("storage"))
            .arg("--runroot")
            .arg(self.dir.0.join("run"))
            .arg("--tmpdir")
            .arg(self.dir.0.join("tmp"))
            .arg("--hooks-dir")
            .arg(&self.hooks)
            .args([
                "--runtime",
                "runc",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "file",
                "--storage-driver",
                "vfs",
                "--log-level",
                "error",
            ])
            .stdin(Stdio::null());
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command().args(args).output().expect("run podman")
    }

    /// `podman run -d` of `script` in a container with the annotation `value`.
    /// A new container name, removed by the guard.
    fn name(&mut self) -> String {
        let name = unique("ctr");
        self.containers.push(name.clone());
        name
    }

    fn start(&mut self, annotation: Option<&str>, script: &str) -> (String, Output) {
        let name = self.name();
        let parent = format!("/{}", self.parent.relative());
        let mut args = vec![
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            "none",
            // Root here lacks CAP_SYS_RESOURCE: podman's default limits could not be set.
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            "--cgroup-parent",
            &parent,
        ];
        // As a user types it: podman splits the value at its commas, the hook puts it back.
        let annotation = annotation.map(|v| format!("{ANNOTATION}={v}"));
        if let Some(a) = &annotation {
            args.extend(["--annotation", a]);
        }
        let rootfs = self.rootfs.display().to_string();
        // --rootfs is a flag: the rootfs takes the image's place, options go before it.
        args.extend(["--rootfs", &rootfs, "/bin/sh", "-c", script]);
        let out = self.run(&args);
        (name, out)
    }

    fn pid(&self, name: &str) -> u32 {
        let out = self.run(&["inspect", "--format", "{{.State.Pid}}", name]);
        let text = String::from_utf8_lossy(&out.stdout);
        text.trim()
            .parse()
            .unwrap_or_else(|_| panic!("podman inspect {name}: {text:?} {}", stderr(&out)))
    }

    fn id(&self, name: &str) -> String {
        let out = self.run(&["inspect", "--format", "{{.Id}}", name]);
        assert!(out.status.success(), "podman inspect: {}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The container's cgroup as podman's cgroupfs driver makes it.
    fn cgroup_of(&self, id: &str) -> PathBuf {
        self.parent.path.join(format!("libpod-{id}"))
    }

    fn records(&self) -> usize {
        fs::read_dir(&self.run_dir).map_or(0, |d| d.count())
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        for name in &self.containers {
            let _ = self.run(&["rm", "-f", "-t", "0", name]);
        }
        // runc also makes the parent in each cgroup v1 hierarchy of a hybrid host.
        let relative = self.parent.relative();
        for v1 in cgroup_v1_mounts() {
            let path = v1.join(&relative);
            if path.exists() {
                remove_cgroup_tree(&path);
            }
        }
    }
}

fn cgroup_v1_mounts() -> Vec<PathBuf> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            let point = mount.split_whitespace().nth(4)?;
            (fs.split_whitespace().next()? == "cgroup").then(|| PathBuf::from(point))
        })
        .collect()
}

/// The shipped hooks.d file, with the test's kad binary, socket and record directory.
fn write_hook(hooks: &Path, env: &Env, socket: &Path, run_dir: &Path) {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/oci-hooks.d/kad.json");
    let text = fs::read_to_string(&shipped).expect("read dist/oci-hooks.d/kad.json");
    let mut hook: serde_json::Value = serde_json::from_str(&text).expect("kad.json is JSON");
    hook["hook"]["path"] = env.kad.display().to_string().into();
    let args = hook["hook"]["args"]
        .as_array_mut()
        .expect("kad.json has hook.args");
    args.extend(
        [
            "--socket".to_string(),
            socket.display().to_string(),
            "--run-dir".to_string(),
            run_dir.display().to_string(),
        ]
        .map(Into::into),
    );
    fs::write(hooks.join("kad.json"), hook.to_string()).expect("write hook");
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `ss -tnoH state established` in the network namespace of `pid`.
fn ss_in(pid: u32) -> String {
    let out = Command::new("nsenter")
        .args([
            "-t",
            &pid.to_string(),
            "-n",
            "ss",
            "-tnoH",
            "state",
            "established",
        ])
        .output()
        .expect("run nsenter ss");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Seconds left on a keepalive timer in an `ss -o` line, e.g. `timer:(keepalive,2min30sec,0)`.
fn keepalive_secs(line: &str) -> Option<f64> {
    let timer = line.split("timer:(keepalive,").nth(1)?.split(',').next()?;
    let mut secs = 0.0;
    let mut number = String::new();
    let mut rest = timer;
    while !rest.is_empty() {
        let c = rest.chars().next()?;
        if c.is_ascii_digit() || c == '.' {
            number.push(c);
            rest = &rest[1..];
            continue;
        }
        let value: f64 = number.parse().ok()?;
        number.clear();
        let (unit, factor) = [("min", 60.0), ("sec", 1.0), ("ms", 0.001)]
            .into_iter()
            .find(|(u, _)| rest.starts_with(u))?;
        secs += value * factor;
        rest = &rest[unit.len()..];
    }
    Some(secs)
}

/// The container's first connection: a listener and a client on its loopback, both busybox,
/// both kept open (their stdin never ends).
/// Both ends of the container's first connection (FIRST_CONNECTION) have idle=151, intvl=15,
/// cnt=3: as the kernel shows them from the host (ss), and as read on each socket (kad inspect).
fn assert_first_connection_has_the_policy(daemon: &Daemon, pid: u32, id: &str) {
    // Both ends, as the kernel shows them from the host.
    let mut lines = Vec::new();
    assert!(
        wait_for(Duration::from_secs(10), || {
            lines = ss_in(pid)
                .lines()
                .filter(|l| l.contains(":5000"))
                .map(str::to_string)
                .collect();
            lines.len() == 2
        }),
        "the container's connection did not show up: {lines:?}"
    );
    for line in &lines {
        let left = keepalive_secs(line).unwrap_or_else(|| panic!("no keepalive timer on {line:?}"));
        // idle=151: a timer armed with the policy, not the kernel's 7200 s.
        assert!(left > 130.0 && left <= 151.0, "timer {left} s: {line}");
    }
    // The values themselves, read on each socket.
    // --container with the short id `podman ps` shows: the same cgroup as the process's.
    let out = daemon.kad(&["inspect", "--container", &id[..12], "--json"]);
    assert!(out.status.success(), "kad inspect: {}", stderr(&out));
    let connections: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("inspect --json");
    let ours: Vec<_> = connections
        .as_array()
        .expect("array")
        .iter()
        .filter(|c| {
            c["local"].as_str().is_some_and(|a| a.ends_with(":5000"))
                || c["remote"].as_str().is_some_and(|a| a.ends_with(":5000"))
        })
        .collect();
    assert_eq!(ours.len(), 2, "{connections}");
    for c in ours {
        assert_eq!(
            (&c["keepalive"], &c["idle"], &c["intvl"], &c["cnt"]),
            (
                &serde_json::json!(true),
                &serde_json::json!(151),
                &serde_json::json!(15),
                &serde_json::json!(3)
            ),
            "{c}"
        );
    }
}

const FIRST_CONNECTION: &str = "sleep 1000 | nc -l -p 5000 & \
     sleep 0.3; until sleep 1000 | nc 127.0.0.1 5000; do sleep 0.1; done";

#[test]
fn annotated_container_has_the_policy_from_its_first_connection() {
    let env = kad_env!();
    if !podman_available() {
        return;
    }
    let daemon = Daemon::start(&env);
    let mut podman = Podman::new(&env, &daemon.socket);
    let (name, out) = podman.start(Some("idle=151,intvl=15,cnt=3"), FIRST_CONNECTION);
    assert!(
        out.status.success(),
        "podman run: {}\ndaemon log:\n{}",
        stderr(&out),
        daemon.log()
    );
    let id = podman.id(&name);
    let cgroup = podman.cgroup_of(&id);
    let pid = podman.pid(&name);

    assert_first_connection_has_the_policy(&daemon, pid, &id);
    let stats = daemon.kad_ok(&["stats", "--container", &id[..12], "--json"]);
    let stats: serde_json::Value = serde_json::from_str(&stats).expect("stats --json");
    let rows = stats["cgroups"].as_array().expect("rows");
    assert_eq!(rows.len(), 1, "{stats}");
    assert_eq!(rows[0]["cgroup"], cgroup.display().to_string());
    assert_eq!(
        (&rows[0]["connect"], &rows[0]["accept"]),
        (&1.into(), &1.into()),
        "{stats}"
    );

    let list = daemon.list();
    let entry = list
        .as_array()
        .expect("array")
        .iter()
        .find(|p| p["cgroup"] == cgroup.display().to_string())
        .unwrap_or_else(|| panic!("no policy for {}: {list}", cgroup.display()));
    assert_eq!(entry["idle"], 151, "{entry}");
    assert_eq!(podman.records(), 1);

    assert_eq!(entry["container"], id.as_str(), "{entry}");
    let status = daemon.kad_ok(&["status"]);
    assert!(
        status.contains(&format!("(from container {})", &id[..12])),
        "{status}"
    );

    // A stop: the policy stays, waiting for the container's next start.
    let out = podman.run(&["stop", "-t", "0", &name]);
    assert!(out.status.success(), "podman stop: {}", stderr(&out));
    assert!(!cgroup.exists());
    let list = daemon.list();
    assert_eq!(list[0]["stopped"], true, "{list}");
    let table = daemon.kad_ok(&["list"]);
    assert!(
        table.contains("stopped: waiting for its next start"),
        "{table}"
    );

    // Started again, then a restart: createRuntime puts it in force before the new process's
    // first connection, and the counters go on from where they were.
    let out = podman.run(&["start", &name]);
    assert!(out.status.success(), "podman start: {}", stderr(&out));
    assert_first_connection_has_the_policy(&daemon, podman.pid(&name), &id);
    let out = podman.run(&["restart", "-t", "0", &name]);
    assert!(out.status.success(), "podman restart: {}", stderr(&out));
    let new_pid = podman.pid(&name);
    assert_ne!(new_pid, pid);
    assert_first_connection_has_the_policy(&daemon, new_pid, &id);
    assert_eq!(podman.records(), 1);
    let stats = daemon.kad_ok(&["stats", "--container", &id[..12], "--json"]);
    let stats: serde_json::Value = serde_json::from_str(&stats).expect("stats --json");
    let rows = stats["cgroups"].as_array().expect("rows");
    // Three first connections: the run's, the start's and the restart's.
    assert_eq!(
        (&rows[0]["connect"], &rows[0]["accept"]),
        (&3.into(), &3.into()),
        "counters across restarts: {stats}"
    );

    // Removed: its bundle goes, and the policy with it.
    let out = podman.run(&["rm", "-f", "-t", "0", &name]);
    assert!(out.status.success(), "podman rm: {}", stderr(&out));
    assert!(!cgroup.exists());
    let mut list = serde_json::Value::Null;
    assert!(
        wait_for(Duration::from_secs(10), || {
            list = daemon.list();
            !list.to_string().contains(&id)
        }),
        "policy left after podman rm: {list}\n{}",
        daemon.log()
    );
    assert_eq!(podman.records(), 0);
}

#[test]
fn a_bad_annotation_stops_the_start_with_the_message() {
    if !kad_tests::host_only("the hook's refusal of a bad annotation") {
        return;
    }
    let env = kad_env!();
    if !podman_available() {
        return;
    }
    let daemon = Daemon::start(&env);
    let mut podman = Podman::new(&env, &daemon.socket);
    let (name, out) = podman.start(Some("idle=0,cnt=3"), "sleep 1000");
    assert!(
        !out.status.success(),
        "a bad annotation started the container"
    );
    let message = stderr(&out);
    assert!(message.contains("kad.dev/keepalive"), "{message}");
    assert!(message.contains("between 1 and 32767"), "{message}");
    let state = podman.run(&["inspect", "--format", "{{.State.Status}}", &name]);
    let state = String::from_utf8_lossy(&state.stdout);
    assert_ne!(state.trim(), "running");
    assert_eq!(daemon.list(), serde_json::json!([]));
    assert_eq!(podman.records(), 0);

    // An item without `=` after a comma: podman itself refuses the command.
    let (_, out) = podman.start(Some("idle=151,enforce"), "sleep 1000");
    assert!(!out.status.success(), "podman took idle=151,enforce");
    assert!(stderr(&out).contains("KEY=VALUE"), "{}", stderr(&out));
    assert_eq!(daemon.list(), serde_json::json!([]));

    // A container without the annotation does not run the hook at all.
    let (plain, out) = podman.start(None, "sleep 1000");
    assert!(out.status.success(), "podman run: {}", stderr(&out));
    assert!(podman.pid(&plain) > 0);
    assert_eq!(daemon.list(), serde_json::json!([]));
}

/// The forms of the annotation podman takes: as typed (split by podman at its commas, put back
/// by the hook), quoted whole, with `enforce` first; each is the policy, read from the daemon.
#[test]
fn podmans_annotation_forms_give_the_same_policy() {
    if !kad_tests::host_only("podman's annotation syntax") {
        return;
    }
    let env = kad_env!();
    if !podman_available() {
        return;
    }
    let daemon = Daemon::start(&env);
    let mut podman = Podman::new(&env, &daemon.socket);
    for (typed, idle, enforce) in [
        (format!("{ANNOTATION}=idle=151,intvl=15,cnt=3"), 151, false),
        (
            format!("\"{ANNOTATION}=idle=152,intvl=15,cnt=3\""),
            152,
            false,
        ),
        (
            format!("{ANNOTATION}=enforce,idle=153,intvl=15,cnt=3"),
            153,
            true,
        ),
    ] {
        let name = podman.name();
        let parent = format!("/{}", podman.parent.relative());
        let rootfs = podman.rootfs.display().to_string();
        let out = podman.run(&[
            "run",
            "-d",
            "--network",
            "none",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            "--cgroup-parent",
            &parent,
            "--annotation",
            &typed,
            "--name",
            &name,
            "--rootfs",
            &rootfs,
            "/bin/sleep",
            "1000",
        ]);
        assert!(out.status.success(), "{typed}: {}", stderr(&out));
        let cgroup = podman.cgroup_of(&podman.id(&name)).display().to_string();
        let list = daemon.list();
        let entry = list
            .as_array()
            .expect("array")
            .iter()
            .find(|p| p["cgroup"] == cgroup)
            .unwrap_or_else(|| panic!("{typed}: no policy for {cgroup}: {list}"));
        assert_eq!(
            (
                &entry["idle"],
                &entry["intvl"],
                &entry["cnt"],
                &entry["enforce"]
            ),
            (&idle.into(), &15.into(), &3.into(), &enforce.into()),
            "{typed}: {entry}"
        );
    }
}

#[test]
fn without_the_daemon_the_container_does_not_start() {
    if !kad_tests::host_only("the hook without a daemon") {
        return;
    }
    let env = kad_env!();
    if !podman_available() {
        return;
    }
    let nowhere = TempDir::new("no-daemon");
    let mut podman = Podman::new(&env, &nowhere.0.join("kad.sock"));
    let (_, out) = podman.start(Some("idle=60"), "sleep 1000");
    assert!(!out.status.success(), "started without a daemon");
    let message = stderr(&out);
    assert!(message.contains("kad daemon is not running"), "{message}");
    assert!(message.contains("start it with"), "{message}");
    assert_eq!(podman.records(), 0);
}

/// A root filesystem with `kad` and the shared libraries it needs (none if it is static), as a
/// `FROM scratch` image of it would hold; with the mount points of the daemon's directories.
fn kad_rootfs(kad: &Path, dir: &Path) -> PathBuf {
    let rootfs = dir.join("kad-rootfs");
    for mount in [
        "sys/fs/cgroup",
        "sys/fs/bpf",
        "run/kad",
        "var/lib/kad",
        "proc",
        "dev",
    ] {
        fs::create_dir_all(rootfs.join(mount)).expect("mkdir in rootfs");
    }
    fs::copy(kad, rootfs.join("kad")).expect("copy kad");
    let ldd = Command::new("ldd").arg(kad).output().expect("run ldd");
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let Some(lib) = line
            .split_whitespace()
            .find(|word| word.starts_with('/'))
            .map(PathBuf::from)
        else {
            continue;
        };
        let target = rootfs.join(lib.strip_prefix("/").expect("absolute"));
        fs::create_dir_all(target.parent().expect("parent")).expect("mkdir lib dir");
        fs::copy(&lib, &target).unwrap_or_else(|e| panic!("copy {}: {e}", lib.display()));
    }
    rootfs
}

/// The daemon in a podman container, run as the DaemonSet runs it (host PID namespace, no
/// capabilities but kad's, read-only root), with the host's cgroup2 tree mounted at
/// /sys/fs/cgroup, where a hybrid host has it at /sys/fs/cgroup/unified: the host's CLI names
/// cgroups by the host's absolute paths and by --pid, the daemon puts the policies on those same
/// cgroups, and the host's processes there get them; the CLI shows the host's paths.
#[test]
fn a_daemon_in_a_container_applies_the_hosts_paths() {
    if !kad_tests::host_only("a daemon in a container (paths across mount points)") {
        return;
    }
    let env = kad_env!();
    if !podman_available() {
        return;
    }
    let run = TempDir::new("ctr-daemon-run");
    let socket = run.0.join("kad.sock");
    let mut podman = Podman::new(&env, &socket);
    let state = podman.dir.0.join("kad-state");
    fs::create_dir_all(&state).expect("mkdir state");
    let rootfs = kad_rootfs(&env.kad, &podman.dir.0);
    let bpffs_name = unique("ctr-daemon");
    // Removed (pins and all) when the test ends, after the container (dropped before it).
    let bpffs = TempBpffs(PathBuf::from("/sys/fs/bpf").join(&bpffs_name));
    let name = podman.name();
    let parent = format!("/{}", podman.parent.relative());
    let host_root = env.root.display().to_string();
    let mounts = [
        format!("{host_root}:/sys/fs/cgroup"),
        "/sys/fs/bpf:/sys/fs/bpf".to_string(),
        format!("{}:/run/kad", run.0.display()),
        format!("{}:/var/lib/kad", state.display()),
    ];
    let inner_bpffs = format!("/sys/fs/bpf/{bpffs_name}");
    let rootfs = rootfs.display().to_string();
    let mut args = vec![
        "run",
        "-d",
        "--name",
        &name,
        "--pid",
        "host",
        "--network",
        "host",
        "--read-only",
        "--cap-drop",
        "all",
        "--cap-add",
        "BPF,PERFMON,NET_ADMIN,SYS_ADMIN,SYS_PTRACE",
        "--security-opt",
        "no-new-privileges",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        "--cgroup-parent",
        &parent,
    ];
    for mount in &mounts {
        args.extend(["-v", mount]);
    }
    args.extend([
        "--rootfs",
        &rootfs,
        "/kad",
        "daemon",
        "--socket",
        "/run/kad/kad.sock",
        "--state-dir",
        "/var/lib/kad",
        "--bpffs",
        &inner_bpffs,
        "--config",
        "/var/lib/kad/kad.toml",
    ]);
    let out = podman.run(&args);
    assert!(
        out.status.success(),
        "podman run kad daemon: {}",
        stderr(&out)
    );
    let kad = |args: &[&str]| {
        Command::new(&env.kad)
            .args(args)
            .env("KAD_SOCKET", &socket)
            .stdin(Stdio::null())
            .output()
            .expect("run kad")
    };
    let logs = || stderr(&podman.run(&["logs", &name]));
    assert!(
        wait_for(Duration::from_secs(60), || kad(&["status"])
            .status
            .success()),
        "the daemon in the container did not answer: {}",
        logs()
    );
    let status = String::from_utf8_lossy(&kad(&["status"]).stdout).into_owned();
    if env.root != Path::new("/sys/fs/cgroup") {
        // This host mounts cgroup2 elsewhere: the status says both.
        assert!(
            status.contains("the daemon has it at /sys/fs/cgroup;"),
            "{status}"
        );
    }

    // By the host's absolute path, and by a host process's pid.
    let server_cg = TestCgroup::new(&env, "inctr-srv");
    let client_cg = TestCgroup::new(&env, "inctr-cli");
    let out = kad(&[
        "set",
        "--cgroup",
        &server_cg.path.display().to_string(),
        "--idle",
        "151",
        "--intvl",
        "15",
        "--cnt",
        "3",
    ]);
    assert!(
        out.status.success(),
        "kad set --cgroup: {}\n{}",
        stderr(&out),
        logs()
    );
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        printed.starts_with(&format!("{}: ", server_cg.path.display())),
        "{printed}"
    );
    let holder = Process::spawn(
        {
            let mut c = Command::new("sleep");
            c.arg("1000");
            c
        },
        Some(&client_cg.path),
    );
    let out = kad(&[
        "set",
        "--pid",
        &holder.id().to_string(),
        "--idle",
        "152",
        "--intvl",
        "15",
        "--cnt",
        "3",
    ]);
    assert!(
        out.status.success(),
        "kad set --pid: {}\n{}",
        stderr(&out),
        logs()
    );

    let list: serde_json::Value =
        serde_json::from_slice(&kad(&["list", "--json"]).stdout).expect("list --json");
    let mut cgroups: Vec<String> = list
        .as_array()
        .expect("array")
        .iter()
        .map(|p| {
            assert_eq!(p.get("waiting"), None, "a policy waits: {p}");
            p["cgroup"].as_str().expect("cgroup").to_string()
        })
        .collect();
    cgroups.sort();
    let mut expected = vec![
        server_cg.path.display().to_string(),
        client_cg.path.display().to_string(),
    ];
    expected.sort();
    assert_eq!(cgroups, expected, "{list}");

    // The daemon holds them by its own paths: below /sys/fs/cgroup, its mount point.
    let saved: String = fs::read_dir(&state)
        .expect("read the state directory")
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    for cg in [&server_cg, &client_cg] {
        let theirs = format!("\"/sys/fs/cgroup/{}\"", cg.relative());
        assert!(
            saved.contains(&theirs),
            "{theirs} not in the state files: {saved}"
        );
    }

    // A real connection between host processes in the two cgroups: each end has its policy.
    let (server, client) = connect(&env, Some(&server_cg.path), Some(&client_cg.path), false);
    assert_eq!(server.values(), (true, 151, 15, 3));
    assert_eq!(client.values(), (true, 152, 15, 3));

    for cg in [&server_cg, &client_cg] {
        let out = kad(&["unset", "--cgroup", &cg.path.display().to_string()]);
        assert!(out.status.success(), "kad unset: {}", stderr(&out));
    }
    let list: serde_json::Value =
        serde_json::from_slice(&kad(&["list", "--json"]).stdout).expect("list --json");
    assert_eq!(list, serde_json::json!([]));
    drop(holder);
    // The container goes before its bpffs directory and the test cgroups.
    let _ = podman.run(&["rm", "-f", "-t", "5", &name]);
    drop(bpffs);
}

/// A bpffs directory of a daemon that is not the test's `Daemon`, removed when dropped.
struct TempBpffs(PathBuf);

impl Drop for TempBpffs {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
