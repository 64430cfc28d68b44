//! The programs measured: the two C programs (`c/`), built, pinned and attached here, and
//! kad's, found among the machine's; their run counters, from bpftool.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::Path,
    process::Command,
};

use anyhow::{ensure, Context as _, Result};
use serde_json::Value;

use super::{Bench, CNT, IDLE, INTVL};

/// Returns 1 and does nothing: what any sock_ops program costs.
pub(super) const EMPTY_C: &str = include_str!("c/empty.bpf.c");
/// What kad does for a socket, by hand: the four options at ACTIVE/PASSIVE_ESTABLISHED.
/// IDLE, INTVL and CNT are given to clang as -D, from the constants of the same names.
pub(super) const ANCHOR_C: &str = include_str!("c/anchor.bpf.c");

/// A program's run counters (bpftool's `run_cnt`, `run_time_ns`).
#[derive(Default, Clone, Copy)]
pub(super) struct ProgStat {
    pub(super) runs: u64,
    pub(super) ns: u64,
}

impl Bench {
    /// Builds a C sock_ops program with clang, pins it and attaches it to `cgroup` with
    /// bpftool. Returns its program id.
    pub(super) fn load_c(
        &mut self,
        name: &str,
        source: &str,
        bpffs: &Path,
        cgroup: &Path,
    ) -> Result<u64> {
        // Never the root: it would act on every connection of the machine.
        ensure!(
            cgroup != self.cg_root && cgroup.starts_with(&self.cg_root),
            "refusing to attach to {}",
            cgroup.display()
        );
        let src = self.tmp.join(format!("{name}.bpf.c"));
        let obj = self.tmp.join(format!("{name}.bpf.o"));
        std::fs::write(&src, source)?;
        let arch_include = format!("/usr/include/{}-linux-gnu", std::env::consts::ARCH);
        let define = |k: &str, v: u32| format!("-D{k}={v}");
        crate::run(
            Command::new("clang")
                .args(["-O2", "-g", "-target", "bpf", "-I"])
                .arg(&arch_include)
                .arg(define("IDLE", IDLE))
                .arg(define("INTVL", INTVL))
                .arg(define("CNT", CNT))
                .arg("-c")
                .arg(&src)
                .arg("-o")
                .arg(&obj),
        )
        .with_context(|| format!("build the {name} program with clang"))?;
        let pin = bpffs.join(name);
        crate::run(
            Command::new("bpftool")
                .args(["prog", "load"])
                .arg(&obj)
                .arg(&pin)
                .args(["type", "sockops"]),
        )?;
        crate::run(
            Command::new("bpftool")
                .args(["cgroup", "attach"])
                .arg(cgroup)
                .args(["sock_ops", "pinned"])
                .arg(&pin),
        )?;
        self.guard
            .attached
            .push((cgroup.to_path_buf(), pin.clone()));
        let info = bpftool(&["prog", "show", "pinned", &pin.to_string_lossy()])?;
        info["id"]
            .as_u64()
            .with_context(|| format!("no program id for {}", pin.display()))
    }
}

/// The programs of the daemon that pinned its maps in `bpffs`: those named kad_* that use
/// one of those maps (other daemons on the machine load programs with the same names).
pub(super) fn kad_programs(bpffs: &Path) -> Result<BTreeMap<u64, String>> {
    let mut maps = HashSet::new();
    for map in ["KAD_POLICY", "KAD_PATHS", "KAD_COUNTS", "KAD_MARKS"] {
        let info = bpftool(&["map", "show", "pinned", &bpffs.join(map).to_string_lossy()])?;
        maps.insert(info["id"].as_u64().context("map id")?);
    }
    let progs = bpftool(&["prog", "show"])?;
    let found: BTreeMap<u64, String> = progs
        .as_array()
        .context("bpftool prog show: not a list")?
        .iter()
        .filter(|p| p["name"].as_str().is_some_and(|n| n.starts_with("kad_")))
        .filter(|p| {
            p["map_ids"].as_array().is_some_and(|ids| {
                ids.iter()
                    .any(|m| m.as_u64().is_some_and(|m| maps.contains(&m)))
            })
        })
        .filter_map(|p| Some((p["id"].as_u64()?, p["name"].as_str()?.to_string())))
        .collect();
    ensure!(
        found.values().any(|n| n == "kad_sockops"),
        "kad's programs not found with bpftool"
    );
    Ok(found)
}

/// Run counters of every program on the machine.
pub(super) fn prog_stats() -> Result<HashMap<u64, ProgStat>> {
    let progs = bpftool(&["prog", "show"])?;
    Ok(progs
        .as_array()
        .context("bpftool prog show: not a list")?
        .iter()
        .filter_map(|p| {
            Some((
                p["id"].as_u64()?,
                ProgStat {
                    // Absent until the program has run with stats on.
                    runs: p["run_cnt"].as_u64().unwrap_or(0),
                    ns: p["run_time_ns"].as_u64().unwrap_or(0),
                },
            ))
        })
        .collect())
}

fn bpftool(args: &[&str]) -> Result<Value> {
    let out = Command::new("bpftool")
        .args(args)
        .arg("--json")
        .output()
        .context("run bpftool")?;
    ensure!(
        out.status.success(),
        "bpftool {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("bpftool {} output", args.join(" ")))
}
