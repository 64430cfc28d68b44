//! `cargo xtask test-kernels [VERSION...]`: the integration tests, built once, run inside other
//! kernels booted under QEMU, one after the other.
//!
//! The kernels are Debian's (`linux-image-X.Y.*-amd64-unsigned`, the newest ABI of each series)
//! fetched through a private apt configuration under `target/kernels/apt`, so that the
//! system's apt state stays untouched, and unpacked under `target/kernels/`, where the next run
//! finds them. virtme-ng (from PyPI, in a venv there) boots each over the host's filesystem:
//! the guest sees the same test binaries, kad and tools. QEMU runs without KVM (TCG): `/dev/kvm`
//! on these machines is a nested software hypervisor that QEMU's KVM mode aborts on. vng's own
//! exit status says nothing here (255 without udev), so the guest writes the test output into a
//! directory shared with the host, and a marker once it is done.
use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread::sleep,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context as _, Result};

use crate::{cargo, run, setup};

pub const DEFAULT_VERSIONS: &[&str] = &["5.10", "6.1", "6.12"];
const VIRTME_NG_VERSION: &str = "1.42";
/// Debian releases whose archives hold the kernels: 5.10 is bullseye's, 6.1 bookworm's, 6.12
/// bookworm-security's.
const SUITES: &[&str] = &[
    "bullseye",
    "bullseye-security",
    "bookworm",
    "bookworm-security",
];
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
/// The package lists are refreshed when older than this.
const LISTS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// One kernel's whole run, boot included; measured runs take 1 to 2 minutes.
const VM_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// How long the guest may go without a line of test output (see `boot_and_test`).
const STALL_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// What one kernel's run gave.
#[derive(Default)]
struct Outcome {
    /// The guest stopped making progress (no test output for `STALL_TIMEOUT`, or past
    /// `VM_TIMEOUT`) and was killed.
    frozen: bool,
    release: String,
    passed: u64,
    failed: u64,
    skipped: u64,
    failures: Vec<String>,
    skips: Vec<String>,
    seconds: u64,
    notes: Vec<String>,
}

pub fn run_matrix(root: &Path, versions: &[String]) -> Result<()> {
    let versions: Vec<String> = if versions.is_empty() {
        DEFAULT_VERSIONS.iter().map(|v| v.to_string()).collect()
    } else {
        versions.to_vec()
    };
    for version in &versions {
        if parse_series(version).is_none() {
            bail!("bad kernel version {version:?}: give a series such as 5.10 or 6.12");
        }
    }
    let work = root.join("target/kernels");
    fs::create_dir_all(&work).with_context(|| format!("mkdir {}", work.display()))?;
    // kmod: virtme-ng runs depmod on the unpacked modules; python3-venv: for the venv.
    setup::install(&["qemu-system-x86", "kmod", "python3-venv"])?;
    let venv = virtme_ng(&work)?;
    let apt = PrivateApt::new(&work)?;
    let kernels = versions
        .iter()
        .map(|v| Ok((v.clone(), kernel(&apt, &work, v)?)))
        .collect::<Result<Vec<_>>>()?;
    crate::build(root)?;
    let tests = test_binaries(root)?;
    eprintln!(
        "xtask: {} test binaries, on kernels {}",
        tests.len(),
        versions.join(" ")
    );

    let mut outcomes = Vec::new();
    for (version, vmlinuz) in &kernels {
        eprintln!("xtask: booting {} (TCG, 2 cpus, 2G)", vmlinuz.display());
        let mut outcome = boot_and_test(root, &venv, &work, version, vmlinuz, &tests)?;
        if outcome.frozen {
            // An emulated guest can still stop for reasons of the emulator's (see
            // `HOLD_KEYS`, the one cause found). One more boot, said loudly with what the
            // kernel printed; a second freeze fails the run as any failure does.
            let kept = work.join("out").join(format!("{version}-frozen"));
            let _ = fs::remove_dir_all(&kept);
            let _ = fs::rename(work.join("out").join(version), &kept);
            println!("{}", summary(version, &outcome));
            eprintln!(
                "xtask: kernel {version}: the guest froze ({}); its logs are in {}; booting it \
                 once more",
                outcome.failures.join("; "),
                kept.display()
            );
            outcome = boot_and_test(root, &venv, &work, version, vmlinuz, &tests)?;
            outcome.notes.push(format!(
                "booted twice: the first guest froze (logs in {})",
                kept.display()
            ));
        }
        // Printed as each kernel finishes, and again together at the end.
        println!("{}", summary(version, &outcome));
        outcomes.push((version, outcome));
    }
    println!();
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    for (version, outcome) in &outcomes {
        println!("{}", summary(version, outcome));
        for name in &outcome.failures {
            println!("    failed: {name}");
        }
        for note in &outcome.notes {
            println!("    note: {note}");
        }
        for skip in &outcome.skips {
            println!("    skipped: {skip}");
        }
        passed += outcome.passed;
        failed += outcome.failed;
        skipped += outcome.skipped;
    }
    println!("kernels: {passed} passed, {failed} failed, {skipped} skipped");
    if failed > 0 {
        bail!(
            "{failed} failed on other kernels (logs in {})",
            work.join("out").display()
        );
    }
    Ok(())
}

