//! A cgroup's keepalive policy, its validation, and its form in the BPF map.
use std::{fmt, ops::RangeInclusive};

use keepalive_common::{PolicyValue, FLAG_ENFORCE, FLAG_ON};
use serde::{Deserialize, Serialize};

/// TCP_KEEPIDLE and TCP_KEEPINTVL limits, in seconds (MAX_TCP_KEEPIDLE in include/net/tcp.h).
pub const SECS_RANGE: RangeInclusive<u32> = 1..=32767;
/// TCP_KEEPCNT limits (MAX_TCP_KEEPCNT).
pub const CNT_RANGE: RangeInclusive<u32> = 1..=127;
/// TCP_USER_TIMEOUT limits, in milliseconds: the kernel takes any non-negative int, and 0
/// means "unset", which a policy says by leaving it out.
pub const USER_TIMEOUT_RANGE: RangeInclusive<u32> = 1..=2_147_483_647;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("{option} must be a whole number between {} and {}, got '{value}'", range.start(), range.end())]
    OutOfRange {
        option: &'static str,
        value: String,
        range: RangeInclusive<u32>,
    },
    #[error("mode 'off' cannot be combined with --idle, --intvl, --cnt or --user-timeout")]
    OffWithValues,
    #[error("--enforce cannot be combined with --off: an opt-out has no values to enforce")]
    OffWithEnforce,
}

/// Whether kad turns keepalive on, or leaves sockets alone (an opt-out below a policy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    On,
    Off,
}

/// `None` keeps the kernel default (`net.ipv4.tcp_keepalive_*`, no TCP_USER_TIMEOUT).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub mode: Mode,
    pub idle: Option<u32>,
    pub intvl: Option<u32>,
    pub cnt: Option<u32>,
    /// TCP_USER_TIMEOUT in milliseconds. Absent in files written before it existed.
    #[serde(default)]
    pub user_timeout: Option<u32>,
    /// A program's own keepalive `setsockopt` is rewritten to the policy's values.
    #[serde(default)]
    pub enforce: bool,
    /// Set by root: users may not set policies of their own below it (no opt-out, no other
    /// values in the cgroups delegated to them). Not part of the kernel's value.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub locked: bool,
}

impl Policy {
    pub const OFF: Policy = Policy {
        mode: Mode::Off,
        idle: None,
        intvl: None,
        cnt: None,
        user_timeout: None,
        enforce: false,
        locked: false,
    };

    /// Keepalive on with the given values, each checked against the kernel's limits.
    pub fn on(
        idle: Option<u32>,
        intvl: Option<u32>,
        cnt: Option<u32>,
    ) -> Result<Self, PolicyError> {
        let policy = Policy {
            mode: Mode::On,
            idle,
            intvl,
            cnt,
            user_timeout: None,
            enforce: false,
            locked: false,
        };
        policy.validate()?;
        Ok(policy)
    }

    /// The same policy with TCP_USER_TIMEOUT and `--enforce`, checked like the rest.
    pub fn with_extras(
        self,
        user_timeout: Option<u32>,
        enforce: bool,
    ) -> Result<Self, PolicyError> {
        let policy = Policy {
            user_timeout,
            enforce,
            ..self
        };
        policy.validate()?;
        Ok(policy)
    }

    /// Checks a policy that came from outside (the control socket, the state file).
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.mode == Mode::Off {
            if self.enforce {
                return Err(PolicyError::OffWithEnforce);
            }
            if self.idle.is_some()
                || self.intvl.is_some()
                || self.cnt.is_some()
                || self.user_timeout.is_some()
            {
                return Err(PolicyError::OffWithValues);
            }
            return Ok(());
        }
        check_range("--idle", self.idle, SECS_RANGE)?;
        check_range("--intvl", self.intvl, SECS_RANGE)?;
        check_range("--cnt", self.cnt, CNT_RANGE)?;
        check_range("--user-timeout", self.user_timeout, USER_TIMEOUT_RANGE)?;
        Ok(())
    }

    /// The map value the sock_ops program reads; 0 stands for "not set".
    pub fn to_value(&self) -> PolicyValue {
        match self.mode {
            Mode::Off => PolicyValue::default(),
            Mode::On => PolicyValue {
                flags: FLAG_ON | if self.enforce { FLAG_ENFORCE } else { 0 },
                idle: self.idle.unwrap_or(0),
                intvl: self.intvl.unwrap_or(0),
                cnt: self.cnt.unwrap_or(0),
                user_timeout: self.user_timeout.unwrap_or(0),
                ..PolicyValue::default()
            },
        }
    }
}

