//! Test harness for kad's kernel tests: unique cgroups and daemons that clean up after
//! themselves (in `Drop`, so also when a test fails), and TCP peers placed in cgroups.
//!
//! The harness does not link kad's crate. Its `bpf(2)` calls (`BPF_PROG_QUERY`,
//! `BPF_OBJ_GET`, program info), its cgroup2 and bpffs lookups in mountinfo and its cgroup ids
//! are copies written on purpose: the tests check what kad did with code that is not kad's.
use std::{
    fs::{self, File},
    io::{BufRead, BufReader, Write},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    thread::sleep,
    time::{Duration, Instant},
};

use serde::Deserialize;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A name no other test (in this or another process) uses.
pub fn unique(name: &str) -> String {
    format!(
        "kad-test-{}-{}-{name}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// What a kernel test needs; `None` (after saying why) when it cannot run here.
pub struct Env {
    pub root: PathBuf,
    pub kad: PathBuf,
    pub peer: PathBuf,
}

/// `kad_env!()` in a test: the environment, or return after saying why the test is skipped.
#[macro_export]
macro_rules! kad_env {
    () => {
        match $crate::Env::require(env!("CARGO_BIN_EXE_kad-test-peer")) {
            Some(env) => env,
            None => return,
        }
    };
}

impl Env {
    pub fn require(peer: &str) -> Option<Env> {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return skip("kernel tests need root");
        }
        let Some(root) = cgroup2_root() else {
            return skip("no cgroup2 filesystem is mounted");
        };
        if !is_bpffs_mounted() {
            return skip("bpffs is not mounted at /sys/fs/bpf (cargo xtask test mounts it)");
        }
        if !require_kernel(
            5,
            9,
            "bpf_setsockopt of the keepalive options from sock_ops",
        ) {
            return None;
        }
        let kad = kad_bin();
        if !kad.is_file() {
            return skip(&format!(
                "{} is missing: build it with cargo xtask build",
                kad.display()
            ));
        }
        Some(Env {
            root,
            kad,
            peer: PathBuf::from(peer),
        })
    }

    /// Runs `kad ARGS` against `socket`.
    pub fn kad(&self, socket: &Path, args: &[&str]) -> Output {
        Command::new(&self.kad)
            .args(args)
            .env("KAD_SOCKET", socket)
            .stdin(Stdio::null())
            .output()
            .expect("run kad")
    }
}

fn skip(reason: &str) -> Option<Env> {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("kernel test cannot run under CI: {reason}");
    }
    record_skip(reason);
    None
}

/// Whether the running kernel is at least `major.minor`, which `what` needs. If not, the
/// caller skips its test, which is said (with the kernel named) and counted. A kernel booted
/// on purpose by `cargo xtask test-kernels` (`KAD_KERNEL_MATRIX` set) may lack a feature; the
/// host kernel under `CI=true` may not: there a skip fails the test.
pub fn require_kernel(major: u32, minor: u32, what: &str) -> bool {
    let Some(reason) = lacking(&kernel_release(), (major, minor), what) else {
        return true;
    };
    if skip_fails(
        std::env::var("CI").ok().as_deref(),
        std::env::var_os("KAD_KERNEL_MATRIX").is_some(),
    ) {
        panic!("kernel test cannot run under CI: {reason}");
    }
    record_skip(&reason);
    false
}

/// False (the test is skipped, said and counted) on a kernel booted by `cargo xtask
/// test-kernels`: for tests of kad itself rather than of a kernel feature, too slow under
/// emulation to repeat on every kernel.
pub fn host_only(what: &str) -> bool {
    if std::env::var_os("KAD_KERNEL_MATRIX").is_none() {
        return true;
    }
    record_skip(&format!("{what}: run on the host kernel only"));
    false
}

/// Why a kernel of `release` cannot run a test that needs `needs` for `what`; `None` if it can.
fn lacking(release: &str, needs: (u32, u32), what: &str) -> Option<String> {
    let version = kernel_version(release)
        .unwrap_or_else(|| panic!("cannot read a version from kernel release {release:?}"));
    (version < needs).then(|| {
        format!(
            "kernel {release} lacks {what} (needs {}.{})",
            needs.0, needs.1
        )
    })
}

/// A kernel-feature skip is a failure on the host kernel under CI, not on a kernel the matrix
/// booted on purpose.
fn skip_fails(ci: Option<&str>, kernel_matrix: bool) -> bool {
    ci == Some("true") && !kernel_matrix
}

