//! The package under test, and the "newer" one the upgrade scenario installs over it: the
//! same package rebuilt with a higher version.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::run;

/// `--deb`, or the newest `target/dist/kad_*_amd64.deb`.
pub(super) fn package(root: &Path, given: Option<&Path>) -> Result<PathBuf> {
    if let Some(deb) = given {
        if !deb.is_file() {
            bail!("--deb {}: no such file", deb.display());
        }
        return Ok(deb.canonicalize()?);
    }
    let dist = root.join("target/dist");
    let newest = fs::read_dir(&dist)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("kad_") && name.ends_with("_amd64.deb")
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .max();
    match newest {
        Some((_, deb)) => Ok(deb),
        None => bail!(
            "no package to test: {} holds no kad_*_amd64.deb; build it with `cargo xtask dist`, \
             or give one with --deb PATH",
            dist.display()
        ),
    }
}

/// `deb` unpacked and packed again as version `VERSION+systemtest1`, in `dir`.
pub(super) fn newer(deb: &Path, dir: &Path) -> Result<PathBuf> {
    let _ = fs::remove_dir_all(dir);
    let tree = dir.join("tree");
    fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
    run(Command::new("dpkg-deb").arg("-R").arg(deb).arg(&tree))?;
    let control = tree.join("DEBIAN/control");
    let text =
        fs::read_to_string(&control).with_context(|| format!("read {}", control.display()))?;
    let version = text
        .lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .with_context(|| format!("{} has no Version", deb.display()))?
        .trim()
        .to_string();
    let bumped = format!("{version}+systemtest1");
    fs::write(
        &control,
        text.replace(
            &format!("Version: {version}\n"),
            &format!("Version: {bumped}\n"),
        ),
    )?;
    let out = dir.join(format!("kad_{bumped}_amd64.deb"));
    run(Command::new("dpkg-deb")
        .args(["--build", "-Zgzip", "--root-owner-group"])
        .arg(&tree)
        .arg(&out))?;
    fs::remove_dir_all(&tree)?;
    Ok(out)
}
