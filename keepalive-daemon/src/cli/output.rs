//! How `kad list`, `kad status`, `kad inspect` and `kad audit` print.
use std::{collections::BTreeMap, fmt::Write as _};

use crate::{
    api::protocol::{PolicyEntry, StatsEntry, StatusReport},
    cli::audit::Audit,
    cli::inspect::{format_ms, Connection},
    model::policy::Mode,
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
    println!("program:      {loaded} (tag {})", report.program);
    println!("kernel:       {}", report.kernel);
    match &report.daemon_cgroup_root {
        Some(theirs) => println!(
            "cgroup2 root: {} (the daemon has it at {theirs}; paths are shown as here)",
            report.cgroup_root
        ),
        None => println!("cgroup2 root: {}", report.cgroup_root),
    }
    println!("bpffs:        {}", report.bpffs);
    println!("state dir:    {}", report.state_dir);
    println!("config:       {}", report.config);
    println!(
        "anchors:      {} ({} policy entries by cgroup id)",
        report.attachments, report.map_entries
    );
    for anchor in &report.anchors {
        let note = if anchor.program == report.program {
            String::new()
        } else {
            " (an older program)".to_string()
        };
        println!("  {} runs {}{note}", anchor.cgroup, anchor.program);
    }
    for f in &report.features {
        match &f.reason {
            None => println!("feature:      {}: yes", f.feature),
            Some(reason) => println!("feature:      {}: NO ({reason})", f.feature),
        }
    }
    println!("policies:     {}", report.policies.len());
    if !report.policies.is_empty() {
        print!("{}", table(&report.policies));
    }
    for detail in &report.details {
        let mut state = match (&detail.error, detail.cgroup_id) {
            (Some(error), _) => format!("not in force: {error}"),
            (None, Some(id)) => format!("in force on cgroup id {id}"),
            (None, None) => "waiting for the cgroup to exist".to_string(),
        };
        match (detail.enforce, detail.overridden) {
            (true, 0) => state.push_str("; enforced, no program has set its own values"),
            (true, n) => state.push_str(&format!(
                "; enforced: {n} connections whose program set other keepalive values, rewritten to the policy's"
            )),
            (false, 0) => {}
            (false, n) => state.push_str(&format!(
                "; {n} connections overridden: their program set other keepalive values after kad and they won (kad inspect shows them; --enforce makes the policy win)"
            )),
        }
        let source = match (&detail.pod, &detail.docker, &detail.container) {
            (Some(pod), _, _) => format!("pod {pod}"),
            (None, Some(name), _) => format!("docker {name}"),
            (None, None, Some(id)) => format!("container {}", short_id(id)),
            (None, None, None) => detail.source.clone(),
        };
        if detail.stopped && detail.error.is_none() {
            state = "container stopped: waiting for its next start (removed with the container)"
                .to_string();
        }
        println!("  {} (from {source}): {state}", detail.cgroup);
    }
    if let Some(pods) = &report.pods {
        let state = match (&pods.error, pods.connected) {
            (_, true) => "connected".to_string(),
            (Some(e), false) => format!("NOT connected ({e}); the pod policies in force stay"),
            (None, false) => "NOT connected; the pod policies in force stay".to_string(),
        };
        println!("pods:         {}: {state}, {} pods", pods.source, pods.pods);
        for line in &pods.invalid {
            println!("  no policy: {line}");
        }
        if let Some(refused) = &pods.refused {
            println!("  last refused event: {refused}");
        }
    }
    if let Some(docker) = &report.docker {
        let state = match (&docker.error, docker.connected) {
            (_, true) => format!(
                "connected (API {}, {} cgroup driver)",
                docker.api.as_deref().unwrap_or("?"),
                docker.cgroup_driver.as_deref().unwrap_or("?")
            ),
            (Some(e), false) => format!("NOT connected ({e}); the Docker policies in force stay"),
            (None, false) => "NOT connected; the Docker policies in force stay".to_string(),
        };
        println!(
            "docker:       {}: {state}, {} labelled containers",
            docker.socket, docker.containers
        );
        for line in &docker.invalid {
            println!("  no policy: {line}");
        }
    }
    if !report.counters.is_empty() {
        println!("counters:");
        stats(&report.counters, report.kills_counted, false)?;
    }
    Ok(())
}

