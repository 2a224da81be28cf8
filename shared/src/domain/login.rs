//! The admin login lockout: how many password checks an address gets per
//! window, when a window is over, and how long a locked-out address waits.
//! The store keeps the per-address counter and asks these rules what its
//! state means.

/// Password checks allowed per address per window; further logins are
/// refused (429) until the window ends.
pub const MAX_LOGIN_FAILURES: u64 = 5;
/// The window, counted from its first check.
pub const LOGIN_WINDOW_SECS: u64 = 15 * 60;

/// An address's current window as stored: when it opened (epoch seconds)
/// and the checks taken in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginWindow {
    pub start: u64,
    pub failures: u64,
}

/// Windows opened at or before this moment are over at `now`.
pub fn window_cutoff(now: u64) -> u64 {
    now.saturating_sub(LOGIN_WINDOW_SECS)
}

/// When a window opened at `start` ends (also the counter's expiry).
pub fn window_end(start: u64) -> u64 {
    start + LOGIN_WINDOW_SECS
}

/// Seconds until logins are accepted again, if this window locks the
/// address out at `now`.
pub fn locked_for(window: Option<LoginWindow>, now: u64) -> Option<u64> {
    let window = window?;
    let end = window_end(window.start);
    (window.failures >= MAX_LOGIN_FAILURES && end > now).then(|| end - now)
}

/// How to take a check slot, judged from the window as last seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotStep {
    /// No window, or only an expired one: open a new window holding this check.
    Open,
    /// Count this check in the window opened at `window_start`.
    Add { window_start: u64 },
}

/// The slot step for a check at `now` given the window seen (`None`: none
/// stored), or `Err(seconds)` when no slot is left in it.
pub fn slot_step(seen: Option<LoginWindow>, now: u64) -> Result<SlotStep, u64> {
    match seen {
        None => Ok(SlotStep::Open),
        Some(window) if window.start <= window_cutoff(now) => Ok(SlotStep::Open),
        Some(window) if window.failures >= MAX_LOGIN_FAILURES => {
            Err(window_end(window.start).saturating_sub(now))
        }
        Some(window) => Ok(SlotStep::Add {
            window_start: window.start,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 10_000;

    fn window(start: u64, failures: u64) -> Option<LoginWindow> {
        Some(LoginWindow { start, failures })
    }

    #[test]
    fn an_address_is_locked_out_for_the_rest_of_a_full_window() {
        assert_eq!(locked_for(None, NOW), None);
        assert_eq!(locked_for(window(NOW - 100, 4), NOW), None);
        assert_eq!(locked_for(window(NOW - 100, 5), NOW), Some(800));
        assert_eq!(locked_for(window(NOW - 900, 5), NOW), None, "window over");
        assert_eq!(locked_for(window(NOW - 899, 9), NOW), Some(1));
    }

    #[test]
    fn a_check_opens_a_window_adds_to_it_or_waits() {
        assert_eq!(slot_step(None, NOW), Ok(SlotStep::Open));
        assert_eq!(slot_step(window(NOW - 900, 5), NOW), Ok(SlotStep::Open));
        assert_eq!(
            slot_step(window(NOW - 899, 4), NOW),
            Ok(SlotStep::Add {
                window_start: NOW - 899
            })
        );
        assert_eq!(slot_step(window(NOW - 100, 5), NOW), Err(800));
    }

    #[test]
    fn lockout_and_slots_agree_on_when_a_window_ends() {
        for start in [NOW - 901, NOW - 900, NOW - 899, NOW] {
            let seen = window(start, MAX_LOGIN_FAILURES);
            match slot_step(seen, NOW) {
                Err(wait) => assert_eq!(locked_for(seen, NOW), Some(wait)),
                Ok(_) => assert_eq!(locked_for(seen, NOW), None),
            }
        }
    }
}
