//! Part 3, existing connections: 100,000 established loopback connections, then `kad set`
//! on their cgroup, timed, and every socket checked with getsockopt (a sample with ss).
use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{ChildStdin, ChildStdout, Command, Stdio},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, ensure, Context as _, Result};

use super::{goal, Bench, EXISTING, EXISTING_POLICY};

impl Bench {
    /// Part 3: existing connections get a policy set after they were made.
    pub(super) fn existing(&mut self) -> Result<()> {
        let cgroup = self.top_cgroup("conns")?;
        // Each process holds both ends of its connections, within its descriptor limit.
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: a valid rlimit out-parameter.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
            bail!("getrlimit: {}", std::io::Error::last_os_error());
        }
        let per_process_max = (limit.rlim_max.min(1 << 20) as usize).saturating_sub(64) / 2;
        ensure!(
            per_process_max >= 1000,
            "RLIMIT_NOFILE hard limit {} is too low to hold connections",
            limit.rlim_max
        );
        let processes = EXISTING.div_ceil(per_process_max);
        let each = EXISTING.div_ceil(processes);
        let total = each * processes;
        println!(
            "3. Existing connections: {total} established loopback connections ({} sockets) in \
             {processes} processes (RLIMIT_NOFILE {}) in the bench's network namespace, then \
             `kad set` on their cgroup",
            2 * total,
            limit.rlim_max
        );
        let start = Instant::now();
        let mut holders = Vec::new();
        for _ in 0..processes {
            let mut command = self.in_cgroup(&cgroup, &["hold", &each.to_string()])?;
            holders.push(Holder::spawn(&mut command, &mut self.guard.children)?);
        }
        for h in &mut holders {
            let line = h.read_line()?;
            let port = line
                .strip_prefix("READY ")
                .and_then(|p| p.parse().ok())
                .with_context(|| format!("holder said {line:?}"))?;
            h.port = port;
        }
        println!(
            "   connections made in {:.2} s",
            start.elapsed().as_secs_f64()
        );
        let (idle, intvl, cnt) = EXISTING_POLICY;
        let before = check_holders(&mut holders, EXISTING_POLICY)?;
        println!(
            "   before: {} of {} sockets with SO_KEEPALIVE on",
            before.1, before.0
        );
        let log_before = std::fs::read_to_string(&self.log).unwrap_or_default().len();
        let start = Instant::now();
        self.kad_set_cli(&cgroup, EXISTING_POLICY)?;
        let took = start.elapsed();
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let log = log.get(log_before..).unwrap_or_default();
        let logged = log
            .lines()
            .find(|l| l.contains("existing connections updated"))
            .and_then(|l| number_after(l, "sockets="));
        let refresh_ms = span_ms(
            log,
            "anchored kad's programs",
            "existing connections updated",
        );
        let refreshed = self.counters(&cgroup)?["refreshed"].as_u64().unwrap_or(0);
        let after = check_holders(&mut holders, EXISTING_POLICY)?;
        let took_s = took.as_secs_f64();
        println!(
            "   `kad set --idle {idle} --intvl {intvl} --cnt {cnt}` returned after {:.0} ms \
             (the refresh runs before the reply){}",
            took_s * 1000.0,
            refresh_ms
                .map(|m| format!("; the refresh itself took {m:.0} ms (daemon log)"))
                .unwrap_or_default()
        );
        println!(
            "   daemon: existing connections updated, sockets={}; kad stats: refreshed={refreshed} \
             (the {processes} listeners included)",
            logged.map_or("(not logged)".to_string(), |n| n.to_string())
        );
        println!(
            "   after: getsockopt in the holders: {} of {} sockets with keepalive on, {} with \
             {idle}/{intvl}/{cnt}",
            after.1, after.0, after.2
        );
        let (lines, timers) = ss_sample(&self.name, holders[0].port)?;
        println!(
            "   ss sample (port {}): {timers} of {lines} established sockets with a keepalive timer",
            holders[0].port
        );
        goal(
            &format!("{total} existing connections updated in (s)"),
            took_s,
            "< 0.5",
            took_s < 0.5 && after.2 == after.0,
        );
        for h in &mut holders {
            writeln!(h.stdin, "exit")?;
        }
        for child in &mut self.guard.children {
            child.wait()?;
        }
        self.guard.children.clear();
        Ok(())
    }
}

