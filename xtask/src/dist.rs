//! `cargo xtask dist`: what kad ships, in target/dist/, made from the one static build
//! (target/x86_64-unknown-linux-musl/release/kad):
//!
//! - `kad_VERSION_amd64.deb` (cargo-deb, `[package.metadata.deb]` in keepalive-daemon);
//! - `kad-VERSION-x86_64-linux-musl.tar.gz`: the binary, the unit, the hooks.d file, the example
//!   config, man pages, completions, README and licenses;
//! - `kad-image_VERSION.oci.tar`: the image (`FROM scratch` + the binary), built by podman in a
//!   storage of its own under target/ (the host's podman storage is not touched, no registry);
//! - `SHA256SUMS` of the three.
//!
//! The man pages and completions come from the binary itself (`kad manpages`, `kad
//! completions`), so they match its clap command. Files made on the way are in
//! target/dist-build/.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context as _, Result};

use crate::{cargo, run, setup::MUSL_TARGET};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The static kad: the binary the tests, the package and the image use.
pub fn kad_bin(root: &Path) -> PathBuf {
    root.join("target").join(MUSL_TARGET).join("release/kad")
}

pub fn dist_dir(root: &Path) -> PathBuf {
    root.join("target/dist")
}

/// The package's file name: `kad_VERSION_amd64.deb` (no Debian revision).
pub fn deb_name() -> String {
    format!("kad_{VERSION}_amd64.deb")
}

pub fn tarball_name() -> String {
    format!("kad-{VERSION}-x86_64-linux-musl.tar.gz")
}

pub fn image_archive_name() -> String {
    format!("kad-image_{VERSION}.oci.tar")
}

/// The image's name, in the archive and in dist/kubernetes/kad.yaml.
pub fn image_ref() -> String {
    format!("localhost/kad:{VERSION}")
}

/// Writes target/dist/ from the built static binary.
pub fn run_dist(root: &Path) -> Result<()> {
    let started = Instant::now();
    let kad = kad_bin(root);
    if !kad.is_file() {
        bail!("{} is missing: build it first", kad.display());
    }
    let build = root.join("target/dist-build");
    let _ = fs::remove_dir_all(&build);
    let out = dist_dir(root);
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out).context("create target/dist")?;

    // Man pages (gzipped, as Debian wants them) and completions, from the binary itself.
    let raw_man = build.join("man-raw");
    run(Command::new(&kad)
        .arg("manpages")
        .arg(&raw_man)
        .stdout(Stdio::null()))?;
    let man = build.join("man");
    fs::create_dir_all(&man)?;
    for entry in fs::read_dir(&raw_man)? {
        let page = entry?.path();
        let name = page.file_name().context("a page")?.to_string_lossy();
        gzip(&page, &man.join(format!("{name}.gz")))?;
    }
    let completions = build.join("completions");
    fs::create_dir_all(&completions)?;
    for (shell, file) in [("bash", "kad.bash"), ("zsh", "_kad"), ("fish", "kad.fish")] {
        let out = Command::new(&kad)
            .args(["completions", shell])
            .output()
            .context("run kad completions")?;
        if !out.status.success() || out.stdout.is_empty() {
            bail!("kad completions {shell} failed");
        }
        fs::write(completions.join(file), out.stdout)?;
    }
    gzip(
        &root.join("dist/debian/changelog"),
        &build.join("changelog.gz"),
    )?;

    // The package. --no-build: cargo-deb takes the binary built above (it strips its copy).
    let deb = out.join(deb_name());
    run(cargo(root)
        .args([
            "deb",
            "--package",
            "keepalive-daemon",
            "--no-build",
            "--target",
            MUSL_TARGET,
            "--output",
        ])
        .arg(&deb))?;

    // The stripped binary, for the tarball and the image.
    let stripped = build.join("image/kad");
    fs::create_dir_all(build.join("image"))?;
    run(Command::new("strip").arg("-o").arg(&stripped).arg(&kad))?;

    tarball(root, &build, &stripped, &out.join(tarball_name()))?;
    image(root, &build, &out.join(image_archive_name()))?;

    let sums = Command::new("sha256sum")
        .args([deb_name(), tarball_name(), image_archive_name()])
        .current_dir(&out)
        .output()
        .context("run sha256sum")?;
    if !sums.status.success() {
        bail!("sha256sum failed");
    }
    fs::write(out.join("SHA256SUMS"), &sums.stdout)?;

    for name in [deb_name(), tarball_name(), image_archive_name()] {
        let size = fs::metadata(out.join(&name))?.len();
        eprintln!("xtask: target/dist/{name}: {:.1} MB", size as f64 / 1e6);
    }
    eprintln!(
        "xtask: dist written in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn gzip(from: &Path, to: &Path) -> Result<()> {
    let file = fs::File::create(to).with_context(|| format!("create {}", to.display()))?;
    // -n: no name or time stamp in the header (reproducible, as lintian wants).
    run(Command::new("gzip")
        .args(["-9", "-n", "-c"])
        .arg(from)
        .stdout(file))
}

