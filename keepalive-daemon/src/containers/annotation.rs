//! The `kad.dev/keepalive` annotation of a container or pod: a policy in the CLI's words,
//! `idle=180,intvl=60,cnt=20` with optional `user-timeout=MS` and `enforce`, or `off`.
//! Checked as the CLI checks its flags (same ranges), with errors that name the annotation.
//! The one parser of that grammar: OCI annotations, pods' annotations and Docker labels use it.
use std::collections::BTreeMap;

use crate::{
    host::logging::escape,
    model::policy::{self, Policy, PolicyError, CNT_RANGE, SECS_RANGE, USER_TIMEOUT_RANGE},
};

/// The annotation's key, the same for containers (OCI) and pods.
pub const KEY: &str = "kad.dev/keepalive";

/// Values longer than this are refused before they are parsed (a real one is a few dozen bytes).
const MAX_LEN: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnotationError {
    #[error("annotation {KEY}={value:?}: {problem}")]
    Invalid { value: String, problem: String },
}

fn invalid(value: &str, problem: impl Into<String>) -> AnnotationError {
    // Shown in a runtime's error and in logs: keep it printable and short.
    let mut shown: String = value.chars().take(80).collect();
    if shown.len() < value.len() {
        shown.push_str("...");
    }
    AnnotationError::Invalid {
        value: shown,
        // It may quote the value's items: their control characters escaped, as the value's.
        problem: escape(&problem.into()),
    }
}

/// The items `podman run --annotation kad.dev/keepalive=idle=180,intvl=60,cnt=20` splits off
/// the value: podman's `--annotation` is a comma-separated list of `KEY=VALUE`, so it gives the
/// annotations `kad.dev/keepalive=idle=180`, `intvl=60` and `cnt=20`. (An item without `=`,
/// such as `enforce`, after a comma makes podman itself refuse the command.)
pub const SPLIT_ITEMS: [&str; 4] = ["idle", "intvl", "cnt", "user-timeout"];

/// The annotation's value among a container's annotations, with the items podman split off it
/// (annotations named as in [`SPLIT_ITEMS`]) put back: what the user typed, in another order,
/// which the grammar does not mind. `None` without the annotation.
pub fn value_of(annotations: &BTreeMap<String, String>) -> Option<String> {
    let value = annotations.get(KEY)?;
    let mut items = vec![value.clone()];
    for key in SPLIT_ITEMS {
        if let Some(text) = annotations.get(key) {
            items.push(format!("{key}={text}"));
        }
    }
    Some(items.join(","))
}

