//! The image `cargo xtask dist` builds (target/dist/kad-image_VERSION.oci.tar: `FROM scratch`
//! and the static kad), run under podman (with runc) as dist/kubernetes/kad.yaml runs it: the
//! manifest's capabilities and no others, a read-only root, no privilege escalation, the host's
//! PID namespace, the host's cgroup2 tree at /sys/fs/cgroup, bpffs, its state
//! directory, the control socket's directory and the config directory mounted. Each test loads
//! the archive into a podman storage of its own (--root, --runroot, --tmpdir in a temp dir) and
//! puts its containers below a test cgroup (--cgroup-parent), so the host's podman state and
//! the cgroup2 root are never touched.
use std::{
    fs::{self, File},
    os::{fd::AsRawFd, unix::fs::PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use kad_tests::{
    connect, dist_file, kad_env, remove_cgroup_tree, saved_table, unique, untouched, wait_for, Env,
    TempDir, TestCgroup, VERSION,
};

fn manifest() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/kubernetes/kad.yaml");
    fs::read_to_string(path).expect("read dist/kubernetes/kad.yaml")
}

/// The capabilities the manifest's kad container adds (it drops all others).
fn manifest_capabilities() -> String {
    let text = manifest();
    let added: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("add: "))
        .collect();
    assert_eq!(added.len(), 1, "one container adds capabilities");
    let caps: Vec<String> = serde_json::from_str(added[0]).expect("a flow list of strings");
    assert!(text.contains("drop: [\"ALL\"]") && text.contains("readOnlyRootFilesystem: true"));
    caps.join(",")
}

/// The arguments of the manifest's init container (`install-host ...`).
fn manifest_install_args() -> Vec<String> {
    let text = manifest();
    let mut lines = text
        .lines()
        .map(str::trim)
        .skip_while(|l| *l != "- install-host");
    let mut args = vec![lines.next().expect("an install-host argument")[2..].to_string()];
    args.extend(
        lines
            .map_while(|l| l.strip_prefix("- "))
            .filter(|a| !a.contains(':'))
            .map(str::to_string),
    );
    args
}

