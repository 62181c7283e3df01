//! systemd's readiness and watchdog protocol (`sd_notify(3)`) for `Type=notify` units, on
//! the `sd-notify` crate. Without `NOTIFY_SOCKET` (a shell, sysvinit, a test) every call is
//! a no-op, so callers need no "am I under systemd" branch.
//!
//! The watchdog is pinged from the caller's main loop, never from a thread of its own:
//! a loop that stops making progress stops the pings, and systemd restarts the service.

use sd_notify::NotifyState;
use std::time::{Duration, Instant};

/// Tells the service manager that start-up is over (configuration and data checked).
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(&one_line(status))]);
}

/// A one-line summary shown by `systemctl status`.
pub fn status(status: &str) {
    send(&[NotifyState::Status(&one_line(status))]);
}

/// The service is shutting down on purpose (not a crash).
pub fn stopping(status: &str) {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status(&one_line(status)),
    ]);
}

fn send(states: &[NotifyState]) {
    // A lost notification is not worth stopping for: systemd then times the unit out,
    // which is the right outcome for a manager that cannot be reached.
    if let Err(e) = sd_notify::notify(states) {
        log::debug!("sd_notify: {e}");
    }
}

/// The protocol is line-based: a newline in a status would start a bogus assignment.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Pings the watchdog at half the interval systemd asked for (`WATCHDOG_USEC`), each time
/// the owner's loop calls `progress`; pings nothing when no watchdog is set.
pub(crate) struct Watchdog {
    every: Option<Duration>,
    last: Option<Instant>,
}

impl Watchdog {
    /// The watchdog systemd set up for this process (`WATCHDOG_USEC`, `WATCHDOG_PID`).
    pub fn from_env() -> Watchdog {
        Watchdog::every(sd_notify::watchdog_enabled().map(|d| d / 2))
    }

    fn every(every: Option<Duration>) -> Watchdog {
        Watchdog { every, last: None }
    }

    /// How often the owner's loop must call `progress` at least (when a watchdog is set).
    pub(crate) fn interval(&self) -> Option<Duration> {
        self.every
    }

    /// The loop went round once: ping if the last ping is half an interval old. Returns
    /// whether it pinged.
    pub(crate) fn progress(&mut self) -> bool {
        let Some(every) = self.every else {
            return false;
        };
        let now = Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < every) {
            return false;
        }
        self.last = Some(now);
        send(&[NotifyState::Watchdog]);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_stays_on_one_line() {
        assert_eq!(one_line("sent 3\nREADY=1"), "sent 3 READY=1");
    }

    #[test]
    fn pings_follow_progress_at_half_the_interval() {
        let mut none = Watchdog::every(None);
        assert!(!none.progress());
        let mut w = Watchdog::every(Some(Duration::from_millis(50)));
        assert!(w.progress(), "the first round pings");
        assert!(!w.progress(), "not again within the interval");
        std::thread::sleep(Duration::from_millis(60));
        assert!(w.progress());
    }
}