/// Says that the current test is skipped, and appends it to `KAD_SKIP_LOG` if set (so that a
/// runner that captures test output can count and show skips).
fn record_skip(reason: &str) {
    let test = std::thread::current()
        .name()
        .unwrap_or("(unnamed test)")
        .to_string();
    eprintln!("SKIPPED: {reason}");
    if let Some(log) = std::env::var_os("KAD_SKIP_LOG") {
        let line = format!("{test}: {reason}\n");
        // One write(2) of a short line to an O_APPEND file: lines of parallel tests do not mix.
        let written = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            panic!(
                "cannot record the skip in {}: {e}",
                Path::new(&log).display()
            );
        }
    }
}

/// The kernel release, as `uname -r` prints it.
pub fn kernel_release() -> String {
    // SAFETY: uname fills the zeroed struct we own; its fields are NUL-terminated.
    let mut name: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut name) } != 0 {
        panic!("uname: {}", std::io::Error::last_os_error());
    }
    unsafe { std::ffi::CStr::from_ptr(name.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// (major, minor) of a release such as `6.1.0-56-amd64`.
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor: String = parts
        .next()?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    Some((major, minor.parse().ok()?))
}

pub fn kad_bin() -> PathBuf {
    match std::env::var_os("KAD_BIN") {
        Some(path) => PathBuf::from(path),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/kad"),
    }
}

pub fn cgroup2_root() -> Option<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        (fs.split_whitespace().next()? == "cgroup2")
            .then(|| PathBuf::from(mount.split_whitespace().nth(4).unwrap_or("/")))
    })
}

fn is_bpffs_mounted() -> bool {
    fs::read_to_string("/proc/self/mountinfo").is_ok_and(|text| {
        text.lines().any(|line| {
            let mut fields = line.split(" - ");
            let mount = fields.next().unwrap_or("");
            let fs = fields.next().unwrap_or("");
            mount.split_whitespace().nth(4) == Some("/sys/fs/bpf") && fs.starts_with("bpf ")
        })
    })
}