impl Policy {
    /// The policy a map value stands for (what an earlier run pinned).
    pub fn from_value(value: &PolicyValue) -> Policy {
        if value.flags & FLAG_ON == 0 {
            return Policy::OFF;
        }
        let set = |v: u32| (v != 0).then_some(v);
        Policy {
            mode: Mode::On,
            idle: set(value.idle),
            intvl: set(value.intvl),
            cnt: set(value.cnt),
            user_timeout: set(value.user_timeout),
            enforce: value.flags & FLAG_ENFORCE != 0,
            locked: false,
        }
    }

    /// The options of a socket's state (as `kad inspect` reads it) that differ from what this
    /// policy sets: none for an opt-out, and none for an option the policy leaves to the
    /// program. Values that could not be read are not counted as different.
    pub fn differences(&self, state: &super::keepalive::KeepaliveState) -> Vec<&'static str> {
        let mut differ = Vec::new();
        if self.mode == Mode::Off {
            return differ;
        }
        if !state.keepalive {
            differ.push("keepalive");
        }
        for (name, wanted, have) in [
            ("idle", self.idle, state.idle),
            ("intvl", self.intvl, state.intvl),
            ("cnt", self.cnt, state.cnt),
            ("user_timeout", self.user_timeout, state.user_timeout),
        ] {
            if wanted.is_some_and(|w| i64::from(w) != i64::from(have)) {
                differ.push(name);
            }
        }
        differ
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.mode == Mode::Off {
            return f.write_str("off");
        }
        let show = |v: Option<u32>| v.map_or_else(|| "default".to_string(), |v| v.to_string());
        write!(
            f,
            "on idle={} intvl={} cnt={}",
            show(self.idle),
            show(self.intvl),
            show(self.cnt)
        )?;
        if let Some(ms) = self.user_timeout {
            write!(f, " user_timeout={ms}ms")?;
        }
        if self.enforce {
            f.write_str(" enforced")?;
        }
        if self.locked {
            f.write_str(" locked")?;
        }
        Ok(())
    }
}

fn check_range(
    option: &'static str,
    value: Option<u32>,
    range: RangeInclusive<u32>,
) -> Result<(), PolicyError> {
    match value {
        Some(v) if !range.contains(&v) => Err(PolicyError::OutOfRange {
            option,
            value: v.to_string(),
            range,
        }),
        _ => Ok(()),
    }
}

