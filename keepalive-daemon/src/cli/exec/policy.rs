//! The policy of a `kad exec` run: the flags first, then libkeepalive's variables.
use std::ffi::OsString;

use super::ExecError;
use crate::model::policy::{self, Policy, CNT_RANGE, SECS_RANGE, USER_TIMEOUT_RANGE};

/// Values given on the command line; `None` falls back to the environment.
#[derive(Debug, Default, Clone, Copy)]
pub struct Flags {
    pub idle: Option<u32>,
    pub intvl: Option<u32>,
    pub cnt: Option<u32>,
    pub user_timeout: Option<u32>,
    pub enforce: bool,
    pub off: bool,
}

/// The policy for `kad exec`: flags first, then libkeepalive's variables (KEEPIDLE, KEEPINTVL,
/// KEEPCNT, TCP_USER_TIMEOUT, KEEPALIVE=off). A bad value is an error naming the variable. An
/// empty variable counts as unset.
pub fn policy_from(
    flags: Flags,
    env: impl Fn(&str) -> Option<OsString>,
) -> Result<Policy, ExecError> {
    let var = |name: &'static str| -> Result<Option<String>, ExecError> {
        match env(name) {
            None => Ok(None),
            Some(v) => {
                let v = v.into_string().map_err(|v| ExecError::BadEnv {
                    var: name,
                    value: v.to_string_lossy().into_owned(),
                    message: "not valid UTF-8".into(),
                })?;
                Ok(Some(v).filter(|v| !v.trim().is_empty()))
            }
        }
    };
    let number = |name: &'static str, range| -> Result<Option<u32>, ExecError> {
        var(name)?
            .map(|v| {
                policy::parse_value(name, &v, range).map_err(|e| ExecError::BadEnv {
                    var: name,
                    value: v.clone(),
                    message: e.to_string().replacen(name, "the value", 1),
                })
            })
            .transpose()
    };
    let env_off = match var("KEEPALIVE")? {
        None => false,
        Some(v) if v.eq_ignore_ascii_case("off") => true,
        Some(v) if v.eq_ignore_ascii_case("on") => false,
        Some(v) => {
            return Err(ExecError::BadEnv {
                var: "KEEPALIVE",
                value: v,
                message: "must be 'on' or 'off'".into(),
            })
        }
    };
    // Read every variable so that a bad one is reported even when a flag overrides it.
    let (env_idle, env_intvl, env_cnt, env_user_timeout) = (
        number("KEEPIDLE", SECS_RANGE)?,
        number("KEEPINTVL", SECS_RANGE)?,
        number("KEEPCNT", CNT_RANGE)?,
        number("TCP_USER_TIMEOUT", USER_TIMEOUT_RANGE)?,
    );
    if flags.off {
        if flags.enforce {
            return Err(policy::PolicyError::OffWithEnforce.into());
        }
        return Ok(Policy::OFF);
    }
    if env_off {
        for (name, given) in [
            ("--idle", flags.idle),
            ("--intvl", flags.intvl),
            ("--cnt", flags.cnt),
            ("--user-timeout", flags.user_timeout),
        ] {
            if given.is_some() {
                return Err(ExecError::OffWithValues(name));
            }
        }
        if flags.enforce {
            return Err(ExecError::OffWithValues("--enforce"));
        }
        return Ok(Policy::OFF);
    }
    Ok(Policy::on(
        flags.idle.or(env_idle),
        flags.intvl.or(env_intvl),
        flags.cnt.or(env_cnt),
    )?
    .with_extras(flags.user_timeout.or(env_user_timeout), flags.enforce)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn with_env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).map(OsString::from)
    }

    #[test]
    fn flags_win_over_the_environment() {
        let env = with_env(&[("KEEPIDLE", "100"), ("KEEPINTVL", "10"), ("KEEPCNT", "3")]);
        let flags = Flags {
            idle: Some(200),
            ..Flags::default()
        };
        assert_eq!(
            policy_from(flags, &env).unwrap(),
            Policy::on(Some(200), Some(10), Some(3)).unwrap()
        );
        assert_eq!(
            policy_from(Flags::default(), with_env(&[])).unwrap(),
            Policy::on(None, None, None).unwrap()
        );
    }

    #[test]
    fn tcp_user_timeout_comes_from_the_environment_like_libkeepalive() {
        let env = with_env(&[("TCP_USER_TIMEOUT", "30000"), ("KEEPIDLE", "10")]);
        assert_eq!(
            policy_from(Flags::default(), &env).unwrap(),
            Policy::on(Some(10), None, None)
                .unwrap()
                .with_extras(Some(30000), false)
                .unwrap()
        );
        let flags = Flags {
            user_timeout: Some(500),
            enforce: true,
            ..Flags::default()
        };
        let policy = policy_from(flags, &env).unwrap();
        assert_eq!((policy.user_timeout, policy.enforce), (Some(500), true));
        for bad in ["abc", "0", "-1", "2147483648"] {
            let err = policy_from(Flags::default(), with_env(&[("TCP_USER_TIMEOUT", bad)]))
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with(&format!("TCP_USER_TIMEOUT={bad}:"))
                    && err.contains("between 1 and 2147483647"),
                "{err}"
            );
        }
        let off_enforced = Flags {
            off: true,
            enforce: true,
            ..Flags::default()
        };
        assert!(policy_from(off_enforced, with_env(&[]))
            .unwrap_err()
            .to_string()
            .contains("--enforce"));
        let enforced = Flags {
            enforce: true,
            ..Flags::default()
        };
        assert!(policy_from(enforced, with_env(&[("KEEPALIVE", "off")]))
            .unwrap_err()
            .to_string()
            .contains("--enforce"));
    }

    #[test]
    fn keepalive_off_and_bad_values() {
        assert_eq!(
            policy_from(Flags::default(), with_env(&[("KEEPALIVE", "OFF")])).unwrap(),
            Policy::OFF
        );
        assert_eq!(
            policy_from(Flags::default(), with_env(&[("KEEPIDLE", "")])).unwrap(),
            Policy::on(None, None, None).unwrap()
        );
        let err = policy_from(Flags::default(), with_env(&[("KEEPIDLE", "abc")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("KEEPIDLE=abc:") && err.contains("between 1 and 32767"),
            "{err}"
        );
        let err = policy_from(Flags::default(), with_env(&[("KEEPCNT", "500")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("KEEPCNT=500:") && err.contains("127"),
            "{err}"
        );
        let err = policy_from(Flags::default(), with_env(&[("KEEPALIVE", "maybe")]))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("KEEPALIVE=maybe"), "{err}");
        let flags = Flags {
            cnt: Some(3),
            ..Flags::default()
        };
        let err = policy_from(flags, with_env(&[("KEEPALIVE", "off")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--cnt"), "{err}");
        let off = Flags {
            off: true,
            ..Flags::default()
        };
        assert_eq!(
            policy_from(off, with_env(&[("KEEPIDLE", "5")])).unwrap(),
            Policy::OFF
        );
    }
}