/// The tarball: one directory `kad-VERSION/` with what a host install needs.
fn tarball(root: &Path, build: &Path, kad: &Path, to: &Path) -> Result<()> {
    let name = format!("kad-{VERSION}");
    let dir = build.join("tar").join(&name);
    for sub in ["man", "completions", "oci-hooks.d"] {
        fs::create_dir_all(dir.join(sub))?;
    }
    let copies: Vec<(PathBuf, &str)> = vec![
        (kad.to_path_buf(), "kad"),
        (root.join("dist/kad.service"), "kad.service"),
        (root.join("dist/kad.toml"), "kad.toml"),
        (
            root.join("dist/oci-hooks.d/kad.json"),
            "oci-hooks.d/kad.json",
        ),
        (root.join("README.md"), "README.md"),
        (root.join("LICENSE-MIT"), "LICENSE-MIT"),
        (root.join("LICENSE-APACHE"), "LICENSE-APACHE"),
        (build.join("completions/kad.bash"), "completions/kad.bash"),
        (build.join("completions/_kad"), "completions/_kad"),
        (build.join("completions/kad.fish"), "completions/kad.fish"),
    ];
    for (from, to) in copies {
        fs::copy(&from, dir.join(to)).with_context(|| format!("copy {}", from.display()))?;
    }
    for entry in fs::read_dir(build.join("man"))? {
        let page = entry?.path();
        fs::copy(
            &page,
            dir.join("man").join(page.file_name().context("a page")?),
        )?;
    }
    // Owned by root, sorted, dated by the last commit: the same tree gives the same tarball.
    let epoch = Command::new("git")
        .args(["log", "-1", "--format=%ct"])
        .current_dir(root)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "0".into());
    run(Command::new("tar")
        .args([
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            &format!("--mtime=@{epoch}"),
            "--use-compress-program=gzip -9n",
            "-cf",
        ])
        .arg(to)
        .arg("-C")
        .arg(build.join("tar"))
        .arg(&name))
}

/// podman with a storage of its own under target/dist-build (never the host's).
fn podman(build: &Path) -> Command {
    let dir = build.join("podman");
    let mut command = Command::new("podman");
    command
        .arg("--root")
        .arg(dir.join("storage"))
        .arg("--runroot")
        .arg(dir.join("run"))
        .arg("--tmpdir")
        .arg(dir.join("tmp"))
        .args([
            "--runtime",
            "runc",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
            "--storage-driver",
            "vfs",
            "--log-level",
            "error",
        ])
        .stdin(Stdio::null());
    command
}

/// The image, built from dist/kubernetes/Containerfile with the stripped static binary as its
/// only content, saved as an OCI archive.
fn image(root: &Path, build: &Path, to: &Path) -> Result<()> {
    let context = build.join("image");
    run(podman(build)
        .args([
            "build",
            "--quiet",
            "--pull=never",
            "--tag",
            &image_ref(),
            "--file",
        ])
        .arg(root.join("dist/kubernetes/Containerfile"))
        .arg(&context)
        .stdout(Stdio::null()))?;
    run(podman(build)
        .args(["save", "--quiet", "--format", "oci-archive", "--output"])
        .arg(to)
        .arg(image_ref()))?;
    // The storage is only a means to the archive.
    let _ = podman(build).args(["system", "reset", "--force"]).output();
    let _ = fs::remove_dir_all(build.join("podman"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_package_name_is_the_one_the_system_test_installs() {
        assert_eq!(deb_name(), format!("kad_{VERSION}_amd64.deb"));
        assert!(!VERSION.contains('-'), "no Debian revision");
    }

    /// The Kubernetes manifest names the image this version builds.
    #[test]
    fn the_manifest_names_this_versions_image() {
        let manifest = crate::workspace_root().join("dist/kubernetes/kad.yaml");
        let text = fs::read_to_string(manifest).unwrap();
        let images: Vec<&str> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("image: "))
            .collect();
        assert_eq!(images, [image_ref(), image_ref()]);
    }
}
