//! One boot of the image under QEMU: a qcow2 overlay over the cached disk, a directory shared
//! over 9p that holds the scenario script, and the guest's driver unit that runs it and powers
//! off. The guest's verdict lines are passed through as they come.
use std::{
    fs,
    io::{BufRead as _, BufReader, Seek as _, SeekFrom},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::image::Kernel;
use crate::run;

/// One boot, scenarios included; measured boots take 1 to 4 minutes under TCG.
const BOOT_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// A fresh overlay over `disk`: what a boot writes stays there.
pub(super) fn overlay(disk: &Path, path: &Path) -> Result<()> {
    let _ = fs::remove_file(path);
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(disk)
        .arg(path))
}

/// How a boot ended.
pub(super) struct Boot {
    pub(super) seconds: u64,
    /// The guest's own report: its script's exit code, `None` if it never wrote one.
    pub(super) exit: Option<String>,
    pub(super) timed_out: bool,
    /// What QEMU itself printed (on stderr), such as "terminating on signal 15 from pid N"
    /// when something outside killed it.
    pub(super) qemu_said: Option<String>,
}

/// Boots `kernel` over `overlay` with `share` as the guest's /share, until the guest powers
/// off or `BOOT_TIMEOUT`, when QEMU is killed. The console goes to `console`.
pub(super) fn boot(kernel: &Kernel, overlay: &Path, share: &Path, console: &Path) -> Result<Boot> {
    let start = Instant::now();
    let qemu_log = console.with_extension("qemu.log");
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu
        // /dev/kvm on these machines is a nested software hypervisor QEMU's KVM aborts on.
        .args([
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "max",
            "-smp",
            "2",
            "-m",
            "2G",
        ])
        .args([
            "-display",
            "none",
            "-monitor",
            "none",
            "-no-reboot",
            "-nic",
            "none",
        ])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(&kernel.initrd)
        .args(["-append", "root=/dev/vda rw console=ttyS0 panic=-1 quiet"])
        .arg("-drive")
        .arg(format!(
            "file={},if=virtio,format=qcow2,cache=unsafe",
            overlay.display()
        ))
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag=share,security_model=none,multidevs=remap",
            share.display()
        ))
        .args(["-device", "virtio-rng-pci"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&qemu_log)?);
    // SAFETY: prctl in the child between fork and exec: QEMU gets SIGKILL if xtask dies
    // (killed, or an error), so that no guest outlives the run.
    unsafe {
        qemu.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = qemu.spawn().context("cannot run qemu-system-x86_64")?;
    let mut output = Follow::new(share.join("output"));
    let timed_out = loop {
        output.pass_verdicts();
        if child.try_wait()?.is_some() {
            break false;
        }
        if start.elapsed() > BOOT_TIMEOUT {
            // SIGKILL, to QEMU's own pid: nothing of it is left running.
            let _ = child.kill();
            let _ = child.wait();
            break true;
        }
        sleep(Duration::from_millis(500));
    };
    output.pass_verdicts();
    Ok(Boot {
        seconds: start.elapsed().as_secs(),
        exit: fs::read_to_string(share.join("exit"))
            .ok()
            .map(|s| s.trim().to_string()),
        timed_out,
        qemu_said: fs::read_to_string(&qemu_log)
            .ok()
            .map(|s| s.trim().replace('\n', "; "))
            .filter(|s| !s.is_empty()),
    })
}

/// The guest's output file, read as it grows: each verdict line is printed once complete.
struct Follow {
    path: PathBuf,
    offset: u64,
}

impl Follow {
    fn new(path: PathBuf) -> Follow {
        Follow { path, offset: 0 }
    }

    fn pass_verdicts(&mut self) {
        let Ok(mut file) = fs::File::open(&self.path) else {
            return;
        };
        if file.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut reader = BufReader::new(file);
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap_or(0) > 0 {
            if !line.ends_with('\n') {
                break;
            }
            self.offset += line.len() as u64;
            if let Some(verdict) = line.strip_prefix("### ") {
                if !verdict.starts_with("start ") {
                    eprintln!("xtask:   guest: {}", verdict.trim_end());
                }
            }
            line.clear();
        }
    }
}
