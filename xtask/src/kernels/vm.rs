//! One kernel booted with virtme-ng under QEMU, the guest watched for progress, and what it
//! left in its output directory read back.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::{guest::guest_script, log::parse_log, Outcome};
use crate::run;

const VIRTME_NG_VERSION: &str = "1.42";
/// One kernel's whole run, boot included; measured runs take 1 to 2 minutes.
const VM_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// How long the guest may go without a line of test output (see `boot_and_test`).
const STALL_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// The venv's bin directory, with virtme-ng installed in it.
pub(super) fn virtme_ng(work: &Path) -> Result<PathBuf> {
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

pub(super) fn boot_and_test(
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
