//! Installs or checks, idempotently, what building and testing kad needs on a fresh Debian 12
//! machine: rust-src for the nightly, bpf-linker built against Debian's LLVM 22, the musl target
//! and Debian's musl-tools (kad is one static binary), cargo-deb and lintian for the package,
//! the packages the tests use, and the bpffs mount.
use std::{path::Path, process::Command};

use anyhow::{bail, Context as _, Result};

use crate::run;

/// The bpf-linker release known to build against Debian's llvm-22-dev.
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PACKAGES: &[&str] = &["llvm-22-dev", "libpolly-22-dev", "libzstd-dev"];
/// The target kad is built for: a static binary (static-pie), for every host and the image.
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";
/// The cargo-deb release `cargo xtask dist` packages with.
const CARGO_DEB_VERSION: &str = "3.8.0";

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Build,
    /// Build, then the package and the image (`cargo xtask dist`).
    Dist,
    /// Dist, then every test.
    Test,
}

pub fn all(purpose: Purpose) -> Result<()> {
    let mut apt = Apt::default();
    nightly_components()?;
    bpf_linker(&mut apt)?;
    musl(&mut apt)?;
    if purpose != Purpose::Build {
        dist_tools(&mut apt)?;
    }
    if purpose == Purpose::Test {
        // busybox-static: a static client no LD_PRELOAD reaches; bpftool: to load another
        // vendor's program and to read run statistics in the bench; iproute2 (ss) and file: to
        // check sockets and binaries from outside; systemd: to verify the unit file; clang and
        // libbpf-dev: to build another vendor's sock_ops program that the tests run beside kad's;
        // golang-go (a static Go peer is built in the tests) and redis-server: real programs
        // that set their own keepalive; podman and runc (dist_tools): to run containers with
        // the OCI hook and the image; docker.io: the dockerd the Docker tests start themselves,
        // with paths of their own; python3-venv: a venv for kubernetes-validate (PyPI), which
        // checks dist/kubernetes; prometheus (promtool with it): checks dist/prometheus's rules
        // and evaluates dist/grafana's dashboard against a real kad (about 22 MB to fetch, 330
        // MB installed, 10 s to install).
        let missing: Vec<&str> = [
            ("/usr/bin/clang", "clang"),
            ("/usr/include/bpf/bpf_helpers.h", "libbpf-dev"),
            ("/bin/busybox", "busybox-static"),
            ("/usr/sbin/bpftool", "bpftool"),
            ("/usr/bin/ss", "iproute2"),
            ("/usr/bin/file", "file"),
            ("/usr/bin/systemd-analyze", "systemd"),
            ("/usr/bin/go", "golang-go"),
            ("/usr/bin/redis-server", "redis-server"),
            ("/usr/sbin/dockerd", "docker.io"),
            ("/usr/bin/nsenter", "util-linux"),
            ("/usr/share/doc/python3-venv", "python3-venv"),
            ("/usr/bin/prometheus", "prometheus"),
        ]
        .into_iter()
        .filter(|(tool, _)| !Path::new(tool).exists())
        .map(|(_, package)| package)
        .collect();
        if !missing.is_empty() {
            apt.install(&missing)?;
        }
        kubernetes_validate()?;
    }
    bpffs()?;
    Ok(())
}

/// Installs those of `packages` that are missing.
pub fn install(packages: &[&str]) -> Result<()> {
    Apt::default().install(packages)
}

/// What `cargo xtask test-system` needs: QEMU, mmdebstrap and mke2fs (`-d`). From
/// bookworm-backports where the host's apt has it: there `qemu-utils` may already come from
/// backports, and bookworm's `qemu-system-x86` conflicts with it.
pub fn system_test_tools() -> Result<()> {
    let packages = ["qemu-system-x86", "qemu-utils", "mmdebstrap", "e2fsprogs"];
    let policy = output_of(Command::new("apt-cache").arg("policy")).unwrap_or_default();
    let backports = policy.lines().any(|l| l.contains("bookworm-backports"));
    let mut apt = Apt {
        target_release: backports.then_some("bookworm-backports"),
        ..Apt::default()
    };
    apt.install(&packages)
}