fn summary(version: &str, o: &Outcome) -> String {
    format!(
        "kernel {version:<5} {:<24} {} passed, {} failed, {} skipped in {} s",
        o.release, o.passed, o.failed, o.skipped, o.seconds
    )
}

/// (major, minor) of "X.Y".
fn parse_series(version: &str) -> Option<(u32, u32)> {
    let (major, minor) = version.split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// The venv's bin directory, with virtme-ng installed in it.
fn virtme_ng(work: &Path) -> Result<PathBuf> {
    let venv = work.join("venv");
    let bin = venv.join("bin");
    let installed = Command::new(bin.join("vng"))
        .arg("--version")
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout).trim() == format!("virtme-ng {VIRTME_NG_VERSION}")
        });
    if !installed {
        eprintln!(
            "xtask: installing virtme-ng {VIRTME_NG_VERSION} in {}",
            venv.display()
        );
        run(Command::new("/usr/bin/python3")
            .args(["-m", "venv", "--clear"])
            .arg(&venv))?;
        run(Command::new(bin.join("pip")).args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            &format!("virtme-ng=={VIRTME_NG_VERSION}"),
        ]))?;
    }
    Ok(bin)
}

/// apt with its own sources, lists and cache: the host's apt configuration and state are
/// never changed (its sources only tell which Debian mirror to use).
struct PrivateApt {
    options: Vec<String>,
}

impl PrivateApt {
    fn new(work: &Path) -> Result<PrivateApt> {
        let dir = work.join("apt");
        let lists = dir.join("lists");
        let cache = dir.join("cache");
        for d in [lists.join("partial"), cache.join("archives/partial")] {
            fs::create_dir_all(&d).with_context(|| format!("mkdir {}", d.display()))?;
        }
        let sources = dir.join("sources.list");
        let apt = PrivateApt {
            options: [
                format!("Dir::Etc::SourceList={}", sources.display()),
                "Dir::Etc::SourceParts=/nonexistent".into(),
                format!("Dir::State::Lists={}", lists.display()),
                format!("Dir::Cache={}", cache.display()),
                // Root downloads into target/, which the _apt user may not be allowed to write.
                "APT::Sandbox::User=root".into(),
            ]
            .into_iter()
            .flat_map(|o| ["-o".to_string(), o])
            .collect(),
        };
        let text = sources_list()?;
        let stamp = dir.join("updated");
        let fresh = fs::read_to_string(&sources).ok().as_deref() == Some(text.as_str())
            && fs::metadata(&stamp)
                .and_then(|m| m.modified())
                .is_ok_and(|t| {
                    SystemTime::now()
                        .duration_since(t)
                        .is_ok_and(|age| age < LISTS_MAX_AGE)
                });
        if !fresh {
            fs::write(&sources, &text).with_context(|| format!("write {}", sources.display()))?;
            eprintln!(
                "xtask: updating the kernel package lists ({})",
                SUITES.join(", ")
            );
            run(apt.command("apt-get").args(["update", "-q"]))?;
            fs::write(&stamp, "").with_context(|| format!("write {}", stamp.display()))?;
        }
        Ok(apt)
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command.args(&self.options);
        command
    }
}

