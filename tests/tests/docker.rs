//! Docker: a real `dockerd` (Debian's `docker.io`, installed by `cargo xtask test`) started by
//! the tests with paths of its own (data root, exec root, socket, pidfile under a temp dir), no
//! networking of its own (`--iptables=false --bridge=none ...`), the cgroupfs driver, and run
//! in a test cgroup; stopped by its pid when its guard is dropped. Containers run an
//! image imported from a busybox-static rootfs, with `--network none` and a test cgroup as
//! `--cgroup-parent`, so everything stays below test cgroups and in the containers' own network
//! namespaces. `kad daemon --docker SOCKET` watches it.
//!
//! The cases run one after another on one dockerd, each with a kad of its own: every kad
//! watching a dockerd acts on all its containers, so two at once could each pass for the
//! other. The restart of dockerd has a dockerd of its own, in parallel.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use kad_tests::{
    busybox, in_cgroup, kad_env, remove_cgroup_tree, unique, wait_for, Daemon, Env, TempDir,
    TestCgroup,
};

const LABEL: &str = "kad.dev/keepalive";
const IMAGE: &str = "kad-test-busybox:1";
/// Debian's client, which speaks the API of Debian's dockerd (a newer one may precede it on
/// PATH).
const DOCKER: &str = "/usr/bin/docker";
const DOCKERD: &str = "/usr/sbin/dockerd";

fn docker_available() -> bool {
    let found = [DOCKER, DOCKERD].iter().all(|p| Path::new(p).is_file());
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "docker.io is missing under CI (cargo xtask setup installs it)"
        );
        eprintln!("SKIPPED: dockerd is missing (cargo xtask test installs docker.io)");
    }
    found
}

/// A dockerd of the tests' own, stopped (its containers removed first) and cleaned up when
/// dropped: its processes, mounts, directories and cgroups.
struct Dockerd {
    dir: TempDir,
    socket: PathBuf,
    /// Where dockerd, its containerd and the shims run.
    own: TestCgroup,
    /// The containers' --cgroup-parent.
    parent: TestCgroup,
    child: Mutex<Option<Child>>,
}

impl Dockerd {
    fn start(env: &Env) -> Dockerd {
        let dir = TempDir::new("dockerd");
        let d = Dockerd {
            socket: dir.0.join("docker.sock"),
            own: TestCgroup::new(env, "dockerd"),
            parent: TestCgroup::new(env, "docker-ctrs"),
            child: Mutex::new(None),
            dir,
        };
        d.run();
        d.import_image();
        d
    }

