//! What the guest runs: the integration test binaries (built on the host), and the script
//! that mounts what a host would have, holds the kernel's static keys and runs them.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Stdio,
};

use anyhow::{bail, Context as _, Result};

use crate::cargo;

/// The integration test executables of the tests package, built (once) by the same cargo
/// invocation as `cargo xtask test`, so that nothing is rebuilt after it.
pub(super) fn test_binaries(root: &Path) -> Result<Vec<PathBuf>> {
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
/// A shell fragment, not a script: it runs inside `guest_script`, with its `$out` and
/// `$KAD_BIN`.
const HOLD_KEYS: &str = include_str!("hold_keys.sh");

/// The script the guest runs: bpffs and cgroup2 mounted as on a host, then each test binary,
/// its output into `out`, then the marker that says the run finished. The tests `#[ignore]`d on
/// the host (they attach to the cgroup2 root, which is the guest's own here) run too.
pub(super) fn guest_script(root: &Path, out: &Path, tests: &[PathBuf]) -> String {
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
            "echo '### {name}'; '{path}' --include-ignored; echo \"### exit $?\"\n",
            name = test_name(test),
            path = test.display()
        ));
    }
    script.push_str("} > \"$out/tests.log\" 2>&1\necho finished > \"$out/finished\"\n");
    script
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

#[cfg(test)]
mod tests {
    use std::{fs, process::Command};

    use super::*;

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
}
