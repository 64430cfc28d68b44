//! The kernels: Debian's packages, found and fetched through an apt of our own, unpacked
//! under `target/kernels/` where the next run finds them.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use anyhow::{bail, Context as _, Result};

use crate::run;

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

/// apt with its own sources, lists and cache: the host's apt configuration and state are
/// never changed (its sources only tell which Debian mirror to use).
pub(super) struct PrivateApt {
    options: Vec<String>,
}

impl PrivateApt {
    pub(super) fn new(work: &Path) -> Result<PrivateApt> {
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

    pub(super) fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command.args(&self.options);
        command
    }
}

/// A sources.list for [`SUITES`], on the Debian mirrors the host's apt uses.
fn sources_list() -> Result<String> {
    let mirrors = host_mirrors()?;
    Ok(SUITES
        .iter()
        .map(|suite| {
            let base = if suite.ends_with("-security") {
                &mirrors.security
            } else {
                &mirrors.archive
            };
            format!("deb [signed-by={KEYRING}] {base} {suite} main\n")
        })
        .collect())
}

/// The Debian mirrors the host's apt uses for its own release and for that release's security
/// updates.
pub(crate) struct HostMirrors {
    pub(crate) codename: String,
    pub(crate) archive: String,
    pub(crate) security: String,
}

/// The host's [`HostMirrors`]: `apt-get --print-uris update` names them whatever the host's
/// format (one-line or deb822) and needs no downloaded lists.
pub(crate) fn host_mirrors() -> Result<HostMirrors> {
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
    Ok(HostMirrors {
        codename,
        archive,
        security,
    })
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
pub(super) fn kernel(apt: &PrivateApt, work: &Path, version: &str) -> Result<PathBuf> {
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
}