    /// Starts dockerd (again) and waits until it answers.
    fn run(&self) {
        let log = fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.0.join("dockerd.log"))
            .expect("dockerd log");
        let mut command = Command::new(DOCKERD);
        command
            .arg("--data-root")
            .arg(self.dir.0.join("data"))
            .arg("--exec-root")
            .arg(self.dir.0.join("exec"))
            .arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .arg("--pidfile")
            .arg(self.dir.0.join("docker.pid"))
            .args([
                "--iptables=false",
                "--bridge=none",
                "--ip-forward=false",
                "--ip-masq=false",
                "--exec-opt",
                "native.cgroupdriver=cgroupfs",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let procs = in_cgroup(&mut command, &self.own.path);
        let child = command.spawn().expect("spawn dockerd");
        drop(procs);
        *self.child.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
        let answered = wait_for(Duration::from_secs(60), || {
            self.docker(&["version"]).status.success()
        });
        assert!(answered, "dockerd did not start: {}", self.log());
    }

    /// SIGTERM to dockerd by its pid, and wait for it (SIGKILL after 20 s).
    fn stop(&self) {
        let Some(mut child) = self.child.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let exited = wait_for(Duration::from_secs(20), || {
            child.try_wait().ok().flatten().is_some()
        });
        if !exited {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.0.join("dockerd.log")).unwrap_or_default()
    }

    fn docker(&self, args: &[&str]) -> Output {
        Command::new(DOCKER)
            .arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run docker")
    }

    fn docker_ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(
            out.status.success(),
            "docker {args:?}: {}\ndockerd log (end):\n{}",
            String::from_utf8_lossy(&out.stderr),
            tail(&self.log())
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The image: a busybox-static rootfs, a relative link per applet.
    fn import_image(&self) {
        let rootfs = self.dir.0.join("rootfs");
        let bin = rootfs.join("bin");
        fs::create_dir_all(&bin).expect("mkdir rootfs/bin");
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
        let tar = self.dir.0.join("rootfs.tar");
        let out = Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .output()
            .expect("run tar");
        assert!(out.status.success(), "tar: {out:?}");
        self.docker_ok(&["import", &tar.display().to_string(), IMAGE]);
    }

    /// `docker create` (or `run -d`) of `script` with the label `value`, in the test parent.
    fn container(&self, verb: &str, label: Option<&str>, script: &str) -> Container {
        let name = unique("ctr");
        let parent = format!("/{}", self.parent.relative());
        let label = label.map(|v| format!("{LABEL}={v}"));
        let mut args = vec![verb];
        if verb == "run" {
            args.push("-d");
        }
        args.extend([
            "--name",
            &name,
            "--network",
            "none",
            "--cgroup-parent",
            &parent,
        ]);
        if let Some(l) = &label {
            args.extend(["--label", l]);
        }
        args.extend([IMAGE, "/bin/sh", "-c", script]);
        let id = self.docker_ok(&args);
        Container {
            cgroup: self.parent.path.join(&id),
            id,
            name,
        }
    }

    fn pid(&self, c: &Container) -> u32 {
        let text = self.docker_ok(&["inspect", "--format", "{{.State.Pid}}", &c.id]);
        text.parse()
            .unwrap_or_else(|_| panic!("docker inspect {}: {text:?}", c.name))
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if self.child.lock().map(|c| c.is_some()).unwrap_or(false) {
            let out = self.docker(&["ps", "-aq"]);
            let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .map(str::to_string)
                .collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f"];
                args.extend(ids.iter().map(String::as_str));
                let _ = self.docker(&args);
            }
        }
        self.stop();
        // What is left of dockerd, containerd and the shims.
        remove_cgroup_tree(&self.own.path);
        // Mounts below the directory (the data root, network namespaces), deepest first.
        let mut mounts: Vec<PathBuf> = fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4).map(PathBuf::from))
            .filter(|p| p.starts_with(&self.dir.0))
            .collect();
        mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for m in mounts {
            let path = std::ffi::CString::new(m.display().to_string()).expect("no NUL");
            // SAFETY: a NUL-terminated path; a lazy unmount of what this dockerd mounted.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
        // runc also makes the containers' parent in each cgroup v1 hierarchy of a hybrid host.
        let relative = self.parent.relative();
        for v1 in cgroup_v1_mounts() {
            let path = v1.join(&relative);
            if path.exists() {
                remove_cgroup_tree(&path);
            }
        }
    }
}