/// Parses an annotation's value into a policy.
///
/// `off` alone is the opt-out; otherwise a comma-separated list of `idle=S`, `intvl=S`, `cnt=N`,
/// `user-timeout=MS`, `enforce`, each at most once; `on` alone keeps the kernel's defaults.
pub fn parse(value: &str) -> Result<Policy, AnnotationError> {
    if value.len() > MAX_LEN {
        return Err(invalid(value, format!("longer than {MAX_LEN} bytes")));
    }
    let items: Vec<&str> = value.split(',').map(str::trim).collect();
    if items.iter().all(|item| item.is_empty()) {
        return Err(invalid(
            value,
            "empty: give idle=S,intvl=S,cnt=N (user-timeout=MS, enforce optional), on, or off",
        ));
    }
    if items == ["off"] {
        return Ok(Policy::OFF);
    }
    let mut policy = Policy {
        mode: policy::Mode::On,
        ..Policy::OFF
    };
    let mut seen: Vec<&str> = Vec::new();
    for item in items {
        let (key, text) = match item.split_once('=') {
            Some((key, text)) => (key.trim(), Some(text)),
            None => (item, None),
        };
        if key.is_empty() {
            return Err(invalid(
                value,
                "an empty item (two commas, or a comma at an end)",
            ));
        }
        let shown: String = key.chars().take(32).collect();
        if seen.contains(&key) {
            return Err(invalid(value, format!("{shown} is given twice")));
        }
        seen.push(key);
        let range_error = |e: PolicyError| invalid(value, e.to_string());
        match (key, text) {
            ("idle", Some(text)) => {
                policy.idle = Some(policy::parse_value("idle", text, SECS_RANGE).map_err(range_error)?)
            }
            ("intvl", Some(text)) => {
                policy.intvl =
                    Some(policy::parse_value("intvl", text, SECS_RANGE).map_err(range_error)?)
            }
            ("cnt", Some(text)) => {
                policy.cnt = Some(policy::parse_value("cnt", text, CNT_RANGE).map_err(range_error)?)
            }
            ("user-timeout", Some(text)) => {
                policy.user_timeout = Some(
                    policy::parse_value("user-timeout", text, USER_TIMEOUT_RANGE)
                        .map_err(range_error)?,
                )
            }
            ("enforce", None) => policy.enforce = true,
            ("on", None) => {}
            ("off", None) => {
                return Err(invalid(
                    value,
                    "off cannot be combined with values or enforce: give off alone",
                ))
            }
            ("enforce" | "on", Some(_)) => {
                return Err(invalid(value, format!("{shown} takes no value")))
            }
            ("idle" | "intvl" | "cnt" | "user-timeout", None) => {
                return Err(invalid(value, format!("{shown} needs a value ({shown}=N)")))
            }
            _ => {
                return Err(invalid(
                    value,
                    format!(
                        "unknown item '{shown}': allowed are idle=S, intvl=S, cnt=N, user-timeout=MS, enforce, on, off",
                    ),
                ))
            }
        }
    }
    policy
        .validate()
        .map_err(|e| invalid(value, e.to_string()))?;
    Ok(policy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::policy::Mode;

    #[test]
    fn the_clis_words() {
        let p = parse("idle=180,intvl=60,cnt=20").unwrap();
        assert_eq!(
            (p.mode, p.idle, p.intvl, p.cnt, p.user_timeout, p.enforce),
            (Mode::On, Some(180), Some(60), Some(20), None, false)
        );
        let p = parse(" idle=5 , user-timeout=30000,enforce").unwrap();
        assert_eq!(
            (p.idle, p.intvl, p.cnt, p.user_timeout, p.enforce),
            (Some(5), None, None, Some(30000), true)
        );
        assert_eq!(parse("off").unwrap(), Policy::OFF);
        let on = parse("on").unwrap();
        assert_eq!((on.mode, on.idle, on.enforce), (Mode::On, None, false));
        assert!(parse("user-timeout=2147483647").is_ok());
    }

    /// What podman 4.3 hands the OCI hook for `--annotation kad.dev/keepalive=idle=180,intvl=60,cnt=20`
    /// typed unquoted (seen in a hook's stdin): the value, split at its commas.
    #[test]
    fn podmans_split_value_is_put_back_together() {
        let annotations = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let split = annotations(&[
            ("cnt", "20"),
            ("intvl", "60"),
            ("io.container.manager", "libpod"),
            (KEY, "idle=180"),
        ]);
        let value = value_of(&split).unwrap();
        assert_eq!(
            parse(&value).unwrap(),
            parse("idle=180,intvl=60,cnt=20").unwrap()
        );
        // Quoted, podman leaves it whole: the same policy.
        let whole = annotations(&[(KEY, "idle=180,intvl=60,cnt=20")]);
        assert_eq!(value_of(&whole).unwrap(), "idle=180,intvl=60,cnt=20");
        let first = annotations(&[(KEY, "enforce"), ("idle", "5"), ("user-timeout", "9000")]);
        let p = parse(&value_of(&first).unwrap()).unwrap();
        assert_eq!(
            (p.idle, p.user_timeout, p.enforce),
            (Some(5), Some(9000), true)
        );
        // An item given both ways is given twice; off takes no company, split or not.
        let twice = annotations(&[(KEY, "idle=5"), ("idle", "6")]);
        let err = parse(&value_of(&twice).unwrap()).unwrap_err().to_string();
        assert!(err.contains("idle is given twice"), "{err}");
        let off = annotations(&[(KEY, "off"), ("cnt", "3")]);
        let err = parse(&value_of(&off).unwrap()).unwrap_err().to_string();
        assert!(err.contains("off alone"), "{err}");
        assert_eq!(value_of(&annotations(&[("cnt", "3")])), None);
    }

    #[test]
    fn errors_name_the_annotation_and_the_range() {
        for (value, expected) in [
            ("idle=0", "between 1 and 32767"),
            ("intvl=32768", "between 1 and 32767"),
            ("cnt=128", "between 1 and 127"),
            ("cnt=-1", "between 1 and 127"),
            ("idle=1.5", "between 1 and 32767"),
            ("user-timeout=0", "between 1 and 2147483647"),
            ("user-timeout=2147483648", "between 1 and 2147483647"),
            ("idle=", "between 1 and 32767"),
            ("idle", "needs a value"),
            ("enforce=1", "takes no value"),
            ("idle=5,idle=6", "given twice"),
            ("idle=5,,cnt=3", "empty item"),
            ("idle=5,", "empty item"),
            ("", "empty"),
            (" , ", "empty"),
            ("off,idle=5", "off alone"),
            ("off,enforce", "off alone"),
            ("keepidle=5", "unknown item 'keepidle'"),
            // Control characters are escaped wherever the input is quoted.
            ("\u{1b}[31m=5", "unknown item '\\u{1b}[31m'"),
            ("idle=\u{7}", "\\u{7}"),
            ("idle=5;cnt=3", "between 1 and 32767"),
        ] {
            let message = parse(value).unwrap_err().to_string();
            assert!(
                !message.chars().any(char::is_control),
                "{value:?}: {message:?}"
            );
            assert!(
                message.starts_with("annotation kad.dev/keepalive="),
                "{value}: {message}"
            );
            assert!(message.contains(expected), "{value}: {message}");
        }
        let long = "idle=5,".repeat(100);
        assert!(parse(&long)
            .unwrap_err()
            .to_string()
            .contains("longer than"));
    }
}
