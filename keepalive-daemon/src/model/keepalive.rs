//! The keepalive options of one socket, as the kernel reports them, and how the classic
//! keepalive test program prints them.
use serde::Serialize;

/// The keepalive options of one socket, as getsockopt reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct KeepaliveState {
    pub keepalive: bool,
    pub cnt: i32,
    pub idle: i32,
    pub intvl: i32,
    /// TCP_USER_TIMEOUT in milliseconds (0: not set).
    pub user_timeout: i32,
}

impl KeepaliveState {
    /// The classic keepalive test program's output, and TCP_USER_TIMEOUT when it is set (a
    /// line the classic program never printed, so scripts reading it see what they expect).
    pub fn text(&self) -> String {
        let mut text = if self.keepalive {
            format!(
                "SO_KEEPALIVE is ON\nTCP_KEEPCNT   = {}\nTCP_KEEPIDLE  = {}\nTCP_KEEPINTVL = {}\n",
                self.cnt, self.idle, self.intvl
            )
        } else {
            "SO_KEEPALIVE is OFF\n".to_string()
        };
        if self.user_timeout != 0 {
            text.push_str(&format!("TCP_USER_TIMEOUT = {} ms\n", self.user_timeout));
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_matches_the_classic_test_program() {
        let on = KeepaliveState {
            keepalive: true,
            cnt: 20,
            idle: 180,
            intvl: 60,
            user_timeout: 0,
        };
        assert_eq!(
            on.text(),
            "SO_KEEPALIVE is ON\nTCP_KEEPCNT   = 20\nTCP_KEEPIDLE  = 180\nTCP_KEEPINTVL = 60\n"
        );
        let off = KeepaliveState {
            keepalive: false,
            ..on
        };
        assert_eq!(off.text(), "SO_KEEPALIVE is OFF\n");
        let timed = KeepaliveState {
            user_timeout: 4000,
            ..on
        };
        assert!(timed
            .text()
            .ends_with("TCP_KEEPINTVL = 60\nTCP_USER_TIMEOUT = 4000 ms\n"));
    }
}