/// Parses a command-line value for `option` ("--idle", ...): a decimal integer within `range`.
pub fn parse_value(
    option: &'static str,
    text: &str,
    range: RangeInclusive<u32>,
) -> Result<u32, PolicyError> {
    let out_of_range = || PolicyError::OutOfRange {
        option,
        value: text.to_string(),
        range: range.clone(),
    };
    let trimmed = text.trim();
    if trimmed.is_empty() || !trimmed.bytes().all(|b| b.is_ascii_digit()) {
        return Err(out_of_range());
    }
    match trimmed.parse::<u32>() {
        Ok(v) if range.contains(&v) => Ok(v),
        _ => Err(out_of_range()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_the_kernel_limits() {
        assert_eq!(parse_value("--idle", "1", SECS_RANGE), Ok(1));
        assert_eq!(parse_value("--idle", "32767", SECS_RANGE), Ok(32767));
        assert_eq!(parse_value("--cnt", "127", CNT_RANGE), Ok(127));
        assert_eq!(parse_value("--cnt", " 20 ", CNT_RANGE), Ok(20));
    }

    #[test]
    fn parse_rejects_out_of_range_and_non_numbers() {
        for bad in [
            "0",
            "32768",
            "-1",
            "1.5",
            "abc",
            "",
            "99999999999999999999",
            "+5",
        ] {
            let err = parse_value("--intvl", bad, SECS_RANGE).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains("--intvl"), "{msg}");
            assert!(msg.contains("between 1 and 32767"), "{msg}");
        }
        let msg = parse_value("--cnt", "128", CNT_RANGE)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("between 1 and 127"), "{msg}");
    }

    #[test]
    fn validate_checks_every_field() {
        assert!(Policy::on(Some(180), Some(60), Some(20)).is_ok());
        assert!(Policy::on(None, None, None).is_ok());
        assert!(Policy::on(Some(0), None, None).is_err());
        assert!(Policy::on(None, Some(40000), None).is_err());
        assert!(Policy::on(None, None, Some(200)).is_err());
        let off_with_values = Policy {
            idle: Some(5),
            ..Policy::OFF
        };
        assert_eq!(off_with_values.validate(), Err(PolicyError::OffWithValues));
    }

    #[test]
    fn map_value_uses_zero_for_unset() {
        let v = Policy::on(Some(180), None, Some(20)).unwrap().to_value();
        assert_eq!(
            v,
            PolicyValue {
                flags: FLAG_ON,
                idle: 180,
                intvl: 0,
                cnt: 20,
                ..PolicyValue::default()
            }
        );
        assert_eq!(Policy::OFF.to_value().flags & FLAG_ON, 0);
    }

    #[test]
    fn user_timeout_and_enforce_reach_the_map_value_and_back() {
        let policy = Policy::on(Some(100), Some(20), Some(5))
            .unwrap()
            .with_extras(Some(4321), true)
            .unwrap();
        let value = policy.to_value();
        assert_eq!(value.user_timeout, 4321);
        assert_eq!(value.flags, FLAG_ON | FLAG_ENFORCE);
        assert_eq!(Policy::from_value(&value), policy);
        let plain = Policy::on(None, None, None).unwrap();
        assert_eq!(plain.to_value().flags, FLAG_ON);
        assert_eq!(Policy::from_value(&plain.to_value()), plain);
        assert_eq!(
            policy.to_string(),
            "on idle=100 intvl=20 cnt=5 user_timeout=4321ms enforced"
        );
        assert_eq!(
            plain.to_string(),
            "on idle=default intvl=default cnt=default"
        );
    }

    #[test]
    fn user_timeout_range_and_off_combinations() {
        let on = Policy::on(None, None, None).unwrap();
        assert!(on.with_extras(Some(1), false).is_ok());
        assert!(on.with_extras(Some(2_147_483_647), false).is_ok());
        let msg = on.with_extras(Some(0), false).unwrap_err().to_string();
        assert!(
            msg.contains("--user-timeout") && msg.contains("between 1 and 2147483647"),
            "{msg}"
        );
        assert!(on.with_extras(Some(2_147_483_648), false).is_err());
        for bad in ["-1", "abc", "2147483648", "", "1e3"] {
            let msg = parse_value("--user-timeout", bad, USER_TIMEOUT_RANGE)
                .unwrap_err()
                .to_string();
            assert!(msg.contains("between 1 and 2147483647"), "{bad}: {msg}");
        }
        assert_eq!(
            Policy::OFF.with_extras(None, true),
            Err(PolicyError::OffWithEnforce)
        );
        assert_eq!(
            Policy::OFF.with_extras(Some(5), false),
            Err(PolicyError::OffWithValues)
        );
    }

    #[test]
    fn files_without_the_new_fields_still_load() {
        let old: Policy =
            serde_json::from_str(r#"{"mode":"on","idle":180,"intvl":null,"cnt":20}"#).unwrap();
        assert_eq!(old, Policy::on(Some(180), None, Some(20)).unwrap());
    }

    #[test]
    fn differences_name_what_the_program_changed() {
        use crate::model::keepalive::KeepaliveState;
        let go = KeepaliveState {
            keepalive: true,
            idle: 15,
            intvl: 15,
            cnt: 5,
            user_timeout: 0,
        };
        let policy = Policy::on(Some(100), Some(20), Some(5)).unwrap();
        assert_eq!(policy.differences(&go), ["idle", "intvl"]);
        // Options the policy leaves to the program are the program's.
        let loose = Policy::on(None, None, Some(5)).unwrap();
        assert!(loose.differences(&go).is_empty());
        let off = KeepaliveState {
            keepalive: false,
            ..go
        };
        assert_eq!(loose.differences(&off), ["keepalive"]);
        assert!(Policy::OFF.differences(&off).is_empty());
        let timed = loose.with_extras(Some(3000), false).unwrap();
        assert_eq!(timed.differences(&go), ["user_timeout"]);
    }
}
