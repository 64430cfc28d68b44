//! libtest's summary line (`test result: ok. 3 passed; 1 failed; 1 ignored; ...`), read by
//! `cargo xtask test` (added up over the test binaries) and by `test-kernels` (per guest).

/// The counts of one `test result:` line.
#[derive(Default, Debug, PartialEq, Eq)]
pub struct Counts {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

/// The counts of `line` if it is a `test result:` line; other labels (measured, filtered out)
/// are not needed.
pub fn parse(line: &str) -> Option<Counts> {
    let rest = line.strip_prefix("test result: ")?;
    let mut counts = Counts::default();
    for part in rest.split(';') {
        // "ok. 3 passed": the label is the last word, its count the one before.
        let mut words = part.split_whitespace().rev();
        let (Some(label), Some(count)) = (words.next(), words.next()) else {
            continue;
        };
        let count: u64 = count.parse().unwrap_or(0);
        match label {
            "passed" => counts.passed += count,
            "failed" => counts.failed += count,
            "ignored" => counts.ignored += count,
            _ => {}
        }
    }
    Some(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_of_a_result_line() {
        assert_eq!(
            parse("test result: FAILED. 3 passed; 1 failed; 2 ignored; 0 measured; 0 filtered out"),
            Some(Counts {
                passed: 3,
                failed: 1,
                ignored: 2
            })
        );
        assert_eq!(parse("test a ... ok"), None);
    }
}
