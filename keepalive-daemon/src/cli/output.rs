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
    let paths: Vec<String> = entries
        .iter()
        .map(|e| short_path(&e.cgroup, PATH_COLUMN))
        .collect();
    let width = width(&paths, 6, |p| p.chars().count());
    let mut out = format!(
        "{:<width$}  MODE  IDLE     INTVL    CNT      USER-TIMEOUT  ENFORCE\n",
        "CGROUP"
    );
    for (e, path) in entries.iter().zip(&paths) {
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
            "{path:<width$}  {mode:<4}  {:<7}  {:<7}  {:<7}  {user_timeout:<12}  {enforce}{note}",
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
    let paths: Vec<String> = entries
        .iter()
        .map(|e| short_path(&e.cgroup, PATH_COLUMN))
        .collect();
    let width = width(&paths, 6, |p| p.chars().count());
    println!(
        "{:<width$}  CONNECT  ACCEPT   EXISTING  OVERRIDDEN  FAILURES  KEEPALIVE-KILLS",
        "CGROUP"
    );
    for (e, path) in entries.iter().zip(&paths) {
        let kills = if kills_counted {
            e.keepalive_kills.to_string()
        } else {
            "n/a".into()
        };
        println!(
            "{path:<width$}  {:<7}  {:<7}  {:<8}  {:<10}  {:<8}  {kills}",
            e.connect, e.accept, e.refreshed, e.overridden, e.setsockopt_failures
        );
    }
    Ok(())
}

pub fn connections(connections: &[Connection], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(connections)?);
        return Ok(());
    }
    print!("{}", connections_table(connections));
    Ok(())
}