/// A sources.list for [`SUITES`], on the Debian mirrors the host's apt uses for its own
/// release and that release's security updates. `apt-get --print-uris update` names them
/// whatever the host's format (one-line or deb822) and needs no downloaded lists.
fn sources_list() -> Result<String> {
    let os_release = fs::read_to_string("/etc/os-release").context("read /etc/os-release")?;
    let codename = os_release
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|c| c.trim_matches('"').to_string())
        .filter(|c| !c.is_empty())
        .context("/etc/os-release names no VERSION_CODENAME: is this Debian?")?;
    let out = Command::new("apt-get")
        .args(["--print-uris", "update"])
        .output()
        .context("cannot run apt-get")?;
    let (archive, security) = mirrors(&String::from_utf8_lossy(&out.stdout), &codename);
    let (Some(archive), Some(security)) = (archive, security) else {
        bail!(
            "the host's apt sources name no Debian mirror for {codename} and {codename}-security \
             (apt-get --print-uris update)"
        );
    };
    Ok(SUITES
        .iter()
        .map(|suite| {
            let base = if suite.ends_with("-security") {
                &security
            } else {
                &archive
            };
            format!("deb [signed-by={KEYRING}] {base} {suite} main\n")
        })
        .collect())
}

/// The base URIs of suites `codename` and `codename-security` in `apt-get --print-uris update`
/// output, whose lines look like `'URI/dists/SUITE/InRelease' FILE 0`.
fn mirrors(print_uris: &str, codename: &str) -> (Option<String>, Option<String>) {
    let security_suite = format!("{codename}-security");
    let (mut archive, mut security) = (None, None);
    for line in print_uris.lines() {
        let Some((base, rest)) = line
            .split('\'')
            .nth(1)
            .and_then(|uri| uri.split_once("/dists/"))
        else {
            continue;
        };
        let suite = rest.split('/').next().unwrap_or("");
        if suite == codename {
            archive.get_or_insert_with(|| base.to_string());
        } else if suite == security_suite {
            security.get_or_insert_with(|| base.to_string());
        }
    }
    (archive, security)
}