struct Container {
    id: String,
    name: String,
    /// Where the cgroupfs driver puts it: `PARENT/ID`.
    cgroup: PathBuf,
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

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// kad watching this dockerd.
fn kad_for(env: &Env, dockerd: &Dockerd) -> Daemon {
    let socket = dockerd.socket.display().to_string();
    Daemon::start_with(env, &["--docker", &socket])
}

/// The list's entry for `path`, once the daemon has it as `check` wants (or panics).
fn wait_entry(
    daemon: &Daemon,
    path: &Path,
    check: impl Fn(Option<&serde_json::Value>) -> bool,
) -> Option<serde_json::Value> {
    let key = path.display().to_string();
    let find = |list: &serde_json::Value| {
        list.as_array()
            .and_then(|a| a.iter().find(|e| e["cgroup"] == key.as_str()))
            .cloned()
    };
    let mut last = serde_json::Value::Null;
    let found = wait_for(Duration::from_secs(15), || {
        last = daemon.list();
        check(find(&last).as_ref())
    });
    assert!(found, "{key}: {last}\n{}", tail(&daemon.log()));
    find(&last)
}

fn status(daemon: &Daemon) -> serde_json::Value {
    serde_json::from_str(&daemon.kad_ok(&["status", "--json"])).expect("status --json")
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
    while let Some(c) = rest.chars().next() {
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

/// The container's first connection: a busybox nc listener and client on its loopback, both
/// kept open (their stdin never ends).
const FIRST_CONNECTION: &str = "sleep 1000 | nc -l -p 5000 & \
     sleep 0.3; until sleep 1000 | nc 127.0.0.1 5000; do sleep 0.1; done";
const POLICY: &str = "idle=151,intvl=15,cnt=3";

/// Both ends of the container's first connection have idle=151, intvl=15, cnt=3: as the kernel
/// shows them from the host (ss in the container's network namespace), and as read on each
/// socket (kad inspect).
fn assert_first_connection_has_the_policy(daemon: &Daemon, pid: u32, c: &Container) {
    let mut lines = Vec::new();
    assert!(
        wait_for(Duration::from_secs(15), || {
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
    let out = daemon.kad(&["inspect", "--container", &c.id[..12], "--json"]);
    assert!(
        out.status.success(),
        "kad inspect: {}",
        String::from_utf8_lossy(&out.stderr)
    );
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
            (&true.into(), &151.into(), &15.into(), &3.into()),
            "{c}"
        );
    }
}

fn a_labelled_container_has_its_policy_from_its_first_connection_until_docker_rm(
    env: &Env,
    dockerd: &Dockerd,
) {
    let daemon = kad_for(env, dockerd);
    assert!(wait_for(Duration::from_secs(15), || status(&daemon)
        ["docker"]["connected"]
        == true));

    // `docker run`: the policy is put at the container's cgroup path on its create event,
    // before the cgroup exists, so its very first connection has it.
    let c = dockerd.container("run", Some(POLICY), FIRST_CONNECTION);
    assert_first_connection_has_the_policy(&daemon, dockerd.pid(&c), &c);
    let entry = wait_entry(&daemon, &c.cgroup, |e| e.is_some()).expect("entry");
    assert_eq!(entry["docker"], c.name.as_str(), "{entry}");
    let text = daemon.kad_ok(&["list"]);
    assert!(text.contains(&format!("(docker {})", c.name)), "{text}");
    let report = status(&daemon);
    let detail = report["details"]
        .as_array()
        .expect("details")
        .iter()
        .find(|d| d["cgroup"] == c.cgroup.display().to_string())
        .cloned()
        .expect("detail");
    assert_eq!(
        (&detail["source"], &detail["docker"]),
        (&"docker".into(), &c.name.as_str().into()),
        "{report}"
    );
    assert_eq!(
        (&report["docker"]["api"], &report["docker"]["cgroup_driver"]),
        (&"1.41".into(), &"cgroupfs".into()),
        "{report}"
    );
    let text = daemon.kad_ok(&["status"]);
    assert!(
        text.contains(&format!("(from docker {})", c.name)),
        "{text}"
    );

    // A rename changes the name kad shows.
    let renamed = format!("{}-renamed", c.name);
    dockerd.docker_ok(&["rename", &c.id, &renamed]);
    wait_entry(&daemon, &c.cgroup, |e| {
        e.is_some_and(|e| e["docker"] == renamed.as_str())
    });

    // A restart: the cgroup goes and comes back; the policy stays at its path.
    let pid = dockerd.pid(&c);
    dockerd.docker_ok(&["restart", "-t", "0", &c.id]);
    let new_pid = dockerd.pid(&c);
    assert_ne!(new_pid, pid);
    assert_first_connection_has_the_policy(&daemon, new_pid, &c);

    // `docker rm` (the destroy event) removes it.
    dockerd.docker_ok(&["rm", "-f", &c.id]);
    wait_entry(&daemon, &c.cgroup, |e| e.is_none());
    assert!(!c.cgroup.exists());
    let saved = fs::read_to_string(daemon.state_dir.join("docker.json")).expect("docker.json");
    assert!(!saved.contains(&c.id), "{saved}");
}

fn a_container_created_now_and_started_later_has_it_from_the_start(env: &Env, dockerd: &Dockerd) {
    let daemon = kad_for(env, dockerd);
    let c = dockerd.container("create", Some(POLICY), FIRST_CONNECTION);
    // Waiting at the path: docker create makes no cgroup.
    let entry = wait_entry(&daemon, &c.cgroup, |e| e.is_some()).expect("entry");
    assert_eq!(
        (&entry["waiting"], &entry["idle"]),
        (&true.into(), &151.into())
    );
    assert!(!c.cgroup.exists());
    let saved = fs::read_to_string(daemon.state_dir.join("docker.json")).expect("docker.json");
    assert!(saved.contains(&c.id) && saved.contains(&c.name), "{saved}");
    std::thread::sleep(Duration::from_millis(500));
    dockerd.docker_ok(&["start", &c.id]);
    assert_first_connection_has_the_policy(&daemon, dockerd.pid(&c), &c);
    dockerd.docker_ok(&["rm", "-f", &c.id]);
}

fn a_bad_label_gets_no_policy_and_is_logged_with_the_container(env: &Env, dockerd: &Dockerd) {
    let daemon = kad_for(env, dockerd);
    let bad = dockerd.container("run", Some("idle=0,cnt=3"), "sleep 1000");
    let plain = dockerd.container("run", None, "sleep 1000");
    let mut report = serde_json::Value::Null;
    assert!(
        wait_for(Duration::from_secs(15), || {
            report = status(&daemon);
            report["docker"]["invalid"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
        }),
        "{report}"
    );
    let invalid = report["docker"]["invalid"][0].as_str().expect("a line");
    assert!(invalid.contains(&bad.name), "{invalid}");
    assert!(
        invalid.contains("label kad.dev/keepalive=\"idle=0,cnt=3\"")
            && invalid.contains("between 1 and 32767"),
        "{invalid}"
    );
    // Docker runs it anyway, without a policy; the unlabelled one gets none either.
    assert!(dockerd.pid(&bad) > 0 && dockerd.pid(&plain) > 0);
    assert_eq!(daemon.list(), serde_json::json!([]));
    assert_eq!(
        kad_tests::kad_attachments(&dockerd.parent.path),
        0,
        "no policy, no anchor"
    );
    let log = daemon.log();
    assert!(
        log.lines().any(|l| l.contains(&bad.name)
            && l.contains("label kad.dev/keepalive")
            && l.contains("Docker cannot be stopped from starting it")),
        "{log}"
    );
    let text = daemon.kad_ok(&["status"]);
    assert!(
        text.contains(&format!("no policy: container {}", bad.name)),
        "{text}"
    );
    dockerd.docker_ok(&["rm", "-f", &bad.id, &plain.id]);
}

fn the_first_list_reconciles_what_changed_while_kad_was_down(env: &Env, dockerd: &Dockerd) {
    let mut daemon = kad_for(env, dockerd);
    let gone = dockerd.container("create", Some("idle=300"), "sleep 1000");
    wait_entry(&daemon, &gone.cgroup, |e| e.is_some());
    daemon.stop();
    // While kad is down: one container goes, another comes.
    dockerd.docker_ok(&["rm", "-f", &gone.id]);
    let c = dockerd.container("create", Some(POLICY), FIRST_CONNECTION);
    daemon.restart();
    wait_entry(&daemon, &gone.cgroup, |e| e.is_none());
    let entry = wait_entry(&daemon, &c.cgroup, |e| e.is_some()).expect("entry");
    assert_eq!(entry["docker"], c.name.as_str());
    dockerd.docker_ok(&["start", &c.id]);
    assert_first_connection_has_the_policy(&daemon, dockerd.pid(&c), &c);
    dockerd.docker_ok(&["rm", "-f", &c.id]);
}

#[test]
fn labelled_containers_get_their_policies_from_creation_to_docker_rm() {
    if !kad_tests::host_only("the Docker watcher") {
        return;
    }
    let env = kad_env!();
    if !docker_available() {
        return;
    }
    let dockerd = Dockerd::start(&env);
    a_labelled_container_has_its_policy_from_its_first_connection_until_docker_rm(&env, &dockerd);
    a_container_created_now_and_started_later_has_it_from_the_start(&env, &dockerd);
    a_bad_label_gets_no_policy_and_is_logged_with_the_container(&env, &dockerd);
    the_first_list_reconciles_what_changed_while_kad_was_down(&env, &dockerd);
}

#[test]
fn docker_restarting_keeps_the_policies_and_the_watch_comes_back() {
    if !kad_tests::host_only("the Docker watcher") {
        return;
    }
    let env = kad_env!();
    if !docker_available() {
        return;
    }
    // A dockerd of its own: the others' must not go away under them.
    let dockerd = Dockerd::start(&env);
    let daemon = kad_for(&env, &dockerd);
    let c = dockerd.container("create", Some("idle=200"), "sleep 1000");
    wait_entry(&daemon, &c.cgroup, |e| e.is_some());

    dockerd.stop();
    let mut report = serde_json::Value::Null;
    assert!(
        wait_for(Duration::from_secs(15), || {
            report = status(&daemon);
            report["docker"]["connected"] == false
        }),
        "{report}"
    );
    assert!(report["docker"]["error"].is_string(), "{report}");
    let text = daemon.kad_ok(&["status"]);
    assert!(
        text.contains("NOT connected") && text.contains("the Docker policies in force stay"),
        "{text}"
    );
    // What was applied stays.
    let entry = wait_entry(&daemon, &c.cgroup, |e| e.is_some()).expect("kept");
    assert_eq!(entry["idle"], 200);

    let started = Instant::now();
    dockerd.run();
    assert!(
        wait_for(Duration::from_secs(30), || status(&daemon)["docker"]
            ["connected"]
            == true),
        "not reconnected: {}",
        tail(&daemon.log())
    );
    eprintln!("reconnected {:?} after dockerd's start", started.elapsed());
    // The watch is back: a new container gets its policy, a removed one loses it.
    let d = dockerd.container("run", Some(POLICY), FIRST_CONNECTION);
    assert_first_connection_has_the_policy(&daemon, dockerd.pid(&d), &d);
    dockerd.docker_ok(&["rm", "-f", &c.id]);
    wait_entry(&daemon, &c.cgroup, |e| e.is_none());
}
