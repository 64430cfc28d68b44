//! `cargo xtask test-system`: kad's Debian package on a real Debian 12 host with systemd as
//! PID 1, booted under QEMU (TCG), in scenarios that each give their own verdict.
//!
//! `image` builds and caches the disk and its kernels, `vm` boots one overlay with a shared
//! directory, `deb` finds the package and makes the newer one, and `guest/lib.sh` holds the
//! scenarios themselves. Scenarios that do not disturb each other share a boot: a boot costs
//! 15 to 25 s of TCG before the first scenario, and a minute with its shutdown and the
//! package's first start.
mod deb;
mod image;
mod vm;

use std::{
    fs,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{bail, Context as _, Result};

use crate::setup;

pub struct Options {
    pub deb: Option<PathBuf>,
    pub image_only: bool,
}

/// One boot: a kernel of the image, an overlay (a second boot of the same overlay is a
/// reboot), and the scenarios run in it, in order.
struct BootPlan {
    name: &'static str,
    kernel: &'static str,
    overlay: &'static str,
    fresh: bool,
    scenarios: &'static [&'static str],
}

/// Two boots of one overlay: bookworm's 6.1, then a reboot into bookworm-backports' 6.12 (a
/// kernel upgrade, as a host gets one), where the basic scenario runs again.
const PLAN: &[BootPlan] = &[
    BootPlan {
        name: "6.1",
        kernel: "6.1",
        overlay: "debian12",
        fresh: true,
        scenarios: &[
            "install",
            "service",
            "services",
            "kill",
            "reload",
            "journal",
            "reboot_prepare",
        ],
    },
    BootPlan {
        name: "6.12",
        kernel: "6.12",
        overlay: "debian12",
        fresh: false,
        scenarios: &["reboot", "service", "upgrade", "purge"],
    },
];

const LIB: &str = include_str!("guest/lib.sh");
const PROBE: &str = include_str!("guest/probe.py");
const LOOP: &str = include_str!("guest/loop.py");

struct Verdict {
    kernel: &'static str,
    scenario: String,
    failure: Option<String>,
}