/// The vmlinuz of the newest Debian kernel of series `version`, downloaded and unpacked under
/// `work` unless it is there already.
fn kernel(apt: &PrivateApt, work: &Path, version: &str) -> Result<PathBuf> {
    let package = newest_package(apt, version)?;
    let dir = work.join(&package);
    if !dir.join("boot").is_dir() {
        // Older ABIs of the same series are not needed any more.
        let prefix = format!("linux-image-{version}.");
        for entry in fs::read_dir(work)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) && series_of(&name) == Some(version) {
                fs::remove_dir_all(entry.path())
                    .with_context(|| format!("remove {}", entry.path().display()))?;
            }
        }
        eprintln!("xtask: downloading and unpacking {package}");
        let download = work.join("download");
        let _ = fs::remove_dir_all(&download);
        fs::create_dir_all(&download)?;
        run(apt
            .command("apt-get")
            .args(["download", "-q", &package])
            .current_dir(&download))?;
        let deb = fs::read_dir(&download)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .with_context(|| format!("apt-get download left no .deb for {package}"))?;
        // Unpacked beside, then renamed: an interrupted run leaves no half kernel in the cache.
        let partial = work.join(format!("{package}.partial"));
        let _ = fs::remove_dir_all(&partial);
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
        fs::rename(&partial, &dir).with_context(|| format!("rename to {}", dir.display()))?;
        fs::remove_dir_all(&download)?;
    }
    let boot = dir.join("boot");
    fs::read_dir(&boot)
        .with_context(|| format!("read {}", boot.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .with_context(|| format!("no vmlinuz in {}", boot.display()))
}

/// The series ("6.1") of a package name such as `linux-image-6.1.0-56-amd64-unsigned` or
/// `linux-image-6.12.117+deb12-amd64-unsigned`; `None` for other flavours and backports
/// (`-cloud-`, `-rt-`, `6.1.0-0.deb11.52`).
fn series_of(package: &str) -> Option<&str> {
    let rest = package
        .strip_prefix("linux-image-")?
        .strip_suffix("-amd64-unsigned")?;
    let mut parts = rest.splitn(3, '.');
    let (major, minor, tail) = (parts.next()?, parts.next()?, parts.next()?);
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(major) || !digits(minor) {
        return None;
    }
    // "0-56" (an ABI number) or "117+deb12" (a point release for Debian 12).
    let (patch, abi) = tail.split_once('-').or_else(|| tail.split_once('+'))?;
    let plain_abi = digits(abi) || abi.strip_prefix("deb").is_some_and(digits);
    (digits(patch) && plain_abi).then(|| &rest[..major.len() + 1 + minor.len()])
}

/// Numbers in a package name, for ordering ABIs (`6.1.0-56` after `6.1.0-9`).
fn version_key(package: &str) -> Vec<u64> {
    package
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect()
}

fn newest_package(apt: &PrivateApt, version: &str) -> Result<String> {
    let pattern = format!("^linux-image-{}\\.", version.replace('.', "\\."));
    let out = apt
        .command("apt-cache")
        .args(["search", "--names-only", &pattern])
        .output()
        .context("cannot run apt-cache")?;
    if !out.status.success() {
        bail!(
            "apt-cache search {pattern}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|p| series_of(p) == Some(version))
        .max_by_key(|p| version_key(p))
        .map(str::to_string)
        .with_context(|| {
            format!(
                "no Debian kernel linux-image-{version}.*-amd64-unsigned in {}",
                SUITES.join(", ")
            )
        })
}

/// The integration test executables of the tests package, built (once) by the same cargo
/// invocation as `cargo xtask test`, so that nothing is rebuilt after it.
fn test_binaries(root: &Path) -> Result<Vec<PathBuf>> {
    let out = cargo(root)
        .args([
            "test",
            "--release",
            "--workspace",
            "--exclude",
            "keepalive-ebpf",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run cargo test --no-run")?;
    if !out.status.success() {
        bail!("cargo test --no-run failed: {}", out.status);
    }
    let manifest = root.join("tests/Cargo.toml");
    let mut binaries = BTreeSet::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_integration_test = message["reason"] == "compiler-artifact"
            && message["manifest_path"].as_str() == manifest.to_str()
            && message["target"]["kind"] == serde_json::json!(["test"]);
        if let (true, Some(exe)) = (is_integration_test, message["executable"].as_str()) {
            binaries.insert(PathBuf::from(exe));
        }
    }
    if binaries.is_empty() {
        bail!("cargo built no integration test of {}", manifest.display());
    }
    Ok(binaries.into_iter().collect())
}

/// The script the guest runs: bpffs and cgroup2 mounted as on a host, then each test binary,
/// its output into `out`, then the marker that says the run finished.
/// Run in the guest before the tests: holds on, for the whole run, the kernel's static keys
/// that the tests would otherwise switch on and off hundreds of times — the first or last
/// cgroup with cpuset or memory (each test makes and removes its cgroups; podman enables the
/// controllers), and the first or last cgroup BPF program and cgroup tracepoint program (each
/// test's daemon). Every switch patches kernel code through an int3 (`text_poke_bp`), and
/// under QEMU's multi-threaded TCG a vCPU can go on trapping on the int3 of a patch that is
/// finished: the kernel sees a NOP there, backs up and runs the stale int3 again, for ever.
/// Seen on 5.10 (both vCPUs stuck at `cpusets_enabled()` in `get_page_from_freelist`, soft
/// lockups in the console; a loop of mkdir/rmdir with cpuset enabled freezes a bare 5.10
/// guest within a minute, the same loop with pids only does not). Held keys are never patched.
/// A cgroup with every controller, and a kad daemon of its own whose policy anchors its
/// programs on that cgroup (nothing the tests make is below it). Its output is in `hold.log`.
const HOLD_KEYS: &str = "hold=/sys/fs/cgroup/kad-matrix-hold\n\
    for c in $(cat /sys/fs/cgroup/cgroup.controllers); do\n\
    \x20 echo \"+$c\" > /sys/fs/cgroup/cgroup.subtree_control || echo \"hold: +$c refused\"\n\
    done >> \"$out/hold.log\" 2>&1\n\
    mkdir -p \"$hold/held\" /tmp/kad-matrix-hold\n\
    printf '[[policy]]\\ncgroup = \"kad-matrix-hold/held\"\\nidle = 600\\n' > /tmp/kad-matrix-hold/kad.toml\n\
    \"$KAD_BIN\" daemon --socket /tmp/kad-matrix-hold/kad.sock --state-dir /tmp/kad-matrix-hold/state \\\n\
    \x20 --bpffs /sys/fs/bpf/kad-matrix-hold --config /tmp/kad-matrix-hold/kad.toml >> \"$out/hold.log\" 2>&1 &\n\
    i=0\n\
    until \"$KAD_BIN\" status --socket /tmp/kad-matrix-hold/kad.sock > /dev/null 2>&1 || [ $i -ge 120 ]; do\n\
    \x20 sleep 1; i=$((i+1))\n\
    done\n\
    \"$KAD_BIN\" status --socket /tmp/kad-matrix-hold/kad.sock >> \"$out/hold.log\" 2>&1 \\\n\
    \x20 || echo 'hold: no kad daemon: static keys of cgroup BPF programs are not held' >> \"$out/hold.log\"\n";

fn guest_script(root: &Path, out: &Path, tests: &[PathBuf]) -> String {
    let ci = std::env::var("CI").unwrap_or_default();
    let mut script = format!(
        "#!/bin/sh\n\
         # Written by cargo xtask test-kernels; runs inside the VM.\n\
         out='{out}'\n\
         uname -r > \"$out/release\"\n\
         grep -q ' /sys/fs/bpf bpf ' /proc/self/mounts || mount -t bpf bpf /sys/fs/bpf\n\
         grep -q ' cgroup2 ' /proc/self/mounts || mount -t cgroup2 cgroup2 /sys/fs/cgroup\n\
         export KAD_BIN='{kad}' KAD_KERNEL_MATRIX=1 KAD_SKIP_LOG=\"$out/skips\" CI='{ci}'\n\
         cd '{root}'\n\
         {hold}\
         {{\n",
        out = out.display(),
        kad = root.join("target/release/kad").display(),
        root = root.display(),
        hold = HOLD_KEYS,
    );
    for test in tests {
        script.push_str(&format!(
            "echo '### {name}'; '{path}'; echo \"### exit $?\"\n",
            name = test_name(test),
            path = test.display()
        ));
    }
    script.push_str("} > \"$out/tests.log\" 2>&1\necho finished > \"$out/finished\"\n");
    script
}

/// What the guest kernel said about a stuck CPU (soft lockups, RCU stalls, and where the CPU
/// was), from the console; the first few lines only.
fn kernel_complaints(console: &Path) -> Vec<String> {
    let Ok(text) = fs::read(console) else {
        return Vec::new();
    };
    String::from_utf8_lossy(&text)
        .lines()
        .filter(|l| {
            l.contains("soft lockup") || l.contains("stall on CPU") || l.contains("RIP: 0010:")
        })
        .take(4)
        .map(|l| format!("console: {}", l.trim()))
        .collect()
}

/// `cli` for `target/release/deps/cli-0123abcd`.
fn test_name(path: &Path) -> String {
    let stem = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match stem.rsplit_once('-') {
        Some((name, _hash)) => name.to_string(),
        None => stem,
    }
}

fn boot_and_test(
    root: &Path,
    venv: &Path,
    work: &Path,
    version: &str,
    vmlinuz: &Path,
    tests: &[PathBuf],
) -> Result<Outcome> {
    let out = work.join("out").join(version);
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out).with_context(|| format!("mkdir {}", out.display()))?;
    let script = out.join("guest.sh");
    fs::write(&script, guest_script(root, &out, tests))
        .with_context(|| format!("write {}", script.display()))?;
    let console = fs::File::create(out.join("console.log"))?;
    let path = format!(
        "{}:{}",
        venv.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let start = Instant::now();
    let mut child = Command::new(venv.join("vng"))
        .arg("--disable-kvm")
        // The kernel's messages on the console (console.log): a stuck guest says where.
        .arg("--verbose")
        .args(["--cpus", "2", "--memory", "2G"])
        .arg("--rwdir")
        .arg(&out)
        .arg("--run")
        .arg(vmlinuz)
        .arg("--exec")
        .arg(format!("sh '{}'", script.display()))
        .current_dir(root)
        // vng finds virtme-run and the rest of its tools on PATH.
        .env("PATH", path)
        .stdin(Stdio::null())
        .stdout(console.try_clone()?)
        .stderr(console)
        // In our process group (not one of its own): a ^C or a kill of the group ends the VM
        // with us.
        .spawn()
        .context("cannot run vng")?;
    let log = out.join("tests.log");
    let mut progress = (None, Instant::now());
    let (timed_out, stalled) = loop {
        if child.try_wait()?.is_some() {
            break (false, false);
        }
        // The guest appends to the log as tests finish; a test binary takes well under a
        // minute here, so minutes without a line is a guest that stopped.
        let len = fs::metadata(&log).map(|m| m.len()).ok();
        if len != progress.0 {
            progress = (len, Instant::now());
        }
        let stalled = progress.1.elapsed() > STALL_TIMEOUT;
        if stalled || start.elapsed() > VM_TIMEOUT {
            kill_tree(child.id());
            let _ = child.wait();
            break (!stalled, stalled);
        }
        sleep(Duration::from_millis(500));
    };
    let mut outcome = Outcome {
        seconds: start.elapsed().as_secs(),
        release: fs::read_to_string(out.join("release"))
            .map(|r| r.trim().to_string())
            .unwrap_or_else(|_| "(did not boot)".into()),
        ..Outcome::default()
    };
    parse_log(&out.join("tests.log"), &mut outcome)?;
    if let Ok(skips) = fs::read_to_string(out.join("skips")) {
        outcome.skips = skips.lines().map(str::to_string).collect();
        outcome.skipped = outcome.skips.len() as u64;
        // A skipped test returns early, which libtest counts as passed.
        outcome.passed = outcome.passed.saturating_sub(outcome.skipped);
    }
    if let Ok(hold) = fs::read_to_string(out.join("hold.log")) {
        outcome.notes.extend(
            hold.lines()
                .filter(|l| l.starts_with("hold: "))
                .map(str::to_string),
        );
    }
    if !out.join("finished").exists() {
        outcome.failed += 1;
        outcome.frozen = timed_out || stalled;
        outcome
            .notes
            .extend(kernel_complaints(&out.join("console.log")));
        outcome.failures.push(if timed_out {
            format!("the run did not finish in {} s", VM_TIMEOUT.as_secs())
        } else if stalled {
            format!(
                "no test output for {} s: the guest stopped",
                STALL_TIMEOUT.as_secs()
            )
        } else {
            format!(
                "the run did not finish: see {}",
                out.join("console.log").display()
            )
        });
    }
    Ok(outcome)
}

/// SIGKILLs `pid` and every process below it (vng runs QEMU through a shell and virtme-run).
fn kill_tree(pid: u32) {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        // The field after the command, which may hold spaces but ends with the last ')'.
        let parent = fs::read_to_string(entry.path().join("stat"))
            .ok()
            .and_then(|stat| {
                stat.rsplit_once(')')?
                    .1
                    .split_whitespace()
                    .nth(1)?
                    .parse()
                    .ok()
            });
        if let Some(parent) = parent {
            parents.push((child, parent));
        }
    }
    let mut doomed = vec![pid];
    let mut i = 0;
    while i < doomed.len() {
        let p = doomed[i];
        doomed.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    for p in doomed {
        // SAFETY: signalling processes we started (and their descendants).
        unsafe { libc::kill(p as i32, libc::SIGKILL) };
    }
}

/// Adds up libtest's result lines and collects the failed tests' names. A binary that exits
/// with an error without a failed test (a crash) counts as one failure.
fn parse_log(log: &Path, outcome: &mut Outcome) -> Result<()> {
    let Ok(file) = fs::File::open(log) else {
        return Ok(());
    };
    let mut binary = String::new();
    let mut failed_here = 0;
    for line in BufReader::new(file).lines() {
        let line = line.with_context(|| format!("read {}", log.display()))?;
        if let Some(code) = line.strip_prefix("### exit ") {
            if code != "0" && failed_here == 0 {
                outcome.failed += 1;
                outcome
                    .failures
                    .push(format!("{binary} exited with {code}"));
            }
        } else if let Some(name) = line.strip_prefix("### ") {
            binary = name.to_string();
            failed_here = 0;
        } else if let Some(name) = line
            .strip_prefix("test ")
            .and_then(|l| l.strip_suffix(" ... FAILED"))
        {
            outcome.failures.push(format!("{binary}::{name}"));
        } else if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(';') {
                let mut words = part.split_whitespace().rev();
                let (Some(label), Some(count)) = (words.next(), words.next()) else {
                    continue;
                };
                let count: u64 = count.parse().unwrap_or(0);
                match label {
                    "passed" => outcome.passed += count,
                    "failed" => {
                        outcome.failed += count;
                        failed_here += count;
                    }
                    "ignored" => outcome.skipped += count,
                    _ => {}
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_series() {
        assert_eq!(
            series_of("linux-image-6.1.0-56-amd64-unsigned"),
            Some("6.1")
        );
        assert_eq!(
            series_of("linux-image-6.12.117+deb12-amd64-unsigned"),
            Some("6.12")
        );
        assert_eq!(
            series_of("linux-image-5.10.0-46-amd64-unsigned"),
            Some("5.10")
        );
        assert_eq!(series_of("linux-image-6.1.0-56-cloud-amd64-unsigned"), None);
        assert_eq!(series_of("linux-image-6.1.0-56-rt-amd64-unsigned"), None);
        assert_eq!(
            series_of("linux-image-6.1.0-0.deb11.52-amd64-unsigned"),
            None
        );
        assert_eq!(series_of("linux-image-6.1.0-56-amd64"), None);
    }

    #[test]
    fn newest_abi_first() {
        let mut names = [
            "linux-image-6.1.0-9-amd64-unsigned",
            "linux-image-6.1.0-56-amd64-unsigned",
            "linux-image-6.1.0-47-amd64-unsigned",
        ];
        names.sort_by_key(|n| version_key(n));
        assert_eq!(names[2], "linux-image-6.1.0-56-amd64-unsigned");
        assert!(
            version_key("linux-image-6.12.117+deb12") > version_key("linux-image-6.12.99+deb12")
        );
    }

    #[test]
    fn mirrors_of_the_host_release() {
        let out = "'http://example.org/node/dists/nodistro/InRelease' a 0\n\
                   'http://mirror.example/debian/dists/bookworm/InRelease' b 0\n\
                   'http://mirror.example/debian/dists/bookworm-updates/InRelease' c 0\n\
                   'http://sec.example/debian-security/dists/bookworm-security/InRelease' d 0\n";
        assert_eq!(
            mirrors(out, "bookworm"),
            (
                Some("http://mirror.example/debian".into()),
                Some("http://sec.example/debian-security".into())
            )
        );
        assert_eq!(mirrors(out, "trixie"), (None, None));
    }

    #[test]
    fn the_guest_script_is_valid_sh_and_holds_the_keys_first() {
        let dir = std::env::temp_dir().join(format!("xtask-guest-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let script = guest_script(
            Path::new("/src"),
            &dir,
            &[PathBuf::from("/src/target/release/deps/cli-0123")],
        );
        let path = dir.join("guest.sh");
        fs::write(&path, &script).unwrap();
        let check = Command::new("sh").arg("-n").arg(&path).output().unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert!(check.status.success(), "{check:?}\n{script}");
        let hold = script.find("kad-matrix-hold");
        let tests = script.find("### cli").unwrap();
        assert!(hold.is_some_and(|h| h < tests), "{script}");
    }

    #[test]
    fn log_is_added_up() {
        let dir = std::env::temp_dir().join(format!("xtask-kernels-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let log = dir.join("tests.log");
        fs::write(
            &log,
            "### cli\ntest a ... ok\ntest b ... FAILED\n\
             test result: FAILED. 3 passed; 1 failed; 1 ignored; 0 measured; 0 filtered out\n\
             ### exit 101\n### enforce\ntest result: ok. 2 passed; 0 failed; 0 ignored\n\
             ### exit 0\n### crash\n### exit 134\n",
        )
        .unwrap();
        let mut outcome = Outcome::default();
        parse_log(&log, &mut outcome).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!((outcome.passed, outcome.failed, outcome.skipped), (5, 2, 1));
        assert_eq!(outcome.failures, ["cli::b", "crash exited with 134"]);
    }
}
