//! How `kad list` and `kad status` print.
use std::fmt::Write as _;

use crate::{
    policy::Mode,
    protocol::{PolicyEntry, StatsEntry, StatusReport},
};

pub fn policies(entries: &[PolicyEntry], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(entries)?);
    } else {
        print!("{}", table(entries));
    }
    Ok(())
}

pub fn status(report: &StatusReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    let loaded = if report.program_loaded {
        "loaded"
    } else {
        "not loaded"
    };
    println!("program:      {loaded}");
    println!("kernel:       {}", report.kernel);
    println!("cgroup2 root: {}", report.cgroup_root);
    println!("bpffs:        {}", report.bpffs);
    println!("state dir:    {}", report.state_dir);
    println!("config:       {}", report.config);
    println!("attachments:  {}", report.attachments);
    println!("policies:     {}", report.policies.len());
    if !report.policies.is_empty() {
        print!("{}", table(&report.policies));
    }
    for detail in &report.details {
        let state = match (&detail.error, detail.cgroup_id) {
            (Some(error), _) => format!("not in force: {error}"),
            (None, Some(id)) => format!("in force on cgroup id {id}"),
            (None, None) => "waiting for the cgroup to exist".to_string(),
        };
        println!("  {} (from {}): {state}", detail.cgroup, detail.source);
    }
    Ok(())
}

fn table(entries: &[PolicyEntry]) -> String {
    if entries.is_empty() {
        return "no policies\n".into();
    }
    let width = entries
        .iter()
        .map(|e| e.cgroup.len())
        .max()
        .unwrap_or(0)
        .max(6);
    let mut out = format!("{:<width$}  MODE  IDLE     INTVL    CNT\n", "CGROUP");
    for e in entries {
        let value = |v: Option<u32>| match (e.mode, v) {
            (Mode::Off, _) => "-".to_string(),
            (Mode::On, None) => "default".to_string(),
            (Mode::On, Some(v)) => v.to_string(),
        };
        let mode = match e.mode {
            Mode::On => "on",
            Mode::Off => "off",
        };
        let _ = writeln!(
            out,
            "{:<width$}  {mode:<4}  {:<7}  {:<7}  {}",
            e.cgroup,
            value(e.idle),
            value(e.intvl),
            value(e.cnt)
        );
    }
    out
}

pub fn stats(entries: &[StatsEntry], kills_counted: bool, json: bool) -> anyhow::Result<()> {
    if json {
        let value = serde_json::json!({ "kills_counted": kills_counted, "cgroups": entries });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    if entries.is_empty() {
        println!("no policies in force");
        return Ok(());
    }
    let width = entries
        .iter()
        .map(|e| e.cgroup.len())
        .max()
        .unwrap_or(0)
        .max(6);
    println!(
        "{:<width$}  CONNECT  ACCEPT   FAILURES  KEEPALIVE-KILLS",
        "CGROUP"
    );
    for e in entries {
        let kills = if kills_counted {
            e.keepalive_kills.to_string()
        } else {
            "n/a".into()
        };
        println!(
            "{:<width$}  {:<7}  {:<7}  {:<8}  {kills}",
            e.cgroup, e.connect, e.accept, e.setsockopt_failures
        );
    }
    Ok(())
}