/// One `hold` (or `pod`) worker: its pipes, the port of its connections (for ss), its pid.
pub(super) struct Holder {
    pub(super) stdin: ChildStdin,
    pub(super) stdout: BufReader<ChildStdout>,
    pub(super) port: u16,
    pub(super) pid: u32,
}

impl Holder {
    /// Starts `command` (a worker that holds connections) with its standard input and output
    /// piped; the guard kills it at the end.
    pub(super) fn spawn(
        command: &mut std::process::Command,
        children: &mut Vec<std::process::Child>,
    ) -> Result<Holder> {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("start a connection holder")?;
        let stdin = child.stdin.take().context("holder stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("holder stdout")?);
        let pid = child.id();
        children.push(child);
        Ok(Holder {
            stdin,
            stdout,
            port: 0,
            pid,
        })
    }

    pub(super) fn read_line(&mut self) -> Result<String> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("a connection holder exited");
        }
        Ok(line.trim().to_string())
    }
}

/// (sockets, with keepalive on, with exactly `values`) over all holders.
pub(super) fn check_holders(
    holders: &mut [Holder],
    (idle, intvl, cnt): (u32, u32, u32),
) -> Result<(u64, u64, u64)> {
    let mut sum = (0, 0, 0);
    for h in holders.iter_mut() {
        writeln!(h.stdin, "check {idle} {intvl} {cnt}")?;
    }
    for h in holders.iter_mut() {
        let line = h.read_line()?;
        let n: Vec<u64> = line
            .strip_prefix("CHECK ")
            .map(|r| {
                r.split_whitespace()
                    .filter_map(|w| w.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        let [total, on, matching] = n.as_slice() else {
            bail!("holder said {line:?}");
        };
        sum = (sum.0 + total, sum.1 + on, sum.2 + matching);
    }
    Ok(sum)
}

/// Established sockets on either side of `port`, and how many have a keepalive timer.
fn ss_sample(netns: &str, port: u16) -> Result<(usize, usize)> {
    let filter = format!("( sport = :{port} or dport = :{port} )");
    ss_count(Command::new("ss").args(["-N", netns, "-tnoH", "state", "established", &filter]))
}

/// The established sockets `ss` lists, and how many have a keepalive timer.
pub(super) fn ss_count(command: &mut Command) -> Result<(usize, usize)> {
    let out = command.output().context("run ss")?;
    ensure!(
        out.status.success(),
        "ss: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let lines = text.lines().filter(|l| !l.trim().is_empty()).count();
    let timers = text
        .lines()
        .filter(|l| l.contains("timer:(keepalive"))
        .count();
    Ok((lines, timers))
}

/// Milliseconds between the first log lines with `from` and `to` (tracing's RFC 3339 times).
pub(super) fn span_ms(log: &str, from: &str, to: &str) -> Option<f64> {
    let time = |needle: &str| clock_ms(log.lines().find(|l| l.contains(needle))?);
    let span = time(to)? - time(from)?;
    (span >= 0.0).then_some(span)
}

/// A log line's time of day (UTC), in milliseconds since midnight.
pub(super) fn clock_ms(line: &str) -> Option<f64> {
    let clock = line.split_whitespace().next()?.split('T').nth(1)?;
    let clock = clock.trim_end_matches('Z');
    let mut parts = clock.split(':');
    let (h, m, s): (f64, f64, f64) = (
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
    );
    Some((h * 3600.0 + m * 60.0 + s) * 1000.0)
}

/// Now as the daemon's log writes it: UTC, milliseconds since midnight.
pub(super) fn clock_now_ms() -> f64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (now.as_secs_f64() % 86_400.0) * 1000.0
}

pub(super) fn number_after(text: &str, key: &str) -> Option<u64> {
    let rest = &text[text.find(key)? + key.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}
