//! The guest's `tests.log` added up: libtest's result lines, the failed tests, and crashed
//! binaries.
use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::Path,
};

use anyhow::{Context as _, Result};

use super::Outcome;
use crate::test_result;

/// Adds up libtest's result lines and collects the failed tests' names. A binary that exits
/// with an error without a failed test (a crash) counts as one failure.
pub(super) fn parse_log(log: &Path, outcome: &mut Outcome) -> Result<()> {
    let Ok(file) = fs::File::open(log) else {
        return Ok(());
    };
    let mut binary = String::new();
    let mut failed_here = 0;
    for line in BufReader::new(file).lines() {
        let line = line.with_context(|| format!("read {}", log.display()))?;
        if let Some(code) = line.strip_prefix("### exit ") {
            if code != "0" && failed_here == 0 {
                outcome.failed += 1;
                outcome
                    .failures
                    .push(format!("{binary} exited with {code}"));
            }
        } else if let Some(name) = line.strip_prefix("### ") {
            binary = name.to_string();
            failed_here = 0;
        } else if let Some(name) = line
            .strip_prefix("test ")
            .and_then(|l| l.strip_suffix(" ... FAILED"))
        {
            outcome.failures.push(format!("{binary}::{name}"));
        } else if let Some(counts) = test_result::parse(&line) {
            outcome.passed += counts.passed;
            outcome.failed += counts.failed;
            failed_here += counts.failed;
            outcome.skipped += counts.ignored;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_is_added_up() {
        let dir = std::env::temp_dir().join(format!("xtask-kernels-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let log = dir.join("tests.log");
        fs::write(
            &log,
            "### cli\ntest a ... ok\ntest b ... FAILED\n\
             test result: FAILED. 3 passed; 1 failed; 1 ignored; 0 measured; 0 filtered out\n\
             ### exit 101\n### enforce\ntest result: ok. 2 passed; 0 failed; 0 ignored\n\
             ### exit 0\n### crash\n### exit 134\n",
        )
        .unwrap();
        let mut outcome = Outcome::default();
        parse_log(&log, &mut outcome).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!((outcome.passed, outcome.failed, outcome.skipped), (5, 2, 1));
        assert_eq!(outcome.failures, ["cli::b", "crash exited with 134"]);
    }
}
