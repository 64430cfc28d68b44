//! `kad uninstall`: detaches what a stopped daemon left attached, removes its pins and, with
//! `--purge`, its saved policies.
use std::path::PathBuf;

use clap::Args;

use super::{DEFAULT_BPFFS, DEFAULT_STATE_DIR};
use crate::{daemon::store, host::sys, kernel::bpffs};

#[derive(Debug, Args)]
pub(super) struct UninstallArgs {
    /// The daemon's directory on the bpf filesystem.
    #[arg(long, default_value = DEFAULT_BPFFS, value_name = "DIR")]
    bpffs: PathBuf,
    /// The daemon's state directory (removed only with --purge).
    #[arg(long, default_value = DEFAULT_STATE_DIR, value_name = "DIR")]
    state_dir: PathBuf,
    /// Also remove the saved policies.
    #[arg(long)]
    purge: bool,
}

/// `kad uninstall`.
pub(super) fn command(args: &UninstallArgs) -> anyhow::Result<()> {
    if !sys::is_root() {
        anyhow::bail!("kad uninstall must run as root");
    }
    let detached = bpffs::uninstall(&args.bpffs)?;
    println!(
        "detached {detached} cgroup attachments and removed {}",
        args.bpffs.display()
    );
    if args.purge {
        store::purge(&args.state_dir)?;
        println!("removed the saved policies in {}", args.state_dir.display());
    }
    Ok(())
}
