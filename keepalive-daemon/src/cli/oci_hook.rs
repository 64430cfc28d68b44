//! `kad oci-hook`: the OCI runtime hook's command line; what it does is
//! [`crate::containers::oci`]'s.
use std::path::{Path, PathBuf};

use clap::Args;

use crate::containers::oci;

#[derive(Debug, Args)]
pub(super) struct OciHookArgs {
    /// createRuntime (or prestart) or poststop; by default from the container's status.
    #[arg(value_name = "STAGE")]
    stage: Option<String>,
    /// Where the hook records, per container, the cgroup it gave a policy.
    #[arg(long, default_value = oci::DEFAULT_RUN_DIR, value_name = "DIR")]
    run_dir: PathBuf,
}

/// `kad oci-hook`: a failure exits non-zero, which makes the runtime refuse to start the
/// container (at createRuntime) with this message.
pub(super) fn command(socket: &Path, args: &OciHookArgs) -> anyhow::Result<()> {
    let state = oci::read_state(std::io::stdin().lock())?;
    match oci::run(socket, &args.run_dir, args.stage.as_deref(), &state)? {
        oci::Outcome::Applied { cgroup, policy } => println!("{cgroup}: {policy}"),
        oci::Outcome::Removed { cgroup } => println!("{cgroup}: policy removed"),
        oci::Outcome::Kept { cgroup } => {
            println!("{cgroup}: container stopped; its policy stays until it is removed")
        }
        oci::Outcome::NotAnnotated | oci::Outcome::NothingToRemove => {}
    }
    Ok(())
}