fn connections_table(connections: &[Connection]) -> String {
    if connections.is_empty() {
        return "no established TCP connections\n".into();
    }
    let mut out = String::new();
    let local_w = width(connections, 5, |c| c.local.len());
    let remote_w = width(connections, 6, |c| c.remote.len());
    let timers: Vec<String> = connections.iter().map(timer).collect();
    let timer_w = width(&timers, 5, String::len);
    // PID, COMMAND, FD, LOCAL, REMOTE, KEEPALIVE to USER-TIMEOUT, TIMER, with their spaces.
    let before_policy = 29 + local_w + remote_w + 45 + timer_w;
    let policy_w = LINE.saturating_sub(before_policy).max(MIN_PATH_COLUMN);
    let _ = writeln!(
        out,
        "{:<7} {:<15} {:<4} {:<local_w$} {:<remote_w$} KEEPALIVE IDLE   INTVL  CNT  USER-TIMEOUT {:<timer_w$} POLICY",
        "PID", "COMMAND", "FD", "LOCAL", "REMOTE", "TIMER"
    );
    let mut in_force: BTreeMap<&str, &PolicyEntry> = BTreeMap::new();
    let mut differing = 0;
    for (c, timer) in connections.iter().zip(&timers) {
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
        let policy = match (&c.policy, c.policy_known) {
            (_, false) => "?".to_string(),
            (None, true) => "none".to_string(),
            (Some(p), true) => {
                in_force.insert(&p.cgroup, p);
                short_path(&p.cgroup, policy_w)
            }
        };
        if !c.differs.is_empty() {
            differing += 1;
        }
        let _ = writeln!(
        out,
            "{:<7} {:<15} {:<4} {:<local_w$} {:<remote_w$} {keepalive:<9} {:<6} {:<6} {:<4} {:<12} {timer:<timer_w$} {policy}",
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
        let _ = writeln!(out, "policy {cgroup}: {}", entry.policy);
    }
    if differing > 0 {
        let _ = writeln!(
        out,
            "* {differing} of {} connections differ from the policy in force: their program set its own values after kad (counted as OVERRIDDEN by kad stats; --enforce makes the policy win)",
            connections.len()
        );
    }
    out
}

pub fn audit(audit: &Audit, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(audit)?);
        return Ok(());
    }
    if audit.cgroups.is_empty() {
        println!("no established TCP connections");
    } else {
        let paths: Vec<String> = audit
            .cgroups
            .iter()
            .map(|r| short_path(&r.cgroup, PATH_COLUMN))
            .collect();
        let width = width(&paths, 6, |p| p.chars().count());
        println!(
            "{:<width$}  CONNECTIONS  KEEPALIVE-OFF  DIFFERING  POLICY",
            "CGROUP"
        );
        for (row, path) in audit.cgroups.iter().zip(&paths) {
            let (differ, policy) = match &row.policy {
                None => ("-".to_string(), "none".to_string()),
                Some(p) if p.policy.mode == Mode::Off => (
                    "-".to_string(),
                    format!("{} (off)", short_path(&p.cgroup, PATH_COLUMN)),
                ),
                Some(p) => (
                    row.differ.to_string(),
                    format!("{} ({})", short_path(&p.cgroup, PATH_COLUMN), p.policy),
                ),
            };
            let unknown = if row.unknown > 0 {
                format!(" ({} could not be read)", row.unknown)
            } else {
                String::new()
            };
            println!(
                "{path:<width$}  {:<11}  {:<13}  {differ:<9}  {policy}{unknown}",
                row.connections, row.keepalive_off
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

/// A connection's TCP timer, as ss shows it.
fn timer(c: &Connection) -> String {
    match c.timer.as_str() {
        "off" => "-".to_string(),
        "keepalive" => format!("keepalive,{},{}", format_ms(c.timer_left_ms), c.probes),
        other => format!("{other},{}", format_ms(c.timer_left_ms)),
    }
}

/// The longest cgroup path a table shows whole; `--json` has every path whole.
const PATH_COLUMN: usize = 72;
/// What `inspect`'s rows are kept within: its POLICY column, last, gets what the others leave,
/// but at least `MIN_PATH_COLUMN`.
const LINE: usize = 200;
const MIN_PATH_COLUMN: usize = 36;

/// A cgroup path as the tables show it: container ids (64 hex digits) as `docker ps` shows
/// them, and a path still longer than `max` characters cut in the middle, keeping its start and
/// its last components.
fn short_path(path: &str, max: usize) -> String {
    let mut out = String::with_capacity(path.len());
    let mut rest = path;
    while !rest.is_empty() {
        let run = rest.bytes().take_while(u8::is_ascii_hexdigit).count();
        if run == 64 {
            out.push_str(&rest[..12]);
            out.push('…');
            rest = &rest[64..];
        } else if run > 0 {
            out.push_str(&rest[..run]);
            rest = &rest[run..];
        } else {
            let other = rest
                .char_indices()
                .find(|(_, c)| c.is_ascii_hexdigit())
                .map_or(rest.len(), |(i, _)| i);
            out.push_str(&rest[..other]);
            rest = &rest[other..];
        }
    }
    let chars: Vec<char> = out.chars().collect();
    if chars.len() <= max {
        return out;
    }
    let head = max / 3;
    let tail = max - head - 1;
    let mut short: String = chars[..head].iter().collect();
    short.push('…');
    short.extend(&chars[chars.len() - tail..]);
    short
}

/// A container id as `podman ps` and `docker ps` show it.
fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::policy::Policy;

    const ID: &str = "4f2b9a61c0d3e8f7a5b6c7d8e9f0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8";

    fn container_path() -> String {
        format!(
            "/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/\
             kubepods-burstable-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice/\
             cri-containerd-{ID}.scope"
        )
    }

    #[test]
    fn paths_are_shortened_in_the_middle_and_ids_shown_short() {
        assert_eq!(
            short_path(
                &format!("/sys/fs/cgroup/system.slice/docker-{ID}.scope"),
                PATH_COLUMN
            ),
            "/sys/fs/cgroup/system.slice/docker-4f2b9a61c0d3….scope"
        );
        assert_eq!(
            short_path("/sys/fs/cgroup/app", PATH_COLUMN),
            "/sys/fs/cgroup/app"
        );
        // Short hex runs (a pod's uid) are left alone.
        assert_eq!(short_path("/a/pod0f1e2d3c", PATH_COLUMN), "/a/pod0f1e2d3c");
        let long = short_path(&container_path(), PATH_COLUMN);
        assert_eq!(long.chars().count(), PATH_COLUMN, "{long}");
        assert!(long.starts_with("/sys/fs/cgroup/kubepo"), "{long}");
        assert!(
            long.ends_with("cri-containerd-4f2b9a61c0d3….scope"),
            "{long}"
        );
    }

    #[test]
    fn tables_with_container_paths_and_long_timers_fit() {
        let mut entry = PolicyEntry::new(container_path(), &Policy::OFF);
        entry.container = Some(ID.into());
        let table = table(&[entry.clone()]);
        let connection = Connection {
            pid: 4_194_304,
            command: "postgres".into(),
            fd: 12,
            local: "[2001:db8::1234:5678:9abc]:54321".into(),
            remote: "[2001:db8::1234:5678:9abd]:5432".into(),
            keepalive: Some(true),
            idle: Some(32767),
            intvl: Some(32767),
            cnt: Some(127),
            user_timeout: Some(0),
            timer: "keepalive".into(),
            timer_left_ms: u32::MAX,
            probes: 127,
            inode: 1,
            cgroup: Some(container_path()),
            policy: Some(entry),
            policy_known: true,
            differs: Vec::new(),
            netns: String::new(),
            cgroup_id: None,
        };
        let mut short = connection.clone();
        short.timer = "off".into();
        let connections = connections_table(&[short, connection]);
        let lines: Vec<&str> = table.lines().chain(connections.lines().take(3)).collect();
        for line in &lines {
            assert!(
                line.chars().count() <= 200,
                "{} columns: {line}",
                line.chars().count()
            );
        }
        // Columns stay aligned: POLICY starts at the same column in every row.
        let at =
            |line: &str| line.chars().count() - line.rsplit(' ').next().unwrap().chars().count();
        let rows: Vec<&str> = connections.lines().take(3).collect();
        assert_eq!(at(rows[1]), at(rows[2]), "{connections}");
        assert_eq!(at(rows[0]), at(rows[1]), "{connections}");
    }
}