fn output_of(command: &mut Command) -> Option<String> {
    let out = command.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nightly_components() -> Result<()> {
    if output_of(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])).is_none() {
        eprintln!("xtask: installing the nightly toolchain");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let installed = output_of(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    // rust-src for -Z build-std=core; clippy to lint the eBPF crate for its own target.
    for component in ["rust-src", "clippy"] {
        if !installed.lines().any(|l| l.starts_with(component)) {
            eprintln!("xtask: adding {component} to the nightly toolchain");
            run(Command::new("rustup").args([
                "component",
                "add",
                component,
                "--toolchain",
                "nightly",
            ]))?;
        }
    }
    Ok(())
}

/// The musl target of the stable toolchain and Debian's musl-tools (musl-gcc: ring's C code).
fn musl(apt: &mut Apt) -> Result<()> {
    let installed = output_of(Command::new("rustup").args(["target", "list", "--installed"]))
        .unwrap_or_default();
    if !installed.lines().any(|l| l.trim() == MUSL_TARGET) {
        eprintln!("xtask: adding the {MUSL_TARGET} target");
        run(Command::new("rustup").args(["target", "add", MUSL_TARGET]))?;
    }
    if !Path::new("/usr/bin/musl-gcc").exists() {
        apt.install(&["musl-tools"])?;
    }
    Ok(())
}

/// What `cargo xtask dist` needs: cargo-deb (pinned), lintian, gzip, and podman with runc
/// (crun refuses hybrid cgroup hosts; asked for in the same apt-get as podman, or podman's
/// "crun | runc" dependency would bring crun).
fn dist_tools(apt: &mut Apt) -> Result<()> {
    let missing: Vec<&str> = [
        ("/usr/bin/lintian", "lintian"),
        ("/usr/bin/dpkg-deb", "dpkg"),
        ("/bin/gzip", "gzip"),
        ("/usr/bin/podman", "podman"),
        ("/usr/sbin/runc", "runc"),
    ]
    .into_iter()
    .filter(|(tool, _)| !Path::new(tool).exists())
    .map(|(_, package)| package)
    .collect();
    if !missing.is_empty() {
        apt.install(&missing)?;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let version = output_of(Command::new(&cargo).args(["deb", "--version"])).unwrap_or_default();
    if !version.contains(CARGO_DEB_VERSION) {
        eprintln!("xtask: installing cargo-deb {CARGO_DEB_VERSION} (about 2 minutes)");
        run(Command::new(&cargo).args([
            "install",
            "--locked",
            "cargo-deb",
            "--version",
            CARGO_DEB_VERSION,
        ]))?;
    }
    Ok(())
}

fn bpf_linker(apt: &mut Apt) -> Result<()> {
    if output_of(Command::new("bpf-linker").arg("--version")).is_some() {
        return Ok(());
    }
    apt.install(LLVM_PACKAGES)?;
    eprintln!("xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (a few minutes)");
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            // Without it the link looks for libLLVM in /usr/lib64.
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
    )
}

/// The kubernetes-validate release the manifests are checked with (its schemas are bundled:
/// it needs no cluster).
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

/// Where `cargo xtask test` keeps kubernetes-validate: a venv of Debian's python3 (pip may not
/// install into the system's), in the workspace's target directory.
pub fn kubernetes_validate_bin() -> std::path::PathBuf {
    crate::workspace_root().join("target/tools/kubernetes-validate/bin/kubernetes-validate")
}

fn kubernetes_validate() -> Result<()> {
    let venv = crate::workspace_root().join("target/tools/kubernetes-validate");
    let marker = venv.join("kad-version");
    if kubernetes_validate_bin().is_file()
        && std::fs::read_to_string(&marker).is_ok_and(|v| v.trim() == KUBERNETES_VALIDATE_VERSION)
    {
        return Ok(());
    }
    eprintln!(
        "xtask: installing kubernetes-validate {KUBERNETES_VALIDATE_VERSION} into {}",
        venv.display()
    );
    let _ = std::fs::remove_dir_all(&venv);
    run(Command::new("/usr/bin/python3")
        .args(["-m", "venv"])
        .arg(&venv))?;
    run(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        &format!("kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"),
    ]))?;
    std::fs::write(&marker, KUBERNETES_VALIDATE_VERSION).context("write the venv's version")
}

fn bpffs() -> Result<()> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").context("read mountinfo")?;
    let mounted = mountinfo.lines().any(|line| {
        let (mount, fs) = line.split_once(" - ").unwrap_or(("", ""));
        mount.split_whitespace().nth(4) == Some("/sys/fs/bpf") && fs.starts_with("bpf ")
    });
    if mounted {
        return Ok(());
    }
    eprintln!("xtask: mounting bpffs at /sys/fs/bpf");
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

/// apt-get, with one `apt-get update` before the first install of this run.
#[derive(Default)]
struct Apt {
    updated: bool,
    /// `-t RELEASE`: the release packages are preferred from.
    target_release: Option<&'static str>,
}

impl Apt {
    fn install(&mut self, packages: &[&str]) -> Result<()> {
        let missing: Vec<&str> = packages
            .iter()
            .copied()
            .filter(|p| {
                output_of(Command::new("dpkg-query").args(["-W", "-f", "${Status}", p]))
                    .is_none_or(|s| !s.contains("install ok installed"))
            })
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            bail!("missing packages {missing:?}: run as root, or install them with apt-get");
        }
        // Wait for another apt run (a parallel setup) instead of failing on its lock.
        let lock_wait = ["-o", "DPkg::Lock::Timeout=600"];
        if !self.updated {
            run(Command::new("apt-get")
                .args(lock_wait)
                .args(["update", "-q"]))?;
            self.updated = true;
        }
        eprintln!("xtask: installing {}", missing.join(" "));
        run(Command::new("apt-get")
            .args(lock_wait)
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(self.target_release.iter().flat_map(|r| ["-t", r]))
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))
    }
}