pub fn run(root: &Path, options: &Options) -> Result<()> {
    let work = root.join("target/system");
    fs::create_dir_all(&work).with_context(|| format!("mkdir {}", work.display()))?;
    // Before the long part: a missing package is an error at once.
    let deb = if options.image_only {
        None
    } else {
        Some(deb::package(root, options.deb.as_deref())?)
    };
    setup::system_test_tools()?;
    let start = Instant::now();
    let image = image::image(&work)?;
    eprintln!(
        "xtask: image ready in {} s: {} (kernels {})",
        start.elapsed().as_secs(),
        image.disk.display(),
        image
            .kernels
            .iter()
            .map(|k| k.series.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let Some(deb) = deb else {
        return Ok(());
    };
    let newer = deb::newer(&deb, &work.join("newer"))?;
    eprintln!(
        "xtask: testing {} (and {} for the upgrade)",
        deb.display(),
        newer.display()
    );

    let out = work.join("out");
    let _ = fs::remove_dir_all(&out);
    let mut verdicts = Vec::new();
    let mut security = Vec::new();
    let scenarios_start = Instant::now();
    for plan in PLAN {
        let kernel = image.kernel(plan.kernel)?;
        let dir = out.join(plan.name);
        let share = dir.join("share");
        fs::create_dir_all(share.join("deb"))?;
        fs::create_dir_all(share.join("newer"))?;
        copy_into(&deb, &share.join("deb"))?;
        copy_into(&newer, &share.join("newer"))?;
        fs::write(share.join("lib.sh"), LIB)?;
        fs::write(share.join("probe.py"), PROBE)?;
        fs::write(share.join("loop.py"), LOOP)?;
        let mut script = String::from("source /share/lib.sh\n");
        for scenario in plan.scenarios {
            script.push_str(&format!("scenario {scenario}\n"));
        }
        fs::write(share.join("run.sh"), script)?;
        let overlay = out.join(format!("{}.qcow2", plan.overlay));
        if plan.fresh {
            vm::overlay(&image.disk, &overlay)?;
        }
        eprintln!(
            "xtask: boot {} ({}): {}",
            plan.name,
            kernel.vmlinuz.display(),
            plan.scenarios.join(" ")
        );
        let boot = vm::boot(kernel, &overlay, &share, &dir.join("console.log"))?;
        let output = fs::read_to_string(share.join("output")).unwrap_or_default();
        let why_none = if boot.timed_out {
            format!(
                "the guest did not finish in {} s and was killed",
                boot.seconds
            )
        } else if let Some(said) = boot.qemu_said.as_ref().filter(|_| boot.exit.is_none()) {
            format!("QEMU ended before the guest's script did: {said}")
        } else if boot.exit.is_none() {
            format!(
                "the guest stopped before its script ended (console: {})",
                dir.join("console.log").display()
            )
        } else {
            "the script gave no verdict".to_string()
        };
        let found = parse_verdicts(&output);
        for scenario in plan.scenarios {
            let (failure, took) = match found.iter().find(|said| said.name == *scenario) {
                Some(said) => (said.failure.clone(), said.took.clone()),
                None => (Some(why_none.clone()), "?".into()),
            };
            verdicts.push(Verdict {
                kernel: plan.kernel,
                scenario: format!("{scenario} ({took})"),
                failure: failure
                    .map(|f| format!("{f} (journal: {})", share.join("journal").display())),
            });
        }
        security.extend(
            output
                .lines()
                .filter_map(|l| l.trim().strip_prefix("security: "))
                .map(|s| format!("{}: {s}", plan.kernel)),
        );
        eprintln!("xtask: boot {} took {} s", plan.name, boot.seconds);
    }
    let scenario_seconds = scenarios_start.elapsed().as_secs();
    // The overlays are the only large files; the shares (output, journal, console) stay.
    for plan in PLAN {
        let _ = fs::remove_file(out.join(format!("{}.qcow2", plan.overlay)));
    }

    println!();
    for line in &security {
        println!("systemd-analyze security kad.service on {line}");
    }
    let mut failed = 0;
    for v in &verdicts {
        match &v.failure {
            None => println!("ok      {:<5} {}", v.kernel, v.scenario),
            Some(reason) => {
                failed += 1;
                println!("FAILED  {:<5} {}: {reason}", v.kernel, v.scenario);
            }
        }
    }
    println!(
        "image {} s, scenarios {scenario_seconds} s; output in {}",
        start.elapsed().as_secs() - scenario_seconds,
        out.display()
    );
    println!("{} passed, {failed} failed", verdicts.len() - failed);
    if failed > 0 {
        bail!("{failed} system scenarios failed");
    }
    Ok(())
}

fn copy_into(file: &Path, dir: &Path) -> Result<()> {
    let name = file.file_name().context("a file name")?;
    fs::copy(file, dir.join(name))
        .with_context(|| format!("copy {} to {}", file.display(), dir.display()))?;
    Ok(())
}

/// A scenario's verdict as the guest printed it.
#[derive(Debug, PartialEq)]
struct Said {
    name: String,
    failure: Option<String>,
    /// "12 s", how long the scenario took in the guest.
    took: String,
}

/// The guest's "### ok NAME (N s)" and "### FAILED NAME: REASON (N s)" lines.
fn parse_verdicts(output: &str) -> Vec<Said> {
    output
        .lines()
        .filter_map(|line| {
            let (ok, rest) = if let Some(rest) = line.strip_prefix("### ok ") {
                (true, rest)
            } else {
                (false, line.strip_prefix("### FAILED ")?)
            };
            let (rest, took) = match rest.rsplit_once(" (") {
                Some((head, tail)) if tail.ends_with(" s)") => (head, tail.trim_end_matches(')')),
                _ => (rest, "?"),
            };
            let (name, failure) = if ok {
                (rest, None)
            } else {
                let (name, reason) = rest.split_once(": ").unwrap_or((rest, "failed"));
                (name, Some(reason.to_string()))
            };
            Some(Said {
                name: name.trim().to_string(),
                failure,
                took: took.to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_are_read_back() {
        let out = "### start install\n    note\n### ok install (44 s)\n### start kill\n\
                   ### FAILED kill: line 3: `x` exited with 1: a (b) (7 s)\n### ok old\n";
        let said = |name: &str, failure: Option<&str>, took: &str| Said {
            name: name.into(),
            failure: failure.map(str::to_string),
            took: took.into(),
        };
        assert_eq!(
            parse_verdicts(out),
            [
                said("install", None, "44 s"),
                said("kill", Some("line 3: `x` exited with 1: a (b)"), "7 s"),
                said("old", None, "?"),
            ]
        );
    }
}
