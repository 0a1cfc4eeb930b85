//! At most one of something per interval: the warnings that a failing service or an exhausted
//! resource would otherwise log for every message or connection.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// Says yes at most once per interval.
#[derive(Debug)]
pub struct Throttle {
    every: Duration,
    last: Mutex<Option<Instant>>,
}

impl Throttle {
    /// A throttle that says yes at most once `every` interval (the first time at once).
    pub const fn new(every: Duration) -> Throttle {
        Throttle {
            every,
            last: Mutex::new(None),
        }
    }

    /// Whether the interval has passed since the last yes; a yes starts the next interval.
    pub fn due(&self) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let due = last.is_none_or(|at| at.elapsed() >= self.every);
        if due {
            *last = Some(Instant::now());
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yes_once_per_interval() {
        let throttle = Throttle::new(Duration::from_millis(50));
        assert!(throttle.due());
        assert!(!throttle.due());
        std::thread::sleep(Duration::from_millis(60));
        assert!(throttle.due());
        assert!(!throttle.due());
    }
}