fn image_ref() -> String {
    format!("localhost/kad:{VERSION}")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// podman with storage of its own holding the loaded image, containers under a test cgroup.
struct Podman {
    dir: TempDir,
    parent: TestCgroup,
    containers: Vec<String>,
}

impl Podman {
    fn new(env: &Env, archive: &Path) -> Podman {
        let podman = Podman {
            dir: TempDir::new("image"),
            parent: TestCgroup::new(env, "image"),
            containers: Vec::new(),
        };
        // Every podman root shares one lock segment, which the first podman to find none
        // creates: the first command of each test's podman runs alone (as in containers.rs).
        let lock = File::create(std::env::temp_dir().join("kad-tests-podman.lock"))
            .expect("create the podman lock file");
        // SAFETY: flock on a descriptor we own; released when `lock` is closed.
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock: {}", std::io::Error::last_os_error());
        let out = podman.run(&["load", "--quiet", "--input", &archive.display().to_string()]);
        drop(lock);
        assert!(out.status.success(), "podman load: {}", stderr(&out));
        let loaded = String::from_utf8_lossy(&out.stdout);
        assert!(loaded.contains(&image_ref()), "{loaded}");
        podman
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

    /// `podman run` of the image with the manifest's security context (all capabilities
    /// dropped, read-only root, no privilege escalation), `flags`, `mounts`, then `args` (the
    /// image's entrypoint is kad).
    fn run_image(
        &mut self,
        flags: &[&str],
        mounts: &[String],
        args: &[String],
    ) -> (String, Output) {
        let name = unique("kad");
        self.containers.push(name.clone());
        let parent = format!("/{}", self.parent.relative());
        let mut command = self.command();
        command
            .arg("run")
            .args(flags)
            .args(["--name", &name, "--cgroup-parent", &parent])
            .args(["--read-only", "--cap-drop", "all"])
            .args(["--security-opt", "no-new-privileges"])
            // Root here lacks CAP_SYS_RESOURCE: podman's default limits could not be set.
            .args([
                "--ulimit",
                "nofile=1024:1024",
                "--ulimit",
                "nproc=1024:1024",
            ]);
        for mount in mounts {
            command.args(["--volume", mount]);
        }
        let out = command
            .arg(image_ref())
            .args(args)
            .output()
            .expect("run podman");
        (name, out)
    }

    fn logs(&self, name: &str) -> String {
        let out = self.run(&["logs", name]);
        format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out))
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        for name in &self.containers {
            // SIGTERM first: the daemon stops as a pod's does (its links stay pinned).
            let _ = self.run(&["rm", "--force", "--time", "10", name]);
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

/// The daemon's directory on bpffs, removed (its pins with it) when dropped, after the
/// container that pinned them (declare it before the `Podman`).
struct BpffsDir(PathBuf);

impl Drop for BpffsDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn archive() -> Option<PathBuf> {
    dist_file(&format!("kad-image_{VERSION}.oci.tar"))
}

#[test]
fn the_image_enforces_a_host_cgroups_policy_as_the_daemonset_runs_it() {
    if !kad_tests::host_only("the image") {
        return;
    }
    let env = kad_env!();
    let Some(archive) = archive() else { return };
    let bpffs = BpffsDir(PathBuf::from("/sys/fs/bpf").join(unique("image")));
    let mut podman = Podman::new(&env, &archive);
    let dirs = TempDir::new("image-dirs");
    let (state, run, config) = (
        dirs.0.join("state"),
        dirs.0.join("run"),
        dirs.0.join("config"),
    );
    for dir in [&state, &run, &config] {
        fs::create_dir_all(dir).unwrap();
    }
    fs::write(config.join("kad.toml"), "").unwrap();
    let caps = manifest_capabilities();
    let mounts = [
        // The host's whole cgroup2 tree (on a hybrid host its root is not /sys/fs/cgroup).
        format!("{}:/sys/fs/cgroup", env.root.display()),
        // mountPropagation: HostToContainer.
        "/sys/fs/bpf:/sys/fs/bpf:rslave".to_string(),
        format!("{}:/var/lib/kad", state.display()),
        format!("{}:/run/kad", run.display()),
        format!("{}:/etc/kad:ro", config.display()),
    ];
    let bpffs_arg = bpffs.0.display().to_string();
    // The manifest's arguments, less --kubernetes (no API server here) and --metrics (a port
    // of the host's network).
    let args = [
        "daemon",
        "--socket",
        "/run/kad/kad.sock",
        "--state-dir",
        "/var/lib/kad",
        "--bpffs",
        &bpffs_arg,
        "--config",
        "/etc/kad/kad.toml",
    ]
    .map(String::from);
    // hostPID; a network namespace of its own (the manifest has no hostNetwork: the daemon
    // reaches the host's and pods' connections through /proc/PID/ns/net); the capabilities the
    // manifest adds.
    assert!(manifest().contains("hostPID: true") && !manifest().contains("hostNetwork"));
    let flags = [
        "-d",
        "--pid",
        "host",
        "--network",
        "none",
        "--cap-add",
        &caps,
    ];
    let (name, out) = podman.run_image(&flags, &mounts, &args);
    assert!(out.status.success(), "podman run: {}", stderr(&out));

    // The host's kad talks to it through the mounted socket directory.
    let socket = run.join("kad.sock");
    let host_kad = |args: &[&str]| env.kad(&socket, args);
    let ready = wait_for(Duration::from_secs(90), || {
        host_kad(&["status"]).status.success()
    });
    assert!(
        ready,
        "the daemon in the image did not answer: {}",
        podman.logs(&name)
    );

    let cgroup = TestCgroup::new(&env, "image-policy");
    // A relative path: the host and the container see the same tree at different mounts.
    let relative = cgroup.relative();
    let out = host_kad(&[
        "set", "--cgroup", &relative, "--idle", "181", "--intvl", "61", "--cnt", "7",
    ]);
    assert!(
        out.status.success(),
        "kad set: {}\n{}",
        stderr(&out),
        podman.logs(&name)
    );
    // A connection made in the cgroup has the policy, read by the peer itself (getsockopt).
    let (server, client) = connect(&env, None, Some(&cgroup.path), false);
    assert_eq!(
        client.values(),
        (true, 181, 61, 7),
        "{}",
        podman.logs(&name)
    );
    assert_eq!(
        server.values(),
        untouched(),
        "the server is outside the cgroup"
    );
    // Saved in the state directory the pod mounts.
    let saved = saved_table(&state);
    assert!(
        saved.as_array().unwrap().iter().any(|e| e["cgroup"]
            .as_str()
            .unwrap_or_default()
            .ends_with(&relative)
            && e["idle"] == 181),
        "{saved}"
    );
    // The pod's root filesystem is read-only, and the daemon ran with the manifest's
    // capabilities: CapEff of its process, seen from the host (--pid host).
    let pid = podman.run(&["inspect", "--format", "{{.State.Pid}}", &name]);
    let pid = String::from_utf8_lossy(&pid.stdout).trim().to_string();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("the daemon's status");
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    // CAP_NET_ADMIN 12, CAP_SYS_PTRACE 19, CAP_SYS_ADMIN 21, CAP_PERFMON 38, CAP_BPF 39.
    let expected = [12u32, 19, 21, 38, 39].iter().fold(0u64, |m, c| m | 1 << c);
    assert_eq!(cap_eff, expected, "CapEff {cap_eff:#x}");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
}

#[test]
fn the_images_init_step_installs_kad_and_the_hook_on_the_host() {
    if !kad_tests::host_only("the image") {
        return;
    }
    let env = kad_env!();
    let Some(archive) = archive() else { return };
    let mut podman = Podman::new(&env, &archive);
    let host = TempDir::new("image-host");
    let (opt, hooks) = (host.0.join("opt-kad"), host.0.join("hooks.d"));
    fs::create_dir_all(&opt).unwrap();
    fs::create_dir_all(&hooks).unwrap();
    // The init container's mounts and arguments, as in the manifest.
    let args = manifest_install_args();
    assert_eq!(
        args,
        [
            "install-host",
            "/host/opt/kad/bin",
            "--host-dir",
            "/opt/kad/bin",
            "--hooks-dir",
            "/host/hooks.d"
        ]
    );
    let mounts = [
        format!("{}:/host/opt/kad", opt.display()),
        format!("{}:/host/hooks.d", hooks.display()),
    ];
    let (name, out) = podman.run_image(&["--network", "none"], &mounts, &args);
    assert!(
        out.status.success(),
        "install-host: {}{}",
        stderr(&out),
        podman.logs(&name)
    );

    // The binary: the static build the tests use, stripped as the image holds it.
    let installed = opt.join("bin/kad");
    let mode = fs::metadata(&installed).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o755);
    let stripped = host.0.join("kad-stripped");
    let strip = Command::new("strip")
        .arg("-o")
        .arg(&stripped)
        .arg(&env.kad)
        .output()
        .expect("run strip");
    assert!(strip.status.success(), "strip: {}", stderr(&strip));
    assert!(
        fs::read(&installed).unwrap() == fs::read(&stripped).unwrap(),
        "the image's kad is not the tested build {}",
        env.kad.display()
    );
    let version = Command::new(&installed).arg("--version").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("kad {VERSION}")
    );

    // The hook: the shipped file, pointed at the binary where the node has it.
    let hook: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(hooks.join("kad.json")).unwrap()).unwrap();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/oci-hooks.d/kad.json");
    let mut expected: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(shipped).unwrap()).unwrap();
    expected["hook"]["path"] = "/opt/kad/bin/kad".into();
    assert_eq!(hook, expected);
    // Nothing else was left there (no temporary file).
    assert_eq!(fs::read_dir(&hooks).unwrap().count(), 1);
    assert_eq!(fs::read_dir(opt.join("bin")).unwrap().count(), 1);
}
