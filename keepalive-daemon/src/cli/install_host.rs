//! `kad install-host`: the DaemonSet's init step. Copies the running kad binary onto a host
//! directory and writes the OCI hooks.d file that runs it, with no shell or other tool in the
//! image.
use std::{
    fs,
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use clap::Args;

/// The shipped hooks.d file; its `hook.path` is replaced by where the binary is on the host.
const HOOK_FILE: &str = include_str!("../../../dist/oci-hooks.d/kad.json");

#[derive(Debug, Args)]
pub(super) struct InstallHostArgs {
    /// The directory kad is copied into (as `DIR/kad`), as this process sees it.
    #[arg(value_name = "DIR")]
    dir: PathBuf,
    /// That directory's path on the host, which the hook file names (default: DIR).
    #[arg(long, value_name = "PATH")]
    host_dir: Option<PathBuf>,
    /// Also write the OCI hooks.d file (`kad.json`) into this directory.
    #[arg(long, value_name = "DIR")]
    hooks_dir: Option<PathBuf>,
}

/// `kad install-host`.
pub(super) fn command(args: &InstallHostArgs) -> anyhow::Result<()> {
    let binary = fs::read("/proc/self/exe").context("cannot read this kad binary")?;
    let target = args.dir.join("kad");
    write_replacing(&target, &binary, 0o755)?;
    println!("installed {}", target.display());
    if let Some(hooks) = &args.hooks_dir {
        let on_host = args.host_dir.as_deref().unwrap_or(&args.dir).join("kad");
        let hook = hook_file(&on_host)?;
        let file = hooks.join("kad.json");
        write_replacing(&file, hook.as_bytes(), 0o644)?;
        println!("installed {} (runs {})", file.display(), on_host.display());
    }
    Ok(())
}

/// The hooks.d file with `hook.path` set to `kad`.
fn hook_file(kad: &Path) -> anyhow::Result<String> {
    let mut hook: serde_json::Value =
        serde_json::from_str(HOOK_FILE).context("the shipped hook file is not JSON")?;
    let path = kad
        .to_str()
        .with_context(|| format!("{} is not UTF-8", kad.display()))?;
    hook["hook"]["path"] = path.into();
    Ok(serde_json::to_string_pretty(&hook)? + "\n")
}

/// Writes `data` to a temporary file beside `path` and renames it over `path`: a running
/// binary is replaced, never rewritten in place, and a reader never sees half a file.
fn write_replacing(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    let dir = path.parent().context("a file in a directory")?;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let name = path.file_name().context("a file name")?.to_string_lossy();
    let temp = dir.join(format!(".{name}.{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&temp)?;
        file.write_all(data)?;
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        fs::rename(&temp, path)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&temp);
        anyhow::anyhow!("cannot write {}: {e}", path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hook_file_names_the_installed_binary() {
        let text = hook_file(Path::new("/opt/kad/bin/kad")).unwrap();
        let hook: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(hook["hook"]["path"], "/opt/kad/bin/kad");
        // Everything else is the shipped file's.
        let mut shipped: serde_json::Value = serde_json::from_str(HOOK_FILE).unwrap();
        assert_eq!(shipped["hook"]["path"], "/usr/bin/kad");
        shipped["hook"]["path"] = "/opt/kad/bin/kad".into();
        assert_eq!(hook, shipped);
    }

    #[test]
    fn files_are_replaced_whole_with_their_mode() {
        let dir = std::env::temp_dir().join(format!("kad-install-host-{}", std::process::id()));
        let path = dir.join("sub/kad");
        write_replacing(&path, b"one", 0o755).unwrap();
        write_replacing(&path, b"two", 0o755).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o755);
        let names: Vec<_> = fs::read_dir(dir.join("sub")).unwrap().flatten().collect();
        assert_eq!(names.len(), 1, "no temporary file left");
        fs::remove_dir_all(&dir).unwrap();
    }
}