/// The kernel default for a `net.ipv4.tcp_keepalive_*` value.
pub fn sysctl(name: &str) -> i64 {
    let path = format!("/proc/sys/net/ipv4/{name}");
    fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("read {path}: {e}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("parse {path}: {e}"))
}

/// A uniquely named directory under the temp dir, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let path = std::env::temp_dir().join(unique(name));
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A uniquely named cgroup under the cgroup2 root, removed with everything below it (processes
/// killed) when dropped.
pub struct TestCgroup {
    pub path: PathBuf,
    root: PathBuf,
}

impl TestCgroup {
    pub fn new(env: &Env, name: &str) -> TestCgroup {
        let path = env.root.join(unique(name));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        TestCgroup {
            path,
            root: env.root.clone(),
        }
    }

    /// Creates (if needed) and returns a cgroup below this one.
    pub fn child(&self, relative: &str) -> PathBuf {
        let path = self.path.join(relative);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        path
    }

    /// This cgroup's path relative to the cgroup2 root, as a user would type it.
    pub fn relative(&self) -> String {
        self.path
            .strip_prefix(&self.root)
            .expect("test cgroup under the root")
            .display()
            .to_string()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        remove_cgroup_tree(&self.path);
    }
}

/// SIGKILLs the processes of one cgroup: `cgroup.kill` (5.14+), or each process listed.
pub fn kill_cgroup(path: &Path) {
    if fs::write(path.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    for _ in 0..3 {
        let procs = fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // SAFETY: signalling a process of a cgroup this test made.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Kills the processes of a cgroup tree and removes its directories, deepest first.
pub fn remove_cgroup_tree(path: &Path) {
    if let Ok(entries) = fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    kill_cgroup(path);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match fs::remove_dir(path) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => sleep(Duration::from_millis(20)),
        }
    }
    eprintln!("warning: could not remove cgroup {}", path.display());
}

/// Moves the child into `cgroup` between fork and exec.
pub fn in_cgroup(command: &mut Command, cgroup: &Path) -> File {
    let procs = File::options()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .unwrap_or_else(|e| panic!("open {}/cgroup.procs: {e}", cgroup.display()));
    let fd = procs.as_raw_fd();
    // SAFETY: only write(2) runs between fork and exec. "0" means the writing process.
    unsafe {
        command.pre_exec(move || {
            if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // The caller keeps the file open until the child is spawned.
    procs
}

/// `kad daemon` with all four of its paths given, so that nothing of the host's is used, and
/// `--no-docker`, so that a Docker of the host's is never watched (the Docker tests add
/// `--docker SOCKET`, which overrides it).
pub fn daemon_command(
    kad: &Path,
    socket: &Path,
    state_dir: &Path,
    bpffs: &Path,
    config: &Path,
) -> Command {
    let mut command = Command::new(kad);
    command
        .arg("daemon")
        .arg("--socket")
        .arg(socket)
        .arg("--state-dir")
        .arg(state_dir)
        .arg("--bpffs")
        .arg(bpffs)
        .arg("--config")
        .arg(config)
        .arg("--no-docker");
    command
}

/// A running `kad daemon` with its own socket, state directory and bpffs directory, stopped
/// and cleaned up (pins included) when dropped.
pub struct Daemon {
    child: Option<Child>,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub bpffs: PathBuf,
    /// The daemon's --config (absent until a test writes it).
    pub config: PathBuf,
    /// More `kad daemon` arguments (e.g. --metrics).
    pub extra_args: Vec<String>,
    /// A command the daemon is run under (e.g. setpriv, prlimit); it must exec the daemon.
    pub wrapper: Vec<String>,
    kad: PathBuf,
}

impl Daemon {
    pub fn start(env: &Env) -> Daemon {
        Daemon::start_with(env, &[])
    }

    pub fn start_with(env: &Env, extra_args: &[&str]) -> Daemon {
        Daemon::start_wrapped(env, &[], extra_args)
    }

    /// The daemon run as `WRAPPER... kad daemon ... EXTRA_ARGS...`.
    pub fn start_wrapped(env: &Env, wrapper: &[&str], extra_args: &[&str]) -> Daemon {
        let name = unique("daemon");
        let dir = std::env::temp_dir().join(&name);
        fs::create_dir_all(&dir).expect("create daemon dir");
        let mut daemon = Daemon {
            child: None,
            socket: dir.join("kad.sock"),
            state_dir: dir.join("state"),
            bpffs: PathBuf::from("/sys/fs/bpf").join(&name),
            config: dir.join("kad.toml"),
            dir,
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            wrapper: wrapper.iter().map(|a| a.to_string()).collect(),
            kad: env.kad.clone(),
        };
        daemon.restart();
        daemon
    }

    /// Starts the daemon process (again) with the same paths and waits for its socket.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        let log = File::create(self.dir.join("daemon.log")).expect("create log");
        let mut command = daemon_command(
            &self.kad,
            &self.socket,
            &self.state_dir,
            &self.bpffs,
            &self.config,
        );
        if let Some((program, args)) = self.wrapper.split_first() {
            let mut wrapped = Command::new(program);
            wrapped
                .args(args)
                .arg(command.get_program())
                .args(command.get_args());
            command = wrapped;
        }
        let child = command
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn kad daemon");
        self.child = Some(child);
        // Generous: under emulation (cargo xtask test-kernels) loading takes seconds.
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            // Ready when it answers: the socket is bound before the policies are applied.
            if self.kad(&["status"]).status.success() {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!("kad daemon exited with {status}: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "kad daemon did not start: {}",
                self.log()
            );
            sleep(Duration::from_millis(20));
        }
    }

    /// Stops the daemon with SIGTERM and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the daemon with SIGKILL: a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The running daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    /// Sends a signal to the running daemon.
    pub fn signal(&self, signal: i32) {
        let child = self.child.as_ref().expect("daemon running");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, signal) };
    }

    /// The args that make another `kad` command use this daemon's directories.
    pub fn dir_args(&self) -> Vec<String> {
        vec![
            "--bpffs".into(),
            self.bpffs.display().to_string(),
            "--state-dir".into(),
            self.state_dir.display().to_string(),
        ]
    }

    /// The ids of the anchor cgroups with links pinned in this daemon's bpffs directory.
    pub fn pinned_links(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = fs::read_dir(self.bpffs.join("anchors"))
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        ids.sort_unstable();
        ids
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// `kad ARGS` against this daemon; panics with stderr unless it succeeds.
    pub fn kad_ok(&self, args: &[&str]) -> String {
        let out = self.kad(args);
        assert!(
            out.status.success(),
            "kad {args:?} failed: {}\ndaemon log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn kad(&self, args: &[&str]) -> Output {
        Command::new(&self.kad)
            .args(args)
            .env("KAD_SOCKET", &self.socket)
            .stdin(Stdio::null())
            .output()
            .expect("run kad")
    }

    /// `kad list --json`, parsed.
    pub fn list(&self) -> serde_json::Value {
        serde_json::from_str(&self.kad_ok(&["list", "--json"])).expect("list --json is JSON")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_dir_all(&self.bpffs);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The keepalive settings a peer read from its own socket with getsockopt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Report {
    pub keepalive: bool,
    pub idle: i64,
    pub intvl: i64,
    pub cnt: i64,
    /// TCP_USER_TIMEOUT in milliseconds (0: not set); absent from programs that do not say.
    #[serde(default)]
    pub user_timeout: i64,
    pub local_port: u16,
    pub peer_port: u16,
    /// `connect-off`: what the program's own setsockopt returned.
    #[serde(default)]
    pub setsockopt: Option<i64>,
}

impl Report {
    /// (keepalive, idle, intvl, cnt), for compact assertions.
    pub fn values(&self) -> (bool, i64, i64, i64) {
        (self.keepalive, self.idle, self.intvl, self.cnt)
    }
}

/// What a socket untouched by kad reports.
pub fn untouched() -> (bool, i64, i64, i64) {
    (
        false,
        sysctl("tcp_keepalive_time"),
        sysctl("tcp_keepalive_intvl"),
        sysctl("tcp_keepalive_probes"),
    )
}

/// A process running a program (in a cgroup or not), killed when dropped.
pub struct Process {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Process {
    pub fn spawn(mut command: Command, cgroup: Option<&Path>) -> Process {
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let _procs = cgroup.map(|cg| in_cgroup(&mut command, cg));
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {command:?}: {e}"));
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        Process {
            child,
            stdin,
            stdout,
        }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits (up to 10 s) for the process to exit; returns its exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let mut status = None;
        wait_for(Duration::from_secs(10), || {
            status = self.child.try_wait().ok().flatten();
            status.is_some()
        });
        status.and_then(|s| s.code())
    }

    /// Closes the process's standard input (the test peers take that as "stop").
    pub fn close_stdin(&mut self) {
        drop(self.stdin.take());
    }

    /// The exit status, if the process has exited.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("read from peer");
        assert!(!line.is_empty(), "peer exited without output");
        line.trim_end().to_string()
    }

    pub fn report(&mut self) -> Report {
        let line = self.line();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad report {line:?}: {e}"))
    }

    pub fn write(&mut self, data: &[u8]) {
        if let Some(stdin) = self.stdin.as_mut() {
            let _ = stdin.write_all(data);
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A listening test peer; `port` is where it accepts its one connection.
pub fn listen(env: &Env, addr: &str, cgroup: Option<&Path>) -> (Process, u16) {
    let mut command = Command::new(&env.peer);
    command.args(["listen", addr]);
    let mut server = Process::spawn(command, cgroup);
    let line = server.line();
    let port = line
        .strip_prefix("LISTENING ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected listener output {line:?}"));
    (server, port)
}

/// Opens one connection from a peer in `client_cg` to a peer in `server_cg` (None: wherever the
/// test runs, which has no kad policy) and returns what each end reports.
pub fn connect(
    env: &Env,
    server_cg: Option<&Path>,
    client_cg: Option<&Path>,
    ipv6: bool,
) -> (Report, Report) {
    let host = if ipv6 { "[::1]" } else { "127.0.0.1" };
    let (mut server, port) = listen(env, &format!("{host}:0"), server_cg);
    let mut command = Command::new(&env.peer);
    command.args(["connect", &format!("{host}:{port}")]);
    let mut client = Process::spawn(command, client_cg);
    let client_report = client.report();
    let server_report = server.report();
    assert_eq!(
        server_report.peer_port, client_report.local_port,
        "the two ends of one connection"
    );
    (server_report, client_report)
}

/// `BPF_CGROUP_SOCK_OPS`, the attach type of kad's program (`enum bpf_attach_type`).
pub const ATTACH_SOCK_OPS: u32 = 3;

/// The kad (sock_ops) programs attached directly to `cgroup`.
pub fn kad_attachments(cgroup: &Path) -> usize {
    cgroup_programs(cgroup, ATTACH_SOCK_OPS)
        .iter()
        .filter(|name| *name == "kad_sockops")
        .count()
}

/// The kad programs attached directly to `cgroup`, of every cgroup attach type up to those of
/// 5.9: what "nothing on the root" checks, so that no kad program of any kind escapes it.
pub fn kad_programs_on(cgroup: &Path) -> Vec<String> {
    // The cgroup attach types every kernel kad runs on (5.9+) can be asked about: up to
    // BPF_CGROUP_SETSOCKOPT (22), the getpeername/getsockname ones (29-32) and
    // BPF_CGROUP_INET_SOCK_RELEASE (34); the others below 35 are not cgroup types.
    const CGROUP_TYPES: [u32; 23] = [
        0, 1, 2, 3, 6, 8, 9, 10, 11, 12, 13, 14, 15, 18, 19, 20, 21, 22, 29, 30, 31, 32, 34,
    ];
    CGROUP_TYPES
        .iter()
        .flat_map(|&t| cgroup_programs(cgroup, t))
        .filter(|name| name.starts_with("kad_"))
        .collect()
}

/// The names of the programs attached directly to `cgroup` for `attach_type`, asked of the
/// kernel itself (`BPF_PROG_QUERY`). Not through bpftool: Debian 12's bpftool sends a query
/// field that kernels before 6.0 reject, so its `cgroup show` fails there.
pub fn cgroup_programs(cgroup: &Path, attach_type: u32) -> Vec<String> {
    let dir = File::open(cgroup).unwrap_or_else(|e| panic!("open {}: {e}", cgroup.display()));
    let mut ids = [0u32; 64];
    // The query fields every kernel since 4.15 knows, and nothing after them.
    #[repr(C)]
    struct Query {
        target_fd: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        _pad: u32,
    }
    let mut query = Query {
        target_fd: dir.as_raw_fd() as u32,
        attach_type,
        query_flags: 0,
        attach_flags: 0,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        _pad: 0,
    };
    bpf(BPF_PROG_QUERY, &mut query)
        .unwrap_or_else(|e| panic!("BPF_PROG_QUERY on {}: {e}", cgroup.display()));
    ids[..query.prog_cnt as usize]
        .iter()
        .filter_map(|&id| program_name(id))
        .collect()
}

/// Points the link pinned at `link` to the program pinned at `prog` (`BPF_LINK_UPDATE`), as
/// another loader (an older kad) would have left it.
pub fn update_link(link: &Path, prog: &Path) {
    let link_fd = obj_get(link);
    let prog_fd = obj_get(prog);
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    bpf(
        BPF_LINK_UPDATE,
        &mut LinkUpdate {
            link_fd: link_fd.as_raw_fd() as u32,
            new_prog_fd: prog_fd.as_raw_fd() as u32,
            flags: 0,
            old_prog_fd: 0,
        },
    )
    .unwrap_or_else(|e| panic!("BPF_LINK_UPDATE {}: {e}", link.display()));
}

/// Attaches the program pinned at `prog` to `cgroup` through a new link (`BPF_LINK_CREATE`) and
/// pins the link at `pin`, as another loader (the first design of kad) would have.
pub fn link_cgroup(cgroup: &Path, attach_type: u32, prog: &Path, pin: &Path) {
    let prog_fd = obj_get(prog);
    let dir = File::open(cgroup).unwrap_or_else(|e| panic!("open {}: {e}", cgroup.display()));
    #[repr(C)]
    struct LinkCreate {
        prog_fd: u32,
        target_fd: u32,
        attach_type: u32,
        flags: u32,
    }
    let link = bpf(
        BPF_LINK_CREATE,
        &mut LinkCreate {
            prog_fd: prog_fd.as_raw_fd() as u32,
            target_fd: dir.as_raw_fd() as u32,
            attach_type,
            flags: 0,
        },
    )
    .unwrap_or_else(|e| panic!("BPF_LINK_CREATE on {}: {e}", cgroup.display()));
    let link = owned(link);
    obj_path(BPF_OBJ_PIN, pin, link.as_raw_fd() as u32)
        .unwrap_or_else(|e| panic!("BPF_OBJ_PIN {}: {e}", pin.display()));
}

/// A descriptor for the BPF object pinned at `path` (`BPF_OBJ_GET`).
fn obj_get(path: &Path) -> std::os::fd::OwnedFd {
    let fd = obj_path(BPF_OBJ_GET, path, 0)
        .unwrap_or_else(|e| panic!("BPF_OBJ_GET {}: {e}", path.display()));
    owned(fd)
}

/// `BPF_OBJ_PIN` or `BPF_OBJ_GET` of `path` (the `obj` member of `union bpf_attr`, which both
/// commands use; `bpf_fd` is the object to pin, 0 for a get).
fn obj_path(cmd: libc::c_long, path: &Path, bpf_fd: u32) -> std::io::Result<i32> {
    let name = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("a path");
    #[repr(C)]
    struct ObjPath {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    bpf(
        cmd,
        &mut ObjPath {
            pathname: name.as_ptr() as u64,
            bpf_fd,
            file_flags: 0,
        },
    )
}

/// A descriptor the kernel just returned, closed when dropped.
fn owned(fd: i32) -> std::os::fd::OwnedFd {
    // SAFETY: the kernel just gave us this descriptor and nothing else owns it.
    unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
}

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;

/// The name of loaded program `id`; `None` if it went away meanwhile.
fn program_name(id: u32) -> Option<String> {
    #[repr(C)]
    struct GetFd {
        prog_id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let fd = bpf(
        BPF_PROG_GET_FD_BY_ID,
        &mut GetFd {
            prog_id: id,
            next_id: 0,
            open_flags: 0,
        },
    )
    .ok()?;
    let fd = owned(fd);
    // `struct bpf_prog_info` up to its name (offset 64, 16 bytes), as in every kernel since 4.15.
    let mut info = [0u8; 80];
    #[repr(C)]
    struct GetInfo {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    bpf(
        BPF_OBJ_GET_INFO_BY_FD,
        &mut GetInfo {
            bpf_fd: fd.as_raw_fd() as u32,
            info_len: info.len() as u32,
            info: info.as_mut_ptr() as u64,
        },
    )
    .unwrap_or_else(|e| panic!("BPF_OBJ_GET_INFO_BY_FD for program {id}: {e}"));
    let name = &info[64..80];
    let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Some(String::from_utf8_lossy(&name[..len]).into_owned())
}

/// The bpf(2) syscall with `attr` (which it may write back into); its result or the error.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<i32> {
    // SAFETY: attr is a live, exclusively borrowed struct of the size passed, laid out as the
    // kernel's union bpf_attr member for cmd; pointers in it point to buffers we own.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(ret as i32)
}

/// The inode number of a cgroup directory: its id as BPF sees it.
pub fn cgroup_id(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).expect("stat cgroup").ino()
}

/// `ss -tnoH state established` for the sockets connecting to `port`, as another process sees
/// them: "timer:(keepalive,2min59sec,0)" shows a running keepalive timer.
pub fn ss_to_port(port: u16) -> String {
    let out = Command::new("ss")
        .args([
            "-tnoH",
            "state",
            "established",
            &format!("( dport = :{port} )"),
        ])
        .output()
        .expect("run ss (iproute2)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The policy table a daemon saved in `state_dir`: `policies.json` with the changes of its
/// journal (`policies.journal`, one `{"set": {...}}` or `{"unset": "path"}` per line) folded in,
/// as an array of entries ordered by cgroup.
pub fn saved_table(state_dir: &Path) -> serde_json::Value {
    let mut table = std::collections::BTreeMap::new();
    if let Ok(text) = fs::read_to_string(state_dir.join("policies.json")) {
        let entries: Vec<serde_json::Value> =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("policies.json: {e}: {text}"));
        for e in entries {
            table.insert(e["cgroup"].as_str().unwrap_or_default().to_string(), e);
        }
    }
    if let Ok(text) = fs::read_to_string(state_dir.join("policies.journal")) {
        for line in text.lines() {
            let change: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("policies.journal: {e}: {line}"));
            if let Some(e) = change.get("set") {
                table.insert(
                    e["cgroup"].as_str().unwrap_or_default().to_string(),
                    e.clone(),
                );
            } else if let Some(cgroup) = change.get("unset").and_then(|c| c.as_str()) {
                table.remove(cgroup);
            }
        }
    }
    serde_json::Value::Array(table.into_values().collect())
}

/// Polls `check` until it holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        sleep(Duration::from_millis(25));
    }
}

/// Two network namespaces joined by a veth pair (192.0.2.1 in `a`, 192.0.2.2 in `b`, a
/// documentation range that is never routed), deleted when dropped. Traffic between them never
/// touches the machine's interfaces.
pub struct NetnsPair {
    pub a: String,
    pub b: String,
    pub b_dev: String,
}

impl NetnsPair {
    pub fn new() -> NetnsPair {
        let id = COUNTER.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{}{id}", std::process::id() % 100_000);
        let pair = NetnsPair {
            a: format!("kadt-a-{tag}"),
            b: format!("kadt-b-{tag}"),
            b_dev: format!("kvb{tag}"),
        };
        let a_dev = format!("kva{tag}");
        let ip = |args: &[&str]| {
            let out = Command::new("ip")
                .args(args)
                .output()
                .expect("run ip (iproute2)");
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ip(&["netns", "add", &pair.a]);
        ip(&["netns", "add", &pair.b]);
        ip(&[
            "-n",
            &pair.a,
            "link",
            "add",
            &a_dev,
            "type",
            "veth",
            "peer",
            "name",
            &pair.b_dev,
            "netns",
            &pair.b,
        ]);
        ip(&["-n", &pair.a, "addr", "add", "192.0.2.1/24", "dev", &a_dev]);
        ip(&[
            "-n",
            &pair.b,
            "addr",
            "add",
            "192.0.2.2/24",
            "dev",
            &pair.b_dev,
        ]);
        for (ns, dev) in [(&pair.a, &a_dev), (&pair.b, &pair.b_dev)] {
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        pair
    }

    /// `cmd args` run inside namespace `ns`.
    pub fn command(ns: &str, program: &Path, args: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", ns]).arg(program).args(args);
        command
    }

    /// The far end stops answering: its interface goes down.
    pub fn silence_b(&self) {
        let out = Command::new("ip")
            .args(["-n", &self.b, "link", "set", &self.b_dev, "down"])
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Default for NetnsPair {
    fn default() -> Self {
        NetnsPair::new()
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// The statically linked busybox (Debian's busybox-static, which `cargo xtask test` installs).
/// Tests that need it fail without it: they check what no LD_PRELOAD library can reach.
pub fn busybox() -> PathBuf {
    ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .expect("busybox-static is missing (cargo xtask setup installs it)")
}

/// A tmpfs of `size` (e.g. "64k") mounted at a new directory `path`, unmounted (lazily, so even
/// while a daemon still holds it open) and removed when dropped.
pub struct TmpfsMount {
    pub path: PathBuf,
}

impl TmpfsMount {
    pub fn new(path: &Path, size: &str) -> TmpfsMount {
        fs::create_dir_all(path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount tmpfs at {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        TmpfsMount {
            path: path.to_path_buf(),
        }
    }

    /// Writes a file until the filesystem is full; returns its path.
    pub fn fill(&self) -> PathBuf {
        let filler = self.path.join("filler");
        let mut file = File::create(&filler).expect("create filler");
        let block = vec![0u8; 4096];
        loop {
            match file.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", self.path.display()),
            }
        }
        filler
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let Ok(c_path) = std::ffi::CString::new(self.path.as_os_str().as_encoded_bytes()) else {
            return;
        };
        // SAFETY: umount2 of a path we mounted; MNT_DETACH returns at once.
        unsafe { libc::umount2(c_path.as_ptr(), libc::MNT_DETACH) };
        let _ = fs::remove_dir(&self.path);
    }
}

/// A copy of the kad binary that user nobody (65534) can run (the build directory may not be
/// reachable for it), removed when dropped.
pub struct NobodyKad {
    dir: TempDir,
    pub kad: PathBuf,
}

impl NobodyKad {
    pub fn new(env: &Env) -> NobodyKad {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new("nobody-bin");
        fs::set_permissions(&dir.0, fs::Permissions::from_mode(0o755)).expect("chmod bin dir");
        let kad = dir.0.join("kad");
        fs::copy(&env.kad, &kad).expect("copy kad");
        NobodyKad { dir, kad }
    }

    /// `kad ARGS` as user nobody against `socket`.
    pub fn run(&self, socket: &Path, args: &[&str]) -> Output {
        loop {
            let run = Command::new(&self.kad)
                .args(args)
                .env("KAD_SOCKET", socket)
                .current_dir(&self.dir.0)
                .uid(65534)
                .gid(65534)
                .stdin(Stdio::null())
                .output();
            match run {
                // Another test thread forked while the copy was open for writing: try again.
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                    sleep(Duration::from_millis(20))
                }
                other => return other.expect("run kad as nobody"),
            }
        }
    }
}

/// The Go test peer (tests/go/gopeer.go), built statically with Debian's golang-go into a
/// directory of its own (binary, build cache and GOPATH), removed when dropped. No network
/// is used: the program needs only Go's standard library.
pub struct GoPeer {
    _dir: TempDir,
    pub bin: PathBuf,
}

impl GoPeer {
    pub fn build() -> GoPeer {
        let go = ["/usr/bin/go", "/usr/lib/go/bin/go"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .expect("golang-go is missing (cargo xtask test installs it)");
        let dir = TempDir::new("go");
        let bin = dir.0.join("gopeer");
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("go/gopeer.go");
        let out = Command::new(go)
            .arg("build")
            .arg("-o")
            .arg(&bin)
            .arg(&source)
            .current_dir(&dir.0)
            .env("CGO_ENABLED", "0")
            .env("GOCACHE", dir.0.join("cache"))
            .env("GOPATH", dir.0.join("gopath"))
            .env("GOFLAGS", "")
            .env("GOPROXY", "off")
            .env("GOTOOLCHAIN", "local")
            .output()
            .expect("run go build");
        assert!(
            out.status.success(),
            "go build {}: {}",
            source.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        GoPeer { _dir: dir, bin }
    }

    /// `gopeer listen ADDR` in `cgroup`; returns it and its port.
    pub fn listen(&self, addr: &str, cgroup: Option<&Path>) -> (Process, u16) {
        let mut command = Command::new(&self.bin);
        command.args(["listen", addr]);
        let mut server = Process::spawn(command, cgroup);
        let line = server.line();
        let port = line
            .strip_prefix("LISTENING ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected Go listener output {line:?}"));
        (server, port)
    }

    /// `gopeer connect ADDR` in `cgroup`.
    pub fn connect(&self, addr: &str, cgroup: Option<&Path>) -> Process {
        let mut command = Command::new(&self.bin);
        command.args(["connect", addr]);
        Process::spawn(command, cgroup)
    }

    /// A connection from a Go client in `client_cg` to a Go server in `server_cg`, held
    /// until the processes are dropped; each end's report.
    pub fn pair(
        &self,
        server_cg: Option<&Path>,
        client_cg: Option<&Path>,
    ) -> (Process, Report, Process, Report) {
        let (mut server, port) = self.listen("127.0.0.1:0", server_cg);
        let mut client = self.connect(&format!("127.0.0.1:{port}"), client_cg);
        let client_report = client.report();
        let server_report = server.report();
        assert_eq!(server_report.peer_port, client_report.local_port);
        (server, server_report, client, client_report)
    }
}

/// A loopback address with a port free at the time of the call (for `--metrics`).
pub fn free_port() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    let port = listener.local_addr().expect("local address").port();
    format!("127.0.0.1:{port}")
}

/// One `GET /metrics` against `addr`: the whole response, status line first.
pub fn scrape(addr: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("set a read timeout");
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").expect("send the request");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernel_skip_names_the_kernel_and_fails_only_on_the_host_under_ci() {
        assert_eq!(
            lacking("5.10.0-46-amd64", (5, 15), "iter/tcp bpf_setsockopt").as_deref(),
            Some("kernel 5.10.0-46-amd64 lacks iter/tcp bpf_setsockopt (needs 5.15)")
        );
        assert_eq!(lacking("6.1.0-56-amd64", (5, 15), "x"), None);
        assert_eq!(lacking("5.15.0", (5, 15), "x"), None);
        assert!(skip_fails(Some("true"), false));
        assert!(!skip_fails(Some("true"), true));
        assert!(!skip_fails(None, false));
        assert!(!skip_fails(Some("false"), false));
    }
}

/// (keepalive, idle, intvl, cnt) of one socket.
pub type Values = (bool, i64, i64, i64);

#[derive(Deserialize)]
pub struct PairReport {
    pub client: Report,
    pub server: Report,
}

/// One connection held open by one process (both ends), in `cgroup`, in network namespace
/// `netns` (None: the test's own).
pub struct Pair(Process);

impl Pair {
    pub fn open(env: &Env, cgroup: &Path, netns: Option<&str>) -> (Pair, PairReport) {
        Pair::open_at(env, cgroup, netns, "127.0.0.1:0")
    }

    pub fn open_at(
        env: &Env,
        cgroup: &Path,
        netns: Option<&str>,
        addr: &str,
    ) -> (Pair, PairReport) {
        let command = match netns {
            Some(ns) => NetnsPair::command(ns, &env.peer, &["pair", addr]),
            None => {
                let mut c = Command::new(&env.peer);
                c.args(["pair", addr]);
                c
            }
        };
        let mut pair = Pair(Process::spawn(command, Some(cgroup)));
        let first = pair.read();
        (pair, first)
    }

    pub fn read(&mut self) -> PairReport {
        let line = self.0.line();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad pair report {line:?}: {e}"))
    }

    /// Both ends' (keepalive, idle, intvl, cnt) now.
    pub fn now(&mut self) -> (Values, Values) {
        self.0.write(b"\n");
        let r = self.read();
        (r.client.values(), r.server.values())
    }
}
