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
//!
//! Here the run over the kernels and its summary; `debian` gets the kernels, `vm` boots one,
//! `guest` is what runs inside, `log` reads its test output back.
pub(crate) mod debian;
mod guest;
mod log;
mod vm;

use std::{fs, path::Path};

use anyhow::{bail, Context as _, Result};

use self::{
    debian::{kernel, PrivateApt},
    guest::test_binaries,
    vm::{boot_and_test, virtme_ng},
};
use crate::setup;

pub const DEFAULT_VERSIONS: &[&str] = &["5.10", "6.1", "6.12"];

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