fn table(entries: &[PolicyEntry]) -> String {
    if entries.is_empty() {
        return "no policies\n".into();
    }
    let width = width(entries, 6, |e| e.cgroup.len());
    let mut out = format!(
        "{:<width$}  MODE  IDLE     INTVL    CNT      USER-TIMEOUT  ENFORCE\n",
        "CGROUP"
    );
    for e in entries {
        let value = |v: Option<u32>| match (e.policy.mode, v) {
            (Mode::Off, _) => "-".to_string(),
            (Mode::On, None) => "default".to_string(),
            (Mode::On, Some(v)) => v.to_string(),
        };
        let mode = match e.policy.mode {
            Mode::On => "on",
            Mode::Off => "off",
        };
        let mut note = match (&e.pod, &e.docker, &e.container) {
            (Some(pod), _, _) => format!("  (pod {pod})"),
            (None, Some(name), _) => format!("  (docker {name})"),
            (None, None, Some(id)) => format!("  (container {})", short_id(id)),
            (None, None, None) => String::new(),
        };
        if e.host {
            note.push_str("  (host policy: every connection without a nearer policy)");
        }
        if e.stopped {
            note.push_str("  (stopped: waiting for its next start)");
        } else if e.waiting {
            note.push_str("  (waiting for the cgroup to exist)");
        }
        let user_timeout = match (e.policy.mode, e.policy.user_timeout) {
            (Mode::On, Some(ms)) => format!("{ms}ms"),
            _ => "-".to_string(),
        };
        let enforce = match (e.policy.mode, e.policy.enforce) {
            (Mode::Off, _) => "-",
            (Mode::On, true) => "yes",
            (Mode::On, false) => "no",
        };
        let _ = writeln!(
            out,
            "{:<width$}  {mode:<4}  {:<7}  {:<7}  {:<7}  {user_timeout:<12}  {enforce}{note}",
            e.cgroup,
            value(e.policy.idle),
            value(e.policy.intvl),
            value(e.policy.cnt),
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
    let width = width(entries, 6, |e| e.cgroup.len());
    println!(
        "{:<width$}  CONNECT  ACCEPT   EXISTING  OVERRIDDEN  FAILURES  KEEPALIVE-KILLS",
        "CGROUP"
    );
    for e in entries {
        let kills = if kills_counted {
            e.keepalive_kills.to_string()
        } else {
            "n/a".into()
        };
        println!(
            "{:<width$}  {:<7}  {:<7}  {:<8}  {:<10}  {:<8}  {kills}",
            e.cgroup, e.connect, e.accept, e.refreshed, e.overridden, e.setsockopt_failures
        );
    }
    Ok(())
}

pub fn connections(connections: &[Connection], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(connections)?);
        return Ok(());
    }
    if connections.is_empty() {
        println!("no established TCP connections");
        return Ok(());
    }
    let local_w = width(connections, 5, |c| c.local.len());
    let remote_w = width(connections, 6, |c| c.remote.len());
    println!(
        "{:<7} {:<15} {:<4} {:<local_w$} {:<remote_w$} KEEPALIVE IDLE   INTVL  CNT  USER-TIMEOUT TIMER                  POLICY",
        "PID", "COMMAND", "FD", "LOCAL", "REMOTE"
    );
    let mut in_force: BTreeMap<&str, &PolicyEntry> = BTreeMap::new();
    let mut differing = 0;
    for c in connections {
        // A value that differs from the policy's is marked with '*'.
        let mark = |name: &str| if c.differs.contains(&name) { "*" } else { "" };
        let show = |v: Option<i32>, name: &str| {
            v.map_or_else(|| "?".to_string(), |v| format!("{v}{}", mark(name)))
        };
        let keepalive = match c.keepalive {
            Some(true) => "on".to_string(),
            Some(false) => format!("off{}", mark("keepalive")),
            None => "?".to_string(),
        };
        let timer = match c.timer.as_str() {
            "off" => "-".to_string(),
            "keepalive" => format!("keepalive,{},{}", format_ms(c.timer_left_ms), c.probes),
            other => format!("{other},{}", format_ms(c.timer_left_ms)),
        };
        let policy = match (&c.policy, c.policy_known) {
            (_, false) => "?".to_string(),
            (None, true) => "none".to_string(),
            (Some(p), true) => {
                in_force.insert(&p.cgroup, p);
                p.cgroup.clone()
            }
        };
        if !c.differs.is_empty() {
            differing += 1;
        }
        println!(
            "{:<7} {:<15} {:<4} {:<local_w$} {:<remote_w$} {keepalive:<9} {:<6} {:<6} {:<4} {:<12} {timer:<22} {policy}",
            c.pid,
            c.command,
            c.fd,
            c.local,
            c.remote,
            show(c.idle, "idle"),
            show(c.intvl, "intvl"),
            show(c.cnt, "cnt"),
            show(c.user_timeout, "user_timeout"),
        );
    }
    for (cgroup, entry) in &in_force {
        println!("policy {cgroup}: {}", entry.policy);
    }
    if differing > 0 {
        println!(
            "* {differing} of {} connections differ from the policy in force: their program set its own values after kad (counted as OVERRIDDEN by kad stats; --enforce makes the policy win)",
            connections.len()
        );
    }
    Ok(())
}

pub fn audit(audit: &Audit, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(audit)?);
        return Ok(());
    }
    if audit.cgroups.is_empty() {
        println!("no established TCP connections");
    } else {
        let width = width(&audit.cgroups, 6, |r| r.cgroup.len());
        println!(
            "{:<width$}  CONNECTIONS  KEEPALIVE-OFF  DIFFERING  POLICY",
            "CGROUP"
        );
        for row in &audit.cgroups {
            let (differ, policy) = match &row.policy {
                None => ("-".to_string(), "none".to_string()),
                Some(p) if p.policy.mode == Mode::Off => {
                    ("-".to_string(), format!("{} (off)", p.cgroup))
                }
                Some(p) => (
                    row.differ.to_string(),
                    format!("{} ({})", p.cgroup, p.policy),
                ),
            };
            let unknown = if row.unknown > 0 {
                format!(" ({} could not be read)", row.unknown)
            } else {
                String::new()
            };
            println!(
                "{:<width$}  {:<11}  {:<13}  {differ:<9}  {policy}{unknown}",
                row.cgroup, row.connections, row.keepalive_off
            );
        }
    }
    if !audit.unreadable_processes.is_empty() {
        println!(
            "{} processes whose sockets this user may not read were left out (run as root)",
            audit.unreadable_processes.len()
        );
    }
    Ok(())
}

/// The width of a column: its longest cell, at least `min`.
fn width<T>(rows: &[T], min: usize, len: impl Fn(&T) -> usize) -> usize {
    rows.iter().map(len).max().unwrap_or(0).max(min)
}

/// A container id as `podman ps` and `docker ps` show it.
fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}
