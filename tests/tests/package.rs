//! What `cargo xtask dist` writes, checked with Debian's own tools: the .deb with lintian (every
//! tag it reports fails, except those the package's lintian-overrides explain) and dpkg-deb
//! (control fields, conffiles, maintainer scripts, every file where Debian and kad's unit and
//! hook file expect it); the tarball and SHA256SUMS with tar and sha256sum. Nothing is
//! installed: the package is unpacked into a temp dir (installing it under systemd is the
//! systemd VM's test).
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use kad_tests::{dist_file, kad_bin, TempDir, VERSION};

fn deb() -> Option<PathBuf> {
    dist_file(&format!("kad_{VERSION}_amd64.deb"))
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn dpkg_deb(args: &[&str], deb: &Path) -> String {
    ok(
        Command::new("dpkg-deb")
            .args(args)
            .arg(deb)
            .output()
            .expect("run dpkg-deb"),
        &format!("dpkg-deb {args:?}"),
    )
}

/// The commands kad's help lists (not hidden): each has a man page and a completion.
fn commands() -> Vec<String> {
    let help = ok(
        Command::new(kad_bin())
            .arg("--help")
            .output()
            .expect("run kad --help"),
        "kad --help",
    );
    help.split("Commands:")
        .nth(1)
        .expect("a Commands: section")
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

#[test]
fn lintian_is_clean() {
    if !kad_tests::host_only("the package") {
        return;
    }
    let Some(deb) = deb() else { return };
    // Errors and warnings fail lintian itself; --display-info shows the info tags too, which
    // fail below. Overridden tags are in the package's overrides file, each with its reason.
    let out = Command::new("lintian")
        .args([
            "--fail-on",
            "error,warning",
            "--display-info",
            "--tag-display-limit",
            "0",
        ])
        .arg(&deb)
        .output()
        .expect("run lintian (cargo xtask setup installs it)");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "lintian: {report}");
    // Not even an info tag is left unexplained.
    let tags: Vec<&str> = report
        .lines()
        .filter(|l| l.starts_with("E: ") || l.starts_with("W: ") || l.starts_with("I: "))
        .collect();
    assert!(tags.is_empty(), "lintian tags: {tags:#?}");
}

#[test]
fn the_control_fields_and_the_maintainer_scripts() {
    if !kad_tests::host_only("the package") {
        return;
    }
    let Some(deb) = deb() else { return };
    let field = |name: &str| {
        dpkg_deb(&["--field"], &deb)
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")).map(str::to_string))
    };
    assert_eq!(field("Package").as_deref(), Some("kad"));
    assert_eq!(field("Version").as_deref(), Some(VERSION));
    assert_eq!(field("Architecture").as_deref(), Some("amd64"));
    // Static: no shared library to depend on; only the helpers the maintainer scripts call.
    assert_eq!(
        field("Depends").as_deref(),
        Some("init-system-helpers (>= 1.54~)")
    );
    // The config file is a conffile: an upgrade keeps the admin's edits.
    let conffiles = dpkg_deb(&["--info"], &deb);
    let conffiles = Command::new("dpkg-deb")
        .arg("--info")
        .arg(&deb)
        .arg("conffiles")
        .output()
        .map(|o| ok(o, "dpkg-deb --info conffiles"))
        .unwrap_or_else(|e| panic!("dpkg-deb: {e} ({conffiles})"));
    assert_eq!(conffiles.trim(), "/etc/kad/kad.toml");

    let script = |name: &str| {
        ok(
            Command::new("dpkg-deb")
                .arg("--info")
                .arg(&deb)
                .arg(name)
                .output()
                .expect("run dpkg-deb"),
            name,
        )
    };
    let postinst = script("postinst");
    // Enabled and started on install, restarted (not stopped first by the prerm) on upgrade.
    assert!(
        postinst.contains("deb-systemd-helper enable 'kad.service'")
            || postinst.contains("deb-systemd-helper enable kad.service"),
        "{postinst}"
    );
    assert!(postinst.contains("_dh_action=restart"), "{postinst}");
    assert!(
        postinst.contains("deb-systemd-invoke $_dh_action"),
        "{postinst}"
    );
    assert!(!postinst.contains("#DEBHELPER#"), "{postinst}");
    let prerm = script("prerm");
    // Stopped only on remove.
    assert!(
        prerm.contains("[ \"$1\" = remove ]") && prerm.contains("deb-systemd-invoke stop"),
        "{prerm}"
    );
    let postrm = script("postrm");
    assert!(
        postrm.contains("uninstall --purge --bpffs /sys/fs/bpf/kad --state-dir /var/lib/kad"),
        "{postrm}"
    );
    assert!(postrm.contains("deb-systemd-helper purge"), "{postrm}");
    for (name, text) in [
        ("postinst", &postinst),
        ("prerm", &prerm),
        ("postrm", &postrm),
    ] {
        let out = Command::new("sh")
            .args(["-n", "-c", text])
            .output()
            .expect("sh -n");
        assert!(
            out.status.success(),
            "{name} is not valid sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_files_are_where_the_unit_and_the_hook_expect_them() {
    if !kad_tests::host_only("the package") {
        return;
    }
    let Some(deb) = deb() else { return };
    let listing = dpkg_deb(&["--contents"], &deb);
    let files: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(|p| p.trim_start_matches('.'))
        .collect();
    let mut expected: Vec<String> = [
        "/usr/bin/kad",
        "/etc/kad/kad.toml",
        "/usr/share/containers/oci/hooks.d/kad.json",
        "/usr/share/doc/kad/copyright",
        "/usr/share/doc/kad/changelog.gz",
        "/usr/share/bash-completion/completions/kad",
        "/usr/share/zsh/vendor-completions/_kad",
        "/usr/share/fish/vendor_completions.d/kad.fish",
        "/usr/share/man/man1/kad.1.gz",
        "/usr/share/kad/prometheus/kad-rules.yml",
        "/usr/share/kad/prometheus/kad-rules.test.yml",
        "/usr/share/kad/grafana/kad-dashboard.json",
    ]
    .map(String::from)
    .to_vec();
    for command in commands() {
        expected.push(format!("/usr/share/man/man1/kad-{command}.1.gz"));
    }
    for path in &expected {
        assert!(
            files.contains(&path.as_str()),
            "{path} not in the package:\n{listing}"
        );
    }
    let unit = files
        .iter()
        .find(|f| f.ends_with("/systemd/system/kad.service"))
        .unwrap_or_else(|| panic!("no kad.service in {listing}"));

    // Unpacked: the unit and the hook name the packaged binary, which is static and runs.
    let dir = TempDir::new("deb");
    ok(
        Command::new("dpkg-deb")
            .arg("--extract")
            .arg(&deb)
            .arg(&dir.0)
            .output()
            .expect("dpkg-deb -x"),
        "dpkg-deb --extract",
    );
    let unit = fs::read_to_string(dir.0.join(unit.trim_start_matches('/'))).unwrap();
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    assert!(exec.starts_with("/usr/bin/kad daemon "), "{exec}");
    let hook: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(dir.0.join("usr/share/containers/oci/hooks.d/kad.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(hook["hook"]["path"], "/usr/bin/kad");
    let kad = dir.0.join("usr/bin/kad");
    let file = ok(
        Command::new("file")
            .arg("-L")
            .arg(&kad)
            .output()
            .expect("run file"),
        "file",
    );
    assert!(
        file.contains("static-pie linked") || file.contains("statically linked"),
        "{file}"
    );
    assert!(file.contains(", stripped"), "{file}");
    let version = ok(
        Command::new(&kad)
            .arg("--version")
            .output()
            .expect("run the packaged kad"),
        "kad --version",
    );
    assert_eq!(version.trim(), format!("kad {VERSION}"));
    // The shipped config is all comments: a daemon reading it has no config policy.
    let config = fs::read_to_string(dir.0.join("etc/kad/kad.toml")).unwrap();
    assert!(
        config.lines().all(|l| l.is_empty() || l.starts_with('#')),
        "{config}"
    );
    // A man page per command, rendered by man itself.
    let page = ok(
        Command::new("man")
            .arg("-l")
            .arg(dir.0.join("usr/share/man/man1/kad-set.1.gz"))
            .env("MANWIDTH", "100")
            .output()
            .expect("run man"),
        "man -l kad-set.1.gz",
    );
    assert!(page.contains("--idle"), "{page}");
    // The bash completion loads and completes the commands.
    let bash = dir.0.join("usr/share/bash-completion/completions/kad");
    let out = ok(
        Command::new("bash")
            .arg("-c")
            .arg(format!(
                "source '{}' && COMP_WORDS=(kad inst) && COMP_CWORD=1 && _kad kad inst kad && echo \"${{COMPREPLY[@]}}\"",
                bash.display()
            ))
            .output()
            .expect("run bash"),
        "bash completion",
    );
    assert_eq!(out.trim(), "install-host");
}

#[test]
fn the_tarball_and_the_checksums() {
    if !kad_tests::host_only("the package") {
        return;
    }
    let Some(sums) = dist_file("SHA256SUMS") else {
        return;
    };
    let dir = sums.parent().unwrap();
    let out = ok(
        Command::new("sha256sum")
            .args(["--check", "--strict", "SHA256SUMS"])
            .current_dir(dir)
            .output()
            .expect("run sha256sum"),
        "sha256sum --check",
    );
    for name in [
        format!("kad_{VERSION}_amd64.deb"),
        format!("kad-{VERSION}-x86_64-linux-musl.tar.gz"),
        format!("kad-image_{VERSION}.oci.tar"),
    ] {
        assert!(out.contains(&format!("{name}: OK")), "{out}");
    }
    let tarball = dir.join(format!("kad-{VERSION}-x86_64-linux-musl.tar.gz"));
    let listing = ok(
        Command::new("tar")
            .arg("-tvzf")
            .arg(&tarball)
            .output()
            .expect("run tar"),
        "tar -t",
    );
    let top = format!("kad-{VERSION}/");
    let mut expected: Vec<String> = [
        "kad",
        "kad.service",
        "kad.toml",
        "oci-hooks.d/kad.json",
        "README.md",
        "LICENSE-MIT",
        "LICENSE-APACHE",
        "completions/kad.bash",
        "completions/_kad",
        "completions/kad.fish",
        "man/kad.1.gz",
    ]
    .map(String::from)
    .to_vec();
    expected.extend(commands().iter().map(|c| format!("man/kad-{c}.1.gz")));
    for path in expected {
        let path = format!("{top}{path}");
        assert!(
            listing.lines().any(|l| l.ends_with(&format!(" {path}"))),
            "{path} not in the tarball:\n{listing}"
        );
    }
    // Owned by root, the binary executable.
    assert!(listing.lines().all(|l| l.contains(" 0/0 ")), "{listing}");
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("-rwxr-xr-x") && l.ends_with(&format!(" {top}kad"))),
        "{listing}"
    );
}
